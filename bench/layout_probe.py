"""`python -m bench.layout_probe`: the evidence for the storage layout (docs/data-model.md, "Why
fresh tasks live in streams"). Not a bench scenario: a probe that compares, on a stock
redis-server of its own, the broker's task lifecycle (its enqueue, lease and ack scripts,
through bench.floor_proc.Lifecycle) with a prototype that keeps only what the layout needs: a
fresh pending task is one entry of a per-priority Redis stream holding its encoded `Task`, and
only a leased task has a hash of its own.

It reports Redis bytes per pending task (100-byte payload) and Redis CPU per task through
enqueue, lease and ack (batches of 100), each the median of --runs, and the ratio. The prototype
leaves out what a real layout must keep (idempotency, retries, delays, fencing errors, stats);
docs/data-model.md says what those cost and where they go.
"""

from __future__ import annotations

import argparse
import secrets
import socket
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable

import redis
from rich.console import Console

from bench.floor_proc import PAYLOAD, Lifecycle
from bench.worker_proc import TASK_TYPE
from taskbroker.v1 import task_pb2

#: Prototype scripts. Fresh tasks: XADD to tb:{q}:p:<pri> with the encoded Task as one field;
#: the id is the entry's (a real layout would name it <queue>:<pri>.<entry id>). Lease: XRANGE
#: from the highest priority in use, XDEL, and a short hash for the lease. Ack: the fence, then
#: the task is kept as succeeded (the default retention), as today's ack does. Both count their
#: totals and enqueue publishes its wake-up, as today's do.
ENQUEUE = """
local ids = {}
for i = 1, #ARGV do ids[i] = redis.call('XADD', KEYS[1], '*', 'b', ARGV[i]) end
redis.call('ZADD', KEYS[2], 0, '0')
redis.call('HINCRBY', KEYS[3], 'enq', #ARGV)
redis.call('PUBLISH', 'tb:wake', KEYS[1])
return ids
"""
LEASE = """
local n, prefix, stream_prefix, expire = tonumber(ARGV[1]), ARGV[2], ARGV[3], ARGV[4]
local pri = redis.call('ZRANGE', KEYS[1], 0, 0)[1]
if not pri then return {} end
local stream = stream_prefix .. pri
local entries = redis.call('XRANGE', stream, '-', '+', 'COUNT', n)
local reply = {}
for i, e in ipairs(entries) do
  local id, body = e[1], e[2][2]
  redis.call('XDEL', stream, id)
  redis.call('HSET', prefix .. id, 'b', body, 'state', 3, 'att', 1, 'lid', ARGV[4 + i],
    'etime', expire, 'pe', pri)
  redis.call('ZADD', KEYS[2], expire, id)
  reply[#reply + 1] = id
  reply[#reply + 1] = body
end
if #entries < n then redis.call('ZREM', KEYS[1], pri) end
return reply
"""
ACK = """
local prefix, done, now = ARGV[1], 0, ARGV[2]
for i = 3, #ARGV, 2 do
  local key = prefix .. ARGV[i]
  if redis.call('HGET', key, 'lid') == ARGV[i + 1] then
    redis.call('HSET', key, 'state', 4, 'ftime', now, 'slid', ARGV[i + 1], 'skind', 'a')
    redis.call('HDEL', key, 'lid', 'etime')
    redis.call('ZREM', KEYS[1], ARGV[i])
    redis.call('ZADD', KEYS[2], now, ARGV[i])
    done = done + 1
  end
end
redis.call('HINCRBY', KEYS[3], 'ok', done)
return done
"""


