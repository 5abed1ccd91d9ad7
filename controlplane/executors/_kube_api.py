"""The Kubernetes clusters the control plane may act on, and bounded calls to their API servers
through the official `kubernetes` client.

The client is synchronous (urllib3), so every call runs on a thread pool of its own (never the
event loop, never the store's threads) with a connect and read timeout no longer than what is
left of the step's time, and without urllib3's silent retries: an unreachable API server fails
the call at once with the transport's reason, and a refusal carries the API server's own Status
message. Objects travel as plain JSON dicts, exactly as the API server sends them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import functools
import json
import logging
import pathlib
import re
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

log = logging.getLogger(__name__)

IN_CLUSTER = "in-cluster"
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")

RequestObserver = Callable[[str, str, float, bool], None]
"""(cluster, verb, seconds, reached): called after every API request."""


class ClusterConfigError(ValueError):
    """The `kubernetes_clusters` setting cannot be understood."""


@dataclasses.dataclass(frozen=True, slots=True)
class ClusterSpec:
    """One configured cluster: a name plans refer to, and how to reach its API server."""

    name: str
    kubeconfig: str = ""
    """Path of a kubeconfig file; empty with `in_cluster`."""
    context: str = ""
    """Context in the kubeconfig; empty for its current context."""
    in_cluster: bool = False
    """Use the pod's service account (the chart's deployment) instead of a kubeconfig."""


def parse_clusters(text: str) -> list[ClusterSpec]:
    """Clusters from the setting's text: comma-separated `NAME=KUBECONFIG[#CONTEXT]` or
    `NAME=in-cluster`, e.g. `prod=/etc/sentinel/prod.kubeconfig#admin,local=in-cluster`."""
    specs: list[ClusterSpec] = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, where = item.partition("=")
        name, where = name.strip(), where.strip()
        if not sep or not where:
            raise ClusterConfigError(
                f"kubernetes_clusters: {item!r} is not NAME=KUBECONFIG[#CONTEXT] or NAME=in-cluster"
            )
        if not _NAME.match(name):
            raise ClusterConfigError(
                f"kubernetes_clusters: cluster name {name!r} must be a DNS label "
                "(lower-case letters, digits and '-')"
            )
        if any(spec.name == name for spec in specs):
            raise ClusterConfigError(f"kubernetes_clusters: cluster {name!r} is named twice")
        if where == IN_CLUSTER:
            specs.append(ClusterSpec(name, in_cluster=True))
        else:
            path, _, context = where.partition("#")
            specs.append(ClusterSpec(name, path, context))
    return specs


class KubeError(Exception):
    """A call to a cluster's API server failed; the message says why, in the server's words
    where it answered. `status` is the HTTP status (0 when the server was not reached)."""

    def __init__(self, cluster: str, status: int, reason: str, message: str) -> None:
        super().__init__(f"cluster {cluster}: {message}")
        self.cluster = cluster
        self.status = status
        self.reason = reason


class Cluster:
    """One cluster's API client and the bounded calls made through it."""

    def __init__(
        self,
        spec: ClusterSpec,
        pool: concurrent.futures.ThreadPoolExecutor,
        observe: RequestObserver | None,
    ) -> None:
        self.spec = spec
        self.name = spec.name
        self._pool = pool
        self._observe = observe
        self._lock = threading.Lock()
        self._client: Any = None
        self.reachable: bool | None = None

    def _api_client(self) -> Any:
        """The client, made on first use (reading the kubeconfig is blocking work)."""
        with self._lock:
            if self._client is None:
                from kubernetes import client, config  # heavy: imported only when used

                configuration = client.Configuration()
                if self.spec.in_cluster:
                    config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
                else:
                    config.load_kube_config(  # type: ignore[no-untyped-call]
                        config_file=self.spec.kubeconfig,
                        context=self.spec.context or None,
                        client_configuration=configuration,
                        persist_config=False,
                    )
                # No silent retries: a dead API server must fail the call within its timeout.
                configuration.retries = 0
                self._client = client.ApiClient(configuration)
            return self._client

    def apis(self) -> tuple[Any, Any, Any]:
        """(AppsV1Api, CoreV1Api, PolicyV1Api) on this cluster."""
        from kubernetes import client

        api_client = self._api_client()
        return (
            client.AppsV1Api(api_client),
            client.CoreV1Api(api_client),
            client.PolicyV1Api(api_client),
        )

    async def call(
        self, verb: str, method: Callable[..., Any], *args: Any, deadline: float, **kwargs: Any
    ) -> Any:
        """Calls one API method by name on a worker thread; returns the decoded JSON body.
        `deadline` is a `time.monotonic()` instant the call may not outlive."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"cluster {self.name}: no time left for {verb}")
        timeout = (min(5.0, remaining), remaining)
        work = functools.partial(self._blocking_call, verb, method, args, kwargs, timeout=timeout)
        loop = asyncio.get_running_loop()
        return await asyncio.wait_for(loop.run_in_executor(self._pool, work), remaining + 1.0)

    def _blocking_call(
        self,
        verb: str,
        method: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        *,
        timeout: tuple[float, float],
    ) -> Any:
        from kubernetes.client.exceptions import ApiException

        started = time.monotonic()
        reached = False
        try:
            response = method(*args, _request_timeout=timeout, _preload_content=False, **kwargs)
            reached = True
            raw = response.data
            return json.loads(raw) if raw else {}
        except ApiException as exc:
            reached = exc.status not in (0, None)
            raise self._api_error(exc) from exc
        except Exception as exc:  # urllib3's connection and timeout errors, TLS errors
            raise KubeError(self.name, 0, "Unreachable", _transport_reason(exc)) from exc
        finally:
            self.reachable = reached
            if self._observe is not None:
                self._observe(self.name, verb, time.monotonic() - started, reached)

    def _api_error(self, exc: Any) -> KubeError:
        status = int(exc.status or 0)
        reason = str(exc.reason or "")
        message = reason
        try:
            body = json.loads(exc.body) if exc.body else {}
            message = body.get("message") or message
            reason = body.get("reason") or reason
        except (ValueError, TypeError, AttributeError):
            pass
        return KubeError(self.name, status, reason, f"{status} {reason}: {message}")

    async def run_blocking(self, work: Callable[[], None], timeout_s: float) -> None:
        """Runs blocking work (a watch) on the clusters' pool, waiting at most `timeout_s`."""
        loop = asyncio.get_running_loop()
        await asyncio.wait_for(loop.run_in_executor(self._pool, work), timeout_s)

    def watch(
        self, method: Callable[..., Any], *args: Any, timeout_s: float, **kwargs: Any
    ) -> Iterator[dict[str, Any]]:
        """Blocking: the raw watch events of one list method, for at most `timeout_s`
        (run it on the pool, see `KubeClusters.watch_until`)."""
        from kubernetes import watch

        stream = watch.Watch()  # type: ignore[no-untyped-call]
        try:
            for event in stream.stream(  # type: ignore[no-untyped-call]
                method,
                *args,
                timeout_seconds=max(1, int(timeout_s)),
                # Plain JSON: building the client's model objects cost a tenth of a rollout's
                # CPU, and only the raw object is read.
                deserialize=False,
                _request_timeout=(min(5.0, timeout_s), timeout_s + 5.0),
                **kwargs,
            ):
                raw = event.get("raw_object", event.get("object"))
                yield {"type": event["type"], "object": raw}
        finally:
            stream.stop()  # type: ignore[no-untyped-call]


