"""Fixtures of the interop tests: the `node` binary, once clients/node is installed."""

from __future__ import annotations

import pytest

from tests.interop.node_process import NODE, NODE_DIR


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
