"""Settings: every tunable, its default and its TASKBROKER_* variable, read and validated once."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

MIB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Settings:
    """The broker's configuration: flags override TASKBROKER_* variables, then defaults."""

    #: host:port to serve gRPC on; port 0 picks a free one.
    listen: str = "127.0.0.1:50051"
    #: host:port of the HTTP server (/metrics, /healthz, the dashboard); port 0 picks a free one,
    #: an empty string serves no HTTP at all.
    http_listen: str = "127.0.0.1:8080"
    #: Allow the dashboard's admin actions (pause/resume, redrive and delete dead letters).
    dashboard_admin: bool = False
    #: Redis to use. Unset: start an embedded redis-server with its data in data_dir.
    redis_url: str | None = None
    #: The Redis URL points at a Redis Cluster node.
    redis_cluster: bool = False
    #: Where the embedded redis-server keeps its AOF and data.
    data_dir: Path = Path(".taskbroker-data")
    #: Largest task payload (and ack result) accepted.
    max_payload_bytes: int = 1 * MIB
    #: Lease length when neither the worker nor the task gives one.
    default_lease_s: float = 30.0
    #: Deliveries before a task is dead-lettered, when the task does not say.
    default_max_attempts: int = 5
    #: Retry backoff defaults (full jitter, doubling from initial up to max).
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 600.0
    #: How long an idempotency key deduplicates.
    idempotency_window_s: float = 24 * 3600.0
    #: How long succeeded and cancelled tasks stay readable (GetTask, results); 0 trims at once.
    finished_retention_s: float = 3600.0
    #: How long dead letters are kept.
    dead_retention_s: float = 14 * 24 * 3600.0
    #: On SIGTERM: how long workers may still settle before held tasks go back to pending.
    shutdown_grace_s: float = 10.0
    #: A Lease stream must send its open frame within this long.
    open_timeout_s: float = 5.0
    #: How often expired leases are looked for; a lease is reclaimed within this of its deadline.
    reap_interval_s: float = 0.25
    #: The backstop sweep maintains every registered queue once per this period (paced, whatever
    #: the due index says) and forgets queues that hold nothing; it bounds how late a due time
    #: lost to a broker crash on a Redis Cluster can be handled.
    due_sweep_s: float = 600.0
    #: Queues /metrics, /api/queues and the dashboard show one by one: those with the largest
    #: backlog (pending + scheduled + leased + dead); totals over all queues are shown as well.
    metrics_top_queues: int = 100
    #: Redis socket timeout: a Redis call that takes longer fails with UNAVAILABLE.
    redis_timeout_s: float = 5.0
    #: Python logging level.
    log_level: str = "INFO"

    def __post_init__(self) -> None:
        problems = []
        if self.max_payload_bytes <= 0 or self.max_payload_bytes > 64 * MIB:
            problems.append("max_payload_bytes must be 1 B to 64 MiB")
        if not 0.01 <= self.default_lease_s <= 12 * 3600:
            problems.append("default_lease_s must be 0.01 to 43200")
        if not 1 <= self.default_max_attempts <= 1000:
            problems.append("default_max_attempts must be 1 to 1000")
        if not 0.001 <= self.backoff_initial_s <= self.backoff_max_s <= 7 * 86400:
            problems.append("need 0.001 <= backoff_initial_s <= backoff_max_s <= 604800")
        for name in ("idempotency_window_s", "shutdown_grace_s", "open_timeout_s"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be positive")
        for name in ("finished_retention_s", "dead_retention_s"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must not be negative")
        problems += _maintenance_problems(self.reap_interval_s, self.due_sweep_s)
        if not 1 <= self.metrics_top_queues <= 1000:
            problems.append("metrics_top_queues must be 1 to 1000")
        if self.redis_timeout_s <= 0:
            problems.append("redis_timeout_s must be positive")
        problems += _http_listen_problems(self.http_listen)
        if problems:
            raise ValueError("invalid settings: " + "; ".join(problems))

    @property
    def listen_host(self) -> str:
        return self.listen.rsplit(":", 1)[0]

    @property
    def listen_port(self) -> int:
        return int(self.listen.rsplit(":", 1)[1])


def _maintenance_problems(reap_interval_s: float, due_sweep_s: float) -> list[str]:
    problems = []
    if not 0.01 <= reap_interval_s <= 1.0:
        problems.append("reap_interval_s must be 0.01 to 1 (leases are reclaimed within 1 s)")
    if not 1.0 <= due_sweep_s <= 86400.0:
        problems.append("due_sweep_s must be 1 to 86400")
    return problems


def _http_listen_problems(text: str) -> list[str]:
    """http_listen is host:port, or '' (no HTTP server)."""
    host, sep, port = text.rpartition(":")
    if not text or (sep and host and port.isdigit() and int(port) <= 65535):
        return []
    return ["http_listen must be host:port (port 0 to 65535), or empty"]


def _env_name(field_name: str) -> str:
    return "TASKBROKER_" + field_name.upper()


def _convert(raw: str, kind: str) -> object:
    if kind == "bool":
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off", ""):
            return False
        raise ValueError(f"not a boolean: {raw!r}")
    if kind == "int":
        return int(raw)
    if kind == "float":
        return float(raw)
    if kind == "Path":
        return Path(raw)
    return raw


def _kind(annotation: object) -> str:
    text = str(annotation)
    for kind in ("bool", "int", "float", "Path"):
        if text.startswith(kind):
            return kind
    return "str"


def load_settings(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Builds Settings from flags (``--redis-url``) and TASKBROKER_* variables.

    Raises:
        SystemExit: on a malformed flag or variable, with a message naming it.
    """
    environ = os.environ if environ is None else environ
    parser = argparse.ArgumentParser(
        prog="taskbroker-broker", description="Run the taskbroker gRPC broker."
    )
    for f in fields(Settings):
        flag = "--" + f.name.replace("_", "-")
        kind = _kind(f.type)
        if kind == "bool":
            parser.add_argument(flag, dest=f.name, action="store_const", const="1", default=None)
        else:
            parser.add_argument(flag, dest=f.name, default=None, help=f"env {_env_name(f.name)}")
    args = parser.parse_args(argv)
    values: dict[str, object] = {}
    for f in fields(Settings):
        raw = getattr(args, f.name)
        source = "--" + f.name.replace("_", "-")
        if raw is None and _env_name(f.name) in environ:
            raw, source = environ[_env_name(f.name)], _env_name(f.name)
        if raw is None:
            continue
        try:
            values[f.name] = _convert(raw, _kind(f.type))
        except ValueError as exc:
            parser.error(f"{source}: {exc}")
    if values.get("redis_url") == "":
        values["redis_url"] = None
    try:
        return Settings(**values)  # type: ignore[arg-type]
    except ValueError as exc:
        parser.error(str(exc))
