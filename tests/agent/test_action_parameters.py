"""The control plane (checking a plan's steps at submission) and the node agent (before it
acts) refuse exactly the same node-action parameters, with the same first message: both take
their checks from `nodeactions`, and these tests hold the two sides to it.

The agent side runs the real actions on a GPU-less agent's controls, so a power-limit request
that passes the checks stops at "no GPU" (FAILED) before any hardware is touched.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import pathlib
from collections.abc import Iterator
from typing import Any

import pytest
from google.protobuf import json_format, struct_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from controlplane.executors import NODE_ACTIONS
from nodeagent._state import AgentStateStore
from nodeagent.actions import ACTIONS, ActionError, AgentControls

# Which parameters each plan-usable action is given together: the shapes it accepts and some it
# refuses. Written out here rather than read from the module under test.
SHAPES: dict[str, list[tuple[str, ...]]] = {
    "set_gpu_power_limit": [
        ("watts",),
        ("watts", "gpus"),
        ("per_gpu_watts",),
        ("gpus", "per_gpu_watts"),
        ("watts", "per_gpu_watts"),
        ("gpus",),
        (),
    ],
    "set_telemetry_interval": [("seconds",), ("seconds", "restore"), ("restore",), ()],
    "run_diagnostic": [(), ("include",)],
    "cordon": [()],
    "uncordon": [()],
}

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=6,
)
_watts = st.one_of(
    st.floats(min_value=1, max_value=2000),
    st.floats(min_value=-10, max_value=2000),
    st.integers(min_value=-5, max_value=2000),
    st.sampled_from([0, 0.0, -0.0, 1e-300, math.nan, math.inf, -math.inf, True, "250", 10**400]),
    _json,
)
_gpu_index = st.one_of(
    st.integers(min_value=0, max_value=8),
    st.integers(min_value=-2, max_value=8).map(float),
    st.sampled_from([0.0, 2.0, 1.5, -1.0, -0.0, 1e300, math.nan, math.inf, True, False, "1", None]),
)
_gpu_key = st.one_of(
    st.sampled_from(
        ["0", "1", "2", "01", "7", "gpu0", "-1", "1.0", "", " 1", "\u00b2", "\u0661", "1" * 12]
    ),
    st.text(max_size=3),
)
_seconds = st.one_of(
    st.floats(min_value=1, max_value=3600),
    st.floats(min_value=-5, max_value=4000),
    st.integers(min_value=-5, max_value=4000),
    st.sampled_from([0, 0.5, 1, 1.0, 3600, 3600.0, 3600.5, 1e-9, math.nan, math.inf, True, "5"]),
    _json,
)
_section = st.sampled_from(["gpu", "xid", "system", "disk", "bios", "GPU", ""])
# A strategy named twice in one_of is drawn twice as often: mostly well-typed values.
VALUES: dict[str, st.SearchStrategy[Any]] = {
    "watts": _watts,
    "gpus": st.one_of(st.lists(_gpu_index, max_size=4), st.lists(_gpu_index, max_size=4), _json),
    "per_gpu_watts": st.one_of(st.dictionaries(_gpu_key, _watts, max_size=4), _json),
    "seconds": _seconds,
    "restore": st.one_of(st.booleans(), _json),
    "include": st.one_of(
        st.lists(_section, max_size=5), st.lists(st.one_of(_section, _json), max_size=5), _json
    ),
}


@st.composite
def parameter_sets(draw: st.DrawFn, action: str) -> dict[str, Any]:
    """One of the action's shapes with plausible and implausible values, now and then with a
    parameter it does not take."""
    names = set(draw(st.sampled_from(SHAPES[action])))
    if draw(st.integers(min_value=0, max_value=4)) == 0:
        names.add(draw(st.sampled_from(["watts", "seconds", "include", "reason", ""])))
    return {name: draw(VALUES.get(name, _json)) for name in sorted(names)}


def as_delivered(parameters: dict[str, Any]) -> list[dict[str, Any]]:
    """The parameters as written, and as both sides get them off the wire (through a protobuf
    Struct: every number a float) where a Struct can carry them."""
    forms = [parameters]
    struct = struct_pb2.Struct()
    with contextlib.suppress(ValueError, TypeError, OverflowError):
        struct.update(parameters)
        forms.append(json_format.MessageToDict(struct))
    return forms


@contextlib.contextmanager
def gpu_less_controls(directory: pathlib.Path) -> Iterator[AgentControls]:
    """What actions get on an agent with GPU collection disabled, its state in `directory`."""
    state = AgentStateStore(directory / "agent.db", max_spool_samples=10)
    intervals = [5.0]

    async def set_interval(seconds: float) -> None:
        intervals.append(seconds)

    try:
        yield AgentControls(
            lambda: intervals[-1], set_interval, state=state, state_dir=directory, gpu=None
        )
    finally:
        state.close()


def control_plane_refusal(action: str, parameters: dict[str, Any]) -> str | None:
    """What the control plane says of the first problem of a plan step with these parameters
    (rooted at `parameters`, as the agent roots it), or None when it accepts them."""
    problems = NODE_ACTIONS[action].check(parameters)
    if not problems:
        return None
    path, message = problems[0]
    return f"parameters.{path}: {message}"


async def agent_refusal(
    action: str, controls: AgentControls, parameters: dict[str, Any]
) -> str | None:
    """The agent's INVALID_ARGUMENT message for a command with these parameters, or None when it
    went past its checks (acted, or found no GPU to act on)."""
    try:
        await ACTIONS[action](controls, parameters)
    except ActionError as error:
        if error.outcome == "INVALID_ARGUMENT":
            return str(error)
        assert action == "set_gpu_power_limit", error
        assert (error.outcome, str(error)) == (
            "FAILED",
            "no NVIDIA GPU or driver on this node: GPU collection is disabled on this agent",
        )
    return None


@pytest.mark.parametrize("action", sorted(SHAPES))
def test_control_plane_and_agent_refuse_the_same_parameters_with_the_same_message(
    action: str, tmp_path: pathlib.Path
) -> None:
    seen = {"accepted": 0, "refused": 0}
    with (
        gpu_less_controls(tmp_path) as controls,
        asyncio.Runner(loop_factory=asyncio.new_event_loop) as runner,
    ):

        @settings(max_examples=150, deadline=None)
        @given(parameters=parameter_sets(action))
        def agree(parameters: dict[str, Any]) -> None:
            for delivered in as_delivered(parameters):
                expected = control_plane_refusal(action, delivered)
                assert runner.run(agent_refusal(action, controls, delivered)) == expected
                seen["refused" if expected else "accepted"] += 1

        agree()

    # Both ways through the checks were taken, else the agreement says little.
    assert seen["accepted"] > 0, seen
    assert seen["refused"] > 0, seen


@pytest.mark.parametrize(
    ("action", "parameters", "first"),
    [
        # Refused by the agent before, now at plan submission too.
        (
            "set_gpu_power_limit",
            {"per_gpu_watts": {"0": 250.0}, "gpus": [0.0]},
            "parameters.gpus: only with watts (per_gpu_watts names its GPUs itself)",
        ),
        (
            "set_gpu_power_limit",
            {"watts": 250.0, "gpus": [1.0, 1.0]},
            "parameters.gpus[1]: GPU 1 is listed twice",
        ),
        (
            "set_telemetry_interval",
            {"seconds": 5.0, "interval": 2.0},
            "parameters.interval: unknown parameter (this action takes: restore, seconds)",
        ),
        # Refused by neither before.
        (
            "set_gpu_power_limit",
            {"per_gpu_watts": {"1": 250.0, "01": 300.0}},
            "parameters.per_gpu_watts.01: GPU 1 is listed twice",
        ),
        # Worded differently by the two sides before.
        (
            "set_gpu_power_limit",
            {"per_gpu_watts": {"0": -5.0}},
            "parameters.per_gpu_watts.0: must be a positive number of watts, got -5.0",
        ),
        (
            "cordon",
            {"reason": "maintenance"},
            "parameters.reason: unknown parameter (this action takes: no parameters)",
        ),
        (
            "set_telemetry_interval",
            {"seconds": math.inf},
            "parameters.seconds: required, a number of seconds",
        ),
    ],
)
async def test_a_step_the_agent_would_refuse_is_refused_at_submission_with_its_message(
    tmp_path: pathlib.Path, action: str, parameters: dict[str, Any], first: str
) -> None:
    with gpu_less_controls(tmp_path) as controls:
        assert await agent_refusal(action, controls, parameters) == first
    assert control_plane_refusal(action, parameters) == first


@pytest.mark.parametrize(
    ("action", "parameters"),
    [
        ("set_gpu_power_limit", {"watts": 250.0}),
        ("set_gpu_power_limit", {"watts": 250.0, "gpus": [2.0, 0.0]}),
        ("set_gpu_power_limit", {"per_gpu_watts": {"0": 300.0, "2": 275.0}}),
        ("set_telemetry_interval", {"seconds": 1.0}),
        ("set_telemetry_interval", {"seconds": 3600.0}),
        ("set_telemetry_interval", {"seconds": 0.2, "restore": True}),  # a rollback
        ("run_diagnostic", {}),
        ("run_diagnostic", {"include": ["disk", "system"]}),
        ("cordon", {}),
        ("uncordon", {}),
    ],
)
async def test_parameters_the_control_plane_accepts_pass_the_agents_checks(
    tmp_path: pathlib.Path, action: str, parameters: dict[str, Any]
) -> None:
    assert control_plane_refusal(action, parameters) is None
    with gpu_less_controls(tmp_path) as controls:
        assert await agent_refusal(action, controls, parameters) is None


async def test_ping_takes_no_parameters(tmp_path: pathlib.Path) -> None:
    with gpu_less_controls(tmp_path) as controls:
        assert await agent_refusal("ping", controls, {}) is None
        assert await agent_refusal("ping", controls, {"echo": "hello"}) == (
            "parameters.echo: unknown parameter (this action takes: no parameters)"
        )
