"""`python -m broker.healthcheck` (the image's HEALTHCHECK): 0 only on SERVING, else 1, quickly."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import time
from dataclasses import replace

import pytest

from broker.healthcheck import check, default_target, main
from tests.conftest import TEST_SETTINGS, RunningBroker, start_broker
from tests.support.redis_server import RedisServer, free_port
from tests.support.tls import Pki


async def _run_module(*args: str, env: dict[str, str]) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "broker.healthcheck",
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await process.communicate()
    assert process.returncode is not None
    return process.returncode, output.decode()


async def test_a_serving_broker_is_healthy(running: RunningBroker) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKBROKER_")}
    code, output = await _run_module("--target", running.target, env=env)
    assert (code, output) == (0, f"{running.target}: SERVING\n")


async def test_the_target_defaults_to_the_listen_port_on_loopback(running: RunningBroker) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKBROKER_")}
    env["TASKBROKER_LISTEN"] = f"0.0.0.0:{running.broker.port}"
    code, output = await _run_module(env=env)
    assert (code, output) == (0, f"127.0.0.1:{running.broker.port}: SERVING\n")


async def test_a_broker_that_lost_redis_is_unhealthy() -> None:
    with RedisServer() as redis_server:
        running = await start_broker(replace(TEST_SETTINGS, redis_url=redis_server.url))
        try:
            assert await asyncio.to_thread(check, running.target) == (
                0,
                f"{running.target}: SERVING",
            )
            redis_server.kill()
            deadline = time.monotonic() + 10
            result = (0, "")
            while time.monotonic() < deadline:
                result = await asyncio.to_thread(check, running.target, timeout_s=1.0)
                if result[0] != 0:
                    break
                await asyncio.sleep(0.1)
            assert result == (1, f"{running.target}: NOT_SERVING")
        finally:
            await running.close()


def test_nothing_listening_is_unhealthy(capsys: pytest.CaptureFixture[str]) -> None:
    target = f"127.0.0.1:{free_port()}"
    assert main(["--target", target]) == 1
    assert capsys.readouterr().err == f"{target}: UNAVAILABLE\n"


def test_a_server_that_never_answers_is_unhealthy_within_the_timeout() -> None:
    # The kernel completes the TCP handshake from the backlog; nothing ever speaks HTTP/2.
    with socket.create_server(("127.0.0.1", 0)) as silent:
        target = f"127.0.0.1:{silent.getsockname()[1]}"
        started = time.monotonic()
        code, message = check(target, timeout_s=0.5)
        elapsed = time.monotonic() - started
    assert (code, message) == (1, f"{target}: DEADLINE_EXCEEDED")
    assert elapsed < 3


@pytest.mark.parametrize(
    ("listen", "target"),
    [
        (None, "127.0.0.1:50051"),
        ("0.0.0.0:6000", "127.0.0.1:6000"),
        (":6001", "127.0.0.1:6001"),
        ("[::]:6002", "[::1]:6002"),
        ("127.0.0.1:6003", "127.0.0.1:6003"),
        ("10.1.2.3:6004", "10.1.2.3:6004"),
    ],
)
def test_default_target(listen: str | None, target: str) -> None:
    environ = {} if listen is None else {"TASKBROKER_LISTEN": listen}
    assert default_target(environ) == target


async def test_a_tls_broker_is_checked_over_tls(tls_broker: RunningBroker, pki: Pki) -> None:
    target = f"127.0.0.1:{tls_broker.broker.port}"
    env = {
        "TASKBROKER_TLS_CERT": str(pki.server.cert),
        "TASKBROKER_TLS_KEY": str(pki.server.key),
        "TASKBROKER_TLS_CA": str(pki.ca.cert),
    }
    assert await asyncio.to_thread(check, target, environ=env) == (0, f"{target}: SERVING")
    # Plaintext (the broker's TLS not known) and an unknown CA both fail.
    assert (await asyncio.to_thread(check, target, environ={}))[0] == 1
    unknown = {**env, "TASKBROKER_TLS_CA": str(pki.other_ca.cert)}
    assert (await asyncio.to_thread(check, target, environ=unknown))[0] == 1
    missing = {**env, "TASKBROKER_TLS_CA": "/nonexistent/ca.crt"}
    code, message = await asyncio.to_thread(check, target, environ=missing)
    assert code == 1 and "cannot read TASKBROKER_TLS_CA /nonexistent/ca.crt" in message


async def test_a_mtls_broker_is_checked_with_a_client_certificate(
    mtls_broker: RunningBroker, pki: Pki
) -> None:
    target = f"127.0.0.1:{mtls_broker.broker.port}"
    cert, key = pki.ca.issue_client(pki.directory / "clients", "healthcheck")
    env = {
        "TASKBROKER_TLS_CERT": str(pki.server.cert),
        "TASKBROKER_TLS_KEY": str(pki.server.key),
        "TASKBROKER_TLS_CLIENT_CA": str(pki.ca.cert),
        "TASKBROKER_TLS_CA": str(pki.ca.cert),
        "TASKBROKER_TLS_SERVER_NAME": "localhost",
    }
    # The server certificate allows server authentication only: not accepted as a client's.
    assert (await asyncio.to_thread(check, target, environ=env))[0] == 1
    env |= {"TASKBROKER_TLS_CLIENT_CERT": str(cert), "TASKBROKER_TLS_CLIENT_KEY": str(key)}
    assert await asyncio.to_thread(check, target, environ=env) == (0, f"{target}: SERVING")
