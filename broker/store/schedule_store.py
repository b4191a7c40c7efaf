"""ScheduleStore: schedules in Redis. Each schedule is one hash under its template's queue's
hash tag (so fire_schedule.lua stores a tick's task and advances the schedule in one step on
one slot); three keys under the tag {~sched} hold the name registry (name -> queue, which
makes names unique across queues), the names in order for paging, and the due index
(name -> next tick ms) that every replica's firer reads.

The registry and due index live in another slot than the hashes, so they are written outside
the scripts, in an order that keeps them safe: a name is claimed before its hash is written
and released after its hash is deleted; the due index is a hint that may be early (the
script checks the real next tick) and is raised only after the hash it follows."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, Final, cast

from broker.models import Hint
from broker.schedule_models import (
    CatchUp,
    FireOutcome,
    FireResult,
    FireStep,
    Schedule,
    TaskTemplate,
)
from broker.store import argv
from broker.store.keys import (
    SCHEDULE_CLAIMS_KEY,
    SCHEDULE_DUE_KEY,
    SCHEDULE_NAMES_KEY,
    SCHEDULE_QUEUES_KEY,
    WAKE_CHANNEL,
    QueueKeys,
)
from broker.store.redis_store import HINT_MARGIN_MS, RedisStore, _translate

#: The template's fields carry the task hash's names (fire_schedule.lua copies them over).
TEMPLATE_FIELDS: Final = ("type", "payload", "hdr", "pri", "max", "lease_ms", "bo_i", "bo_m", "gk")


def _text(value: bytes | str | None) -> str:
    if value is None:
        return ""
    return value.decode() if isinstance(value, bytes) else value


def _int_or_none(value: bytes | None) -> int | None:
    text = _text(value)
    return int(text) if text not in ("", "-1") else None


class ScheduleStore:
    """Schedule hashes, the name registry and the due index; fires ticks by script."""

    def __init__(self, store: RedisStore, idempotency_window_ms: int) -> None:
        self._store = store
        self._client = store.client
        self._window_ms = idempotency_window_ms

    # --- registry -----------------------------------------------------------------------------

    async def claim(self, name: str, queue: str, now_ms: int) -> str | None:
        """Claims a name for a queue at now_ms. Returns None when claimed, else the queue
        that holds it. The claim stays open (claim_age_ms) until settle_claim."""
        with _translate():
            if await self._client.hsetnx(SCHEDULE_QUEUES_KEY, name, queue):
                await self._client.zadd(SCHEDULE_CLAIMS_KEY, {name: now_ms})
                await self._client.zadd(SCHEDULE_NAMES_KEY, {name: 0})
                return None
            return _text(await self._client.hget(SCHEDULE_QUEUES_KEY, name)) or None

    async def claim_since(self, name: str) -> int | None:
        """When an open claim on the name was made (None: no open claim)."""
        with _translate():
            score = await self._client.zscore(SCHEDULE_CLAIMS_KEY, name)
        return None if score is None else int(score)

    async def take_over(self, name: str, queue: str, now_ms: int) -> None:
        """Points a name whose schedule hash is missing (a create or delete that died half
        way) at queue, as a fresh claim."""
        with _translate():
            await self._client.hset(SCHEDULE_QUEUES_KEY, name, queue)
            await self._client.zadd(SCHEDULE_CLAIMS_KEY, {name: now_ms})
            await self._client.zadd(SCHEDULE_NAMES_KEY, {name: 0})

    async def settle_claim(self, name: str) -> None:
        """The create that claimed the name has written its schedule."""
        with _translate():
            await self._client.zrem(SCHEDULE_CLAIMS_KEY, name)

    async def release(self, name: str) -> None:
        with _translate():
            await self._client.zrem(SCHEDULE_DUE_KEY, name)
            await self._client.zrem(SCHEDULE_NAMES_KEY, name)
            await self._client.zrem(SCHEDULE_CLAIMS_KEY, name)
            await self._client.hdel(SCHEDULE_QUEUES_KEY, name)

    async def queue_of(self, name: str) -> str | None:
        with _translate():
            return _text(await self._client.hget(SCHEDULE_QUEUES_KEY, name)) or None

    async def queues_of(self, names: Sequence[str]) -> list[str | None]:
        if not names:
            return []
        with _translate():
            found = await self._client.hmget(SCHEDULE_QUEUES_KEY, list(names))
        return [_text(q) or None for q in found]

    async def names_after(self, after: str, count: int) -> list[str]:
        """Up to count names sorted, after `after` ('' for the first)."""
        low = f"({after}" if after else "-"
        with _translate():
            names = await self._client.zrangebylex(SCHEDULE_NAMES_KEY, low, "+", 0, count)
        return [_text(n) for n in names]

    # --- the due index --------------------------------------------------------------------

    async def due(self, until_ms: int, limit: int) -> list[tuple[str, int]]:
        """Names whose next tick is at or before until_ms, earliest first."""
        with _translate():
            rows = await self._client.zrange(
                SCHEDULE_DUE_KEY, "-inf", until_ms, byscore=True, offset=0, num=limit,
                withscores=True,
            )  # fmt: skip
        return [(_text(name), int(score)) for name, score in cast(list[tuple[bytes, float]], rows)]

    async def index(self, name: str, next_ms: int | None) -> None:
        """Sets a schedule's entry in the due index (None: removes it)."""
        with _translate():
            if next_ms is None:
                await self._client.zrem(SCHEDULE_DUE_KEY, name)
            else:
                await self._client.zadd(SCHEDULE_DUE_KEY, {name: next_ms})

    # --- schedule hashes ------------------------------------------------------------------

    async def get(self, queue: str, name: str) -> Schedule | None:
        with _translate():
            fields = await self._client.hgetall(QueueKeys(queue).schedule(name))
        return _decode(queue, name, cast(dict[bytes, bytes], fields)) if fields else None

    async def put_definition(self, schedule: Schedule, create: bool, with_next: bool) -> bool:
        """Writes a schedule's definition and paused state, and its next tick too when
        with_next (None: removed). False when refused: a create of one that exists, an update
        of one that does not. An update without with_next leaves the next tick to the firer."""
        t = schedule.template
        pairs: list[tuple[str, str | bytes]] = [
            ("cron", schedule.cron),
            ("tz", schedule.time_zone),
            ("jit", str(schedule.jitter_ms)),
            ("catch", schedule.catch_up.value),
            ("paused", "1" if schedule.paused else "0"),
            ("type", t.type),
            ("payload", t.payload),
            ("hdr", json.dumps(t.headers, sort_keys=True) if t.headers else ""),
            ("pri", str(t.priority)),
            ("max", str(t.max_attempts)),
            ("lease_ms", str(t.lease_ms or 0)),
            ("bo_i", str(t.initial_backoff_ms)),
            ("bo_m", str(t.max_backoff_ms)),
            ("delay", str(-1 if t.delay_ms is None else t.delay_ms)),
            ("gk", t.group_key),
        ]
        return await self._put(t.queue, schedule.name, create, pairs, with_next, schedule.next_ms)

    async def set_paused(self, queue: str, name: str, paused: bool, next_ms: int | None) -> bool:
        """Pauses (next tick removed) or resumes (from next_ms). False when there is none."""
        pairs: list[tuple[str, str | bytes]] = [("paused", "1" if paused else "0")]
        return await self._put(queue, name, False, pairs, True, next_ms)

    async def _put(
        self,
        queue: str,
        name: str,
        create: bool,
        pairs: list[tuple[str, str | bytes]],
        with_next: bool,
        next_ms: int | None,
    ) -> bool:
        if with_next and next_ms is not None:
            pairs.append(("next", str(next_ms)))
        args: list[Any] = [
            *argv.PutScheduleArgs(
                mode="create" if create else "update",
                drop="next" if with_next and next_ms is None else "",
                n=len(pairs),
            )
        ]
        for field_name, value in pairs:
            args += argv.PutScheduleItem(name=field_name, value=value)
        reply = await self._store.run_script(
            "put_schedule", [QueueKeys(queue).schedule(name)], args
        )
        return _text(reply[0]) == "ok"

    async def delete(self, queue: str, name: str) -> bool:
        with _translate():
            return bool(await self._client.delete(QueueKeys(queue).schedule(name)))

    async def fire(self, queue: str, name: str, step: FireStep) -> FireResult:
        """Runs one fire step (fire_schedule.lua); the task's due time is hinted to the due
        index of queues so the maintainer promotes it."""
        keys = QueueKeys(queue)
        args = argv.FireScheduleArgs(
            task_prefix=keys.task_prefix,
            idempotency_prefix=keys.idempotency_prefix,
            idempotency_window_ms=self._window_ms,
            wake_channel=WAKE_CHANNEL,
            queue=queue,
            expected_next=_optional(step.expected_next_ms),
            new_next=_optional(step.new_next_ms),
            tick=_optional(step.tick_ms),
            due=_optional(step.due_ms),
            id=step.local_id,
            idempotency_key=step.idempotency_key,
            body_hash=step.body_hash,
            name=name,
        )
        hint = None
        if step.tick_ms is not None and step.due_ms is not None:
            hint = Hint(queue, at_ms=step.due_ms - HINT_MARGIN_MS)
        reply = await self._store.run_script(
            "fire_schedule",
            [keys.schedule(name), keys.pending, keys.scheduled, keys.stats],
            list(args),
            hint=hint,
        )
        local_id = _text(reply[1])
        return FireResult(
            outcome=FireOutcome(_text(reply[0])),
            task_id=f"{queue}:{local_id}" if local_id else None,
            now_ms=int(reply[2]),
            next_ms=int(_text(reply[3])) if _text(reply[3]) else None,
        )

    async def now_ms(self) -> int:
        """Redis's clock, the one that decides when a tick is due."""
        with _translate():
            seconds, micros = await self._client.time()
        return int(seconds) * 1000 + int(micros) // 1000


