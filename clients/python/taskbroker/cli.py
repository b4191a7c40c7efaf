"""The `taskbroker` command line: its commands and their arguments, to enqueue and inspect
tasks, watch queues, manage dead letters, pause queues, manage schedules (`_cli_schedule`) and
run workers.

Every command talks to the broker through the async `Client`; `App.run` (`_cli_app`) runs one
coroutine with a client and turns SDK errors into `error: ...` on stderr and exit status 1.
Usage errors (a bad option value) exit 2, as click does. With `--json` each command writes one
JSON document to stdout (`stats --watch --json` writes one per refresh, a line each) and errors
are JSON on stderr. How tasks, queues, stats, audit records and schedules look, as tables and
as JSON, is in `_cli_render`.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import logging
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from datetime import timedelta
from typing import Any, Final, Protocol, cast

import click
from rich.live import Live

from taskbroker._channel import (
    ENV_TLS,
    ENV_TLS_CA,
    ENV_TLS_CLIENT_CERT,
    ENV_TLS_CLIENT_KEY,
    ENV_TLS_SERVER_NAME,
    ENV_TOKEN,
    ENV_TOKEN_FILE,
    ChannelConfigError,
    TlsConfig,
)
from taskbroker._cli_app import DURATION, DURATION_FORMAT, App, HeaderType, PayloadType
from taskbroker._cli_render import (
    audit_doc,
    audit_table,
    consoles,
    dead_table,
    enqueued_table,
    errors_table,
    parents_table,
    settings_doc,
    stats_doc,
    stats_table,
    task_doc,
    task_view,
)
from taskbroker._cli_schedule import schedule
from taskbroker._client import MAX_TASKS_PER_CALL, Client, EnqueueResult
from taskbroker._errors import (
    InvalidArgumentError,
    TaskNotFoundError,
)
from taskbroker._models import (
    AuditRecord,
    NewTask,
    ParentFailurePolicy,
    QueueStats,
    RateLimit,
    Task,
    TaskState,
)

#: Log records as `taskbroker worker` prints them: time, level, logger, message.
LOG_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s: %(message)s"
#: Most GetTask calls in flight at once when explaining which ids a dead-letter command skipped.
LOOKUP_CONCURRENCY: Final = 32
#: Queue names listed when a queue command is refused for an unknown name.
KNOWN_SHOWN: Final = 10

# --- commands -------------------------------------------------------------------------------


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--target",
    envvar="TASKBROKER_TARGET",
    default="127.0.0.1:50051",
    show_default=True,
    show_envvar=True,
    help="Broker address (host:port or any gRPC target).",
)
@click.option(
    "--tls",
    "tls_on",
    is_flag=True,
    envvar=ENV_TLS,
    show_envvar=True,
    help="Connect with TLS, verifying the broker against the system's CA certificates "
    "(implied by any --tls-* option).",
)
@click.option(
    "--tls-ca",
    type=click.Path(dir_okay=False),
    envvar=ENV_TLS_CA,
    show_envvar=True,
    help="PEM CA certificates to verify the broker with (TLS).",
)
@click.option(
    "--tls-client-cert",
    type=click.Path(dir_okay=False),
    envvar=ENV_TLS_CLIENT_CERT,
    show_envvar=True,
    help="PEM client certificate, for a broker that requires one (mutual TLS).",
)
@click.option(
    "--tls-client-key",
    type=click.Path(dir_okay=False),
    envvar=ENV_TLS_CLIENT_KEY,
    show_envvar=True,
    help="PEM private key of --tls-client-cert.",
)
@click.option(
    "--tls-server-name",
    envvar=ENV_TLS_SERVER_NAME,
    show_envvar=True,
    help="Name to verify the broker's certificate against, when the target's host is not in it.",
)
@click.option(
    "--token-file",
    type=click.Path(dir_okay=False),
    envvar=ENV_TOKEN_FILE,
    show_envvar=True,
    help=f"File holding the bearer token sent on every call. A token itself is read from "
    f"{ENV_TOKEN} only, never a flag (flags show in the process list).",
)
@click.option("--json", "json_output", is_flag=True, help="Machine output: JSON on stdout.")
@click.option(
    "--timeout",
    type=DURATION,
    default="10s",
    show_default=True,
    help=f"Deadline of each call to the broker: {DURATION_FORMAT}.",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
    default=None,
    help="Print log records of this level and above on stderr, with timestamps. "
    "Default: info for `worker` (its start and every task's outcome), warning otherwise.",
)
@click.pass_context
def cli(
    ctx: click.Context,
    target: str,
    tls_on: bool,
    tls_ca: str | None,
    tls_client_cert: str | None,
    tls_client_key: str | None,
    tls_server_name: str | None,
    token_file: str | None,
    json_output: bool,
    timeout: timedelta,
    log_level: str | None,
) -> None:
    """Enqueue and inspect tasks, administer queues and run workers of a taskbroker broker."""
    if timeout <= timedelta(0):
        raise click.BadParameter("must be positive", ctx, param_hint="'--timeout'")
    tls = None
    if tls_on or tls_ca or tls_client_cert or tls_client_key or tls_server_name:
        try:
            tls = TlsConfig(tls_ca, tls_client_cert, tls_client_key, tls_server_name)
        except ChannelConfigError as exc:
            raise click.UsageError(f"{exc} (--tls-client-cert, --tls-client-key)") from None
    token = os.environ.get(ENV_TOKEN) or None
    if token is not None and token_file is not None:
        raise click.UsageError(f"give {ENV_TOKEN} or --token-file ({ENV_TOKEN_FILE}), not both")
    if log_level is None:
        log_level = "info" if ctx.invoked_subcommand == "worker" else "warning"
    logging.basicConfig(level=log_level.upper(), format=LOG_FORMAT, stream=sys.stderr)
    out, err = consoles()
    ctx.obj = App(target, json_output, timeout.total_seconds(), out, err, tls, token, token_file)


@cli.command()
@click.argument("queue")
@click.argument("type_", metavar="TYPE")
@click.option("--payload", type=PayloadType(), default=None, help="JSON value, or @path for bytes.")
@click.option(
    "--delay",
    type=DURATION,
    default=None,
    help=f"Run no earlier than this long from now: {DURATION_FORMAT}.",
)
@click.option("--priority", type=click.IntRange(-1000, 1000), default=0, show_default=True)
@click.option("--count", type=click.IntRange(min=1), default=1, help="Enqueue this many copies.")
@click.option("--max-attempts", type=click.IntRange(1, 1000), default=None)
@click.option(
    "--idempotency-key", default=None, help="Deduplication key; with --count, KEY-1 .. KEY-N."
)
@click.option("--header", "headers", type=HeaderType(), multiple=True, help="Repeatable.")
@click.option("--group-key", default=None, help="The tenant the task belongs to (fairness).")
@click.option(
    "--depends-on",
    "depends_on",
    metavar="ID",
    multiple=True,
    help="Wait for this task to succeed first (repeatable): stored WAITING until then.",
)
@click.option(
    "--on-parent-failure",
    type=click.Choice([p.value for p in ParentFailurePolicy], case_sensitive=False),
    default=None,
    help="When a task it depends on ends DEAD or CANCELLED: cancel this one (the default), "
    "run it anyway, or wait (a dead parent redriven and succeeding releases it).",
)
@click.pass_obj
def enqueue(
    app: App,
    queue: str,
    type_: str,
    payload: bytes | None,
    delay: timedelta | None,
    priority: int,
    count: int,
    max_attempts: int | None,
    idempotency_key: str | None,
    headers: tuple[tuple[str, str], ...],
    group_key: str | None,
    depends_on: tuple[str, ...],
    on_parent_failure: str | None,
) -> None:
    """Enqueues a task of TYPE on QUEUE (or --count copies) and prints the task ids."""
    if on_parent_failure is not None and not depends_on:
        raise click.UsageError("--on-parent-failure applies to a task given --depends-on")
    policy = None if on_parent_failure is None else ParentFailurePolicy(on_parent_failure.lower())

    def new_task(n: int) -> NewTask:
        key = idempotency_key if count == 1 or idempotency_key is None else f"{idempotency_key}-{n}"
        return NewTask(
            queue,
            type_,
            payload or b"",
            priority=priority,
            delay=delay,
            max_attempts=max_attempts,
            idempotency_key=key,
            headers=dict(headers),
            group_key=group_key,
            depends_on=depends_on or None,
            parent_failure_policy=policy,
        )

    results = app.run(lambda c: _enqueue_copies(app, c, [new_task(n + 1) for n in range(count)]))
    if app.json:
        app.emit({"task_ids": [r.task_id for r in results]})
    elif app.out.is_terminal:
        app.show(enqueued_table(results))
    else:
        for result in results:
            click.echo(result.task_id)


async def _enqueue_copies(app: App, client: Client, tasks: list[NewTask]) -> list[EnqueueResult]:
    results: list[EnqueueResult] = []
    with app.progress("enqueueing", len(tasks), enabled=len(tasks) > 1) as advance:
        for start in range(0, len(tasks), MAX_TASKS_PER_CALL):
            chunk = tasks[start : start + MAX_TASKS_PER_CALL]
            results.extend(await client.enqueue_many(chunk))
            advance(len(chunk))
    return results


@cli.command()
@click.argument("task_id", metavar="ID")
@click.pass_obj
def task(app: App, task_id: str) -> None:
    """Shows a task: state, attempts, times, errors, payload and result, and the tasks it
    depends on (with how each ended) and the tasks that depend on it."""
    found = app.run(lambda c: c.get_task(task_id))
    if app.json:
        app.emit(task_doc(found))
        return
    app.show(task_view(found))
    if found.parent_ids:
        app.show(parents_table(found))
    if found.errors:
        app.show(errors_table(found))


@cli.command()
@click.argument("task_id", metavar="ID")
@click.pass_obj
def cancel(app: App, task_id: str) -> None:
    """Cancels a task that has not finished (a held lease is revoked). The tasks waiting for
    it follow their parent failure policy: cancel and wait cancel them too, run lets them run."""
    cancelled = app.run(lambda c: c.cancel(task_id))
    if app.json:
        app.emit(task_doc(cancelled))
        return
    app.show(task_view(cancelled))


@cli.command()
@click.argument("queues", nargs=-1)
@click.option("--watch", is_flag=True, help="Refresh until Ctrl-C.")
@click.option(
    "--interval",
    type=DURATION,
    default="1s",
    show_default=True,
    help=f"Time between refreshes with --watch: {DURATION_FORMAT}.",
)
@click.pass_obj
def stats(app: App, queues: tuple[str, ...], watch: bool, interval: timedelta) -> None:
    """Shows counts and totals of QUEUES (default: every queue)."""
    if not watch:
        _show_stats(app, app.run(lambda c: c.stats(*queues)))
        return
    try:
        if app.json or not app.out.is_terminal:  # a stream of tables or JSON lines
            app.run(lambda c: _watch(c, queues, interval, lambda s: _show_stats(app, s)))
            return
        with Live(console=app.out, auto_refresh=False) as live:

            def show(all_stats: list[QueueStats]) -> None:
                live.update(stats_table(all_stats, app.out.width), refresh=True)

            app.run(lambda c: _watch(c, queues, interval, show))
    except KeyboardInterrupt:  # Ctrl-C is how a watch ends
        pass


def _show_stats(app: App, all_stats: Sequence[QueueStats]) -> None:
    if app.json:
        app.emit({"queues": [stats_doc(s) for s in all_stats]})
    elif not all_stats:
        app.show("no queues")
    else:
        app.show(stats_table(all_stats, app.out.width))


async def _watch(
    client: Client,
    queues: Sequence[str],
    interval: timedelta,
    show: Callable[[list[QueueStats]], None],
) -> None:
    while True:
        show(await client.stats(*queues))
        await asyncio.sleep(interval.total_seconds())


# --- dead letters ---------------------------------------------------------------------------


@cli.group()
def dead() -> None:
    """List, redrive or delete a queue's dead letters."""


