"""`python -m broker --processes 2`: a supervisor and two serving processes on one port.

Which process serves a connection is read from the kernel (/proc: which process holds the
accepted socket), not from anything the broker says about itself.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from broker.api.server import server_options
from broker.config import Settings, load_settings
from broker.supervisor import CANNOT_START, Supervisor, hold_port
from taskbroker.v1 import broker_service_pb2 as bs
from taskbroker.v1 import broker_service_pb2_grpc, lease_pb2, task_pb2
from tests.support.broker_process import BrokerProcess
from tests.support.lease_stream import LeaseStream
from tests.support.process_tree import (
    accepted_by,
    children,
    client_ports,
    connections_by_process,
    running,
)
from tests.support.redis_server import RedisServer, free_port
from tests.support.tasks import spec

#: A channel with a connection of its own: grpc otherwise shares one connection among the
#: channels of a process that have the same target and options.
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]
#: Connections opened: the kernel spreads them by a hash of their addresses, so all of them
#: landing on one of two processes has a chance of 2 ** -23.
CONNECTIONS = 24
ENQUEUE_OK = ("taskbroker_rpc_duration_seconds_count", "taskbroker.v1.BrokerService/Enqueue")


def test_processes_must_be_1_to_64() -> None:
    assert Settings(processes=64).processes == 64
    for bad in ("0", "65"):
        with pytest.raises(SystemExit):
            load_settings(["--processes", bad], {})
    assert load_settings([], {"TASKBROKER_PROCESSES": "3"}).processes == 3


async def test_a_supervisor_that_cannot_start_hands_its_signals_back_before_its_loop_closes(
    tmp_path: Path,
) -> None:
    """As serve() (tests/test_main.py): asyncio.run would remove them after it closed the
    loop's wakeup socket, and a SIGTERM in between printed an OSError traceback."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        settings = Settings(processes=2, listen=f"127.0.0.1:{port}", data_dir=tmp_path)
        assert await Supervisor(settings).run() == CANNOT_START
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    assert signal.getsignal(signal.SIGINT) == signal.default_int_handler


def test_only_serving_processes_share_their_port() -> None:
    assert dict(server_options(Settings()))["grpc.so_reuseport"] == 0
    assert dict(server_options(Settings(), reuse_port=True))["grpc.so_reuseport"] == 1


def test_the_held_port_refuses_other_programs_and_admits_the_serving_processes() -> None:
    held, port = hold_port("127.0.0.1:0")
    try:
        assert port != 0
        with socket.socket() as other, pytest.raises(OSError):
            other.bind(("127.0.0.1", port))  # a program that does not share ports
        with socket.socket() as member:
            member.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            member.bind(("127.0.0.1", port))  # as gRPC binds with grpc.so_reuseport 1
        with pytest.raises(RuntimeError, match="cannot listen"):
            hold_port(f"127.0.0.1:{port}")  # a second supervisor on the same port
    finally:
        for sock in held:
            sock.close()


def _log(broker: BrokerProcess) -> str:
    return broker.log.read_text(errors="replace")


