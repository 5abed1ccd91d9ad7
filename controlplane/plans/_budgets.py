"""Fleet-wide disruption budgets: at most so many nodes being changed or cordoned at once,
shared by every running plan. Before each wave the controller takes holds on the wave's nodes
in one transaction that locks the budgets' rows, so two plans racing for a budget's last slot
are decided one after the other, on every control plane sharing the database."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import fnmatch
import logging
import math
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, delete, select
from sqlalchemy.dialects import postgresql, sqlite

from controlplane.executors import Target
from controlplane.plans._lease import Fence
from controlplane.plans._model import TERMINAL, Plan, Step, StepState
from controlplane.store import DISRUPTION_BUDGETS, DISRUPTION_HOLDS, PLANS, Store
from processkit import wait_event

log = logging.getLogger(__name__)

# How often a waiting plan asks again (a release on this replica wakes it at once).
WAIT_POLL_S = 0.5
_NAME_MAX = 128


class BudgetConfigError(ValueError):
    """The `budgets:` list of the autonomy policy file is not valid."""


@dataclass(frozen=True, slots=True)
class DisruptionBudget:
    """One configured budget: which nodes it covers and how many of them may be disrupted."""

    name: str
    node_patterns: tuple[str, ...] = ()
    """Globs over agent node ids; empty: every agent node, unless a cluster is named."""
    kubernetes_cluster: str = ""
    """Covers that cluster's Kubernetes Node targets too (alone: only those)."""
    max_nodes: int = 0
    """At most this many nodes at once; 0: no absolute limit."""
    max_percent: float = 0.0
    """At most this percentage of the covered nodes (rounded down, at least 1); 0: none."""

    def covers(self, node: str) -> bool:
        """Whether the node key ("node/<id>" or "k8s/<cluster>/Node/<name>") is covered."""
        if node.startswith("k8s/"):
            return bool(self.kubernetes_cluster) and node.split("/")[1] == self.kubernetes_cluster
        node_id = node.removeprefix("node/")
        if not self.node_patterns:
            return not self.kubernetes_cluster
        return any(fnmatch.fnmatchcase(node_id, p) for p in self.node_patterns)

    def limit(self, covered: int) -> int:
        """The effective limit for `covered` nodes: the smallest of the limits given."""
        limits = []
        if self.max_nodes > 0:
            limits.append(self.max_nodes)
        if self.max_percent > 0:
            limits.append(max(1, math.floor(covered * self.max_percent / 100)))
        return min(limits)


@dataclass(frozen=True, slots=True)
class BudgetHold:
    """One node counted against a budget: held by a plan, or cordoned (plan_id empty)."""

    node: str
    plan_id: str = ""
    acquired_at: dt.datetime | None = None


@dataclass(frozen=True, slots=True)
class BudgetState:
    """A budget as it stands: its configuration, the nodes it covers, its limit, its holds."""

    budget: DisruptionBudget
    nodes_covered: int
    limit: int
    holds: tuple[BudgetHold, ...] = ()

    @property
    def in_use(self) -> int:
        return len(self.holds)


@dataclass(frozen=True, slots=True)
class BudgetRefusal:
    """Why a wave may not start now; `hopeless` when waiting cannot help (the wave alone is
    larger than the budget, or only this plan's own nodes stand in its way)."""

    budget: str
    reason: str
    hopeless: bool = False


