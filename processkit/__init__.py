"""What every Sentinel process needs, whichever program it runs: structured logs, supervised
long-lived tasks, GC tuning for a long-lived heap, and command-line help taken from settings
docstrings. (Not to be confused with `sentinel`, the package generated from protos/.)"""

from processkit._gc import tune_gc_for_long_lived_heap
from processkit._logs import configure_logging, log_context
from processkit._settings_docs import field_docs
from processkit._tasks import Supervisor, wait_event

__all__ = [
    "Supervisor",
    "configure_logging",
    "field_docs",
    "log_context",
    "tune_gc_for_long_lived_heap",
    "wait_event",
]
