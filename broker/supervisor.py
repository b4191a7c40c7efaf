"""Supervisor: `python -m broker --processes N` runs N broker processes on one gRPC port.

The supervisor serves nothing itself. It fixes the port (port 0 picks one) and holds it, starts
the embedded redis-server when no Redis is configured (one, shared), makes the private directory
for the processes' metrics sockets, and starts N `python -m broker --serving-process` children,
handing each its settings and ProcessSlot on stdin (no secret on a command line). Each child is
a whole broker (broker/app.py) with its own event loop and Redis pool, bound to the port with
SO_REUSEPORT, so the kernel spreads new connections over them; the first also serves the HTTP
side.

- SIGTERM or SIGINT: every child gets SIGTERM and drains as a lone broker does; the supervisor
  exits 0 once all have exited 0.
- A child that exits by itself (a crash, a kill, a failed start): the others are drained and
  the supervisor exits non-zero (2 if the child could not start, else 1), for the service
  manager to restart the whole broker. Restarting one child would hide a crash loop behind a
  broker that looks up, with one process's share of connections refused meanwhile.
- A supervisor that is itself killed: the kernel sends each child SIGTERM (PR_SET_PDEATHSIG),
  so none outlives it by more than its drain.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import pickle
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import BinaryIO, Final

from broker.config import Settings
from broker.embedded_redis import EmbeddedRedis
from broker.process_slot import ProcessSlot

log = logging.getLogger(__name__)

#: The argument that makes `python -m broker` a serving process of a supervisor.
SERVING_PROCESS_ARG: Final = "--serving-process"
#: linux/prctl.h
PR_SET_PDEATHSIG: Final = 1
#: After SIGTERM, how long past shutdown_grace_s a child may take before it is killed: its
#: drain ends at the grace deadline, then it stops its servers and loops (about a second).
STOP_SLACK_S: Final = 15.0
#: The exit code of a process that cannot start (as a lone broker's).
CANNOT_START: Final = 2


@dataclass(frozen=True, slots=True)
class ChildStart:
    """What a serving process reads from its stdin: its settings and its place."""

    settings: Settings
    slot: ProcessSlot
    supervisor_pid: int


def read_start(stream: BinaryIO) -> ChildStart:
    """The ChildStart the supervisor wrote to stream (a serving process's stdin).

    Raises:
        RuntimeError: stream holds none (the process was not started by a supervisor).
    """
    try:
        start = pickle.loads(stream.read())  # our own parent wrote it
    except (pickle.UnpicklingError, EOFError, AttributeError, ValueError) as exc:
        raise RuntimeError(f"{SERVING_PROCESS_ARG} is started by --processes only") from exc
    if not isinstance(start, ChildStart):
        raise RuntimeError(f"{SERVING_PROCESS_ARG} is started by --processes only")
    return start


@contextlib.contextmanager
def on_signals(signals: Sequence[signal.Signals], callback: Callable[[], object]) -> Iterator[None]:
    """Calls callback on each of signals, in the running loop, while the block runs.

    The handlers are removed as the block ends, while the loop is still open: asyncio.run
    closes the loop's wakeup socket before it removes them, and a signal in between (a
    supervisor's SIGTERM to a process failing to start) printed an OSError traceback.
    """
    loop = asyncio.get_running_loop()
    for sig in signals:
        loop.add_signal_handler(sig, callback)
    try:
        yield
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)


def die_with_supervisor(supervisor_pid: int) -> None:
    """Asks the kernel for SIGTERM when the supervisor dies (PR_SET_PDEATHSIG), so a serving
    process drains and exits rather than outliving a killed supervisor.

    Raises:
        RuntimeError: the supervisor is already gone, or prctl failed.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        raise RuntimeError(f"prctl(PR_SET_PDEATHSIG): {os.strerror(ctypes.get_errno())}")
    # The supervisor may have died before the call: then we are a child of init already.
    if os.getppid() != supervisor_pid:
        raise RuntimeError("the supervisor exited before this process started")


def hold_port(listen: str) -> tuple[list[socket.socket], int]:
    """Binds the gRPC address without listening, so no other program can take the port while
    the serving processes start (nor after one exits), and picks the port when it is 0.

    The sockets bind without SO_REUSEPORT, which fails if anything holds the port already
    (another broker too), and set it afterwards, which lets the serving processes, binding
    with SO_REUSEPORT as the same user, join. A socket that never listens takes no
    connections.

    Raises:
        RuntimeError: the address cannot be bound (in use, or not this host's).
    """
    host, _, port_text = listen.rpartition(":")
    host = host.strip("[]")
    try:
        addresses = socket.getaddrinfo(
            host or None, int(port_text), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except (OSError, ValueError) as exc:
        raise RuntimeError(f"cannot listen on {listen}: {exc}") from None
    held: list[socket.socket] = []
    port = int(port_text)
    try:
        for family, kind, proto, _, address in dict.fromkeys(addresses):
            sock = socket.socket(family, kind, proto)
            held.append(sock)
            sock.bind((address[0], port, *address[2:]))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            port = int(sock.getsockname()[1])  # the one port 0 picked, for every address
    except OSError as exc:
        for sock in held:
            sock.close()
        raise RuntimeError(f"cannot listen on {listen}: {exc.strerror or exc}") from None
    return held, port


class Supervisor:
    """Runs `settings.processes` serving processes until SIGTERM/SIGINT or until one exits.

    Args:
        settings: The broker's settings; every serving process runs with them, on the port
            the supervisor fixed and the Redis it resolved.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.children: list[asyncio.subprocess.Process] = []
        self._stop = asyncio.Event()

    async def run(self) -> int:
        """Returns the exit code: 0 after a requested stop, else non-zero (module docstring)."""
        if not sys.platform.startswith("linux"):
            log.error("cannot start: --processes above 1 needs Linux (SO_REUSEPORT balancing)")
            return CANNOT_START
        with (
            on_signals((signal.SIGINT, signal.SIGTERM), self._stop.set),
            contextlib.ExitStack() as cleanup,
        ):
            try:
                settings, peer_dir = self._prepare(cleanup)
            except RuntimeError as exc:
                log.error("cannot start: %s", exc)
                return CANNOT_START
            return await self._serve(settings, peer_dir)

    def _prepare(self, cleanup: contextlib.ExitStack) -> tuple[Settings, Path]:
        """Fixes the port and the Redis URL, and makes the directory for the processes'
        sockets; undone by cleanup, in reverse order.

        Raises:
            RuntimeError: any of them failed.
        """
        s = self.settings
        held, port = hold_port(s.listen)
        for sock in held:
            cleanup.callback(sock.close)
        url = s.read_redis_url()
        if url is None:
            embedded = EmbeddedRedis(s.data_dir)
            embedded.start()
            cleanup.callback(embedded.stop)
            url = embedded.url
        try:
            peer_dir = Path(tempfile.mkdtemp(prefix="taskbroker-"))  # mode 0700
        except OSError as exc:
            raise RuntimeError(
                f"cannot make a directory in {tempfile.gettempdir()}: {exc}"
            ) from None
        cleanup.callback(shutil.rmtree, peer_dir, ignore_errors=True)
        listen = f"{s.listen.rpartition(':')[0]}:{port}"
        return replace(s, listen=listen, redis_url=url, redis_url_file=None), peer_dir

    async def _serve(self, settings: Settings, peer_dir: Path) -> int:
        count = settings.processes
        try:
            for index in range(count):
                slot = ProcessSlot(index=index, count=count, peer_dir=peer_dir)
                self.children.append(await self._spawn(ChildStart(settings, slot, os.getpid())))
            log.info(
                "%d serving processes on %s (pids %s); the first serves HTTP",
                count,
                settings.listen,
                ", ".join(str(c.pid) for c in self.children),
            )
            code = await self._watch()
        finally:
            code_after_stop = await self._stop_children()
        return code or code_after_stop

    async def _spawn(self, start: ChildStart) -> asyncio.subprocess.Process:
        child = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "broker", SERVING_PROCESS_ARG, stdin=asyncio.subprocess.PIPE
        )
        assert child.stdin is not None  # PIPE
        child.stdin.write(pickle.dumps(start))
        await child.stdin.drain()
        child.stdin.close()
        await child.stdin.wait_closed()
        return child

    async def _watch(self) -> int:
        """Waits for a stop request (returns 0) or for a child to exit (returns its code)."""
        stop = asyncio.create_task(self._stop.wait())
        exits = {asyncio.create_task(c.wait()): c for c in self.children}
        try:
            done, _ = await asyncio.wait({stop, *exits}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (stop, *exits):
                task.cancel()
        if stop in done:
            log.info("stopping %d serving processes", len(self.children))
            return 0
        ended = next(exits[t] for t in exits if t in done)
        index = self.children.index(ended)
        log.error(
            "serving process %d (pid %d) exited with code %s; stopping the others",
            index,
            ended.pid,
            ended.returncode,
        )
        return CANNOT_START if ended.returncode == CANNOT_START else 1

    async def _stop_children(self) -> int:
        """SIGTERM to every child still running, then waits for all (SIGKILL past the grace).
        Returns 0 when every child that was asked to stop exited 0."""
        asked = [c for c in self.children if c.returncode is None]
        for child in asked:
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(self.settings.shutdown_grace_s + STOP_SLACK_S):
                await asyncio.gather(*(c.wait() for c in self.children))
        except TimeoutError:
            for child in self.children:
                if child.returncode is None:
                    log.error("serving process pid %d did not stop; killed", child.pid)
                    child.kill()
            await asyncio.gather(*(c.wait() for c in self.children))
        # -SIGTERM: one still starting, before it handles the signal; it had nothing to drain.
        failed = [c for c in asked if c.returncode not in (0, -signal.SIGTERM)]
        for child in failed:
            log.error("serving process pid %d exited with %s", child.pid, child.returncode)
        return 1 if failed else 0
