"""TLS fixtures shared by the tests of TLS, mTLS and credentials (registered in tests/conftest.py):
`pki` (a CA, a foreign CA and a server certificate), `tls_broker` and `mtls_broker` (in-process
brokers serving them), and `recorder`: a real gRPC server that records the `authorization`
metadata of each call and refuses it with UNAUTHENTICATED."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import grpc
import pytest

from broker.config import Settings
from tests.conftest import RunningBroker, start_broker
from tests.support.certs import CA, CertPair, make_ca

ENQUEUE: Final = "/taskbroker.v1.BrokerService/Enqueue"
LEASE: Final = "/taskbroker.v1.BrokerService/Lease"


@dataclass
class Pki:
    ca: CA
    other_ca: CA  # a CA the broker does not trust
    server: CertPair
    directory: Path


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    ca = make_ca(tmp_path / "ca")
    other = make_ca(tmp_path / "other", "some other CA")
    return Pki(ca, other, ca.issue_server(tmp_path / "server"), tmp_path)


@pytest.fixture
async def tls_broker(settings: Settings, pki: Pki) -> AsyncIterator[RunningBroker]:
    running = await start_broker(settings, tls_cert=pki.server.cert, tls_key=pki.server.key)
    yield running
    await running.close()


@pytest.fixture
async def mtls_broker(settings: Settings, pki: Pki) -> AsyncIterator[RunningBroker]:
    running = await start_broker(
        settings, tls_cert=pki.server.cert, tls_key=pki.server.key, tls_client_ca=pki.ca.cert
    )
    yield running
    await running.close()


class Recorder(grpc.GenericRpcHandler):
    """A real gRPC server that records each call's `authorization` metadata and refuses it."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str | None]] = []

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler[Any, Any]:
        auth = dict(details.invocation_metadata).get("authorization")
        self.seen.append((details.method, None if auth is None else str(auth)))

        async def unary(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "recorded")

        async def stream(
            requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[bytes, bytes]
        ) -> AsyncIterator[bytes]:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "recorded")
            yield b""  # type: ignore[unreachable]  # makes this a generator

        if details.method == LEASE:
            return grpc.stream_stream_rpc_method_handler(stream)
        return grpc.unary_unary_rpc_method_handler(unary)


@pytest.fixture
async def recorder() -> AsyncIterator[tuple[Recorder, int]]:
    handler = Recorder()
    server = grpc.aio.server(handlers=[handler])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield handler, port
    await server.stop(None)
