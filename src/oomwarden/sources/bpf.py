"""The BPF snapshot source: every process in one pass of a BPF task iterator.

``src/oomwarden/bpf/tasks.bpf.c`` is an ``iter/task`` program; the build
(``make bpf``, docs/bpf.md) compiles it with clang against a ``vmlinux.h``
dumped from this kernel's BTF. Here it is loaded through the system's
``libbpf.so.1`` with :mod:`ctypes` (no compiled Python extension: the
machine's libbpf 1.1 does load, attach and ``bpf_iter_create``, and PyPI's
bindings either lack iterators or need a newer Python), attached once, and
every snapshot is one pass of reads of a fresh iterator fd: fixed-size
records, decoded by :func:`decode_records` into the same :class:`Task` the
procfs source makes.

What the records hold and how it compares with procfs (docs/bpf.md):

* the rss counters are the percpu_counters' shared ``count`` (unsummed, as
  ``get_mm_counter()`` reads them, clamped at 0 here): ``oom_rss`` is
  exactly ``get_mm_rss()`` as ``oom_badness()`` sees it, like
  ``/proc/PID/stat`` field 24. The split ``rss_anon/file/shmem`` are the same
  unsummed values (procfs shows the summed ones since Linux 6.16): each may
  differ from ``/proc/PID/status`` by the per-CPU slack;
* swap entries are unsummed too, as ``oom_badness()`` reads them (procfs has
  only the summed VmSwap);
* ``in_vfork`` is the kernel's own test (``vfork_done`` and the parent's
  mm), not the procfs heuristic;
* exe, cmdline and the kernel's ``oom_score`` are not in the records: they
  are read from /proc only when asked (``ReadOptions``), per process.

PIDs in the records are the initial PID namespace's: the source refuses a
/proc that shows another namespace.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from oomwarden.errors import BpfError, ParseError
from oomwarden.model import Cgroup, Hierarchy, HierarchyKind, Task
from oomwarden.sources.parse import parse_proc_cgroup, parse_single_int
from oomwarden.sources.procfs import (
    MAX_PROBLEMS,
    CgroupMap,
    ReadOptions,
    ReadStats,
    initial_pidns,
    is_live_procfs,
    read_at,
    read_tasks,
    with_details,
)

#: ``struct ow_task`` in tasks.bpf.c, little endian, natural alignment.
RECORD = struct.Struct("<I3i3Q5q4IhH16sI")
RECORD_SIZE = RECORD.size
MAGIC = 0x3154574F  # "OWT1"
assert RECORD_SIZE == 120

#: rec_flags
HAS_MM = 0x1
IN_VFORK = 0x2
LEADER = 0x4
HAS_SIGNAL = 0x8
PF_KTHREAD = 0x00200000
#: A pid above this is no PID the kernel hands out (PID_MAX_LIMIT, 4M).
PID_MAX_LIMIT = 4 * 1024 * 1024
PROGRAM = "dump_task"
OBJECT_ENV = "OOMWARDEN_BPF_OBJECT"
READ_CHUNK = 1 << 20

# task_state_index() (include/linux/sched.h)
_TASK_REPORT = 0x7F
_TASK_IDLE = 0x402
_TASK_RTLOCK_WAIT = 0x1000
_TASK_UNINTERRUPTIBLE = 0x2
_STATE_CHARS = "RSDTtXZPI"
_TASK_REPORT_IDLE = _TASK_REPORT + 1


def state_char(state: int, exit_state: int) -> str:
    """The letter /proc/PID/stat shows, computed as ``task_state_index()`` does."""
    index = (state | exit_state) & _TASK_REPORT
    if state == _TASK_IDLE:
        index = _TASK_REPORT_IDLE
    elif state == _TASK_RTLOCK_WAIT:
        index = _TASK_UNINTERRUPTIBLE
    return _STATE_CHARS[index.bit_length()]


@dataclass(frozen=True, slots=True)
class Record:
    """One decoded record (the raw counters, before the clamp)."""

    pid: int
    tgid: int
    ppid: int
    start_boottime_ns: int
    memcg_ino: int
    dfl_ino: int
    rss_file: int
    rss_anon: int
    rss_shmem: int
    swapents: int
    pgtables_bytes: int
    uid: int
    state: str
    flags: int
    oom_score_adj: int | None
    rec_flags: int
    comm: bytes

    @property
    def leader(self) -> bool:
        return bool(self.rec_flags & LEADER)

    @property
    def has_mm(self) -> bool:
        return bool(self.rec_flags & HAS_MM)


def _check_size(data: bytes) -> None:
    if len(data) % RECORD_SIZE:
        raise BpfError(
            f"BPF task records: {len(data)} bytes is not a multiple of the "
            f"record size {RECORD_SIZE} (an object built for another layout?)"
        )


#: A record as RECORD unpacks it.
RawRecord = tuple[int, int, int, int, int, int, int, int, int, int, int, int, int, int, int,
                  int, int, int, bytes, int]


def _check_record(i: int, f: RawRecord) -> None:
    """Record ``i``'s sanity, or :class:`BpfError` naming what is wrong."""
    magic, pid, tgid, ppid, pte, adj, rflags = f[0], f[1], f[2], f[3], f[11], f[16], f[17]
    if magic != MAGIC:
        raise BpfError(f"BPF task record {i}: bad magic {magic:#x} (expected {MAGIC:#x})")
    if not (0 <= pid <= PID_MAX_LIMIT and 0 < tgid <= PID_MAX_LIMIT
            and 0 <= ppid <= PID_MAX_LIMIT):
        raise BpfError(f"BPF task record {i}: pid {pid}, tgid {tgid}, ppid {ppid} "
                       f"out of range (0..{PID_MAX_LIMIT})")
    if rflags & LEADER and pid != tgid:
        raise BpfError(f"BPF task record {i}: a leader with pid {pid} != tgid {tgid}")
    if not -1000 <= adj <= 1000:
        raise BpfError(f"BPF task record {i}: oom_score_adj {adj} outside -1000..1000")
    if pte < 0:
        raise BpfError(f"BPF task record {i}: negative page-table bytes {pte}")


