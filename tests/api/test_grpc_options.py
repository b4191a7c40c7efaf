"""gRPC channel arguments: every name the broker and the SDK set is one gRPC knows (it ignores
others silently), and an idle Lease stream whose client pings it stays open."""

from __future__ import annotations

import asyncio
import importlib.util
import pkgutil
import re
import types
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import pytest

import broker
import taskbroker
from broker.api.server import server_options
from broker.config import Settings
from taskbroker._client import DEFAULT_OPTIONS
from taskbroker.v1 import broker_service_pb2_grpc
from tests.conftest import start_broker
from tests.support.lease_stream import LeaseStream
from tests.support.tasks import enqueue, spec

_OPTION = re.compile(rb"grpc\.[a-z0-9_.]+")


def _names_grpc_core_defines() -> set[str]:
    """The option names compiled into the installed gRPC core (as `strings` would show)."""
    core = importlib.util.find_spec("grpc._cython.cygrpc")
    assert core is not None and core.origin is not None
    library = Path(core.origin).read_bytes()
    return {m.decode() for m in _OPTION.findall(library)}


def _string_constants(code: types.CodeType) -> Iterator[str]:
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _string_constants(const)
        elif isinstance(const, str):
            yield const
        elif isinstance(const, tuple):  # a dict literal's keys
            yield from (c for c in const if isinstance(c, str))


def _option_names_in_code(package: types.ModuleType) -> set[str]:
    """Every "grpc.*" string constant in the compiled code of the package's own modules."""
    found = set()
    for module in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        spec_ = importlib.util.find_spec(module.name)
        if spec_ is None or spec_.origin is None or not spec_.origin.endswith(".py"):
            continue
        if ".v1." in module.name:  # generated protobuf code sets no options
            continue
        source = Path(spec_.origin).read_text()
        code = compile(source, spec_.origin, "exec")
        found |= {c for c in _string_constants(code) if _OPTION.fullmatch(c.encode())}
    return found


def test_every_grpc_option_the_broker_and_the_sdk_set_is_a_name_grpc_knows() -> None:
    known = _names_grpc_core_defines()
    assert "grpc.keepalive_time_ms" in known  # the library was read
    server = {name for name, _ in server_options(Settings())}
    client = set(DEFAULT_OPTIONS)
    in_code = _option_names_in_code(broker) | _option_names_in_code(taskbroker)
    assert server | client <= in_code  # the code scan sees what the objects hold
    unknown = sorted(in_code - known)
    assert not unknown, f"gRPC ignores these option names silently: {unknown}"
    assert {"grpc.http2.min_ping_interval_without_data_ms", "grpc.max_connection_age_ms"} <= server


def test_connection_age_is_set_unless_zero() -> None:
    options = dict(server_options(Settings(max_connection_age_s=90, max_connection_age_grace_s=5)))
    assert options["grpc.max_connection_age_ms"] == 90_000
    assert options["grpc.max_connection_age_grace_ms"] == 5_000
    options = dict(server_options(Settings(max_connection_age_s=0)))
    assert "grpc.max_connection_age_ms" not in options


#: A client that pings an idle connection every 0.5 s, and keeps pinging without data.
_EAGER_PINGS = [
    ("grpc.keepalive_time_ms", 500),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]


async def test_an_idle_lease_stream_whose_client_pings_often_stays_open(
    settings: Settings,
) -> None:
    """The broker accepts pings as often as min_client_ping_interval_s: a client pinging every
    0.5 s sends 16 pings in 8 s without data and keeps its stream (gRPC's default minimum of
    5 minutes would answer GOAWAY too_many_pings after three)."""
    running = await start_broker(replace(settings, min_client_ping_interval_s=0.2))
    channel = grpc.aio.insecure_channel(running.target, options=_EAGER_PINGS)
    try:
        stub = broker_service_pb2_grpc.BrokerServiceStub(channel)
        worker = await LeaseStream(stub).open(["emails"], credits=1)
        with pytest.raises(TimeoutError):  # no data either way for 16 ping intervals
            await asyncio.wait_for(asyncio.shield(worker.ended.wait()), 8)
        (task_id,) = await enqueue(running.stub, spec())
        (delivery,) = await worker.take(1)
        assert delivery.task.id == task_id and worker.error is None
        await worker.close()
    finally:
        await channel.close()
        await running.close()


async def test_a_connection_past_its_max_age_is_closed_and_the_client_reconnects(
    settings: Settings,
) -> None:
    """Connections rotate (so clients spread over replicas added later): a stream still open
    when its connection's age and grace have passed ends, and the channel's next call goes over
    a new connection."""
    running = await start_broker(
        replace(settings, max_connection_age_s=1.0, max_connection_age_grace_s=0.5)
    )
    channel = running.new_channel()
    try:
        stub = broker_service_pb2_grpc.BrokerServiceStub(channel)
        worker = await LeaseStream(stub).open(["emails"], credits=1)
        await asyncio.wait_for(worker.ended.wait(), 10)  # 1 s (+-10 %) + 0.5 s, on a busy machine
        assert worker.error is not None
        assert worker.error.code() == grpc.StatusCode.UNAVAILABLE
        assert await enqueue(stub, spec())  # a new connection serves the next call
    finally:
        await channel.close()
        await running.close()
