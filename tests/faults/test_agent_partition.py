"""An agent cut from the control plane for longer than the disconnect threshold: the control
plane marks it Suspect then Disconnected; when the link heals the agent comes back on its own,
the node is Connected again and every sample it took meanwhile arrives (from its spool), none
doubled.

The partition is a TCP forwarder between agent and control plane that the test cuts (open
connections reset, new ones refused) and heals."""

from __future__ import annotations

from tests.conftest import AgentFactory, ControlPlaneFactory, Pki, eventually
from tests.fleet.test_restart_delivery import assert_contiguous, stream_seqs
from tests.replicas._rig import Forwarder


async def test_an_agent_cut_off_past_the_disconnect_threshold_comes_back_with_everything(
    pki: Pki, control_plane_factory: ControlPlaneFactory, agent_factory: AgentFactory
) -> None:
    cp = await control_plane_factory(suspect_after_s=0.5, disconnect_after_s=1.5)
    link = Forwarder(cp.port)
    await link.start()
    try:
        node = await agent_factory("node-1", link.port, keepalive_time_s=1.0)
        async with stream_seqs(pki, cp.port, "node-1", lambda: cp.hub.subscriber_count) as seen:
            await eventually(lambda: len(seen) >= 3)
            link.partition()
            await eventually(
                lambda: cp.registry.get("node-1").status.value == "DISCONNECTED",
                timeout=15,
            )
            cut_seq = node.agent.last_sample.seq
            # The agent goes on sampling into its spool while it cannot reach anyone.
            await eventually(lambda: node.agent.last_sample.seq >= cut_seq + 5)
            link.heal()
            await eventually(
                lambda: cp.registry.get("node-1").status.value == "CONNECTED",
                timeout=30,
            )
            produced = node.agent.last_sample.seq
            await eventually(lambda: max(seen) >= produced, timeout=30)
        assert_contiguous(seen)
        assert node.agent.sessions_opened >= 2
        state = cp.registry.get("node-1")
        assert state is not None and state.telemetry_gap_samples == 0
    finally:
        await link.close()
