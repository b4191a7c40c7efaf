"""The Lease stream's outbox: merged frames are single, canonical LeaseResponse messages (any
protobuf parser reads them, not only those that merge a repeated oneof field), and the byte bound
holds back answers until the writer catches up."""

from __future__ import annotations

import asyncio

from broker.api.outbox import MERGEABLE, Message, Outbox
from taskbroker.v1 import lease_pb2, task_pb2

FIELDS = {k: lease_pb2.LeaseResponse.DESCRIPTOR.fields_by_name[k].number for k in MERGEABLE}


def deliveries(*task_ids: str) -> Message:
    inner = lease_pb2.Deliveries(
        deliveries=[
            lease_pb2.Delivery(task=task_pb2.Task(id=t), lease_id=f"l-{t}") for t in task_ids
        ]
    )
    return Message("deliveries", inner.SerializeToString(), [f"l-{t}" for t in task_ids])


def is_full(outbox: Outbox) -> bool:
    return outbox.full


async def test_frames_of_one_kind_merge_into_one_canonical_frame() -> None:
    outbox = Outbox(1 << 20, lambda: None, FIELDS)
    outbox.put_nowait(deliveries("a", "b"))
    outbox.put_nowait(deliveries("c"))
    drain = lease_pb2.LeaseResponse(drain=lease_pb2.Drain())
    outbox.put_nowait(Message("drain", drain.SerializeToString()))
    outbox.put_nowait(deliveries("d"))

    first = await outbox.get()
    assert first is not None and first.lease_ids == ["l-a", "l-b", "l-c"]
    frame = lease_pb2.LeaseResponse.FromString(first.data)
    assert [d.task.id for d in frame.deliveries.deliveries] == ["a", "b", "c"]
    # Re-encoding gives the same bytes: the field occurs once (a canonical encoding), so parsers
    # that keep only the last occurrence of a oneof field lose nothing.
    assert frame.SerializeToString() == first.data
    second = await outbox.get()
    assert second is not None
    assert lease_pb2.LeaseResponse.FromString(second.data).WhichOneof("frame") == "drain"
    third = await outbox.get()
    assert third is not None
    assert [
        d.task.id for d in lease_pb2.LeaseResponse.FromString(third.data).deliveries.deliveries
    ] == ["d"]


async def test_answers_wait_for_room_and_a_closed_outbox_releases_them() -> None:
    freed: list[bool] = []
    outbox = Outbox(100, lambda: freed.append(True), FIELDS)
    outbox.put_nowait(deliveries("x" * 200))  # over the bound: full
    assert is_full(outbox)
    answer = Message("settle_results", lease_pb2.SettleResults().SerializeToString())
    waiting = asyncio.create_task(outbox.put(answer))
    await asyncio.sleep(0.01)
    assert not waiting.done()  # held back while the worker does not read

    write = await outbox.get()
    assert write is not None
    outbox.written(write)
    await asyncio.wait_for(waiting, 1)
    assert freed == [True] and not is_full(outbox)

    outbox.put_nowait(deliveries("y" * 200))
    late = asyncio.create_task(outbox.put(answer))
    await asyncio.sleep(0.01)
    outbox.close()  # the stream was cut: nobody will write again
    await asyncio.wait_for(late, 1)
