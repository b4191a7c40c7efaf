"""The audit stream as tests read it straight from Redis."""

from __future__ import annotations

from typing import Any, cast

import redis

from broker.store.keys import AUDIT_KEY


def audit_entries(client: redis.Redis, *, newest_first: bool = False) -> list[dict[bytes, bytes]]:
    """The audit records' fields, oldest first (or newest first)."""
    reply = client.xrevrange(AUDIT_KEY) if newest_first else client.xrange(AUDIT_KEY)
    return [cast(dict[bytes, bytes], fields) for _, fields in cast(list[Any], reply)]
