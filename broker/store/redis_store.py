"""RedisStore: one method per state change (one Lua script each), replies decoded into models."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from typing import Any, Final, TypeAlias, cast

import redis.asyncio as aioredis
import redis.exceptions as rex
from redis.asyncio.cluster import RedisCluster

from broker.errors import StoreFull, StoreUnavailable
from broker.models import (
    AckItem,
    AttemptError,
    DeadPage,
    EnqueueOutcome,
    ExtendItem,
    Lease,
    LeaseBatch,
    NackItem,
    NewTask,
    QueueStats,
    ServerInfo,
    SettleResult,
    SettleStatus,
    Task,
    TaskRef,
    TaskState,
)
from broker.store.keys import QUEUES_KEY, REVOKE_CHANNEL, WAKE_CHANNEL, QueueKeys
from broker.store.redis_errors import is_unavailable_reply, unavailable_message
from broker.store.scripts import Scripts

AnyRedis: TypeAlias = "aioredis.Redis | RedisCluster"
#: One lease to make: (fresh lease id, lease ms for a task without its own, stream id).
LeaseSlot: TypeAlias = tuple[str, int, str]

log = logging.getLogger(__name__)

#: Errors that mean "Redis is not reachable right now": the call may be retried.
_UNAVAILABLE = (
    rex.ConnectionError,
    rex.TimeoutError,
    rex.BusyLoadingError,
    rex.ReadOnlyError,
    rex.ClusterDownError,
    rex.TryAgainError,
    rex.MasterDownError,
    OSError,
)


class IdempotencyConflictAt(Exception):
    """Raised by enqueue when idempotency keys at these positions are taken by other tasks."""

    def __init__(self, positions: list[int]) -> None:
        super().__init__(f"idempotency conflict at {positions}")
        self.positions = positions


_FULL = "redis is out of memory (maxmemory reached); nothing was stored"


@contextmanager
def _translate() -> Iterator[None]:
    """Maps redis-py errors to broker errors, so callers never see a redis class."""
    try:
        yield
    except _UNAVAILABLE as exc:
        raise StoreUnavailable(unavailable_message(exc)) from exc
    except rex.OutOfMemoryError as exc:  # redis-py strips the "OOM" prefix from its text
        raise StoreFull(_FULL) from exc
    except rex.ResponseError as exc:
        if "OOM command not allowed" in str(exc):  # the same refusal, raised inside a script
            raise StoreFull(_FULL) from exc
        if is_unavailable_reply(exc):
            raise StoreUnavailable(unavailable_message(exc)) from exc
        raise


def _one_node(reply: dict[str, Any]) -> dict[str, Any]:
    """A Cluster may answer INFO per node ({node: info}); one node speaks for all here."""
    if reply and all(isinstance(v, dict) for v in reply.values()):
        return dict(next(iter(reply.values())))
    return reply


def _text(value: bytes | str | None) -> str:
    if value is None:
        return ""
    return value.decode() if isinstance(value, bytes) else value


def _int(value: bytes | str | int | None, default: int = 0) -> int:
    if value is None or value == b"":
        return default
    try:
        return int(value)
    except ValueError:  # Lua writes numbers past 2^53 in exponent form (4.6e+21)
        return _float_int(value)


def _float_int(value: bytes | str | int) -> int:
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"not a finite number: {value!r}")
    return int(number)


def _pairs(flat: Sequence[bytes]) -> dict[bytes, bytes]:
    return dict(zip(flat[::2], flat[1::2], strict=True))


#: The task hash fields a Task is built from, in the order `decode_fields` reads them (lease.lua
#: returns them in this order with HMGET: no field names on the wire, no dict per task).
TASK_FIELDS: Final = (
    "type", "payload", "hdr", "pri", "state", "att", "max", "ctime", "stime",
    "etime", "ftime", "lerr", "errs", "res", "lease_ms", "bo_i", "bo_m", "lid",
)  # fmt: skip
_FIELD_KEYS: Final = tuple(f.encode() for f in TASK_FIELDS)


def decode_task(ref: TaskRef, h: dict[bytes, bytes]) -> Task:
    """Builds a Task from its hash (HGETALL; see lua/_prelude.lua)."""
    return decode_fields(ref, [h.get(key) for key in _FIELD_KEYS])


def decode_fields(ref: TaskRef, v: Sequence[bytes | None]) -> Task:
    """Builds a Task from the values of TASK_FIELDS, in order (None: field absent)."""
    type_, payload, hdr, pri, state, att, max_, ctime, stime = v[:9]
    etime, ftime, lerr, errs, res, lease_ms, bo_i, bo_m, lid = v[9:]
    errors = tuple(  # absent until an attempt fails: no JSON on the hot path
        AttemptError(attempt=int(a), time_ms=int(t), message=str(m))
        for a, t, m in (json.loads(errs) if errs else ())
    )
    return Task(
        ref=ref,
        type=_text(type_),
        payload=payload or b"",
        headers=json.loads(hdr) if hdr else {},
        priority=_int(pri),
        state=TaskState(_int(state, TaskState.PENDING)),
        attempt=_int(att),
        max_attempts=_int(max_, 1),
        create_ms=_int(ctime),
        schedule_ms=_int(stime),
        lease_expire_ms=_int(etime),
        finish_ms=_int(ftime),
        last_error=_text(lerr),
        errors=errors,
        result=res or b"",
        lease_ms=_int(lease_ms),
        backoff_initial_ms=_int(bo_i),
        backoff_max_ms=_int(bo_m),
        lease_id=_text(lid),
    )


def _settle(reply: list[bytes]) -> SettleResult:
    status = SettleStatus(_text(reply[0]))
    if len(reply) == 1:
        return SettleResult(status)
    if len(reply) == 2:  # extension: {'ok', expiry}
        return SettleResult(status, time_ms=int(reply[1]))
    return SettleResult(status, state=TaskState(int(reply[1])), time_ms=int(reply[2]))


class RedisStore:
    """Atomic state changes of tasks, each one script on one queue's hash-tagged keys."""

    def __init__(self, client: AnyRedis) -> None:
        self._client = client
        self._scripts = Scripts(client)
        self._known_queues: set[str] = set()

    @property
    def client(self) -> AnyRedis:
        return self._client

    @property
    def is_cluster(self) -> bool:
        return isinstance(self._client, RedisCluster)

    async def close(self) -> None:
        await self._client.aclose()

    # --- server ---------------------------------------------------------------------------

    async def ping(self) -> None:
        """Raises StoreUnavailable unless Redis answers."""
        with _translate():
            await self._client.ping()

    async def server_info(self) -> ServerInfo:
        """Reads the settings that decide whether acknowledged work survives."""
        with _translate():
            info = await self._client.info("server")
            persistence = await self._client.info("persistence")
            policy: str | None
            fsync: str | None
            try:
                policy = _text(
                    (await self._client.config_get("maxmemory-policy")).get("maxmemory-policy")
                )
                fsync = _text((await self._client.config_get("appendfsync")).get("appendfsync"))
                # The old name: Redis 7 answers to both, Redis 6 only to this one.
                hash_value = _text(
                    (await self._client.config_get("hash-max-ziplist-value")).get(
                        "hash-max-ziplist-value"
                    )
                )
            except rex.ResponseError:  # managed Redis may rename or forbid CONFIG
                policy, fsync, hash_value = None, None, ""
        info, persistence = _one_node(info), _one_node(persistence)
        return ServerInfo(
            version=str(info.get("redis_version", "?")),
            maxmemory_policy=policy or None,
            aof_enabled=bool(int(persistence.get("aof_enabled", 0))),
            appendfsync=fsync or None,
            cluster=self.is_cluster,
            hash_value_bytes=int(hash_value) if hash_value else None,
        )

    # --- queues ---------------------------------------------------------------------------

    async def register_queue(self, queue: str) -> None:
        """Adds a queue to the cross-slot registry (once per process; SADD is idempotent)."""
        if queue in self._known_queues:
            return
        with _translate():
            await self._client.sadd(QUEUES_KEY, queue)
        self._known_queues.add(queue)

    async def list_queues(self) -> list[str]:
        with _translate():
            members = await self._client.smembers(QUEUES_KEY)
        return sorted(_text(m) for m in members)

    async def set_paused(self, queue: str, paused: bool) -> None:
        keys = QueueKeys(queue)
        with _translate():
            if paused:
                await self._client.hset(keys.meta, "paused", "1")
            else:
                await self._client.hdel(keys.meta, "paused")
                await self._client.publish(WAKE_CHANNEL, queue)

    # --- task state changes ------------------------------------------------------------------

    async def enqueue(
        self, queue: str, tasks: Sequence[NewTask], idempotency_window_ms: int
    ) -> list[EnqueueOutcome]:
        """Stores tasks of one queue in one script call.

        Raises:
            IdempotencyConflictAt: nothing was stored; these positions reuse a key.
        """
        keys = QueueKeys(queue)
        args: list[str | bytes | int] = [
            keys.task_prefix,
            keys.idempotency_prefix,
            idempotency_window_ms,
            WAKE_CHANNEL,
            queue,
            len(tasks),
        ]
        for t in tasks:
            args += [
                t.ref.local_id,
                t.type,
                t.payload,
                json.dumps(t.headers, sort_keys=True) if t.headers else "",
                t.priority,
                t.max_attempts,
                t.lease_ms,
                t.backoff_initial_ms,
                t.backoff_max_ms,
                t.delay_ms,
                t.schedule_ms,
                t.idempotency_key,
                t.body_hash,
            ]
        await self.register_queue(queue)
        with _translate():
            reply = await self._scripts["enqueue"](
                keys=[keys.pending, keys.scheduled, keys.stats], args=args
            )
        if len(reply) > 1 and reply[1] == b"conflict":
            raise IdempotencyConflictAt([int(i) - 1 for i in reply[2:]])
        outcomes = []
        for task, r in zip(tasks, reply[1:], strict=True):
            if r.startswith(b"d:"):
                outcomes.append(EnqueueOutcome(TaskRef(queue, _text(r[2:])).task_id, True))
            else:
                outcomes.append(EnqueueOutcome(task.ref.task_id, False))
        return outcomes

    async def lease(self, queue: str, slots: Sequence[LeaseSlot]) -> LeaseBatch:
        """Leases up to len(slots) tasks of one queue; slot i is (lease id, lease ms for a task
        without its own, id of the stream it is for), and the i-th leased task fills slot i."""
        keys = QueueKeys(queue)
        args: list[str | int] = [keys.task_prefix, len(slots)]
        for lease_id, lease_ms, stream_id in slots:
            args += [lease_id, lease_ms, stream_id]
        args += TASK_FIELDS
        with _translate():
            reply = await self._scripts["lease"](
                keys=[keys.pending, keys.scheduled, keys.leased, keys.meta], args=args
            )
        now, next_due, paused = int(reply[0]), int(reply[1]), bool(int(reply[2]))
        leases = []
        for i in range(3, len(reply), 2):
            ref = TaskRef(queue, _text(reply[i]))
            task = decode_fields(ref, reply[i + 1])
            leases.append(Lease(task=task, lease_id=task.lease_id, expire_ms=task.lease_expire_ms))
        return LeaseBatch(now_ms=now, next_due_ms=next_due, paused=paused, leases=leases)

    async def ack(self, queue: str, items: Sequence[AckItem]) -> list[SettleResult]:
        keys = QueueKeys(queue)
        args: list[str | bytes | int] = [keys.task_prefix, len(items)]
        for item in items:
            args += [item.ref.local_id, item.lease_id, item.result]
        with _translate():
            reply = await self._scripts["ack"](keys=[keys.leased, keys.done, keys.stats], args=args)
        return [SettleResult(SettleStatus(_text(r))) for r in reply[1:]]

    async def nack(self, queue: str, items: Sequence[NackItem]) -> list[SettleResult]:
        keys = QueueKeys(queue)
        args: list[str | bytes | int | float] = [keys.task_prefix, WAKE_CHANNEL, queue, len(items)]
        for item in items:
            args += [
                item.ref.local_id,
                item.lease_id,
                item.error,
                item.retry_delay_ms,
                "1" if item.dead_letter else "0",
                repr(item.jitter),
            ]
        with _translate():
            reply = await self._scripts["nack"](
                keys=[keys.leased, keys.scheduled, keys.pending, keys.dead, keys.stats], args=args
            )
        return [_settle(r) for r in reply[1:]]

    async def extend(self, queue: str, items: Sequence[ExtendItem]) -> list[SettleResult]:
        keys = QueueKeys(queue)
        args: list[str | bytes | int] = [keys.task_prefix, len(items)]
        for item in items:
            args += [item.ref.local_id, item.lease_id, item.duration_ms]
        with _translate():
            reply = await self._scripts["extend_lease"](keys=[keys.leased], args=args)
        return [_settle(r) for r in reply[1:]]

    async def detach(
        self,
        queue: str,
        stream_id: str,
        leases: Sequence[tuple[str, str]],
        window_ms: int,
        reason: str,
    ) -> tuple[int, int]:
        """Detaches (local_id, lease_id) leases the ended stream still holds: each expires within
        window_ms unless resumed. Returns (how many, earliest new expiry ms or -1)."""
        keys = QueueKeys(queue)
        args: list[str | int] = [keys.task_prefix, stream_id, window_ms, reason, len(leases)]
        for local_id, lease_id in leases:
            args += [local_id, lease_id]
        with _translate():
            count, earliest = await self._scripts["detach"](keys=[keys.leased], args=args)
        return int(count), int(earliest)

    async def resume(
        self, queue: str, stream_id: str, leases: Sequence[tuple[str, str]]
    ) -> list[SettleResult]:
        """Moves (local_id, lease_id) leases that are still current to the stream."""
        keys = QueueKeys(queue)
        args: list[str | int] = [keys.task_prefix, stream_id, len(leases)]
        for local_id, lease_id in leases:
            args += [local_id, lease_id]
        with _translate():
            reply = await self._scripts["resume"](keys=[keys.leased], args=args)
        return [_settle(r) for r in reply[1:]]

    async def unlease(self, queue: str, stream_id: str, leases: Sequence[tuple[str, str]]) -> int:
        """Undoes (local_id, lease_id) leases never sent to the stream they were made for: no
        attempt spent. Returns how many."""
        keys = QueueKeys(queue)
        args: list[str | int] = [keys.task_prefix, WAKE_CHANNEL, queue, stream_id, len(leases)]
        for local_id, lease_id in leases:
            args += [local_id, lease_id]
        with _translate():
            return int(await self._scripts["unlease"](keys=[keys.leased, keys.pending], args=args))

    async def reclaim_expired(self, queue: str, limit: int) -> tuple[int, int]:
        """Reclaims up to limit expired leases. Returns (count, next expiry ms or -1)."""
        keys = QueueKeys(queue)
        with _translate():
            count, next_expiry = await self._scripts["reclaim_expired"](
                keys=[keys.leased, keys.pending, keys.dead, keys.stats],
                args=[keys.task_prefix, WAKE_CHANNEL, queue, limit],
            )
        return int(count), int(next_expiry)

    async def promote_due(self, queue: str, limit: int) -> tuple[int, int]:
        """Moves up to limit due tasks to pending. Returns (count, next due ms or -1)."""
        keys = QueueKeys(queue)
        with _translate():
            count, next_due = await self._scripts["promote_due"](
                keys=[keys.scheduled, keys.pending], args=[keys.task_prefix, limit]
            )
        return int(count), int(next_due)

    async def cancel(self, ref: TaskRef) -> tuple[str, int | str]:
        """Returns ('ok', revoked lease id or ''), ('final', state) or ('nf', '')."""
        keys = QueueKeys(ref.queue)
        with _translate():
            reply = await self._scripts["cancel"](
                keys=[
                    keys.task(ref.local_id),
                    keys.pending,
                    keys.scheduled,
                    keys.leased,
                    keys.done,
                    keys.stats,
                ],
                args=[ref.local_id],
            )
        kind = _text(reply[0])
        if kind == "ok":
            return kind, _text(reply[1])
        if kind == "final":
            return kind, int(reply[1])
        return kind, ""

    async def announce_revoked(self, task_id: str, lease_id: str) -> None:
        """Tells every replica that this lease was revoked (a hint: the fence is in Redis)."""
        with _translate():
            await self._client.publish(REVOKE_CHANNEL, f"{task_id} {lease_id}")

    async def get(self, ref: TaskRef) -> Task | None:
        with _translate():
            # The client does not decode responses: fields and values are bytes.
            h = cast(
                "dict[bytes, bytes]",
                await self._client.hgetall(QueueKeys(ref.queue).task(ref.local_id)),
            )
        return decode_task(ref, h) if h else None

    async def stats(self, queue: str) -> QueueStats:
        keys = QueueKeys(queue)
        with _translate():
            reply = await self._scripts["stats"](
                keys=[keys.pending, keys.scheduled, keys.leased, keys.dead, keys.stats, keys.meta]
            )
        totals = {_text(k): int(v) for k, v in _pairs(reply[7]).items()}
        return QueueStats(
            queue=queue,
            now_ms=int(reply[0]),
            pending=int(reply[1]),
            scheduled=int(reply[2]),
            leased=int(reply[3]),
            dead=int(reply[4]),
            paused=bool(int(reply[5])),
            oldest_ready_ms=int(reply[6]),
            enqueued_total=totals.get("enq", 0),
            succeeded_total=totals.get("ok", 0),
            retried_total=totals.get("retry", 0),
            reclaimed_total=totals.get("reclaim", 0),
            dead_lettered_total=totals.get("dead", 0),
            cancelled_total=totals.get("cancel", 0),
            failed_total=totals.get("fail", 0),
        )

    # --- dead letters -----------------------------------------------------------------------

    async def list_dead(
        self, queue: str, page_size: int, after: tuple[int, str] | None
    ) -> DeadPage:
        """A page of dead letters ordered by (dead time, id), strictly after the cursor."""
        keys = QueueKeys(queue)
        start = after[0] if after else "-inf"
        found: list[tuple[str, int]] = []
        offset = 0
        with _translate():
            # Ties on the dead time are ordered by id, as Redis orders the zset: skip past them.
            while len(found) <= page_size:
                chunk = await self._client.zrange(
                    keys.dead, start, "+inf", byscore=True, offset=offset,
                    num=page_size + 1, withscores=True,
                )  # fmt: skip
                if not chunk:
                    break
                for member, score in cast("list[tuple[bytes, float]]", chunk):
                    entry = (_text(member), int(score))
                    if after is None or (entry[1], entry[0]) > (after[0], after[1]):
                        found.append(entry)
                offset += len(chunk)
            page = found[:page_size]
            hashes = []
            if page:
                async with self._client.pipeline(transaction=False) as pipe:
                    for local_id, _ in page:
                        pipe.hgetall(keys.task(local_id))
                    hashes = await pipe.execute()
        tasks = [
            decode_task(TaskRef(queue, local_id), h)
            for (local_id, _), h in zip(page, hashes, strict=True)
            if h
        ]
        more = len(found) > page_size
        cursor = (page[-1][1], page[-1][0]) if more and page else None
        return DeadPage(tasks=tasks, next_cursor=cursor)

    async def dead_ids(self, queue: str, limit: int) -> list[str]:
        """The oldest dead letters' local ids, at most limit."""
        with _translate():
            members = await self._client.zrange(QueueKeys(queue).dead, 0, limit - 1)
        return [_text(m) for m in cast("list[bytes]", members)]

    async def redrive(self, queue: str, local_ids: Sequence[str]) -> int:
        keys = QueueKeys(queue)
        with _translate():
            return int(
                await self._scripts["redrive"](
                    keys=[keys.dead, keys.pending],
                    args=[keys.task_prefix, WAKE_CHANNEL, queue, *local_ids],
                )
            )

    async def delete_dead(self, queue: str, local_ids: Sequence[str]) -> int:
        keys = QueueKeys(queue)
        with _translate():
            return int(
                await self._scripts["delete_dead"](
                    keys=[keys.dead], args=[keys.task_prefix, *local_ids]
                )
            )

    async def trim_finished(
        self, queue: str, finished_retention_ms: int, dead_retention_ms: int, limit: int
    ) -> tuple[int, int]:
        """Deletes up to limit finished tasks and limit dead letters past their retention.
        Returns how many of each."""
        keys = QueueKeys(queue)
        with _translate():
            finished, dead = await self._scripts["trim_finished"](
                keys=[keys.done, keys.dead],
                args=[keys.task_prefix, finished_retention_ms, dead_retention_ms, limit],
            )
        return int(finished), int(dead)

    # --- wake-ups -----------------------------------------------------------------------------

    @asynccontextmanager
    async def wake_subscription(self) -> AsyncIterator[aioredis.client.PubSub]:
        """A Pub/Sub connection subscribed to the wake and revoke channels. On a Cluster every
        node hears
        every PUBLISH, so one node's connection serves."""
        node_client: aioredis.Redis | None = None
        if isinstance(self._client, RedisCluster):
            node = self._client.get_random_node()
            node_client = aioredis.Redis(
                host=node.host,
                port=int(node.port),
                socket_connect_timeout=2.0,
                **_auth(self._client),
            )
            pubsub = node_client.pubsub(ignore_subscribe_messages=True)
        else:
            pubsub = self._client.pubsub(ignore_subscribe_messages=True)
        try:
            with _translate():
                await pubsub.subscribe(WAKE_CHANNEL, REVOKE_CHANNEL)
            yield pubsub
        finally:
            try:
                await pubsub.aclose()  # type: ignore[no-untyped-call]
            finally:
                if node_client is not None:
                    await node_client.aclose()


def _auth(client: RedisCluster) -> dict[str, Any]:
    kwargs = client.get_connection_kwargs()
    return {k: v for k, v in kwargs.items() if k in ("username", "password", "ssl")}
