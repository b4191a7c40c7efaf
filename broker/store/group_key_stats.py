"""Per-key stats of a queue's group keys (group_keys.lua): one bounded read on the queue's slot."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

from broker.models import GroupKeyPage, GroupKeyState, GroupKeyStats
from broker.store import argv
from broker.store.keys import QueueKeys
from broker.store.redis_store import RedisStore

#: Keys one call reads at most to rank them: about one ZCARD each, so 10,000 keeps a call to a
#: few ms (the same bound stats.lua puts on counting grouped tasks).
SCAN_LIMIT: Final = 10_000

_STATES: Final = {
    b"r": GroupKeyState.READY,
    b"p": GroupKeyState.PARKED,
    b"w": GroupKeyState.RATE_LIMITED,
    b"l": GroupKeyState.LEASED_ONLY,
}


async def group_key_page(
    store: RedisStore,
    queue: str,
    page_size: int,
    after: tuple[int, str] | None,
    scan_limit: int = SCAN_LIMIT,
) -> GroupKeyPage:
    """Up to page_size of the queue's group keys, the most pending first (then by name),
    strictly after `after` (pending, key) in that order."""
    keys = QueueKeys(queue)
    args = argv.GroupKeysArgs(
        group_prefix=keys.group_prefix,
        scan_limit=scan_limit,
        page_size=page_size,
        after_pending=after[0] if after else -1,
        after_key=after[1] if after else "",
    )
    reply: Sequence[Any] = await store.run_script(
        "group_keys",
        [keys.group_rotation, keys.group_parked, keys.group_waiting, keys.group_leased],
        args,
    )
    rows = reply[7:]
    found = [
        GroupKeyStats(
            group_key=rows[i].decode(),
            state=_STATES[rows[i + 1]],
            pending=int(rows[i + 2]),
            leased=int(rows[i + 3]),
            oldest_ready_ms=None if int(rows[i + 4]) < 0 else int(rows[i + 4]),
        )
        for i in range(0, len(rows), 5)
    ]
    more = int(reply[6]) == 1 and found
    return GroupKeyPage(
        now_ms=int(reply[0]),
        keys=found,
        next_cursor=(found[-1].pending, found[-1].group_key) if more else None,
        ready_keys=int(reply[1]),
        parked_keys=int(reply[2]),
        rate_limited_keys=int(reply[3]),
        keys_with_leases=int(reply[4]),
        scanned_keys=int(reply[5]),
    )
