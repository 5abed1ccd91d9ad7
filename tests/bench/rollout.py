"""Canary rollout benchmark: what a canary of a large Deployment costs Sentinel's Kubernetes
executor (API requests, CPU) and how soon it notices that a stage is ready, against a polling
baseline measured in the same run on the same test API server.

The Kubernetes API test server (tests/kubeapi) and its simulated controller run in a process of
their own, so the control plane side's CPU is the figure of this process alone. Each rollout
starts from a fresh Deployment whose pods are all available. Sentinel's rollouts are
`KubernetesExecutor.run(StepRun(...))` with `strategy: canary` (watches); the baseline does the
same reads and writes with the official client, but waits by GETting the Deployment every
`--poll-interval` seconds instead of watching it.

    python -m tests.bench.rollout                        # 100 replicas, weights 20..100, 3 repeats
    python -m tests.bench.rollout --replicas 20 --repeats 1 --json /tmp/rollout.json
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import copy
import dataclasses
import datetime as dt
import json
import math
import multiprocessing
import pathlib
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from multiprocessing.connection import Connection
from typing import Any

from controlplane.executors import (
    ClusterSpec,
    KubeClusters,
    KubernetesExecutor,
    KubernetesObject,
    StepRun,
    Target,
)
from tests.kubeapi import Cluster, KubeApiServer, RequestRecord, write_kubeconfig
from tests.kubeapi.objects import deployment

NAMESPACE = "models"
CLUSTER = "bench"
CONTAINER = "main"
VERBS = ("get", "list", "watch", "create", "update", "patch", "delete")
MODES = ("sentinel", "polling")
TRACK_LABEL = "sentinel.io/track"  # as the executor labels its canary
PROGRESSIVE_OF_LABEL = "sentinel.io/progressive-of"
MAX_CONFLICT_RETRIES = 5  # as the executor


def rollout_complete(obj: Mapping[str, Any]) -> bool:
    """Whether a Deployment's rollout is complete, as `kubectl rollout status` (and the
    executor's wait) judge it: status observed for the current generation, every wanted replica
    updated, no old replica left, every updated one available."""
    spec, status = obj.get("spec") or {}, obj.get("status") or {}
    if status.get("observedGeneration", 0) < obj.get("metadata", {}).get("generation", 0):
        return False
    updated = status.get("updatedReplicas", 0)
    return bool(
        updated >= spec.get("replicas", 1)
        and status.get("replicas", 0) <= updated
        and status.get("availableReplicas", 0) >= updated
    )


# --- the test API server's process ------------------------------------------------------------


class _Recorder:
    """Stamps, on the server's side and with CLOCK_MONOTONIC: when each API request arrived (and
    the resourceVersion a GET of a Deployment answered), when each Deployment's rollout became
    complete or incomplete (a stored change that flips `rollout_complete`), when each watch event
    on a Deployment was sent, and how long each controller tick held the store. It hooks into
    the test server's objects in place, without changing the server."""

    def __init__(self, server: KubeApiServer) -> None:
        cluster, store = server.cluster, server.cluster.store
        self._lock = threading.Lock()
        self._current = threading.local()
        self.requests: list[dict[str, Any]] = []
        self.flips: list[dict[str, Any]] = []
        self.sends: list[dict[str, Any]] = []
        self.ticks: list[float] = []
        self._complete: dict[str, bool] = {}
        handle, record, tick = server.api.handle, cluster.record, cluster.tick
        create, update = store.create, store.update

        def timed_handle(request: Any) -> Any:
            self._current.entry = {"at": time.monotonic(), "rv": None}
            reply = handle(request)
            entry = self._current.entry
            if not hasattr(reply, "code"):  # a watch stream, written after this returns
                reply.run = self._timed_watch(reply.run)  # type: ignore[method-assign]
            elif entry.get("verb") == "get" and reply.code == 200:
                entry["rv"] = int(reply.body.get("metadata", {}).get("resourceVersion") or 0)
            return reply

        def timed_record(request: RequestRecord) -> None:
            entry = self._current.entry
            entry.update(
                verb=request.verb, resource=request.resource, name=request.name, code=request.code
            )
            with self._lock:
                self.requests.append(entry)
            record(request)

        def timed_tick() -> None:
            started = time.monotonic()
            tick()
            with self._lock:
                self.ticks.append(time.monotonic() - started)

        def observed(write: Callable[[dict[str, Any]], dict[str, Any]]) -> Any:
            def hooked(obj: dict[str, Any]) -> dict[str, Any]:
                stored = write(obj)
                if stored.get("kind") == "Deployment":
                    self._judge(stored)
                return stored

            return hooked

        server.api.handle = timed_handle  # type: ignore[method-assign]
        cluster.record = timed_record  # type: ignore[method-assign]
        cluster.tick = timed_tick  # type: ignore[method-assign]
        store.create = observed(create)  # type: ignore[method-assign]
        store.update = observed(update)  # type: ignore[method-assign]

    def _judge(self, obj: dict[str, Any]) -> None:
        metadata = obj["metadata"]
        complete = rollout_complete(obj)
        with self._lock:
            if self._complete.get(metadata["name"]) != complete:
                self._complete[metadata["name"]] = complete
                self.flips.append(
                    {
                        "at": time.monotonic(),
                        "name": metadata["name"],
                        "complete": complete,
                        "rv": int(metadata["resourceVersion"]),
                    }
                )

    def _timed_watch(self, run: Callable[..., None]) -> Callable[..., None]:
        def timed_run(send: Callable[[dict[str, Any]], None], *args: Any) -> None:
            def timed_send(event: dict[str, Any]) -> None:
                send(event)  # written and flushed when it returns
                obj = event.get("object") or {}
                if obj.get("kind") == "Deployment" and event.get("type") != "BOOKMARK":
                    metadata = obj.get("metadata") or {}
                    with self._lock:
                        self.sends.append(
                            {
                                "at": time.monotonic(),
                                "name": metadata.get("name"),
                                "rv": int(metadata.get("resourceVersion") or 0),
                            }
                        )

            run(timed_send, *args)

        return timed_run

    def take(self) -> dict[str, Any]:
        """Everything recorded since the last take (plain values, for the pipe)."""
        with self._lock:
            taken = {
                "requests": self.requests,
                "flips": self.flips,
                "sends": self.sends,
                "ticks": self.ticks,
            }
            self.requests, self.flips, self.sends, self.ticks = [], [], [], []
        return taken


