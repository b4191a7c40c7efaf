"""FaultProxy over real TCP: each mode against an asyncio echo server, and PING to a real Redis."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
from collections.abc import AsyncIterator, Callable

import pytest
import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from tests.support import fault_proxy
from tests.support.fault_proxy import FaultProxy, ProxyMode
from tests.support.redis_server import RedisServer

HOST = "127.0.0.1"
#: How long a read must stay unanswered to count as "nothing arrives"; loopback answers in < 1 ms.
SILENCE_S = 0.3
#: Bound on waits for things that do happen, so a broken proxy fails fast instead of hanging.
ARRIVAL_S = 5.0


class EchoServer:
    """An asyncio echo server on loopback that records what it received."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.connections = 0
        self.closed = 0
        self._changed = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def port(self) -> int:
        assert self._server is not None
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._on_accept, HOST, 0)

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.transport.abort()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def wait_until(self, condition: Callable[[], bool]) -> None:
        """Waits until the condition holds after some server event."""
        async with asyncio.timeout(ARRIVAL_S):
            while not condition():
                await self._changed.wait()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _on_accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(writer)
        task = asyncio.create_task(self._echo(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        self._notify()

    async def _echo(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                self.received += data
                self._notify()
                writer.write(data)
                await writer.drain()
        except OSError:
            pass  # the proxy reset the connection: the tests assert on that
        finally:
            writer.close()
            self._writers.discard(writer)
            self.closed += 1
            self._notify()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


class Clients:
    """Plain TCP clients, all closed at teardown."""

    def __init__(self) -> None:
        self._writers: list[asyncio.StreamWriter] = []

    async def connect(self, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection(HOST, port)
        self._writers.append(writer)
        return reader, writer

    async def close(self) -> None:
        for writer in self._writers:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


@pytest.fixture
async def echo() -> AsyncIterator[EchoServer]:
    server = EchoServer()
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def proxy(echo: EchoServer) -> AsyncIterator[FaultProxy]:
    async with FaultProxy(seed=7) as proxy:
        await proxy.start(HOST, echo.port)
        yield proxy


@pytest.fixture
async def clients() -> AsyncIterator[Clients]:
    clients = Clients()
    yield clients
    await clients.close()


async def roundtrip(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes
) -> None:
    writer.write(data)
    await writer.drain()
    assert await asyncio.wait_for(reader.readexactly(len(data)), ARRIVAL_S) == data


def started_by_proxy(task: asyncio.Task[object]) -> bool:
    coro = task.get_coro()
    return inspect.iscoroutine(coro) and coro.cr_code.co_filename == fault_proxy.__file__


async def assert_silent(reader: asyncio.StreamReader) -> None:
    """Nothing arrives for SILENCE_S, and the connection is not closed either."""
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(reader.read(1), SILENCE_S)
    assert not reader.at_eof()


async def test_pass_through_echoes_both_ways_and_counts(
    proxy: FaultProxy, echo: EchoServer, clients: Clients
) -> None:
    payload = os.urandom(1024 * 1024)  # > the proxy's buffers, so backpressure is exercised
    reader, writer = await clients.connect(proxy.port)

    writer.write(payload)
    writer.write_eof()  # the half-close must reach the server, whose close must come back
    assert await asyncio.wait_for(reader.read(), ARRIVAL_S) == payload

    assert echo.received == payload
    stats = proxy.stats
    assert proxy.mode is ProxyMode.PASS_THROUGH
    assert stats.connections_accepted == 1
    assert stats.bytes_to_upstream == stats.bytes_to_client == len(payload)
    assert stats.bytes_dropped_to_upstream == stats.bytes_dropped_to_client == 0
    assert proxy.address == f"{HOST}:{proxy.port}"


async def test_delay_adds_at_least_min_delay_each_way_and_keeps_order(
    proxy: FaultProxy, clients: Clients
) -> None:
    loop = asyncio.get_running_loop()
    reader, writer = await clients.connect(proxy.port)

    proxy.delay(100, 150)
    started = loop.time()
    await roundtrip(reader, writer, b"ping")
    # 100 ms to the server and 100 ms back; 1 ms of slack for the loop clock's rounding.
    assert loop.time() - started >= 0.2 - 0.001

    # Separate chunks with random delays of 0-30 ms each: none may overtake an earlier one.
    proxy.delay(0, 30)
    messages = [f"message {i:02d};".encode() for i in range(20)]
    for message in messages:
        writer.write(message)
        await writer.drain()
        await asyncio.sleep(0.002)
    expected = b"".join(messages)
    assert await asyncio.wait_for(reader.readexactly(len(expected)), ARRIVAL_S) == expected


async def test_blackhole_reads_time_out_while_sockets_stay_open(
    proxy: FaultProxy, echo: EchoServer, clients: Clients
) -> None:
    reader, writer = await clients.connect(proxy.port)
    await roundtrip(reader, writer, b"hello")

    proxy.blackhole()
    writer.write(b"lost")
    await assert_silent(reader)

    assert echo.received == b"hello"
    assert proxy.stats.bytes_dropped_to_upstream == len(b"lost")
    assert proxy.active_connections == 1
    assert echo.closed == 0
    # The same connection carries data again once the fault heals.
    proxy.pass_through()
    await roundtrip(reader, writer, b"back")
    assert echo.received == b"helloback"


async def test_reset_sends_rst_and_accepts_new_connections(
    proxy: FaultProxy, echo: EchoServer, clients: Clients
) -> None:
    reader, writer = await clients.connect(proxy.port)
    await roundtrip(reader, writer, b"before")

    proxy.reset()

    with pytest.raises(ConnectionResetError):
        await asyncio.wait_for(reader.read(1), ARRIVAL_S)
    await echo.wait_until(lambda: echo.closed == 1)  # upstream was reset as well
    reader2, writer2 = await clients.connect(proxy.port)
    await roundtrip(reader2, writer2, b"after")
    assert proxy.stats.connections_accepted == 2
    assert echo.connections == 2


async def test_drop_replies_delivers_requests_but_no_replies(
    proxy: FaultProxy, echo: EchoServer, clients: Clients
) -> None:
    reader, writer = await clients.connect(proxy.port)

    proxy.drop_replies()
    writer.write(b"request")

    await echo.wait_until(lambda: echo.received == b"request")
    await assert_silent(reader)
    stats = proxy.stats
    assert stats.bytes_to_upstream == stats.bytes_dropped_to_client == len(b"request")
    assert stats.bytes_to_client == 0


async def test_half_open_refuses_new_connections_and_silences_open_ones(
    proxy: FaultProxy, echo: EchoServer, clients: Clients
) -> None:
    reader, writer = await clients.connect(proxy.port)
    await roundtrip(reader, writer, b"open")

    proxy.half_open()

    new_reader, _ = await clients.connect(proxy.port)
    # Refused: the client sees RST (or, should it race, EOF), never data.
    with contextlib.suppress(ConnectionResetError):
        assert await asyncio.wait_for(new_reader.read(1), ARRIVAL_S) == b""
    assert proxy.stats.connections_refused == 1
    assert echo.connections == 1
    writer.write(b"unheard")
    await assert_silent(reader)
    assert echo.received == b"open"
    assert proxy.active_connections == 1


async def test_stop_closes_open_connections_and_cancels_every_task(
    echo: EchoServer, clients: Clients
) -> None:
    proxy = FaultProxy()
    await proxy.start(HOST, echo.port)
    held_reader, held_writer = await clients.connect(proxy.port)
    await roundtrip(held_reader, held_writer, b"x")
    proxy.blackhole()
    held_writer.write_eof()  # an end of stream the blackhole holds back
    delayed_reader, delayed_writer = await clients.connect(proxy.port)
    proxy.delay(5_000, 5_000)
    delayed_writer.write(b"in flight")  # a chunk waiting out its delay
    await echo.wait_until(lambda: echo.connections == 2)

    await proxy.stop()

    assert await asyncio.wait_for(held_reader.read(), ARRIVAL_S) == b""
    assert await asyncio.wait_for(delayed_reader.read(), ARRIVAL_S) == b""
    assert proxy.active_connections == 0
    assert [task for task in asyncio.all_tasks() if started_by_proxy(task)] == []
    await proxy.stop()  # idempotent


async def test_redis_ping_through_proxy_times_out_in_blackhole_and_recovers(
    redis_server: RedisServer,
) -> None:
    async with FaultProxy() as proxy:
        await proxy.start(HOST, redis_server.port)
        # No retries: the timeout must surface, not be retried away.
        client = aioredis.Redis(
            host=HOST, port=proxy.port, socket_timeout=0.5, retry=Retry(NoBackoff(), 0)
        )
        try:
            assert await client.ping() is True

            proxy.blackhole()
            with pytest.raises(redis.exceptions.TimeoutError):
                await client.ping()

            proxy.pass_through()
            assert await client.ping() is True  # on a new connection: the client dropped the old
            assert proxy.stats.connections_accepted == 2
        finally:
            await client.aclose()