class StreamLifecycle:
    """The prototype's lifecycle on one queue, with the same round trips as floor_proc's."""

    def __init__(self, client: redis.Redis, queue: str) -> None:
        self._client = client
        base = f"tb:{{{queue}}}:"
        self._stream_prefix, self._prios = base + "p:", base + "prios"
        self._task_prefix, self._leased = base + "t:", base + "leased"
        self._done, self._stats = base + "done", base + "stats"
        self._body = task_pb2.Task(
            queue=queue, type=TASK_TYPE, payload=PAYLOAD, max_attempts=5
        ).SerializeToString()
        self._sha = {
            name: client.script_load(text)
            for name, text in (("enqueue", ENQUEUE), ("lease", LEASE), ("ack", ACK))
        }

    def round_trip(
        self, enqueue: int, lease: int, acks: list[tuple[str, str]]
    ) -> tuple[list[tuple[str, str]], int]:
        pipe = self._client.pipeline(transaction=False)
        if enqueue:
            keys = (self._stream_prefix + "0", self._prios, self._stats)
            pipe.evalsha(self._sha["enqueue"], 3, *keys, *[self._body] * enqueue)
        lease_ids = [secrets.token_hex(16) for _ in range(lease)]
        if lease:
            expire = int(time.time() * 1000) + 30_000
            args: list[str | int] = [lease, self._task_prefix, self._stream_prefix, expire]
            args += lease_ids
            pipe.evalsha(self._sha["lease"], 2, self._prios, self._leased, *args)
        if acks:
            flat = [x for pair in acks for x in pair]
            now = int(time.time() * 1000)
            keys = (self._leased, self._done, self._stats)
            pipe.evalsha(self._sha["ack"], 3, *keys, self._task_prefix, now, *flat)
        replies = pipe.execute()
        leased: list[tuple[str, str]] = []
        if lease:
            ids = [i.decode() for i in replies[1 if enqueue else 0][0::2]]
            leased = list(zip(ids, lease_ids, strict=False))
        acked = int(replies[-1]) if acks else 0
        if acked != len(acks):
            raise RuntimeError(f"ack settled {acked} of {len(acks)}")
        return leased, acked


Layout = Callable[[redis.Redis, str], Lifecycle | StreamLifecycle]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _redis_cpu_s(client: redis.Redis) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


def bytes_per_pending(client: redis.Redis, layout: Layout, tasks: int) -> float:
    client.flushall()
    life = layout(client, "probe")
    life.round_trip(1, 1, [])  # scripts and keys warm
    before = int(client.info("memory")["used_memory"])
    for _ in range(tasks // 100):
        life.round_trip(100, 0, [])
    return (int(client.info("memory")["used_memory"]) - before) / tasks


def cpu_us_per_task(client: redis.Redis, layout: Layout, tasks: int) -> float:
    client.flushall()
    life = layout(client, "probe")
    held, _ = life.round_trip(1, 1, [])
    cpu = _redis_cpu_s(client)
    for _ in range(tasks // 100):
        held, _ = life.round_trip(100, 100, held)
    life.round_trip(0, 0, held)
    return (_redis_cpu_s(client) - cpu) / tasks * 1e6


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.layout_probe")
    p.add_argument("--tasks", type=int, default=20_000)
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args()
    port = _free_port()
    with tempfile.TemporaryDirectory() as work:
        server = subprocess.Popen(
            ["redis-server", "--port", str(port), "--save", "", "--appendonly", "no",
             "--dir", work],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            client = redis.Redis(port=port)
            for _ in range(50):
                try:
                    client.ping()
                    break
                except redis.ConnectionError:
                    time.sleep(0.1)
            layouts: dict[str, Layout] = {"today": Lifecycle, "stream": StreamLifecycle}
            figures: dict[str, dict[str, list[float]]] = {n: {"B": [], "us": []} for n in layouts}
            for _ in range(args.runs):  # interleaved, so load on the machine hits both alike
                for name, layout in layouts.items():
                    figures[name]["B"].append(bytes_per_pending(client, layout, args.tasks))
                    figures[name]["us"].append(cpu_us_per_task(client, layout, args.tasks))
        finally:
            server.terminate()
            server.wait()
    med = {n: {k: statistics.median(v) for k, v in f.items()} for n, f in figures.items()}
    out = Console(highlight=False)
    out.print(f"stock redis-server, {args.tasks:,} tasks, 100-byte payload, medians of {args.runs}")
    out.print(f"{'layout':<8} {'B/pending task':>15} {'Redis CPU/task':>15}")
    for name, m in med.items():
        out.print(f"{name:<8} {m['B']:>15.0f} {m['us']:>13.1f}µs")
    today, stream = med["today"], med["stream"]
    ratio_b, ratio_us = stream["B"] / today["B"], stream["us"] / today["us"]
    out.print(f"{'ratio':<8} {ratio_b:>14.2f}x {ratio_us:>14.2f}x")


if __name__ == "__main__":
    main()