def _serve(conn: Connection, nodes: int, pods_per_node: int, tick_s: float, nagle: bool) -> None:
    """The server process: a test API server with `nodes` nodes, answering commands on `conn`."""
    # A real API server keeps minutes of watch history; 1,000 changes (the default) can be
    # less than one stage of a 100-replica canary.
    server = KubeApiServer(Cluster(event_history=50_000), tick_seconds=tick_s)
    if not nagle:
        # The test server's handler keeps socketserver's default, Nagle's algorithm on: a watch
        # event or a reply's body written right after another small write then waits for the
        # client's delayed ACK, up to 40 ms. A real API server (Go) sets TCP_NODELAY on every
        # connection; so does this process, in the only place the server offers it.
        from tests.kubeapi import server as server_module

        server_module._Handler.disable_nagle_algorithm = True
    recorder = _Recorder(server)
    cluster = server.cluster
    with server:
        for index in range(nodes):
            cluster.add_node(f"gpu-{index:02d}", allocatable={"pods": str(pods_per_node)})
        cluster.put({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}})
        conn.send({"url": server.url})
        while True:
            command = conn.recv()
            if command["do"] == "prepare":
                _prepare(
                    cluster,
                    command["name"],
                    command["replicas"],
                    command["image"],
                    command["min_ready_s"],
                )
                recorder.take()
                conn.send({"ok": True})
            elif command["do"] == "take":
                conn.send(recorder.take())
            else:
                conn.send({"ok": True})
                return


