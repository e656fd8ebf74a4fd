"""The executor: carries a decision's actions out on the real kernel.

Everything here is I/O; it trusts nothing it is given:

* **A process is (pid, start time).** It is opened as a pidfd first, then its
  start time is read from ``/proc/PID/stat`` and compared: a PID that now
  names another process is refused, and every later signal goes through the
  pidfd, which cannot be recycled.
* **Never**: pid 1, the warden itself (and the pids it is told to spare, such
  as its watchdog), kernel threads, ``oom_score_adj`` -1000 (re-read at kill
  time), and the ``spare_pids`` of a unit kill.
* **A kill** is SIGTERM, a grace period, then SIGKILL (or SIGKILL at once),
  then ``process_mrelease()`` so that the memory is freed now rather than by
  the exiting task, then a bounded wait for the exit on the pidfd.
* **A process tree** is stopped whole first (SIGSTOP, so nothing escapes by
  forking), then killed; repeated in bounded rounds for children that were
  forked while it was read.
* **A cgroup** is killed with ``cgroup.kill`` where the cgroup has one and
  nothing is to be spared, else by killing every process of its
  ``cgroup.procs`` (recursively) through pidfds, in bounded rounds.
* **Files** are deleted only on a tmpfs (``fstatfs`` of the directory, not a
  path test), only regular files, never through a symlink; the bytes freed
  are counted.
* **Hooks** run with argv (no shell), a timeout, and the victim in the
  environment.

In dry-run mode every check runs and nothing is signalled or deleted.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import platform
import select
import signal
import stat as stat_mod
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace

from oomwarden.domains import mount_relative, within
from oomwarden.errors import OomwardenError, ParseError
from oomwarden.model import HierarchyKind
from oomwarden.policy.api import Action, DeleteFiles, KillCgroup, KillProcess, RunHook
from oomwarden.sources.cgroupfs import find_hierarchies
from oomwarden.sources.fsmagic import TMPFS_MAGIC, fd_magic, is_cgroup_fs
from oomwarden.sources.parse import (
    parse_mountinfo,
    parse_oom_score_adj,
    parse_proc_cgroup,
    parse_stat,
    v1_controllers,
)

#: Bounds: a kill must end, whatever the victim does.
EXIT_WAIT_S = 2.0
MAX_ROUNDS = 10
MAX_TREE = 10_000
HOOK_TIMEOUT_S = 10.0
#: How long a freezer may take to report its cgroup frozen.
FREEZE_WAIT_S = 0.5

_SYS_PROCESS_MRELEASE = {"x86_64": 448, "aarch64": 448}
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def process_mrelease(pidfd: int) -> str:
    """Free a killed process's memory now. Returns "released", "gone" (ESRCH:
    the exit already freed it, which is success) or why it could not."""
    number = _SYS_PROCESS_MRELEASE.get(platform.machine())
    if number is None:
        return "unsupported on this architecture"
    if _libc.syscall(ctypes.c_long(number), ctypes.c_int(pidfd), ctypes.c_uint(0)) == 0:
        return "released"
    err = ctypes.get_errno()
    if err == errno.ESRCH:
        return "gone"
    return os.strerror(err)


def _ordinary_oom_score() -> None:
    """A hook must not inherit the warden's oom_score_adj -1000 (raising it
    back to 0 needs no privilege)."""
    with contextlib.suppress(OSError), open("/proc/self/oom_score_adj", "w") as f:
        f.write("0")


@dataclass(frozen=True, slots=True)
class Result:
    """What became of one action."""

    action: str
    ok: bool
    detail: str
    seconds: float
    killed: tuple[int, ...] = ()
    #: Files deleted: their size (in a dry run, what would be freed). Kills
    #: leave it None: the victims' resident sizes double-count shared pages;
    #: the daemon measures the domain's memory before and after instead.
    freed_bytes: int | None = None
    #: Wall-clock stages of a kill (``time.time_ns()``): the first signal,
    #: the memory released (``process_mrelease`` returned), every victim gone.
    signal_ns: int | None = None
    released_ns: int | None = None
    exit_ns: int | None = None
    #: The victims signalled, as (pid, start time in ticks): the cooldown
    #: checks them for "memory gone" without holding their pidfds.
    victims: tuple[tuple[int, int], ...] = ()
    #: Whether every victim had exited when the action returned (None: no
    #: kill was made).
    exited: bool | None = None


@dataclass
class _Kill:
    """What :meth:`Executor._kill_fds` saw."""

    summary: str
    signal_ns: int
    released_ns: int | None
    exit_ns: int | None


@dataclass
class Executor:
    """Carries actions out. ``protect`` holds pids never to signal besides the
    built-in ones (pid 1, this process)."""

    proc_root: str = "/proc"
    dry_run: bool = False
    sigterm_grace_s: float = 0.0
    #: SIGTERM only, no SIGKILL unless a grace is set (earlyoom's first level).
    term_only: bool = False
    #: Hooks get at most this long.
    hook_timeout_s: float = HOOK_TIMEOUT_S
    #: The OOM domain (hierarchy kind value, cgroup path): a tree kill spares
    #: descendants outside it (they were never part of the decision).
    domain: tuple[str, str] | None = None
    protect: frozenset[int] = field(default_factory=frozenset)
    clock: Callable[[], float] = time.monotonic
    #: Freeze a v1 cgroup's twin before killing it one by one (off on an OOM
    #: event, whose tasks are paused in the kernel already).
    freeze: bool = True
    #: Open pidfds -> (pid, start time in ticks), as checked when opened.
    _identity: dict[int, tuple[int, int]] = field(default_factory=dict, repr=False)

    def run(self, actions: Iterable[Action], env: dict[str, str] | None = None) -> list[Result]:
        return [self.execute(a, env) for a in actions]

    def execute(self, action: Action, env: dict[str, str] | None = None) -> Result:
        started = self.clock()
        try:
            if isinstance(action, KillProcess):
                if action.tree:
                    return self._kill_tree(action, started)
                return self._kill_one(action, started)
            if isinstance(action, KillCgroup):
                return self._kill_cgroup(action, started)
            if isinstance(action, DeleteFiles):
                return self._delete(action, started)
            return self._hook(action, env or {}, started)
        except OSError as e:  # the executor's own I/O; never an exception to the caller
            return Result(type(action).__name__, False, f"{e.strerror or e}",
                          self.clock() - started)
        except OomwardenError as e:  # /proc or cgroupfs that did not read or parse
            return Result(type(action).__name__, False, str(e), self.clock() - started)

    # -- processes ------------------------------------------------------------------

    def _why_not(self, pid: int, start_ticks: int | None,
                 ppid: int | None = None) -> str | None:
        """None if the process may be signalled, else why not. ``ppid``: it
        must still be that process's child (a recycled PID is not)."""
        return self._check(pid, start_ticks, ppid)[0]

    def _check(self, pid: int, start_ticks: int | None,
               ppid: int | None = None) -> tuple[str | None, int]:
        """(why not, or None; the process's start time in ticks)."""
        if pid <= 1:
            return "pid 1 is never killed", 0
        if pid == os.getpid() or pid in self.protect:
            return f"pid {pid} is the warden or protected", 0
        try:
            with open(f"{self.proc_root}/{pid}/stat", "rb") as f:
                info = parse_stat(f.read())
            with open(f"{self.proc_root}/{pid}/oom_score_adj", "rb") as f:
                adj = parse_oom_score_adj(f.read())
        except (OSError, ParseError):
            return f"pid {pid} is gone", 0
        if ppid is not None and info.ppid != ppid:
            return f"pid {pid} is no longer a child of {ppid}", 0
        if start_ticks is not None and info.start_ticks != start_ticks:
            return (f"pid {pid} now names another process (start {info.start_ticks}, not "
                    f"{start_ticks})"), 0
        if info.kthread:
            return f"pid {pid} is a kernel thread", 0
        if adj <= -1000:
            return f"pid {pid} has oom_score_adj -1000", 0
        return None, info.start_ticks

    def _open(self, pid: int, start_ticks: int | None,
              ppid: int | None = None) -> tuple[int | None, str | None]:
        """A pidfd for the process, taken *before* its identity is checked."""
        try:
            fd = os.pidfd_open(pid)
        except OSError as e:
            return None, f"pid {pid}: {e.strerror}"
        why, start = self._check(pid, start_ticks, ppid)
        if why is None and self.domain is not None and not self._in_domain(pid):
            why = f"pid {pid} is outside {self.domain[0]}:{self.domain[1]}"
        if why is not None:
            os.close(fd)
            return None, why
        self._identity[fd] = (pid, start)
        return fd, None

    def _close(self, fd: int) -> None:
        self._identity.pop(fd, None)
        os.close(fd)

    def _in_domain(self, pid: int) -> bool:
        assert self.domain is not None
        kind, top = self.domain
        try:
            with open(f"{self.proc_root}/{pid}/cgroup", "rb") as f:
                memcg, unified = parse_proc_cgroup(f.read())
        except (OSError, ParseError):
            return False
        path = memcg if kind == "v1" else unified
        return within(path, top)

    def _signal(self, fd: int, sig: int) -> bool:
        if self.dry_run:
            return True
        try:
            signal.pidfd_send_signal(fd, sig)
            return True
        except OSError:  # gone (ESRCH) or not permitted (EPERM)
            return False

    def _wait(self, fds: list[int], timeout_s: float) -> bool:
        """True when every pidfd reports its process gone within the timeout."""
        deadline = self.clock() + timeout_s
        left = list(fds)
        while left:
            remaining = deadline - self.clock()
            if remaining <= 0:
                return False
            ready, _, _ = select.select(left, [], [], remaining)
            left = [fd for fd in left if fd not in ready]
        return True

    def _kill_fds(self, fds: list[int], after_signal: Callable[[], None] | None = None
                  ) -> _Kill:
        """SIGKILL, (``after_signal``: thaw a freezer), release the memory,
        wait for the exits."""
        signal_ns = time.time_ns()
        for fd in fds:
            self._signal(fd, signal.SIGKILL)
        if after_signal is not None:
            after_signal()
        released = 0
        released_ns = None
        if not self.dry_run:
            for fd in fds:
                if process_mrelease(fd) in ("released", "gone"):
                    released += 1
            released_ns = time.time_ns() if released == len(fds) else None
        exited = True if self.dry_run else self._wait(fds, EXIT_WAIT_S)
        exit_ns = time.time_ns() if exited and not self.dry_run else None
        summary = (f"{len(fds)} killed, {released} released" +
                   ("" if exited else f"; not all exited within {EXIT_WAIT_S:g} s"))
        return _Kill(summary, signal_ns, released_ns, exit_ns)

    def _killed(self, action: str, kill: _Kill | None, detail: str, started: float, *,
                fds: list[int], pids: tuple[int, ...]) -> Result:
        """The Result of a kill made through pidfds (``kill`` None: a SIGTERM
        only, or a dry run's)."""
        victims = tuple(self._identity[fd] for fd in fds if fd in self._identity)
        if kill is None or self.dry_run:
            return Result(action, True, detail + self._dry(), self.clock() - started, pids,
                          victims=victims)
        return Result(action, True, detail + self._dry(), self.clock() - started, pids,
                      signal_ns=kill.signal_ns, released_ns=kill.released_ns,
                      exit_ns=kill.exit_ns, victims=victims, exited=kill.exit_ns is not None)

    def _kill_one(self, action: KillProcess, started: float) -> Result:
        fd, why = self._open(action.pid, action.start_ticks)
        if fd is None:
            return Result("kill_process", False, f"refused: {why}", self.clock() - started)
        pids = (action.pid,)
        try:
            if self.term_only and self.sigterm_grace_s <= 0:
                signal_ns = time.time_ns()
                self._signal(fd, signal.SIGTERM)
                result = self._killed("kill_process", None, "SIGTERM", started, fds=[fd], pids=pids)
                return replace(result, signal_ns=None if self.dry_run else signal_ns)
            signal_ns = time.time_ns()
            if self.sigterm_grace_s > 0 and self._signal(fd, signal.SIGTERM) and (
                self.dry_run or self._wait([fd], self.sigterm_grace_s)
            ):
                result = self._killed("kill_process", None, "SIGTERM: exited within the grace",
                                      started, fds=[fd], pids=pids)
                if self.dry_run:
                    return result
                return replace(result, signal_ns=signal_ns, exit_ns=time.time_ns(),
                               exited=True)
            kill = self._kill_fds([fd])
            if self.sigterm_grace_s > 0:
                kill.signal_ns = signal_ns
            return self._killed("kill_process", kill, kill.summary, started, fds=[fd], pids=pids)
        finally:
            self._close(fd)

    def _children(self, pid: int) -> list[int]:
        out: list[int] = []
        try:
            tasks = os.listdir(f"{self.proc_root}/{pid}/task")
        except OSError:
            return out
        for tid in tasks:
            with contextlib.suppress(OSError, ValueError), open(
                f"{self.proc_root}/{pid}/task/{tid}/children"
            ) as f:
                out.extend(int(x) for x in f.read().split())
        return out

    def _kill_tree(self, action: KillProcess, started: float) -> Result:
        root_fd, why = self._open(action.pid, action.start_ticks)
        if root_fd is None:
            return Result("kill_tree", False, f"refused: {why}", self.clock() - started)
        fds = {action.pid: root_fd}
        finished = False
        spare = set(action.spare_pids)
        refused: list[str] = []
        try:
            # Stop first, level by level, so that nothing escapes by forking;
            # rounds catch children forked while a level was being read.
            self._signal(root_fd, signal.SIGSTOP)
            # A spared member is not killed, but its descendants still are
            # (each was judged on its own).
            seen = {action.pid}
            for _ in range(MAX_ROUNDS):
                found = False
                for pid in [*fds, *(spare & seen)]:
                    for child in self._children(pid):
                        if child in seen or len(seen) >= MAX_TREE:
                            continue
                        seen.add(child)
                        found = True
                        if child in spare:
                            continue
                        fd, why_child = self._open(child, None, ppid=pid)
                        if fd is None:
                            refused.append(why_child or "?")
                            spare.add(child)
                            continue
                        self._signal(fd, signal.SIGSTOP)
                        fds[child] = fd
                if not found:
                    break
            kill = None
            if self.term_only:  # earlyoom's first level: SIGTERM, and let them run
                for fd in fds.values():
                    self._signal(fd, signal.SIGTERM)
                    self._signal(fd, signal.SIGCONT)
                summary = f"{len(fds)} sent SIGTERM"
            else:
                kill = self._kill_fds(list(fds.values()))
                summary = kill.summary
            finished = True
            spared = f"; spared {sorted(spare)}" if spare else ""
            if refused:
                spared += "; refused: " + "; ".join(refused[:5])
            return self._killed("kill_tree", kill, summary + spared, started,
                                fds=list(fds.values()), pids=tuple(sorted(fds)))
        finally:
            if not finished:  # never leave a stopped tree behind
                for fd in fds.values():
                    self._signal(fd, signal.SIGKILL)
            for fd in fds.values():
                self._close(fd)

    # -- cgroups --------------------------------------------------------------------

    def _kill_cgroup(self, action: KillCgroup, started: float) -> Result:
        mount = next((h.mount_point for h in find_hierarchies(self.proc_root)
                      if h.kind.value == action.kind and h.verified), None)
        if mount is None:
            return Result("kill_cgroup", False, f"refused: no verified {action.kind} hierarchy",
                          self.clock() - started)
        if action.path == "/":
            return Result("kill_cgroup", False, "refused: the root cgroup is never killed",
                          self.clock() - started)
        path = os.path.join(mount, action.path.lstrip("/"))
        try:
            inode = os.stat(path).st_ino
        except OSError:
            return Result("kill_cgroup", False, f"refused: {action.path} is gone",
                          self.clock() - started)
        if inode != action.inode:
            return Result("kill_cgroup", False, f"refused: {action.path} is another cgroup now "
                          f"(inode {inode}, not {action.inode})", self.clock() - started)
        spare = set(action.spare_pids)
        members = self._members(path)
        protected = [p for p in members if p in spare or self._why_not(p, None)]
        complete = len(members) < MAX_TREE  # every member was seen and checked
        atomic = not protected and complete and not self.term_only
        if atomic and os.path.exists(os.path.join(path, "cgroup.kill")):
            return self._cgroup_kill(path, action.path, members, started)
        # A v1 memory cgroup has no cgroup.kill. Its twin (the same path in
        # the cgroup2 hierarchy, or in a v1 freezer hierarchy) holding exactly
        # the same processes can kill them at once, or freeze them so that
        # none escapes by forking while they are killed one by one.
        # Never freeze what holds the warden, its watchdog or pid 1 (they
        # would stop with the rest), and not while the cgroup's tasks are
        # paused in a v1 OOM: they sleep killable, and the freezer waits in vain.
        own = {os.getpid(), 1, *self.protect}
        twin = (self._twin(action.path, members)
                if action.kind == "v1" and complete and not self.term_only and self.freeze
                and not own & set(members) else None)
        if twin is not None and atomic and os.path.exists(os.path.join(twin, "cgroup.kill")):
            return self._cgroup_kill(twin, f"{action.path} (its cgroup2 twin {twin})",
                                     members, started)
        frozen = None if twin is None or self.dry_run else self._freeze(twin)
        try:
            return self._kill_members(action, path, spare, started, frozen)
        finally:
            if frozen is not None:
                self._thaw(frozen)

    def _cgroup_kill(self, directory: str, label: str, members: list[int],
                     started: float) -> Result:
        detail = f"cgroup.kill on {label} ({len(members)} processes)"
        if self.dry_run:
            return Result("kill_cgroup", True, detail + self._dry(),
                          self.clock() - started, tuple(sorted(members)))
        signal_ns = time.time_ns()
        with open(os.path.join(directory, "cgroup.kill"), "w") as f:
            f.write("1")
        exited = self._emptied(directory, EXIT_WAIT_S)
        if not exited:
            detail += f"; not all exited within {EXIT_WAIT_S:g} s"
        return Result("kill_cgroup", True, detail, self.clock() - started,
                      tuple(sorted(members)), signal_ns=signal_ns,
                      exit_ns=time.time_ns() if exited else None, exited=exited)

    def _twin(self, path: str, members: list[int]) -> str | None:
        """The cgroup at ``path`` in the cgroup2 hierarchy (``cgroup.freeze``)
        or a v1 freezer hierarchy (``freezer.state``), on a verified mount,
        whose processes (recursively) are exactly ``members``; else None."""
        try:
            with open(f"{self.proc_root}/self/mountinfo", "rb") as f:
                mounts = parse_mountinfo(f.read())
        except (OSError, ParseError):
            return None
        for m in mounts:
            if m.kind is HierarchyKind.V2:
                control, v2 = "cgroup.freeze", True
            elif "freezer" in v1_controllers(m.super_options):
                control, v2 = "freezer.state", False
            else:
                continue
            rel = mount_relative(m.root, path)
            twin = os.path.join(m.mount_point, rel)
            if (rel and os.path.isfile(os.path.join(twin, control))
                    and is_cgroup_fs(twin, v2=v2)
                    and sorted(self._members(twin)) == sorted(members)):
                return twin
        return None

    def _freeze(self, twin: str) -> str | None:
        """Freeze a twin; wait (bounded) until it is frozen. Returns the twin,
        or None (thawed again) if it would not freeze."""
        v2 = os.path.isfile(os.path.join(twin, "cgroup.freeze"))
        try:
            if v2:
                with open(os.path.join(twin, "cgroup.freeze"), "w") as f:
                    f.write("1")
            else:
                with open(os.path.join(twin, "freezer.state"), "w") as f:
                    f.write("FROZEN")
            deadline = self.clock() + FREEZE_WAIT_S
            while self.clock() < deadline:
                if v2:
                    with open(os.path.join(twin, "cgroup.events")) as f:
                        if "frozen 1" in f.read():
                            return twin
                else:
                    with open(os.path.join(twin, "freezer.state")) as f:
                        if f.read().strip() == "FROZEN":
                            return twin
                time.sleep(0.001)
        except OSError:
            pass
        self._thaw(twin)
        return None

    @staticmethod
    def _thaw(twin: str) -> None:
        if os.path.isfile(os.path.join(twin, "cgroup.freeze")):
            name, value = "cgroup.freeze", "0"
        else:
            name, value = "freezer.state", "THAWED"
        with contextlib.suppress(OSError), open(os.path.join(twin, name), "w") as f:
            f.write(value)

    def _kill_members(self, action: KillCgroup, path: str, spare: set[int], started: float,
                      frozen: str | None) -> Result:
        """Every process of the cgroup's subtree, through pidfds, in bounded
        rounds (for processes forked meanwhile). ``frozen``: a twin frozen
        beforehand, thawed right after the first round's SIGKILLs (a task
        frozen by a v1 freezer dies only once thawed)."""
        how = f" (frozen first through {frozen})" if frozen else ""

        def thaw() -> None:
            if frozen is not None:
                self._thaw(frozen)

        killed: set[int] = set()
        victims: list[tuple[int, int]] = []
        kills: list[_Kill] = []
        for _ in range(MAX_ROUNDS):
            fds = []
            for pid in self._members(path):
                if pid in killed or pid in spare:
                    continue
                fd, _why = self._open(pid, None)
                if fd is None:
                    spare.add(pid)
                    continue
                fds.append(fd)
                killed.add(pid)
                victims.append(self._identity[fd])
            if not fds:
                break
            try:
                if self.term_only:
                    for fd in fds:
                        self._signal(fd, signal.SIGTERM)
                else:
                    kills.append(self._kill_fds(fds, thaw))
            finally:
                for fd in fds:
                    self._close(fd)
            if self.term_only:
                break
            if self.dry_run:
                break
        spared = f"; spared {sorted(spare)}" if spare else ""
        detail = f"{len(killed)} processes of {action.path} killed one by one{how}{spared}"
        if not kills or self.dry_run:
            return Result("kill_cgroup", True, detail + self._dry(), self.clock() - started,
                          tuple(sorted(killed)), victims=tuple(victims))
        exited = all(k.exit_ns is not None for k in kills)
        return Result("kill_cgroup", True, detail, self.clock() - started,
                      tuple(sorted(killed)),
                      signal_ns=kills[0].signal_ns,
                      released_ns=kills[-1].released_ns
                      if all(k.released_ns for k in kills) else None,
                      exit_ns=kills[-1].exit_ns if exited else None,
                      victims=tuple(victims), exited=exited)

    def _emptied(self, path: str, timeout_s: float) -> bool:
        """Wait (bounded) until no process is left in the cgroup's subtree."""
        deadline = self.clock() + timeout_s
        while self._members(path):
            if self.clock() >= deadline:
                return False
            time.sleep(0.002)
        return True

    def _members(self, path: str) -> list[int]:
        pids: list[int] = []
        for dirpath, _dirs, files in os.walk(path):
            if "cgroup.procs" in files:
                with contextlib.suppress(OSError, ValueError), open(
                    os.path.join(dirpath, "cgroup.procs")
                ) as f:
                    pids.extend(int(x) for x in f.read().split())
            if len(pids) > MAX_TREE:
                break
        return pids

    # -- files and hooks -----------------------------------------------------------------

    def _delete(self, action: DeleteFiles, started: float) -> Result:
        freed = 0
        deleted = 0
        refused: list[str] = []
        for path in action.paths:
            directory, name = os.path.split(path)
            if not os.path.isabs(path) or not name or name in (".", ".."):
                refused.append(f"{path}: not an absolute file path")
                continue
            try:
                dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except OSError as e:
                refused.append(f"{path}: {e.strerror}")
                continue
            try:
                if fd_magic(dfd) != TMPFS_MAGIC:
                    refused.append(f"{path}: not on a tmpfs")
                    continue
                info = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                if not stat_mod.S_ISREG(info.st_mode):
                    refused.append(f"{path}: not a regular file")
                    continue
                if not self.dry_run:
                    os.unlink(name, dir_fd=dfd)
                freed += info.st_blocks * 512
                deleted += 1
            except OSError as e:
                refused.append(f"{path}: {e.strerror}")
            finally:
                os.close(dfd)
        detail = f"{deleted} files deleted, {freed} bytes freed"
        if refused:
            detail += "; refused: " + "; ".join(refused[:5])
        return Result("delete_files", deleted > 0 or not action.paths, detail + self._dry(),
                      self.clock() - started, freed_bytes=freed)

    def _hook(self, action: RunHook, env: dict[str, str], started: float) -> Result:
        if self.dry_run:
            return Result("run_hook", True, f"would run {list(action.argv)}", 0.0)
        try:
            done = subprocess.run(list(action.argv), env={**os.environ, **env},
                                  timeout=min(action.timeout_s, self.hook_timeout_s),
                                  capture_output=True, check=False,
                                  preexec_fn=_ordinary_oom_score)
        except subprocess.TimeoutExpired:
            return Result("run_hook", False, f"timed out after {action.timeout_s:g} s",
                          self.clock() - started)
        except OSError as e:
            return Result("run_hook", False, f"{action.argv[0]}: {e.strerror}",
                          self.clock() - started)
        return Result("run_hook", done.returncode == 0, f"exit status {done.returncode}",
                      self.clock() - started)

    def _dry(self) -> str:
        return " (dry run: nothing was done)" if self.dry_run else ""