def _optional(value: int | None) -> str:
    return "" if value is None else str(value)


def _decode(queue: str, name: str, h: dict[bytes, bytes]) -> Schedule:
    headers = _text(h.get(b"hdr"))
    lease_ms = int(_text(h.get(b"lease_ms")) or 0)
    template = TaskTemplate(
        queue=queue,
        type=_text(h.get(b"type")),
        payload=h.get(b"payload", b""),
        headers=json.loads(headers) if headers else {},
        priority=int(_text(h.get(b"pri")) or 0),
        max_attempts=int(_text(h.get(b"max")) or 1),
        lease_ms=lease_ms or None,
        initial_backoff_ms=int(_text(h.get(b"bo_i")) or 0),
        max_backoff_ms=int(_text(h.get(b"bo_m")) or 0),
        delay_ms=_int_or_none(h.get(b"delay")),
        group_key=_text(h.get(b"gk")),
    )
    last_task = _text(h.get(b"ltask"))
    return Schedule(
        name=name,
        cron=_text(h.get(b"cron")),
        time_zone=_text(h.get(b"tz")),
        template=template,
        jitter_ms=int(_text(h.get(b"jit")) or 0),
        catch_up=CatchUp(_text(h.get(b"catch")) or CatchUp.SKIP.value),
        paused=_text(h.get(b"paused")) == "1",
        next_ms=_int_or_none(h.get(b"next")),
        last_tick_ms=_int_or_none(h.get(b"ltick")),
        last_task_id=f"{queue}:{last_task}" if last_task else "",
        create_ms=int(_text(h.get(b"ctime")) or 0),
        update_ms=int(_text(h.get(b"utime")) or 0),
    )
