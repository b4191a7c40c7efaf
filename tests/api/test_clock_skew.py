"""Redis is the one clock: a replica whose own clock is an hour ahead agrees with the others on
lease expiry and due times."""

from __future__ import annotations

import asyncio
import glob
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from broker.config import Settings
from taskbroker.v1 import broker_service_pb2 as bs
from taskbroker.v1 import broker_service_pb2_grpc, lease_pb2, task_pb2
from tests.conftest import RunningBroker
from tests.support.broker_process import BrokerProcess
from tests.support.lease_stream import LeaseStream
from tests.support.redis_server import RedisServer
from tests.support.tasks import get, spec

# Preloaded into the replica alone (the multi-threaded build: gRPC runs threads). .ci/run installs
# Debian's faketime; a developer machine without it skips these two tests.
LIBFAKETIME = next(iter(glob.glob("/usr/lib/*/faketime/libfaketimeMT.so.1")), None)
pytestmark = pytest.mark.skipif(LIBFAKETIME is None, reason="libfaketime not installed")


@pytest.fixture
def skewed_replica(
    tmp_path: Path, redis_server: RedisServer, settings: Settings
) -> Iterator[BrokerProcess]:
    """A second replica on the same Redis whose clock runs one hour ahead."""
    assert LIBFAKETIME is not None
    replica = BrokerProcess(
        tmp_path,
        {
            "TASKBROKER_REDIS_URL": redis_server.url,
            "LD_PRELOAD": LIBFAKETIME,
            "FAKETIME": "+1h",
            "FAKETIME_DONT_FAKE_MONOTONIC": "1",
        },
    )
    replica.wait_serving()
    yield replica
    assert replica.terminate() == 0


async def test_a_fast_clock_does_not_expire_other_replicas_leases(
    running: RunningBroker, skewed_replica: BrokerProcess
) -> None:
    (result,) = (await running.stub.Enqueue(bs.EnqueueRequest(tasks=[spec()]))).results
    worker = await LeaseStream(running.stub).open(["emails"], credits=1, lease=timedelta(seconds=2))
    (d,) = await worker.take(1)
    await asyncio.sleep(1.0)  # the skewed replica's reaper ran about four times meanwhile
    assert (await get(running.stub, result.task_id)).state == task_pb2.TASK_STATE_LEASED
    assert (await worker.ack(d)).outcome == lease_pb2.SETTLE_OUTCOME_OK
    await worker.close()


async def test_a_delay_set_through_a_fast_clock_is_not_run_early(
    running: RunningBroker, skewed_replica: BrokerProcess
) -> None:
    worker = await LeaseStream(running.stub).open(["emails"], credits=1)
    skewed = broker_service_pb2_grpc.BrokerServiceStub(skewed_replica.channel)
    started = time.monotonic()
    request = bs.EnqueueRequest(tasks=[spec(delay=timedelta(milliseconds=800))])
    await asyncio.to_thread(skewed.Enqueue, request, timeout=5)
    (d,) = await worker.take(1, wait_s=5)
    waited = time.monotonic() - started
    assert 0.75 <= waited < 2.0, waited  # neither at once nor an hour late
    assert d.task.type == "send"
    await worker.close()
