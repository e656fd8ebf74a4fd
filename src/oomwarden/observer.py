"""The OOM observer: the kernel's own OOM kills, seen by BPF as they happen.

``src/oomwarden/bpf/observer.bpf.c`` (built by ``make bpf``) attaches to the
``mark_victim`` BTF tracepoint (``tp_btf``: tracefs need not be mounted) and,
where the kernel allows, to ``out_of_memory()`` (fentry and fexit: the OOM in
progress, for its domain and the chosen task's points) and
``__oom_kill_process()`` (fentry: which marked tasks the killer really
SIGKILLs). Every marked task is one fixed-size record in a BPF ring buffer.

Here the object is loaded and attached through the system's ``libbpf.so.1``
with :mod:`ctypes` (``oomwarden.sources.bpf.libbpf_function``), the ring
buffer's epoll fd is what the daemon's loop waits on, and each record is
decoded strictly (:func:`decode_record`: a wrong size, magic or field is a
:class:`BpfError`, nothing else) and turned into an :class:`ObservedKill`, a
:class:`oomwarden.triggers.KernelKill` with everything the record knows.

Cgroup ids (kernfs ids, the cgroup directories' inode numbers) become paths
with ``open_by_handle_at()`` on the hierarchy's mount (:class:`CgroupNames`):
one system call per cgroup, whatever the size of the hierarchy, and exact
(the kernel finds the node by id; a removed cgroup is ESTALE, never another
one). Without CAP_DAC_READ_SEARCH it is refused; then a walk of the mounted
hierarchy, bounded to MAX_WALK directories, compares the directory entries'
inode numbers (``d_ino`` from readdir: no stat per cgroup).

What cannot be had (no object, a kernel or libbpf that refuses it) is one
:class:`BpfError` line; the daemon then reads ``/dev/kmsg`` as before.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from oomwarden.errors import BpfError, OomwardenError
from oomwarden.model import Hierarchy, HierarchyKind
from oomwarden.sources.bpf import (
    PID_MAX_LIMIT,
    check_object,
    libbpf_error,
    libbpf_function,
    libbpf_last_message,
    object_path,
    trim_heap,
)
from oomwarden.sources.cgroupfs import find_hierarchies
from oomwarden.sources.procfs import read_system
from oomwarden.triggers import EPOLLIN, KernelKill, Source
from oomwarden.units import fmt_bytes

#: ``struct ow_kill`` in observer.bpf.c: little endian, natural alignment.
RECORD = struct.Struct("<IIQiiIiiiiiQQQqQQqqqqqhHI16s16s")
RECORD_SIZE = RECORD.size
MAGIC = 0x314B574F  # "OWK1"
assert RECORD_SIZE == 176

#: flags
HAS_OC = 0x01
KILLED = 0x02
HAS_MM = 0x04
HAS_SIGNAL = 0x08
CURRENT = 0x10
AT_LIMIT = 0x20
KNOWN_FLAGS = HAS_OC | KILLED | HAS_MM | HAS_SIGNAL | CURRENT | AT_LIMIT

#: The record's constraint codes, by the kernel's names (-1: not known).
CONSTRAINTS = {-1: None, 0: "CONSTRAINT_NONE", 1: "CONSTRAINT_CPUSET",
               2: "CONSTRAINT_MEMORY_POLICY", 3: "CONSTRAINT_MEMCG"}
#: The largest allocation order the page allocator knows (MAX_PAGE_ORDER is
#: 10 on most configurations; a little room for others).
MAX_ORDER = 16
OBJECT_ENV = "OOMWARDEN_BPF_OBSERVER"
#: The programs: the one without which there is no observer, and the optional ones.
MARK_VICTIM = "ow_mark_victim"
OOM_ENTER = "ow_oom_enter"
OOM_EXIT = "ow_oom_exit"
OOM_KILL = "ow_oom_kill"
OPTIONAL = (OOM_ENTER, OOM_EXIT, OOM_KILL)
RING_MAP = "ow_kills"
LOST_MAP = "ow_lost"
#: At most this many records are kept from one read of the ring buffer
#: (it holds about 1,500); the rest are counted as dropped.
MAX_RECORDS = 4096
#: A walk of a hierarchy looks at most at this many cgroup directories.
MAX_WALK = 20_000
#: Cgroup paths remembered by id, at most.
NAMES_KEPT = 1024
#: kernfs file handles: FILEID_KERNFS, an 8-byte node id.
FILEID_KERNFS = 0xFE


def default_object_path() -> str:
    """$OOMWARDEN_BPF_OBSERVER, else ``observer.bpf.o`` beside the sources."""
    return object_path(OBJECT_ENV, "observer.bpf.o")


# -- the records --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class KillRecord:
    """One decoded ``struct ow_kill``: a task the kernel marked as an OOM victim."""

    time_boot_ns: int
    pid: int
    tgid: int
    uid: int
    comm: str
    oom_pid: int
    oom_tgid: int
    oom_comm: str
    memcg_ino: int
    dfl_ino: int
    #: The OOM's memcg: oc->memcg where the OOM in progress was seen
    #: (``has_oc``), else the charging context's memcg at its limit
    #: (``at_limit``); 0: none (not a memcg OOM, or unknown).
    oom_memcg_ino: int
    #: That memcg's limit in pages (None: no OOM memcg).
    oom_limit: int | None
    #: From the OOM in progress only (None where it was not seen).
    constraint: str | None
    order: int | None
    totalpages: int | None
    chosen_points: int | None
    #: 0: no task chosen yet (the OOMing task was exiting: the kernel's shortcut).
    chosen_tgid: int
    #: None where the victim had no mm any more.
    rss_file: int | None
    rss_anon: int | None
    rss_shmem: int | None
    swapents: int | None
    pgtables_bytes: int | None
    oom_score_adj: int | None
    flags: int

    @property
    def has_oc(self) -> bool:
        return bool(self.flags & HAS_OC)

    @property
    def at_limit(self) -> bool:
        return bool(self.flags & AT_LIMIT)

    @property
    def domain_from(self) -> str:
        """How the OOM's domain is known: ``oom_control`` (read from the OOM
        in progress), ``memcg at its limit`` (inferred), or ``no memcg at its
        limit`` (inferred: a system OOM)."""
        if self.has_oc:
            return "oom_control"
        return "memcg at its limit" if self.at_limit else "no memcg at its limit"

    @property
    def killed(self) -> bool:
        return bool(self.flags & KILLED)

    @property
    def group_member(self) -> bool:
        """Killed with the chosen task as a member of its memory.oom.group."""
        return self.killed and self.chosen_tgid not in (0, self.tgid)


def _text(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", "backslashreplace")


def decode_record(data: bytes) -> KillRecord:
    """One ring-buffer record; :class:`BpfError` for anything that is not one."""
    if len(data) != RECORD_SIZE:
        raise BpfError(f"BPF kill record of {len(data)} bytes, expected {RECORD_SIZE} "
                       "(an observer object built for another layout?)")
    (magic, flags, time_ns, pid, tgid, uid, oom_pid, oom_tgid, chosen_tgid, constraint,
     order, memcg, dfl, oom_memcg, points, totalpages, limit, rfile, ranon, rshmem, swap, pte, adj,
     pad0, pad1, comm, oom_comm) = RECORD.unpack(data)
    if magic != MAGIC:
        raise BpfError(f"BPF kill record: bad magic {magic:#x} (expected {MAGIC:#x})")
    if flags & ~KNOWN_FLAGS:
        raise BpfError(f"BPF kill record: unknown flags {flags:#x}")
    if pad0 or pad1:
        raise BpfError("BPF kill record: padding is not zero")
    if not (0 < pid <= PID_MAX_LIMIT and 0 < tgid <= PID_MAX_LIMIT
            and 0 <= oom_pid <= PID_MAX_LIMIT and 0 <= oom_tgid <= PID_MAX_LIMIT
            and 0 <= chosen_tgid <= PID_MAX_LIMIT):
        raise BpfError(f"BPF kill record: pid {pid}, tgid {tgid}, OOM pid {oom_pid}/"
                       f"{oom_tgid}, chosen {chosen_tgid} out of range (0..{PID_MAX_LIMIT})")
    if bool(flags & CURRENT) != (pid == oom_pid):
        raise BpfError(f"BPF kill record: the 'current' flag disagrees with pid {pid} and "
                       f"OOM pid {oom_pid}")
    if constraint not in CONSTRAINTS:
        raise BpfError(f"BPF kill record: unknown constraint code {constraint}")
    has_oc = bool(flags & HAS_OC)
    at_limit = bool(flags & AT_LIMIT)
    if has_oc and at_limit:
        raise BpfError("BPF kill record: both the OOM in progress and a memcg at its limit")
    if has_oc:
        if not 0 <= order <= MAX_ORDER:
            raise BpfError(f"BPF kill record: allocation order {order} outside 0..{MAX_ORDER}")
        if (oom_memcg != 0) != (constraint == 3):
            raise BpfError(f"BPF kill record: OOM memcg id {oom_memcg} with constraint "
                           f"{CONSTRAINTS[constraint]}")
    elif flags & KILLED or points or totalpages or order or chosen_tgid or constraint != -1:
        raise BpfError("BPF kill record: OOM fields set without the OOM in progress")
    elif at_limit != (oom_memcg != 0):
        raise BpfError(f"BPF kill record: OOM memcg id {oom_memcg} without the flag that "
                       "says how it was found")
    if (limit and not oom_memcg) or (at_limit and not limit):
        raise BpfError(f"BPF kill record: limit {limit} pages with OOM memcg id {oom_memcg}")
    if flags & HAS_SIGNAL:
        if not -1000 <= adj <= 1000:
            raise BpfError(f"BPF kill record: oom_score_adj {adj} outside -1000..1000")
    elif adj:
        raise BpfError("BPF kill record: oom_score_adj set without a signal struct")
    has_mm = bool(flags & HAS_MM)
    if has_mm and pte < 0:
        raise BpfError(f"BPF kill record: negative page-table bytes {pte}")
    if not has_mm and (rfile or ranon or rshmem or swap or pte):
        raise BpfError("BPF kill record: memory counters set without an mm")
    # get_mm_counter() is percpu_counter_read_positive(): clamp at 0.
    return KillRecord(
        time_ns, pid, tgid, uid, _text(comm), oom_pid, oom_tgid, _text(oom_comm), memcg, dfl,
        oom_memcg, limit or None, CONSTRAINTS[constraint] if has_oc else None,
        order if has_oc else None, totalpages if has_oc else None,
        points if has_oc and chosen_tgid else None, chosen_tgid,
        max(rfile, 0) if has_mm else None, max(ranon, 0) if has_mm else None,
        max(rshmem, 0) if has_mm else None, max(swap, 0) if has_mm else None,
        pte if has_mm else None, adj if flags & HAS_SIGNAL else None, flags)


# -- cgroup ids to paths -------------------------------------------------------------------


class _FileHandle(ctypes.Structure):
    _fields_ = [("handle_bytes", ctypes.c_uint), ("handle_type", ctypes.c_int),
                ("f_handle", ctypes.c_ubyte * 8)]


_libc = ctypes.CDLL(None, use_errno=True)


class CgroupNames:
    """Cgroup kernfs ids to paths inside their hierarchy (``/a/b``), for the
    memory controller's hierarchy and the v2 one; None for a cgroup that is
    gone (or not found within MAX_WALK directories)."""

    def __init__(self, hierarchies: Iterable[Hierarchy]) -> None:
        found = [h for h in hierarchies if h.verified]
        self.memory = next((h for h in found if h.has_memory), None)
        self.v2 = next((h for h in found if h.kind is HierarchyKind.V2), None)
        self._cache: dict[tuple[str, int], str] = {}
        self.by_handle = True

    @classmethod
    def here(cls) -> CgroupNames:
        try:
            return cls(find_hierarchies())
        except OomwardenError:
            return cls(())

    def memcg(self, ino: int) -> str | None:
        return self._path(self.memory, ino)

    def dfl(self, ino: int) -> str | None:
        return self._path(self.v2, ino)

    def _path(self, h: Hierarchy | None, ino: int) -> str | None:
        if h is None or ino <= 0:
            return None
        key = (h.mount_point, ino)
        known = self._cache.get(key)
        if known is not None:
            return known
        rel = self._by_handle(h, ino) if self.by_handle else None
        if rel is None and not self.by_handle:
            rel = _walk(h.mount_point, ino)
        if rel is None:
            return None
        path = os.path.normpath("/" + (h.root.rstrip("/") + "/" + rel.lstrip("/")).strip("/"))
        if len(self._cache) >= NAMES_KEPT:
            self._cache.clear()
        self._cache[key] = path
        return path

    def _by_handle(self, h: Hierarchy, ino: int) -> str | None:
        """open_by_handle_at() on the mount; the path below the mount point.
        Refused (no CAP_DAC_READ_SEARCH, no export support): the walk from
        now on."""
        handle = _FileHandle(8, FILEID_KERNFS, (ctypes.c_ubyte * 8)(*ino.to_bytes(8, "little")))
        try:
            mount_fd = os.open(h.mount_point, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            fd = _libc.open_by_handle_at(mount_fd, ctypes.byref(handle),
                                         os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            err = ctypes.get_errno()
        finally:
            os.close(mount_fd)
        if fd < 0:
            if err in (errno.EPERM, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                self.by_handle = False
                return _walk(h.mount_point, ino)
            return None  # ESTALE, ENOENT: the cgroup is gone
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            return None
        finally:
            os.close(fd)
        mount = h.mount_point.rstrip("/")
        if target.endswith(" (deleted)") or not (target == mount
                                                 or target.startswith(mount + "/")):
            return None
        return target[len(mount):] or "/"


def _walk(mount_point: str, ino: int) -> str | None:
    """The directory with inode ``ino`` below ``mount_point`` (breadth first,
    at most MAX_WALK directories), as a path below it."""
    try:
        if os.stat(mount_point).st_ino == ino:
            return "/"
    except OSError:
        return None
    queue = [""]
    seen = 0
    while queue and seen < MAX_WALK:
        rel = queue.pop(0)
        try:
            with os.scandir(os.path.join(mount_point, rel.lstrip("/")) or mount_point) as it:
                for entry in it:
                    if not entry.is_dir(follow_symlinks=False):
                        continue
                    child = f"{rel}/{entry.name}"
                    if entry.inode() == ino:
                        return child
                    queue.append(child)
        except OSError:
            pass
        seen += 1
    return None


# -- the kills ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ObservedKill(KernelKill):
    """A :class:`KernelKill` seen by the observer: ``pid`` is the process
    (tgid), ``task_memcg`` and ``oom_memcg`` are hierarchy paths ("" for a
    global OOM's memcg), ``detail`` says why the kernel chose it."""

    record: KillRecord | None = None
    cgroup_v2: str | None = None
    #: "killed", "oom.group member", or "killed?" (the kill probe is missing:
    #: a marked task that was exiting already cannot be told apart).
    kind: str = "killed"
    #: Wall-clock time of the mark (from the record's boot time).
    time_ns: int = 0
    #: The victim's badness from its counters at the mark, and the domain's
    #: size it was counted against (None: unknown).
    points: int | None = None
    totalpages: int | None = None

    def victim_fields(self) -> dict[str, Any]:
        """What the decision-log record's ``victim`` gains (docs/decision-log.md)."""
        r = self.record
        if r is None:
            return {}
        psize = os.sysconf("SC_PAGE_SIZE")
        rss = None
        if r.rss_anon is not None:
            rss = {"anon": r.rss_anon * psize, "file": (r.rss_file or 0) * psize,
                   "shmem": (r.rss_shmem or 0) * psize}
        return {"thread": r.pid, "uid": r.uid, "oom_score_adj": r.oom_score_adj,
                "rss_bytes": rss,
                "swap_bytes": None if r.swapents is None else r.swapents * psize,
                "pgtables_bytes": r.pgtables_bytes, "cgroup_v2": self.cgroup_v2,
                "kind": self.kind, "points": self.points, "totalpages": self.totalpages}

    def oom_fields(self) -> dict[str, Any]:
        """The record's ``oom``: the OOM the kernel was handling. ``from``
        says how its domain is known; ``constraint``, ``order``,
        ``totalpages`` and ``chosen_points`` are the oom_control's, null
        where the OOM in progress was not seen."""
        r = self.record
        if r is None:
            return {}
        return {"from": r.domain_from, "memcg": self.oom_memcg or None,
                "limit_pages": r.oom_limit, "constraint": r.constraint, "order": r.order,
                "totalpages": r.totalpages, "chosen_points": r.chosen_points,
                "chosen_pid": r.chosen_tgid or None,
                "task": {"pid": r.oom_tgid, "thread": r.oom_pid, "comm": r.oom_comm}}


def _size(pages: int | None, psize: int) -> str:
    return fmt_bytes(None if pages is None else pages * psize)


def domain_pages(r: KillRecord, psize: int) -> int | None:
    """The OOM domain's size in pages: the oom_control's ``totalpages``;
    inferred, the memcg's limit (where there is no swap: with swap the
    kernel adds part of it, which the record does not hold), or the
    system's MemTotal + SwapTotal."""
    if r.totalpages is not None:
        return r.totalpages
    try:
        system = read_system(psize=psize)
    except OomwardenError:
        return None
    if r.oom_limit is not None:
        return r.oom_limit if system.swap_total == 0 else None
    return system.totalpages


def victim_points(r: KillRecord, totalpages: int | None, psize: int) -> int | None:
    """The victim's badness as ``oom_badness()`` counts it, from the record's
    counters (the same unsummed ones): rss + swap entries + page-table pages
    + oom_score_adj * (totalpages / 1000)."""
    if r.rss_anon is None or r.oom_score_adj is None:
        return None
    base = ((r.rss_file or 0) + r.rss_anon + (r.rss_shmem or 0) + (r.swapents or 0)
            + (r.pgtables_bytes or 0) // psize)
    if r.oom_score_adj == 0:
        return base
    if totalpages is None:
        return None
    return base + r.oom_score_adj * (totalpages // 1000)


def because(r: KillRecord, kind: str, task_memcg: str, oom_memcg: str, *, psize: int,
            points: int | None, totalpages: int | None) -> str:
    """Why the kernel took this task, in words (the record's ``event_detail``
    ends with it)."""
    who = f"pid {r.tgid} ({r.comm})" + (f" thread {r.pid}" if r.pid != r.tgid else "")
    memory = (f"rss anon {_size(r.rss_anon, psize)}, file {_size(r.rss_file, psize)}, "
              f"shmem {_size(r.rss_shmem, psize)}, swap {_size(r.swapents, psize)}"
              if r.rss_anon is not None else "no mm left")
    adj = f"oom_score_adj {r.oom_score_adj}" if r.oom_score_adj is not None else "no adj"
    of = f"of {totalpages} pages" if totalpages is not None else "(domain size unknown)"
    if kind == "oom.group member":
        why = (f"a member of the memory.oom.group of the chosen pid {r.chosen_tgid} "
               f"({r.chosen_points} points {of})")
    elif r.has_oc and r.chosen_tgid == 0:
        why = "it was running the OOM itself and exiting already"
    elif r.has_oc:
        why = f"the kernel's badness chose it: {r.chosen_points} points {of}"
    else:
        shown = "?" if points is None else str(points)
        why = f"the kernel's badness chose it: {shown} points {of} by its counters at the kill"
    if r.has_oc:
        where = (f"at the limit of {oom_memcg or '?'}" if r.oom_memcg_ino
                 else "in a system-wide OOM") + f" ({r.constraint}, order {r.order})"
    elif r.at_limit:
        where = (f"at the limit of {oom_memcg or '?'} ({_size(r.oom_limit, psize)}; the "
                 "deepest memcg of the OOM's context at its limit: the oom_control is not "
                 "readable here)")
    else:
        where = "in a system-wide OOM (no memcg of the OOM's context at its limit)"
    runner = "itself" if r.oom_pid == r.pid else f"pid {r.oom_tgid} ({r.oom_comm})"
    return (f"{who} of {task_memcg or '?'} {where}: {why} ({adj}, {memory}); the OOM was "
            f"run by {runner}; seen by BPF (tp_btf/mark_victim)")


def to_kill(r: KillRecord, names: CgroupNames, *, kill_known: bool,
            boot_offset_ns: int | None = None) -> ObservedKill | None:
    """The kill a record stands for; None for a task the kernel only marked
    (it was exiting already: no SIGKILL, not counted in ``oom_kill``), where
    that can be told (``kill_known``: the fentry probes are attached)."""
    if kill_known and r.has_oc and not r.killed:
        return None
    kind = ("oom.group member" if r.group_member
            else "killed" if (kill_known and r.has_oc) else "killed?")
    task_memcg = names.memcg(r.memcg_ino) or ""
    oom_memcg = (names.memcg(r.oom_memcg_ino) or "") if r.oom_memcg_ino else ""
    if boot_offset_ns is None:
        boot_offset_ns = time.time_ns() - time.clock_gettime_ns(time.CLOCK_BOOTTIME)
    psize = os.sysconf("SC_PAGE_SIZE")
    totalpages = domain_pages(r, psize)
    points = victim_points(r, totalpages, psize)
    if r.has_oc:
        constraint = r.constraint or ""
    else:  # inferred: a memcg at its limit, or none (a system OOM)
        constraint = "CONSTRAINT_MEMCG" if r.at_limit else "CONSTRAINT_NONE"
    return ObservedKill(
        oom_memcg=oom_memcg, task_memcg=task_memcg, pid=r.tgid, comm=r.comm,
        constraint=constraint,
        detail=because(r, kind, task_memcg, oom_memcg, psize=psize, points=points,
                       totalpages=totalpages), record=r,
        cgroup_v2=names.dfl(r.dfl_ino), kind=kind, time_ns=r.time_boot_ns + boot_offset_ns,
        points=points, totalpages=totalpages)


# -- libbpf ---------------------------------------------------------------------------------

_vp = ctypes.c_void_p
_SAMPLE_FN = ctypes.CFUNCTYPE(ctypes.c_int, _vp, _vp, ctypes.c_size_t)


def _lib() -> dict[str, Any]:
    sig: dict[str, tuple[list[Any], Any]] = {
        "bpf_object__open_file": ([ctypes.c_char_p, _vp], _vp),
        "bpf_object__load": ([_vp], ctypes.c_int),
        "bpf_object__close": ([_vp], None),
        "bpf_object__find_program_by_name": ([_vp, ctypes.c_char_p], _vp),
        "bpf_object__find_map_fd_by_name": ([_vp, ctypes.c_char_p], ctypes.c_int),
        "bpf_program__set_autoload": ([_vp, ctypes.c_bool], ctypes.c_int),
        "bpf_program__attach": ([_vp], _vp),
        "bpf_link__destroy": ([_vp], ctypes.c_int),
        "ring_buffer__new": ([ctypes.c_int, _vp, _vp, _vp], _vp),
        "ring_buffer__epoll_fd": ([_vp], ctypes.c_int),
        "ring_buffer__consume": ([_vp], ctypes.c_int),
        "ring_buffer__free": ([_vp], None),
        "bpf_map_lookup_elem": ([ctypes.c_int, _vp, _vp], ctypes.c_int),
    }
    return {name: libbpf_function(name, args, res) for name, (args, res) in sig.items()}


class Observer:
    """The loaded observer: its links, its ring buffer. :meth:`read` drains
    the ring buffer; :meth:`close` destroys every link, frees the ring buffer
    and closes the object (idempotent)."""

    def __init__(self, object_path: str) -> None:
        self.object_path = object_path
        self._obj: int | None = None
        self._links: dict[str, int] = {}
        self._rb: int | None = None
        self._pending: list[bytes] = []
        self.dropped = 0
        #: Optional programs not in use, and why.
        self.missing: dict[str, str] = {}
        check_object(object_path)
        self._f = _lib()
        self._callback = _SAMPLE_FN(self._on_sample)
        try:
            self._load()
            self._attach()
            ring_fd = self._f["bpf_object__find_map_fd_by_name"](self._obj, RING_MAP.encode())
            if ring_fd < 0:
                raise BpfError(f"{object_path} has no ring buffer {RING_MAP}")
            rb = self._f["ring_buffer__new"](ring_fd, ctypes.cast(self._callback, _vp), None,
                                             None)
            if not rb:
                raise libbpf_error("cannot set up the BPF ring buffer", ctypes.get_errno(), None)
            self._rb = rb
            self.fd = int(self._f["ring_buffer__epoll_fd"](rb))
        except BaseException:
            self.close()
            raise
        trim_heap()

    def _open(self, optional: bool) -> None:
        before = libbpf_last_message()
        obj = self._f["bpf_object__open_file"](self.object_path.encode(), None)
        if not obj:
            raise libbpf_error(f"cannot open BPF object {self.object_path}", ctypes.get_errno(),
                          before)
        self._obj = obj
        for name in (MARK_VICTIM, *OPTIONAL):
            prog = self._f["bpf_object__find_program_by_name"](obj, name.encode())
            if not prog:
                raise BpfError(f"{self.object_path} has no program {name}")
            if not optional and name in OPTIONAL:
                self._f["bpf_program__set_autoload"](prog, False)

    def _load(self) -> None:
        """Everything; where the kernel refuses that, the tracepoint alone."""
        self._open(optional=True)
        rc = self._f["bpf_object__load"](self._obj)
        if rc == 0:
            return
        first = f"the kernel refused them: {os.strerror(-rc)}"
        self._f["bpf_object__close"](self._obj)
        self._obj = None
        self._open(optional=False)
        before = libbpf_last_message()
        rc = self._f["bpf_object__load"](self._obj)
        if rc < 0:
            raise libbpf_error(f"the kernel refused to load {self.object_path}", -rc, before)
        for name in OPTIONAL:
            self.missing[name] = first

    def _attach(self) -> None:
        assert self._obj is not None

        def attach(name: str) -> str | None:
            prog = self._f["bpf_object__find_program_by_name"](self._obj, name.encode())
            before = libbpf_last_message()
            link = self._f["bpf_program__attach"](prog)
            if not link:
                return str(libbpf_error("not attached", ctypes.get_errno(), before))
            self._links[name] = link
            return None

        why = attach(MARK_VICTIM)
        if why is not None:
            raise BpfError(f"cannot attach tp_btf/mark_victim: {why}")
        if OOM_ENTER in self.missing:
            return
        # Both or neither: an entry without its exit would leave stale entries.
        why = attach(OOM_ENTER) or attach(OOM_EXIT)
        if why is not None:
            self._detach(OOM_ENTER)
            self.missing[OOM_ENTER] = self.missing[OOM_EXIT] = why
            self.missing[OOM_KILL] = "useless without the out_of_memory probes"
            return
        why = attach(OOM_KILL)
        if why is not None:
            self.missing[OOM_KILL] = why

    def _detach(self, name: str) -> None:
        link = self._links.pop(name, None)
        if link is not None:
            self._f["bpf_link__destroy"](link)

    @property
    def sees_oom(self) -> bool:
        """The OOM in progress is seen (its domain and points are in the records)."""
        return OOM_ENTER in self._links and OOM_EXIT in self._links

    @property
    def sees_kills(self) -> bool:
        """Killed tasks are told from tasks that were only marked (exiting)."""
        return self.sees_oom and OOM_KILL in self._links

    @property
    def programs(self) -> tuple[str, ...]:
        return tuple(self._links)

    def _on_sample(self, _ctx: int | None, data: int | None, size: int) -> int:
        try:  # a callback must never raise into C
            if len(self._pending) < MAX_RECORDS and data:
                self._pending.append(ctypes.string_at(data, size))
            else:
                self.dropped += 1
        except Exception:
            self.dropped += 1
        return 0

    def read(self) -> list[bytes]:
        """Every record in the ring buffer now (at most MAX_RECORDS kept)."""
        if self._rb is None:
            raise BpfError("the OOM observer is closed")
        rc = self._f["ring_buffer__consume"](self._rb)
        out, self._pending = self._pending, []
        if rc < 0 and rc != -errno.EINTR:
            raise BpfError(f"reading the observer's ring buffer: {os.strerror(-rc)}")
        return out

    def lost(self) -> int:
        """Records the BPF side could not write (the ring buffer was full)."""
        if self._obj is None:
            return 0
        fd = self._f["bpf_object__find_map_fd_by_name"](self._obj, LOST_MAP.encode())
        if fd < 0:
            return 0
        key = ctypes.c_uint32(0)
        value = ctypes.c_uint64(0)
        if self._f["bpf_map_lookup_elem"](fd, ctypes.byref(key), ctypes.byref(value)) != 0:
            return 0
        return int(value.value)

    def close(self) -> None:
        if self._rb is not None:
            self._f["ring_buffer__free"](self._rb)
            self._rb = None
            self.fd = -1
        for name in list(self._links):
            self._detach(name)
        if self._obj is not None:
            self._f["bpf_object__close"](self._obj)
            self._obj = None

    def __enter__(self) -> Observer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- the daemon's source ----------------------------------------------------------------


@dataclass
class ObserverSource(Source):
    """The observer as a source of the daemon's loop: its fd is the ring
    buffer's epoll fd; :meth:`fired` drains it into :attr:`kills` (as the
    /dev/kmsg source does), leaving out tasks that were only marked."""

    observer: Observer | None = None
    names: CgroupNames = field(default_factory=lambda: CgroupNames(()))
    kills: list[KernelKill] = field(default_factory=list)
    #: Marked tasks that were exiting already (not kills), bad records.
    marked_only: int = 0
    bad_records: int = 0
    last_problem: str | None = None

    @classmethod
    def open(cls, object_path: str | None = None) -> ObserverSource:
        """Load and attach; :class:`BpfError` (one line) where it cannot be had."""
        path = object_path or default_object_path()
        observer = Observer(path)
        try:
            names = CgroupNames.here()
        except BaseException:
            observer.close()
            raise
        return cls("kernel", "the kernel's OOM kills (BPF observer)", observer.fd, EPOLLIN,
                   observer=observer, names=names)

    @property
    def detail(self) -> str:
        """One line for ``status``: what is attached and what is not."""
        obs = self.observer
        if obs is None:
            return "closed"
        if obs.sees_kills:
            return ("tp_btf/mark_victim, fentry/fexit out_of_memory and fentry "
                    "__oom_kill_process on a ring buffer")
        if obs.sees_oom:
            return ("tp_btf/mark_victim and fentry/fexit out_of_memory on a ring buffer "
                    f"(no fentry __oom_kill_process: {obs.missing.get(OOM_KILL, '?')}: a task "
                    "the kernel only marks, exiting already, counts as a kill)")
        return ("tp_btf/mark_victim on a ring buffer; fentry/fexit out_of_memory not "
                f"attached ({obs.missing.get(OOM_ENTER, '?')}): the OOM's memcg is the "
                "deepest memcg at its limit, and a task the kernel only marks, exiting "
                "already, counts as a kill")

    def fired(self, events: int) -> str | None:
        obs = self.observer
        if obs is None:
            return None
        try:
            raw = obs.read()
        except BpfError as e:
            self.last_problem = str(e)
            return None
        offset = time.time_ns() - time.clock_gettime_ns(time.CLOCK_BOOTTIME)
        for data in raw:
            try:
                record = decode_record(data)
            except BpfError as e:
                self.bad_records += 1
                self.last_problem = str(e)
                continue
            kill = to_kill(record, self.names, kill_known=obs.sees_kills,
                           boot_offset_ns=offset)
            if kill is None:
                self.marked_only += 1
            else:
                self.kills.append(kill)
        del self.kills[:-MAX_RECORDS]
        return None

    def close(self) -> None:
        if self.observer is not None:
            self.observer.close()
            self.observer = None
        self.fd = -1


def open_source(object_path: str | None = None) -> tuple[ObserverSource | None, str]:
    """The observer, or None and why (one line)."""
    try:
        src = ObserverSource.open(object_path)
    except BpfError as e:
        return None, str(e)
    return src, src.detail
