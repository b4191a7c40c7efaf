"""Cron ticks: when a schedule's expression fires, as Unix milliseconds, in its time zone.

The expression is parsed and matched by cronsim (five fields, or six with seconds first); this
module adds "@every <duration>", the usual nicknames, and one DST rule for every expression
that names its hour and minute (such as "30 2 * * *"): it is matched on the local wall clock,
a wall time that a DST change skips fires once at the first valid instant after it (the
change itself: 03:00 for 02:30 in Europe/Berlin in March), and a wall time that repeats fires
once, at its first occurrence. An expression with a wildcard hour or minute ("0 * * * *")
follows real time instead, so an hourly job runs every real hour across both changes.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Final
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError

from broker.errors import InvalidArgument

#: Nicknames as Vixie cron reads them (cronsim knows none of them).
NICKNAMES: Final = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
MIN_EVERY_MS: Final = 1000
MAX_EVERY_MS: Final = 366 * 86_400_000
MAX_EXPRESSION_LENGTH: Final = 256
_DURATION_PART: Final = re.compile(r"(\d+)(ms|s|m|h|d)")
_UNIT_MS: Final = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
#: Candidate ticks looked at per question before giving up (an expression that matches no
#: date, such as "0 0 30 2 *", is refused by cronsim; this only bounds the DST mapping).
_MAX_CANDIDATES: Final = 1000


@dataclass(frozen=True, slots=True)
class Cron:
    """A parsed expression in a zone. `every_ms` is set for "@every"; else `expression` is the
    cronsim expression (nicknames expanded) and `wall_clock` says whether it is matched on
    the local wall clock (hour and minute named) or in real time."""

    expression: str
    zone: ZoneInfo
    every_ms: int | None = None
    wall_clock: bool = False

    def next_after(self, after_ms: int) -> int:
        """The first tick strictly after after_ms."""
        if self.every_ms is not None:
            return (after_ms // self.every_ms + 1) * self.every_ms
        for tick in self._ticks(after_ms, reverse=False):
            if tick > after_ms:
                return tick
        raise InvalidArgument("cron", "no tick found (the expression never matches)")

    def latest_at_or_before(self, at_ms: int) -> int | None:
        """The last tick at or before at_ms, or None when there is none."""
        if self.every_ms is not None:
            return at_ms // self.every_ms * self.every_ms
        for tick in self._ticks(at_ms + 1000, reverse=True):
            if tick <= at_ms:
                return tick
        return None

    def _ticks(self, from_ms: int, reverse: bool) -> Iterator[int]:
        """Candidate ticks from from_ms on (or back), as instants in ms."""
        start = datetime.fromtimestamp(from_ms / 1000, UTC).astimezone(self.zone)
        if self.wall_clock:
            local = start.replace(tzinfo=None)
            wall = CronSim(self.expression, local, reverse=reverse)
            for _, naive in zip(range(_MAX_CANDIDATES), wall, strict=False):
                yield _instant_ms(naive, self.zone)
            return
        real = CronSim(self.expression, start, reverse=reverse)
        for _, aware in zip(range(_MAX_CANDIDATES), real, strict=False):
            yield round(aware.timestamp() * 1000)


def parse(field: str, expression: str, zone_name: str) -> Cron:
    """Parses a schedule's expression and zone ('' is UTC).

    Raises:
        InvalidArgument: naming `field`.cron or `field`.time_zone.
    """
    zone = parse_zone(f"{field}.time_zone", zone_name)
    text = " ".join(expression.split())
    if not text:
        raise InvalidArgument(f"{field}.cron", "required")
    if len(text) > MAX_EXPRESSION_LENGTH:
        raise InvalidArgument(f"{field}.cron", f"longer than {MAX_EXPRESSION_LENGTH} characters")
    if text.lower().startswith("@every"):
        return Cron(text, zone, every_ms=parse_every(f"{field}.cron", text[len("@every") :]))
    cron_text = NICKNAMES.get(text.lower(), text)
    if cron_text.startswith("@"):
        raise InvalidArgument(f"{field}.cron", f"unknown nickname {text!r}")
    parts = cron_text.split()
    if len(parts) not in (5, 6):
        raise InvalidArgument(
            f"{field}.cron", f"expected 5 fields (6 with seconds), got {len(parts)}"
        )
    try:
        CronSim(cron_text, datetime.now(UTC))
    except (CronSimError, ValueError) as exc:
        raise InvalidArgument(f"{field}.cron", f"not a valid cron expression: {exc}") from None
    minute, hour = parts[-5], parts[-4]
    named = not minute.startswith("*") and not hour.startswith("*")
    return Cron(cron_text, zone, wall_clock=named)


def parse_zone(field: str, name: str) -> ZoneInfo:
    """An IANA zone by name ('' is UTC).

    Raises:
        InvalidArgument: naming the field, for a name that is not a known zone.
    """
    if not name:
        return ZoneInfo("UTC")
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise InvalidArgument(field, f"unknown time zone {name!r} (an IANA name)") from None


def parse_every(field: str, text: str) -> int:
    """The milliseconds of "@every"'s duration, Go style: "90s", "1h30m", "500ms" x2...

    Raises:
        InvalidArgument: malformed, or outside MIN_EVERY_MS..MAX_EVERY_MS.
    """
    text = text.strip().lower()
    if not text or _DURATION_PART.sub("", text):
        raise InvalidArgument(field, "expected '@every <duration>', such as '@every 1h30m'")
    total = sum(int(n) * _UNIT_MS[unit] for n, unit in _DURATION_PART.findall(text))
    if not MIN_EVERY_MS <= total <= MAX_EVERY_MS:
        raise InvalidArgument(field, "the @every duration must be 1s to 366d")
    return total


def _instant_ms(naive: datetime, zone: ZoneInfo) -> int:
    """A local wall time as an instant: its first occurrence when it repeats, and the DST
    change that skips it when it does not exist."""
    first = naive.replace(tzinfo=zone, fold=0)
    utc = first.astimezone(UTC)
    if utc.astimezone(zone).replace(tzinfo=None) == naive:
        return round(utc.timestamp() * 1000)
    return _gap_end_ms(naive, zone)


def _gap_end_ms(naive: datetime, zone: ZoneInfo) -> int:
    """The instant a DST gap containing `naive` ends: the first whole second whose offset is
    the one after the change (found by bisection between the wall time read with either
    offset)."""
    before = naive.replace(tzinfo=zone, fold=0).astimezone(UTC)
    after = naive.replace(tzinfo=zone, fold=1).astimezone(UTC)
    low, high = min(before, after), max(before, after)
    later_offset = high.astimezone(zone).utcoffset()
    while high - low > timedelta(seconds=1):
        middle = low + (high - low) / 2
        middle = middle.replace(microsecond=0)
        if middle.astimezone(zone).utcoffset() == later_offset:
            high = middle
        else:
            low = middle
    return round(high.timestamp() * 1000)