_state_chars: dict[tuple[int, int], str] = {}


def _state(state: int, exit_state: int) -> str:
    """:func:`state_char`, remembered (a few distinct values per system)."""
    key = (state, exit_state)
    got = _state_chars.get(key)
    if got is None:
        got = state_char(state, exit_state)
        if len(_state_chars) < 256:
            _state_chars[key] = got
    return got


def decode_records(data: bytes) -> list[Record]:
    """Decode what the iterator fd gave; anything else than whole, sane
    records raises :class:`BpfError` (and nothing else)."""
    _check_size(data)
    out: list[Record] = []
    for i, f in enumerate(RECORD.iter_unpack(data)):
        _check_record(i, f)
        (_magic, pid, tgid, ppid, start, memcg, dfl, rfile, ranon, rshmem, swap, pte,
         uid, state, exit_state, flags, adj, rflags, comm, _pad) = f
        out.append(Record(
            pid, tgid, ppid, start, memcg, dfl, rfile, ranon, rshmem, swap, pte, uid,
            _state(state, exit_state), flags,
            adj if rflags & HAS_SIGNAL else None, rflags, comm.split(b"\0", 1)[0],
        ))
    return out


def _make_task(
    pid: int, tgid: int, ppid: int, *, comm: bytes, state: str, start_ns: int, uid: int,
    flags: int, adj: int | None, mm_flags: int, rss_file: int, rss_anon: int,
    rss_shmem: int, swapents: int, pgtables_bytes: int, paths: tuple[str | None, str | None],
    psize: int, tick_ns: int,
) -> Task:
    """A record's Task; ``mm_flags`` and the counters are those of the record
    whose mm stands for the process (the leader's, or a thread's)."""
    kthread = bool(flags & PF_KTHREAD)
    has_mm = bool(mm_flags & HAS_MM) and not kthread
    anon = file = shmem = swap = pte = oom_rss = None
    if has_mm:
        # get_mm_counter() is percpu_counter_read_positive(): clamp at 0.
        file = max(rss_file, 0)
        anon = max(rss_anon, 0)
        shmem = max(rss_shmem, 0)
        swap = max(swapents, 0)
        pte = pgtables_bytes // psize
        oom_rss = file + anon + shmem
    return Task(
        pid, tgid, ppid, comm.decode("utf-8", "backslashreplace"), state, start_ns // tick_ns,
        uid, kthread, has_mm, anon, file, shmem, swap, pte, adj, paths[0], paths[1],
        None, None, None, psize, oom_rss, pid == 1, bool(mm_flags & IN_VFORK) and has_mm,
    )


