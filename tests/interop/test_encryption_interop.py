"""Encrypted tasks across languages (docs/encryption.md): Python producer → broker → Node worker
and Node producer → broker → Python worker, with encrypted results read back, and the envelope
itself (the documented test vector, compression) checked between the two implementations.

The Node programs (`bin/worker.js`, `bin/produce.js`) take their keyring from
TASKBROKER_ENCRYPTION_KEYS, set here with monkeypatch before they start.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Final

import pytest

from taskbroker import AesGcmCodec, Client, Keyring, TaskContext, TaskState, Worker, handler
from taskbroker.encryption import CodecContext
from taskbroker.envelope import MAGIC, parse_header
from tests.conftest import RunningBroker
from tests.interop.node_process import NODE, NODE_DIR, QUEUE, WAIT_S, NodeWorker
from tests.interop.test_node_interop import produce

K1: Final = os.urandom(32)
K2: Final = os.urandom(32)
SECRET: Final = b"\x00card 4111 1111 1111 1111\xff"

pytestmark = pytest.mark.skipif(
    NODE is None, reason="node is not installed: the Node.js interop tests need it on PATH"
)


def ring_text(**keys: bytes) -> str:
    return ",".join(f"{key_id}={base64.b64encode(key).decode()}" for key_id, key in keys.items())


@pytest.fixture
def node_bin() -> str:
    assert NODE is not None
    if not (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir():
        pytest.fail("clients/node/node_modules is missing: run `make install`", pytrace=False)
    return NODE


@pytest.fixture
async def plain(running: RunningBroker) -> AsyncIterator[Client]:
    """What anyone reading the broker without a key sees."""
    async with Client(running.target) as client:
        yield client


@pytest.fixture
async def encrypted(running: RunningBroker) -> AsyncIterator[Client]:
    codec = AesGcmCodec(Keyring({"k1": K1, "k2": K2}), compress_min_bytes=64)
    async with Client(running.target, codec=codec) as client:
        yield client


async def start_node_worker(
    node: str, running: RunningBroker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, keys: str
) -> NodeWorker:
    monkeypatch.setenv("TASKBROKER_ENCRYPTION_KEYS", keys)
    return await NodeWorker.start(node, running.target, tmp_path / "node-worker.log")


def assert_envelope(value: bytes, key_id: str, *secrets: bytes) -> None:
    assert value.startswith(MAGIC) and parse_header(value).key_id == key_id
    for secret in secrets:
        assert secret not in value


async def test_python_producer_to_node_worker_encrypted(
    node_bin: str,
    running: RunningBroker,
    encrypted: Client,
    plain: Client,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    worker = await start_node_worker(
        node_bin, running, tmp_path, monkeypatch, ring_text(k1=K1, k2=K2)
    )
    try:
        echo = await encrypted.enqueue(QUEUE, "echo", SECRET)
        upper = await encrypted.enqueue(QUEUE, "upper", b"shout " * 50)  # zlib-compressed
        rejected = await encrypted.enqueue(QUEUE, "reject", SECRET, max_attempts=3)

        task = await encrypted.wait(echo, timeout=WAIT_S)
        assert (task.state, task.payload, task.result) == (TaskState.SUCCEEDED, SECRET, SECRET)
        task = await encrypted.wait(upper, timeout=WAIT_S)
        assert (task.state, task.result) == (TaskState.SUCCEEDED, b"SHOUT " * 50), worker.text()
        task = await encrypted.wait(rejected, timeout=WAIT_S)
        assert (task.state, task.attempt) == (TaskState.DEAD, 1)
    finally:
        await worker.close()

    stored = await plain.get_task(echo)
    assert_envelope(stored.payload, "k2", SECRET)
    assert_envelope(stored.result, "k2", SECRET)  # the Node worker encrypted the result
    assert parse_header((await plain.get_task(upper)).payload).compressed
    assert SECRET not in worker.log.read_bytes()


async def test_a_node_worker_without_the_key_dead_letters_the_task_naming_it(
    node_bin: str,
    running: RunningBroker,
    encrypted: Client,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    worker = await start_node_worker(node_bin, running, tmp_path, monkeypatch, ring_text(k1=K1))
    try:
        task_id = await encrypted.enqueue(QUEUE, "echo", SECRET, max_attempts=5)
        task = await encrypted.wait(task_id, timeout=WAIT_S)
    finally:
        await worker.close()
    assert (task.state, task.attempt) == (TaskState.DEAD, 1), worker.text()
    assert task.last_error.startswith("payload not decoded: ")
    assert "encrypted with key 'k2', which this keyring does not hold (it holds k1)" in (
        task.last_error
    )


@handler("greet")
async def greet(ctx: TaskContext, payload: bytes) -> bytes:
    return b"hello, " + payload


async def test_node_producer_to_python_worker_encrypted(
    node_bin: str,
    running: RunningBroker,
    encrypted: Client,
    plain: Client,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TASKBROKER_ENCRYPTION_KEYS", ring_text(k2=K2, k1=K1))  # k1 active
    worker = Worker(
        encrypted, queues=[QUEUE], handlers=[greet], shutdown_grace=timedelta(seconds=1)
    )
    async with worker:
        line = await produce(
            node_bin, running.target, "--type", "greet", "--payload", "node", "--wait"
        )

    # The Node producer read the result back and decrypted it; the Python reader does too.
    assert (line["state"], line["result"]) == ("TASK_STATE_SUCCEEDED", "hello, node")
    task_id = str(line["task_id"])
    task = await encrypted.get_task(task_id)
    assert (task.payload, task.result) == (b"node", b"hello, node")
    stored = await plain.get_task(task_id)
    assert_envelope(stored.payload, "k1", b"node")
    assert_envelope(stored.result, "k2", b"hello")  # the Python worker's active key


async def test_the_envelope_is_the_same_in_both_languages(node_bin: str) -> None:
    """Node decrypts the documented vector, Python decrypts what Node compressed, and both
    derive the same nonce for a payload with an idempotency key (so a resend from either
    language is a duplicate)."""
    script = """
        import { AesGcmCodec, Keyring } from './src/index.js';
        const ring = Keyring.parse(process.env.KEYS);
        const codec = new AesGcmCodec(ring, { compressMinBytes: 1 });
        const ctx = { purpose: 'payload', queue: 'billing', type: 'charge' };
        const vector = codec.decode(Buffer.from(process.env.VECTOR, 'hex'), ctx);
        const result = { purpose: 'result', queue: 'billing', type: 'charge', taskId: 'billing:X' };
        const sealed = codec.encode(Buffer.from('abc'.repeat(100)), result);
        const order = { ...ctx, idempotencyKey: 'order-1' };
        const derived = codec.encode(Buffer.from('{"amount":42}'), order);
        const hex = (buffer) => buffer.toString('hex');
        const line = { vector: `${vector}`, sealed: hex(sealed), derived: hex(derived) };
        console.log(JSON.stringify(line));
    """
    vector = (
        "895442450100026b31000102030405060708090a0b3c20b776aa90ac6faf7ba3b9cca62ba9bc139d"
        "832864aba888d04e0f07"
    )
    env = {**os.environ, "KEYS": ring_text(k1=bytes(range(32))), "VECTOR": vector}
    process = await asyncio.create_subprocess_exec(
        node_bin, "--input-type=module", "-e", script, cwd=NODE_DIR, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), WAIT_S)
    assert process.returncode == 0, err.decode(errors="replace")
    line = json.loads(out)

    assert line["vector"] == '{"amount":42}'
    sealed = bytes.fromhex(line["sealed"])
    assert parse_header(sealed).compressed
    codec = AesGcmCodec(Keyring({"k1": bytes(range(32))}), compress_min_bytes=1)
    context = CodecContext.result("billing", "charge", "billing:X")
    assert codec.decode(sealed, context) == b"abc" * 100
    order = CodecContext.payload("billing", "charge", "order-1")
    assert bytes.fromhex(line["derived"]) == codec.encode(b'{"amount":42}', order)
