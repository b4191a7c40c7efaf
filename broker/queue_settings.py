"""Checks a queue's settings (taskbroker.v1.QueueSettings) before any is stored, and fills in
the defaults: a bad value is refused naming its field, and nothing changes."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Final

from broker.errors import InvalidArgument
from broker.models import QUEUE_SETTING_NAMES, QueueSettings, RateLimit

#: Largest rate (tokens per second), burst and max_concurrency accepted.
MAX_LIMIT: Final = 1_000_000
#: Longest priority_aging step: a point a week is as good as strict.
MAX_AGING_MS: Final = 7 * 24 * 3600 * 1000


def checked_rate(field: str, per_second: float, burst: int) -> RateLimit:
    """A rate limit with its burst filled in (per_second rounded up, at least 1)."""
    if not math.isfinite(per_second) or per_second <= 0 or per_second > MAX_LIMIT:
        raise InvalidArgument(
            f"{field}.per_second", f"must be more than 0 and at most {MAX_LIMIT:,}"
        )
    if burst < 0 or burst > MAX_LIMIT:
        raise InvalidArgument(
            f"{field}.burst", f"must be 1 to {MAX_LIMIT:,} (0 or unset: per_second rounded up)"
        )
    return RateLimit(per_second, burst or max(1, math.ceil(per_second)))


def checked_settings(settings: QueueSettings) -> QueueSettings:
    """The settings with rates checked and bursts filled in."""
    for name in ("max_concurrency", "per_key_max_concurrency"):
        if not 0 <= getattr(settings, name) <= MAX_LIMIT:
            raise InvalidArgument(f"settings.{name}", f"must be 0 (no cap) to {MAX_LIMIT:,}")
    if not 0 <= settings.priority_aging_ms <= MAX_AGING_MS:
        raise InvalidArgument("settings.priority_aging", "must be 1 ms to 7 days, or unset")
    rates = {}
    for name in ("rate_limit", "enqueue_rate_limit", "per_key_rate_limit"):
        limit: RateLimit | None = getattr(settings, name)
        if limit is not None:
            rates[name] = checked_rate(f"settings.{name}", limit.per_second, limit.burst)
    return QueueSettings(
        rate_limit=rates.get("rate_limit"),
        max_concurrency=settings.max_concurrency,
        enqueue_rate_limit=rates.get("enqueue_rate_limit"),
        per_key_max_concurrency=settings.per_key_max_concurrency,
        per_key_rate_limit=rates.get("per_key_rate_limit"),
        priority_aging_ms=settings.priority_aging_ms,
    )


def checked_mask(paths: Sequence[str]) -> tuple[str, ...]:
    """The settings an update names (all when none is named)."""
    if not paths:
        return QUEUE_SETTING_NAMES
    for path in paths:
        if path not in QUEUE_SETTING_NAMES:
            raise InvalidArgument(
                "update_mask",
                f"unknown setting {path!r}; settings are {', '.join(QUEUE_SETTING_NAMES)}",
            )
    return tuple(dict.fromkeys(paths))
