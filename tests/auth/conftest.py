"""A broker under a policy file, and channels that call it as one principal or anonymously."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest

from broker.auth.policy import token_digest
from broker.config import Settings
from taskbroker.v1 import admin_service_pb2_grpc, broker_service_pb2_grpc
from tests.conftest import RunningBroker, start_broker

if TYPE_CHECKING:
    from taskbroker.v1.admin_service_pb2_grpc import AdminServiceAsyncStub
    from taskbroker.v1.broker_service_pb2_grpc import BrokerServiceAsyncStub

#: principal -> (roles, queue globs) it is granted.
GRANTS: dict[str, tuple[list[str], list[str]]] = {
    "producer": (["produce"], ["a"]),
    "producer2": (["produce"], ["a"]),
    "consumer": (["consume"], ["a"]),
    "reader": (["read"], ["a"]),
    "admin": (["admin"], ["*"]),
    "ops": (["produce", "consume", "read"], ["*"]),
    "x": (["consume"], ["shared"]),
    "y": (["consume"], ["shared"]),
}


def token_of(name: str) -> str:
    return f"tbk_test-token-of-{name}"


def policy_text(grants: dict[str, tuple[list[str], list[str]]]) -> str:
    parts = []
    for name in grants:
        parts.append(
            f'[[principals]]\nname = "{name}"\ntoken_sha256 = ["{token_digest(token_of(name))}"]\n'
        )
    for name, (roles, queues) in grants.items():
        parts.append(
            f"[[grants]]\nprincipals = [{name!r}]\nroles = {roles!r}\nqueues = {queues!r}\n"
        )
    return "\n".join(parts).replace("'", '"')


class _Bearer:
    """Adds `authorization: Bearer <token>` to every call, as the SDK does."""

    def __init__(self, token: str) -> None:
        self._entry = ("authorization", f"Bearer {token}")

    def _with_token(self, details: Any) -> Any:
        metadata = grpc.aio.Metadata(*(details.metadata or ()), self._entry)
        return details._replace(metadata=metadata)


class _UnaryBearer(_Bearer, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(
        self, continuation: Callable[..., Awaitable[Any]], details: Any, request: Any
    ) -> Any:
        return await continuation(self._with_token(details), request)


class _StreamBearer(_Bearer, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(
        self, continuation: Callable[..., Awaitable[Any]], details: Any, requests: Any
    ) -> Any:
        return await continuation(self._with_token(details), requests)


class _ServerStreamBearer(_Bearer, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(
        self, continuation: Callable[..., Awaitable[Any]], details: Any, request: Any
    ) -> Any:
        return await continuation(self._with_token(details), request)


def bearer(token: str) -> list[Any]:
    """Interceptors for a channel (grpc.aio files each under one kind only, hence three)."""
    return [_UnaryBearer(token), _StreamBearer(token), _ServerStreamBearer(token)]


class Caller:
    """Raw stubs on a channel of their own, calling as one principal (or anonymously)."""

    def __init__(self, target: str, token: str | None) -> None:
        interceptors = bearer(token) if token is not None else []
        # A connection of its own (gRPC shares one between channels to a target otherwise).
        self.channel = grpc.aio.insecure_channel(
            target, options=[("grpc.use_local_subchannel_pool", 1)], interceptors=interceptors
        )
        self.stub: BrokerServiceAsyncStub = broker_service_pb2_grpc.BrokerServiceStub(self.channel)
        self.admin: AdminServiceAsyncStub = admin_service_pb2_grpc.AdminServiceStub(self.channel)


class Secured:
    """A running broker with a policy file, and a Caller per principal."""

    def __init__(self, running: RunningBroker, policy: Path) -> None:
        self.running = running
        self.policy = policy
        self._callers: list[Caller] = []

    def as_(self, name: str) -> Caller:
        return self.with_token(token_of(name))

    def with_token(self, token: str | None) -> Caller:
        caller = Caller(self.running.target, token)
        self._callers.append(caller)
        return caller

    def anonymous(self) -> Caller:
        return self.with_token(None)

    async def close(self) -> None:
        for caller in self._callers:
            await caller.channel.close()
        await self.running.close()


@pytest.fixture
def policy_path(tmp_path: Path) -> Path:
    path = tmp_path / "policy.toml"
    path.write_text(policy_text(GRANTS))
    return path


@pytest.fixture
async def secured(settings: Settings, policy_path: Path) -> AsyncIterator[Secured]:
    running = await start_broker(settings, policy_file=policy_path)
    secured = Secured(running, policy_path)
    yield secured
    await secured.close()


def status_of(error: grpc.aio.AioRpcError) -> tuple[grpc.StatusCode, str]:
    return error.code(), error.details() or ""
