"""The scenarios, in the order they run. Each is a coroutine `run(ctx)` that records its metrics
in `ctx.result`; the runner gives it a fresh broker (with `broker_env`) and an empty Redis."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

from bench.context import Ctx
from bench.scenarios import (
    big_enqueue,
    ceiling,
    delayed,
    drain,
    fairness,
    fanin,
    floor,
    idle_streams,
    latency,
    many_queues,
    memory,
    noisy_neighbour,
    pipeline,
    recovery,
    unary,
)


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    run: Callable[[Ctx], Awaitable[None]]
    #: TASKBROKER_* settings for this scenario's broker.
    broker_env: Mapping[str, str] = field(default_factory=dict)
    #: Why a --baseline cannot run it ('' when it can): it runs code in the bench's process.
    current_only: str = ""


SCENARIOS: tuple[Scenario, ...] = (
    Scenario("drain", drain.run),
    Scenario("fairness", fairness.run),
    Scenario("pipeline", pipeline.run),
    Scenario("unary", unary.run),
    Scenario("latency", latency.run),
    Scenario("memory", memory.run, memory.BROKER_ENV),
    Scenario("delayed", delayed.run),
    Scenario("recovery", recovery.run),
    # 1,000 streams from one client process: above the default max_streams_per_client.
    Scenario("idle_streams", idle_streams.run, {"TASKBROKER_MAX_STREAMS_PER_CLIENT": "1000"}),
    Scenario("big_enqueue", big_enqueue.run),
    Scenario("noisy_neighbour", noisy_neighbour.run, noisy_neighbour.BROKER_ENV),
    Scenario("many_queues", many_queues.run),
    Scenario("fanin", fanin.run),
    Scenario(
        "ceiling",
        ceiling.run,
        current_only="it runs the broker's store code in the bench's own process, the current tree",
    ),
    Scenario("floor", floor.run),
)


def by_name(names: list[str]) -> list[Scenario]:
    """The named scenarios in run order (all of them for an empty list).

    Raises:
        ValueError: A name is not a scenario.
    """
    known = [s.name for s in SCENARIOS]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(
            f"unknown scenario(s) {', '.join(unknown)}; choose from {', '.join(known)}"
        )
    return [s for s in SCENARIOS if not names or s.name in names]
