"""The one place that opens gRPC channels to a broker: plaintext or TLS (optionally with a client
certificate), and a bearer token sent as `authorization: Bearer <token>` on every call.

A token travels as gRPC call credentials, so it reaches every call the channel carries (unary
calls and the Lease stream alike) without each call site adding it. gRPC sends call credentials
only over a secure channel; over plaintext it accepts them on its "local" credentials, which
check that the peer is on loopback (or a Unix socket). So a token is sent over TLS, or in the
clear to this machine only: never in the clear over a network.
"""

from __future__ import annotations

import ipaddress
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import grpc

#: Environment variables the SDK and CLI read (the broker's own TLS settings are tls_cert,
#: tls_key and tls_client_ca: different names, so one shell can hold both).
ENV_TARGET: Final = "TASKBROKER_TARGET"
DEFAULT_TARGET: Final = "127.0.0.1:50051"
ENV_TLS: Final = "TASKBROKER_TLS"
ENV_TLS_CA: Final = "TASKBROKER_TLS_CA"
ENV_TLS_CLIENT_CERT: Final = "TASKBROKER_TLS_CLIENT_CERT"
ENV_TLS_CLIENT_KEY: Final = "TASKBROKER_TLS_CLIENT_KEY"
ENV_TLS_SERVER_NAME: Final = "TASKBROKER_TLS_SERVER_NAME"
ENV_TOKEN: Final = "TASKBROKER_TOKEN"
ENV_TOKEN_FILE: Final = "TASKBROKER_TOKEN_FILE"

_TRUE: Final = frozenset({"1", "true", "yes", "on"})


class ChannelConfigError(ValueError):
    """TLS files or a token cannot be used; the message names the file (never a token)."""


@dataclass(frozen=True, slots=True)
class TlsConfig:
    """TLS to the broker. All fields are optional: `TlsConfig()` verifies the broker against
    the system's CA certificates.

    Attributes:
        ca_file: PEM CA certificates to verify the broker's certificate with. None: the
            system's.
        cert_file: PEM client certificate (chain), for a broker that requires one (mTLS).
        key_file: PEM private key of cert_file.
        server_name: The name to verify the broker's certificate against (and send as SNI),
            when the target's host is not in it (an IP address, a proxy's name).
    """

    ca_file: str | Path | None = None
    cert_file: str | Path | None = None
    key_file: str | Path | None = None
    server_name: str | None = None

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise ChannelConfigError("TLS: give the client certificate and its key together")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> TlsConfig | None:
        """TLS from TASKBROKER_TLS_CA, TASKBROKER_TLS_CLIENT_CERT, TASKBROKER_TLS_CLIENT_KEY,
        TASKBROKER_TLS_SERVER_NAME, or TASKBROKER_TLS=1 for the system's CAs. None: none set
        (plaintext)."""
        env = os.environ if environ is None else environ
        values = {
            name: env.get(var) or None
            for name, var in (
                ("ca_file", ENV_TLS_CA),
                ("cert_file", ENV_TLS_CLIENT_CERT),
                ("key_file", ENV_TLS_CLIENT_KEY),
                ("server_name", ENV_TLS_SERVER_NAME),
            )
        }
        if not any(values.values()) and env.get(ENV_TLS, "").lower() not in _TRUE:
            return None
        return cls(**values)

    def credentials(self) -> grpc.ChannelCredentials:
        """Reads the files (once: a new channel reads them again).

        Raises:
            ChannelConfigError: a file cannot be read.
        """
        return grpc.ssl_channel_credentials(
            root_certificates=_read_optional("TLS CA file", self.ca_file),
            private_key=_read_optional("TLS client key file", self.key_file),
            certificate_chain=_read_optional("TLS client certificate file", self.cert_file),
        )


def _read_optional(what: str, path: str | Path | None) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ChannelConfigError(f"cannot read {what} {path}: {exc.strerror or exc}") from None


def _check_token(token: str, source: str) -> str:
    token = token.strip()
    if not token:
        raise ChannelConfigError(f"the token from {source} is empty")
    if not all(" " < c <= "~" for c in token):  # printable ASCII, no spaces: a header value
        raise ChannelConfigError(f"the token from {source} has characters a header cannot carry")
    return token


