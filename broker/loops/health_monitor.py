"""HealthMonitor: health is SERVING only while Redis answers (and not while draining)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from broker.errors import BrokerError

log = logging.getLogger(__name__)


class HealthMonitor:
    """Pings Redis; reports every change of reachability once."""

    name = "health"

    def __init__(self, ping: Callable[[], object], set_serving: Callable[[bool], object]) -> None:
        self._ping = ping
        self._set_serving = set_serving
        self.serving: bool | None = None

    async def run_once(self) -> int:
        try:
            await asyncio.wait_for(self._ping(), 2.0)  # type: ignore[arg-type]
            ok = True
        except (BrokerError, TimeoutError):
            ok = False
        if ok != self.serving:
            log.log(
                logging.INFO if ok else logging.WARNING,
                "redis %s",
                "reachable" if ok else "unreachable",
            )
            self.serving = ok
            await self._set_serving(ok)  # type: ignore[misc]
        return int(ok)
