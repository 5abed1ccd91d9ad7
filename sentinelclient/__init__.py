"""`sentinelclient`: the Python client of Sentinel's public API, for InfraMind, scripts and
`sentinelctl`. `AsyncSentinelClient` (asyncio) and `SentinelClient` (blocking) connect with
mutual TLS and optional bearer tokens, retry what is safe to retry, follow paging, and raise
`SentinelError` with the status code and the server's message. Results are the API's own
`sentinel.v1` messages."""

from sentinelclient._async_client import AsyncSentinelClient
from sentinelclient._documents import (
    DocumentError,
    load_plan,
    load_policies,
    plan_from_data,
    policy_from_data,
    read_document,
)
from sentinelclient._errors import FieldProblem, SentinelError
from sentinelclient._settings import ENVIRONMENT, ConnectionSettings, RetryPolicy, TlsFiles
from sentinelclient._sync_client import SentinelClient
from sentinelclient._values import POLICY_FIELDS, TERMINAL_PHASES, PlanUpdate

__all__ = [
    "ENVIRONMENT",
    "POLICY_FIELDS",
    "TERMINAL_PHASES",
    "AsyncSentinelClient",
    "ConnectionSettings",
    "DocumentError",
    "FieldProblem",
    "PlanUpdate",
    "RetryPolicy",
    "SentinelClient",
    "SentinelError",
    "TlsFiles",
    "load_plan",
    "load_policies",
    "plan_from_data",
    "policy_from_data",
    "read_document",
]
