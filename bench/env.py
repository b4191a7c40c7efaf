"""BenchEnv: the processes a bench run owns. A redis-server of its own (no persistence,
`maxmemory-policy noeviction`, started once) and a broker subprocess (`python -m broker`),
restarted for every scenario so each starts clean and can set its own TASKBROKER_* settings.
Child processes started by scenarios are tracked here, so a failed scenario leaves none behind."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc
import redis.asyncio as aioredis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.baseline import CURRENT, Side
from bench.children import Child, open_log
from broker.embedded_redis import RECOMMENDED_HASH_VALUE_BYTES
from tests.support.redis_server import RedisServer, free_port

BROKER_START_TIMEOUT_S = 30.0
BROKER_STOP_TIMEOUT_S = 20.0


class BrokerProcess:
    """`python -m broker` as an operator runs it, on a free loopback port, against our Redis."""

    def __init__(
        self, redis_url: str, log_dir: Path, extra_env: Mapping[str, str], side: Side = CURRENT
    ) -> None:
        self.side = side
        self.port = free_port()
        self.target = f"127.0.0.1:{self.port}"
        self.env = {
            "TASKBROKER_REDIS_URL": redis_url,
            "TASKBROKER_LISTEN": self.target,
            "TASKBROKER_DATA_DIR": str(log_dir / "broker-data"),
            # Port 0: a broker with an HTTP endpoint never collides with another on a shared
            # machine (a broker without one ignores the variable).
            "TASKBROKER_HTTP_LISTEN": "127.0.0.1:0",
            # A scenario's value may name the broker's port: "[::]:{port}".
            **{name: value.format(port=self.port) for name, value in extra_env.items()},
        }
        self.log = log_dir / f"broker-{side.name}-{self.port}.log"
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None, "broker not started"
        return self.proc.pid

    async def start(self) -> None:
        """Starts the broker and waits until its health check answers SERVING.

        Raises:
            RuntimeError: It exited or did not come up in time (the log tail says why).
        """
        env = {k: v for k, v in os.environ.items() if not k.startswith("TASKBROKER_")}
        env = self.side.env(env, self.side.broker_path) | self.env
        out = open_log(self.log)
        try:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "broker",
                cwd=self.side.broker_cwd, env=env, stdin=asyncio.subprocess.DEVNULL,
                stdout=out, stderr=out,
            )  # fmt: skip
        finally:
            out.close()
        await self._wait_serving()

    async def _wait_serving(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + BROKER_START_TIMEOUT_S
        async with grpc.aio.insecure_channel(self.target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if self.proc.returncode is not None:
                    raise RuntimeError(f"broker exited ({self.proc.returncode}):\n{self.tail()}")
                with contextlib.suppress(grpc.RpcError):
                    reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING and self._all_up():
                        return
                await asyncio.sleep(0.1)
        raise RuntimeError(f"broker not SERVING after {BROKER_START_TIMEOUT_S:g}s:\n{self.tail()}")

    def _all_up(self) -> bool:
        """Every serving process has bound the port (with TASKBROKER_PROCESSES above 1, one may
        answer the health check before the others: workers connecting then would all land on
        it)."""
        processes = int(self.env.get("TASKBROKER_PROCESSES", "1"))
        if processes == 1:
            return True
        return self.log.read_text(errors="replace").count("taskbroker serving on") >= processes

    async def stop(self) -> None:
        """SIGTERM (a graceful drain), then SIGKILL if it takes too long."""
        if self.proc is None or self.proc.returncode is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(BROKER_STOP_TIMEOUT_S):
                await self.proc.wait()
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "<no log>"


class BenchEnv:
    """Redis, the current broker, and the children of the current scenario. `side` says whose
    code the broker and children run (the current tree, or a --baseline's): set it between
    scenario runs, not during one."""

    def __init__(self, workdir: Path, broker_processes: int = 1) -> None:
        self.workdir = workdir
        #: TASKBROKER_PROCESSES of every broker (a scenario's own settings may override it).
        self.broker_processes = broker_processes
        # The Redis settings docs/operations.md recommends (the embedded Redis runs with them too).
        self.redis_server = RedisServer(
            maxmemory_policy="noeviction",
            extra_args=["--hash-max-ziplist-value", str(RECOMMENDED_HASH_VALUE_BYTES)],
        )
        self.redis: aioredis.Redis | None = None
        self.broker: BrokerProcess | None = None
        self._broker_env: Mapping[str, str] = {}
        self.children: list[Child] = []
        self.side: Side = CURRENT

    async def start_redis(self) -> None:
        await asyncio.to_thread(self.redis_server.start)
        self.redis = aioredis.Redis.from_url(self.redis_server.url)

    @property
    def redis_url(self) -> str:
        return self.redis_server.url

    @property
    def r(self) -> aioredis.Redis:
        """The bench's own Redis client (bytes replies)."""
        assert self.redis is not None, "redis not started"
        return self.redis

    @property
    def target(self) -> str:
        assert self.broker is not None, "broker not started"
        return self.broker.target

    async def start_broker(self, extra_env: Mapping[str, str] | None = None) -> BrokerProcess:
        """Starts a broker (stopping the current one) with these TASKBROKER_* settings."""
        await self.stop_broker()
        # Set only when asked for: a --baseline older than the setting would warn about it.
        processes = {"TASKBROKER_PROCESSES": str(self.broker_processes)}
        self._broker_env = {**(processes if self.broker_processes > 1 else {}), **(extra_env or {})}
        self.broker = BrokerProcess(self.redis_url, self.workdir, self._broker_env, self.side)
        await self.broker.start()
        return self.broker

    async def restart_broker(self) -> BrokerProcess:
        """A fresh broker process with the same settings (clean memory, loops start over)."""
        return await self.start_broker(self._broker_env)

    async def stop_broker(self) -> None:
        if self.broker is not None:
            await self.broker.stop()
            self.broker = None

    async def flush(self) -> None:
        """Empties Redis (between scenarios) and lets the allocator settle."""
        await self.r.flushall()
        await self.r.memory_purge()

    async def info(self, section: str) -> dict[str, Any]:
        return dict(await self.r.info(section))

    async def used_memory(self) -> int:
        return int((await self.info("memory"))["used_memory"])

    async def spawn(self, module: str, args: Sequence[str], name: str) -> Child:
        child = await Child.start(
            module, args, name=f"{self.side.name}-{name}", log_dir=self.workdir, side=self.side
        )
        self.children.append(child)
        return child

    async def reap_children(self) -> None:
        """SIGKILLs every child a scenario left running."""
        children, self.children = self.children, []
        await asyncio.gather(*(c.reap() for c in children), return_exceptions=True)

    async def close(self) -> None:
        await self.reap_children()
        await self.stop_broker()
        if self.redis is not None:
            await self.redis.aclose()
        await asyncio.to_thread(self.redis_server.cleanup)
