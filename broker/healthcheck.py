"""`python -m broker.healthcheck`: exit 0 only while the broker's gRPC health says SERVING.

The container image's HEALTHCHECK runs it (no grpc_health_probe binary needed). It asks
`grpc.health.v1.Health/Check` with a short deadline; anything but SERVING (NOT_SERVING while Redis
is unreachable or the broker drains, no answer, a refused connection) exits 1, as Docker expects
of an unhealthy check. The target defaults to the port of TASKBROKER_LISTEN on loopback; a
broker serving TLS is asked over TLS (`channel_security` says with which files).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from broker.config import Settings

#: Docker's HEALTHCHECK exit codes: 0 healthy, 1 unhealthy.
HEALTHY = 0
UNHEALTHY = 1

_WILDCARD_HOSTS = {"", "0.0.0.0", "*"}
_WILDCARD_HOSTS_V6 = {"[::]", "::"}


def default_target(environ: Mapping[str, str] | None = None) -> str:
    """The broker's own address as seen from inside its container.

    TASKBROKER_LISTEN (default 127.0.0.1:50051), with a wildcard host replaced by loopback.
    """
    environ = os.environ if environ is None else environ
    listen = environ.get("TASKBROKER_LISTEN") or Settings().listen
    host, _, port = listen.rpartition(":")
    if host in _WILDCARD_HOSTS:
        host = "127.0.0.1"
    elif host in _WILDCARD_HOSTS_V6:
        host = "[::1]"
    return f"{host}:{port}"


def _read(variable: str, environ: Mapping[str, str]) -> bytes | None:
    path = environ.get(variable)
    if not path:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise TlsFileError(f"cannot read {variable} {path}: {exc.strerror or exc}") from None


class TlsFileError(RuntimeError):
    """A file the TLS check needs cannot be read."""


def channel_security(
    environ: Mapping[str, str] | None = None,
) -> tuple[grpc.ChannelCredentials | None, list[tuple[str, Any]]]:
    """How to reach the broker: plaintext, unless it serves TLS (TASKBROKER_TLS_CERT is set).
    Then the broker is verified with TASKBROKER_TLS_CA (the system's CAs without it) and the
    name TASKBROKER_TLS_SERVER_NAME (default: the target's host), and the check presents
    TASKBROKER_TLS_CLIENT_CERT and _KEY, or, when the broker requires client certificates
    (TASKBROKER_TLS_CLIENT_CA) and none is given, the broker's own certificate and key (they
    must then allow client authentication).

    Raises:
        TlsFileError: a file cannot be read.
    """
    env = os.environ if environ is None else environ
    if not env.get("TASKBROKER_TLS_CERT"):
        return None, []
    cert, key = "TASKBROKER_TLS_CLIENT_CERT", "TASKBROKER_TLS_CLIENT_KEY"
    if not env.get(cert) and env.get("TASKBROKER_TLS_CLIENT_CA"):
        cert, key = "TASKBROKER_TLS_CERT", "TASKBROKER_TLS_KEY"
    credentials = grpc.ssl_channel_credentials(
        root_certificates=_read("TASKBROKER_TLS_CA", env),
        private_key=_read(key, env),
        certificate_chain=_read(cert, env),
    )
    name = env.get("TASKBROKER_TLS_SERVER_NAME")
    return credentials, [("grpc.ssl_target_name_override", name)] if name else []


def check(
    target: str,
    *,
    service: str = "",
    timeout_s: float = 2.0,
    environ: Mapping[str, str] | None = None,
) -> tuple[int, str]:
    """Asks the health service once. Returns (exit code, one line saying what was found)."""
    try:
        credentials, options = channel_security(environ)
    except TlsFileError as exc:
        return UNHEALTHY, f"{target}: {exc}"
    # A proxy from the environment (HTTP_PROXY, grpc_proxy) must not stand between a container
    # and its own loopback.
    options.append(("grpc.enable_http_proxy", 0))
    channel = (
        grpc.insecure_channel(target, options=options)
        if credentials is None
        else grpc.secure_channel(target, credentials, options=options)
    )
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.RpcError as exc:
            # grpc.RpcError declares no accessors; the errors grpc raises are also grpc.Call.
            code = exc.code() if isinstance(exc, grpc.Call | grpc.aio.AioRpcError) else None
            name = code.name if isinstance(code, grpc.StatusCode) else type(exc).__name__
            return UNHEALTHY, f"{target}: {name}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    healthy = reply.status == health_pb2.HealthCheckResponse.SERVING
    return (HEALTHY if healthy else UNHEALTHY), f"{target}: {status}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m broker.healthcheck",
        description="Exit 0 if the broker's gRPC health service answers SERVING, else 1.",
    )
    parser.add_argument(
        "--target",
        default=None,
        help="host:port of the broker (default: TASKBROKER_LISTEN's port on loopback)",
    )
    parser.add_argument(
        "--service", default="", help="health service name (default: the whole server)"
    )
    parser.add_argument(
        "--timeout", type=float, default=2.0, help="seconds to wait for the answer (default 2)"
    )
    args = parser.parse_args(argv)
    code, message = check(
        args.target or default_target(), service=args.service, timeout_s=args.timeout
    )
    stream = sys.stdout if code == HEALTHY else sys.stderr
    stream.write(message + "\n")
    return code


if __name__ == "__main__":
    sys.exit(main())
