"""Node actions end to end: a real control plane sends set_gpu_power_limit, run_diagnostic,
cordon and uncordon to real agents over mTLS; only the GPU is faked (see tests/fakenvml.py)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import pathlib
import threading
from collections.abc import AsyncIterator
from typing import Any

import pynvml
import pytest
from sentinel.v1 import telemetry_pb2
from sqlalchemy import update

from controlplane import ControlPlane
from controlplane.fleet import CommandResult, CommandState
from controlplane.store import CommandRow
from nodeagent.agent import NodeAgent
from nodeagent.collectors import AsyncGpuCollector, HostCollector
from nodeagent.settings import AgentSettings
from tests.conftest import AgentFactory, Pki, eventually
from tests.fakenvml import DRIVER_VERSION, NVML_VERSION, FakeNvml, h100

NODE = "gpu-node-1"


@pytest.fixture
def nvml(monkeypatch: pytest.MonkeyPatch) -> FakeNvml:
    fake = FakeNvml([h100(0), h100(1)])
    fake.install(monkeypatch)
    return fake


async def send(
    control_plane: ControlPlane, action: str, parameters: dict[str, Any], node: str = NODE
) -> CommandResult:
    return await control_plane.commands.send(node, action, parameters, timeout=10)


def limits(nvml: FakeNvml) -> list[int]:
    return [gpu.power_limit for gpu in nvml.gpus]


# -- set_gpu_power_limit -----------------------------------------------------------------------


async def test_power_limit_is_set_on_every_gpu_and_output_has_previous_limits(
    nvml: FakeNvml, control_plane: ControlPlane, agent_factory: AgentFactory
) -> None:
    nvml.gpus[1].power_limit = 650_000
    await agent_factory(NODE, control_plane.port)

    result = await send(control_plane, "set_gpu_power_limit", {"watts": 250})

    assert result.outcome == "SUCCEEDED", result.message
    assert result.output == {
        "gpus": [
            {"index": 0, "uuid": nvml.gpus[0].uuid, "previous_watts": 700.0, "watts": 250.0},
            {"index": 1, "uuid": nvml.gpus[1].uuid, "previous_watts": 650.0, "watts": 250.0},
        ]
    }
    assert limits(nvml) == [250_000, 250_000]


async def test_power_limit_on_listed_gpus_leaves_the_others_alone(
    monkeypatch: pytest.MonkeyPatch, control_plane: ControlPlane, agent_factory: AgentFactory
) -> None:
    nvml = FakeNvml([h100(i) for i in range(3)])
    nvml.install(monkeypatch)
    await agent_factory(NODE, control_plane.port)

    result = await send(control_plane, "set_gpu_power_limit", {"watts": 300.5, "gpus": [2, 0]})

    assert result.outcome == "SUCCEEDED", result.message
    assert [(g["index"], g["watts"]) for g in result.output["gpus"]] == [(2, 300.5), (0, 300.5)]
    assert limits(nvml) == [300_500, 700_000, 300_500]


async def test_rollback_with_per_gpu_watts_restores_each_gpus_own_limit(
    nvml: FakeNvml, control_plane: ControlPlane, agent_factory: AgentFactory
) -> None:
    nvml.gpus[0].power_limit = 600_000
    nvml.gpus[1].power_limit = 450_000
    await agent_factory(NODE, control_plane.port)
    done = await send(control_plane, "set_gpu_power_limit", {"watts": 300})
    assert limits(nvml) == [300_000, 300_000]

    # What the pipeline controller sends to undo it, built from the first command's output.
    inverse = {str(int(g["index"])): g["previous_watts"] for g in done.output["gpus"]}
    undone = await send(control_plane, "set_gpu_power_limit", {"per_gpu_watts": inverse})

    assert undone.outcome == "SUCCEEDED", undone.message
    assert limits(nvml) == [600_000, 450_000]
    assert [g["previous_watts"] for g in undone.output["gpus"]] == [300.0, 300.0]


async def test_a_limit_outside_a_gpus_range_is_refused_and_nothing_changes(
    nvml: FakeNvml, control_plane: ControlPlane, agent_factory: AgentFactory
) -> None:
    nvml.gpus[1].power_limit_range = (100_000, 500_000)
    await agent_factory(NODE, control_plane.port)

    too_high = await send(control_plane, "set_gpu_power_limit", {"watts": 600})
    too_low = await send(control_plane, "set_gpu_power_limit", {"per_gpu_watts": {"0": 150}})

    assert too_high.outcome == "INVALID_ARGUMENT"
    assert too_high.message == ("parameters.watts: 600 W is outside GPU 1's range [100, 500] W")
    assert too_low.outcome == "INVALID_ARGUMENT"
    assert too_low.message == (
        "parameters.per_gpu_watts.0: 150 W is outside GPU 0's range [200, 700] W"
    )
    assert nvml.power_limit_sets == []
    assert limits(nvml) == [700_000, 700_000]


@pytest.mark.parametrize(
    ("parameters", "message"),
    [
        (
            {"watts": 250, "gpus": [0, 5]},
            "parameters.gpus[1]: no GPU 5 on this node (it has GPUs 0-1)",
        ),
        ({"per_gpu_watts": {"3": 250}}, "parameters.per_gpu_watts.3: no GPU 3 on this node"),
        ({}, "parameters.watts: give exactly one of watts or per_gpu_watts"),
        (
            {"watts": 250, "per_gpu_watts": {"0": 250}},
            "parameters.watts: give exactly one of watts or per_gpu_watts",
        ),
        ({"watts": "250"}, "parameters.watts: must be a positive number of watts"),
        ({"watts": 250, "gpus": [0, 1.5]}, "parameters.gpus[1]: not a GPU index: 1.5"),
        ({"watts": 250, "gpus": [1, 1]}, "parameters.gpus[1]: GPU 1 is listed twice"),
        ({"per_gpu_watts": {"gpu0": 250}}, "parameters.per_gpu_watts.gpu0: keys are GPU indices"),
        ({"watts": 250, "volts": 1}, "parameters.volts: unknown parameter"),
    ],
)
async def test_bad_power_limit_parameters_are_invalid_argument_naming_the_field(
    nvml: FakeNvml,
    control_plane: ControlPlane,
    agent_factory: AgentFactory,
    parameters: dict[str, Any],
    message: str,
) -> None:
    await agent_factory(NODE, control_plane.port)

    result = await send(control_plane, "set_gpu_power_limit", parameters)

    assert result.outcome == "INVALID_ARGUMENT"
    assert result.message.startswith(message), result.message
    assert nvml.power_limit_sets == []


async def test_a_failure_on_the_second_gpu_restores_the_first(
    nvml: FakeNvml, control_plane: ControlPlane, agent_factory: AgentFactory
) -> None:
    nvml.gpus[1].failures["nvmlDeviceSetPowerManagementLimit"] = pynvml.NVMLError_NoPermission()
    await agent_factory(NODE, control_plane.port)

    result = await send(control_plane, "set_gpu_power_limit", {"watts": 250})

    assert result.outcome == "FAILED"
    assert "GPU 1" in result.message
    assert nvml.gpus[1].uuid in result.message
    assert "Insufficient Permissions" in result.message
    assert "restored GPU 0 to 700 W" in result.message
    assert nvml.power_limit_sets == [(0, 250_000), (0, 700_000)]
    assert limits(nvml) == [700_000, 700_000]


async def test_without_a_gpu_power_limit_fails_clearly_and_is_not_advertised(
    nvml: FakeNvml, control_plane: ControlPlane, agent_factory: AgentFactory
) -> None:
    nvml.init_error = pynvml.NVMLError_LibraryNotFound()
    await agent_factory(NODE, control_plane.port)
    registered = control_plane.registry.get(NODE)

    result = await send(control_plane, "set_gpu_power_limit", {"watts": 250})

    assert registered is not None
    assert "action:set_gpu_power_limit" not in registered.capabilities
    assert {"action:run_diagnostic", "action:cordon", "action:uncordon"} <= set(
        registered.capabilities
    )
    assert result.outcome == "FAILED"
    assert result.message.startswith("no NVIDIA GPU or driver on this node: ")
    assert "NVIDIA driver not found" in result.message


async def test_with_a_gpu_power_limit_is_advertised(
    nvml: FakeNvml, control_plane: ControlPlane, agent_factory: AgentFactory
) -> None:
    await agent_factory(NODE, control_plane.port)

    registered = control_plane.registry.get(NODE)

    assert registered is not None
    assert "action:set_gpu_power_limit" in registered.capabilities


@contextlib.asynccontextmanager
async def agent_with_nvml_deadline(
    pki: Pki, tmp_path: pathlib.Path, port: int, call_timeout: float
) -> AsyncIterator[NodeAgent]:
    """An agent like agent_factory's, with a short NVML deadline so a hang is seen quickly."""
    cert, key = pki.client("agent", NODE)
    settings = AgentSettings(
        node_id=NODE,
        ca=pki.ca_path,
        cert=cert,
        key=key,
        control_plane=f"localhost:{port}",
        state_dir=tmp_path / "agent-hung",
        metrics_listen="",
        telemetry_interval_s=0.2,
        backoff_base_s=0.05,
        backoff_cap_s=0.5,
    )
    agent = NodeAgent(
        settings,
        host_collector=HostCollector(),
        gpu_collector=AsyncGpuCollector(call_timeout=call_timeout),
    )
    task = asyncio.create_task(agent.run(), name="agent-hung")
    try:
        await asyncio.wait_for(agent.connected.wait(), 10)
        yield agent
    finally:
        agent.stop()
        await asyncio.wait_for(task, 10)