def parse_budgets(items: Any, where: str = "budgets") -> list[DisruptionBudget]:
    """Budgets from the plain data of the `budgets:` list; BudgetConfigError names the field."""
    if items is None:
        return []
    if not isinstance(items, list):
        raise BudgetConfigError(f"{where}: must be a list")
    budgets: list[DisruptionBudget] = []
    for i, item in enumerate(items):
        at = f"{where}[{i}]"
        if not isinstance(item, dict):
            raise BudgetConfigError(f"{at}: must be a mapping")
        unknown = set(item) - {
            "name",
            "node_patterns",
            "kubernetes_cluster",
            "max_nodes",
            "max_percent",
        }
        if unknown:
            raise BudgetConfigError(f"{at}: unknown field(s) {', '.join(sorted(unknown))}")
        name = item.get("name")
        if not isinstance(name, str) or not name or len(name) > _NAME_MAX:
            raise BudgetConfigError(f"{at}.name: a name of 1 to {_NAME_MAX} characters")
        if any(b.name == name for b in budgets):
            raise BudgetConfigError(f"{at}.name: {name!r} is used twice")
        patterns = item.get("node_patterns") or []
        if not isinstance(patterns, list) or not all(isinstance(p, str) and p for p in patterns):
            raise BudgetConfigError(f"{at}.node_patterns: a list of glob patterns")
        cluster = item.get("kubernetes_cluster") or ""
        if not isinstance(cluster, str):
            raise BudgetConfigError(f"{at}.kubernetes_cluster: a cluster name")
        max_nodes = item.get("max_nodes", 0)
        if isinstance(max_nodes, bool) or not isinstance(max_nodes, int) or max_nodes < 0:
            raise BudgetConfigError(f"{at}.max_nodes: a whole number >= 0")
        max_percent = item.get("max_percent", 0)
        if (
            isinstance(max_percent, bool)
            or not isinstance(max_percent, int | float)
            or not 0 <= max_percent <= 100
        ):
            raise BudgetConfigError(f"{at}.max_percent: a number from 0 to 100")
        if max_nodes == 0 and max_percent == 0:
            raise BudgetConfigError(f"{at}: set max_nodes, max_percent or both")
        budgets.append(
            DisruptionBudget(name, tuple(patterns), cluster, max_nodes, float(max_percent))
        )
    return budgets


def node_key(target: Target) -> str | None:
    """The node a target disrupts, as budgets count it: "node/<id>" for an agent's node,
    "k8s/<cluster>/Node/<name>" for a Kubernetes Node; None for anything else (a workload)."""
    if target.kubernetes is None:
        return f"node/{target.node_id}"
    k = target.kubernetes
    if k.kind == "Node":
        return f"k8s/{k.cluster}/Node/{k.name}"
    return None


def _shown(node: str) -> str:
    return node.removeprefix("node/")


