"""Task dependencies in the SDK: NewTask's depends_on and parent_failure_policy, the workflow
shapes (chain, group, chord) enqueued in one call, and what a handler sees of its parents,
through a real in-process broker and real workers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Unpack

import pytest

from taskbroker import (
    Chain,
    Client,
    Group,
    Handler,
    InvalidArgumentError,
    NewTask,
    NonRetryable,
    ParentFailurePolicy,
    ParentResult,
    SyncClient,
    TaskContext,
    TaskState,
    Worker,
    chain,
    chord,
    group,
    handler,
    testing,
)
from taskbroker._convert import new_task_from_spec, task_from_proto, task_spec
from taskbroker._options import TaskOptions
from taskbroker._workflow import layout
from taskbroker.v1 import task_pb2
from tests.conftest import RunningBroker
from tests.faults.observe import eventually

QUEUE = "flows"
#: Long enough for a chain of a few tasks to run on a loaded 2-core machine.
WAIT_S = 15.0


def task(name: str, **options: Unpack[TaskOptions]) -> NewTask:
    """A `step` task whose payload names it."""
    return NewTask(QUEUE, "step", name.encode(), **options)


# --- shapes, without a broker ----------------------------------------------------------------


def test_a_chain_waits_step_by_step_and_ends_with_its_last_step() -> None:
    laid = layout(chain(task("a"), task("b"), task("c")))

    assert [t.payload for t in laid.tasks] == [b"a", b"b", b"c"]
    assert laid.parents == ((), (0,), (1,))
    assert laid.last == (2,)


def test_a_group_has_no_edges_and_ends_with_every_member() -> None:
    laid = layout(group(task("a"), task("b"), task("c")))

    assert laid.parents == ((), (), ())
    assert laid.last == (0, 1, 2)


def test_a_chord_callback_waits_for_every_member() -> None:
    members = [task(f"r{i}") for i in range(4)]

    assert chord(members, task("cb")) == chord(group(*members), task("cb"))
    assert chord(members, task("cb")) == chain(group(*members), task("cb"))
    laid = layout(chord(members, task("cb")))
    assert laid.parents == ((), (), (), (), (0, 1, 2, 3))
    assert laid.last == (4,)


def test_nested_shapes_compose() -> None:
    # a, then (b alongside c → d), then e once b and d have succeeded.
    flow = chain(task("a"), group(task("b"), chain(task("c"), task("d"))), task("e"))
    laid = layout(flow)

    assert [t.payload for t in laid.tasks] == [b"a", b"b", b"c", b"d", b"e"]
    assert laid.parents == ((), (0,), (0,), (2,), (1, 3))
    assert laid.last == (4,)
    # A group whose members are chains ends with each chain's last task.
    laid = layout(group(chain(task("a"), task("b")), chain(task("c"), task("d"))))
    assert laid.parents == ((), (0,), (), (2,))
    assert laid.last == (1, 3)


def test_a_single_task_is_a_workflow_of_one() -> None:
    laid = layout(task("only"))

    assert (len(laid.tasks), laid.parents, laid.last) == (1, ((),), (0,))


def test_empty_shapes_and_parts_that_are_not_shapes_are_refused() -> None:
    with pytest.raises(ValueError, match="chain"):
        chain()
    with pytest.raises(ValueError, match="group"):
        group()
    with pytest.raises(ValueError, match="group"):
        chord([], task("cb"))
    with pytest.raises(TypeError, match=r"not list \(unpack it with \*\)"):
        group([task("a"), task("b")])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="not str"):
        chord([task("a")], "send")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="not bytes"):
        layout(b"payload")  # type: ignore[arg-type]
    assert isinstance(chain(task("a")), Chain) and isinstance(group(task("a")), Group)


async def test_a_workflow_over_one_calls_limit_is_refused_before_any_call() -> None:
    async with Client("127.0.0.1:1") as client:  # nothing listens: no call may be made
        with pytest.raises(ValueError, match="at most 1000 tasks; this one has 1001"):
            await client.enqueue_workflow(group(*(task(str(i)) for i in range(1001))))


def test_new_task_takes_depends_on_ids_and_a_policy_as_enum_or_str() -> None:
    new = NewTask(QUEUE, "step", depends_on=["flows:01A", "flows:01B"], parent_failure_policy="run")

    assert new.depends_on == ("flows:01A", "flows:01B")
    assert new.parent_failure_policy is ParentFailurePolicy.RUN
    assert new == NewTask(
        QUEUE, "step", depends_on=("flows:01A", "flows:01B"), parent_failure_policy="run"
    )
    with pytest.raises(TypeError, match="not one str"):
        NewTask(QUEUE, "step", depends_on="flows:01A")
    with pytest.raises(ValueError, match="'sometimes'"):
        NewTask(QUEUE, "step", parent_failure_policy="sometimes")  # type: ignore[arg-type]


def test_dependency_options_map_to_the_task_spec_and_back() -> None:
    new = NewTask(QUEUE, "step", depends_on=["flows:01A"], parent_failure_policy="wait")
    spec = task_spec(new)

    assert list(spec.depends_on) == ["flows:01A"]
    assert spec.parent_failure_policy == task_pb2.PARENT_FAILURE_POLICY_WAIT
    assert new_task_from_spec(spec) == new
    plain = task_spec(NewTask(QUEUE, "step"))
    assert not plain.depends_on
    assert plain.parent_failure_policy == task_pb2.PARENT_FAILURE_POLICY_UNSPECIFIED
    assert new_task_from_spec(plain) == NewTask(QUEUE, "step")


def test_a_task_read_from_the_broker_carries_its_parents_and_children() -> None:
    pb = task_pb2.Task(
        id="flows:01C",
        state=task_pb2.TASK_STATE_WAITING,
        parent_ids=["flows:01A", "flows:01B"],
        waiting_for=["flows:01B"],
        parent_results=[
            task_pb2.ParentResult(
                task_id="flows:01A", state=task_pb2.TASK_STATE_SUCCEEDED, result=b"ok"
            )
        ],
        child_ids=["flows:01D"],
        child_count=1,
        parent_failure_policy=task_pb2.PARENT_FAILURE_POLICY_RUN,
    )
    got = task_from_proto(pb)

    assert got.state is TaskState.WAITING and not got.state.finished
    assert (got.parent_ids, got.waiting_for) == (("flows:01A", "flows:01B"), ("flows:01B",))
    assert got.parent_results == (ParentResult("flows:01A", TaskState.SUCCEEDED, b"ok"),)
    assert (got.child_ids, got.child_count) == (("flows:01D",), 1)
    assert got.parent_failure_policy is ParentFailurePolicy.RUN
    # Unset: the broker's default.
    unset = task_from_proto(task_pb2.Task(state=task_pb2.TASK_STATE_PENDING))
    assert unset.parent_failure_policy is ParentFailurePolicy.CANCEL


async def test_run_handler_gives_a_fan_in_handler_its_parents() -> None:
    @handler("total")
    async def total(ctx: TaskContext, payload: bytes) -> bytes:
        assert ctx.parent_ids == ("flows:01A", "flows:01B")
        return str(sum(int(p.result) for p in ctx.parent_results)).encode()

    parents = [
        ParentResult("flows:01A", TaskState.SUCCEEDED, b"2"),
        ParentResult("flows:01B", TaskState.SUCCEEDED, b"3"),
    ]
    outcome = await testing.run_handler(total, parent_results=parents)
    assert (outcome.kind, outcome.result) == ("ack", b"5")


# --- against a broker --------------------------------------------------------------------------


class Recorder:
    """Handlers that record what each task saw: its payload, its parents' ids and results."""

    def __init__(self) -> None:
        self.ran: list[bytes] = []
        self.parents: dict[bytes, tuple[str, ...]] = {}
        self.results: dict[bytes, tuple[ParentResult, ...]] = {}

    def handlers(self) -> list[Handler]:
        @handler("step")
        async def step(ctx: TaskContext, payload: bytes) -> bytes:
            self.ran.append(payload)
            self.parents[payload] = ctx.parent_ids
            self.results[payload] = ctx.parent_results
            return payload.upper()

        @handler("fail")
        async def fail(ctx: TaskContext, payload: bytes) -> bytes:
            self.ran.append(payload)
            raise NonRetryable("this one fails for good")

        return [step, fail]


