"""Compares the two CEL packages on PyPI for the policy engine: the Rust-backed
`common-expression-language` (module `cel`) and the pure-Python `cel-python` (module `celpy`).

    python -m tests.bench.cel_compare [--runs 2000]

Measures compile time, evaluation time of a typical rule over a plan-sized document, the error
messages a rule author would see, the features our guardrails need, determinism, and the
installed dependency weight. The figures and the decision are in docs/decisions.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import importlib.metadata
import logging
import pathlib
import re
import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

TYPICAL_RULE = (
    "plan.steps.all(s, s.action != 'set_gpu_power_limit' || "
    "(s.parameters.watts >= 100 && s.parameters.watts <= 700))"
)
SIMPLE_RULE = "plan.confidence >= 0.8 || size(plan.node_ids) * 4 <= fleet.size"
NOW = dt.datetime(2026, 3, 7, 12, 0, tzinfo=dt.UTC)

# (what, expression, expected result) over the plan document below.
FEATURES: list[tuple[str, str, Any]] = [
    ("has() on a map key", "has(plan.limits.max_nodes_in_parallel)", True),
    ("has() of an absent key", "has(plan.limits.nope)", False),
    ("all() macro", "plan.steps.all(s, s.timeout_seconds > 0.0)", True),
    ("exists() macro", "plan.steps.exists(s, s.action == 'cordon')", False),
    ("`in` on a map", "'node/n0-0' in history.recent", True),
    ("`in` on a list", "'n0-1' in plan.node_ids", True),
    ("timestamp comparison", "now > timestamp('2026-01-01T00:00:00Z')", True),
    ("duration arithmetic", "now + duration('1h') > now", True),
    ("day of week (Saturday = 6)", "now.getDayOfWeek() == 6", True),
    ("int/double comparison", "plan.confidence < 1", True),
    ("null comparison", "plan.expire_time == null", True),
    ("datetime variable", "fleet.checked_at < now", True),
]


def plan_document(steps: int = 5, nodes_per_step: int = 20) -> dict[str, Any]:
    node_ids = [f"n{i}-{j}" for i in range(steps) for j in range(nodes_per_step)]
    return {
        "plan_id": "plan-1",
        "request_id": "req-1",
        "source": "inframind",
        "rationale": "power cap for the evening peak",
        "confidence": 0.9,
        "submitted_by": "spiffe://sentinel.local/service/inframind",
        "expire_time": None,
        "steps": [
            {
                "index": i,
                "step_id": f"step-{i}",
                "action": "set_gpu_power_limit",
                "targets": [{"node_id": f"n{i}-{j}"} for j in range(nodes_per_step)],
                "node_ids": [f"n{i}-{j}" for j in range(nodes_per_step)],
                "parameters": {"watts": 300},
                "timeout_seconds": 60.0,
            }
            for i in range(steps)
        ],
        "health_gates": [],
        "limits": {"max_nodes_in_parallel": 10, "max_replicas_in_parallel": 0},
        "node_ids": node_ids,
        "targets": [f"node/{n}" for n in node_ids],
    }


def variables() -> dict[str, Any]:
    plan = plan_document()
    return {
        "plan": plan,
        "fleet": {
            "size": 1000,
            "connected": 990,
            "cordoned": [],
            "checked_at": NOW - dt.timedelta(hours=1),
        },
        "history": {"recent": {t: 1 for t in plan["targets"]}, "window_seconds": 3600.0},
        "now": NOW,
    }


class Candidate:
    name = ""
    package = ""

    def compile(self, source: str) -> Any:
        raise NotImplementedError

    def convert(self, values: dict[str, Any]) -> Any:
        """The library's own form of the variables (done once per plan)."""
        raise NotImplementedError

    def run(self, program: Any, converted: Any) -> Any:
        raise NotImplementedError


class RustCel(Candidate):
    name = "common-expression-language (cel)"
    package = "common-expression-language"

    def __init__(self) -> None:
        import cel

        self._cel = cel

    def compile(self, source: str) -> Any:
        return self._cel.compile(source)

    def convert(self, values: dict[str, Any]) -> Any:
        return self._cel.Context(values)

    def run(self, program: Any, converted: Any) -> Any:
        return program.execute(converted)


