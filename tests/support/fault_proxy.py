"""FaultProxy: a loopback asyncio TCP proxy that injects network faults (RELIABILITY.md 7.1).

Put it between worker and broker, or between broker and Redis, and switch its mode from the
test while connections are open; a switch affects open and new connections alike:

* :meth:`FaultProxy.pass_through`: forward both ways (the initial mode).
* :meth:`FaultProxy.delay`: forward each chunk after a random delay, in order per direction.
* :meth:`FaultProxy.blackhole`: read from both sides, forward nothing, keep every socket open.
* :meth:`FaultProxy.drop_replies`: forward client -> upstream, discard upstream -> client.
* :meth:`FaultProxy.half_open`: like blackhole for open connections; new ones are reset at once.
* :meth:`FaultProxy.reset`: reset (RST) every open connection, then pass new ones through.

Data read while a direction is not forwarded is discarded, as Toxiproxy's ``timeout`` toxic
does, so a connection that lives through a fault may carry a torn stream afterwards; the clients
under test are expected to time out and reconnect. An end of stream (FIN) is not discarded: it
waits until its direction forwards again, so connections still wind down after the fault heals.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import ipaddress
import logging
import random
import socket
import struct
from collections.abc import Coroutine
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, Self

__all__ = ["FaultProxy", "ProxyMode", "ProxyStats"]

logger = logging.getLogger(__name__)

_LISTEN_HOST: Final = "127.0.0.1"
#: Bytes per read; one chunk is the unit that is delayed, forwarded or dropped.
_CHUNK_BYTES: Final = 64 * 1024
#: Chunks buffered per direction before the proxy stops reading (TCP backpressure): <= 1 MiB.
_QUEUE_CHUNKS: Final = 16
#: Upstream is on loopback: a connect that takes this long will not succeed.
_CONNECT_TIMEOUT_S: Final = 5.0
#: SO_LINGER on with a zero timeout makes close() send RST instead of FIN.
_LINGER_RST: Final = struct.pack("ii", 1, 0)


class ProxyMode(enum.Enum):
    """What the proxy does with the bytes it reads."""

    #: Forward both directions.
    PASS_THROUGH = "pass_through"
    #: Forward both directions, each chunk after a random delay.
    DELAY = "delay"
    #: Forward nothing; keep every connection open.
    BLACKHOLE = "blackhole"
    #: Forward client -> upstream only; discard what upstream sends back.
    DROP_REPLIES = "drop_replies"
    #: Forward nothing on open connections; reset new connections at once.
    HALF_OPEN = "half_open"


class _Direction(enum.Enum):
    TO_UPSTREAM = "to_upstream"
    TO_CLIENT = "to_client"


_FORWARDED: Final[dict[ProxyMode, frozenset[_Direction]]] = {
    ProxyMode.PASS_THROUGH: frozenset(_Direction),
    ProxyMode.DELAY: frozenset(_Direction),
    ProxyMode.BLACKHOLE: frozenset(),
    ProxyMode.DROP_REPLIES: frozenset({_Direction.TO_UPSTREAM}),
    ProxyMode.HALF_OPEN: frozenset(),
}


@dataclass(frozen=True, slots=True)
class ProxyStats:
    """Counters since the proxy started; take a fresh snapshot from :attr:`FaultProxy.stats`."""

    #: Connections the listener accepted, including refused ones.
    connections_accepted: int = 0
    #: Connections reset on accept because the proxy was half-open.
    connections_refused: int = 0
    #: Connections reset on accept because upstream could not be reached.
    upstream_connect_failures: int = 0
    #: Bytes written to upstream.
    bytes_to_upstream: int = 0
    #: Bytes written to clients.
    bytes_to_client: int = 0
    #: Bytes read from clients and discarded.
    bytes_dropped_to_upstream: int = 0
    #: Bytes read from upstream and discarded.
    bytes_dropped_to_client: int = 0


@dataclass(slots=True)
class _Counters:
    connections_accepted: int = 0
    connections_refused: int = 0
    upstream_connect_failures: int = 0
    bytes_to_upstream: int = 0
    bytes_to_client: int = 0
    bytes_dropped_to_upstream: int = 0
    bytes_dropped_to_client: int = 0

    def count(self, direction: _Direction, n: int, *, forwarded: bool) -> None:
        if direction is _Direction.TO_UPSTREAM:
            if forwarded:
                self.bytes_to_upstream += n
            else:
                self.bytes_dropped_to_upstream += n
        elif forwarded:
            self.bytes_to_client += n
        else:
            self.bytes_dropped_to_client += n


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _close(writer: asyncio.StreamWriter, *, rst: bool) -> None:
    """Closes at once, without flushing; with ``rst`` the peer sees RST, not FIN."""
    if rst:
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
    writer.transport.abort()


async def _wait_closed(writer: asyncio.StreamWriter) -> None:
    # wait_closed() re-raises the error the connection was lost with; it is already handled.
    with contextlib.suppress(OSError):
        await writer.wait_closed()


# A chunk with the loop time it may be forwarded at; None marks the end of the stream.
_Item = tuple[float, bytes | None]


class _Connection:
    """One client connection, its upstream connection and the four tasks pumping between them."""

    def __init__(
        self, proxy: FaultProxy, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self._proxy = proxy
        self._client_reader = reader
        self._client_writer = writer
        self._upstream_writer: asyncio.StreamWriter | None = None
        self._failed = False
        self.task: asyncio.Task[None] | None = None

    def abort(self, *, rst: bool) -> None:
        """Closes both sockets now and cancels the connection's tasks."""
        self._close_sockets(rst=rst)
        if self.task is not None:
            self.task.cancel()

    def _close_sockets(self, *, rst: bool) -> None:
        for writer in (self._client_writer, self._upstream_writer):
            if writer is not None:
                _close(writer, rst=rst)

    async def run(self, host: str, port: int) -> None:
        pumps: list[asyncio.Task[None]] = []
        try:
            try:
                async with asyncio.timeout(_CONNECT_TIMEOUT_S):
                    upstream_reader, upstream_writer = await asyncio.open_connection(host, port)
            except (OSError, TimeoutError):
                self._proxy._counters.upstream_connect_failures += 1
                self._failed = True
                return
            self._upstream_writer = upstream_writer
            pumps = self._start_pumps(upstream_reader, upstream_writer)
            pending = set(pumps)
            while pending and not self._failed:
                _, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        finally:
            # Close synchronously first: if this task is cancelled again below, nothing leaks.
            for pump in pumps:
                pump.cancel()
            if self._failed:
                self._close_sockets(rst=True)
            else:
                for writer in (self._client_writer, self._upstream_writer):
                    if writer is not None:
                        writer.close()
            self._proxy._connections.discard(self)
            await asyncio.gather(*pumps, return_exceptions=True)
            await _wait_closed(self._client_writer)
            if self._upstream_writer is not None:
                await _wait_closed(self._upstream_writer)

    def _start_pumps(
        self, upstream_reader: asyncio.StreamReader, upstream_writer: asyncio.StreamWriter
    ) -> list[asyncio.Task[None]]:
        to_upstream: asyncio.Queue[_Item] = asyncio.Queue(_QUEUE_CHUNKS)
        to_client: asyncio.Queue[_Item] = asyncio.Queue(_QUEUE_CHUNKS)
        spawn = self._proxy._spawn
        return [
            spawn(self._read(self._client_reader, to_upstream)),
            spawn(self._write(to_upstream, upstream_writer, _Direction.TO_UPSTREAM)),
            spawn(self._read(upstream_reader, to_client)),
            spawn(self._write(to_client, self._client_writer, _Direction.TO_CLIENT)),
        ]

    async def _read(self, reader: asyncio.StreamReader, queue: asyncio.Queue[_Item]) -> None:
        try:
            while data := await reader.read(_CHUNK_BYTES):
                await queue.put((self._proxy._due(), data))
        except OSError:
            self._failed = True
            return
        await queue.put((self._proxy._due(), None))

    async def _write(
        self, queue: asyncio.Queue[_Item], writer: asyncio.StreamWriter, direction: _Direction
    ) -> None:
        loop = asyncio.get_running_loop()
        proxy = self._proxy
        try:
            while True:
                due, data = await queue.get()
                if (wait_s := due - loop.time()) > 0:
                    await asyncio.sleep(wait_s)
                if data is None:
                    await proxy._wait_forwarding(direction)
                    writer.write_eof()
                    return
                forwarded = proxy._forwards(direction)
                if forwarded:
                    writer.write(data)
                    await writer.drain()
                proxy._counters.count(direction, len(data), forwarded=forwarded)
        except OSError:
            self._failed = True


