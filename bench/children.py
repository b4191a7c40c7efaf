"""Child: the parent side of a bench subprocess (`python -m bench.<module>`), with its JSON-line
events collected as they come, so scenarios can wait for "ready" or "started" with a deadline."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from bench.baseline import Side

ROOT: Final = Path(__file__).resolve().parents[1]

Event = dict[str, Any]


def open_log(path: Path) -> IO[bytes]:
    """Opens a child's log for appending (a plain function: async code must not open files)."""
    return path.open("ab")


class ChildFailed(RuntimeError):
    """A child exited, or did not say what was awaited in time."""


class Child:
    """A running `python -m <module>` child whose stdout is a stream of JSON events."""

    def __init__(self, proc: asyncio.subprocess.Process, name: str, log: Path) -> None:
        self.proc = proc
        self.name = name
        self.log = log
        self.events: list[Event] = []
        self._changed = asyncio.Event()
        self._reader = asyncio.create_task(self._read(), name=f"{name} stdout")

    @classmethod
    async def start(
        cls, module: str, args: Sequence[str], *, name: str, log_dir: Path, side: Side
    ) -> Child:
        """Starts the child as `side` runs it (the repository, or a baseline, on its path); its
        stderr goes to a log file."""
        env = side.env(os.environ, side.child_path)
        log = log_dir / f"{name}.log"
        stderr = open_log(log)
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", module, *args,
                cwd=side.child_cwd, env=env, stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE, stderr=stderr,
            )  # fmt: skip
        finally:
            stderr.close()
        return cls(proc, name, log)

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            with contextlib.suppress(ValueError):
                self.events.append(json.loads(line))
            self._changed.set()
        self._changed.set()  # EOF: waiters re-check and see the exit

    async def wait_event(
        self, name: str, timeout_s: float, where: Callable[[Event], bool] = lambda e: True
    ) -> Event:
        """The first event called `name` that satisfies `where`, waiting for it if need be.

        Raises:
            ChildFailed: The child ended without it, or it did not come within timeout_s.
        """
        try:
            async with asyncio.timeout(timeout_s):
                while True:
                    for event in self.events:
                        if event.get("event") == name and where(event):
                            return event
                    if self._reader.done():
                        raise ChildFailed(f"{self.name} exited without {name!r}: {self.tail()}")
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            raise ChildFailed(f"{self.name}: no {name!r} within {timeout_s:g}s") from None

    async def send(self, message: Event) -> None:
        """Writes one JSON line to the child's stdin."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(message).encode() + b"\n")
        await self.proc.stdin.drain()

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Sends a signal unless the child has already exited."""
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)

    async def stop(self, timeout_s: float = 10.0) -> int:
        """SIGTERM, then SIGKILL after timeout_s. Returns the exit code."""
        self.kill(signal.SIGTERM)
        try:
            async with asyncio.timeout(timeout_s):
                code = await self.proc.wait()
        except TimeoutError:
            self.kill()
            code = await self.proc.wait()
        await asyncio.gather(self._reader, return_exceptions=True)
        return code

    async def reap(self) -> None:
        """SIGKILL and wait (cleanup after a failure)."""
        self.kill()
        await self.proc.wait()
        await asyncio.gather(self._reader, return_exceptions=True)

    def tail(self, lines: int = 15) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return "<no log>"
        return "\n".join(text.splitlines()[-lines:]) or "<empty log>"