@pytest.fixture
async def client(running: RunningBroker) -> AsyncIterator[Client]:
    async with Client(running.target) as client:
        yield client


@pytest.fixture
async def recorder(client: Client) -> AsyncIterator[Recorder]:
    recorder = Recorder()
    worker = Worker(client, queues=[QUEUE], handlers=recorder.handlers(), concurrency=8)
    async with worker:
        yield recorder


async def state_becomes(client: Client, task_id: str, state: TaskState) -> None:
    async def reached() -> bool:
        return (await client.get_task(task_id)).state is state

    await eventually(reached, WAIT_S, f"{task_id} is {state.name}")


async def test_a_chain_runs_in_order_each_step_seeing_the_one_before(
    client: Client, recorder: Recorder
) -> None:
    flow = await client.enqueue_workflow(chain(task("a"), task("b"), task("c")))
    a, b, c = flow.task_ids

    done = await client.wait(flow.last, timeout=WAIT_S)
    assert (flow.last, done.state, done.result) == (c, TaskState.SUCCEEDED, b"C")
    assert recorder.ran == [b"a", b"b", b"c"]
    assert recorder.parents == {b"a": (), b"b": (a,), b"c": (b,)}
    assert recorder.results[b"c"] == (ParentResult(b, TaskState.SUCCEEDED, b"B", type="step"),)
    middle = await client.get_task(b)
    assert (middle.parent_ids, middle.waiting_for, middle.child_ids, middle.child_count) == (
        (a,),
        (),
        (c,),
        1,
    )


