"""Broker: the composition root. Builds every part and owns the start and stop order."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from grpc_health.v1 import health_pb2

from broker.api.admin_service import AdminService
from broker.api.broker_service import BrokerService
from broker.api.lease_session import SessionRegistry
from broker.api.limits import ByteRate, StreamLimits, UnaryLimits, client_of_peer
from broker.api.schedule_service import ScheduleService
from broker.api.server import SERVICE_NAMES, Gate, build_server
from broker.audit import AuditTrail
from broker.auth.policy_file import PolicyFile
from broker.config import Settings
from broker.dispatch import Dispatcher
from broker.embedded_redis import RECOMMENDED_HASH_VALUE_BYTES, EmbeddedRedis
from broker.errors import BrokerError
from broker.loops.health_monitor import HealthMonitor
from broker.loops.maintainer import Maintainer
from broker.loops.periodic import Periodic
from broker.loops.schedule_firer import ScheduleFirer
from broker.loops.sweeper import Sweeper
from broker.loops.wake_listener import WakeListener
from broker.process_slot import ProcessSlot
from broker.queue import TaskQueue
from broker.schedules import ScheduleBook
from broker.store.audit_log import AuditLog
from broker.store.connect import redis_client
from broker.store.redis_store import RedisStore
from broker.store.schedule_store import ScheduleStore
from broker.store.web_sessions import WebSessions
from broker.telemetry.rpc_metrics import RpcMetrics
from broker.telemetry.tracing import RpcTracing, shutdown_provider, tracer_provider_from_env
from broker.tls import CertificateFiles
from broker.watch import WatchHub
from broker.web.peers import InProcessSeries, Peers, PeerServer
from broker.web.server import WebServer
from broker.workflows import OutboxMover

if TYPE_CHECKING:
    import grpc
    from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
    from opentelemetry.trace import TracerProvider

log = logging.getLogger(__name__)

#: Policies under which Redis may delete keys on its own: tasks would vanish silently.
EVICTING_POLICIES = frozenset(
    {"allkeys-lru", "allkeys-lfu", "allkeys-random", "volatile-lru", "volatile-lfu",
     "volatile-random", "volatile-ttl"}
)  # fmt: skip


#: A health service that reads SERVING while the process serves at all, Redis or not: for
#: liveness probes (a restart cures a stuck broker, not a Redis outage).
LIVENESS_SERVICE = "liveness"
#: How often each replica looks for due schedule ticks: a tick is enqueued at most this late
#: (plus Redis round trips) while a broker runs.
SCHEDULE_POLL_S = 0.2
#: The backstop sweep runs a small share of the registry this often (small shares keep each
#: pass short, so no request waits long behind it: 100,000 queues over 600 s is 9 a pass).
SWEEP_INTERVAL_S = 0.05


class UnsafeRedis(RuntimeError):
    """Redis is configured so that acknowledged tasks could be lost: the broker refuses it."""


class Broker:
    """One broker replica: gRPC server, dispatcher, and maintenance loops over one Redis.

    Args:
        settings: The configuration.
        tracer_provider: Where RPC spans go. None: an OTLP exporter when the OTEL_* environment
            asks for one (broker/telemetry/tracing.py), else no tracing.
        client_key: The client a call's peer ("ipv4:ip:port") belongs to, for the per-client
            limits; its IP address by default.
        slot: Which of a supervisor's serving processes this is (`--processes N`,
            broker/supervisor.py); None: the only one.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        tracer_provider: TracerProvider | None = None,
        client_key: Callable[[str], str] = client_of_peer,
        slot: ProcessSlot | None = None,
    ) -> None:
        self.settings = settings
        self.slot = slot
        self._client_key = client_key
        self._tracer_provider = tracer_provider
        self._own_tracer_provider: SdkTracerProvider | None = None
        self.embedded: EmbeddedRedis | None = None
        self.port = 0
        self.http_port = 0  # 0: no HTTP server (disabled, or its address was unusable)
        self.web: WebServer | None = None
        self._peer_server: PeerServer | None = None
        self._stopped = asyncio.Event()
        self._stopping = False
        self._outbox_sweep: asyncio.Task[int] | None = None
        #: The TLS certificate both ports serve; None: plaintext.
        self.certificates: CertificateFiles | None = None

    async def start(self) -> int:
        """Starts serving. Returns the bound port.

        Raises:
            PolicyError: the policy file cannot be read or is malformed.
            UnsafeRedis: Redis evicts keys under memory pressure.
            RuntimeError: Redis or the listen address cannot be used.
        """
        # A start that fails part way unmakes what it made, newest first: no redis-server child,
        # connection pool or unstopped gRPC server outlives it.
        async with contextlib.AsyncExitStack() as undo:
            port = await self._start(undo)
            undo.pop_all()  # started: stop() owns everything now
        return port

    async def _start(self, undo: contextlib.AsyncExitStack) -> int:
        s = self.settings
        self._warn_if_exposed()
        # First: a broken policy or certificate stops the start before anything is made.
        self.policy = PolicyFile(s.policy_file) if s.policy_file is not None else None
        if s.tls_cert is not None and s.tls_key is not None:
            self.certificates = CertificateFiles(s.tls_cert, s.tls_key, s.tls_client_ca)
        url = s.read_redis_url()
        if url is None:
            self.embedded = EmbeddedRedis(s.data_dir)
            self.embedded.start()
            undo.callback(self.embedded.stop)
            url = self.embedded.url
        self.store = RedisStore(
            redis_client(s, url),
            finished_retention_ms=round(s.finished_retention_s * 1000),
            dead_retention_ms=round(s.dead_retention_s * 1000),
        )
        undo.push_async_callback(self.store.close)
        await self._check_redis()
        self.audit = AuditTrail(AuditLog(self.store.client, s.audit_max_records))
        self.audit.start()
        undo.push_async_callback(self.audit.stop)
        gate = Gate(self.policy, self.audit)
        self.tasks = TaskQueue(self.store, s)
        window_ms = round(s.idempotency_window_s * 1000)
        self.schedules = ScheduleBook(ScheduleStore(self.store, window_ms), self.tasks)
        self.dispatcher = Dispatcher(self.tasks)
        self.tasks.reserve_inline = self.dispatcher.reserve_inline
        default_lease_ms = round(s.default_lease_s * 1000)
        # One byte budget per client, for its unary calls and its streams' frames alike.
        rate = ByteRate(s.request_bytes_per_s_per_client, s.request_bytes_per_s_per_client)
        self.streams = StreamLimits(
            s.max_streams_per_connection,
            s.max_streams_per_client,
            s.max_streams,
            self._client_key,
            rate,
        )
        self.unary = UnaryLimits(
            s.max_concurrent_unary_rpcs,
            s.max_inflight_request_bytes,
            min(s.max_concurrent_unary_rpcs_per_client, s.max_concurrent_unary_rpcs),
            min(s.max_inflight_request_bytes_per_client, s.max_inflight_request_bytes),
            self._client_key,
            rate,
        )
        self.registry = SessionRegistry(self.unary.foreground)
        self.watch_hub = WatchHub(
            self.tasks, s.max_watchers, s.watch_poll_initial_s, s.watch_poll_max_s
        )
        broker_service = BrokerService(
            self.tasks,
            self.dispatcher,
            self.registry,
            default_lease_ms,
            s.open_timeout_s,
            self.streams,
            gate.authorizer,
            self.watch_hub,
        )
        rpc_metrics = RpcMetrics() if s.http_listen else None
        interceptors: list[grpc.aio.ServerInterceptor] = [rpc_metrics] if rpc_metrics else []
        tracer_provider = self._tracer_provider
        if tracer_provider is None:
            tracer_provider = self._own_tracer_provider = tracer_provider_from_env()
            if tracer_provider is not None:
                undo.push_async_callback(shutdown_provider, tracer_provider)
        if tracer_provider is not None:
            interceptors.insert(0, RpcTracing(tracer_provider))
        self.mover = OutboxMover(self.store, self.tasks.workflow)
        self.tasks.on_outbox = self.mover.kick
        self.wake_listener = WakeListener(
            self.tasks,
            self.dispatcher,
            lambda task_id, lease_id: self.registry.revoke(task_id, lease_id, "cancelled"),
            flow=self.mover.kick,
            reconnected=self._sweep_outboxes,
        )
        self.monitor = HealthMonitor(self.store.ping, self._set_serving)
        sweeper = Sweeper(self.tasks, s.due_sweep_s, SWEEP_INTERVAL_S)
        self.loops = [
            Periodic(Maintainer(self.tasks), s.reap_interval_s),
            Periodic(sweeper, SWEEP_INTERVAL_S, sweeper.pause_s),
            Periodic(self.monitor, 1.0),
            Periodic(ScheduleFirer(self.schedules), SCHEDULE_POLL_S),
        ]
        # HTTP binds first: once gRPC serves, nothing else may fail.
        await self._start_http(rpc_metrics, undo)
        self.server, self.health = build_server(
            broker_service,
            AdminService(self.tasks, gate.authorizer, self.audit),
            ScheduleService(self.schedules, gate.authorizer, self.audit),
            s,
            self.unary,
            gate,
            interceptors,
            reuse_port=self.slot is not None,
        )
        try:
            if self.certificates is None:
                self.port = self.server.add_insecure_port(s.listen)
            else:
                credentials = self.certificates.grpc_credentials()
                self.port = self.server.add_secure_port(s.listen, credentials)
        except RuntimeError:  # grpcio raises on a bind failure (older releases returned 0)
            self.port = 0
        # Started even when the bind failed: grpc.aio stops and frees only a started server, and
        # logs one freed unstopped with a reference to it that crashes the process if a log
        # handler keeps the record (pytest's capture does).
        await self.server.start()
        undo.push_async_callback(self.server.stop, None)
        if self.port == 0:
            raise RuntimeError(f"cannot listen on {s.listen}")
        await self.health.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        # Redis answered moments ago (_check_redis): serving from the first call on, rather than
        # NOT_FOUND for every service until the health monitor's first pass has run.
        await self._set_serving(True)
        self.monitor.serving = True
        self.wake_listener.start()
        self.watch_hub.start()
        for loop in self.loops:
            loop.start()
        host = s.listen_host
        tls = "" if self.certificates is None else " (mutual TLS)" if s.tls_client_ca else " (TLS)"
        log.info("taskbroker serving on %s:%d%s", host, self.port, tls)
        return self.port

    def _sweep_outboxes(self) -> None:
        """After the wake listener (re)connects: workflow announcements (tb:flow) made while it
        was away were lost, so look for outboxes with entries (one pass in the background)."""
        if self._outbox_sweep is None or self._outbox_sweep.done():
            self._outbox_sweep = asyncio.create_task(self._sweep_outboxes_once())

    async def _sweep_outboxes_once(self) -> int:
        try:
            return await self.mover.sweep()
        except BrokerError as exc:  # the maintainer still finds them (maintain.lua)
            log.warning("could not look for workflow outboxes after a reconnect: %s", exc)
            return 0

    async def _start_http(
        self, rpc_metrics: RpcMetrics | None, undo: contextlib.AsyncExitStack
    ) -> None:
        """The HTTP side, served once: by this process, or by the first of a supervisor's
        (then the others answer it with their in-process series on their Unix sockets)."""
        s, slot = self.settings, self.slot
        if slot is not None and not slot.serves_http:
            if rpc_metrics is not None:
                series = InProcessSeries(self.tasks.timings, self.registry, rpc_metrics)
                self._peer_server = PeerServer(slot.socket_path(slot.index), series)
                await self._peer_server.start()
                undo.push_async_callback(self._peer_server.stop)
            return
        self.web = WebServer(
            self.tasks,
            self.registry,
            s,
            rpc_metrics,
            lambda: self.monitor.serving is not False,  # start() has just reached Redis
            lambda: self._stopping,
            self.audit,
            WebSessions(self.store.client, s.dashboard_session_s),
            self.policy,
            self.certificates,
            Peers(slot.peer_sockets) if slot is not None else None,
            self.schedules,
        )
        self.http_port = await self.web.start()
        undo.push_async_callback(self.web.stop)

    def _warn_if_exposed(self) -> None:
        """Settings refuse a reachable port without TLS and a policy file unless `insecure`
        is set; then say loudly what is exposed."""
        s = self.settings
        if not s.insecure:
            return
        exposed = s.exposed_addresses
        missing = [
            *([] if s.tls else ["TLS"]),
            *([] if s.policy_file is not None else ["authentication"]),
        ]
        if exposed and missing:
            log.warning(
                "INSECURE (--insecure): %s reachable from other hosts without %s: anyone who "
                "can reach it can read and change every queue",
                " and ".join(exposed),
                " or ".join(missing),
            )
        else:
            log.warning("--insecure is set; it changes nothing (no port is exposed without it)")

    async def _check_redis(self) -> None:
        info = await self.store.server_info()
        if info.maxmemory_policy in EVICTING_POLICIES:
            raise UnsafeRedis(
                f"redis maxmemory-policy is {info.maxmemory_policy}: Redis would evict tasks; "
                "set maxmemory-policy noeviction"
            )
        if info.maxmemory_policy is None:
            log.warning("cannot read redis CONFIG: make sure maxmemory-policy is noeviction")
        if not info.aof_enabled:
            durability = "memory only (no AOF): a Redis restart loses every task"
        elif info.appendfsync == "always":
            durability = "AOF fsync always: an acknowledged write is on disk"
        else:
            durability = f"AOF fsync {info.appendfsync}: a crash may lose the last second"
        if info.hash_value_bytes is not None and info.hash_value_bytes < 256:
            log.info(
                "redis hash-max-listpack-value is %d: tasks with payloads over it take about "
                "1.1 kB each instead of 470 B; %d is recommended (README, Operations)",
                info.hash_value_bytes,
                RECOMMENDED_HASH_VALUE_BYTES,
            )
        log.info(
            "redis %s%s; persistence: %s",
            info.version,
            " (cluster)" if info.cluster else "",
            durability,
        )

    async def _set_serving(self, serving: bool) -> None:
        if self._stopping:
            return
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else (health_pb2.HealthCheckResponse.NOT_SERVING)
        )
        for service in ("", *SERVICE_NAMES):
            await self.health.set(service, status)

    async def stop(self, grace_s: float | None = None) -> None:
        """Graceful shutdown: NOT_SERVING at once, a drain notice on every stream, settlements
        accepted until the grace deadline, then held tasks go back to pending."""
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        grace = self.settings.shutdown_grace_s if grace_s is None else grace_s
        await self.health.enter_graceful_shutdown()
        self.dispatcher.drain()
        self.watch_hub.drain()
        deadline = time.monotonic() + grace
        sessions = list(self.registry.sessions)
        for session in sessions:
            session.drain(int((time.time() + grace) * 1000))
        log.info("draining %d lease streams for up to %.1fs", len(sessions), grace)
        while any(s.holding for s in self.registry.sessions):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self.registry.settled.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.registry.settled.wait(), remaining)
        for session in list(self.registry.sessions):
            session.close()
        await asyncio.sleep(0)  # let the streams end and hand back what they held
        await self.server.stop(1.0)
        await self.registry.wait_background()
        await self.wake_listener.stop()
        if self._outbox_sweep is not None:
            self._outbox_sweep.cancel()
            await asyncio.gather(self._outbox_sweep, return_exceptions=True)
        await self.watch_hub.stop()
        for loop in self.loops:
            await loop.stop()
        await self.mover.stop()  # after all that kicks it: the listener, the sweep, the loops
        await self.dispatcher.stop()
        if self.web:
            await self.web.stop()
        if self._peer_server is not None:
            await self._peer_server.stop()
        await self.audit.stop()
        await self.store.close()
        if self.embedded:
            self.embedded.stop()
        if self._own_tracer_provider is not None:
            await shutdown_provider(self._own_tracer_provider)
        log.info("taskbroker stopped")
        self._stopped.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()
