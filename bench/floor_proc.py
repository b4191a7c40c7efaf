"""`python -m bench.floor_proc`: the task lifecycle straight on Redis, for the floor scenario.

One process, plain (synchronous) redis-py, the broker's own Lua scripts as the store loads them
(broker.store.scripts.read_script) with their ARGV named by broker.store.argv: no gRPC, no
asyncio, no TaskQueue or RedisStore. Each round trip is one pipeline of three scripts on a batch:
enqueue.lua stores a batch, lease.lua leases a batch (the one just stored: the queue is FIFO),
and ack.lua settles the batch leased in the round before. The broker's pipelines also carry a
due-index hint with its leases and acks, and a queue registration with its enqueues; the floor
leaves those out, so it is the least work Redis does per task.

Emits `ready` once connected, waits for a line on stdin, then runs --tasks through their life
(or stops enqueuing at --cap-s), emits `result` (tasks acked, seconds, this process's CPU
seconds) and exits. Run as a
`--baseline`, it imports that ref's broker modules: a ref without them cannot run it.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from typing import TypeVar

import redis

from bench.protocol import emit
from bench.worker_proc import TASK_TYPE
from broker import ids
from broker.config import Settings
from broker.ids import IdGenerator, new_lease_id
from broker.store import argv, redis_store
from broker.store.keys import WAKE_CHANNEL, QueueKeys
from broker.store.redis_store import TASK_FIELDS
from broker.store.scripts import read_script

PAYLOAD = b"x" * 100
LEASE_MS = 30_000

T = TypeVar("T")

#: One held lease: (task's local id, lease id).
Held = tuple[str, str]


def _fields_known(cls: Callable[..., T], **values: object) -> T:
    """cls built from the values it has fields for: a baseline's store (--baseline) may know
    fewer ARGV fields than today's (e.g. no stage_prefix before large payloads were staged)."""
    fields: tuple[str, ...] = getattr(cls, "_fields")  # noqa: B009 - a NamedTuple class
    return cls(**{name: value for name, value in values.items() if name in fields})


