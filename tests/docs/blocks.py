"""The fenced code blocks of README.md and docs/*.md, with what each one's marker says to do.

A block's marker is an HTML comment on the line right before its fence:

- ``<!-- run: script [redis] -->``: a Python program, run as it is (the default for an unmarked
  ``python`` block); ``redis`` gives it a redis-server in ``ZEAL_REDIS_URL``.
- ``<!-- run: app NAME -->``: a Python module defining ``app``, served by ``zeal-asgi run`` with
  two workers and exercised over HTTP/WebSocket by the probe registered under NAME.
- ``<!-- run: sh -->``: a shell command that must exit 0.
- ``<!-- run: server PATH [redis] -->``: a shell command that starts a server on port 8000 (a
  free port is put in its place and in ``ZEAL_PORT``); it must answer PATH with 200.
- ``<!-- no-run: REASON -->``: shown, never run; the reason is required.

A ``sh``/``bash`` block without a marker, or a fence without a language, is an error.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]

PYTHON = {"python", "py"}
SHELL = {"sh", "bash", "shell"}
DATA = {"text", "json", "toml", "yaml", "ini", "html", "javascript", "js", "css", "console"}

_FENCE = re.compile(r"^(?P<fence>```+)(?P<lang>[\w+-]*)\s*$")
_MARKER = re.compile(r"^<!--\s*(?P<kind>run|no-run):\s*(?P<args>.*?)\s*-->$")


@dataclass(frozen=True)
class Block:
    """One fenced block: where it is, its language, its marker and its code."""

    page: Path
    line: int
    lang: str
    kind: str  # "script", "app", "sh", "server", "no-run", "data"
    args: tuple[str, ...]
    code: str

    @property
    def id(self) -> str:
        """``docs/cache.md:12`` (the fence's line)."""
        return f"{self.page.relative_to(ROOT)}:{self.line}"


class MarkerError(ValueError):
    """A block whose marker is missing or malformed."""


def blocks(page: Path) -> list[Block]:
    """Every fenced block of ``page``, classified by its marker."""
    lines = page.read_text().splitlines()
    out: list[Block] = []
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if m is None:
            i += 1
            continue
        end = next(
            (j for j in range(i + 1, len(lines)) if lines[j].strip() == m.group("fence")), None
        )
        if end is None:
            raise MarkerError(f"{page.relative_to(ROOT)}:{i + 1}: fence never closed")
        prev = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        out.append(_classify(page, i + 1, m.group("lang"), prev.strip(), lines[i + 1 : end]))
        i = end + 1
    return out


def _classify(page: Path, line: int, lang: str, prev: str, body: list[str]) -> Block:
    where = f"{page.relative_to(ROOT)}:{line}"
    code = "\n".join(body) + "\n"
    marker = _MARKER.match(prev)
    if not lang:
        raise MarkerError(f"{where}: a fence needs a language (python, sh, text, ...)")
    if marker is not None and marker.group("kind") == "no-run":
        if not marker.group("args"):
            raise MarkerError(f"{where}: <!-- no-run: --> needs a reason")
        return Block(page, line, lang, "no-run", (marker.group("args"),), code)
    args = tuple(marker.group("args").split()) if marker is not None else ()
    if lang in DATA:
        if marker is not None:
            raise MarkerError(f"{where}: a {lang} block is not run; drop its marker")
        return Block(page, line, lang, "data", (), code)
    if lang in PYTHON:
        kind, rest = (args[0], args[1:]) if args else ("script", ())
        if kind == "script" and set(rest) <= {"redis"}:
            return Block(page, line, lang, kind, rest, code)
        if kind == "app" and len(rest) == 1:
            return Block(page, line, lang, kind, rest, code)
        raise MarkerError(f"{where}: python blocks are 'run: script [redis]' or 'run: app NAME'")
    if lang in SHELL:
        if not args:
            raise MarkerError(
                f"{where}: a shell block needs <!-- run: sh -->, <!-- run: server PATH -->"
                " or <!-- no-run: reason -->"
            )
        kind, rest = args[0], args[1:]
        if kind == "sh" and not rest:
            return Block(page, line, lang, kind, (), code)
        if kind == "server" and rest and rest[0].startswith("/") and set(rest[1:]) <= {"redis"}:
            return Block(page, line, lang, kind, rest, code)
        raise MarkerError(f"{where}: shell blocks are 'run: sh' or 'run: server PATH [redis]'")
    raise MarkerError(f"{where}: no rule for {lang!r} blocks")


def all_blocks() -> list[Block]:
    """Every block of every page (raises :class:`MarkerError` on a bad one)."""
    return [b for page in PAGES for b in blocks(page)]
