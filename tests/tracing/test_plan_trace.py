"""Tracing (docs/tracing.md): a plan's trace runs from the submitting call through validation,
policy and storage to every step, wave, command and gate of its execution, continues on a
control plane that reads the plan back from the store, reaches an OTLP collector when tracing
is on, and costs nothing (no SDK, no export) when it is off."""

from __future__ import annotations

import asyncio
import os
import pathlib
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from sentinel.v1 import plan_pb2

from controlplane.tracing import install_provider, tracing_exporter
from tests.conftest import AgentFactory, ControlPlaneFactory, Pki
from tests.fleet.test_restart_delivery import _free_port, _wait_listening
from tests.plan_helpers import plan, plan_client, step, wait_phase, wait_terminal

SUBMIT_CALL = "/sentinel.v1.PlanService/SubmitPlan"

# One provider per process (OpenTelemetry's rule): installed once, through the same function
# an embedding program would use, with an exporter that keeps spans in memory.
_exporter: InMemorySpanExporter | None = None


@pytest.fixture
def spans() -> InMemorySpanExporter:
    global _exporter
    if _exporter is None:
        _exporter = InMemorySpanExporter()
        install_provider(_exporter, instance_id="tests", batch=False)
    _exporter.clear()
    return _exporter


def _named(spans: Sequence[ReadableSpan], name: str, trace_id: int) -> list[ReadableSpan]:
    return [s for s in spans if s.name == name and s.context.trace_id == trace_id]


def _children(spans: Sequence[ReadableSpan], parent: ReadableSpan, name: str) -> list[ReadableSpan]:
    return [
        s
        for s in spans
        if s.name == name and s.parent is not None and s.parent.span_id == parent.context.span_id
    ]


def _one(found: list[ReadableSpan]) -> ReadableSpan:
    assert len(found) == 1, [(s.name, dict(s.attributes or {})) for s in found]
    return found[0]


def _attribute(span: ReadableSpan, key: str) -> Any:
    return (span.attributes or {}).get(key)


def _submit_spans(spans: Sequence[ReadableSpan]) -> tuple[ReadableSpan, ReadableSpan]:
    """The SubmitPlan server span and its plan.submit child."""
    call = _one([s for s in spans if s.name == SUBMIT_CALL])
    assert call.kind == SpanKind.SERVER
    submit = _one(_children(spans, call, "plan.submit"))
    return call, submit


async def test_plan_trace_runs_from_the_submitting_call_through_steps_commands_and_gates(
    spans: InMemorySpanExporter,
    control_plane_factory: ControlPlaneFactory,
    agent_factory: AgentFactory,
    pki: Pki,
) -> None:
    cp = await control_plane_factory(tracing="otlp")
    await agent_factory("node-a", cp.port)
    async with plan_client(pki, cp.port) as planner:
        submitted = await planner.SubmitPlan(
            plan_pb2.SubmitPlanRequest(
                plan=plan(
                    step("run_diagnostic", ["node-a"]),
                    step("set_telemetry_interval", ["node-a"], {"seconds": 1}),
                    gates=[("alive", "sample.seq > 0", 5.0)],
                )
            )
        )
        plan_id = submitted.plan.plan_id
        done = await wait_terminal(planner, plan_id)
    assert done.phase == plan_pb2.PLAN_PHASE_COMPLETED, done.status_message
    await asyncio.sleep(0.2)  # the plan.execute span ends just after the last save
    finished = spans.get_finished_spans()

    call, submit = _submit_spans(finished)
    trace_id = call.context.trace_id
    assert _attribute(submit, "sentinel.plan.id") == plan_id
    assert _attribute(submit, "sentinel.plan.phase") == "APPROVED"
    for name in ("plan.validate", "plan.policy", "plan.store"):
        _one(_children(finished, submit, name))
    assert _attribute(
        _one(_children(finished, submit, "plan.policy")), "sentinel.plan.verdict"
    ) == ("APPROVED")

    # Execution happens later, in the controller's task: same trace, under the submission.
    execute = _one(_children(finished, submit, "plan.execute"))
    assert execute.context.trace_id == trace_id
    assert _attribute(execute, "sentinel.plan.final_phase") == "COMPLETED"
    steps = sorted(
        _children(finished, execute, "plan.step"),
        key=lambda s: _attribute(s, "sentinel.step.index"),
    )
    assert [_attribute(s, "sentinel.step.action") for s in steps] == [
        "run_diagnostic",
        "set_telemetry_interval",
    ]
    for plan_step in steps:
        assert _attribute(plan_step, "sentinel.step.state") == "SUCCEEDED"
        wave = _one(_children(finished, plan_step, "plan.wave"))
        command = _one(_children(finished, wave, "command"))
        assert _attribute(command, "sentinel.node.id") == "node-a"
        assert _attribute(command, "sentinel.command.outcome") == "SUCCEEDED"
        assert _attribute(command, "sentinel.command.action") == _attribute(
            plan_step, "sentinel.step.action"
        )
        gate = _one(_children(finished, wave, "gate"))
        assert _attribute(gate, "sentinel.gate.name") == "alive"
        assert _attribute(gate, "sentinel.gate.verdict") == "passed"
        assert gate.start_time is not None and command.end_time is not None
        assert gate.start_time >= command.end_time  # the gate judges the wave after it ran
        assert gate.status.status_code != StatusCode.ERROR
    # The agent's session stream is not a call worth a span (it lasts hours).
    assert not [s for s in finished if s.name == "/sentinel.v1.AgentService/Connect"]

    # What links the two halves is stored with the plan.
    stored = await cp.plans.get(plan_id)
    traceparent = stored.trace_context["traceparent"]
    version, stored_trace, stored_parent, flags = traceparent.split("-")
    assert (version, stored_trace, stored_parent) == (
        "00",
        f"{trace_id:032x}",
        f"{submit.context.span_id:016x}",
    )
    assert int(flags, 16) & 1  # sampled


