"""The three patch formats of the API server: JSON merge patch (RFC 7386), strategic merge patch
(lists merged by their patch merge key, `$patch` directives) and JSON patch (RFC 6902)."""

from __future__ import annotations

import copy
from typing import Any

Obj = dict[str, Any]


class PatchError(ValueError):
    """A patch that cannot be applied; `code` is the HTTP status the server answers."""

    def __init__(self, message: str, code: int = 422) -> None:
        super().__init__(message)
        self.code = code


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386: objects merge recursively, `null` removes, anything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


# Patch merge keys of the list fields of the types served here (patchMergeKey in the API's Go
# types); lists not named here are replaced as a whole, as the server does for them.
_MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "ephemeralContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "volumeDevices": "devicePath",
    "imagePullSecrets": "name",
    "conditions": "type",
    "ownerReferences": "uid",
    "hostAliases": "ip",
    "topologySpreadConstraints": "topologyKey",
    "resourceClaims": "name",
    "addresses": "type",
    "ports": "port",
}
# Lists of scalars merged as sets (patchStrategy "merge" without a key).
_SCALAR_SETS = {"finalizers"}
_CONTAINER_LISTS = {"containers", "initContainers", "ephemeralContainers"}


def strategic_merge_patch(target: Any, patch: Any) -> Any:
    return _strategic(target, patch, ())


def _strategic(target: Any, patch: Any, path: tuple[str, ...]) -> Any:
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    patch = dict(patch)
    directive = patch.pop("$patch", None)
    if directive == "replace":
        return _strip_directives(patch)
    if directive == "delete":
        return None
    if directive is not None:
        raise PatchError(f"Unknown patch type: {directive}")
    result = dict(target) if isinstance(target, dict) else {}
    retain = patch.pop("$retainKeys", None)
    for key in [k for k in patch if k.startswith("$setElementOrder/")]:
        del patch[key]
    for key in [k for k in patch if k.startswith("$deleteFromPrimitiveList/")]:
        field = key.split("/", 1)[1]
        doomed = patch.pop(key) or []
        if isinstance(result.get(field), list):
            result[field] = [v for v in result[field] if v not in doomed]
    if retain is not None:
        result = {k: v for k, v in result.items() if k in retain or k in patch}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        elif isinstance(value, list):
            result[key] = _strategic_list(result.get(key), value, (*path, key))
        else:
            merged = _strategic(result.get(key), value, (*path, key))
            if merged is None:
                result.pop(key, None)
            else:
                result[key] = merged
    return result


def _merge_key(path: tuple[str, ...]) -> str | None:
    field = path[-1]
    if field == "ports" and any(part in _CONTAINER_LISTS for part in path):
        return "containerPort"
    return _MERGE_KEYS.get(field)


def _strategic_list(target: Any, patch: list[Any], path: tuple[str, ...]) -> list[Any]:
    current = list(target) if isinstance(target, list) else []
    if path[-1] in _SCALAR_SETS:
        return current + [v for v in patch if v not in current]
    key = _merge_key(path)
    if key is None or not all(isinstance(item, dict) for item in patch):
        return [_strip_directives(item) for item in patch]
    if any(item.get("$patch") == "replace" for item in patch):
        return [_strip_directives(item) for item in patch if item.get("$patch") != "replace"]
    for item in patch:
        if key not in item:
            raise PatchError(f"map: {item} does not contain declared merge key: {key}")
        index = next(
            (
                i
                for i, existing in enumerate(current)
                if isinstance(existing, dict) and existing.get(key) == item[key]
            ),
            None,
        )
        if item.get("$patch") == "delete":
            if index is not None:
                del current[index]
            continue
        if index is None:
            current.append(_strip_directives(item))
        else:
            current[index] = _strategic(current[index], item, path)
    return current


def _strip_directives(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip_directives(v) for k, v in value.items() if not k.startswith("$")}
    if isinstance(value, list):
        return [_strip_directives(v) for v in value]
    return value


def json_patch(target: Any, operations: Any) -> Any:
    """RFC 6902 operations applied in order to a copy of `target`."""
    if not isinstance(operations, list):
        raise PatchError("json: cannot unmarshal object into Go value of type jsonpatch.Patch", 400)
    document = copy.deepcopy(target)
    for operation in operations:
        if not isinstance(operation, dict) or "op" not in operation or "path" not in operation:
            raise PatchError(f"invalid JSON patch operation: {operation}", 400)
        op, path = operation["op"], operation["path"]
        if op in ("add", "replace", "test") and "value" not in operation:
            raise PatchError(f"missing value for {op} operation at {path}", 400)
        if op == "add":
            document = _add(document, path, copy.deepcopy(operation["value"]))
        elif op == "remove":
            document = _remove(document, path)[0]
        elif op == "replace":
            _get(document, path)
            document = _add(_remove(document, path)[0], path, copy.deepcopy(operation["value"]))
        elif op in ("move", "copy"):
            value = _get(document, operation.get("from", ""))
            if op == "move":
                document = _remove(document, operation["from"])[0]
            document = _add(document, path, copy.deepcopy(value))
        elif op == "test":
            if _get(document, path) != operation["value"]:
                raise PatchError(f"testing value {path} failed: test failed")
        else:
            raise PatchError(f"Unexpected kind: {op}", 400)
    return document


def _tokens(pointer: str) -> list[str]:
    if pointer == "":
        return []
    if not pointer.startswith("/"):
        raise PatchError(f"JSON pointer {pointer!r} must start with '/'", 400)
    return [t.replace("~1", "/").replace("~0", "~") for t in pointer[1:].split("/")]


def _parent(document: Any, pointer: str) -> tuple[Any, str]:
    tokens = _tokens(pointer)
    if not tokens:
        raise PatchError("cannot operate on the document root")
    current = document
    for token in tokens[:-1]:
        current = _child(current, token, pointer)
    return current, tokens[-1]


def _child(current: Any, token: str, pointer: str) -> Any:
    if isinstance(current, dict) and token in current:
        return current[token]
    if isinstance(current, list) and token.isdigit() and int(token) < len(current):
        return current[int(token)]
    raise PatchError(f"doc is missing path: {pointer!r}: missing value")


def _get(document: Any, pointer: str) -> Any:
    current = document
    for token in _tokens(pointer):
        current = _child(current, token, pointer)
    return current


def _add(document: Any, pointer: str, value: Any) -> Any:
    if pointer == "":
        return value
    parent, token = _parent(document, pointer)
    if isinstance(parent, dict):
        parent[token] = value
    elif isinstance(parent, list):
        if token == "-":
            parent.append(value)
        elif token.isdigit() and int(token) <= len(parent):
            parent.insert(int(token), value)
        else:
            raise PatchError(f"add operation: index {token} out of bounds at {pointer!r}")
    else:
        raise PatchError(f"doc is missing path: {pointer!r}: missing value")
    return document


def _remove(document: Any, pointer: str) -> tuple[Any, Any]:
    parent, token = _parent(document, pointer)
    removed = _child(parent, token, pointer)
    if isinstance(parent, dict):
        del parent[token]
    else:
        del parent[int(token)]
    return document, removed
