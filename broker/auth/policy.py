"""The policy file: principals (how each proves who it is) and grants (roles on queue patterns).

    [[principals]]
    name = "billing-api"
    # SHA-256 of each token this principal may present; two during a rotation.
    token_sha256 = ["9f86d081884c7d65..."]
    # Names (certificate SAN DNS/URI entries or the CN) that identify it over mTLS.
    certificate_names = ["billing-api.internal"]
    # Subjects of JWTs from the identity provider of [jwt] (optional).
    jwt_subjects = ["svc-billing-api"]

    [[grants]]
    principals = ["billing-api"]   # "*" is every authenticated principal
    roles = ["produce", "read"]
    queues = ["billing-*"]         # fnmatch globs; "*" is every queue

An optional [jwt] table accepts JWTs signed by an identity provider (broker/auth/jwt_tokens.py):
`issuer`, `audience`, `keys_file` (a JWKS or PEM public keys, relative to the policy file),
`algorithms`, `subject_claim`, `leeway_s`.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from broker.auth.jwt_tokens import (
    ASYMMETRIC,
    DEFAULT_ALGORITHMS,
    JwtKeyError,
    JwtVerifier,
    load_keys,
    looks_like_jwt,
)
from broker.auth.principal import ANONYMOUS, Principal, Role
from broker.errors import Unauthenticated

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
    principal_by_jwt_subject: Mapping[str, str] = field(default_factory=dict)
    jwt: JwtVerifier | None = None
    #: Files the policy was read from besides its own (the JWT keys): a change reloads it.
    depends_on: tuple[Path, ...] = ()

    def principal_for_token(self, token: str) -> Principal | None:
        """The principal of an opaque token of the file (not a JWT), or None."""
        name = self.principal_by_token_digest.get(token_digest(token))
        return None if name is None else Principal(name, "token")

    def principal_for_bearer(self, token: str) -> Principal:
        """The principal of a bearer token: an opaque token of the file, or a JWT that verifies
        against [jwt] and whose subject a principal lists.

        Raises:
            Unauthenticated: saying why, never quoting the token.
        """
        digest = token_digest(token)
        name = self.principal_by_token_digest.get(digest)
        if name is not None:
            return Principal(name, "token")
        if self.jwt is not None and looks_like_jwt(token):
            subject = self.jwt.subject(token, digest)
            name = self.principal_by_jwt_subject.get(subject)
            if name is None:
                raise Unauthenticated("the JWT's subject names no principal in the policy")
            return Principal(name, "jwt")
        raise Unauthenticated("the bearer token is not one the broker's policy knows")

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


def parse_policy(text: str, source: str, base_dir: Path | None = None) -> Policy:
    """Parses and validates a policy; PolicyError names `source` and what is wrong. The
    message never quotes a token digest's value. `base_dir`: where relative paths (the JWT
    keys file) are found; the current directory by default."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(f"{source}: not valid TOML: {exc}") from None
    _only_keys(data, {"principals", "grants", "jwt"}, source)
    by_digest: dict[str, str] = {}
    by_cert: dict[str, str] = {}
    by_subject: dict[str, str] = {}
    seen: set[str] = set()
    for i, entry in enumerate(_tables(data, "principals", source)):
        where = f"{source}: principals[{i}]"
        seen.add(_add_principal(entry, where, seen, by_digest, by_cert, by_subject))
    grants = [
        _grant(entry, f"{source}: grants[{i}]", seen)
        for i, entry in enumerate(_tables(data, "grants", source))
    ]
    verifier: JwtVerifier | None = None
    depends_on: tuple[Path, ...] = ()
    if "jwt" in data:
        verifier, keys_path = _jwt(data["jwt"], f"{source}: jwt", base_dir or Path())
        depends_on = (keys_path,)
    elif by_subject:
        raise PolicyError(f"{source}: principals list jwt_subjects but there is no [jwt] table")
    return Policy(by_digest, by_cert, tuple(grants), by_subject, verifier, depends_on)


def _jwt(entry: Any, where: str, base_dir: Path) -> tuple[JwtVerifier, Path]:
    if not isinstance(entry, dict):
        raise PolicyError(f"{where}: must be a table ([jwt])")
    known = {"issuer", "audience", "keys_file", "algorithms", "subject_claim", "leeway_s"}
    _only_keys(entry, known, where)
    for key in ("issuer", "audience", "keys_file"):
        if not isinstance(entry.get(key), str) or not entry[key]:
            raise PolicyError(f"{where}.{key}: required, a non-empty string")
    algorithms = tuple(_strings(entry, "algorithms", where) or DEFAULT_ALGORITHMS)
    bad = [a for a in algorithms if a not in ASYMMETRIC]
    if bad:
        raise PolicyError(
            f"{where}.algorithms: {bad[0]!r} is not allowed (only {', '.join(sorted(ASYMMETRIC))})"
        )
    claim = entry.get("subject_claim", "sub")
    leeway = entry.get("leeway_s", 30)
    if not isinstance(claim, str) or not claim:
        raise PolicyError(f"{where}.subject_claim: must be a non-empty string")
    if isinstance(leeway, bool) or not isinstance(leeway, int | float) or not 0 <= leeway <= 300:
        raise PolicyError(f"{where}.leeway_s: must be a number of seconds from 0 to 300")
    keys_path = base_dir / entry["keys_file"]
    try:
        keys = load_keys(keys_path, algorithms)
    except JwtKeyError as exc:
        raise PolicyError(f"{where}.keys_file: {exc}") from None
    verifier = JwtVerifier(entry["issuer"], entry["audience"], keys, claim, float(leeway))
    return verifier, keys_path


def _add_principal(
    entry: Mapping[str, Any],
    where: str,
    seen: set[str],
    by_digest: dict[str, str],
    by_cert: dict[str, str],
    by_subject: dict[str, str],
) -> str:
    _only_keys(entry, {"name", "token_sha256", "certificate_names", "jwt_subjects"}, where)
    name = entry.get("name")
    if not isinstance(name, str) or not PRINCIPAL_NAME.fullmatch(name):
        raise PolicyError(f"{where}.name: must be 1-128 letters, digits or ._:@/-")
    if name == ANONYMOUS.name or name in seen:
        raise PolicyError(f"{where}.name: {name!r} is reserved or used twice")
    digests = _strings(entry, "token_sha256", where)
    cert_names = _strings(entry, "certificate_names", where)
    subjects = _strings(entry, "jwt_subjects", where)
    if not digests and not cert_names and not subjects:
        raise PolicyError(
            f"{where}: needs token_sha256, certificate_names or jwt_subjects (no way to log in)"
        )
    for subject in subjects:
        if subject in by_subject:
            raise PolicyError(f"{where}.jwt_subjects: {subject!r} is listed twice")
        by_subject[subject] = name
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
    return name


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
    return parse_policy(text, str(path), path.parent)


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
