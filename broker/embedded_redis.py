"""EmbeddedRedis: a redis-server of the broker's own, for `make run` on a bare machine."""

from __future__ import annotations

import logging
import shutil
import socket
import subprocess
import time
from pathlib import Path

log = logging.getLogger(__name__)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


#: Redis's hash-max-listpack-value we run with and recommend (Redis's default is 64).
RECOMMENDED_HASH_VALUE_BYTES = 512


class EmbeddedRedis:
    """Starts redis-server (found on PATH) on a free loopback port with its AOF in data_dir, and
    stops it with the broker. AOF everysec: a crash of the machine may lose the last second."""

    def __init__(self, data_dir: Path) -> None:
        self._data_dir = data_dir
        self._process: subprocess.Popen[bytes] | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError(
                "no Redis configured (--redis-url / TASKBROKER_REDIS_URL) and no redis-server on "
                "PATH to embed; install redis-server or point the broker at a Redis"
            )
        self._data_dir.mkdir(parents=True, exist_ok=True)
        self.port = _free_port()
        log_file = self._data_dir / "redis.log"
        self._process = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self._data_dir.resolve()),
                "--logfile",
                str(log_file.resolve()),
                "--appendonly",
                "yes",
                "--appendfsync",
                "everysec",
                "--save",
                "",
                "--maxmemory-policy",
                "noeviction",
                # Task hashes with values up to 512 B (a typical payload) stay in the compact
                # listpack encoding: about 470 B per queued task instead of 1,100.
                "--hash-max-ziplist-value",
                str(RECOMMENDED_HASH_VALUE_BYTES),
                "--daemonize",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"embedded redis-server exited; see {log_file}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as conn:
                    conn.sendall(b"PING\r\n")
                    if conn.recv(16).startswith(b"+PONG"):
                        break
            except OSError:
                pass
            time.sleep(0.05)
        else:
            self.stop()
            raise RuntimeError(f"embedded redis-server did not answer; see {log_file}")
        log.info(
            "no Redis configured: started an embedded redis-server on 127.0.0.1:%d "
            "(data and AOF in %s)",
            self.port,
            self._data_dir.resolve(),
        )

    def stop(self) -> None:
        if self._process is None or self._process.poll() is not None:
            return
        self._process.terminate()  # redis-server flushes its AOF on SIGTERM
        try:
            self._process.wait(10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        log.info("embedded redis-server stopped")
