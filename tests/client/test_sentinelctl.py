"""`sentinelctl` for daily use, against a real control plane over real TLS with a real agent:
-o json|yaml, plan files in YAML, validation tables, watch progress, plan outcomes, the
autonomy guards, policy files, login, and the shell completion script."""

from __future__ import annotations

import asyncio
import json
import pathlib
import subprocess
import textwrap

import pytest
import yaml
from google.protobuf import json_format
from sentinel.v1 import plan_pb2

from controlplane import ControlPlane
from sentinelclient import AsyncSentinelClient
from sentinelctl import cli
from tests.client._rig import settings_for
from tests.conftest import AgentFactory, ControlPlaneFactory, Pki

pytestmark = pytest.mark.usefixtures("no_nvidia_driver")

PLAN_YAML = """\
request_id: {request_id}
source: operator
rationale: sample node-1 every 10 s for a while
confidence: {confidence}
steps:
  - step_id: slow-down
    action: set_telemetry_interval
    targets:
      - node_id: node-1
    parameters:
      seconds: 10
    timeout: 30s
health_gates:
  - name: still-reporting
    expression: sample.seq > 0
    window: 30s
limits:
  max_nodes_in_parallel: 1
  deadline: 300s
"""


async def _ctl(
    pki: Pki,
    cp: ControlPlane,
    capsys: pytest.CaptureFixture[str],
    *argv: str,
    identity: tuple[str, str] = ("operator", "admin"),
) -> tuple[int, str, str]:
    pki.client(*identity)
    base = ["--server", f"localhost:{cp.port}", "--certs-dir", str(pki.directory)]
    stem = "-".join(identity)
    # sentinelctl's client blocks; a thread keeps it off this test's event loop.
    code = await asyncio.to_thread(cli.main, [*base, "--identity", stem, *argv])
    out, err = capsys.readouterr()
    return code, out, err


def _plan_file(tmp_path: pathlib.Path, request_id: str, confidence: float = 0.9) -> str:
    path = tmp_path / f"{request_id}.yaml"
    path.write_text(PLAN_YAML.format(request_id=request_id, confidence=confidence))
    return str(path)


