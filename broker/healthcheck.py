"""`python -m broker.healthcheck`: exit 0 only while the broker's gRPC health says SERVING.

The container image's HEALTHCHECK runs it (no grpc_health_probe binary needed). It asks
`grpc.health.v1.Health/Check` with a short deadline; anything but SERVING (NOT_SERVING while Redis
is unreachable or the broker drains, no answer, a refused connection) exits 1, as Docker expects
of an unhealthy check. The target defaults to the port of TASKBROKER_LISTEN on loopback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence

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


def check(target: str, *, service: str = "", timeout_s: float = 2.0) -> tuple[int, str]:
    """Asks the health service once. Returns (exit code, one line saying what was found)."""
    # A proxy from the environment (HTTP_PROXY, grpc_proxy) must not stand between a container
    # and its own loopback.
    with grpc.insecure_channel(target, options=[("grpc.enable_http_proxy", 0)]) as channel:
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