class DisruptionBudgets:
    """The configured budgets and the holds plans keep against them in the store."""

    def __init__(
        self,
        store: Store,
        budgets: Sequence[DisruptionBudget],
        agents: Callable[[], Mapping[str, bool]],
        *,
        kubernetes_nodes: Callable[[str], int] = lambda cluster: 0,
        on_state: Callable[[Sequence[BudgetState]], None] | None = None,
    ) -> None:
        """`agents` gives every registered node id and whether it is cordoned (Sentinel's
        scheduling view); `kubernetes_nodes` how many Nodes a cluster has, when known."""
        self._store = store
        self.budgets = tuple(budgets)
        self._agents = agents
        self._kubernetes_nodes = kubernetes_nodes
        self._on_state = on_state
        self._released = asyncio.Event()

    def __bool__(self) -> bool:
        return bool(self.budgets)

    def _covered(self, agents: Mapping[str, bool]) -> dict[str, tuple[int, frozenset[str]]]:
        """Per budget: how many nodes it covers and which of them are cordoned."""
        covered: dict[str, tuple[int, frozenset[str]]] = {}
        for budget in self.budgets:
            nodes = [n for n in agents if budget.covers(f"node/{n}")]
            count = len(nodes)
            if budget.kubernetes_cluster:
                count += self._kubernetes_nodes(budget.kubernetes_cluster)
            covered[budget.name] = (count, frozenset(f"node/{n}" for n in nodes if agents[n]))
        return covered

    async def acquire(
        self,
        plan_id: str,
        step_index: int,
        nodes: Sequence[str],
        *,
        own: Iterable[str] = (),
        fence: Fence | None = None,
    ) -> BudgetRefusal | None:
        """Takes holds on `nodes` (node keys) for every budget covering them, all or none, and
        drops the plan's holds on other nodes. None when taken; else why not. `own` are nodes
        this plan already changed (cordoned ones among them are its own doing)."""
        covered = self._covered(self._agents())
        wanted = tuple(dict.fromkeys(nodes))
        mine = frozenset(own)
        now = dt.datetime.now(dt.UTC)
        budgets = sorted(self.budgets, key=lambda b: b.name)

        def decide(db: Connection) -> BudgetRefusal | None:
            if fence is not None:
                fence.check(db)
            relevant = [b for b in budgets if any(b.covers(n) for n in wanted)]
            # Lock the budgets' rows, in name order (no deadlock): whoever locks second sees
            # the first one's holds, on PostgreSQL (READ COMMITTED reads anew per statement)
            # and on SQLite (one writer).
            for budget in relevant:
                count = covered[budget.name][0]
                _upsert_budget(db, budget.name, budget.limit(count), count, now)
            stale = delete(DISRUPTION_HOLDS).where(DISRUPTION_HOLDS.c.plan_id == plan_id)
            if wanted:
                stale = stale.where(DISRUPTION_HOLDS.c.node.not_in(wanted))
            db.execute(stale)
            inserts: list[dict[str, Any]] = []
            for budget in relevant:
                count, cordoned = covered[budget.name]
                limit = budget.limit(count)
                held = _holders(db, budget.name)
                need = [n for n in wanted if budget.covers(n)]
                refusal = _judge(budget.name, limit, need, held, cordoned, plan_id, mine)
                if refusal is not None:
                    return refusal
                inserts += [
                    {
                        "budget": budget.name,
                        "node": n,
                        "plan_id": plan_id,
                        "step_index": step_index,
                        "acquired_at": now,
                    }
                    for n in need
                    if plan_id not in held.get(n, ())
                ]
            if inserts:
                db.execute(DISRUPTION_HOLDS.insert(), inserts)
            return None

        return await self._store.run_core(decide)

    async def release(self, plan_id: str) -> None:
        """Drops every hold of the plan (its wave ended, or it is terminal)."""

        def drop(db: Connection) -> int:
            return db.execute(
                delete(DISRUPTION_HOLDS).where(DISRUPTION_HOLDS.c.plan_id == plan_id)
            ).rowcount

        if await self._store.run_core(drop):
            self._released.set()

    async def sweep(self) -> int:
        """Drops the holds of plans that are terminal or gone (a controller killed mid-wave)."""
        terminal = [p.value for p in TERMINAL]

        def drop(db: Connection) -> int:
            live = select(PLANS.c.plan_id).where(PLANS.c.phase.not_in(terminal))
            return db.execute(
                delete(DISRUPTION_HOLDS).where(DISRUPTION_HOLDS.c.plan_id.not_in(live))
            ).rowcount

        dropped = await self._store.run_core(drop)
        if dropped:
            log.info("released %d disruption budget hold(s) of finished plans", dropped)
            self._released.set()
        return dropped

    async def released(self, timeout_s: float) -> None:
        """Returns when a hold was released on this replica, or after `timeout_s`."""
        with contextlib.suppress(TimeoutError):
            await wait_event(self._released, timeout_s)
        self._released.clear()

    async def state(self) -> list[BudgetState]:
        """Every budget as it stands (for GetAutonomyStatus and the metrics)."""
        covered = self._covered(self._agents())

        def read(db: Connection) -> list[Any]:
            return list(db.execute(select(DISRUPTION_HOLDS)).all())

        rows = await self._store.run_core(read)
        states: list[BudgetState] = []
        for budget in self.budgets:
            count, cordoned = covered[budget.name]
            holds = [
                BudgetHold(_shown(r.node), r.plan_id, r.acquired_at)
                for r in rows
                if r.budget == budget.name
            ]
            held = {r.node for r in rows if r.budget == budget.name}
            holds += [BudgetHold(_shown(n)) for n in sorted(cordoned - held)]
            states.append(BudgetState(budget, count, budget.limit(count), tuple(holds)))
        if self._on_state is not None:
            self._on_state(states)
        return states


def _upsert_budget(db: Connection, name: str, limit: int, covered: int, now: dt.datetime) -> None:
    values = {"name": name, "node_limit": limit, "nodes_covered": covered, "updated_at": now}
    changed = {"node_limit": limit, "nodes_covered": covered, "updated_at": now}
    if db.dialect.name == "postgresql":
        pg = postgresql.insert(DISRUPTION_BUDGETS).values(values)
        db.execute(pg.on_conflict_do_update(index_elements=["name"], set_=changed))
    else:
        lite = sqlite.insert(DISRUPTION_BUDGETS).values(values)
        db.execute(lite.on_conflict_do_update(index_elements=["name"], set_=changed))


