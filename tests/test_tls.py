"""TLS and mutual TLS on both ports of an in-process broker: handshakes, refusals, certificate
rotation without a restart, and the SDK's producer and worker over TLS."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from broker.config import Settings
from broker.tls import CertificateFiles, TlsError
from taskbroker import (
    Client,
    TaskContext,
    TaskState,
    TlsConfig,
    UnavailableError,
    Worker,
    handler,
)
from tests.conftest import RunningBroker, start_broker
from tests.support.certs import CertPair
from tests.support.tls import Pki


def peer_common_name(
    port: int, ca: Path, client: tuple[Path, Path] | None = None, grpc_port: bool = True
) -> str:
    """Handshakes with the port and returns the common name of the certificate it presents."""
    context = ssl.create_default_context(cafile=str(ca))
    if client is not None:
        context.load_cert_chain(*client)
    if grpc_port:
        context.set_alpn_protocols(["h2"])  # gRPC insists on HTTP/2
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as sock,
        context.wrap_socket(sock, server_hostname="localhost") as tls,
    ):
        cert = tls.getpeercert()
    assert cert is not None
    names = [attr[1] for rdn in cert["subject"] for attr in rdn if attr[0] == "commonName"]
    return str(names[0])


async def health(channel: grpc.aio.Channel) -> int:
    reply = await health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(), timeout=5
    )
    return int(reply.status)


def tls_channel(port: int, ca: Path, client: tuple[Path, Path] | None = None) -> grpc.aio.Channel:
    key, cert = (client[1].read_bytes(), client[0].read_bytes()) if client else (None, None)
    credentials = grpc.ssl_channel_credentials(ca.read_bytes(), key, cert)
    return grpc.aio.secure_channel(f"localhost:{port}", credentials)


def rotate(pair: CertPair, new: CertPair) -> None:
    """Overwrites the served files in place, as a secret update or cert renewal does."""
    shutil.copyfile(new.key, pair.key)
    shutil.copyfile(new.cert, pair.cert)


# --- gRPC -----------------------------------------------------------------------------------


async def test_grpc_serves_tls_and_refuses_a_plaintext_client(
    tls_broker: RunningBroker, pki: Pki
) -> None:
    port = tls_broker.broker.port
    async with tls_channel(port, pki.ca.cert) as channel:
        assert await health(channel) == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await health(tls_broker.channel)  # the fixture's plaintext channel
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_mtls_refuses_clients_without_a_certificate_or_with_a_foreign_one(
    mtls_broker: RunningBroker, pki: Pki
) -> None:
    port = mtls_broker.broker.port
    good = pki.ca.issue_client(pki.directory / "clients", "worker-a")
    foreign = pki.other_ca.issue_client(pki.directory / "clients", "intruder")
    async with tls_channel(port, pki.ca.cert, good) as channel:
        assert await health(channel) == health_pb2.HealthCheckResponse.SERVING
    for client in (None, foreign):
        async with tls_channel(port, pki.ca.cert, client) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await health(channel)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_a_rotated_certificate_is_served_on_the_next_handshake_of_both_ports(
    mtls_broker: RunningBroker, pki: Pki
) -> None:
    broker = mtls_broker.broker
    client = pki.ca.issue_client(pki.directory / "clients", "worker-a")
    for port, is_grpc in ((broker.port, True), (broker.http_port, False)):
        name = await asyncio.to_thread(peer_common_name, port, pki.ca.cert, client, is_grpc)
        assert name == "taskbroker"

    renewed = pki.ca.issue_server(pki.directory / "renewed", common_name="taskbroker-renewed")
    rotate(pki.server, renewed)
    for port, is_grpc in ((broker.port, True), (broker.http_port, False)):
        name = await asyncio.to_thread(peer_common_name, port, pki.ca.cert, client, is_grpc)
        assert name == "taskbroker-renewed"
    # A connection opened after the rotation still works end to end.
    async with tls_channel(broker.port, pki.ca.cert, client) as channel:
        assert await health(channel) == health_pb2.HealthCheckResponse.SERVING


async def test_a_broken_rotation_keeps_the_certificate_in_use(
    tls_broker: RunningBroker, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    port = tls_broker.broker.port
    other = pki.ca.issue_server(pki.directory / "other", common_name="mismatched")
    shutil.copyfile(other.key, pki.server.key)  # the key changed, the certificate not yet
    assert await asyncio.to_thread(peer_common_name, port, pki.ca.cert) == "taskbroker"
    assert "TLS files not reloaded" in caplog.text
    shutil.copyfile(other.cert, pki.server.cert)  # now both: the pair is served
    assert await asyncio.to_thread(peer_common_name, port, pki.ca.cert) == "mismatched"


# --- HTTP -----------------------------------------------------------------------------------


def get(url: str, context: ssl.SSLContext | None) -> bytes:
    with urllib.request.urlopen(url, timeout=5, context=context) as response:
        return bytes(response.read())


async def test_http_serves_healthz_over_tls_only(tls_broker: RunningBroker, pki: Pki) -> None:
    url = f"https://localhost:{tls_broker.broker.http_port}/healthz"
    context = ssl.create_default_context(cafile=str(pki.ca.cert))
    assert b'"serving"' in await asyncio.to_thread(get, url, context)
    plain = url.replace("https:", "http:")
    with pytest.raises(OSError):  # the server answers a plaintext request with a TLS alert
        await asyncio.to_thread(get, plain, None)


async def test_http_with_a_client_ca_requires_a_client_certificate(
    mtls_broker: RunningBroker, pki: Pki
) -> None:
    url = f"https://localhost:{mtls_broker.broker.http_port}/healthz"
    foreign = pki.other_ca.issue_client(pki.directory / "clients", "intruder")
    for client in (None, foreign):
        context = ssl.create_default_context(cafile=str(pki.ca.cert))
        if client is not None:
            context.load_cert_chain(*client)
        # TLS 1.3: the client's handshake ends before the server checks its certificate, so
        # the refusal (an alert) arrives on the first read.
        with pytest.raises(OSError):
            await asyncio.to_thread(get, url, context)
    context = ssl.create_default_context(cafile=str(pki.ca.cert))
    context.load_cert_chain(*pki.ca.issue_client(pki.directory / "clients", "viewer"))
    assert b'"serving"' in await asyncio.to_thread(get, url, context)


# --- start-up errors ------------------------------------------------------------------------


def test_unusable_files_are_named_in_a_clear_error(pki: Pki) -> None:
    other = pki.ca.issue_server(pki.directory / "other")
    missing = pki.directory / "missing.pem"
    cases = [
        (pki.server.cert, missing, None, f"cannot read tls_key {missing}"),
        (pki.server.cert, other.key, None, "do not load together: key values mismatch"),
        (pki.server.key, pki.server.key, None, "do not load together"),
        (pki.server.cert, pki.server.key, pki.server.key, "tls_client_ca"),
    ]
    for cert, key, client_ca, message in cases:
        with pytest.raises(TlsError, match=message) as error:
            CertificateFiles(cert, key, client_ca)
        assert "PRIVATE KEY" not in str(error.value)


async def test_the_broker_refuses_to_start_with_a_mismatched_key(
    settings: Settings, pki: Pki
) -> None:
    other = pki.ca.issue_server(pki.directory / "other")
    with pytest.raises(TlsError, match="do not load together"):
        await start_broker(settings, tls_cert=pki.server.cert, tls_key=other.key)


# --- the SDK --------------------------------------------------------------------------------


@handler("shout")
async def shout(ctx: TaskContext, payload: bytes) -> bytes:
    return payload.upper()


async def round_trip(client: Client) -> None:
    task_id = await client.enqueue("tls", "shout", b"over tls")
    worker = Worker(client, queues=["tls"], handlers=[shout], worker_id="tls-worker")
    assert await worker.run_until_idle() == 1
    task = await client.get_task(task_id)
    assert (task.state, task.result) == (TaskState.SUCCEEDED, b"OVER TLS")


async def test_sdk_producer_and_worker_round_trip_a_task_over_tls(
    tls_broker: RunningBroker, pki: Pki
) -> None:
    tls = TlsConfig(ca_file=pki.ca.cert)
    async with Client(f"localhost:{tls_broker.broker.port}", tls=tls) as client:
        await round_trip(client)


async def test_sdk_over_mtls_with_a_server_name_override(
    mtls_broker: RunningBroker, pki: Pki
) -> None:
    # The certificate names localhost and 127.0.0.1 only: dialling 127.0.0.1 while verifying
    # "localhost" is what a client behind a proxy or with an IP target does.
    cert, key = pki.ca.issue_client(pki.directory / "clients", "worker-a")
    tls = TlsConfig(ca_file=pki.ca.cert, cert_file=cert, key_file=key, server_name="localhost")
    target = f"127.0.0.1:{mtls_broker.broker.port}"
    async with Client(target, tls=tls, token="a-token-the-broker-ignores-for-now") as client:
        await round_trip(client)
    async with Client(
        f"127.0.0.1:{mtls_broker.broker.port}", tls=TlsConfig(ca_file=pki.ca.cert), timeout=2
    ) as client:
        with pytest.raises(UnavailableError):
            await client.enqueue("tls", "shout", b"no client certificate")


# --- the CLI --------------------------------------------------------------------------------


async def run_cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("TASKBROKER_")}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "taskbroker.cli",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**clean, **(env or {})},
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


async def test_cli_over_mtls_with_files_from_flags_and_environment(
    mtls_broker: RunningBroker, pki: Pki
) -> None:
    target = f"localhost:{mtls_broker.broker.port}"
    cert, key = pki.ca.issue_client(pki.directory / "clients", "operator")
    env = {
        "TASKBROKER_TLS_CLIENT_CERT": str(cert),
        "TASKBROKER_TLS_CLIENT_KEY": str(key),
        "TASKBROKER_TOKEN": "cli-token-not-logged",
    }
    code, out, err = await run_cli(
        "--target", target, "--tls-ca", str(pki.ca.cert), "--json", "enqueue", "ops", "t", env=env
    )
    assert code == 0, err
    (task_id,) = json.loads(out)["task_ids"]
    assert task_id.startswith("ops:")
    code, out, err = await run_cli("--target", target, "--json", "stats", "ops", env=env)
    assert code == 1 and "unavailable" in err  # plaintext to a TLS port
    code, out, err = await run_cli(
        "--target", target, "--tls-ca", str(pki.directory / "nope.pem"), "stats", env=env
    )
    assert code == 1 and "cannot read TLS CA file" in err and "Traceback" not in err
    assert "cli-token-not-logged" not in out + err


# --- the broker process ---------------------------------------------------------------------


def broker_process(
    tmp_path: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("TASKBROKER_")}
    clean |= {"TASKBROKER_DATA_DIR": str(tmp_path / "data"), "TASKBROKER_HTTP_LISTEN": ""}
    return subprocess.Popen(
        [sys.executable, "-m", "broker", *args],
        env={**clean, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_the_broker_refuses_a_reachable_address_without_tls_and_policy(tmp_path: Path) -> None:
    process = broker_process(tmp_path, "--listen", "0.0.0.0:0")
    output, _ = process.communicate(timeout=30)
    assert process.returncode == 2
    assert "0.0.0.0:0 can be reached from other hosts" in output
    assert "--insecure" in output and "Traceback" not in output


def test_insecure_starts_on_a_reachable_address_and_warns(tmp_path: Path) -> None:
    process = broker_process(tmp_path, "--listen", "0.0.0.0:0", "--insecure")
    lines: list[str] = []
    try:
        assert process.stdout is not None
        for line in process.stdout:
            lines.append(line)
            if "taskbroker serving on" in line:
                break
        assert any("WARNING" in line and "INSECURE" in line for line in lines), lines
        assert any("taskbroker serving on 0.0.0.0:" in line for line in lines), lines
    finally:
        process.send_signal(signal.SIGTERM)  # maybe before its handler is in: no exit code check
        process.communicate(timeout=30)


def test_the_broker_process_names_a_mismatched_key_and_exits(tmp_path: Path, pki: Pki) -> None:
    other = pki.ca.issue_server(pki.directory / "other")
    args = ("--tls-cert", str(pki.server.cert), "--tls-key", str(other.key))
    process = broker_process(tmp_path, *args)
    output, _ = process.communicate(timeout=30)
    assert process.returncode == 2
    assert "cannot start" in output and "do not load together" in output
    assert "Traceback" not in output and "embedded redis-server" not in output


async def test_a_changed_client_ca_is_picked_up_on_both_ports(
    mtls_broker: RunningBroker, pki: Pki
) -> None:
    """The broker's tls_client_ca is pki.ca.cert; appending another CA to it admits that CA's
    clients from the next handshake on."""
    broker = mtls_broker.broker
    newcomer = pki.other_ca.issue_client(pki.directory / "clients", "newcomer")
    trust = pki.directory / "trust.crt"  # what the client verifies the broker with: unchanged
    shutil.copyfile(pki.ca.cert, trust)
    context = ssl.create_default_context(cafile=str(trust))
    context.load_cert_chain(*newcomer)
    url = f"https://localhost:{broker.http_port}/healthz"
    with pytest.raises(OSError):
        await asyncio.to_thread(get, url, context)
    pki.ca.cert.write_bytes(trust.read_bytes() + pki.other_ca.cert.read_bytes())
    assert b'"serving"' in await asyncio.to_thread(get, url, context)
    async with tls_channel(broker.port, trust, newcomer) as channel:
        assert await health(channel) == health_pb2.HealthCheckResponse.SERVING
