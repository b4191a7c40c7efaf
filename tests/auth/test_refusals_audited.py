"""Every authentication failure and permission denial on the gRPC port is in the audit trail:
who (or "unauthenticated" with the peer), what was tried, on which queue, and why; never the
credential that was refused."""

from __future__ import annotations

import grpc
import pytest

from taskbroker.v1 import admin_service_pb2 as ad
from taskbroker.v1 import broker_service_pb2 as bs
from taskbroker.v1 import lease_pb2, task_pb2
from tests.auth.conftest import Secured
from tests.support.lease_stream import LeaseStream
from tests.support.tasks import enqueue, spec

WRONG_TOKEN = "tbk_not-a-token-the-policy-knows"


async def _refused(call: object, code: grpc.StatusCode) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call  # type: ignore[misc]
    assert caught.value.code() == code, caught.value


async def test_refused_calls_are_recorded_with_who_what_and_why(secured: Secured) -> None:
    anonymous, stranger = secured.anonymous(), secured.with_token(WRONG_TOKEN)
    consumer, y = secured.as_("consumer"), secured.as_("y")
    unauthenticated = grpc.StatusCode.UNAUTHENTICATED
    await _refused(anonymous.stub.Enqueue(_request("a")), unauthenticated)
    await _refused(stranger.admin.ListQueues(ad.ListQueuesRequest()), unauthenticated)
    await _refused(consumer.stub.Enqueue(_request("a")), grpc.StatusCode.PERMISSION_DENIED)
    with pytest.raises(grpc.aio.AioRpcError) as lease_refused:
        await LeaseStream(consumer.stub).open(["b"], credits=1)
    assert lease_refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    # A lease id that leaked to another principal: refused by the fence, recorded as well.
    [task_id] = await enqueue(secured.as_("ops").stub, spec("shared"))
    holder = await LeaseStream(secured.as_("x").stub).open(["shared"], credits=1)
    [delivery] = await holder.take(1)
    forged = lease_pb2.AckRequest(task_id=task_id, lease_id=delivery.lease_id, result=b"forged")
    await _refused(y.stub.Ack(forged), grpc.StatusCode.PERMISSION_DENIED)
    thief = await LeaseStream(y.stub).open(["shared"], credits=0)
    answer = await thief.ack(delivery, b"forged")
    assert answer.outcome == lease_pb2.SETTLE_OUTCOME_PERMISSION_DENIED
    await thief.close()
    await holder.close()

    await secured.running.broker.audit.flush()  # refusals are written once a second
    reply = await secured.as_("admin").admin.ListAuditRecords(ad.ListAuditRecordsRequest())
    got = [(r.principal, r.action, r.target, r.outcome) for r in reversed(reply.records)]
    assert got == [
        ("unauthenticated", "/taskbroker.v1.BrokerService/Enqueue", "", "UNAUTHENTICATED"),
        ("unauthenticated", "/taskbroker.v1.AdminService/ListQueues", "", "UNAUTHENTICATED"),
        ("consumer", "enqueue", "a", "PERMISSION_DENIED"),
        ("consumer", "lease", "b", "PERMISSION_DENIED"),
        ("y", "settle or extend a lease", "shared", "PERMISSION_DENIED"),
        ("y", "settle or extend a lease", "shared", "PERMISSION_DENIED"),
    ]
    records = list(reversed(reply.records))
    assert records[0].detail.startswith("peer=ipv") and "no credentials" in records[0].detail
    assert "not one the broker's policy knows" in records[1].detail
    assert "needs role 'produce'" in records[2].detail
    assert "belongs to another principal" in records[4].detail
    for record in records:
        assert WRONG_TOKEN not in record.detail and "tbk_" not in record.detail


def _request(queue: str) -> bs.EnqueueRequest:
    return bs.EnqueueRequest(tasks=[task_pb2.TaskSpec(queue=queue, type="t", payload=b"p")])
