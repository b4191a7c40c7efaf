"""RedisStore: one method per state change (one Lua script each), replies decoded into models."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import secrets
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from typing import Any, Final, TypeAlias, cast

import redis.asyncio as aioredis
import redis.exceptions as rex
from redis.asyncio.cluster import RedisCluster

from broker.errors import EnqueueRateLimited, LimitExceeded, StoreFull, StoreUnavailable
from broker.ids import entry_id
from broker.models import (
    AttemptError,
    CancelResult,
    CancelStatus,
    DeadPage,
    DueEntry,
    Echo,
    EnqueueOutcome,
    ExtendItem,
    Flow,
    Hint,
    Lease,
    LeaseBatch,
    LeaseSlot,
    Maintained,
    NackItem,
    NewTask,
    ParentPolicy,
    QueueSettings,
    QueueStats,
    Revoke,
    ServerInfo,
    SettleResult,
    SettleStatus,
    Task,
    TaskRef,
    TaskState,
    Wake,
)
from broker.store import argv
from broker.store.due_index import DueIndex
from broker.store.keys import (
    ECHO_CHANNEL_PREFIX,
    FINISHED_CHANNEL,
    FLOW_CHANNEL,
    QUEUES_KEY,
    REVOKE_CHANNEL,
    WAKE_CHANNEL,
    QueueKeys,
)
from broker.store.queue_meta import bucket_tokens, meta_changes, settings_from_meta
from broker.store.redis_errors import (
    is_connection_torn_down,
    is_unavailable_reply,
    unavailable_message,
)
from broker.store.scripts import Scripts
from broker.store.wire import CommandLane

AnyRedis: TypeAlias = "aioredis.Redis | RedisCluster"
#: One script call: the script's name, its keys and its arguments.
Call: TypeAlias = tuple[str, Sequence[Any], Sequence[Any]]

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

#: Hints are sent this much early: the hint script reads Redis's clock a little after the state
#: change's script did, and an early look costs one maintenance call, a late one a late reclaim.
HINT_MARGIN_MS: Final = 100
#: Maintenance calls pipelined (or run concurrently on a Cluster) at once.
MAINTAIN_CHUNK: Final = 200
#: A larger payload is written ahead of its enqueue script (staged), by a plain HSET: Redis
#: spends about a quarter of the time on that as on a script argument of the same size, and no
#: command of ours then holds more than one task's bytes, so other clients' commands never wait
#: behind a whole batch of large payloads. Below it, the extra round trip would cost more.
STAGE_PAYLOAD_BYTES: Final = 32 * 1024
#: A lease call leases no further task once its reply holds this many bytes (the first task
#: always goes). Redis copies a reply's bytes twice, at up to 2 ms per MiB on these machines,
#: and every other client waits meanwhile: four 1 MiB tasks in one call held Redis for 8-10 ms
#: (docs/benchmarks.md, "2026-12-06: megabyte tasks leased one call at a time"). Tasks of a few
#: kilobytes still fill the dispatcher's batch (up to 100 per call).
LEASE_REPLY_BYTES: Final = 256 * 1024
#: A task from the pending zset with a larger payload (its hash's `psz`, written when the
#: payload is staged) is leased without it, and its payload read by a plain HGET: Redis took
#: about 1.7 ms of its time (every other client waiting) to pass a 1 MiB payload through
#: lease.lua into its reply, and 0.07 ms to HGET it. A fresh task never has one this large:
#: enqueue stages such payloads, and stores the task in the pending zset (lua/enqueue.lua).
FETCH_PAYLOAD_BYTES: Final = STAGE_PAYLOAD_BYTES
#: A page of listed tasks (dead letters) stops growing once it holds this many bytes; the first
#: task always goes. So a page of 1 MiB tasks stays under the 4 MiB that gRPC clients receive
#: by default. Before, a page of 100 such tasks was past even the broker's send limit (the
#: task limit + 16 MiB): it could not be listed at all, and took that much memory to build.
LIST_PAGE_BYTES: Final = 2 * 1024 * 1024
#: A staged payload not renamed into its task within this long expires: what a broker that
#: died between the two steps, or a call refused for an idempotency conflict, leaves behind.
STAGE_TTL_MS: Final = 60_000


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
    except (AttributeError, TypeError) as exc:
        if is_connection_torn_down(exc):
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


def _time_or_none(value: bytes | int) -> int | None:
    """A time from a script's reply, where -1 means none."""
    ms = int(value)
    return None if ms < 0 else ms


def _pairs(flat: Sequence[bytes]) -> dict[bytes, bytes]:
    return dict(zip(flat[::2], flat[1::2], strict=True))


#: Each Task field (but ref) and the task hash field that stores it (lua/_prelude.lua). The
#: hash's names are the persisted format, short to keep hashes small: never rename one (stored
#: tasks must stay readable); this is the one place that says what they mean. The order is the
#: one `decode_fields` reads (lease.lua returns the values in it with HMGET: no field names on
#: the wire, no dict per task).
TASK_HASH_FIELDS: Final = {
    "type": "type", "payload": "payload", "headers": "hdr", "priority": "pri", "state": "state",
    "attempt": "att", "max_attempts": "max", "create_ms": "ctime", "schedule_ms": "stime",
    "lease_expire_ms": "etime", "finish_ms": "ftime", "last_error": "lerr", "errors": "errs",
    "result": "res", "lease_ms": "lease_ms", "initial_backoff_ms": "bo_i",
    "max_backoff_ms": "bo_m", "lease_id": "lid", "group_key": "gk", "parent_count": "npar",
    "parent_policy": "fpol", "has_children": "kid",
}  # fmt: skip
#: The stored names alone, in order.
TASK_FIELDS: Final = tuple(TASK_HASH_FIELDS.values())
_FIELD_KEYS: Final = tuple(f.encode() for f in TASK_FIELDS)


def decode_task(ref: TaskRef, h: dict[bytes, bytes]) -> Task:
    """Builds a Task from its hash (HGETALL; see lua/_prelude.lua)."""
    return decode_fields(ref, [h.get(key) for key in _FIELD_KEYS])


def decode_fields(ref: TaskRef, v: Sequence[bytes | None]) -> Task:
    """Builds a Task from the values of TASK_FIELDS, in order (None: field absent). Runs for
    every leased task: Task is built positionally (in its field order) and numbers go through
    _num, a cheaper _int."""
    type_, payload, hdr, pri, state, att, max_, ctime, stime = v[:9]
    etime, ftime, lerr, errs, res, lease_ms, initial_backoff, max_backoff, lid, gk = v[9:19]
    npar, fpol, kid = v[19:]
    errors = tuple(  # absent until an attempt fails: no JSON on the hot path
        AttemptError(attempt=int(a), time_ms=int(t), message=str(m))
        for a, t, m in (json.loads(errs) if errs else ())
    )
    return Task(
        ref,
        _text(type_),
        payload or b"",
        json.loads(hdr) if hdr else {},
        _num(pri),
        _state(_num(state, TaskState.PENDING)),
        _num(att),
        _num(max_, 1),
        _num(ctime),
        _num(stime),
        _num(etime) or None,  # the scripts store 0 for "not leased"
        _num(ftime) or None,
        _text(lerr),
        errors,
        res or b"",
        _num(lease_ms) or None,
        _num(initial_backoff),
        _num(max_backoff),
        _text(lid) or None,
        _text(gk),
        _num(npar),
        ParentPolicy(_text(fpol)) if fpol else ParentPolicy.CANCEL,
        kid is not None,
    )


