"""`PolicyService`: CRUD of policies over the policy book, translating messages to domain
policies and the book's refusals to status codes with field paths."""

from __future__ import annotations

import collections
import hashlib
from typing import NoReturn

import grpc
from sentinel.v1 import policy_pb2, policy_pb2_grpc

from controlplane.api import _convert, _paging
from controlplane.api._errors import abort
from controlplane.policy import (
    ID_PATTERN,
    Effect,
    Policy,
    PolicyAlreadyExists,
    PolicyBook,
    PolicyInvalid,
    PolicyNotFound,
    PolicyReadOnly,
    Rule,
    Scope,
)

_EFFECT_FROM_PB = {
    policy_pb2.POLICY_EFFECT_UNSPECIFIED: Effect.REJECT,
    policy_pb2.POLICY_EFFECT_REJECT: Effect.REJECT,
    policy_pb2.POLICY_EFFECT_REQUIRE_APPROVAL: Effect.REQUIRE_APPROVAL,
}
_EFFECT_TO_PB = {
    Effect.REJECT: policy_pb2.POLICY_EFFECT_REJECT,
    Effect.REQUIRE_APPROVAL: policy_pb2.POLICY_EFFECT_REQUIRE_APPROVAL,
}
_SCOPE_FROM_PB = {
    policy_pb2.POLICY_RULE_SCOPE_UNSPECIFIED: Scope.PLAN,
    policy_pb2.POLICY_RULE_SCOPE_PLAN: Scope.PLAN,
    policy_pb2.POLICY_RULE_SCOPE_STEP: Scope.STEP,
}
_SCOPE_TO_PB = {
    Scope.PLAN: policy_pb2.POLICY_RULE_SCOPE_PLAN,
    Scope.STEP: policy_pb2.POLICY_RULE_SCOPE_STEP,
}
# Request ids remembered for CreatePolicy replays within this process; a replay after a
# restart is still recognised, by the stored policy being identical.
_REMEMBERED_REQUESTS = 10_000


def policy_from_message(message: policy_pb2.Policy) -> Policy:
    """The domain policy a message describes; raises PolicyInvalid for unknown enum values."""
    problems: list[tuple[str, str]] = []
    rules: list[Rule] = []
    for i, rule in enumerate(message.rules):
        effect = _EFFECT_FROM_PB.get(rule.effect)
        scope = _SCOPE_FROM_PB.get(rule.scope)
        if effect is None:
            problems.append((f"rules[{i}].effect", f"unknown value {rule.effect}"))
        if scope is None:
            problems.append((f"rules[{i}].scope", f"unknown value {rule.scope}"))
        rules.append(
            Rule(
                rule_id=rule.rule_id,
                expression=rule.expression,
                message=rule.message,
                field=rule.field,
                effect=effect or Effect.REJECT,
                scope=scope or Scope.PLAN,
            )
        )
    if problems:
        raise PolicyInvalid(problems)
    return Policy(message.policy_id, message.description, tuple(rules), message.enabled)


def policy_message(policy: Policy) -> policy_pb2.Policy:
    message = policy_pb2.Policy(
        policy_id=policy.policy_id,
        description=policy.description,
        enabled=policy.enabled,
        origin=policy.origin,
        rules=[
            policy_pb2.PolicyRule(
                rule_id=r.rule_id,
                expression=r.expression,
                message=r.message,
                field=r.field,
                effect=_EFFECT_TO_PB[r.effect],
                scope=_SCOPE_TO_PB[r.scope],
            )
            for r in policy.rules
        ],
    )
    if policy.updated_at is not None:
        message.update_time.CopyFrom(_convert.timestamp(policy.updated_at))
    return message


async def _invalid(context: grpc.aio.ServicerContext, exc: PolicyInvalid) -> NoReturn:
    text = "; ".join(
        f"policy.{path}: {message}" if path else f"policy: {message}"
        for path, message in exc.problems
    )
    await abort(context, grpc.StatusCode.INVALID_ARGUMENT, text)


async def _known_shape(policy_id: str, path: str, context: grpc.aio.ServicerContext) -> None:
    """No stored policy can have an id outside the id pattern; saying so early also keeps
    such ids (NUL bytes, any length) away from the database."""
    if ID_PATTERN.fullmatch(policy_id) is None:
        await abort(context, grpc.StatusCode.NOT_FOUND, f"{path}: no policy {policy_id!r}")