async def test_a_hung_power_limit_call_fails_at_its_deadline_and_telemetry_keeps_flowing(
    nvml: FakeNvml, pki: Pki, tmp_path: pathlib.Path, control_plane: ControlPlane
) -> None:
    wedged = threading.Event()
    nvml.hangs["nvmlDeviceSetPowerManagementLimit"] = wedged

    def latest() -> telemetry_pb2.TelemetrySample | None:
        sample = control_plane.hub.latest(NODE)
        return sample.payload if sample else None

    try:
        async with agent_with_nvml_deadline(pki, tmp_path, control_plane.port, 0.5):
            result = await send(control_plane, "set_gpu_power_limit", {"watts": 250})

            assert result.outcome == "FAILED"
            assert "setting GPU 0's power limit failed" in result.message
            assert "did not return within 0.5s" in result.message
            assert "no GPU was changed" in result.message

            # The set call is still stuck in the driver; the session and telemetry go on.
            stuck_from = (await eventually(latest)).seq
            sample = await eventually(
                lambda: (s := latest()) is not None and s.seq > stuck_from + 2 and s
            )
            assert sample.gpu_status.state == telemetry_pb2.GPU_COLLECTION_STATE_TIMEOUT
            assert sample.host.memory.total_bytes > 0
            pong = await send(control_plane, "ping", {})
            assert pong.succeeded
            again = await send(control_plane, "set_gpu_power_limit", {"watts": 250})
            assert again.outcome == "FAILED"
            assert "previous NVML call still running" in again.message

            wedged.set()
            await eventually(
                lambda: (
                    (s := latest()) is not None
                    and s.gpu_status.state == telemetry_pb2.GPU_COLLECTION_STATE_OK
                )
            )
    finally:
        wedged.set()


