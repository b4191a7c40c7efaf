"""broker/api/frame_scan.py counts a Lease frame's settlements from its bytes exactly as the
parser would count them, stops just past the limit, yields to the event loop on the way, and
leaves to the parser (None) every frame that is not a plain settlements frame."""

from __future__ import annotations

import random

import pytest
from google.protobuf import duration_pb2

from broker.api.frame_scan import SCAN_SLICE, settlement_count
from taskbroker.v1 import lease_pb2
from tests.support.loop_turns import other_client_turns


def _settlements(rng: random.Random, n: int) -> lease_pb2.Settlements:
    frame = lease_pb2.Settlements(credits=rng.randint(0, 5))
    for i in range(n):
        kind = rng.randrange(3)
        task_id = f"q{rng.randrange(4)}:{i}"
        if kind == 0:
            result = rng.randbytes(rng.choice((0, 3, 200)))  # lengths of one and two bytes
            frame.acks.add(task_id=task_id, lease_id="0" * 32, result=result)
        elif kind == 1:
            frame.nacks.add(
                task_id=task_id,
                error="x" * rng.randrange(300),
                retry_delay=duration_pb2.Duration(seconds=rng.randrange(2)),
                dead_letter=rng.random() < 0.5,
            )
        else:
            frame.extends.add(task_id=task_id, lease_id="0" * 32)
    return frame


def _count(request: lease_pb2.LeaseRequest) -> int:
    s = request.settlements
    return len(s.acks) + len(s.nacks) + len(s.extends)


@pytest.mark.parametrize("seed", range(20))
async def test_the_count_is_the_parsers(seed: int) -> None:
    rng = random.Random(seed)
    raw = lease_pb2.LeaseRequest(
        settlements=_settlements(rng, rng.randrange(0, 3 * SCAN_SLICE))
    ).SerializeToString()
    assert await settlement_count(raw, 10**6) == _count(lease_pb2.LeaseRequest.FromString(raw))


async def test_a_settlements_field_sent_twice_is_merged_and_counted_whole() -> None:
    rng = random.Random(1)
    parts = [
        lease_pb2.LeaseRequest(settlements=_settlements(rng, n)).SerializeToString() for n in (5, 7)
    ]
    raw = b"".join(parts)  # protobuf merges a message field that appears twice
    assert _count(lease_pb2.LeaseRequest.FromString(raw)) == 12
    assert await settlement_count(raw, 100) == 12


async def test_unknown_fields_inside_settlements_are_skipped() -> None:
    inner = lease_pb2.Settlements(acks=[lease_pb2.AckRequest(task_id="q:1")]).SerializeToString()
    # field 9 as a varint, a fixed64, a length-delimited and a fixed32: none is an item
    unknown = b"\x48\x96\x01" + b"\x49" + bytes(8) + b"\x4a\x02ab" + b"\x4d" + bytes(4)
    body = inner + unknown + inner
    raw = b"\x32" + bytes([len(body)]) + body
    assert _count(lease_pb2.LeaseRequest.FromString(raw)) == 2
    assert await settlement_count(raw, 100) == 2


async def test_counting_stops_just_past_the_limit() -> None:
    frame = lease_pb2.Settlements(
        acks=[lease_pb2.AckRequest(task_id=f"q:{i}") for i in range(5000)]
    )
    raw = lease_pb2.LeaseRequest(settlements=frame).SerializeToString()
    assert await settlement_count(raw, 100) == 101
    assert await settlement_count(raw, 5000) == 5000


@pytest.mark.parametrize(
    "request_",
    [
        lease_pb2.LeaseRequest(open=lease_pb2.LeaseOpen(queues=["q"])),
        lease_pb2.LeaseRequest(ack=lease_pb2.AckRequest(task_id="q:1")),
        lease_pb2.LeaseRequest(credit=lease_pb2.LeaseCredit(credits=3)),
        lease_pb2.LeaseRequest(),
    ],
    ids=["open", "ack", "credit", "empty"],
)
async def test_other_frames_are_left_to_the_parser(request_: lease_pb2.LeaseRequest) -> None:
    count = await settlement_count(request_.SerializeToString(), 100)
    assert count == (0 if not request_.ByteSize() else None)


async def test_a_settlements_frame_overridden_by_a_later_frame_kind_is_left_to_the_parser() -> None:
    settlements = lease_pb2.LeaseRequest(
        settlements=lease_pb2.Settlements(acks=[lease_pb2.AckRequest(task_id="q:1")] * 3)
    ).SerializeToString()
    ack = lease_pb2.LeaseRequest(ack=lease_pb2.AckRequest(task_id="q:2")).SerializeToString()
    # The oneof's last member wins: this frame is an ack, which only the parser may judge.
    assert lease_pb2.LeaseRequest.FromString(settlements + ack).WhichOneof("frame") == "ack"
    assert await settlement_count(settlements + ack, 1) is None


@pytest.mark.parametrize(
    "raw",
    [
        b"\x32\x04\x0a\x05ab",  # an item longer than what is left of settlements
        b"\x32\x10\x0a\x00",  # settlements longer than the frame
        b"\x32",  # a key with no length
        b"\x32\x03\x0b\x0c\x00",  # a group (wire type 3)
        b"\x32\x0b" + b"\x0a\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff",  # a varint of 11 bytes
    ],
)
async def test_malformed_bytes_are_left_to_the_parser(raw: bytes) -> None:
    assert await settlement_count(raw, 100) is None


async def test_a_long_count_yields_to_the_event_loop() -> None:
    frame = lease_pb2.Settlements(
        acks=[lease_pb2.AckRequest(task_id=f"q:{i}") for i in range(5 * SCAN_SLICE)]
    )
    raw = lease_pb2.LeaseRequest(settlements=frame).SerializeToString()
    async with other_client_turns() as turns:
        assert await settlement_count(raw, 10**6) == 5 * SCAN_SLICE
        assert turns.count >= 4  # it ran between the slices


async def test_a_frame_past_the_limit_is_counted_as_past_it_whatever_follows_in_settlements() -> (
    None
):
    frame = lease_pb2.LeaseRequest(
        settlements=lease_pb2.Settlements(acks=[lease_pb2.AckRequest(task_id="q:1")] * 3)
    ).SerializeToString()
    more = lease_pb2.LeaseRequest(
        settlements=lease_pb2.Settlements(acks=[lease_pb2.AckRequest(task_id="q:2")])
    ).SerializeToString()
    assert await settlement_count(frame + more, 1) == 2  # merged settlements: past the limit
