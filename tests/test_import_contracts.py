"""The import contracts `make lint` checks (pyproject.toml, import-linter) stay complete: the
broker's ban on the SDK's runtime names every SDK module there is, so a new module is covered
the day it is added."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SDK = ROOT / "clients" / "python" / "taskbroker"


def test_the_broker_is_banned_from_every_sdk_module_but_the_generated_code() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    contracts = config["tool"]["importlinter"]["contracts"]
    [ban] = [c for c in contracts if c.get("source_modules") == ["broker"]]
    modules = {f"taskbroker.{f.stem}" for f in SDK.glob("*.py") if f.stem != "__init__"}
    assert set(ban["forbidden_modules"]) == modules
