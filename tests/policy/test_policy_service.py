"""PolicyService on a real control plane over mTLS: CRUD, dry runs, field paths of bad CEL,
read-only file policies, roles, and policies put in force for the engine."""

from __future__ import annotations

import datetime as dt
import pathlib

import grpc
import pytest
from google.protobuf import field_mask_pb2
from sentinel.v1 import policy_pb2, policy_pb2_grpc

from controlplane import ControlPlane
from controlplane.policy import EvaluationContext
from tests.conftest import ControlPlaneFactory, Pki


def _stub(
    pki: Pki, cp: ControlPlane, role: str = "operator", name: str = "alice"
) -> tuple[grpc.aio.Channel, policy_pb2_grpc.PolicyServiceStub]:
    channel = grpc.aio.secure_channel(f"localhost:{cp.port}", pki.channel_credentials(role, name))
    return channel, policy_pb2_grpc.PolicyServiceStub(channel)


def _policy(policy_id: str = "power-cap", watts: int = 400) -> policy_pb2.Policy:
    return policy_pb2.Policy(
        policy_id=policy_id,
        description="site power cap",
        enabled=True,
        rules=[
            policy_pb2.PolicyRule(
                rule_id="watts",
                expression=(
                    f"step.action != 'set_gpu_power_limit' || step.parameters.watts <= {watts}"
                ),
                message=f"at most {watts} W here",
                field="steps[{index}].parameters.watts",
                effect=policy_pb2.POLICY_EFFECT_REJECT,
                scope=policy_pb2.POLICY_RULE_SCOPE_STEP,
            )
        ],
    )


PLAN = {
    "plan_id": "p",
    "confidence": 0.9,
    "steps": [
        {
            "index": 0,
            "action": "set_gpu_power_limit",
            "node_ids": ["n1"],
            "targets": [{"node_id": "n1"}],
            "parameters": {"watts": 500},
        }
    ],
    "node_ids": ["n1"],
    "targets": ["node/n1"],
}
CONTEXT = EvaluationContext(
    now=dt.datetime(2026, 3, 4, tzinfo=dt.UTC),
    fleet_size=10,
    connected_nodes=10,
    cordoned_nodes=frozenset(),
    recent_plans_by_target={},
    rate_window_s=3600.0,
)


async def test_created_policy_round_trips_and_is_in_force(
    pki: Pki, control_plane: ControlPlane
) -> None:
    channel, policies = _stub(pki, control_plane)
    async with channel:
        created = await policies.CreatePolicy(policy_pb2.CreatePolicyRequest(policy=_policy()))
        assert created.policy.origin == "api"
        assert created.policy.HasField("update_time")
        verdict = control_plane.policy_engine.evaluate(PLAN, CONTEXT)
        assert [(v.rule_id, v.field) for v in verdict.rejections] == [
            ("watts", "steps[0].parameters.watts")
        ]

        got = await policies.GetPolicy(policy_pb2.GetPolicyRequest(policy_id="power-cap"))
        assert got.policy == created.policy

        updated = await policies.UpdatePolicy(
            policy_pb2.UpdatePolicyRequest(
                policy=policy_pb2.Policy(policy_id="power-cap", enabled=False),
                update_mask=field_mask_pb2.FieldMask(paths=["enabled"]),
            )
        )
        assert updated.policy.enabled is False
        assert updated.policy.rules == created.policy.rules
        assert control_plane.policy_engine.evaluate(PLAN, CONTEXT).outcome == "APPROVED"

        await policies.UpdatePolicy(policy_pb2.UpdatePolicyRequest(policy=_policy(watts=600)))
        listed = await policies.ListPolicies(policy_pb2.ListPoliciesRequest())
        assert [p.policy_id for p in listed.policies] == ["power-cap"]
        assert listed.policies[0].enabled is True
        assert "600" in listed.policies[0].rules[0].expression
        assert control_plane.policy_engine.evaluate(PLAN, CONTEXT).outcome == "APPROVED"

        await policies.DeletePolicy(policy_pb2.DeletePolicyRequest(policy_id="power-cap"))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await policies.GetPolicy(policy_pb2.GetPolicyRequest(policy_id="power-cap"))
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        assert control_plane.policy_engine.policies() == []


async def test_list_pages_by_policy_id(pki: Pki, control_plane: ControlPlane) -> None:
    channel, policies = _stub(pki, control_plane)
    async with channel:
        for policy_id in ("c", "a", "b"):
            await policies.CreatePolicy(policy_pb2.CreatePolicyRequest(policy=_policy(policy_id)))
        first = await policies.ListPolicies(policy_pb2.ListPoliciesRequest(page_size=2))
        second = await policies.ListPolicies(
            policy_pb2.ListPoliciesRequest(page_size=2, page_token=first.next_page_token)
        )
    assert [p.policy_id for p in first.policies] == ["a", "b"]
    assert [p.policy_id for p in second.policies] == ["c"]
    assert second.next_page_token == ""