def _prepare(cluster: Cluster, name: str, replicas: int, image: str, min_ready_s: int) -> None:
    """Removes the previous rollout's Deployments and pods, then puts a fresh Deployment and
    waits until all its replicas are available."""
    for old in cluster.list("Deployment", NAMESPACE):
        cluster.delete("Deployment", NAMESPACE, old["metadata"]["name"])
    cluster.wait_for(lambda: not cluster.list("Pod", NAMESPACE), timeout=120)
    obj = deployment(name, namespace=NAMESPACE, replicas=replicas, image=image)
    if min_ready_s:
        obj["spec"]["minReadySeconds"] = min_ready_s
    cluster.put(obj)

    def ready() -> bool:
        found = cluster.get("Deployment", NAMESPACE, name)
        return found is not None and rollout_complete(found)

    cluster.wait_for(ready, timeout=300 + min_ready_s)


class ServerProcess:
    """The test API server in a child process, driven over a pipe."""

    def __init__(self, nodes: int, pods_per_node: int, tick_s: float, nagle: bool) -> None:
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(
            target=_serve,
            args=(child, nodes, pods_per_node, tick_s, nagle),
            name="kubeapi",
            daemon=True,
        )
        self._process.start()
        child.close()
        self.url = str(self._ask(None, timeout=120)["url"])

    def _ask(self, command: dict[str, Any] | None, timeout: float) -> dict[str, Any]:
        if command is not None:
            self._conn.send(command)
        if not self._conn.poll(timeout):
            raise TimeoutError(f"the test API server did not answer {command} in {timeout} s")
        answer: dict[str, Any] = self._conn.recv()
        return answer

    def prepare(self, name: str, replicas: int, image: str, min_ready_s: int = 0) -> None:
        command = {
            "do": "prepare",
            "name": name,
            "replicas": replicas,
            "image": image,
            "min_ready_s": min_ready_s,
        }
        self._ask(command, 600 + min_ready_s)

    def take(self) -> dict[str, Any]:
        return self._ask({"do": "take"}, 60)

    def close(self) -> None:
        try:
            self._ask({"do": "stop"}, 30)
        finally:
            self._process.join(30)
            if self._process.is_alive():
                self._process.kill()


# --- Sentinel: the executor ---------------------------------------------------------------------


def _canary_parameters(image: str, weights: list[int]) -> dict[str, Any]:
    return {"container": CONTAINER, "image": image, "strategy": "canary", "weights": weights}


async def _sentinel_rollout(
    executor: KubernetesExecutor, name: str, image: str, weights: list[int], timeout_s: float
) -> tuple[float, str]:
    """Runs one canary through the executor; returns its CPU seconds and its outcome message."""
    target = Target(kubernetes=KubernetesObject(CLUSTER, NAMESPACE, "Deployment", name))
    run = StepRun(
        plan_id=f"bench-{uuid.uuid4().hex[:12]}",
        step_index=0,
        action="rollout",
        parameters=_canary_parameters(image, weights),
        target=target,
        deadline=dt.datetime.now(dt.UTC) + dt.timedelta(seconds=timeout_s),
    )
    started = time.process_time()
    outcome = await executor.run(run)
    cpu = time.process_time() - started
    if not outcome.succeeded:
        raise RuntimeError(f"the executor's canary failed: {outcome.outcome} {outcome.message}")
    return cpu, outcome.message


# --- the baseline: the same canary, polling ------------------------------------------------------


