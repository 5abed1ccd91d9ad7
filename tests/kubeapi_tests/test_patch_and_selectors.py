"""The patch formats and selectors on their own, without a server."""

from __future__ import annotations

from typing import Any

import pytest

from tests.kubeapi._patch import PatchError, json_patch, merge_patch, strategic_merge_patch
from tests.kubeapi._selectors import FieldSelector, LabelSelector

POD_SPEC: dict[str, Any] = {
    "containers": [
        {
            "name": "main",
            "image": "a:1",
            "env": [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}],
            "ports": [{"containerPort": 80, "protocol": "TCP"}],
        },
        {"name": "sidecar", "image": "s:1"},
    ],
    "tolerations": [{"key": "gpu", "operator": "Exists"}],
    "nodeSelector": {"pool": "gpu", "zone": "a"},
}


def test_merge_patch_follows_rfc_7386() -> None:
    target = {"a": "b", "c": {"d": "e", "f": "g"}, "list": [1, 2]}
    patch = {"a": "z", "c": {"f": None}, "list": [3], "new": {"x": 1}}
    assert merge_patch(target, patch) == {"a": "z", "c": {"d": "e"}, "list": [3], "new": {"x": 1}}
    assert target["c"] == {"d": "e", "f": "g"}, "the target is not modified"


def test_strategic_merge_patch_merges_keyed_lists_and_replaces_others() -> None:
    patched = strategic_merge_patch(
        POD_SPEC,
        {
            "containers": [
                {"name": "main", "image": "a:2", "env": [{"name": "B", "value": "3"}]},
                {"name": "new", "image": "n:1"},
            ],
            "tolerations": [{"key": "other", "operator": "Exists"}],
            "nodeSelector": {"zone": None},
        },
    )
    main, sidecar, new = patched["containers"]
    assert (main["image"], sidecar["image"], new["image"]) == ("a:2", "s:1", "n:1")
    assert main["env"] == [{"name": "A", "value": "1"}, {"name": "B", "value": "3"}]
    assert main["ports"] == POD_SPEC["containers"][0]["ports"]
    assert patched["tolerations"] == [{"key": "other", "operator": "Exists"}]
    assert patched["nodeSelector"] == {"pool": "gpu"}


def test_strategic_merge_patch_directives() -> None:
    deleted = strategic_merge_patch(
        POD_SPEC, {"containers": [{"name": "sidecar", "$patch": "delete"}]}
    )
    assert [c["name"] for c in deleted["containers"]] == ["main"]
    replaced = strategic_merge_patch(
        POD_SPEC, {"nodeSelector": {"$patch": "replace", "pool": "cpu"}}
    )
    assert replaced["nodeSelector"] == {"pool": "cpu"}
    ordered = strategic_merge_patch(
        POD_SPEC,
        {"$setElementOrder/containers": [{"name": "main"}], "containers": [{"name": "main"}]},
    )
    assert "$setElementOrder/containers" not in ordered
    with pytest.raises(PatchError):
        strategic_merge_patch(POD_SPEC, {"containers": [{"image": "no-name"}]})
    finalizers = strategic_merge_patch({"finalizers": ["a"]}, {"finalizers": ["b", "a"]})
    assert finalizers == {"finalizers": ["a", "b"]}


def test_service_ports_merge_on_port_and_container_ports_on_container_port() -> None:
    service = {"ports": [{"port": 80, "name": "http"}, {"port": 443, "name": "https"}]}
    assert strategic_merge_patch(service, {"ports": [{"port": 443, "targetPort": 8443}]})["ports"][
        1
    ] == {"port": 443, "name": "https", "targetPort": 8443}


def test_json_patch_operations() -> None:
    document = {"spec": {"containers": [{"name": "main", "image": "a:1"}]}}
    patched = json_patch(
        document,
        [
            {"op": "test", "path": "/spec/containers/0/name", "value": "main"},
            {"op": "replace", "path": "/spec/containers/0/image", "value": "a:2"},
            {"op": "add", "path": "/spec/containers/-", "value": {"name": "b", "image": "b:1"}},
            {"op": "copy", "from": "/spec/containers/1/image", "path": "/spec/image"},
            {"op": "move", "from": "/spec/image", "path": "/spec/moved"},
            {"op": "remove", "path": "/spec/containers/1"},
            {"op": "add", "path": "/metadata", "value": {"labels": {"a~b/c": "x"}}},
            {"op": "replace", "path": "/metadata/labels/a~0b~1c", "value": "y"},
        ],
    )
    assert patched == {
        "spec": {"containers": [{"name": "main", "image": "a:2"}], "moved": "b:1"},
        "metadata": {"labels": {"a~b/c": "y"}},
    }
    with pytest.raises(PatchError, match="test failed"):
        json_patch(document, [{"op": "test", "path": "/spec", "value": {}}])
    with pytest.raises(PatchError):
        json_patch(document, [{"op": "remove", "path": "/nothing"}])


@pytest.mark.parametrize(
    ("selector", "labels", "matches"),
    [
        ("app=web", {"app": "web"}, True),
        ("app==web,tier!=db", {"app": "web", "tier": "front"}, True),
        ("app in (web, api),!canary", {"app": "api"}, True),
        ("app in (web, api),!canary", {"app": "api", "canary": "1"}, False),
        ("app notin (web)", {}, True),
        ("tier", {"tier": ""}, True),
        ("tier", {}, False),
        ("", {}, True),
    ],
)
def test_label_selector_syntax(selector: str, labels: dict[str, str], matches: bool) -> None:
    assert LabelSelector.parse(selector).matches(labels) is matches


def test_invalid_selectors_are_refused() -> None:
    with pytest.raises(ValueError, match="invalid label value"):
        LabelSelector.parse("app=bad value!")
    with pytest.raises(ValueError, match="field label not supported"):
        FieldSelector.parse("spec.colour=blue", ())


def test_selector_objects() -> None:
    selector = LabelSelector.from_object(
        {
            "matchLabels": {"app": "web"},
            "matchExpressions": [{"key": "tier", "operator": "In", "values": ["a", "b"]}],
        }
    )
    assert selector.matches({"app": "web", "tier": "b"})
    assert not selector.matches({"app": "web"})
    assert str(selector) == "app=web,tier in (a,b)"
    assert not LabelSelector.from_object(None).matches({}), "a nil selector selects nothing"
    assert LabelSelector.from_object({}).matches({"any": "thing"})