#: What lease.lua answers for a task leased straight from its fresh stream, in order: the rest
#: is known (decode_fresh). Shorter than TASK_FIELDS, which tells the two forms apart.
FRESH_REPLY_FIELDS: Final = (
    "type", "payload", "hdr", "pri", "max", "ctime", "etime", "lease_ms", "bo_i", "bo_m", "lid",
)  # fmt: skip
if len(FRESH_REPLY_FIELDS) >= len(TASK_FIELDS):
    raise RuntimeError("a fresh lease's reply must be shorter than TASK_FIELDS")


def decode_fresh(ref: TaskRef, v: Sequence[bytes | None]) -> Task:
    """Builds a Task leased straight from its fresh stream from lease.lua's short reply
    (FRESH_REPLY_FIELDS): what decode_fields gives for the hash that script writes."""
    type_, payload, hdr, pri, max_, ctime, etime, lease_ms, initial_backoff, max_backoff, lid = v
    created = _num(ctime)
    return Task(
        ref,
        _text(type_),
        payload or b"",
        json.loads(hdr) if hdr else {},
        _num(pri),
        TaskState.LEASED,
        1,
        _num(max_, 1),
        created,
        created,  # a fresh task was ready when it was created
        _num(etime) or None,
        None,
        "",
        (),
        b"",
        _num(lease_ms) or None,
        _num(initial_backoff),
        _num(max_backoff),
        _text(lid) or None,
        "",
        0,
        ParentPolicy.CANCEL,
        False,
    )


def _num(value: bytes | None, default: int = 0) -> int:
    """_int for a stored value: empty or absent is `default`."""
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        return _int(value, default)


def _with_held(head: Iterable[str | int], leases: Sequence[tuple[str, str]]) -> list[str | int]:
    """A script's head arguments, then one HeldItem per (local_id, lease_id)."""
    args = list(head)
    for local_id, lease_id in leases:
        args += argv.HeldItem(id=local_id, lease_id=lease_id)
    return args


def _leased(task: Task) -> Lease:
    if task.lease_id is None or task.lease_expire_ms is None:  # lease.lua sets both
        raise RuntimeError(f"lease script returned task {task.ref.task_id} without its lease")
    return Lease(task=task, lease_id=task.lease_id, expire_ms=task.lease_expire_ms)


#: A settle script's status words, decoded by lookup (an Enum call per item costs more).
_STATUSES: Final = {s.value.encode(): s for s in SettleStatus}
#: TaskState by stored number, for the same reason.
_STATES: Final = {int(s): s for s in TaskState}


def _state(number: int) -> TaskState:
    return _STATES.get(number) or TaskState(number)  # an unknown number raises ValueError


def _settle(reply: list[bytes]) -> SettleResult:
    status = _STATUSES[reply[0]]
    if len(reply) == 1:
        return SettleResult(status)
    if len(reply) == 2:  # extension: {'ok', expiry}
        return SettleResult(status, time_ms=int(reply[1]))
    return SettleResult(status, state=_STATES[int(reply[1])], time_ms=_time_or_none(reply[2]))