async def test_a_chord_callback_gets_every_members_result_in_member_order(
    client: Client, recorder: Recorder
) -> None:
    members = [task(f"photo-{i}") for i in range(6)]
    flow = await client.enqueue_workflow(chord(members, task("album")))

    assert len(flow.task_ids) == 7 and flow.last_ids == (flow.task_ids[6],)
    done = await client.wait(flow.last, timeout=WAIT_S)
    assert done.state is TaskState.SUCCEEDED
    assert recorder.ran[-1] == b"album" and sorted(recorder.ran[:-1]) == sorted(
        m.payload for m in members
    )
    assert recorder.results[b"album"] == tuple(
        ParentResult(task_id, TaskState.SUCCEEDED, f"PHOTO-{i}".encode(), type="step")
        for i, task_id in enumerate(flow.task_ids[:6])
    )
    assert done.parent_ids == flow.task_ids[:6]
    assert [p.result for p in done.parent_results] == [f"PHOTO-{i}".encode() for i in range(6)]


async def test_a_nested_workflow_waits_for_the_last_tasks_of_each_branch(
    client: Client, recorder: Recorder
) -> None:
    flow = await client.enqueue_workflow(
        chain(task("a"), group(task("b"), chain(task("c"), task("d"))), task("e"))
    )
    a, b, c, d, e = flow.task_ids

    assert (await client.wait(e, timeout=WAIT_S)).state is TaskState.SUCCEEDED
    assert recorder.parents == {b"a": (), b"b": (a,), b"c": (a,), b"d": (c,), b"e": (b, d)}
    assert recorder.ran.index(b"e") == 4 and recorder.ran[0] == b"a"
    assert recorder.ran.index(b"c") < recorder.ran.index(b"d")


async def test_waiting_tasks_show_what_they_wait_for_until_their_parents_succeed(
    running: RunningBroker, client: Client
) -> None:
    flow = await client.enqueue_workflow(chord([task("x"), task("y")], task("z")))
    x, y, z = flow.task_ids

    waiting = await client.get_task(z)
    assert (waiting.state, waiting.parent_ids, set(waiting.waiting_for)) == (
        TaskState.WAITING,
        (x, y),
        {x, y},
    )
    assert (await client.get_task(x)).child_ids == (z,)
    (stats,) = await client.stats(QUEUE)
    assert (stats.pending, stats.waiting) == (2, 1)
    # Nothing waiting is leased: a worker only gets x and y until both have succeeded.
    recorder = Recorder()
    async with Worker(client, queues=[QUEUE], handlers=recorder.handlers()):
        done = await client.wait(z, timeout=WAIT_S)
    assert done.state is TaskState.SUCCEEDED and done.waiting_for == ()
    assert recorder.ran[-1] == b"z"


async def test_depends_on_ids_link_tasks_of_separate_calls(
    client: Client, recorder: Recorder
) -> None:
    first = await client.enqueue(QUEUE, "step", b"first")
    second = await client.enqueue(QUEUE, "step", b"second", depends_on=[first])
    # A workflow's own tasks may also wait for tasks enqueued before it.
    flow = await client.enqueue_workflow(chain(task("third", depends_on=[second]), task("fourth")))

    done = await client.wait(flow.last, timeout=WAIT_S)
    assert done.state is TaskState.SUCCEEDED
    assert recorder.ran == [b"first", b"second", b"third", b"fourth"]
    assert recorder.parents[b"second"] == (first,)
    assert recorder.parents[b"third"] == (second,)


