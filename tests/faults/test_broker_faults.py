"""Broker faults: a replica killed -9 under its workers, an Enqueue reply and an Ack reply lost on
the way back, and a replica shut down gracefully under load (RELIABILITY.md section 7).

Replicas that are killed or shut down are real `python -m broker` processes on the session Redis;
workers are real SDK worker processes (tests.support.worker_process) that record a history, and
the checker (tests.support.history) is run on it after the queue is drained: nothing lost,
nothing completed twice, no settlement accepted through a stale lease.

Putting workers on one replica: a worker is given both replicas as one round-robin target,
"ipv4:<first>,<second>", with the second behind a FaultProxy that resets every connection (half
open) until the workers' Lease streams are open on the first. Then the proxy passes traffic and
the test waits until every worker's channel holds a connection to the second replica too, so a
worker whose stream on the first replica ends can open its next one on the second at once.
"""

from __future__ import annotations

import asyncio
import re
import signal
import time
from collections import Counter
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Mapping,
    Sequence,
)
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Final

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from taskbroker import Client, NewTask, Task, UnavailableError
from taskbroker.v1 import broker_service_pb2 as bs
from taskbroker.v1 import broker_service_pb2_grpc, lease_pb2, task_pb2
from tests.conftest import RunningBroker
from tests.faults.harness import Harness
from tests.faults.observe import POLL_S, QUEUE, eventually, final_tasks, queue_stats, until_stats
from tests.support.broker_process import BrokerProcess
from tests.support.fault_proxy import FaultProxy
from tests.support.history import Delivered, History, Report
from tests.support.lease_stream import LeaseStream
from tests.support.tasks import enqueue as enqueue_specs
from tests.support.tasks import get, spec
from tests.support.worker_process import WorkerProcess

if TYPE_CHECKING:
    from taskbroker.v1.broker_service_pb2_grpc import BrokerServiceAsyncStub

#: A unary call whose reply was dropped fails after this long.
SHORT_TIMEOUT_S: Final = 0.5


# --- helpers ----------------------------------------------------------------------------------


def kill(replica: BrokerProcess) -> None:
    """SIGKILL a broker process and reap it (it cannot hand anything back)."""
    replica.process.kill()
    replica.process.wait(10)
    replica.channel.close()


def stream_opens(replica: BrokerProcess, worker_id: str) -> int:
    """How many Lease streams the worker opened on this replica (from the broker's log)."""
    return replica.log.read_text(errors="replace").count(f"opened by {worker_id!r}")


class Replicas:
    """Broker processes on the session Redis; whatever still runs at teardown is killed."""

    def __init__(self, directory: Path, redis_url: str) -> None:
        self._dir = directory
        self._redis_url = redis_url
        self.started: list[BrokerProcess] = []

    async def start(
        self, name: str, env: Mapping[str, str] | None = None, port: int | None = None
    ) -> BrokerProcess:
        """Starts a replica (on `port`, to restart one) and waits until it serves."""
        replica = BrokerProcess(
            self._dir / f"data-{name}",
            {
                "TASKBROKER_REDIS_URL": self._redis_url,
                "TASKBROKER_REAP_INTERVAL_S": "0.1",
                **(env or {}),
            },
            port,
        )
        self.started.append(replica)
        await asyncio.to_thread(replica.wait_serving)
        return replica

    def close(self) -> None:
        for replica in self.started:
            if replica.process.poll() is None:
                kill(replica)
            replica.channel.close()


class Fleet(Harness):
    """Worker processes running "job" tasks against one target, and everyone's history files."""

    def start_jobs(
        self, worker_id: str, *, concurrency: int, lease: timedelta, sleep: timedelta
    ) -> WorkerProcess:
        return self.start(
            worker_id, {"job": "ok"}, concurrency=concurrency, lease=lease, sleep=sleep
        )

    def deliveries(self) -> list[Delivered]:
        return History.load(w.history for w in self.workers).deliveries

    async def stop(self) -> None:
        """SIGTERM every worker; each must exit cleanly."""
        codes = await asyncio.gather(*(w.aterminate() for w in self.workers))
        for worker, code in zip(self.workers, codes, strict=True):
            assert code == 0, worker.log_text()


