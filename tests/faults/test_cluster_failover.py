"""A Redis Cluster failover under a running broker: the master holding a queue's slot is killed
-9 and its replica promoted. The broker keeps nothing of that master: its calls move to the new
master, a lease that expired meanwhile is reclaimed soon after the failover, and new work flows
(issue 11 §4: state the broker keeps must follow Redis)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import timedelta

import grpc
import pytest
import redis

from taskbroker.v1 import task_pb2
from tests.conftest import TEST_SETTINGS, RunningBroker, start_broker
from tests.support.lease_stream import LeaseStream
from tests.support.redis_server import RedisCluster, RedisServer
from tests.support.tasks import enqueue, get, spec

#: Nodes declare a silent master failed after this long, then its replica takes over.
NODE_TIMEOUT_MS = 1000


@pytest.fixture
def cluster() -> Iterator[RedisCluster]:
    """Three masters with a replica each; killed nodes are the test's own."""
    args = ("--cluster-node-timeout", str(NODE_TIMEOUT_MS), "--repl-diskless-sync-delay", "0")
    with RedisCluster(3, replicas=1, extra_args=args) as cluster:
        yield cluster


def serving_port(cluster: RedisCluster, key: str, dead: RedisServer | None = None) -> int | None:
    """The port of the master serving the key's slot, as a live node that reports the cluster
    ok sees it; None while no such node knows a live master for it."""
    for node in cluster.nodes:
        if node is dead:
            continue
        client = node.client(socket_timeout=1)
        try:
            info = client.cluster("INFO")
            slot = int(client.cluster("KEYSLOT", key))
            slots = client.cluster("SLOTS")
        except redis.RedisError:
            continue
        finally:
            client.close()
        if info.get("cluster_state") != "ok":  # redis-py parses CLUSTER INFO into a dict
            continue
        for start, end, master, *_ in slots:
            port = int(master[1])
            if start <= slot <= end and (dead is None or port != dead.port):
                return port
    return None


async def wait_promoted(cluster: RedisCluster, dead: RedisServer, key: str) -> float:
    """Waits until a live master serves the key's slot again; returns how long that took."""
    started = time.monotonic()
    while serving_port(cluster, key, dead) is None:
        assert time.monotonic() - started < 30, "no replica was promoted"
        await asyncio.sleep(0.1)
    return time.monotonic() - started


async def get_retrying(running: RunningBroker, task_id: str, deadline: float) -> task_pb2.Task:
    """GetTask as a client does it: UNAVAILABLE ("retry") is retried until the deadline. Nodes
    learn of a promotion by gossip, so for a moment after one node reports it, the broker may
    still be told the old topology by another and find the dead master."""
    while True:
        try:
            return await get(running.stub, task_id)
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


async def test_the_broker_follows_a_cluster_failover(cluster: RedisCluster) -> None:
    settings = replace(TEST_SETTINGS, redis_url=cluster.url, redis_cluster=True)
    running = await start_broker(settings)
    key = "tb:{emails}:pending"
    try:
        (held_id,) = await enqueue(running.stub, spec())
        worker = await LeaseStream(running.stub).open(
            ["emails"], credits=1, lease=timedelta(milliseconds=1500)
        )
        (held,) = await worker.take(1)
        await asyncio.sleep(0.3)  # replication to the replica is asynchronous
        port = serving_port(cluster, key)
        doomed = next(n for n in cluster.nodes if n.port == port)
        doomed.kill()
        took = await wait_promoted(cluster, doomed, key)
        assert took < 15

        # The lease ran out during the failover: the broker reclaims it from the new master
        # within a few maintenance passes, and delivers it again.
        deadline = time.monotonic() + 5
        while (
            task := await get_retrying(running, held_id, deadline)
        ).state == task_pb2.TASK_STATE_LEASED:
            assert time.monotonic() < deadline, "the expired lease was not reclaimed"
            await asyncio.sleep(0.05)
        await worker.credit(2)
        (again,) = await worker.take(1, wait_s=5)
        assert (again.task.id, again.task.attempt) == (held_id, 2)
        assert again.lease_id != held.lease_id

        # New work flows through the promoted master.
        (fresh_id,) = await enqueue(running.stub, spec(payload=b"after"))
        (fresh,) = await worker.take(1, wait_s=5)
        assert fresh.task.id == fresh_id and task.errors[0].message == "lease expired"
        await worker.close()
    finally:
        await running.close()
