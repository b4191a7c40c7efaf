"""`python -m broker` as `make run` starts it: an embedded Redis when none is configured."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.__main__ import serve
from broker.config import load_settings
from taskbroker.v1 import broker_service_pb2 as bs
from taskbroker.v1 import broker_service_pb2_grpc, task_pb2
from tests.support.broker_process import BrokerProcess
from tests.support.redis_server import free_port


@pytest.fixture
def data_dir(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "data"
    yield path


def test_broker_runs_with_an_embedded_redis_that_keeps_tasks_across_restarts(
    data_dir: Path,
) -> None:
    first = BrokerProcess(data_dir)
    try:
        first.wait_serving()
        stub = broker_service_pb2_grpc.BrokerServiceStub(first.channel)
        spec = task_pb2.TaskSpec(queue="emails", type="send", payload=b"hi")
        (result,) = stub.Enqueue(bs.EnqueueRequest(tasks=[spec]), timeout=5).results
    finally:
        assert first.terminate() == 0
    log = first.log.read_text()
    assert "embedded redis-server" in log and "embedded redis-server stopped" in log
    assert (data_dir / "redis.log").exists()

    second = BrokerProcess(data_dir)
    try:
        second.wait_serving()
        stub = broker_service_pb2_grpc.BrokerServiceStub(second.channel)
        task = stub.GetTask(bs.GetTaskRequest(task_id=result.task_id), timeout=5).task
        assert task.state == task_pb2.TASK_STATE_PENDING and task.payload == b"hi"
    finally:
        assert second.terminate() == 0


def test_broker_exits_with_a_clear_message_when_redis_is_unreachable(tmp_path: Path) -> None:
    broken = BrokerProcess(tmp_path, {"TASKBROKER_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"})
    assert broken.process.wait(30) == 2
    broken.channel.close()
    log = broken.log.read_text()
    assert "cannot start" in log and "Traceback" not in log


async def test_a_broker_that_cannot_start_hands_its_signals_back_before_its_loop_closes(
    tmp_path: Path,
) -> None:
    """asyncio.run closes the loop's wakeup socket before it removes the signal handlers: a
    SIGTERM in between (a supervisor stopping a process that is failing to start) printed an
    OSError traceback. serve() hands them back itself, while its loop still runs."""
    settings = load_settings(
        ["--listen", f"127.0.0.1:{free_port()}", "--http-listen", ""],
        environ={
            "TASKBROKER_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
            "TASKBROKER_DATA_DIR": str(tmp_path),
        },
    )
    assert await serve(settings) == 2
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    assert signal.getsignal(signal.SIGINT) == signal.default_int_handler


def test_a_sigterm_as_soon_as_the_broker_serves_stops_it_and_its_embedded_redis(
    tmp_path: Path,
) -> None:
    """The broker says it serves before its start returns: a SIGTERM then (a deploy, a test)
    once killed it and left its embedded redis-server running."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKBROKER_")}
    env |= {"TASKBROKER_DATA_DIR": str(tmp_path / "data"), "TASKBROKER_HTTP_LISTEN": ""}
    process = subprocess.Popen(
        [sys.executable, "-m", "broker", "--listen", f"127.0.0.1:{free_port()}"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert process.stdout is not None
    lines = []
    for line in process.stdout:
        lines.append(line)
        if "taskbroker serving on" in line:
            process.send_signal(signal.SIGTERM)
            break
    output = "".join(lines) + process.communicate(timeout=30)[0]
    assert process.returncode == 0, output
    assert "embedded redis-server stopped" in output
