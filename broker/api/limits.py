"""Admission limits: Lease streams per connection, per client and in total, and unary calls
and their request bytes in flight, so that no one client can exhaust the broker."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from types import TracebackType

from broker.errors import LimitExceeded


def client_of_peer(peer: str) -> str:
    """The client a connection belongs to: its IP address ("ipv4:10.0.0.7:51234" → "ipv4:10.0.0.7",
    "ipv6:[::1]:51234" → "ipv6:[::1]"); other peers ("unix:...") are their own client.

    Workers behind one NAT share a key; a later authenticated principal replaces this function.
    """
    kind, _, address = peer.partition(":")
    if kind in ("ipv4", "ipv6") and ":" in address:
        return f"{kind}:{address.rpartition(':')[0]}"
    return peer


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

    def admit(self, peer: str) -> _Release:
        """Counts one more stream from peer; use the result as a context manager around the
        stream's whole life.

        Raises:
            LimitExceeded: a limit is reached; nothing was counted.
        """
        client = self._client_key(peer)
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
    """Counts unary calls in flight and the bytes of their requests.

    A request larger than the whole byte budget is admitted only when nothing else is in
    flight, so that every request the transport accepts can be served.

    Args:
        max_calls: Unary calls served at once.
        max_bytes: Request bytes held by calls being served.
    """

    def __init__(self, max_calls: int, max_bytes: int) -> None:
        self._max_calls = max_calls
        self._max_bytes = max_bytes
        self.calls = 0
        self.bytes = 0

    def admit(self, size: int) -> _Release:
        """Counts one call with a request of size bytes, for use as a context manager.

        Raises:
            LimitExceeded: a limit is reached; nothing was counted.
        """
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

        def give_back() -> None:
            self.calls -= 1
            self.bytes -= size

        return _Release(give_back)


def _decrement(counter: Counter[str], key: str) -> None:
    counter[key] -= 1
    if counter[key] <= 0:
        del counter[key]
