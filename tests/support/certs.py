"""Certificates for TLS and mTLS tests: a CA that issues server and client certificates as PEM
files (the `cryptography` package; nothing is fetched or cached between runs).

    ca = make_ca(tmp_path)
    server = ca.issue_server(tmp_path)                      # SAN 127.0.0.1, ::1 and localhost
    cert, key = ca.issue_client(tmp_path, "worker-a")        # CN and SAN (DNS) worker-a
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Final, NamedTuple

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

#: Names the server certificate is valid for by default: every loopback spelling a test dials.
LOOPBACK_NAMES: Final = ("localhost", "127.0.0.1", "::1")


class CertPair(NamedTuple):
    """A certificate and its private key, as PEM files (unpacks as `cert, key = pair`)."""

    cert: Path
    key: Path


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


def _san(names: tuple[str, ...]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for name in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


@dataclass(frozen=True, slots=True)
class CA:
    """A certificate authority whose certificate is `cert` (give it to the verifying side)."""

    name: str
    cert: Path
    key: Path
    _certificate: x509.Certificate
    _private_key: ec.EllipticCurvePrivateKey

    def _issue(
        self,
        directory: Path,
        file_stem: str,
        common_name: str,
        names: tuple[str, ...],
        usage: x509.ObjectIdentifier,
        valid_days: int,
    ) -> CertPair:
        key = _key()
        now = datetime.datetime.now(datetime.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self._certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=valid_days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if names:
            builder = builder.add_extension(_san(names), critical=False)
        cert = builder.sign(self._private_key, hashes.SHA256())
        directory.mkdir(parents=True, exist_ok=True)
        pair = CertPair(directory / f"{file_stem}.crt", directory / f"{file_stem}.key")
        _write_key(key, pair.key)
        pair.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return pair

    def issue_server(
        self,
        directory: Path,
        names: tuple[str, ...] = LOOPBACK_NAMES,
        *,
        file_stem: str = "server",
        common_name: str = "taskbroker",
        valid_days: int = 30,
    ) -> CertPair:
        """A server certificate for `names` (DNS names and IP addresses, in the SAN)."""
        return self._issue(
            directory, file_stem, common_name, names, ExtendedKeyUsageOID.SERVER_AUTH, valid_days
        )

    def issue_client(
        self,
        directory: Path,
        name: str,
        *,
        san: tuple[str, ...] | None = None,
        file_stem: str | None = None,
        valid_days: int = 30,
    ) -> CertPair:
        """A client certificate with common name `name` and a SAN of `san` (default: `name` as
        a DNS name; () for none): `cert_path, key_path = ca.issue_client(dir, name)`."""
        return self._issue(
            directory,
            file_stem or f"client-{name}",
            name,
            (name,) if san is None else san,
            ExtendedKeyUsageOID.CLIENT_AUTH,
            valid_days,
        )


_CA_KEY_USAGE: Final = x509.KeyUsage(
    digital_signature=True,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=True,
    crl_sign=True,
    encipher_only=False,
    decipher_only=False,
)


def make_ca(directory: Path, name: str = "taskbroker test CA") -> CA:
    """A new self-signed CA; its certificate and key are written to `directory`."""
    key = _key()
    now = datetime.datetime.now(datetime.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_CA_KEY_USAGE, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    stem = "ca-" + "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")
    cert_path, key_path = directory / f"{stem}.crt", directory / f"{stem}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(key, key_path)
    return CA(name, cert_path, key_path, cert, key)