class BearerToken(grpc.AuthMetadataPlugin):
    """Adds `authorization: Bearer <token>` to each call. A token file is re-read when it
    changes (a mounted secret that rotates). The token never appears in a repr or message."""

    def __init__(self, token: str | None = None, token_file: str | Path | None = None) -> None:
        if (token is None) == (token_file is None):
            raise ChannelConfigError("give a token or a token file, not both")
        self._file = None if token_file is None else Path(token_file)
        self._lock = threading.Lock()
        self._signature: tuple[int, int, int] | None = None
        self._token = "" if token is None else _check_token(token, "the token argument")
        if self._file is not None:
            self.current()  # a missing or empty file fails now, not at the first call

    def __repr__(self) -> str:
        return f"BearerToken(file={self._file})" if self._file else "BearerToken(<token>)"

    def current(self) -> str:
        """The token; a file's is read again when its size, mtime or inode changed.

        Raises:
            ChannelConfigError: the file cannot be read or holds no token.
        """
        if self._file is None:
            return self._token
        try:
            st = os.stat(self._file)
            signature = (st.st_ino, st.st_size, st.st_mtime_ns)
            with self._lock:
                if signature != self._signature:
                    text = self._file.read_text(encoding="ascii", errors="replace")
                    self._token = _check_token(text, f"token file {self._file}")
                    self._signature = signature
                return self._token
        except OSError as exc:
            raise ChannelConfigError(
                f"cannot read token file {self._file}: {exc.strerror or exc}"
            ) from None

    def __call__(
        self, context: grpc.AuthMetadataContext, callback: grpc.AuthMetadataPluginCallback
    ) -> None:
        try:
            token = self.current()
        except ChannelConfigError as exc:
            callback((), exc)  # the call fails with this message (it names the file only)
            return
        callback((("authorization", f"Bearer {token}"),), None)


def _hosts(target: str) -> list[str] | None:
    """The hosts a target names, or None when it is not host:port, ipv4:/ipv6: or dns:."""
    if target.startswith(("unix:", "unix-abstract:")):
        return []
    for scheme in ("ipv4:", "ipv6:"):
        if target.startswith(scheme):
            return [entry.rpartition(":")[0] for entry in target[len(scheme) :].split(",")]
    if target.startswith("dns:"):
        target = target[4:].lstrip("/")
        if "/" in target:  # dns://authority/host:port
            target = target.split("/", 1)[1]
    host, sep, _ = target.rpartition(":")
    return [host] if sep and "/" not in host else None


def is_local_target(target: str) -> bool:
    """The target is a Unix socket, `localhost` or loopback IP addresses only."""
    hosts = _hosts(target)
    if hosts is None:
        return False
    for host in hosts:
        host = host.removeprefix("[").removesuffix("]")
        if host == "localhost":
            continue
        try:
            if not ipaddress.ip_address(host).is_loopback:
                return False
        except ValueError:
            return False
    return True


def channel_credentials(
    target: str, tls: TlsConfig | None = None, token: BearerToken | None = None
) -> grpc.ChannelCredentials | None:
    """The credentials of channels to `target`: TLS when `tls` is given, and `token` on every
    call. None: plaintext, no token. Files are read here, so a bad one fails at once.

    Raises:
        ChannelConfigError: a TLS file cannot be read, or a token would go in the clear to
            another host.
    """
    if tls is not None:
        credentials = tls.credentials()
    elif token is None:
        return None
    elif is_local_target(target):
        kind = (
            grpc.LocalConnectionType.UDS
            if target.startswith("unix")
            else grpc.LocalConnectionType.LOCAL_TCP
        )
        credentials = grpc.local_channel_credentials(kind)
    else:
        raise ChannelConfigError(
            f"a token is sent only over TLS or to this machine, and {target} is neither: "
            "configure TLS (tls=TlsConfig(...), --tls-ca or TASKBROKER_TLS_CA)"
        )
    if token is not None:
        credentials = grpc.composite_channel_credentials(
            credentials, grpc.metadata_call_credentials(token, name="taskbroker-token")
        )
    return credentials


def tls_options(tls: TlsConfig | None) -> list[tuple[str, Any]]:
    """Channel options TLS needs: the server name to verify, when it is overridden."""
    if tls is None or not tls.server_name:
        return []
    return [("grpc.ssl_target_name_override", tls.server_name)]


def open_channel(
    target: str, options: Sequence[tuple[str, Any]], credentials: grpc.ChannelCredentials | None
) -> grpc.aio.Channel:
    """A grpc.aio channel to `target` (bound to the running event loop)."""
    if credentials is None:
        return grpc.aio.insecure_channel(target, options=options)
    return grpc.aio.secure_channel(target, credentials, options=options)
