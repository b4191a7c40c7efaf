"""docs/security.md and SECURITY.md stay true: the policy example parses, the role table names
every RPC the access table checks, and every setting SECURITY.md explains exists."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from broker.api.access import RULES
from broker.auth.policy import parse_policy
from broker.auth.principal import Principal, Role
from broker.config import Settings
from tests.support.doc_blocks import doc_blocks

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "security.md"
POLICY = ROOT / "SECURITY.md"


def test_the_policy_example_parses_and_grants_what_the_page_says() -> None:
    [block] = [b for b in doc_blocks(PAGE) if b.language == "toml" and "[jwt]" not in b.code]
    policy = parse_policy(block.code, block.where)
    api = Principal("billing-api", "token")
    worker = Principal("billing-worker", "token")
    ops = policy.principal_for_certificate(["ops.internal"])
    assert ops is not None
    assert policy.allows(api, Role.PRODUCE, "billing-eu")
    assert not policy.allows(api, Role.CONSUME, "billing-eu")
    assert policy.allows(worker, Role.CONSUME, "billing-eu")
    assert not policy.allows(worker, Role.PRODUCE, "emails")
    assert policy.allows(ops, Role.ADMIN, "emails") and policy.allows(api, Role.READ, "status")


def test_the_role_table_names_every_checked_rpc() -> None:
    text = PAGE.read_text()
    section = text[text.index("### Which call needs which role") :]
    table = section[: section.index("\n\n", section.index("| Call |"))]
    for name in RULES:
        assert f"`{name.split('/')[1]}`" in table or f"`{name}`" in table, name


def test_security_md_explains_only_settings_that_exist() -> None:
    text = POLICY.read_text()
    section = text[text.index("## What each setting protects") : text.index("## Rotating")]
    named = set(re.findall(r"^\| `([a-z_]+)`", section, re.M))
    named |= set(re.findall(r", `([a-z_]+)`", section))
    assert len(named) >= 12, named
    assert named <= {f.name for f in dataclasses.fields(Settings)}, named
    for setting in ("tls_cert", "tls_client_ca", "policy_file", "insecure", "http_allowed_hosts"):
        assert setting in named


def test_the_jwt_example_parses_with_a_keys_file(tmp_path: Path) -> None:
    [block] = [b for b in doc_blocks(PAGE) if b.language == "toml" and "[jwt]" in b.code]
    key = ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "jwks.json").write_text(
        json.dumps({"keys": [json.loads(ECAlgorithm.to_jwk(key.public_key()))]})
    )
    policy = parse_policy(block.code, block.where, tmp_path)
    assert policy.jwt is not None and policy.jwt.issuer == "https://idp.example.com/"
    worker = policy.principal_by_jwt_subject["system:serviceaccount:billing:worker"]
    assert policy.allows(Principal(worker, "jwt"), Role.CONSUME, "billing-eu")