def _holders(db: Connection, budget: str) -> dict[str, list[str]]:
    held: dict[str, list[str]] = {}
    for node, plan_id in db.execute(
        select(DISRUPTION_HOLDS.c.node, DISRUPTION_HOLDS.c.plan_id)
        .where(DISRUPTION_HOLDS.c.budget == budget)
        .order_by(DISRUPTION_HOLDS.c.acquired_at, DISRUPTION_HOLDS.c.node)
    ):
        held.setdefault(node, []).append(plan_id)
    return held


def _judge(
    name: str,
    limit: int,
    need: Sequence[str],
    held: Mapping[str, Sequence[str]],
    cordoned: frozenset[str],
    plan_id: str,
    own: frozenset[str],
) -> BudgetRefusal | None:
    """Whether `need` fits in the budget beside what is in use (held or cordoned nodes, each
    node counted once, whoever holds it)."""
    if len(need) > limit:
        return BudgetRefusal(
            name,
            f"a wave of {len(need)} node(s) can never fit disruption budget {name!r} "
            f"(at most {limit} at once); lower max_nodes_in_parallel",
            hopeless=True,
        )
    in_use = dict.fromkeys([*held, *sorted(cordoned)])
    if len(in_use.keys() | set(need)) <= limit:
        return None
    blockers = [n for n in in_use if n not in need]
    described = []
    for node in blockers:
        plans = [p for p in held.get(node, ()) if p]
        if plans:
            described.append(f"{_shown(node)} by {', '.join(plans)}")
        else:
            described.append(f"{_shown(node)} cordoned")
    reason = (
        f"waiting for disruption budget {name!r} ({len(in_use)} of {limit} node(s) in use: "
        f"{', '.join(described)})"
    )

    def its_own(node: str) -> bool:
        plans = held.get(node, ())
        return all(p == plan_id for p in plans) if plans else node in own

    if all(its_own(n) for n in blockers):
        return BudgetRefusal(
            name,
            f"disruption budget {name!r} is used up by this plan's own nodes "
            f"({', '.join(described)}); it can never go on",
            hopeless=True,
        )
    return BudgetRefusal(name, reason)


def wave_nodes(wave: Iterable[Target]) -> list[str]:
    """The node keys of a wave's targets that budgets count."""
    return [key for target in wave if (key := node_key(target)) is not None]


def changed_nodes(plan: Plan) -> set[str]:
    """The node keys this plan has changed so far (its own cordons among them)."""
    changed: set[str] = set()
    for step in plan.steps:
        results = {r.node_id: r for r in step.node_results}
        for target in step.targets:
            result = results.get(target.result_key)
            key = node_key(target)
            if key is not None and result is not None and result.state == StepState.SUCCEEDED:
                changed.add(key)
    return changed


@dataclass(slots=True)
class WaveWait:
    """What waiting for a wave's budget needs from the controller."""

    refresh: Callable[[], Awaitable[str]]
    """Reads the plan anew from the store; why it must stop ("" when it may go on)."""
    save: Callable[[], Awaitable[None]]
    """Saves the plan (its waiting_reason changed)."""
    fence: Callable[[], Fence | None]
    own: set[str] = field(default_factory=set)


async def wait_for_wave(
    budgets: DisruptionBudgets, plan: Plan, step: Step, wave: Sequence[Target], how: WaveWait
) -> str | None:
    """Takes the wave's holds, waiting while a budget is used up (with the plan's
    waiting_reason saved for WatchPlan); None once taken, else why the plan must fail."""
    nodes = wave_nodes(wave)
    own = changed_nodes(plan)
    while True:
        refusal = await budgets.acquire(plan.plan_id, step.index, nodes, own=own, fence=how.fence())
        if refusal is None:
            if plan.waiting_reason:
                plan.waiting_reason = ""
                await how.save()
            return None
        if refusal.hopeless:
            plan.waiting_reason = ""
            return refusal.reason
        if plan.waiting_reason != refusal.reason:
            log.info("plan %s: %s", plan.plan_id, refusal.reason)
            plan.waiting_reason = refusal.reason
            await how.save()
        await budgets.released(WAIT_POLL_S)
        stop = await how.refresh()
        if stop:
            plan.waiting_reason = ""
            return stop


async def run_publisher(budgets: DisruptionBudgets, interval_s: float) -> None:
    """Reads the budgets' state every `interval_s` (its `on_state` feeds the metrics)."""
    while True:
        await budgets.state()
        await asyncio.sleep(interval_s)
