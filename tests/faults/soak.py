"""Soak: many keyed tasks through two brokers and several workers while processes die.

    python -m tests.faults.soak [--tasks 100000] [--minutes 15] [--workers 4] [--seed N] [--rate R]

It starts its own redis-server (AOF, fsync always), two broker processes (`python -m broker`) on
that Redis, and worker processes (tests.support.worker_process) balanced over both brokers. The
producer enqueues the tasks in keyed batches, spread over about half of the time budget (or at
--rate tasks per second), and resends a failed batch with the same keys until it is acknowledged.
Meanwhile a chaos loop kills workers with SIGKILL (each is replaced at once) and restarts brokers
on their ports, after SIGTERM (a graceful drain) or SIGKILL. Then the queue is drained with every
process up, the workers stop gracefully, every acknowledged task's final state is read, and the
history checker (tests.support.history) runs.

It prints the checker's table and the throughput, and exits 1 if a task was lost, completed
twice, settled through a stale lease or delivered without being enqueued, if the queue did not
drain within the budget, or if a worker exited without being killed. Everything runs within
--minutes (plus a few seconds to stop processes); its files go to a temporary directory that is
removed after a clean run and kept (its path printed) otherwise.

Not a pytest module (no test_ prefix): it is the nightly tier of RELIABILITY.md 7.1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Final

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from taskbroker import Client, NewTask, QueueStats, TaskbrokerError
from tests.support.history import History, HistoryWriter, Report
from tests.support.redis_server import RedisServer, free_port
from tests.support.worker_process import WorkerProcess

QUEUE: Final = "soak"
HOST: Final = "127.0.0.1"
_ROOT: Final = Path(__file__).resolve().parents[2]

#: Tasks per Enqueue call.
BATCH: Final = 100
#: Share of the budget the enqueues are spread over (the chaos runs as long as they do).
ENQUEUE_SHARE: Final = 0.5
#: Worker settings: handlers long enough that a killed worker takes tasks with it, leases short
#: enough that a killed broker's leases come back soon.
WORKER_CONCURRENCY: Final = 32
WORKER_LEASE: Final = timedelta(seconds=5)
HANDLER_SLEEP: Final = timedelta(milliseconds=200)
#: Chaos: seconds between two worker kills, and between two broker restarts.
WORKER_KILL_EVERY_S: Final = (0.5, 2.0)
BROKER_RESTART_EVERY_S: Final = (3.0, 8.0)
#: Share of broker restarts done with SIGKILL rather than SIGTERM.
BROKER_HARD_KILL_SHARE: Final = 0.3
#: A restarted broker's shutdown grace, chosen at random: a short one hands running tasks back
#: before their handlers finish, so their acks come late and must be refused as stale.
BROKER_GRACE_S: Final = (0.05, 1.0)
#: Consecutive empty Stats reads (pending, scheduled and leased all 0) that mean drained.
EMPTY_READS: Final = 5
#: Final-state reads in flight at once.
READ_CONCURRENCY: Final = 200
#: Retryable codes for the producer, the drain and the final reads.
TRANSIENT: Final = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}
)


class Deadline(Exception):
    """The time budget ran out."""


class SoakBroker:
    """A broker process on a fixed port: restarting it brings it back on the same port."""

    def __init__(self, name: str, directory: Path, redis_url: str) -> None:
        self.name = name
        self.port = free_port()
        self.target = f"{HOST}:{self.port}"
        self.log = directory / f"broker-{name}.log"
        self._data_dir = directory / f"broker-{name}-data"
        self._redis_url = redis_url
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, grace_s: float = 1.0) -> None:
        """Starts the process; `grace_s` is its shutdown grace (TASKBROKER_SHUTDOWN_GRACE_S)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("TASKBROKER_")}
        env |= {
            "TASKBROKER_LISTEN": self.target,
            "TASKBROKER_HTTP_LISTEN": "127.0.0.1:0",
            "TASKBROKER_REDIS_URL": self._redis_url,
            "TASKBROKER_DATA_DIR": str(self._data_dir),
            "TASKBROKER_SHUTDOWN_GRACE_S": str(grace_s),
            "TASKBROKER_LOG_LEVEL": "WARNING",
        }
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_ROOT), env.get("PYTHONPATH")]))
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "broker"],
                cwd=_ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def wait_serving(self, timeout_s: float = 20.0) -> None:
        """Blocks until health answers SERVING.

        Raises:
            RuntimeError: The process exited, or did not serve within `timeout_s`.
        """
        deadline = time.monotonic() + timeout_s
        with grpc.insecure_channel(self.target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if self.process is None or self.process.poll() is not None:
                    raise RuntimeError(f"broker {self.name} exited; see {self.log}")
                with contextlib.suppress(grpc.RpcError):
                    reply = health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                time.sleep(0.05)
        raise RuntimeError(f"broker {self.name} not SERVING after {timeout_s:g}s; see {self.log}")

    def stop(self, *, hard: bool, timeout_s: float = 20.0) -> None:
        """SIGKILL, or SIGTERM (a graceful drain) with SIGKILL after `timeout_s`."""
        process = self.process
        if process is None or process.poll() is not None:
            return
        if hard:
            process.kill()
        else:
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout_s)

    def restart(self, *, hard: bool, grace_s: float) -> None:
        self.stop(hard=hard)
        self.start(grace_s)
        self.wait_serving()


