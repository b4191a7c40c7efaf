"""`--baseline <git ref>`: the code a run compares against, built from git in a temporary
worktree, and the Side a process runs as (its working directory and import path).

A baseline side runs the ref's own broker (`python -m broker` in its worktree) and its own SDK:
bench children (workers, producers, the floor) are the current tree's bench modules, but they
import `taskbroker` and `broker` from the baseline, because only a directory holding `bench`
(a link to this package) comes before the baseline's tree and SDK on PYTHONPATH. Third-party
packages are the current venv's. The bench's own process (which starts Redis and the broker,
enqueues backlogs and polls Stats) stays the current code: what it measures with its own client
(drain's enqueue_many, for one) is the baseline broker driven by the current SDK.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from bench.children import ROOT

#: Where the SDK, and the code protoc generates for it, live in a tree.
SDK_DIR: Final = Path("clients/python")
PROTO_DIR: Final = Path("proto")
GENERATED_DIR: Final = SDK_DIR / "taskbroker" / "v1"
#: Seconds git and protoc may take (a worktree of this repository takes about one).
PREPARE_TIMEOUT_S: Final = 120.0


class BaselineError(RuntimeError):
    """The ref could not be resolved or built."""


@dataclass(frozen=True, slots=True)
class Side:
    """The code a process runs: the current tree, or a baseline's worktree."""

    #: "current", or "baseline".
    name: str
    #: What the report calls it: "current", or the ref as given with its short commit.
    label: str
    #: The commit it runs ('' for the current tree, which may hold uncommitted changes).
    commit: str
    #: The working directory of the broker (`python -m` puts it first on sys.path).
    broker_cwd: Path
    #: Extra PYTHONPATH entries for the broker.
    broker_path: tuple[Path, ...]
    #: The working directory of bench children, and their extra PYTHONPATH entries.
    child_cwd: Path
    child_path: tuple[Path, ...]

    def env(self, base: Mapping[str, str], path: tuple[Path, ...]) -> dict[str, str]:
        """`base` with these entries first on PYTHONPATH."""
        env = dict(base)
        entries = [*map(str, path), *filter(None, [env.get("PYTHONPATH")])]
        if entries:
            env["PYTHONPATH"] = os.pathsep.join(entries)
        return env


#: The code in this tree: the broker and children run from the repository root, as before.
CURRENT: Final = Side(
    name="current", label="current", commit="", broker_cwd=ROOT, broker_path=(), child_cwd=ROOT,
    child_path=(ROOT,),
)  # fmt: skip


def _run(args: list[str], cwd: Path) -> str:
    """Runs a command and returns its stdout.

    Raises:
        BaselineError: It failed (with its stderr).
    """
    try:
        done = subprocess.run(
            args, cwd=cwd, capture_output=True, text=True, timeout=PREPARE_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BaselineError(f"{' '.join(args[:3])} …: {exc}") from exc
    if done.returncode:
        raise BaselineError(f"{' '.join(args[:3])} … failed: {done.stderr.strip()}")
    return done.stdout.strip()


def generate_protos(tree: Path) -> None:
    """`make proto`'s runtime part for a tree: the ref's protos through the current venv's
    grpc_tools.protoc into its SDK (no .pyi stubs: nothing type-checks a baseline).

    Raises:
        BaselineError: The tree has no protos where this layout expects them, or protoc failed.
    """
    protos = sorted((tree / PROTO_DIR / "taskbroker" / "v1").glob("*.proto"))
    if not protos or not (tree / SDK_DIR / "taskbroker").is_dir():
        raise BaselineError(f"{tree} has no proto/taskbroker/v1/*.proto or no {SDK_DIR}/taskbroker")
    shutil.rmtree(tree / GENERATED_DIR, ignore_errors=True)
    _run(
        [
            sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTO_DIR}",
            f"--python_out={SDK_DIR}", f"--grpc_python_out={SDK_DIR}",
            *(str(p.relative_to(tree)) for p in protos),
        ],
        tree,
    )  # fmt: skip
    (tree / GENERATED_DIR / "__init__.py").write_text('"""Generated for a bench baseline."""\n')


@contextmanager
def baseline_side(ref: str, repo: Path = ROOT) -> Iterator[Side]:
    """Checks `ref` out in a temporary worktree, generates its protobuf code and yields the
    side that runs it. The worktree is removed on the way out, whatever happened.

    Raises:
        BaselineError: The ref is not a commit of `repo`, or it could not be built.
    """
    commit = commit_of(ref, repo)
    short = commit[:9]
    tmp = Path(tempfile.mkdtemp(prefix=f"taskbroker-baseline-{short}-"))
    tree, shim = tmp / "tree", tmp / "bench-only"
    try:
        _run(["git", "worktree", "add", "--detach", str(tree), commit], repo)
        generate_protos(tree)
        # `bench` alone, so the tree's `broker` and `taskbroker` come next, not the current ones.
        shim.mkdir()
        (shim / "bench").symlink_to(ROOT / "bench", target_is_directory=True)
        sdk = tree / SDK_DIR
        label = ref if ref.startswith(short) else f"{ref} ({short})"
        yield Side(
            name="baseline", label=label, commit=commit, broker_cwd=tree, broker_path=(tree, sdk),
            child_cwd=shim, child_path=(shim, tree, sdk),
        )  # fmt: skip
    finally:
        remove_worktree(repo, tree)
        shutil.rmtree(tmp, ignore_errors=True)


def remove_worktree(repo: Path, tree: Path) -> None:
    """Removes a worktree and git's record of it (best effort: this runs on the way out)."""
    subprocess.run(
        ["git", "worktree", "remove", "--force", str(tree)],
        cwd=repo, capture_output=True, timeout=PREPARE_TIMEOUT_S, check=False,
    )  # fmt: skip
    shutil.rmtree(tree, ignore_errors=True)
    subprocess.run(
        ["git", "worktree", "prune"], cwd=repo, capture_output=True, timeout=60, check=False
    )


def commit_of(ref: str, repo: Path = ROOT) -> str:
    """The full commit a ref names.

    Raises:
        BaselineError: It names none.
    """
    return _run(["git", "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}"], repo)
