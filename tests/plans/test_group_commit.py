"""Submissions that arrive together are written by one transaction (group commit): each is
answered only once it is committed, judged as if they had come one after the other, and one
that fails does not take the others with it."""

from __future__ import annotations

import asyncio
import datetime as dt
import threading
from collections.abc import Callable

import pytest
from sqlalchemy import Connection, Table, func, select
from sqlalchemy.exc import IntegrityError

from controlplane.plans import (
    Limits,
    Phase,
    Plan,
    PlanChange,
    PlanRepository,
    Step,
    Target,
    Transition,
)
from controlplane.plans._repository import Decision
from controlplane.store import AUDIT_EVENTS, PLAN_TARGETS, PLAN_TRANSITIONS, PLANS, Store


def _plan(plan_id: str, request_id: str, *nodes: str) -> Plan:
    return Plan(
        plan_id=plan_id,
        request_id=request_id,
        source="test",
        rationale="",
        confidence=1.0,
        expire_at=None,
        steps=[Step(0, "s0", "cordon", tuple(Target(node_id=n) for n in nodes or ("n1",)), {}, 10)],
        health_gates=(),
        limits=Limits(),
        created_at=dt.datetime.now(dt.UTC),
    )


class _Verdicts:
    """Verdicts that approve, noting for each plan the history it was judged on and how often
    it was judged (a batch that fails is judged again, plan by plan)."""

    def __init__(self) -> None:
        self.recent: dict[str, dict[str, int]] = {}
        self.judged: dict[str, int] = {}

    def approve(self, plan: Plan) -> Callable[[dict[str, int]], Decision]:
        def decide(recent: dict[str, int]) -> Decision:
            self.recent[plan.plan_id] = dict(recent)
            self.judged[plan.plan_id] = self.judged.get(plan.plan_id, 0) + 1
            plan.phase = Phase.APPROVED
            at = plan.created_at or dt.datetime.now(dt.UTC)
            transitions = (
                Transition(Phase.PENDING, Phase.VALIDATING, at, "test", "submitted"),
                Transition(Phase.VALIDATING, Phase.APPROVED, at, "policy-engine", "ok"),
            )
            return Decision(plan, "digest-" + plan.request_id, transitions, store=True)

        return decide


class _Held:
    """A first submission whose verdict waits (on the store thread) until released, so that
    the submissions made meanwhile queue up and are written together by the next batch."""

    def __init__(self, repository: PlanRepository, verdicts: _Verdicts) -> None:
        self.deciding = threading.Event()
        self.release = threading.Event()
        plan = _plan("plan-held", "req-held", "n9")
        approve = verdicts.approve(plan)

        def decide(recent: dict[str, int]) -> Decision:
            self.deciding.set()
            self.release.wait(10)
            return approve(recent)

        self.task = asyncio.create_task(
            repository.submit_new(plan, dt.datetime.now(dt.UTC), decide)
        )

    async def started(self) -> None:
        assert await asyncio.to_thread(self.deciding.wait, 10)


async def _queued() -> None:
    """Lets the submissions just started take their places in the queue (each does on its
    first step, without waiting on anything else)."""
    for _ in range(3):
        await asyncio.sleep(0)


async def _count(store: Store, table: Table, plan_id: str) -> int:
    def read(db: Connection) -> int:
        return int(db.scalar(select(func.count()).where(table.c.plan_id == plan_id)) or 0)

    return await store.run_core(read)


async def _audited(store: Store, plan_id: str) -> int:
    def read(db: Connection) -> int:
        where = AUDIT_EVENTS.c.target == f"plan/{plan_id}"
        return int(db.scalar(select(func.count()).where(where)) or 0)

    return await store.run_core(read)


async def test_a_failed_plan_in_a_batch_leaves_the_others_stored(store: Store) -> None:
    changes: list[PlanChange] = []
    repository = PlanRepository(store, changes.append, batches_in_flight=1)
    verdicts = _Verdicts()
    held = _Held(repository, verdicts)
    await held.started()
    since = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    first = _plan("plan-a", "req-a")
    clash = _plan("plan-a", "req-b")  # the same plan id: its insert fails the whole batch
    third = _plan("plan-c", "req-c")
    broken = _plan("plan-d", "req-d")

    def fails(_recent: dict[str, int]) -> Decision:
        raise RuntimeError("the verdict could not be reached")

    submitted = [
        asyncio.create_task(repository.submit_new(p, since, decide))
        for p, decide in (
            (first, verdicts.approve(first)),
            (clash, verdicts.approve(clash)),
            (third, verdicts.approve(third)),
            (broken, fails),
        )
    ]
    await _queued()  # all four wait for the held batch
    held.release.set()
    outcomes = await asyncio.gather(held.task, *submitted, return_exceptions=True)

    assert [type(o).__name__ for o in outcomes] == [
        "Decision",
        "Decision",
        "IntegrityError",
        "Decision",
        "RuntimeError",
    ]
    assert isinstance(outcomes[2], IntegrityError)
    # The four were written together, failed together, then each alone.
    assert verdicts.judged["plan-c"] == 2
    for plan_id in ("plan-held", "plan-a", "plan-c"):
        assert await _count(store, PLANS, plan_id) == 1
        assert await _count(store, PLAN_TRANSITIONS, plan_id) == 2
        assert await _count(store, PLAN_TARGETS, plan_id) == 1
        assert await _audited(store, plan_id) == 2
    assert await _count(store, PLANS, "plan-d") == 0
    assert await repository.find_by_request_id("req-b") is None
    stored = await repository.get("plan-a")
    assert stored.request_id == "req-a" and stored.phase == Phase.APPROVED
    # Watchers and metrics hear of every stored plan, once.
    assert sorted(c.plan.plan_id for c in changes) == ["plan-a", "plan-c", "plan-held"]


