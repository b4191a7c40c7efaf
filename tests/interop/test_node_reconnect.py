"""The Node.js worker (clients/node) across infrastructure events: a broker that is not up yet,
a connection reset, a broker restarted on the same address, a reply lost with the stream, a
drain, and a configuration the broker refuses for good.

The worker must reconnect on its own (at once after a stream that was up a while, then with
backoff), send again what a dead stream left unanswered, and stop only on a fatal open status.
Across a broken stream or a broker's drain, the leases of running handlers are resumed on the
next stream (`LeaseOpen.resume`): such a task runs once.
"""

from __future__ import annotations

import asyncio
import re
import signal
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Final

import pytest

from broker.config import Settings
from taskbroker import Client, TaskState
from tests.conftest import RunningBroker, start_broker
from tests.faults.observe import eventually
from tests.interop.node_process import QUEUE, WAIT_S, NodeWorker
from tests.support.fault_proxy import FaultProxy
from tests.support.redis_server import free_port

#: A log line of the worker's for each stream it opens.
OPENED: Final = r"lease stream \w+ open on"


@pytest.fixture
async def proxy(running: RunningBroker) -> AsyncIterator[FaultProxy]:
    """A fault proxy in front of the in-process broker."""
    async with FaultProxy() as proxy:
        await proxy.start("127.0.0.1", running.broker.port)
        yield proxy


@pytest.fixture
async def client(running: RunningBroker) -> AsyncIterator[Client]:
    async with Client(running.target) as client:
        yield client


async def until_running(worker: NodeWorker, task_id: str) -> None:
    """Until the worker's handler runs the task: the broker shows a task LEASED as soon as it
    is leased, while its delivery may still be on the way (a connection cut then would take
    the delivery with it, and the worker would never have held the task)."""
    started = re.escape(f"task {task_id} (sleep) attempt 1: started")
    await eventually(lambda: worker.count(started) >= 1, WAIT_S, f"task {task_id} is running")


async def until_opened(worker: NodeWorker, streams: int) -> None:
    await eventually(lambda: worker.count(OPENED) >= streams, WAIT_S, f"{streams} streams opened")


async def stop(worker: NodeWorker) -> str:
    """SIGTERM; returns the worker's log once it has exited 0."""
    worker.assert_running()
    worker.process.send_signal(signal.SIGTERM)
    assert await worker.wait_exit() == 0, worker.text()
    return worker.text()


# --- reconnecting (no lease resume needed) ----------------------------------------------------


async def test_node_worker_waits_for_a_broker_that_is_not_up_yet(
    node: str, settings: Settings, tmp_path: Path
) -> None:
    listen = f"127.0.0.1:{free_port()}"
    worker = await NodeWorker.start(node, listen, tmp_path / "worker.log")
    try:
        await eventually(lambda: worker.count("cannot open a lease stream") >= 2, WAIT_S, "retries")
        worker.assert_running()
        running = await start_broker(settings, listen=listen)
        try:
            async with Client(running.target) as client:
                task_id = await client.enqueue(QUEUE, "echo", b"the broker came up late")
                task = await client.wait(task_id, timeout=WAIT_S)
            assert (task.state, task.attempt) == (TaskState.SUCCEEDED, 1), worker.text()
            await stop(worker)
        finally:
            await running.close()
    finally:
        await worker.close()


async def test_node_worker_reconnects_after_its_connection_is_reset(
    node: str, proxy: FaultProxy, client: Client, tmp_path: Path
) -> None:
    worker = await NodeWorker.start(node, proxy.address, tmp_path / "worker.log")
    try:
        before = await client.enqueue(QUEUE, "echo", b"before")
        assert (await client.wait(before, timeout=WAIT_S)).state is TaskState.SUCCEEDED
        proxy.reset()  # RST both ways: to the worker, a transport error on its stream
        await until_opened(worker, 2)
        after = [await client.enqueue(QUEUE, "upper", f"after {i}".encode()) for i in range(5)]
        for i, task_id in enumerate(after):
            task = await client.wait(task_id, timeout=WAIT_S)
            assert (task.state, task.attempt, task.result) == (
                TaskState.SUCCEEDED,
                1,
                f"AFTER {i}".encode(),
            ), worker.text()
        log = await stop(worker)
        assert "stopped after 6 tasks: 1 reconnects" in log
    finally:
        await worker.close()


