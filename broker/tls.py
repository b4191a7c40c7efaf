"""TLS for the broker's ports: the certificate, key and client CA as their files say now, re-read
when a file changes so certificates rotate without a restart.

Both servers ask on every handshake: gRPC through its certificate fetcher
(grpc.dynamic_ssl_server_credentials), HTTP through the SSL context's SNI callback, which OpenSSL
calls for every ClientHello. A check is three stat() calls. A change that does not load (a key
that no longer matches because its file is still being written, a half-written PEM) keeps the
certificate in force and logs why; the next change is tried again.
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path

import grpc

log = logging.getLogger(__name__)

_Signature = tuple[tuple[int, int, int] | None, ...]


class TlsError(RuntimeError):
    """The certificate, key or client CA cannot be used; the message names the file and why
    (never the key's contents)."""


@dataclass(frozen=True, slots=True)
class TlsMaterial:
    """One consistent reading of the files: PEM bytes that were checked to load together."""

    cert: bytes
    key: bytes
    client_ca: bytes | None


def _read(setting: str, path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise TlsError(f"cannot read {setting} {path}: {exc.strerror or exc}") from None


def _ssl_reason(exc: ssl.SSLError) -> str:
    """OpenSSL's reason ("KEY_VALUES_MISMATCH"), not its library and line numbers."""
    return str(exc.reason or exc.strerror or exc).lower().replace("_", " ")


def server_context(cert: Path, key: Path, client_ca: Path | None) -> ssl.SSLContext:
    """A server SSLContext: TLS 1.2+, the chain of `cert` with `key`, and when `client_ca` is
    given, client certificates required and verified against it.

    Raises:
        TlsError: a file cannot be read, is not PEM, or the key does not match the certificate.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    for setting, path in (("tls_cert", cert), ("tls_key", key)):
        _read(setting, path)  # names the unreadable file; OpenSSL's message would not
    try:
        context.load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        raise TlsError(
            f"tls_cert {cert} and tls_key {key} do not load together: {_ssl_reason(exc)} "
            "(PEM files, the key belonging to the certificate)"
        ) from None
    if client_ca is not None:
        _read("tls_client_ca", client_ca)
        try:
            context.load_verify_locations(cafile=str(client_ca))
        except ssl.SSLError as exc:
            raise TlsError(
                f"tls_client_ca {client_ca} holds no usable CA certificate: {_ssl_reason(exc)}"
            ) from None
        context.verify_mode = ssl.CERT_REQUIRED
    return context


class CertificateFiles:
    """The broker's certificate, key and optional client CA, re-read when one of them changes.

    Construction reads and checks them (TlsError stops the start). `current()` is safe to call
    from any thread: gRPC calls its fetcher on a thread of its own.
    """

    def __init__(self, cert: Path, key: Path, client_ca: Path | None = None) -> None:
        self.cert_path, self.key_path, self.client_ca_path = cert, key, client_ca
        self._lock = threading.Lock()
        self._signature = self._stat()
        self._material, self._context = self._load()
        self._generation = 0

    @property
    def mutual(self) -> bool:
        """Client certificates are required (a client CA is configured)."""
        return self.client_ca_path is not None

    def _paths(self) -> tuple[Path, ...]:
        paths = (self.cert_path, self.key_path)
        return paths if self.client_ca_path is None else (*paths, self.client_ca_path)

    def _stat(self) -> _Signature:
        signature: list[tuple[int, int, int] | None] = []
        for path in self._paths():
            try:
                st = os.stat(path)
            except OSError:
                signature.append(None)
            else:
                signature.append((st.st_ino, st.st_size, st.st_mtime_ns))
        return tuple(signature)

    def _load(self) -> tuple[TlsMaterial, ssl.SSLContext]:
        material = TlsMaterial(
            _read("tls_cert", self.cert_path),
            _read("tls_key", self.key_path),
            None if self.client_ca_path is None else _read("tls_client_ca", self.client_ca_path),
        )
        return material, server_context(self.cert_path, self.key_path, self.client_ca_path)

    def refresh(self) -> bool:
        """Re-reads the files if they changed; True when new ones are in force."""
        signature = self._stat()
        with self._lock:
            if signature == self._signature:
                return False
            try:
                loaded = self._load()
            except TlsError as exc:
                self._signature = signature  # logged once per change, not per handshake
                log.error("TLS files not reloaded, the previous certificate stays in use: %s", exc)
                return False
            if self._stat() != signature:
                return False  # changed while being read: the bytes may not match; next time
            self._signature = signature
            self._material, self._context = loaded
            self._generation += 1
        log.info("TLS certificate reloaded from %s", self.cert_path)
        return True

    def current(self) -> tuple[int, TlsMaterial, ssl.SSLContext]:
        """(generation, PEM bytes, SSLContext) as the files are now; generation counts reloads."""
        self.refresh()
        with self._lock:
            return self._generation, self._material, self._context

    # --- gRPC ---------------------------------------------------------------------------------

    def grpc_credentials(self) -> grpc.ServerCredentials:
        """Server credentials whose certificate follows the files, handshake by handshake."""
        served = [-1]

        def fetch() -> grpc.ServerCertificateConfiguration | None:
            try:
                generation, material, _ = self.current()
            except Exception:  # never let a reload problem fail the handshake machinery
                log.exception("TLS certificate check failed")
                return None
            if generation == served[0]:
                return None  # unchanged: gRPC keeps the configuration it has
            served[0] = generation
            return _grpc_configuration(material)

        _, material, _ = self.current()
        served[0] = self._generation
        return grpc.dynamic_ssl_server_credentials(
            _grpc_configuration(material),
            fetch,  # type: ignore[arg-type]  # the stubs miss that None means "unchanged"
            require_client_authentication=self.mutual,
        )

    # --- HTTP (ssl module) ----------------------------------------------------------------------

    def ssl_context(self) -> ssl.SSLContext:
        """The context to serve HTTPS with: each handshake switches to the context of the files
        as they are now (the SNI callback runs for every ClientHello, server name or not)."""
        base = self.current()[2]

        def switch(sslobj: ssl.SSLObject, server_name: str | None, _: ssl.SSLContext) -> None:
            try:
                context = self.current()[2]
            except Exception:
                log.exception("TLS certificate check failed")
                return
            if sslobj.context is not context:
                sslobj.context = context

        base.sni_callback = switch
        return base


def _grpc_configuration(material: TlsMaterial) -> grpc.ServerCertificateConfiguration:
    return grpc.ssl_server_certificate_configuration(
        [(material.key, material.cert)], root_certificates=material.client_ca
    )
