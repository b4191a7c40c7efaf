"""AuditLog: the audit trail's records in one capped Redis stream, newest first when read."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

from broker.models import AuditRecord
from broker.store.keys import AUDIT_KEY
from broker.store.redis_store import AnyRedis, _translate

FIELDS: Final = ("time_ms", "principal", "action", "target", "outcome", "detail")


class AuditLog:
    """Appends records (XADD with MAXLEN ~, so Redis trims whole nodes cheaply and the stream
    holds about max_records) and reads them back a page at a time."""

    def __init__(self, client: AnyRedis, max_records: int) -> None:
        self._client = client
        self._max_records = max_records

    async def append(self, records: Sequence[AuditRecord]) -> None:
        """Raises StoreUnavailable or StoreFull when Redis cannot take them."""
        if not records:
            return
        with _translate():
            # One key, one slot: a pipeline works on a Redis Cluster too.
            async with self._client.pipeline(transaction=False) as pipe:
                for r in records:
                    entry: dict[Any, Any] = {
                        "time_ms": r.time_ms,
                        "principal": r.principal,
                        "action": r.action,
                        "target": r.target,
                        "outcome": r.outcome,
                        "detail": r.detail,
                    }
                    pipe.xadd(AUDIT_KEY, entry, maxlen=self._max_records, approximate=True)
                await pipe.execute()

    async def page(self, size: int, before: str | None) -> tuple[list[AuditRecord], str | None]:
        """Up to `size` records older than the entry `before` (None: the newest), newest
        first, and the id to continue before (None: no older records)."""
        high = "+" if before is None else f"({before}"
        with _translate():
            reply = await self._client.xrevrange(AUDIT_KEY, high, "-", count=size + 1)
        entries: list[tuple[Any, Any]] = list(reply or [])
        records = [_record(entry_id, values or {}) for entry_id, values in entries[:size]]
        more = len(entries) > size
        return records, (records[-1].record_id if more and records else None)

    async def length(self) -> int:
        with _translate():
            return int(await self._client.xlen(AUDIT_KEY))


def _text(value: bytes | str | None) -> str:
    if value is None:
        return ""
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def _record(entry_id: bytes | str, values: dict[Any, Any]) -> AuditRecord:
    v = {_text(k): _text(x) for k, x in values.items()}
    time_ms = v.get("time_ms", "")
    return AuditRecord(
        time_ms=int(time_ms) if time_ms.isdigit() else 0,
        principal=v.get("principal", ""),
        action=v.get("action", ""),
        target=v.get("target", ""),
        outcome=v.get("outcome", ""),
        detail=v.get("detail", ""),
        record_id=_text(entry_id),
    )
