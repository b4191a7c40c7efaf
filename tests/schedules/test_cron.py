"""Next-tick computation as a pure function over fixed instants: DST in Europe/Berlin (the March
skip, the October repeat), six fields, @every, nicknames, and refusals naming the field."""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest

from broker.cron import parse
from broker.errors import InvalidArgument
from broker.schedules import jitter_for

BERLIN = ZoneInfo("Europe/Berlin")


def ms(year: int, month: int, day: int, hour: int, minute: int = 0, *, utc: bool = False) -> int:
    zone = UTC if utc else BERLIN
    return round(datetime(year, month, day, hour, minute, tzinfo=zone).timestamp() * 1000)


def ticks(expression: str, zone: str, start_ms: int, count: int) -> list[int]:
    cron = parse("schedule", expression, zone)
    out, at = [], start_ms
    for _ in range(count):
        at = cron.next_after(at)
        out.append(at)
    return out


@pytest.mark.parametrize("expression", ["30 2 * * *", "0 30 2 * * *"])
def test_a_skipped_local_time_fires_once_at_the_change(expression: str) -> None:
    # 2025-03-30: 02:00 CET jumps to 03:00 CEST; 02:30 does not exist.
    got = ticks(expression, "Europe/Berlin", ms(2025, 3, 29, 12), 3)
    assert got == [ms(2025, 3, 29, 1, 0, utc=True) + 86_400_000, ms(2025, 3, 31, 2, 30),
                   ms(2025, 4, 1, 2, 30)]  # fmt: skip
    assert got[0] == ms(2025, 3, 30, 1, 0, utc=True)  # 03:00 CEST, the change itself


@pytest.mark.parametrize("expression", ["30 2 * * *", "0 30 2 * * *"])
def test_a_repeated_local_time_fires_once(expression: str) -> None:
    # 2025-10-26: 03:00 CEST falls back to 02:00 CET; 02:30 happens twice.
    got = ticks(expression, "Europe/Berlin", ms(2025, 10, 25, 12), 3)
    assert got == [
        ms(2025, 10, 26, 0, 30, utc=True),  # the first 02:30 (CEST)
        ms(2025, 10, 27, 1, 30, utc=True),  # the next day's 02:30 CET
        ms(2025, 10, 28, 1, 30, utc=True),
    ]
    # Asked from inside the repeated hour (after the first 02:30), the second is not a tick.
    assert ticks(expression, "Europe/Berlin", ms(2025, 10, 26, 1, 10, utc=True), 1) == [
        ms(2025, 10, 27, 1, 30, utc=True)
    ]


def test_an_hourly_schedule_follows_real_time_across_both_changes() -> None:
    spring = ticks("0 * * * *", "Europe/Berlin", ms(2025, 3, 30, 0, 30, utc=True), 3)
    assert [t - spring[0] for t in spring] == [0, 3_600_000, 7_200_000]
    autumn = ticks("0 * * * *", "Europe/Berlin", ms(2025, 10, 25, 23, 30, utc=True), 4)
    assert [t - autumn[0] for t in autumn] == [0, 3_600_000, 7_200_000, 10_800_000]


def test_the_latest_tick_at_or_before_an_instant() -> None:
    cron = parse("schedule", "30 2 * * *", "Europe/Berlin")
    assert cron.latest_at_or_before(ms(2025, 3, 30, 12)) == ms(2025, 3, 30, 1, 0, utc=True)
    assert cron.latest_at_or_before(ms(2025, 4, 2, 2, 30)) == ms(2025, 4, 2, 2, 30)
    every = parse("schedule", "@every 90s", "")
    assert every.latest_at_or_before(181_000) == 180_000
    assert every.next_after(180_000) == 270_000


def test_seconds_nicknames_and_every() -> None:
    assert ticks("*/20 * * * * *", "", 1_000, 3) == [20_000, 40_000, 60_000]
    assert ticks("@hourly", "UTC", 0, 2) == [3_600_000, 7_200_000]
    assert ticks("@every 1h30m", "", 0, 2) == [5_400_000, 10_800_000]


@pytest.mark.parametrize(
    ("expression", "zone", "field"),
    [
        ("", "", "schedule.cron"),
        ("* * *", "", "schedule.cron"),
        ("61 * * * *", "", "schedule.cron"),
        ("@reboot", "", "schedule.cron"),
        ("@every 0s", "", "schedule.cron"),
        ("@every soon", "", "schedule.cron"),
        ("* * * * *", "Mars/Olympus", "schedule.time_zone"),
    ],
)
def test_bad_expressions_and_zones_name_the_field(expression: str, zone: str, field: str) -> None:
    with pytest.raises(InvalidArgument) as refused:
        parse("schedule", expression, zone)
    assert refused.value.field == field


def test_jitter_is_the_same_for_a_tick_on_every_replica_and_within_bounds() -> None:
    delays = [jitter_for("nightly", tick, 10_000) for tick in range(0, 100_000, 1000)]
    assert delays == [jitter_for("nightly", tick, 10_000) for tick in range(0, 100_000, 1000)]
    assert all(0 <= d < 10_000 for d in delays)
    assert len(set(delays)) > 50  # spread, not constant
    assert jitter_for("nightly", 5000, 0) == 0