@dead.command("list")
@click.argument("queue")
@click.option("--limit", type=click.IntRange(min=1), default=100, show_default=True)
@click.pass_obj
def dead_list(app: App, queue: str, limit: int) -> None:
    """Lists QUEUE's dead letters, oldest first."""
    tasks = app.run(lambda c: _dead_letters(c, queue, limit))
    if app.json:
        app.emit({"tasks": [task_doc(t) for t in tasks]})
    elif not tasks:
        click.echo(f"no dead letters in {queue}")
    else:
        app.show(dead_table(tasks))


async def _dead_letters(client: Client, queue: str, limit: int) -> list[Task]:
    tasks: list[Task] = []
    async for task in client.dead_letters(queue, page_size=min(limit, MAX_TASKS_PER_CALL)):
        tasks.append(task)
        if len(tasks) == limit:
            break
    return tasks


class _DeadOp(Protocol):
    """Client.redrive or Client.delete_dead."""

    def __call__(
        self, queue: str, task_ids: Sequence[str] = (), *, all: bool = False
    ) -> Awaitable[int]: ...


def _settle_dead(
    app: App,
    queue: str,
    ids: tuple[str, ...],
    every: bool,
    op: Callable[[Client], _DeadOp],
    done: str,
) -> None:
    """Redrives or deletes dead letters (op picks the Client method) and reports how many.

    Named ids that are not dead letters of the queue are left out, each with its reason (on
    stderr, or under "skipped" with --json), and the command then exits 1.
    """
    if bool(ids) == every:
        raise click.UsageError("name the dead letters' IDS, or give --all (not both)")
    ids = tuple(dict.fromkeys(ids))  # each id once, in the order given

    async def call(client: Client) -> tuple[int, dict[str, str]]:
        skipped = {} if every else await _not_dead(client, queue, ids)
        chosen = [task_id for task_id in ids if task_id not in skipped]
        if not every and not chosen:
            return 0, skipped
        with app.progress(f"{done} {queue}", None, enabled=every) as advance:
            count = await op(client)(queue, chosen, all=every)
            advance(count)
        if count < len(chosen):  # some changed state between the lookup and the call
            missed = len(chosen) - count
            skipped[f"{missed} of the others"] = "no longer dead letters when the call came"
        return count, skipped

    count, skipped = app.run(call)
    if app.json:
        doc: dict[str, object] = {"queue": queue, done: count}
        if not every:
            doc["skipped"] = [{"id": k, "reason": v} for k, v in skipped.items()]
        app.emit(doc)
    else:
        click.echo(f"{count} dead letter{'' if count == 1 else 's'} of {queue} {done}")
        for task_id, reason in skipped.items():
            click.echo(f"{task_id}: not {done}: {reason}", err=True)
    if skipped:
        sys.exit(1)