class Lifecycle:
    """The three scripts on one queue, with the defaults the broker fills in for a plain task."""

    def __init__(self, client: redis.Redis, queue: str) -> None:
        self._client = client
        self._keys = QueueKeys(queue)
        self._queue = queue
        self._sha = {n: client.script_load(read_script(n)) for n in ("enqueue", "lease", "ack")}
        self._ids = IdGenerator()
        settings = Settings()
        self._window_ms = round(settings.idempotency_window_s * 1000)
        self._template = _fields_known(
            argv.EnqueueItem,
            id="", entry_id="", task_type=TASK_TYPE, payload=PAYLOAD, headers="", priority=0,
            max_attempts=settings.default_max_attempts, lease_ms=0,
            initial_backoff_ms=round(settings.backoff_initial_s * 1000),
            max_backoff_ms=round(settings.backoff_max_s * 1000), delay_ms=-1, schedule_ms=-1,
            idempotency_key="", body_hash="", staged="",  # (staged: an older store's)
            group_key="", parents="", parent_policy="c",
        )  # fmt: skip

    @property
    def _fresh_priorities(self) -> list[str]:
        """The fresh streams' priority index, for a store that has one (older ones do not)."""
        key: str | None = getattr(self._keys, "fresh_priorities", None)
        return [key] if key else []

    def _item(self, local_id: str) -> argv.EnqueueItem:
        item = self._template._replace(id=local_id)
        if "entry_id" in item._fields:  # a store with fresh streams
            item = item._replace(entry_id=getattr(ids, "entry_id")(local_id))  # noqa: B009
        return item

    def round_trip(self, enqueue: int, lease: int, acks: list[Held]) -> tuple[list[Held], int]:
        """Enqueues `enqueue` tasks, leases up to `lease` and acks `acks`, in one pipeline.
        Returns (the leases taken, how many acks settled).

        Raises:
            RuntimeError: A script refused what the lifecycle expects to succeed.
        """
        k = self._keys
        pipe = self._client.pipeline(transaction=False)
        if enqueue:
            args: list[str | int | bytes] = [
                *_fields_known(
                    argv.EnqueueArgs, task_prefix=k.task_prefix,
                    fresh_prefix=getattr(k, "fresh_prefix", None),  # absent in older stores
                    idempotency_prefix=k.idempotency_prefix,
                    stage_prefix=getattr(k, "stage_prefix", None),  # absent in older stores
                    idempotency_window_ms=self._window_ms, wake_channel=WAKE_CHANNEL,
                    queue=self._queue, staged="", calls="", n=enqueue,
                )
            ]  # fmt: skip
            for _ in range(enqueue):
                args += self._item(self._ids.new())
            # meta (enqueue_rate_limit) after the fresh index; an older enqueue.lua ignores it
            keys = [k.pending, k.scheduled, k.stats, *self._fresh_priorities, k.meta]
            pipe.evalsha(self._sha["enqueue"], len(keys), *keys, *args)
        lease_ids = [new_lease_id() for _ in range(lease)]
        if lease:
            lease_args = _fields_known(
                argv.LeaseArgs, task_prefix=k.task_prefix,
                fresh_prefix=getattr(k, "fresh_prefix", None),
                reply_bytes=getattr(redis_store, "LEASE_REPLY_BYTES", 0),
                fetch_bytes=getattr(redis_store, "FETCH_PAYLOAD_BYTES", 0), n=lease,
            )  # fmt: skip
            args = [*lease_args]
            for lease_id in lease_ids:
                args += argv.LeaseSlot(
                    lease_id=lease_id, lease_ms=LEASE_MS, stream_id="floor", holder=""
                )
            args += TASK_FIELDS
            keys = [k.pending, k.scheduled, k.leased, k.meta, *self._fresh_priorities]
            pipe.evalsha(self._sha["lease"], len(keys), *keys, *args)
        if acks:
            ack_args = _fields_known(
                argv.AckArgs, task_prefix=k.task_prefix, wake_channel=WAKE_CHANNEL,
                queue=self._queue, n=len(acks),
            )  # fmt: skip
            args = [*ack_args]
            for local_id, lease_id in acks:
                args += argv.AckItem(id=local_id, lease_id=lease_id, result=b"", holder="")
            # meta: an older ack.lua takes three keys and ignores a fourth
            pipe.evalsha(self._sha["ack"], 4, k.leased, k.done, k.stats, k.meta, *args)
        replies = pipe.execute()
        leased: list[Held] = []
        if lease:
            reply = replies[1 if enqueue else 0]
            ids = [i.decode() for i in reply[3::2]]
            leased = list(zip(ids, lease_ids, strict=False))
        acked = 0
        if acks:
            statuses = replies[-1][1:]
            acked = sum(1 for s in statuses if s == b"ok")
            if acked != len(acks):
                raise RuntimeError(f"ack settled {acked} of {len(acks)}: {statuses[:3]!r} ...")
        return leased, acked


def main(args: argparse.Namespace) -> None:
    client = redis.Redis.from_url(args.redis_url)
    try:
        life = Lifecycle(client, args.queue)
        warm_up, _ = life.round_trip(1, 1, [])  # connected, scripts loaded
        life.round_trip(0, 0, warm_up)
        emit("ready")
        sys.stdin.readline()  # the parent's go, once it has read Redis's CPU time
        cpu0, started = time.process_time(), time.perf_counter()
        held: list[Held] = []
        done, enqueued = 0, 0
        deadline = started + args.cap_s
        while enqueued < args.tasks and time.perf_counter() < deadline:
            n = min(args.batch, args.tasks - enqueued)
            held, acked = life.round_trip(n, n, held)
            enqueued += n
            done += acked
        _, acked = life.round_trip(0, 0, held)
        done += acked
        seconds = time.perf_counter() - started
        emit("result", tasks=done, seconds=seconds, cpu_s=time.process_time() - cpu0)
    finally:
        client.close()


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.floor_proc")
    p.add_argument("--redis-url", required=True)
    p.add_argument("--queue", required=True)
    p.add_argument("--tasks", type=int, default=50_000)
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--cap-s", type=float, default=5.0)
    return p.parse_args()


if __name__ == "__main__":
    main(parse_args())
