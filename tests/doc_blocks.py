"""The commands of a Markdown document's fenced blocks, as written, for the tests that run the docs."""
from __future__ import annotations

from pathlib import Path

FENCE = "```"


def fenced_blocks(text: str) -> list[str]:
    """The text of every fenced code block of a Markdown ``text``, in order (fence lines and language dropped)."""
    return [block.split("\n", 1)[1] if "\n" in block else "" for block in text.split(FENCE)[1::2]]


def block_after(doc: Path, after: str) -> str:
    """The first fenced block of the document ``doc`` after the first occurrence of the text ``after``."""
    text = doc.read_text()
    return fenced_blocks(text[text.index(after):])[0]


def commands(block: str) -> list[str]:
    """The shell commands of a block, each as written: ``# comments`` dropped, a line ending inside a quoted string
    or with a backslash continued on the next line (joined by a newline), blank lines skipped."""
    found: list[str] = []
    pending = ""
    quote = ""
    for line in block.splitlines():
        kept, quote = _without_comment(line, quote)
        pending = f"{pending}\n{kept}" if pending else kept
        if quote or pending.endswith("\\"):
            pending = pending.removesuffix("\\")
            continue
        if pending.strip():
            found.append(pending.strip())
        pending = ""
    if pending.strip():
        found.append(pending.strip())
    return found


def _without_comment(line: str, quote: str) -> tuple[str, str]:
    """``line`` up to an unquoted ``#`` that starts a word, and the quote still open at its end (``quote``: the
    one open at its start)."""
    for i, char in enumerate(line):
        if quote:
            if char == quote:
                quote = ""
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip(), quote
    return line.rstrip(), quote
