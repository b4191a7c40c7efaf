"""JSON shapes of the dashboard API (docs/observability.md, "The dashboard's JSON API"), built
from the broker's models.

Times are epoch milliseconds (`*_ms`), durations seconds (`*_s`). A task's payload is shown by
its size only; its result is shown as a preview of at most RESULT_PREVIEW_BYTES.
"""

from __future__ import annotations

import codecs
from typing import TYPE_CHECKING, Any, Final

import grpc

from broker.audit import record_fields
from broker.envelope_header import envelope_key_id
from broker.errors import BrokerError, InvalidArgument
from broker.models import AuditRecord, GroupKeyPage, QueueStats, RateLimit, Task
from broker.schedule_models import Schedule
from broker.status_codes import code_for

if TYPE_CHECKING:
    from broker.live_streams import LiveStream
    from broker.web.sampler import Point, QueueRates

Json = dict[str, Any]

#: Bytes of a result shown in the task detail.
RESULT_PREVIEW_BYTES: Final = 1024

#: gRPC code → HTTP status, as google.rpc.Code documents the mapping.
HTTP_STATUS: Final = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
#: HTTP status → the status name an error body carries, for errors raised by the web layer.
STATUS_NAME: Final = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    405: "METHOD_NOT_ALLOWED",
    409: "ALREADY_EXISTS",
    413: "PAYLOAD_TOO_LARGE",
    415: "UNSUPPORTED_MEDIA_TYPE",
    421: "MISDIRECTED_REQUEST",
    429: "RESOURCE_EXHAUSTED",
    503: "UNAVAILABLE",
}


def error_body(
    status: int, message: str, *, name: str = "", reason: str = "", field: str = ""
) -> Json:
    """{"error": {"code", "status", "message", "reason"?, "field"?}}: google.rpc.Status in JSON
    form, plus the ErrorInfo reason and the offending field as the gRPC API gives them."""
    error: Json = {"code": status, "status": name or STATUS_NAME.get(status, "INTERNAL")}
    error["message"] = message
    if reason:
        error["reason"] = reason
    if field:
        error["field"] = field
    return {"error": error}


def broker_error(exc: BrokerError) -> tuple[int, Json]:
    """The HTTP status and body for a broker error: the same code as the gRPC API gives."""
    code = code_for(exc)
    status = HTTP_STATUS.get(code, 500)
    field = exc.field if isinstance(exc, InvalidArgument) else ""
    return status, error_body(status, str(exc), name=code.name, reason=exc.reason, field=field)


def query_int(raw: str | None, field: str, default: int, low: int, high: int) -> int:
    """An integer query parameter.

    Raises:
        InvalidArgument: naming the parameter.
    """
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise InvalidArgument(field, f"not an integer: {raw[:40]!r}") from None
    if not low <= value <= high:
        raise InvalidArgument(field, f"must be {low} to {high}")
    return value


def queue_json(s: QueueStats, rates: QueueRates | None) -> Json:
    return {
        "queue": s.queue,
        "paused": s.paused,
        "counts": {
            "pending": s.pending,
            "waiting": s.waiting,
            "scheduled": s.scheduled,
            "leased": s.leased,
            "dead": s.dead,
        },
        "totals": {
            "enqueued": s.enqueued_total,
            "succeeded": s.succeeded_total,
            "retried": s.retried_total,
            "reclaimed": s.reclaimed_total,
            "dead_lettered": s.dead_lettered_total,
            "cancelled": s.cancelled_total,
            "failed": s.failed_total,
        },
        "rates": {
            "enqueued_per_s": rates.enqueued_per_s if rates else None,
            "completed_per_s": rates.completed_per_s if rates else None,
        },
        "oldest_pending_age_s": (
            max(s.now_ms - s.oldest_ready_ms, 0) / 1000 if s.oldest_ready_ms is not None else None
        ),
        "limits": limits_json(s),
    }


def _rate_json(limit: RateLimit | None) -> Json | None:
    return None if limit is None else {"per_second": limit.per_second, "burst": limit.burst}


