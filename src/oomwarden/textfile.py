"""Reading an operator's small text file (a config, a rules file) safely.

Opened without blocking (a FIFO cannot hang the load), only a regular file,
at most ``max_bytes`` (a typo pointing at a log or a device is not read
without end), UTF-8. Every failure is one line naming the file, raised as the
caller's own error class.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Callable

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