# -- libbpf through ctypes ------------------------------------------------------

_c_void_p = ctypes.c_void_p
_PRINT_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
#: libbpf's last warning lines (LIBBPF_WARN == 0), for the one-line reason.
_libbpf_messages: list[str] = []
#: The loaded library and its print callback (kept alive while libbpf may call it).
_loaded: dict[str, Any] = {}


def _libbpf() -> ctypes.CDLL:
    lib_now: ctypes.CDLL | None = _loaded.get("lib")
    if lib_now is not None:
        return lib_now
    try:
        lib = ctypes.CDLL("libbpf.so.1", use_errno=True)
    except OSError as e:
        raise BpfError(f"cannot load libbpf.so.1 ({e}); install Debian's libbpf1") from None
    signatures: dict[str, tuple[list[Any], Any]] = {
        "bpf_object__open_file": ([ctypes.c_char_p, _c_void_p], _c_void_p),
        "bpf_object__load": ([_c_void_p], ctypes.c_int),
        "bpf_object__find_program_by_name": ([_c_void_p, ctypes.c_char_p], _c_void_p),
        "bpf_program__attach_iter": ([_c_void_p, _c_void_p], _c_void_p),
        "bpf_link__fd": ([_c_void_p], ctypes.c_int),
        "bpf_link__destroy": ([_c_void_p], ctypes.c_int),
        "bpf_object__close": ([_c_void_p], None),
        "bpf_iter_create": ([ctypes.c_int], ctypes.c_int),
        "libbpf_set_print": ([_c_void_p], _c_void_p),
    }
    for name, (args, res) in signatures.items():
        _typed(lib, name, args, res)
    callback = _PRINT_FN(_on_libbpf_print)
    lib.libbpf_set_print(ctypes.cast(callback, _c_void_p))
    _loaded["callback"] = callback
    _loaded["lib"] = lib
    return lib


def _typed(lib: ctypes.CDLL, name: str, argtypes: list[Any], restype: Any) -> Any:
    try:
        fn = getattr(lib, name)
    except AttributeError:
        raise BpfError(f"libbpf.so.1 lacks {name} (too old a libbpf?)") from None
    fn.argtypes = argtypes
    fn.restype = restype
    return fn


def libbpf_function(name: str, argtypes: list[Any], restype: Any) -> Any:
    """One more libbpf.so.1 function, typed (for the other BPF parts: the
    observer, struct_ops detection); :class:`BpfError` where the library or
    the function is missing."""
    return _typed(_libbpf(), name, argtypes, restype)


def trim_heap() -> None:
    """Give the heap libbpf freed back to the system. Loading an object (CO-RE)
    or reading BTF parses the kernel's whole BTF and frees it; glibc keeps
    that in the heap, which the daemon locks (mlockall). Measured for the
    observer: 27.8 MiB resident after its load, 15.9 MiB after the trim.
    glibc only; elsewhere nothing."""
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if trim is not None:
        trim(0)


def libbpf_last_message() -> str | None:
    """libbpf's last warning line (captured by the print callback), if any."""
    return _libbpf_messages[-1] if _libbpf_messages else None


def _on_libbpf_print(level: int, fmt: bytes | None, args: int | None) -> int:
    """libbpf's print callback: keep warnings (for the reason), print nothing."""
    if level != 0 or fmt is None:
        return 0
    try:
        libc = ctypes.CDLL(None)
        buf = ctypes.create_string_buffer(512)
        libc.vsnprintf(buf, ctypes.c_size_t(len(buf)), ctypes.c_char_p(fmt),
                       ctypes.c_void_p(args))
        text = buf.value.decode("utf-8", "replace").strip()
    except Exception:  # a callback must never raise into C
        text = fmt.decode("utf-8", "replace").strip()
    if text:
        del _libbpf_messages[:-3]
        _libbpf_messages.append(text)
    return 0


