"""The dashboard in headless Chromium (Debian's `chromium`, driven by Playwright): live counts,
a redrive from the dead-letter list, and the read-only mode."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from playwright.async_api import Browser, ConsoleMessage, Page, async_playwright, expect

from broker.queue import TaskRequest
from broker.schedules import ScheduleRequest
from taskbroker import Client
from taskbroker.v1 import task_pb2
from tests.conftest import RunningBroker
from tests.support.lease_stream import LeaseStream
from tests.support.tasks import enqueue, get, spec
from tests.web.conftest import base_url, make_dead

CHROMIUM = Path("/usr/bin/chromium")

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="needs Debian's chromium at /usr/bin/chromium (apt-get install chromium; CI does)",
)

#: The page polls every 2.5 s; allow a few polls.
UI_TIMEOUT_MS = 10_000


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=str(CHROMIUM))
        yield browser
        await browser.close()


async def open_page(browser: Browser, running: RunningBroker) -> tuple[Page, list[str]]:
    """The dashboard, and a list that collects the page's errors (CSP violations included)."""
    page = await browser.new_page()
    problems: list[str] = []

    def on_console(message: ConsoleMessage) -> None:
        if message.type == "error":
            problems.append(message.text)

    page.on("console", on_console)
    page.on("pageerror", lambda error: problems.append(str(error)))
    await page.goto(base_url(running) + "/")
    return page, problems


async def test_counts_update_live_and_a_dead_letter_is_redriven_with_its_button(
    admin_running: RunningBroker, browser: Browser
) -> None:
    stub = admin_running.stub
    page, problems = await open_page(browser, admin_running)
    await expect(page.locator("#no-queues")).to_be_visible(timeout=UI_TIMEOUT_MS)
    await expect(page.locator("#readonly")).to_be_hidden()

    await enqueue(stub, *(spec("emails") for _ in range(3)))
    pending = page.locator('#queues tr[data-queue="emails"] td[data-field="pending"]')
    await expect(pending).to_have_text("3", timeout=UI_TIMEOUT_MS)
    await enqueue(stub, *(spec("emails") for _ in range(4)))
    await expect(pending).to_have_text("7", timeout=UI_TIMEOUT_MS)

    dead_id, kept_id = await make_dead(stub, "hooks", 2, errors=2)
    await expect(page.locator('#queues tr[data-queue="hooks"] td[data-field="dead"]')).to_have_text(
        "2", timeout=UI_TIMEOUT_MS
    )
    await page.select_option("#dead-queue", "hooks")
    row = page.locator(f'#dead tr[data-task="{dead_id}"]')
    await expect(row).to_be_visible(timeout=UI_TIMEOUT_MS)
    await expect(row.locator("ol.errors li")).to_have_count(2)
    await expect(row.locator("ol.errors li").nth(1)).to_contain_text("HTTP 503 on attempt 2")
    await expect(page.locator("#dead-redrive-all")).to_have_text("Redrive all (2)")

    await row.get_by_role("button", name="Redrive").click()
    await expect(row).to_have_count(0, timeout=UI_TIMEOUT_MS)
    await expect(page.locator(f'#dead tr[data-task="{kept_id}"]')).to_be_visible()
    assert (await get(stub, dead_id)).state == task_pb2.TASK_STATE_PENDING
    assert (await get(stub, kept_id)).state == task_pb2.TASK_STATE_DEAD

    # Task detail, by clicking the id: every attempt's error, the payload by its size only.
    await page.locator(f'#dead tr[data-task="{kept_id}"] button.link').click()
    await expect(page.locator("#task-detail")).to_be_visible()
    await expect(page.locator("#task-fields")).to_contain_text("DEAD")
    await expect(page.locator("#task-errors li")).to_have_count(2)

    # Redrive all asks first, with the count.
    await page.locator("#dead-redrive-all").click()
    await expect(page.locator("#confirm-text")).to_contain_text("Redrive all 1 dead letters")
    await page.locator("#confirm-ok").click()
    await expect(page.locator("#no-dead")).to_be_visible(timeout=UI_TIMEOUT_MS)
    assert (await get(stub, kept_id)).state == task_pb2.TASK_STATE_PENDING
    assert problems == []


async def test_task_data_is_shown_as_text_never_as_markup(
    admin_running: RunningBroker, browser: Browser
) -> None:
    stub = admin_running.stub
    markup = '<img src=x onerror="document.title=`owned`">'
    (task_id,) = await enqueue(stub, spec("xss", "t", b"", headers={"x-note": markup}))
    stream = await LeaseStream(stub).open(["xss"], credits=1)
    try:
        (delivery,) = await stream.take(1)
        await stream.nack(delivery, markup, dead_letter=True)
    finally:
        await stream.close()
    page, problems = await open_page(browser, admin_running)
    await page.select_option("#dead-queue", "xss", timeout=UI_TIMEOUT_MS)
    await expect(page.locator("#dead ol.errors")).to_contain_text(markup, timeout=UI_TIMEOUT_MS)
    await page.locator("#task-id").fill(task_id)
    await page.locator("#task-form button").click()
    await expect(page.locator("#task-fields")).to_contain_text(markup)
    await expect(page.locator("#task-errors")).to_contain_text(markup)
    assert await page.locator("img").count() == 0
    assert await page.title() == "taskbroker"
    assert problems == []