@dataclass
class Counts:
    """What the producer and the chaos did."""

    worker_kills: int = 0
    broker_terms: int = 0
    broker_kills: int = 0
    enqueue_retries: int = 0
    acked: int = 0
    unexpected_exits: list[str] = field(default_factory=list)


class Workers:
    """`size` worker slots; a killed worker is replaced by a new process with a new name."""

    def __init__(self, target: str, directory: Path, size: int) -> None:
        self._target = target
        self._dir = directory
        self._generation = [0] * size
        self.slots: list[WorkerProcess] = [self._spawn(n) for n in range(size)]
        self.all: list[WorkerProcess] = list(self.slots)
        self._killed: set[int] = set()

    def _spawn(self, slot: int) -> WorkerProcess:
        self._generation[slot] += 1
        worker_id = f"w{slot}.{self._generation[slot]}"
        return WorkerProcess(
            self._target,
            self._dir / f"{worker_id}.jsonl",
            worker_id=worker_id,
            handlers={"job": "ok"},
            queues=[QUEUE],
            concurrency=WORKER_CONCURRENCY,
            lease=WORKER_LEASE,
            sleep=HANDLER_SLEEP,
            shutdown_grace=timedelta(seconds=2),
        )

    def kill_and_replace(self, slot: int) -> None:
        worker = self.slots[slot]
        self._killed.add(worker.pid)
        worker.kill()
        self.slots[slot] = self._spawn(slot)
        self.all.append(self.slots[slot])

    def unexpected_exits(self) -> list[str]:
        """Workers that ended although nobody killed or stopped them."""
        return [
            f"{w.worker_id} (exit {w.returncode}, log {w.log})"
            for w in self.slots
            if w.returncode is not None and w.pid not in self._killed
        ]

    async def stop(self) -> list[str]:
        """Stops every running worker gracefully; returns those that did not exit with 0."""
        codes = await asyncio.gather(
            *(w.aterminate(30) for w in self.slots), return_exceptions=True
        )
        return [
            f"{w.worker_id} ({code!r}, log {w.log})"
            for w, code in zip(self.slots, codes, strict=True)
            if code != 0
        ]

    def close(self) -> None:
        for worker in self.all:
            worker.close()


def _transient(exc: TaskbrokerError) -> bool:
    return exc.code in TRANSIENT


async def produce(
    client: Client,
    writer: HistoryWriter,
    total: int,
    spread_s: float,
    hard_deadline: float,
    counts: Counts,
) -> None:
    """Enqueues `total` keyed tasks in batches spread over `spread_s` seconds; a batch that
    fails is resent with the same keys until acknowledged (the keys make a resend harmless).

    Raises:
        Deadline: A batch was still unacknowledged at `hard_deadline`.
    """
    started = time.monotonic()
    for first in range(0, total, BATCH):
        due = started + spread_s * first / total
        await asyncio.sleep(max(0.0, due - time.monotonic()))
        keys = [f"soak-{i}" for i in range(first, min(first + BATCH, total))]
        batch = [NewTask(QUEUE, "job", key.encode(), idempotency_key=key) for key in keys]
        while True:
            if time.monotonic() > hard_deadline:
                raise Deadline(f"batch from soak-{first} unacknowledged at the deadline")
            try:
                results = await client.enqueue_many(batch)
            except TaskbrokerError as exc:
                if not _transient(exc):
                    raise
                counts.enqueue_retries += 1
                await asyncio.sleep(0.1)
                continue
            break
        for result in results:
            writer.enqueued(result.task_id)
        counts.acked += len(results)


