"""AuditTrail: who did or tried what. Admin actions, permission denials and authentication
failures each become one structured log line (logger "taskbroker.audit", JSON) and one entry of
a capped Redis stream, read back by AdminService.ListAuditRecords, `taskbroker audit` and the
dashboard.

Admin actions are rare and recorded before the call answers. Denials and authentication
failures can be a flood from an attacker: they go through a bounded buffer that a background
task writes out once a second, so a flood costs neither latency nor memory; what does not fit
is counted, logged as a warning at most every WARN_INTERVAL_S, and noted in the stream as one
"audit.dropped" record per flush.

A record never holds a payload, a header or a credential. A record that cannot be stored (Redis
failing) is logged and given up: it never fails the call whose action was already done.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Final, TypeVar

from broker.auth.principal import ANONYMOUS, Principal, Role, current_principal
from broker.errors import BrokerError, InvalidArgument
from broker.models import AuditRecord
from broker.page_tokens import decode_audit_token, encode_audit_token
from broker.store.audit_log import AuditLog

if TYPE_CHECKING:
    from broker.auth.policy import Policy

log = logging.getLogger("taskbroker.audit")
own_log = logging.getLogger(__name__ + ".trail")

T = TypeVar("T")

OK: Final = "ok"
#: The principal of a caller whose credentials were refused.
UNAUTHENTICATED: Final = "unauthenticated"
#: Denials and authentication failures held for the next flush; more are dropped (counted).
BUFFER_SIZE: Final = 1000
#: How often the buffer is written out: with BUFFER_SIZE, at most 1,000 records and log lines
#: a second however hard the broker is hammered.
FLUSH_INTERVAL_S: Final = 1.0
#: Dropped records are logged at most this often.
WARN_INTERVAL_S: Final = 10.0
#: Longer fields are cut: a queue name or an error message, never megabytes.
MAX_FIELD_CHARS: Final = 256
MAX_DETAIL_CHARS: Final = 1024
#: Records per ListAuditRecords page when the request says 0, and the most.
DEFAULT_PAGE_SIZE: Final = 100
MAX_PAGE_SIZE: Final = 1000


def may_read_audit(policy: Policy | None, principal: Principal) -> bool:
    """Whether a principal may read the audit trail: it spans every queue, so it takes `admin`
    on every queue (a grant with queues = ["*"]); without a policy, everyone may."""
    return policy is None or policy.allows(principal, Role.ADMIN, "*")


def _cut(text: str, limit: int = MAX_FIELD_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


class AuditTrail:
    """The broker's audit trail over an AuditLog. start() runs the flusher; stop() writes out
    what is buffered."""

    def __init__(
        self,
        store: AuditLog,
        *,
        buffer_size: int = BUFFER_SIZE,
        flush_interval_s: float = FLUSH_INTERVAL_S,
    ) -> None:
        self._store = store
        self._buffer: deque[AuditRecord] = deque()
        self._buffer_size = buffer_size
        self._flush_interval_s = flush_interval_s
        self._wake = asyncio.Event()
        self._closing = asyncio.Event()
        # One flush at a time: a flush() returns after every record buffered before it is
        # written, even those a flush under way had already taken.
        self._flushing = asyncio.Lock()
        self._flusher: asyncio.Task[None] | None = None
        self._writes: set[asyncio.Future[None]] = set()
        self._dropped_since_flush = 0
        self._dropped_since_warning = 0
        self._warned_at = float("-inf")
        #: Records dropped since start because the buffer was full.
        self.dropped = 0

    # --- recording ---------------------------------------------------------------------------

    async def record(
        self,
        principal: Principal | str,
        action: str,
        target: str,
        outcome: str,
        detail: str = "",
    ) -> None:
        """Logs and stores one record now (for admin actions). Never raises: a record that
        cannot be stored is logged. A cancelled caller does not cancel the write."""
        record = _new_record(principal, action, target, outcome, detail)
        _log_line(record)
        write = asyncio.ensure_future(self._store_now([record]))
        self._writes.add(write)
        write.add_done_callback(self._writes.discard)
        await asyncio.shield(write)

    async def admin_action(
        self,
        action: str,
        target: str,
        run: Callable[[], Awaitable[T]],
        *,
        detail: str = "",
        describe: Callable[[T], str] | None = None,
        principal: Principal | None = None,
    ) -> T:
        """Runs an admin action and records it with its outcome: "ok" (with `describe(result)`
        added to the detail) or the error's reason (with its message), then answers or raises
        as the action did. The principal is the current call's unless given."""
        who = current_principal.get() if principal is None else principal
        try:
            result = await run()
        except BrokerError as exc:
            await self.record(who, action, target, exc.reason, _join(detail, str(exc)))
            raise
        except Exception:
            await self.record(who, action, target, "INTERNAL", detail)
            raise
        outcome_detail = describe(result) if describe is not None else ""
        await self.record(who, action, target, OK, _join(detail, outcome_detail))
        return result

    async def dead_letter_action(
        self,
        action: str,
        queue: str,
        run: Callable[[], Awaitable[int]],
        selection: tuple[Sequence[str], bool],
        counted: str,
        principal: Principal | None = None,
    ) -> int:
        """Runs a redrive or a delete of dead letters (`selection`: the task ids, or every one)
        and records it as admin_action() does, with which (all, or how many ids: never the
        ids) and how many were `counted` ("redriven=3")."""
        task_ids, every = selection
        return await self.admin_action(
            action,
            queue,
            run,
            detail="all" if every else f"task_ids={len(task_ids)}",
            describe=lambda n: f"{counted}={n}",
            principal=principal,
        )

    def denied(self, principal: Principal | None, action: str, target: str, reason: str) -> None:
        """Records a permission denial without waiting: call it where a call is refused for a
        missing role (action: the RPC or endpoint, target: the queue, reason: the refusal's
        message). None for the principal means the caller was not authenticated. Never blocks
        and never raises; in a flood, records past the buffer are dropped and counted."""
        if self._dropping():
            return
        who = UNAUTHENTICATED if principal is None else principal.name
        self._buffer.append(_new_record(who, action, target, "PERMISSION_DENIED", reason))
        self._wake.set()

    def unauthenticated(self, peer: str, reason: str, action: str = "authenticate") -> None:
        """Records an authentication failure without waiting (peer: the caller's address, as
        grpc's context.peer() or the HTTP remote; reason: the refusal's message, which never
        quotes the credential). Never blocks and never raises, as denied()."""
        if self._dropping():
            return
        detail = f"peer={peer} {reason}"
        self._buffer.append(_new_record(UNAUTHENTICATED, action, "", "UNAUTHENTICATED", detail))
        self._wake.set()

    def _dropping(self) -> bool:
        """Whether the buffer is full; counts the record dropped. Checked before a record is
        built, so a dropped one costs a comparison and three additions."""
        if len(self._buffer) < self._buffer_size:
            return False
        self.dropped += 1
        self._dropped_since_flush += 1
        self._dropped_since_warning += 1
        return True

    # --- reading -----------------------------------------------------------------------------

    async def page(self, page_size: int, page_token: str) -> tuple[list[AuditRecord], str]:
        """A page of records, newest first, and the token of the next ('' at the end)."""
        if page_size < 0:
            raise InvalidArgument("page_size", "must not be negative")
        size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        records, last = await self._store.page(size, decode_audit_token(page_token))
        return records, encode_audit_token(last) if last else ""

    # --- the flusher -------------------------------------------------------------------------

    def start(self) -> None:
        if self._flusher is None:
            self._closing.clear()
            self._flusher = asyncio.create_task(self._flush_loop(), name="audit-flusher")

    async def stop(self) -> None:
        """Stops the flusher and writes out what is buffered (and the awaited writes).

        The flusher is asked to end, not cancelled: a cancel that landed during a flush was
        seen lost (the task went on to wait for the next record, and shutdown hung), and a
        flush under way should finish anyway."""
        if self._flusher is not None:
            self._closing.set()
            self._wake.set()
            await self._flusher
            self._flusher = None
        await self.flush()
        if self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)

    async def _flush_loop(self) -> None:
        while not self._closing.is_set():
            await self._wake.wait()
            await self.flush()
            # Paced: in a flood, one write a flush interval, never a busy loop; stop() ends
            # the pause at once.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), self._flush_interval_s)

    async def flush(self) -> None:
        """Writes out the buffered records and a note of those dropped since the last flush."""
        async with self._flushing:
            await self._flush()

    async def _flush(self) -> None:
        self._wake.clear()
        batch = list(self._buffer)
        self._buffer.clear()
        if self._dropped_since_flush:
            batch.append(
                _new_record(
                    "-", "audit.dropped", "", "dropped", f"count={self._dropped_since_flush}"
                )
            )
            self._dropped_since_flush = 0
        now = time.monotonic()
        if self._dropped_since_warning and now - self._warned_at >= WARN_INTERVAL_S:
            own_log.warning(
                "audit: %d denial or authentication-failure records dropped (buffer of %d full; "
                "%d since start): a flood of refused calls",
                self._dropped_since_warning,
                self._buffer_size,
                self.dropped,
            )
            self._dropped_since_warning, self._warned_at = 0, now
        for record in batch:
            _log_line(record)
        await self._store_now(batch)

    async def _store_now(self, records: list[AuditRecord]) -> None:
        try:
            await self._store.append(records)
        except Exception as exc:  # Redis failing: the trail loses these, the calls go on
            own_log.error("audit: %d records not stored in Redis: %s", len(records), exc)


def _new_record(
    principal: Principal | str, action: str, target: str, outcome: str, detail: str
) -> AuditRecord:
    name = principal if isinstance(principal, str) else principal.name
    return AuditRecord(
        time_ms=int(time.time() * 1000),
        principal=_cut(name or ANONYMOUS.name),
        action=_cut(action),
        target=_cut(target),
        outcome=_cut(outcome),
        detail=_cut(detail, MAX_DETAIL_CHARS),
    )


def _join(*parts: str) -> str:
    return " ".join(p for p in parts if p)


def record_fields(record: AuditRecord) -> dict[str, int | str]:
    """A record as its log line and the HTTP API show it (the stream entry id aside)."""
    return {
        "time_ms": record.time_ms,
        "principal": record.principal,
        "action": record.action,
        "target": record.target,
        "outcome": record.outcome,
        "detail": record.detail,
    }


def _log_line(record: AuditRecord) -> None:
    # JSON escapes newlines and control characters: one line whatever a queue name holds.
    log.info("audit %s", json.dumps(record_fields(record), ensure_ascii=True))