async def test_node_worker_finishes_its_task_and_follows_a_restarted_broker(
    node: str, settings: Settings, tmp_path: Path
) -> None:
    """The broker drains (a graceful stop) while a task runs: settlements are accepted until
    the deadline, so the task is acked once. No broker listens for a while, then one starts on
    the same address (the same Redis): the worker reconnects and serves it."""
    listen = f"127.0.0.1:{free_port()}"
    first = await start_broker(settings, listen=listen)
    worker = await NodeWorker.start(node, first.target, tmp_path / "worker.log")
    try:
        async with Client(first.target) as client:
            in_flight = await client.enqueue(QUEUE, "sleep", b"500")
            await until_running(worker, in_flight)
        await first.broker.stop(grace_s=5)
        await first.channel.close()
        assert "the broker is draining" in worker.text()
        failures = worker.count("cannot open a lease stream")
        await eventually(
            lambda: worker.count("cannot open a lease stream") > failures, WAIT_S, "retries"
        )
        worker.assert_running()
        second = await start_broker(settings, listen=listen)
        try:
            async with Client(second.target) as client:
                task = await client.get_task(in_flight)
                assert (task.state, task.attempt, task.result) == (
                    TaskState.SUCCEEDED,
                    1,
                    b"slept 500 ms",
                ), worker.text()
                task_id = await client.enqueue(QUEUE, "echo", b"after the restart")
                task = await client.wait(task_id, timeout=WAIT_S)
                assert (task.state, task.attempt) == (TaskState.SUCCEEDED, 1), worker.text()
            await stop(worker)
        finally:
            await second.close()
    finally:
        await worker.close()


async def test_an_ack_whose_answer_died_with_its_stream_is_sent_again(
    node: str, proxy: FaultProxy, client: Client, tmp_path: Path
) -> None:
    """The broker applies the ack, but its answer is lost and then the connection dies: the
    worker sends the ack again on its new stream, and the broker answers it as a repeat."""
    worker = await NodeWorker.start(node, proxy.address, tmp_path / "worker.log")
    try:
        task_id = await client.enqueue(QUEUE, "sleep", b"300")
        await until_running(worker, task_id)
        proxy.drop_replies()

        async def succeeded() -> bool:
            return (await client.get_task(task_id)).state is TaskState.SUCCEEDED

        await eventually(succeeded, WAIT_S, "the ack applied")
        assert worker.count("attempt 1: ack") == 0  # its answer has not arrived
        proxy.reset()
        await eventually(
            lambda: worker.count(r"attempt 1: ack \(a repeat: already settled\)") == 1,
            WAIT_S,
            "the ack sent again and answered",
        )
        task = await client.get_task(task_id)
        assert (task.state, task.attempt, task.result) == (
            TaskState.SUCCEEDED,
            1,
            b"slept 300 ms",
        )
        log = await stop(worker)
        assert "1 reconnects" in log and "0 stale settlements" in log
    finally:
        await worker.close()


async def test_node_worker_stops_when_the_broker_refuses_its_stream_for_good(
    node: str, running: RunningBroker, tmp_path: Path
) -> None:
    """INVALID_ARGUMENT (here a bad queue name) is a configuration error: no retry loop."""
    worker = await NodeWorker.start(
        node, running.target, tmp_path / "worker.log", queue="no spaces allowed"
    )
    try:
        assert await worker.wait_exit() == 1, worker.text()
        assert "INVALID_ARGUMENT: open.queues[0]" in worker.text()
        assert worker.count("cannot open a lease stream") == 0
    finally:
        await worker.close()


# --- lease resume (needs the broker side) -----------------------------------------------------


async def test_a_task_running_across_a_connection_reset_runs_once(
    node: str, proxy: FaultProxy, client: Client, tmp_path: Path
) -> None:
    """The connection breaks while a 2 s task runs under a 600 ms lease: the worker reconnects
    and resumes the lease (same lease id and attempt), keeps extending it on the new stream,
    and its ack is accepted. Nothing is re-delivered."""
    worker = await NodeWorker.start(node, proxy.address, tmp_path / "worker.log", lease_ms=600)
    try:
        task_id = await client.enqueue(QUEUE, "sleep", b"2000")
        await until_running(worker, task_id)
        await asyncio.sleep(0.3)
        proxy.reset()
        task = await client.wait(task_id, timeout=WAIT_S)
        assert (task.state, task.attempt, task.errors, task.result) == (
            TaskState.SUCCEEDED,
            1,
            (),
            b"slept 2000 ms",
        ), worker.text()
        log = await stop(worker)
        assert worker.count(OPENED) == 2, log
        assert "resumed 1 of 1 leases" in log
        assert worker.count(r"attempt 1: ack$") == 1, log
        assert "1 leases resumed, 0 lost, 0 stale settlements" in log
    finally:
        await worker.close()


