"""The final table (rich) and the JSON file a run leaves in bench/results/."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from bench.results import Metric, ScenarioResult

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def fmt(value: float | None) -> str:
    if value is None:
        return "—"
    magnitude = abs(value)
    if magnitude >= 100:
        return f"{value:,.0f}"
    if magnitude >= 1:
        return f"{value:,.2f}"
    return f"{value:.3g}"


def brief(error: str) -> str:
    """The first and last lines of an error (a child's log tail can be long)."""
    lines = [line.strip() for line in error.splitlines() if line.strip()]
    if len(lines) <= 2:
        return " ".join(lines)
    return f"{lines[0]} … {lines[-1]}"


def _met(metric: Metric) -> str:
    met = metric.met
    if met is None:
        return ""
    return "[green]yes[/green]" if met else "[red]no[/red]"


@dataclass(frozen=True, slots=True)
class Compared:
    """A --baseline's results, to show beside the current code's."""

    label: str
    results: Sequence[ScenarioResult]

    def metric(self, current: Metric) -> Metric | None:
        """The baseline's metric of the same scenario and name (None: it has none)."""
        for result in self.results:
            if result.name == current.scenario:
                return next((m for m in result.metrics if m.name == current.name), None)
        return None

    def error(self, scenario: str) -> str | None:
        return next((r.error for r in self.results if r.name == scenario), None)

    def skipped(self, scenario: str) -> str:
        return next((r.skipped for r in self.results if r.name == scenario), "")

    def status(self, scenario: str) -> str:
        """What the baseline column shows for a scenario with no figure of its own."""
        if self.skipped(scenario):
            return "not run"
        return "[red]failed[/red]" if self.error(scenario) else "—"


def ratio(current: Metric, baseline: Metric | None) -> float | None:
    """Current median over the baseline's (None when either is missing or the baseline's is 0)."""
    if baseline is None or current.median is None or not baseline.median:
        return None
    return current.median / baseline.median


def table(results: Sequence[ScenarioResult], title: str, compared: Compared | None = None) -> Table:
    t = Table(title=title, title_justify="left")
    columns = [
        ("scenario", "left"), ("metric", "left"), ("median", "right"), ("min", "right"),
        ("max", "right"), ("unit", "left"), ("target", "left"), ("met", "left"),
    ]  # fmt: skip
    if compared is not None:
        columns += [(f"baseline {compared.label}", "right"), ("ratio", "right")]
    for name, justify in columns:
        t.add_column(name, justify=justify)  # type: ignore[arg-type]
    for result in results:
        extra: list[str] = []
        if compared is not None:
            extra = [compared.status(result.name), ""]
        if result.error is not None:
            t.add_row(result.name, "[red]failed (see below)[/red]", "", "", "", "", "", "", *extra)
        for m in result.metrics:
            values = m.values
            median = fmt(m.median) + ("*" if m.capped_runs else "")
            if compared is not None:
                base = compared.metric(m)
                r = ratio(m, base)
                base_median = (
                    fmt(base.median) if base and base.values else compared.status(m.scenario)
                )
                base_median += "*" if base is not None and base.capped_runs else ""
                extra = [base_median, "" if r is None else f"{r:.2f}x"]
            t.add_row(
                m.scenario,
                m.name,
                median,
                fmt(min(values)) if values else "—",
                fmt(max(values)) if values else "—",
                m.unit,
                m.target.describe(m.unit) if m.target else "",
                _met(m),
                *extra,
            )
    return t


def print_report(
    console: Console,
    results: Sequence[ScenarioResult],
    title: str,
    compared: Compared | None = None,
) -> None:
    console.print(table(results, title, compared))
    everything = [*results, *(compared.results if compared else ())]
    if any(m.capped_runs for r in everything for m in r.metrics):
        console.print("* some runs hit their time cap: the figure is what was reached by then")
    if compared is not None:
        console.print(
            f"ratio: current median / baseline median, both measured in this run, run by run "
            f"in turn; baseline {compared.label}"
        )
    for result in results:
        for note in result.notes:
            console.print(f"[dim]{result.name}:[/dim] {escape(note)}")
        if result.error:
            console.print(f"[red]{result.name} failed:[/red] {escape(brief(result.error))}")
    for result in compared.results if compared else ():
        current_notes = next((r.notes for r in results if r.name == result.name), [])
        for note in result.notes:
            if note not in current_notes:
                console.print(f"[dim]{result.name} (baseline):[/dim] {escape(note)}")
        if result.skipped:
            console.print(f"[dim]{result.name}:[/dim] not run on the baseline: {result.skipped}")
        if result.error:
            console.print(
                f"[red]{result.name} on the baseline failed:[/red] {escape(brief(result.error))}"
            )


def comparison_json(results: Sequence[ScenarioResult], compared: Compared) -> list[dict[str, Any]]:
    """Each current metric's median beside the baseline's, and their ratio."""
    rows = []
    for result in results:
        for m in result.metrics:
            base = compared.metric(m)
            r = ratio(m, base)
            rows.append(
                {
                    "scenario": m.scenario,
                    "metric": m.name,
                    "unit": m.unit,
                    "current_median": m.median,
                    "baseline_median": None if base is None else base.median,
                    "ratio": None if r is None else round(r, 4),
                    "baseline_error": compared.error(result.name),
                    "baseline_skipped": compared.skipped(result.name) or None,
                }
            )
    return rows


def write_json(document: dict[str, Any], started: datetime, directory: Path = RESULTS_DIR) -> Path:
    """Writes the run to <directory>/<UTC start time>.json (creating the directory)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{started.astimezone(UTC).strftime('%Y%m%dT%H%M%SZ')}.json"
    path.write_text(json.dumps(document, indent=2) + "\n")
    return path