async def _not_dead(client: Client, queue: str, ids: Sequence[str]) -> dict[str, str]:
    """Why each of the ids that is not a dead letter of the queue cannot be settled, by id."""
    limit = asyncio.Semaphore(LOOKUP_CONCURRENCY)

    async def reason(task_id: str) -> str | None:
        try:
            async with limit:
                task = await client.get_task(task_id)
        except TaskNotFoundError:
            return "not found"
        except InvalidArgumentError as err:
            return f"not a task id ({err})"
        if task.queue != queue:
            return f"a task of queue {task.queue}, not {queue}"
        if task.state is not TaskState.DEAD:
            return f"not dead ({task.state.name})"
        return None

    reasons = await asyncio.gather(*(reason(task_id) for task_id in ids))
    return {task_id: r for task_id, r in zip(ids, reasons, strict=True) if r is not None}


@dead.command("redrive")
@click.argument("queue")
@click.argument("ids", nargs=-1)
@click.option("--all", "every", is_flag=True, help="Every dead letter of QUEUE.")
@click.pass_obj
def dead_redrive(app: App, queue: str, ids: tuple[str, ...], every: bool) -> None:
    """Moves dead letters of QUEUE back to pending with fresh attempts."""
    _settle_dead(app, queue, ids, every, lambda c: c.redrive, "redriven")