async def test_validate_only_stores_nothing(pki: Pki, control_plane: ControlPlane) -> None:
    channel, policies = _stub(pki, control_plane)
    async with channel:
        would = await policies.CreatePolicy(
            policy_pb2.CreatePolicyRequest(policy=_policy(), validate_only=True)
        )
        assert would.policy.policy_id == "power-cap"
        listed = await policies.ListPolicies(policy_pb2.ListPoliciesRequest())
        assert list(listed.policies) == []
        assert control_plane.policy_engine.policies() == []

        await policies.CreatePolicy(policy_pb2.CreatePolicyRequest(policy=_policy()))
        await policies.DeletePolicy(
            policy_pb2.DeletePolicyRequest(policy_id="power-cap", validate_only=True)
        )
        assert len((await policies.ListPolicies(policy_pb2.ListPoliciesRequest())).policies) == 1


async def test_create_with_same_request_id_replays_and_a_second_create_already_exists(
    pki: Pki, control_plane: ControlPlane
) -> None:
    channel, policies = _stub(pki, control_plane)
    async with channel:
        request = policy_pb2.CreatePolicyRequest(policy=_policy(), request_id="req-1")
        first = await policies.CreatePolicy(request)
        again = await policies.CreatePolicy(request)
        assert again == first
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await policies.CreatePolicy(policy_pb2.CreatePolicyRequest(policy=_policy()))
        assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS


async def test_invalid_cel_is_invalid_argument_naming_every_path(
    pki: Pki, control_plane: ControlPlane
) -> None:
    bad = _policy()
    bad.rules.add(rule_id="second", expression="plan.confidence >=", message="m")
    bad.rules.add(rule_id="third", expression="flet.size > 0", message="m")
    channel, policies = _stub(pki, control_plane)
    async with channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await policies.CreatePolicy(policy_pb2.CreatePolicyRequest(policy=bad))
        missing_id = policy_pb2.Policy(rules=bad.rules)
        with pytest.raises(grpc.aio.AioRpcError) as no_id:
            await policies.CreatePolicy(policy_pb2.CreatePolicyRequest(policy=missing_id))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = caught.value.details() or ""
    assert "policy.rules[1].expression: Syntax error" in details
    assert "; policy.rules[2].expression: unknown variable(s) flet" in details
    assert no_id.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "policy.policy_id: required" in (no_id.value.details() or "")


async def test_file_policies_are_in_force_and_read_only(
    pki: Pki, control_plane_factory: ControlPlaneFactory, tmp_path: pathlib.Path
) -> None:
    path = tmp_path / "site.yaml"
    path.write_text(
        "policy_id: site\n"
        "rules:\n"
        "  - rule_id: low-power\n"
        "    scope: STEP\n"
        "    field: 'steps[{index}].parameters.watts'\n"
        "    message: at most 450 W\n"
        "    expression: step.parameters.watts <= 450\n"
    )
    cp = await control_plane_factory(policy_paths=str(path))
    assert [v.rule_id for v in cp.policy_engine.evaluate(PLAN, CONTEXT).rejections] == ["low-power"]
    channel, policies = _stub(pki, cp)
    async with channel:
        got = await policies.GetPolicy(policy_pb2.GetPolicyRequest(policy_id="site"))
        assert got.policy.origin == f"file:{path}"
        with pytest.raises(grpc.aio.AioRpcError) as update:
            await policies.UpdatePolicy(
                policy_pb2.UpdatePolicyRequest(
                    policy=policy_pb2.Policy(policy_id="site", enabled=False),
                    update_mask=field_mask_pb2.FieldMask(paths=["enabled"]),
                )
            )
        with pytest.raises(grpc.aio.AioRpcError) as delete:
            await policies.DeletePolicy(policy_pb2.DeletePolicyRequest(policy_id="site"))
    for caught in (update, delete):
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "edit that file" in (caught.value.details() or "")


async def test_update_and_delete_of_unknown_policy_are_not_found(
    pki: Pki, control_plane: ControlPlane
) -> None:
    channel, policies = _stub(pki, control_plane)
    async with channel:
        with pytest.raises(grpc.aio.AioRpcError) as update:
            await policies.UpdatePolicy(policy_pb2.UpdatePolicyRequest(policy=_policy("nope")))
        with pytest.raises(grpc.aio.AioRpcError) as delete:
            await policies.DeletePolicy(policy_pb2.DeletePolicyRequest(policy_id="nope"))
        with pytest.raises(grpc.aio.AioRpcError) as mask:
            await policies.UpdatePolicy(
                policy_pb2.UpdatePolicyRequest(
                    policy=_policy(), update_mask=field_mask_pb2.FieldMask(paths=["origin"])
                )
            )
    assert update.value.code() == grpc.StatusCode.NOT_FOUND
    assert delete.value.code() == grpc.StatusCode.NOT_FOUND
    assert mask.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "update_mask.paths[0]" in (mask.value.details() or "")


async def test_viewer_reads_but_may_not_create(pki: Pki, control_plane: ControlPlane) -> None:
    channel, policies = _stub(pki, control_plane, role="viewer", name="bob")
    async with channel:
        await policies.ListPolicies(policy_pb2.ListPoliciesRequest())
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await policies.CreatePolicy(policy_pb2.CreatePolicyRequest(policy=_policy()))
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_bad_policy_file_refuses_to_start(
    control_plane_factory: ControlPlaneFactory, tmp_path: pathlib.Path
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("policy_id: bad\nrules:\n  - {rule_id: r, expression: '1 +', message: m}\n")
    with pytest.raises(ValueError, match=r"bad\.yaml: rules\[0\]\.expression: Syntax error"):
        await control_plane_factory(policy_paths=str(path))
