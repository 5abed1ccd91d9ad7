"""What the control plane and the node agent share: logging, task supervision, GC tuning."""

from sentinel_common._gc import tune_gc_for_long_lived_heap
from sentinel_common._logs import configure_logging, log_context
from sentinel_common._tasks import Supervisor

__all__ = [
    "Supervisor",
    "configure_logging",
    "log_context",
    "tune_gc_for_long_lived_heap",
]
