"""Reading an operator's small text file (a config, a rules file) safely.

Opened without blocking (a FIFO cannot hang the load), only a regular file,
at most ``max_bytes`` (a typo pointing at a log or a device is not read
without end), UTF-8. Every failure is one line naming the file, raised as the
caller's own error class.
"""

from __future__ import annotations

import os
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
