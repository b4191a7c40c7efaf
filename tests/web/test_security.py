"""The HTTP side's guards: the Host allow-list, the /metrics token, and with a policy file the
dashboard's login, session cookie, CSRF token and roles, over real HTTP against a real broker."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from http.cookies import SimpleCookie
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import aiohttp
import grpc
import pytest
import redis

from broker.auth.tokens import new_token, policy_entry
from broker.config import Settings
from broker.store.keys import WEB_SESSION_PREFIX
from taskbroker.v1 import broker_service_pb2_grpc
from tests.auth.conftest import bearer
from tests.conftest import RunningBroker, start_broker
from tests.support.audit import audit_entries
from tests.support.tasks import enqueue, spec
from tests.web.conftest import base_url, make_dead

if TYPE_CHECKING:
    from taskbroker.v1.broker_service_pb2_grpc import BrokerServiceAsyncStub

TOKENS = {name: new_token() for name in ("ops", "billing", "viewer")}
GRANTS = """
[[grants]]
principals = ["ops"]
roles = ["read", "admin", "produce", "consume"]
queues = ["*"]

[[grants]]
principals = ["billing"]
roles = ["read", "admin"]
queues = ["billing-*"]

[[grants]]
principals = ["viewer"]
roles = ["read"]
queues = ["billing-*"]
"""


def write_policy(path: Path, tokens: dict[str, str] = TOKENS) -> None:
    path.write_text("".join(policy_entry(n, t) for n, t in tokens.items()) + GRANTS)


@dataclass
class Dashboard:
    running: RunningBroker
    policy: Path

    @property
    def url(self) -> str:
        return base_url(self.running)

    def session(self) -> aiohttp.ClientSession:
        # unsafe: keep cookies for an IP address host (127.0.0.1), as a browser does.
        return aiohttp.ClientSession(base_url=self.url, cookie_jar=aiohttp.CookieJar(unsafe=True))

    async def login(self, http: aiohttp.ClientSession, name: str) -> str:
        """Logs in as `name`; returns the session's CSRF token."""
        async with http.post("/api/login", json={"token": TOKENS[name]}) as response:
            assert response.status == 200, await response.text()
            body = await response.json()
        assert body["principal"] == name
        return str(body["csrf_token"])


@pytest.fixture
async def dashboard(settings: Settings, tmp_path: Path) -> AsyncIterator[Dashboard]:
    policy = tmp_path / "policy.toml"
    write_policy(policy)
    running = await start_broker(settings, dashboard_admin=True, policy_file=policy)
    yield Dashboard(running, policy)
    await running.close()


async def status_and_body(response: aiohttp.ClientResponse) -> tuple[int, Any]:
    return response.status, await response.json(content_type=None)


async def test_without_a_session_the_page_sends_to_login_and_the_api_says_401(
    dashboard: Dashboard,
) -> None:
    async with dashboard.session() as http:
        async with http.get("/", allow_redirects=False) as response:
            assert (response.status, response.headers["Location"]) == (303, "/login")
        async with http.get("/api/queues") as response:
            status, body = await status_and_body(response)
            assert (status, body["error"]["status"]) == (401, "UNAUTHENTICATED")
        for public in ("/login", "/static/login.js", "/static/style.css"):
            async with http.get(public) as response:
                assert response.status == 200, public


async def test_login_sets_a_strict_httponly_cookie_kept_in_redis_and_logout_ends_it(
    dashboard: Dashboard, redis_client: redis.Redis
) -> None:
    async with dashboard.session() as http:
        async with http.post("/api/login", json={"token": TOKENS["ops"]}) as response:
            assert response.status == 200
            cookie = SimpleCookie(response.headers["Set-Cookie"])["tb_session"]
            csrf = (await response.json())["csrf_token"]
        assert cookie["httponly"] and cookie["samesite"] == "Strict" and cookie["path"] == "/"
        assert not cookie["secure"]  # plain HTTP here; Secure is set when served over TLS
        keys = cast(list[bytes], redis_client.keys(WEB_SESSION_PREFIX + "*"))
        assert len(keys) == 1 and cookie.value not in keys[0].decode()  # stored by digest
        assert 0 < redis_client.ttl(keys[0]) <= 8 * 3600
        assert TOKENS["ops"].encode() not in cast(bytes, redis_client.get(keys[0]))

        async with http.get("/api/info") as response:
            info = await response.json()
        assert info == {
            "admin_enabled": True,
            "principal": "ops",
            "csrf_token": csrf,
            "audit_visible": True,
        }
        async with http.post("/api/logout", json={}, headers={"X-CSRF-Token": csrf}) as response:
            assert response.status == 200
        assert redis_client.keys(WEB_SESSION_PREFIX + "*") == []
    # The old cookie, replayed, opens nothing.
    async with dashboard.session() as http:
        headers = {"Cookie": f"tb_session={cookie.value}"}
        async with http.get("/api/queues", headers=headers) as response:
            assert response.status == 401


