"""The policy file: principals (how each proves who it is) and grants (roles on queue patterns).

    [[principals]]
    name = "billing-api"
    # SHA-256 of each token this principal may present; two during a rotation.
    token_sha256 = ["9f86d081884c7d65..."]
    # Names (certificate SAN DNS/URI entries or the CN) that identify it over mTLS.
    certificate_names = ["billing-api.internal"]

    [[grants]]
    principals = ["billing-api"]   # "*" is every authenticated principal
    roles = ["produce", "read"]
    queues = ["billing-*"]         # fnmatch globs; "*" is every queue

Tokens are stored hashed: the file can be read by whoever deploys it without giving away a
credential. Tokens are long random strings (`python -m broker.auth.tokens NAME` makes one), so
a plain SHA-256 is enough; a password hash would only slow every call down.
"""

from __future__ import annotations

import fnmatch
import hashlib
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from broker.auth.principal import ANONYMOUS, Principal, Role

SHA256_HEX = re.compile(r"[0-9a-f]{64}")
PRINCIPAL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@/-]{0,127}")
EVERYONE = "*"


class PolicyError(ValueError):
    """The policy file is malformed; the message names the file and the entry."""


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Grant:
    principals: frozenset[str]
    roles: frozenset[Role]
    queues: tuple[str, ...]

    def covers(self, principal: str, role: Role, queue: str) -> bool:
        return (
            role in self.roles
            and (principal in self.principals or EVERYONE in self.principals)
            and any(fnmatch.fnmatchcase(queue, pattern) for pattern in self.queues)
        )


@dataclass(frozen=True, slots=True)
class Policy:
    """An immutable, parsed policy; PolicyFile swaps in a new one when the file changes."""

    principal_by_token_digest: Mapping[str, str]
    principal_by_certificate_name: Mapping[str, str]
    grants: tuple[Grant, ...]

    def principal_for_token(self, token: str) -> Principal | None:
        name = self.principal_by_token_digest.get(token_digest(token))
        return None if name is None else Principal(name, "token")

    def principal_for_certificate(self, names: Iterable[str]) -> Principal | None:
        """The principal of a client certificate, from its SAN entries or CN, in that order."""
        for cert_name in names:
            name = self.principal_by_certificate_name.get(cert_name)
            if name is not None:
                return Principal(name, "certificate")
        return None

    def allows(self, principal: Principal, role: Role, queue: str) -> bool:
        if principal.is_anonymous:
            return False  # a policy is in force: nobody unauthenticated may do anything
        return any(g.covers(principal.name, role, queue) for g in self.grants)

    def may_somewhere(self, principal: Principal, role: Role) -> bool:
        """Whether any grant gives the role to the principal, on any queue (for calls that
        name no queue, such as listing queues: they then see only the permitted ones)."""
        return not principal.is_anonymous and any(
            role in g.roles and (principal.name in g.principals or EVERYONE in g.principals)
            for g in self.grants
        )


def parse_policy(text: str, source: str) -> Policy:
    """Parses and validates a policy; PolicyError names `source` and what is wrong. The
    message never quotes a token digest's value."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(f"{source}: not valid TOML: {exc}") from None
    _only_keys(data, {"principals", "grants"}, source)
    by_digest: dict[str, str] = {}
    by_cert: dict[str, str] = {}
    for i, entry in enumerate(_tables(data, "principals", source)):
        _add_principal(entry, f"{source}: principals[{i}]", by_digest, by_cert)
    names = set(by_digest.values()) | set(by_cert.values())
    grants = [
        _grant(entry, f"{source}: grants[{i}]", names)
        for i, entry in enumerate(_tables(data, "grants", source))
    ]
    return Policy(by_digest, by_cert, tuple(grants))


def _add_principal(
    entry: Mapping[str, Any], where: str, by_digest: dict[str, str], by_cert: dict[str, str]
) -> None:
    _only_keys(entry, {"name", "token_sha256", "certificate_names"}, where)
    name = entry.get("name")
    if not isinstance(name, str) or not PRINCIPAL_NAME.fullmatch(name):
        raise PolicyError(f"{where}.name: must be 1-128 letters, digits or ._:@/-")
    if name == ANONYMOUS.name or name in by_digest.values() or name in by_cert.values():
        raise PolicyError(f"{where}.name: {name!r} is reserved or used twice")
    digests = _strings(entry, "token_sha256", where)
    cert_names = _strings(entry, "certificate_names", where)
    if not digests and not cert_names:
        raise PolicyError(f"{where}: needs token_sha256 or certificate_names (no way to log in)")
    for digest in digests:
        if not SHA256_HEX.fullmatch(digest):
            raise PolicyError(f"{where}.token_sha256: each must be 64 lowercase hex digits")
        if digest in by_digest:
            raise PolicyError(f"{where}.token_sha256: a digest is listed twice")
        by_digest[digest] = name
    for cert_name in cert_names:
        if cert_name in by_cert:
            raise PolicyError(f"{where}.certificate_names: {cert_name!r} is listed twice")
        by_cert[cert_name] = name


def _grant(entry: Mapping[str, Any], where: str, names: set[str]) -> Grant:
    _only_keys(entry, {"principals", "roles", "queues"}, where)
    principals = _strings(entry, "principals", where, required=True)
    unknown = [p for p in principals if p != EVERYONE and p not in names]
    if unknown:
        raise PolicyError(f"{where}.principals: no principal named {unknown[0]!r}")
    roles = _strings(entry, "roles", where, required=True)
    bad = [r for r in roles if r not in Role._value2member_map_]
    if bad:
        raise PolicyError(
            f"{where}.roles: {bad[0]!r} is not one of {', '.join(r.value for r in Role)}"
        )
    queues = _strings(entry, "queues", where, required=True)
    return Grant(frozenset(principals), frozenset(map(Role, roles)), tuple(queues))


def read_policy(path: Path) -> Policy:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PolicyError(f"cannot read policy file {path}: {exc}") from None
    return parse_policy(text, str(path))


def _tables(data: Mapping[str, Any], key: str, where: str) -> list[Mapping[str, Any]]:
    value = data.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise PolicyError(f"{where}: {key} must be an array of tables ([[{key}]])")
    return value


def _strings(entry: Mapping[str, Any], key: str, where: str, required: bool = False) -> list[str]:
    value = entry.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise PolicyError(f"{where}.{key}: must be a list of non-empty strings")
    if required and not value:
        raise PolicyError(f"{where}.{key}: must not be empty")
    return value


def _only_keys(entry: Mapping[str, Any], allowed: set[str], where: str) -> None:
    # A typo ("role" for "roles") must not silently grant nothing or everything.
    for key in entry:
        if key not in allowed:
            raise PolicyError(f"{where}: unknown key {key!r} (known: {', '.join(sorted(allowed))})")
