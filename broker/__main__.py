"""`python -m broker`: parse settings, run the broker until SIGINT/SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys

from broker.app import Broker, UnsafeRedis
from broker.auth.policy import PolicyError
from broker.config import ignored_variables, load_settings
from broker.errors import BrokerError


async def serve() -> int:
    settings = load_settings()
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for warning in ignored_variables(os.environ):
        logging.getLogger("broker").warning("%s", warning)
    broker = Broker(settings)
    try:
        await broker.start()
    except (UnsafeRedis, RuntimeError, BrokerError, PolicyError) as exc:
        logging.getLogger("broker").error("cannot start: %s", exc)
        return 2
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await broker.stop()
    return 0


def main() -> None:
    sys.exit(asyncio.run(serve()))


if __name__ == "__main__":
    main()
