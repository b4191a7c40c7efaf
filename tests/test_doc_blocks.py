"""Every code block in README.md and docs/*.md runs against a live broker, or says why not.

Each page's blocks run in order against one broker started as `make run` starts it (`python -m
broker`, embedded Redis), shared by the module. In a block, the documented addresses
127.0.0.1:50051 (gRPC) and 127.0.0.1:8080 (HTTP) become the test broker's, `<task-id>` becomes
the id of a fresh task of the `emails` queue, and TASKBROKER_TARGET names the broker. Blocks run
from the repository root with the venv's `python`, `taskbroker` and `grpcurl` first on PATH.
How blocks are marked: tests/support/doc_blocks.py.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import pytest

from taskbroker.v1 import broker_service_pb2, broker_service_pb2_grpc, task_pb2
from tests.support.broker_process import BrokerProcess
from tests.support.doc_blocks import DocBlock, doc_blocks
from tests.support.redis_server import free_port

ROOT: Final = Path(__file__).resolve().parents[1]
PAGES: Final = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
GRPC_ADDRESS: Final = "127.0.0.1:50051"
HTTP_ADDRESS: Final = "127.0.0.1:8080"
TASK_ID_PLACEHOLDER: Final = "<task-id>"
#: One block's limit; generous for a loaded 2-core machine (each CLI call starts Python), and
#: longer than the quick-start producer's own 60 s wait, so that its error is the one shown.
BLOCK_TIMEOUT_S: Final = 90.0
README_MAX_LINES: Final = 300


@dataclass(frozen=True)
class DocBroker:
    """The broker the blocks run against."""

    process: BrokerProcess
    http: str

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.process.port}"

    def new_task_id(self) -> str:
        stub = broker_service_pb2_grpc.BrokerServiceStub(self.process.channel)
        spec = task_pb2.TaskSpec(queue="emails", type="send_welcome", payload=b"ada@example.com")
        reply = stub.Enqueue(broker_service_pb2.EnqueueRequest(tasks=[spec]), timeout=10)
        task_id: str = reply.results[0].task_id
        return task_id


@pytest.fixture(scope="module")
def doc_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DocBroker]:
    data_dir = tmp_path_factory.mktemp("doc-broker") / "data"
    http = f"127.0.0.1:{free_port()}"
    process = BrokerProcess(data_dir, {"TASKBROKER_HTTP_LISTEN": http})
    try:
        process.wait_serving(timeout_s=30)
        yield DocBroker(process, http)
    finally:
        assert process.terminate() == 0, process.log.read_text()


def _environment(broker: DocBroker) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKBROKER_")}
    tools = [str(Path(sys.executable).parent), str(ROOT / "node_modules" / ".bin")]
    env["PATH"] = os.pathsep.join([*tools, env.get("PATH", "")])
    env["PYTHONPATH"] = str(ROOT)
    env["PYTHONUNBUFFERED"] = "1"
    env["TASKBROKER_TARGET"] = broker.target
    return env


def _code(block: DocBlock, broker: DocBroker) -> str:
    code = block.code.replace(GRPC_ADDRESS, broker.target).replace(HTTP_ADDRESS, broker.http)
    if TASK_ID_PLACEHOLDER in code:
        code = code.replace(TASK_ID_PLACEHOLDER, broker.new_task_id())
    for port in block.marks.get("free ports", "").split():
        code = code.replace(f":{port}", f":{free_port()}")
    return code


def _command(block: DocBlock, code: str, scratch: Path) -> list[str]:
    if block.runner == "python":
        program = scratch / f"block_{block.line}.py"
        program.write_text(code)
        return [sys.executable, str(program)]
    return ["bash", "-e", "-o", "pipefail", "-c", code]


def _check_output(block: DocBlock, output: str) -> None:
    expected = block.marks.get("expect")
    if expected is not None:
        assert expected in output, f"{block.where}: output lacks {expected!r}:\n{output}"


def _run_block(block: DocBlock, command: list[str], env: dict[str, str]) -> str:
    """Runs a block to its end in a session of its own (so a timeout ends its children too)."""
    process = subprocess.Popen(
        command,
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        out, _ = process.communicate(timeout=BLOCK_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        pytest.fail(f"{block.where}: did not finish in {BLOCK_TIMEOUT_S:.0f} s")
    output = out.decode()
    assert process.returncode == 0, f"{block.where}: exit {process.returncode}\n{output}"
    return output


def _lease_streams(broker: DocBroker) -> int:
    """Lease streams open on the broker, from the dashboard's JSON API."""
    with urllib.request.urlopen(f"http://{broker.http}/api/workers", timeout=5) as reply:
        workers: list[object] = json.load(reply)["workers"]
    return len(workers)