async def test_a_redelivered_power_limit_command_is_not_executed_twice(
    nvml: FakeNvml, control_plane: ControlPlane, agent_factory: AgentFactory
) -> None:
    node = await agent_factory(NODE, control_plane.port)
    first = await send(control_plane, "set_gpu_power_limit", {"watts": 250})
    assert first.succeeded
    await node.stop()

    # The result "never reached" the store: the next session re-sends the command.
    def reopen(db):  # type: ignore[no-untyped-def]
        db.execute(
            update(CommandRow)
            .where(CommandRow.command_id == first.command_id)
            .values(state=CommandState.SENT.value, outcome="", output={})
        )

    await control_plane.store.run(reopen)
    await agent_factory(NODE, control_plane.port)

    async def finished() -> bool:
        stored = await control_plane.commands.get(first.command_id)
        return stored is not None and stored[0] is CommandState.FINISHED

    await eventually(finished)
    stored = await control_plane.commands.get(first.command_id)
    assert stored is not None and stored[1] is not None
    # Run twice, the second run would report 250 W as the previous limit.
    assert stored[1].output == first.output
    assert nvml.power_limit_sets == [(0, 250_000), (1, 250_000)]


# -- run_diagnostic ------------------------------------------------------------------------------


async def test_diagnostic_report_of_a_two_gpu_node(
    nvml: FakeNvml, control_plane: ControlPlane, agent_factory: AgentFactory
) -> None:
    nvml.gpus[1].clocks_event_reasons = (
        pynvml.nvmlClocksEventReasonSwPowerCap | pynvml.nvmlClocksEventReasonHwThermalSlowdown
    )
    nvml.gpus[1].failures["nvmlDeviceGetRetiredPages"] = pynvml.NVMLError_NotSupported()
    node = await agent_factory(NODE, control_plane.port)
    nvml.pending_xids.append((1, 79))
    await eventually(lambda: node.agent.last_sample and node.agent.last_sample.gpus[1].last_xid)

    result = await send(control_plane, "run_diagnostic", {})

    assert result.outcome == "SUCCEEDED", result.message
    report = result.output
    assert set(report) >= {"gpu", "xid", "system", "disk"}
    assert "truncated" not in report
    gpu = report["gpu"]
    assert gpu["available"] is True
    assert (gpu["driver_version"], gpu["nvml_version"]) == (DRIVER_VERSION, NVML_VERSION)
    first, second = gpu["gpus"]
    assert first["uuid"] == nvml.gpus[0].uuid
    assert first["name"] == "NVIDIA H100 80GB HBM3"
    assert first["pci_bus_id"] == "00000000:18:00.0"
    assert first["temperature_celsius"] == 41
    assert first["power_usage_watts"] == pytest.approx(312.456)
    assert first["power_limit_watts"] == 700
    assert first["persistence_mode"] == "Enabled"
    assert first["ecc_mode"] == {"current": "Enabled", "pending": "Enabled"}
    assert first["ecc_errors"] == {
        "corrected_volatile": 3,
        "uncorrected_volatile": 0,
        "corrected_aggregate": 17,
        "uncorrected_aggregate": 0,
    }
    assert first["retired_pages"] == {"single_bit_ecc": 0, "double_bit_ecc": 0, "pending": False}
    assert first["remapped_rows"] == {
        "correctable": 2,
        "uncorrectable": 0,
        "pending": False,
        "failed": False,
    }
    assert first["throttle_reasons"] == ["sw_power_cap"]
    assert "fan_speed_percent" not in first["unsupported"]
    assert second["throttle_reasons"] == ["sw_power_cap", "hw_thermal_slowdown"]
    assert second["last_xid"] == 79
    assert second["retired_pages"] == {"pending": False}
    assert set(second["unsupported"]) == {
        "retired_pages.single_bit_ecc",
        "retired_pages.double_bit_ecc",
    }
    [xid] = report["xid"]["events"]
    assert (xid["xid"], xid["gpu_index"], xid["gpu_uuid"]) == (79, 1, nvml.gpus[1].uuid)
    assert xid["time"].endswith("+00:00")
    system = report["system"]
    assert system["kernel"] and system["os"] and system["architecture"]
    assert system["uptime_seconds"] > 0
    disk = report["disk"]
    assert disk["path"] == str(node.agent.settings.state_dir)
    assert 0 < disk["free_bytes"] <= disk["total_bytes"]