async def put_workers_on(
    first: BrokerProcess, second: FaultProxy, workers: Sequence[WorkerProcess]
) -> None:
    """Waits until the workers' streams are open on `first`, then lets them connect to `second`.

    `second` must have been half open (resetting new connections) since the workers started.
    """
    ids = [w.worker_id for w in workers]

    async def all_on_first() -> bool:
        for worker in workers:
            assert worker.returncode is None, worker.log_text()
        return all(stream_opens(first, w) == 1 for w in ids)

    await eventually(all_on_first, 20, "every worker's stream open on the first replica")
    second.pass_through()

    async def all_connected() -> bool:
        return second.active_connections >= len(ids)

    # gRPC retries a refused subchannel after about 1 s, then 1.6 s, 2.6 s (+-20 %).
    await eventually(all_connected, 10, "every worker connected to the second replica")


def check(fleet: Fleet, tasks: Mapping[str, Task]) -> Report:
    """Runs the checker on the final states; nothing lost, unexpected, completed twice or
    settled through a stale lease."""
    report = fleet.check(tasks)
    assert (report.lost, report.unexpected, report.completed_twice, report.stale_accepted) == (
        (),
        (),
        (),
        (),
    ), report.render()
    return report


def outcome(task: Task) -> tuple[str, int, tuple[tuple[int, str], ...]]:
    """What a user reads back: state, attempts and every attempt's error."""
    return task.state.name, task.attempt, tuple((e.attempt, e.message) for e in task.errors)


# --- fault 3: a replica killed -9 under its workers --------------------------------------------

WORKERS: Final = ("w1", "w2", "w3")
CREDITS_PER_WORKER: Final = 8
CREDITS: Final = CREDITS_PER_WORKER * len(WORKERS)
#: Tasks running on the doomed replica's workers when it dies: half the workers' credits.
RUNNING: Final = CREDITS // 2
#: Tasks the doomed replica leased while its replies were lost: the other half of the credits.
IN_FLIGHT: Final = CREDITS - RUNNING
#: Tasks still pending when it dies.
LATER: Final = 60
LEASE: Final = timedelta(seconds=2)
HANDLER: Final = timedelta(seconds=1)
NS: Final = 1_000_000_000


