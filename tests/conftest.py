"""Shared fixtures: a real development PKI made at test time, real control planes on free
loopback ports with real TLS, and real node agents in-process."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import os
import pathlib
import traceback
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import grpc
import pynvml
import pytest
from sqlalchemy import Engine, create_engine, make_url, text
from sqlalchemy.pool import NullPool

from certs import CertificateAuthority, Identity, write_private_key
from controlplane import ControlPlane, ControlPlaneSettings, TlsFiles
from controlplane.store import Store
from nodeagent.agent import NodeAgent
from nodeagent.settings import AgentSettings
from tests.fakenvml import FakeNvml

TRUST_DOMAIN = "sentinel.local"


@dataclasses.dataclass
class Pki:
    directory: pathlib.Path
    ca: CertificateAuthority

    @property
    def ca_path(self) -> pathlib.Path:
        return self.directory / "ca.pem"

    def server_files(self) -> TlsFiles:
        return TlsFiles(self.ca_path, self.directory / "server.pem", self.directory / "server.key")

    def client(
        self,
        role: str,
        name: str,
        *,
        ca: CertificateAuthority | None = None,
        valid_for: dt.timedelta = dt.timedelta(days=1),
        not_before: dt.datetime | None = None,
        tag: str = "",
    ) -> tuple[pathlib.Path, pathlib.Path]:
        """Issues (once) a client certificate; returns (cert, key) paths."""
        stem = f"{role}-{name}{tag}"
        cert, key = self.directory / f"{stem}.pem", self.directory / f"{stem}.key"
        if not cert.exists():
            issued = (ca or self.ca).issue_client(
                Identity(TRUST_DOMAIN, role, name), valid_for=valid_for, not_before=not_before
            )
            write_private_key(key, issued.private_key_pem)
            cert.write_bytes(issued.certificate_pem)
        return cert, key

    def channel_credentials(self, role: str, name: str, **kwargs: Any) -> grpc.ChannelCredentials:
        cert, key = self.client(role, name, **kwargs)
        return grpc.ssl_channel_credentials(
            self.ca_path.read_bytes(), key.read_bytes(), cert.read_bytes()
        )


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca = CertificateAuthority.create()
    (directory / "ca.pem").write_bytes(ca.certificate_pem)
    # Next to ca.pem, where the control plane looks for the key that signs enrolled agents.
    write_private_key(directory / "ca.key", ca.private_key_pem)
    server = ca.issue_server()
    write_private_key(directory / "server.key", server.private_key_pem)
    (directory / "server.pem").write_bytes(server.certificate_pem)
    return Pki(directory, ca)


def fast_settings(pki: Pki, database_url: str, **overrides: Any) -> ControlPlaneSettings:
    """Settings with short timers so liveness and acks happen within a test's patience."""
    settings = ControlPlaneSettings(
        tls=pki.server_files(),
        listen="127.0.0.1:0",
        metrics_listen="127.0.0.1:0",
        enrollment_listen="127.0.0.1:0",
        database_url=database_url,
        telemetry_interval_s=0.2,
        heartbeat_interval_s=0.5,
        telemetry_flush_interval_s=0.05,
        telemetry_ack_interval_s=0.0,
        shutdown_grace_s=0.5,
        reconnect_after_shutdown_s=0.1,
        reconnect_after_shutdown_spread_s=0.1,
    )
    return dataclasses.replace(settings, **overrides)


# The backend every test's database lives on: "sqlite" (a file per test) or "postgresql" (a
# database per test on the server SENTINEL_TEST_PG_URL names; scripts/test.sh starts one).
TEST_DB = os.environ.get("SENTINEL_TEST_DB", "sqlite")

needs_postgres = pytest.mark.skipif(
    TEST_DB != "postgresql",
    reason="several control planes acting as one need PostgreSQL (on SQLite nothing carries "
    "commands or telemetry between them, and a second one warns at start)",
)


@pytest.fixture(scope="session")
def postgres_admin() -> Iterator[Engine]:
    """An autocommit engine on the test server's maintenance database, for CREATE/DROP."""
    raw = os.environ.get("SENTINEL_TEST_PG_URL", "")
    if not raw:
        pytest.fail(
            "SENTINEL_TEST_DB=postgresql needs SENTINEL_TEST_PG_URL, e.g. "
            "postgresql+psycopg://sentinel@127.0.0.1:55432/postgres (scripts/test.sh sets both)"
        )
    url = make_url(raw)
    if url.drivername in ("postgresql", "postgres"):
        url = url.set(drivername="postgresql+psycopg")
    # No pool: between tests nothing of ours stays connected to the server; the tests'
    # control planes count against max_connections, not idle admin connections.
    engine = create_engine(url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    yield engine
    engine.dispose()


def _drop_database(admin: Engine, name: str) -> None:
    with admin.connect() as db:
        # A store or engine a test did not close still holds connections; DROP would wait.
        db.execute(
            text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = :name AND pid <> pg_backend_pid()"
            ),
            {"name": name},
        )
        db.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))


