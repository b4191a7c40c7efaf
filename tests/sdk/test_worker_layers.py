"""The worker runtime's modules import in one direction (issue 14): each module may import only
those below it in `LAYERS`, so no cycle can form and each part can be read from the bottom up.
Imports under `if TYPE_CHECKING:` count too: a type-only import upwards is still a cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import taskbroker

SDK = Path(taskbroker.__file__).resolve().parent

#: The worker runtime, top (the public Worker) to bottom.
LAYERS = (
    "_worker",
    "_session",
    "_shutdown",
    "_task_run",
    "_lease_keeper",
    "_connector",
    "_lease_stream",
    "_lifecycle",
    "_worker_options",
)
#: Past this a module is doing more than one job (STYLE.md 2.1: one job per module).
MAX_LINES = 400


def sdk_imports(path: Path) -> set[str]:
    """The `taskbroker` modules a file imports, by their name inside the package."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module is not None and node.level == 0:
            # `from taskbroker import _x` names a module; `from taskbroker._x import y` too.
            names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "taskbroker" and len(parts) > 1:
                found.add(parts[1])
    return found


@pytest.mark.parametrize("module", LAYERS)
def test_a_runtime_module_imports_only_modules_below_it(module: str) -> None:
    below = set(LAYERS[LAYERS.index(module) + 1 :])
    runtime_imports = sdk_imports(SDK / f"{module}.py") & set(LAYERS)
    assert runtime_imports <= below, (
        f"{module} imports {sorted(runtime_imports - below)}, which is not below it in {LAYERS}"
    )


def test_the_rest_of_the_sdk_reaches_the_runtime_only_through_the_public_worker() -> None:
    inner = set(LAYERS) - {"_worker"}
    for path in sorted(SDK.glob("*.py")):
        if path.stem in LAYERS:
            continue
        assert not sdk_imports(path) & inner, f"{path.name} imports the worker runtime's insides"


@pytest.mark.parametrize("module", LAYERS)
def test_a_runtime_module_says_its_job_and_stays_small(module: str) -> None:
    text = (SDK / f"{module}.py").read_text()
    assert ast.get_docstring(ast.parse(text)), f"{module} has no module docstring"
    assert len(text.splitlines()) <= MAX_LINES, f"{module} is over {MAX_LINES} lines"