class PythonCel(Candidate):
    name = "cel-python (celpy)"
    package = "cel-python"

    def __init__(self, compiled: bool = False) -> None:
        # Only this comparison needs cel-python (`pip install -e .[bench]`); imported by name
        # so the type check does not require it.
        celpy: Any = importlib.import_module("celpy")
        self._celpy = celpy
        runner = celpy.CompiledRunner if compiled else celpy.InterpretedRunner
        self._env = celpy.Environment(runner_class=runner)
        if compiled:
            self.name = "cel-python (celpy, CompiledRunner)"

    def compile(self, source: str) -> Any:
        return self._env.program(self._env.compile(source))

    def _to_cel(self, value: Any) -> Any:
        types = self._celpy.celtypes
        if isinstance(value, dt.datetime):
            return types.TimestampType(value)
        if isinstance(value, dict):
            return types.MapType({types.StringType(k): self._to_cel(v) for k, v in value.items()})
        if isinstance(value, list):
            return types.ListType([self._to_cel(v) for v in value])
        return self._celpy.json_to_cel(value)

    def convert(self, values: dict[str, Any]) -> Any:
        return {name: self._to_cel(value) for name, value in values.items()}

    def run(self, program: Any, converted: Any) -> Any:
        return program.evaluate(converted)


def median_us(work: Callable[[], Any], runs: int) -> float:
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        work()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e6


def error_of(work: Callable[[], Any]) -> str:
    try:
        work()
    except Exception as exc:
        text = re.sub(r"\s+", " ", f"{type(exc).__name__}: {exc}")
        return text if len(text) <= 160 else text[:157] + "..."
    return "(no error)"


def distribution_weight(package: str) -> tuple[list[str], float]:
    """Transitive runtime dependencies (installed here) and their installed size in MiB."""
    seen: dict[str, importlib.metadata.Distribution] = {}
    pending = [package]
    while pending:
        name = re.split(r"[ ;<>=!~\[(]", pending.pop(), maxsplit=1)[0].lower().replace("_", "-")
        if name in seen:
            continue
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        seen[name] = dist
        pending += [r for r in dist.requires or [] if "extra ==" not in r]
    total = sum(installed_bytes(dist) for dist in seen.values())
    return sorted(set(seen) - {package}), total / 2**20


def installed_bytes(dist: importlib.metadata.Distribution) -> int:
    paths = (pathlib.Path(str(file.locate())) for file in dist.files or [])
    return sum(path.stat().st_size for path in paths if path.is_file())


def measure(candidate: Candidate, runs: int) -> None:
    print(f"\n## {candidate.name}")
    values = variables()
    compile_us = median_us(lambda: candidate.compile(TYPICAL_RULE), max(runs // 10, 50))
    typical = candidate.compile(TYPICAL_RULE)
    simple = candidate.compile(SIMPLE_RULE)
    convert_us = median_us(lambda: candidate.convert(values), runs)
    converted = candidate.convert(values)
    typical_us = median_us(lambda: candidate.run(typical, converted), runs)
    simple_us = median_us(lambda: candidate.run(simple, converted), runs)
    print(f"compile (typical rule)          {compile_us:10.1f} µs")
    print(f"convert plan document (once)    {convert_us:10.1f} µs")
    print(f"evaluate all() over 5 steps     {typical_us:10.1f} µs")
    print(f"evaluate simple comparison      {simple_us:10.1f} µs")

    print("errors:")
    print("  syntax    :", error_of(lambda: candidate.compile("plan.confidence >=")))
    missing = candidate.compile("plan.limits.deadline_seconds > 0.0")
    print("  missing   :", error_of(lambda: candidate.run(missing, converted)))
    mismatch = candidate.compile("plan.confidence + 'x' == 'y'")
    print("  mismatch  :", error_of(lambda: candidate.run(mismatch, converted)))
    unknown = candidate.compile("flet.size > 0")
    print("  unknown   :", error_of(lambda: candidate.run(unknown, converted)))

    print("features:")
    for what, source, expected in FEATURES:
        try:
            got: Any = candidate.run(candidate.compile(source), converted)
            verdict = "ok" if got == expected else f"WRONG ({got!r})"
        except Exception as exc:
            verdict = f"unsupported ({type(exc).__name__})"
        print(f"  {what:30} {verdict}")

    results = {repr(candidate.run(typical, candidate.convert(values))) for _ in range(100)}
    print(f"deterministic over 100 runs: {len(results) == 1}")
    deps, size = distribution_weight(candidate.package)
    own = installed_bytes(importlib.metadata.distribution(candidate.package))
    print(f"installed size of the package alone: {own / 2**20:.1f} MiB")
    print(f"dependencies ({len(deps)}): {', '.join(deps)}")
    print(f"installed size incl. dependencies: {size:.1f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2000)
    args = parser.parse_args()
    # celpy logs every evaluation error with a traceback and warns about its parser's grammar.
    logging.disable(logging.CRITICAL)
    warnings.simplefilter("ignore")
    for candidate in (RustCel(), PythonCel(), PythonCel(compiled=True)):
        try:
            measure(candidate, args.runs)
        except Exception as exc:
            # cel-python 0.5's CompiledRunner cannot transpile macros such as all().
            print(f"  FAILED on the typical rule: {type(exc).__name__}: {exc}")


if __name__ == "__main__":
    main()
