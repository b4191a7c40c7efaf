"""Constants that live in more than one place (proto, server, SDK, Lua) are the same in each:
a copy that drifts fails here, not in production (issue 14 §6)."""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path

from broker import envelope_header, models, queue
from broker.api import lease_session
from broker.store import argv, queue_meta, redis_store, scripts
from taskbroker import _client, _models, _worker, envelope
from taskbroker.v1 import task_pb2

ROOT = Path(__file__).resolve().parents[1]
PROTO = ROOT / "proto" / "taskbroker" / "v1"


def proto_task_states() -> dict[str, int]:
    return {
        name.removeprefix("TASK_STATE_"): number
        for name, number in task_pb2.TaskState.items()
        if name != "TASK_STATE_UNSPECIFIED"
    }


def lua_task_states() -> dict[str, int]:
    prelude = (ROOT / "broker" / "store" / "lua" / "_prelude.lua").read_text()
    found = re.search(r"^local ([A-Z, ]+) = ([0-9, ]+)$", prelude, re.MULTILINE)
    assert found, "the prelude no longer declares the task states on one line"
    names = [n.strip() for n in found.group(1).split(",")]
    numbers = [int(n) for n in found.group(2).split(",")]
    return dict(zip(names, numbers, strict=True))


def test_task_states_are_the_same_in_the_proto_the_server_the_sdk_and_lua() -> None:
    expected = proto_task_states()
    assert {s.name: s.value for s in models.TaskState} == expected
    assert {s.name: s.value for s in _models.TaskState} == expected
    assert lua_task_states() == expected


def proto_text() -> str:
    return "\n".join(p.read_text() for p in sorted(PROTO.glob("*.proto")))


def test_credit_limit_is_the_proto_s_in_the_server_and_the_sdk() -> None:
    assert lease_session.MAX_CREDITS == _worker.MAX_CREDITS == 10_000
    assert "0 to 10,000" in proto_text() and "1 to 10,000" in proto_text()


def test_lease_bounds_are_the_proto_s_in_the_server_and_the_sdk() -> None:
    assert timedelta(milliseconds=queue.MIN_LEASE_MS) == _worker.MIN_LEASE
    assert timedelta(milliseconds=queue.MAX_LEASE_MS) == _worker.MAX_LEASE
    assert (queue.MIN_LEASE_MS, queue.MAX_LEASE_MS) == (10, 12 * 3600 * 1000)
    assert proto_text().count("10 ms to 12 h") >= 2


def test_enqueue_batch_limits_are_the_same_in_the_server_and_the_sdk() -> None:
    assert queue.MAX_TASKS_PER_CALL == _client.MAX_TASKS_PER_CALL == 1000
    assert "up to 1,000 tasks" in proto_text()
    assert queue.MAX_BATCH_BYTES == _client.MAX_BATCH_BYTES


def test_the_broker_reads_envelope_headers_as_the_sdk_writes_them() -> None:
    assert envelope_header.MAGIC == envelope.MAGIC
    assert envelope_header.VERSION == envelope.VERSION
    sealed = envelope.MAGIC + bytes([envelope.VERSION, 0, 2]) + b"k2" + bytes(28)
    assert envelope.parse_header(sealed).key_id == envelope_header.envelope_key_id(sealed) == "k2"


def test_retry_policy_fields_keep_the_proto_s_names_in_the_server() -> None:
    # RetryPolicy's Durations become integer milliseconds at the API border: <name>_ms.
    names = [f"{name}_ms" for name in task_pb2.RetryPolicy.DESCRIPTOR.fields_by_name]
    assert names == ["initial_backoff_ms", "max_backoff_ms"]
    assert set(names) <= set(models.Task._fields)
    for model in (models.NewTask, queue.TaskRequest):
        assert set(names) <= set(model._fields), model


def test_every_task_field_has_one_stored_hash_field() -> None:
    assert list(redis_store.TASK_HASH_FIELDS) == list(models.Task._fields[1:])  # all but ref
    stored = list(redis_store.TASK_HASH_FIELDS.values())
    assert len(set(stored)) == len(stored)


LUA = ROOT / "broker" / "store" / "lua"
_HEAD = re.compile(r"^local ([\w,\s]+?)\s*=\s*unpack\(ARGV, 1, (\d+)\)", re.MULTILINE)
_ITEM = re.compile(r"^\s*local ([\w,\s]+?)\s*=\s*item\((\d+), (\d+), [^)]+\)", re.MULTILINE)


def _names(text: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in text.split(","))


def test_each_script_reads_argv_by_the_names_and_order_the_store_builds_it_with() -> None:
    assert set(argv.LAYOUTS) == set(scripts.SCRIPT_NAMES)
    for name, (head, item) in argv.LAYOUTS.items():
        source = (LUA / f"{name}.lua").read_text()
        assert "ARGV[" not in source, f"{name}.lua reads ARGV by position, not by name"
        heads = [(_names(m[1]), int(m[2])) for m in _HEAD.finditer(source)]
        assert heads == ([(head, len(head))] if head else []), name
        items = [(_names(m[1]), int(m[2]), int(m[3])) for m in _ITEM.finditer(source)]
        # Every item read names all the fields (enqueue reads them in two passes).
        assert bool(items) == bool(item), name
        for names, after, width in items:
            assert (names, after, width) == (item, len(head), len(item)), name


def test_every_queue_setting_field_is_one_the_scripts_use() -> None:
    lua = "\n".join(path.read_text() for path in LUA.glob("*.lua"))
    for fields in queue_meta._FIELDS.values():
        for name in fields:
            assert f"'{name}'" in lua, f"no script reads or writes meta field {name!r}"
    assert set(queue_meta._FIELDS) == set(models.QUEUE_SETTING_NAMES)
