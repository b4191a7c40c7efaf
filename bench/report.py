"""The final table (rich) and the JSON file a run leaves in bench/results/."""

from __future__ import annotations

import json
from collections.abc import Sequence
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


def table(results: Sequence[ScenarioResult], title: str) -> Table:
    t = Table(title=title, title_justify="left")
    for name, justify in (
        ("scenario", "left"), ("metric", "left"), ("median", "right"), ("min", "right"),
        ("max", "right"), ("unit", "left"), ("target", "left"), ("met", "left"),
    ):  # fmt: skip
        t.add_column(name, justify=justify)  # type: ignore[arg-type]
    for result in results:
        if result.error is not None:
            t.add_row(result.name, "[red]failed (see below)[/red]", "", "", "", "", "", "")
        for m in result.metrics:
            values = m.values
            median = fmt(m.median) + ("*" if m.capped_runs else "")
            t.add_row(
                m.scenario,
                m.name,
                median,
                fmt(min(values)) if values else "—",
                fmt(max(values)) if values else "—",
                m.unit,
                m.target.describe(m.unit) if m.target else "",
                _met(m),
            )
    return t


def print_report(console: Console, results: Sequence[ScenarioResult], title: str) -> None:
    console.print(table(results, title))
    if any(m.capped_runs for r in results for m in r.metrics):
        console.print("* some runs hit their time cap: the figure is what was reached by then")
    for result in results:
        for note in result.notes:
            console.print(f"[dim]{result.name}:[/dim] {escape(note)}")
        if result.error:
            console.print(f"[red]{result.name} failed:[/red] {escape(brief(result.error))}")


def write_json(document: dict[str, Any], started: datetime) -> Path:
    """Writes the run to bench/results/<UTC start time>.json (creating the directory)."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{started.astimezone(UTC).strftime('%Y%m%dT%H%M%SZ')}.json"
    path.write_text(json.dumps(document, indent=2) + "\n")
    return path
