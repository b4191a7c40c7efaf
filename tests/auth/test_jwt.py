"""JWTs from an identity provider as bearer tokens: a token that verifies against the policy's
keys, issuer and audience runs as the principal listing its subject; any other JWT is
UNAUTHENTICATED with the reason (never the token); the keys file rotates without a restart."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from broker.auth.policy import PolicyError, read_policy
from broker.config import Settings
from taskbroker.v1 import broker_service_pb2 as bs
from tests.auth.conftest import Secured, status_of
from tests.conftest import start_broker
from tests.support.tasks import spec

ISSUER = "https://idp.example.test/"
AUDIENCE = "taskbroker"
POLICY = f"""
[jwt]
issuer = "{ISSUER}"
audience = "{AUDIENCE}"
keys_file = "jwks.json"
algorithms = ["ES256"]

[[principals]]
name = "billing-api"
jwt_subjects = ["svc-billing"]

[[grants]]
principals = ["billing-api"]
roles = ["produce"]
queues = ["a"]
"""


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def write_jwks(path: Path, **keys: ec.EllipticCurvePrivateKey) -> None:
    entries = []
    for kid, key in keys.items():
        entry = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
        entries.append({**entry, "kid": kid, "use": "sig", "alg": "ES256"})
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"keys": entries}))
    tmp.replace(path)  # as a deployment would: never a half-written file


def token(key: Any, kid: str = "k1", algorithm: str = "ES256", **overrides: Any) -> str:
    now = int(time.time())
    claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": "svc-billing", "iat": now, "exp": now + 300}
    claims.update(overrides)
    claims = {k: v for k, v in claims.items() if v is not None}
    return jwt.encode(claims, key, algorithm=algorithm, headers={"kid": kid})


@pytest.fixture
def signing_key() -> ec.EllipticCurvePrivateKey:
    return new_key()


@pytest.fixture
async def jwt_broker(
    settings: Settings, tmp_path: Path, signing_key: ec.EllipticCurvePrivateKey
) -> AsyncIterator[Secured]:
    write_jwks(tmp_path / "jwks.json", k1=signing_key)
    policy = tmp_path / "policy.toml"
    policy.write_text(POLICY)
    running = await start_broker(settings, policy_file=policy)
    secured = Secured(running, policy)
    yield secured
    await secured.close()


def enqueue(queue: str) -> bs.EnqueueRequest:
    return bs.EnqueueRequest(tasks=[spec(queue)])


async def test_a_verified_jwt_runs_as_the_principal_listing_its_subject(
    jwt_broker: Secured, signing_key: ec.EllipticCurvePrivateKey
) -> None:
    caller = jwt_broker.with_token(token(signing_key))
    await caller.stub.Enqueue(enqueue("a"))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await caller.stub.Enqueue(enqueue("b"))
    code, details = status_of(refused.value)
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert details.startswith("billing-api may not enqueue on queue 'b'")


def other_key() -> ec.EllipticCurvePrivateKey:
    return new_key()


def _public_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _hs256_with_public_key(key: ec.EllipticCurvePrivateKey) -> str:
    """The "algorithm confusion" forgery: an HMAC whose secret is the public key (which
    PyJWT refuses to make, so it is made by hand)."""
    header = _b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "k1"}).encode())
    claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": "svc-billing", "exp": int(time.time()) + 300}
    body = _b64(json.dumps(claims).encode())
    mac = hmac.new(_public_pem(key), f"{header}.{body}".encode(), hashlib.sha256).digest()
    return f"{header}.{body}.{_b64(mac)}"


BAD_TOKENS: dict[str, tuple[Any, str]] = {
    # name: (how to make it from the signing key, what the refusal says)
    "expired": (lambda k: token(k, exp=int(time.time()) - 3600), "has expired"),
    "other audience": (lambda k: token(k, aud="someone-else"), "not for this broker"),
    "other issuer": (lambda k: token(k, iss="https://evil.test/"), "not from the policy's issuer"),
    "no expiry": (lambda k: token(k, exp=None), "lacks the 'exp' claim"),
    "unknown subject": (lambda k: token(k, sub="svc-unknown"), "subject names no principal"),
    "another key": (lambda k: token(other_key()), "signature does not verify"),
    "unknown key id": (lambda k: token(k, kid="k9"), "key id is not one"),
    "HS256 keyed with the public key": (_hs256_with_public_key, "algorithm or key id is not one"),
    "alg none": (
        lambda k: jwt.encode({"iss": ISSUER, "aud": AUDIENCE, "sub": "svc-billing"}, "", "none"),
        "algorithm or key id is not one",
    ),
}


@pytest.mark.parametrize("name", list(BAD_TOKENS))
async def test_a_jwt_that_does_not_verify_is_unauthenticated_with_its_reason(
    jwt_broker: Secured, signing_key: ec.EllipticCurvePrivateKey, name: str
) -> None:
    make, reason = BAD_TOKENS[name]
    bad = make(signing_key)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await jwt_broker.with_token(bad).stub.Enqueue(enqueue("a"))
    code, details = status_of(refused.value)
    assert code == grpc.StatusCode.UNAUTHENTICATED, details
    assert reason in details, details
    assert bad not in details and bad.split(".")[1] not in details


async def test_a_new_keys_file_takes_effect_without_a_restart(
    jwt_broker: Secured, signing_key: ec.EllipticCurvePrivateKey, tmp_path: Path
) -> None:
    rotated = new_key()
    write_jwks(tmp_path / "jwks.json", k2=rotated)
    new_caller = jwt_broker.with_token(token(rotated, kid="k2"))
    for _ in range(50):  # the policy is checked about once a second
        try:
            await new_caller.stub.Enqueue(enqueue("a"))
            break
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAUTHENTICATED
            await asyncio.sleep(0.1)
    else:
        raise AssertionError("a token of the new key was never accepted")
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await jwt_broker.with_token(token(signing_key, kid="k1")).stub.Enqueue(enqueue("a"))
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.replace(f'issuer = "{ISSUER}"\n', ""), "jwt.issuer: required"),
        (lambda t: t.replace('["ES256"]', '["HS256"]'), "'HS256' is not allowed"),
        (lambda t: t.replace('"jwks.json"', '"missing.json"'), "cannot read JWT keys file"),
        (lambda t: t.replace('["ES256"]', '["RS256"]'), "no public key for the algorithms RS256"),
        (lambda t: t[t.index("[[principals]]") :], "there is no [jwt] table"),
    ],
)
def test_a_malformed_jwt_table_is_refused_naming_it(
    tmp_path: Path, signing_key: ec.EllipticCurvePrivateKey, edit: Any, message: str
) -> None:
    write_jwks(tmp_path / "jwks.json", k1=signing_key)
    policy = tmp_path / "policy.toml"
    policy.write_text(edit(POLICY))
    with pytest.raises(PolicyError) as refused:
        read_policy(policy)
    assert message in str(refused.value)
