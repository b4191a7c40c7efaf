"""Where the client and the worker apply a payload codec: one small function per hook point."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from taskbroker._handler import HandlerOutcome, TaskContext
from taskbroker._models import ParentResult, Schedule, Task, TaskState
from taskbroker.envelope import CodecContext, CodecError

if TYPE_CHECKING:
    from taskbroker.encryption import PayloadCodec
    from taskbroker.v1 import task_pb2


def encode_specs(codec: PayloadCodec | None, specs: Sequence[task_pb2.TaskSpec]) -> None:
    """Encodes each spec's payload in place, before the Enqueue call (and its retries).

    Raises:
        CodecError: A payload could not be encoded.
    """
    if codec is None:
        return
    for spec in specs:
        context = CodecContext.payload(spec.queue, spec.type, spec.idempotency_key)
        spec.payload = codec.encode(spec.payload, context)


def decode_task(codec: PayloadCodec | None, task: Task) -> Task:
    """A task read from the broker with its payload, and a succeeded task's result, decoded
    (a task that did not succeed has no result to decode).

    Raises:
        CodecError: The payload or result could not be decoded (the message says why).
    """
    if codec is None:
        return task
    payload = codec.decode(task.payload, CodecContext.payload(task.queue, task.type))
    result = task.result
    if task.state is TaskState.SUCCEEDED:
        result = codec.decode(result, CodecContext.result(task.queue, task.type, task.id))
    parents = decode_parent_results(codec, task.parent_results)
    return replace(task, payload=payload, result=result, parent_results=parents)


def decode_parent_results(
    codec: PayloadCodec, parents: Sequence[ParentResult]
) -> tuple[ParentResult, ...]:
    """Each succeeded parent's result decoded, as its worker encoded it: bound to the parent's
    queue, type and id (a result the broker left out stays empty).

    Raises:
        CodecError: A result could not be decoded (the message says why).
    """
    return tuple(
        replace(
            p,
            result=codec.decode(
                p.result, CodecContext.result(p.task_id.rpartition(":")[0], p.type, p.task_id)
            ),
        )
        if p.state is TaskState.SUCCEEDED and not p.result_omitted
        else p
        for p in parents
    )


def decode_schedule(codec: PayloadCodec | None, schedule: Schedule) -> Schedule:
    """A schedule read from the broker with its task's payload decoded (create and update
    encode it, as enqueue does, so workers decode tick tasks as any other).

    Raises:
        CodecError: The payload could not be decoded (the message says why).
    """
    if codec is None:
        return schedule
    task = schedule.task
    payload = codec.decode(task.payload, CodecContext.payload(task.queue, task.type))
    return replace(schedule, task=replace(task, payload=payload))


def open_payload(codec: PayloadCodec | None, ctx: TaskContext) -> HandlerOutcome | None:
    """Decodes a delivery's payload into `ctx.payload` before the handler runs. A payload that
    cannot be decoded (unknown key id, failed tag, plaintext refused) fails the task for good:
    no other attempt would decode it either. Returns that outcome, or None to run the handler.
    """
    if codec is None:
        return None
    try:
        ctx.payload = codec.decode(ctx.payload, CodecContext.payload(ctx.queue, ctx.type))
    except CodecError as exc:
        return HandlerOutcome("dead", error=f"payload not decoded: {exc}")
    try:
        ctx.parent_results = decode_parent_results(codec, ctx.parent_results)
    except CodecError as exc:
        return HandlerOutcome("dead", error=f"a parent's result not decoded: {exc}")
    return None


def seal_outcome(
    codec: PayloadCodec | None, ctx: TaskContext, outcome: HandlerOutcome
) -> HandlerOutcome:
    """An ack's outcome with its result encoded (bound to the task's id); others unchanged."""
    if codec is None or outcome.kind != "ack":
        return outcome
    context = CodecContext.result(ctx.queue, ctx.type, ctx.task_id)
    try:
        return replace(outcome, result=codec.encode(outcome.result, context))
    except CodecError as exc:
        return HandlerOutcome("dead", error=f"result not encoded: {exc}")
