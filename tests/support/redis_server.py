"""Start, kill, restart and cluster real redis-server processes for tests."""

from __future__ import annotations

import atexit
import contextlib
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import redis
import redis.cluster
from redis.backoff import NoBackoff
from redis.retry import Retry

__all__ = ["RedisCluster", "RedisServer", "free_port"]

_HOST = "127.0.0.1"
_START_TIMEOUT = 10.0
_STOP_GRACE = 5.0
_FIRST_START_TRIES = 5
_RESTART_TRIES = 5
_CLUSTER_TIMEOUT = 20.0
_CLUSTER_SLOTS = 16384
_BIND_FAILURE = "Address already in use"

# Servers with a live process; killed at interpreter exit so a crashed test run
# does not leave redis-server processes behind.
_LIVE: set[RedisServer] = set()


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free at the time of the call.

    Returns:
        The port number. Another process may grab it before it is used, which
        callers must tolerate.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((_HOST, 0))
        port: int = sock.getsockname()[1]
    return port


class RedisServer:
    """One real ``redis-server`` process on a loopback port with its own data dir.

    The data dir survives :meth:`kill` and :meth:`start`, so AOF contents
    persist across restarts; :meth:`cleanup` removes it.
    """

    def __init__(
        self,
        *,
        appendonly: bool = False,
        appendfsync: str = "everysec",
        maxmemory_policy: str = "noeviction",
        extra_args: Sequence[str] = (),
        cluster: bool = False,
    ) -> None:
        """Configure the server; nothing is started until :meth:`start`.

        Args:
            appendonly: Enable the append-only file.
            appendfsync: ``always``, ``everysec`` or ``no``.
            maxmemory_policy: Value for ``--maxmemory-policy``.
            extra_args: Extra command-line arguments for ``redis-server``.
            cluster: Run in cluster mode (with its own ``nodes.conf``).
        """
        self._appendonly = appendonly
        self._appendfsync = appendfsync
        self._maxmemory_policy = maxmemory_policy
        self._extra_args = tuple(extra_args)
        self._cluster = cluster
        self._port = free_port()
        # The cluster bus defaults to port+10000, which may be taken or above 65535.
        self._bus_port = free_port() if cluster else 0
        self._dir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._ever_started = False

    # -- properties -------------------------------------------------------------

    @property
    def port(self) -> int:
        """The TCP port the server listens on (fixed after the first start)."""
        return self._port

    @property
    def bus_port(self) -> int:
        """The cluster bus port, or 0 when not in cluster mode."""
        return self._bus_port

    @property
    def url(self) -> str:
        """A ``redis://`` URL for database 0."""
        return f"redis://{_HOST}:{self._port}/0"

    @property
    def pid(self) -> int:
        """The pid of the current (or most recently started) process.

        Raises:
            RuntimeError: If the server was never started.
        """
        if self._proc is None:
            raise RuntimeError("redis-server has not been started")
        return self._proc.pid

    @property
    def data_dir(self) -> Path:
        """The server's working directory (AOF, nodes.conf, redis.log).

        Raises:
            RuntimeError: If the server was never started or was cleaned up.
        """
        if self._dir is None:
            raise RuntimeError("redis-server has no data dir (not started or cleaned up)")
        return self._dir

    @property
    def log_path(self) -> Path:
        """Path of the server log file."""
        return self.data_dir / "redis.log"

    # -- lifecycle --------------------------------------------------------------

    def is_running(self) -> bool:
        """Return whether the process this object started is still alive."""
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        """Start the server and wait until it answers ``PING``.

        On the first start a bind race is retried on a new free port; on later
        starts the same port is reused, since clients hold the URL.

        Raises:
            RuntimeError: If the server is already running or does not come up.
        """
        if self.is_running():
            raise RuntimeError(f"redis-server already running on port {self._port}")
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="redis-test-"))
        first = not self._ever_started
        tries = _FIRST_START_TRIES if first else _RESTART_TRIES
        failure = ""
        for attempt in range(tries):
            if attempt and first:
                self._port = free_port()
                if self._cluster:
                    self._bus_port = free_port()
            log_offset = self._log_size()
            failure = self._try_start()
            if not failure:
                self._ever_started = True
                return
            if self.is_running():
                # Running but not answering within the timeout: retrying won't help.
                self.kill()
                break
            if _BIND_FAILURE not in self._log_since(log_offset):
                break  # e.g. a config error: retrying won't help either
            # Lost a race for the port (first start), or it is not yet released (restart).
            time.sleep(0.2 * (attempt + 1))
        raise RuntimeError(
            f"redis-server on port {self._port} did not come up: {failure}\n"
            f"--- tail of {self._log_name()} ---\n{self.log_tail()}\n"
            f"--- stderr ---\n{self._stderr_tail()}"
        )

    def _command(self) -> list[str]:
        assert self._dir is not None
        cmd = [
            "redis-server",
            "--port", str(self._port),
            "--bind", _HOST,
            "--save", "",
            "--appendonly", "yes" if self._appendonly else "no",
            "--appendfsync", self._appendfsync,
            "--maxmemory-policy", self._maxmemory_policy,
            "--daemonize", "no",
            "--dir", str(self._dir),
            "--logfile", str(self._dir / "redis.log"),
        ]  # fmt: skip
        if self._cluster:
            cmd += [
                "--cluster-enabled", "yes",
                "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", "2000",
                "--cluster-port", str(self._bus_port),
            ]  # fmt: skip
        cmd += self._extra_args
        return cmd

    def _try_start(self) -> str:
        """Spawn the process and wait for PING; return "" on success, else a reason."""
        assert self._dir is not None
        # Config errors are printed to stderr before the log file is opened, so keep it.
        with (self._dir / "redis.stderr").open("ab") as stderr:
            self._proc = subprocess.Popen(
                self._command(),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                cwd=self._dir,
            )
        _LIVE.add(self)
        deadline = time.monotonic() + _START_TIMEOUT
        last_error = "no answer to PING"
        while time.monotonic() < deadline:
            code = self._proc.poll()
            if code is not None:
                _LIVE.discard(self)
                return f"process exited with code {code}"
            # No client-side retries: this loop retries and must respect its deadline.
            client = redis.Redis(
                host=_HOST,
                port=self._port,
                socket_timeout=1,
                socket_connect_timeout=1,
                retry=Retry(NoBackoff(), 0),
            )
            try:
                if client.ping():
                    return ""
            except redis.RedisError as exc:  # includes LOADING while replaying the AOF
                last_error = f"{type(exc).__name__}: {exc}"
            finally:
                client.close()
            time.sleep(0.05)
        return f"timed out after {_START_TIMEOUT:.0f}s ({last_error})"

    def kill(self) -> None:
        """Send SIGKILL to the server process and wait for it to exit."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        proc.kill()
        proc.wait(timeout=_STOP_GRACE * 2)
        _LIVE.discard(self)

    def stop(self) -> None:
        """Send SIGTERM, wait up to 5 s for a clean exit, then SIGKILL."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        # A paused process would never handle SIGTERM.
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGCONT)
        try:
            proc.wait(timeout=_STOP_GRACE)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=_STOP_GRACE * 2)
        _LIVE.discard(self)

    def pause(self) -> None:
        """Freeze the process with SIGSTOP (connections stay open but hang)."""
        self._running_proc().send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """Unfreeze a paused process with SIGCONT."""
        self._running_proc().send_signal(signal.SIGCONT)

    def restart(self) -> None:
        """Kill the server and start it again on the same port and data dir."""
        self.kill()
        self.start()

    def cleanup(self) -> None:
        """Stop the server if running and remove its data dir."""
        self.stop()
        _LIVE.discard(self)
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def _running_proc(self) -> subprocess.Popen[bytes]:
        if self._proc is None or self._proc.poll() is not None:
            raise RuntimeError(f"redis-server on port {self._port} is not running")
        return self._proc

    # -- clients and diagnostics -----------------------------------------------

    def client(self, *, socket_timeout: float | None = 5.0, **kwargs: Any) -> redis.Redis:
        """Return a new synchronous client (bytes responses) for this server.

        Args:
            socket_timeout: Socket timeout in seconds, or None to block.
            **kwargs: Further ``redis.Redis`` arguments (e.g. ``retry``).

        Returns:
            A ``redis.Redis`` client; the caller should close it.
        """
        kwargs.setdefault("decode_responses", False)
        return redis.Redis(host=_HOST, port=self._port, socket_timeout=socket_timeout, **kwargs)

    def log_tail(self, lines: int = 30) -> str:
        """Return the last ``lines`` lines of the server log, or a placeholder."""
        if self._dir is None:
            return "<no data dir>"
        try:
            text = (self._dir / "redis.log").read_text(errors="replace")
        except OSError as exc:
            return f"<cannot read log: {exc}>"
        return "\n".join(text.splitlines()[-lines:])

    def _log_size(self) -> int:
        try:
            return (self.data_dir / "redis.log").stat().st_size
        except OSError:
            return 0

    def _log_since(self, offset: int) -> str:
        try:
            with (self.data_dir / "redis.log").open("rb") as log:
                log.seek(offset)
                return log.read().decode(errors="replace")
        except OSError:
            return ""

    def _stderr_tail(self, lines: int = 10) -> str:
        try:
            text = (self.data_dir / "redis.stderr").read_text(errors="replace")
        except (OSError, RuntimeError):
            return "<none>"
        return "\n".join(text.splitlines()[-lines:]) or "<empty>"

    def _log_name(self) -> str:
        return str(self._dir / "redis.log") if self._dir is not None else "redis.log"

    def __repr__(self) -> str:
        state = "running" if self.is_running() else "stopped"
        return f"<RedisServer {self.url} {state}>"

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()