async def test_plan_submit_takes_yaml_and_json_output_matches_get_plan(
    pki: Pki,
    control_plane: ControlPlane,
    agent_factory: AgentFactory,
    tmp_path: pathlib.Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    await agent_factory("node-1", control_plane.port)
    plan_file = _plan_file(tmp_path, "yaml-1")
    code, out, err = await _ctl(pki, control_plane, capsys, "plan", "submit", "-f", plan_file)
    assert code == 0, err
    words = out.split()
    assert words[0] == "plan" and words[2:4] == ["is", "APPROVED"]
    plan_id = words[1]
    code, again, _ = await _ctl(pki, control_plane, capsys, "plan", "submit", "-f", plan_file)
    assert code == 0 and again.split()[1] == plan_id and "(replayed" in again

    async with AsyncSentinelClient(settings_for(pki, control_plane.port)) as client:
        final = await client.wait_for_plan(plan_id)
        stored = await client.get_plan(plan_id)
        assert len(await client.list_plans()) == 1
    assert final.request_id == "yaml-1"
    assert stored.steps[0].parameters["seconds"] == 10
    expected = json_format.MessageToDict(stored, preserving_proto_field_name=True)
    code, out, _ = await _ctl(pki, control_plane, capsys, "plan", "get", plan_id, "-o", "json")
    assert code == 0 and json.loads(out) == expected
    code, out, _ = await _ctl(pki, control_plane, capsys, "plan", plan_id)  # the old spelling
    assert code == 0 and json.loads(out) == expected
    code, out, _ = await _ctl(pki, control_plane, capsys, "plan", "get", plan_id, "-o", "yaml")
    assert code == 0 and yaml.safe_load(out) == expected
    code, out, _ = await _ctl(pki, control_plane, capsys, "plans", "-o", "json")
    assert code == 0 and json.loads(out) == [expected]
    code, out, _ = await _ctl(pki, control_plane, capsys, "agents", "-o", "yaml")
    [agent] = yaml.safe_load(out)
    assert (
        code == 0 and agent["node_id"] == "node-1" and agent["status"] == "AGENT_STATUS_CONNECTED"
    )
    code, out, _ = await _ctl(pki, control_plane, capsys, "plan", "get", plan_id, "-o", "table")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split()[1:] == [plan_id, "COMPLETED"]
    assert "EXECUTING -> COMPLETED" in out and "still-reporting" in out


async def test_plan_validate_prints_the_verdict_commands_and_violations_as_tables(
    pki: Pki,
    control_plane: ControlPlane,
    agent_factory: AgentFactory,
    tmp_path: pathlib.Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    await agent_factory("node-1", control_plane.port)
    policy = tmp_path / "confidence.yaml"
    policy.write_text(
        textwrap.dedent(
            """\
            policy_id: confident-plans
            description: unsure plans wait for a person
            rules:
              - rule_id: min-confidence
                field: confidence
                message: confidence below 0.8 needs an approval
                effect: REQUIRE_APPROVAL
                expression: plan.confidence >= 0.8
            """
        )
    )
    code, out, err = await _ctl(pki, control_plane, capsys, "policy", "apply", "-f", str(policy))
    assert (code, out) == (0, "policy confident-plans created\n"), err

    plan_file = _plan_file(tmp_path, "unsure", confidence=0.5)
    code, out, err = await _ctl(pki, control_plane, capsys, "plan", "validate", "-f", plan_file)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "verdict: the plan would be AWAITING_APPROVAL"
    violations = lines[lines.index("VIOLATIONS") + 1 :]
    assert violations[0].split() == ["RULE", "FIELD", "MESSAGE"]
    assert violations[1].split()[:2] == ["min-confidence", "confidence"]
    commands = lines[lines.index("COMMANDS") + 1 :]
    assert commands[0].split() == ["STEP", "ID", "WAVE", "SUMMARY", "DRY", "RUN"]
    assert commands[1].split()[:3] == ["0", "slow-down", "0"]
    assert "set_telemetry_interval on node-1" in commands[1]
    # Every row's columns start where the header's do.
    assert commands[1].index("slow-down") == commands[0].index("ID")
    async with AsyncSentinelClient(settings_for(pki, control_plane.port)) as client:
        assert await client.list_plans() == []  # nothing stored
    code, out, _ = await _ctl(
        pki, control_plane, capsys, "plan", "validate", "-f", plan_file, "-o", "json"
    )
    assert code == 0
    assert json.loads(out)["preview"][0]["node_id"] == "node-1"


async def test_watch_shows_each_step_and_gate_as_the_plan_runs(
    pki: Pki,
    control_plane: ControlPlane,
    agent_factory: AgentFactory,
    tmp_path: pathlib.Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    await agent_factory("node-1", control_plane.port)
    plan_file = _plan_file(tmp_path, "watched")
    code, out, _ = await _ctl(pki, control_plane, capsys, "submit", plan_file)
    assert code == 0
    plan_id = out.split()[1]
    code, watched, err = await _ctl(pki, control_plane, capsys, "watch", plan_id)
    assert code == 0, err
    lines = watched.splitlines()
    assert "  gate still-reporting (telemetry): sample.seq > 0" in lines
    assert "    node-1: SUCCEEDED" in lines
    done = "  step slow-down set_telemetry_interval: SUCCEEDED [1/1 targets] done on 1 node(s)"
    assert done in lines
    moves = [line.split("  ")[1] for line in lines if " -> " in line]
    assert moves == [
        "PENDING -> VALIDATING",
        "VALIDATING -> APPROVED",
        "APPROVED -> EXECUTING",
        "EXECUTING -> COMPLETED",
    ], watched
    assert lines[-1] == "plan finished"
    code, streamed, _ = await _ctl(pki, control_plane, capsys, "watch", plan_id, "-o", "json")
    updates = [json.loads(line) for line in streamed.splitlines()]
    assert code == 0 and updates[-1]["plan"]["phase"] == "PLAN_PHASE_COMPLETED"


async def test_plan_outcome_prints_each_target_and_json_matches_the_client(
    pki: Pki,
    control_plane: ControlPlane,
    agent_factory: AgentFactory,
    tmp_path: pathlib.Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    await agent_factory("node-1", control_plane.port)
    code, out, err = await _ctl(
        pki, control_plane, capsys, "plan", "submit", "-f", _plan_file(tmp_path, "measured")
    )
    assert code == 0, err
    plan_id = out.split()[1]
    async with AsyncSentinelClient(settings_for(pki, control_plane.port)) as client:
        assert (await client.wait_for_plan(plan_id)).phase == plan_pb2.PLAN_PHASE_COMPLETED
        outcome = await client.get_plan_outcome(plan_id)

    code, out, err = await _ctl(pki, control_plane, capsys, "plan", "outcome", plan_id)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split()[1:] == [plan_id, "COMPLETED"]
    targets = lines[lines.index("TARGETS") + 1 : lines.index("PREDICTIONS") - 1]
    assert targets[0].split()[:2] == ["TARGET", "METRIC"]
    assert "BEFORE P95" in targets[0] and "AFTER MEAN" in targets[0]
    assert {row.split()[0] for row in targets[1:]} == {"node/node-1"}
    assert lines[lines.index("PREDICTIONS") + 1] == "(the plan stated none)"
    code, out, _ = await _ctl(pki, control_plane, capsys, "plan", "outcome", plan_id, "-o", "json")
    expected = json_format.MessageToDict(outcome, preserving_proto_field_name=True)
    assert code == 0 and json.loads(out) == expected
    assert [t["target"] for t in expected["targets"]] == ["node/node-1"]


async def test_autonomy_shows_breaker_and_budgets_and_only_an_operator_resets_the_breaker(
    pki: Pki,
    control_plane_factory: ControlPlaneFactory,
    agent_factory: AgentFactory,
    tmp_path: pathlib.Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    policy = tmp_path / "autonomy.yaml"
    policy.write_text(
        "breaker:\n  max_rollbacks: 3\n  window_seconds: 600\n"
        "budgets:\n  - name: pool\n    node_patterns: ['node-*']\n    max_nodes: 1\n"
    )
    cp = await control_plane_factory(autonomy_policy_path=str(policy))
    await agent_factory("node-1", cp.port)

    code, out, err = await _ctl(pki, cp, capsys, "autonomy")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "breaker     not tripped"
    assert "last reset  never" in lines
    budgets = lines[lines.index("BUDGETS") + 1 :]
    assert budgets[0].split() == ["NAME", "LIMIT", "COVERED", "IN", "USE", "HOLDERS"]
    assert budgets[1].split() == ["pool", "1", "1", "0", "-"]
    assert "CALIBRATION" in lines
    code, out, _ = await _ctl(pki, cp, capsys, "autonomy", "-o", "json")
    status = json.loads(out)
    assert code == 0 and status["budgets"][0]["name"] == "pool"
    assert status["breaker"]["thresholds"]["max_rollbacks"] == 3
    code, out, _ = await _ctl(pki, cp, capsys, "calibration", "inframind", "-o", "yaml")
    assert code == 0 and yaml.safe_load(out)["source"] == "inframind"

    planner = ("planner", "inframind")
    code, out, err = await _ctl(
        pki, cp, capsys, "breaker", "reset", "--reason", "I am fine", identity=planner
    )
    assert code == 1 and out == ""
    assert err.splitlines()[-1].startswith("sentinelctl: PERMISSION_DENIED: ")
    code, out, err = await _ctl(pki, cp, capsys, "breaker", "reset", "--reason", "checked")
    assert code == 0, err
    assert out == (
        "breaker not tripped: reset by spiffe://sentinel.local/operator/admin: checked\n"
    )
    code, out, _ = await _ctl(pki, cp, capsys, "autonomy")
    assert code == 0 and "by spiffe://sentinel.local/operator/admin: checked" in out
    with pytest.raises(SystemExit) as refused:
        cli.main(["breaker", "reset"])  # argparse: --reason is required
    assert refused.value.code == 2
    assert "--reason" in capsys.readouterr().err


async def test_policy_apply_creates_updates_and_test_reports_field_paths(
    pki: Pki,
    control_plane: ControlPlane,
    tmp_path: pathlib.Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    rules = """\
    - policy_id: site-power
      rules:
        - rule_id: max-450w
          scope: STEP
          field: "steps[{index}].parameters.watts"
          message: this site allows at most WATTS W per GPU
          expression: step.action != 'set_gpu_power_limit' || step.parameters.watts <= WATTS
    - policy_id: business-hours
      enabled: false
      rules:
        - rule_id: weekdays
          expression: now.getDayOfWeek() >= 1
    """
    path = tmp_path / "policies.yaml"
    path.write_text(textwrap.dedent(rules).replace("WATTS", "450"))
    code, out, err = await _ctl(pki, control_plane, capsys, "policy", "test", "-f", str(path))
    assert code == 0, err
    assert out.splitlines() == [
        "policy site-power: valid, would be created",
        "policy business-hours: valid, would be created",
    ]
    code, out, _ = await _ctl(pki, control_plane, capsys, "policy", "apply", "-f", str(path))
    assert out.splitlines() == ["policy site-power created", "policy business-hours created"]
    code, out, _ = await _ctl(pki, control_plane, capsys, "policy", "apply", "-f", str(path))
    assert out.splitlines() == ["policy site-power unchanged", "policy business-hours unchanged"]
    path.write_text(textwrap.dedent(rules).replace("WATTS", "400"))
    code, out, _ = await _ctl(pki, control_plane, capsys, "policy", "apply", "-f", str(path))
    assert out.splitlines() == ["policy site-power updated", "policy business-hours unchanged"]
    async with AsyncSentinelClient(settings_for(pki, control_plane.port)) as client:
        stored = await client.get_policy("site-power")
    assert stored.rules[0].expression.endswith("<= 400")

    path.write_text(textwrap.dedent(rules).replace("<= WATTS", "<= ").replace("WATTS", "1"))
    code, out, err = await _ctl(pki, control_plane, capsys, "policy", "test", "-f", str(path))
    assert code == 1
    lines = out.splitlines()
    assert lines[0] == "policy site-power: refused (INVALID_ARGUMENT)"
    assert lines[1].split() == ["FIELD", "PROBLEM"]
    assert lines[2].split()[0] == "policy.rules[0].expression"
    assert lines[-1] == "policy business-hours: valid, is unchanged"
    async with AsyncSentinelClient(settings_for(pki, control_plane.port)) as client:
        assert (await client.get_policy("site-power")).rules[0].expression.endswith("<= 400")
    code, out, _ = await _ctl(pki, control_plane, capsys, "policy", "list", "-o", "json")
    assert [p["policy_id"] for p in json.loads(out)] == ["business-hours", "site-power"]


async def test_login_prints_a_token_that_later_commands_send(
    pki: Pki,
    control_plane: ControlPlane,
    tmp_path: pathlib.Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SENTINEL_PASSWORD", "a long enough password 1")
    code, _, err = await _ctl(pki, control_plane, capsys, "user", "add", "vera", "--role", "viewer")
    assert code == 0, err
    code, out, err = await _ctl(pki, control_plane, capsys, "login", "vera")
    assert code == 0 and "logged in as vera" in err
    token_file = tmp_path / "token"
    token_file.write_text(out)
    # The operator certificate, but vera's token: the call runs as a viewer.
    code, _, err = await _ctl(pki, control_plane, capsys, "--token-file", str(token_file), "users")
    assert code == 1 and "PERMISSION_DENIED" in err and "viewer" in err
    code, _, err = await _ctl(pki, control_plane, capsys, "users")
    assert code == 0, err


def test_completion_scripts_are_valid_and_complete_commands_flags_and_values(
    capsys: pytest.CaptureFixture[str], tmp_path: pathlib.Path
) -> None:
    assert cli.main(["completion", "bash"]) == 0
    script = tmp_path / "sentinelctl.bash"
    script.write_text(capsys.readouterr().out)
    subprocess.run(["bash", "-n", str(script)], check=True)
    assert cli.main(["completion", "zsh"]) == 0
    zsh = capsys.readouterr().out
    assert zsh.startswith("#compdef sentinelctl") and "bashcompinit" in zsh
    (tmp_path / "plan.yaml").write_text("")

    def complete(*words: str) -> list[str]:
        line = " ".join(["sentinelctl", *words])
        program = (
            f"source {script}; cd {tmp_path}; COMP_WORDS=({line}); "
            f"COMP_CWORD={len(words)}; "
            "_sentinelctl; printf '%s\\n' \"${COMPREPLY[@]}\""
        )
        if not words[-1]:  # completing a new, empty word
            program = program.replace(f"COMP_WORDS=({line})", f"COMP_WORDS=({line} '')")
        result = subprocess.run(["bash", "-c", program], check=True, capture_output=True, text=True)
        return sorted(result.stdout.split())

    assert complete("pl") == ["plan", "plans"]
    assert complete("plan", "") == ["get", "outcome", "submit", "validate"]
    assert complete("breaker", "") == ["reset"]
    assert "--reason" in complete("breaker", "reset", "--")
    assert complete("cal") == ["calibration"]
    assert complete("--server", "cp:7443", "plans", "-o", "") == ["json", "table", "yaml"]
    assert complete("plans", "--phase", "roll") == ["rolled_back", "rolling_back"]
    assert complete("plan", "submit", "-f", "pl") == ["plan.yaml"]
    assert "--request-id" in complete("plan", "submit", "--")
    assert complete("completion", "") == ["bash", "zsh"]
    assert complete("policy", "a") == ["apply"]
