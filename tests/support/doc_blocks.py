"""DocBlock: the fenced code blocks of a Markdown page, with the marks that say how to run them.

A block is run by its fence's language: ```python as a program, ```sh (or bash, shell) through
bash. ```text is never run. Any other language must be marked `<!-- not run: reason -->`.
HTML comments on the lines right before a fence mark the block:

- `<!-- not run: reason -->`: not run, and the reason is required;
- `<!-- file: examples/x.py -->`: the block is that file's text, character for character;
- `<!-- background -->`: a worker, started and left running while the page's later blocks run
  (they go on once its Lease stream is open), then stopped with SIGINT: it must exit 0;
- `<!-- expect: words -->`: its output must contain these words;
- `<!-- free ports: 50443 50444 -->`: the block's own example ports, each replaced by a free
  port when it runs (fixed ports may be taken on a shared machine, even by a client's
  ephemeral source port).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

RUN_AS: Final = {"python": "python", "sh": "bash", "bash": "bash", "shell": "bash"}
NEVER_RUN: Final = frozenset({"text"})

_FENCE: Final = re.compile(r"^```([\w+-]*)[^\n]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
_MARK: Final = re.compile(r"<!--\s*([\w ]+?)\s*(?::\s*(.*?))?\s*-->")


@dataclass(frozen=True)
class DocBlock:
    """One fenced code block of a page."""

    page: Path
    line: int  # of the opening fence, from 1
    language: str
    code: str
    marks: dict[str, str] = field(default_factory=dict)

    @property
    def where(self) -> str:
        return f"{self.page.name}:{self.line}"

    @property
    def runner(self) -> str | None:
        """ "python" or "bash" for a block that runs; None for one that does not."""
        if "not run" in self.marks or self.language in NEVER_RUN:
            return None
        return RUN_AS.get(self.language)

    def problem(self) -> str | None:
        """Why the block is neither run nor properly marked; None when it is fine."""
        if "not run" in self.marks and not self.marks["not run"]:
            return f"{self.where}: `<!-- not run: ... -->` needs a reason"
        if self.runner is None and "not run" not in self.marks and self.language not in NEVER_RUN:
            return (
                f"{self.where}: a ```{self.language} block is neither run nor marked; "
                "use ```python, ```sh or ```text, or put `<!-- not run: reason -->` before it"
            )
        unknown = set(self.marks) - {"not run", "file", "background", "expect", "free ports"}
        if unknown:
            return f"{self.where}: unknown marks {sorted(unknown)}"
        return None


def _marks_before(lines: list[str], index: int) -> dict[str, str]:
    """The marks in the HTML comments on the lines just before line `index` (0-based)."""
    marks: dict[str, str] = {}
    while index > 0 and lines[index - 1].strip().startswith("<!--"):
        index -= 1
        for name, value in _MARK.findall(lines[index]):
            marks[name.strip()] = value.strip()
    return marks


def doc_blocks(page: Path) -> list[DocBlock]:
    """The page's fenced code blocks, in order."""
    text = page.read_text()
    lines = text.splitlines()
    blocks = []
    for match in _FENCE.finditer(text):
        index = text.count("\n", 0, match.start())
        blocks.append(DocBlock(page, index + 1, match[1], match[2], _marks_before(lines, index)))
    return blocks
