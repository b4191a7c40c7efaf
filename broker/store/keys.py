"""QueueKeys: every Redis key name. A queue's keys share the hash tag {queue}, so each script
touches one Cluster slot."""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Final

#: Cross-slot registry of queue names, written outside scripts (as asynq's AllQueues).
QUEUES_KEY: Final = "tb:queues"
#: Pub/Sub channel on which scripts announce "queue <name> may have work" to every replica.
WAKE_CHANNEL: Final = "tb:wake"
#: Pub/Sub channel announcing "<task id> <lease id>" leases revoked by a cancellation, so the
#: replica whose stream holds the lease can tell its worker.
REVOKE_CHANNEL: Final = "tb:revoke"
#: Pub/Sub channel on which scripts announce "queue <name> has workflow outbox entries" (issue
#: 17), so a replica's outbox mover drains them at once (broker/workflow/mover.py).
FLOW_CHANNEL: Final = "tb:flow"
#: Pub/Sub channel announcing "<task id>" when a watched task (hash field `w`) ends, so
#: WatchTask streams on every replica hear it at once.
FINISHED_CHANNEL: Final = "tb:finished"
#: Prefix of each broker's own Pub/Sub channel, on which its enqueues that lease in the same
#: write announce their wake just before sending it (models.Echo): "tb:echo:<random>".
ECHO_CHANNEL_PREFIX: Final = "tb:echo:"
#: Shards of the due index on a Redis Cluster, each under its own hash tag so they spread over
#: the masters (a standalone Redis uses one).
CLUSTER_DUE_SHARDS: Final = 16


@dataclass(frozen=True, slots=True)
class DueKeys:
    """Key names of one shard of the due index (store/due_index.py). The tag holds '~', which
    queue names may not, so no queue's keys can collide with it."""

    shard: int

    @property
    def at(self) -> str:
        return f"tb:{{~due{self.shard}}}:at"

    @property
    def gen(self) -> str:
        return f"tb:{{~due{self.shard}}}:gen"


def due_shard(queue: str, shards: int) -> int:
    """The due-index shard that holds a queue (stable across processes: CRC-32, not hash())."""
    return zlib.crc32(queue.encode()) % shards


@dataclass(frozen=True, slots=True)
class QueueKeys:
    """Key names for one queue. Queue names are validated first: no braces, colons or globs."""

    queue: str

    @property
    def _base(self) -> str:
        return f"tb:{{{self.queue}}}:"

    @property
    def pending(self) -> str:
        return self._base + "pending"

    @property
    def fresh_prefix(self) -> str:
        """Streams of fresh pending tasks, one per priority: fresh_prefix + str(priority)."""
        return self._base + "f:"

    @property
    def fresh_priorities(self) -> str:
        """Zset of the priorities that have a fresh stream, scored -priority (highest first)."""
        return self._base + "fp"

    def fresh(self, priority: int) -> str:
        return self.fresh_prefix + str(priority)

    @property
    def scheduled(self) -> str:
        return self._base + "scheduled"

    @property
    def leased(self) -> str:
        return self._base + "leased"

    @property
    def dead(self) -> str:
        return self._base + "dead"

    @property
    def done(self) -> str:
        return self._base + "done"

    @property
    def stats(self) -> str:
        return self._base + "stats"

    @property
    def meta(self) -> str:
        return self._base + "meta"

    @property
    def task_prefix(self) -> str:
        return self._base + "t:"

    @property
    def idempotency_prefix(self) -> str:
        return self._base + "idem:"

    @property
    def stage_prefix(self) -> str:
        """Large payloads written ahead of their enqueue script (RedisStore.enqueue)."""
        return self._base + "stage:"

    def task(self, local_id: str) -> str:
        return self.task_prefix + local_id

    # Group keys (TaskSpec.group_key). The scripts derive these names from the queue's other
    # key names (lua/_prelude.lua: base_of_pending), so they are named here for readers, tests
    # and ACLs.

    @property
    def group_prefix(self) -> str:
        """group(key) is group_prefix + key."""
        return self._base + "g:"

    def group(self, group_key: str) -> str:
        """Zset of a key's pending tasks (id -> pending score)."""
        return self.group_prefix + group_key

    @property
    def group_rotation(self) -> str:
        """Zset of the keys with pending tasks, by turn (lowest leases next)."""
        return self._base + "gk"

    @property
    def group_parked(self) -> str:
        """Set of the keys at per_key_max_concurrency, out of the rotation until a lease ends."""
        return self._base + "gp"

    @property
    def group_leased(self) -> str:
        """Hash of each key's leased count."""
        return self._base + "gl"

    @property
    def group_waiting(self) -> str:
        """Zset of the keys over per_key_rate_limit, by when their next token is due."""
        return self._base + "gw"

    def group_rate(self, group_key: str) -> str:
        """A key's per_key_rate_limit bucket: its next-token time (GCRA), expiring when full."""
        return self._base + "gr:" + group_key

    # Dependencies (issue 17): derived from the task's key by the scripts (lua/_prelude.lua).

    def parents(self, local_id: str) -> str:
        """Hash of a task's parents: parent id -> '' until recorded, then state digit + result."""
        return self.task(local_id) + ":p"

    def children(self, local_id: str) -> str:
        """Set of a task's children's ids."""
        return self.task(local_id) + ":k"

    @property
    def waiting(self) -> str:
        """Zset of WAITING tasks, by create time."""
        return self._base + "waiting"

    @property
    def outbox(self) -> str:
        """Stream of entries for the outbox mover: links to make, and parents' ends to tell."""
        return self._base + "wf"

    def outbox_children(self, entry_id: str) -> str:
        """The children of a parent with over 1,000, copied for its outbox entry (a set)."""
        return self._base + "wfk:" + entry_id

    @property
    def outbox_claim(self) -> str:
        """The replica draining the outbox now (a string with an expiry)."""
        return self._base + "wfc"

    def schedule(self, name: str) -> str:
        """A schedule whose template enqueues to this queue (store/schedule_store.py)."""
        return self._base + "sched:" + name


#: The audit trail: one capped stream (store/audit_log.py). Its tag holds '~', as the due
#: index's do, so no queue's keys share its slot by name.
AUDIT_KEY: Final = "tb:{~audit}:log"
#: Dashboard sessions, one key each (store/web_sessions.py), under one tag.
WEB_SESSION_PREFIX: Final = "tb:{~web}:session:"
#: Schedules across queues (store/schedule_store.py), under one tag with '~' as the due
#: index's: name -> queue (the name registry), names for paging, name -> next tick (ms), and
#: name -> claim time (ms) of creates not finished yet.
SCHEDULE_QUEUES_KEY: Final = "tb:{~sched}:queues"
SCHEDULE_CLAIMS_KEY: Final = "tb:{~sched}:claims"
SCHEDULE_NAMES_KEY: Final = "tb:{~sched}:names"
SCHEDULE_DUE_KEY: Final = "tb:{~sched}:due"
