"""The SDK's channels: a bearer token on every call (unary and the Lease stream), over TLS or
plaintext loopback only, from an argument, a file that rotates, or the environment."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

from taskbroker import Client, SyncClient, TaskbrokerError, TlsConfig
from taskbroker._channel import BearerToken, ChannelConfigError, is_local_target
from tests.support.certs import make_ca
from tests.support.tls import ENQUEUE, LEASE, Recorder


async def calls_with(client: Client) -> None:
    """An Enqueue and a Lease stream; the recorder refuses both."""
    with pytest.raises(TaskbrokerError):
        await client.enqueue("jobs", "t", b"")
    call = client.stub.Lease()  # refused at its start: no frame needs to be written
    assert await call.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_the_token_rides_on_unary_calls_and_the_lease_stream(
    recorder: tuple[Recorder, int],
) -> None:
    handler, port = recorder
    async with Client(f"127.0.0.1:{port}", token="s3cret-token", timeout=2) as client:
        await calls_with(client)
    assert handler.seen == [(ENQUEUE, "Bearer s3cret-token"), (LEASE, "Bearer s3cret-token")]


async def test_without_a_token_no_authorization_is_sent(recorder: tuple[Recorder, int]) -> None:
    handler, port = recorder
    async with Client(f"localhost:{port}", timeout=2) as client:
        await calls_with(client)
    assert [auth for _, auth in handler.seen] == [None, None]


async def test_a_token_file_is_read_again_when_it_changes(
    recorder: tuple[Recorder, int], tmp_path: Path
) -> None:
    handler, port = recorder
    token_file = tmp_path / "token"
    token_file.write_text("first-token\n")
    async with Client(f"localhost:{port}", token_file=token_file, timeout=2) as client:
        with pytest.raises(TaskbrokerError):
            await client.enqueue("jobs", "t", b"")
        await asyncio.sleep(0.01)  # a new mtime even on a coarse clock
        token_file.write_text("second-token-longer\n")
        with pytest.raises(TaskbrokerError):
            await client.enqueue("jobs", "t", b"")
    tokens = [auth for _, auth in handler.seen]
    assert tokens == ["Bearer first-token", "Bearer second-token-longer"]


async def test_sync_client_sends_the_token_too(recorder: tuple[Recorder, int]) -> None:
    handler, port = recorder

    def produce() -> None:  # in a thread: the recorder serves on this test's event loop
        with (
            SyncClient(f"127.0.0.1:{port}", token="sync-token", timeout=2) as client,
            pytest.raises(TaskbrokerError),
        ):
            client.enqueue("jobs", "t", b"")

    await asyncio.to_thread(produce)
    assert handler.seen == [(ENQUEUE, "Bearer sync-token")]


async def test_from_env_reads_target_tls_and_token(
    recorder: tuple[Recorder, int], tmp_path: Path
) -> None:
    handler, port = recorder
    env = {"TASKBROKER_TARGET": f"127.0.0.1:{port}", "TASKBROKER_TOKEN": "env-token"}
    async with Client.from_env(environ=env, timeout=2) as client:
        assert client.target == f"127.0.0.1:{port}"
        await calls_with(client)
    assert handler.seen[0] == (ENQUEUE, "Bearer env-token")
    with pytest.raises(ValueError, match="not both"):
        Client.from_env(environ={**env, "TASKBROKER_TOKEN_FILE": str(tmp_path / "t")})
    ca = make_ca(tmp_path)
    tls = TlsConfig.from_env({"TASKBROKER_TLS_CA": str(ca.cert)})
    assert tls == TlsConfig(ca_file=str(ca.cert))
    assert TlsConfig.from_env({"TASKBROKER_TLS": "1"}) == TlsConfig()
    assert TlsConfig.from_env({}) is None


def test_a_token_is_never_sent_in_the_clear_to_another_host() -> None:
    for target in ("10.0.0.5:50051", "broker.internal:50051", "dns:///broker:50051"):
        with pytest.raises(ChannelConfigError, match="only over TLS") as refused:
            Client(target, token="never-shown")
        assert "never-shown" not in str(refused.value)
    # Over TLS it may go anywhere.
    Client("broker.internal:50051", token="t", tls=TlsConfig())


@pytest.mark.parametrize(
    ("target", "local"),
    [
        ("127.0.0.1:1", True),
        ("localhost:1", True),
        ("[::1]:1", True),
        ("dns:///localhost:1", True),
        ("ipv4:127.0.0.1:1,127.0.0.2:2", True),
        ("unix:/tmp/tb.sock", True),
        ("ipv4:127.0.0.1:1,10.0.0.1:2", False),
        ("0.0.0.0:1", False),
        ("example.com:1", False),
    ],
)
def test_local_targets(target: str, local: bool) -> None:
    assert is_local_target(target) is local


def test_bad_tokens_and_files_are_refused_without_echoing_them(tmp_path: Path) -> None:
    with pytest.raises(ChannelConfigError, match="empty"):
        BearerToken("  ")
    with pytest.raises(ChannelConfigError, match="characters a header cannot carry") as bad:
        BearerToken("line\nbreak")
    assert "line" not in str(bad.value)
    with pytest.raises(ChannelConfigError, match="cannot read token file"):
        BearerToken(token_file=tmp_path / "missing")
    assert "hidden" not in repr(BearerToken("hidden"))
    with pytest.raises(ChannelConfigError, match="cannot read TLS CA file"):
        Client("localhost:1", tls=TlsConfig(ca_file=tmp_path / "missing.pem"))
    with pytest.raises(ChannelConfigError, match="together"):
        TlsConfig(cert_file="c.pem")