def limits_json(s: QueueStats) -> Json:
    """A queue's settings (null or 0: off), its rate_limit's tokens now and its group keys."""
    settings = s.settings
    return {
        "max_concurrency": settings.max_concurrency,
        "rate_limit": _rate_json(settings.rate_limit),
        "rate_limit_tokens": s.rate_tokens if settings.rate_limit is not None else None,
        "enqueue_rate_limit": _rate_json(settings.enqueue_rate_limit),
        "per_key_max_concurrency": settings.per_key_max_concurrency,
        "per_key_rate_limit": _rate_json(settings.per_key_rate_limit),
        "group_keys_pending": s.group_keys_pending,
        "group_keys_parked": s.group_keys_parked,
    }


def group_keys_json(page: GroupKeyPage, next_page_token: str) -> Json:
    return {
        "time_ms": page.now_ms,
        "keys": [
            {
                "group_key": k.group_key,
                "state": k.state.name,
                "pending": k.pending,
                "leased": k.leased,
                "oldest_pending_age_s": (
                    max(page.now_ms - k.oldest_ready_ms, 0) / 1000
                    if k.oldest_ready_ms is not None
                    else None
                ),
            }
            for k in page.keys
        ],
        "next_page_token": next_page_token,
        "ready_keys": page.ready_keys,
        "parked_keys": page.parked_keys,
        "rate_limited_keys": page.rate_limited_keys,
        "keys_with_leases": page.keys_with_leases,
        "scanned_keys": page.scanned_keys,
    }


def schedule_json(s: Schedule) -> Json:
    """A schedule without its template's payload or headers (the dashboard shows neither)."""
    return {
        "name": s.name,
        "queue": s.template.queue,
        "task_type": s.template.type,
        "cron": s.cron,
        "time_zone": s.time_zone,
        "paused": s.paused,
        "next_fire_time_ms": s.next_ms,
        "last_fire_time_ms": s.last_tick_ms,
        "last_task_id": s.last_task_id or None,
    }


def point_json(p: Point) -> Json:
    return {
        "time_ms": p.time_ms,
        "enqueued_per_s": p.enqueued_per_s,
        "completed_per_s": p.completed_per_s,
        "wait_mean_s": p.wait_mean_s,
        "wait_p95_s": p.wait_p95_s,
    }


def worker_json(session: LiveStream) -> Json:
    return {
        "stream_id": session.stream_id,
        "worker_id": session.worker_id,
        "queues": list(session.queues),
        "credits": session.credits,
        "in_flight": session.in_flight,
        "connected_since_ms": session.opened_ms,
    }


def _preview(data: bytes) -> tuple[str, str]:
    """(encoding, text): UTF-8 text as such; anything else as hex."""
    chunk = data[:RESULT_PREVIEW_BYTES]
    try:  # an incomplete character at the cut is not a reason to call it binary
        text = codecs.getincrementaldecoder("utf-8")().decode(chunk, final=len(data) <= len(chunk))
    except UnicodeDecodeError:
        return "hex", chunk.hex()
    if any(ord(c) < 32 and c not in "\t\n\r" for c in text):
        return "hex", chunk.hex()
    return "utf-8", text


def task_json(task: Task, *, detail: bool) -> Json:
    """A task; with detail, also its headers and a preview of its result. The payload itself
    is never included, only its size."""
    out: Json = {
        "task_id": task.ref.task_id,
        "queue": task.ref.queue,
        "type": task.type,
        "state": task.state.name,
        "attempt": task.attempt,
        "max_attempts": task.max_attempts,
        "priority": task.priority,
        "create_time_ms": task.create_ms,
        "schedule_time_ms": task.schedule_ms or None,
        "finish_time_ms": task.finish_ms,
        "lease_expire_time_ms": task.lease_expire_ms,
        "last_error": task.last_error,
        "errors": [
            {"attempt": e.attempt, "time_ms": e.time_ms, "message": e.message} for e in task.errors
        ],
        "payload_size": len(task.payload),
        "result_size": len(task.result),
        # Encrypted by an SDK codec: the key id is all the broker can tell of the contents.
        "payload_key_id": envelope_key_id(task.payload),
        "result_key_id": envelope_key_id(task.result),
    }
    if detail:
        out["headers"] = dict(task.headers)
        out["result_preview"] = None  # ciphertext previews nothing
        if out["result_key_id"] is None:
            encoding, text = _preview(task.result)
            out["result_preview"] = {
                "encoding": encoding,
                "text": text,
                "truncated": len(task.result) > RESULT_PREVIEW_BYTES,
            }
    return out


def audit_json(record: AuditRecord) -> Json:
    return dict(record_fields(record))
