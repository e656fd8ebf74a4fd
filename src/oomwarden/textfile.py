"""An operator's small TOML file (a config, a rules file, a scenario): read
safely, checked, and its errors told in one line with the line of the key at
fault (:class:`TomlChecker` is what every file's checker starts from).

Opened without blocking (a FIFO cannot hang the load), only a regular file,
at most ``max_bytes`` (a typo pointing at a log or a device is not read
without end), UTF-8. Every failure is one line naming the file, raised as the
caller's own error class.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import stat
from collections.abc import Callable
from typing import NoReturn

from oomwarden.errors import OomwardenError


def read_text_file(
    path: str,
    *,
    what: str,
    max_bytes: int,
    error: type[OomwardenError],
    where: str | None = None,
    check: Callable[[os.stat_result], None] | None = None,
) -> str:
    """The file's text. ``what`` names it ("rules file"), ``where`` is how the
    path is shown, ``check`` may refuse it from its fstat (ownership, mode)."""
    shown = where or path
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise error(f"{what} {shown} does not exist") from None
    except OSError as e:
        raise error(f"{what} {shown} cannot be read: {e.strerror or e}") from None
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise error(f"{what} {shown} is a directory, not a file")
        if not stat.S_ISREG(info.st_mode):
            raise error(f"{what} {shown} is not a regular file")
        if check is not None:
            check(info)
        if info.st_size > max_bytes:
            raise error(f"{what} {shown} is {info.st_size} bytes, more than {max_bytes} "
                        f"(is it really a {what}?)")
        raw = os.read(fd, max_bytes + 1)
        if len(raw) > max_bytes:
            raise error(f"{what} {shown} is larger than {max_bytes} bytes")
    except OSError as e:
        raise error(f"{what} {shown} cannot be read: {e.strerror or e}") from None
    finally:
        os.close(fd)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise error(f"{shown}:{line}: not UTF-8 text (a TOML file is UTF-8)") from None


_POSITION = re.compile(r"\s*\((?:at line (\d+), column \d+|at end of document)\)\s*$")


def one_line(message: str) -> str:
    """Non-printable characters escaped (line breaks among them, ``\\x85``
    and ``\\u2028`` too): an error is always one line."""
    if message.isprintable():
        return message
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in message)


def toml_error_message(message: str, text: str, source: str) -> str:
    """tomllib's message as ``file:line: key: invalid TOML: ...`` (the key on
    that line, if any)."""
    m = _POSITION.search(message)
    lines = text.splitlines()
    line = int(m.group(1)) if m and m.group(1) else max(1, len(lines))
    what = _POSITION.sub("", message)
    what = what[:1].lower() + what[1:]
    key = key_on_line(lines[line - 1] if 0 < line <= len(lines) else "")
    where = f"{key}: " if key else ""
    return one_line(f"{source}:{line}: {where}invalid TOML: {what}")


def key_on_line(line: str) -> str:
    """The TOML key (or table header) a line sets, or ""."""
    s = line.strip()
    if s.startswith("#"):
        return ""
    if s.startswith("["):
        return s.strip("[] \t").split("]")[0].strip()
    head, eq, _ = s.partition("=")
    if eq and head.strip():
        return re.sub(r"\s*\.\s*", ".", head.strip())
    return ""


def printable(text: str) -> str:
    """A path or name as one printable line (its repr, unquoted, if it has
    a non-printable character)."""
    return text if text.isprintable() else repr(text)[1:-1]


def num_text(value: float) -> str:
    """0 -> ``0``, 0.1 -> ``0.1``, 600.0 -> ``600``, nan -> ``nan``."""
    if isinstance(value, float):
        if math.isfinite(value) and value.is_integer() and abs(value) < 1e15:
            return str(int(value))
        return repr(value)
    return str(value)


def type_name(value: object) -> str:
    """A parsed TOML value's type, with the value where short, for "expected
    ..., got ..." errors."""
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, int):
        return f"an integer ({value})"
    if isinstance(value, float):
        return f"a float ({value})"
    if isinstance(value, str):
        return f"a string ({value!r})"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a table"
    return f"a {type(value).__name__}"


# -- where keys are: line numbers from the raw text ---------------------------------------


KeyPath = tuple[str | int, ...]
_BARE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")


