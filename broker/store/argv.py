"""Each script's ARGV by name: a head of values, then (for batches) n items of fields.

RedisStore builds ARGV from these NamedTuples, by keyword, so no caller counts positions. Each
script reads the same names, in the same order, in two lines near its top:

    local task_prefix, n = unpack(ARGV, 1, 2)          -- the head
    local id, lease_id, result, holder = item(2, 4, i)  -- item i (lua/_prelude.lua)

tests/test_pinned_constants.py parses the scripts and fails when either side drifts.
"""

from __future__ import annotations

from typing import Final, NamedTuple


class EnqueueArgs(NamedTuple):
    task_prefix: str
    fresh_prefix: str
    idempotency_prefix: str
    stage_prefix: str
    idempotency_window_ms: int
    wake_channel: str
    queue: str
    staged: str  # 1-based positions of the tasks whose payload was staged: "2,5" or ''
    calls: str  # tasks per Enqueue call of the batch, in order: "3,1,1" ('': one call)
    n: int
    #: This broker's own channel, published to just before the wake when it leases in the same
    #: write ('': not): its listener then lets that wake pass (models.Echo).
    echo_channel: str = ""


class EnqueueItem(NamedTuple):
    """One new task; delay_ms and schedule_ms are -1 when unset, idempotency_key ''."""

    id: str
    entry_id: str  # ids.entry_id(id): where it goes in its priority's fresh stream
    task_type: str
    payload: bytes
    headers: str  # JSON, '' when none
    priority: int
    max_attempts: int
    lease_ms: int  # 0: the worker's lease length
    initial_backoff_ms: int
    max_backoff_ms: int
    delay_ms: int
    schedule_ms: int
    idempotency_key: str
    body_hash: str
    group_key: str  # '': the default group
    parents: str  # the ids of the tasks it waits for, space-separated; '': none
    parent_policy: str  # c, r or w (models.ParentPolicy)


class LeaseArgs(NamedTuple):
    """Followed by n LeaseSlot items, then the names of the task fields to return."""

    task_prefix: str
    fresh_prefix: str
    reply_bytes: int  # leases no more once the reply holds this many bytes (the first always)
    fetch_bytes: int  # a held task's larger payload is left out of the reply, read by HGET
    n: int


class LeaseSlot(NamedTuple):
    lease_id: str
    lease_ms: int  # for a task without its own
    stream_id: str
    holder: str  # '' without a policy


class AckArgs(NamedTuple):
    task_prefix: str
    wake_channel: str
    queue: str
    n: int


class AckItem(NamedTuple):
    id: str
    lease_id: str
    result: bytes
    holder: str


class NackArgs(NamedTuple):
    task_prefix: str
    wake_channel: str
    queue: str
    n: int


class NackItem(NamedTuple):
    id: str
    lease_id: str
    message: str
    retry_delay_ms: int  # -1: the task's backoff
    dead_letter: str  # '1' or '0'
    jitter: str  # repr of a float in [0, 1)
    holder: str


class ExtendArgs(NamedTuple):
    task_prefix: str
    n: int


class ExtendItem(NamedTuple):
    id: str
    lease_id: str
    duration_ms: int  # -1: the length the task was leased with
    holder: str


class DetachArgs(NamedTuple):
    task_prefix: str
    stream_id: str
    window_ms: int
    reason: str
    n: int


class ResumeArgs(NamedTuple):
    task_prefix: str
    stream_id: str
    holder: str
    n: int


class UnleaseArgs(NamedTuple):
    task_prefix: str
    wake_channel: str
    queue: str
    stream_id: str
    n: int


class HeldItem(NamedTuple):
    """A lease named by its task (detach, resume, unlease)."""

    id: str
    lease_id: str


class HintArgs(NamedTuple):
    n: int


class HintItem(NamedTuple):
    queue: str
    at_ms: int  # -1: none
    delay_ms: int  # -1: none


class SettleDueArgs(NamedTuple):
    n: int


class SettleDueItem(NamedTuple):
    queue: str
    gen: str
    next_due_ms: int  # -1: nothing due


class TakeDueArgs(NamedTuple):
    limit: int
    claim_ms: int


class ReclaimArgs(NamedTuple):
    task_prefix: str
    wake_channel: str
    queue: str
    limit: int


class PromoteArgs(NamedTuple):
    task_prefix: str
    limit: int


