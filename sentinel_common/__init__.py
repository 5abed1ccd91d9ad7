"""Pieces both the control plane and the node agent use: structured logging and task supervision."""

from sentinel_common._logs import bind_log_context, configure_logging, log_context
from sentinel_common._tasks import Supervisor

__all__ = ["Supervisor", "bind_log_context", "configure_logging", "log_context"]
