"""Fixtures of the interop tests: the `node` binary, once clients/node is installed, a Python
client of the running broker, and a Node worker on it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from taskbroker import Client
from tests.conftest import RunningBroker
from tests.interop.node_process import NODE, NODE_DIR, NodeWorker


@pytest.fixture(scope="module")
def node() -> str:
    """The node binary, once clients/node's dependencies are installed."""
    if NODE is None:
        pytest.skip("node is not installed: the Node.js interop tests need it on PATH")
    if not (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir():
        pytest.fail(
            "clients/node/node_modules is missing: run `make install` (it runs `npm ci` in "
            "clients/node)",
            pytrace=False,
        )
    return NODE


@pytest.fixture
async def client(running: RunningBroker) -> AsyncIterator[Client]:
    async with Client(running.target) as client:
        yield client


@pytest.fixture
async def node_worker(
    node: str, running: RunningBroker, tmp_path: Path
) -> AsyncIterator[NodeWorker]:
    """A Node.js worker process (bin/worker.js) on the running broker."""
    worker = await NodeWorker.start(node, running.target, tmp_path / "node-worker.log")
    yield worker
    await worker.close()