def libbpf_error(what: str, err: int, before: str | None = None) -> BpfError:
    """``what: strerror(err)``, with libbpf's last warning if it came after
    ``before`` (the last warning when the call began)."""
    last = libbpf_last_message()
    detail = f": {last}" if last and last != before else ""
    return BpfError(f"{what}: {os.strerror(err) if err else 'failed'}{detail}")


#: Where ``make bpf`` puts the objects (``src/oomwarden/bpf``), resolved once.
OBJECT_DIR = Path(__file__).resolve().parent.parent / "bpf"


def object_path(env: str, name: str) -> str:
    """``$env`` if set, else the object ``name`` that ``make bpf`` built."""
    return os.environ.get(env) or str(OBJECT_DIR / name)


def check_object(path: str) -> None:
    """:class:`BpfError` (one line) where there is no object at ``path``."""
    if not os.path.isfile(path):
        raise BpfError(f"no BPF object at {path} (build it with `make bpf`)")


def default_object_path() -> str:
    """$OOMWARDEN_BPF_OBJECT, else ``tasks.bpf.o`` beside the sources (``make bpf``)."""
    return object_path(OBJECT_ENV, "tasks.bpf.o")


class TaskIterator:
    """The loaded and attached ``iter/task`` program. :meth:`read` is one pass."""

    def __init__(self, object_path: str) -> None:
        self.object_path = object_path
        self._obj: int | None = None
        self._link: int | None = None
        self._link_fd = -1
        #: The tasks of the last passes, by record (read_tasks_bpf).
        self.cache = TaskCache()
        check_object(object_path)
        lib = _libbpf()
        _libbpf_messages.clear()
        obj = lib.bpf_object__open_file(object_path.encode(), None)
        if not obj:
            raise libbpf_error(f"cannot open BPF object {object_path}", ctypes.get_errno())
        self._obj = obj
        try:
            rc = lib.bpf_object__load(obj)
            if rc < 0:
                raise libbpf_error(f"the kernel refused to load {object_path}", -rc)
            prog = lib.bpf_object__find_program_by_name(obj, PROGRAM.encode())
            if not prog:
                raise BpfError(f"{object_path} has no program {PROGRAM}")
            link = lib.bpf_program__attach_iter(prog, None)
            if not link:
                raise libbpf_error("cannot attach the BPF task iterator", ctypes.get_errno())
            self._link = link
            self._link_fd = lib.bpf_link__fd(link)
        except BaseException:
            self.close()
            raise
        finally:
            trim_heap()

    def read(self) -> bytes:
        """One pass of the iterator: every record, as bytes."""
        if self._link is None:
            raise BpfError("the BPF task iterator is closed")
        fd = _libbpf().bpf_iter_create(self._link_fd)
        if fd < 0:
            raise BpfError(f"bpf_iter_create failed: {os.strerror(-fd)}")
        try:
            parts: list[bytes] = []
            while True:
                try:
                    chunk = os.read(fd, READ_CHUNK)
                except InterruptedError:
                    continue
                except OSError as e:
                    if e.errno == errno.EAGAIN:
                        continue
                    raise BpfError(f"reading the BPF task iterator: {e.strerror}") from None
                if not chunk:
                    break
                parts.append(chunk)
        finally:
            os.close(fd)
        return b"".join(parts)

    def close(self) -> None:
        """Detach and unload (idempotent)."""
        lib: ctypes.CDLL | None = _loaded.get("lib")
        if lib is None:
            return
        if self._link is not None:
            lib.bpf_link__destroy(self._link)
            self._link = None
            self._link_fd = -1
        if self._obj is not None:
            lib.bpf_object__close(self._obj)
            self._obj = None

    def __enter__(self) -> TaskIterator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


#: One loaded iterator (or the reason it cannot be had) per object path, for
#: the life of the process: loading costs ~40 ms here and a refusal will not change.
_cache: dict[str, TaskIterator | BpfError] = {}


def load(object_path: str | None = None) -> TaskIterator:
    """The process's loaded iterator for ``object_path``; raises the cached
    :class:`BpfError` where it cannot be had."""
    path = object_path or default_object_path()
    got = _cache.get(path)
    if got is None:
        try:
            got = TaskIterator(path)
        except BpfError as e:
            got = e
        _cache[path] = got
    if isinstance(got, BpfError):
        raise got
    return got