async def test_workers_of_a_replica_killed_9_move_to_the_survivor_and_nothing_is_lost(
    replicas: Replicas, tmp_path: Path
) -> None:
    """Half the workers' credits run tasks when the replica dies; for the other half it has
    leased tasks whose deliveries were still on the way (its replies are dropped from just before
    that, which makes the window deterministic). The running tasks are settled through the
    survivor; the undelivered ones come back once their 2 s leases run out; the rest is served by
    the survivor."""
    doomed, survivor = await asyncio.gather(replicas.start("doomed"), replicas.start("survivor"))
    async with (
        FaultProxy() as to_doomed,
        FaultProxy() as to_survivor,
        Client(f"127.0.0.1:{survivor.port}") as client,
    ):
        await to_doomed.start("127.0.0.1", doomed.port)
        await to_survivor.start("127.0.0.1", survivor.port)
        to_survivor.half_open()
        fleet = Fleet(f"ipv4:{to_doomed.address},{to_survivor.address}", tmp_path)
        try:
            workers = [
                fleet.start_jobs(w, concurrency=CREDITS_PER_WORKER, lease=LEASE, sleep=HANDLER)
                for w in WORKERS
            ]
            await put_workers_on(doomed, to_survivor, workers)
            running = await fleet.enqueue(client, RUNNING)

            async def all_running() -> bool:
                return len(fleet.deliveries()) == RUNNING

            await eventually(all_running, 10, "the first tasks running")
            # What the doomed replica sends from now on is lost on the way: the deliveries of
            # the tasks it leases for the workers' other credits, and its answers to the acks
            # and extensions of the running tasks.
            to_doomed.drop_replies()
            leased_at = time.monotonic_ns()
            later = await fleet.enqueue(client, IN_FLIGHT + LATER, first=RUNNING)
            await until_stats(
                client, lambda s: s.pending == LATER, 5, "the doomed replica leased its credits"
            )
            kill(doomed)
            killed_at = time.monotonic_ns()
            to_doomed.reset()  # the dead host's connections end
            # The survivor reclaims what the dead replica leased once those leases run out.
            await until_stats(
                client,
                lambda s: s.reclaimed_total == IN_FLIGHT,
                LEASE.total_seconds() + 2,
                "the dead replica's undelivered tasks reclaimed",
            )
            total = RUNNING + IN_FLIGHT + LATER
            await until_stats(client, lambda s: s.succeeded_total == total, 20, "every task done")
            await fleet.stop()
            tasks = await final_tasks(client, running + later)
            stats = await queue_stats(client)
        finally:
            fleet.close()

    history = fleet.history()
    report = check(fleet, tasks)
    assert report.duplicate_deliveries == 0, report.render()
    # The tasks the dead replica leased but never delivered came back when their leases ran out
    # (not before), and ran once, on the survivor.
    seen_first = {d.task_id for d in history.deliveries if d.attempt == 1}
    in_flight = set(later) - seen_first
    assert len(in_flight) == IN_FLIGHT, report.render()
    assert stats.reclaimed_total == IN_FLIGHT
    assert Counter(outcome(tasks[t]) for t in in_flight) == {
        ("SUCCEEDED", 2, ((1, "lease expired"),)): IN_FLIGHT
    }
    assert Counter(outcome(t) for t in tasks.values() if t.id not in in_flight) == {
        ("SUCCEEDED", 1, ()): total - IN_FLIGHT
    }
    returned = [d.at_ns for d in history.deliveries if d.task_id in in_flight]
    assert min(returned) - leased_at >= LEASE.total_seconds() * NS
    # The tasks running when the replica died were settled afterwards, through the survivor
    # (a repeat when the dead replica had applied the ack and only its answer was lost).
    settled = {s.task_id: s for s in history.settlements}
    assert all(settled[t].at_ns > killed_at for t in running)
    assert {s.outcome for s in history.settlements} <= {"ok", "already"}
    # Every worker moved its stream to the survivor.
    assert [stream_opens(survivor, w) >= 1 for w in WORKERS] == [True] * len(WORKERS)


# --- fault 4: an Enqueue reply lost -----------------------------------------------------------


@pytest.fixture
async def proxy(running: RunningBroker) -> AsyncIterator[FaultProxy]:
    """A fault proxy in front of the in-process broker."""
    async with FaultProxy() as proxy:
        await proxy.start("127.0.0.1", running.broker.port)
        yield proxy


async def direct_stats(running: RunningBroker) -> tuple[int, int, int, int]:
    """(enqueued_total, succeeded_total, pending, leased) read past the proxy."""
    (stats,) = (await running.stub.Stats(bs.StatsRequest(queues=[QUEUE]))).queues
    return stats.enqueued_total, stats.succeeded_total, stats.pending, stats.leased


async def test_an_enqueue_retried_after_its_reply_was_lost_stores_one_task(
    running: RunningBroker, proxy: FaultProxy
) -> None:
    """The first call times out (the SDK does not repeat a DEADLINE_EXCEEDED), the producer
    repeats it with the same idempotency key once the network heals."""
    task = NewTask(QUEUE, "job", b"only once", idempotency_key="order-42")
    async with Client(proxy.address, timeout=SHORT_TIMEOUT_S) as producer:
        await producer.stats(QUEUE)  # connected before the fault
        proxy.drop_replies()
        with pytest.raises(UnavailableError) as lost:
            await producer.enqueue_many([task])
        assert lost.value.code is grpc.StatusCode.DEADLINE_EXCEEDED
        assert proxy.stats.bytes_dropped_to_client > 0
        # The request reached the broker and the task is stored: only the answer was lost.
        assert await direct_stats(running) == (1, 0, 1, 0)

        proxy.reset()  # heals: the torn connection is closed, new ones pass
        (retry,) = await producer.enqueue_many([task])
        (again,) = await producer.enqueue_many([task])

    assert retry.duplicate
    assert again == retry
    assert await direct_stats(running) == (1, 0, 1, 0)
    # The one stored task is the one whose id the retry returned.
    worker = await LeaseStream(running.stub).open([QUEUE], credits=2)
    (delivery,) = await worker.take(1)
    assert (delivery.task.id, delivery.task.payload) == (retry.task_id, b"only once")
    assert (await worker.ack(delivery)).outcome == lease_pb2.SETTLE_OUTCOME_OK
    assert worker.deliveries.empty()
    await worker.close()


