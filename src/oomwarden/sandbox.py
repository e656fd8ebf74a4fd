"""Confined child memory cgroups and memory hogs, for the demo and the real-kernel tests.

Safety rules enforced here: child cgroups are made only under this process's
own v1 memory cgroup, only after statfs shows the cgroup magic, always with a
limit of at most 1 GiB; they are removed afterwards; only processes the test
started are signalled; every wait is bounded.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from oomwarden.domains import mount_relative
from oomwarden.errors import OomwardenError
from oomwarden.model import HierarchyKind
from oomwarden.sources.cgroupfs import find_hierarchies
from oomwarden.sources.fsmagic import is_cgroup_fs
from oomwarden.sources.parse import parse_proc_cgroup

MAX_LIMIT = 1024 * 1024 * 1024
#: How long a cleanup waits for a cgroup to empty before giving up on it.
REMOVE_WAIT_S = 10.0


def own_v1_memcg_dir() -> tuple[Path | None, str]:
    """This process's own v1 memory cgroup directory, verified, or (None, why)."""
    try:
        hierarchies = find_hierarchies()
    except OomwardenError as e:
        return None, f"cannot read mountinfo: {e}"
    v1 = [h for h in hierarchies if h.kind is HierarchyKind.V1 and h.has_memory]
    if not v1:
        return None, "no cgroup v1 memory hierarchy is mounted"
    h = v1[0]
    if not h.verified:
        return None, f"{h.mount_point} is not a cgroup filesystem"
    memcg, _ = parse_proc_cgroup(Path("/proc/self/cgroup").read_bytes())
    if memcg is None:
        return None, "this process is in no v1 memory cgroup"
    path = Path(h.mount_point) / mount_relative(h.root, memcg)
    if not path.is_dir() or not is_cgroup_fs(path, v2=False):
        return None, f"own memory cgroup {path} is not a cgroup directory"
    if not os.access(path, os.W_OK):
        return None, f"cannot create cgroups in {path}"
    return path, ""


@dataclass
class Hog:
    proc: subprocess.Popen[bytes]
    size_mib: int
    adj: int

    @property
    def pid(self) -> int:
        return self.proc.pid


@dataclass
class ChildMemcg:
    path: Path
    hierarchy_path: str
    hogs: list[Hog] = field(default_factory=list)

    def write(self, name: str, value: str) -> None:
        (self.path / name).write_text(value)

    def read(self, name: str) -> str:
        return (self.path / name).read_text()

    def pids(self) -> list[int]:
        return [int(x) for x in self.read("cgroup.procs").split()]

    def _start(self, size: str, adj: int, *, ready_within: float | None,
               name: str | None = None) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            [sys.executable, "-m", "oomwarden._memhog", str(self.path / "cgroup.procs"),
             size, str(adj), *([name] if name else [])],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE if ready_within is not None else subprocess.DEVNULL,
        )
        if ready_within is not None:
            assert proc.stdout is not None
            ready, _, _ = select.select([proc.stdout], [], [], ready_within)
            line = proc.stdout.readline() if ready else b""
            if line.strip() != b"ready":
                _stop(proc)
                raise RuntimeError(f"memory hog {size!r} did not start: {line!r}")
        return proc

    def start_hog(self, size_mib: int, adj: int = 0, timeout: float = 60.0,
                  name: str | None = None) -> Hog:
        """Start a process in this cgroup that touches ``size_mib`` MiB and waits."""
        hog = Hog(self._start(str(size_mib), adj, ready_within=timeout, name=name),
                  size_mib, adj)
        self.hogs.append(hog)
        return hog

    def start_leaker(self, mib_per_s: float, name: str | None = None,
                     timeout: float = 60.0) -> Hog:
        """A process in this cgroup that grows by ``mib_per_s`` MiB per second
        until its cgroup's OOM (or 120 s)."""
        hog = Hog(self._start(f"leak:{mib_per_s:g}", 0, ready_within=timeout, name=name), -1, 0)
        self.hogs.append(hog)
        return hog

    def start_edge(self, past: int, adj: int = 0, timeout: float = 60.0) -> Hog:
        """A process whose status-counted badness is ``past`` pages beyond a
        step of the system oom_score (see :mod:`oomwarden._memhog`)."""
        hog = Hog(self._start(f"edge:{past}", adj, ready_within=timeout), -1, adj)
        self.hogs.append(hog)
        return hog

    def start_grower(self, size_mib: int, adj: int = 0) -> Hog:
        """A process in this cgroup that allocates ``size_mib`` MiB, running into
        the cgroup's limit on the way if the others leave too little room."""
        hog = Hog(self._start(f"grow:{size_mib}", adj, ready_within=None), size_mib, adj)
        self.hogs.append(hog)
        return hog