async def test_an_unknown_parent_id_is_refused_and_nothing_is_stored(client: Client) -> None:
    with pytest.raises(InvalidArgumentError):
        await client.enqueue(QUEUE, "step", depends_on=["flows:01J0000000000000000000000A"])
    with pytest.raises(InvalidArgumentError):
        await client.enqueue_workflow(
            chain(task("a"), task("b", depends_on=["flows:01J0000000000000000000000A"]))
        )
    (stats,) = await client.stats(QUEUE)
    assert stats.enqueued_total == 0


async def test_a_dead_parent_cancels_a_child_by_default_and_runs_it_with_run(
    client: Client, recorder: Recorder
) -> None:
    failing = NewTask(QUEUE, "fail", b"broken", max_attempts=1)
    flow = await client.enqueue_workflow(
        chord(
            [failing],
            group(
                task("cancelled-child"),
                task("runs-anyway", parent_failure_policy=ParentFailurePolicy.RUN),
            ),
        )
    )
    parent, cancelled, runs = flow.task_ids

    assert (await client.wait(cancelled, timeout=WAIT_S)).state is TaskState.CANCELLED
    assert (await client.wait(runs, timeout=WAIT_S)).state is TaskState.SUCCEEDED
    assert b"cancelled-child" not in recorder.ran
    (seen,) = recorder.results[b"runs-anyway"]
    assert (seen.task_id, seen.state, seen.result) == (parent, TaskState.DEAD, b"")


async def test_wait_keeps_a_child_waiting_until_its_dead_parent_is_redriven(
    client: Client, recorder: Recorder
) -> None:
    parent = await client.enqueue(QUEUE, "fail", b"broken", max_attempts=1)
    child = await client.enqueue(
        QUEUE, "step", b"patient", depends_on=[parent], parent_failure_policy="wait"
    )

    assert (await client.wait(parent, timeout=WAIT_S)).state is TaskState.DEAD
    await asyncio.sleep(0.5)  # time enough for a release or cancel, if one were coming
    held = await client.get_task(child)
    assert (held.state, held.waiting_for) == (TaskState.WAITING, (parent,))
    assert b"patient" not in recorder.ran


async def test_cancelling_a_task_cancels_the_tasks_waiting_for_it(client: Client) -> None:
    flow = await client.enqueue_workflow(chain(task("a"), task("b"), task("c")))
    a, b, c = flow.task_ids

    await client.cancel(a)
    await state_becomes(client, b, TaskState.CANCELLED)
    await state_becomes(client, c, TaskState.CANCELLED)


async def test_a_workflow_is_stored_whole_or_not_at_all(client: Client) -> None:
    with pytest.raises(InvalidArgumentError):
        await client.enqueue_workflow(chain(task("a"), NewTask(QUEUE, "bad type!"), task("c")))
    (stats,) = await client.stats(QUEUE)
    assert stats.enqueued_total == 0


async def test_the_sync_client_enqueues_a_workflow(running: RunningBroker, client: Client) -> None:
    def enqueue() -> tuple[str, ...]:
        with SyncClient(running.target) as sync:
            return sync.enqueue_workflow(chord([task("p"), task("q")], task("r"))).task_ids

    p, q, r = await asyncio.to_thread(enqueue)
    waiting = await client.get_task(r)
    assert (waiting.state, waiting.parent_ids) == (TaskState.WAITING, (p, q))


async def test_idempotent_workflow_returns_the_same_ids_marked_duplicate(
    client: Client,
) -> None:
    def flow() -> Chain:
        return chain(task("a", idempotency_key="wf-1-a"), task("b", idempotency_key="wf-1-b"))

    first = await client.enqueue_workflow(flow())
    again = await client.enqueue_workflow(flow())
    assert again.task_ids == first.task_ids
    assert [i.duplicate for i in first.task_ids] == [False, False]
    assert [i.duplicate for i in again.task_ids] == [True, True]
    assert (await client.get_task(first.task_ids[1])).state is TaskState.WAITING