async def test_a_wrong_token_is_401_and_recorded_without_the_token(
    dashboard: Dashboard, redis_client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    wrong = new_token()
    async with dashboard.session() as http:
        async with http.post("/api/login", json={"token": wrong}) as response:
            status, body = await status_and_body(response)
        assert (status, body["error"]["status"]) == (401, "UNAUTHENTICATED")
        assert "Set-Cookie" not in response.headers
    await dashboard.running.broker.audit.flush()
    record = audit_entries(redis_client, newest_first=True)[0]
    assert record[b"action"] == b"dashboard.login" and record[b"outcome"] == b"UNAUTHENTICATED"
    assert b"peer=127.0.0.1" in record[b"detail"]
    everything = str(audit_entries(redis_client)) + caplog.text
    assert wrong not in everything


async def test_a_post_without_the_session_csrf_token_is_refused(
    dashboard: Dashboard, redis_client: redis.Redis
) -> None:
    async with ops_stub(dashboard) as stub:
        await enqueue(stub, spec("billing-a"))
    async with dashboard.session() as http:
        csrf = await dashboard.login(http, "ops")
        for headers in ({}, {"X-CSRF-Token": "forged"}):
            async with http.post("/api/queues/billing-a/pause", json={}, headers=headers) as r:
                assert r.status == 403
        stats = await dashboard.running.broker.tasks.stats(["billing-a"])
        assert not stats[0].paused
        async with http.post(
            "/api/queues/billing-a/pause", json={}, headers={"X-CSRF-Token": csrf}
        ) as response:
            assert response.status == 200
    stats = await dashboard.running.broker.tasks.stats(["billing-a"])
    assert stats[0].paused
    newest = audit_entries(redis_client, newest_first=True)[0]
    assert (newest[b"principal"], newest[b"action"]) == (b"ops", b"dashboard.pause")


async def test_roles_filter_the_views_and_gate_the_actions(
    dashboard: Dashboard, redis_client: redis.Redis
) -> None:
    async with ops_stub(dashboard) as stub:
        (hr_task,) = await make_dead(stub, "hr-payroll", 1)
        (billing_task,) = await enqueue(stub, spec("billing-a"))
    assert (await stub_dead_count(dashboard, "hr-payroll")) == 1
    async with dashboard.session() as http:
        csrf = await dashboard.login(http, "viewer")
        async with http.get("/api/info") as response:
            info = await response.json()
        assert (info["admin_enabled"], info["audit_visible"]) == (False, False)
        async with http.get("/api/queues") as response:
            queues = await response.json()
        assert [q["queue"] for q in queues["queues"]] == ["billing-a"]
        assert (queues["queue_count"], queues["all_queues"]["counts"]["dead"]) == (1, 0)
        async with http.get("/api/history") as response:
            assert (await response.json()) == {"points": []}  # the charts sum every queue
        async with http.get(f"/api/tasks/{billing_task}") as response:
            assert response.status == 200
        for path in (f"/api/tasks/{hr_task}", "/api/queues/hr-payroll/dead", "/api/audit"):
            async with http.get(path) as response:
                status, body = await status_and_body(response)
                assert (status, body["error"]["status"]) == (403, "PERMISSION_DENIED"), path
        headers = {"X-CSRF-Token": csrf}
        async with http.post("/api/queues/billing-a/pause", json={}, headers=headers) as r:
            status, body = await status_and_body(r)
        assert status == 403 and "needs role 'admin'" in body["error"]["message"]

    async with dashboard.session() as http:
        csrf = await dashboard.login(http, "billing")
        headers = {"X-CSRF-Token": csrf}
        async with http.post(
            "/api/queues/hr-payroll/dead/delete", json={"all": True}, headers=headers
        ) as r:
            assert r.status == 403
        async with http.post("/api/queues/billing-a/pause", json={}, headers=headers) as r:
            assert r.status == 200
    assert (await stub_dead_count(dashboard, "hr-payroll")) == 1

    async with dashboard.session() as http:
        await dashboard.login(http, "ops")
        async with http.get("/api/queues") as response:
            queues = await response.json()
        assert [q["queue"] for q in queues["queues"]] == ["billing-a", "hr-payroll"]
        async with http.get("/api/audit") as response:
            records = (await response.json())["records"]
    await dashboard.running.broker.audit.flush()
    denials = [
        (e[b"principal"], e[b"action"], e[b"target"])
        for e in audit_entries(redis_client)
        if e[b"outcome"] == b"PERMISSION_DENIED"
    ]
    assert (b"viewer", b"dashboard.pause", b"billing-a") in denials
    assert (b"billing", b"dashboard.delete", b"hr-payroll") in denials
    assert ("billing", "dashboard.pause", "ok") in {
        (r["principal"], r["action"], r["outcome"]) for r in records
    }


@contextlib.asynccontextmanager
async def ops_stub(dashboard: Dashboard) -> AsyncIterator[BrokerServiceAsyncStub]:
    """A gRPC stub calling as "ops" (the broker asks every call for a token under a policy)."""
    target = dashboard.running.target
    async with grpc.aio.insecure_channel(target, interceptors=bearer(TOKENS["ops"])) as channel:
        yield broker_service_pb2_grpc.BrokerServiceStub(channel)


async def stub_dead_count(dashboard: Dashboard, queue: str) -> int:
    (stats,) = await dashboard.running.broker.tasks.stats([queue])
    return stats.dead


async def test_a_token_rotated_out_of_the_policy_ends_its_sessions(dashboard: Dashboard) -> None:
    async with dashboard.session() as http:
        await dashboard.login(http, "viewer")
        async with http.get("/api/queues") as response:
            assert response.status == 200
        write_policy(dashboard.policy, TOKENS | {"viewer": new_token()})
        await asyncio.sleep(1.1)  # the policy file is looked at once a second
        async with http.get("/api/queues") as response:
            assert response.status == 401


async def test_a_rebinding_host_is_refused_everywhere_but_healthz(running: RunningBroker) -> None:
    port = running.broker.http_port
    async with aiohttp.ClientSession(base_url=base_url(running)) as http:
        for path in ("/", "/api/queues", "/api/info", "/metrics", "/static/app.js"):
            async with http.get(path, headers={"Host": f"evil.example:{port}"}) as response:
                assert response.status == 421, path
        async with http.post(
            "/api/queues/emails/pause", json={}, headers={"Host": f"evil.example:{port}"}
        ) as response:
            assert response.status == 421
        async with http.get("/healthz", headers={"Host": f"10.1.2.3:{port}"}) as response:
            assert response.status == 200  # probes reach the pod by its address
        for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", "LOCALHOST"):
            async with http.get("/api/queues", headers={"Host": host}) as response:
                assert response.status == 200, host


async def test_the_allowed_hosts_are_configurable(settings: Settings) -> None:
    running = await start_broker(settings, http_allowed_hosts="dash.example.com, ops.internal")
    try:
        async with aiohttp.ClientSession(base_url=base_url(running)) as http:
            for host, status in [("dash.example.com", 200), ("ops.internal:8080", 200),
                                 ("127.0.0.1", 421)]:  # fmt: skip
                async with http.get("/api/queues", headers={"Host": host}) as response:
                    assert response.status == status, host
    finally:
        await running.close()


async def test_metrics_can_require_its_own_token(settings: Settings, tmp_path: Path) -> None:
    token_file = tmp_path / "metrics-token"
    token_file.write_text("scrape-secret-123\n")
    running = await start_broker(settings, metrics_token_file=token_file)
    try:
        async with aiohttp.ClientSession(base_url=base_url(running)) as http:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic x"}):
                async with http.get("/metrics", headers=headers) as response:
                    assert response.status == 401
                    assert response.headers["WWW-Authenticate"] == "Bearer"
                    assert "scrape-secret-123" not in await response.text()
            good = {"Authorization": "Bearer scrape-secret-123", "Host": "10.1.2.3:8080"}
            async with http.get("/metrics", headers=good) as response:
                assert response.status == 200
                assert "taskbroker_" in await response.text()
    finally:
        await running.close()
