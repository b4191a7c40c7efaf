"""Admission limits: Lease streams per connection, per client and in total, and unary calls
and their request bytes in flight, so that no one client can exhaust the broker."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from types import TracebackType

from broker.auth.principal import Principal
from broker.errors import LimitExceeded, RateLimited


def client_of_peer(peer: str) -> str:
    """The client a connection belongs to: its IP address ("ipv4:10.0.0.7:51234" → "ipv4:10.0.0.7",
    "ipv6:[::1]:51234" → "ipv6:[::1]"); other peers ("unix:...") are their own client.

    Workers behind one NAT share a key; with a policy in force, clients are principals instead
    (client_of_principal).
    """
    kind, _, address = peer.partition(":")
    if kind in ("ipv4", "ipv6") and ":" in address:
        return f"{kind}:{address.rpartition(':')[0]}"
    return peer


def client_of_principal(principal: Principal) -> str | None:
    """With a policy in force, the per-client limits count per principal (one tenant's clients,
    wherever they connect from, share one allowance, and tenants behind one NAT do not); None
    for ANONYMOUS: count by the peer's address (client_of_peer)."""
    return None if principal.is_anonymous else f"principal:{principal.name}"


class _Release:
    """Gives back what one admission took, exactly once (exit, cancel or exception alike)."""

    __slots__ = ("_give_back",)

    def __init__(self, give_back: Callable[[], None]) -> None:
        self._give_back: Callable[[], None] | None = give_back

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def release(self) -> None:
        if self._give_back is not None:
            give_back, self._give_back = self._give_back, None
            give_back()


class StreamLimits:
    """Counts open Lease streams by connection (the call's peer), by client and in total.

    Args:
        per_connection: Streams one connection (peer "ipv4:ip:port") may hold open.
        per_client: Streams one client (client_key of the peer) may hold open.
        total: Streams the broker holds open.
        client_key: The client a peer belongs to (its IP address by default).
    """

    def __init__(
        self,
        per_connection: int,
        per_client: int,
        total: int,
        client_key: Callable[[str], str] = client_of_peer,
    ) -> None:
        self._per_connection = per_connection
        self._per_client = per_client
        self._total = total
        self._client_key = client_key
        self._by_connection: Counter[str] = Counter()
        self._by_client: Counter[str] = Counter()
        self.open = 0

    def admit(self, peer: str, client: str | None = None) -> _Release:
        """Counts one more stream from peer; use the result as a context manager around the
        stream's whole life. `client`: who the stream counts against (client_of_principal);
        None: client_key(peer).

        Raises:
            LimitExceeded: a limit is reached; nothing was counted.
        """
        client = self._client_key(peer) if client is None else client
        if self._by_connection[peer] >= self._per_connection:
            raise LimitExceeded(
                f"too many Lease streams on this connection (limit {self._per_connection}, "
                "setting max_streams_per_connection); close streams or open another connection"
            )
        if self._by_client[client] >= self._per_client:
            raise LimitExceeded(
                f"too many Lease streams from this client (limit {self._per_client}, "
                "setting max_streams_per_client); close streams you do not use"
            )
        if self.open >= self._total:
            raise LimitExceeded(
                f"the broker serves its maximum of {self._total} Lease streams (setting "
                "max_streams); retry later or use another replica"
            )
        self._by_connection[peer] += 1
        self._by_client[client] += 1
        self.open += 1

        def give_back() -> None:
            self.open -= 1
            _decrement(self._by_connection, peer)
            _decrement(self._by_client, client)

        return _Release(give_back)

    def on_connection(self, peer: str) -> int:
        return self._by_connection[peer]

    def of_client(self, peer: str) -> int:
        return self._by_client[self._client_key(peer)]


