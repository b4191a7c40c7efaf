"""Prometheus metrics: one collector that renders everything at scrape time (the RPC timings come
from broker/telemetry/rpc_metrics.py).

Two kinds of series (docs/observability.md, "Metrics"):
- Redis-derived (task totals, counts by state, oldest pending age, paused) come from the cached
  StatsSampler snapshot and describe the whole cluster: every replica reports the same values,
  so aggregate them across replicas with max, never sum.
- In-process (queue wait, processing time, RPC durations, streams and workers) describe this
  replica only, every serving process of it together (`--processes N`: broker/web/peers.py):
  sum them across replicas.
No series carries a payload, a result or an error message; labels are queue names, states, RPC
method names and status codes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Final

from prometheus_client import GC_COLLECTOR, PLATFORM_COLLECTOR, PROCESS_COLLECTOR
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import CollectorRegistry

if TYPE_CHECKING:
    from broker.models import QueueStats
    from broker.web.peers import InProcessSeries
    from broker.web.sampler import StatsSampler

#: (metric name without _total, QueueStats field, help): the stats hash totals (stats.lua).
TOTALS: Final = (
    ("taskbroker_tasks_enqueued", "enqueued_total", "Tasks stored by Enqueue (duplicates not)."),
    ("taskbroker_tasks_succeeded", "succeeded_total", "Tasks acked."),
    ("taskbroker_tasks_failed", "failed_total",
     "Failed attempts (nacks), whether retried or dead-lettered."),
    ("taskbroker_tasks_retried", "retried_total", "Nacked attempts scheduled for a retry."),
    ("taskbroker_tasks_reclaimed", "reclaimed_total",
     "Leases that ended without a settlement (expired, or their stream closed)."),
    ("taskbroker_tasks_dead_lettered", "dead_lettered_total",
     "Tasks moved to the dead letters (out of attempts, or nacked as dead)."),
    ("taskbroker_tasks_cancelled", "cancelled_total", "Tasks cancelled before they finished."),
)  # fmt: skip
CLUSTER_NOTE: Final = " Cluster-wide (from Redis): aggregate across replicas with max."


class BrokerCollector:
    """Renders every taskbroker_ series at scrape time from state already in memory: the
    sampler's cached snapshot, and the in-process histograms and live sessions of every serving
    process (as of the last InProcessSeries.refresh)."""

    def __init__(
        self,
        sampler: StatsSampler,
        series: InProcessSeries,
        redis_up: Callable[[], bool],
    ) -> None:
        self._sampler = sampler
        self._series = series
        self._redis_up = redis_up

    def describe(self) -> Iterable[Metric]:
        return []  # names vary with the queues; nothing to check at registration

    def collect(self) -> Iterable[Metric]:
        yield from self._redis_series()
        yield from self._histograms()
        yield from self._session_series()
        up = GaugeMetricFamily(
            "taskbroker_redis_up", "1 while this replica's health check reaches Redis."
        )
        up.add_metric([], 1.0 if self._redis_up() else 0.0)
        yield up
        processes = GaugeMetricFamily(
            "taskbroker_processes", "Processes serving this replica's gRPC port (--processes)."
        )
        processes.add_metric([], self._series.processes)
        reporting = GaugeMetricFamily(
            "taskbroker_processes_reporting",
            "Of taskbroker_processes, those whose in-process series this scrape read afresh "
            "(one that did not answer is counted with its previous figures).",
        )
        reporting.add_metric([], self._series.reporting)
        yield from (processes, reporting)

    def _redis_series(self) -> Iterable[Metric]:
        snapshot = self._sampler.latest
        if snapshot is None:  # never sampled, or Redis failed: no stale numbers
            return
        totals = [
            (CounterMetricFamily(name, text + CLUSTER_NOTE, labels=["queue"]), field)
            for name, field, text in TOTALS
        ]
        tasks = GaugeMetricFamily(
            "taskbroker_queue_tasks",
            "Tasks of a queue by state (succeeded and cancelled tasks are not kept)."
            + CLUSTER_NOTE,
            labels=["queue", "state"],
        )
        oldest = GaugeMetricFamily(
            "taskbroker_queue_oldest_pending_age_seconds",
            "How long the oldest pending task has been ready (0 when none)." + CLUSTER_NOTE,
            labels=["queue"],
        )
        paused = GaugeMetricFamily(
            "taskbroker_queue_paused",
            "1 while the queue is paused." + CLUSTER_NOTE,
            labels=["queue"],
        )
        for s in snapshot.queues:
            for family, field in totals:
                family.add_metric([s.queue], getattr(s, field))
            for state in ("pending", "scheduled", "leased", "dead", "waiting"):
                tasks.add_metric([s.queue, state], getattr(s, state))
            age = (s.now_ms - s.oldest_ready_ms) / 1000 if s.oldest_ready_ms is not None else 0.0
            oldest.add_metric([s.queue], max(age, 0.0))
            paused.add_metric([s.queue], 1.0 if s.paused else 0.0)
        yield from (family for family, _ in totals)
        yield from (tasks, oldest, paused)
        yield from _limit_series(snapshot.queues)
        # Per-queue series cover the top queues by backlog (Settings.metrics_top_queues); these
        # cover every queue, so dashboards can sum without 100,000 series.
        every = GaugeMetricFamily(
            "taskbroker_all_queues_tasks",
            "Tasks of all queues together by state." + CLUSTER_NOTE,
            labels=["state"],
        )
        for state in ("pending", "scheduled", "leased", "dead", "waiting"):
            every.add_metric([state], getattr(snapshot.totals, state))
        count = GaugeMetricFamily(
            "taskbroker_queues",
            "Queues the broker knows (the per-queue series show the ones with the largest "
            "backlog)." + CLUSTER_NOTE,
        )
        count.add_metric([], snapshot.queue_count)
        yield from (every, count)

    def _histograms(self) -> Iterable[Metric]:
        series = self._series
        for name, text, by_queue in (
            (
                "taskbroker_queue_wait_seconds",
                "Time from a task being ready (enqueued, retried or due) to its lease, for "
                "leases taken by this replica.",
                series.wait(),
            ),
            (
                "taskbroker_task_processing_seconds",
                "Time from lease to ack, for leases taken and acked through this replica.",
                series.processing(),
            ),
        ):
            family = HistogramMetricFamily(name, text, labels=["queue"])
            for queue, buckets in sorted(by_queue.items()):
                family.add_metric([queue], buckets.cumulative(), buckets.total)
            yield family
        durations = series.rpc()
        if durations is not None:
            rpc = HistogramMetricFamily(
                "taskbroker_rpc_duration_seconds",
                "gRPC calls served by this replica, by method and status code (for the Lease "
                "stream: its lifetime).",
                labels=["method", "code"],
            )
            for (method, code), buckets in sorted(durations.items()):
                rpc.add_metric([method, code], buckets.cumulative(), buckets.total)
            yield rpc

    def _session_series(self) -> Iterable[Metric]:
        held = self._series.streams()
        workers = {s["worker_id"] or f"stream:{s['stream_id']}" for s in held}
        connected = GaugeMetricFamily(
            "taskbroker_workers_connected",
            "Distinct workers (by worker id) with a Lease stream open on this replica.",
        )
        connected.add_metric([], len(workers))
        streams = GaugeMetricFamily(
            "taskbroker_lease_streams_open", "Lease streams open on this replica."
        )
        streams.add_metric([], len(held))
        yield from (connected, streams)


#: (kind label, QueueSettings field) of the rate limits a queue may have.
RATE_LIMITS: Final = (
    ("lease", "rate_limit"),
    ("enqueue", "enqueue_rate_limit"),
    ("per_key", "per_key_rate_limit"),
)


def _gauge(name: str, text: str, *labels: str) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, text + CLUSTER_NOTE, labels=["queue", *labels])


def _limit_series(queues: Iterable[QueueStats]) -> Iterable[Metric]:
    """Each queue's limits (docs/limits.md) and its group keys' counts; no per-key labels, so
    the series stay as many as the queues shown."""
    cap = _gauge("taskbroker_queue_max_concurrency", "max_concurrency (0: off).")
    key_cap = _gauge(
        "taskbroker_queue_per_key_max_concurrency", "per_key_max_concurrency (0: off)."
    )
    rate = _gauge(
        "taskbroker_queue_rate_limit_per_second",
        "Rate limits by kind: lease (rate_limit), enqueue (enqueue_rate_limit), per_key "
        "(per_key_rate_limit); 0: off.",
        "kind",
    )
    tokens = _gauge(
        "taskbroker_queue_rate_limit_tokens",
        "Tokens in the rate_limit's bucket now (below 1, the next lease waits; 0 without one).",
    )
    keys_pending = _gauge("taskbroker_queue_group_keys_pending", "Group keys with pending tasks.")
    keys_parked = _gauge(
        "taskbroker_queue_group_keys_parked",
        "Group keys with pending tasks parked at per_key_max_concurrency.",
    )
    for s in queues:
        settings = s.settings
        cap.add_metric([s.queue], settings.max_concurrency)
        key_cap.add_metric([s.queue], settings.per_key_max_concurrency)
        for kind, field in RATE_LIMITS:
            limit = getattr(settings, field)
            rate.add_metric([s.queue, kind], limit.per_second if limit is not None else 0.0)
        tokens.add_metric([s.queue], s.rate_tokens)
        keys_pending.add_metric([s.queue], s.group_keys_pending)
        keys_parked.add_metric([s.queue], s.group_keys_parked)
    yield from (cap, key_cap, rate, tokens, keys_pending, keys_parked)


def build_registry(collector: BrokerCollector) -> CollectorRegistry:
    """A registry per broker (tests run several in one process) with the process, platform and
    GC collectors prometheus-client registers by default, plus ours."""
    registry = CollectorRegistry()
    registry.register(collector)
    for default in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
        registry.register(default)
    return registry
