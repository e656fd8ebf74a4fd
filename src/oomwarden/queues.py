"""Victim queues: victims chosen ahead of time that a recycled PID or a
recreated cgroup can never turn into someone else.

The LKML thread proposed ``echo PID >> memory.oom.victim_proc``; the objection
was that a PID consumed in the distant future may name another process by
then. Here a queued process is held as a **pidfd** plus its start time: the
pidfd becomes readable when the process exits, and the entry leaves the queue
then (the daemon polls every pidfd in its loop); a PID that comes back for
another process is another process (another pidfd, another start time) and is
never hit. A queued cgroup is held by its **inode** and an open directory fd:
a cgroup removed and made again under the same name has another inode.

On an OOM (or a pre-OOM trigger) in a domain, the oldest live entry inside
that domain goes first; an empty queue falls through to the policy. This
module is the bookkeeping; the daemon kills, logs and serves the control
socket.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import time
from dataclasses import dataclass, field
from typing import Any

from oomwarden.errors import OomwardenError, ParseError
from oomwarden.model import HierarchyKind
from oomwarden.sources.parse import StatFields, parse_proc_cgroup, parse_stat, parse_status

#: Queue entries at most, whole daemon (a flood cannot grow it further).
MAX_ENTRIES = 1024


class QueueError(OomwardenError):
    """A queue request that cannot be met (the message is one line)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class ProcessEntry:
    id: int
    pidfd: int
    pid: int
    start_ticks: int
    uid: int
    comm: str
    #: The memory cgroup path (v1 or v2, as the domain's hierarchy) at add time.
    cgroup: str | None
    domain: str
    added_ns: int
    by_uid: int

    def describe(self) -> dict[str, Any]:
        return {"id": self.id, "kind": "process", "pid": self.pid,
                "start_ticks": self.start_ticks, "comm": self.comm, "uid": self.uid,
                "cgroup": self.cgroup, "domain": self.domain, "added_ns": self.added_ns,
                "by_uid": self.by_uid}


@dataclass
class CgroupEntry:
    id: int
    dirfd: int
    kind: HierarchyKind
    path: str
    fs_path: str
    inode: int
    domain: str
    added_ns: int
    by_uid: int

    def describe(self) -> dict[str, Any]:
        return {"id": self.id, "kind": "cgroup", "hierarchy": self.kind.value,
                "cgroup": self.path, "inode": self.inode, "domain": self.domain,
                "added_ns": self.added_ns, "by_uid": self.by_uid}


Entry = ProcessEntry | CgroupEntry


