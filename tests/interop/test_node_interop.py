"""The Node.js client (clients/node) against an in-process broker, next to the Python SDK.

Python producer → broker → Node worker (results, a retry, a dead letter, a lease the worker
extends, graceful SIGTERM), and Node producer → broker → Python worker. Reconnects, drains and
lease resume are in test_node_reconnect.py.
The Node programs run as subprocesses (`bin/worker.js`, `bin/produce.js`), started with
asyncio so the broker, which runs on the test's event loop, keeps serving them.

Skipped only when `node` is missing; a missing `clients/node/node_modules` fails the tests, so
CI notices that `make install` did not run `npm ci` there.
"""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import AsyncIterator, Sequence
from datetime import timedelta
from pathlib import Path

import pytest

from taskbroker import (
    Client,
    NewTask,
    NonRetryable,
    RateLimit,
    TaskContext,
    TaskState,
    Worker,
    handler,
)
from tests.conftest import RunningBroker
from tests.faults.observe import eventually
from tests.interop.node_process import NODE, NODE_DIR, QUEUE, WAIT_S, NodeWorker

pytestmark = pytest.mark.skipif(
    NODE is None, reason="node is not installed: the Node.js interop tests need it on PATH"
)


async def until_leased(client: Client, task_id: str) -> None:
    async def leased() -> bool:
        return (await client.get_task(task_id)).state is TaskState.LEASED

    await eventually(leased, WAIT_S, f"task {task_id} is leased")