@pytest.fixture
def database_url(request: pytest.FixtureRequest, tmp_path: pathlib.Path) -> Iterator[str]:
    """A fresh, empty database for this test on the backend SENTINEL_TEST_DB selects."""
    if TEST_DB == "sqlite":
        yield f"sqlite:///{tmp_path / 'sentinel.db'}"
        return
    if TEST_DB != "postgresql":
        pytest.fail(f"SENTINEL_TEST_DB must be 'sqlite' or 'postgresql', not {TEST_DB!r}")
    admin: Engine = request.getfixturevalue("postgres_admin")
    name = f"sentinel_test_{uuid.uuid4().hex[:16]}"
    with admin.connect() as db:
        # template0 is empty by definition, whatever someone added to template1.
        db.execute(text(f'CREATE DATABASE "{name}" TEMPLATE template0'))
    try:
        yield admin.url.set(database=name).render_as_string(hide_password=False)
    finally:
        _drop_database(admin, name)


@pytest.fixture
def store(database_url: str) -> Iterator[Store]:
    """The store on the test's database, migrated (tests that need more define their own)."""
    opened = Store(database_url)
    opened.migrate()
    yield opened
    opened.close()


ControlPlaneFactory = Callable[..., Awaitable[ControlPlane]]


@pytest.fixture
async def control_plane_factory(pki: Pki, database_url: str) -> AsyncIterator[ControlPlaneFactory]:
    started: list[ControlPlane] = []

    async def start(**overrides: Any) -> ControlPlane:
        cp = ControlPlane(fast_settings(pki, database_url, **overrides))
        await cp.start()
        started.append(cp)
        return cp

    yield start
    for cp in started:
        if cp._server is not None:
            await cp.stop()


@pytest.fixture
async def control_plane(control_plane_factory: ControlPlaneFactory) -> ControlPlane:
    return await control_plane_factory()


class RunningAgent:
    def __init__(self, agent: NodeAgent, task: asyncio.Task[None]) -> None:
        self.agent = agent
        self.task = task

    async def stop(self) -> None:
        self.agent.stop()
        await asyncio.wait_for(self.task, 10)


AgentFactory = Callable[..., Awaitable[RunningAgent]]


@pytest.fixture
async def agent_factory(pki: Pki, tmp_path: pathlib.Path) -> AsyncIterator[AgentFactory]:
    running: list[RunningAgent] = []

    async def start(
        node_id: str,
        port: int,
        *,
        cert_name: str | None = None,
        wait_connected: bool = True,
        **overrides: Any,
    ) -> RunningAgent:
        cert, key = pki.client("agent", cert_name or node_id)
        settings = AgentSettings(
            node_id=node_id,
            ca=pki.ca_path,
            cert=cert,
            key=key,
            control_plane=f"localhost:{port}",
            state_dir=tmp_path / f"agent-{node_id}",
            metrics_listen="",
            telemetry_interval_s=0.2,
            backoff_base_s=0.05,
            backoff_cap_s=0.5,
            connect_timeout_s=5.0,
        )
        settings = dataclasses.replace(settings, **overrides)
        agent = NodeAgent(settings, **_collectors())
        task = asyncio.create_task(agent.run(), name=f"agent-{node_id}")
        handle = RunningAgent(agent, task)
        running.append(handle)
        if wait_connected:
            await asyncio.wait_for(agent.connected.wait(), 10)
        return handle

    yield start
    # An agent that crashed (or would not stop) fails the test it ran in, with its traceback:
    # otherwise a test could pass on an agent that died under it.
    failures: list[str] = []
    for handle in running:
        if handle.task.done():
            crash = None if handle.task.cancelled() else handle.task.exception()
        else:
            try:
                await handle.stop()
                continue
            except Exception as exc:
                crash = exc
        if crash is not None:
            failures.append(
                f"{handle.task.get_name()}: " + "".join(traceback.format_exception(crash))
            )
    if failures:
        pytest.fail("node agent(s) failed during the test:\n" + "\n".join(failures))


@pytest.fixture
def no_nvidia_driver(monkeypatch: pytest.MonkeyPatch) -> FakeNvml:
    """NVML as on a machine without the NVIDIA driver, whatever this machine has: agents
    started in the test report no GPU."""
    nvml = FakeNvml([])
    nvml.init_error = pynvml.NVMLError_LibraryNotFound()
    nvml.install(monkeypatch)
    return nvml


def _collectors() -> dict[str, Any]:
    """The real host and GPU collectors: the GPU one reads whatever NVML answers, the real
    driver or a fake one a test installed (`no_nvidia_driver`, tests/fakenvml.py)."""
    from nodeagent.collectors import AsyncGpuCollector, HostCollector

    return {"host_collector": HostCollector(), "gpu_collector": AsyncGpuCollector()}


async def eventually(
    check: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05
) -> Any:
    """Polls `check` until it returns something truthy; fails the test after `timeout`."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = check()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {timeout} s: {check}")
        await asyncio.sleep(interval)


@pytest.fixture(autouse=True)
async def no_leaked_tasks() -> AsyncIterator[None]:
    """Fails a test that leaves asyncio tasks running behind it."""
    before = set(asyncio.all_tasks())
    yield
    await asyncio.sleep(0)
    leaked = [
        t for t in asyncio.all_tasks() - before if not t.done() and t is not asyncio.current_task()
    ]
    if leaked:
        for task in leaked:
            task.cancel()
        await asyncio.gather(*leaked, return_exceptions=True)
        pytest.fail(f"test leaked asyncio tasks: {[t.get_name() for t in leaked]}")
