"""The bench's fanin scenario (bench/scenarios/fanin.py) with tiny sizes, against a baseline from
before task dependencies: the current code measures, the baseline is skipped with its reason."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Final

import pytest

ROOT: Final = Path(__file__).resolve().parents[1]


def _before_dependencies() -> str:
    """The commit before TaskSpec.depends_on_positions appeared in the API."""
    added = subprocess.run(
        ["git", "log", "--reverse", "--format=%H", "-S", "depends_on_positions", "--",
         "proto/taskbroker/v1/task.proto"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    assert added, "no commit added depends_on_positions"
    return f"{added[0]}^"


@pytest.mark.timeout(180)
def test_fanin_measures_the_current_code_and_skips_a_baseline_without_dependencies(
    tmp_path: Path,
) -> None:
    args = ["--quick", "--runs", "1", "--only", "fanin", "--baseline", _before_dependencies()]
    done = subprocess.run(
        [sys.executable, "-m", "bench", *args, "--results-dir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=170,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    (path,) = tmp_path.glob("*.json")
    document = json.loads(path.read_text())
    (current,) = document["scenarios"]
    assert current["error"] is None and not current["skipped"]
    medians = {m["metric"]: m["median"] for m in current["metrics"]}
    assert len(medians) == 4 and all(v is not None and v > 0 for v in medians.values()), medians
    (run,) = current["runs"]
    assert run["parent_results"] == run["parents"] == 50 and len(run["chain_hops_ms"]) == 10
    (baseline,) = document["baseline"]["scenarios"]
    assert baseline["error"] is None and "no task dependencies" in baseline["skipped"]
    assert baseline["metrics"] == []
    assert "not run on the baseline" in done.stdout