@dead.command("delete")
@click.argument("queue")
@click.argument("ids", nargs=-1)
@click.option("--all", "every", is_flag=True, help="Every dead letter of QUEUE.")
@click.pass_obj
def dead_delete(app: App, queue: str, ids: tuple[str, ...], every: bool) -> None:
    """Deletes dead letters of QUEUE for good."""
    _settle_dead(app, queue, ids, every, lambda c: c.delete_dead, "deleted")


# --- audit trail ----------------------------------------------------------------------------


@cli.command()
@click.option("--limit", type=click.IntRange(1, 100_000), default=50, show_default=True)
@click.pass_obj
def audit(app: App, limit: int) -> None:
    """Lists the audit trail, newest first: admin actions, permission denials and
    authentication failures, each with its principal, target and outcome."""
    records = app.run(lambda c: _audit_records(c, limit))
    if app.json:
        app.emit({"records": [audit_doc(r) for r in records]})
    elif not records:
        click.echo("no audit records")
    else:
        app.show(audit_table(records))


async def _audit_records(client: Client, limit: int) -> list[AuditRecord]:
    records: list[AuditRecord] = []
    async for record in client.audit_records(page_size=min(limit, 1000)):
        records.append(record)
        if len(records) == limit:
            break
    return records


# --- queues ---------------------------------------------------------------------------------


