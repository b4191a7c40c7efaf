"""Mutual TLS identities: a client certificate's name is its principal under the policy, with
that principal's roles; a trusted certificate the policy does not name is UNAUTHENTICATED."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from broker.config import Settings
from taskbroker import (
    Client,
    PermissionDeniedError,
    TaskContext,
    TlsConfig,
    UnauthenticatedError,
    Worker,
    handler,
)
from tests.conftest import start_broker
from tests.support.tls import Pki

POLICY = """
[[principals]]
name = "billing"
certificate_names = ["billing.internal"]

[[grants]]
principals = ["billing"]
roles = ["produce", "read"]
queues = ["billing-*"]
"""


@handler("charge")
async def charge(ctx: TaskContext, payload: bytes) -> bytes:
    return b""


async def test_a_client_certificate_is_a_principal_with_its_roles(
    settings: Settings, pki: Pki, tmp_path: Path
) -> None:
    billing = pki.ca.issue_client(tmp_path / "billing", "billing.internal")
    stranger = pki.ca.issue_client(tmp_path / "stranger", "stranger.internal")
    policy = tmp_path / "policy.toml"
    policy.write_text(POLICY)
    running = await start_broker(
        settings,
        tls_cert=pki.server.cert,
        tls_key=pki.server.key,
        tls_client_ca=pki.ca.cert,
        policy_file=policy,
    )
    target = running.target

    def tls(pair: tuple[Path, Path]) -> TlsConfig:
        return TlsConfig(ca_file=pki.ca.cert, cert_file=pair[0], key_file=pair[1])

    try:
        async with Client(target, tls=tls(billing)) as client:
            task_id = await client.enqueue("billing-eu", "charge", b"{}")
            assert (await client.get_task(task_id)).queue == "billing-eu"
            with pytest.raises(PermissionDeniedError, match=r"'emails'.*'produce'"):
                await client.enqueue("emails", "send", b"{}")
            # Not a consumer: the worker stops at once with the reason, not a retry loop.
            worker = Worker(client, queues=["billing-eu"], handlers=[charge])
            with pytest.raises(PermissionDeniedError, match="'consume'"):
                await asyncio.wait_for(worker.run(), timeout=10)
        async with Client(target, tls=tls(stranger)) as client:
            with pytest.raises(UnauthenticatedError, match="names no principal"):
                await client.enqueue("billing-eu", "charge", b"{}")
    finally:
        await running.close()
