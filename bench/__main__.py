"""`python -m bench` (`make bench`): start Redis and a broker, run the scenarios, print the table
and write bench/results/<UTC timestamp>.json."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console

from bench import procfs
from bench.baseline import CURRENT, BaselineError, Side, baseline_side
from bench.context import Ctx, Options
from bench.env import BenchEnv
from bench.machine import machine_info
from bench.report import RESULTS_DIR, Compared, comparison_json, print_report, write_json
from bench.results import ScenarioResult
from bench.scenarios import SCENARIOS, Scenario, by_name
from bench.scenarios.common import add_floor_ratios
from broker.config import MAX_PROCESSES

#: A scenario still running after this is stopped and reported as failed (each caps its runs
#: well below it; this guards the 10-minute budget against a hang).
SCENARIO_TIMEOUT_S = 240.0
#: Once this long has passed, scenarios make one run only (Ctx.runs), to end within 10 minutes.
BUDGET_S = 540.0
#: Above this share of the machine's CPU used by other processes, a scenario gets a warning.
NOISY_PERCENT = 10.0


def _own_seconds(env: BenchEnv) -> float:
    """CPU time of the bench and everything it started (Redis is a child not yet waited for)."""
    return procfs.own_seconds() + procfs.cpu_seconds(env.redis_server.pid)


@dataclass(frozen=True, slots=True)
class Command:
    """What the command line asks for."""

    options: Options
    scenarios: list[Scenario]
    keep_logs: bool
    #: A git ref to compare against ('' for none).
    baseline: str
    results_dir: Path = RESULTS_DIR


def parse_args(argv: list[str] | None = None) -> Command:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark taskbroker: starts its own redis-server and broker.",
    )
    p.add_argument("--runs", type=int, default=3, help="runs per figure (median, min, max)")
    p.add_argument(
        "--only",
        default="",
        help="comma-separated scenarios: " + ",".join(s.name for s in SCENARIOS),
    )
    p.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    p.add_argument("--concurrency", type=int, default=256, help="handlers per worker process")
    p.add_argument("--unary-procs", type=int, default=2, help="client processes for unary")
    p.add_argument(
        "--broker-processes",
        type=int,
        default=1,
        help="serving processes of the broker (TASKBROKER_PROCESSES); its CPU figures sum them "
        "all, its memory figures (big_enqueue, idle_streams) are the supervisor's only",
    )
    p.add_argument("--keep-logs", action="store_true", help="keep the processes' logs")
    p.add_argument(
        "--baseline",
        metavar="REF",
        default="",
        help="also run this git ref's broker and SDK, interleaved run by run, and report ratios",
    )
    p.add_argument(
        "--results-dir",
        type=Path,
        default=RESULTS_DIR,
        help="where the run's JSON goes (default: bench/results)",
    )
    args = p.parse_args(argv)
    if args.runs < 1:
        p.error("--runs must be at least 1")
    if not 1 <= args.concurrency <= 10_000:
        p.error("--concurrency must be 1 to 10000")
    if args.unary_procs < 1:
        p.error("--unary-procs must be at least 1")
    if not 1 <= args.broker_processes <= MAX_PROCESSES:
        p.error(f"--broker-processes must be 1 to {MAX_PROCESSES}")
    try:
        scenarios = by_name([n.strip() for n in args.only.split(",") if n.strip()])
    except ValueError as exc:
        p.error(str(exc))
    options = Options(
        runs=args.runs,
        quick=args.quick,
        concurrency=args.concurrency,
        unary_procs=args.unary_procs,
        broker_processes=args.broker_processes,
    )
    return Command(options, scenarios, args.keep_logs, args.baseline, args.results_dir)


async def _run_pass(
    env: BenchEnv,
    options: Options,
    scenario: Scenario,
    console: Console,
    deadline: float,
    result: ScenarioResult,
    only_run: int | None = None,
) -> None:
    """Runs a scenario (all its runs, or only `only_run`) on env.side's code into `result`,
    with a fresh broker and an empty Redis. A failure is recorded in result.error."""
    started = time.perf_counter()
    busy0, own0 = procfs.machine_busy_seconds(), _own_seconds(env)
    which = "" if only_run is None else f" run {only_run + 1} on {env.side.label}"
    console.print(f"[bold]{scenario.name}[/bold]{which} ...")
    try:
        await env.flush()
        await env.start_broker(scenario.broker_env)
        async with asyncio.timeout(SCENARIO_TIMEOUT_S):
            await scenario.run(Ctx(env, options, result, deadline, only_run))
    except Exception as exc:
        logging.getLogger("bench").debug("scenario %s failed", scenario.name, exc_info=True)
        result.error = f"{type(exc).__name__}: {exc}"
    finally:
        await env.reap_children()
        await env.stop_broker()
    wall_s = time.perf_counter() - started
    result.wall_s += wall_s
    other_s = procfs.machine_busy_seconds() - busy0 - (_own_seconds(env) - own0)
    other = max(0.0, 100 * other_s / (wall_s * (os.cpu_count() or 1)))
    result.other_cpu_percent = max(result.other_cpu_percent, other)
    status = "[red]failed[/red]" if result.error else "done"
    console.print(f"  {status} in {wall_s:.1f} s")


async def _compare(
    env: BenchEnv,
    options: Options,
    scenario: Scenario,
    console: Console,
    deadline: float,
    baseline: Side,
) -> tuple[ScenarioResult, ScenarioResult]:
    """Runs a scenario run by run on the baseline and on the current code, alternating which
    goes first, so both see the same machine. Returns (current, baseline) results; a side that
    failed makes no more runs, and a scenario that cannot run on a baseline is marked so."""
    current, base = ScenarioResult(scenario.name), ScenarioResult(scenario.name)
    base.skipped = scenario.current_only
    for run_no in range(options.runs):
        if run_no and time.monotonic() > deadline:
            for r in (current, base):
                r.note(f"only {run_no} of {options.runs} runs: the bench was past its time budget")
            break
        order = [(baseline, base), (CURRENT, current)]
        for side, result in order if run_no % 2 == 0 else order[::-1]:
            if result.error is None and not result.skipped:
                env.side = side
                try:
                    await _run_pass(env, options, scenario, console, deadline, result, run_no)
                finally:
                    env.side = CURRENT
    return current, base


async def main(command: Command, baseline: Side | None = None) -> int:
    options, scenarios = command.options, command.scenarios
    # Piped output (make, CI logs) would otherwise be cut at 80 columns.
    console = Console() if sys.stdout.isatty() else Console(width=150)
    started_at = datetime.now(UTC)
    started = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="taskbroker-bench-"))
    env = BenchEnv(workdir, options.broker_processes)
    results: list[ScenarioResult] = []
    base_results: list[ScenarioResult] = []
    try:
        await env.start_redis()
        server = await env.info("server")
        machine = machine_info(str(server.get("redis_version", "?")))
        # Both sides run every scenario: twice the time, for the same number of runs.
        deadline = time.monotonic() + BUDGET_S * (2 if baseline else 1)
        for scenario in scenarios:
            if baseline is None:
                result = ScenarioResult(scenario.name)
                await _run_pass(env, options, scenario, console, deadline, result)
                results.append(result)
            else:
                current, base = await _compare(env, options, scenario, console, deadline, baseline)
                results.append(current)
                base_results.append(base)
    finally:
        await env.close()
    for side_results in (results, base_results):
        add_floor_ratios(side_results)
        for result in side_results:
            if result.other_cpu_percent > NOISY_PERCENT:
                result.note(
                    f"other processes used up to {result.other_cpu_percent:.0f} % of the "
                    "machine's CPU during this scenario: its figures may be low"
                )
    wall_s = time.perf_counter() - started
    procs = f", broker {options.broker_processes} processes" if options.broker_processes > 1 else ""
    title = f"taskbroker bench ({options.runs} run(s){', quick' if options.quick else ''}{procs})"
    compared = None if baseline is None else Compared(baseline.label, base_results)
    print_report(console, results, title, compared)
    document: dict[str, Any] = {
        "started_at": started_at.isoformat(),
        "wall_s": round(wall_s, 1),
        "options": {
            "runs": options.runs,
            "quick": options.quick,
            "concurrency": options.concurrency,
            "unary_procs": options.unary_procs,
            "broker_processes": options.broker_processes,
            "scenarios": [s.name for s in scenarios],
            "baseline": command.baseline or None,
        },
        "machine": machine,
        "scenarios": [r.to_json() for r in results],
    }
    if baseline is not None and compared is not None:
        document["baseline"] = {
            "ref": command.baseline,
            "commit": baseline.commit,
            "scenarios": [r.to_json() for r in base_results],
        }
        document["comparison"] = comparison_json(results, compared)
    path = write_json(document, started_at, command.results_dir)
    failed = any(r.error for r in results)
    if command.keep_logs or failed or any(r.error for r in base_results):
        console.print(f"logs: {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    console.print(f"results: {path}\nwall time: {wall_s:.1f} s")
    return 1 if failed else 0


def run(argv: list[str] | None = None) -> int:
    """The command: prepares the baseline's worktree if one is asked for, runs the bench, and
    removes the worktree again (also after a failure, Ctrl-C or SIGTERM)."""
    command = parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so the processes and the worktree are cleaned up.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        if not command.baseline:
            return asyncio.run(main(command))
        sys.stdout.write(f"preparing baseline {command.baseline} in a temporary worktree ...\n")
        sys.stdout.flush()
        with baseline_side(command.baseline) as side:
            return asyncio.run(main(command, side))
    except BaselineError as exc:
        sys.stderr.write(f"baseline {command.baseline}: {exc}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("interrupted: the bench's processes are stopped")
        sys.stderr.write(" and the baseline's worktree removed\n" if command.baseline else "\n")
        return 130


if __name__ == "__main__":
    sys.exit(run())
