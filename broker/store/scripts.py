"""Loads lua/*.lua once, prepends the shared prelude, and registers each with the client."""

from __future__ import annotations

from importlib import resources
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from redis.commands.core import AsyncScript

    from broker.store.redis_store import AnyRedis

SCRIPT_NAMES: Final = (
    "enqueue",
    "lease",
    "ack",
    "nack",
    "extend_lease",
    "detach",
    "resume",
    "unlease",
    "reclaim_expired",
    "promote_due",
    "cancel",
    "redrive",
    "delete_dead",
    "trim_finished",
    "stats",
    "maintain",
    "forget_queue",
    "get_task",
    "hint_due",
    "take_due",
    "settle_due",
    "update_settings",
    "fire_schedule",
    "put_schedule",
    "group_keys",
    "link",
    "resolve",
    "watch",
)


def read_script(name: str) -> str:
    """The full source of one script: prelude, then the script itself."""
    lua = resources.files("broker.store") / "lua"
    prelude = (lua / "_prelude.lua").read_text(encoding="utf-8")
    return prelude + "\n" + (lua / f"{name}.lua").read_text(encoding="utf-8")


class Scripts:
    """One registered script per state change. redis-py runs them by EVALSHA and reloads them
    after NOSCRIPT (a Redis restart or SCRIPT FLUSH)."""

    def __init__(self, client: AnyRedis) -> None:
        self._by_name: dict[str, AsyncScript] = {
            name: client.register_script(read_script(name)) for name in SCRIPT_NAMES
        }

    def __getitem__(self, name: str) -> AsyncScript:
        return self._by_name[name]