def unload_all() -> None:
    """Close every cached iterator (tests, clean exits)."""
    for got in _cache.values():
        if isinstance(got, TaskIterator):
            got.close()
    _cache.clear()


# -- records to tasks -----------------------------------------------------------


def clock_ticks_per_second() -> int:
    return os.sysconf("SC_CLK_TCK")


#: ``memcg_ino`` and ``dfl_ino`` in a record (RECORD's layout).
_CGROUP_IDS = struct.Struct("<QQ")
_CGROUP_IDS_AT = 24


class CgroupResolver:
    """kernfs ids (the records' ``memcg_ino``/``dfl_ino``) to cgroup paths.

    The walked ``cgroups`` give most. An id the walk did not see (a cgroup
    made after it, or one outside an ``only=`` subtree) is looked up in the
    ``/proc/PID/cgroup`` of a task in it; the answer is kept for the other
    tasks of that id only when the path's directory in the mounted hierarchy
    has that inode (the task may have moved since the pass), so there is one
    /proc read per unseen cgroup, not one per task in it.
    """

    def __init__(
        self,
        cgroups: Sequence[Cgroup] = (),
        hierarchies: Sequence[Hierarchy] = (),
        proc_root: str = "/proc",
    ) -> None:
        self.proc_root = proc_root
        self.v1_mounted = any(h.kind is HierarchyKind.V1 for h in hierarchies)
        self.v2_mounted = any(h.kind is HierarchyKind.V2 for h in hierarchies)
        self.walked_v1: dict[int, str] = {}
        self.walked_v2: dict[int, str] = {}
        for cg in cgroups:
            (self.walked_v1 if cg.kind is HierarchyKind.V1 else self.walked_v2)[cg.inode] = (
                cg.path)
        self._mounts = {
            h.kind: h for h in hierarchies
            if h.kind is HierarchyKind.V2 or h.has_memory
        }
        self._learned: dict[tuple[HierarchyKind, int], str] = {}
        #: /proc/PID/cgroup reads done (for tests and the benchmark).
        self.proc_reads = 0

    def fingerprint(self) -> tuple[object, ...]:
        """What the walked maps and mounts are: tasks resolved from them may
        be reused while this is unchanged."""
        return (self.proc_root, self.v1_mounted, self.v2_mounted,
                frozenset(self.walked_v1.items()), frozenset(self.walked_v2.items()))

    def walked(self, memcg_ino: int, dfl_ino: int) -> bool:
        """Both paths come from the walk alone."""
        return ((not self.v1_mounted or memcg_ino in self.walked_v1)
                and (not self.v2_mounted or dfl_ino in self.walked_v2))

    def still_walked(self, record: bytes, task: Task) -> bool:
        """A task made from ``record`` under another walk: are its paths what
        this walk says for the record's cgroup ids?"""
        memcg_ino, dfl_ino = _CGROUP_IDS.unpack_from(record, _CGROUP_IDS_AT)
        if not self.walked(memcg_ino, dfl_ino):
            return False
        v1 = self.walked_v1[memcg_ino] if self.v1_mounted else None
        v2 = self.walked_v2[dfl_ino] if self.v2_mounted else None
        return v1 == task.memcg_v1 and v2 == task.cgroup_v2

    def paths(self, pid: int, memcg_ino: int, dfl_ino: int) -> tuple[str | None, str | None]:
        """(v1 memory cgroup path, v2 cgroup path); None where not mounted or unknown."""
        v1 = v2 = None
        if self.v1_mounted:
            v1 = self.walked_v1.get(memcg_ino) or self._learned.get(
                (HierarchyKind.V1, memcg_ino))
        if self.v2_mounted:
            v2 = self.walked_v2.get(dfl_ino) or self._learned.get((HierarchyKind.V2, dfl_ino))
        if (self.v1_mounted and v1 is None) or (self.v2_mounted and v2 is None):
            data = _cgroup_file(self.proc_root, pid)
            self.proc_reads += 1
            if data is not None:
                try:
                    f1, f2 = parse_proc_cgroup(data)
                except ParseError:
                    f1 = f2 = None
                if self.v1_mounted and v1 is None:
                    v1 = f1
                    self._learn(HierarchyKind.V1, memcg_ino, f1)
                if self.v2_mounted and v2 is None:
                    v2 = f2
                    self._learn(HierarchyKind.V2, dfl_ino, f2)
        return v1, v2

    def _learn(self, kind: HierarchyKind, ino: int, path: str | None) -> None:
        h = self._mounts.get(kind)
        if path is None or h is None or not ino:
            return
        root = h.root.rstrip("/")
        if path != h.root and not path.startswith(root + "/"):
            return  # outside what is mounted here: cannot be checked
        fs_path = h.mount_point.rstrip("/") + path[len(root):]
        try:
            if os.stat(fs_path).st_ino == ino:
                self._learned[(kind, ino)] = path
        except OSError:
            pass


