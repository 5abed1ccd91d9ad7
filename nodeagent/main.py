"""`sentinel-agent`: runs the node agent until SIGINT/SIGTERM.

Every flag has an environment variable (SENTINEL_AGENT_<FLAG>); flags win.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import pathlib
import signal
import sys

from nodeagent._certificates import bootstrap_token
from nodeagent._state import state_dir_problem
from nodeagent.agent import NodeAgent
from nodeagent.collectors import AsyncGpuCollector, HostCollector
from nodeagent.settings import AgentSettings
from processkit import configure_logging, field_docs

log = logging.getLogger("nodeagent")

_PATHS = {"ca", "cert", "key", "state_dir"}


def _env(name: str) -> str | None:
    return os.environ.get(f"SENTINEL_AGENT_{name.upper()}")


def parse_args(argv: list[str] | None) -> tuple[AgentSettings, argparse.Namespace]:
    parser = argparse.ArgumentParser(prog="sentinel-agent", description=__doc__)
    parser.add_argument(
        "--certs-dir",
        default=_env("certs_dir") or ".dev/certs",
        help="directory holding ca.pem and agent-<node-id>.pem/.key (used for unset paths)",
    )
    parser.add_argument(
        "--log-format", choices=("text", "json"), default=_env("log_format") or "text"
    )
    parser.add_argument("--log-level", default=_env("log_level") or "INFO")
    docs = field_docs(AgentSettings)
    for field in dataclasses.fields(AgentSettings):
        default = field.default if field.default is not dataclasses.MISSING else None
        if field.name in _PATHS:
            kind: type = pathlib.Path
        elif default is None:
            kind = str
        else:
            kind = type(default)
        env = _env(field.name)
        parser.add_argument(
            f"--{field.name.replace('_', '-')}",
            type=kind,
            default=kind(env) if env is not None else default,
            required=field.name == "node_id" and env is None,
            help=docs.get(field.name),
        )
    args = parser.parse_args(argv)
    directory = pathlib.Path(args.certs_dir)
    args.ca = args.ca or directory / "ca.pem"
    args.cert = args.cert or directory / f"agent-{args.node_id}.pem"
    args.key = args.key or directory / f"agent-{args.node_id}.key"
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(AgentSettings)}
    return AgentSettings(**values), args


async def run(settings: AgentSettings) -> None:
    agent = NodeAgent(
        settings,
        host_collector=HostCollector(),
        gpu_collector=AsyncGpuCollector(call_timeout=settings.nvml_call_timeout_s),
    )
    http_server = None
    if settings.metrics_listen:
        # Imported only when served: prometheus_client and its HTTP stack are some 3 MB of the
        # agent's memory.
        from prometheus_client import CollectorRegistry

        from nodeagent.exporter import AgentHealth, TelemetryExporter, start_http_endpoint

        registry = CollectorRegistry()
        exporter = TelemetryExporter(registry)
        agent.on_sample = exporter.update
        registry.register(agent.metrics_collector())
        health = AgentHealth(
            exporter,
            interval_s=lambda: agent.telemetry_interval_s,
            connected=agent.connected.is_set,
        )
        http_server, _thread = start_http_endpoint(settings.metrics_listen, registry, health)
        log.info(
            "metrics on http://%s/metrics (health: /healthz, /readyz)", settings.metrics_listen
        )
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, agent.stop)
    try:
        await agent.run()
    finally:
        if http_server is not None:
            http_server.shutdown()
            http_server.server_close()


def main(argv: list[str] | None = None) -> int:
    settings, args = parse_args(argv)
    configure_logging(args.log_format, args.log_level)
    if not settings.ca.exists():
        log.error(
            "CA file %s does not exist (it comes with the bootstrap token; for a development "
            "PKI see `sentinel-certs init`)",
            settings.ca,
        )
        return 2
    missing = [path for path in (settings.cert, settings.key) if not path.exists()]
    if missing and not bootstrap_token(settings):
        log.error(
            "TLS file %s does not exist and no bootstrap token is configured: enroll with "
            "--bootstrap-token or --bootstrap-token-file, or issue one (`sentinel-certs init`)",
            missing[0],
        )
        return 2
    problem = state_dir_problem(settings.state_dir)
    if problem is not None:
        log.error(
            "the state directory %s is not usable (%s): the agent keeps its telemetry spool and "
            "the record of executed commands there; give it a writable directory with room "
            "(--state-dir, SENTINEL_AGENT_STATE_DIR)",
            settings.state_dir,
            problem,
        )
        return 2
    try:
        asyncio.run(run(settings))
    except OSError as exc:
        log.error("%s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
