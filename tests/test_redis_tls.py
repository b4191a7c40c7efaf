"""The broker on a real redis-server that takes TLS only from verified clients, as an ACL user
limited to the broker's keys (`~tb:*`), its Pub/Sub channels (`&tb:*`) and the commands it uses:
the minimal ACL that docs/security.md gives. A task runs through producer and worker, and Redis's
ACL LOG shows that nothing the broker did was denied."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Final

import pytest
import redis

from taskbroker import Client, NewTask, RateLimit, TaskContext, TaskState, Worker, chord, handler
from tests.conftest import TEST_SETTINGS, start_broker
from tests.support.certs import make_ca
from tests.support.redis_server import RedisServer, free_port

SECRET: Final = "acl-Pa55word"
#: The ACL of docs/security.md ("Redis over TLS, as an ACL user"), word for word.
BROKER_ACL: Final = (
    "on resetkeys ~tb:* resetchannels &tb:* -@all "
    "+ping +info +config|get +time "
    "+evalsha +script|load +publish +subscribe +unsubscribe "
    "+get +set +del +exists "
    "+hget +hmget +hgetall +hset +hdel +hincrby "
    "+sadd +srem +smembers +scard +sscan "
    "+zadd +zrem +zrange +zcard +zscore +zpopmin "
    "+xadd +xrange +xrevrange +xlen +xdel +xtrim +sismember +srandmember "
    "+rename +copy +persist +pexpire +multi +exec"
)


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[tuple[RedisServer, str]]:
    """redis-server with a TLS port requiring client certificates, and a user `taskbroker`
    holding BROKER_ACL. Its plaintext port (on loopback) is left for the fixture itself to
    start, watch and read ACL LOG; the broker uses only the TLS port. Returns the server and
    the broker's rediss:// URL."""
    ca = make_ca(tmp_path / "ca")
    server_pair = ca.issue_server(tmp_path / "redis")
    client_cert, client_key = ca.issue_client(tmp_path / "broker", "taskbroker")
    tls_port = free_port()
    args = [
        "--tls-port", str(tls_port),
        "--tls-cert-file", str(server_pair.cert),
        "--tls-key-file", str(server_pair.key),
        "--tls-ca-cert-file", str(ca.cert),
        "--tls-auth-clients", "yes",
        "--user", "taskbroker", *f"{BROKER_ACL} >{SECRET}".split(),
    ]  # fmt: skip
    url = (
        f"rediss://taskbroker:{SECRET}@localhost:{tls_port}/0?ssl_ca_certs={ca.cert}"
        f"&ssl_certfile={client_cert}&ssl_keyfile={client_key}"
    )
    with RedisServer(extra_args=args) as server:
        yield server, url


@handler("double")
async def double(ctx: TaskContext, payload: bytes) -> bytes:
    return payload * 2


def acl_denials(server: RedisServer) -> list[str]:
    admin = redis.Redis(host="127.0.0.1", port=server.port, decode_responses=True)
    try:
        entries = admin.acl_log()
    finally:
        admin.close()
    return [f"{e['reason']}: {e['object']} ({e['context']})" for e in entries]


async def test_a_task_runs_through_redis_over_tls_as_a_least_privilege_user(
    tls_redis: tuple[RedisServer, str],
) -> None:
    server, url = tls_redis
    running = await start_broker(replace(TEST_SETTINGS, redis_url=url))
    try:
        async with Client(running.target) as client:
            task_id = await client.enqueue("tls-redis", "double", b"ab")
            worker = Worker(client, queues=["tls-redis"], handlers=[double], worker_id="w")
            assert await worker.run_until_idle() == 1
            task = await client.get_task(task_id)
            assert (task.state, task.result) == (TaskState.SUCCEEDED, b"abab")
            (stats,) = await client.stats("tls-redis")
            assert stats.succeeded_total == 1
            assert "tls-redis" in await client.queues()
            # The admin side and the other scripts: pause, resume, cancel, dead letters.
            await client.pause("tls-redis")
            await client.resume("tls-redis")
            later = await client.enqueue("tls-redis", "double", b"x", delay=timedelta(hours=1))
            assert (await client.cancel(later)).state is TaskState.CANCELLED
            doomed = await client.enqueue("tls-redis", "no-handler", b"", max_attempts=1)
            await worker.run_until_idle()
            assert (await client.get_task(doomed)).state is TaskState.DEAD
            assert await client.redrive("tls-redis", all=True) == 1
            # Limits and group keys, and a stream trimmed below its head (one of three taken).
            await client.update_queue_settings(
                "tls-redis", rate_limit=RateLimit(1000), max_concurrency=5,
                per_key_max_concurrency=1,
            )  # fmt: skip
            for key in ("a", "b", None):
                await client.enqueue("tls-redis", "double", b"k", group_key=key)
            await client.enqueue_many(NewTask("tls-redis", "double", b"f") for _ in range(3))
            one = Worker(client, queues=["tls-redis"], handlers=[double], concurrency=1)
            assert await one.run_until_idle() == 7  # the redriven task and these six
            (stats,) = await client.stats("tls-redis")
            assert stats.pending == 0
            # A workflow: links, ends, the outbox mover, a watched wait.
            flow = await client.enqueue_workflow(
                chord(
                    [NewTask("tls-redis", "double", b"p") for _ in range(2)],
                    NewTask("tls-redis", "double", b"c"),
                )
            )
            assert await one.run_until_idle() == 3
            assert (await client.wait(flow.last, timeout=10)).state is TaskState.SUCCEEDED
    finally:
        await running.close()
    # The ACL allowed all of it (a missing command would show here, and fail the task above).
    assert acl_denials(server) == []


async def test_the_acl_user_cannot_touch_keys_or_channels_outside_tb(
    tls_redis: tuple[RedisServer, str],
) -> None:
    _, url = tls_redis
    user = redis.Redis.from_url(url)
    try:
        user.set("tb:probe", "1")  # its own prefix: allowed
        with pytest.raises(redis.exceptions.NoPermissionError):
            user.set("other-app:key", "1")
        with pytest.raises(redis.exceptions.NoPermissionError):
            user.publish("other-channel", "x")
        with pytest.raises(redis.exceptions.NoPermissionError):
            user.flushall()
    finally:
        user.close()
    # Without a client certificate the TLS port refuses the connection.
    no_cert = url.split("&ssl_certfile=")[0]
    with pytest.raises(redis.exceptions.ConnectionError):
        redis.Redis.from_url(no_cert).ping()


def test_docs_give_exactly_this_acl() -> None:
    page = (Path(__file__).resolve().parents[1] / "docs" / "security.md").read_text()
    documented = BROKER_ACL.replace("on ", "on >PASSWORD ", 1)
    assert f"user taskbroker {documented}\n" in page