class FaultProxy:
    """A TCP proxy on 127.0.0.1 whose faults a test switches on and off.

    Use ``async with FaultProxy() as proxy: await proxy.start(host, port)`` and connect the code
    under test to :attr:`address`. Every task the proxy starts is cancelled, and every socket
    closed, by :meth:`stop`.
    """

    def __init__(self, *, seed: int | None = None) -> None:
        """Creates a stopped proxy in pass-through mode.

        Args:
            seed: Seed for the random delays, to make a run repeatable.
        """
        self._random = random.Random(seed)
        self._mode = ProxyMode.PASS_THROUGH
        self._delay_ms = (0.0, 0.0)
        self._mode_changed = asyncio.Event()
        self._counters = _Counters()
        self._upstream = ("", 0)
        self._server: asyncio.Server | None = None
        self._port = 0
        self._stopping = False
        self._connections: set[_Connection] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._errors: list[BaseException] = []

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self, upstream_host: str, upstream_port: int) -> None:
        """Listens on a free port of 127.0.0.1 and forwards to upstream.

        Args:
            upstream_host: A loopback host (``127.0.0.1``, ``::1`` or ``localhost``).
            upstream_port: The upstream TCP port.

        Raises:
            ValueError: If upstream is not on loopback.
            RuntimeError: If the proxy was already started.
        """
        if not _is_loopback(upstream_host):
            raise ValueError(f"FaultProxy is loopback only, not {upstream_host!r}")
        if self._server is not None or self._stopping:
            raise RuntimeError("FaultProxy can be started once")
        self._upstream = (upstream_host, upstream_port)
        self._server = await asyncio.start_server(self._on_accept, _LISTEN_HOST, 0)
        self._port = self._server.sockets[0].getsockname()[1]
        logger.debug("fault proxy %s -> %s:%d", self.address, upstream_host, upstream_port)

    async def stop(self) -> None:
        """Stops listening, closes every connection and cancels every task; idempotent.

        Raises:
            RuntimeError: If one of the proxy's tasks failed with an unexpected error (a bug
                in the proxy), chained to that error.
        """
        await self._shutdown()
        if self._errors:
            raise RuntimeError("FaultProxy task failed") from self._errors[0]

    async def _shutdown(self) -> None:
        self._stopping = True
        if self._server is not None:
            self._server.close()
        for connection in list(self._connections):
            connection.abort(rst=False)
        # Tasks may start others while they wind down (a refused socket's closer): loop.
        while self._tasks:
            tasks = list(self._tasks)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            await self.stop()
        else:
            await self._shutdown()

    # -- properties --------------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The port the proxy listens on.

        Raises:
            RuntimeError: If the proxy has not been started.
        """
        if not self._port:
            raise RuntimeError("FaultProxy has not been started")
        return self._port

    @property
    def address(self) -> str:
        """``127.0.0.1:PORT``, for a gRPC target or a Redis URL."""
        return f"{_LISTEN_HOST}:{self.port}"

    @property
    def mode(self) -> ProxyMode:
        """The current mode."""
        return self._mode

    @property
    def stats(self) -> ProxyStats:
        """A snapshot of the counters."""
        c = self._counters
        return ProxyStats(
            connections_accepted=c.connections_accepted,
            connections_refused=c.connections_refused,
            upstream_connect_failures=c.upstream_connect_failures,
            bytes_to_upstream=c.bytes_to_upstream,
            bytes_to_client=c.bytes_to_client,
            bytes_dropped_to_upstream=c.bytes_dropped_to_upstream,
            bytes_dropped_to_client=c.bytes_dropped_to_client,
        )

    @property
    def active_connections(self) -> int:
        """Client connections currently open through the proxy."""
        return len(self._connections)

    # -- modes -------------------------------------------------------------------------------

    def pass_through(self) -> None:
        """Forwards both directions without delay (heals every fault but a reset)."""
        self._set_mode(ProxyMode.PASS_THROUGH)

    def delay(self, min_ms: float, max_ms: float) -> None:
        """Forwards each chunk read after a random delay in ``[min_ms, max_ms]``.

        Chunks keep their order per direction: one never overtakes an earlier one.

        Raises:
            ValueError: Unless ``0 <= min_ms <= max_ms``.
        """
        if not 0 <= min_ms <= max_ms:
            raise ValueError(f"need 0 <= min_ms <= max_ms, got {min_ms}, {max_ms}")
        self._delay_ms = (float(min_ms), float(max_ms))
        self._set_mode(ProxyMode.DELAY)

    def blackhole(self) -> None:
        """Reads from both sides and forwards nothing; keeps every socket open.

        New connections are accepted and connected upstream, and get the same treatment.
        """
        self._set_mode(ProxyMode.BLACKHOLE)

    def drop_replies(self) -> None:
        """One-way loss: forwards client -> upstream and discards upstream -> client."""
        self._set_mode(ProxyMode.DROP_REPLIES)

    def half_open(self) -> None:
        """Stops forwarding without closing open connections; resets new ones on accept."""
        self._set_mode(ProxyMode.HALF_OPEN)

    def reset(self) -> None:
        """Closes every open connection with RST (``SO_LINGER`` 0) on both sides.

        The mode becomes pass-through, so clients that reconnect get through.
        """
        self._set_mode(ProxyMode.PASS_THROUGH)
        for connection in list(self._connections):
            connection.abort(rst=True)

    def _set_mode(self, mode: ProxyMode) -> None:
        logger.debug("fault proxy %s: %s", self._port, mode.value)
        self._mode = mode
        # Wake writers holding back an end of stream; they re-check the new mode.
        self._mode_changed.set()
        self._mode_changed = asyncio.Event()

    # -- internals used by _Connection -------------------------------------------------------

    def _forwards(self, direction: _Direction) -> bool:
        return direction in _FORWARDED[self._mode]

    async def _wait_forwarding(self, direction: _Direction) -> None:
        while not self._forwards(direction):
            await self._mode_changed.wait()

    def _due(self) -> float:
        """The loop time a chunk read now may be forwarded at."""
        if self._mode is not ProxyMode.DELAY:
            return 0.0
        low, high = self._delay_ms
        return asyncio.get_running_loop().time() + self._random.uniform(low, high) / 1000

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._on_task_done)
        return task

    def _on_task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            logger.error("fault proxy task failed", exc_info=exc)
            self._errors.append(exc)

    def _on_accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._counters.connections_accepted += 1
        if self._stopping or self._mode is ProxyMode.HALF_OPEN:
            if not self._stopping:
                self._counters.connections_refused += 1
            _close(writer, rst=True)
            self._spawn(_wait_closed(writer))
            return
        connection = _Connection(self, reader, writer)
        self._connections.add(connection)
        connection.task = self._spawn(connection.run(*self._upstream))
