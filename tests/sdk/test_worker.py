"""Worker through a real in-process broker: outcomes, leases, concurrency, revocation, shutdown,
reconnects; and taskbroker.testing.run_handler without a broker."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from typing import Any

import pytest

from broker.config import Settings
from taskbroker import testing
from taskbroker._client import Client
from taskbroker._connector import Capacity
from taskbroker._errors import NonRetryable, RetryLater, UnavailableError
from taskbroker._handler import Handler, TaskContext, handler
from taskbroker._lease_stream import LeaseStream
from taskbroker._lifecycle import Lifecycle
from taskbroker._models import Task, TaskState
from taskbroker._worker import Worker
from taskbroker.v1 import lease_pb2
from tests.conftest import RunningBroker, start_broker

#: Reconnect fast, so a test that restarts the broker does not wait out gRPC's 1 s backoff.
FAST_RECONNECT = [("grpc.initial_reconnect_backoff_ms", 50), ("grpc.max_reconnect_backoff_ms", 50)]
#: Short broker backoff for retried attempts.
QUICK_RETRY = timedelta(milliseconds=20)


@pytest.fixture
async def client(running: RunningBroker) -> AsyncIterator[Client]:
    async with Client(running.target, options=FAST_RECONNECT) as client:
        yield client


def new_worker(client: Client, *handlers: Handler, **options: object) -> Worker:
    settings: dict[str, object] = {
        "queues": ["jobs"],
        "worker_id": "test-worker",
        "shutdown_grace": timedelta(seconds=2),
        **options,
    }
    return Worker(client, handlers=handlers, **settings)  # type: ignore[arg-type]


async def finished(client: Client, task_id: str) -> Task:
    return await client.wait(task_id, timeout=5)


@handler("echo")
async def echo(ctx: TaskContext, payload: bytes) -> bytes:
    return payload.upper()


# --- outcomes -------------------------------------------------------------------------------


async def test_returned_bytes_ack_the_task_with_the_result(client: Client) -> None:
    @handler("quiet")
    async def quiet(ctx: TaskContext, payload: bytes) -> None:
        pass

    echoed = await client.enqueue("jobs", "echo", b"hello")
    silent = await client.enqueue("jobs", "quiet", b"x")

    assert await new_worker(client, echo, quiet).run_until_idle() == 2

    task = await client.get_task(echoed)
    assert (task.state, task.result, task.attempt, task.errors) == (
        TaskState.SUCCEEDED,
        b"HELLO",
        1,
        (),
    )
    assert (await client.get_task(silent)).state is TaskState.SUCCEEDED


async def test_a_handler_knows_its_tasks_group_key(client: Client) -> None:
    @handler("tenant")
    async def tenant(ctx: TaskContext, payload: bytes) -> bytes:
        return ctx.group_key.encode() or b"-"

    keyed = await client.enqueue("jobs", "tenant", b"", group_key="acme")
    plain = await client.enqueue("jobs", "tenant", b"")

    assert await new_worker(client, tenant).run_until_idle() == 2
    assert (await client.get_task(keyed)).result == b"acme"
    assert (await client.get_task(plain)).result == b"-"


async def test_retry_later_retries_after_the_delay_and_the_second_attempt_succeeds(
    client: Client,
) -> None:
    started: list[float] = []

    @handler("later")
    async def later(ctx: TaskContext, payload: bytes) -> bytes:
        started.append(time.monotonic())
        if ctx.attempt == 1:
            raise RetryLater(timedelta(milliseconds=400), "mailbox busy")
        return b"done"

    task_id = await client.enqueue("jobs", "later")
    async with new_worker(client, later):
        task = await finished(client, task_id)

    assert (task.state, task.attempt, task.result) == (TaskState.SUCCEEDED, 2, b"done")
    assert [e.message for e in task.errors] == ["RetryLater: mailbox busy"]
    assert started[1] - started[0] >= 0.35  # the handler's delay, not the broker's 20 ms backoff


async def test_non_retryable_dead_letters_with_its_message(client: Client) -> None:
    @handler("invalid")
    async def invalid(ctx: TaskContext, payload: bytes) -> None:
        raise NonRetryable("no such mailbox")

    task_id = await client.enqueue("jobs", "invalid", max_attempts=5)
    async with new_worker(client, invalid):
        task = await finished(client, task_id)

    assert (task.state, task.attempt) == (TaskState.DEAD, 1)
    assert task.last_error == "NonRetryable: no such mailbox"


async def test_other_exceptions_are_retried_with_the_broker_backoff(client: Client) -> None:
    @handler("flaky")
    def flaky(ctx: TaskContext, payload: bytes) -> bytes:
        if ctx.attempt < 3:
            raise ConnectionError(f"try {ctx.attempt}")
        return b"third time lucky"

    task_id = await client.enqueue(
        "jobs", "flaky", initial_backoff=QUICK_RETRY, max_backoff=QUICK_RETRY
    )
    async with new_worker(client, flaky):
        task = await finished(client, task_id)

    assert (task.state, task.attempt, task.result) == (
        TaskState.SUCCEEDED,
        3,
        b"third time lucky",
    )
    assert [e.message for e in task.errors] == ["ConnectionError: try 1", "ConnectionError: try 2"]


@pytest.mark.parametrize(
    ("handler_options", "worker_options"),
    [
        ({"non_retryable": (KeyError,)}, {}),
        ({}, {"non_retryable": [KeyError]}),
        ({"retry_on": (TimeoutError,)}, {}),  # only timeouts are worth a retry
    ],
    ids=["handler-non-retryable", "worker-non-retryable", "not-in-retry-on"],
)
async def test_configured_exceptions_dead_letter_at_once(
    client: Client, handler_options: dict[str, object], worker_options: dict[str, object]
) -> None:
    async def lookup(ctx: TaskContext, payload: bytes) -> None:
        raise KeyError("user 42")

    h = handler("lookup", **handler_options)(lookup)  # type: ignore[arg-type]
    task_id = await client.enqueue(
        "jobs", "lookup", initial_backoff=QUICK_RETRY, max_backoff=QUICK_RETRY
    )
    async with new_worker(client, h, **worker_options):
        task = await finished(client, task_id)

    assert (task.state, task.attempt, task.last_error) == (TaskState.DEAD, 1, "KeyError: 'user 42'")


async def test_a_handler_over_its_timeout_is_cancelled_and_nacked(client: Client) -> None:
    seen: list[TaskContext] = []

    @handler("slow", timeout=timedelta(milliseconds=100))
    async def slow(ctx: TaskContext, payload: bytes) -> None:
        seen.append(ctx)
        await asyncio.sleep(10)

    task_id = await client.enqueue(
        "jobs", "slow", max_attempts=2, initial_backoff=QUICK_RETRY, max_backoff=QUICK_RETRY
    )
    started = time.monotonic()
    async with new_worker(client, slow):
        task = await finished(client, task_id)

    assert time.monotonic() - started < 3
    assert (task.state, task.attempt) == (TaskState.DEAD, 2)  # out of attempts
    assert [e.message for e in task.errors] == ["timed out after 0.1s"] * 2
    assert all(ctx.cancelled and ctx.cancel_reason == "timed out" for ctx in seen)


async def test_a_task_type_without_a_handler_is_dead_lettered(client: Client) -> None:
    task_id = await client.enqueue("jobs", "resize_image", max_attempts=5)
    async with new_worker(client, echo):
        task = await finished(client, task_id)

    assert (task.state, task.attempt) == (TaskState.DEAD, 1)
    assert "no handler for task type 'resize_image'" in task.last_error


async def test_a_settlement_refused_as_stale_is_counted_not_raised(
    client: Client, running: RunningBroker
) -> None:
    @handler("meddle")
    async def meddle(ctx: TaskContext, payload: bytes) -> bytes:
        # Someone else settles the lease first, so the worker's ack finds it stale.
        await running.stub.Nack(
            lease_pb2.NackRequest(task_id=ctx.task_id, lease_id=ctx.lease_id, dead_letter=True)
        )
        return b"too late"

    task_id = await client.enqueue("jobs", "meddle")
    worker = new_worker(client, meddle)
    assert await worker.run_until_idle() == 1

    assert worker.stale_settlements == 1
    assert (await client.get_task(task_id)).state is TaskState.DEAD


# --- leases and concurrency -----------------------------------------------------------------


async def test_a_handler_running_three_leases_long_keeps_its_lease(client: Client) -> None:
    calls: list[int] = []

    @handler("long")
    async def long(ctx: TaskContext, payload: bytes) -> bytes:
        calls.append(ctx.attempt)
        await asyncio.sleep(0.9)
        return b"finished"

    task_id = await client.enqueue("jobs", "long")
    worker = new_worker(client, long, lease_duration=timedelta(milliseconds=300))
    assert await worker.run_until_idle() == 1

    task = await client.get_task(task_id)
    assert (task.state, task.attempt, task.errors, task.result) == (
        TaskState.SUCCEEDED,
        1,
        (),
        b"finished",
    )
    assert calls == [1]  # never redelivered
    assert worker.stale_settlements == 0


async def test_a_lost_lease_sets_the_context_cancelled(
    client: Client, running: RunningBroker
) -> None:
    seen: list[str] = []

    @handler("orphan")
    async def orphan(ctx: TaskContext, payload: bytes) -> None:
        # The lease is settled behind the worker's back: its next extension is refused.
        nack = lease_pb2.NackRequest(task_id=ctx.task_id, lease_id=ctx.lease_id, dead_letter=True)
        await running.stub.Nack(nack)
        async with asyncio.timeout(5):
            await ctx.wait_cancelled()
        seen.append(ctx.cancel_reason)

    await client.enqueue("jobs", "orphan")
    worker = new_worker(client, orphan, lease_duration=timedelta(milliseconds=200))
    assert await worker.run_until_idle() == 1

    assert seen == ["lease lost"]
    assert worker.stale_settlements == 1  # its ack came too late as well


async def test_never_more_handlers_run_than_the_concurrency(client: Client) -> None:
    running_now = 0
    most = 0

    @handler("busy")
    async def busy(ctx: TaskContext, payload: bytes) -> None:
        nonlocal running_now, most
        running_now += 1
        most = max(most, running_now)
        await asyncio.sleep(0.1)
        running_now -= 1

    ids = [await client.enqueue("jobs", "busy") for _ in range(10)]
    assert await new_worker(client, busy, concurrency=3).run_until_idle() == 10

    assert most == 3
    assert {(await client.get_task(i)).state for i in ids} == {TaskState.SUCCEEDED}


async def test_a_finished_task_s_slot_is_granted_in_the_frame_that_acks_it(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The worker need not wait for the broker's answer to an ack before asking for the next
    # task: the credit travels with the ack, one round trip per task instead of two.
    frames: list[lease_pb2.Settlements] = []
    next_frame = LeaseStream._next_frame

    def recorded(stream: LeaseStream, first: Any) -> tuple[lease_pb2.LeaseRequest | None, bool]:
        frame, half_close = next_frame(stream, first)
        if frame is not None:
            frames.append(frame.settlements)
        return frame, half_close

    monkeypatch.setattr(LeaseStream, "_next_frame", recorded)
    for i in range(3):
        await client.enqueue("jobs", "echo", str(i).encode())

    assert await new_worker(client, echo, concurrency=1).run_until_idle() == 3

    # The first ack always does (later ones may wait for an answer: at most twice
    # `concurrency` acks at a time hand their slot back before theirs comes).
    first_ack = next(f for f in frames if f.acks)
    assert (len(first_ack.acks), first_ack.credits) == (1, 1)


def test_settlements_hand_their_slot_back_before_their_answer_up_to_twice_the_concurrency() -> None:
    """So a broker slow to answer acks holds at most three times the concurrency of leases."""
    capacity = Capacity(2, Lifecycle())
    for _ in range(2):  # two deliveries finished, then two more on the credits they gave back
        capacity.held = 2
        assert [capacity.hand_back_early() for _ in range(2)] == [True, True]
    capacity.held = 2  # and two more: their settlements wait for an answer, as before
    assert capacity.hand_back_early() is False
    assert (capacity.held, capacity.settling) == (2, 4)
    capacity.settled()
    assert capacity.hand_back_early() is True


async def test_sync_handlers_run_in_the_worker_threads_and_async_ones_on_the_loop(
    client: Client,
) -> None:
    threads: dict[str, str] = {}

    @handler("sync")
    def sync(ctx: TaskContext, payload: bytes) -> bytes:
        time.sleep(0.05)  # blocking is fine here: this is a worker thread
        threads["sync"] = threading.current_thread().name
        return b"from a thread"

    @handler("async")
    async def async_(ctx: TaskContext, payload: bytes) -> bytes:
        threads["async"] = threading.current_thread().name
        return b"from the loop"

    sync_id = await client.enqueue("jobs", "sync")
    async_id = await client.enqueue("jobs", "async")
    assert await new_worker(client, sync, async_).run_until_idle() == 2

    assert threads["sync"].startswith("taskbroker-handler")
    assert threads["async"] == threading.current_thread().name
    assert (await client.get_task(sync_id)).result == b"from a thread"
    assert (await client.get_task(async_id)).result == b"from the loop"


async def test_cancelling_a_running_task_sets_its_context_cancelled(client: Client) -> None:
    started = asyncio.Event()
    seen: list[tuple[bool, str]] = []

    @handler("watch")
    async def watch(ctx: TaskContext, payload: bytes) -> bytes:
        started.set()
        async with asyncio.timeout(5):
            await ctx.wait_cancelled()
        seen.append((ctx.cancelled, ctx.cancel_reason))
        return b"stopped early"

    task_id = await client.enqueue("jobs", "watch")
    worker = new_worker(client, watch)
    async with worker:
        await asyncio.wait_for(started.wait(), 5)
        await client.cancel(task_id)
        await eventually(lambda: worker.processed == 1)

    assert seen == [(True, "cancelled")]
    assert (await client.get_task(task_id)).state is TaskState.CANCELLED
    assert worker.stale_settlements == 0  # a revoked lease is not settled


async def eventually(check: Callable[[], bool], within_s: float = 5.0) -> None:
    """Waits (polling every 10 ms) until check() is true; fails after within_s."""
    for _ in range(int(within_s * 100)):
        if check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not met in time")


# --- shutdown and reconnects ----------------------------------------------------------------


async def test_shutdown_lets_short_tasks_finish_and_nacks_the_rest(client: Client) -> None:
    started: list[str] = []
    contexts: dict[str, TaskContext] = {}

    @handler("work")
    async def work(ctx: TaskContext, payload: bytes) -> bytes:
        started.append(ctx.task_id)
        contexts[ctx.task_id] = ctx
        await asyncio.sleep(0.2 if payload == b"short" else 30)
        return b"ok"

    short = [await client.enqueue("jobs", "work", b"short") for _ in range(3)]
    long = await client.enqueue(
        "jobs", "work", b"long", initial_backoff=QUICK_RETRY, max_backoff=QUICK_RETRY
    )
    worker = new_worker(client, work, concurrency=4, shutdown_grace=timedelta(milliseconds=600))
    async with worker:
        await eventually(lambda: len(started) == 4)
        began = time.monotonic()
    assert time.monotonic() - began < 2  # the grace period, not the long task

    for task_id in short:
        task = await client.get_task(task_id)
        assert (task.state, task.result, task.attempt) == (TaskState.SUCCEEDED, b"ok", 1)
    stopped = await client.get_task(long)
    assert stopped.state in (TaskState.SCHEDULED, TaskState.PENDING)  # to be retried
    assert [e.message for e in stopped.errors] == ["worker shut down"]
    assert contexts[long].cancelled
    assert worker.processed == 4


def slow_and_fast_steps(slow_attempts: list[int], slow_s: float = 1.0) -> Handler:
    @handler("step")
    async def step(ctx: TaskContext, payload: bytes) -> bytes:
        if payload == b"slow":
            slow_attempts.append(ctx.attempt)
            await asyncio.sleep(slow_s)  # outlives the broker's drain
        else:
            await asyncio.sleep(0.05)
        return payload

    return step


async def test_worker_resumes_its_leases_when_its_broker_restarts_and_runs_nothing_twice(
    settings: Settings,
) -> None:
    # A broker restart that outlasts the default resume window would re-run the slow task; this
    # one keeps detached leases for 1 s, so the worker can resume them after the restart. The
    # handler outlives that window: only a resume (which renews the lease) saves its attempt.
    first = await start_broker(settings, resume_window_s=1.0)
    port = first.broker.port
    client = Client(first.target)
    slow_attempts: list[int] = []
    slow = await client.enqueue("jobs", "step", b"slow")
    ids = [await client.enqueue("jobs", "step", str(i).encode()) for i in range(10)]
    worker = new_worker(client, slow_and_fast_steps(slow_attempts, slow_s=2.5), concurrency=2)
    async with worker:
        await eventually(lambda: slow_attempts == [1])
        await first.broker.stop(grace_s=0.2)  # the slow task is still running when grace ends
        await first.channel.close()
        await asyncio.sleep(0.2)  # the worker is reconnecting to nothing
        restarted = await start_broker(settings, listen=f"127.0.0.1:{port}")
        try:
            tasks = [await wait_through_outage(client, i) for i in [slow, *ids]]
        finally:
            await worker.shutdown()
            await restarted.close()
            await client.close()

    assert [t.state for t in tasks] == [TaskState.SUCCEEDED] * 11
    assert [t.result for t in tasks] == [b"slow", *(str(i).encode() for i in range(10))]
    assert slow_attempts == [1] and [t.attempt for t in tasks] == [1] * 11
    assert worker.stale_settlements == 0


async def test_a_rolling_restart_of_two_replicas_moves_running_tasks_and_reruns_none(
    settings: Settings,
) -> None:
    a = await start_broker(settings)
    b = await start_broker(settings)
    client = Client(f"ipv4:{a.target},{b.target}")  # round robin over both replicas
    slow_attempts: list[int] = []
    try:
        slow = [await client.enqueue("jobs", "step", b"slow") for _ in range(4)]
        worker = new_worker(client, slow_and_fast_steps(slow_attempts, slow_s=3.0), concurrency=8)
        async with worker:
            await eventually(lambda: len(slow_attempts) == 4)
            # Each replica in turn drains and stops while the slow handlers run: the worker moves
            # its leases to the other replica at the drain notice. As in a rolling deploy, the
            # second replica stops once the first is back and reachable.
            await a.broker.stop(grace_s=0.3)
            fast = [await client.enqueue("jobs", "step", str(i).encode()) for i in range(5)]
            a = await start_broker(settings, listen=a.target)
            await asyncio.sleep(0.5)
            await b.broker.stop(grace_s=0.3)
            tasks = [await wait_through_outage(client, i) for i in [*slow, *fast]]
            await worker.shutdown()
    finally:
        await client.close()
        await a.close()
        await b.close()

    assert [t.state for t in tasks] == [TaskState.SUCCEEDED] * 9
    assert slow_attempts == [1] * 4 and [t.attempt for t in tasks] == [1] * 9
    assert worker.stale_settlements == 0


async def test_sigterm_stops_run_gracefully_and_the_old_handler_comes_back(
    client: Client,
) -> None:
    assert threading.current_thread() is threading.main_thread()  # else SIGTERM would kill us
    before = signal.getsignal(signal.SIGTERM)
    started = asyncio.Event()

    @handler("nap")
    async def nap(ctx: TaskContext, payload: bytes) -> bytes:
        started.set()
        await asyncio.sleep(0.2)
        return b"rested"

    task_id = await client.enqueue("jobs", "nap")
    worker = new_worker(client, nap)
    serving = asyncio.create_task(worker.run())
    await asyncio.wait_for(started.wait(), 5)
    os.kill(os.getpid(), signal.SIGTERM)
    await asyncio.wait_for(serving, 5)

    assert (await client.get_task(task_id)).state is TaskState.SUCCEEDED
    assert signal.getsignal(signal.SIGTERM) == before


async def wait_through_outage(client: Client, task_id: str) -> Task:
    async with asyncio.timeout(10):
        while True:
            try:
                return await client.wait(task_id)
            except UnavailableError:  # the channel has not reconnected yet
                await asyncio.sleep(0.05)


async def test_run_until_idle_returns_how_many_tasks_it_processed(client: Client) -> None:
    for i in range(5):
        await client.enqueue("jobs", "echo", str(i).encode())
    worker = new_worker(client, echo)

    started = time.monotonic()
    assert await worker.run_until_idle(idle_for=timedelta(milliseconds=200)) == 5
    assert time.monotonic() - started < 2
    assert await worker.run_until_idle(idle_for=timedelta(milliseconds=100)) == 0
    assert worker.processed == 5


async def test_an_invalid_queue_name_fails_run_instead_of_retrying(client: Client) -> None:
    worker = new_worker(client, echo, queues=["not a queue"])
    with pytest.raises(Exception, match=r"open\.queues"):
        await asyncio.wait_for(worker.run(), 5)


def test_worker_options_are_checked_up_front() -> None:
    client = Client("127.0.0.1:1")
    with pytest.raises(ValueError, match="concurrency"):
        Worker(client, queues=["jobs"], handlers=[echo], concurrency=0)
    with pytest.raises(ValueError, match="queues"):
        Worker(client, queues=[], handlers=[echo])
    with pytest.raises(ValueError, match="two handlers"):
        Worker(client, queues=["jobs"], handlers=[echo, echo])


# --- testing.run_handler --------------------------------------------------------------------


@handler("fails", non_retryable=(LookupError,))
async def fails(ctx: TaskContext, payload: bytes) -> bytes:
    kind = payload.decode()
    if kind == "later":
        raise RetryLater(timedelta(minutes=5))
    if kind == "never":
        raise NonRetryable("bad input")
    if kind == "lookup":
        raise KeyError("k")
    if kind == "wrong-type":
        return "text"  # type: ignore[return-value]
    raise ValueError(kind)


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (
            b"later",
            testing.HandlerOutcome(
                "retry", retry_delay=timedelta(minutes=5), error="RetryLater: retry requested"
            ),
        ),
        (b"never", testing.HandlerOutcome("dead", error="NonRetryable: bad input")),
        (b"lookup", testing.HandlerOutcome("dead", error="KeyError: 'k'")),
        (b"boom", testing.HandlerOutcome("error", error="ValueError: boom")),
        (
            b"wrong-type",
            testing.HandlerOutcome(
                "error", error="TypeError: handler returned str, not bytes or None"
            ),
        ),
    ],
)
async def test_run_handler_maps_outcomes_as_the_worker_does(
    payload: bytes, expected: testing.HandlerOutcome
) -> None:
    assert await testing.run_handler(fails, payload) == expected


async def test_run_handler_acks_and_passes_the_context() -> None:
    @handler("sync_echo")
    def sync_echo(ctx: TaskContext, payload: bytes) -> bytes:
        return f"{ctx.attempt}/{ctx.max_attempts} {ctx.headers['who']} {payload.decode()}".encode()

    outcome = await testing.run_handler(
        sync_echo, b"hi", attempt=2, max_attempts=3, headers={"who": "me"}
    )
    assert outcome == testing.HandlerOutcome("ack", result=b"2/3 me hi")


async def test_run_handler_applies_the_timeout_and_cancellation() -> None:
    @handler("sleepy", timeout=timedelta(milliseconds=50))
    async def sleepy(ctx: TaskContext, payload: bytes) -> None:
        await asyncio.sleep(5)

    @handler("polite")
    async def polite(ctx: TaskContext, payload: bytes) -> bytes:
        await ctx.wait_cancelled()
        return ctx.cancel_reason.encode()

    timed_out = await testing.run_handler(sleepy)
    assert timed_out == testing.HandlerOutcome("error", error="timed out after 0.05s")
    cancelled = await testing.run_handler(polite, cancel_after=timedelta(milliseconds=20))
    assert cancelled == testing.HandlerOutcome("ack", result=b"cancelled")
