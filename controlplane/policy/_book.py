"""The policy book: policies stored in the `policies` table (file-origin ones written there at
start and read-only through the API), and keeping the engine in step with the table."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import logging
from collections.abc import Callable, Collection, Iterable
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from controlplane.policy._engine import PolicyEngine, check_policy
from controlplane.policy._files import rule_to_data
from controlplane.policy._model import Effect, Policy, PolicyInvalid, Rule, Scope
from controlplane.store import PolicyRow, Store

log = logging.getLogger(__name__)

UPDATABLE_FIELDS = ("description", "rules", "enabled")
REFRESH_INTERVAL_S = 5.0
"""How often control planes re-read the policies table (changes through this one apply at once)."""


class PolicyNotFound(LookupError):
    """No policy with that id is stored."""


class PolicyAlreadyExists(ValueError):
    """A different policy with that id is already stored."""


class PolicyReadOnly(ValueError):
    """The policy was loaded from a file: it changes by editing the file, not through the API."""


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _policy_of(row: PolicyRow) -> Policy:
    rules = tuple(
        Rule(
            rule_id=r.get("rule_id", ""),
            expression=r.get("expression", ""),
            message=r.get("message", ""),
            field=r.get("field", ""),
            effect=Effect(r.get("effect", Effect.REJECT.value)),
            scope=Scope(r.get("scope", Scope.PLAN.value)),
        )
        for r in row.rules
    )
    return Policy(row.policy_id, row.description, rules, row.enabled, row.origin, row.updated_at)


def _write(row: PolicyRow, policy: Policy) -> None:
    row.description = policy.description
    row.rules = [rule_to_data(r) for r in policy.rules]
    row.enabled = policy.enabled
    row.origin = policy.origin
    row.updated_at = policy.updated_at or _utcnow()


def _same_content(a: Policy, b: Policy) -> bool:
    return (a.description, a.rules, a.enabled) == (b.description, b.rules, b.enabled)


def _read_only(policy: Policy) -> PolicyReadOnly:
    path = policy.origin.removeprefix("file:")
    return PolicyReadOnly(
        f"policy {policy.policy_id!r} was loaded from {path}; edit that file and restart the "
        "control plane to change it"
    )


class PolicyBook:
    """Reads and writes policies in the store; every change is put in force in `engine`."""

    def __init__(
        self, store: Store, engine: PolicyEngine, clock: Callable[[], dt.datetime] = _utcnow
    ) -> None:
        self._store = store
        self._engine = engine
        self._clock = clock
        self._refresh_lock = asyncio.Lock()

    async def install_files(self, policies: Iterable[Policy]) -> None:
        """Writes the policies loaded from files (upsert by id, origin file:...), removes rows
        of file policies no longer in any file, and refreshes the engine."""
        loaded = {p.policy_id: p for p in policies}
        now = self._clock()

        def work(session: Session) -> None:
            rows = {r.policy_id: r for r in session.scalars(select(PolicyRow))}
            for policy_id, policy in loaded.items():
                row = rows.get(policy_id)
                if row is None:
                    row = PolicyRow(policy_id=policy_id)
                    session.add(row)
                elif row.origin == "api":
                    log.warning(
                        "policy %r from %s replaces the one created through the API",
                        policy_id,
                        policy.origin,
                    )
                elif row.origin == policy.origin and _same_content(_policy_of(row), policy):
                    continue
                _write(row, dataclasses.replace(policy, updated_at=now))
            for policy_id, row in rows.items():
                # The files are the truth for file-origin policies: one dropped from its file
                # leaves the store too.
                if row.origin.startswith("file:") and policy_id not in loaded:
                    session.delete(row)

        await self._store.run(work)
        await self.refresh()

    async def refresh(self) -> None:
        """Puts the stored policies in force (skipping, with an error logged, any that no
        longer compiles)."""
        async with self._refresh_lock:
            stored = await self.list_policies()
            if stored == self._engine.policies():
                return
            valid: list[Policy] = []
            for policy in stored:
                try:
                    check_policy(policy)
                except PolicyInvalid as exc:
                    log.error("stored policy %r is not in force: %s", policy.policy_id, exc)
                    continue
                valid.append(policy)
            self._engine.replace_policies(valid)

    async def run_refresher(self, interval_s: float) -> None:
        """Re-reads the table every `interval_s`, so control planes sharing a database
        converge on changes made through any of them."""
        while True:
            await asyncio.sleep(interval_s)
            await self.refresh()

    async def list_policies(self) -> list[Policy]:
        """Every stored policy, by policy id."""

        def work(session: Session) -> list[Policy]:
            rows = session.scalars(select(PolicyRow).order_by(PolicyRow.policy_id))
            return [_policy_of(r) for r in rows]

        return await self._store.run(work)

    async def get(self, policy_id: str) -> Policy:
        def work(session: Session) -> Policy | None:
            row = session.get(PolicyRow, policy_id)
            return None if row is None else _policy_of(row)

        found = await self._store.run(work)
        if found is None:
            raise PolicyNotFound(f"no policy {policy_id!r}")
        return found

    async def create(
        self, policy: Policy, *, validate_only: bool = False, replay: bool = False
    ) -> Policy:
        """Stores a new API policy and puts it in force; raises PolicyInvalid or
        PolicyAlreadyExists. With `replay` (a retried request), an identical stored policy is
        returned instead of PolicyAlreadyExists."""
        check_policy(policy)
        candidate = dataclasses.replace(policy, origin="api", updated_at=self._clock())

        def work(session: Session) -> Policy:
            row = session.get(PolicyRow, candidate.policy_id)
            if row is not None:
                existing = _policy_of(row)
                if replay and existing.origin == "api" and _same_content(existing, candidate):
                    return existing
                raise PolicyAlreadyExists(f"policy {candidate.policy_id!r} already exists")
            if not validate_only:
                row = PolicyRow(policy_id=candidate.policy_id)
                _write(row, candidate)
                session.add(row)
            return candidate

        stored = await self._store.run(work)
        if not validate_only:
            await self.refresh()
        return stored

    async def update(
        self, policy: Policy, fields: Collection[str] = (), *, validate_only: bool = False
    ) -> Policy:
        """Replaces `fields` (all of UPDATABLE_FIELDS when empty) of the stored policy with
        those of `policy`; raises PolicyNotFound, PolicyReadOnly or PolicyInvalid."""
        unknown = sorted(set(fields) - set(UPDATABLE_FIELDS))
        if unknown:
            raise PolicyInvalid(
                [
                    (
                        "",
                        f"cannot update {', '.join(unknown)}; "
                        f"updatable: {', '.join(UPDATABLE_FIELDS)}",
                    )
                ]
            )
        chosen = set(fields) or set(UPDATABLE_FIELDS)
        now = self._clock()

        def work(session: Session) -> Policy:
            row = session.get(PolicyRow, policy.policy_id)
            if row is None:
                raise PolicyNotFound(f"no policy {policy.policy_id!r}")
            current = _policy_of(row)
            if current.origin != "api":
                raise _read_only(current)
            changes: dict[str, Any] = {f: getattr(policy, f) for f in chosen}
            updated = dataclasses.replace(current, **changes, updated_at=now)
            check_policy(updated)
            if not validate_only:
                _write(row, updated)
            return updated

        stored = await self._store.run(work)
        if not validate_only:
            await self.refresh()
        return stored

    async def delete(self, policy_id: str, *, validate_only: bool = False) -> None:
        """Removes an API policy; raises PolicyNotFound or PolicyReadOnly."""

        def work(session: Session) -> None:
            row = session.get(PolicyRow, policy_id)
            if row is None:
                raise PolicyNotFound(f"no policy {policy_id!r}")
            if row.origin != "api":
                raise _read_only(_policy_of(row))
            if not validate_only:
                session.delete(row)

        await self._store.run(work)
        if not validate_only:
            await self.refresh()
