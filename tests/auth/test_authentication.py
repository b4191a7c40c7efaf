"""With a policy file, every RPC the issue's attacker ran anonymously is refused with
UNAUTHENTICATED and does nothing; health stays open to probes; reflection needs `read`."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from broker.app import Broker
from broker.auth.policy import PolicyError
from broker.config import Settings
from taskbroker.v1 import admin_service_pb2 as ad
from taskbroker.v1 import broker_service_pb2 as bs
from taskbroker.v1 import lease_pb2
from tests.auth.conftest import Caller, Secured
from tests.conftest import start_broker
from tests.support.broker_process import BrokerProcess
from tests.support.lease_stream import LeaseStream
from tests.support.tasks import enqueue, error_reason, spec

TASK_ID = "a:01J0000000000000000000000A"
LEASE_ID = "0" * 32

Probe = Callable[[Caller], Awaitable[Any]]

#: The issue's anonymous probes, one call each.
PROBES: dict[str, Probe] = {
    "enqueue": lambda c: c.stub.Enqueue(bs.EnqueueRequest(tasks=[spec("a")])),
    "get": lambda c: c.stub.GetTask(bs.GetTaskRequest(task_id=TASK_ID)),
    "ack": lambda c: c.stub.Ack(lease_pb2.AckRequest(task_id=TASK_ID, lease_id=LEASE_ID)),
    "nack": lambda c: c.stub.Nack(lease_pb2.NackRequest(task_id=TASK_ID, lease_id=LEASE_ID)),
    "extend": lambda c: c.stub.ExtendLease(
        lease_pb2.ExtendLeaseRequest(task_id=TASK_ID, lease_id=LEASE_ID)
    ),
    "cancel": lambda c: c.stub.CancelTask(bs.CancelTaskRequest(task_id=TASK_ID)),
    "stats": lambda c: c.stub.Stats(bs.StatsRequest()),
    "list_queues": lambda c: c.admin.ListQueues(ad.ListQueuesRequest()),
    "list_dead": lambda c: c.admin.ListDeadTasks(ad.ListDeadTasksRequest(queue="a")),
    "redrive": lambda c: c.admin.RedriveDeadTasks(ad.RedriveDeadTasksRequest(queue="a", all=True)),
    "delete": lambda c: c.admin.DeleteDeadTasks(ad.DeleteDeadTasksRequest(queue="a", all=True)),
    "pause": lambda c: c.admin.PauseQueue(ad.PauseQueueRequest(queue="a")),
    "resume": lambda c: c.admin.ResumeQueue(ad.ResumeQueueRequest(queue="a")),
}


async def lease_probe(caller: Caller) -> None:
    await LeaseStream(caller.stub).open(["a"], credits=10)


async def reflection_probe(caller: Caller) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(caller.channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    async for response in stub.ServerReflectionInfo(iter([request])):
        names = [s.name for s in response.list_services_response.service]
        assert "taskbroker.v1.BrokerService" in names


ALL_PROBES: dict[str, Probe] = {**PROBES, "lease": lease_probe, "reflection": reflection_probe}


@pytest.mark.parametrize("probe", ALL_PROBES)
@pytest.mark.parametrize(
    "token",
    [None, "tbk_not-a-token-the-policy-knows"],
    ids=["no-credentials", "unknown-token"],
)
async def test_every_probe_without_a_known_credential_is_unauthenticated(
    secured: Secured, probe: str, token: str | None
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await ALL_PROBES[probe](secured.with_token(token))
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "tbk_" not in (caught.value.details() or "")  # the credential is never echoed


async def test_anonymous_probes_change_nothing(secured: Secured) -> None:
    ops, admin = secured.as_("ops"), secured.as_("admin")
    [task_id] = await enqueue(ops.stub, spec("a"))
    anonymous = secured.anonymous()
    for name in ("enqueue", "cancel", "pause"):
        with pytest.raises(grpc.aio.AioRpcError):
            await PROBES[name](anonymous)
    with pytest.raises(grpc.aio.AioRpcError):
        await anonymous.stub.CancelTask(bs.CancelTaskRequest(task_id=task_id))
    [stats] = (await ops.stub.Stats(bs.StatsRequest(queues=["a"]))).queues
    assert stats.pending == 1 and not stats.paused
    assert (await admin.admin.ListQueues(ad.ListQueuesRequest())).queues == ["a"]


async def test_a_malformed_authorization_header_is_unauthenticated(secured: Secured) -> None:
    caller = secured.anonymous()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await caller.stub.Stats(
            bs.StatsRequest(), metadata=(("authorization", "Basic b3BzOm9wcw=="),)
        )
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error_reason(caught.value) == "UNAUTHENTICATED"
    assert "b3Bz" not in (caught.value.details() or "")


async def test_health_answers_without_credentials(secured: Secured) -> None:
    health = health_pb2_grpc.HealthStub(secured.anonymous().channel)
    for service in ("", "taskbroker.v1.BrokerService", "liveness"):
        response = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert response.status == health_pb2.HealthCheckResponse.SERVING


async def test_reflection_is_for_principals_with_read(secured: Secured) -> None:
    await reflection_probe(secured.as_("reader"))
    await reflection_probe(secured.as_("ops"))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await reflection_probe(secured.as_("producer"))  # produce only: no read anywhere
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "read" in (caught.value.details() or "")


async def test_reflection_can_be_turned_off(settings: Settings) -> None:
    running = await start_broker(settings, reflection=False)
    try:
        caller = Caller(running.target, None)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await reflection_probe(caller)
        assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
        await caller.channel.close()
    finally:
        await running.close()


async def test_a_broken_policy_file_stops_the_start(settings: Settings, tmp_path: Path) -> None:
    broken = tmp_path / "policy.toml"
    broken.write_text('[[grants]]\nprincipals = ["nobody"]\nroles = ["read"]\nqueues = ["*"]\n')
    with pytest.raises(PolicyError, match="no principal named 'nobody'"):
        await Broker(replace(settings, policy_file=broken)).start()


def test_python_m_broker_exits_with_a_clear_message_on_a_broken_policy(tmp_path: Path) -> None:
    (tmp_path / "policy.toml").write_text("[[principals]\n")
    broken = BrokerProcess(tmp_path, {"TASKBROKER_POLICY_FILE": str(tmp_path / "policy.toml")})
    assert broken.process.wait(30) == 2
    broken.channel.close()
    log = broken.log.read_text()
    assert "cannot start" in log and "policy.toml: not valid TOML" in log
    assert "Traceback" not in log