async def test_plans_written_together_are_judged_on_each_others_history(store: Store) -> None:
    repository = PlanRepository(store, lambda _change: None, batches_in_flight=1)
    verdicts = _Verdicts()
    held = _Held(repository, verdicts)
    await held.started()
    since = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    plans = [
        _plan("plan-1", "req-1", "n1", "n2"),
        _plan("plan-2", "req-2", "n2", "n3"),
        _plan("plan-3", "req-3", "n1", "n2", "n3"),
    ]
    submitted = [
        asyncio.create_task(repository.submit_new(p, since, verdicts.approve(p))) for p in plans
    ]
    unread = _plan("plan-4", "req-4", "n1")
    submitted.append(
        asyncio.create_task(
            repository.submit_new(unread, since, verdicts.approve(unread), history=False)
        )
    )
    await _queued()
    held.release.set()
    await asyncio.gather(held.task, *submitted)

    # As if submitted one after the other: each counts the accepted plans before it.
    assert verdicts.recent["plan-1"] == {}
    assert verdicts.recent["plan-2"] == {"node/n2": 1}
    assert verdicts.recent["plan-3"] == {"node/n1": 1, "node/n2": 2, "node/n3": 1}
    assert verdicts.recent["plan-4"] == {}  # no rule reads history: none is counted
    # A later plan sees all of them in the store.
    later = _plan("plan-5", "req-5", "n1", "n2", "n3", "n9")
    await repository.submit_new(later, since, verdicts.approve(later))
    assert verdicts.recent["plan-5"] == {"node/n1": 3, "node/n2": 3, "node/n3": 2, "node/n9": 1}


async def test_a_retry_arriving_with_its_original_is_answered_with_the_stored_plan(
    store: Store,
) -> None:
    repository = PlanRepository(store, lambda _change: None, batches_in_flight=1)
    verdicts = _Verdicts()
    held = _Held(repository, verdicts)
    await held.started()
    since = dt.datetime.now(dt.UTC)
    original = _plan("plan-original", "req-same")
    retry = _plan("plan-retry", "req-same")
    submitted = [
        asyncio.create_task(repository.submit_new(p, since, verdicts.approve(p)))
        for p in (original, retry)
    ]
    await _queued()
    held.release.set()
    _, first, second = await asyncio.gather(held.task, *submitted)

    assert isinstance(first, Decision) and first.plan.plan_id == "plan-original"
    assert isinstance(second, Plan) and second.plan_id == "plan-original"
    assert "plan-retry" not in verdicts.recent  # replayed, not judged
    assert await _count(store, PLANS, "plan-retry") == 0


async def test_a_submission_given_up_before_its_batch_is_not_stored(store: Store) -> None:
    repository = PlanRepository(store, lambda _change: None, batches_in_flight=1)
    verdicts = _Verdicts()
    held = _Held(repository, verdicts)
    await held.started()
    abandoned = _plan("plan-abandoned", "req-abandoned")
    kept = _plan("plan-kept", "req-kept")
    since = dt.datetime.now(dt.UTC)
    gone = asyncio.create_task(repository.submit_new(abandoned, since, verdicts.approve(abandoned)))
    stays = asyncio.create_task(repository.submit_new(kept, since, verdicts.approve(kept)))
    await _queued()
    gone.cancel()
    with pytest.raises(asyncio.CancelledError):
        await gone
    held.release.set()
    await asyncio.gather(held.task, stays)

    assert await repository.find_by_request_id("req-abandoned") is None
    assert (await repository.get("plan-kept")).phase == Phase.APPROVED


async def test_many_concurrent_submissions_are_each_stored_once_before_their_answer(
    store: Store,
) -> None:
    repository = PlanRepository(store, lambda _change: None)
    verdicts = _Verdicts()
    since = dt.datetime.now(dt.UTC)

    async def submit(n: int) -> None:
        plan = _plan(f"plan-{n:03d}", f"req-{n:03d}", f"n{n % 7}", f"n{n % 5}")
        outcome = await repository.submit_new(plan, since, verdicts.approve(plan))
        assert isinstance(outcome, Decision)
        # Answered only once committed: another connection reads it at once.
        assert await _count(store, PLANS, plan.plan_id) == 1

    await asyncio.gather(*(submit(n) for n in range(60)))

    def totals(db: Connection) -> tuple[int, int, int]:
        return (
            int(db.scalar(select(func.count()).select_from(PLANS)) or 0),
            int(db.scalar(select(func.count()).select_from(PLAN_TRANSITIONS)) or 0),
            int(db.scalar(select(func.count()).select_from(AUDIT_EVENTS)) or 0),
        )

    assert await store.run_core(totals) == (60, 120, 120)
