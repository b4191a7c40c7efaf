"""WebServer: the broker's HTTP side (aiohttp, on the broker's event loop): /healthz, /metrics,
the dashboard page and its JSON API. Routes and behaviour: docs/observability.md.

Admin actions (POST) are refused with 403 unless `dashboard_admin` is set, and they must send
`Content-Type: application/json` from the page's own origin: a cross-site form or script cannot
forge one (the browser would need a CORS preflight, which is never granted).

Every request but /healthz must name an allowed Host (421 otherwise: DNS rebinding). With a
policy file, the dashboard and its API need a login (a bearer token exchanged for a session
cookie), every POST carries the session's CSRF token, views show only the queues the principal
may `read` and actions need `admin` on the queue (docs/security.md, "Dashboard and HTTP").
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import urlsplit

from aiohttp import web
from prometheus_client.exposition import choose_encoder

from broker.audit import may_read_audit
from broker.auth.jwt_tokens import looks_like_jwt
from broker.auth.policy import token_digest
from broker.auth.principal import ANONYMOUS, Principal, Role
from broker.errors import BrokerError, InvalidArgument, PermissionDenied, Unauthenticated
from broker.page_tokens import (
    decode_group_key_token,
    decode_page_token,
    decode_schedule_token,
    encode_group_key_token,
    encode_page_token,
    encode_schedule_token,
)
from broker.queue import MAX_GROUP_KEY_PAGE
from broker.store.web_sessions import WebSession, WebSessions
from broker.telemetry.rpc_metrics import RpcMetrics
from broker.web import access, views
from broker.web.metrics import BrokerCollector, build_registry
from broker.web.peers import InProcessSeries, Peers
from broker.web.sampler import StatsSampler
from broker.web.workflow import workflow_json

if TYPE_CHECKING:
    from broker.audit import AuditTrail
    from broker.auth.policy import Policy
    from broker.auth.policy_file import PolicyFile
    from broker.config import Settings
    from broker.live_streams import LiveStreams
    from broker.queue import TaskQueue
    from broker.schedules import ScheduleBook
    from broker.tls import CertificateFiles

log = logging.getLogger(__name__)

STATIC_DIR: Final = Path(__file__).parent / "static"
#: Dead letters per page when the request does not say; the most is the API's 1,000.
DEFAULT_PAGE_SIZE: Final = 20
#: Schedules per page at most (the API's ListSchedules allows 1,000).
MAX_SCHEDULE_PAGE: Final = 1000
#: Request bodies (ids to redrive or delete): 1,000 task ids fit many times over.
MAX_BODY_BYTES: Final = 1024 * 1024
ADMIN_DISABLED: Final = (
    "admin actions are disabled on this broker: start it with TASKBROKER_DASHBOARD_ADMIN=1 "
    "(or --dashboard-admin) to pause, resume, redrive or delete from the dashboard"
)
SECURITY_HEADERS: Final = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
WRONG_HOST: Final = (
    "this server does not answer to that Host name (a DNS-rebinding guard): open the dashboard "
    "by an allowed name, or add it to TASKBROKER_HTTP_ALLOWED_HOSTS"
)


@dataclass(frozen=True, slots=True)
class Caller:
    """Who a request runs as (ANONYMOUS without a policy; None before login), and its session."""

    principal: Principal | None
    session: WebSession | None


CALLER: Final = web.RequestKey("caller", Caller)
LOG_IN: Final = "log in first: the dashboard's login page exchanges a bearer token for a session"


def _json(body: object, status: int = 200) -> web.Response:
    return web.json_response(body, status=status, dumps=lambda o: json.dumps(o, allow_nan=False))


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure becomes a JSON error body; no traceback or class name reaches a client."""
    try:
        response = await handler(request)
    except BrokerError as exc:
        status, body = views.broker_error(exc)
        response = _json(body, status)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = _json(views.error_body(exc.status, exc.reason), exc.status)
        if "WWW-Authenticate" in exc.headers:  # tells a scraper which scheme to use
            response.headers["WWW-Authenticate"] = exc.headers["WWW-Authenticate"]
    except Exception:
        log.exception("%s %s failed", request.method, request.path)
        response = _json(views.error_body(500, "internal error"), 500)
    if not response.prepared:
        response.headers.update(SECURITY_HEADERS)
    return response


