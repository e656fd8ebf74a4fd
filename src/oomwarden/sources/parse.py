"""Pure parsers for the kernel's text files: bytes in, values out, no I/O.

Every function here either returns a value or raises :class:`ParseError`
naming the file and what was wrong; random input can do nothing else (the
property tests hold them to that).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

from oomwarden.errors import ParseError
from oomwarden.model import HierarchyKind, OomControl, Pressure, PsiLine

#: PF_KTHREAD in include/linux/sched.h: the task is a kernel thread.
PF_KTHREAD = 0x00200000


def _int(value: bytes | str, what: str) -> int:
    try:
        return int(value)
    except (ValueError, TypeError):
        raise ParseError(f"{what}: expected an integer, got {value!r:.60}") from None


class StatFields(NamedTuple):
    """The fields of /proc/PID/stat that oomwarden uses (a named tuple: this
    is built once per process on the OOM path, where a dataclass costs more)."""

    pid: int
    comm: bytes
    state: str
    ppid: int
    flags: int
    num_threads: int
    start_ticks: int
    #: Resident pages as ``get_mm_rss()`` returns them: the per-CPU counters
    #: read without summing, exactly what ``oom_badness()`` uses.
    rss_pages: int

    @property
    def kthread(self) -> bool:
        return bool(self.flags & PF_KTHREAD)


def parse_stat(data: bytes) -> StatFields:
    """Parse /proc/PID/stat.

    The command name lies between the first ``(`` and the *last* ``)``: a
    process may call itself ``a) (b`` or put a newline in its name.
    """
    open_at = data.find(b"(")
    close_at = data.rfind(b")")
    if open_at < 0 or close_at < open_at:
        raise ParseError(f"stat: no '(comm)' in {data[:60]!r}")
    rest = data[close_at + 2 :].split(None, 22)
    if len(rest) < 22:
        raise ParseError(f"stat: {len(rest)} fields after comm, expected at least 22")
    try:
        return StatFields(
            int(data[:open_at]),
            data[open_at + 1 : close_at],
            rest[0].decode("ascii"),
            int(rest[1]),
            int(rest[6]),
            int(rest[17]),
            int(rest[19]),
            int(rest[21]),
        )
    except ValueError:  # UnicodeDecodeError is a ValueError too
        raise ParseError(f"stat: bad field in {data[:120]!r}") from None


class StatusFields(NamedTuple):
    """The fields of /proc/PID/status that oomwarden uses; memory in kB."""

    tgid: int | None
    ppid: int | None
    uid: int | None
    #: False when the status has no VmRSS line: no mm (zombie, kernel thread).
    has_mm: bool
    rss_anon_kb: int | None
    rss_file_kb: int | None
    rss_shmem_kb: int | None
    swap_kb: int | None
    pte_kb: int | None
    kthread: bool | None


_STATUS_KEYS = {
    b"Tgid": "tgid",
    b"PPid": "ppid",
    b"Uid": "uid",
    b"VmRSS": "vmrss",
    b"RssAnon": "rss_anon_kb",
    b"RssFile": "rss_file_kb",
    b"RssShmem": "rss_shmem_kb",
    b"VmSwap": "swap_kb",
    b"VmPTE": "pte_kb",
    b"Kthread": "kthread",
}


#: Fast path for status exactly as Linux 4.19+ writes it: the header lines
#: and the memory block in their fixed order, matched without backtracking.
#: Anything else (other layouts, odd input) goes through the line-by-line
#: parser, which is the reference; a property test holds the two together.
_STATUS_HEAD = re.compile(
    rb"\nTgid:\t(\d+)\nNgid:\t\d+\nPid:\t\d+\nPPid:\t(\d+)\nTracerPid:\t\d+\nUid:\t(\d+)\t"
)
_STATUS_MEM = re.compile(
    rb"\nVmRSS:\s*\d+ kB\nRssAnon:\s*(\d+) kB\nRssFile:\s*(\d+) kB\n"
    rb"RssShmem:\s*(\d+) kB\nVmData:\s*\d+ kB\nVmStk:\s*\d+ kB\nVmExe:\s*\d+ kB\n"
    rb"VmLib:\s*\d+ kB\nVmPTE:\s*(\d+) kB\nVmSwap:\s*(\d+) kB\n"
)
_STATUS_NO_MM = re.compile(rb"\nVm[A-Za-z]+:")
_STATUS_KTHREAD = re.compile(rb"\nKthread:\t([01])\n")


def parse_status(data: bytes) -> StatusFields:
    """Parse /proc/PID/status (only the keys oomwarden needs)."""
    head = _STATUS_HEAD.search(data)
    if head is not None and data.count(b"\nVmRSS:") <= 1:
        at = data.find(b"\nVmRSS:", head.end())
        mem = _STATUS_MEM.match(data, at) if at >= 0 else None
        kthread_m = _STATUS_KTHREAD.search(data, head.end())
        kthread = None if kthread_m is None else kthread_m.group(1) == b"1"
        try:
            if mem is not None:
                tgid, ppid, uid = head.groups()
                anon, file, shmem, pte, swap = mem.groups()
                return StatusFields(
                    int(tgid), int(ppid), int(uid), True,
                    int(anon), int(file), int(shmem), int(swap), int(pte), kthread,
                )
            if _STATUS_NO_MM.search(data) is None:
                return StatusFields(
                    int(head.group(1)), int(head.group(2)), int(head.group(3)), False,
                    None, None, None, None, None, kthread,
                )
        except ValueError:  # e.g. more digits than int() takes
            raise ParseError(f"status: bad number in {data[:80]!r}") from None
    return _parse_status_lines(data)


def _parse_status_lines(data: bytes) -> StatusFields:
    """The reference parser: every line, any order."""
    found: dict[str, int] = {}
    for line in data.split(b"\n"):
        key, sep, value = line.partition(b":")
        if not sep:
            continue
        attr = _STATUS_KEYS.get(key)
        if attr is None:
            continue
        words = value.split()
        if not words:
            raise ParseError(f"status: {key.decode()} has no value")
        if attr not in found:  # the first line of a key counts, as in the fast path
            found[attr] = _int(words[0], f"status {key.decode()}")
    kthread = found.get("kthread")
    return StatusFields(
        tgid=found.get("tgid"),
        ppid=found.get("ppid"),
        uid=found.get("uid"),
        has_mm="vmrss" in found,
        rss_anon_kb=found.get("rss_anon_kb"),
        rss_file_kb=found.get("rss_file_kb"),
        rss_shmem_kb=found.get("rss_shmem_kb"),
        swap_kb=found.get("swap_kb"),
        pte_kb=found.get("pte_kb"),
        kthread=None if kthread is None else bool(kthread),
    )


def parse_single_int(data: bytes, what: str) -> int:
    """A file holding one integer (oom_score_adj, oom_score, memory.current)."""
    return _int(data.strip(), what)


def parse_oom_score_adj(data: bytes) -> int:
    """/proc/PID/oom_score_adj: an integer in -1000..1000."""
    value = _int(data.strip(), "oom_score_adj")
    if not -1000 <= value <= 1000:
        raise ParseError(f"oom_score_adj: {value} is outside -1000..1000")
    return value


def parse_limit(data: bytes, what: str, unlimited: int) -> int:
    """A limit: an integer or ``max`` (v2), which is returned as ``unlimited``."""
    text = data.strip()
    if text == b"max":
        return unlimited
    value = _int(text, what)
    if value < 0:
        raise ParseError(f"{what}: negative limit {value}")
    return value


def parse_flat_keyed(data: bytes, what: str) -> dict[str, int]:
    """``key value`` lines: memory.stat, memory.events, oom_control."""
    out: dict[str, int] = {}
    for line in data.split(b"\n"):
        if not line.strip():
            continue
        words = line.split()
        if len(words) != 2:
            raise ParseError(f"{what}: expected 'key value', got {line[:60]!r}")
        try:
            key = words[0].decode("ascii")
        except UnicodeDecodeError:
            raise ParseError(f"{what}: non-ASCII key {words[0][:30]!r}") from None
        out[key] = _int(words[1], f"{what} {key}")
    return out


def parse_oom_control(data: bytes) -> OomControl:
    """v1 memory.oom_control: oom_kill_disable, under_oom and (4.13+) oom_kill."""
    fields = parse_flat_keyed(data, "memory.oom_control")
    try:
        return OomControl(
            oom_kill_disable=bool(fields["oom_kill_disable"]),
            under_oom=bool(fields["under_oom"]),
            oom_kill=fields.get("oom_kill"),
        )
    except KeyError as e:
        raise ParseError(f"memory.oom_control: missing {e.args[0]}") from None


def _kb_field(fields: Mapping[str, int], key: str) -> int:
    try:
        return fields[key]
    except KeyError:
        raise ParseError(f"meminfo: no {key} line") from None


@dataclass(frozen=True, slots=True)
class MemInfo:
    mem_total: int
    mem_available: int | None
    swap_total: int
    swap_free: int


def parse_meminfo(data: bytes) -> MemInfo:
    """/proc/meminfo, values returned in bytes."""
    fields: dict[str, int] = {}
    for line in data.split(b"\n"):
        key, sep, value = line.partition(b":")
        if not sep:
            continue
        words = value.split()
        if not words or len(words) > 2 or (len(words) == 2 and words[1] != b"kB"):
            raise ParseError(f"meminfo: bad line {line[:60]!r}")
        try:
            name = key.decode("ascii")
        except UnicodeDecodeError:
            raise ParseError(f"meminfo: non-ASCII key {key[:30]!r}") from None
        fields[name] = _int(words[0], f"meminfo {name}")
    total = _kb_field(fields, "MemTotal") * 1024
    avail_kb = fields.get("MemAvailable")
    available = None if avail_kb is None else avail_kb * 1024
    swap_total = _kb_field(fields, "SwapTotal") * 1024
    swap_free = _kb_field(fields, "SwapFree") * 1024
    for label, amount in (("MemTotal", total), ("SwapTotal", swap_total)):
        if amount < 0:
            raise ParseError(f"meminfo: {label} ({amount}) is negative")
    if available is not None and not 0 <= available <= total:
        raise ParseError(f"meminfo: MemAvailable ({available}) cannot exceed MemTotal ({total})")
    if not 0 <= swap_free <= swap_total:
        raise ParseError(f"meminfo: SwapFree ({swap_free}) cannot exceed SwapTotal ({swap_total})")
    return MemInfo(total, available, swap_total, swap_free)


def _psi_line(words: list[bytes], what: str) -> PsiLine:
    values: dict[bytes, bytes] = {}
    for word in words[1:]:
        key, sep, value = word.partition(b"=")
        if not sep:
            raise ParseError(f"{what}: expected key=value, got {word[:30]!r}")
        values[key] = value
    try:
        avg10, avg60, avg300 = (float(values[k]) for k in (b"avg10", b"avg60", b"avg300"))
        total = int(values[b"total"])
    except KeyError as e:
        raise ParseError(f"{what}: missing {e.args[0]!r}") from None
    except ValueError:
        raise ParseError(f"{what}: bad number in {b' '.join(words)[:80]!r}") from None
    for avg in (avg10, avg60, avg300):
        if not 0.0 <= avg <= 100.0:
            raise ParseError(f"{what}: average {avg} is outside 0..100")
    if total < 0:
        raise ParseError(f"{what}: negative total {total}")
    return PsiLine(avg10, avg60, avg300, total)


def parse_psi(data: bytes, what: str = "pressure") -> Pressure:
    """A PSI file (/proc/pressure/memory or a cgroup's memory.pressure)."""
    some: PsiLine | None = None
    full: PsiLine | None = None
    for line in data.split(b"\n"):
        words = line.split()
        if not words:
            continue
        if words[0] == b"some":
            some = _psi_line(words, what)
        elif words[0] == b"full":
            full = _psi_line(words, what)
        else:
            raise ParseError(f"{what}: unexpected line {line[:60]!r}")
    if some is None:
        raise ParseError(f"{what}: no 'some' line")
    return Pressure(some=some, full=full)


def _unescape_mount(field: bytes) -> str:
    r"""mountinfo escapes space, tab, newline and backslash as ``\ooo``."""
    out = bytearray()
    i = 0
    while i < len(field):
        c = field[i]
        if c == 0x5C and i + 4 <= len(field):
            digits = field[i + 1 : i + 4]
            if all(0x30 <= d <= 0x37 for d in digits):
                out.append(int(digits, 8) & 0xFF)
                i += 4
                continue
        out.append(c)
        i += 1
    return out.decode("utf-8", "surrogateescape")


@dataclass(frozen=True, slots=True)
class MountEntry:
    """A cgroup mount from mountinfo."""

    kind: HierarchyKind
    root: str
    mount_point: str
    super_options: tuple[str, ...]


def parse_mountinfo(data: bytes) -> list[MountEntry]:
    """The cgroup and cgroup2 mounts in /proc/PID/mountinfo, in order."""
    mounts: list[MountEntry] = []
    for line in data.split(b"\n"):
        if not line.strip():
            continue
        fields = line.split(b" ")
        try:
            sep = fields.index(b"-", 6)
        except ValueError:
            raise ParseError(f"mountinfo: no ' - ' separator in {line[:80]!r}") from None
        if len(fields) < sep + 4 or sep < 6:
            raise ParseError(f"mountinfo: too few fields in {line[:80]!r}")
        _int(fields[0], "mountinfo mount id")
        fstype = fields[sep + 1]
        if fstype == b"cgroup":
            kind = HierarchyKind.V1
        elif fstype == b"cgroup2":
            kind = HierarchyKind.V2
        else:
            continue
        options = tuple(
            o for o in _unescape_mount(fields[sep + 3]).split(",") if o
        )
        mounts.append(
            MountEntry(
                kind=kind,
                root=_unescape_mount(fields[3]),
                mount_point=_unescape_mount(fields[4]),
                super_options=options,
            )
        )
    return mounts


#: The v1 controller names a mount's super options may carry.
V1_CONTROLLERS = frozenset(
    {
        "cpu", "cpuacct", "cpuset", "memory", "devices", "freezer", "net_cls",
        "net_prio", "blkio", "perf_event", "hugetlb", "pids", "rdma", "misc",
    }
)


def v1_controllers(options: tuple[str, ...]) -> tuple[str, ...]:
    """The controllers of a v1 mount, from its super options."""
    return tuple(o for o in options if o in V1_CONTROLLERS)


def parse_proc_cgroup(data: bytes) -> tuple[str | None, str | None]:
    """/proc/PID/cgroup: (v1 memory path, v2 path); None where absent."""
    memcg: str | None = None
    unified: str | None = None
    for line in data.split(b"\n"):
        if not line:
            continue
        parts = line.split(b":", 2)
        if len(parts) != 3:
            raise ParseError(f"cgroup: expected 'id:controllers:path', got {line[:60]!r}")
        _int(parts[0], "cgroup hierarchy id")
        path = parts[2].decode("utf-8", "surrogateescape")
        if parts[0] == b"0" and parts[1] == b"":
            unified = path
        elif b"memory" in parts[1].split(b","):
            memcg = path
    return memcg, unified
