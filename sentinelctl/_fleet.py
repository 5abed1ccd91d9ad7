"""The fleet commands: `agents` and `agent` show what FleetService knows of each node, and
`telemetry` prints its latest or live samples from TelemetryService."""

from __future__ import annotations

import argparse

from google.protobuf import json_format
from sentinel.v1 import fleet_pb2, fleet_pb2_grpc, telemetry_pb2, telemetry_pb2_grpc

from sentinelctl._connection import open_channel
from sentinelctl._values import ago, local_time

_STATUS = {
    fleet_pb2.AGENT_STATUS_CONNECTED: "Connected",
    fleet_pb2.AGENT_STATUS_SUSPECT: "Suspect",
    fleet_pb2.AGENT_STATUS_DISCONNECTED: "Disconnected",
}


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Adds `agents`, `agent` and `telemetry`."""
    sub.add_parser("agents", help="list agents").set_defaults(func=_agents)
    agent = sub.add_parser("agent", help="show one agent")
    agent.add_argument("node")
    agent.set_defaults(func=_agent)
    telemetry = sub.add_parser("telemetry", help="latest or live telemetry")
    telemetry.add_argument("--node")
    telemetry.add_argument("--follow", "-f", action="store_true")
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


async def _agents(args: argparse.Namespace) -> None:
    async with open_channel(args) as channel:
        stub = fleet_pb2_grpc.FleetServiceStub(channel)
        token = ""
        rows = []
        while True:
            response = await stub.ListAgents(
                fleet_pb2.ListAgentsRequest(page_token=token), timeout=10
            )
            rows.extend(response.agents)
            token = response.next_page_token
            if not token:
                break
    print(
        f"{'NODE':<16} {'STATUS':<13} {'LAST SEEN':<10} {'VERSION':<8} {'GPUS':<5} {'SEQ':<8} HOST"
    )
    for agent in rows:
        status = _STATUS.get(agent.status, "?")
        seen = ago(agent.last_seen_time)
        host = f"{agent.host.hostname} ({agent.host.logical_cpus} CPUs)"
        print(
            f"{agent.node_id:<16} {status:<13} {seen:<10} {agent.agent_version:<8} "
            f"{len(agent.gpus):<5} {agent.last_telemetry_seq:<8} {host}"
        )
    if not rows:
        print("(no agents registered yet)")


async def _agent(args: argparse.Namespace) -> None:
    async with open_channel(args) as channel:
        response = await fleet_pb2_grpc.FleetServiceStub(channel).GetAgent(
            fleet_pb2.GetAgentRequest(node_id=args.node), timeout=10
        )
    print(json_format.MessageToJson(response.agent))


async def _telemetry(args: argparse.Namespace) -> None:
    nodes = [args.node] if args.node else []
    async with open_channel(args) as channel:
        stub = telemetry_pb2_grpc.TelemetryServiceStub(channel)
        if not args.follow:
            response = await stub.GetFleetTelemetry(
                telemetry_pb2.GetFleetTelemetryRequest(node_ids=nodes), timeout=10
            )
            for sample in response.samples:
                print(_sample_line(sample))
            if not response.samples:
                print("(no telemetry yet)")
            return
        request = telemetry_pb2.StreamTelemetryRequest(node_ids=nodes, include_latest=True)
        async for response in stub.StreamTelemetry(request):
            print(_sample_line(response.sample), flush=True)
