"""`taskbroker schedule ...`: create, show, list, change, pause, resume, trigger and delete
schedules (tasks the broker enqueues on a cron expression). Registered on the `taskbroker`
group by cli.py."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Final, TypeVar

import click

from taskbroker._cli_app import DURATION, DURATION_FORMAT, App, HeaderType, PayloadType
from taskbroker._cli_render import schedule_doc, schedule_view, schedules_table
from taskbroker._client import Client
from taskbroker._models import NewTask, Schedule

_F = TypeVar("_F", bound=Callable[..., Any])

#: Schedules fetched per ListSchedules call by `schedule list`.
LIST_PAGE: Final = 1000


@dataclass(frozen=True, slots=True)
class Definition:
    """The schedule options given on the command line; None: not given."""

    time_zone: str | None
    jitter: timedelta | None
    catch_up: str | None
    payload: bytes | None
    priority: int | None
    max_attempts: int | None
    headers: tuple[tuple[str, str], ...]
    group_key: str | None
    delay: timedelta | None

    def task(self, queue: str, type_: str, base: NewTask | None = None) -> NewTask:
        """The task template: these options over `base`'s (or the defaults). A zero delay
        or an empty group key clears it."""

        def pick(given: Any, kept: Any) -> Any:
            return kept if given is None else given

        old = base or NewTask(queue, type_)
        delay = pick(self.delay, old.delay)
        return NewTask(
            queue,
            type_,
            pick(self.payload, old.payload),
            priority=pick(self.priority, old.priority),
            max_attempts=pick(self.max_attempts, old.max_attempts),
            headers=dict(self.headers) if self.headers else old.headers,
            group_key=pick(self.group_key, old.group_key) or None,
            delay=delay or None,
            lease_duration=old.lease_duration,
            initial_backoff=old.initial_backoff,
            max_backoff=old.max_backoff,
        )


def definition_options(command: _F) -> _F:
    """The options create and update share (for update, each given one replaces the stored
    value and the others are kept)."""
    options = [
        click.option("--payload", type=PayloadType(), default=None, help="JSON, or @path."),
        click.option("--tz", "time_zone", default=None, help="IANA time zone; default UTC."),
        click.option(
            "--jitter",
            type=DURATION,
            default=None,
            help=f"Delay each tick's task by up to this (at most 1d): {DURATION_FORMAT}.",
        ),
        click.option(
            "--catch-up",
            type=click.Choice(["skip", "latest"]),
            default=None,
            help="Ticks missed while no broker ran: skip them (default), or run the latest.",
        ),
        click.option("--priority", type=click.IntRange(-1000, 1000), default=None),
        click.option("--max-attempts", type=click.IntRange(1, 1000), default=None),
        click.option("--header", "headers", type=HeaderType(), multiple=True, help="Repeatable."),
        click.option("--group-key", default=None, help="The tenant the tasks belong to."),
        click.option(
            "--delay", type=DURATION, default=None, help="Added to each tick: the task's delay."
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _definition(options: dict[str, Any]) -> Definition:
    return Definition(
        time_zone=options["time_zone"],
        jitter=options["jitter"],
        catch_up=options["catch_up"],
        payload=options["payload"],
        priority=options["priority"],
        max_attempts=options["max_attempts"],
        headers=options["headers"],
        group_key=options["group_key"],
        delay=options["delay"],
    )


def _show(app: App, schedule: Schedule) -> None:
    if app.json:
        app.emit(schedule_doc(schedule))
    else:
        app.show(schedule_view(schedule))


@click.group()
def schedule() -> None:
    """Create, list, change, pause, resume, trigger or delete schedules: tasks the broker
    enqueues on a cron expression, each tick once however many brokers run."""


@schedule.command("create")
@click.argument("name")
@click.argument("cron")
@click.argument("queue")
@click.argument("type_", metavar="TYPE")
@definition_options
@click.option("--paused", is_flag=True, help="Create it paused: it ticks once resumed.")
@click.pass_obj
def schedule_create(
    app: App, /, name: str, cron: str, queue: str, type_: str, paused: bool, **options: Any
) -> None:
    """Creates schedule NAME: a task of TYPE on QUEUE at each tick of CRON (5 fields, 6 with
    seconds first, @daily and the other nicknames, or "@every 90s")."""
    given = _definition(options)
    created = app.run(
        lambda c: c.create_schedule(
            name,
            cron,
            given.task(queue, type_),
            time_zone=given.time_zone or "UTC",
            jitter=given.jitter or None,
            catch_up="latest" if given.catch_up == "latest" else "skip",
            paused=paused,
        )
    )
    _show(app, created)


@schedule.command("update")
@click.argument("name")
@click.option("--cron", default=None, help="A new expression.")
@click.option("--type", "type_", default=None, help="A new task type.")
@definition_options
@click.pass_obj
def schedule_update(
    app: App, /, name: str, cron: str | None, type_: str | None, **options: Any
) -> None:
    """Changes schedule NAME: the options given replace its stored values, the others are
    kept (--header replaces every header; --delay 0, --jitter 0 and --group-key '' clear).
    The schedule is read, then replaced: a change made by someone else in between is lost.
    Its queue cannot change: delete it and create it again."""
    given = _definition(options)

    async def update(client: Client) -> Schedule:
        old = await client.get_schedule(name)
        jitter = old.jitter if given.jitter is None else given.jitter
        return await client.update_schedule(
            name,
            cron if cron is not None else old.cron,
            given.task(old.task.queue, type_ or old.task.type, old.task),
            time_zone=given.time_zone if given.time_zone is not None else old.time_zone,
            jitter=jitter or None,
            catch_up="latest" if (given.catch_up or old.catch_up) == "latest" else "skip",
        )

    _show(app, app.run(update))


@schedule.command("get")
@click.argument("name")
@click.pass_obj
def schedule_get(app: App, name: str) -> None:
    """Shows schedule NAME: its definition, next and last fire times and last task."""
    _show(app, app.run(lambda c: c.get_schedule(name)))


@schedule.command("list")
@click.pass_obj
def schedule_list(app: App) -> None:
    """Lists every schedule (on queues the caller may read), by name."""

    async def every(client: Client) -> list[Schedule]:
        return [s async for s in client.schedules(page_size=LIST_PAGE)]

    found = app.run(every)
    if app.json:
        app.emit({"schedules": [schedule_doc(s) for s in found]})
    elif not found:
        click.echo("no schedules")
    else:
        app.show(schedules_table(found))


@schedule.command("pause")
@click.argument("name")
@click.pass_obj
def schedule_pause(app: App, name: str) -> None:
    """Stops NAME's ticks until it is resumed (ticks while paused are never enqueued)."""
    paused = app.run(lambda c: c.pause_schedule(name))
    if app.json:
        app.emit(schedule_doc(paused))
    else:
        click.echo(f"{name} paused")


@schedule.command("resume")
@click.argument("name")
@click.pass_obj
def schedule_resume(app: App, name: str) -> None:
    """Resumes NAME from its next tick after now."""
    resumed = app.run(lambda c: c.resume_schedule(name))
    if app.json:
        app.emit(schedule_doc(resumed))
    else:
        when = resumed.next_fire_time.isoformat() if resumed.next_fire_time else "-"
        click.echo(f"{name} resumed, next fire {when}")


@schedule.command("trigger")
@click.argument("name")
@click.pass_obj
def schedule_trigger(app: App, name: str) -> None:
    """Enqueues NAME's task now, once (its ticks are unchanged), and prints the task's id."""
    task_id = app.run(lambda c: c.trigger_schedule(name))
    if app.json:
        app.emit({"name": name, "task_id": task_id})
    else:
        click.echo(task_id)


@schedule.command("delete")
@click.argument("name")
@click.pass_obj
def schedule_delete(app: App, name: str) -> None:
    """Deletes schedule NAME; the tasks it already enqueued are not touched."""
    app.run(lambda c: c.delete_schedule(name))
    if app.json:
        app.emit({"name": name, "deleted": True})
    else:
        click.echo(f"{name} deleted")
