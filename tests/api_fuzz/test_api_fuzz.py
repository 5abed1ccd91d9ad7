"""Fuzzing every request message of the public API (hypothesis, from the protobuf descriptors):
for every RPC of every service, random and oversized values (long strings, long lists, deep
Structs, out-of-range timestamps, unknown enum values) sent by a caller whose role may call the
method, over real TLS. No answer may be INTERNAL or UNKNOWN: a bad request is the caller's
doing and gets a precise code (the bounds are in docs/limits.md).

The control plane runs on an event loop in a background thread, so hypothesis drives the real
API synchronously, example after example, against one server.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import importlib
import pathlib
import pkgutil
import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
import sentinel.v1
from google.protobuf import descriptor, message_factory, struct_pb2
from google.protobuf.message import DecodeError, Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controlplane import ControlPlane
from controlplane.auth.roles import allowed
from tests.conftest import Pki, fast_settings

# Per method; about 40 methods, each example one call (streams read with a short deadline).
MAX_EXAMPLES = 30
STREAM_DEADLINE_S = 0.25
CALL_DEADLINE_S = 10.0
FORBIDDEN = (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)
ROLES = ("operator", "planner", "viewer", "agent")
AGENT_NODE = "fuzz-agent"

REJECT_ALL = """
policy_id: fuzz-reject-all
description: well-formed fuzz plans are judged, stored as REJECTED, and never executed
rules:
  - rule_id: never
    expression: plan.confidence > 2.0
    message: fuzzing only
