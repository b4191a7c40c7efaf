"""The in-process series of every serving process (`--processes N`): RPC timings, queue wait and
processing histograms, and the open Lease streams live in each process's memory, yet the HTTP
side is served by one of them. The others answer with a JSON snapshot of theirs on a Unix socket
(PeerServer); the HTTP process fetches them at scrape time (Peers) and InProcessSeries adds them
to its own, so /metrics and the dashboard count the calls and workers of every process.

The sockets live in a directory the supervisor made for this broker with mode 0700, so only the
broker's user can read them, and no port is opened.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import aiohttp
from aiohttp import web

from broker.timings import RPC_BUCKETS, WAIT_BUCKETS, Buckets
from broker.web import views

if TYPE_CHECKING:
    from broker.live_streams import LiveStreams
    from broker.telemetry.rpc_metrics import RpcMetrics
    from broker.timings import TaskTimings

log = logging.getLogger(__name__)

#: A process that does not answer within this is left out of one scrape (its last snapshot is
#: used, so its counters never go backwards); a scrape must answer well inside Prometheus's
#: default 10 s timeout.
FETCH_TIMEOUT_S: Final = 1.0
SNAPSHOT_PATH: Final = "/in-process"

Json = dict[str, Any]


@dataclass(slots=True)
class ProcessSnapshot:
    """One process's in-process series, as it last answered."""

    pid: int
    rpc: dict[tuple[str, str], Buckets] = field(default_factory=dict)
    wait: dict[str, Buckets] = field(default_factory=dict)
    processing: dict[str, Buckets] = field(default_factory=dict)
    #: Every Lease stream it holds: views.worker_json plus "closed".
    streams: list[Json] = field(default_factory=list)


class InProcessSeries:
    """The in-process series of this process, plus those of the other serving processes when
    there are any (`peers`): what /metrics, the dashboard's workers and its wait chart read.

    Args:
        timings: This process's queue wait and processing histograms.
        sessions: This process's Lease streams.
        rpc: This process's RPC timings (None: not collected).
        peers: The other serving processes; None when this is the only one.
    """

    def __init__(
        self,
        timings: TaskTimings,
        sessions: LiveStreams,
        rpc: RpcMetrics | None,
        peers: Peers | None = None,
    ) -> None:
        self._timings = timings
        self._sessions = sessions
        self._rpc = rpc
        self.peers = peers

    @property
    def processes(self) -> int:
        """Serving processes (this one and its peers)."""
        return 1 + (len(self.peers.sockets) if self.peers else 0)

    @property
    def reporting(self) -> int:
        """Processes whose series the last refresh read afresh (this one always)."""
        return 1 + (self.peers.reporting if self.peers else 0)

    async def refresh(self) -> None:
        """Fetches the other processes' snapshots (nothing to do for a single process)."""
        if self.peers is not None:
            await self.peers.refresh()

    def _others(self) -> list[ProcessSnapshot]:
        return self.peers.snapshots if self.peers else []

    def rpc(self) -> Mapping[tuple[str, str], Buckets] | None:
        if self._rpc is None:
            return None
        return _merged(self._rpc.durations, [p.rpc for p in self._others()])

    def wait(self) -> Mapping[str, Buckets]:
        return _merged(self._timings.wait, [p.wait for p in self._others()])

    def processing(self) -> Mapping[str, Buckets]:
        return _merged(self._timings.processing, [p.processing for p in self._others()])

    def streams(self) -> list[Json]:
        """Every Lease stream of every process, open or closing: views.worker_json plus
        "closed"."""
        return self._own_streams() + [s for p in self._others() for s in p.streams]

    def _own_streams(self) -> list[Json]:
        return [{**views.worker_json(s), "closed": s.closed} for s in self._sessions.sessions]

    def own_snapshot(self) -> Json:
        """This process's series as JSON (what PeerServer answers)."""
        return {
            "pid": os.getpid(),
            "rpc": [
                {"method": method, "code": code, **_buckets_json(b)}
                for (method, code), b in (self._rpc.durations.items() if self._rpc else ())
            ],
            "wait": {q: _buckets_json(b) for q, b in self._timings.wait.items()},
            "processing": {q: _buckets_json(b) for q, b in self._timings.processing.items()},
            "streams": self._own_streams(),
        }


