"""The Node.js client over TLS and mutual TLS, and its bearer token (src/credentials.js): a
Node producer and a Node worker round-trip a task through a broker that requires client
certificates, and the token reaches unary calls and the Lease stream."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest

from tests.conftest import RunningBroker
from tests.interop.node_process import NODE, NODE_DIR, QUEUE, WAIT_S, NodeWorker
from tests.support.tls import ENQUEUE, LEASE, Pki, Recorder

pytestmark = pytest.mark.skipif(
    NODE is None, reason="node is not installed: the Node.js interop tests need it on PATH"
)


async def produce(node: str, target: str, env: dict[str, str], *args: str) -> tuple[int, str]:
    """Runs `node bin/produce.js`; returns its exit code and its output (stdout, then stderr)."""
    process = await asyncio.create_subprocess_exec(
        node, "bin/produce.js", "--target", target, "--queue", QUEUE, *args,
        cwd=NODE_DIR, stdin=asyncio.subprocess.DEVNULL, env={**os.environ, **env},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), WAIT_S)
    assert process.returncode is not None
    return process.returncode, (out + err).decode(errors="replace")


@pytest.fixture
def mtls_env(pki: Pki) -> dict[str, str]:
    cert, key = pki.ca.issue_client(pki.directory / "clients", "node-client")
    return {
        "TASKBROKER_TLS_CA": str(pki.ca.cert),
        "TASKBROKER_TLS_CLIENT_CERT": str(cert),
        "TASKBROKER_TLS_CLIENT_KEY": str(key),
        "TASKBROKER_TOKEN": "node-token",
    }


async def test_node_producer_and_worker_over_mtls(
    node: str, mtls_broker: RunningBroker, mtls_env: dict[str, str], tmp_path: Path
) -> None:
    target = f"localhost:{mtls_broker.broker.port}"
    worker = await NodeWorker.start(node, target, tmp_path / "worker.log", env=mtls_env)
    try:
        args = ("--type", "upper", "--payload", "tls", "--wait")
        code, out = await produce(node, target, mtls_env, *args)
        assert code == 0, out
        line = json.loads(out.splitlines()[0])
        assert (line["state"], line["result"]) == ("TASK_STATE_SUCCEEDED", "TLS")
    finally:
        await worker.close()
    # Without a client certificate the broker refuses the handshake.
    env = {**mtls_env, "TASKBROKER_TLS_CLIENT_CERT": "", "TASKBROKER_TLS_CLIENT_KEY": ""}
    code, out = await produce(node, target, env, "--type", "upper")
    assert code == 1 and "(code 14)" in out  # UNAVAILABLE


async def test_node_sends_the_token_on_calls_and_the_lease_stream(
    node: str, recorder: tuple[Recorder, int], tmp_path: Path
) -> None:
    handler, port = recorder
    target = f"127.0.0.1:{port}"
    env = {"TASKBROKER_TOKEN": "node-secret"}
    code, out = await produce(node, target, env, "--type", "t")
    assert code == 1 and "node-secret" not in out
    worker = await NodeWorker.start(node, target, tmp_path / "worker.log", env=env)
    try:
        assert await worker.wait_exit() == 1  # UNAUTHENTICATED on open: no retry
    finally:
        await worker.close()
    assert (ENQUEUE, "Bearer node-secret") in handler.seen
    assert (LEASE, "Bearer node-secret") in handler.seen
    assert "node-secret" not in worker.text()


async def test_node_refuses_to_send_a_token_in_the_clear_to_another_host(node: str) -> None:
    code, out = await produce(node, "10.0.0.9:50051", {"TASKBROKER_TOKEN": "x"}, "--type", "t")
    assert code == 2 and "only over TLS" in out