"""


def _services() -> list[descriptor.ServiceDescriptor]:
    found = []
    for module in pkgutil.iter_modules(sentinel.v1.__path__):
        if module.name.endswith("_pb2"):
            pb2 = importlib.import_module(f"sentinel.v1.{module.name}")
            found.extend(pb2.DESCRIPTOR.services_by_name.values())
    return sorted(found, key=lambda s: s.full_name)


METHODS = [method for service in _services() for method in service.methods]


# -- strategies from descriptors -------------------------------------------------------------

_F = descriptor.FieldDescriptor
_OVERSIZED_LENGTHS = (129, 257, 1025, 4097, 65_537, 1_000_001)
_OVERSIZED_COUNTS = (101, 1001, 10_001, 100_001)
_DEEP = (20, 33, 64, 99, 150)

_strings = st.one_of(
    st.text(max_size=24),
    st.sampled_from(["", "\x00", "node-a", "*", "../../etc/passwd", "é" * 65, "a" * 128]),
    st.builds(lambda n, c: c * n, st.sampled_from(_OVERSIZED_LENGTHS), st.sampled_from("xé\x00")),
)
_bytes = st.one_of(
    st.binary(max_size=24),
    st.builds(lambda n: b"\xff" * n, st.sampled_from(_OVERSIZED_LENGTHS)),
)


def _ints(bits: int, signed: bool) -> st.SearchStrategy[int]:
    low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    return st.one_of(
        st.integers(min_value=max(low, -1000), max_value=min(high, 1000)),
        st.sampled_from([low, high, 0, -1 if signed else 1]),
        st.integers(min_value=low, max_value=high),
    )


_SCALARS: dict[int, st.SearchStrategy[Any]] = {
    _F.TYPE_STRING: _strings,
    _F.TYPE_BYTES: _bytes,
    _F.TYPE_BOOL: st.booleans(),
    _F.TYPE_DOUBLE: st.floats(allow_nan=True, allow_infinity=True),
    _F.TYPE_FLOAT: st.floats(allow_nan=True, allow_infinity=True, width=32),
    _F.TYPE_INT32: _ints(32, True),
    _F.TYPE_SINT32: _ints(32, True),
    _F.TYPE_SFIXED32: _ints(32, True),
    _F.TYPE_INT64: _ints(64, True),
    _F.TYPE_SINT64: _ints(64, True),
    _F.TYPE_SFIXED64: _ints(64, True),
    _F.TYPE_UINT32: _ints(32, False),
    _F.TYPE_FIXED32: _ints(32, False),
    _F.TYPE_UINT64: _ints(64, False),
    _F.TYPE_FIXED64: _ints(64, False),
}


def _nested_struct(depth: int) -> struct_pb2.Struct:
    value: Any = "leaf"
    for _ in range(depth - 1):
        value = {"a": value}
    top = struct_pb2.Struct()
    top.update({"a": value})
    return top


_json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.floats(allow_nan=True, allow_infinity=True),
    _strings,
)
_json = st.recursive(
    _json_leaf,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_strings, inner, max_size=3),
    max_leaves=8,
)


def _struct_from(value: dict[str, Any]) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update(value)
    return struct


_shallow_structs = st.dictionaries(_strings, _json, max_size=4).map(_struct_from)
_structs = st.one_of(
    _shallow_structs,
    st.sampled_from(_DEEP).map(_nested_struct),
    st.builds(
        lambda n: _struct_from({f"k{i}": i for i in range(n)}), st.sampled_from(_OVERSIZED_COUNTS)
    ),
)


def _scalar(field: descriptor.FieldDescriptor) -> st.SearchStrategy[Any]:
    if field.type == _F.TYPE_ENUM:
        assert field.enum_type is not None
        known = [v.number for v in field.enum_type.values]
        return st.one_of(st.sampled_from(known), _ints(32, True))
    return _SCALARS[field.type]


@functools.cache
def message_strategy(desc: descriptor.Descriptor, depth: int = 0) -> st.SearchStrategy[Message]:
    """Messages of type `desc`: each field set or not, with random and oversized values."""
    cls = message_factory.GetMessageClass(desc)
    if desc.full_name == "google.protobuf.Struct":
        # Deep Structs near the top only: deeper down they pass protobuf's nesting limit, which
        # test_a_request_nested_deeper_than_protobuf_parses_is_invalid_argument covers.
        return _structs if depth <= 1 else _shallow_structs
    if desc.full_name == "google.protobuf.Value":
        return _json.map(lambda v: struct_pb2.Value(struct_value=_struct_from({"v": v})))
    if depth > 4:
        return st.just(cls())
    fields = [(field, _field_strategy(field, depth)) for field in desc.fields]

    @st.composite
    def build(draw: Any) -> Message:
        message = cls()
        for field, strategy in fields:
            if draw(st.booleans()):
                value = draw(strategy)
                # Too deep for protobuf to hold at all: then the field stays unset.
                with contextlib.suppress(DecodeError):
                    _set(message, field, value)
        return message

    return build()


def _field_strategy(field: descriptor.FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
    if field.message_type is not None:
        if field.message_type.GetOptions().map_entry:
            key = _scalar(field.message_type.fields_by_name["key"])
            value_field = field.message_type.fields_by_name["value"]
            value = (
                message_strategy(value_field.message_type, depth + 1)
                if value_field.message_type is not None
                else _scalar(value_field)
            )
            return st.dictionaries(key, value, max_size=3)
        element = message_strategy(field.message_type, depth + 1)
    else:
        element = _scalar(field)
    if not field.is_repeated:
        return element
    # Long lists repeat one small element, and only near the top: long lists of long lists
    # would only measure the test's own memory.
    if depth > 1:
        return st.lists(element, max_size=3)
    small = (
        st.just(message_factory.GetMessageClass(field.message_type)())
        if field.message_type is not None
        else _scalar(field).filter(lambda v: not isinstance(v, (str, bytes)) or len(v) < 64)
    )
    return st.one_of(
        st.lists(element, max_size=3),
        st.tuples(small, st.sampled_from(_OVERSIZED_COUNTS)).map(lambda t: [t[0]] * t[1]),
    )


def _set(message: Message, field: descriptor.FieldDescriptor, value: Any) -> None:
    target = getattr(message, field.name)
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        for key, item in value.items():
            if isinstance(item, Message):
                target[key].CopyFrom(item)
            else:
                target[key] = item
    elif field.is_repeated:
        target.extend(value)
    elif field.message_type is not None:
        target.CopyFrom(value)
    else:
        setattr(message, field.name, value)


# -- the server and the calls --------------------------------------------------------------


class _Server:
    """A control plane serving on its own event loop in a background thread."""

    def __init__(self, pki: Pki, database_url: str, state_dir: pathlib.Path) -> None:
        self.pki = pki
        self.database_url = database_url
        self.state_dir = state_dir
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.port = self.enrollment_port = 0
        self.error: BaseException | None = None
        self._stop: asyncio.Event | None = None
        self.thread = threading.Thread(target=self._run, name="api-fuzz-server", daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._serve())
        except BaseException as exc:  # reported by the fixture
            self.error = exc
            self.ready.set()

    async def _serve(self) -> None:
        policy = self.state_dir / "reject-all.yaml"
        policy.write_text(REJECT_ALL)
        cp = ControlPlane(
            fast_settings(
                self.pki,
                self.database_url,
                policy_paths=str(policy),
                # Every Login runs argon2; the limiter then answers RESOURCE_EXHAUSTED quickly.
                login_rate_per_minute=30,
            )
        )
        await cp.start()
        self.port, self.enrollment_port = cp.port, cp.enrollment_port
        self._stop = asyncio.Event()
        self.ready.set()
        await self._stop.wait()
        await cp.stop()

    def stop(self) -> None:
        if self._stop is not None:
            self.loop.call_soon_threadsafe(self._stop.set)
        self.thread.join(30)


@pytest.fixture
def server(pki: Pki, database_url: str, tmp_path: pathlib.Path) -> Iterator[_Server]:
    running = _Server(pki, database_url, tmp_path)
    running.thread.start()
    assert running.ready.wait(30), "fuzz server did not start"
    if running.error is not None:
        raise running.error
    yield running
    running.stop()


class _Caller:
    """Calls any method with a raw request message, over a channel of a role that may."""

    def __init__(self, server: _Server) -> None:
        pki = server.pki
        self._channels: dict[str, grpc.Channel] = {}
        self.outcomes: dict[str, collections.Counter[str]] = {}
        for role in ROLES:
            name = AGENT_NODE if role == "agent" else f"fuzz-{role}"
            self._channels[role] = grpc.secure_channel(
                f"localhost:{server.port}", pki.channel_credentials(role, name)
            )
        self._channels["enrollment"] = grpc.secure_channel(
            f"localhost:{server.enrollment_port}",
            grpc.ssl_channel_credentials(pki.ca_path.read_bytes()),
        )

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()

    def _channel(self, method: str) -> grpc.Channel:
        if method.endswith("EnrollmentService/Enroll"):
            return self._channels["enrollment"]
        for role in ROLES:
            if allowed(method, role):
                return self._channels[role]
        return self._channels["operator"]

    def call(
        self, method: descriptor.MethodDescriptor, request: Message
    ) -> tuple[grpc.StatusCode, str]:
        path = f"/{method.containing_service.full_name}/{method.name}"
        channel = self._channel(path)
        serialize = type(request).SerializeToString
        try:
            if method.client_streaming:
                responses = channel.stream_stream(path, request_serializer=serialize)(
                    iter([request, request]), timeout=STREAM_DEADLINE_S
                )
                next(responses, None)
                responses.cancel()
            elif method.server_streaming:
                stream = channel.unary_stream(path, request_serializer=serialize)(
                    request, timeout=STREAM_DEADLINE_S
                )
                next(stream, None)
                stream.cancel()
            else:
                channel.unary_unary(path, request_serializer=serialize)(
                    request, timeout=CALL_DEADLINE_S
                )
        except grpc.RpcError as exc:
            return exc.code(), exc.details() or ""
        return grpc.StatusCode.OK, ""


def _describe(request: Message) -> str:
    text = str(request)
    return text if len(text) < 600 else f"{text[:600]}... ({request.ByteSize()} bytes)"


def _fuzz(caller: _Caller, method: descriptor.MethodDescriptor) -> None:
    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(request=message_strategy(method.input_type))
    def check(request: Message) -> None:
        code, details = caller.call(method, request)
        caller.outcomes.setdefault(method.full_name, collections.Counter())[code.name] += 1
        assert code not in FORBIDDEN, (
            f"{method.full_name} answered {code.name}: {details[:300]}\n"
            f"request: {_describe(request)}"
        )

    check()


def test_no_request_to_any_method_answers_internal_or_unknown(server: _Server) -> None:
    caller = _Caller(server)
    failures: list[str] = []
    started = time.monotonic()
    try:
        for method in METHODS:
            try:
                _fuzz(caller, method)
            except AssertionError as exc:
                failures.append(str(exc).split("\nFalsifying example")[0][:1500])
    finally:
        caller.close()
    for name, counts in sorted(caller.outcomes.items()):
        print(f"{name}: {dict(counts)}")  # shown with -s: what the fuzzing reached
    assert not failures, "\n\n".join(failures)
    assert time.monotonic() - started < 90


def _deep_plan(depth: int) -> Message:
    from sentinel.v1 import plan_pb2

    return plan_pb2.SubmitPlanRequest(
        plan=plan_pb2.Plan(
            source="fuzz",
            steps=[plan_pb2.PlanStep(action="cordon", parameters=_nested_struct(depth))],
        )
    )


@pytest.mark.parametrize("depth", [8, 32, 33])
def test_a_request_nested_deeper_than_protobuf_parses_is_invalid_argument(
    server: _Server, depth: int
) -> None:
    caller = _Caller(server)
    try:
        method = next(m for m in METHODS if m.full_name == "sentinel.v1.PlanService.SubmitPlan")
        code, details = caller.call(method, _deep_plan(depth))
    finally:
        caller.close()
    # Parsed or not, it is the caller's to fix; only the too-deep one is refused unparsed.
    assert code == grpc.StatusCode.INVALID_ARGUMENT, details
    assert ("cannot be parsed" in details) == (depth > 32), details