async def test_diagnostic_report_of_a_gpu_less_node_says_why_and_succeeds(
    nvml: FakeNvml, control_plane: ControlPlane, agent_factory: AgentFactory
) -> None:
    nvml.init_error = pynvml.NVMLError_LibraryNotFound()
    await agent_factory(NODE, control_plane.port)

    result = await send(control_plane, "run_diagnostic", {})

    assert result.outcome == "SUCCEEDED", result.message
    gpu = result.output["gpu"]
    assert gpu["available"] is False
    assert "NVIDIA driver not found" in gpu["reason"]
    assert gpu["driver_version"] == "no driver"
    assert result.output["xid"] == {"events": []}
    assert result.output["system"]["kernel"]


async def test_diagnostic_include_picks_sections_and_an_unknown_one_is_named(
    nvml: FakeNvml, control_plane: ControlPlane, agent_factory: AgentFactory
) -> None:
    await agent_factory(NODE, control_plane.port)

    disk_only = await send(control_plane, "run_diagnostic", {"include": ["disk"]})
    unknown = await send(control_plane, "run_diagnostic", {"include": ["disk", "bios"]})

    assert disk_only.outcome == "SUCCEEDED"
    assert "disk" in disk_only.output
    assert not {"gpu", "xid", "system"} & set(disk_only.output)
    assert unknown.outcome == "INVALID_ARGUMENT"
    assert unknown.message == (
        "parameters.include[1]: unknown section 'bios' (disk, gpu, system, xid)"
    )


