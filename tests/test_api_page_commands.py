"""Every `buf curl` command in docs/api.md runs against a live broker and prints what it promises.

The commands are taken from the page's shell code blocks (continuation lines joined,
comments dropped), the page's port 50051 is replaced with the test broker's and `<task-id>`
with the id the page's last Enqueue printed. They run with the `buf` that `make install`
puts in `node_modules/.bin`, as subprocesses started with asyncio: the broker serves on this
test's event loop. grpcurl lines are documentation only (grpcurl is not installable here).
"""

from __future__ import annotations

import asyncio
import json
import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import pytest

from taskbroker.v1 import lease_pb2
from tests.conftest import RunningBroker
from tests.support.lease_stream import LeaseStream
from tests.support.tasks import enqueue, spec

ROOT: Final = Path(__file__).resolve().parents[1]
PAGE: Final = ROOT / "docs" / "api.md"
BUF: Final = ROOT / "node_modules" / ".bin" / "buf"
PAGE_ADDRESS: Final = "127.0.0.1:50051"
TASK_ID_PLACEHOLDER: Final = "<task-id>"
#: Methods the page must show with buf curl.
DOCUMENTED: Final = {
    "taskbroker.v1.BrokerService/Enqueue",
    "taskbroker.v1.BrokerService/GetTask",
    "taskbroker.v1.BrokerService/Stats",
    "taskbroker.v1.AdminService/ListDeadTasks",
}
COMMAND_TIMEOUT_S: Final = 10.0

_SHELL_BLOCK: Final = re.compile(r"^```(?:sh|bash|shell)\n(.*?)^```", re.MULTILINE | re.DOTALL)


@dataclass(frozen=True)
class BufCurl:
    """One `buf curl` command of docs/api.md."""

    args: list[str]  # after `buf curl`
    line: str  # as written, for messages

    @property
    def method(self) -> str:
        """`package.Service/Method`, or "" for a command without one (--list-services)."""
        url = next((a for a in self.args if a.startswith("http")), "")
        return url.split("://", 1)[-1].partition("/")[2]

    @property
    def request(self) -> dict[str, Any]:
        data = next((b for a, b in zip(self.args, self.args[1:], strict=False) if a == "-d"), "{}")
        parsed: dict[str, Any] = json.loads(data)
        return parsed


def page_commands(text: str) -> Iterator[BufCurl]:
    """The `buf curl` (or `npx buf curl`) commands of the page's shell blocks, in order."""
    for block in _SHELL_BLOCK.findall(text):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            words = shlex.split(line, comments=True)
            if words[:1] == ["npx"]:
                words = words[1:]
            if words[:1] == ["node_modules/.bin/buf"]:
                words = ["buf", *words[1:]]
            if words[:2] == ["buf", "curl"]:
                yield BufCurl(words[2:], line.strip())


@dataclass
class Seen:
    """What earlier commands produced, for later ones."""

    dead_task_id: str
    task_ids: list[str] = field(default_factory=list)


def check_output(command: BufCurl, output: str, seen: Seen) -> None:
    """Asserts that a command printed what its method answers; remembers enqueued ids."""
    method = command.method
    if not method:
        assert "--list-services" in command.args, command.line
        services = output.split()
        assert "taskbroker.v1.BrokerService" in services, output
        assert "taskbroker.v1.AdminService" in services, output
        return
    answer = json.loads(output)
    request = command.request
    if method == "taskbroker.v1.BrokerService/Enqueue":
        results = answer["results"]
        assert len(results) == len(request["tasks"]), answer
        for result, task in zip(results, request["tasks"], strict=True):
            assert result["taskId"].startswith(task["queue"] + ":"), answer
        seen.task_ids += [r["taskId"] for r in results]
    elif method == "taskbroker.v1.BrokerService/GetTask":
        task = answer["task"]
        assert task["id"] == seen.task_ids[-1], answer
        assert task["state"] == "TASK_STATE_PENDING", answer
    elif method == "taskbroker.v1.BrokerService/Stats":
        (queue,) = answer["queues"]
        assert queue["queue"] == request["queues"][0], answer
        assert int(queue["pending"]) == len(seen.task_ids), answer
        assert int(queue["dead"]) == 1, answer
    elif method == "taskbroker.v1.AdminService/ListDeadTasks":
        (task,) = answer["tasks"]
        assert (task["id"], task["state"]) == (seen.dead_task_id, "TASK_STATE_DEAD"), answer
    else:
        pytest.fail(f"docs/api.md runs {method} with buf curl: add what it should print here")


def test_api_page_shows_buf_curl_for_the_main_calls() -> None:
    commands = list(page_commands(PAGE.read_text()))
    methods = {c.method for c in commands}
    assert methods >= DOCUMENTED, f"docs/api.md lacks buf curl for {sorted(DOCUMENTED - methods)}"
    for command in commands:
        assert PAGE_ADDRESS in command.line, f"not on port 50051: {command.line}"


async def dead_letter(running: RunningBroker, queue: str) -> str:
    """A dead letter in `queue`, for ListDeadTasks to show."""
    (task_id,) = await enqueue(running.stub, spec(queue=queue, type_="poison", max_attempts=1))
    stream = await LeaseStream(running.stub).open([queue], credits=1)
    (delivery,) = await stream.take(1)
    result = await stream.nack(delivery, error="poisoned", dead_letter=True)
    assert result.outcome == lease_pb2.SETTLE_OUTCOME_OK
    await stream.close()
    return task_id


async def run_buf(args: list[str]) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        str(BUF),
        "curl",
        *args,
        cwd=ROOT,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), COMMAND_TIMEOUT_S)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise AssertionError(f"buf curl {shlex.join(args)} did not finish") from None
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_api_page_buf_curl_commands_run(running: RunningBroker) -> None:
    if not BUF.exists():
        pytest.fail(f"{BUF.relative_to(ROOT)} is missing: run `make install`", pytrace=False)
    commands = list(page_commands(PAGE.read_text()))
    seen = Seen(dead_task_id=await dead_letter(running, "emails"))
    for command in commands:
        args = [arg.replace(PAGE_ADDRESS, running.target) for arg in command.args]
        if any(TASK_ID_PLACEHOLDER in arg for arg in args):
            assert seen.task_ids, f"{command.line}: no Enqueue before it printed a task id"
            args = [arg.replace(TASK_ID_PLACEHOLDER, seen.task_ids[-1]) for arg in args]
        code, out, err = await run_buf(args)
        assert code == 0, f"{command.line}\nexit {code}\n{out}{err}"
        check_output(command, out, seen)