def _cgroup_file(proc_root: str, pid: int) -> bytes | None:
    try:
        with open(f"{proc_root}/{pid}/cgroup", "rb") as f:
            return f.read()
    except OSError:
        return None


def records_to_tasks(
    records: Iterable[Record],
    *,
    psize: int,
    clk_tck: int,
    cgroups: Sequence[Cgroup] = (),
    hierarchies: Sequence[Hierarchy] = (),
    proc_root: str = "/proc",
    resolver: CgroupResolver | None = None,
) -> list[Task]:
    """The :class:`Task` of every process, in iteration (creation) order.

    A leader without an mm takes the counters of a thread of its group that
    still has one (the kernel's ``find_lock_task_mm()``). Cgroup paths come
    from ``resolver`` (by default one over the walked ``cgroups``).
    """
    if resolver is None:
        resolver = CgroupResolver(cgroups, hierarchies, proc_root)
    tick_ns = 1_000_000_000 // clk_tck
    leaders: list[Record] = []
    stand_in: dict[int, Record] = {}
    for r in records:
        if r.leader:
            leaders.append(r)
        elif r.has_mm and r.tgid not in stand_in:
            stand_in[r.tgid] = r
    tasks: list[Task] = []
    for r in leaders:
        mm = r
        if not r.has_mm and r.tgid in stand_in:
            mm = stand_in[r.tgid]
        tasks.append(_make_task(
            r.pid, r.tgid, r.ppid, comm=r.comm, state=r.state, start_ns=r.start_boottime_ns,
            uid=r.uid, flags=r.flags, adj=r.oom_score_adj, mm_flags=mm.rec_flags,
            rss_file=mm.rss_file, rss_anon=mm.rss_anon, rss_shmem=mm.rss_shmem,
            swapents=mm.swapents, pgtables_bytes=mm.pgtables_bytes,
            paths=resolver.paths(r.pid, r.memcg_ino, r.dfl_ino), psize=psize, tick_ns=tick_ns,
        ))
    return tasks


#: Which tasks a pass keeps, by their (v1 memory cgroup, v2 cgroup) paths.
Keep = Callable[[tuple[str | None, str | None]], bool]
#: How many fingerprints' tasks a TaskCache keeps.
_CACHES_KEPT = 4
#: A cached verdict: the record's task is outside the ``keep`` subtree.
_OUTSIDE = object()


@dataclass(slots=True)
class _Scope:
    """One scope's kept tasks, and the walk they were resolved against."""

    fingerprint: tuple[object, ...]
    entries: dict[bytes, object]