async def test_admin_buttons_are_disabled_with_an_explanation_when_admin_is_off(
    running: RunningBroker, browser: Browser
) -> None:
    await make_dead(running.stub, "hooks", 1)
    page, problems = await open_page(browser, running)
    await expect(page.locator("#readonly")).to_be_visible(timeout=UI_TIMEOUT_MS)
    await expect(page.locator("#readonly")).to_contain_text("TASKBROKER_DASHBOARD_ADMIN=1")
    toggle = page.locator('#queues tr[data-queue="hooks"] button[data-action="toggle-pause"]')
    await expect(toggle).to_be_disabled(timeout=UI_TIMEOUT_MS)
    assert "TASKBROKER_DASHBOARD_ADMIN" in (await toggle.get_attribute("title") or "")
    await page.select_option("#dead-queue", "hooks")
    await expect(page.locator("#dead tbody tr")).to_have_count(1, timeout=UI_TIMEOUT_MS)
    await expect(
        page.locator("#dead tbody tr").get_by_role("button", name="Redrive")
    ).to_be_disabled()
    await expect(page.locator("#dead-redrive-all")).to_be_disabled()
    assert problems == []


async def test_charts_show_the_last_15_minutes_from_the_first_visit(
    running: RunningBroker, browser: Browser
) -> None:
    page, problems = await open_page(browser, running)
    await page.wait_for_function("() => state.charts.throughput !== null", timeout=UI_TIMEOUT_MS)

    scales = await page.evaluate(
        """() => Object.values(state.charts).map((chart) => ({
            x: [chart.scales.x.min, chart.scales.x.max],
            y: [chart.scales.y.min, chart.scales.y.max],
            empty: chart.root.parentElement.querySelector(".chart-empty")?.hidden === false,
        }))"""
    )
    now_s, points = await page.evaluate("() => [Date.now() / 1000, state.history.t.length]")

    assert len(scales) == 2
    for chart in scales:
        start, end = chart["x"]
        assert end - start == pytest.approx(15 * 60)  # not a span of years
        assert abs(end - now_s) < 60
        assert chart["y"][0] == 0 and chart["y"][1] > 0
        assert chart["empty"] is (points == 0)  # "no data yet" until the first point
    assert problems == []


async def test_an_encrypted_task_says_which_key_sealed_it(
    running: RunningBroker, browser: Browser
) -> None:
    sealed = b"\x89TBE" + bytes([1, 0, 2]) + b"k2" + bytes(40)  # an envelope's clear header
    (task_id,) = await enqueue(running.stub, spec("billing", "charge", sealed))
    page, problems = await open_page(browser, running)
    await page.locator("#task-id").fill(task_id)
    await page.locator("#task-form button").click()
    await expect(page.locator("#task-fields")).to_contain_text(
        f"encrypted, key k2, {len(sealed)} bytes", timeout=UI_TIMEOUT_MS
    )
    assert problems == []


async def test_limits_group_keys_and_schedules_render(
    running: RunningBroker, browser: Browser
) -> None:
    async with Client(running.target) as client:
        await client.update_queue_settings("tenants", max_concurrency=20, per_key_max_concurrency=2)
    await enqueue(running.stub, *(spec("tenants", group_key=k) for k in ("big", "big", "small")))
    request = ScheduleRequest("nightly", "0 3 * * *", "Europe/Berlin", TaskRequest("tenants", "r"))
    await running.broker.schedules.create(request)
    page, problems = await open_page(browser, running)
    limits = page.locator('#queues tr[data-queue="tenants"] td[data-field="limits"]')
    await expect(limits).to_contain_text("max 20 leased", timeout=UI_TIMEOUT_MS)
    await expect(limits).to_contain_text("per key 2 leased")
    await page.select_option("#keys-queue", "tenants")
    rows = page.locator("#keys tbody tr")
    await expect(rows).to_have_count(2, timeout=UI_TIMEOUT_MS)
    await expect(rows.nth(0)).to_have_attribute("data-key", "big")
    await expect(rows.nth(0).locator("td").nth(2)).to_have_text("2")
    schedule = page.locator('#schedules tr[data-schedule="nightly"]')
    await expect(schedule).to_contain_text("0 3 * * *", timeout=UI_TIMEOUT_MS)
    await expect(schedule).to_contain_text("Europe/Berlin")
    assert problems == []


async def test_a_workflow_is_walked_from_a_child_to_its_parent_and_back(
    running: RunningBroker, browser: Browser
) -> None:
    markup = '<img src=x onerror="document.title=`owned`">'
    parent, child = await enqueue(
        running.stub,
        spec("resize", headers={"x-note": markup}),
        spec("album", depends_on_positions=[0]),
    )
    page, problems = await open_page(browser, running)
    waiting = page.locator('#queues tr[data-queue="album"] td[data-field="waiting"]')
    await expect(waiting).to_have_text("1", timeout=UI_TIMEOUT_MS)
    stream = await LeaseStream(running.stub).open(["resize"], credits=1)
    try:
        (delivery,) = await stream.take(1)
        await stream.ack(delivery, result=markup.encode())
    finally:
        await stream.close()
    await page.locator("#task-id").fill(child)
    await page.locator("#task-form button").click()
    row = page.locator(f'#task-parents tr[data-task="{parent}"]')
    await expect(row).to_contain_text("SUCCEEDED", timeout=UI_TIMEOUT_MS)
    await expect(row).to_contain_text(f"{len(markup)} bytes")
    await expect(page.locator("#no-children")).to_be_visible()
    await row.locator("button.link").click()  # to the parent
    await expect(page.locator("#task-fields")).to_contain_text(parent)
    await expect(page.locator("#no-parents")).to_be_visible()
    back = page.locator(f'#task-children tr[data-task="{child}"]')
    await expect(back).to_be_visible()
    await back.locator("button.link").click()  # and back to the child
    await expect(page.locator("#task-fields")).to_contain_text(child)
    assert await page.locator("img").count() == 0
    assert await page.title() == "taskbroker"
    assert problems == []
