"""The examples run end to end: the demo scenario (`make demo`) loses nothing, at a compressed
time scale, and the workflow example's fan-in gets every fan-out result in order."""

from __future__ import annotations

import pytest

from examples import demo, workflow_album
from taskbroker import TaskState, from_json
from tests.conftest import RunningBroker


async def test_demo_scenario_finishes_every_task(
    running: RunningBroker, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await demo.run(running.target, time_scale=0.03) == 0
    report = capsys.readouterr().out
    assert "tasks: 110" in report and "unfinished 0" in report


async def test_workflow_album_sends_one_mail_with_every_resized_photo(
    running: RunningBroker, capsys: pytest.CaptureFixture[str]
) -> None:
    photos = [f"IMG_{n:04}.jpg" for n in range(1, 6)]

    mail = await workflow_album.run(running.target, photos)

    assert mail.state is TaskState.SUCCEEDED
    assert from_json(mail.result) == {
        "to": "ada@example.com",
        "photos": [f"https://cdn.example.com/small/{photo}" for photo in photos],
    }
    assert "album mail to ada@example.com: 5 photos" in capsys.readouterr().out
