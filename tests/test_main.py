"""`python -m broker` as `make run` starts it: an embedded Redis when none is configured."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from taskbroker.v1 import broker_service_pb2 as bs
from taskbroker.v1 import broker_service_pb2_grpc, task_pb2
from tests.support.redis_server import free_port


class BrokerProcess:
    """A broker process started the way an operator starts it."""

    def __init__(self, data_dir: Path, extra_env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("TASKBROKER_")}
        env |= {
            "TASKBROKER_LISTEN": f"127.0.0.1:{self.port}",
            "TASKBROKER_DATA_DIR": str(data_dir),
            **(extra_env or {}),
        }
        self.log = data_dir.parent / f"broker-{self.port}.log"
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "broker"], env=env, stdout=out, stderr=subprocess.STDOUT
            )
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")

    def wait_serving(self, timeout_s: float = 15.0) -> None:
        health = health_pb2_grpc.HealthStub(self.channel)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log.read_text()
            try:
                reply = health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
        raise AssertionError("broker did not become SERVING:\n" + self.log.read_text())

    def terminate(self) -> int:
        self.channel.close()
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(20)


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
