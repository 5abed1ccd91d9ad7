"""The safe-autonomy commands (docs/safe-autonomy.md): `autonomy` shows the breaker, the
disruption budgets and every plan source's calibration, `calibration SOURCE` one source's, and
`breaker reset` lets an operator close a tripped breaker, all through AutonomyService."""

from __future__ import annotations

import argparse

from sentinel.v1 import autonomy_pb2

from sentinelclient import SentinelClient
from sentinelctl._output import add_output_argument, message_data, print_data, table
from sentinelctl._values import local_time, seconds

_WHEN = "%Y-%m-%d %H:%M:%S"


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Adds `autonomy`, `calibration` and `breaker reset`."""
    autonomy = sub.add_parser(
        "autonomy", help="the autonomy breaker, disruption budgets and planner calibration"
    )
    add_output_argument(autonomy)
    autonomy.set_defaults(func=_autonomy)

    calibration = sub.add_parser(
        "calibration", help="how often one plan source's predictions came true"
    )
    calibration.add_argument("source", help="the plans' source, e.g. inframind")
    add_output_argument(calibration)
    calibration.set_defaults(func=_calibration)

    breaker = sub.add_parser("breaker", help="the autonomy breaker: reset")
    breaker_sub = breaker.add_subparsers(dest="breaker_command", required=True)
    reset = breaker_sub.add_parser(
        "reset", help="close a tripped breaker (operators; the reason is audited)"
    )
    reset.add_argument(
        "--reason", required=True, help="why it is safe to let the planner act again"
    )
    reset.set_defaults(func=_reset)


def breaker_lines(breaker: autonomy_pb2.AutonomyBreaker) -> list[str]:
    """Whether the breaker is tripped, since when and why, its last reset and its thresholds."""
    if breaker.tripped:
        lines = [f"breaker     TRIPPED at {local_time(breaker.trip_time, _WHEN)}"]
    else:
        lines = ["breaker     not tripped"]
    if breaker.reason:
        # Kept after a reset: the last trip's reason stays on record.
        label = "reason" if breaker.tripped else "last trip"
        lines.append(f"{label:<11} {breaker.reason}")
    if breaker.HasField("reset_time"):
        when = local_time(breaker.reset_time, _WHEN)
        lines.append(f"last reset  {when} by {breaker.reset_by}: {breaker.reset_reason}")
    else:
        lines.append("last reset  never")
    t = breaker.thresholds
    rollbacks = f"{t.max_rollbacks} rollbacks" if t.max_rollbacks else "rollbacks: never"
    unhealthy = (
        f"{t.max_unhealthy_fraction:g} of the fleet unhealthy"
        if t.max_unhealthy_fraction
        else "unhealthy fleet: never"
    )
    lines.append(f"trips on    {rollbacks}, {unhealthy}, within {seconds(t.window)}")
    return lines


def _holder(hold: autonomy_pb2.BudgetHold) -> str:
    return f"{hold.node} ({hold.plan_id or 'cordoned'})"


def budget_table(budgets: list[autonomy_pb2.DisruptionBudget]) -> list[str]:
    """Each disruption budget: its effective limit, the nodes it covers and what holds it."""
    if not budgets:
        return ["(no disruption budgets)"]
    return table(
        ("NAME", "LIMIT", "COVERED", "IN USE", "HOLDERS"),
        [
            (
                b.name,
                b.limit,
                b.nodes_covered,
                len(b.holds),
                ", ".join(_holder(h) for h in b.holds) or "-",
            )
            for b in budgets
        ],
    )


def calibration_table(calibrations: list[autonomy_pb2.PlannerCalibration]) -> list[str]:
    """Each source's plans, rollbacks and judged predictions against its stated confidence."""
    if not calibrations:
        return ["(no plan source in the calibration window)"]
    return table(
        (
            "SOURCE",
            "PLANS",
            "ROLLBACKS",
            "PREDICTIONS",
            "HELD",
            "HIT RATE",
            "MEAN CONFIDENCE",
            "WINDOW",
        ),
        [
            (
                c.source,
                c.plans,
                c.rollbacks,
                c.predictions,
                c.predictions_held,
                f"{c.hit_rate:.2f}",
                f"{c.mean_confidence:.2f}",
                seconds(c.window),
            )
            for c in calibrations
        ],
    )


def _autonomy(args: argparse.Namespace, client: SentinelClient) -> None:
    status = client.get_autonomy_status()
    if args.output != "table":
        print_data(message_data(status), args.output)
        return
    lines = breaker_lines(status.breaker)
    lines += ["", "BUDGETS", *budget_table(list(status.budgets))]
    lines += ["", "CALIBRATION", *calibration_table(list(status.calibration))]
    for line in lines:
        print(line)


def _calibration(args: argparse.Namespace, client: SentinelClient) -> None:
    calibration = client.get_planner_calibration(args.source)
    if args.output != "table":
        print_data(message_data(calibration), args.output)
        return
    for line in calibration_table([calibration]):
        print(line)


def _reset(args: argparse.Namespace, client: SentinelClient) -> None:
    breaker = client.reset_breaker(args.reason)
    state = "tripped" if breaker.tripped else "not tripped"
    print(f"breaker {state}: reset by {breaker.reset_by}: {breaker.reset_reason}")
