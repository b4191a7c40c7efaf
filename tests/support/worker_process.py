"""An SDK worker in a process of its own, so a test can SIGKILL, SIGSTOP or SIGTERM just it.

`WorkerProcess(...)` runs `python -m tests.support.worker_process ...` (the `__main__` block
below): a `taskbroker.Worker` against a broker target whose handlers behave as a test asks:

- `ok`: sleep `sleep` (default 5 ms), then return the worker's id (stored as the task's result,
  so a test can tell which worker completed a task);
- `sleep`: the same with a long default sleep (60 s), to kill or pause a worker mid-task; like a
  careless handler it ignores `ctx.cancelled`;
- `fail`: raise `PoisonError("attempt <n> failed")` on every attempt;
- `crash`: end the whole process with `os._exit(CRASH_EXIT_CODE)` inside the handler.

The process writes a history file (see `tests.support.history`): a `Delivered` record when a
handler starts (task id, lease id, attempt from the `TaskContext`), a `Settled` record with the
broker's answer to each ack and nack, and, on a graceful exit, a `WorkerExit` record with the
worker's `processed` and `stale_settlements` counters. The SDK has no public per-settlement
callback, so `Settled` records come from a wrapper around the worker session's private
`_report` method, which is handed every settlement's `SettleResult`; if the SDK drops that method,
the process refuses to start instead of recording nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Final, Literal, TypeAlias, get_args

from taskbroker import Client, Handler, TaskContext, Worker, handler
from taskbroker._handler import HandlerOutcome
from taskbroker._task_run import TaskRun, TaskRunner
from taskbroker.v1 import lease_pb2
from tests.support.history import HistoryWriter, SettleKind, SettleOutcome

__all__ = ["CRASH_EXIT_CODE", "HandlerMode", "PoisonError", "WorkerProcess"]

HandlerMode: TypeAlias = Literal["ok", "sleep", "fail", "crash"]

#: The exit status of a worker whose `crash` handler ended it.
CRASH_EXIT_CODE: Final = 3
#: Handler sleep when none is given.
DEFAULT_SLEEP: Final[Mapping[HandlerMode, timedelta]] = {
    "ok": timedelta(milliseconds=5),
    "sleep": timedelta(seconds=60),
}

_ROOT: Final = Path(__file__).resolve().parents[2]
_KILL_WAIT_S: Final = 10.0

# Worker processes still running; killed at interpreter exit so a failed run leaves none behind.
_LIVE: set[WorkerProcess] = set()


class PoisonError(Exception):
    """What a `fail` handler raises."""


class WorkerProcess:
    """A worker process, started at construction.

    Args:
        target: The broker's "host:port".
        history: The JSONL history file the worker appends to; its log goes next to it
            (`<history>.log`).
        worker_id: Names the worker to the broker and in the history.
        handlers: Task type -> handler mode.
        queues: Queues to take tasks from.
        concurrency: Most tasks at once (the worker's credits).
        lease: Lease length the worker asks for.
        sleep: How long `ok` and `sleep` handlers sleep. None: the mode's default.
        shutdown_grace: How long in-flight tasks get after SIGTERM.
    """

    def __init__(
        self,
        target: str,
        history: Path,
        *,
        worker_id: str,
        handlers: Mapping[str, HandlerMode],
        queues: Sequence[str] = ("jobs",),
        concurrency: int = 1,
        lease: timedelta = timedelta(seconds=30),
        sleep: timedelta | None = None,
        shutdown_grace: timedelta = timedelta(seconds=2),
    ) -> None:
        self.worker_id = worker_id
        self.history = history
        self.log = history.with_name(history.name + ".log")
        command = [
            sys.executable, "-m", "tests.support.worker_process",
            "--target", target,
            "--history", str(history),
            "--worker-id", worker_id,
            "--concurrency", str(concurrency),
            "--lease-ms", str(_ms(lease)),
            "--shutdown-grace-ms", str(_ms(shutdown_grace)),
        ]  # fmt: skip
        command += [arg for q in queues for arg in ("--queue", q)]
        command += [arg for t, mode in handlers.items() for arg in ("--handler", f"{t}={mode}")]
        if sleep is not None:
            command += ["--sleep-ms", str(_ms(sleep))]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_ROOT), env.get("PYTHONPATH")]))
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                command, cwd=_ROOT, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out
            )
        _LIVE.add(self)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def returncode(self) -> int | None:
        """The exit status (negative: killed by that signal), or None while running."""
        code = self.process.poll()
        if code is not None:
            _LIVE.discard(self)
        return code

    def _signal(self, sig: signal.Signals) -> None:
        if self.returncode is None:  # never signal a pid that may have been reused
            self.process.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL, and reap the process (a killed process exits at once)."""
        self._signal(signal.SIGKILL)
        self.process.wait(_KILL_WAIT_S)
        _LIVE.discard(self)

    def stop(self) -> None:
        """SIGSTOP: the process freezes; its connections stay open."""
        self._signal(signal.SIGSTOP)

    def cont(self) -> None:
        """SIGCONT: a stopped process runs on."""
        self._signal(signal.SIGCONT)

    def terminate(self, timeout_s: float = 15.0) -> int:
        """SIGTERM (graceful shutdown), then wait; SIGKILL if it takes longer than `timeout_s`.

        This blocks: do not call it on the event loop of an in-process broker, which the worker
        needs in order to shut down; use `aterminate` there.

        Returns:
            The exit status.

        Raises:
            subprocess.TimeoutExpired: It did not exit within `timeout_s` (it is SIGKILLed then).
        """
        self._signal(signal.SIGTERM)
        self.cont()  # a stopped process would never handle SIGTERM
        try:
            code = self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        _LIVE.discard(self)
        return code

    async def aterminate(self, timeout_s: float = 15.0) -> int:
        """`terminate` for the event loop: SIGTERM, then wait without blocking the loop.

        Returns:
            The exit status.

        Raises:
            TimeoutError: It did not exit within `timeout_s` (it is SIGKILLed then).
        """
        self._signal(signal.SIGTERM)
        self.cont()
        return await self.wait_exit(timeout_s)

    async def wait_exit(self, timeout_s: float) -> int:
        """Waits, without blocking the event loop, until the process exits.

        Returns:
            The exit status.

        Raises:
            TimeoutError: It was still running after `timeout_s` (it is SIGKILLed then).
        """
        deadline = time.monotonic() + timeout_s
        while (code := self.returncode) is None:
            if time.monotonic() > deadline:
                self.kill()
                raise TimeoutError(f"worker {self.worker_id} still running after {timeout_s}s")
            await asyncio.sleep(0.02)
        return code

    def close(self) -> None:
        """SIGKILL the process if it still runs (for test teardown)."""
        if self.returncode is None:
            self.kill()

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError as exc:
            return f"<cannot read {self.log}: {exc}>"

    def __repr__(self) -> str:
        return f"<WorkerProcess {self.worker_id} pid={self.pid} returncode={self.returncode}>"


def _ms(value: timedelta) -> int:
    return round(value.total_seconds() * 1000)


@atexit.register
def _kill_leftovers() -> None:
    for worker in list(_LIVE):
        with contextlib.suppress(Exception):
            worker.close()


# --- the worker process itself ----------------------------------------------------------------


def _make_handler(
    task_type: str,
    mode: HandlerMode,
    sleep_s: float,
    writer: HistoryWriter,
    worker_id: str,
    ended_ns: dict[str, int],
) -> Handler:
    async def run(ctx: TaskContext, payload: bytes) -> bytes:
        writer.delivered(ctx.task_id, ctx.lease_id, ctx.attempt, worker_id)
        try:
            if mode == "crash":
                os._exit(CRASH_EXIT_CODE)
            if mode == "fail":
                raise PoisonError(f"attempt {ctx.attempt} failed")
            await asyncio.sleep(sleep_s)
            return worker_id.encode()
        finally:
            ended_ns[ctx.lease_id] = time.monotonic_ns()  # its settlement is sent after this

    return handler(task_type)(run)


def _settle_outcome(result: lease_pb2.SettleResult) -> SettleOutcome:
    if result.outcome == lease_pb2.SETTLE_OUTCOME_OK:
        return "already" if result.already_settled else "ok"
    if result.outcome in (lease_pb2.SETTLE_OUTCOME_LEASE_STALE, lease_pb2.SETTLE_OUTCOME_NOT_FOUND):
        return "stale"  # both refused, as the SDK's stale_settlements counts them
    return "unknown"


def _record_settlements(writer: HistoryWriter, worker_id: str, ended_ns: dict[str, int]) -> None:
    """Wraps the SDK's per-settlement report (private) to record each SettleResult, with the
    time its handler ended (from `ended_ns`, by lease id)."""
    report = getattr(TaskRunner, "_report", None)
    if report is None:
        raise RuntimeError(
            "taskbroker._task_run.TaskRunner._report is gone: cannot record settlements"
        )

    def recording_report(
        self: TaskRunner, run: TaskRun, outcome: HandlerOutcome, result: lease_pb2.SettleResult
    ) -> None:
        report(self, run, outcome, result)
        kind: SettleKind = "ack" if outcome.kind == "ack" else "nack"
        lease_id = run.delivery.lease_id
        writer.settled(
            run.delivery.task.id,
            lease_id,
            kind,
            _settle_outcome(result),
            worker_id,
            ended_ns.pop(lease_id, None),
        )

    setattr(TaskRunner, "_report", recording_report)  # noqa: B010 (a method, mypy refuses =)


def _parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Run a taskbroker worker for fault tests.")
    parser.add_argument("--target", required=True)
    parser.add_argument("--history", type=Path, required=True)
    parser.add_argument("--worker-id", required=True)
    parser.add_argument("--queue", action="append", required=True)
    parser.add_argument("--handler", action="append", required=True, help="TYPE=MODE")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--lease-ms", type=int, default=30_000)
    parser.add_argument("--sleep-ms", type=int)
    parser.add_argument("--shutdown-grace-ms", type=int, default=2_000)
    return parser.parse_args(argv)


def _modes(specs: Sequence[str]) -> dict[str, HandlerMode]:
    modes: dict[str, HandlerMode] = {}
    for spec in specs:
        task_type, _, mode = spec.partition("=")
        if mode not in get_args(HandlerMode):
            raise SystemExit(f"--handler {spec!r}: mode must be one of {get_args(HandlerMode)}")
        modes[task_type] = mode  # type: ignore[assignment]
    return modes


async def _serve(args: argparse.Namespace) -> None:
    worker_id: str = args.worker_id
    with HistoryWriter(args.history) as writer:
        ended_ns: dict[str, int] = {}
        _record_settlements(writer, worker_id, ended_ns)
        handlers = []
        for task_type, mode in _modes(args.handler).items():
            default = DEFAULT_SLEEP.get(mode, timedelta(0)).total_seconds()
            sleep_s = default if args.sleep_ms is None else args.sleep_ms / 1000
            handlers.append(_make_handler(task_type, mode, sleep_s, writer, worker_id, ended_ns))
        async with Client(args.target) as client:
            worker = Worker(
                client,
                queues=args.queue,
                handlers=handlers,
                concurrency=args.concurrency,
                lease_duration=timedelta(milliseconds=args.lease_ms),
                worker_id=worker_id,
                shutdown_grace=timedelta(milliseconds=args.shutdown_grace_ms),
            )
            await worker.run()  # until SIGTERM
            writer.worker_exit(worker_id, worker.processed, worker.stale_settlements)


def main(argv: Sequence[str] | None = None) -> None:
    args = _parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        level=logging.INFO, format=f"%(asctime)s {args.worker_id} %(levelname)s %(message)s"
    )
    asyncio.run(_serve(args))


if __name__ == "__main__":
    main()
