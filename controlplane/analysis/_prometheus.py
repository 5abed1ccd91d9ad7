"""Prometheus's HTTP API instant query (`GET /api/v1/query`), run in a worker thread with a
deadline: the result as plain numbers, or why there is none in words a person can act on."""

from __future__ import annotations

import asyncio
import http.client
import json
import math
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any

MAX_RESPONSE_BYTES = 16 * 1024 * 1024
"""A larger answer is refused: a gate query should aggregate, not list every series."""


class QueryFailed(Exception):
    """No usable result: Prometheus unreachable, slow, refusing the query, or answering with a
    result conditions cannot judge. The message says which, in words."""


@dataclass(frozen=True, slots=True)
class QueryResult:
    """An instant query's numbers: one per series for a vector, one for a scalar."""

    result_type: str
    """"vector" or "scalar"."""
    value: float | tuple[float, ...]
    """The sample values in Prometheus's order (NaN and ±Inf as Python floats)."""
    warnings: tuple[str, ...] = ()
    """What Prometheus warned about while answering."""


def query_url(address: str, query: str, timeout_s: float) -> str:
    """The URL of an instant query of `query` at `address` (a base URL, maybe with a path)."""
    parameters = urllib.parse.urlencode({"query": query, "timeout": f"{timeout_s:g}"})
    return f"{address.rstrip('/')}/api/v1/query?{parameters}"


def _read_capped(response: Any) -> bytes:
    body: bytes = response.read(MAX_RESPONSE_BYTES + 1)
    if len(body) > MAX_RESPONSE_BYTES:
        raise QueryFailed(
            f"the answer is larger than {MAX_RESPONSE_BYTES // (1024 * 1024)} MiB; "
            "aggregate the query (sum, max, ...) so it returns a few series"
        )
    return body


def _prometheus_error(body: bytes) -> str | None:
    """Prometheus's own error message from a JSON error body, or None if it is not one."""
    try:
        document = json.loads(body)
    except ValueError:
        return None
    if not isinstance(document, dict) or document.get("status") != "error":
        return None
    kind = document.get("errorType") or "error"
    return f"Prometheus refused the query ({kind}): {document.get('error') or 'no message'}"


def _reason_text(reason: object) -> str:
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror
    return str(reason) or type(reason).__name__


def _get(address: str, url: str, timeout_s: float) -> bytes:
    """The body of a successful answer; blocking, so run in a worker thread."""
    # The scheme was checked to be http or https by the caller (address_problem).
    request = urllib.request.Request(  # noqa: S310
        url, headers={"Accept": "application/json", "User-Agent": "sentinel-controlplane"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:  # noqa: S310
            return _read_capped(response)
    except urllib.error.HTTPError as exc:
        try:
            body = _read_capped(exc)
        except (QueryFailed, OSError, http.client.HTTPException):
            body = b""
        message = _prometheus_error(body)
        if message is None:
            snippet = body[:200].decode("utf-8", "replace").strip()
            message = f"Prometheus at {address} answered HTTP {exc.code} {exc.reason}" + (
                f": {snippet}" if snippet else ""
            )
        raise QueryFailed(message) from None
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, TimeoutError):
            raise QueryFailed(_no_answer(address, timeout_s)) from None
        raise QueryFailed(
            f"cannot reach Prometheus at {address}: {_reason_text(exc.reason)}"
        ) from None
    except TimeoutError:
        raise QueryFailed(_no_answer(address, timeout_s)) from None
    except (OSError, http.client.HTTPException) as exc:
        raise QueryFailed(
            f"the connection to Prometheus at {address} failed: {_reason_text(exc)}"
        ) from None


def _no_answer(address: str, timeout_s: float) -> str:
    return f"no answer from Prometheus at {address} within {timeout_s:g} s"


def _sample_value(pair: Any) -> float:
    if not isinstance(pair, list) or len(pair) != 2 or not isinstance(pair[1], str):
        raise ValueError(f"a sample is not [time, value]: {pair!r}")
    # Prometheus writes special values as "NaN", "+Inf" and "-Inf", which float() reads.
    return float(pair[1])


def parse_answer(body: bytes) -> QueryResult:
    """The numbers of a `/api/v1/query` answer; raises QueryFailed for an error answer or a
    result type conditions cannot judge."""
    message = _prometheus_error(body)
    if message is not None:
        raise QueryFailed(message)
    try:
        document = json.loads(body)
        if document.get("status") != "success":
            raise ValueError(f"status is {document.get('status')!r}")
        data = document["data"]
        result_type = data["resultType"]
        result = data["result"]
        warnings = tuple(str(w) for w in document.get("warnings") or ())
        if result_type == "vector":
            values: list[float] = []
            for sample in result:
                if "value" not in sample and "histogram" in sample:
                    raise QueryFailed(
                        "the query returns native histogram samples; conditions need numbers "
                        "(use histogram_quantile(), histogram_count() or histogram_sum())"
                    )
                values.append(_sample_value(sample["value"]))
            return QueryResult("vector", tuple(values), warnings)
        if result_type == "scalar":
            return QueryResult("scalar", _sample_value(result), warnings)
    except QueryFailed:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise QueryFailed(f"Prometheus answered something unexpected: {exc}") from None
    if result_type == "matrix":
        raise QueryFailed(
            "the query returns a range vector (matrix); use an instant query "
            "(e.g. wrap the range in rate() or avg_over_time())"
        )
    if result_type == "string":
        raise QueryFailed("the query returns a string; conditions need numbers")
    raise QueryFailed(f"Prometheus answered an unknown result type {result_type!r}")


async def instant_query(address: str, query: str, timeout_s: float) -> QueryResult:
    """Evaluates `query` now at the Prometheus at `address`; raises QueryFailed.

    Blocking I/O runs in a worker thread; the deadline covers the whole exchange, and
    Prometheus is told it too so it stops evaluating a query nobody waits for."""
    url = query_url(address, query, timeout_s)
    try:
        body = await asyncio.wait_for(asyncio.to_thread(_get, address, url, timeout_s), timeout_s)
    except TimeoutError:
        raise QueryFailed(_no_answer(address, timeout_s)) from None
    return parse_answer(body)


def has_nan(value: float | tuple[float, ...]) -> bool:
    """Whether any number of a result is NaN."""
    values = value if isinstance(value, tuple) else (value,)
    return any(math.isnan(v) for v in values)
