"""docs/security.md stays true: its policy example parses, and its role table names every RPC
the access table checks."""

from __future__ import annotations

from pathlib import Path

from broker.api.access import RULES
from broker.auth.policy import parse_policy
from broker.auth.principal import Principal, Role
from tests.support.doc_blocks import doc_blocks

PAGE = Path(__file__).resolve().parents[2] / "docs" / "security.md"


def test_the_policy_example_parses_and_grants_what_the_page_says() -> None:
    [block] = [b for b in doc_blocks(PAGE) if b.language == "toml"]
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
