"""The demo scenario (`make demo`) runs end to end and loses nothing, at a compressed time scale."""

from __future__ import annotations

import pytest

from examples import demo
from tests.conftest import RunningBroker


async def test_demo_scenario_finishes_every_task(
    running: RunningBroker, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await demo.run(running.target, time_scale=0.03) == 0
    report = capsys.readouterr().out
    assert "tasks: 110" in report and "unfinished 0" in report