def _replica_not_synced(node: RedisServer) -> str:
    """ "" unless the node is a replica whose link to its master is not up yet (a replica that
    never synced cannot take over in a failover)."""
    client = node.client(socket_timeout=1, retry=Retry(NoBackoff(), 0))
    try:
        info = client.info("replication")
    except redis.RedisError as exc:
        return f"{node.url}: {type(exc).__name__}: {exc}"
    finally:
        client.close()
    if info.get("role") == "slave" and info.get("master_link_status") != "up":
        return f"{node.url}: replica not synced with its master yet"
    return ""


class RedisCluster:
    """A real Redis Cluster of N masters, each with R replicas (:class:`RedisServer` nodes)."""

    def __init__(
        self, masters: int = 3, *, replicas: int = 0, extra_args: Sequence[str] = ()
    ) -> None:
        """Configure the cluster; nothing is started until :meth:`start`.

        Args:
            masters: Number of master nodes (redis-cli requires at least 3).
            replicas: Replicas per master (for failover tests).
            extra_args: Extra ``redis-server`` arguments for every node.

        Raises:
            ValueError: If fewer than 3 masters are requested.
        """
        if masters < 3:
            raise ValueError("a Redis Cluster needs at least 3 masters")
        self._replicas = replicas
        count = masters * (1 + replicas)
        self._nodes = [RedisServer(cluster=True, extra_args=extra_args) for _ in range(count)]

    @property
    def nodes(self) -> list[RedisServer]:
        """The node servers, in creation order."""
        return self._nodes

    @property
    def startup_nodes(self) -> list[tuple[str, int]]:
        """``(host, port)`` of every node."""
        return [(_HOST, node.port) for node in self._nodes]

    @property
    def url(self) -> str:
        """A ``redis://`` URL pointing at the first node."""
        return f"redis://{_HOST}:{self._nodes[0].port}"

    def start(self) -> None:
        """Start all nodes, create the cluster and wait until it is fully usable.

        Raises:
            RuntimeError: If a node does not start, ``redis-cli --cluster create``
                fails, or the cluster is not ``ok`` within 20 s.
        """
        try:
            for node in self._nodes:
                node.start()
            self._create()
            self._wait_ok()
        except BaseException:
            self.cleanup()
            raise

    def _create(self) -> None:
        cmd = [
            "redis-cli",
            "--cluster",
            "create",
            *(f"{host}:{port}" for host, port in self.startup_nodes),
            "--cluster-replicas",
            str(self._replicas),
            "--cluster-yes",
        ]
        try:
            result = subprocess.run(
                cmd,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=_CLUSTER_TIMEOUT * 2,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise RuntimeError(f"redis-cli --cluster create timed out: {exc}") from exc
        if result.returncode != 0:
            output = (result.stdout + result.stderr).decode(errors="replace")
            raise RuntimeError(
                f"redis-cli --cluster create failed ({result.returncode}):\n{output[-4000:]}"
            )

    def _wait_ok(self) -> None:
        deadline = time.monotonic() + _CLUSTER_TIMEOUT
        pending = "not checked"
        while time.monotonic() < deadline:
            pending = self._not_ready_reason()
            if not pending:
                return
            time.sleep(0.1)
        tails = "\n".join(f"--- {node.url} ---\n{node.log_tail(10)}" for node in self._nodes)
        raise RuntimeError(f"cluster not ready after {_CLUSTER_TIMEOUT:.0f}s: {pending}\n{tails}")

    def _not_ready_reason(self) -> str:
        """Return "" when every node reports a healthy, fully covered cluster."""
        expected = {
            "cluster_state": "ok",
            "cluster_slots_assigned": str(_CLUSTER_SLOTS),
            "cluster_slots_ok": str(_CLUSTER_SLOTS),
            "cluster_known_nodes": str(len(self._nodes)),
        }
        for node in self._nodes:
            client = node.client(socket_timeout=1, retry=Retry(NoBackoff(), 0))
            try:
                raw = client.cluster("INFO")
            except redis.RedisError as exc:
                return f"{node.url}: {type(exc).__name__}: {exc}"
            finally:
                client.close()
            info = _parse_cluster_info(raw)
            for key, want in expected.items():
                if info.get(key) != want:
                    return f"{node.url}: {key}={info.get(key)!r} (want {want})"
            if self._replicas and (reason := _replica_not_synced(node)):
                return reason
        return ""

    def client(
        self, *, socket_timeout: float | None = 5.0, **kwargs: Any
    ) -> redis.cluster.RedisCluster:
        """Return a new synchronous cluster client (bytes responses).

        Args:
            socket_timeout: Socket timeout in seconds, or None to block.
            **kwargs: Further ``redis.cluster.RedisCluster`` arguments.

        Returns:
            A ``redis.cluster.RedisCluster``; the caller should close it.
        """
        host, port = self.startup_nodes[0]
        kwargs.setdefault("decode_responses", False)
        return redis.cluster.RedisCluster(
            host=host, port=port, socket_timeout=socket_timeout, **kwargs
        )

    def cleanup(self) -> None:
        """Stop every node and remove their data dirs."""
        for node in self._nodes:
            node.cleanup()

    def __repr__(self) -> str:
        return f"<RedisCluster {[node.port for node in self._nodes]}>"

    def __enter__(self) -> RedisCluster:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()


def _parse_cluster_info(raw: object) -> dict[str, str]:
    """Parse ``CLUSTER INFO`` output (bytes, str or an already-parsed dict)."""
    if isinstance(raw, dict):
        return {_text(k): _text(v) for k, v in raw.items()}
    info: dict[str, str] = {}
    for line in _text(raw).splitlines():
        key, sep, value = line.partition(":")
        if sep:
            info[key.strip()] = value.strip()
    return info


def _text(value: object) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


@atexit.register
def _kill_leftovers() -> None:
    for server in list(_LIVE):
        with contextlib.suppress(Exception):
            server.cleanup()
