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

import contextlib
import os
import re
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from oomwarden.model import HierarchyKind
from oomwarden.sandbox import MAX_LIMIT, ChildMemcg
from oomwarden.sources.cgroupfs import find_hierarchies
from oomwarden.sources.fsmagic import is_cgroup_fs
from oomwarden.sources.parse import parse_flat_keyed, parse_proc_cgroup

MiB = 1024 * 1024
REQUIRE_KERNEL = os.environ.get("OOMWARDEN_REQUIRE_KERNEL") == "1"
#: How long a cleanup waits for a cgroup to empty before giving up on it.
REMOVE_WAIT_S = 10.0


def need(condition: bool, why: str) -> None:
    """Skip a test whose capability is missing; fail instead under
    ``OOMWARDEN_REQUIRE_KERNEL=1`` (always set in the VM lane's guest)."""
    if condition:
        return
    if REQUIRE_KERNEL:
        pytest.fail(f"OOMWARDEN_REQUIRE_KERNEL=1 but {why}")
    pytest.skip(why)


def own_v2_cgroup_dir() -> tuple[Path | None, str]:
    """This process's own cgroup on a verified v2 hierarchy with the memory
    controller available to its children, or (None, why)."""
    v2 = [h for h in find_hierarchies() if h.kind is HierarchyKind.V2]
    if not v2:
        return None, "no cgroup2 hierarchy is mounted"
    h = v2[0]
    if not h.verified:
        return None, f"{h.mount_point} is not a cgroup2 filesystem"
    if not h.has_memory:
        return None, f"the cgroup2 hierarchy at {h.mount_point} has no memory controller"
    _, unified = parse_proc_cgroup(Path("/proc/self/cgroup").read_bytes())
    if unified is None:
        return None, "this process is in no cgroup2 cgroup"
    rel = unified[len(h.root):] if h.root != "/" and unified.startswith(h.root) else unified
    path = Path(h.mount_point) / rel.lstrip("/")
    if not is_cgroup_fs(path, v2=True):
        return None, f"own cgroup {path} is not a cgroup2 directory"
    if "memory" not in (path / "cgroup.subtree_control").read_text().split():
        return None, f"the memory controller is not enabled for the children of {path}"
    return path, ""


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


class V2Factory:
    """Makes child cgroups under ``parent`` and removes them afterwards."""

    def __init__(self, parent: Path, prefix: str = "oomwarden-v2") -> None:
        self.parent = parent
        self.mount = Path(next(h.mount_point for h in find_hierarchies()
                               if h.kind is HierarchyKind.V2))
        self.prefix = prefix
        self.children: list[ChildMemcg] = []
        self.sleepers: list[subprocess.Popen[bytes]] = []

    def create(self, max_bytes: int | None = None, *, oom_group: bool = False,
               inside: ChildMemcg | None = None) -> ChildMemcg:
        """A child cgroup (of ``inside``, else of the parent) with this
        ``memory.max`` (required at the top level, at most 1 GiB)."""
        if inside is None and (max_bytes is None or not 0 < max_bytes <= MAX_LIMIT):
            raise ValueError(f"a top-level child needs a memory.max in 1..{MAX_LIMIT}")
        base = self.parent if inside is None else inside.path
        path = base / f"{self.prefix}-{uuid.uuid4().hex[:12]}"
        path.mkdir()
        child = ChildMemcg(path, "/" + str(path.relative_to(self.mount)))
        self.children.append(child)
        if max_bytes is not None:
            child.write("memory.max", str(max_bytes))
            if int(child.read("memory.max")) != max_bytes:
                raise RuntimeError(f"memory.max on {path} did not take")
        if oom_group:
            child.write("memory.oom.group", "1")
        return child

    def start_sleeper(self, cg: ChildMemcg, adj: int = 0) -> subprocess.Popen[bytes]:
        """A ``sleep`` moved into ``cg`` (and given this oom_score_adj)."""
        proc = subprocess.Popen(["sleep", "120"], stdin=subprocess.DEVNULL)
        self.sleepers.append(proc)
        cg.write("cgroup.procs", str(proc.pid))
        if adj:
            Path(f"/proc/{proc.pid}/oom_score_adj").write_text(str(adj))
        return proc

    def cleanup(self) -> None:
        """Kill what was started here, empty and remove every child (deepest
        first); RuntimeError naming what could not be removed."""
        procs = [h.proc for c in self.children for h in c.hogs] + self.sleepers
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
            for stream in (proc.stdin, proc.stdout):
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()
        left: list[str] = []
        for child in sorted(self.children, key=lambda c: -len(c.path.parts)):
            with contextlib.suppress(OSError):
                if child.read("cgroup.procs").strip():
                    child.write("cgroup.kill", "1")  # only ever a cgroup made here
            deadline = time.monotonic() + REMOVE_WAIT_S
            while True:
                try:
                    child.path.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError as e:
                    if time.monotonic() > deadline:
                        left.append(f"{child.path} ({e.strerror})")
                        break
                    time.sleep(0.05)
        self.children.clear()
        self.sleepers.clear()
        if left:
            raise RuntimeError(f"could not remove child cgroups: {', '.join(left)}")


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