class KeyLines:
    """Line numbers of the tables and keys of a TOML text that ``tomllib`` has
    accepted (``tomllib`` keeps none). Paths are tuples of key names with an
    array-of-tables index after its name: ``("rule", 2, "match", "exe")`` is
    ``match.exe`` of the third ``[[rule]]``, written as a dotted key, inside a
    ``[rule.match]`` table or in an inline table."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.lines: dict[KeyPath, int] = {}
        self.counts: dict[KeyPath, int] = {}
        self.pos = 0
        self.line_no = 1
        # A best effort: what was found before a surprise still names lines.
        with contextlib.suppress(IndexError, ValueError):
            self._scan()

    def line(self, path: KeyPath) -> int:
        """The line of ``path``, else of its nearest ancestor found, else 1."""
        for n in range(len(path), 0, -1):
            found = self.lines.get(path[:n])
            if found is not None:
                return found
        return 1

    # the scanner: statements are headers or key = value; values are skipped
    def _scan(self) -> None:
        table: KeyPath = ()
        while True:
            self._skip_space()
            if self.pos >= len(self.text):
                return
            if self.text[self.pos] == "[":
                table = self._header()
            else:
                path = (*table, *self._assignment())
                self._record(path)
                self._value(path)

    def _assignment(self) -> list[str]:
        """``key =``: the key's parts, the position after the ``=``."""
        parts = self._key()
        self._skip_blank()
        if self.text[self.pos] != "=":
            raise ValueError("expected =")
        self.pos += 1
        return parts

    def _record(self, path: KeyPath) -> None:
        for n in range(1, len(path) + 1):
            self.lines.setdefault(path[:n], self.line_no)

    def _resolve(self, parts: list[str]) -> list[str | int]:
        out: list[str | int] = []
        for p in parts:
            out.append(p)
            count = self.counts.get(tuple(out))
            if count:
                out.append(count - 1)
        return out

    def _header(self) -> KeyPath:
        array = self.text.startswith("[[", self.pos)
        self.pos += 2 if array else 1
        parts = self._key()
        self._skip_blank()
        self.pos += 2 if array else 1
        if array:
            key = (*self._resolve(parts[:-1]), parts[-1])
            index = self.counts.get(key, 0)
            self.counts[key] = index + 1
            path: KeyPath = (*key, index)
        else:
            path = tuple(self._resolve(parts))
        self._record(path)
        return path

    def _skip_blank(self) -> None:
        while self.text[self.pos] in " \t":
            self.pos += 1

    def _skip_space(self) -> None:
        """Whitespace, newlines and comments, up to the end of the text."""
        text = self.text
        while self.pos < len(text):
            c = text[self.pos]
            if c == "\n":
                self.line_no += 1
                self.pos += 1
            elif c in " \t\r":
                self.pos += 1
            elif c == "#":
                end = text.find("\n", self.pos)
                self.pos = len(text) if end < 0 else end
            else:
                return

    def _key(self) -> list[str]:
        text = self.text
        parts: list[str] = []
        while True:
            self._skip_blank()
            c = text[self.pos]
            if c in "\"'":
                start = self.pos
                self._string()
                raw = text[start + 1: self.pos - 1]
                parts.append(raw.encode().decode("unicode_escape") if c == '"' and "\\" in raw
                             else raw)
            else:
                start = self.pos
                while text[self.pos] in _BARE:
                    self.pos += 1
                if self.pos == start:
                    raise ValueError("expected a key")
                parts.append(text[start: self.pos])
            self._skip_blank()
            if text[self.pos] != ".":
                return parts
            self.pos += 1

    def _string(self) -> None:
        """Skip a string starting at pos (any of the four kinds)."""
        text = self.text
        for quote in ('"""', "'''"):
            if text.startswith(quote, self.pos):
                j = self.pos + 3
                while not text.startswith(quote, j):
                    if text[j] == "\\" and quote == '"""':
                        j += 1
                    if text[j] == "\n":
                        self.line_no += 1
                    j += 1
                j += 3
                extra = 0  # up to two quotes may close the content: """a""""
                while extra < 2 and j < len(text) and text[j] == quote[0]:
                    j += 1
                    extra += 1
                self.pos = j
                return
        quote = text[self.pos]
        j = self.pos + 1
        while text[j] != quote:
            if text[j] == "\n":
                raise ValueError("newline in a string")
            j += 2 if text[j] == "\\" and quote == '"' else 1
        self.pos = j + 1

    def _value(self, path: KeyPath | None) -> None:
        """Skip a value; keys of an inline table under ``path`` are recorded."""
        text = self.text
        self._skip_blank()
        c = text[self.pos]
        if c in "\"'":
            self._string()
        elif c in "[{":
            self.pos += 1
            close = "]" if c == "[" else "}"
            while True:
                self._skip_space()
                c = text[self.pos]
                if c == close:
                    self.pos += 1
                    return
                if c == ",":
                    self.pos += 1
                elif close == "]":
                    self._value(None)
                else:
                    parts = self._assignment()
                    sub = None if path is None else (*path, *parts)
                    if sub is not None:
                        self._record(sub)
                    self._value(sub)
        else:
            start = self.pos
            while self.pos < len(text) and text[self.pos] not in ",]}#\n":
                self.pos += 1
            if self.pos == start:
                raise ValueError("expected a value")


# -- checking a parsed file ----------------------------------------------------------------


class TomlChecker:
    """What checking a parsed TOML file needs everywhere: an error that names
    the file and the line of the key at fault, and numbers within bounds.
    A subclass sets ``error``, its own error class."""

    error: type[OomwardenError] = OomwardenError

    def __init__(self, source: str, text: str) -> None:
        self.source = source
        self.lines = KeyLines(text)

    def fail(self, path: KeyPath, message: str) -> NoReturn:
        """Raise the one-line error for the key at ``path`` (its label is the
        start of ``message``)."""
        raise self.error(one_line(f"{self.source}:{self.lines.line(path)}: {message}"))

    def number(self, path: KeyPath, label: str, value: object, bounds: tuple[float, float],
               integer: bool = False) -> float:
        """``value`` as given (an int stays an int), if it is a number (a whole
        one with ``integer``) within ``bounds``."""
        lo, hi = bounds
        if isinstance(value, bool) or not isinstance(value, int | float) or (
                integer and not isinstance(value, int)):
            kind = "a whole number" if integer else "a number"
            self.fail(path, f"{label}: expected {kind}, got {type_name(value)}")
        if not lo <= value <= hi:  # NaN too
            self.fail(path, f"{label}: {num_text(value)} is outside {num_text(lo)}.."
                      f"{num_text(hi)}")
        return value
