"""A TaskSpec as the broker reads it (convert.task_request): every field the producer sets
arrives, and every field left unset reads as TaskRequest's default."""

from __future__ import annotations

from google.protobuf import duration_pb2, timestamp_pb2

from broker.api import convert
from broker.models import ParentPolicy
from broker.queue import TaskRequest
from taskbroker.v1 import task_pb2
from tests.support.loop_turns import other_client_turns


def test_every_field_of_a_task_spec_is_read() -> None:
    spec = task_pb2.TaskSpec(
        queue="q",
        type="t",
        payload=b"p",
        headers={"h": "v"},
        priority=-3,
        delay=duration_pb2.Duration(seconds=2, nanos=1),
        schedule_time=timestamp_pb2.Timestamp(seconds=5, nanos=7_000_000),
        max_attempts=4,
        lease_duration=duration_pb2.Duration(seconds=30),
        idempotency_key="k",
        retry_policy=task_pb2.RetryPolicy(
            initial_backoff=duration_pb2.Duration(seconds=1),
            max_backoff=duration_pb2.Duration(seconds=60),
        ),
        group_key="g",
        depends_on=["q:0123456789ABCDEFGHJKMNPQRS"],
        depends_on_positions=[0, 2],
        parent_failure_policy=task_pb2.PARENT_FAILURE_POLICY_WAIT,
    )
    # A field the proto gains must be read too: this spec sets them all.
    assert {f.name for f, _ in spec.ListFields()} == {
        f.name for f in task_pb2.TaskSpec.DESCRIPTOR.fields
    }
    assert convert.task_request(spec) == TaskRequest(
        queue="q",
        type="t",
        payload=b"p",
        headers={"h": "v"},
        priority=-3,
        delay_ms=2001,  # rounded up: 1 ns is not 0
        schedule_ms=5007,
        max_attempts=4,
        lease_ms=30_000,
        idempotency_key="k",
        initial_backoff_ms=1000,
        max_backoff_ms=60_000,
        group_key="g",
        depends_on=("q:0123456789ABCDEFGHJKMNPQRS",),
        depends_on_positions=(0, 2),
        parent_policy=ParentPolicy.WAIT,
    )


def test_unset_fields_read_as_the_defaults() -> None:
    assert convert.task_request(task_pb2.TaskSpec(queue="q", type="t")) == TaskRequest("q", "t")
    assert convert.task_request(task_pb2.TaskSpec()) == TaskRequest("", "")  # validate refuses
    # Set to their zero values, as a producer may: the same.
    spec = task_pb2.TaskSpec(
        queue="q", type="t", delay=duration_pb2.Duration(), retry_policy=task_pb2.RetryPolicy()
    )
    request = convert.task_request(spec)
    assert (request.delay_ms, request.initial_backoff_ms, request.max_backoff_ms) == (0, None, None)
    assert request.parent_policy is ParentPolicy.CANCEL  # UNSPECIFIED is CANCEL


def test_a_parent_failure_policy_the_api_lacks_reads_as_none() -> None:
    spec = task_pb2.TaskSpec(queue="q", type="t", parent_failure_policy=99)  # type: ignore[arg-type]
    assert convert.task_request(spec).parent_policy is None  # validate refuses it


async def test_a_call_of_large_payloads_is_read_with_the_event_loop_free_in_between() -> None:
    big = convert.READ_SLICE_BYTES
    specs = [task_pb2.TaskSpec(queue="q", type="t", payload=bytes([i]) * big) for i in range(3)]
    small = [task_pb2.TaskSpec(queue="q", type="t", payload=b"x")] * 100
    async with other_client_turns() as turns:
        assert await convert.task_requests(small) == [convert.task_request(s) for s in small]
        assert turns.count == 0  # small tasks: read in one go
        assert await convert.task_requests(specs) == [convert.task_request(s) for s in specs]
        assert turns.count == 3  # one turn for others after each large payload