@cli.group()
def queue() -> None:
    """List, pause or resume queues, and set their limits."""


@queue.command("list")
@click.pass_obj
def queue_list(app: App) -> None:
    """Lists the queues the broker knows, marking the paused ones."""
    all_stats = app.run(lambda c: c.stats())
    names = sorted(s.queue for s in all_stats)
    paused = sorted(s.queue for s in all_stats if s.paused)
    if app.json:
        app.emit({"queues": names, "paused": paused})
        return
    if not names:
        click.echo("no queues")
    for name in names:
        click.echo(f"{name} paused" if name in paused else name)


@queue.command("pause")
@click.argument("name", metavar="QUEUE")
@click.option(
    "--create",
    is_flag=True,
    help="Pause QUEUE even when the broker does not know it yet (no task was ever enqueued).",
)
@click.pass_obj
def queue_pause(app: App, name: str, create: bool) -> None:
    """Stops leasing from QUEUE (enqueues are still accepted). QUEUE must exist unless --create."""
    _change_pause(app, name, paused=True, create=create)


@queue.command("resume")
@click.argument("name", metavar="QUEUE")
@click.pass_obj
def queue_resume(app: App, name: str) -> None:
    """Resumes leasing from QUEUE, which must exist."""
    _change_pause(app, name, paused=False, create=False)


def _change_pause(app: App, name: str, *, paused: bool, create: bool) -> None:
    """Pauses or resumes a queue; an unknown name (a typo, most likely) is refused."""

    async def change(client: Client) -> list[str] | None:
        if not create and name not in (known := await client.queues()):
            return known
        await (client.pause(name) if paused else client.resume(name))
        return None

    known = app.run(change)
    if known is not None:
        hint = " (give --create to pause it before its first task)" if paused else ""
        listing = ", ".join(known[:KNOWN_SHOWN]) if known else "none"
        if len(known) > KNOWN_SHOWN:
            listing += f" and {len(known) - KNOWN_SHOWN} more"
        app.refuse(f"unknown queue {name!r}{hint}; known queues: {listing}")
    _report_paused(app, name, paused=paused)


class RateType(click.ParamType[RateLimit | None]):
    """A rate limit: RATE[/BURST] (tasks per second, optional burst), or "off"."""

    name = "RATE[/BURST]"

    def convert(
        self, value: object, param: click.Parameter | None, ctx: click.Context | None
    ) -> RateLimit | None:
        if isinstance(value, RateLimit) or value is None:
            return value
        text = str(value).strip()
        if text == "off":
            return None
        rate, _, burst = text.partition("/")
        try:
            return RateLimit(float(rate), int(burst) if burst else 0)
        except ValueError:
            self.fail(f"{text!r} is not RATE[/BURST] (such as 200 or 200/50) or off", param, ctx)


