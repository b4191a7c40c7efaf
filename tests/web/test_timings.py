"""The hot-path timings (broker/web/timings.py) and the new settings, without a broker."""

from __future__ import annotations

import pytest

from broker.config import Settings, load_settings
from broker.models import Lease, LeaseBatch, SettleStatus, Task, TaskRef, TaskState
from broker.timings import WAIT_BUCKETS, Buckets, TaskTimings


def leased(now_ms: int, *ready_ms: int, first_id: int = 0) -> LeaseBatch:
    leases = []
    for i, ready in enumerate(ready_ms):
        task = Task(
            ref=TaskRef("q", f"{first_id + i:026d}"),
            type="t",
            payload=b"",
            headers={},
            priority=0,
            state=TaskState.LEASED,
            attempt=1,
            max_attempts=1,
            create_ms=ready,
            schedule_ms=ready,
            lease_expire_ms=now_ms + 30_000,
            finish_ms=None,
            last_error="",
            errors=(),
            result=b"",
            lease_ms=0,
            initial_backoff_ms=1,
            max_backoff_ms=1,
        )
        leases.append(Lease(task, f"lease-{first_id + i}", now_ms + 30_000))
    return LeaseBatch(now_ms=now_ms, next_due_ms=None, paused=False, leases=leases)


def test_buckets_count_cumulatively_like_prometheus() -> None:
    buckets = Buckets((0.1, 1.0))
    for v in (0.05, 0.1, 0.5, 3.0):
        buckets.observe(v)
    assert buckets.cumulative() == [("0.1", 2), ("1.0", 3), ("+Inf", 4)]
    assert buckets.count == 4 and buckets.total == pytest.approx(3.65)
    assert buckets.quantile(0.5) == pytest.approx(0.1)
    assert buckets.quantile(0.99) == 1.0  # in +Inf: the highest finite bound
    assert Buckets((1.0,)).quantile(0.5) is None
    earlier = buckets.copy()
    buckets.observe(0.6)
    assert buckets.quantile(0.5, since=earlier) == pytest.approx(0.55)


def test_wait_is_lease_time_minus_ready_time_per_queue() -> None:
    timings = TaskTimings()
    timings.leased("q", leased(10_000, 10_000, 9_000, 4_000, 10_500))
    wait = timings.wait["q"]
    assert wait.count == 4 and wait.total == pytest.approx(0 + 1 + 6 + 0)
    assert wait.counts[WAIT_BUCKETS.index(1.0)] == 1
    timings.leased("q", leased(10_000))  # an empty batch observes nothing
    assert timings.wait["q"].count == 4


def test_processing_is_observed_once_per_first_ack_and_failed_leases_are_forgotten() -> None:
    timings = TaskTimings()
    timings.leased("q", leased(1_000, 1_000, 1_000, 1_000, 1_000))
    timings.acked("q", "lease-0", SettleStatus.OK)
    timings.acked("q", "lease-0", SettleStatus.AGAIN)
    timings.acked("q", "lease-1", SettleStatus.STALE)
    timings.nacked("lease-2")
    assert timings.processing["q"].count == 1
    assert timings.tracked == 1  # lease-3, still held
    timings.acked("q", "unknown", SettleStatus.OK)  # acked here, leased on another replica
    assert timings.processing["q"].count == 1


def test_acks_observed_together_count_as_they_would_one_by_one() -> None:
    timings = TaskTimings(max_tracked=3)
    timings.leased("q", leased(1_000, *[1_000] * 4, first_id=0))  # a generation of its own
    timings.leased("q", leased(1_000, 1_000, 1_000, first_id=4))
    timings.nacked("lease-5")
    ok, again, stale = SettleStatus.OK, SettleStatus.AGAIN, SettleStatus.STALE
    timings.acked_many(
        "q",
        ["lease-0", "lease-0", "lease-1", "lease-4", "lease-5", "unknown"],
        [ok, again, stale, ok, ok, ok],
    )
    assert timings.processing["q"].count == 2  # lease-0 (previous generation) and lease-4
    assert timings.tracked == 2  # lease-2 and lease-3, still held
    timings.acked_many("other", [], [])
    assert "other" not in timings.processing


def test_lease_starts_never_acked_here_age_out_after_two_generations() -> None:
    timings = TaskTimings(max_tracked=3)
    timings.leased("q", leased(1_000, *[1_000] * 4, first_id=0))  # 4 > 3: a new generation
    assert timings.tracked == 4
    timings.leased("q", leased(1_000, *[1_000] * 4, first_id=4))  # the first 4 are dropped
    assert timings.tracked == 4
    timings.acked("q", "lease-0", SettleStatus.OK)
    timings.acked("q", "lease-7", SettleStatus.OK)  # from the previous generation: still known
    assert timings.processing["q"].count == 1


def test_http_settings_come_from_the_environment_and_are_checked() -> None:
    assert (Settings().http_listen, Settings().dashboard_admin) == ("127.0.0.1:8080", False)
    settings = load_settings(
        [],
        environ={
            "TASKBROKER_HTTP_LISTEN": "0.0.0.0:9100",
            "TASKBROKER_DASHBOARD_ADMIN": "1",
            "TASKBROKER_INSECURE": "1",
        },
    )
    assert (settings.http_listen, settings.dashboard_admin) == ("0.0.0.0:9100", True)
    assert load_settings([], environ={"TASKBROKER_HTTP_LISTEN": ""}).http_listen == ""
    assert load_settings(["--dashboard-admin"], environ={}).dashboard_admin
    for bad in ("8080", ":8080", "host:http", "host:70000"):
        with pytest.raises(ValueError, match="http_listen"):
            Settings(http_listen=bad)
