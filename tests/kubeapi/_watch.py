"""Watch streams: the changes after a resourceVersion (or the current objects first), filtered
by namespace and selectors, with bookmarks, ended by timeout, client or server, and 410 Gone when
the history no longer reaches back."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from tests.kubeapi import _errors as errors
from tests.kubeapi._cluster import Cluster
from tests.kubeapi._resources import Target
from tests.kubeapi._selectors import FieldSelector, LabelSelector
from tests.kubeapi._store import Change

Obj = dict[str, Any]

DEFAULT_TIMEOUT = 1800.0


class Watch:
    """A watch stream: replays changes after a resourceVersion (or the current state first),
    then follows new changes until the timeout, the client leaves or the server stops."""

    def __init__(
        self,
        cluster: Cluster,
        target: Target,
        labels: LabelSelector,
        fields: FieldSelector,
        start: int | None,
        timeout: float,
        bookmarks: bool,
        initial_events_end: bool,
    ) -> None:
        self._cluster = cluster
        self._target = target
        self._labels = labels
        self._fields = fields
        self._start = start
        self._timeout = timeout
        self._bookmarks = bookmarks
        self._initial_events_end = initial_events_end

    def _matches(self, obj: Obj | None) -> bool:
        if obj is None:
            return False
        namespace = self._target.namespace
        if namespace is not None and obj["metadata"].get("namespace") != namespace:
            return False
        return self._labels.matches(obj["metadata"].get("labels")) and self._fields.matches(obj)

    def _event(self, change: Change) -> Obj | None:
        if change.kind != self._target.rt.kind:
            return None
        now, before = self._matches(change.object), self._matches(change.previous)
        kind = change.type
        if kind == "MODIFIED":
            if now and not before:
                kind = "ADDED"
            elif before and not now:
                kind = "DELETED"
            elif not now:
                return None
        elif not now:
            return None
        return {"type": kind, "object": change.object}

    def _bookmark(self, resource_version: int, *, initial_end: bool = False) -> Obj:
        metadata: Obj = {"resourceVersion": str(resource_version)}
        if initial_end:
            metadata["annotations"] = {"k8s.io/initial-events-end": "true"}
        return {
            "type": "BOOKMARK",
            "object": {
                "kind": self._target.rt.kind,
                "apiVersion": self._target.rt.api_version,
                "metadata": metadata,
            },
        }

    def run(
        self,
        send: Callable[[Obj], None],
        client_gone: Callable[[], bool],
        stopping: Callable[[], bool],
    ) -> None:
        store = self._cluster.store
        with store.lock:
            if self._start is None:
                initial = [
                    obj
                    for obj in store.list(self._target.rt.kind, self._target.namespace)
                    if self._matches(obj)
                ]
                position = store.resource_version
            else:
                initial = []
                position = self._start
                if store.changes_after(position) is None:
                    send(self._expired(position))
                    return
        for obj in initial:
            send({"type": "ADDED", "object": obj})
        if self._initial_events_end and self._bookmarks:
            send(self._bookmark(position, initial_end=True))
        deadline = time.monotonic() + self._timeout
        last_bookmark = time.monotonic()
        while True:
            remaining = deadline - time.monotonic()
            with store.lock:
                changes = store.changes_after(position)
                if changes == [] and remaining > 0 and not stopping():
                    store.changed.wait(timeout=min(0.25, remaining))
                    changes = store.changes_after(position)
                bookmark_every = self._cluster.bookmark_seconds
            if changes is None:
                send(self._expired(position))
                return
            for change in changes:
                position = change.resource_version
                event = self._event(change)
                if event is not None:
                    send(event)
            if stopping() or client_gone() or time.monotonic() >= deadline:
                return
            if self._bookmarks and time.monotonic() - last_bookmark >= bookmark_every:
                send(self._bookmark(position))
                last_bookmark = time.monotonic()

    def _expired(self, position: int) -> Obj:
        current = self._cluster.resource_version
        error = errors.gone(f"too old resource version: {position} ({current})")
        return {"type": "ERROR", "object": error.status()}