class MemcgFactory:
    def __init__(self, parent: Path, prefix: str = "oomwarden-test") -> None:
        self.parent = parent
        self.prefix = prefix
        self.children: list[ChildMemcg] = []

    def create(self, limit_bytes: int) -> ChildMemcg:
        if not 0 < limit_bytes <= MAX_LIMIT:
            raise ValueError(f"limit {limit_bytes} is outside 1..{MAX_LIMIT}")
        path = self.parent / f"{self.prefix}-{uuid.uuid4().hex[:12]}"
        path.mkdir()
        mount = _mount_of(path)
        child = ChildMemcg(path, "/" + str(path.relative_to(mount)))
        self.children.append(child)
        child.write("memory.limit_in_bytes", str(limit_bytes))
        if int(child.read("memory.limit_in_bytes")) > limit_bytes:
            raise RuntimeError(f"limit on {path} did not take")
        if (path / "memory.memsw.limit_in_bytes").exists():
            # memory + swap at the same limit: nothing in here can swap, so
            # the cgroup really runs out at its limit, swap or not.
            child.write("memory.memsw.limit_in_bytes", str(limit_bytes))
        return child

    def cleanup(self) -> None:
        """Stop every process started here and remove every child cgroup;
        raises RuntimeError naming any cgroup that could not be removed."""
        left: list[str] = []
        for child in self.children:
            for hog in child.hogs:
                _stop(hog.proc)
            with contextlib.suppress(OSError):
                # Let the kernel's killer act if anything is still paused in an OOM.
                child.write("memory.oom_control", "0")
            error = remove_cgroup_dir(child.path)
            if error is not None:
                left.append(f"{child.path} ({error.strerror})")
        self.children.clear()
        if left:
            raise RuntimeError(f"could not remove child cgroups: {', '.join(left)}")


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
    path = Path(h.mount_point) / mount_relative(h.root, unified)
    if not is_cgroup_fs(path, v2=True):
        return None, f"own cgroup {path} is not a cgroup2 directory"
    if "memory" not in (path / "cgroup.subtree_control").read_text().split():
        return None, f"the memory controller is not enabled for the children of {path}"
    return path, ""


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
        for proc in procs:  # all at once, then each reaped
            if proc.poll() is None:
                proc.kill()
        for proc in procs:
            _stop(proc)
        left: list[str] = []
        for child in sorted(self.children, key=lambda c: -len(c.path.parts)):
            with contextlib.suppress(OSError):
                if child.read("cgroup.procs").strip():
                    child.write("cgroup.kill", "1")  # only ever a cgroup made here
            error = remove_cgroup_dir(child.path)
            if error is not None:
                left.append(f"{child.path} ({error.strerror})")
        self.children.clear()
        self.sleepers.clear()
        if left:
            raise RuntimeError(f"could not remove child cgroups: {', '.join(left)}")


def remove_cgroup_dir(path: Path, timeout: float = REMOVE_WAIT_S) -> OSError | None:
    """rmdir a cgroup, retrying while it empties (its processes are still
    exiting), for at most ``timeout``. None once it is gone, else the last
    error."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            path.rmdir()
            return None
        except FileNotFoundError:
            return None
        except OSError as e:
            if time.monotonic() > deadline:
                return e
            time.sleep(0.05)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)
    for stream in (proc.stdin, proc.stdout):
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.close()


def _mount_of(path: Path) -> Path:
    for h in find_hierarchies():
        if h.kind is HierarchyKind.V1 and h.has_memory:
            return Path(h.mount_point)
    raise RuntimeError("no v1 memory hierarchy")


class LineNotSeen(AssertionError):
    """The warden exited, or the time ran out, before the line waited for."""


class WardenProcess:
    """``oomwarden run --config CONFIG`` as a subprocess, always to be
    stopped: its state file beside the config, no control socket unless
    ``extra`` names one (the last ``--socket`` wins). Its stderr goes to a
    file of its own beside the config: nothing can block the daemon on a
    full pipe, however much it logs, and no line can hide in a buffer."""

    def __init__(self, config: Path, *extra: str, stop_s: float = 10.0,
                 kill_s: float = 5.0) -> None:
        self.config = config
        self.state_file = config.parent / "paused.json"
        self.stop_s, self.kill_s = stop_s, kill_s
        fd, err = tempfile.mkstemp(prefix="warden-", suffix=".err", dir=config.parent)
        self.err = Path(err)
        self._seen = 0
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "oomwarden.cli", "run", "--config", str(config),
                 "--state-file", str(self.state_file), "--socket", "none", *extra],
                stdin=subprocess.DEVNULL, stderr=fd)
        finally:
            os.close(fd)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def text(self) -> str:
        """Everything the warden wrote to stderr so far."""
        return self.err.read_bytes().decode(errors="replace")

    @property
    def lines(self) -> list[str]:
        """Every whole line the warden wrote to stderr so far."""
        return self.text().split("\n")[:-1]

    def wait_for(self, needle: str, timeout: float = 20.0) -> str:
        """The next line holding ``needle``, after the lines that earlier
        waits went through; :class:`LineNotSeen` once the warden has exited
        without it, or after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            exited = self.proc.poll() is not None  # before the read: its last line is in
            lines = self.lines
            for i in range(self._seen, len(lines)):
                if needle in lines[i]:
                    self._seen = i + 1
                    return lines[i]
            self._seen = len(lines)
            if exited or time.monotonic() > deadline:
                why = "it exited" if exited else f"not within {timeout:g} s"
                raise LineNotSeen(f"no {needle!r} from the warden ({why}):\n"
                                  + "\n".join(lines))
            time.sleep(0.05)

    def stop(self) -> int:
        """SIGTERM and its exit status; SIGKILL if it is not gone in ``stop_s``."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=self.stop_s)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(timeout=self.kill_s)


def start_warden(cg: ChildMemcg, workdir: str, policy: str = "kernel",
                 timeout: float = 30.0, extra: str = "") -> WardenProcess:
    """``oomwarden run`` on ``cg`` (trigger ``oom``, plus the watch keys in
    ``extra``), its config and decision log in ``workdir``; returns once it
    says it is watching (stop it with ``.stop()``)."""
    config = Path(workdir) / "oomwarden.toml"
    config.write_text(f'decision_log = "{workdir}/decisions.jsonl"\n\n[[watch]]\n'
                      f'domain = "cgroup:{cg.hierarchy_path}"\ntriggers = ["oom"]\n'
                      f'policy = "{policy}"\n{extra}\n')
    config.chmod(0o644)
    warden = WardenProcess(config)
    try:
        warden.wait_for("watching", timeout)
    except LineNotSeen:
        warden.stop()
        raise RuntimeError("the warden did not start") from None
    return warden
