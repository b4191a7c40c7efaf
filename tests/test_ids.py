"""Task ids: 26 Crockford base32 characters of a 48-bit ms time and 80 bits, increasing per
generator; and the stream entry id derived from one (docs/data-model.md)."""

from __future__ import annotations

import itertools
import time

from broker.ids import LOCAL_ID_PATTERN, IdGenerator, entry_id

CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def value_of(local_id: str) -> int:
    """The id's 130-bit value, read a character at a time (the definition)."""
    value = 0
    for char in local_id:
        value = value << 5 | CROCKFORD.index(char)
    return value


def test_ids_are_26_crockford_characters_of_the_time_and_increase_within_a_millisecond() -> None:
    ids = IdGenerator()
    before = time.time_ns() // 1_000_000
    made = [ids.new() for _ in range(5_000)]  # many share a millisecond
    after = time.time_ns() // 1_000_000
    assert all(LOCAL_ID_PATTERN.fullmatch(i) for i in made)
    assert made == sorted(made) and len(set(made)) == len(made)
    values = [value_of(i) for i in made]
    assert all(a < b for a, b in itertools.pairwise(values))
    assert all(value < 1 << 128 for value in values)
    assert before <= values[0] >> 80 <= values[-1] >> 80 <= after


def test_an_entry_id_is_the_time_and_the_low_64_bits_and_increases_with_the_id() -> None:
    ids = IdGenerator()
    made = [ids.new() for _ in range(1_000)]
    for local_id in made:
        value = value_of(local_id)
        assert entry_id(local_id) == f"{value >> 80}-{value & (1 << 64) - 1}"
    assert entry_id("0" * 26) == "0-0"
    assert entry_id("7" + "Z" * 25) == f"{(1 << 48) - 1}-{(1 << 64) - 1}"
    pairs = [tuple(map(int, entry_id(i).split("-"))) for i in made]
    assert pairs == sorted(pairs) and len(set(pairs)) == len(pairs)


def test_ids_made_many_at_a_time_increase_with_those_made_one_at_a_time() -> None:
    ids = IdGenerator()
    made = [ids.new(), *ids.new_many(1_000), ids.new(), *ids.new_many(3), *ids.new_many(0)]
    time.sleep(0.002)  # and across a new millisecond
    made += [*ids.new_many(500), ids.new()]
    assert len(made) == 1_506 and all(LOCAL_ID_PATTERN.fullmatch(i) for i in made)
    values = [value_of(i) for i in made]
    assert all(a < b for a, b in itertools.pairwise(values))