# --- fault 5: an Ack reply lost ---------------------------------------------------------------


async def test_an_ack_retried_after_its_reply_was_lost_is_answered_already_settled(
    running: RunningBroker, proxy: FaultProxy
) -> None:
    """A unary Ack whose answer is lost times out; its repeat after healing is a success."""
    (task_id,) = await enqueue_specs(running.stub, spec(QUEUE, "job", b"x"))
    holder = await LeaseStream(running.stub).open([QUEUE], credits=1)
    (delivery,) = await holder.take(1)
    ack = lease_pb2.AckRequest(task_id=task_id, lease_id=delivery.lease_id, result=b"done")
    channel = grpc.aio.insecure_channel(proxy.address)
    try:
        worker: BrokerServiceAsyncStub = broker_service_pb2_grpc.BrokerServiceStub(channel)
        await worker.Stats(bs.StatsRequest(queues=[QUEUE]), timeout=5)  # connected first
        proxy.drop_replies()
        with pytest.raises(grpc.aio.AioRpcError) as lost:
            await worker.Ack(ack, timeout=SHORT_TIMEOUT_S)
        assert lost.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        # The ack was applied; only its answer was lost.
        assert (await get(running.stub, task_id)).state == task_pb2.TASK_STATE_SUCCEEDED

        proxy.reset()  # heals: the torn connection is closed, new ones pass
        reply = await retry_unavailable(lambda: worker.Ack(ack, timeout=5))
    finally:
        await channel.close()

    assert reply.already_settled
    task = await get(running.stub, task_id)
    assert (task.state, task.attempt, task.result, list(task.errors)) == (
        task_pb2.TASK_STATE_SUCCEEDED,
        1,
        b"done",
        [],
    )
    assert await direct_stats(running) == (1, 1, 0, 0)
    assert holder.deliveries.empty()
    await holder.close()


async def retry_unavailable(call: Callable[[], Awaitable[bs.AckResponse]]) -> bs.AckResponse:
    """Repeats a call that fails UNAVAILABLE (the channel noticing the reset), as a worker does."""
    for _ in range(4):
        try:
            return await call()
        except grpc.aio.AioRpcError as exc:
            if exc.code() is not grpc.StatusCode.UNAVAILABLE:
                raise
            await asyncio.sleep(0.1)
    return await call()


# --- fault 12: graceful shutdown under load ---------------------------------------------------

TOTAL: Final = 300
BATCH: Final = 10
GRACE_S: Final = 1.5
FAST: Final = ("fast-1", "fast-2")
SLOW: Final = "slow"
SLOW_CREDITS: Final = 4
#: The slow worker's handlers outlast the grace period by far.
SLOW_HANDLER: Final = timedelta(seconds=3)


async def produce(client: Client, fleet: Fleet) -> list[str]:
    """A steady stream of tasks, BATCH at a time."""
    ids: list[str] = []
    for first in range(0, TOTAL, BATCH):
        ids += await fleet.enqueue(client, BATCH, first=first)
        await asyncio.sleep(0.02)
    return ids


async def wait_exit(replica: BrokerProcess, timeout_s: float) -> int:
    deadline = time.monotonic() + timeout_s
    while (code := replica.process.poll()) is None:
        assert time.monotonic() < deadline, f"broker still running after {timeout_s}s"
        await asyncio.sleep(POLL_S)
    return code