class UpdateSettingsArgs(NamedTuple):
    wake_channel: str
    queue: str
    n_delete: int  # then that many field names, then field, value pairs


class CancelArgs(NamedTuple):
    id: str
    entry_id: str
    fresh_prefix: str
    wake_channel: str
    queue: str


class StatsArgs(NamedTuple):
    fresh_prefix: str


class ForgetArgs(NamedTuple):
    fresh_prefix: str


class GroupKeysArgs(NamedTuple):
    group_prefix: str
    scan_limit: int
    page_size: int
    after_pending: int  # -1: the first page
    after_key: str


class GetArgs(NamedTuple):
    id: str
    entry_id: str
    fresh_prefix: str


class LinkArgs(NamedTuple):
    id: str  # the parent's local id
    entry_id: str
    fresh_prefix: str
    child: str  # the child's task id


class ResolveArgs(NamedTuple):
    """Followed by n ResolveItem: children of one queue and how one of their parents ended."""

    task_prefix: str
    wake_channel: str
    queue: str
    n: int


class ResolveItem(NamedTuple):
    id: str  # a child's local id
    parent: str  # the parent's task id
    state: int
    parent_type: str
    result: bytes


class RedriveArgs(NamedTuple):
    """Followed by the ids to redrive."""

    task_prefix: str
    wake_channel: str
    queue: str


class DeleteDeadArgs(NamedTuple):
    """Followed by the ids to delete."""

    task_prefix: str


class TrimArgs(NamedTuple):
    task_prefix: str
    finished_retention_ms: int
    dead_retention_ms: int
    limit: int


class MaintainArgs(NamedTuple):
    task_prefix: str
    wake_channel: str
    queue: str
    limit: int
    finished_retention_ms: int
    dead_retention_ms: int
    slack_ms: int


class FireScheduleArgs(NamedTuple):
    """'' stands for "none" in every optional field (fire_schedule.lua's header)."""

    task_prefix: str
    idempotency_prefix: str
    idempotency_window_ms: int
    wake_channel: str
    queue: str
    expected_next: str
    new_next: str
    tick: str
    due: str
    id: str
    idempotency_key: str
    body_hash: str
    name: str


class PutScheduleArgs(NamedTuple):
    """Followed by n PutScheduleItem pairs."""

    mode: str  # 'create' or 'update'
    drop: str  # a field to delete, '' for none
    n: int


class PutScheduleItem(NamedTuple):
    name: str
    value: str | bytes


#: Each script's head and item field names (no item: a script without per-item fields).
LAYOUTS: Final[dict[str, tuple[tuple[str, ...], tuple[str, ...]]]] = {
    "enqueue": (EnqueueArgs._fields, EnqueueItem._fields),
    "lease": (LeaseArgs._fields, LeaseSlot._fields),
    "ack": (AckArgs._fields, AckItem._fields),
    "nack": (NackArgs._fields, NackItem._fields),
    "extend_lease": (ExtendArgs._fields, ExtendItem._fields),
    "detach": (DetachArgs._fields, HeldItem._fields),
    "resume": (ResumeArgs._fields, HeldItem._fields),
    "unlease": (UnleaseArgs._fields, HeldItem._fields),
    "hint_due": (HintArgs._fields, HintItem._fields),
    "settle_due": (SettleDueArgs._fields, SettleDueItem._fields),
    "take_due": (TakeDueArgs._fields, ()),
    "reclaim_expired": (ReclaimArgs._fields, ()),
    "promote_due": (PromoteArgs._fields, ()),
    "cancel": (CancelArgs._fields, ()),
    "redrive": (RedriveArgs._fields, ()),
    "delete_dead": (DeleteDeadArgs._fields, ()),
    "trim_finished": (TrimArgs._fields, ()),
    "maintain": (MaintainArgs._fields, ()),
    "stats": (StatsArgs._fields, ()),
    "forget_queue": (ForgetArgs._fields, ()),
    "get_task": (GetArgs._fields, ()),
    "link": (LinkArgs._fields, ()),
    "resolve": (ResolveArgs._fields, ResolveItem._fields),
    "group_keys": (GroupKeysArgs._fields, ()),
    "update_settings": (UpdateSettingsArgs._fields, ()),
    "fire_schedule": (FireScheduleArgs._fields, ()),
    "put_schedule": (PutScheduleArgs._fields, PutScheduleItem._fields),
    "watch": ((), ()),  # no ARGV: its one key says it all
}
