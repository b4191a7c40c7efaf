"""What every `taskbroker` command shares: the option types (durations, payloads, headers)
and `App`, which holds the global options, runs a command's work with a Client and reports
SDK errors (exit 1). The commands themselves are in cli.py and _cli_schedule.py."""

from __future__ import annotations

import asyncio
import json
import re
import sys
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Final, NoReturn, TypeVar, cast

import click
from rich.console import Console, RenderableType
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from taskbroker._channel import ChannelConfigError, TlsConfig
from taskbroker._client import Client
from taskbroker._errors import TaskbrokerError, UnavailableError
from taskbroker.codec import json_payload

T = TypeVar("T")

#: How duration options are written, for their help texts.
DURATION_FORMAT: Final = "250ms, 30s, 5m, 2h, 1d, sums such as 1h30m, or plain seconds"

# --- option types ---------------------------------------------------------------------------

_UNIT_SECONDS: Final = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION_PART: Final = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_DURATION: Final = re.compile(rf"(?:{_DURATION_PART.pattern})+")
_NUMBER: Final = re.compile(r"\d+(?:\.\d+)?")


def parse_duration(text: str) -> timedelta:
    """Parses `250ms`, `30s`, `5m`, `2h`, `1d`, sums such as `1h30m`, or plain seconds (`1.5`).

    Raises:
        ValueError: The text is none of these, or too large for a timedelta.
    """
    text = text.strip()
    if _NUMBER.fullmatch(text):
        seconds = float(text)
    elif _DURATION.fullmatch(text):
        seconds = sum(float(n) * _UNIT_SECONDS[unit] for n, unit in _DURATION_PART.findall(text))
    else:
        raise ValueError(f"{text!r} is not a duration such as 250ms, 30s, 5m, 2h or 1d")
    try:
        return timedelta(seconds=seconds)
    except OverflowError:
        raise ValueError(f"{text!r} is too long a duration") from None


class DurationType(click.ParamType[timedelta]):
    """A duration option: `250ms`, `30s`, `5m`, `2h`, `1d`, or plain seconds."""

    name = "duration"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> timedelta:
        if isinstance(value, timedelta):
            return value
        try:
            return parse_duration(str(value))
        except ValueError as err:
            self.fail(str(err), param, ctx)


class PayloadType(click.ParamType[bytes]):
    """A payload: a JSON value (encoded with taskbroker.codec), or `@path` for a file's bytes."""

    name = "json|@file"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> bytes:
        if isinstance(value, bytes):
            return value
        text = str(value)
        if text.startswith("@"):
            try:
                with open(text[1:], "rb") as file:
                    return file.read()
            except OSError as err:
                self.fail(f"cannot read {text[1:]!r}: {err.strerror}", param, ctx)
        try:
            return json_payload(json.loads(text))
        except ValueError as err:
            self.fail(f"not JSON ({err}); give @path to send a file's bytes", param, ctx)


class HeaderType(click.ParamType[tuple[str, str]]):
    """A `key=value` header."""

    name = "key=value"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> tuple[str, str]:
        if isinstance(value, tuple):
            return cast(tuple[str, str], value)
        key, sep, val = str(value).partition("=")
        if not sep or not key:
            self.fail(f"{value!r} is not key=value", param, ctx)
        return key, val


DURATION: Final = DurationType()

# --- the application object -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class App:
    """The global options and the consoles every command writes to."""

    target: str
    json: bool
    timeout: float
    out: Console
    err: Console
    tls: TlsConfig | None = None
    token: str | None = field(default=None, repr=False)
    token_file: str | None = None

    @property
    def interactive(self) -> bool:
        """True when progress bars and live displays are wanted: a terminal, not --json."""
        return not self.json and self.err.is_terminal

    def run(self, work: Callable[[Client], Awaitable[T]]) -> T:
        """Runs `work` with a connected Client; an SDK error ends the command (exit 1)."""

        try:
            client = Client(
                self.target,
                timeout=self.timeout,
                tls=self.tls,
                token=self.token,
                token_file=self.token_file,
            )
        except ChannelConfigError as err:  # names a file, never a token
            self.refuse(str(err))

        async def with_client() -> T:
            async with client:
                return await work(client)

        try:
            return asyncio.run(with_client())
        except TaskbrokerError as err:
            self.fail(err)

    def fail(self, err: TaskbrokerError) -> NoReturn:
        """Reports an SDK error on stderr and exits 1."""
        message = str(err)
        if isinstance(err, UnavailableError):
            message = f"broker at {self.target} is unavailable: {message}"
        if self.json:
            doc = {"error": message, "code": err.code.name, "reason": err.reason}
            click.echo(json.dumps(doc), err=True)
        else:
            click.echo(f"error: {message}", err=True)
        sys.exit(1)

    def refuse(self, message: str) -> NoReturn:
        """Reports a request the command will not carry out on stderr and exits 1."""
        if self.json:
            click.echo(json.dumps({"error": message}), err=True)
        else:
            click.echo(f"error: {message}", err=True)
        sys.exit(1)

    def emit(self, doc: object) -> None:
        """Writes one JSON document to stdout."""
        click.echo(json.dumps(doc, ensure_ascii=False))

    def show(self, renderable: RenderableType) -> None:
        self.out.print(renderable)

    @contextmanager
    def progress(
        self, description: str, total: int | None, *, enabled: bool = True
    ) -> Iterator[Callable[[int], None]]:
        """A progress bar on stderr when enabled and interactive; yields `advance(n)` (a no-op
        without a bar).

        With total None the bar pulses: the work is one call whose progress cannot be seen.
        """
        if not (enabled and self.interactive):
            yield lambda n: None
            return
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
        with Progress(*columns, TimeElapsedColumn(), console=self.err, transient=True) as bar:
            task = bar.add_task(description, total=total)
            yield lambda n: bar.advance(task, n)
