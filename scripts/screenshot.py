"""`make screenshot`: docs/dashboard.png, the dashboard of a broker with some demo traffic.

Starts a broker (its own embedded redis-server in a temporary directory, HTTP on a free port,
admin actions on), a worker and a producer, lets the charts fill for a while, opens a dead letter
in the task detail, and captures the page with headless Chromium (Debian's `chromium` package,
driven by Playwright; no browser is downloaded).

    python scripts/screenshot.py [--out docs/dashboard.png] [--seconds 24]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import tempfile
from datetime import timedelta
from pathlib import Path

from playwright.async_api import async_playwright

from broker.app import Broker
from broker.config import Settings
from taskbroker import Client, NewTask, NonRetryable, TaskContext, Worker, handler

CHROMIUM = "/usr/bin/chromium"
log = logging.getLogger("screenshot")


@handler("send_welcome_email")
async def send_welcome_email(ctx: TaskContext, payload: bytes) -> bytes:
    await asyncio.sleep(random.uniform(0.02, 0.25))
    if random.random() < 0.05:
        raise NonRetryable("550 5.1.1 mailbox unavailable")
    return b'{"status": "sent", "smtp": "250 2.0.0 OK"}'


@handler("deliver_webhook")
async def deliver_webhook(ctx: TaskContext, payload: bytes) -> bytes:
    await asyncio.sleep(0.05)
    if payload.startswith(b"bad"):
        raise RuntimeError(f"POST https://hooks.example.test/orders: 503 (attempt {ctx.attempt})")
    return b"204"


async def produce(client: Client, seconds: float) -> None:
    """A burst, then a steady trickle with a wave in the middle."""
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    await client.enqueue_many(
        NewTask("reports", "monthly_report", f"{i}".encode()) for i in range(40)
    )
    await client.enqueue_many(
        NewTask("images", "resize", b"img", delay=timedelta(minutes=5 + i)) for i in range(12)
    )
    await client.enqueue_many(
        NewTask("webhooks", "deliver_webhook", b"bad" if i % 4 == 0 else b"ok", max_attempts=3)
        for i in range(24)
    )
    step = 0
    while (now := loop.time()) < end:
        wave = 1.0 + (0.8 if seconds / 3 < seconds - (end - now) < 2 * seconds / 3 else 0.0)
        count = int(random.uniform(8, 14) * wave)
        await client.enqueue_many(
            NewTask("emails", "send_welcome_email", f"user-{step}-{i}".encode())
            for i in range(count)
        )
        step += 1
        await asyncio.sleep(0.5)


async def capture(out: Path, seconds: float) -> None:
    with tempfile.TemporaryDirectory() as data_dir:
        settings = Settings(
            listen="127.0.0.1:0",
            http_listen="127.0.0.1:0",
            data_dir=Path(data_dir),
            dashboard_admin=True,
            backoff_initial_s=0.05,
            backoff_max_s=0.2,
        )
        broker = Broker(settings)
        await broker.start()
        try:
            async with Client(f"127.0.0.1:{broker.port}") as client:
                await client.pause("reports")
                worker = Worker(
                    client,
                    queues=["emails", "webhooks"],
                    handlers=[send_welcome_email, deliver_webhook],
                    concurrency=16,
                    worker_id="mailer-1",
                    shutdown_grace=timedelta(seconds=1),
                )
                async with worker, async_playwright() as playwright:
                    browser = await playwright.chromium.launch(executable_path=CHROMIUM)
                    page = await browser.new_page(viewport={"width": 1400, "height": 1000})
                    await page.goto(f"http://127.0.0.1:{broker.http_port}/")
                    producer = asyncio.create_task(produce(client, seconds + 30))
                    await asyncio.sleep(seconds)  # traffic goes on while the page is captured
                    await page.select_option("#dead-queue", "webhooks")
                    await page.locator("#dead tbody tr").first.wait_for()
                    await page.locator("#dead tbody tr button.link").first.click()
                    await page.locator("#task-detail").wait_for()
                    await page.wait_for_timeout(2500)  # one more poll: counts and charts
                    out.parent.mkdir(parents=True, exist_ok=True)
                    await page.screenshot(path=str(out), full_page=True)
                    await browser.close()
                    producer.cancel()
                    await asyncio.gather(producer, return_exceptions=True)
        finally:
            await broker.stop(grace_s=0.5)
    log.info("wrote %s", out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("docs/dashboard.png"))
    parser.add_argument("--seconds", type=float, default=24.0, help="demo traffic before capture")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("broker").setLevel(logging.WARNING)
    logging.getLogger("taskbroker").setLevel(logging.WARNING)
    asyncio.run(capture(args.out, args.seconds))


if __name__ == "__main__":
    main()
