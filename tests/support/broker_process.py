"""BrokerProcess: a broker started as an operator starts it (`python -m broker`)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.support.redis_server import free_port


class BrokerProcess:
    """A broker process started the way an operator starts it."""

    def __init__(
        self, data_dir: Path, extra_env: dict[str, str] | None = None, port: int | None = None
    ) -> None:
        self.port = free_port() if port is None else port
        env = {k: v for k, v in os.environ.items() if not k.startswith("TASKBROKER_")}
        env |= {
            "TASKBROKER_LISTEN": f"127.0.0.1:{self.port}",
            "TASKBROKER_HTTP_LISTEN": "127.0.0.1:0",
            "TASKBROKER_DATA_DIR": str(data_dir),
            **(extra_env or {}),
        }
        self.log = data_dir.parent / f"broker-{self.port}.log"
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "broker"],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
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

    def exit_code(self, timeout_s: float = 30.0) -> int | None:
        """The code the broker exits with by itself within the timeout; None if it is still
        running then (it is stopped, so a failing test leaves no broker behind)."""
        try:
            return self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.terminate()
            return None
        finally:
            self.channel.close()
