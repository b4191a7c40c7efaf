"""What a run records: metrics with one value per run, their targets, and notes per scenario."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from bench.stats import median

Comparison = Literal[">=", "<=", "<"]


@dataclass(frozen=True, slots=True)
class Target:
    """A goal from the performance issue, e.g. `Target(">=", 25_000)`."""

    op: Comparison
    value: float
    #: How the target reads in the table when the number alone would mislead.
    text: str = ""

    def met(self, value: float) -> bool:
        if self.op == ">=":
            return value >= self.value
        if self.op == "<=":
            return value <= self.value
        return value < self.value

    def describe(self, unit: str) -> str:
        return self.text or f"{self.op} {self.value:,.6g} {unit}".strip()


@dataclass(slots=True)
class Metric:
    """One figure of a scenario; `values` holds one sample per run."""

    scenario: str
    name: str
    unit: str
    target: Target | None = None
    values: list[float] = field(default_factory=list)
    #: Runs stopped by their time cap: the value is what was reached by then.
    capped_runs: int = 0
    note: str = ""

    def add(self, value: float, *, capped: bool = False) -> None:
        self.values.append(value)
        if capped:
            self.capped_runs += 1

    @property
    def median(self) -> float | None:
        return median(self.values) if self.values else None

    @property
    def met(self) -> bool | None:
        """Whether the median meets the target (None: no target or no value)."""
        m = self.median
        if self.target is None or m is None:
            return None
        return self.target.met(m)

    def to_json(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "metric": self.name,
            "unit": self.unit,
            "values": self.values,
            "median": self.median,
            "min": min(self.values) if self.values else None,
            "max": max(self.values) if self.values else None,
            "target": None
            if self.target is None
            else {"op": self.target.op, "value": self.target.value, "text": self.target.text},
            "met": self.met,
            "capped_runs": self.capped_runs,
            "note": self.note,
        }


@dataclass(slots=True)
class ScenarioResult:
    """A scenario's metrics (in the order declared), notes, raw per-run details and wall time."""

    name: str
    metrics: list[Metric] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    runs: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None
    #: Why it did not run at all ('' when it ran), e.g. a scenario a --baseline cannot run.
    skipped: str = ""
    wall_s: float = 0.0
    #: CPU the rest of the machine used meanwhile, as % of all cores: a noisy neighbour.
    other_cpu_percent: float = 0.0

    def metric(self, name: str, unit: str, target: Target | None = None, note: str = "") -> Metric:
        """The metric called `name`, declared on first use."""
        for m in self.metrics:
            if m.name == name:
                return m
        m = Metric(self.name, name, unit, target, note=note)
        self.metrics.append(m)
        return m

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "wall_s": round(self.wall_s, 2),
            "other_cpu_percent": round(self.other_cpu_percent, 1),
            "error": self.error,
            "skipped": self.skipped or None,
            "notes": self.notes,
            "metrics": [m.to_json() for m in self.metrics],
            "runs": self.runs,
        }
