"""The policy file: tokens known only by their digest, certificate names, grants on queue
globs, strict parsing, and reloads that never leave the broker without a policy."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from broker.auth.authenticate import Authenticator
from broker.auth.policy import PolicyError, parse_policy, token_digest
from broker.auth.policy_file import PolicyFile
from broker.auth.principal import ANONYMOUS, Principal, Role
from broker.auth.tokens import main as tokens_main
from broker.auth.tokens import new_token
from broker.errors import Unauthenticated

TOKEN = "tbk_billing-secret"

POLICY = f"""
[[principals]]
name = "billing"
token_sha256 = ["{token_digest(TOKEN)}"]
certificate_names = ["billing.internal"]

[[principals]]
name = "ops"
certificate_names = ["ops.internal"]

[[grants]]
principals = ["billing"]
roles = ["produce", "consume"]
queues = ["billing-*"]

[[grants]]
principals = ["*"]
roles = ["read"]
queues = ["shared"]
"""


def test_grants_apply_to_their_principals_roles_and_queue_globs() -> None:
    policy = parse_policy(POLICY, "policy.toml")
    billing = policy.principal_for_token(TOKEN)
    assert billing == Principal("billing", "token")
    assert policy.allows(billing, Role.PRODUCE, "billing-eu")
    assert not policy.allows(billing, Role.PRODUCE, "emails")
    assert not policy.allows(billing, Role.ADMIN, "billing-eu")
    ops = policy.principal_for_certificate(["nope", "ops.internal"])
    assert ops == Principal("ops", "certificate")
    assert policy.allows(ops, Role.READ, "shared") and not policy.allows(ops, Role.READ, "x")
    assert policy.may_somewhere(ops, Role.READ) and not policy.may_somewhere(ops, Role.ADMIN)
    assert not policy.allows(ANONYMOUS, Role.READ, "shared")
    assert policy.principal_for_token("tbk_guess") is None


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("[[principals]]\nname='a'\ntoken_sha256=['abc']", "64 lowercase hex"),
        ("[[principals]]\nname='a'", "needs token_sha256, certificate_names or jwt_subjects"),
        ("[[principals]]\nname='anonymous'\ncertificate_names=['x']", "reserved"),
        ("[[grants]]\nprincipals=['ghost']\nroles=['read']\nqueues=['*']", "no principal"),
        ("[[grants]]\nprincipals=['*']\nroles=['root']\nqueues=['*']", "'root' is not one of"),
        ("[[grants]]\nprincipals=['*']\nrole=['read']\nqueues=['*']", "unknown key 'role'"),
        ("[[grants]]\nprincipals=['*']\nroles=['read']\nqueues=[]", "must not be empty"),
        ("principals = 3", "array of tables"),
        ("[[principals]\n", "not valid TOML"),
    ],
)
def test_a_malformed_policy_is_refused_naming_the_entry(text: str, complaint: str) -> None:
    with pytest.raises(PolicyError, match=complaint) as caught:
        parse_policy(text, "policy.toml")
    assert str(caught.value).startswith("policy.toml")


def test_a_digest_is_never_quoted_in_an_error() -> None:
    digest = token_digest(TOKEN)
    text = f"[[principals]]\nname='a'\ntoken_sha256=['{digest}', '{digest}']"
    with pytest.raises(PolicyError) as caught:
        parse_policy(text, "p")
    assert digest not in str(caught.value)


def test_an_edited_file_is_reloaded_and_a_broken_edit_keeps_the_old_policy(
    tmp_path: Path,
) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(POLICY)
    policy_file = PolicyFile(path, check_interval_s=0)
    billing = Principal("billing", "token")
    assert not policy_file.current().allows(billing, Role.ADMIN, "billing-eu")

    path.write_text(
        POLICY + "\n[[grants]]\nprincipals=['billing']\nroles=['admin']\nqueues=['*']\n"
    )
    os.utime(path, ns=(1, 1))  # a new mtime even within the clock's resolution
    assert policy_file.current().allows(billing, Role.ADMIN, "billing-eu")

    path.write_text("[[grants]\n")
    assert policy_file.current().allows(billing, Role.ADMIN, "billing-eu")


def test_an_unreadable_policy_stops_the_start(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="cannot read policy file"):
        PolicyFile(tmp_path / "missing.toml")


def test_the_authenticator_takes_a_token_first_then_a_certificate(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(POLICY)
    auth = Authenticator(PolicyFile(path))
    cert = {"x509_common_name": [b"ops.internal"]}
    assert auth.authenticate([("authorization", f"Bearer {TOKEN}")], cert).name == "billing"
    assert auth.authenticate([], cert) == Principal("ops", "certificate")
    for metadata, context, message in [
        ([], {}, "no credentials"),
        ([("authorization", "Bearer tbk_wrong")], cert, "not one the broker's policy knows"),
        ([("authorization", f"Basic {TOKEN}")], {}, "must be 'Bearer <token>'"),
        ([], {"x509_common_name": [b"stranger"]}, "names no principal"),
    ]:
        with pytest.raises(Unauthenticated, match=message) as caught:
            auth.authenticate(metadata, context)
        assert TOKEN not in str(caught.value)
    assert Authenticator(None).authenticate([], {}) is ANONYMOUS


def test_a_new_token_is_long_random_and_its_entry_holds_only_the_digest(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert new_token() != new_token() and len(new_token()) > 40
    assert tokens_main(["ci-worker"]) == 0
    out = capsys.readouterr().out
    token = out.split(": ", 1)[1].split()[0]
    entry = out.split("policy file entry:", 1)[1]
    assert token not in entry
    policy = parse_policy(entry, "printed")
    assert policy.principal_for_token(token) == Principal("ci-worker", "token")
