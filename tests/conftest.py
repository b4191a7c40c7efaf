"""Fixtures: real redis-server processes on free ports, an in-process broker on port 0."""

from __future__ import annotations

import gc
import signal
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import grpc
import pytest
import redis

from broker.app import Broker
from broker.config import Settings
from taskbroker.v1 import admin_service_pb2_grpc, broker_service_pb2_grpc
from tests.support.redis_server import RedisCluster, RedisServer
from tests.support.unstopped_servers import StartedServers, UnstoppedServerGuard

if TYPE_CHECKING:
    from taskbroker.v1.admin_service_pb2_grpc import AdminServiceAsyncStub
    from taskbroker.v1.broker_service_pb2_grpc import BrokerServiceAsyncStub

# A shell starts background jobs (as CI runners may) with SIGINT ignored, and a child process
# inherits an ignored signal: Ctrl-C sent to a CLI under test would never arrive. The tests run
# as if started from a terminal.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

#: Fixtures of the TLS and credentials tests: pki, tls_broker, mtls_broker, recorder.
pytest_plugins = ["tests.support.tls"]

UNSTOPPED_SERVERS = UnstoppedServerGuard()
UNSTOPPED_SERVERS.install()
STARTED_SERVERS = StartedServers()
STARTED_SERVERS.install()


@pytest.fixture(autouse=True)
def every_server_stopped() -> Iterator[None]:
    """Fails the test that leaves a grpc.aio server running (torn down after its other
    fixtures, autouse fixtures being set up first)."""
    yield
    left = STARTED_SERVERS.left_running()
    assert not left, f"grpc.aio server(s) started and never stopped: {left}"


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Fails the run if any grpc.aio server was freed without being stopped: a leak in the
    broker or a test (tests/support/unstopped_servers.py says why it matters)."""
    gc.collect()
    if UNSTOPPED_SERVERS.unstopped:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if UNSTOPPED_SERVERS.unstopped:
        terminalreporter.write_line(
            f"{UNSTOPPED_SERVERS.unstopped} grpc.aio server(s) were garbage collected without"
            " being stopped: start and stop every server, also when a start fails",
            red=True,
        )


TEST_SETTINGS = Settings(
    listen="127.0.0.1:0",
    http_listen="127.0.0.1:0",
    shutdown_grace_s=1.0,
    open_timeout_s=1.0,
    backoff_initial_s=0.05,
    backoff_max_s=0.2,
)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One standalone Redis for the session; tests flush it (see `redis_client`)."""
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisCluster]:
    """A real 3-master Redis Cluster, started once, when a test first needs it."""
    with RedisCluster(3) as cluster:
        yield cluster


@pytest.fixture
def redis_client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis_server.client()
    client.flushall()
    yield client
    client.close()


@pytest.fixture
def settings(redis_server: RedisServer, redis_client: redis.Redis) -> Settings:
    """Settings for a broker on the session Redis (flushed), on a free port."""
    return replace(TEST_SETTINGS, redis_url=redis_server.url)


class RunningBroker:
    """An in-process broker with real channels to it."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.target = f"127.0.0.1:{broker.port}"
        self.channel = grpc.aio.insecure_channel(self.target)
        self.stub: BrokerServiceAsyncStub = broker_service_pb2_grpc.BrokerServiceStub(self.channel)
        self.admin: AdminServiceAsyncStub = admin_service_pb2_grpc.AdminServiceStub(self.channel)

    def new_channel(self) -> grpc.aio.Channel:
        return grpc.aio.insecure_channel(self.target)

    async def close(self) -> None:
        await self.channel.close()
        await self.broker.stop(grace_s=0.2)


async def start_broker(settings: Settings, **overrides: Any) -> RunningBroker:
    broker = Broker(replace(settings, **overrides))
    await broker.start()
    await broker.wake_listener.connected.wait()
    return RunningBroker(broker)


@pytest.fixture
async def running(settings: Settings) -> AsyncIterator[RunningBroker]:
    running = await start_broker(settings)
    yield running
    await running.close()


@pytest.fixture
def stub(running: RunningBroker) -> BrokerServiceAsyncStub:
    return running.stub


@pytest.fixture
def admin(running: RunningBroker) -> AdminServiceAsyncStub:
    return running.admin


@pytest.fixture
async def running_short_window(
    settings: Settings,
) -> AsyncIterator[BrokerServiceAsyncStub]:
    """A broker whose idempotency window is 200 ms."""
    running = await start_broker(settings, idempotency_window_s=0.2)
    yield running.stub
    await running.close()