async def chaos(
    brokers: Sequence[SoakBroker],
    workers: Workers,
    rng: random.Random,
    counts: Counts,
    stop: asyncio.Event,
    journal: Path,
) -> None:
    """Kills workers and restarts brokers until `stop` is set (never leaving a broker down);
    each action is appended to `journal`, stamped with time.monotonic_ns like the histories."""
    now = time.monotonic

    def note(text: str) -> None:
        with journal.open("a") as out:
            out.write(f"{time.monotonic_ns()} {text}\n")

    next_kill = now() + rng.uniform(*WORKER_KILL_EVERY_S)
    next_restart = now() + rng.uniform(*BROKER_RESTART_EVERY_S)
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), max(0.0, min(next_kill, next_restart) - now()))
            return
        if now() >= next_kill:
            slot = rng.randrange(len(workers.slots))
            note(f"kill -9 worker {workers.slots[slot].worker_id}")
            workers.kill_and_replace(slot)
            counts.worker_kills += 1
            next_kill = now() + rng.uniform(*WORKER_KILL_EVERY_S)
        if now() >= next_restart:
            broker = rng.choice(brokers)
            hard = rng.random() < BROKER_HARD_KILL_SHARE
            grace_s = rng.choice(BROKER_GRACE_S)
            note(f"restart broker {broker.name} after {'SIGKILL' if hard else 'SIGTERM'}")
            await asyncio.to_thread(broker.restart, hard=hard, grace_s=grace_s)
            note(f"broker {broker.name} serving again (shutdown grace now {grace_s:g} s)")
            if hard:
                counts.broker_kills += 1
            else:
                counts.broker_terms += 1
            next_restart = now() + rng.uniform(*BROKER_RESTART_EVERY_S)


async def stats(client: Client, deadline: float) -> QueueStats:
    while True:
        try:
            (queue,) = await client.stats(QUEUE)
        except TaskbrokerError as exc:
            if not _transient(exc) or time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)
            continue
        return queue


async def drain(client: Client, deadline: float) -> bool:
    """Waits until the queue reads empty EMPTY_READS times in a row; False at the deadline."""
    empty = 0
    while time.monotonic() < deadline:
        s = await stats(client, deadline)
        empty = empty + 1 if s.pending == s.scheduled == s.leased == 0 else 0
        if empty >= EMPTY_READS:
            return True
        await asyncio.sleep(0.2)
    return False


async def final_states(client: Client, task_ids: set[str], deadline: float) -> dict[str, str]:
    """Every task's state name, read with GetTask."""
    gate = asyncio.Semaphore(READ_CONCURRENCY)

    async def read(task_id: str) -> tuple[str, str]:
        async with gate:
            while True:
                try:
                    return task_id, (await client.get_task(task_id)).state.name
                except TaskbrokerError as exc:
                    if not _transient(exc) or time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.1)

    return dict(await asyncio.gather(*(read(t) for t in task_ids)))


@dataclass(frozen=True)
class Outcome:
    """What a run measured."""

    report: Report
    states: dict[str, str]
    drained: bool
    enqueue_s: float
    drained_s: float
    check_s: float
    stuck: list[str]


async def soak(args: argparse.Namespace, directory: Path, counts: Counts) -> Outcome:
    """Runs the soak in `directory`.

    Raises:
        Deadline: The producer could not get a batch acknowledged within the budget.
        RuntimeError: A broker did not start.
        TaskbrokerError: A call failed with a non-transient error.
    """
    started = time.monotonic()
    deadline = started + args.minutes * 60
    # Stopping the workers, reading the final states and checking take about 1 s per 1,000 tasks.
    read_reserve_s = 10 + args.tasks / 1000
    rng = random.Random(args.seed)

    with RedisServer(appendonly=True, appendfsync="always") as redis_server:
        brokers = [SoakBroker(name, directory, redis_server.url) for name in ("a", "b")]
        producer = HistoryWriter(directory / "producer.jsonl")
        workers: Workers | None = None
        try:
            for broker in brokers:
                broker.start()
            for broker in brokers:
                await asyncio.to_thread(broker.wait_serving)
            target = "ipv4:" + ",".join(b.target for b in brokers)
            workers = Workers(target, directory, args.workers)
            async with Client(target, timeout=5) as client:
                # Enqueue, with chaos for as long as the enqueues run.
                if args.rate > 0:
                    spread_s = args.tasks / args.rate
                else:
                    spread_s = ENQUEUE_SHARE * args.minutes * 60 - (time.monotonic() - started)
                enqueue_started = time.monotonic()
                stop_chaos = asyncio.Event()
                chaos_task = asyncio.create_task(
                    chaos(brokers, workers, rng, counts, stop_chaos, directory / "chaos.log")
                )
                try:
                    await produce(
                        client,
                        producer,
                        args.tasks,
                        max(0.0, spread_s),
                        deadline - read_reserve_s,
                        counts,
                    )
                    stop_chaos.set()
                    await chaos_task  # finishes the restart under way, if any
                finally:
                    chaos_task.cancel()
                    await asyncio.gather(chaos_task, return_exceptions=True)
                enqueue_s = time.monotonic() - enqueue_started
                for broker in brokers:
                    await asyncio.to_thread(broker.wait_serving)

                drained = await drain(client, deadline - read_reserve_s)
                drained_s = time.monotonic() - enqueue_started
                check_started = time.monotonic()
                counts.unexpected_exits = workers.unexpected_exits()
                stuck = await workers.stop()
                history = History.load([producer.path, *(w.history for w in workers.all)])
                task_ids = {r.task_id for r in history.enqueues}
                states = await final_states(client, task_ids, deadline)
                report = history.check(states)
                check_s = time.monotonic() - check_started
                return Outcome(report, states, drained, enqueue_s, drained_s, check_s, stuck)
        finally:
            producer.close()
            if workers is not None:
                workers.close()
            for broker in brokers:
                broker.stop(hard=False)