class RedisStore:
    """Atomic state changes of tasks, each one script on one queue's hash-tagged keys."""

    def __init__(
        self,
        client: AnyRedis,
        *,
        finished_retention_ms: int = 3_600_000,
        dead_retention_ms: int = 14 * 86_400_000,
    ) -> None:
        self._client = client
        #: Standalone: the script calls' own connection (see wire.py).
        self._lane = None if isinstance(client, RedisCluster) else CommandLane(client)
        self._scripts = Scripts(client)
        self.due = DueIndex(client, self._scripts, self.is_cluster)
        # When trims come due: the hint an ack or a dead-lettering sends. No cache of Redis state
        # lives here (issue 11 §4): every call reads or writes Redis.
        self._finished_ms = finished_retention_ms
        self._dead_ms = dead_retention_ms
        #: Queues whose hint failed after their state change succeeded: the maintainer resends.
        self.unhinted: set[str] = set()
        #: This store's own channel for the echoes of its enqueues that lease (models.Echo).
        self.echo_channel = ECHO_CHANNEL_PREFIX + secrets.token_hex(8)

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
        """Adds a queue to the cross-slot registry. Written every time (SADD is idempotent): a
        per-process cache would outlive a Redis that restarted empty."""
        with _translate():
            await self._client.sadd(QUEUES_KEY, queue)

    async def _run(
        self,
        name: str,
        keys: Sequence[str],
        args: Sequence[Any],
        hint: Hint | None = None,
        register: Sequence[str] = (),
    ) -> Any:
        """Runs one state change's script, then (if given) its due-index hint and the queue's
        registration, in this order. Standalone: one pipeline, one write. Cluster: one after
        the other, since a pipeline split across nodes may run them in any order (a hint run
        before its script could be overtaken by a maintainer's raise)."""
        after = [] if hint is None else [self._hint_call(hint)]
        with _translate():
            if self.is_cluster:
                reply = await self._scripts[name](keys=keys, args=args)
                await self._after(after, register)
                return reply
            first, *hints = await self._pipeline([(name, keys, args), *after], register)
            if isinstance(first, Exception):
                raise first
            self._note_failed_hints(after, hints)
            return first

    def _hint_call(self, hint: Hint) -> Call:
        due = self.due.keys(hint.queue)
        return ("hint_due", [due.at, due.gen], DueIndex.hint_args([hint]))

    def _note_failed_hints(self, calls: Sequence[Call], replies: Sequence[Any]) -> None:
        """A hint that failed after its script succeeded is remembered for the maintainer to
        resend, rather than failing a change already made."""
        for reply, (name, _, args) in zip(replies, calls, strict=True):
            if isinstance(reply, Exception):
                self.unhinted.add(str(args[1]))
                log.warning("%s failed (resent by the maintainer): %s", name, reply)

    async def run_script(
        self, name: str, keys: Sequence[str], args: Sequence[Any], hint: Hint | None = None
    ) -> Any:
        """Runs a script of store/lua on one queue's keys with its due-index hint, as this
        store's own state changes do (_run), for the stores beside it (schedule_store.py)."""
        return await self._run(name, keys, args, hint=hint)

    async def _after(self, calls: Sequence[Call], register: Sequence[str]) -> None:
        """Cluster: the hint and registration after a script that succeeded. A failed hint is
        remembered for the maintainer to resend rather than failing a change already made."""
        for name, keys, args in calls:
            try:
                await self._scripts[name](keys=keys, args=args)
            except (*_UNAVAILABLE, rex.ResponseError) as exc:
                self.unhinted.add(str(args[1]))
                log.warning("due-index hint failed (resent by the maintainer): %s", exc)
        if register:
            await self._client.sadd(QUEUES_KEY, *register)

    async def _pipeline(self, calls: Sequence[Call], register: Sequence[str]) -> list[Any]:
        """Standalone: scripts by EVALSHA (and an SADD of the queues to register) in one
        pipeline; returns each script's reply or error, in order. A script Redis lost
        (NOSCRIPT after a restart) is loaded, and the commands from the first failed one on are
        sent again, in order."""
        assert self._lane is not None
        pending = list(calls)
        replies: list[Any] = []
        for _ in range(3):
            commands = [
                ("EVALSHA", self._scripts[name].sha, len(keys), *keys, *args)
                for name, keys, args in pending
            ]
            if register:
                commands.append(("SADD", QUEUES_KEY, *register))
            results = await self._lane.send(commands)
            lost = next(
                (
                    i
                    for i, r in enumerate(results[: len(pending)])
                    if isinstance(r, rex.NoScriptError)
                ),
                len(pending),
            )
            replies += results[:lost]
            if lost == len(pending):
                if register and isinstance(results[-1], Exception):
                    log.warning("registering queues %s failed: %s", register, results[-1])
                return replies
            pending = pending[lost:]
            # A restarted Redis lost them all: load every script still to run, not only the
            # first, so a pipeline of several scripts is sent again once.
            for name in dict.fromkeys(name for name, _, _ in pending):
                await self._client.script_load(self._scripts[name].script)
        raise rex.NoScriptError("redis keeps losing the scripts")

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

    async def queue_settings(self, queue: str) -> QueueSettings:
        with _translate():
            meta = await self._client.hgetall(QueueKeys(queue).meta)
        return settings_from_meta(cast("dict[bytes, bytes]", meta))

    async def update_queue_settings(
        self, queue: str, settings: QueueSettings, names: Sequence[str]
    ) -> QueueSettings:
        """Applies the named settings in one step and wakes every replica's pumps for the
        queue. Returns the settings after the change."""
        delete, pairs = meta_changes(settings, names)
        args: list[str | int] = [
            *argv.UpdateSettingsArgs(wake_channel=WAKE_CHANNEL, queue=queue, n_delete=len(delete)),
            *delete,
            *pairs,
        ]
        with _translate():
            flat = await self._scripts["update_settings"](keys=[QueueKeys(queue).meta], args=args)
        return settings_from_meta(_pairs(flat))

    # --- task state changes ------------------------------------------------------------------

    async def enqueue(
        self,
        queue: str,
        tasks: Sequence[NewTask],
        idempotency_window_ms: int,
        calls: Sequence[int] = (),
        echo_channel: str = "",
    ) -> list[EnqueueOutcome | LimitExceeded]:
        """Stores tasks of one queue in one script call. Payloads over STAGE_PAYLOAD_BYTES are
        written ahead (staged) and renamed into place by the script. `calls` says how many
        tasks each Enqueue call holds, in order (empty: one call): the queue's
        enqueue_rate_limit admits or refuses calls whole, and a refused call's tasks come back
        as the error (EnqueueRateLimited, or LimitExceeded if the call can never fit).
        `echo_channel`: only for a caller that leases right after (enqueue_and_lease).

        Raises:
            IdempotencyConflictAt: nothing was stored; these positions reuse a key.
            StoreUnavailable: nothing was stored; Redis lost staged payloads twice.
        """
        staged = [i for i, t in enumerate(tasks) if len(t.payload) > STAGE_PAYLOAD_BYTES]
        call = self._enqueue_call(queue, tasks, staged, idempotency_window_ms, calls, echo_channel)
        for _ in range(2):
            await self._stage(queue, [tasks[i] for i in staged])
            # Registered after the script, in the same write: a queue being forgotten
            # (emptiness re-checked after its removal, sweep_queues) either sees this task or
            # is re-registered.
            reply = await self._run(*call, hint=_delayed_hint(queue, tasks), register=(queue,))
            if len(reply) < 2 or reply[1] != b"lost":
                break
        else:
            raise StoreUnavailable(
                "Redis lost the large payloads written ahead of their tasks, twice (did it "
                "restart or fail over?); nothing was stored: retry the call"
            )
        return _enqueue_outcomes(queue, tasks, reply)

    async def enqueue_queues(
        self, batches: Sequence[tuple[str, Sequence[NewTask]]], idempotency_window_ms: int
    ) -> list[list[EnqueueOutcome | LimitExceeded] | Exception]:
        """enqueue for several queues' tasks (each queue's tasks one Enqueue call), each queue
        in its own script, every script in one write when it can be: a call with tasks for a
        thousand queues then costs one Redis round trip rather than a thousand. On a Cluster,
        or with a payload to write ahead, one queue after the other (enqueue).

        Returns one entry per batch, in order: its outcomes, or the error that stored nothing
        of it (IdempotencyConflictAt, EnqueueRateLimited, ...); the other batches are stored
        regardless. An error that says nothing of any batch (Redis unreachable) is raised.
        """
        if self.is_cluster or any(
            len(t.payload) > STAGE_PAYLOAD_BYTES for _, tasks in batches for t in tasks
        ):
            results: list[list[EnqueueOutcome | LimitExceeded] | Exception] = []
            for queue, tasks in batches:
                try:
                    results.append(await self.enqueue(queue, tasks, idempotency_window_ms))
                except IdempotencyConflictAt as exc:
                    results.append(exc)
            return results
        calls = [
            self._enqueue_call(queue, tasks, (), idempotency_window_ms, ())
            for queue, tasks in batches
        ]
        hints = [
            self._hint_call(h)
            for h in (_delayed_hint(queue, tasks) for queue, tasks in batches)
            if h is not None
        ]
        with _translate():
            replies = await self._pipeline([*calls, *hints], register=[q for q, _ in batches])
        self._note_failed_hints(hints, replies[len(calls) :])
        results = []
        for (queue, tasks), reply in zip(batches, replies[: len(calls)], strict=True):
            try:
                with _translate():
                    if isinstance(reply, Exception):
                        raise reply
                    results.append(_enqueue_outcomes(queue, tasks, reply))
            except Exception as exc:
                results.append(exc)
        return results

    async def enqueue_and_lease(
        self,
        queue: str,
        tasks: Sequence[NewTask],
        idempotency_window_ms: int,
        calls: Sequence[int],
        slots: Sequence[LeaseSlot],
    ) -> tuple[list[EnqueueOutcome | LimitExceeded] | Exception, LeaseBatch | Exception | None]:
        """enqueue, then a lease of up to len(slots) of the queue's tasks (as lease) in the same
        write: a worker of this broker waiting on the queue gets a new task without waiting for
        the wake and a lease call of its own, a Redis round trip and a turn of the event loop.

        Returns each part's result or error, since the lease may succeed where the enqueue did
        not (it may lease tasks stored before): its leases must reach their streams or be
        handed back. The lease is None when it was not sent: with a payload to write ahead
        (staged), or a broken connection before it. Cancellation is not caught: the caller
        runs this where it cannot be cancelled (TaskQueue).
        """
        if self.is_cluster or any(len(t.payload) > STAGE_PAYLOAD_BYTES for t in tasks):
            # Cluster: two writes (a pipeline split across nodes may run in any order); the
            # lease is sent only after the enqueue's reply. Staged: no lease, so no echo.
            echo = self.echo_channel if self.is_cluster else ""
            try:
                outcomes = await self.enqueue(queue, tasks, idempotency_window_ms, calls, echo)
            except Exception as exc:
                return exc, None
            if not self.is_cluster:
                return outcomes, None
            try:
                return outcomes, await self.lease(queue, slots)
            except Exception as exc:
                return outcomes, exc
        enqueue_call = self._enqueue_call(
            queue, tasks, (), idempotency_window_ms, calls, echo_channel=self.echo_channel
        )
        enqueue_hint = _delayed_hint(queue, tasks)
        lease_call, lease_hint = self._lease_call(queue, slots)
        hints = [self._hint_call(h) for h in (enqueue_hint, lease_hint) if h is not None]
        try:
            with _translate():
                enqueued, leased, *hinted = await self._pipeline(
                    [enqueue_call, lease_call, *hints], register=(queue,)
                )
        except Exception as exc:  # nothing known of either: as a failed enqueue
            return exc, None
        self._note_failed_hints(hints, hinted)
        try:
            with _translate():
                if isinstance(enqueued, Exception):
                    raise enqueued
                outcomes_or_error: Any = _enqueue_outcomes(queue, tasks, enqueued)
        except Exception as exc:
            outcomes_or_error = exc
        try:
            with _translate():
                if isinstance(leased, Exception):
                    raise leased
                batch_or_error: Any = await self._lease_batch(queue, slots, leased)
        except Exception as exc:
            batch_or_error = exc
        return outcomes_or_error, batch_or_error

    async def _stage(self, queue: str, tasks: Sequence[NewTask]) -> None:
        """Writes each large payload to its stage hash, one task per transaction (the payload
        and its expiry together), one after the other: Redis never holds more than one task's
        bytes of ours in one command, so other clients' commands wait behind one at most."""
        keys = QueueKeys(queue)
        with _translate():
            for t in tasks:
                stage = keys.stage_prefix + t.ref.local_id
                async with self._client.pipeline(transaction=True) as pipe:
                    # psz: lease.lua answers a payload this large by reference
                    pipe.hset(stage, mapping={"payload": t.payload, "psz": len(t.payload)})
                    pipe.pexpire(stage, STAGE_TTL_MS)
                    await pipe.execute()

    def _enqueue_call(
        self,
        queue: str,
        tasks: Sequence[NewTask],
        staged: Sequence[int],
        idempotency_window_ms: int,
        calls: Sequence[int],
        echo_channel: str = "",
    ) -> Call:
        """The enqueue script's call on tasks whose positions in `staged` were written ahead."""
        keys = QueueKeys(queue)
        args: list[str | bytes | int] = [
            *argv.EnqueueArgs(
                task_prefix=keys.task_prefix,
                fresh_prefix=keys.fresh_prefix,
                idempotency_prefix=keys.idempotency_prefix,
                stage_prefix=keys.stage_prefix,
                idempotency_window_ms=idempotency_window_ms,
                wake_channel=WAKE_CHANNEL,
                queue=queue,
                staged=",".join(str(i + 1) for i in staged),
                calls=",".join(map(str, calls)) if len(calls) > 1 else "",
                n=len(tasks),
                echo_channel=echo_channel,
            )
        ]
        written_ahead = set(staged)
        for i, t in enumerate(tasks):
            args += argv.EnqueueItem(
                id=t.ref.local_id,
                entry_id=entry_id(t.ref.local_id),
                task_type=t.type,
                payload=b"" if i in written_ahead else t.payload,
                headers=json.dumps(t.headers, sort_keys=True) if t.headers else "",
                priority=t.priority,
                max_attempts=t.max_attempts,
                lease_ms=t.lease_ms or 0,
                initial_backoff_ms=t.initial_backoff_ms,
                max_backoff_ms=t.max_backoff_ms,
                delay_ms=-1 if t.delay_ms is None else t.delay_ms,
                schedule_ms=-1 if t.schedule_ms is None else t.schedule_ms,
                idempotency_key=t.idempotency_key or "",
                body_hash=t.body_hash or "",
                group_key=t.group_key,
                parents=" ".join(t.parents),
                parent_policy=t.parent_policy.value,
            )
        return (
            "enqueue",
            [keys.pending, keys.scheduled, keys.stats, keys.fresh_priorities, keys.meta],
            args,
        )

    async def lease(self, queue: str, slots: Sequence[LeaseSlot]) -> LeaseBatch:
        """Leases up to len(slots) tasks of one queue; slot i is (lease id, lease ms for a task
        without its own, id of the stream it is for, principal it is bound to), and the i-th
        leased task fills slot i."""
        call, hint = self._lease_call(queue, slots)
        reply = await self._run(*call, hint=hint)
        return await self._lease_batch(queue, slots, reply)

    def _lease_call(self, queue: str, slots: Sequence[LeaseSlot]) -> tuple[Call, Hint | None]:
        """The lease script's call for these slots, and the due-index hint that goes with it."""
        keys = QueueKeys(queue)
        args: list[str | int] = [
            *argv.LeaseArgs(
                task_prefix=keys.task_prefix,
                fresh_prefix=keys.fresh_prefix,
                reply_bytes=LEASE_REPLY_BYTES,
                fetch_bytes=FETCH_PAYLOAD_BYTES,
                n=len(slots),
            )
        ]
        for slot in slots:  # already argv.LeaseSlot's fields, in its order (tests/store)
            args += slot
        args += TASK_FIELDS
        shortest = min((slot[1] for slot in slots), default=0)
        call: Call = (
            "lease",
            [keys.pending, keys.scheduled, keys.leased, keys.meta, keys.fresh_priorities],
            args,
        )
        return call, Hint(queue, delay_ms=max(0, shortest - HINT_MARGIN_MS)) if slots else None

    async def _lease_batch(self, queue: str, slots: Sequence[LeaseSlot], reply: Any) -> LeaseBatch:
        """The lease script's reply as leases, their large payloads read."""
        shortest = min((slot[1] for slot in slots), default=0)
        now, next_due, held = int(reply[0]), reply[1], int(reply[2])
        tasks = []
        unread: list[int] = []  # positions of tasks whose payload the script left out
        fresh_length, full_length = len(FRESH_REPLY_FIELDS), len(TASK_FIELDS)
        for i in range(3, len(reply), 2):
            ref, values = TaskRef(queue, _text(reply[i])), reply[i + 1]
            if len(values) == fresh_length:
                tasks.append(decode_fresh(ref, values))
            else:
                if len(values) > full_length:
                    unread.append(len(tasks))
                tasks.append(decode_fields(ref, values[:full_length]))
        gone = await self._read_payloads(tasks, unread) if unread else frozenset()
        leases = [_leased(task) for task in tasks]
        own = min((le.expire_ms for le in leases if le.task.lease_ms), default=-1)
        if own >= 0 and own < now + shortest:
            # A task's own lease is shorter than the hint sent with the script: hint again.
            await self._hint_now(Hint(queue, at_ms=own - HINT_MARGIN_MS))
        return LeaseBatch(
            now_ms=now,
            next_due_ms=_time_or_none(next_due),
            paused=held == 1,
            leases=leases,
            rate_limited=held == 2,
            gone=gone,
        )

    async def _read_payloads(self, tasks: list[Task], positions: Sequence[int]) -> frozenset[int]:
        """Fills in the payloads lease.lua left out (FETCH_PAYLOAD_BYTES), in one round trip;
        returns the positions of tasks deleted meanwhile (finished and trimmed between the two
        commands): their leases are void, and nothing is delivered for them."""
        keys = QueueKeys(tasks[positions[0]].ref.queue)
        with _translate():
            async with self._client.pipeline(transaction=False) as pipe:
                for i in positions:
                    pipe.hget(keys.task_prefix + tasks[i].ref.local_id, "payload")
                payloads = await pipe.execute()
        gone = set()
        for i, payload in zip(positions, payloads, strict=True):
            if payload is None:
                gone.add(i)
            else:
                tasks[i] = tasks[i]._replace(payload=payload)
        return frozenset(gone)

    async def _hint_now(self, hint: Hint) -> None:
        """A hint on its own, after a reply showed a due time the pipelined hint missed (a broker
        that dies before it is covered by the backstop sweep)."""
        try:
            with _translate():
                await self.due.hint([hint])
        except StoreUnavailable as exc:
            self.unhinted.add(hint.queue)
            log.warning("due-index hint failed (resent by the maintainer): %s", exc)

    async def ack(self, queue: str, items: Sequence[str | bytes]) -> list[SettleStatus]:
        """Acks, given as the script's flat per-item arguments (argv.AckItem, 4 per ack) so a
        large batch builds no object per item; one status per ack, in order."""
        keys = QueueKeys(queue)
        head = argv.AckArgs(
            task_prefix=keys.task_prefix, wake_channel=WAKE_CHANNEL, queue=queue, n=len(items) // 4
        )
        args = [*head, *items]
        reply = await self._run(
            "ack",
            [keys.leased, keys.done, keys.stats, keys.meta],
            args,
            hint=Hint(queue, delay_ms=max(0, self._finished_ms - HINT_MARGIN_MS)),
        )
        statuses = [_STATUSES[r] for r in reply[1:]]
        if SettleStatus.NOT_FOUND in statuses:  # rare: see _stale_if_fresh
            for i, status in enumerate(statuses):
                ref = TaskRef(queue, str(items[4 * i]))  # argv.AckItem: id comes first
                if status is SettleStatus.NOT_FOUND and await self.get(ref) is not None:
                    statuses[i] = SettleStatus.STALE
        return statuses

    async def nack(self, queue: str, items: Sequence[NackItem]) -> list[SettleResult]:
        keys = QueueKeys(queue)
        args: list[str | bytes | int] = [
            *argv.NackArgs(
                task_prefix=keys.task_prefix, wake_channel=WAKE_CHANNEL, queue=queue, n=len(items)
            )
        ]
        for item in items:
            args += argv.NackItem(
                id=item.ref.local_id,
                lease_id=item.lease_id,
                message=item.error,
                retry_delay_ms=-1 if item.retry_delay_ms is None else item.retry_delay_ms,
                dead_letter="1" if item.dead_letter else "0",
                jitter=repr(item.jitter),
                holder=item.holder,
            )
        # The retry's due time depends on the attempt, known only to the script: look at once
        # unless every nack names its delay (the maintainer sets the real time).
        delays = [i.retry_delay_ms for i in items if not i.dead_letter]
        explicit = [d for d in delays if d is not None]
        delay = 0 if len(explicit) < len(delays) else min(explicit, default=self._dead_ms)
        reply = await self._run(
            "nack",
            [keys.leased, keys.scheduled, keys.pending, keys.dead, keys.stats, keys.meta],
            args,
            hint=Hint(queue, delay_ms=max(0, min(delay, self._dead_ms) - HINT_MARGIN_MS)),
        )
        return await self._stale_if_fresh([i.ref for i in items], [_settle(r) for r in reply[1:]])

    async def extend(self, queue: str, items: Sequence[ExtendItem]) -> list[SettleResult]:
        keys = QueueKeys(queue)
        args: list[str | bytes | int] = [
            *argv.ExtendArgs(task_prefix=keys.task_prefix, n=len(items))
        ]
        for item in items:
            args += argv.ExtendItem(
                id=item.ref.local_id,
                lease_id=item.lease_id,
                duration_ms=-1 if item.duration_ms is None else item.duration_ms,
                holder=item.holder,
            )
        explicit = [i.duration_ms for i in items if i.duration_ms is not None]
        hint = None
        if explicit:
            hint = Hint(queue, delay_ms=max(0, min(explicit) - HINT_MARGIN_MS))
        reply = await self._run("extend_lease", [keys.leased], args, hint=hint)
        results = await self._stale_if_fresh(
            [i.ref for i in items], [_settle(r) for r in reply[1:]]
        )
        if len(explicit) < len(items):
            # An extension by the lease's own length may end before an earlier, longer one.
            expiries = [r.expire_ms for r in results if r.status is SettleStatus.OK]
            if expiries:
                await self._hint_now(Hint(queue, at_ms=min(expiries) - HINT_MARGIN_MS))
        return results

    async def _stale_if_fresh(
        self, refs: Sequence[TaskRef], results: list[SettleResult]
    ) -> list[SettleResult]:
        """The settle scripts find a task by its hash. A fresh task has none yet, and no lease
        either: a settlement of it is stale, not one of an unknown task. Looked up only on
        that (rare) answer."""
        for i, result in enumerate(results):
            if result.status is SettleStatus.NOT_FOUND and await self.get(refs[i]) is not None:
                results[i] = SettleResult(SettleStatus.STALE)
        return results

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
        args = _with_held(
            argv.DetachArgs(
                task_prefix=keys.task_prefix,
                stream_id=stream_id,
                window_ms=window_ms,
                reason=reason,
                n=len(leases),
            ),
            leases,
        )
        # Each detached lease expires within the window: the due index must look by then.
        count, earliest = await self._run(
            "detach",
            [keys.leased],
            args,
            hint=Hint(queue, delay_ms=max(0, window_ms - HINT_MARGIN_MS)),
        )
        return int(count), int(earliest)

    async def resume(
        self, queue: str, stream_id: str, leases: Sequence[tuple[str, str]], holder: str = ""
    ) -> list[SettleResult]:
        """Moves (local_id, lease_id) leases that are still current, and `holder`'s, to the
        stream."""
        keys = QueueKeys(queue)
        args = _with_held(
            argv.ResumeArgs(
                task_prefix=keys.task_prefix, stream_id=stream_id, holder=holder, n=len(leases)
            ),
            leases,
        )
        reply = await self._run("resume", [keys.leased], args)
        results = [_settle(r) for r in reply[1:]]
        # A resumed lease runs for its length from now, which may come before what the index
        # holds for the queue (a lease extended past its length, then moved).
        expiries = [r.expire_ms for r in results if r.status is SettleStatus.OK]
        if expiries:
            await self._hint_now(Hint(queue, at_ms=min(expiries) - HINT_MARGIN_MS))
        return results

    async def unlease(self, queue: str, stream_id: str, leases: Sequence[tuple[str, str]]) -> int:
        """Undoes (local_id, lease_id) leases never sent to the stream they were made for: no
        attempt spent. Returns how many."""
        keys = QueueKeys(queue)
        args = _with_held(
            argv.UnleaseArgs(
                task_prefix=keys.task_prefix,
                wake_channel=WAKE_CHANNEL,
                queue=queue,
                stream_id=stream_id,
                n=len(leases),
            ),
            leases,
        )
        return int(await self._run("unlease", [keys.leased, keys.pending], args))

    async def reclaim_expired(self, queue: str, limit: int) -> tuple[int, int | None]:
        """Reclaims up to limit expired leases. Returns (count, next expiry ms or None)."""
        keys = QueueKeys(queue)
        count, next_expiry = await self._run(
            "reclaim_expired",
            [keys.leased, keys.pending, keys.dead, keys.stats],
            argv.ReclaimArgs(
                task_prefix=keys.task_prefix, wake_channel=WAKE_CHANNEL, queue=queue, limit=limit
            ),
            hint=Hint(queue, delay_ms=max(0, self._dead_ms - HINT_MARGIN_MS)),
        )
        return int(count), _time_or_none(next_expiry)

    async def promote_due(self, queue: str, limit: int) -> tuple[int, int | None]:
        """Moves up to limit due tasks to pending. Returns (count, next due ms or None)."""
        keys = QueueKeys(queue)
        with _translate():
            count, next_due = await self._scripts["promote_due"](
                keys=[keys.scheduled, keys.pending],
                args=argv.PromoteArgs(task_prefix=keys.task_prefix, limit=limit),
            )
        return int(count), _time_or_none(next_due)

    async def cancel(self, ref: TaskRef) -> CancelResult:
        """Cancels an unfinished task, revoking its lease if one is held."""
        keys = QueueKeys(ref.queue)
        reply = await self._run(
            "cancel",
            [keys.task(ref.local_id), keys.pending, keys.scheduled, keys.leased, keys.done,
             keys.stats, keys.fresh_priorities, keys.meta],
            argv.CancelArgs(
                id=ref.local_id, entry_id=entry_id(ref.local_id), fresh_prefix=keys.fresh_prefix,
                wake_channel=WAKE_CHANNEL, queue=ref.queue,
            ),
            hint=Hint(ref.queue, delay_ms=max(0, self._finished_ms - HINT_MARGIN_MS)),
        )  # fmt: skip
        status = CancelStatus(_text(reply[0]))
        if status is CancelStatus.CANCELLED:  # {'ok', lease id or ''}
            return CancelResult(status, revoked_lease_id=_text(reply[1]) or None)
        if status is CancelStatus.FINISHED:  # {'final', state}
            return CancelResult(status, final_state=TaskState(int(reply[1])))
        return CancelResult(status)

    async def announce_revoked(self, task_id: str, lease_id: str) -> None:
        """Tells every replica that this lease was revoked (a hint: the fence is in Redis)."""
        with _translate():
            await self._client.publish(REVOKE_CHANNEL, f"{task_id} {lease_id}")

    async def get(self, ref: TaskRef) -> Task | None:
        keys = QueueKeys(ref.queue)
        with _translate():
            # The client does not decode responses: fields and values are bytes.
            flat = await self._scripts["get_task"](
                keys=[keys.task(ref.local_id), keys.fresh_priorities],
                args=argv.GetArgs(
                    id=ref.local_id,
                    entry_id=entry_id(ref.local_id),
                    fresh_prefix=keys.fresh_prefix,
                ),
            )
        h = dict(zip(flat[0::2], flat[1::2], strict=True))
        return decode_task(ref, h) if h else None

    async def stats(self, queue: str) -> QueueStats:
        [one] = await self.stats_many([queue])
        return one

    async def stats_many(self, queues: Sequence[str]) -> list[QueueStats]:
        """Each queue's stats: pipelined on standalone Redis, concurrent calls on a Cluster."""
        out: list[QueueStats] = []
        for start in range(0, len(queues), MAINTAIN_CHUNK):
            chunk = queues[start : start + MAINTAIN_CHUNK]
            calls: list[tuple[Sequence[str], Sequence[Any]]] = []
            for q in chunk:
                k = QueueKeys(q)
                calls.append(
                    (
                        [
                            k.pending,
                            k.scheduled,
                            k.leased,
                            k.dead,
                            k.stats,
                            k.meta,
                            k.fresh_priorities,
                        ],
                        argv.StatsArgs(fresh_prefix=k.fresh_prefix),
                    )
                )
            with _translate():
                if self.is_cluster:
                    script = self._scripts["stats"]
                    replies = await asyncio.gather(*(script(keys=k, args=a) for k, a in calls))
                else:
                    replies = await self._evalsha_many("stats", calls)
            out += [_queue_stats(q, r) for q, r in zip(chunk, replies, strict=True)]
        return out

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
            wanted = found[:page_size]
            page = await self._hashes_within(keys, wanted, LIST_PAGE_BYTES)
        tasks = [decode_task(TaskRef(queue, local_id), h) for (local_id, _), h in page if h]
        more = len(found) > page_size or len(page) < len(wanted)
        last = page[-1][0] if page else None
        cursor = (last[1], last[0]) if more and last else None
        return DeadPage(tasks=tasks, next_cursor=cursor)

    async def _hashes_within(
        self, keys: QueueKeys, entries: Sequence[tuple[str, int]], budget: int
    ) -> list[tuple[tuple[str, int], dict[bytes, bytes]]]:
        """The task hashes of a prefix of `entries` (local id first), in order ({} for a task
        gone meanwhile): read a few at a time, and no more once they hold `budget` bytes (the
        first is always read). A page of megabyte tasks would otherwise pass gRPC's message
        limit, and each HGETALL of one holds Redis for a millisecond or two."""
        out: list[tuple[tuple[str, int], dict[bytes, bytes]]] = []
        total, chunk = 0, 1  # the first one alone: its size sets the next chunk's
        while len(out) < len(entries) and total < budget:
            part = entries[len(out) : len(out) + chunk]
            async with self._client.pipeline(transaction=False) as pipe:
                for local_id, _ in part:
                    pipe.hgetall(keys.task(local_id))
                hashes: list[dict[bytes, bytes]] = await pipe.execute()
            for entry, h in zip(part, hashes, strict=True):
                if total >= budget:
                    return out
                out.append((entry, h))
                total += sum(len(k) + len(v) for k, v in h.items())
            # As many as the rest of the budget holds at the size seen so far (at least one).
            chunk = max(1, min(64, (budget - total) * len(out) // max(1, total) + 1))
        return out

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
                    args=[
                        *argv.RedriveArgs(
                            task_prefix=keys.task_prefix, wake_channel=WAKE_CHANNEL, queue=queue
                        ),
                        *local_ids,
                    ],
                )
            )

    async def delete_dead(self, queue: str, local_ids: Sequence[str]) -> int:
        keys = QueueKeys(queue)
        with _translate():
            return int(
                await self._scripts["delete_dead"](
                    keys=[keys.dead],
                    args=[*argv.DeleteDeadArgs(task_prefix=keys.task_prefix), *local_ids],
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
                args=argv.TrimArgs(
                    task_prefix=keys.task_prefix,
                    finished_retention_ms=finished_retention_ms,
                    dead_retention_ms=dead_retention_ms,
                    limit=limit,
                ),
            )
        return int(finished), int(dead)

    # --- the due index and maintenance ----------------------------------------------------------

    async def take_due(self, limit: int, claim_ms: int) -> list[DueEntry]:
        """Queues whose time to look has come (up to limit per index shard), claimed."""
        with _translate():
            return await self.due.take(limit, claim_ms)

    async def settle_due(self, outcomes: Sequence[tuple[DueEntry, int | None]]) -> int:
        """Sets taken entries to their queues' next due times, unless hinted meanwhile."""
        with _translate():
            return await self.due.settle(outcomes)

    async def hint(self, hints: Sequence[Hint]) -> None:
        with _translate():
            await self.due.hint(hints)

    async def maintain(self, queues: Sequence[str], limit: int, slack_ms: int) -> list[Maintained]:
        """Runs maintain.lua on each queue (pipelined; concurrently on a Cluster)."""
        out: list[Maintained] = []
        for start in range(0, len(queues), MAINTAIN_CHUNK):
            chunk = queues[start : start + MAINTAIN_CHUNK]
            calls = [self._maintain_call(q, limit, slack_ms) for q in chunk]
            with _translate():
                if self.is_cluster:
                    script = self._scripts["maintain"]
                    replies = await asyncio.gather(*(script(keys=k, args=a) for k, a in calls))
                else:
                    replies = await self._evalsha_many("maintain", calls)
            for queue, r in zip(chunk, replies, strict=True):
                out.append(
                    Maintained(
                        queue,
                        int(r[0]),
                        int(r[1]),
                        int(r[2]),
                        _time_or_none(r[3]),
                        r[4] == 1,
                        int(r[5]),
                    )
                )
        return out

    async def _evalsha_many(
        self, name: str, calls: Sequence[tuple[Sequence[str], Sequence[Any]]]
    ) -> list[Any]:
        """Standalone: one idempotent script on many queues in one pipeline (loaded again
        after NOSCRIPT, then the whole pipeline is sent again)."""
        sha = self._scripts[name].sha
        for attempt in range(2):
            try:
                async with self._client.pipeline(transaction=False) as pipe:
                    for keys, args in calls:
                        pipe.evalsha(sha, len(keys), *keys, *args)
                    return list(await pipe.execute())
            except rex.NoScriptError:
                if attempt:
                    raise
                await self._client.script_load(self._scripts[name].script)
        raise AssertionError("unreachable")

    def _maintain_call(
        self, queue: str, limit: int, slack_ms: int
    ) -> tuple[list[str], argv.MaintainArgs]:
        k = QueueKeys(queue)
        keys = [k.leased, k.pending, k.dead, k.stats, k.scheduled, k.done, k.meta]
        keys.append(k.fresh_priorities)
        args = argv.MaintainArgs(
            task_prefix=k.task_prefix,
            wake_channel=WAKE_CHANNEL,
            queue=queue,
            limit=limit,
            finished_retention_ms=self._finished_ms,
            dead_retention_ms=self._dead_ms,
            slack_ms=slack_ms,
        )
        return keys, args

    async def scan_queues(self, cursor: int, count: int) -> tuple[int, list[str]]:
        """One SSCAN step over the queue registry."""
        with _translate():
            next_cursor, members = await self._client.sscan(QUEUES_KEY, cursor, count=count)
        return int(next_cursor), [_text(m) for m in members]

    async def count_queues(self) -> int:
        with _translate():
            return int(await self._client.scard(QUEUES_KEY))

    async def forget_queue(self, queue: str) -> bool:
        """Forgets a queue found empty: out of the registry and the index, then its totals,
        if it is still empty. An enqueue racing with this registers it again after its script
        (enqueue), and one whose script ran before the re-check is seen by it: the queue is
        put back. Returns whether it was forgotten."""
        k = QueueKeys(queue)
        with _translate():
            await self._client.srem(QUEUES_KEY, queue)
            await self.due.forget(queue)
            gone = await self._scripts["forget_queue"](
                keys=[k.pending, k.scheduled, k.leased, k.done, k.dead, k.meta, k.stats,
                      k.fresh_priorities],
                args=argv.ForgetArgs(fresh_prefix=k.fresh_prefix),
            )  # fmt: skip
            if int(gone) == 1:
                return True
            await self._client.sadd(QUEUES_KEY, queue)
            await self.due.hint([Hint(queue, delay_ms=0)])
        return False

    # --- wake-ups -----------------------------------------------------------------------------

    @asynccontextmanager
    async def wake_events(self) -> AsyncIterator[WakeEvents]:
        """The wake and revoke announcements of every replica, on a Pub/Sub connection of
        their own. On a Cluster every node hears every PUBLISH, so one node's connection
        serves."""
        channels = (WAKE_CHANNEL, REVOKE_CHANNEL, FLOW_CHANNEL, self.echo_channel)
        async with self._subscription(*channels) as pubsub:
            yield WakeEvents(pubsub, self.echo_channel)

    @asynccontextmanager
    async def finished_events(self) -> AsyncIterator[FinishedEvents]:
        """The ids of watched tasks (mark_watched) that finished, announced by every replica's
        scripts, on a Pub/Sub connection of their own (as wake_events)."""
        async with self._subscription(FINISHED_CHANNEL) as pubsub:
            yield FinishedEvents(pubsub)

    @asynccontextmanager
    async def _subscription(self, *channels: str) -> AsyncIterator[aioredis.client.PubSub]:
        """A Pub/Sub connection subscribed to channels: from the pool on a standalone Redis,
        to one random node on a Cluster (every node hears every PUBLISH)."""
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
                await pubsub.subscribe(*channels)
            yield pubsub
        finally:
            try:
                await pubsub.aclose()  # type: ignore[no-untyped-call]
            finally:
                if node_client is not None:
                    await node_client.aclose()

    # --- watchers -----------------------------------------------------------------------------

    async def mark_watched(self, ref: TaskRef) -> bool:
        """Sets `w` on the task's hash, so the script that finishes it publishes its id on
        FINISHED_CHANNEL. False when the task has no hash (fresh, or no such task): nothing is
        written then."""
        with _translate():
            marked = await self._scripts["watch"](keys=[QueueKeys(ref.queue).task(ref.local_id)])
        return int(marked) == 1


async def _read_message(pubsub: aioredis.client.PubSub, timeout_s: float) -> tuple[str, str] | None:
    """The next (channel, data) of a subscription, or None after timeout_s without one (or
    after a reply that is not a message: a subscription's confirmation, a health check's PONG).

    Read straight from the subscription's connection, as PubSub.get_message reads it but
    without its retry wrapper, timing hooks and message dict (about 10 us of broker CPU per
    Enqueue, issue 15: every enqueue publishes a wake). A broken connection is raised rather
    than reconnected underneath: the caller reconnects and makes up for what it missed.

    Raises:
        StoreUnavailable: the connection broke.
    """
    conn = cast("aioredis.Connection", pubsub.connection)  # set by subscribe()
    with _translate():
        # A PING now and then, so a dead socket shows.
        await pubsub.check_health()  # type: ignore[no-untyped-call]
        reply = await conn.read_response(
            timeout=timeout_s, disconnect_on_error=False, push_request=True
        )
    if not isinstance(reply, list) or len(reply) != 3 or reply[0] != b"message":
        return None
    return _text(reply[1]), _text(reply[2])


class WakeEvents:
    """One subscription's announcements, as models."""

    def __init__(self, pubsub: aioredis.client.PubSub, echo_channel: str) -> None:
        self._pubsub = pubsub
        self._echo_channel = echo_channel

    async def next(self, timeout_s: float) -> Wake | Revoke | Flow | Echo | None:
        """The next announcement, or None after timeout_s without one (_read_message).

        Raises:
            StoreUnavailable: the connection broke.
        """
        message = await _read_message(self._pubsub, timeout_s)
        if message is None:
            return None
        channel, data = message
        if channel == REVOKE_CHANNEL:
            task_id, _, lease_id = data.partition(" ")
            return Revoke(task_id, lease_id)
        if channel == FLOW_CHANNEL:
            return Flow(data)
        if channel == self._echo_channel:
            return Echo(data)
        return Wake(data)


class FinishedEvents:
    """The finished channel's announcements: the public ids of watched tasks that finished."""

    def __init__(self, pubsub: aioredis.client.PubSub) -> None:
        self._pubsub = pubsub

    async def next(self, timeout_s: float) -> str | None:
        """The next finished task's id, or None after timeout_s without one (_read_message).

        Raises:
            StoreUnavailable: the connection broke.
        """
        message = await _read_message(self._pubsub, timeout_s)
        return None if message is None else message[1]


def _over_enqueue_rate(queue: str, wait_ms: int) -> LimitExceeded:
    if wait_ms < 0:
        return LimitExceeded(
            f"queue {queue!r}: this call holds more tasks than its enqueue_rate_limit's burst, "
            "so it can never be accepted whole; send fewer tasks per call"
        )
    return EnqueueRateLimited(
        f"queue {queue!r} is over its enqueue_rate_limit; nothing was stored: retry in "
        f"{wait_ms / 1000:.3f} s",
        wait_ms / 1000,
    )


def _enqueue_outcomes(
    queue: str, tasks: Sequence[NewTask], reply: Any
) -> list[EnqueueOutcome | LimitExceeded]:
    """The enqueue script's reply, one outcome per task.

    Raises:
        IdempotencyConflictAt: nothing was stored; these positions reuse a key.
    """
    if len(reply) > 1 and reply[1] == b"conflict":
        raise IdempotencyConflictAt([int(i) - 1 for i in reply[2:]])
    outcomes: list[EnqueueOutcome | LimitExceeded] = []
    prefix = f"{queue}:"  # TaskRef.task_id, joined here: this runs for every task
    for task, r in zip(tasks, reply[1:], strict=True):
        kind = r[:2]
        if kind == b"d:":  # "d:<local id>": a duplicate of that task
            outcomes.append(EnqueueOutcome(prefix + _text(r[2:]), True))
        elif kind == b"l:":
            outcomes.append(_over_enqueue_rate(queue, int(r[2:])))
        else:  # stored
            outcomes.append(EnqueueOutcome(prefix + task.ref.local_id, False))
    return outcomes


def _delayed_hint(queue: str, tasks: Sequence[NewTask]) -> Hint | None:
    """The hint for an enqueue: when its earliest delayed or scheduled task comes due."""
    delays = [t.delay_ms for t in tasks if t.delay_ms]
    times = [t.schedule_ms for t in tasks if t.schedule_ms is not None]
    if not delays and not times:
        return None
    return Hint(
        queue,
        at_ms=min(times) - HINT_MARGIN_MS if times else None,
        delay_ms=max(0, min(delays) - HINT_MARGIN_MS) if delays else None,
    )


def _auth(client: RedisCluster) -> dict[str, Any]:
    kwargs = client.get_connection_kwargs()
    return {k: v for k, v in kwargs.items() if k in ("username", "password", "ssl")}


def _queue_stats(queue: str, reply: list[Any]) -> QueueStats:
    totals = {_text(k): int(v) for k, v in _pairs(reply[7]).items()}
    meta = _pairs(reply[5])
    now = int(reply[0])
    return QueueStats(
        queue=queue,
        now_ms=now,
        pending=int(reply[1]),
        scheduled=int(reply[2]),
        leased=int(reply[3]),
        dead=int(reply[4]),
        paused=meta.get(b"paused") == b"1",
        oldest_ready_ms=_time_or_none(reply[6]),
        enqueued_total=totals.get("enq", 0),
        succeeded_total=totals.get("ok", 0),
        retried_total=totals.get("retry", 0),
        reclaimed_total=totals.get("reclaim", 0),
        dead_lettered_total=totals.get("dead", 0),
        cancelled_total=totals.get("cancel", 0),
        failed_total=totals.get("fail", 0),
        settings=settings_from_meta(meta),
        rate_tokens=bucket_tokens(meta, "rl", now),
        group_keys_pending=int(reply[8]),
        group_keys_parked=int(reply[9]),
        waiting=int(reply[10]),
    )