class TaskCache:
    """The tasks of the last pass of each scope, by their record's bytes.

    A record holds everything a :class:`Task` is made of except the cgroup
    paths and two constants (page size, clock ticks), so a record seen
    before byte for byte makes the same, immutable, Task: most processes do
    not change between two snapshots, and their decoding is skipped. Kept:
    leaders with their own mm, and kernel threads (a leader without an mm
    may take a thread's counters), whose paths came from the walk; for an
    ``only=`` subtree, also the verdict "outside" (a cgroup cannot be moved
    to another parent, so its tasks cannot enter the subtree without a
    change the walk sees).

    One entry per scope (the whole system, or an ``only=`` subtree: the
    ``scope`` argument), at most four, each holding only what its last pass
    saw. When the walk changed since (a cgroup made, removed or renamed
    anywhere: :meth:`CgroupResolver.fingerprint`), a kept task is reused
    only if its record's cgroup ids still name the same paths in the walk,
    and "outside" verdicts are decided again.
    """

    def __init__(self) -> None:
        self._scopes: dict[tuple[object, ...], _Scope] = {}
        #: The last pass: records given, and how many came from the cache.
        self.last_records = 0
        self.last_hits = 0

    def clear(self) -> None:
        self._scopes.clear()

    def tasks(
        self,
        data: bytes,
        *,
        psize: int,
        clk_tck: int,
        resolver: CgroupResolver,
        keep: Keep | None = None,
        scope: object = None,
    ) -> list[Task]:
        """``records_to_tasks(decode_records(data), ...)``, only the tasks
        whose (v1 memory cgroup, v2 cgroup) paths ``keep`` accepts, reusing
        the tasks of records seen before in the same ``scope`` (a hashable
        naming what ``keep`` keeps; required with ``keep``)."""
        if keep is not None and scope is None:
            raise ValueError("a filtered pass needs a scope of its own")
        if len(data) % RECORD_SIZE:
            decode_records(data)  # raises the decoder's own error
        key = (psize, clk_tck, resolver.proc_root, scope)
        fingerprint = resolver.fingerprint()
        kept = self._scopes.pop(key, None)
        old = kept.entries if kept is not None else {}
        chunks = [data[off:off + RECORD_SIZE] for off in range(0, len(data), RECORD_SIZE)]
        got: list[object] = list(map(old.get, chunks))
        if kept is not None and kept.fingerprint != fingerprint:
            for i, g in enumerate(got):
                if g is not None and not (isinstance(g, Task)
                                          and resolver.still_walked(chunks[i], g)):
                    got[i] = None
        missed_at = [i for i, g in enumerate(got) if g is None]
        self.last_records = len(chunks)
        self.last_hits = len(chunks) - len(missed_at)
        if not missed_at:
            new: dict[bytes, object] = dict(zip(chunks, got, strict=True))
        else:
            new = {c: g for c, g in zip(chunks, got, strict=True) if g is not None}
            missed = [chunks[i] for i in missed_at]
            made: list[Task | None] = [None] * len(missed)
            self._decode_missed(missed, made, index=missed_at, new=new, psize=psize,
                                clk_tck=clk_tck, resolver=resolver, keep=keep)
            for i, task in zip(missed_at, made, strict=True):
                got[i] = task
        self._scopes[key] = _Scope(fingerprint, new)
        while len(self._scopes) > _CACHES_KEPT:
            del self._scopes[next(iter(self._scopes))]
        return [g for g in got if isinstance(g, Task)]

    @staticmethod
    def _decode_missed(
        missed: list[bytes],
        made: list[Task | None],
        *,
        index: list[int],
        new: dict[bytes, object],
        psize: int,
        clk_tck: int,
        resolver: CgroupResolver,
        keep: Keep | None,
    ) -> None:
        """Decode the records not in the cache into ``made`` (None: no task
        of its own, or outside ``keep``) and remember what may be reused in
        ``new``. A leader with its own mm or a kernel thread (nearly all) is
        made here in one pass; a thread, or a leader without an mm (which
        may take a thread's counters), goes through :func:`records_to_tasks`."""
        tick_ns = 1_000_000_000 // clk_tck
        other: list[int] = []
        for i, f in enumerate(RECORD.iter_unpack(b"".join(missed))):
            _check_record(index[i], f)
            (_magic, pid, tgid, ppid, start, memcg, dfl, rfile, ranon, rshmem, swap, pte,
             uid, state, exit_state, flags, adj, rflags, comm, _pad) = f
            if not rflags & LEADER:
                other.append(i)  # a thread standing in for its leader's mm
                continue
            paths = resolver.paths(pid, memcg, dfl)
            if keep is not None and not keep(paths):
                # Outside the subtree: decided from the ids alone, no task made.
                new[missed[i]] = _OUTSIDE
                continue
            if not (rflags & HAS_MM or flags & PF_KTHREAD):
                other.append(i)  # may take a thread's counters
                continue
            task = _make_task(
                pid, tgid, ppid, comm=comm.split(b"\0", 1)[0], state=_state(state, exit_state),
                start_ns=start, uid=uid, flags=flags,
                adj=adj if rflags & HAS_SIGNAL else None, mm_flags=rflags,
                rss_file=rfile, rss_anon=ranon, rss_shmem=rshmem, swapents=swap,
                pgtables_bytes=pte, paths=paths, psize=psize, tick_ns=tick_ns,
            )
            made[i] = task
            if resolver.walked(memcg, dfl):
                new[missed[i]] = task
        if not other:
            return
        records = decode_records(b"".join(missed[i] for i in other))  # checked above
        leaders = [i for i, r in zip(other, records, strict=True) if r.leader]
        fresh = records_to_tasks(records, psize=psize, clk_tck=clk_tck, resolver=resolver)
        for i, task in zip(leaders, fresh, strict=True):
            made[i] = task if keep is None or keep((task.memcg_v1, task.cgroup_v2)) else None


