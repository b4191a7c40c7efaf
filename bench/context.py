"""Options and the context handed to each scenario: the environment, where to record, and
fresh names."""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass

from bench.env import BenchEnv
from bench.results import ScenarioResult
from taskbroker import Client


@dataclass(frozen=True, slots=True)
class Options:
    """The command line, as scenarios see it."""

    #: Runs per figure; each figure is the median of these.
    runs: int = 3
    #: Smaller sizes and shorter windows, for a smoke run.
    quick: bool = False
    #: Concurrency (credits) of each worker process.
    concurrency: int = 256
    #: Client processes for the unary-enqueue scenario.
    unary_procs: int = 2
    #: Serving processes of the broker (TASKBROKER_PROCESSES).
    broker_processes: int = 1

    def size(self, full: int, quick: int) -> int:
        return quick if self.quick else full

    def seconds(self, full: float, quick: float) -> float:
        return quick if self.quick else full


class Ctx:
    """What a scenario works with.

    `deadline` (time.monotonic) is the bench's time budget: past it, scenarios make no more
    runs than the first, so a slow machine still ends the whole bench in about that time.
    """

    def __init__(
        self,
        env: BenchEnv,
        options: Options,
        result: ScenarioResult,
        deadline: float,
        only_run: int | None = None,
    ) -> None:
        self.env = env
        self.options = options
        self.result = result
        self.deadline = deadline
        self.only_run = only_run

    def runs(self) -> Iterator[int]:
        """Run numbers 0 .. runs-1, stopping early (after the first) past the deadline; only
        `only_run` when it is set (a --baseline run calls a scenario once per run and side,
        and keeps to the budget itself)."""
        if self.only_run is not None:
            yield self.only_run
            return
        for run_no in range(self.options.runs):
            if run_no and time.monotonic() > self.deadline:
                self.result.note(
                    f"only {run_no} of {self.options.runs} runs: the bench was past its time budget"
                )
                return
            yield run_no

    def queue(self, label: str) -> str:
        """A queue name no earlier run used, so runs never see each other's tasks."""
        return f"bench-{label}-{secrets.token_hex(4)}"

    def client(self, timeout_s: float = 30.0) -> Client:
        return Client(self.env.target, timeout=timeout_s)
