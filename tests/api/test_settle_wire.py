"""settle_wire: answers written as bytes parse back as the SettleResults the generated code
would have built, for every shape the broker writes."""

from __future__ import annotations

import pytest

from broker.api import settle_wire
from taskbroker.v1 import lease_pb2

TASK_ID = "emails:01HZX3Q9P7K2M4N6R8S0T1V3W5"
LEASE_ID = "0123456789abcdef0123456789abcdef"


def _parse(*answers: bytes) -> list[lease_pb2.SettleResult]:
    return list(lease_pb2.SettleResults.FromString(b"".join(answers)).results)


@pytest.mark.parametrize("repeat", [False, True])
def test_an_applied_settlement_parses_back(repeat: bool) -> None:
    tail = settle_wire.ok_tail(lease_pb2.SETTLE_KIND_ACK, already_settled=repeat)
    (got,) = _parse(settle_wire.ok_answer(TASK_ID, LEASE_ID, tail))
    assert got == lease_pb2.SettleResult(
        task_id=TASK_ID,
        lease_id=LEASE_ID,
        kind=lease_pb2.SETTLE_KIND_ACK,
        outcome=lease_pb2.SETTLE_OUTCOME_OK,
        already_settled=repeat,
    )


@pytest.mark.parametrize(
    ("task_id", "lease_id"),
    [("", ""), ("q:" + "é" * 100, LEASE_ID), (TASK_ID, "x" * 300), ("ü", "")],
)
def test_ids_of_any_length_and_text_parse_back(task_id: str, lease_id: str) -> None:
    tail = settle_wire.ok_tail(lease_pb2.SETTLE_KIND_ACK, already_settled=True)
    (got,) = _parse(settle_wire.ok_answer(task_id, lease_id, tail))
    assert (got.task_id, got.lease_id, got.already_settled) == (task_id, lease_id, True)
    assert got.outcome == lease_pb2.SETTLE_OUTCOME_OK and got.kind == lease_pb2.SETTLE_KIND_ACK


@pytest.mark.parametrize("expire_ms", [None, 0, 1, 999, 1_733_400_000_123, -62_135_596_800_000])
def test_every_field_parses_back(expire_ms: int | None) -> None:
    message = "lease_id: not a lease id (32 hex characters) " * 5
    raw = settle_wire.answer(
        TASK_ID,
        LEASE_ID,
        lease_pb2.SETTLE_KIND_EXTEND,
        lease_pb2.SETTLE_OUTCOME_INVALID_ARGUMENT,
        message,
        already_settled=True,
        expire_ms=expire_ms,
    )
    (got,) = _parse(raw)
    want = lease_pb2.SettleResult(
        task_id=TASK_ID,
        lease_id=LEASE_ID,
        kind=lease_pb2.SETTLE_KIND_EXTEND,
        outcome=lease_pb2.SETTLE_OUTCOME_INVALID_ARGUMENT,
        message=message,
        already_settled=True,
    )
    if expire_ms is not None:
        want.lease_expire_time.FromMilliseconds(expire_ms)
    assert got == want


def test_answers_concatenate_into_one_frame_in_order() -> None:
    tail = settle_wire.ok_tail(lease_pb2.SETTLE_KIND_ACK, already_settled=False)
    refused = settle_wire.answer(
        TASK_ID, "f" * 32, lease_pb2.SETTLE_KIND_ACK, lease_pb2.SETTLE_OUTCOME_LEASE_STALE, "stale"
    )
    got = _parse(settle_wire.ok_answer(TASK_ID, LEASE_ID, tail), refused)
    assert [(r.lease_id, r.outcome) for r in got] == [
        (LEASE_ID, lease_pb2.SETTLE_OUTCOME_OK),
        ("f" * 32, lease_pb2.SETTLE_OUTCOME_LEASE_STALE),
    ]
