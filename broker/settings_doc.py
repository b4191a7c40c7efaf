"""Settings described for people: each field's flag, variable, default and `#:` sentence, for
--help and for the configuration table in docs/configuration.md.

The `#:` comment above a field in broker/config.py is its only description, so the help text, the
table and the code cannot drift apart (tests/test_settings_doc.py compares the Markdown files).
"""

from __future__ import annotations

import inspect
import re
from dataclasses import MISSING, Field, fields
from typing import Any, Final

MIB: Final = 1024 * 1024

_FIELD_LINE = re.compile(r"^\s+(\w+)\s*:")


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def env_name(name: str) -> str:
    return "TASKBROKER_" + name.upper()


def field_docs(cls: type) -> dict[str, str]:
    """Each field's `#:` comment lines, joined into one line of text."""
    docs: dict[str, str] = {}
    pending: list[str] = []
    for line in inspect.getsource(cls).splitlines():
        text = line.strip()
        if text.startswith("#:"):
            pending.append(text[2:].strip())
            continue
        match = _FIELD_LINE.match(line)
        if match and pending:
            docs[match.group(1)] = " ".join(pending)
        pending = []
    return docs


def default_text(value: Any) -> str:
    """A default as one would type it (a bool as its variable takes it)."""
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, int) and value and value % MIB == 0:
        return f"{value} ({value // MIB} MiB)"
    if value == "":
        return '"" (empty)'
    return str(value)


def default_of(f: Field[Any]) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    raise ValueError(f"setting {f.name} has no default")


def help_text(cls: type, f: Field[Any]) -> str:
    """The --help text of one field: its sentence, variable and default (% escaped for argparse)."""
    doc = field_docs(cls).get(f.name, "")
    text = f"{doc} Env {env_name(f.name)}; default: {default_text(default_of(f))}."
    return text.replace("%", "%%")


def markdown_table(cls: type) -> str:
    """Every field as a row: flag, environment variable, default, meaning."""
    docs = field_docs(cls)
    rows = [
        "| Flag | Environment variable | Default | Meaning |",
        "| --- | --- | --- | --- |",
    ]
    for f in fields(cls):
        default = default_text(default_of(f))
        shown = default if default == "unset" else f"`{default}`"
        meaning = docs.get(f.name, "").replace("|", "\\|")
        rows.append(f"| `{flag_name(f.name)}` | `{env_name(f.name)}` | {shown} | {meaning} |")
    return "\n".join(rows) + "\n"