def _say(line: str = "") -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _rate(count: int, seconds: float) -> str:
    return f"{count} in {seconds:.1f} s = {count / seconds if seconds > 0 else 0.0:,.0f}/s"


def _summary(args: argparse.Namespace, outcome: Outcome, counts: Counts, took_s: float) -> bool:
    """Prints the checker's table, the throughput and the chaos; returns whether all passed."""
    report = outcome.report
    _say(report.render())
    _say()
    states = Counter(outcome.states.values())
    _say("throughput")
    _say(f"  enqueued (paced over the chaos)  {_rate(counts.acked, outcome.enqueue_s)}")
    _say(
        f"  succeeded, start to drained      {_rate(states['SUCCEEDED'], outcome.drained_s)}"
        f"  (dead-lettered {states['DEAD']})"
    )
    _say(f"  deliveries                       {_rate(report.deliveries, outcome.drained_s)}")
    _say(
        f"chaos: {counts.worker_kills} workers killed -9; brokers restarted "
        f"{counts.broker_terms}x after SIGTERM, {counts.broker_kills}x after SIGKILL; "
        f"{counts.enqueue_retries} enqueue calls resent"
    )
    _say(
        f"elapsed {took_s:.1f} s of {args.minutes * 60:g} s "
        f"(stopping workers, reading final states and checking: {outcome.check_s:.1f} s)"
    )

    problems: list[str] = []
    if report.lost or report.completed_twice or report.stale_accepted or report.unexpected:
        problems.append(
            "the checker found lost, twice-completed, stale-settled or unexpected tasks"
        )
    if not outcome.drained:
        problems.append("the queue did not drain within the budget")
    if counts.acked != args.tasks:
        problems.append(f"only {counts.acked} of {args.tasks} tasks were acknowledged")
    problems += [f"worker exited by itself: {w}" for w in counts.unexpected_exits]
    problems += [f"worker did not stop cleanly: {w}" for w in outcome.stuck]
    for problem in problems:
        _say(f"FAIL: {problem}")
    return not problems


def _parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.faults.soak", description=__doc__)
    parser.add_argument("--tasks", type=int, default=100_000, help="tasks to enqueue")
    parser.add_argument("--minutes", type=float, default=15.0, help="time budget for the run")
    parser.add_argument("--workers", type=int, default=4, help="worker processes")
    parser.add_argument("--seed", type=int, default=None, help="seed for the chaos")
    parser.add_argument(
        "--rate",
        type=float,
        default=0.0,
        help="enqueues per second (default: spread over half of the budget)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the files of a clean run")
    args = parser.parse_args(argv)
    if args.tasks < 1 or args.minutes <= 0 or args.workers < 1 or args.rate < 0:
        parser.error("--tasks, --minutes and --workers must be positive, --rate not negative")
    if args.seed is None:
        args.seed = random.randrange(2**32)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(sys.argv[1:] if argv is None else argv)
    directory = Path(tempfile.mkdtemp(prefix="taskbroker-soak-"))
    _say(
        f"soak: {args.tasks} tasks, {args.workers} workers, 2 brokers, "
        f"{args.minutes:g} min, seed {args.seed}, files in {directory}"
    )
    started = time.monotonic()
    counts = Counts()
    try:
        outcome = asyncio.run(soak(args, directory, counts))
    except (Deadline, RuntimeError, TaskbrokerError) as exc:
        _say(f"FAIL: {type(exc).__name__}: {exc}")
        ok = False
    else:
        ok = _summary(args, outcome, counts, time.monotonic() - started)
    if ok and not args.keep:
        shutil.rmtree(directory, ignore_errors=True)
    else:
        _say(f"files kept in {directory}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