async def _serving_pids(broker: BrokerProcess, count: int = 2) -> list[int]:
    """Waits until count serving processes have bound the port; returns their pids."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert broker.process.poll() is None, _log(broker)
        if _log(broker).count("taskbroker serving on") == count:
            pids = [p for p, cmd in children(broker.process.pid).items() if "--serving" in cmd]
            assert len(pids) == count, children(broker.process.pid)
            return pids
        await asyncio.sleep(0.1)
    raise AssertionError("the serving processes did not start:\n" + _log(broker))


class Connections:
    """Channels to the broker, each on a connection of its own, by the process serving it."""

    def __init__(self, port: int, pids: list[int]) -> None:
        self._port = port
        self._pids = pids
        self._channels: list[grpc.aio.Channel] = []
        self.by_process: dict[int, list[broker_service_pb2_grpc.BrokerServiceAsyncStub]] = {}

    async def open(self) -> tuple[int, broker_service_pb2_grpc.BrokerServiceAsyncStub]:
        """A new connection (made by a health check); returns its process and a stub."""
        before = client_ports(self._port)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{self._port}", options=OWN_CONNECTION)
        self._channels.append(channel)
        health = health_pb2_grpc.HealthStub(channel)
        reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        (client_port,) = client_ports(self._port) - before
        owner = accepted_by(self._port, client_port, self._pids)
        assert owner is not None
        stub = broker_service_pb2_grpc.BrokerServiceStub(channel)
        self.by_process.setdefault(owner, []).append(stub)
        return owner, stub

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()


@pytest.fixture
async def connections_closed() -> AsyncIterator[list[Connections]]:
    opened: list[Connections] = []
    yield opened
    for c in opened:
        await c.close()


async def _scrape(http_port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{http_port}/metrics") as response,
    ):
        text = await response.text()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _enqueue_ok(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> float:
    name, method = ENQUEUE_OK
    return samples.get((name, (("code", "OK"), ("method", method))), 0.0)


async def test_two_processes_serve_one_port_over_one_embedded_redis(
    tmp_path: Path, connections_closed: list[Connections]
) -> None:
    http_port = free_port()
    broker = BrokerProcess(
        tmp_path / "data",
        {"TASKBROKER_PROCESSES": "2", "TASKBROKER_HTTP_LISTEN": f"127.0.0.1:{http_port}"},
    )
    try:
        pids = await _serving_pids(broker)
        helpers = children(broker.process.pid)
        assert sum("redis-server" in cmd for cmd in helpers.values()) == 1  # started once
        conns = Connections(broker.port, pids)
        connections_closed.append(conns)
        task_ids = []
        for _ in range(CONNECTIONS):
            _, stub = await conns.open()
            reply = await stub.Enqueue(bs.EnqueueRequest(tasks=[spec()]), timeout=5)
            task_ids.append(reply.results[0].task_id)
        assert sorted(conns.by_process) == sorted(pids), "one process served every connection"
        assert connections_by_process(broker.port, pids) == {
            pid: len(stubs) for pid, stubs in conns.by_process.items()
        }

        # Tasks enqueued through both processes, leased and acked through one...
        first, second = pids
        worker = await LeaseStream(conns.by_process[first][0]).open(["emails"], CONNECTIONS)
        for delivery in await worker.take(CONNECTIONS):
            assert (await worker.ack(delivery)).outcome == lease_pb2.SETTLE_OUTCOME_OK
        # ...and read through the other: one Redis behind them.
        reader = conns.by_process[second][0]
        for task_id in task_ids:
            got = await reader.GetTask(bs.GetTaskRequest(task_id=task_id), timeout=5)
            assert got.task.state == task_pb2.TASK_STATE_SUCCEEDED
        # A stream waiting on one process is woken by an enqueue through the other.
        waiting = await LeaseStream(reader).open(["sms"], 1, worker_id="second")
        await conns.by_process[first][0].Enqueue(bs.EnqueueRequest(tasks=[spec("sms")]))
        (delivery,) = await waiting.take(1)
        assert (await waiting.ack(delivery)).outcome == lease_pb2.SETTLE_OUTCOME_OK

        # /metrics, served by one process, counts the calls and streams of both.
        samples = await _scrape(http_port)
        for _ in range(100):
            samples = await _scrape(http_port)
            if _enqueue_ok(samples) == CONNECTIONS + 1:
                break
            await asyncio.sleep(0.05)
        assert _enqueue_ok(samples) == CONNECTIONS + 1
        assert samples[("taskbroker_processes", ())] == 2
        assert samples[("taskbroker_processes_reporting", ())] == 2
        assert samples[("taskbroker_lease_streams_open", ())] == 2
        assert samples[("taskbroker_workers_connected", ())] == 2
        wait = ("taskbroker_queue_wait_seconds_count", (("queue", "emails"),))
        assert samples[wait] == CONNECTIONS
        await worker.close()
        await waiting.close()
    finally:
        code = broker.terminate()
    assert code == 0, _log(broker)
    assert not any(running(pid) for pid in helpers), children(broker.process.pid)


async def test_sigterm_drains_every_process_and_the_supervisor_exits_0(
    tmp_path: Path, redis_server: RedisServer, connections_closed: list[Connections]
) -> None:
    broker = BrokerProcess(
        tmp_path / "data",
        {
            "TASKBROKER_PROCESSES": "2",
            "TASKBROKER_REDIS_URL": redis_server.url,
            "TASKBROKER_SHUTDOWN_GRACE_S": "2",
        },
    )
    try:
        pids = await _serving_pids(broker)
        conns = Connections(broker.port, pids)
        connections_closed.append(conns)
        while len(conns.by_process) < 2:
            await conns.open()
        streams = [
            await LeaseStream(stubs[0]).open(["drain"], 1) for stubs in conns.by_process.values()
        ]
        broker.process.send_signal(signal.SIGTERM)
        for stream in streams:  # each process told its own stream
            await asyncio.wait_for(stream.drains.get(), 10)
        for stream in streams:
            await stream.close()
        code = await asyncio.to_thread(broker.process.wait, 30)
    finally:
        broker.channel.close()
        if broker.process.poll() is None:
            broker.terminate()
    assert code == 0, _log(broker)
    log = _log(broker)
    for pid in pids:
        assert f"[pid {pid}] broker.app: draining 1 lease streams" in log
        assert f"[pid {pid}] broker.app: taskbroker stopped" in log
        assert not running(pid)


async def test_a_killed_serving_process_stops_the_broker_with_exit_code_1(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    broker = BrokerProcess(
        tmp_path / "data",
        {"TASKBROKER_PROCESSES": "2", "TASKBROKER_REDIS_URL": redis_server.url},
    )
    try:
        victim, survivor = await _serving_pids(broker)
        os.kill(victim, signal.SIGKILL)
        code = await asyncio.to_thread(broker.process.wait, 30)
    finally:
        broker.channel.close()
        if broker.process.poll() is None:
            broker.terminate()
    log = _log(broker)
    assert code == 1, log
    assert f"(pid {victim}) exited with code -9; stopping the others" in log
    assert f"[pid {survivor}] broker.app: taskbroker stopped" in log  # drained, not killed
    assert not running(survivor)


async def test_serving_processes_do_not_outlive_a_killed_supervisor(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    broker = BrokerProcess(
        tmp_path / "data",
        {
            "TASKBROKER_PROCESSES": "2",
            "TASKBROKER_REDIS_URL": redis_server.url,
            "TASKBROKER_SHUTDOWN_GRACE_S": "1",
        },
    )
    pids: list[int] = []
    try:
        pids = await _serving_pids(broker)
        broker.process.kill()
        await asyncio.to_thread(broker.process.wait, 10)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if not any(running(pid) for pid in pids):
                break
            await asyncio.sleep(0.1)
    finally:
        broker.channel.close()
        for pid in pids:
            if running(pid):
                os.kill(pid, signal.SIGKILL)
    assert not any(running(pid) for pid in pids), _log(broker)
    log = _log(broker)
    for pid in pids:  # the kernel's SIGTERM (PR_SET_PDEATHSIG): they drained
        assert f"[pid {pid}] broker.app: taskbroker stopped" in log


async def test_a_serving_process_that_cannot_start_stops_the_broker_with_exit_code_2(
    tmp_path: Path,
) -> None:
    broker = BrokerProcess(
        tmp_path / "data",
        {
            "TASKBROKER_PROCESSES": "2",
            "TASKBROKER_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
        },
    )
    code = broker.exit_code(30)
    log = _log(broker)
    assert code == 2, log
    assert "cannot start" in log and "Traceback" not in log
    started = re.search(r"serving processes on \S+ \(pids (\d+), (\d+)\)", log)
    assert started is not None, log
    assert not any(running(int(pid)) for pid in started.groups())


async def test_metrics_keep_the_last_figures_of_a_process_that_does_not_answer(
    tmp_path: Path, redis_server: RedisServer, connections_closed: list[Connections]
) -> None:
    http_port = free_port()
    broker = BrokerProcess(
        tmp_path / "data",
        {
            "TASKBROKER_PROCESSES": "2",
            "TASKBROKER_REDIS_URL": redis_server.url,
            "TASKBROKER_HTTP_LISTEN": f"127.0.0.1:{http_port}",
        },
    )
    stopped: int | None = None
    try:
        await _serving_pids(broker)
        started = re.search(r"serving processes on \S+ \(pids (\d+), (\d+)\)", _log(broker))
        assert started is not None
        http_pid, other = (int(pid) for pid in started.groups())  # process 0 serves HTTP
        conns = Connections(broker.port, [http_pid, other])
        connections_closed.append(conns)
        while other not in conns.by_process:
            await conns.open()
        calls = 0
        for stubs in conns.by_process.values():
            await stubs[0].Enqueue(bs.EnqueueRequest(tasks=[spec()]), timeout=5)
            calls += 1
        samples = await _scrape(http_port)
        for _ in range(100):
            if _enqueue_ok(samples) == calls:
                break
            await asyncio.sleep(0.05)
            samples = await _scrape(http_port)
        assert _enqueue_ok(samples) == calls

        os.kill(other, signal.SIGSTOP)
        stopped = other
        samples = await _scrape(http_port)
        assert samples[("taskbroker_processes_reporting", ())] == 1
        assert _enqueue_ok(samples) == calls  # its calls are still counted
        os.kill(other, signal.SIGCONT)
        stopped = None
        samples = await _scrape(http_port)
        assert samples[("taskbroker_processes_reporting", ())] == 2
    finally:
        if stopped is not None:
            os.kill(stopped, signal.SIGCONT)
        code = broker.terminate()
    assert code == 0, _log(broker)
    assert "did not report its metrics" in _log(broker)


async def test_one_process_is_the_broker_itself_with_no_supervisor(
    tmp_path: Path, redis_server: RedisServer, connections_closed: list[Connections]
) -> None:
    broker = BrokerProcess(tmp_path / "data", {"TASKBROKER_REDIS_URL": redis_server.url})
    try:
        await asyncio.to_thread(broker.wait_serving)
        assert children(broker.process.pid) == {}
        conns = Connections(broker.port, [broker.process.pid])
        connections_closed.append(conns)
        owner, _ = await conns.open()
        assert owner == broker.process.pid
    finally:
        code = broker.terminate()
    assert code == 0, _log(broker)
    assert "[pid" not in _log(broker) and "supervisor" not in _log(broker)