async def test_failed_gate_marks_the_trace_and_the_rollback_is_traced(
    spans: InMemorySpanExporter,
    control_plane_factory: ControlPlaneFactory,
    agent_factory: AgentFactory,
    pki: Pki,
) -> None:
    cp = await control_plane_factory(tracing="otlp")
    await agent_factory("node-a", cp.port)
    async with plan_client(pki, cp.port) as planner:
        submitted = await planner.SubmitPlan(
            plan_pb2.SubmitPlanRequest(
                plan=plan(
                    step("set_telemetry_interval", ["node-a"], {"seconds": 1}),
                    gates=[("never", "sample.seq < 0", 5.0)],
                )
            )
        )
        done = await wait_terminal(planner, submitted.plan.plan_id)
    assert done.phase == plan_pb2.PLAN_PHASE_ROLLED_BACK, done.status_message
    await asyncio.sleep(0.2)
    finished = spans.get_finished_spans()

    _, submit = _submit_spans(finished)
    execute = _one(_children(finished, submit, "plan.execute"))
    assert execute.status.status_code == StatusCode.ERROR
    plan_step = _one(_children(finished, execute, "plan.step"))
    assert plan_step.status.status_code == StatusCode.ERROR
    gate = _one(_children(finished, _one(_children(finished, plan_step, "plan.wave")), "gate"))
    assert _attribute(gate, "sentinel.gate.verdict") == "failed"
    assert gate.status.status_code == StatusCode.ERROR
    rollback = _one(_children(finished, execute, "plan.rollback"))
    undo = _one(_children(finished, rollback, "command"))
    assert _attribute(undo, "sentinel.command.undo") is True
    assert _attribute(undo, "sentinel.command.outcome") == "SUCCEEDED"


async def test_a_restarted_control_plane_continues_the_plan_trace_it_reads_from_the_store(
    spans: InMemorySpanExporter,
    control_plane_factory: ControlPlaneFactory,
    agent_factory: AgentFactory,
    pki: Pki,
) -> None:
    first = await control_plane_factory(tracing="otlp", controller_id="cp-first")
    away = await agent_factory("node-a", first.port)
    await away.stop()  # known but away: the plan waits for it, EXECUTING
    async with plan_client(pki, first.port) as planner:
        submitted = await planner.SubmitPlan(
            plan_pb2.SubmitPlanRequest(
                plan=plan(step("set_telemetry_interval", ["node-a"], {"seconds": 1}, timeout_s=60))
            )
        )
        plan_id = submitted.plan.plan_id
        await wait_phase(planner, plan_id, plan_pb2.PLAN_PHASE_EXECUTING)
    await first.stop()

    second = await control_plane_factory(tracing="otlp", controller_id="cp-second")
    await agent_factory("node-a", second.port)
    async with plan_client(pki, second.port) as planner:
        done = await wait_terminal(planner, plan_id)
    assert done.phase == plan_pb2.PLAN_PHASE_COMPLETED, done.status_message
    await asyncio.sleep(0.2)
    finished = spans.get_finished_spans()

    _, submit = _submit_spans(finished)
    executions = {
        _attribute(s, "sentinel.controller"): s for s in _children(finished, submit, "plan.execute")
    }
    assert set(executions) == {"cp-first", "cp-second"}
    resumed = executions["cp-second"]
    assert resumed.context.trace_id == submit.context.trace_id
    assert _attribute(resumed, "sentinel.plan.final_phase") == "COMPLETED"
    wave = _one(_children(finished, _one(_children(finished, resumed, "plan.step")), "plan.wave"))
    command = _one(_children(finished, wave, "command"))
    assert _attribute(command, "sentinel.command.outcome") == "SUCCEEDED"


