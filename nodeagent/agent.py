"""The node agent: collects telemetry into its spool, holds one session with the control plane,
re-sends what was not acknowledged after every reconnect, and carries out commands in order,
each at most once.

This module puts the rooms together and runs them: telemetry collection (`_telemetry`), the
session (`_session`), command running (`_commands`) and certificate upkeep (`_certificates`).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from sentinel.v1 import telemetry_pb2

from nodeagent._certificates import CertificateKeeper
from nodeagent._commands import CommandRunner
from nodeagent._session import (
    AgentSession,
    SessionRefused,
    WelcomeTimeout,
    WelcomeWait,
    backoff_delay,
    channel_options,
    mtls_credentials,
    timeout_backoff_delay,
)
from nodeagent._state import AgentStateStore
from nodeagent._telemetry import TelemetryInterval, TelemetrySampler
from nodeagent.actions import AgentControls
from nodeagent.collectors import AsyncGpuCollector, HostCollector
from nodeagent.settings import AgentSettings
from processkit import Supervisor, log_context

if TYPE_CHECKING:
    from prometheus_client.registry import Collector

__all__ = [
    "NodeAgent",
    "SessionRefused",
    "WelcomeTimeout",
    "WelcomeWait",
    "backoff_delay",
    "timeout_backoff_delay",
]

log = logging.getLogger(__name__)


class NodeAgent:
    """One node's agent: runs telemetry collection, the control-plane session, the command
    runner and certificate upkeep together, from start until `stop()`."""

    def __init__(
        self,
        settings: AgentSettings,
        *,
        host_collector: HostCollector | None = None,
        gpu_collector: AsyncGpuCollector | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
        self._gpu = gpu_collector
        self._rng = rng or random.Random()  # noqa: S311 (jitter, not cryptography)
        self._supervisor = Supervisor("agent")
        self._telemetry = TelemetrySampler(
            settings.node_id,
            host=host_collector,
            gpu=gpu_collector,
            interval=TelemetryInterval(settings.telemetry_interval_s),
        )
        self.certificates = CertificateKeeper(
            settings,
            mtls_credentials=functools.partial(mtls_credentials, settings),
            channel_options=functools.partial(channel_options, settings),
            rng=self._rng,
        )
        self._session = AgentSession(
            settings,
            certificates=self.certificates,
            sampler=self._telemetry,
            on_command=lambda command: self._commands.receive(command),
            rng=self._rng,
        )
        self._commands = CommandRunner(
            command_timeout_s=settings.command_timeout_s, send=self._session.send
        )
        self.connected = self._session.connected
        """Set while a session with the control plane is open."""

    # -- what tests, main and /metrics read --------------------------------------------------

    @property
    def session_id(self) -> str:
        """The open session's id; empty while there is none."""
        return self._session.session_id

    @property
    def sessions_opened(self) -> int:
        return self._session.sessions_opened

    @property
    def acked_seq(self) -> int:
        """Highest telemetry seq the control plane acknowledged."""
        return self._session.acked_seq

    @property
    def last_sample(self) -> telemetry_pb2.TelemetrySample | None:
        return self._telemetry.last_sample

    @property
    def on_sample(self) -> Callable[[telemetry_pb2.TelemetrySample], None] | None:
        """Called with each new sample (the agent's /metrics keeps the latest)."""
        return self._telemetry.on_sample

    @on_sample.setter
    def on_sample(self, callback: Callable[[telemetry_pb2.TelemetrySample], None] | None) -> None:
        self._telemetry.on_sample = callback

    @property
    def telemetry_interval_s(self) -> float:
        """The current telemetry interval (the control plane may change it)."""
        return self._telemetry.interval.seconds

    @property
    def _interval_s(self) -> float:
        return self._telemetry.interval.seconds

    def _interval(self) -> float:
        return self._telemetry.interval.seconds

    # -- lifecycle ---------------------------------------------------------------------------

    async def run(self) -> None:
        """Runs until `stop()`; never raises for a control plane that is down."""
        s = self.settings
        state = await asyncio.to_thread(
            AgentStateStore, s.state_dir / "agent.db", max_spool_samples=s.max_spool_samples
        )
        telemetry = self._telemetry
        interval = telemetry.interval

        async def set_interval(seconds: float) -> None:
            await interval.pin(seconds, state)

        controls = AgentControls(
            self._interval, set_interval, state=state, state_dir=s.state_dir, gpu=self._gpu
        )
        with log_context(node_id=s.node_id):
            try:
                boot_count = await asyncio.to_thread(state.next_boot)
                await interval.restore(state)
                if await asyncio.to_thread(state.is_cordoned):
                    # The hello has no field for it; the control plane keeps its own record.
                    log.info("this node is cordoned in Sentinel's scheduling view")
                await telemetry.start()
                self._supervisor.start("collector", lambda: telemetry.run(state))
                self._supervisor.start("commands", lambda: self._commands.run(controls))
                self._supervisor.start("certificates", self.certificates.run)
                await self._session.run(state, boot_count)
            finally:
                await self._supervisor.stop()
                if self._gpu is not None:
                    await self._gpu.stop()
                await asyncio.to_thread(state.close)

    def stop(self) -> None:
        """Ends the session and makes `run()` return."""
        self._session.stop()

    def metrics_collector(self) -> Collector:
        """A prometheus_client collector of the agent's own session state."""
        # Imported here: an agent that serves no /metrics never loads prometheus_client.
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
        from prometheus_client.registry import Collector

        agent = self

        class _SessionMetrics(Collector):
            def collect(self) -> Iterator[Metric]:
                connected = GaugeMetricFamily(
                    "sentinel_agent_connected", "1 while a session with the control plane is open."
                )
                connected.add_metric([], 1.0 if agent.connected.is_set() else 0.0)
                yield connected
                sessions = CounterMetricFamily(
                    "sentinel_agent_sessions", "Sessions opened since the agent started."
                )
                sessions.add_metric([], agent.sessions_opened)
                yield sessions
                acked = GaugeMetricFamily(
                    "sentinel_agent_telemetry_acked_seq",
                    "Highest telemetry seq the control plane acknowledged.",
                )
                acked.add_metric([], agent.acked_seq)
                yield acked
                keeper = agent.certificates
                valid = GaugeMetricFamily(
                    "sentinel_agent_certificate_valid",
                    "1 while the agent holds an unexpired client certificate; 0 means it cannot "
                    "connect until it gets new certificate files or a bootstrap token.",
                )
                valid.add_metric([], 1.0 if keeper.valid else 0.0)
                yield valid
                expiry = GaugeMetricFamily(
                    "sentinel_agent_certificate_expiry_timestamp_seconds",
                    "When the agent's client certificate expires (Unix time; 0 when none).",
                )
                current = keeper.current
                expiry.add_metric([], current.not_after.timestamp() if current else 0.0)
                yield expiry

        return _SessionMetrics()