async def test_a_diagnostic_report_too_large_is_cut_to_its_bound_with_a_note(
    monkeypatch: pytest.MonkeyPatch, control_plane: ControlPlane, agent_factory: AgentFactory
) -> None:
    nvml = FakeNvml([h100(i) for i in range(128)])
    nvml.install(monkeypatch)
    await agent_factory(NODE, control_plane.port, telemetry_interval_s=5.0)

    result = await send(control_plane, "run_diagnostic", {"include": ["gpu"]})

    assert result.outcome == "SUCCEEDED", result.message
    assert len(json.dumps(result.output)) <= 64 * 1024
    shown = len(result.output["gpu"]["gpus"])
    assert 0 < shown < 128
    assert result.output["truncated"] == [f"gpu.gpus: showing the first {shown} of 128"]
    assert result.output["gpu"]["gpus"][0]["uuid"] == nvml.gpus[0].uuid


# -- cordon / uncordon ---------------------------------------------------------------------------


async def test_cordon_and_uncordon_are_idempotent_and_survive_an_agent_restart(
    nvml: FakeNvml, control_plane: ControlPlane, agent_factory: AgentFactory
) -> None:
    node = await agent_factory(NODE, control_plane.port)

    first = await send(control_plane, "cordon", {})
    again = await send(control_plane, "cordon", {})
    await node.stop()
    await agent_factory(NODE, control_plane.port)
    after_restart = await send(control_plane, "uncordon", {})
    uncordoned_again = await send(control_plane, "uncordon", {})

    assert first.output == {"cordoned": True, "previous_cordoned": False}
    assert again.output == {"cordoned": True, "previous_cordoned": True}
    assert after_restart.output == {"cordoned": False, "previous_cordoned": True}
    assert uncordoned_again.output == {"cordoned": False, "previous_cordoned": False}
    assert all(r.succeeded for r in (first, again, after_restart, uncordoned_again))


async def test_cordon_takes_no_parameters(
    nvml: FakeNvml, control_plane: ControlPlane, agent_factory: AgentFactory
) -> None:
    await agent_factory(NODE, control_plane.port)

    result = await send(control_plane, "cordon", {"reason": "maintenance"})

    assert result.outcome == "INVALID_ARGUMENT"
    assert result.message.startswith("parameters.reason: unknown parameter")
