"""The fleet commands: `agents` and `agent` show what FleetService knows of each node, and
`telemetry` prints its latest or live samples from TelemetryService."""

from __future__ import annotations

import argparse

from google.protobuf import json_format
from sentinel.v1 import fleet_pb2, telemetry_pb2

from sentinelclient import SentinelClient
from sentinelctl._output import add_output_argument, print_data, print_messages, print_streamed
from sentinelctl._values import ago, local_time

_STATUS = {
    fleet_pb2.AGENT_STATUS_CONNECTED: "Connected",
    fleet_pb2.AGENT_STATUS_SUSPECT: "Suspect",
    fleet_pb2.AGENT_STATUS_DISCONNECTED: "Disconnected",
}
_STATUS_FILTER = {name.lower(): value for value, name in _STATUS.items()}


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Adds `agents`, `agent` and `telemetry`."""
    agents = sub.add_parser("agents", help="list agents")
    agents.add_argument("--status", choices=sorted(_STATUS_FILTER), help="only agents this status")
    add_output_argument(agents)
    agents.set_defaults(func=_agents)
    agent = sub.add_parser("agent", help="show one agent")
    agent.add_argument("node")
    # Without -o, the JSON this command always printed (camelCase names, as grpcurl's).
    add_output_argument(agent, default="")
    agent.set_defaults(func=_agent)
    telemetry = sub.add_parser("telemetry", help="latest or live telemetry")
    telemetry.add_argument("--node")
    telemetry.add_argument("--follow", "-f", action="store_true")
    add_output_argument(telemetry)
    telemetry.set_defaults(func=_telemetry)


def _sample_line(sample: telemetry_pb2.TelemetrySample) -> str:
    host = sample.host
    memory = host.memory
    used = 100 * (1 - memory.available_bytes / memory.total_bytes) if memory.total_bytes else 0.0
    gpu_state = telemetry_pb2.GpuCollectionState.Name(sample.gpu_status.state).removeprefix(
        "GPU_COLLECTION_STATE_"
    )
    gpus = f"{len(sample.gpus)} GPU" if sample.gpus else gpu_state.lower().replace("_", " ")
    hottest = max((g.temperature_celsius for g in sample.gpus), default=None)
    if hottest is not None:
        gpus += f", max {hottest}°C"
    when = local_time(sample.collect_time, "%H:%M:%S")
    cpu = host.cpu.utilization_percent
    usage = f"cpu={cpu:5.1f}%  load1={host.load.load1:5.2f}  mem={used:5.1f}%"
    return f"{when}  {sample.node_id:<16} seq={sample.seq:<6} {usage}  gpus: {gpus}"


def _agents(args: argparse.Namespace, client: SentinelClient) -> None:
    status = _STATUS_FILTER[args.status] if args.status else None
    rows = client.list_agents(status=status)
    if args.output != "table":
        print_messages(rows, args.output)
        return
    print(
        f"{'NODE':<16} {'STATUS':<13} {'LAST SEEN':<10} {'VERSION':<8} {'GPUS':<5} {'SEQ':<8} HOST"
    )
    for agent in rows:
        status_name = _STATUS.get(agent.status, "?")
        seen = ago(agent.last_seen_time)
        host = f"{agent.host.hostname} ({agent.host.logical_cpus} CPUs)"
        print(
            f"{agent.node_id:<16} {status_name:<13} {seen:<10} {agent.agent_version:<8} "
            f"{len(agent.gpus):<5} {agent.last_telemetry_seq:<8} {host}"
        )
    if not rows:
        print("(no agents registered yet)")


def _agent(args: argparse.Namespace, client: SentinelClient) -> None:
    agent = client.get_agent(args.node)
    if args.output == "":
        print(json_format.MessageToJson(agent))
    elif args.output == "table":
        status = _STATUS.get(agent.status, "?")
        print(f"node        {agent.node_id}  ({status}, last seen {ago(agent.last_seen_time)})")
        print(f"identity    {agent.spiffe_id}")
        print(f"version     {agent.agent_version}  cordoned: {'yes' if agent.cordoned else 'no'}")
        host = agent.host
        print(f"host        {host.hostname}  {host.os} {host.kernel_version} {host.architecture}")
        print(
            f"cpus        {host.logical_cpus} logical  memory {host.memory_total_bytes >> 20} MiB"
        )
        print(f"telemetry   seq {agent.last_telemetry_seq}, {agent.telemetry_gap_samples} missing")
        for gpu in agent.gpus:
            print(f"gpu {gpu.index:<7} {gpu.name}  {gpu.uuid}  {gpu.memory_total_bytes >> 20} MiB")
    else:
        print_data(json_format.MessageToDict(agent, preserving_proto_field_name=True), args.output)


def _telemetry(args: argparse.Namespace, client: SentinelClient) -> None:
    nodes = [args.node] if args.node else []
    if not args.follow:
        samples = client.get_fleet_telemetry(nodes)
        if args.output != "table":
            print_messages(samples, args.output)
            return
        for sample in samples:
            print(_sample_line(sample))
        if not samples:
            print("(no telemetry yet)")
        return
    for sample in client.stream_telemetry(nodes, include_latest=True):
        if args.output == "table":
            print(_sample_line(sample), flush=True)
        else:
            print_streamed(sample, args.output)
