"""Reading processes and system memory from a proc root.

Thin I/O around :mod:`oomwarden.sources.parse`. The hot path reads three small
files per process (``stat``, ``status``, ``oom_score_adj``) through a
directory fd of ``/proc/PID``: every read then comes from the same process,
and a PID that dies mid-read gives ENOENT/ESRCH, which is mapped to
:class:`TaskGone` and the process is skipped. ``oom_score``, ``exe``,
``cmdline`` and ``cgroup`` are read only when asked for.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

from oomwarden.errors import ParseError, SourceError, TaskGone
from oomwarden.model import SystemMemory, Task
from oomwarden.sources.fsmagic import fs_magic
from oomwarden.sources.kcmp import shares_mm
from oomwarden.sources.parse import (
    parse_meminfo,
    parse_oom_score_adj,
    parse_proc_cgroup,
    parse_psi,
    parse_single_int,
    parse_stat,
    parse_status,
)

_GONE = (errno.ENOENT, errno.ESRCH)
_OPEN_FLAGS = os.O_RDONLY | os.O_CLOEXEC
_DIR_FLAGS = _OPEN_FLAGS | os.O_DIRECTORY
_CHUNK = 16384
# Bound once: the per-process loop calls these thousands of times.
_open = os.open
_read = os.read
_close = os.close


def read_at(dirfd: int, name: str) -> bytes:
    """Read a whole (small) file relative to ``dirfd``."""
    fd = os.open(name, _OPEN_FLAGS, dir_fd=dirfd)
    try:
        data = os.read(fd, _CHUNK)
        if len(data) < _CHUNK:
            return data
        parts = [data]
        while chunk := os.read(fd, _CHUNK):
            parts.append(chunk)
        return b"".join(parts)
    finally:
        os.close(fd)


def read_file(path: str) -> bytes:
    """Read a whole file by path (not on the per-task hot path)."""
    with open(path, "rb") as f:
        return f.read()


def page_size() -> int:
    return os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True, slots=True)
class ReadOptions:
    """What to read per task beyond the hot-path minimum."""

    #: The kernel's /proc/PID/oom_score (one more read per task).
    oom_score: bool = False
    #: exe and cmdline (two more reads per task).
    details: bool = False


@dataclass
class CgroupMap:
    """pid -> cgroup paths from the cgroups' ``cgroup.procs``.

    A process missing from a mounted hierarchy's map (born after the walk) is
    looked up in its own ``/proc/PID/cgroup`` by the caller. (A process moved
    during the walk keeps the cgroup the walk saw it in.)
    """

    v1: dict[int, str] | None
    v2: dict[int, str] | None

    def lookup(self, pid: int) -> tuple[str | None, str | None, bool]:
        """(v1 path, v2 path, whether every mounted hierarchy answered)."""
        m1 = self.v1.get(pid) if self.v1 is not None else None
        m2 = self.v2.get(pid) if self.v2 is not None else None
        complete = (self.v1 is None or m1 is not None) and (self.v2 is None or m2 is not None)
        return m1, m2, complete

    def complete(
        self, m1: str | None, m2: str | None, cgroup_file: bytes | None
    ) -> tuple[str | None, str | None]:
        """Fill what the maps lacked from the process's own cgroup file."""
        if cgroup_file is None:
            return m1, m2
        try:
            f1, f2 = parse_proc_cgroup(cgroup_file)
        except ParseError:
            return m1, m2
        if self.v1 is not None and m1 is None:
            m1 = f1
        if self.v2 is not None and m2 is None:
            m2 = f2
        return m1, m2


def _cgroup_file(pid_fd: int) -> bytes | None:
    try:
        return read_at(pid_fd, "cgroup")
    except OSError:
        return None


#: How many parse problems a scan keeps word for word.
MAX_PROBLEMS = 5


@dataclass
class ReadStats:
    """What a task scan skipped, for "considered N" style reporting."""

    gone: int = 0
    unreadable: int = 0
    unparsable: int = 0
    problems: list[str] = field(default_factory=list)