@queue.command("settings")
@click.argument("name", metavar="QUEUE")
@click.option("--rate-limit", type=RateType(), default=None, help="Leases per second, or off.")
@click.option("--max-concurrency", type=click.IntRange(min=0), default=None, help="0: no cap.")
@click.option(
    "--enqueue-rate-limit", type=RateType(), default=None, help="Enqueues per second, or off."
)
@click.option(
    "--per-key-max-concurrency",
    type=click.IntRange(min=0),
    default=None,
    help="Leased at once per group key; 0: no cap.",
)
@click.option(
    "--per-key-rate-limit", type=RateType(), default=None, help="Leases per second per key, or off."
)
@click.option(
    "--priority-aging",
    type=DURATION,
    default=None,
    help=f"One priority point per this much waiting ({DURATION_FORMAT}); 0s: off.",
)
@click.pass_context
def queue_settings(
    ctx: click.Context,
    name: str,
    rate_limit: RateLimit | None,
    max_concurrency: int | None,
    enqueue_rate_limit: RateLimit | None,
    per_key_max_concurrency: int | None,
    per_key_rate_limit: RateLimit | None,
    priority_aging: timedelta | None,
) -> None:
    """Shows QUEUE's limits, after changing those given (the others are kept)."""
    app: App = ctx.obj
    given = {
        "rate_limit": rate_limit,
        "max_concurrency": max_concurrency,
        "enqueue_rate_limit": enqueue_rate_limit,
        "per_key_max_concurrency": per_key_max_concurrency,
        "per_key_rate_limit": per_key_rate_limit,
        "priority_aging": priority_aging or None,
    }
    changes: dict[str, Any] = {
        option: value
        for option, value in given.items()
        if ctx.get_parameter_source(option) is click.core.ParameterSource.COMMANDLINE
    }
    settings = app.run(lambda c: c.update_queue_settings(name, **changes))
    doc = settings_doc(settings)
    if app.json:
        app.emit({"queue": name, **doc})
        return
    for option, value in doc.items():
        if isinstance(value, dict):
            value = f"{value['per_second']:g}/s, burst {value['burst']}"
        elif option == "priority_aging" and value:
            value = f"{value:g}s a point"
        click.echo(f"{option}: {value or 'off'}")


def _report_paused(app: App, name: str, *, paused: bool) -> None:
    if app.json:
        app.emit({"queue": name, "paused": paused})
    else:
        click.echo(f"{name} {'paused' if paused else 'resumed'}")


cli.add_command(schedule)  # its commands live in _cli_schedule


# --- worker ---------------------------------------------------------------------------------


class _Runnable(Protocol):
    async def run(self) -> None: ...


@cli.command()
@click.argument("spec", metavar="MODULE:ATTRIBUTE")
@click.option("--target", "worker_target", default=None, help="Overrides the global --target.")
@click.pass_obj
def worker(app: App, spec: str, worker_target: str | None) -> None:
    """Runs a Worker until SIGINT or SIGTERM.

    MODULE:ATTRIBUTE names a Worker instance, or a callable that takes a Client (connected to
    --target) and returns a Worker. MODULE is imported with the current directory on sys.path.
    """
    found = _load_attribute(spec)
    worker_class = _worker_class()

    async def run(client: Client) -> None:
        runnable = await _as_worker(found, client, worker_class, spec)
        await runnable.run()

    app = replace(app, target=worker_target or app.target)
    app.run(run)


def _load_attribute(spec: str) -> object:
    hint = "'MODULE:ATTRIBUTE'"
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise click.BadParameter(f"{spec!r} is not module:attribute", param_hint=hint)
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        found: object = importlib.import_module(module_name)
    except ImportError as err:
        raise click.BadParameter(f"cannot import {module_name!r}: {err}", param_hint=hint) from None
    for part in attribute.split("."):
        if not hasattr(found, part):
            message = f"module {module_name!r} has no attribute {attribute!r}"
            raise click.BadParameter(message, param_hint=hint)
        found = getattr(found, part)
    return found


def _worker_class() -> type[Any]:
    # Imported here, so that the other commands work without the worker runtime's imports.
    try:
        module = importlib.import_module("taskbroker._worker")
    except ImportError as err:
        raise click.ClickException(f"the worker runtime is not available: {err}") from None
    worker_class: type[Any] = module.Worker
    return worker_class


async def _as_worker(
    found: object, client: Client, worker_class: type[Any], spec: str
) -> _Runnable:
    if isinstance(found, worker_class):
        return cast(_Runnable, found)
    if not callable(found):
        raise click.BadParameter(
            f"{spec} is of type {type(found).__name__}: not a Worker, nor a callable returning one",
            param_hint="'MODULE:ATTRIBUTE'",
        )
    made = found(client)
    if inspect.isawaitable(made):
        made = await made
    if not isinstance(made, worker_class):
        message = f"{spec}(client) returned an object of type {type(made).__name__}, not a Worker"
        raise click.BadParameter(message, param_hint="'MODULE:ATTRIBUTE'")
    return cast(_Runnable, made)


def main() -> None:
    """The `taskbroker` console script."""
    cli(prog_name="taskbroker")


if __name__ == "__main__":
    main()