@dataclass
class VictimQueue:
    """Every queued entry of the daemon, oldest first; each names its domain
    (``system`` or ``cgroup:/path``)."""

    proc_root: str = "/proc"
    cap: int = MAX_ENTRIES
    entries: list[Entry] = field(default_factory=list)
    _next_id: int = 1

    # -- adding ---------------------------------------------------------------------

    def add_process(self, pid: int, domain: str, by_uid: int,
                    cgroup_kind: HierarchyKind) -> ProcessEntry:
        """Queue a live process: a pidfd first, then its identity read (so the
        identity is the pidfd's process, or the add fails)."""
        self._room()
        if pid <= 1:
            raise QueueError("forbidden", "pid 1 is never a victim")
        if pid == os.getpid():
            raise QueueError("forbidden", "the warden is never a victim")
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            raise QueueError("not_found", f"no process {pid}") from None
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.EINVAL):  # a thread, not a process
                raise QueueError("not_found", f"no process {pid} (a thread id is not a "
                                 "process: queue its process)") from None
            raise QueueError("internal", f"pid {pid}: {e.strerror}") from None
        try:
            stat, uid, cgroup = self._identity(pid, cgroup_kind)
            if _exited(fd):
                raise QueueError("gone", f"pid {pid} exited")
            if stat.kthread:
                raise QueueError("forbidden", f"pid {pid} is a kernel thread")
        except BaseException:
            os.close(fd)
            raise
        entry = ProcessEntry(self._take_id(), fd, pid, stat.start_ticks, uid,
                             stat.comm.decode("utf-8", "backslashreplace"), cgroup, domain,
                             time.time_ns(), by_uid)
        self.entries.append(entry)
        return entry

    def add_cgroup(self, kind: HierarchyKind, path: str, fs_path: str, domain: str,
                   by_uid: int) -> CgroupEntry:
        self._room()
        if path == "/":
            raise QueueError("forbidden", "the root cgroup is never a victim")
        try:
            dirfd = os.open(fs_path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise QueueError("not_found", f"no cgroup {path}") from None
        except OSError as e:
            raise QueueError("internal", f"{fs_path}: {e.strerror}") from None
        entry = CgroupEntry(self._take_id(), dirfd, kind, path, fs_path, os.fstat(dirfd).st_ino,
                            domain, time.time_ns(), by_uid)
        self.entries.append(entry)
        return entry

    def _room(self) -> None:
        if len(self.entries) >= self.cap:
            raise QueueError("queue_full", f"the queue holds {self.cap} entries already")

    def _take_id(self) -> int:
        taken = self._next_id
        self._next_id += 1
        return taken

    def _identity(self, pid: int, kind: HierarchyKind) -> tuple[StatFields, int, str | None]:
        try:
            with open(f"{self.proc_root}/{pid}/stat", "rb") as f:
                stat = parse_stat(f.read())
            with open(f"{self.proc_root}/{pid}/status", "rb") as f:
                status = parse_status(f.read())
            with open(f"{self.proc_root}/{pid}/cgroup", "rb") as f:
                memcg, unified = parse_proc_cgroup(f.read())
        except (OSError, ParseError):
            raise QueueError("gone", f"pid {pid} exited") from None
        if status.uid is None:
            raise QueueError("internal", f"pid {pid}: no Uid in its status")
        return stat, status.uid, unified if kind is HierarchyKind.V2 else memcg

    # -- leaving --------------------------------------------------------------------

    def remove(self, entry_id: int) -> Entry:
        for entry in self.entries:
            if entry.id == entry_id:
                self._drop(entry)
                return entry
        raise QueueError("not_found", f"no queue entry {entry_id}")

    def get(self, entry_id: int) -> Entry | None:
        return next((e for e in self.entries if e.id == entry_id), None)

    def _drop(self, entry: Entry) -> None:
        self.entries.remove(entry)
        with contextlib.suppress(OSError):
            os.close(entry.pidfd if isinstance(entry, ProcessEntry) else entry.dirfd)

    def exited(self, entry: ProcessEntry) -> None:
        """The entry's pidfd became readable: its process is gone."""
        self._drop(entry)

    # -- choosing -------------------------------------------------------------------

    def head(self, domain: str) -> tuple[Entry | None, list[tuple[Entry, str]]]:
        """The oldest live entry of ``domain``, and the entries found dead on
        the way (removed from the queue) with the reason."""
        dead: list[tuple[Entry, str]] = []
        for entry in list(self.entries):
            if entry.domain != domain:
                continue
            why = self.why_dead(entry)
            if why is None:
                return entry, dead
            dead.append((entry, why))
            self._drop(entry)
        return None, dead

    def why_dead(self, entry: Entry) -> str | None:
        if isinstance(entry, ProcessEntry):
            if _exited(entry.pidfd):
                return f"pid {entry.pid} had exited"
            try:
                with open(f"{self.proc_root}/{entry.pid}/stat", "rb") as f:
                    stat = parse_stat(f.read())
            except (OSError, ParseError):
                return f"pid {entry.pid} had exited"
            if stat.start_ticks != entry.start_ticks:
                return f"pid {entry.pid} had exited (the pid names another process now)"
            return None
        try:
            inode = os.stat(entry.fs_path).st_ino
        except OSError:
            return f"cgroup {entry.path} was removed"
        if inode != entry.inode:
            return f"cgroup {entry.path} was removed (made again: another inode)"
        return None

    def sizes(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for e in self.entries:
            out[e.domain] = out.get(e.domain, 0) + 1
        return out

    def close(self) -> None:
        for entry in list(self.entries):
            self._drop(entry)


def _exited(pidfd: int) -> bool:
    """A pidfd is readable once its process has exited."""
    ready, _, _ = select.select([pidfd], [], [], 0)
    return bool(ready)
