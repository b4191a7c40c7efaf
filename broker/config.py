"""Settings: every tunable, its default and its TASKBROKER_* variable, read and validated once."""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from broker.settings_doc import env_name, flag_name, help_text, markdown_table

MIB = 1024 * 1024
#: The most serving processes: one per core of a large machine. Each holds up to
#: redis_max_connections Redis connections and runs its own maintenance loops, so far more
#: processes than cores only adds Redis load.
MAX_PROCESSES = 64


@dataclass(frozen=True, slots=True)
class Settings:
    """The broker's configuration: flags override TASKBROKER_* variables, then defaults.

    Each field's `#:` comment is its --help text and its row in docs/configuration.md
    (broker/settings_doc.py): one or more full sentences; times are in seconds.
    """

    #: host:port to serve gRPC on; port 0 picks a free one.
    listen: str = "127.0.0.1:50051"
    #: Broker processes serving the gRPC port together (SO_REUSEPORT, Linux), each with its own
    #: event loop and Redis connection pool, under a supervisor process that SIGTERM drains;
    #: about one per core. The HTTP side is served once and /metrics covers every process; the
    #: stream, call and request-byte limits and redis_max_connections apply to each process
    #: (docs/operations.md). 1: one process, no supervisor.
    processes: int = 1
    #: host:port of the HTTP server (/metrics, /healthz, the dashboard); port 0 picks a free one,
    #: an empty string serves no HTTP at all.
    http_listen: str = "127.0.0.1:8080"
    #: PEM certificate chain the gRPC and HTTP ports serve TLS with; with tls_key. Re-read when
    #: the file changes (checked at each new connection): certificates rotate without a restart.
    tls_cert: Path | None = None
    #: PEM private key of tls_cert (keep it readable by the broker only).
    tls_key: Path | None = None
    #: PEM CA certificates that client certificates must chain to: set, both ports require a
    #: client certificate (mutual TLS). Needs tls_cert.
    tls_client_ca: Path | None = None
    #: Serve a non-loopback address without TLS or without a policy_file (a trusted network,
    #: or TLS ended in front of the broker); the broker logs a warning at start. Without it the
    #: broker refuses to start so.
    insecure: bool = False
    #: Allow the dashboard's admin actions (pause/resume, redrive and delete dead letters).
    dashboard_admin: bool = False
    #: The identities-and-roles policy file (TOML: principals with token digests or certificate
    #: names, and grants of roles on queue patterns; docs/security.md), re-read when it changes.
    #: Unset: no authentication, every caller may do everything.
    policy_file: Path | None = None
    #: Serve gRPC server reflection (grpcurl, buf curl); with a policy file, only to principals
    #: holding `read` on some queue. Turn off with --no-reflection or TASKBROKER_REFLECTION=0.
    reflection: bool = True
    #: Redis to use, as redis://[user:password@]host:port/db. Unset: start an embedded
    #: redis-server with its data in data_dir. A flag is visible in the process list: give a
    #: password through TASKBROKER_REDIS_URL or redis_url_file instead.
    redis_url: str | None = field(default=None, repr=False)
    #: A file holding the Redis URL (its first line), read at start, for example a mounted
    #: secret. Not together with redis_url.
    redis_url_file: Path | None = None
    #: The Redis URL points at a Redis Cluster node.
    redis_cluster: bool = False
    #: Where the embedded redis-server keeps its AOF and data.
    data_dir: Path = Path(".taskbroker-data")
    #: Largest task accepted, counting its payload, header keys and values, type and idempotency
    #: key together; also the largest ack result.
    max_task_bytes: int = 1 * MIB
    #: Lease length when neither the worker nor the task gives one.
    default_lease_s: float = 30.0
    #: Deliveries before a task is dead-lettered, when the task does not say.
    default_max_attempts: int = 5
    #: Delay before the first retry of a failed task that sets no retry policy; it doubles with
    #: each failed attempt (equal jitter: never sooner than half of it) up to backoff_max_s.
    backoff_initial_s: float = 1.0
    #: Longest delay between retries of a task that sets no retry policy.
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
    #: When a Lease stream ends, how long its leases wait for the worker to resume them on a new
    #: stream before they go back to pending (a killed worker's tasks return within this plus
    #: reap_interval_s).
    resume_window_s: float = 0.5
    #: Deliveries and answers queued for one Lease stream and not yet written; past it the stream
    #: gets no more tasks until its worker reads.
    stream_outbox_bytes: int = 8 * MIB
    #: A Lease stream whose worker reads nothing for this long is cut; tasks never written to it
    #: go back to pending without spending an attempt.
    stream_write_timeout_s: float = 30.0
    #: How often expired leases are looked for; a lease is reclaimed within this of its deadline.
    reap_interval_s: float = 0.25
    #: The backstop sweep maintains every registered queue once per this period (paced, whatever
    #: the due index says) and forgets queues that hold nothing; it bounds how late a due time
    #: lost to a broker crash on a Redis Cluster can be handled.
    due_sweep_s: float = 600.0
    #: Queues /metrics, /api/queues and the dashboard show one by one: those with the largest
    #: backlog (pending + scheduled + leased + dead); totals over all queues are shown as well.
    metrics_top_queues: int = 100
    #: Host names (comma-separated) the HTTP server answers to, on any port; a request naming
    #: another Host gets 421, which stops DNS-rebinding pages. Empty: localhost, 127.0.0.1, ::1
    #: and the http_listen host. "*": any Host (only behind a proxy that checks it). /healthz
    #: answers any Host, and so does /metrics when metrics_token_file is set.
    http_allowed_hosts: str = ""
    #: A file holding the bearer token /metrics requires (its first line), read at start;
    #: Prometheus sends it as Authorization: Bearer. Unset: /metrics asks for no token.
    metrics_token_file: Path | None = None
    #: How long a dashboard login lasts (with policy_file set); then the page asks again.
    dashboard_session_s: float = 8 * 3600.0
    #: Redis socket timeout: a Redis call that takes longer fails with UNAVAILABLE.
    redis_timeout_s: float = 5.0
    #: Redis connections in the pool; a call finding none free waits up to redis_timeout_s.
    redis_max_connections: int = 256
    #: Lease streams open on one connection (one peer address and port).
    max_streams_per_connection: int = 100
    #: Lease streams open from one client (its IP address).
    max_streams_per_client: int = 500
    #: Lease streams open on this broker.
    max_streams: int = 2000
    #: WatchTask streams (and so SDK wait() calls) open on this broker process; more get
    #: RESOURCE_EXHAUSTED. Each costs a timer and a Redis read now and then, no connection.
    max_watchers: int = 10_000
    #: How soon a WatchTask stream first reads its task again to catch changes no event
    #: announces (pending to leased, a retry) or an announcement lost with a Redis connection;
    #: the interval doubles while nothing changes, up to watch_poll_max_s.
    watch_poll_initial_s: float = 0.1
    #: The longest a WatchTask stream goes without reading its task again: a finish whose
    #: announcement was lost reaches its watcher within this.
    watch_poll_max_s: float = 1.0
    #: Unary calls (Enqueue, Ack, GetTask, ...) served at once; more get RESOURCE_EXHAUSTED.
    max_concurrent_unary_rpcs: int = 1000
    #: Of max_concurrent_unary_rpcs, the calls one client (IP address) may have in progress
    #: (at most max_concurrent_unary_rpcs).
    max_concurrent_unary_rpcs_per_client: int = 500
    #: Request bytes of the unary calls being served; a call past it gets RESOURCE_EXHAUSTED
    #: (a single larger request is served when it is the only one).
    max_inflight_request_bytes: int = 64 * MIB
    #: Of max_inflight_request_bytes, what one client's calls may hold (at most the total).
    max_inflight_request_bytes_per_client: int = 32 * MIB
    #: Request bytes one client may send per second (Enqueue, Ack, and its Lease streams' frames),
    #: on average over bursts of a second's worth. Past it the client's calls wait before their
    #: requests are read, and its streams are not read; a call that would wait past its deadline
    #: or 5 s gets RESOURCE_EXHAUSTED with RetryInfo (the SDK waits and retries). 0: off.
    request_bytes_per_s_per_client: int = 16 * MIB
    #: Acks, nacks and extensions in one settlements frame; more fail the stream (INVALID_ARGUMENT).
    max_settlements_per_frame: int = 10_000
    #: Distinct queues the settlements of one frame may name; more fail the stream.
    max_queues_per_settlements_frame: int = 100
    #: Settlements frames one stream may have being applied; past it the broker stops reading
    #: the stream until one is answered (backpressure).
    max_settle_batches_per_stream: int = 4
    #: How often the broker pings a client's connection to find a dead worker or a dropped NAT
    #: entry; a dead connection is closed within this plus keepalive_timeout_s.
    keepalive_time_s: float = 30.0
    #: How long the broker waits for a keepalive ping's answer before it closes the connection.
    keepalive_timeout_s: float = 10.0
    #: Shortest interval between client pings the broker accepts on a connection that carries
    #: no data; a client that pings more often is cut off (GOAWAY too_many_pings). The SDK pings
    #: every 20 s.
    min_client_ping_interval_s: float = 5.0
    #: Connections are closed gracefully (GOAWAY) after about this long, so clients spread over
    #: new replicas after a scale-out; 0 keeps connections for ever.
    max_connection_age_s: float = 1800.0
    #: How long calls on a connection past its max age may continue before it is cut.
    max_connection_age_grace_s: float = 60.0
    #: Records the audit trail keeps in Redis (admin actions, denials, authentication failures;
    #: docs/security.md), about: older ones are trimmed.
    audit_max_records: int = 100_000
    #: Python logging level: DEBUG, INFO, WARNING or ERROR.
    log_level: str = "INFO"

    def __post_init__(self) -> None:
        problems = []
        if self.max_task_bytes <= 0 or self.max_task_bytes > 64 * MIB:
            problems.append("max_task_bytes must be 1 B to 64 MiB")
        if not 0.01 <= self.default_lease_s <= 12 * 3600:
            problems.append("default_lease_s must be 0.01 to 43200")
        if not 1 <= self.default_max_attempts <= 1000:
            problems.append("default_max_attempts must be 1 to 1000")
        if not 0.001 <= self.backoff_initial_s <= self.backoff_max_s <= 7 * 86400:
            problems.append("need 0.001 <= backoff_initial_s <= backoff_max_s <= 604800")
        problems += self._stream_problems()
        positive = ("idempotency_window_s", "shutdown_grace_s", "open_timeout_s", "redis_timeout_s")
        for name in (*positive, "stream_write_timeout_s"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be positive")
        for name in ("finished_retention_s", "dead_retention_s"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must not be negative")
        problems += _maintenance_problems(self.reap_interval_s, self.due_sweep_s)
        if not 1 <= self.metrics_top_queues <= 1000:
            problems.append("metrics_top_queues must be 1 to 1000")
        problems += _keepalive_problems(self)
        if self.redis_url is not None and self.redis_url_file is not None:
            problems.append("set redis_url or redis_url_file, not both")
        problems += _limit_problems(self)
        problems += _http_problems(self)
        problems += _exposure_problems(self)
        if problems:
            raise ValueError("invalid settings: " + "; ".join(problems))

    def _stream_problems(self) -> list[str]:
        problems = []
        if not 0 <= self.resume_window_s <= 60:
            problems.append("resume_window_s must be 0 to 60")
        if self.stream_outbox_bytes < 64 * 1024:
            problems.append("stream_outbox_bytes must be at least 65536")
        if not 0.001 <= self.watch_poll_initial_s <= self.watch_poll_max_s <= 3600:
            problems.append("need 0.001 <= watch_poll_initial_s <= watch_poll_max_s <= 3600")
        return problems

    def read_redis_url(self) -> str | None:
        """The Redis URL: redis_url, or the first line of redis_url_file; None: embedded.

        Raises:
            RuntimeError: the file cannot be read or holds no URL (the message never quotes it).
        """
        if self.redis_url_file is None:
            return self.redis_url
        try:
            text = self.redis_url_file.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            path = self.redis_url_file
            raise RuntimeError(f"cannot read redis_url_file {path}: {reason}") from None
        lines = text.strip().splitlines()
        if not lines or not lines[0].strip():
            raise RuntimeError(f"redis_url_file {self.redis_url_file} is empty")
        return lines[0].strip()

    @property
    def tls(self) -> bool:
        """The ports serve TLS."""
        return self.tls_cert is not None and self.tls_key is not None

    @property
    def exposed_addresses(self) -> list[str]:
        """The listen addresses (gRPC, HTTP) other hosts may reach: not loopback."""
        addresses = [self.listen, *([self.http_listen] if self.http_listen else [])]
        return [a for a in addresses if not is_loopback_host(a.rpartition(":")[0])]

    @property
    def allowed_hosts(self) -> frozenset[str] | None:
        """The Host names the HTTP server answers to, lowercase and without brackets; None:
        any."""
        hosts = _host_list(self.http_allowed_hosts)
        if hosts == ["*"]:
            return None
        if not hosts:
            listen_host = self.http_listen.rpartition(":")[0]
            hosts = ["localhost", "127.0.0.1", "::1", *([listen_host] if listen_host else [])]
        return frozenset(h.strip("[]").lower() for h in hosts)

    def read_metrics_token(self) -> str | None:
        """The token /metrics requires (None: none).

        Raises:
            RuntimeError: the file cannot be read or is empty (the message never quotes it).
        """
        path = self.metrics_token_file
        if path is None:
            return None
        try:
            lines = path.read_text().strip().splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise RuntimeError(f"cannot read metrics_token_file {path}: {reason}") from None
        if not lines or not lines[0].strip():
            raise RuntimeError(f"metrics_token_file {path} is empty")
        return lines[0].strip()

    @property
    def listen_host(self) -> str:
        return self.listen.rsplit(":", 1)[0]

    @property
    def listen_port(self) -> int:
        return int(self.listen.rsplit(":", 1)[1])


def is_loopback_host(host: str) -> bool:
    """`localhost` or a loopback IP literal ([::1] too). Other names are not resolved: they may
    name a public interface, so they count as reachable from other hosts."""
    host = host.removeprefix("[").removesuffix("]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _exposure_problems(s: Settings) -> list[str]:
    """TLS files given in pairs, and secure by default: a port other hosts can reach needs TLS
    and a policy file, unless `insecure` says otherwise."""
    problems = []
    if (s.tls_cert is None) != (s.tls_key is None):
        problems.append("set tls_cert and tls_key together")
    if s.tls_client_ca is not None and s.tls_cert is None:
        problems.append("tls_client_ca needs tls_cert and tls_key")
    exposed = s.exposed_addresses
    if exposed and not s.insecure and not (s.tls and s.policy_file is not None):
        missing = [
            *([] if s.tls else ["TLS (tls_cert, tls_key)"]),
            *([] if s.policy_file is not None else ["authentication (policy_file)"]),
        ]
        problems.append(
            f"{' and '.join(exposed)} can be reached from other hosts, and there is no "
            f"{' and no '.join(missing)}: configure them, listen on loopback (127.0.0.1), "
            "or start with --insecure (TASKBROKER_INSECURE=1) to serve without them"
        )
    return problems


def _keepalive_problems(s: Settings) -> list[str]:
    """Keepalive and connection-age bounds: gRPC takes whole milliseconds in a C int."""
    problems = []
    for name in ("keepalive_time_s", "keepalive_timeout_s", "min_client_ping_interval_s"):
        if not 0.001 <= getattr(s, name) <= 86400:
            problems.append(f"{name} must be 0.001 to 86400")
    for name in ("max_connection_age_s", "max_connection_age_grace_s"):
        if not 0 <= getattr(s, name) <= 30 * 86400:
            problems.append(f"{name} must be 0 to 2592000")
    return problems


#: TASKBROKER_* variables that are not broker settings: the SDK and CLI read them, often from the
#: same shell.
CLIENT_VARIABLES = frozenset(
    {
        "TASKBROKER_TARGET",
        "TASKBROKER_TLS",
        "TASKBROKER_TLS_CA",
        "TASKBROKER_TLS_CLIENT_CERT",
        "TASKBROKER_TLS_CLIENT_KEY",
        "TASKBROKER_TLS_SERVER_NAME",
        "TASKBROKER_TOKEN",
        "TASKBROKER_TOKEN_FILE",
    }
)
#: Settings that were renamed: their old variable would otherwise be ignored without a word.
RENAMED = {"TASKBROKER_MAX_PAYLOAD_BYTES": "TASKBROKER_MAX_TASK_BYTES"}


def ignored_variables(environ: Mapping[str, str]) -> list[str]:
    """A warning for each TASKBROKER_* variable that names no setting (a typo or an old name):
    the broker ignores it."""
    known = {env_name(f.name) for f in fields(Settings)} | CLIENT_VARIABLES
    warnings = []
    for name in sorted(environ):
        if name.startswith("TASKBROKER_") and name not in known:
            hint = f"renamed {RENAMED[name]}" if name in RENAMED else "see python -m broker --help"
            warnings.append(f"{name} is not a broker setting and is ignored ({hint})")
    return warnings


#: Count limits and their largest accepted values.
_COUNT_LIMITS = {
    "processes": MAX_PROCESSES,
    "redis_max_connections": 10_000,
    "max_streams_per_connection": 1_000_000,
    "max_streams_per_client": 1_000_000,
    "max_streams": 1_000_000,
    "max_watchers": 1_000_000,
    "max_concurrent_unary_rpcs": 1_000_000,
    "max_concurrent_unary_rpcs_per_client": 1_000_000,
    "max_settlements_per_frame": 1_000_000,
    "max_queues_per_settlements_frame": 100_000,
    "max_settle_batches_per_stream": 1_000,
    "audit_max_records": 100_000_000,
}


def _limit_problems(s: Settings) -> list[str]:
    """The resource limits: counts in range, stream limits nested."""
    problems = [
        f"{name} must be 1 to {high}"
        for name, high in _COUNT_LIMITS.items()
        if not 1 <= getattr(s, name) <= high
    ]
    if not s.max_streams_per_connection <= s.max_streams_per_client <= s.max_streams:
        problems.append("need max_streams_per_connection <= max_streams_per_client <= max_streams")
    for name in ("max_inflight_request_bytes", "max_inflight_request_bytes_per_client"):
        if not MIB <= getattr(s, name) <= 64 * 1024 * MIB:
            problems.append(f"{name} must be 1 MiB to 64 GiB")
    if s.request_bytes_per_s_per_client and not (
        64 * 1024 <= s.request_bytes_per_s_per_client <= 64 * 1024 * MIB
    ):
        problems.append("request_bytes_per_s_per_client must be 0 (off) or 64 KiB to 64 GiB")
    return problems


def _maintenance_problems(reap_interval_s: float, due_sweep_s: float) -> list[str]:
    problems = []
    if not 0.01 <= reap_interval_s <= 1.0:
        problems.append("reap_interval_s must be 0.01 to 1 (leases are reclaimed within 1 s)")
    if not 1.0 <= due_sweep_s <= 86400.0:
        problems.append("due_sweep_s must be 1 to 86400")
    return problems


def _host_list(text: str) -> list[str]:
    return [h.strip() for h in text.split(",")] if text.strip() else []


def _http_problems(s: Settings) -> list[str]:
    problems = _http_listen_problems(s.http_listen)
    if not 60 <= s.dashboard_session_s <= 30 * 86400:
        problems.append("dashboard_session_s must be 60 to 2592000")
    if any(not h or "/" in h or " " in h for h in _host_list(s.http_allowed_hosts)):
        problems.append("http_allowed_hosts must be host names separated by commas, or *")
    return problems


def _http_listen_problems(text: str) -> list[str]:
    """http_listen is host:port, or '' (no HTTP server)."""
    host, sep, port = text.rpartition(":")
    if not text or (sep and host and port.isdigit() and int(port) <= 65535):
        return []
    return ["http_listen must be host:port (port 0 to 65535), or empty"]


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


class _HelpFormatter(argparse.HelpFormatter):
    """Wraps help text at spaces only, so a path or a flag name is never split at its hyphen."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


class _PrintSettingsTable(argparse.Action):
    """--settings-table: prints the table the docs embed, so a person can regenerate it."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: object,
        option_string: str | None = None,
    ) -> None:
        sys.stdout.write(markdown_table(Settings))
        parser.exit()


def load_settings(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Builds Settings from flags (``--redis-url``) and TASKBROKER_* variables.

    Raises:
        SystemExit: on a malformed flag or variable, with a message naming it.
    """
    environ = os.environ if environ is None else environ
    parser = argparse.ArgumentParser(
        prog="python -m broker",
        formatter_class=_HelpFormatter,
        description="Run the taskbroker gRPC broker. Each flag overrides its TASKBROKER_* "
        "variable, which overrides the default; times are in seconds.",
    )
    for f in fields(Settings):
        flag, help_ = flag_name(f.name), help_text(Settings, f)
        if _kind(f.type) == "bool":
            parser.add_argument(
                flag, dest=f.name, action="store_const", const="1", default=None, help=help_
            )
            if f.default is True:  # a flag that is on by default needs a way to turn it off
                parser.add_argument(
                    f"--no-{flag[2:]}",
                    dest=f.name,
                    action="store_const",
                    const="0",
                    help=argparse.SUPPRESS,
                )
        else:
            parser.add_argument(flag, dest=f.name, default=None, help=help_)
    parser.add_argument(
        "--settings-table",
        action=_PrintSettingsTable,
        help="Print every setting as a Markdown table (as in docs/configuration.md) and exit.",
    )
    args = parser.parse_args(argv)
    values: dict[str, object] = {}
    for f in fields(Settings):
        raw = getattr(args, f.name)
        source = flag_name(f.name)
        if raw is None and env_name(f.name) in environ:
            raw, source = environ[env_name(f.name)], env_name(f.name)
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