class PolicyService(policy_pb2_grpc.PolicyServiceServicer):
    """Create, read, update and delete policies, with dry runs."""

    def __init__(self, book: PolicyBook) -> None:
        self._book = book
        self._requests: collections.OrderedDict[str, str] = collections.OrderedDict()

    async def ListPolicies(
        self, request: policy_pb2.ListPoliciesRequest, context: grpc.aio.ServicerContext
    ) -> policy_pb2.ListPoliciesResponse:
        try:
            page, token = _paging.paginate(
                await self._book.list_policies(),
                lambda p: p.policy_id,
                request.page_size,
                request.page_token,
            )
        except _paging.PageError as exc:
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return policy_pb2.ListPoliciesResponse(
            policies=[policy_message(p) for p in page], next_page_token=token
        )

    async def GetPolicy(
        self, request: policy_pb2.GetPolicyRequest, context: grpc.aio.ServicerContext
    ) -> policy_pb2.GetPolicyResponse:
        if not request.policy_id:
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, "policy_id: required")
        await _known_shape(request.policy_id, "policy_id", context)
        try:
            policy = await self._book.get(request.policy_id)
        except PolicyNotFound as exc:
            await abort(context, grpc.StatusCode.NOT_FOUND, f"policy_id: {exc}")
        return policy_pb2.GetPolicyResponse(policy=policy_message(policy))

    def _remember(self, request_id: str, digest: str) -> None:
        self._requests[request_id] = digest
        self._requests.move_to_end(request_id)
        while len(self._requests) > _REMEMBERED_REQUESTS:
            self._requests.popitem(last=False)

    async def CreatePolicy(
        self, request: policy_pb2.CreatePolicyRequest, context: grpc.aio.ServicerContext
    ) -> policy_pb2.CreatePolicyResponse:
        if not request.policy.policy_id:
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, "policy.policy_id: required")
        if len(request.request_id) > 128:
            await abort(
                context, grpc.StatusCode.INVALID_ARGUMENT, "request_id: at most 128 characters"
            )
        try:
            policy = policy_from_message(request.policy)
        except PolicyInvalid as exc:
            await _invalid(context, exc)
        digest = hashlib.sha256(request.policy.SerializeToString(deterministic=True)).hexdigest()
        if request.request_id and self._requests.get(request.request_id, digest) != digest:
            await abort(
                context,
                grpc.StatusCode.ALREADY_EXISTS,
                f"request_id: {request.request_id!r} was already used for a different policy",
            )
        try:
            stored = await self._book.create(
                policy, validate_only=request.validate_only, replay=bool(request.request_id)
            )
        except PolicyInvalid as exc:
            await _invalid(context, exc)
        except PolicyAlreadyExists as exc:
            await abort(context, grpc.StatusCode.ALREADY_EXISTS, f"policy.policy_id: {exc}")
        if request.request_id and not request.validate_only:
            self._remember(request.request_id, digest)
        return policy_pb2.CreatePolicyResponse(policy=policy_message(stored))

    async def UpdatePolicy(
        self, request: policy_pb2.UpdatePolicyRequest, context: grpc.aio.ServicerContext
    ) -> policy_pb2.UpdatePolicyResponse:
        if not request.policy.policy_id:
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, "policy.policy_id: required")
        await _known_shape(request.policy.policy_id, "policy.policy_id", context)
        fields = list(request.update_mask.paths)
        unknown = [
            f"update_mask.paths[{i}]: cannot update {path!r}; updatable: description, rules, "
            "enabled"
            for i, path in enumerate(fields)
            if path not in ("description", "rules", "enabled")
        ]
        if unknown:
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, "; ".join(unknown))
        try:
            policy = policy_from_message(request.policy)
            stored = await self._book.update(policy, fields, validate_only=request.validate_only)
        except PolicyInvalid as exc:
            await _invalid(context, exc)
        except PolicyNotFound as exc:
            await abort(context, grpc.StatusCode.NOT_FOUND, f"policy.policy_id: {exc}")
        except PolicyReadOnly as exc:
            await abort(context, grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        return policy_pb2.UpdatePolicyResponse(policy=policy_message(stored))

    async def DeletePolicy(
        self, request: policy_pb2.DeletePolicyRequest, context: grpc.aio.ServicerContext
    ) -> policy_pb2.DeletePolicyResponse:
        if not request.policy_id:
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, "policy_id: required")
        await _known_shape(request.policy_id, "policy_id", context)
        try:
            await self._book.delete(request.policy_id, validate_only=request.validate_only)
        except PolicyNotFound as exc:
            await abort(context, grpc.StatusCode.NOT_FOUND, f"policy_id: {exc}")
        except PolicyReadOnly as exc:
            await abort(context, grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        return policy_pb2.DeletePolicyResponse()