# --- the exporter, in a control plane process of its own ------------------------------------


class _Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace collector that keeps the names of the spans it is sent."""

    def __init__(self) -> None:
        self.names: list[str] = []

    async def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: Any
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        for resource in request.resource_spans:
            for scope in resource.scope_spans:
                self.names.extend(span.name for span in scope.spans)
        return trace_service_pb2.ExportTraceServiceResponse()


@pytest.fixture
async def collector() -> AsyncIterator[tuple[_Collector, int]]:
    server = grpc.aio.server()
    servicer = _Collector()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield servicer, port
    await server.stop(0)


def _start(
    pki: Pki, port: int, database_url: str, flags: list[str], environment: dict[str, str]
) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "controlplane.main",
            "--certs-dir",
            str(pki.directory),
            "--listen",
            f"127.0.0.1:{port}",
            "--metrics-listen",
            "",
            "--enrollment-listen",
            "",
            "--database-url",
            database_url,
            "--telemetry-interval-s",
            "0.2",
            *flags,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "OTEL_BSP_SCHEDULE_DELAY": "100", **environment},
    )


async def _plan_in_a_process(
    pki: Pki,
    database_url: str,
    agent_factory: AgentFactory,
    flags: list[str],
    environment: dict[str, str],
) -> None:
    """Runs a control plane process with `flags` and `environment`, carries a gated plan
    through it with a real agent, and stops the process gracefully."""
    port = _free_port()
    process = _start(pki, port, database_url, flags, environment)
    try:
        await _wait_listening(process)
        await agent_factory("node-a", port)
        async with plan_client(pki, port) as planner:
            submitted = await planner.SubmitPlan(
                plan_pb2.SubmitPlanRequest(
                    plan=plan(
                        step("run_diagnostic", ["node-a"]), gates=[("alive", "sample.seq > 0", 5.0)]
                    )
                )
            )
            done = await wait_terminal(planner, submitted.plan.plan_id)
        assert done.phase == plan_pb2.PLAN_PHASE_COMPLETED, done.status_message
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(process.wait, 15)
        except subprocess.TimeoutExpired:
            process.kill()


async def test_with_tracing_on_the_plan_trace_reaches_an_otlp_collector(
    collector: tuple[_Collector, int], pki: Pki, database_url: str, agent_factory: AgentFactory
) -> None:
    servicer, port = collector
    await _plan_in_a_process(
        pki,
        database_url,
        agent_factory,
        ["--tracing", "otlp"],
        {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}"},
    )
    expected = {SUBMIT_CALL, "plan.submit", "plan.execute", "plan.step", "command", "gate"}
    assert expected <= set(servicer.names), servicer.names


@pytest.mark.parametrize(
    ("flags", "environment"),
    [
        # The default: OTEL_* variables alone do not turn tracing on.
        ([], {"OTEL_TRACES_EXPORTER": "otlp"}),
        (["--tracing", "otlp"], {"OTEL_SDK_DISABLED": "true"}),
    ],
    ids=["default", "sdk-disabled"],
)
async def test_with_tracing_off_nothing_is_exported(
    collector: tuple[_Collector, int],
    pki: Pki,
    database_url: str,
    agent_factory: AgentFactory,
    flags: list[str],
    environment: dict[str, str],
) -> None:
    servicer, port = collector
    await _plan_in_a_process(
        pki,
        database_url,
        agent_factory,
        flags,
        {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}", **environment},
    )
    assert servicer.names == []


def test_with_tracing_off_the_sdk_is_not_even_loaded(tmp_path: pathlib.Path) -> None:
    # In a fresh interpreter: this one has the SDK loaded for the tests above.
    script = (
        "import sys\n"
        "import controlplane.app\n"
        "from controlplane.tracing import start_tracing\n"
        "from opentelemetry import trace\n"
        "tracing = start_tracing('', instance_id='x')\n"
        "assert not tracing.enabled and tracing.server_interceptors() == []\n"
        "assert not trace.get_current_span().is_recording()\n"
        "with trace.get_tracer('t').start_as_current_span('plan.submit') as span:\n"
        "    assert not span.is_recording()\n"
        "print(sorted(m for m in sys.modules if m.startswith('opentelemetry.sdk')))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_tracing_setting_names_an_exporter_or_is_off() -> None:
    assert tracing_exporter("") == ""
    assert tracing_exporter("off") == ""
    assert tracing_exporter("OTLP", {}) == "otlp"
    assert tracing_exporter("console", {"OTEL_SDK_DISABLED": "true"}) == ""
    with pytest.raises(ValueError, match="jaeger"):
        tracing_exporter("jaeger")
    with pytest.raises(ValueError, match="only grpc"):
        tracing_exporter("otlp", {"OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"})
