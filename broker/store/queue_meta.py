"""A queue's settings as fields of its meta hash (tb:{q}:meta), which lease.lua, enqueue.lua and
the settle scripts read: the names here and there must agree (tests/test_pinned_constants.py).

Fields: `paused` ('1'); `mc` (max_concurrency); `rl_rate`/`rl_burst` (rate_limit) with the
bucket's state `rl_tok`/`rl_at` (tokens left at time ms), written by lease.lua; `erl_*` the same
for enqueue_rate_limit, written by enqueue.lua; `pk_mc` (per_key_max_concurrency); `aging`
(priority_aging, ms per point); `pk_rate`/`pk_burst` (per_key_rate_limit: each key's bucket is
the string <base>gr:<key>, its next-token time, expiring when the bucket is full); `turn` and
`dturn` (the group rotation's counter, and the default group's turn: lease.lua); `blocked` ('1':
a lease call held tasks back at max_concurrency, so the next script that frees a slot publishes
a wake).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Final

from broker.models import QueueSettings, RateLimit

#: Fields of each setting, its state fields last (dropped with the setting).
_FIELDS: Final[dict[str, tuple[str, ...]]] = {
    "rate_limit": ("rl_rate", "rl_burst", "rl_tok", "rl_at"),
    "max_concurrency": ("mc", "blocked"),
    "enqueue_rate_limit": ("erl_rate", "erl_burst", "erl_tok", "erl_at"),
    "per_key_max_concurrency": ("pk_mc",),
    "per_key_rate_limit": ("pk_rate", "pk_burst"),
    "priority_aging": ("aging",),
}
#: Settings whose model attribute is named for its unit.
_ATTRIBUTE: Final = {"priority_aging": "priority_aging_ms"}


_RATE_PREFIX: Final = {"rate_limit": "rl", "enqueue_rate_limit": "erl", "per_key_rate_limit": "pk"}


def _text(value: bytes | None) -> str:
    return value.decode() if value is not None else ""


def _rate(meta: Mapping[bytes, bytes], prefix: str) -> RateLimit | None:
    rate = meta.get(f"{prefix}_rate".encode())
    if rate is None:
        return None
    return RateLimit(float(rate), int(meta.get(f"{prefix}_burst".encode(), b"1")))


def settings_from_meta(meta: Mapping[bytes, bytes]) -> QueueSettings:
    return QueueSettings(
        rate_limit=_rate(meta, "rl"),
        max_concurrency=int(meta.get(b"mc", b"0")),
        enqueue_rate_limit=_rate(meta, "erl"),
        per_key_max_concurrency=int(meta.get(b"pk_mc", b"0")),
        per_key_rate_limit=_rate(meta, "pk"),
        priority_aging_ms=int(meta.get(b"aging", b"0")),
    )


def meta_changes(settings: QueueSettings, names: Sequence[str]) -> tuple[list[str], list[str]]:
    """(fields to delete, flat field/value pairs to set) that apply `names` of settings. A
    rate changed keeps its bucket's tokens (lease.lua caps them at the new burst); a setting
    turned off loses its state too."""
    delete: list[str] = []
    pairs: list[str] = []
    for name in names:
        value = getattr(settings, _ATTRIBUTE.get(name, name))
        if isinstance(value, RateLimit):
            prefix = _RATE_PREFIX[name]
            pairs += [f"{prefix}_rate", repr(value.per_second), f"{prefix}_burst", str(value.burst)]
        elif isinstance(value, int) and value > 0:
            pairs += [_FIELDS[name][0], str(value)]
        else:
            delete += _FIELDS[name]
    return delete, pairs


def bucket_tokens(meta: Mapping[bytes, bytes], prefix: str, now_ms: int) -> float:
    """The tokens a bucket holds at now_ms, refilled as lease.lua / enqueue.lua refill it."""
    limit = _rate(meta, prefix)
    if limit is None:
        return 0.0
    tokens = meta.get(f"{prefix}_tok".encode())
    if tokens is None:  # never used: full
        return float(limit.burst)
    at = int(_text(meta.get(f"{prefix}_at".encode())) or now_ms)
    refill = max(0, now_ms - at) * limit.per_second / 1000
    return min(float(limit.burst), float(tokens) + refill)
