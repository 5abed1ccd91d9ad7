"""The object store: stored objects keyed by kind, namespace and name, the one global
resourceVersion counter, and the bounded history of changes that watches replay."""

from __future__ import annotations

import collections
import copy
import dataclasses
import datetime as dt
import threading
import time
from collections.abc import Callable
from typing import Any

Obj = dict[str, Any]
Objects = list[Obj]
Key = tuple[str, str, str]


@dataclasses.dataclass(frozen=True)
class Change:
    """One stored change, as a watch reports it."""

    resource_version: int
    type: str  # ADDED, MODIFIED, DELETED
    kind: str
    namespace: str
    previous: Obj | None  # the object before a MODIFIED change
    object: Obj


Changes = list[Change]


def key_of(obj: Obj) -> Key:
    metadata = obj.get("metadata") or {}
    return (obj["kind"], metadata.get("namespace") or "", metadata["name"])


class Store:
    """Objects and their change history behind one lock; every write takes a new
    resourceVersion. Callers hold `lock` across a read-modify-write."""

    def __init__(self, history: int, clock: Callable[[], float] = time.time) -> None:
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)
        self.clock = clock
        self._objects: dict[Key, Obj] = {}
        self._resource_version = 0
        self._history: collections.deque[Change] = collections.deque(maxlen=history)
        # The oldest resourceVersion a watch may resume from.
        self._horizon = 0

    @property
    def resource_version(self) -> int:
        return self._resource_version

    def now(self) -> str:
        """The clock as the API writes timestamps (RFC 3339, seconds)."""
        moment = dt.datetime.fromtimestamp(self.clock(), dt.UTC)
        return moment.strftime("%Y-%m-%dT%H:%M:%SZ")

    def get(self, kind: str, namespace: str, name: str) -> Obj | None:
        stored = self._objects.get((kind, namespace or "", name))
        return copy.deepcopy(stored) if stored is not None else None

    def list(self, kind: str, namespace: str | None = None) -> Objects:
        return [
            copy.deepcopy(obj)
            for (k, ns, _), obj in sorted(self._objects.items())
            if k == kind and (namespace is None or ns == namespace)
        ]

    def create(self, obj: Obj) -> Obj:
        key = key_of(obj)
        assert key not in self._objects, key
        return self._record("ADDED", key, None, obj)

    def update(self, obj: Obj) -> Obj:
        key = key_of(obj)
        previous = self._objects[key]
        return self._record("MODIFIED", key, previous, obj)

    def delete(self, kind: str, namespace: str, name: str, final: Obj | None = None) -> Obj:
        """Removes an object; `final` is its last state when that differs from the stored one
        (the update that removed the last finalizer)."""
        key = (kind, namespace or "", name)
        obj = self._objects.pop(key)
        return self._record("DELETED", key, None, final if final is not None else obj, store=False)

    def _record(
        self, kind: str, key: Key, previous: Obj | None, obj: Obj, *, store: bool = True
    ) -> Obj:
        self._resource_version += 1
        obj = copy.deepcopy(obj)
        obj["metadata"]["resourceVersion"] = str(self._resource_version)
        if store:
            self._objects[key] = obj
        if len(self._history) == self._history.maxlen:
            self._horizon = self._history[0].resource_version
        self._history.append(Change(self._resource_version, kind, key[0], key[1], previous, obj))
        self.changed.notify_all()
        return copy.deepcopy(obj)

    def changes_after(self, resource_version: int) -> Changes | None:
        """Changes newer than `resource_version`; None when history no longer reaches back."""
        if resource_version < self._horizon:
            return None
        if not self._history or self._history[-1].resource_version <= resource_version:
            return []
        first = self._history[0].resource_version
        start = max(0, resource_version + 1 - first)
        return list(self._history)[start:]

    def compact(self) -> None:
        """Forgets the change history, as etcd compaction does: older versions answer 410."""
        self._history.clear()
        self._horizon = self._resource_version