def _wait_for_stream(
    block: DocBlock,
    process: subprocess.Popen[bytes],
    log: Path,
    broker: DocBroker,
    streams_before: int,
) -> None:
    """Waits until a background block (a worker) has its Lease stream open."""
    deadline = time.monotonic() + BLOCK_TIMEOUT_S
    while _lease_streams(broker) <= streams_before:
        if process.poll() is not None:
            pytest.fail(f"{block.where}: exit {process.returncode}\n{log.read_text()}")
        if time.monotonic() > deadline:
            pytest.fail(f"{block.where}: no Lease stream after {BLOCK_TIMEOUT_S:.0f} s")
        time.sleep(0.1)


def _run_page(page: Path, broker: DocBroker, scratch: Path) -> None:
    env = _environment(broker)
    background: list[tuple[DocBlock, subprocess.Popen[bytes], Path]] = []
    try:
        for block in doc_blocks(page):
            if block.runner is None:
                continue
            command = _command(block, _code(block, broker), scratch)
            if "background" in block.marks:
                log = scratch / f"background_{block.line}.log"
                with log.open("wb") as out:
                    process = subprocess.Popen(
                        command,
                        cwd=ROOT,
                        env=env,
                        stdin=subprocess.DEVNULL,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                background.append((block, process, log))
                _wait_for_stream(block, process, log, broker, streams_before=len(background) - 1)
                continue
            output = _run_block(block, command, env)
            _check_output(block, output)
    finally:
        for _, process, _ in background:
            os.killpg(process.pid, signal.SIGINT)
        for block, process, log in background:
            try:
                code = process.wait(BLOCK_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                code = process.wait()
                pytest.fail(f"{block.where}: still running {BLOCK_TIMEOUT_S:.0f} s after SIGINT")
            output = log.read_text()
            assert code == 0, f"{block.where}: exit {code} after SIGINT\n{output}"
            _check_output(block, output)


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_every_block_is_run_or_marked(page: Path) -> None:
    blocks = doc_blocks(page)
    problems = [p for p in (b.problem() for b in blocks) if p]
    assert not problems, "\n".join(problems)
    for block in blocks:
        if "file" in block.marks:
            shown = (ROOT / block.marks["file"]).read_text()
            assert block.code == shown, f"{block.where}: differs from {block.marks['file']}"


@pytest.mark.timeout(600)
@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_page_blocks_run(page: Path, doc_broker: DocBroker, tmp_path: Path) -> None:
    _run_page(page, doc_broker, tmp_path)


def test_readme_is_the_short_user_path() -> None:
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) < README_MAX_LINES
    shown = {b.marks.get("file") for b in doc_blocks(ROOT / "README.md")}
    assert {"examples/quickstart_worker.py", "examples/quickstart_producer.py"} <= shown
    assert "make test" in readme


_LINK: Final = re.compile(r"\]\(([^)\s]+)\)")
_HEADING: Final = re.compile(r"^#+\s+(.*)$", re.MULTILINE)


def _anchors(page: Path) -> set[str]:
    """GitHub's anchors for the page's headings: lowercase, punctuation dropped, spaces as -."""
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.MULTILINE | re.DOTALL)
    return {_anchor(heading) for heading in _HEADING.findall(text)}


def _anchor(heading: str) -> str:
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_links_lead_somewhere(page: Path) -> None:
    broken = []
    for link in _LINK.findall(page.read_text()):
        if "://" in link:
            continue
        path, _, anchor = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        if not target.exists() or (
            anchor and target.suffix == ".md" and anchor not in _anchors(target)
        ):
            broken.append(link)
    assert not broken, f"{page.name}: links to nowhere: {broken}"


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_pages_list_their_sections(page: Path) -> None:
    text = page.read_text()
    sections = re.findall(r"^## (.*)$", re.sub(r"^```.*?^```", "", text, flags=re.M | re.S), re.M)
    listed = set(_LINK.findall(text))
    unlisted = [s for s in sections if "#" + _anchor(s) not in listed]
    assert not unlisted, f"{page.name}: sections missing from its table of contents: {unlisted}"