class UnaryLimits:
    """Counts unary calls in flight and the bytes of their requests, in total and by client,
    so that one client holding its share still leaves room for the others.

    A request larger than a byte budget is admitted only when nothing else is counted against
    that budget, so that every request the transport accepts can be served.

    Args:
        max_calls: Unary calls served at once.
        max_bytes: Request bytes held by calls being served.
        max_calls_per_client: Of max_calls, what one client may hold.
        max_bytes_per_client: Of max_bytes, what one client may hold.
        client_key: The client a peer belongs to (its IP address by default).
        rate: Request bytes per second per client (none by default).
    """

    def __init__(
        self,
        max_calls: int,
        max_bytes: int,
        max_calls_per_client: int,
        max_bytes_per_client: int,
        client_key: Callable[[str], str] = client_of_peer,
        rate: ByteRate | None = None,
    ) -> None:
        self._rate = rate or ByteRate(0, 0)
        self._max_calls = max_calls
        self._max_bytes = max_bytes
        self._max_client_calls = max_calls_per_client
        self._max_client_bytes = max_bytes_per_client
        self._client_key = client_key
        self._client_calls: Counter[str] = Counter()
        self._client_bytes: Counter[str] = Counter()
        self.calls = 0
        self.bytes = 0

    def check_rate(self, peer: str, client: str | None = None) -> None:
        """Before a call's request is read: raises RateLimited when its client is over its
        request byte rate. `client` as for admit."""
        self._rate.check(self._client_key(peer) if client is None else client)

    def charge_rate(self, peer: str, size: int, client: str | None = None) -> None:
        """Counts a request of size bytes against its client's rate. `client` as for admit."""
        self._rate.charge(self._client_key(peer) if client is None else client, size)

    def admit(self, peer: str, size: int, client: str | None = None) -> _Release:
        """Counts one call from peer with a request of size bytes, for use as a context manager.
        `client`: who the call counts against (client_of_principal); None: client_key(peer).

        Raises:
            LimitExceeded: a limit is reached; nothing was counted.
        """
        client = self._client_key(peer) if client is None else client
        held = self._client_bytes[client]
        if self._client_calls[client] >= self._max_client_calls:
            raise LimitExceeded(
                f"this client has its maximum of {self._max_client_calls} calls in progress "
                "(setting max_concurrent_unary_rpcs_per_client); retry with backoff"
            )
        if held and held + size > self._max_client_bytes:
            raise LimitExceeded(
                f"this client's requests in progress hold {held} bytes and this one has {size}: "
                f"over the limit of {self._max_client_bytes} (setting "
                "max_inflight_request_bytes_per_client); retry with backoff or send smaller "
                "requests"
            )
        if self.calls >= self._max_calls:
            raise LimitExceeded(
                f"the broker is serving its maximum of {self._max_calls} concurrent calls "
                "(setting max_concurrent_unary_rpcs); retry with backoff"
            )
        if self.bytes and self.bytes + size > self._max_bytes:
            raise LimitExceeded(
                f"requests in progress hold {self.bytes} bytes and this one has {size}: over the "
                f"limit of {self._max_bytes} (setting max_inflight_request_bytes); retry with "
                "backoff or send smaller requests"
            )
        self.calls += 1
        self.bytes += size
        self._client_calls[client] += 1
        self._client_bytes[client] += size

        def give_back() -> None:
            self.calls -= 1
            self.bytes -= size
            _decrement(self._client_calls, client)
            _decrement(self._client_bytes, client, size)

        return _Release(give_back)


class ByteRate:
    """Holds each client to `rate` request bytes per second on average, with bursts of up to
    `burst` bytes (GCRA: one "theoretical arrival time" per client, so O(1) per call and no
    timers). A call is checked before its request is read, and charged once it has been:
    a client in debt is refused before its request is copied or parsed, and any single request
    the transport accepts can still be served.

    Args:
        rate: Bytes per second per client; 0 turns the limit off.
        burst: Bytes a client that was quiet may send at once.
        clock: Seconds, monotonic (tests pass their own).
    """

    #: Forget clients whose allowance has refilled, once this many are remembered.
    PRUNE_AT = 10_000

    def __init__(self, rate: int, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._rate = rate
        self._tolerance = burst / rate if rate else 0.0
        self._clock = clock
        #: client -> when its allowance is full again (theoretical arrival time), in clock seconds
        self._full_at: dict[str, float] = {}

    def check(self, client: str) -> None:
        """Raises RateLimited when the client has sent more than its rate allows (its debt is
        over the burst); its retry_after_s says when it is not."""
        if not self._rate:
            return
        wait = self._full_at.get(client, 0.0) - self._tolerance - self._clock()
        if wait > 0:
            raise RateLimited(
                f"this client sent more request bytes than its rate of {self._rate} bytes/s "
                f"(setting request_bytes_per_s_per_client); retry in {wait:.2f} s",
                wait,
            )

    def charge(self, client: str, size: int) -> None:
        """Counts size bytes the client sent."""
        if not self._rate:
            return
        now = self._clock()
        if len(self._full_at) >= self.PRUNE_AT:
            self._full_at = {c: t for c, t in self._full_at.items() if t > now}
        self._full_at[client] = max(self._full_at.get(client, now), now) + size / self._rate


def _decrement(counter: Counter[str], key: str, by: int = 1) -> None:
    counter[key] -= by
    if counter[key] <= 0:
        del counter[key]


class Pacer:
    """Keeps one large piece of work (a big settlements frame) to a share of the event loop:
    at each pause it rests in proportion to the time it has been busy since the last, so
    other clients' calls find the loop, and the CPU, free.

    Args:
        share: Fraction of the time the work may be busy (0 < share <= 1).
    """

    def __init__(self, share: float) -> None:
        self._rest_per_busy = (1 - share) / share
        self._since = time.perf_counter()

    async def pause(self) -> None:
        """Yields to others, for longer the longer the work ran since the last pause."""
        busy = time.perf_counter() - self._since
        await asyncio.sleep(busy * self._rest_per_busy)
        self.restart()

    def restart(self) -> None:
        """Starts counting busy time afresh (after waiting on something else, e.g. Redis)."""
        self._since = time.perf_counter()
