"""`python -m bench` (`make bench`): start Redis and a broker, run the scenarios, print the table
and write bench/results/<UTC timestamp>.json."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from rich.console import Console

from bench import procfs
from bench.context import Ctx, Options
from bench.env import BenchEnv
from bench.machine import machine_info
from bench.report import print_report, write_json
from bench.results import ScenarioResult
from bench.scenarios import SCENARIOS, Scenario, by_name
from bench.scenarios.common import add_floor_ratios

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


def parse_args(argv: list[str] | None = None) -> tuple[Options, list[Scenario], bool]:
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
    p.add_argument("--keep-logs", action="store_true", help="keep the processes' logs")
    args = p.parse_args(argv)
    if args.runs < 1:
        p.error("--runs must be at least 1")
    if not 1 <= args.concurrency <= 10_000:
        p.error("--concurrency must be 1 to 10000")
    if args.unary_procs < 1:
        p.error("--unary-procs must be at least 1")
    try:
        scenarios = by_name([n.strip() for n in args.only.split(",") if n.strip()])
    except ValueError as exc:
        p.error(str(exc))
    options = Options(
        runs=args.runs,
        quick=args.quick,
        concurrency=args.concurrency,
        unary_procs=args.unary_procs,
    )
    return options, scenarios, args.keep_logs


async def _run_scenario(
    env: BenchEnv, options: Options, scenario: Scenario, console: Console, deadline: float
) -> ScenarioResult:
    result = ScenarioResult(scenario.name)
    started = time.perf_counter()
    busy0, own0 = procfs.machine_busy_seconds(), _own_seconds(env)
    console.print(f"[bold]{scenario.name}[/bold] ...")
    try:
        await env.flush()
        await env.start_broker(scenario.broker_env)
        async with asyncio.timeout(SCENARIO_TIMEOUT_S):
            await scenario.run(Ctx(env, options, result, deadline))
    except Exception as exc:
        logging.getLogger("bench").debug("scenario %s failed", scenario.name, exc_info=True)
        result.error = f"{type(exc).__name__}: {exc}"
    finally:
        await env.reap_children()
        await env.stop_broker()
        result.wall_s = time.perf_counter() - started
    other_s = procfs.machine_busy_seconds() - busy0 - (_own_seconds(env) - own0)
    result.other_cpu_percent = max(0.0, 100 * other_s / (result.wall_s * (os.cpu_count() or 1)))
    if result.other_cpu_percent > NOISY_PERCENT:
        result.note(
            f"other processes used {result.other_cpu_percent:.0f} % of the machine's CPU during "
            "this scenario: its figures may be low"
        )
    status = "[red]failed[/red]" if result.error else "done"
    console.print(f"  {status} in {result.wall_s:.1f} s")
    return result


async def main(options: Options, scenarios: list[Scenario], keep_logs: bool) -> int:
    # Piped output (make, CI logs) would otherwise be cut at 80 columns.
    console = Console() if sys.stdout.isatty() else Console(width=130)
    started_at = datetime.now(UTC)
    started = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="taskbroker-bench-"))
    env = BenchEnv(workdir)
    results: list[ScenarioResult] = []
    try:
        await env.start_redis()
        server = await env.info("server")
        machine = machine_info(str(server.get("redis_version", "?")))
        deadline = time.monotonic() + BUDGET_S
        for scenario in scenarios:
            results.append(await _run_scenario(env, options, scenario, console, deadline))
    finally:
        await env.close()
    add_floor_ratios(results)
    wall_s = time.perf_counter() - started
    title = f"taskbroker bench ({options.runs} run(s){', quick' if options.quick else ''})"
    print_report(console, results, title)
    document = {
        "started_at": started_at.isoformat(),
        "wall_s": round(wall_s, 1),
        "options": {
            "runs": options.runs,
            "quick": options.quick,
            "concurrency": options.concurrency,
            "unary_procs": options.unary_procs,
            "scenarios": [s.name for s in scenarios],
        },
        "machine": machine,
        "scenarios": [r.to_json() for r in results],
    }
    path = write_json(document, started_at)
    failed = any(r.error for r in results)
    if keep_logs or failed:
        console.print(f"logs: {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    console.print(f"results: {path}\nwall time: {wall_s:.1f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    opts, chosen, keep = parse_args()
    sys.exit(asyncio.run(main(opts, chosen, keep)))