async def test_a_replica_shut_down_under_load_hands_its_workers_over_without_loss_or_rerun(
    replicas: Replicas, tmp_path: Path
) -> None:
    """SIGTERM to a replica while its workers take a stream of tasks that a producer keeps
    enqueuing through the other replica. Two workers run tasks of 100 ms, and have some in
    flight at the signal; a third one's tasks take 3 s, longer than the 1.5 s grace period."""
    env = {"TASKBROKER_SHUTDOWN_GRACE_S": str(GRACE_S)}
    leaving, staying = await asyncio.gather(
        replicas.start("leaving", env), replicas.start("staying", env)
    )
    health_channel = grpc.aio.insecure_channel(f"127.0.0.1:{leaving.port}")
    health = health_pb2_grpc.HealthStub(health_channel)
    async with FaultProxy() as to_staying, Client(f"127.0.0.1:{staying.port}") as client:
        await to_staying.start("127.0.0.1", staying.port)
        to_staying.half_open()
        fleet = Fleet(f"ipv4:127.0.0.1:{leaving.port},{to_staying.address}", tmp_path)
        producer: asyncio.Task[list[str]] | None = None
        try:
            lease = timedelta(seconds=10)
            fast = [
                fleet.start_jobs(w, concurrency=4, lease=lease, sleep=timedelta(milliseconds=100))
                for w in FAST
            ]
            slow = fleet.start_jobs(SLOW, concurrency=SLOW_CREDITS, lease=lease, sleep=SLOW_HANDLER)
            await put_workers_on(leaving, to_staying, [*fast, slow])
            request = health_pb2.HealthCheckRequest()
            serving = health_pb2.HealthCheckResponse.SERVING
            assert (await health.Check(request, timeout=5)).status == serving
            producer = asyncio.create_task(produce(client, fleet))

            async def busy() -> bool:
                delivered = Counter(d.worker for d in fleet.deliveries())
                return delivered[SLOW] == SLOW_CREDITS and min(delivered[w] for w in FAST) >= 8

            await eventually(busy, 10, "every worker busy")
            leaving.process.send_signal(signal.SIGTERM)
            term_at = time.monotonic_ns()
            statuses: list[int] = []  # polled without a pause, from right after the signal
            while (not statuses or statuses[-1] == serving) and len(statuses) < 1000:
                statuses.append((await health.Check(request, timeout=1)).status)
            not_serving_s = (time.monotonic_ns() - term_at) / NS
            ids = await producer
            await until_stats(client, lambda s: s.succeeded_total == TOTAL, 20, "every task done")
            exit_code = await wait_exit(leaving, 5)
            await fleet.stop()
            tasks = await final_tasks(client, ids)
            stats = await queue_stats(client)
        finally:
            if producer is not None and not producer.done():
                producer.cancel()
            await health_channel.close()
            fleet.close()

    assert statuses[-1] == health_pb2.HealthCheckResponse.NOT_SERVING
    assert not_serving_s < 0.5
    assert exit_code == 0, leaving.log.read_text()
    for worker in fleet.workers:  # each got the drain notice and moved to the other replica
        assert re.search(r"lease stream \w+: the broker is shutting down", worker.log_text())
        assert stream_opens(staying, worker.worker_id) >= 1
    history = fleet.history()
    report = check(fleet, tasks)

    # The slow worker's tasks were still running at the deadline: the worker moved their leases
    # to the other replica at the drain notice (lease resume), so they ran once and their acks,
    # sent after the grace period, were accepted there.
    deliveries = history.deliveries
    held = {d.task_id for d in deliveries if d.worker == SLOW and d.at_ns < term_at}
    assert len(held) == SLOW_CREDITS
    assert stats.reclaimed_total == 0
    assert report.duplicate_deliveries == 0, report.render()
    assert report.stale_refused == 0, report.render()
    # Every task ran once, and every ack was accepted, those in flight at SIGTERM included.
    assert Counter(outcome(t) for t in tasks.values()) == {("SUCCEEDED", 1, ()): TOTAL}
    assert Counter((s.kind, s.outcome) for s in history.settlements) == {("ack", "ok"): TOTAL}
    delivered_at = {(d.task_id, d.lease_id): d.at_ns for d in deliveries}
    in_flight = [
        s
        for s in history.settlements
        if s.outcome == "ok" and delivered_at[s.task_id, s.lease_id] < term_at < s.at_ns
    ]
    assert in_flight, "no ack was in flight at SIGTERM"
    # No task whose ack was accepted was delivered again.
    acked_at = {s.task_id: s.at_ns for s in history.settlements if s.outcome == "ok"}
    assert [d.task_id for d in deliveries if d.at_ns > acked_at[d.task_id]] == []


# --- lease resume: a rolling restart under long tasks, and a worker killed -9 ------------------

