"""Translation between protobuf messages and the domain's objects."""

from __future__ import annotations

import datetime as dt
from typing import Any

from google.protobuf import json_format, struct_pb2, timestamp_pb2
from google.protobuf.message import Message
from sentinel.v1 import agent_pb2, fleet_pb2, telemetry_pb2

from controlplane.fleet import AgentState, AgentStatus, CommandResult, HelloInfo

_STATUS_TO_PB = {
    AgentStatus.CONNECTED: fleet_pb2.AGENT_STATUS_CONNECTED,
    AgentStatus.SUSPECT: fleet_pb2.AGENT_STATUS_SUSPECT,
    AgentStatus.DISCONNECTED: fleet_pb2.AGENT_STATUS_DISCONNECTED,
}
STATUS_FROM_PB = {v: k for k, v in _STATUS_TO_PB.items()}

_OUTCOME_NAMES = {
    v: k.removeprefix("COMMAND_OUTCOME_") for k, v in agent_pb2.CommandOutcome.items()
}


def timestamp(value: dt.datetime) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(value)
    return ts


def struct(value: dict[str, Any]) -> struct_pb2.Struct:
    message = struct_pb2.Struct()
    message.update(value)
    return message


def struct_to_dict(message: struct_pb2.Struct) -> dict[str, Any]:
    return json_format.MessageToDict(message)


def hello_info(hello: agent_pb2.Hello, spiffe_id: str) -> HelloInfo:
    inventory = {
        "host": json_format.MessageToDict(hello.host),
        "gpus": [json_format.MessageToDict(g) for g in hello.gpus],
    }
    return HelloInfo(
        node_id=hello.node_id,
        spiffe_id=spiffe_id,
        agent_version=hello.agent_version,
        capabilities=tuple(hello.capabilities),
        inventory=inventory,
        next_telemetry_seq=hello.resume.next_telemetry_seq,
        oldest_unacked_seq=hello.resume.oldest_unacked_seq,
        boot_count=hello.resume.boot_count,
    )


def agent_message(state: AgentState) -> fleet_pb2.Agent:
    agent = fleet_pb2.Agent(
        node_id=state.node_id,
        status=_STATUS_TO_PB[state.status],
        first_seen_time=timestamp(state.first_seen),
        last_seen_time=timestamp(state.last_seen),
        agent_version=state.agent_version,
        session_id=state.session_id,
        capabilities=state.capabilities,
        last_telemetry_seq=state.last_telemetry_seq,
        telemetry_gap_samples=state.telemetry_gap_samples,
        spiffe_id=state.spiffe_id,
        cordoned=state.cordoned,
        replica_id=state.replica_id,
        replica_address=state.replica_address,
    )
    if state.connected_at is not None:
        agent.connected_time.CopyFrom(timestamp(state.connected_at))
    host = state.inventory.get("host")
    if host:
        json_format.ParseDict(host, agent.host, ignore_unknown_fields=True)
    for gpu in state.inventory.get("gpus", []):
        json_format.ParseDict(gpu, agent.gpus.add(), ignore_unknown_fields=True)
    return agent


def command_result(node_id: str, action: str, result: agent_pb2.CommandResult) -> CommandResult:
    return CommandResult(
        command_id=result.command_id,
        node_id=node_id,
        action=action,
        outcome=_OUTCOME_NAMES.get(result.outcome, "UNSPECIFIED"),
        message=result.message,
        output=struct_to_dict(result.output),
    )


def message_to_plain(message: Message) -> dict[str, Any]:
    """A message as plain data with its real types (64-bit integers stay integers, which the
    JSON mapping would turn into strings; timestamps become datetimes, enums their names).
    Scalar fields are always present; sub-messages only when set. Health-gate expressions
    (CEL) are evaluated over this."""
    out: dict[str, Any] = {}
    for field in message.DESCRIPTOR.fields:
        value = getattr(message, field.name)
        if field.message_type is not None:
            if field.message_type.full_name == "google.protobuf.Timestamp":
                if message.HasField(field.name):
                    out[field.name] = value.ToDatetime(tzinfo=dt.UTC)
            elif _is_repeated(field):
                out[field.name] = [message_to_plain(item) for item in value]
            elif message.HasField(field.name):
                out[field.name] = message_to_plain(value)
        elif field.enum_type is not None:
            names = field.enum_type.values_by_number
            if _is_repeated(field):
                out[field.name] = [names[v].name if v in names else v for v in value]
            else:
                out[field.name] = names[value].name if value in names else value
        elif _is_repeated(field):
            out[field.name] = list(value)
        else:
            out[field.name] = value
    return out


def _is_repeated(field: Any) -> bool:
    return bool(field.is_repeated)


def telemetry_sample_data(sample: telemetry_pb2.TelemetrySample) -> dict[str, Any]:
    """An agent's telemetry sample as plain data: what health-gate expressions see."""
    return message_to_plain(sample)
