"""The Redis URL and its password: read from a file at start, never in a log line or a client's
error message; Redis failures are told to clients in words, not redis-py class names."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
import redis
import redis.exceptions as rex

from taskbroker.v1 import broker_service_pb2 as bs
from taskbroker.v1 import broker_service_pb2_grpc
from tests.conftest import TEST_SETTINGS, start_broker
from tests.support.broker_process import BrokerProcess
from tests.support.redis_server import RedisServer
from tests.support.tasks import spec

SECRET = "s3cret-Pa55word"
#: Every exception class redis-py defines: none may be named to a client.
REDIS_CLASSES = sorted(name for name, value in vars(rex).items() if inspect.isclass(value))


@pytest.fixture
def protected() -> Iterator[RedisServer]:
    """A Redis whose user `tb` needs SECRET (the default user stays open for the fixture)."""
    acl = ["--user", "tb", "on", f">{SECRET}", "~*", "&*", "+@all"]
    with RedisServer(extra_args=acl) as server:
        yield server


def _url(server: RedisServer, password: str = SECRET) -> str:
    return f"redis://tb:{password}@127.0.0.1:{server.port}/0"


async def test_a_redis_outage_is_told_in_words_without_the_password(
    protected: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    running = await start_broker(replace(TEST_SETTINGS, redis_url=_url(protected)))
    try:
        await running.stub.Enqueue(bs.EnqueueRequest(tasks=[spec()]), timeout=5)
        protected.kill()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await running.stub.Enqueue(bs.EnqueueRequest(tasks=[spec()]), timeout=5)
    finally:
        await running.close()
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    details = err.value.details() or ""
    assert details in (
        "the broker cannot reach Redis (connection refused); retry",
        "the broker lost its connection to Redis; retry",
    )
    assert not [name for name in REDIS_CLASSES if name in details]
    assert SECRET not in caplog.text


def test_the_url_file_is_read_at_start_and_the_password_is_never_logged(
    protected: RedisServer, tmp_path: Path
) -> None:
    url_file = tmp_path / "redis-url"
    url_file.write_text(_url(protected) + "\n")
    env = {"TASKBROKER_REDIS_URL_FILE": str(url_file), "TASKBROKER_LOG_LEVEL": "DEBUG"}
    broker = BrokerProcess(tmp_path / "data", env)
    try:
        broker.wait_serving()
        stub = broker_service_pb2_grpc.BrokerServiceStub(broker.channel)
        stub.Enqueue(bs.EnqueueRequest(tasks=[spec()]), timeout=5)
    finally:
        assert broker.terminate() == 0
    client: redis.Redis = protected.client(username="tb", password=SECRET)
    assert client.xlen("tb:{emails}:f:0") == 1  # the task is in the Redis the file names
    client.close()
    log = broker.log.read_text()
    assert "serving" in log and SECRET not in log


def test_a_wrong_password_stops_the_broker_with_a_message_in_words(
    protected: RedisServer, tmp_path: Path
) -> None:
    wrong = "not-" + SECRET
    env = {"TASKBROKER_REDIS_URL": _url(protected, wrong), "TASKBROKER_LOG_LEVEL": "DEBUG"}
    broker = BrokerProcess(tmp_path / "data", env)
    assert broker.exit_code() == 2
    log = broker.log.read_text()
    assert "cannot start: Redis refused the broker's credentials" in log
    assert wrong not in log and "Traceback" not in log


def test_an_unreadable_url_file_stops_the_broker_naming_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-file"
    broker = BrokerProcess(tmp_path / "data", {"TASKBROKER_REDIS_URL_FILE": str(missing)})
    assert broker.exit_code() == 2
    log = broker.log.read_text()
    assert f"cannot start: cannot read redis_url_file {missing}" in log
    assert "Traceback" not in log
