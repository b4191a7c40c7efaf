"""Every setting is described where people look: --help gives each flag a sentence, its variable
and its default, and every Markdown table of settings matches the settings exactly."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from broker.config import Settings, load_settings
from broker.settings_doc import default_of, default_text, field_docs, markdown_table
from tests.support.broker_process import BrokerProcess

ROOT = Path(__file__).resolve().parent.parent
START = "<!-- settings-table:start -->"
END = "<!-- settings-table:end -->"


def _words(text: str) -> str:
    return " ".join(text.split())


def test_every_setting_has_a_sentence() -> None:
    docs = field_docs(Settings)
    missing = [f.name for f in fields(Settings) if not docs.get(f.name)]
    assert not missing, f"give these Settings fields a #: comment: {missing}"
    assert all(doc.endswith(".") for doc in docs.values())


def test_help_gives_every_flag_its_sentence_variable_and_default(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        load_settings(["--help"], environ={})
    assert exit_info.value.code == 0
    shown = _words(capsys.readouterr().out)
    docs = field_docs(Settings)
    for f in fields(Settings):
        flag = "--" + f.name.replace("_", "-")
        env = "TASKBROKER_" + f.name.upper()
        default = default_text(default_of(f))
        described = _words(f"{docs[f.name]} Env {env}; default: {default}.")
        assert flag in shown and described in shown, f"{flag}: {described!r} not in --help"


def _tables(root: Path) -> dict[Path, str]:
    """The settings table of every Markdown file in the repository root and docs/ that has one."""
    found = {}
    for path in sorted(root.glob("*.md")) + sorted((root / "docs").glob("*.md")):
        text = path.read_text()
        if START in text:
            assert END in text.split(START, 1)[1], f"{path}: {START} without {END}"
            found[path] = text.split(START, 1)[1].split(END, 1)[0].strip("\n") + "\n"
    return found


def test_every_markdown_settings_table_matches_the_settings() -> None:
    tables = _tables(ROOT)
    assert ROOT / "docs" / "configuration.md" in tables
    expected = markdown_table(Settings)
    stale = [str(path.relative_to(ROOT)) for path, table in tables.items() if table != expected]
    assert not stale, f"regenerate with `python -m broker --settings-table`: {stale}"


def test_the_table_has_a_row_per_setting_and_the_command_prints_it() -> None:
    table = markdown_table(Settings)
    rows = table.splitlines()[2:]
    assert [row.split("`")[1] for row in rows] == [
        "--" + f.name.replace("_", "-") for f in fields(Settings)
    ]
    printed = subprocess.run(
        [sys.executable, "-m", "broker", "--settings-table"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert printed.stdout == table


def test_an_old_or_misspelt_variable_is_named_in_a_warning(tmp_path: Path) -> None:
    env = {
        "TASKBROKER_MAX_PAYLOAD_BYTES": "2048",
        "TASKBROKER_REAP_INTERVAL": "0.1",
        "TASKBROKER_TARGET": "127.0.0.1:50051",  # the SDK's, often exported in the same shell
        "TASKBROKER_REDIS_URL_FILE": str(tmp_path / "missing"),  # then exit at once
    }
    broker = BrokerProcess(tmp_path / "data", env)
    assert broker.exit_code() == 2
    log = broker.log.read_text()
    assert (
        "TASKBROKER_MAX_PAYLOAD_BYTES is not a broker setting and is ignored "
        "(renamed TASKBROKER_MAX_TASK_BYTES)"
    ) in log
    assert "TASKBROKER_REAP_INTERVAL is not a broker setting" in log
    assert "TASKBROKER_TARGET" not in log