class WebServer:
    """The HTTP server of one broker replica."""

    def __init__(
        self,
        tasks: TaskQueue,
        sessions: LiveStreams,
        settings: Settings,
        rpc: RpcMetrics | None,
        redis_up: Callable[[], bool],
        draining: Callable[[], bool],
        audit: AuditTrail,
        web_sessions: WebSessions,
        policy: PolicyFile | None = None,
        certificates: CertificateFiles | None = None,
        peers: Peers | None = None,
        schedules: ScheduleBook | None = None,
    ) -> None:
        self._tasks = tasks
        self._schedules = schedules
        self._audit = audit
        self._policy = policy
        self._web_sessions = web_sessions
        self._allowed_hosts = settings.allowed_hosts
        self._metrics_token = settings.read_metrics_token()
        self._settings = settings
        self._redis_up = redis_up
        self._draining = draining
        self._certificates = certificates
        #: The in-process series of this process and of the other serving processes (peers).
        self.series = InProcessSeries(tasks.timings, sessions, rpc, peers)
        self.sampler = StatsSampler(tasks, top_n=settings.metrics_top_queues, wait=self.series.wait)
        self.registry = build_registry(BrokerCollector(self.sampler, self.series, redis_up))
        self._runner: web.AppRunner | None = None
        self._listener: asyncio.Server | None = None
        self.port = 0
        self.app = self._build_app()

    def _build_app(self) -> web.Application:
        app = web.Application(middlewares=[_errors, self._guard], client_max_size=MAX_BODY_BYTES)
        get, post = app.router.add_get, app.router.add_post
        get("/", self._index)
        get("/login", self._login_page)
        post("/api/login", self._login)
        post("/api/logout", self._logout)
        get("/healthz", self._healthz)
        get("/metrics", self._metrics)
        get("/api/info", self._info)
        get("/api/queues", self._queues)
        get("/api/history", self._history)
        get("/api/workers", self._workers)
        get("/api/tasks/{task_id}", self._task)
        get("/api/queues/{queue}/dead", self._dead)
        get("/api/queues/{queue}/keys", self._group_keys)
        get("/api/schedules", self._schedule_list)
        get("/api/audit", self._audit_records)
        post("/api/queues/{queue}/pause", self._pause)
        post("/api/queues/{queue}/resume", self._resume)
        post("/api/queues/{queue}/dead/redrive", self._redrive)
        post("/api/queues/{queue}/dead/delete", self._delete)
        app.router.add_static("/static/", STATIC_DIR, follow_symlinks=False)
        return app

    # --- access ------------------------------------------------------------------------------

    @web.middleware
    async def _guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Host check, /metrics token, login and CSRF, in that order; sets request[CALLER]
        (ANONYMOUS without a policy, None on a public path before login)."""
        path = request.path
        if path == "/healthz":  # probes (kubelet, Docker) use whatever address reaches the pod
            return await handler(request)
        if path == "/metrics" and self._metrics_token is not None:
            if not access.bearer_matches(request, self._metrics_token):
                self._audit.unauthenticated(_peer(request), "wrong /metrics token", "metrics")
                raise web.HTTPUnauthorized(
                    reason="/metrics needs its bearer token (metrics_token_file)",
                    headers={"WWW-Authenticate": "Bearer"},
                )
            return await handler(request)
        if not access.host_allowed(request, self._allowed_hosts):
            raise web.HTTPMisdirectedRequest(reason=WRONG_HOST)
        request[CALLER] = Caller(ANONYMOUS, None)
        if self._policy is None or path == "/metrics":
            return await handler(request)
        session = await self._session(request)
        request[CALLER] = Caller(
            Principal(session.principal, "token") if session else None, session
        )
        if session is None and not access.is_public(path):
            if path == "/":
                raise web.HTTPSeeOther("/login")
            raise Unauthenticated(LOG_IN)
        if request.method == "POST" and path != "/api/login":
            assert session is not None  # every POST but the login needs one (above)
            if not access.csrf_matches(request, session.csrf_token):
                reason = f"missing or wrong {access.CSRF_HEADER} header"
                self._audit.denied(request[CALLER].principal, f"POST {path}", "", reason)
                raise web.HTTPForbidden(reason=reason + " (reload the page)")
        return await handler(request)

    async def _session(self, request: web.Request) -> WebSession | None:
        """The request's session while its token is still in the policy (removing a token
        from the policy file ends its sessions at once)."""
        session = await self._web_sessions.get(request.cookies.get(access.SESSION_COOKIE, ""))
        policy = self._policy_now()
        if session is None or policy is None:
            return None
        if policy.principal_by_token_digest.get(session.token_sha256) != session.principal:
            return None
        return session

    def _policy_now(self) -> Policy | None:
        return None if self._policy is None else self._policy.current()

    def _may(self, request: web.Request, role: Role, queue: str) -> bool:
        policy = self._policy_now()
        return policy is None or policy.allows(_principal(request), role, queue)

    def _require(self, request: web.Request, role: Role, queue: str, action: str) -> None:
        """PERMISSION_DENIED (recorded in the audit trail) unless the principal has the role."""
        if not self._may(request, role, queue):
            principal = _principal(request)
            error = PermissionDenied(principal.name, role.value, queue, action)
            self._audit.denied(principal, action, queue, str(error))
            raise error

    async def _login_page(self, request: web.Request) -> web.StreamResponse:
        if self._policy is None:
            raise web.HTTPSeeOther("/")
        return web.FileResponse(STATIC_DIR / "login.html")

    async def _login(self, request: web.Request) -> web.Response:
        """{"token": "..."} → a session cookie; 401 (recorded) for a token the policy lacks."""
        policy = self._policy_now()
        if policy is None:
            raise web.HTTPNotFound(reason="this broker has no policy file: no login is needed")
        _check_same_origin_json(request)
        try:
            body: Any = await request.json()
        except (ValueError, UnicodeDecodeError):
            raise InvalidArgument("body", "not JSON") from None
        token = body.get("token") if isinstance(body, dict) else None
        if not isinstance(token, str) or not token.strip():
            raise InvalidArgument("token", 'send {"token": "<bearer token>"}')
        principal = policy.principal_for_token(token.strip())
        if principal is None:
            reason = "the token is not one the broker's policy knows"
            if policy.jwt is not None and looks_like_jwt(token.strip()):
                reason = "the dashboard takes a token of the policy file, not a JWT"
            self._audit.unauthenticated(_peer(request), reason, "dashboard.login")
            raise Unauthenticated(reason)
        session_id, session = await self._web_sessions.create(
            principal.name, token_digest(token.strip())
        )
        await self._audit.record(principal, "dashboard.login", "", "ok", f"peer={_peer(request)}")
        response = _json({"principal": principal.name, "csrf_token": session.csrf_token})
        access.session_cookie(response, request, session_id, self._web_sessions.ttl_s)
        return response

    async def _logout(self, request: web.Request) -> web.Response:
        _check_same_origin_json(request)
        session_id = request.cookies.get(access.SESSION_COOKIE, "")
        if session_id:
            await self._web_sessions.delete(session_id)
        caller = request.get(CALLER)
        principal = caller.principal if caller is not None else None
        if principal is not None and self._policy is not None:
            await self._audit.record(principal, "dashboard.logout", "", "ok")
        response = _json({"logged_out": True})
        access.clear_session_cookie(response, request)
        return response

    async def start(self) -> int:
        """Serves on settings.http_listen. Returns the bound port (0: HTTP is off).

        Raises:
            RuntimeError: the address cannot be used (the broker refuses to start, as it does
                for its gRPC address: a missing /metrics or /healthz would go unnoticed).
        """
        listen = self._settings.http_listen
        if not listen:
            return 0
        host, _, port = listen.rpartition(":")
        tls = None if self._certificates is None else self._certificates.ssl_context()
        runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        assert runner.server is not None  # set up above
        try:
            listener = await asyncio.get_running_loop().create_server(
                runner.server, host.strip("[]"), int(port), ssl=tls
            )
        except OSError as exc:
            await runner.cleanup()
            raise RuntimeError(f"http: cannot listen on {listen}: {exc.strerror or exc}") from None
        self._runner, self._listener = runner, listener
        self.port = int(listener.sockets[0].getsockname()[1])
        scheme = "http" if tls is None else "https"
        log.info("http (metrics, health, dashboard) on %s://%s:%d/", scheme, host, self.port)
        return self.port

    async def stop(self) -> None:
        """Stops listening, then ends open requests (within 1 s)."""
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _healthz(self, request: web.Request) -> web.Response:
        """200 while Redis answers and the broker serves; 503 otherwise."""
        redis_up, draining = self._redis_up(), self._draining()
        serving = redis_up and not draining
        body = {
            "status": "serving" if serving else "not_serving",
            "redis": "reachable" if redis_up else "unreachable",
            "draining": draining,
        }
        return _json(body, 200 if serving else 503)

    async def _metrics(self, request: web.Request) -> web.Response:
        await self.series.refresh()
        try:
            await self.sampler.snapshot()
        except BrokerError as exc:  # in-process series are still worth serving
            log.debug("metrics: no queue stats: %s", exc)
        encode, content_type = choose_encoder(request.headers.get("Accept", ""))
        return web.Response(body=encode(self.registry), headers={"Content-Type": content_type})

    # --- the dashboard ----------------------------------------------------------------------

    async def _index(self, request: web.Request) -> web.FileResponse:
        return web.FileResponse(STATIC_DIR / "index.html")

    async def _info(self, request: web.Request) -> web.Response:
        policy, principal = self._policy_now(), _principal(request)
        may_admin = policy is None or policy.may_somewhere(principal, Role.ADMIN)
        body: dict[str, object] = {"admin_enabled": self._settings.dashboard_admin and may_admin}
        if policy is not None:
            session = request[CALLER].session
            assert session is not None  # /api/info needs a login when there is a policy
            body |= {
                "principal": principal.name,
                "csrf_token": session.csrf_token,
                "audit_visible": may_read_audit(policy, principal),
            }
        return _json(body)

    def _sees_every_queue(self, request: web.Request) -> bool:
        return self._may(request, Role.READ, "*")

    async def _queues(self, request: web.Request) -> web.Response:
        await self.series.refresh()  # the wait chart's histograms
        snapshot = await self.sampler.snapshot()
        if not self._sees_every_queue(request):
            snapshot = self.sampler.visible_to(
                snapshot, lambda queue: self._may(request, Role.READ, queue)
            )
        return _json(
            {
                "time_ms": snapshot.time_ms,
                "queues": [
                    views.queue_json(s, snapshot.rates.get(s.queue)) for s in snapshot.queues
                ],
                # Capped: the queues above are the top metrics_top_queues by backlog; these
                # cover every queue.
                "all_queues": views.queue_json(snapshot.totals, None),
                "queue_count": snapshot.queue_count,
                "limit": self.sampler.top_n,
            }
        )

    async def _history(self, request: web.Request) -> web.Response:
        since = views.query_int(request.query.get("since_ms"), "since_ms", 0, 0, 2**62)
        if not self._sees_every_queue(request):
            return _json({"points": []})  # the charts sum every queue
        await self.series.refresh()
        await self.sampler.snapshot()
        return _json({"points": [views.point_json(p) for p in self.sampler.points_since(since)]})

    async def _workers(self, request: web.Request) -> web.Response:
        await self.series.refresh()
        streams = sorted(
            self.series.streams(), key=lambda s: (s["connected_since_ms"], s["stream_id"])
        )
        workers = [
            {k: v for k, v in s.items() if k != "closed"} for s in streams if not s["closed"]
        ]
        if not self._sees_every_queue(request):
            for worker in workers:
                worker["queues"] = [q for q in worker["queues"] if self._may(request, Role.READ, q)]
            workers = [w for w in workers if w["queues"]]
        return _json({"workers": workers})

    async def _task(self, request: web.Request) -> web.Response:
        task_id = request.match_info["task_id"]
        # Checked on the id's queue before the read: another queue's ids reveal nothing.
        self._require(request, Role.READ, self._tasks.ref("task_id", task_id).queue, "read tasks")
        task = await self._tasks.get(task_id)
        body = views.task_json(task, detail=True)
        body["workflow"] = await workflow_json(
            self._tasks,
            task,
            lambda queue: self._may(request, Role.READ, queue),
            self._sees_every_queue(request),
        )
        return _json({"task": body})

    async def _dead(self, request: web.Request) -> web.Response:
        query = request.query
        size = views.query_int(query.get("page_size"), "page_size", DEFAULT_PAGE_SIZE, 1, 1000)
        cursor = decode_page_token(query.get("page_token", ""))
        queue = request.match_info["queue"]
        self._require(request, Role.READ, queue, "read dead letters")
        page = await self._tasks.list_dead(queue, size, cursor)
        return _json(
            {
                "tasks": [views.task_json(t, detail=False) for t in page.tasks],
                "next_page_token": encode_page_token(page.next_cursor) if page.next_cursor else "",
            }
        )

    async def _group_keys(self, request: web.Request) -> web.Response:
        query = request.query
        size = views.query_int(
            query.get("page_size"), "page_size", DEFAULT_PAGE_SIZE, 1, MAX_GROUP_KEY_PAGE
        )
        cursor = decode_group_key_token(query.get("page_token", ""))
        queue = request.match_info["queue"]
        self._require(request, Role.READ, queue, "read group keys")
        page = await self._tasks.group_keys(queue, size, cursor)
        return _json(views.group_keys_json(page, encode_group_key_token(page.next_cursor)))

    async def _schedule_list(self, request: web.Request) -> web.Response:
        """Schedules by name, those on queues the caller may read (ListSchedules' rule)."""
        if self._schedules is None:
            raise web.HTTPNotFound(reason="this broker serves no schedules")
        query = request.query
        size = views.query_int(
            query.get("page_size"), "page_size", DEFAULT_PAGE_SIZE, 1, MAX_SCHEDULE_PAGE
        )
        after = decode_schedule_token(query.get("page_token", ""))
        found, last = await self._schedules.page(
            size, after, lambda queue: self._may(request, Role.READ, queue)
        )
        return _json(
            {
                "schedules": [views.schedule_json(s) for s in found],
                "next_page_token": encode_schedule_token(last),
            }
        )

    async def _audit_records(self, request: web.Request) -> web.Response:
        if not may_read_audit(self._policy_now(), _principal(request)):
            self._require(request, Role.ADMIN, "*", "read the audit trail")
        query = request.query
        size = views.query_int(query.get("page_size"), "page_size", DEFAULT_PAGE_SIZE, 1, 1000)
        records, token = await self._audit.page(size, query.get("page_token", ""))
        return _json({"records": [views.audit_json(r) for r in records], "next_page_token": token})

    # --- admin actions ----------------------------------------------------------------------

    def _check_admin(self, request: web.Request, queue: str, action: str) -> None:
        if not self._settings.dashboard_admin:
            raise web.HTTPForbidden(reason=ADMIN_DISABLED)
        _check_same_origin_json(request)
        self._require(request, Role.ADMIN, queue, action)

    async def _pause(self, request: web.Request) -> web.Response:
        return await self._set_paused(request, True)

    async def _resume(self, request: web.Request) -> web.Response:
        return await self._set_paused(request, False)

    async def _set_paused(self, request: web.Request, paused: bool) -> web.Response:
        queue = request.match_info["queue"]
        action = "dashboard.pause" if paused else "dashboard.resume"
        self._check_admin(request, queue, action)
        await self._audit.admin_action(
            action,
            queue,
            lambda: self._tasks.set_paused(queue, paused),
            principal=_principal(request),
        )
        self.sampler.expire()
        return _json({"queue": queue, "paused": paused})

    async def _redrive(self, request: web.Request) -> web.Response:
        queue = request.match_info["queue"]
        self._check_admin(request, queue, "dashboard.redrive")
        task_ids, every = await _dead_selection(request)
        count = await self._audit.dead_letter_action(
            "dashboard.redrive",
            queue,
            lambda: self._tasks.redrive_dead(queue, task_ids, every),
            (task_ids, every),
            "redriven",
            _principal(request),
        )
        self.sampler.expire()
        return _json({"redriven": count})

    async def _delete(self, request: web.Request) -> web.Response:
        queue = request.match_info["queue"]
        self._check_admin(request, queue, "dashboard.delete")
        task_ids, every = await _dead_selection(request)
        count = await self._audit.dead_letter_action(
            "dashboard.delete",
            queue,
            lambda: self._tasks.delete_dead(queue, task_ids, every),
            (task_ids, every),
            "deleted",
            _principal(request),
        )
        self.sampler.expire()
        return _json({"deleted": count})


def _principal(request: web.Request) -> Principal:
    caller = request.get(CALLER)
    return caller.principal if caller is not None and caller.principal else ANONYMOUS


def _peer(request: web.Request) -> str:
    return request.remote or "unknown"


def _check_same_origin_json(request: web.Request) -> None:
    """A POST must be JSON from the page's own origin: a cross-site form cannot send JSON, and
    a cross-site script cannot without a CORS preflight, which is never granted."""
    if request.content_type != "application/json":
        raise web.HTTPUnsupportedMediaType(reason="send Content-Type: application/json")
    origin = request.headers.get("Origin")  # browsers send it with every POST
    if origin is not None and urlsplit(origin).netloc != request.host:
        raise web.HTTPForbidden(reason="cross-origin request refused")


async def _dead_selection(request: web.Request) -> tuple[list[str], bool]:
    """Reads {"task_ids": [...]} or {"all": true}.

    Raises:
        InvalidArgument: naming what is wrong with the body.
    """
    try:
        body: Any = await request.json()
    except (ValueError, UnicodeDecodeError):
        raise InvalidArgument("body", "not JSON") from None
    if not isinstance(body, dict):
        raise InvalidArgument("body", 'must be an object: {"task_ids": [...]} or {"all": true}')
    for key in body:
        if key not in ("task_ids", "all"):
            raise InvalidArgument(str(key)[:40], "unknown field (expected task_ids or all)")
    every = body.get("all", False)
    if not isinstance(every, bool):
        raise InvalidArgument("all", "must be true or false")
    task_ids = body.get("task_ids", [])
    if not isinstance(task_ids, list) or not all(isinstance(t, str) for t in task_ids):
        raise InvalidArgument("task_ids", "must be a list of task ids")
    if every and task_ids:
        raise InvalidArgument("task_ids", "name tasks or set all, not both")
    return task_ids, every
