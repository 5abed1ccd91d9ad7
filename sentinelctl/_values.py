"""Values as the terminal spells them: the argument types that parse flags (counts, durations)
and the time formats that command output shares."""

from __future__ import annotations

import argparse
import datetime as dt

from google.protobuf import duration_pb2, timestamp_pb2


def positive(value: str) -> int:
    """A count of at least 1, e.g. `--limit` or `--uses`."""
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {number}")
    return number


_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def duration(value: str) -> duration_pb2.Duration:
    """`90s`, `30m`, `2h`, `1d` (a bare number is seconds)."""
    number, unit = (value[:-1], value[-1]) if value[-1:] in _DURATION_UNITS else (value, "s")
    try:
        seconds = float(number) * _DURATION_UNITS[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a duration like 30m, 2h or 90s"
        ) from None
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"{value!r}: the duration must be positive")
    result = duration_pb2.Duration()
    result.FromNanoseconds(int(seconds * 1e9))
    return result


def seconds(value: duration_pb2.Duration) -> str:
    """A duration as seconds, e.g. `12.5s` or `600s`."""
    return f"{value.ToTimedelta().total_seconds():g}s"


def ago(ts: timestamp_pb2.Timestamp) -> str:
    """How long ago, e.g. `42s ago` or `7m ago`."""
    seconds = (dt.datetime.now(dt.UTC) - ts.ToDatetime(dt.UTC)).total_seconds()
    return f"{seconds:.0f}s ago" if seconds < 120 else f"{seconds / 60:.0f}m ago"


def local_time(ts: timestamp_pb2.Timestamp, layout: str) -> str:
    """The timestamp in the terminal's time zone, laid out by `strftime`."""
    return ts.ToDatetime(dt.UTC).astimezone().strftime(layout)


def utc_iso(ts: timestamp_pb2.Timestamp) -> str:
    """The timestamp in UTC, ISO 8601 to the second."""
    return ts.ToDatetime(dt.UTC).isoformat(timespec="seconds")
