"""What a principal holds stays its own: a leaked lease id settles, extends or resumes nothing
for another principal; an idempotency key cannot be squatted; limits count per principal."""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import grpc
import pytest

from broker.config import Settings
from broker.queue import _hash_key
from taskbroker.v1 import broker_service_pb2 as bs
from taskbroker.v1 import lease_pb2, task_pb2
from tests.auth.conftest import Secured
from tests.conftest import start_broker
from tests.support.lease_stream import LeaseStream, duration
from tests.support.tasks import enqueue, error_reason, get, spec

FOREIGN = "belongs to another principal"


async def test_a_leaked_lease_id_is_no_capability(secured: Secured) -> None:
    [task_id] = await enqueue(secured.as_("ops").stub, spec("shared"))
    x, y = secured.as_("x"), secured.as_("y")
    stream = await LeaseStream(x.stub).open(["shared"], credits=1)
    [delivery] = await stream.take(1)
    lease_id = delivery.lease_id

    calls: dict[str, Awaitable[object]] = {
        "ack": y.stub.Ack(lease_pb2.AckRequest(task_id=task_id, lease_id=lease_id, result=b"x")),
        "nack": y.stub.Nack(
            lease_pb2.NackRequest(task_id=task_id, lease_id=lease_id, dead_letter=True)
        ),
        "extend": y.stub.ExtendLease(
            lease_pb2.ExtendLeaseRequest(
                task_id=task_id, lease_id=lease_id, lease_duration=duration(timedelta(hours=1))
            )
        ),
    }
    for kind, call in calls.items():
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED, kind
        details = caught.value.details() or ""
        assert FOREIGN in details and "'x'" not in details and " x " not in details
        assert error_reason(caught.value) == "LEASE_FOREIGN"

    # In a stream too: each settlement is answered PERMISSION_DENIED.
    thief = await LeaseStream(y.stub).open(["shared"], credits=0)
    for answer in (
        await thief.ack(delivery, b"forged"),
        await thief.nack(delivery, dead_letter=True),
        await thief.extend(delivery, timedelta(hours=1)),
    ):
        assert answer.outcome == lease_pb2.SETTLE_OUTCOME_PERMISSION_DENIED, answer
        assert FOREIGN in answer.message

    task = await get(secured.as_("ops").stub, task_id)
    assert task.state == task_pb2.TASK_STATE_LEASED and task.attempt == 1
    assert not task.result and task.lease_expire_time.ToMilliseconds() < (
        task.create_time.ToMilliseconds() + 3_600_000
    )
    assert (await stream.ack(delivery, b"real")).outcome == lease_pb2.SETTLE_OUTCOME_OK
    task = await get(secured.as_("ops").stub, task_id)
    assert task.state == task_pb2.TASK_STATE_SUCCEEDED and task.result == b"real"
    await stream.close()
    await thief.close()


async def test_only_the_holder_resumes_its_lease(secured: Secured) -> None:
    [task_id] = await enqueue(secured.as_("ops").stub, spec("shared"))
    x, y = secured.as_("x"), secured.as_("y")
    first = await LeaseStream(x.stub).open(["shared"], credits=1)
    [delivery] = await first.take(1)
    first.cancel()  # the worker's connection broke: the lease waits for a resume
    held = lease_pb2.HeldLease(task_id=task_id, lease_id=delivery.lease_id)

    thief = await LeaseStream(y.stub).open(["shared"], credits=0, resume=[held])
    assert thief.opened is not None
    [answer] = thief.opened.resumed
    assert answer.outcome == lease_pb2.SETTLE_OUTCOME_PERMISSION_DENIED
    assert FOREIGN in answer.message
    await thief.close()

    owner = await LeaseStream(x.stub).open(["shared"], credits=0, resume=[held])
    assert owner.opened is not None
    [answer] = owner.opened.resumed
    assert answer.outcome == lease_pb2.SETTLE_OUTCOME_OK
    assert (await owner.ack(delivery)).outcome == lease_pb2.SETTLE_OUTCOME_OK
    await owner.close()


async def test_a_principal_cannot_squat_anothers_idempotency_key(secured: Secured) -> None:
    producer, other = secured.as_("producer"), secured.as_("producer2")
    [squatted] = await enqueue(producer.stub, spec("a", payload=b"squat", idempotency_key="k"))
    # The other principal's task with the same key is its own: no ALREADY_EXISTS, no duplicate.
    response = await other.stub.Enqueue(
        bs.EnqueueRequest(tasks=[spec("a", payload=b"real", idempotency_key="k")])
    )
    [result] = response.results
    assert result.task_id != squatted and not result.duplicate
    # Each principal still deduplicates its own retries.
    again = await other.stub.Enqueue(
        bs.EnqueueRequest(tasks=[spec("a", payload=b"real", idempotency_key="k")])
    )
    assert again.results[0].task_id == result.task_id and again.results[0].duplicate
    assert (await get(other.stub, result.task_id)).payload == b"real"


def test_without_a_policy_idempotency_keys_hash_as_before() -> None:
    # Keys stored by earlier versions keep deduplicating after an upgrade.
    assert _hash_key("emails", "k") == hashlib.sha256(b"emails\0k").hexdigest()[:32]
    assert _hash_key("emails", "k", "alice") != _hash_key("emails", "k")
    assert _hash_key("emails", "k", "alice") != _hash_key("emails", "k", "bob")


async def test_stream_limits_count_per_principal_not_per_address(
    settings: Settings, policy_path: Path
) -> None:
    running = await start_broker(
        replace(settings, max_streams_per_client=1, max_streams_per_connection=1),
        policy_file=policy_path,
    )
    secured = Secured(running, policy_path)
    try:
        x, y = secured.as_("x"), secured.as_("y")
        first = await LeaseStream(x.stub).open(["shared"], credits=0)
        with pytest.raises(grpc.aio.AioRpcError) as caught:  # x again, on a new connection
            await LeaseStream(secured.as_("x").stub).open(["shared"], credits=0)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "from this client" in (caught.value.details() or "")
        # Another principal on the same address has its own allowance.
        other = await LeaseStream(y.stub).open(["shared"], credits=0)
        await first.close()
        await other.close()
    finally:
        await secured.close()
