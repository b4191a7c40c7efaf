"""`python -m bench --baseline <ref>`: the ref's worktree runs its own broker and SDK, and is
removed afterwards; the bench reports both sides and their ratio (bench/baseline.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Final

import pytest

from bench.baseline import CURRENT, BaselineError, Side, baseline_side

ROOT: Final = Path(__file__).resolve().parents[1]
#: Prints where a process found the bench, the broker, the SDK and the SDK's generated code.
WHERE: Final = (
    "import json, bench, broker, taskbroker, taskbroker.v1.task_pb2 as pb;"
    "print(json.dumps([bench.__file__, broker.__file__, taskbroker.__file__, pb.__file__]))"
)


def _where(cwd: Path, env: dict[str, str]) -> list[Path]:
    done = subprocess.run(
        [sys.executable, "-c", WHERE], cwd=cwd, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return [Path(p) for p in json.loads(done.stdout)]


def _worktrees() -> str:
    return subprocess.run(
        ["git", "worktree", "list", "--porcelain"], cwd=ROOT, capture_output=True, text=True
    ).stdout


def test_a_baseline_runs_its_own_broker_and_sdk_and_its_worktree_is_removed() -> None:
    with baseline_side("HEAD") as side:
        tree = side.broker_cwd
        assert str(tree) in _worktrees()
        bench, broker, sdk, generated = _where(
            side.child_cwd, side.env(os.environ, side.child_path)
        )
        # Children run the current bench (through a link) against the baseline's code.
        assert bench.resolve().parent == ROOT / "bench"
        assert broker.is_relative_to(tree) and sdk.is_relative_to(tree / "clients/python")
        assert generated.is_relative_to(tree / "clients/python/taskbroker/v1")
        _, broker, sdk, _ = _where(side.broker_cwd, side.env(os.environ, side.broker_path))
        assert broker.is_relative_to(tree) and sdk.is_relative_to(tree)
    assert not tree.exists()
    assert str(tree) not in _worktrees()


def test_the_current_side_runs_this_tree() -> None:
    _, broker, sdk, _ = _where(CURRENT.child_cwd, CURRENT.env(os.environ, CURRENT.child_path))
    assert broker.is_relative_to(ROOT) and sdk.is_relative_to(ROOT / "clients/python")


def test_a_ref_that_names_no_commit_is_refused() -> None:
    with pytest.raises(BaselineError), baseline_side("no-such-ref-for-the-bench"):
        pass


def test_an_interrupted_run_still_removes_the_worktree() -> None:
    seen: list[Side] = []
    with pytest.raises(KeyboardInterrupt), baseline_side("HEAD") as side:
        seen.append(side)
        raise KeyboardInterrupt
    assert seen and not seen[0].broker_cwd.exists()


@pytest.mark.timeout(180)
def test_the_bench_reports_a_baseline_beside_the_current_code(tmp_path: Path) -> None:
    args = ["--quick", "--runs", "1", "--only", "floor,ceiling", "--baseline", "HEAD"]
    done = subprocess.run(
        [sys.executable, "-m", "bench", *args, "--results-dir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=170,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    (path,) = tmp_path.glob("*.json")
    document = json.loads(path.read_text())
    baseline = {s["name"]: s for s in document["baseline"]["scenarios"]}
    assert baseline["floor"]["error"] is None
    assert baseline["floor"]["metrics"][0]["median"] > 0
    # The ceiling runs in the bench's own process: it says so rather than measure the wrong code.
    assert baseline["ceiling"]["skipped"]
    (floor,) = [c for c in document["comparison"] if c["scenario"] == "floor"]
    assert floor["ratio"] > 0 and floor["baseline_median"] > 0
    assert "baseline HEAD" in done.stdout
    assert "taskbroker-baseline-" not in _worktrees()