ROLLING_TASKS: Final = 200
ROLLING_WORKERS: Final = ("r1", "r2", "r3", "r4")
LONG_HANDLER: Final = timedelta(seconds=5)


async def restart(replicas: Replicas, replica: BrokerProcess, name: str) -> BrokerProcess:
    """SIGTERM a replica, wait for its clean exit, and start it again on the same port."""
    replica.process.send_signal(signal.SIGTERM)
    assert await wait_exit(replica, 10) == 0, replica.log.read_text()
    replica.channel.close()
    return await replicas.start(name, {"TASKBROKER_SHUTDOWN_GRACE_S": "2"}, port=replica.port)


async def test_a_rolling_restart_of_both_replicas_under_long_tasks_reruns_nothing(
    replicas: Replicas, tmp_path: Path
) -> None:
    """200 tasks of 5 s run on four workers spread over two replicas; each replica in turn is
    shut down and restarted while they run. The workers move their leases to the other replica
    at each drain notice (lease resume): every task runs exactly once. Then a worker is killed
    -9 mid-task, and its tasks are running again elsewhere within a second."""
    env = {"TASKBROKER_SHUTDOWN_GRACE_S": "2"}
    a, b = await asyncio.gather(replicas.start("a", env), replicas.start("b", env))
    async with Client(f"ipv4:127.0.0.1:{a.port},127.0.0.1:{b.port}") as client:
        fleet = Fleet(f"ipv4:127.0.0.1:{a.port},127.0.0.1:{b.port}", tmp_path)
        try:
            workers = [
                fleet.start_jobs(w, concurrency=50, lease=timedelta(seconds=30), sleep=LONG_HANDLER)
                for w in ROLLING_WORKERS
            ]
            ids = await fleet.enqueue(client, ROLLING_TASKS)

            async def all_running() -> bool:
                return len({d.task_id for d in fleet.deliveries()}) == ROLLING_TASKS

            await eventually(all_running, 15, "every task running")
            a = await restart(replicas, a, "a2")
            await asyncio.sleep(0.5)  # the workers' channels reconnect to the new replica
            b = await restart(replicas, b, "b2")
            await until_stats(
                client, lambda s: s.succeeded_total == ROLLING_TASKS, 30, "every task done"
            )
            tasks = await final_tasks(client, ids)
            rolling = fleet.history()

            # A worker killed -9 while it runs tasks: they are leased again within a second.
            doomed = workers[0]
            more = await fleet.enqueue(client, 40, first=ROLLING_TASKS)

            async def doomed_busy() -> bool:
                return any(d.worker == doomed.worker_id and d.task_id in more
                           for d in fleet.deliveries())  # fmt: skip

            await eventually(doomed_busy, 10, "the doomed worker running new tasks")
            await asyncio.sleep(0.2)  # the rest of its batch arrives
            held = {d.task_id for d in fleet.deliveries() if d.worker == doomed.worker_id
                    and d.task_id in more}  # fmt: skip
            doomed.kill()
            killed_at = time.monotonic_ns()

            async def rerun() -> bool:
                again = {d.task_id for d in fleet.deliveries() if d.task_id in held
                         and d.attempt == 2}  # fmt: skip
                return again == held

            await eventually(rerun, 5, "the killed worker's tasks leased again")
            back_at = max(d.at_ns for d in fleet.deliveries() if d.task_id in held
                          and d.attempt == 2)  # fmt: skip
            await until_stats(
                client, lambda s: s.succeeded_total == ROLLING_TASKS + 40, 20, "every task done"
            )
            fleet.workers.remove(doomed)
            await fleet.stop()
        finally:
            fleet.close()

    report = rolling.check({t.id: t.state.name for t in tasks.values()})
    assert (report.lost, report.unexpected, report.completed_twice, report.stale_accepted) == (
        (),
        (),
        (),
        (),
    ), report.render()
    assert report.duplicate_deliveries == 0 and report.stale_refused == 0, report.render()
    assert Counter(outcome(t) for t in tasks.values()) == {("SUCCEEDED", 1, ()): ROLLING_TASKS}
    for worker in workers:  # every worker was told to move at least once
        assert re.search(r"lease stream \w+: the broker is shutting down", worker.log_text())
    assert held and (back_at - killed_at) / NS < 1.0