class PollingCanary:
    """The executor's reads and writes for a canary, with the official client, but waiting for
    readiness by GETting the Deployment every `interval_s` seconds instead of watching it."""

    def __init__(self, kubeconfig: pathlib.Path, interval_s: float) -> None:
        from kubernetes import client, config

        configuration = client.Configuration()
        config.load_kube_config(  # type: ignore[no-untyped-call]
            config_file=str(kubeconfig), client_configuration=configuration, persist_config=False
        )
        configuration.retries = 0
        self._apps = client.AppsV1Api(client.ApiClient(configuration))
        self._interval_s = interval_s

    def _call(self, method: Callable[..., Any], *args: Any, **kwargs: Any) -> dict[str, Any]:
        # As the executor calls: raw JSON, without the client's model classes.
        response = method(*args, _preload_content=False, _request_timeout=(5, 30), **kwargs)
        decoded: dict[str, Any] = json.loads(response.data) if response.data else {}
        return decoded

    def _update(
        self,
        read: Callable[..., Any],
        replace: Callable[..., Any],
        name: str,
        change: Callable[[dict[str, Any]], None],
    ) -> dict[str, Any]:
        """Read, change, replace with the resourceVersion read; on 409 read again (the
        controller writes status meanwhile), as the executor does."""
        from kubernetes.client.exceptions import ApiException

        for _ in range(MAX_CONFLICT_RETRIES + 1):
            obj = self._call(read, name, NAMESPACE)
            change(obj)
            try:
                return self._call(replace, name, NAMESPACE, obj, field_manager="sentinel")
            except ApiException as exc:
                if exc.status != 409:
                    raise
        raise RuntimeError(f"{name}: still conflicting after {MAX_CONFLICT_RETRIES} retries")

    def _scale(self, name: str, replicas: int) -> None:
        def change(scale: dict[str, Any]) -> None:
            scale["spec"]["replicas"] = replicas

        apps = self._apps
        self._update(
            apps.read_namespaced_deployment_scale,
            apps.replace_namespaced_deployment_scale,
            name,
            change,
        )

    def _change(self, name: str, change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        apps = self._apps
        return self._update(
            apps.read_namespaced_deployment, apps.replace_namespaced_deployment, name, change
        )

    def _wait(self, name: str) -> None:
        next_poll = time.monotonic()
        while True:
            obj = self._call(self._apps.read_namespaced_deployment, name, NAMESPACE)
            if rollout_complete(obj):
                return
            next_poll += self._interval_s
            time.sleep(max(0.0, next_poll - time.monotonic()))

    def rollout(self, name: str, image: str, weights: list[int]) -> float:
        """Runs one canary; returns its CPU seconds."""
        started = time.process_time()
        plan = f"bench-{uuid.uuid4().hex[:12]}"

        def annotate(obj: dict[str, Any]) -> None:
            annotations = obj["metadata"].setdefault("annotations", {})
            annotations["sentinel.io/plan"] = plan
            annotations["sentinel.io/step"] = "0"

        def new_image(obj: dict[str, Any]) -> None:
            obj["spec"]["template"]["spec"]["containers"][0]["image"] = image

        stable = self._change(name, annotate)
        total = int(stable["spec"]["replicas"])
        canary = f"{name}-canary"
        self._call(
            self._apps.create_namespaced_deployment,
            NAMESPACE,
            _canary_body(stable, canary, image),
            field_manager="sentinel",
        )
        # The executor reads the canary back (to resume a run repeated after a restart).
        self._call(self._apps.read_namespaced_deployment, canary, NAMESPACE)
        for weight in weights:
            share = total if weight >= 100 else min(total, -(-total * weight // 100))
            self._scale(canary, share)
            self._wait(canary)
            self._scale(name, total - share)
            self._wait(name)
        self._change(name, new_image)
        self._scale(name, total)
        self._wait(name)
        self._call(self._apps.read_namespaced_deployment, canary, NAMESPACE)
        self._call(self._apps.delete_namespaced_deployment, canary, NAMESPACE)
        return time.process_time() - started


def _canary_body(stable: Mapping[str, Any], name: str, image: str) -> dict[str, Any]:
    """The canary Deployment as the executor makes it: the stable spec with the new image, the
    track label on selector and pods, no replicas yet."""
    spec = copy.deepcopy(dict(stable["spec"]))
    spec["selector"]["matchLabels"][TRACK_LABEL] = "canary"
    spec["template"]["metadata"]["labels"][TRACK_LABEL] = "canary"
    spec["template"]["spec"]["containers"][0]["image"] = image
    spec["replicas"] = 0
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": name,
            "namespace": NAMESPACE,
            "labels": {PROGRESSIVE_OF_LABEL: stable["metadata"]["name"], TRACK_LABEL: "canary"},
        },
        "spec": spec,
    }


# --- figures ---------------------------------------------------------------------------------


@dataclasses.dataclass
class Rollout:
    """One measured rollout."""

    mode: str
    repeat: int
    cpu_s: float
    wall_s: float
    requests: dict[str, int]
    waits: list[dict[str, Any]]
    watch_events: int
    tick_ms: list[float]


def _waits(log: dict[str, Any]) -> list[dict[str, Any]]:
    """Every wait of a rollout, timed on the server's clock.

    A wait follows a scale write to a Deployment: its rollout becomes incomplete at once (a new
    generation) and complete again when the controller has done the work (`flip`). Completions
    no scale write preceded (the canary created at zero replicas) are not waited for.

    - `notice_ms`: from the flip to the client's next request other than a watch (a watch
      started after the flip is how the client waits, not a reaction: it replays the change);
    - `waited`: whether a GET after the scale write answered the incomplete state (otherwise
      the wait's first read already saw the work done, as after a scale-down finished within
      one tick: watching or polling made no difference);
    - `delivery_ms` and `reaction_ms` (watches only): flip to the watch event carrying it
      written to the client, and that to the client's next request.
    """
    requests = sorted(log["requests"], key=lambda r: r["at"])
    scale_writes = [
        (r["at"], r["name"])
        for r in requests
        if r["verb"] == "update" and r["resource"] == "deployments/scale" and r["code"] == 200
    ]
    waits: list[dict[str, Any]] = []
    last_complete: dict[str, float] = {}
    for flip in sorted(log["flips"], key=lambda f: f["at"]):
        if not flip["complete"]:
            continue
        name, at = flip["name"], flip["at"]
        since = last_complete.get(name, float("-inf"))
        last_complete[name] = at
        written = [when for when, who in scale_writes if who == name and since < when < at]
        if not written:
            continue
        following = next((r for r in requests if r["at"] > at and r["verb"] != "watch"), None)
        if following is None:
            raise RuntimeError(f"no request followed the completion of {name}")
        waited = any(
            r["verb"] == "get"
            and r["resource"] == "deployments"
            and r["name"] == name
            and r["at"] > written[-1]
            and r["rv"] is not None
            and r["rv"] < flip["rv"]
            for r in requests
        )
        wait: dict[str, Any] = {
            "deployment": name,
            "notice_ms": (following["at"] - at) * 1000,
            "next_request": f"{following['verb']} {following['resource']}",
            "waited": waited,
        }
        sent = next(
            (e for e in log["sends"] if e["name"] == name and e["rv"] >= flip["rv"]),
            None,
        )
        if sent is not None and sent["at"] < following["at"]:
            wait["delivery_ms"] = (sent["at"] - at) * 1000
            wait["reaction_ms"] = (following["at"] - sent["at"]) * 1000
        waits.append(wait)
    return waits


def _requests_by_verb(log: dict[str, Any]) -> dict[str, int]:
    by_verb = collections.Counter(r["verb"] for r in log["requests"])
    counts = {verb: by_verb.get(verb, 0) for verb in VERBS}
    counts["total"] = len(log["requests"])
    return counts


def _percentile(values: list[float], q: float) -> float:
    """Nearest rank."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def _measure(args: argparse.Namespace, directory: pathlib.Path) -> list[Rollout]:
    server = ServerProcess(args.nodes, args.pods_per_node, args.tick, args.server_nagle)
    clusters: KubeClusters | None = None
    try:
        kubeconfig = write_kubeconfig(directory / "kubeconfig", {CLUSTER: server.url})
        clusters = KubeClusters([ClusterSpec(CLUSTER, str(kubeconfig), CLUSTER)])
        executor = KubernetesExecutor(clusters)
        problems = executor.check_parameters("rollout", _canary_parameters("x:1", args.weights))
        if problems:
            raise SystemExit(f"the executor refuses these parameters: {problems}")
        polling = PollingCanary(kubeconfig, args.poll_interval)
        # First use costs (imports, clients, connections, thread pools) are not a rollout's.
        server.prepare("warm-up", 2, "repo/model:1")
        asyncio.run(_sentinel_rollout(executor, "warm-up", "repo/model:2", [50, 100], 60))
        server.prepare("warm-up", 2, "repo/model:1")
        polling.rollout("warm-up", "repo/model:2", [50, 100])
        rollouts: list[Rollout] = []
        number = 0
        for repeat in range(args.repeats):
            # Alternate which goes first, so that neither always meets a fresher server.
            order = MODES if repeat % 2 == 0 else MODES[::-1]
            for mode in order:
                number += 1
                name = f"model-{number:03d}"
                server.prepare(name, args.replicas, "repo/model:1", args.min_ready_seconds)
                started = time.monotonic()
                if mode == "sentinel":
                    cpu, _ = asyncio.run(
                        _sentinel_rollout(
                            executor, name, "repo/model:2", args.weights, args.timeout
                        )
                    )
                else:
                    cpu = polling.rollout(name, "repo/model:2", args.weights)
                wall = time.monotonic() - started
                log = server.take()
                waits = _waits(log)
                rollout = Rollout(
                    mode,
                    repeat,
                    cpu,
                    wall,
                    _requests_by_verb(log),
                    waits,
                    len(log["sends"]),
                    [t * 1000 for t in log["ticks"]],
                )
                rollouts.append(rollout)
                notices = [w["notice_ms"] for w in waits]
                print(
                    f"  {mode:<9} repeat {repeat + 1}: {wall:6.1f} s, CPU {cpu * 1000:6.0f} ms, "
                    f"{rollout.requests['total']:4d} requests, {len(waits)} waits, notice p50 "
                    f"{statistics.median(notices):6.1f} ms, max {max(notices):6.1f} ms",
                    flush=True,
                )
        return rollouts
    finally:
        if clusters is not None:
            clusters.close()
        server.close()


def _summary(rollouts: list[Rollout]) -> dict[str, dict[str, float]]:
    """Medians over the rollouts of each mode; latencies pooled over all their waits."""
    figures: dict[str, dict[str, float]] = {}
    for mode in MODES:
        mine = [r for r in rollouts if r.mode == mode]
        waits = [w for r in mine for w in r.waits]
        row = {
            f"requests_{verb}": statistics.median(r.requests[verb] for r in mine)
            for verb in (*VERBS, "total")
        }
        row["cpu_ms"] = statistics.median(r.cpu_s for r in mine) * 1000
        row["wall_s"] = statistics.median(r.wall_s for r in mine)
        row["watch_events"] = statistics.median(r.watch_events for r in mine)
        row["waits"] = statistics.median(len(r.waits) for r in mine)
        row["waited"] = statistics.median(sum(w["waited"] for w in r.waits) for r in mine)
        row["waits_total"] = len(waits)
        for label, chosen in (("", waits), ("waited_", [w for w in waits if w["waited"]])):
            notices = [w["notice_ms"] for w in chosen]
            row[f"{label}count"] = len(chosen)
            row[f"{label}notice_p50_ms"] = _percentile(notices, 0.5)
            row[f"{label}notice_p99_ms"] = _percentile(notices, 0.99)
        for part in ("delivery", "reaction"):
            values = [w[f"{part}_ms"] for w in waits if f"{part}_ms" in w]
            row[f"{part}_p50_ms"] = _percentile(values, 0.5)
            row[f"{part}_p99_ms"] = _percentile(values, 0.99)
        ticks = [t for r in mine for t in r.tick_ms]
        row["tick_p50_ms"] = _percentile(ticks, 0.5)
        row["tick_p99_ms"] = _percentile(ticks, 0.99)
        figures[mode] = row
    return figures


def _print_summary(args: argparse.Namespace, figures: dict[str, dict[str, float]]) -> None:
    sentinel, polling = figures["sentinel"], figures["polling"]
    weights = "/".join(str(w) for w in args.weights)
    print(
        f"\nrollout benchmark: canary of {args.replicas} replicas, weights {weights}, "
        f"minReadySeconds {args.min_ready_seconds}, controller tick every {args.tick:g} s, "
        f"baseline polls every {args.poll_interval:g} s, "
        f"{args.repeats} rollout(s) each (medians), test server with "
        f"{'Nagle on' if args.server_nagle else 'TCP_NODELAY'}"
    )
    head = f"{'':<34}{'sentinel (watch)':>17}{'polling':>10}{'sentinel / polling':>20}"
    print(head)
    print("-" * len(head))

    def line(label: str, key: str, fmt: str, ratio: bool = True) -> None:
        a, b = sentinel[key], polling[key]
        quotient = f"{a / b:.3g}" if ratio and b and not math.isnan(a / b) else ""
        shown = ["-" if math.isnan(v) else format(v, fmt) for v in (a, b)]
        print(f"{label:<34}{shown[0]:>17}{shown[1]:>10}{quotient:>20}")

    line("API requests / rollout", "requests_total", ".0f")
    for verb in VERBS:
        if sentinel[f"requests_{verb}"] or polling[f"requests_{verb}"]:
            line(f"  {verb}", f"requests_{verb}", ".0f")
    line("watch events / rollout", "watch_events", ".0f", ratio=False)
    line("client CPU ms / rollout", "cpu_ms", ".0f")
    line("wall s / rollout", "wall_s", ".1f")
    line("waits / rollout", "waits", ".0f", ratio=False)
    line("  of which had to wait", "waited", ".0f", ratio=False)
    line("notice p50 ms, all waits", "notice_p50_ms", ".1f")
    line("notice p99 ms, all waits", "notice_p99_ms", ".1f")
    line("notice p50 ms, had to wait", "waited_notice_p50_ms", ".1f")
    line("notice p99 ms, had to wait", "waited_notice_p99_ms", ".1f")
    line("  watch event sent, p50 ms", "delivery_p50_ms", ".1f", ratio=False)
    line("  then next request, p50 ms", "reaction_p50_ms", ".1f", ratio=False)
    line("  then next request, p99 ms", "reaction_p99_ms", ".1f", ratio=False)
    line("test controller tick p50 ms", "tick_p50_ms", ".0f", ratio=False)
    line("test controller tick p99 ms", "tick_p99_ms", ".0f", ratio=False)
    print(
        "notice: from the Deployment's rollout becoming complete in the server's store to the\n"
        "  client's next request other than a watch, both on the server's clock; p50 and p99\n"
        f"  nearest-rank over the {int(sentinel['waits_total'])} and "
        f"{int(polling['waits_total'])} waits of all rollouts. 'Had to wait': the wait's\n"
        "  first GET answered the incomplete state (a scale-down often completes before it is\n"
        "  answered). A tick holds the store lock: a watch event leaves after the tick ends.\n"
        "client CPU: this process only (time.process_time(), all threads) around each rollout;\n"
        "  the test API server and its controller run in a child process."
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench.rollout",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--replicas", type=int, default=100, help="replicas of the Deployment")
    parser.add_argument(
        "--weights",
        type=lambda text: [int(w) for w in text.split(",")],
        default=[20, 40, 60, 80, 100],
        help="canary weights, comma-separated (default 20,40,60,80,100)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="rollouts per mode (medians)")
    parser.add_argument("--poll-interval", type=float, default=1.0, help="baseline's GET period")
    parser.add_argument("--tick", type=float, default=0.05, help="test controller's tick, s")
    parser.add_argument(
        "--min-ready-seconds",
        type=int,
        default=0,
        help="the Deployment's minReadySeconds: a stage then takes at least that long",
    )
    parser.add_argument("--nodes", type=int, default=10, help="nodes of the test cluster")
    parser.add_argument("--pods-per-node", type=int, default=110, help="allocatable pods")
    parser.add_argument(
        "--server-nagle",
        action="store_true",
        help="leave Nagle's algorithm on in the test server, as tests/kubeapi has it",
    )
    parser.add_argument("--timeout", type=float, default=600, help="time for one rollout, s")
    parser.add_argument("--json", type=pathlib.Path, help="also write every figure as JSON")
    args = parser.parse_args(argv)
    if args.nodes * args.pods_per_node < 2 * args.replicas:
        parser.error("the nodes must hold twice the replicas (the canary grows first)")

    print(
        f"rollout benchmark: {args.repeats} canary rollout(s) of {args.replicas} replicas per "
        "mode, sentinel and polling alternating",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="sentinel-bench-rollout-") as tmp:
        rollouts = _measure(args, pathlib.Path(tmp))
    figures = _summary(rollouts)
    _print_summary(args, figures)
    if args.json is not None:
        document = {
            "arguments": {
                k: (str(v) if isinstance(v, pathlib.Path) else v) for k, v in vars(args).items()
            },
            "summary": figures,
            "rollouts": [dataclasses.asdict(r) for r in rollouts],
        }
        args.json.write_text(json.dumps(document, indent=2) + "\n")
        print(f"figures written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