def _merged(
    own: Mapping[Any, Buckets], others: Sequence[Mapping[Any, Buckets]]
) -> Mapping[Any, Buckets]:
    if not others:
        return own  # a single process: read in place, as before
    merged = {key: b.copy() for key, b in own.items()}
    for other in others:
        for key, b in other.items():
            if key in merged:
                merged[key].add(b)
            else:
                merged[key] = b.copy()
    return merged


def _buckets_json(b: Buckets) -> Json:
    return {"counts": list(b.counts), "total": b.total}


def _buckets(raw: Any, bounds: Sequence[float]) -> Buckets:
    """Raises ValueError unless raw is a histogram with these bounds."""
    counts, total = raw["counts"], raw["total"]
    if len(counts) != len(bounds) + 1 or not all(isinstance(n, int) for n in counts):
        raise ValueError("histogram with other bounds")
    b = Buckets(bounds)
    b.counts = list(counts)
    b.total = float(total)
    return b


def parse_snapshot(raw: Any) -> ProcessSnapshot:
    """Raises ValueError (or KeyError, TypeError) on a malformed snapshot."""
    return ProcessSnapshot(
        pid=int(raw["pid"]),
        rpc={(r["method"], r["code"]): _buckets(r, RPC_BUCKETS) for r in raw["rpc"]},
        wait={str(q): _buckets(b, WAIT_BUCKETS) for q, b in raw["wait"].items()},
        processing={str(q): _buckets(b, WAIT_BUCKETS) for q, b in raw["processing"].items()},
        streams=[dict(s) for s in raw["streams"]],
    )


class PeerServer:
    """Answers GET /in-process on a Unix socket with this process's snapshot."""

    def __init__(self, path: Path, series: InProcessSeries) -> None:
        self._path = path
        self._series = series
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get(SNAPSHOT_PATH, self._snapshot)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await runner.setup()
        self._runner = runner
        await web.UnixSite(runner, str(self._path)).start()
        self._path.chmod(0o600)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _snapshot(self, request: web.Request) -> web.Response:
        return web.json_response(self._series.own_snapshot())


class Peers:
    """The other serving processes, read through their sockets."""

    def __init__(self, sockets: Iterable[Path]) -> None:
        self.sockets = list(sockets)
        self._last: dict[Path, ProcessSnapshot] = {}
        #: Peers that answered the last refresh.
        self.reporting = 0
        self._lock = asyncio.Lock()

    @property
    def snapshots(self) -> list[ProcessSnapshot]:
        """The latest snapshot of each peer that ever answered (a peer that failed the last
        refresh keeps its previous one, so sums of counters never go backwards)."""
        return list(self._last.values())

    async def refresh(self) -> None:
        async with self._lock:
            answers = await asyncio.gather(*(self._fetch(p) for p in self.sockets))
            self.reporting = sum(answers)

    async def _fetch(self, path: Path) -> bool:
        connector = aiohttp.UnixConnector(path=str(path))
        timeout = aiohttp.ClientTimeout(total=FETCH_TIMEOUT_S)
        try:
            async with (
                aiohttp.ClientSession(connector=connector, timeout=timeout) as http,
                http.get(f"http://broker{SNAPSHOT_PATH}") as response,
            ):
                response.raise_for_status()
                self._last[path] = parse_snapshot(await response.json())
        except (OSError, aiohttp.ClientError, TimeoutError, ValueError, KeyError, TypeError) as e:
            log.warning("serving process at %s did not report its metrics: %s", path.name, e)
            return False
        return True
