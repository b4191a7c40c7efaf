"""The Node.js worker (`clients/node/bin/worker.js`) as a subprocess, for the interop tests.

It is started with asyncio so the broker, which runs on the test's event loop, keeps serving
it; its log goes to a file the assertions read.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
from pathlib import Path
from typing import Final

NODE: Final = shutil.which("node")
NODE_DIR: Final = Path(__file__).resolve().parents[2] / "clients" / "node"
QUEUE: Final = "interop"
#: Long enough for a Node process to start and finish a short task on a loaded machine.
WAIT_S: Final = 8.0


class NodeWorker:
    """`node bin/worker.js` as a subprocess, its log in a file."""

    def __init__(self, process: asyncio.subprocess.Process, log: Path) -> None:
        self.process = process
        self.log = log

    @classmethod
    async def start(
        cls,
        node: str,
        target: str,
        log: Path,
        *,
        lease_ms: int = 30_000,
        concurrency: int = 4,
        queue: str = QUEUE,
        env: dict[str, str] | None = None,
    ) -> NodeWorker:
        args = [
            "bin/worker.js", "--target", target, "--queue", queue,
            "--worker-id", "node-worker", "--concurrency", str(concurrency),
            "--lease-ms", str(lease_ms), "--grace-ms", "5000",
        ]  # fmt: skip
        with log.open("wb") as out:
            process = await asyncio.create_subprocess_exec(
                node, *args, cwd=NODE_DIR, stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out,
                env=None if env is None else {**os.environ, **env},
            )  # fmt: skip
        return cls(process, log)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def count(self, pattern: str) -> int:
        """How many log lines match the regular expression `pattern`."""
        return sum(1 for line in self.text().splitlines() if re.search(pattern, line))

    async def wait_exit(self, timeout_s: float = WAIT_S) -> int:
        try:
            return await asyncio.wait_for(self.process.wait(), timeout_s)
        except TimeoutError:
            raise AssertionError(f"node worker still running:\n{self.text()}") from None

    def assert_running(self) -> None:
        assert self.process.returncode is None, f"node worker exited:\n{self.text()}"

    async def close(self) -> None:
        if self.process.returncode is None:
            self.process.kill()
            await self.process.wait()