def _open_proc(proc_root: str) -> int:
    try:
        return os.open(proc_root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise SourceError(f"cannot open proc root {proc_root}: {e.strerror}") from None


def _leader_mm_status(pid_fd: int) -> tuple[bytes, bytes] | None:
    """(stat, status) of a live thread, for a process whose leader has exited.

    The kernel's ``find_lock_task_mm`` looks through the threads for one that
    still has the mm; /proc/PID/status of a dead leader shows no memory lines.
    """
    try:
        task_dir = os.open("task", _OPEN_FLAGS | os.O_DIRECTORY, dir_fd=pid_fd)
    except OSError:
        return None
    try:
        names = os.listdir(task_dir)
    except OSError:
        return None
    finally:
        os.close(task_dir)
    for name in names:
        try:
            task_fd = os.open(f"task/{name}", _OPEN_FLAGS | os.O_DIRECTORY, dir_fd=pid_fd)
        except OSError:
            continue
        try:
            data = read_at(task_fd, "status")
            stat = read_at(task_fd, "stat")
        except OSError:
            continue
        finally:
            os.close(task_fd)
        if b"\nVmRSS:" in data:
            return stat, data
    return None


def read_task(
    proc_fd: int,
    name: str,
    psize: int,
    options: ReadOptions,
    cgroup_map: CgroupMap | None = None,
    *,
    initial_pidns: bool = True,
) -> Task:
    """Read one process ``name`` (its PID as text) below the open proc root.

    ``initial_pidns`` tells whether the proc root shows the initial PID
    namespace, where pid 1 is the global init that is never killed.

    Raises :class:`TaskGone` when it vanished, :class:`SourceError` when it
    cannot be read, :class:`ParseError` when the kernel's text is malformed.
    This runs once per process on the OOM path: the three reads are written
    out rather than looped, and the rare cases (a dead leader, oom_score,
    details) stay out of the way.
    """
    try:
        pid_fd = _open(name, _DIR_FLAGS, dir_fd=proc_fd)
    except OSError as e:
        if e.errno in _GONE:
            raise TaskGone(f"process {name} exited") from None
        raise SourceError(f"cannot open /proc/{name}: {e.strerror}") from None
    try:
        try:
            fd = _open("stat", _OPEN_FLAGS, dir_fd=pid_fd)
            try:
                stat_data = _read(fd, _CHUNK)
            finally:
                _close(fd)
            fd = _open("status", _OPEN_FLAGS, dir_fd=pid_fd)
            try:
                status_data = _read(fd, _CHUNK)
                if len(status_data) == _CHUNK:  # thousands of groups: read it all
                    while more := _read(fd, _CHUNK):
                        status_data += more
            finally:
                _close(fd)
            fd = _open("oom_score_adj", _OPEN_FLAGS, dir_fd=pid_fd)
            try:
                adj_data = _read(fd, 64)
            finally:
                _close(fd)
        except OSError as e:
            if e.errno in _GONE:
                raise TaskGone(f"process {name} exited") from None
            raise SourceError(f"cannot read /proc/{name}: {e.strerror}") from None
        stat = parse_stat(stat_data)
        status = parse_status(status_data)
        adj = parse_oom_score_adj(adj_data)
        rss_pages = stat.rss_pages
        if not status.has_mm and stat.state == "Z" and stat.num_threads > 1:
            alive = _leader_mm_status(pid_fd)
            if alive is not None:
                rss_pages = parse_stat(alive[0]).rss_pages
                status = parse_status(alive[1])
        kernel_score: int | None = None
        exe: str | None = None
        cmdline: tuple[str, ...] | None = None
        if options.oom_score or options.details:
            kernel_score, exe, cmdline = _read_extras(pid_fd, name, options)
        memcg_v1: str | None = None
        cgroup_v2: str | None = None
        if cgroup_map is not None:
            memcg_v1, cgroup_v2, complete = cgroup_map.lookup(stat.pid)
            if not complete:
                # Born after the cgroup walk: ask the process itself, through
                # the same pid fd (a recycled PID cannot answer).
                memcg_v1, cgroup_v2 = cgroup_map.complete(
                    memcg_v1, cgroup_v2, _cgroup_file(pid_fd)
                )
    finally:
        _close(pid_fd)
    kthread = stat.kthread or bool(status.kthread)
    has_mm = status.has_mm and not kthread
    anon = file = shmem = swap = pte = None
    if has_mm:
        kb_per_page = psize // 1024
        if status.rss_anon_kb is not None:
            anon = status.rss_anon_kb // kb_per_page
        if status.rss_file_kb is not None:
            file = status.rss_file_kb // kb_per_page
        if status.rss_shmem_kb is not None:
            shmem = status.rss_shmem_kb // kb_per_page
        if status.swap_kb is not None:
            swap = status.swap_kb // kb_per_page
        if status.pte_kb is not None:
            pte = status.pte_kb // kb_per_page
    # Positional: keyword construction of a 21-field frozen dataclass costs
    # half as much again, once per process on the OOM path.
    return Task(
        stat.pid,
        status.tgid if status.tgid is not None else stat.pid,
        stat.ppid,
        stat.comm.decode("utf-8", "backslashreplace"),
        stat.state,
        stat.start_ticks,
        status.uid,
        kthread,
        has_mm,
        anon,
        file,
        shmem,
        swap,
        pte,
        adj,
        memcg_v1,
        cgroup_v2,
        kernel_score,
        exe,
        cmdline,
        psize,
        rss_pages if has_mm else None,
        stat.pid == 1 and initial_pidns,
    )


def _read_extras(
    pid_fd: int, name: str, options: ReadOptions
) -> tuple[int | None, str | None, tuple[str, ...] | None]:
    kernel_score: int | None = None
    exe: str | None = None
    cmdline: tuple[str, ...] | None = None
    if options.oom_score:
        # Shown beside our own score, never used to rank: a bad one is unknown.
        try:
            kernel_score = parse_single_int(read_at(pid_fd, "oom_score"), "oom_score")
        except OSError as e:
            if e.errno in _GONE:
                raise TaskGone(f"process {name} exited") from None
        except ParseError:
            kernel_score = None
    if options.details:
        exe, cmdline = _read_details(pid_fd)
    return kernel_score, exe, cmdline


def _read_details(pid_fd: int) -> tuple[str | None, tuple[str, ...] | None]:
    exe: str | None = None
    cmdline: tuple[str, ...] | None = None
    try:
        exe = os.readlink("exe", dir_fd=pid_fd)
    except OSError:
        exe = None  # kernel threads, zombies, permission: unknown
    try:
        raw = read_at(pid_fd, "cmdline")
        # Each argument ends in one NUL; an empty last argument is still one.
        body = raw[:-1] if raw.endswith(b"\0") else raw
        cmdline = (
            tuple(a.decode("utf-8", "backslashreplace") for a in body.split(b"\0")) if raw else ()
        )
    except OSError:
        cmdline = None
    return exe, cmdline


def iter_pids(proc_fd: int) -> Iterator[str]:
    for name in os.listdir(proc_fd):
        if name.isdigit():
            yield name


def read_tasks(
    proc_root: str = "/proc",
    *,
    psize: int | None = None,
    options: ReadOptions = ReadOptions(),
    stats: ReadStats | None = None,
    cgroup_map: CgroupMap | None = None,
    pids: list[int] | None = None,
) -> list[Task]:
    """Every process below ``proc_root`` (or only ``pids``); vanished or
    unreadable ones skipped."""
    psize = psize or page_size()
    stats = stats if stats is not None else ReadStats()
    proc_fd = _open_proc(proc_root)
    tasks: list[Task] = []
    live = is_live_procfs(proc_root)
    initial = initial_pidns(proc_fd) if live else True
    try:
        names = iter_pids(proc_fd) if pids is None else (str(p) for p in pids)
        for name in names:
            try:
                tasks.append(read_task(
                    proc_fd, name, psize, options, cgroup_map, initial_pidns=initial
                ))
            except TaskGone:
                stats.gone += 1
            except SourceError:
                stats.unreadable += 1
            except ParseError as e:
                # One malformed process must not cost the whole decision: skip
                # it, count it and keep the first messages for the report.
                stats.unparsable += 1
                if len(stats.problems) < MAX_PROBLEMS:
                    stats.problems.append(f"{proc_root}/{name}: {e}")
        if live:
            tasks = mark_vfork_children(tasks, proc_fd)
    finally:
        os.close(proc_fd)
    return tasks


#: The inode of the initial PID namespace (PROC_PID_INIT_INO).
PROC_PID_INIT_INO = 0xEFFFFFFC
PROC_SUPER_MAGIC = 0x9FA0


def is_live_procfs(proc_root: str) -> bool:
    """True when ``proc_root`` is a real procfs (not a recorded tree)."""
    try:
        return fs_magic(proc_root) == PROC_SUPER_MAGIC
    except OSError:
        return False


def initial_pidns(proc_fd: int) -> bool:
    """Whether this procfs shows the initial PID namespace, where pid 1 is the
    global init. Unknown counts as yes: init is never a victim.

    ``1/ns/pid`` (pid 1 lives in the namespace the procfs shows) answers for
    sure, but needs ptrace access to pid 1. ``self/ns/pid`` is the *reader's*
    namespace: it answers only when the reader lives in the procfs's own
    namespace, i.e. its ``NSpid`` line has one entry (a reader in a child
    namespace looking at the host's /proc has two or more).
    """
    init_ns = f"pid:[{PROC_PID_INIT_INO}]"
    try:
        return os.readlink("1/ns/pid", dir_fd=proc_fd) == init_ns
    except OSError:
        pass
    try:
        status = read_at(proc_fd, "self/status")
        target = os.readlink("self/ns/pid", dir_fd=proc_fd)
    except OSError:
        return True
    for line in status.split(b"\n"):
        if line.startswith(b"NSpid:"):
            if len(line.split()) == 2:  # "NSpid:" and one pid
                return target == init_ns
            return True
    return True


def mark_vfork_children(tasks: list[Task], proc_fd: int) -> list[Task]:
    """Mark vfork children that still share their parent's mm.

    ``oom_badness()`` skips them (``in_vfork()``): the mm is the parent's and
    killing the child frees nothing, while ``/proc`` shows the child with all
    of the parent's memory (and it would win a tie against the parent). A
    candidate is a child with its parent's counters; ``kcmp(KCMP_VM)`` then
    confirms the shared mm, and one of the parent's threads (any of them:
    vfork may be called from a worker thread) must wait in state D. A child
    that shares the mm through a plain ``clone(CLONE_VM)`` while a parent
    thread happens to be in D would be taken for a vfork child (rare).
    """
    by_pid = {t.pid: t for t in tasks}
    out = tasks
    for i, t in enumerate(tasks):
        parent = by_pid.get(t.ppid)
        if (
            parent is None
            or not t.has_mm
            or (t.oom_rss, t.pgtables) != (parent.oom_rss, parent.pgtables)
        ):
            continue
        if shares_mm(t.pid, parent.pid) and _a_thread_waits(proc_fd, parent):
            if out is tasks:
                out = list(tasks)
            out[i] = replace(t, in_vfork=True)
    return out


def _a_thread_waits(proc_fd: int, task: Task) -> bool:
    """Is any thread of ``task`` in state D (as the vfork parent's caller is)?"""
    if task.state == "D":
        return True
    try:
        task_dir = os.open(f"{task.pid}/task", _DIR_FLAGS, dir_fd=proc_fd)
    except OSError:
        return False
    try:
        for tid in os.listdir(task_dir):
            try:
                if parse_stat(read_at(task_dir, f"{tid}/stat")).state == "D":
                    return True
            except (OSError, ParseError):
                continue
    finally:
        os.close(task_dir)
    return False


def with_details(proc_root: str, task: Task) -> Task:
    """The same task with exe and cmdline read (None where they can't be)."""
    try:
        pid_fd = os.open(f"{proc_root}/{task.pid}", _OPEN_FLAGS | os.O_DIRECTORY)
    except OSError:
        return task
    try:
        stat = parse_stat(read_at(pid_fd, "stat"))
        if stat.start_ticks != task.start_ticks:
            return task  # the PID now names another process
        exe, cmdline = _read_details(pid_fd)
    except (OSError, ParseError):
        return task
    finally:
        os.close(pid_fd)
    return replace(task, exe=exe, cmdline=cmdline)


def read_system(proc_root: str = "/proc", *, psize: int | None = None) -> SystemMemory:
    """MemTotal, MemAvailable, SwapTotal, SwapFree and memory PSI."""
    psize = psize or page_size()
    try:
        info = parse_meminfo(read_file(f"{proc_root}/meminfo"))
    except OSError as e:
        raise SourceError(f"cannot read {proc_root}/meminfo: {e.strerror}") from None
    except ParseError as e:
        raise ParseError(f"{proc_root}/meminfo: {e}") from None
    pressure = None
    try:
        pressure = parse_psi(read_file(f"{proc_root}/pressure/memory"), "pressure/memory")
    except OSError:
        pressure = None  # PSI off (psi=0 gives EOPNOTSUPP) or not built: unknown
    return SystemMemory(
        mem_total=info.mem_total,
        mem_available=info.mem_available,
        swap_total=info.swap_total,
        swap_free=info.swap_free,
        pressure=pressure,
        page_size=psize,
        swappiness=_read_swappiness(proc_root),
    )


def _read_swappiness(proc_root: str) -> int | None:
    try:
        return parse_single_int(read_file(f"{proc_root}/sys/vm/swappiness"), "vm.swappiness")
    except (OSError, ParseError):
        return None
