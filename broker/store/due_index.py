"""DueIndex: which queues have a lease expiring, a task coming due or a retention ending soonest,
so maintenance touches only those queues.

The index is one zset per shard, queue -> when to look (Redis ms), plus a hash of generations.
It is a HINT kept outside the queues' own scripts (it lives in other hash slots), so it must never
be later than the truth, only earlier:

- every store call whose script creates a due time sends hint_due.lua right after the script
  (standalone: in the same pipeline, so both leave in one write): ZADD LT lowers the entry and
  the generation is bumped;
- the maintainer takes due entries with their generation (take_due.lua), runs the queue's
  maintain.lua, which returns the queue's real next due time T, and raises the entry to T only
  if the generation is unchanged (settle_due.lua). A hint that arrived in between bumped it,
  so a raise never hides a due time created after maintain.lua read the queue.

The one gap: on a Cluster the hint goes after the script's reply (a pipeline split across nodes
could run it first), so a broker that dies between the two leaves the due time unindexed. The
backstop sweep (loops/sweeper.py) re-derives every registered queue's entry within
Settings.due_sweep_s, which bounds that gap.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import TYPE_CHECKING

from broker.models import DueEntry, Hint
from broker.store import argv
from broker.store.keys import CLUSTER_DUE_SHARDS, DueKeys, due_shard

if TYPE_CHECKING:
    from broker.store.redis_store import AnyRedis
    from broker.store.scripts import Scripts


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class DueIndex:
    """The sharded due index: one shard on standalone Redis, CLUSTER_DUE_SHARDS on a Cluster."""

    def __init__(self, client: AnyRedis, scripts: Scripts, cluster: bool) -> None:
        self._client = client
        self._scripts = scripts
        self.shards = CLUSTER_DUE_SHARDS if cluster else 1

    def keys(self, queue: str) -> DueKeys:
        return DueKeys(due_shard(queue, self.shards))

    @staticmethod
    def hint_args(hints: Sequence[Hint]) -> list[str | int]:
        args: list[str | int] = [*argv.HintArgs(n=len(hints))]
        for h in hints:
            args += argv.HintItem(
                queue=h.queue,
                at_ms=-1 if h.at_ms is None else h.at_ms,
                delay_ms=-1 if h.delay_ms is None else h.delay_ms,
            )
        return args

    async def hint(self, hints: Sequence[Hint]) -> None:
        """Sends hints on their own (not right after a state change), grouped by shard."""
        by_shard: dict[int, list[Hint]] = {}
        for h in hints:
            by_shard.setdefault(due_shard(h.queue, self.shards), []).append(h)
        for shard, group in by_shard.items():
            keys = DueKeys(shard)
            await self._scripts["hint_due"](keys=[keys.at, keys.gen], args=self.hint_args(group))

    async def take(self, limit: int, claim_ms: int) -> list[DueEntry]:
        """Up to limit due queues per shard, each claimed for claim_ms."""
        script = self._scripts["take_due"]
        replies = await asyncio.gather(
            *(
                script(
                    keys=[DueKeys(n).at, DueKeys(n).gen],
                    args=argv.TakeDueArgs(limit=limit, claim_ms=claim_ms),
                )
                for n in range(self.shards)
            )
        )
        return [
            DueEntry(_text(reply[i]), _text(reply[i + 1]))
            for reply in replies
            for i in range(1, len(reply), 2)
        ]

    async def settle(self, outcomes: Sequence[tuple[DueEntry, int | None]]) -> int:
        """Sets each taken entry to its queue's next due time (None: removes it) unless a hint
        moved its generation. Returns how many were set."""
        by_shard: dict[int, list[argv.SettleDueItem]] = {}
        for entry, next_due in outcomes:
            items = by_shard.setdefault(due_shard(entry.queue, self.shards), [])
            next_due_ms = -1 if next_due is None else next_due  # the script's 'nothing due'
            items.append(
                argv.SettleDueItem(queue=entry.queue, gen=entry.gen, next_due_ms=next_due_ms)
            )
        done = 0
        for shard, items in by_shard.items():
            keys = DueKeys(shard)
            args: list[str | int] = [*argv.SettleDueArgs(n=len(items))]
            for item in items:
                args += item
            done += int(await self._scripts["settle_due"](keys=[keys.at, keys.gen], args=args))
        return done

    async def forget(self, queue: str) -> None:
        """Drops a forgotten queue's entry and generation."""
        keys = self.keys(queue)
        await self._client.zrem(keys.at, queue)
        await self._client.hdel(keys.gen, queue)