async def produce(node: str, target: str, *args: str) -> dict[str, object]:
    """Runs `node bin/produce.js` and returns the JSON line it printed."""
    process = await asyncio.create_subprocess_exec(
        node, "bin/produce.js", "--target", target, "--queue", QUEUE, *args,
        cwd=NODE_DIR, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(process.communicate(), WAIT_S)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise AssertionError("produce.js did not finish") from None
    assert process.returncode == 0, err.decode(errors="replace")
    line: dict[str, object] = json.loads(out)
    return line


# --- Python producer → broker → Node worker ---------------------------------------------------


async def test_node_worker_acks_results_and_retries(
    client: Client, node_worker: NodeWorker
) -> None:
    echo = await client.enqueue(QUEUE, "echo", b"\x00hello\xff")
    upper = await client.enqueue(QUEUE, "upper", b"shout")
    flaky = await client.enqueue(QUEUE, "fail_once", b"second time", max_attempts=3)

    task = await client.wait(echo, timeout=WAIT_S)
    assert (task.state, task.attempt, task.result) == (TaskState.SUCCEEDED, 1, b"\x00hello\xff")
    task = await client.wait(upper, timeout=WAIT_S)
    assert (task.state, task.attempt, task.result) == (TaskState.SUCCEEDED, 1, b"SHOUT")
    task = await client.wait(flaky, timeout=WAIT_S)
    assert (task.state, task.attempt, task.result) == (TaskState.SUCCEEDED, 2, b"second time")
    assert [(e.attempt, e.message) for e in task.errors] == [(1, "attempt 1 fails on purpose")]


async def test_node_worker_dead_letters_non_retryable_and_unknown_types(
    client: Client, node_worker: NodeWorker
) -> None:
    rejected = await client.enqueue(QUEUE, "reject", b"", max_attempts=5)
    unknown = await client.enqueue(QUEUE, "no_such_type", b"", max_attempts=5)

    task = await client.wait(rejected, timeout=WAIT_S)
    assert (task.state, task.attempt) == (TaskState.DEAD, 1)
    assert task.last_error == "this task can never succeed"
    task = await client.wait(unknown, timeout=WAIT_S)
    assert (task.state, task.attempt) == (TaskState.DEAD, 1)
    assert "no handler for task type no_such_type" in task.last_error


async def test_node_worker_extends_the_lease_of_a_long_task(
    node: str, running: RunningBroker, client: Client, tmp_path: Path
) -> None:
    # A 300 ms lease and a 1 s handler: without extensions the reaper would reclaim the task and
    # the ack would be refused as stale.
    worker = await NodeWorker.start(node, running.target, tmp_path / "worker.log", lease_ms=300)
    try:
        task_id = await client.enqueue(QUEUE, "sleep", b"1000")
        task = await client.wait(task_id, timeout=WAIT_S)
        assert (task.state, task.attempt, task.result) == (
            TaskState.SUCCEEDED,
            1,
            b"slept 1000 ms",
        ), worker.text()
        (stats,) = await client.stats(QUEUE)
        assert stats.reclaimed_total == 0
    finally:
        await worker.close()


async def test_sigterm_lets_the_node_worker_finish_its_task(
    node: str, running: RunningBroker, client: Client, tmp_path: Path
) -> None:
    worker = await NodeWorker.start(node, running.target, tmp_path / "worker.log", concurrency=1)
    try:
        in_flight = await client.enqueue(QUEUE, "sleep", b"800")
        await until_leased(client, in_flight)
        worker.process.send_signal(signal.SIGTERM)
        queued = await client.enqueue(QUEUE, "echo", b"left for another worker")

        assert await worker.wait_exit() == 0, worker.text()
        task = await client.get_task(in_flight)
        assert (task.state, task.attempt, task.result) == (
            TaskState.SUCCEEDED,
            1,
            b"slept 800 ms",
        ), worker.text()
        # It stopped crediting: the task enqueued after SIGTERM was never leased to it.
        task = await client.get_task(queued)
        assert (task.state, task.attempt) == (TaskState.PENDING, 0)
    finally:
        await worker.close()


async def test_node_worker_takes_a_burst_of_tasks(
    node: str, running: RunningBroker, client: Client, tmp_path: Path
) -> None:
    """200 tasks at once to 64 slots: every delivery arrives and every ack is answered."""
    worker = await NodeWorker.start(node, running.target, tmp_path / "worker.log", concurrency=64)
    try:
        burst = [NewTask(QUEUE, "echo", f"burst {i}".encode()) for i in range(200)]
        ids = [result.task_id for result in await client.enqueue_many(burst)]
        for task_id in ids:
            task = await client.wait(task_id, timeout=WAIT_S)
            assert (task.state, task.attempt) == (TaskState.SUCCEEDED, 1), worker.text()
        worker.process.send_signal(signal.SIGTERM)
        assert await worker.wait_exit() == 0, worker.text()
        assert "stopped after 200 tasks" in worker.text()
        assert "0 stale settlements" in worker.text()
    finally:
        await worker.close()


# --- Node producer → broker → Python worker ---------------------------------------------------


@handler("greet")
async def greet(ctx: TaskContext, payload: bytes) -> bytes:
    return b"hello, " + payload


@handler("flaky")
async def flaky(ctx: TaskContext, payload: bytes) -> bytes:
    if ctx.attempt == 1:
        raise RuntimeError("first attempt fails")
    return f"attempt {ctx.attempt}".encode()


@handler("poison")
async def poison(ctx: TaskContext, payload: bytes) -> bytes:
    raise NonRetryable("never")


@pytest.fixture
async def python_worker(client: Client) -> AsyncIterator[Worker]:
    worker = Worker(
        client,
        queues=[QUEUE],
        handlers=[greet, flaky, poison],
        concurrency=4,
        worker_id="python-worker",
        shutdown_grace=timedelta(seconds=1),
    )
    async with worker:
        yield worker


@pytest.mark.parametrize(
    ("args", "state", "attempt", "result"),
    [
        (["--type", "greet", "--payload", "node"], "TASK_STATE_SUCCEEDED", 1, "hello, node"),
        (["--type", "flaky", "--max-attempts", "3"], "TASK_STATE_SUCCEEDED", 2, "attempt 2"),
        (["--type", "poison"], "TASK_STATE_DEAD", 1, ""),
    ],
)
async def test_node_producer_to_python_worker(
    node: str,
    running: RunningBroker,
    client: Client,
    python_worker: Worker,
    args: Sequence[str],
    state: str,
    attempt: int,
    result: str,
) -> None:
    line = await produce(node, running.target, *args, "--wait")

    # The Node producer read the finished task back through GetTask ...
    assert (line["state"], line["attempt"], line["result"]) == (state, attempt, result)
    # ... and the Python client sees the same.
    task_id = line["task_id"]
    assert isinstance(task_id, str) and task_id.startswith(f"{QUEUE}:")
    assert line["duplicate"] is False
    task = await client.get_task(task_id)
    assert (task.state.name, task.attempt, task.result) == (
        state.removeprefix("TASK_STATE_"),
        attempt,
        result.encode(),
    )


async def test_node_producer_enqueue_is_visible_before_any_worker(
    node: str, running: RunningBroker, client: Client
) -> None:
    line = await produce(node, running.target, "--type", "later", "--payload", "x")
    task = await client.get_task(str(line["task_id"]))
    assert (task.state, task.type, task.payload) == (TaskState.PENDING, "later", b"x")


async def test_the_node_producer_waits_out_an_enqueue_rate_limit_s_retry_info(
    node: str, running: RunningBroker, client: Client
) -> None:
    # One enqueue per second, no burst: the second producer is refused, with a RetryInfo of
    # about a second, and sends its call again after it (nothing was stored the first time).
    await client.update_queue_settings(QUEUE, enqueue_rate_limit=RateLimit(1, 1))
    first = await produce(node, running.target, "--type", "echo", "--payload", "1")
    started = asyncio.get_running_loop().time()
    second = await produce(node, running.target, "--type", "echo", "--payload", "2")
    waited = asyncio.get_running_loop().time() - started
    assert first["task_id"] != second["task_id"]
    assert waited >= 0.5  # the RetryInfo's delay, not an immediate resend
    (stats,) = await client.stats(QUEUE)
    assert stats.enqueued_total == 2