async def test_tasks_running_through_repeated_resets_each_run_once(
    node: str, proxy: FaultProxy, client: Client, tmp_path: Path
) -> None:
    """Three connection resets while 8 handlers at a time work through 80 tasks: the worker
    runs every task once, and no outcome is refused or lost. (A delivery on its way when the
    connection died never reached the worker: its task comes back as attempt 2 after the
    resume window, which is at-least-once delivery, not a re-run.)"""
    worker = await NodeWorker.start(
        node, proxy.address, tmp_path / "worker.log", concurrency=8, lease_ms=2000
    )
    try:
        ids = [await client.enqueue(QUEUE, "sleep", b"150") for _ in range(80)]
        await until_opened(worker, 1)
        for streams in (2, 3, 4):
            await asyncio.sleep(0.3)
            proxy.reset()
            await until_opened(worker, streams)
        tasks = [await client.wait(task_id, timeout=WAIT_S) for task_id in ids]
        assert {t.state for t in tasks} == {TaskState.SUCCEEDED}, worker.text()
        log = await stop(worker)
        # One report per handler run: an ack, or a repeat of one whose first answer was lost.
        runs = Counter(re.findall(r"task (\S+) \(sleep\) attempt \d+: ack", log))
        assert runs == Counter(ids), log
        assert "stopped after 80 tasks: 3 reconnects" in log
        assert "0 lost, 0 stale settlements" in log
    finally:
        await worker.close()


async def test_a_lease_given_back_while_disconnected_stops_its_handler(
    node: str, proxy: FaultProxy, client: Client, tmp_path: Path
) -> None:
    """The worker stays cut off for longer than the resume window, so its lease goes back to
    the queue. When it reconnects, the resume is answered stale: the handler is aborted (its
    signal says "lease lost") and its outcome is never sent; the task's next attempt runs."""
    worker = await NodeWorker.start(node, proxy.address, tmp_path / "worker.log")
    try:
        # Long enough that the worker is back before the handler ends: by the time the lease
        # is given back, its reconnect backoff has grown to 0.8-1.6 s (then up to 3.2 s).
        task_id = await client.enqueue(QUEUE, "sleep", b"6000")
        await until_running(worker, task_id)
        proxy.reset()
        proxy.half_open()  # new connections are reset: the worker cannot come back yet

        async def given_back() -> bool:
            return (await client.get_task(task_id)).state is TaskState.PENDING

        await eventually(given_back, WAIT_S, "the lease given back after the resume window")
        proxy.pass_through()
        task = await client.wait(task_id, timeout=WAIT_S + 6)  # attempt 2 sleeps 6 s too
        assert (task.state, task.attempt, task.result) == (
            TaskState.SUCCEEDED,
            2,
            b"slept 6000 ms",
        ), worker.text()
        log = await stop(worker)
        assert "resumed 0 of 1 leases" in log
        assert worker.count(r"lease lost .*stopping its handler") == 1, log
        assert worker.count(r"attempt 1: (ack|nack)") == 0, log  # the outcome was not sent
        assert "0 leases resumed, 1 lost, 0 stale settlements" in log
    finally:
        await worker.close()


async def test_a_task_running_across_a_broker_drain_runs_once(
    node: str, settings: Settings, tmp_path: Path
) -> None:
    """Replica `leaving` drains with a 1 s grace period while a 3 s task runs on its stream.
    The worker opens a stream on `staying` at once, moves the lease there with open.resume and
    half-closes the old stream; the task is delivered once and acked once."""
    leaving = await start_broker(settings)
    staying = await start_broker(settings)
    try:
        async with FaultProxy() as to_staying, Client(staying.target) as client:
            await to_staying.start("127.0.0.1", staying.broker.port)
            to_staying.half_open()  # the worker's first stream goes to `leaving`
            target = f"ipv4:127.0.0.1:{leaving.broker.port},{to_staying.address}"
            worker = await NodeWorker.start(node, target, tmp_path / "worker.log")
            try:
                task_id = await client.enqueue(QUEUE, "sleep", b"3000")
                await until_running(worker, task_id)
                to_staying.pass_through()
                await eventually(
                    lambda: to_staying.active_connections >= 1, 10, "connected to staying"
                )
                await leaving.broker.stop(grace_s=1.0)
                task = await client.wait(task_id, timeout=WAIT_S)
                assert (task.state, task.attempt, task.errors, task.result) == (
                    TaskState.SUCCEEDED,
                    1,
                    (),
                    b"slept 3000 ms",
                ), worker.text()
                log = await stop(worker)
            finally:
                await worker.close()
    finally:
        await leaving.close()
        await staying.close()
    assert "the broker is draining" in log
    assert "resumed 1 of 1 leases" in log
    assert worker.count(r"\(sleep\) attempt \d+: ack") == 1, log
    assert "0 lost, 0 stale settlements" in log
