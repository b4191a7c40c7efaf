"""JwtVerifier: bearer tokens that are JWTs from an identity provider, verified (PyJWT) against
the public keys the policy names, and mapped to a principal by their subject.

Only asymmetric algorithms are accepted (RS*, PS*, ES*, EdDSA): a broker that held a shared
secret could mint tokens itself, and a public key must never verify an HMAC (the "algorithm
confusion" attack). Each key verifies only the algorithm family it belongs to. A token must
carry `exp`, `iss` (the policy's issuer) and `aud` (the policy's audience); verified tokens are
remembered until they expire, so a client that sends the same token on every call pays for
one signature check.
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from broker.errors import Unauthenticated

#: The algorithms a policy may allow; symmetric ones (HS*) and "none" never.
ASYMMETRIC: Final = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)
DEFAULT_ALGORITHMS: Final = ("RS256", "ES256", "EdDSA")
#: Verified tokens remembered (by SHA-256 of the token) until they expire.
CACHE_SIZE: Final = 10_000

PublicKey = (
    rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | ed448.Ed448PublicKey
)


class JwtKeyError(ValueError):
    """The keys file cannot be read or holds no usable public key."""


def looks_like_jwt(token: str) -> bool:
    """Three base64url parts: what a JWT (JWS compact form) looks like; opaque tokens do not."""
    return token.count(".") == 2 and not token.startswith("tbk_")


@dataclass(frozen=True, slots=True)
class _Key:
    key: PublicKey
    kid: str | None
    algorithms: tuple[str, ...]  # those of `allowed` that this key's type can verify


@dataclass(slots=True)
class JwtVerifier:
    """Verifies tokens for one policy; a new policy (file edit) makes a new verifier."""

    issuer: str
    audience: str
    keys: tuple[_Key, ...]
    subject_claim: str = "sub"
    leeway_s: float = 30.0
    _verified: OrderedDict[str, tuple[str, float]] = field(default_factory=OrderedDict)

    def subject(self, token: str, cache_key: str) -> str:
        """The token's subject (the configured claim) once it verifies.

        Raises:
            Unauthenticated: saying why (expired, signature, issuer, audience, claims); never
                quoting the token.
        """
        hit = self._verified.get(cache_key)
        if hit is not None and hit[1] > time.time() - self.leeway_s:
            self._verified.move_to_end(cache_key)
            return hit[0]
        claims = self._claims(token)
        subject = claims.get(self.subject_claim)
        if not isinstance(subject, str) or not subject:
            raise Unauthenticated(f"the JWT has no {self.subject_claim!r} claim")
        self._verified[cache_key] = (subject, float(claims["exp"]))
        if len(self._verified) > CACHE_SIZE:
            self._verified.popitem(last=False)
        return subject

    def _claims(self, token: str) -> dict[str, Any]:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            raise Unauthenticated("the bearer token is not a well-formed JWT") from None
        algorithm, kid = header.get("alg"), header.get("kid")
        candidates = [
            k
            for k in self.keys
            if algorithm in k.algorithms and (kid is None or k.kid in (None, kid))
        ]
        if not candidates:
            raise Unauthenticated(
                "the JWT's algorithm or key id is not one the broker's policy accepts"
            )
        for key in candidates:
            try:
                return jwt.decode(
                    token,
                    key.key,
                    algorithms=list(key.algorithms),
                    audience=self.audience,
                    issuer=self.issuer,
                    leeway=self.leeway_s,
                    options={"require": ["exp", "iss", "aud"]},
                )
            except jwt.InvalidSignatureError:
                continue  # perhaps another key of the same kind (during a rotation)
            except jwt.ExpiredSignatureError:
                raise Unauthenticated("the JWT has expired") from None
            except jwt.ImmatureSignatureError:
                raise Unauthenticated("the JWT is not valid yet (nbf or iat)") from None
            except jwt.InvalidAudienceError:
                raise Unauthenticated("the JWT is not for this broker (aud)") from None
            except jwt.InvalidIssuerError:
                raise Unauthenticated("the JWT is not from the policy's issuer (iss)") from None
            except jwt.MissingRequiredClaimError as exc:
                raise Unauthenticated(f"the JWT lacks the {exc.claim!r} claim") from None
            except jwt.InvalidTokenError:
                raise Unauthenticated("the bearer token is not a valid JWT") from None
        raise Unauthenticated("the JWT's signature does not verify with the policy's keys")


def load_keys(path: Path, allowed: tuple[str, ...]) -> tuple[_Key, ...]:
    """Public keys from a JWKS file (JSON, as identity providers publish them) or from PEM
    public keys (one or more blocks).

    Raises:
        JwtKeyError: naming the file and what is wrong.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise JwtKeyError(f"cannot read JWT keys file {path}: {exc}") from None
    keys = _jwks(text, path) if text.lstrip().startswith("{") else _pems(text, path)
    usable = []
    for key, kid in keys:
        algorithms = tuple(a for a in allowed if _can_verify(key, a))
        if algorithms:
            usable.append(_Key(key, kid, algorithms))
    if not usable:
        raise JwtKeyError(f"{path}: no public key for the algorithms {', '.join(allowed)}")
    return tuple(usable)


def _jwks(text: str, path: Path) -> list[tuple[PublicKey, str | None]]:
    try:
        data = json.loads(text)
        entries = data["keys"] if isinstance(data, dict) and "keys" in data else [data]
        out = []
        for entry in entries:
            if entry.get("use", "sig") != "sig":
                continue
            key = jwt.PyJWK(entry).key
            if not isinstance(key, PublicKey):
                raise JwtKeyError(f"{path}: key {entry.get('kid')!r} is not a public key")
            out.append((key, entry.get("kid")))
        return out
    except JwtKeyError:
        raise
    except (ValueError, KeyError, TypeError, jwt.PyJWKError) as exc:
        raise JwtKeyError(f"{path}: not a JWKS of public keys: {exc}") from None


def _pems(text: str, path: Path) -> list[tuple[PublicKey, str | None]]:
    end = "-----END PUBLIC KEY-----"
    blocks = [b + end for b in text.split(end) if "-----BEGIN PUBLIC KEY-----" in b]
    out: list[tuple[PublicKey, str | None]] = []
    for block in blocks:
        try:
            key = load_pem_public_key(block.strip().encode())
        except ValueError as exc:
            raise JwtKeyError(f"{path}: a PEM block is not a public key: {exc}") from None
        if not isinstance(key, PublicKey):
            raise JwtKeyError(f"{path}: unsupported public key type {type(key).__name__}")
        out.append((key, None))
    return out


def _can_verify(key: PublicKey, algorithm: str) -> bool:
    if algorithm.startswith(("RS", "PS")):
        return isinstance(key, rsa.RSAPublicKey)
    if algorithm.startswith("ES"):
        curve = {"ES256": "secp256r1", "ES384": "secp384r1", "ES512": "secp521r1"}[algorithm]
        return isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == curve
    return isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey)  # EdDSA