def _kernel_oom_score(proc_root: str, task: Task) -> int | None:
    try:
        fd = os.open(f"{proc_root}/{task.pid}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return parse_single_int(read_at(fd, "oom_score"), "oom_score")
    except (OSError, ParseError):
        return None
    finally:
        os.close(fd)


_DEFAULT_OPTIONS = ReadOptions()


def read_tasks_bpf(
    iterator: TaskIterator,
    *,
    proc_root: str = "/proc",
    psize: int,
    options: ReadOptions = _DEFAULT_OPTIONS,
    cgroups: Sequence[Cgroup] = (),
    hierarchies: Sequence[Hierarchy] = (),
    stats: ReadStats | None = None,
    only: HierarchyKind | None = None,
    scope: object = None,
) -> list[Task]:
    """Every process, from one pass of ``iterator``; the kernel's oom_score,
    exe and cmdline read from ``proc_root`` only when ``options`` ask.

    ``only``: ``cgroups`` is one subtree of that hierarchy (``SourceConfig.only``),
    and only the processes in its cgroups are returned; ``scope`` names that
    subtree (its ``SourceConfig.only``). Tasks are reused from the iterator's
    :class:`TaskCache` where their records did not change."""
    check_proc_root(proc_root)
    resolver = CgroupResolver(cgroups, hierarchies, proc_root)
    keep: Keep | None = None
    if only is not None:
        inside = {c.path for c in cgroups if c.kind is only}
        index = 0 if only is HierarchyKind.V1 else 1

        def keep(paths: tuple[str | None, str | None]) -> bool:
            return paths[index] in inside
    try:
        tasks = iterator.cache.tasks(iterator.read(), psize=psize,
                                     clk_tck=clock_ticks_per_second(), resolver=resolver,
                                     keep=keep, scope=None if only is None else (only, scope))
    except BpfError as e:
        if stats is not None and len(stats.problems) < MAX_PROBLEMS:
            stats.problems.append(str(e))
        raise
    if not tasks or tasks[0].pid != 1:
        # Measured on Linux 6.18: the task iterator never shows pid 1 (its
        # first task is kthreadd). The global init is never a victim, but a
        # snapshot has every process: read that one from /proc.
        v1: dict[int, str] | None = {} if resolver.v1_mounted else None
        v2: dict[int, str] | None = {} if resolver.v2_mounted else None
        init = read_tasks(proc_root, psize=psize, options=options, stats=stats,
                          pids=[1], cgroup_map=CgroupMap(v1=v1, v2=v2))
        tasks[:0] = [t for t in init if keep is None or keep((t.memcg_v1, t.cgroup_v2))]
    if options.oom_score:
        tasks = [replace(t, kernel_oom_score=_kernel_oom_score(proc_root, t)) for t in tasks]
    if options.details:
        tasks = [with_details(proc_root, t) if t.exe is None else t for t in tasks]
    return tasks


def check_proc_root(proc_root: str) -> None:
    """The BPF source reads the live kernel: ``proc_root`` must be a live
    procfs of the initial PID namespace (the records' PIDs are that one's)."""
    if not is_live_procfs(proc_root):
        raise BpfError(f"{proc_root} is not a live procfs (a recorded tree is read by procfs)")
    fd = os.open(proc_root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if not initial_pidns(fd):
            raise BpfError(f"{proc_root} shows a child PID namespace; BPF sees the initial one's")
    finally:
        os.close(fd)