def _transport_reason(exc: Exception) -> str:
    """A short account of why the API server was not reached (urllib3 nests the cause)."""
    reason = getattr(exc, "reason", None)
    text = str(reason or exc)
    return f"API server unreachable: {text[:300]}"


class KubeClusters:
    """The configured clusters by name, sharing one bounded thread pool for API calls."""

    def __init__(
        self,
        specs: list[ClusterSpec],
        *,
        observe: RequestObserver | None = None,
        max_threads: int = 16,
    ) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=max_threads, thread_name_prefix="kubernetes"
        )
        self._clusters = {spec.name: Cluster(spec, self._pool, observe) for spec in specs}

    @property
    def names(self) -> list[str]:
        return sorted(self._clusters)

    def get(self, name: str) -> Cluster | None:
        return self._clusters.get(name)

    def __bool__(self) -> bool:
        return bool(self._clusters)

    def prepare(self) -> None:
        """Refuses to start with a kubeconfig that is not there, and makes every cluster's
        client (blocking: reads files; call it off the event loop, before serving)."""
        for cluster in self._clusters.values():
            spec = cluster.spec
            if not spec.in_cluster and not pathlib.Path(spec.kubeconfig).is_file():
                raise ClusterConfigError(
                    f"kubernetes_clusters: cluster {spec.name}: no kubeconfig file at "
                    f"{spec.kubeconfig!r}"
                )
            try:
                cluster.apis()
            except Exception as exc:  # the client's ConfigException, YAML and file errors
                raise ClusterConfigError(
                    f"kubernetes_clusters: cluster {spec.name}: cannot load its configuration: "
                    f"{exc}"
                ) from exc

    async def probe(self, timeout_s: float = 5.0) -> dict[str, bool]:
        """Asks every API server for its version; records and returns who answered."""

        async def one(cluster: Cluster) -> bool:
            try:
                _, core, _ = await asyncio.get_running_loop().run_in_executor(
                    self._pool, cluster.apis
                )
                from kubernetes import client

                version = client.VersionApi(core.api_client)
                await cluster.call(
                    "version", version.get_code, deadline=time.monotonic() + timeout_s
                )
            except (KubeError, TimeoutError, OSError, ValueError) as exc:
                log.warning("kubernetes cluster %s: %s", cluster.name, exc)
                return False
            except Exception as exc:  # a kubeconfig the client cannot load
                log.warning("kubernetes cluster %s: %s", cluster.name, exc)
                cluster.reachable = False
                return False
            return True

        results = await asyncio.gather(*(one(c) for c in self._clusters.values()))
        return dict(zip(self._clusters, results, strict=True))

    async def run_prober(self, interval_s: float) -> None:
        """Probes every cluster every `interval_s`, for the control plane's life."""
        while True:
            await self.probe()
            await asyncio.sleep(interval_s)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
