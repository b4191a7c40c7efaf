"""WorkflowStore: the Redis side of task dependencies (issue 17; docs/workflows.md).

A task's parents are the hash <task>:p (parent id -> '' until its end is recorded, then the
state digit and, for SUCCEEDED, its result; the field '#' keeps their order), its children the
set <task>:k. A task that ends tells its children through its own queue's outbox stream
(prelude's task_finished); a task enqueued WAITING asks, through its queue's outbox, to be
linked to each parent. The outbox mover (broker/workflows.py) reads those entries here and
runs link.lua in the parent's slot and resolve.lua in the children's: each step is one
script on one slot, idempotent, so the mover may die or run twice anywhere between them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, cast

from broker.ids import entry_id, parse_task_id
from broker.models import ParentOutcome, TaskLinks, TaskRef, TaskState
from broker.store import argv
from broker.store.keys import WAKE_CHANNEL, QueueKeys
from broker.store.redis_store import RedisStore, _translate

#: Parents' results carried with one task (a delivery, GetTask) in all; the rest are marked
#: result_omitted. Well under the 4 MiB a gRPC message may hold by default.
MAX_PARENT_RESULT_BYTES: Final = 1024 * 1024
#: Children listed with a task (Task.child_ids); child_count counts them all.
MAX_LISTED_CHILDREN: Final = 1000
#: The parents hash's field holding their order (no task id can be '#').
_ORDER: Final = b"#"


@dataclass(frozen=True, slots=True)
class OutboxEntry:
    """One entry of a queue's outbox: a link to make (kind 'l': `task` is the child, WAITING)
    or an end to tell (kind 'f': `task` ended in `state` with `result`; `children` are its
    children's ids, or None when there were over 1,000: copied_children reads them)."""

    entry_id: str
    kind: str
    task: str  # local id
    state: TaskState | None = None
    result: bytes = b""
    children: tuple[str, ...] | None = None
    type: str = ""


@dataclass(frozen=True, slots=True)
class Tell:
    """One child (of `queue`) to tell how one of its parents ended (resolve.lua's item)."""

    queue: str
    child: str  # local id
    parent: str  # task id
    state: TaskState
    parent_type: str
    result: bytes


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _entry(entry_id: bytes | str, flat: dict[bytes, bytes]) -> OutboxEntry:
    kind = _text(flat[b"k"])
    if kind == "l":
        return OutboxEntry(_text(entry_id), "l", _text(flat[b"c"]))
    listed = flat.get(b"c")
    return OutboxEntry(
        _text(entry_id),
        "f",
        _text(flat[b"p"]),
        TaskState(int(flat[b"s"])),
        flat.get(b"r", b""),
        tuple(_text(listed).split()) if listed is not None else None,
        _text(flat.get(b"t", b"")),
    )


def parent_outcomes(
    parents: dict[bytes, bytes],
) -> tuple[list[str], list[ParentOutcome], list[str]]:
    """A parents hash as (parent ids in order, the ends recorded, the parents still awaited),
    with results up to MAX_PARENT_RESULT_BYTES in all."""
    order = _text(parents.get(_ORDER, b"")).split()
    ended: list[ParentOutcome] = []
    awaited: list[str] = []
    budget = MAX_PARENT_RESULT_BYTES
    for parent in order:
        value = parents.get(parent.encode(), b"")
        if not value:
            awaited.append(parent)
            continue
        parent_type, _, result = value[1:].partition(b" ")
        fits = len(result) <= budget
        if fits:
            budget -= len(result)
        ended.append(
            ParentOutcome(
                parent,
                TaskState(value[0] - 48),
                result if fits else b"",
                not fits,
                _text(parent_type),
            )
        )
    return order, ended, awaited


class WorkflowStore:
    """Reads and steps of task dependencies, beside a RedisStore."""

    def __init__(self, store: RedisStore) -> None:
        self._store = store

    async def task_state(self, ref: TaskRef) -> TaskState | None:
        """A task's state, or None when there is no such task. Only the state field is read
        from a task's hash (a parent's payload may be a MiB); a task without a hash may still
        be fresh (a stream entry of at most 32 KiB), read whole."""
        with _translate():
            state = await self._store.client.hget(QueueKeys(ref.queue).task(ref.local_id), "state")
        if state is not None:
            return TaskState(int(state))
        task = await self._store.get(ref)
        return task.state if task is not None else None

    async def links(self, ref: TaskRef) -> TaskLinks:
        """A task's parents (with their ends) and children."""
        keys = QueueKeys(ref.queue)
        children_key = keys.children(ref.local_id)
        with _translate():
            async with self._store.client.pipeline(transaction=False) as pipe:
                pipe.hgetall(keys.parents(ref.local_id))
                pipe.scard(children_key)
                pipe.srandmember(children_key, MAX_LISTED_CHILDREN)  # distinct; all if fewer
                parents, count, listed = await pipe.execute()
        order, ended, awaited = parent_outcomes(cast("dict[bytes, bytes]", parents))
        return TaskLinks(
            parent_ids=tuple(order),
            waiting_for=tuple(awaited),
            parent_results=tuple(ended),
            child_ids=tuple(sorted(_text(c) for c in listed)),
            child_count=int(count),
        )

    async def parent_results(self, queue: str, local_ids: Sequence[str]) -> list[TaskLinks]:
        """The parents and their results of leased tasks of one queue (for their deliveries)."""
        keys = QueueKeys(queue)
        client = self._store.client
        with _translate():
            async with client.pipeline(transaction=False) as pipe:
                for local_id in local_ids:
                    pipe.hgetall(keys.parents(local_id))
                replies = await pipe.execute()
        out = []
        for parents in replies:
            order, ended, _ = parent_outcomes(cast("dict[bytes, bytes]", parents))
            out.append(TaskLinks(parent_ids=tuple(order), parent_results=tuple(ended)))
        return out

    # --- the outbox mover's steps ----------------------------------------------------------------

    async def read_outbox(self, queue: str, count: int) -> list[OutboxEntry]:
        with _translate():
            rows = await self._store.client.xrange(QueueKeys(queue).outbox, count=count)
        return [_entry(entry_id, fields) for entry_id, fields in cast("list[Any]", rows)]

    async def delete_outbox(self, queue: str, entries: Sequence[OutboxEntry]) -> None:
        """Deletes moved entries, then the children copied for those that had many."""
        if not entries:
            return
        keys = QueueKeys(queue)
        copies = [
            keys.outbox_children(e.entry_id)
            for e in entries
            if e.kind == "f" and e.children is None
        ]
        with _translate():
            await self._store.client.xdel(keys.outbox, *(e.entry_id for e in entries))
            if copies:
                await self._store.client.delete(*copies)

    async def outbox_length(self, queue: str) -> int:
        with _translate():
            return int(await self._store.client.xlen(QueueKeys(queue).outbox))

    async def outbox_lengths(self, queues: Sequence[str]) -> list[int]:
        """outbox_length of many queues, in one pipeline."""
        with _translate():
            async with self._store.client.pipeline(transaction=False) as pipe:
                for queue in queues:
                    pipe.xlen(QueueKeys(queue).outbox)
                return [int(n) for n in await pipe.execute()]

    async def claim_outbox(self, queue: str, owner: str, ttl_ms: int) -> bool:
        """Claims the queue's outbox for `owner` for ttl_ms unless another holds it."""
        with _translate():
            return bool(
                await self._store.client.set(
                    QueueKeys(queue).outbox_claim, owner, nx=True, px=ttl_ms
                )
            )

    async def release_outbox(self, queue: str, owner: str) -> None:
        """Gives the claim up if `owner` still holds it (a claim that expired and was taken by
        another replica is that one's). GET then DEL, not one step: should the claim lapse and
        be taken between the two, the other replica loses it early, which costs a drain done
        twice at worst (every step is idempotent)."""
        key = QueueKeys(queue).outbox_claim
        with _translate():
            if _text(await self._store.client.get(key) or b"") == owner:
                await self._store.client.delete(key)

    async def parents_of(self, child: TaskRef) -> list[str]:
        """The ids a WAITING task named as its parents, in order."""
        with _translate():
            order = await self._store.client.hget(
                QueueKeys(child.queue).parents(child.local_id), "#"
            )
        return _text(order or b"").split()

    async def copied_children(self, queue: str, entry_id: str) -> list[str]:
        """The children copied for an outbox entry of a parent with over 1,000 (read in
        pages)."""
        key = QueueKeys(queue).outbox_children(entry_id)
        out: list[str] = []
        with _translate():
            async for member in self._store.client.sscan_iter(key, count=1000):
                out.append(_text(member))
        return out

    async def link(self, parent_id: str, child_id: str) -> tuple[str, TaskState | None, bytes, str]:
        """Makes parent_id a parent of child_id in the parent's slot (link.lua). Returns
        ('linked', None, b'', ''), ('ended', state, result, type) or ('gone', None, b'', '')."""
        parent = parse_task_id("parent", parent_id)
        keys = QueueKeys(parent.queue)
        reply: list[Any] = await self._store.run_script(
            "link",
            [keys.task(parent.local_id), keys.fresh_priorities, keys.pending],
            argv.LinkArgs(
                id=parent.local_id,
                entry_id=entry_id(parent.local_id),
                fresh_prefix=keys.fresh_prefix,
                child=child_id,
            ),
        )
        outcome = _text(reply[0])
        if outcome == "ended":
            return outcome, TaskState(int(reply[1])), bytes(reply[2]), _text(reply[3])
        return outcome, None, b"", ""

    async def resolve(self, queue: str, tells: Sequence[Tell]) -> list[str]:
        """Tells children of one queue how their parents ended (resolve.lua). Returns one
        outcome per tell: nf again wait held run due:<ms> cancel."""
        keys = QueueKeys(queue)
        args: list[str | bytes | int] = [
            *argv.ResolveArgs(
                task_prefix=keys.task_prefix, wake_channel=WAKE_CHANNEL, queue=queue, n=len(tells)
            )
        ]
        for t in tells:
            args += argv.ResolveItem(
                id=t.child,
                parent=t.parent,
                state=int(t.state),
                parent_type=t.parent_type,
                result=t.result if t.state is TaskState.SUCCEEDED else b"",
            )
        reply: list[Any] = await self._store.run_script(
            "resolve", [keys.pending, keys.scheduled], args
        )
        return [_text(r) for r in reply[1:]]
