"""Child cgroups on a real cgroup v2 memory hierarchy: the VM lane's guest.

The guest (``tests/vm/``) mounts a pure cgroup v2 hierarchy with every
controller enabled in the root's ``subtree_control`` and runs these tests in
the root cgroup, so the children made here are memory cgroups of their own.
The hierarchy is found from mountinfo and checked with statfs, as the warden
itself does. Children are made under this process's own cgroup, each with a
``memory.max`` of at most 1 GiB, and removed afterwards with everything the
test started in them; every wait is bounded.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable

from oomwarden.sandbox import ChildMemcg, V2Factory, own_v2_cgroup_dir
from oomwarden.sources.parse import parse_flat_keyed

from kernelenv import need

MiB = 1024 * 1024


def events(cg: ChildMemcg, name: str = "memory.events") -> dict[str, int]:
    return parse_flat_keyed((cg.path / name).read_bytes(), name)


def wait_until(what: str, check: Callable[[], bool], timeout: float = 30.0) -> None:
    """Poll ``check()`` every 50 ms until it is true; AssertionError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError(f"{what}: not within {timeout:g} s")


class KernelLog:
    """The kernel's messages from the moment this is made (``/dev/kmsg``):
    which processes its OOM killer killed, in order. The guest is the test's
    own machine, so its whole log is the test's to read."""

    KILLED = re.compile(r"Killed process (\d+) ")

    def __init__(self) -> None:
        self.fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
        os.lseek(self.fd, 0, os.SEEK_END)
        self.seen: list[str] = []

    def lines(self) -> list[str]:
        """Every message since this was made (at most 100 000 read per call)."""
        for _ in range(100_000):
            try:
                record = os.read(self.fd, 8192)
            except BlockingIOError:
                break
            except BrokenPipeError:  # overwritten before it was read: go on
                continue
            self.seen.append(record.decode("utf-8", "replace").split(";", 1)[-1].rstrip())
        return list(self.seen)

    def killed(self) -> list[int]:
        """The pids the OOM killer killed, in its order."""
        return [int(m.group(1)) for line in self.lines() if (m := self.KILLED.search(line))]

    def close(self) -> None:
        os.close(self.fd)


def alive(pid: int) -> bool:
    """True while ``pid`` exists and is no zombie (only for processes the test started)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in (b"Z", b"X")


def page_size() -> int:
    return os.sysconf("SC_PAGE_SIZE")


__all__ = ["KernelLog", "MiB", "V2Factory", "alive", "events", "need", "own_v2_cgroup_dir",
           "page_size", "wait_until"]
