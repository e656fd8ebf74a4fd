"""Build fake /proc and cgroup trees on a temporary directory, in kernel format.

A :class:`FakeTree` writes, below one root directory::

    proc/PID/{stat,status,oom_score_adj,oom_score,cgroup,cmdline}
    proc/meminfo  proc/pressure/memory  proc/self/mountinfo  proc/sys/vm/swappiness
    sys/fs/cgroup/memory/...    (cgroup v1 memory hierarchy, hybrid layout)
    sys/fs/cgroup/unified/...   (cgroup2, hybrid layout)
    sys/fs/cgroup/...           (cgroup2, pure v2 layout)

The text is what the kernel writes (checked against the live machine this
project was started on): ``/proc/PID/stat`` with the raw command name between
parentheses, ``status`` with the name escaped as ``proc_task_name()`` escapes
it, memory lines as ``%8lu kB``, mountinfo with ``\\ooo`` escapes.

Nothing here imports oomwarden: the fake tree is an independent statement of
the kernel's formats, and ``kernel_oom_score`` is computed here with its own
C-arithmetic so that tests can compare it with the policy core's.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

PAGE_SIZE = 4096
#: include/linux/sched.h
PF_KTHREAD = 0x00200000
PF_RANDOMIZE = 0x00400000
PF_SUPERPRIV = 0x00000100
PF_FORKNOEXEC = 0x00000040
PF_NOFREEZE = 0x00008000
#: What a user process on the recording machine showed (4194560).
USER_FLAGS = PF_RANDOMIZE | PF_SUPERPRIV
#: What kthreadd showed (2129984).
KTHREAD_FLAGS = PF_KTHREAD | PF_NOFREEZE | PF_FORKNOEXEC
#: ``LONG_MAX / PAGE_SIZE * PAGE_SIZE``: an unlimited v1 limit, as the kernel prints it.
UNLIMITED_BYTES = ((2**63 - 1) // PAGE_SIZE) * PAGE_SIZE

_STATE_NAMES = {
    "R": "R (running)",
    "S": "S (sleeping)",
    "D": "D (disk sleep)",
    "T": "T (stopped)",
    "t": "t (tracing stop)",
    "X": "X (dead)",
    "Z": "Z (zombie)",
    "P": "P (parked)",
    "I": "I (idle)",
}


# --------------------------------------------------------------------------- text


def escape_task_name(comm: bytes) -> bytes:
    r"""The Name: line of /proc/PID/status: ``\n`` and ``\\`` escaped, the rest raw."""
    return comm.replace(b"\\", b"\\\\").replace(b"\n", b"\\n")


def escape_mount_path(path: bytes) -> bytes:
    r"""mountinfo's ``mangle()``: space, tab, newline and backslash as ``\ooo``."""
    out = bytearray()
    for c in path:
        if c in b" \t\n\\":
            out += b"\\%03o" % c
        else:
            out.append(c)
    return bytes(out)


def stat_line(
    pid: int,
    comm: bytes,
    *,
    state: str = "S",
    ppid: int = 1,
    flags: int = USER_FLAGS,
    num_threads: int = 1,
    start_ticks: int = 1000,
    vsize: int = 17281024,
    rss_pages: int = 0,
    pgrp: int | None = None,
    session: int | None = None,
) -> bytes:
    """``/proc/PID/stat``: 52 fields, the command name raw between parentheses."""
    pgrp = pid if pgrp is None else pgrp
    session = pid if session is None else session
    rsslim = 2**64 - 1
    fields_after_comm: list[int | str] = [
        state, ppid, pgrp, session, 0, -1, flags,  # state..flags
        1253, 0, 0, 0, 2, 5, 0, 0,  # minflt cminflt majflt cmajflt utime stime cutime cstime
        20, 0, num_threads, 0, start_ticks,  # priority nice num_threads itrealvalue starttime
        vsize, rss_pages, rsslim,
        94143321571328, 94143321571669, 140723177715040, 0, 0,  # startcode..kstkeip
        0, 0, 16781319, 0,  # signal blocked sigignore sigcatch
        1, 0, 0, 17, 1, 0, 0, 0, 0, 0,  # wchan nswap cnswap exit_signal processor ...
        94143321583024, 94143321583640, 94143910424576,  # start_data end_data start_brk
        140723177720052, 140723177720102, 140723177720102, 140723177721807, 0,
    ]
    assert len(fields_after_comm) == 50
    if state in ("Z", "X") or flags & PF_KTHREAD:
        # No mm: the kernel prints zeros for every mm-derived field.
        for i in (20, 21, 25, 26, 27, *range(44, 49)):
            fields_after_comm[i] = 0
    tail = " ".join(str(f) for f in fields_after_comm).encode()
    return b"%d (%s) %s\n" % (pid, comm, tail)


def kb(value: int) -> bytes:
    return b"%8d kB" % value


def status_text(
    pid: int,
    comm: bytes,
    state: str = "S",
    ppid: int = 1,
    *,
    uid: int = 0,
    kthread: bool = False,
    rss_anon_kb: int | None = None,
    rss_file_kb: int | None = None,
    rss_shmem_kb: int | None = None,
    pte_kb: int | None = None,
    swap_kb: int | None = None,
    num_threads: int = 1,
    tgid: int | None = None,
) -> bytes:
    """``/proc/PID/status`` as a 6.x kernel writes it.

    Memory lines (VmPeak..HugetlbPages) appear only when ``rss_anon_kb`` is
    given: kernel threads and zombies have no mm and no Vm lines.
    """
    tgid = pid if tgid is None else tgid
    zombie = state in ("Z", "X")
    lines: list[bytes] = [b"Name:\t" + escape_task_name(comm)]
    if not zombie:
        lines.append(b"Umask:\t0022")
    lines += [
        b"State:\t" + _STATE_NAMES.get(state, state).encode(),
        b"Tgid:\t%d" % tgid,
        b"Ngid:\t0",
        b"Pid:\t%d" % pid,
        b"PPid:\t%d" % ppid,
        b"TracerPid:\t0",
        b"Uid:\t%d\t%d\t%d\t%d" % (uid, uid, uid, uid),
        b"Gid:\t%d\t%d\t%d\t%d" % (uid, uid, uid, uid),
        b"FDSize:\t%d" % (0 if zombie else 64),
        b"Groups:\t ",
        b"NStgid:\t%d" % tgid,
        b"NSpid:\t%d" % pid,
        b"NSpgid:\t%d" % pid,
        b"NSsid:\t%d" % pid,
        b"Kthread:\t%d" % int(kthread),
    ]
    if rss_anon_kb is not None:
        anon = rss_anon_kb
        file = rss_file_kb or 0
        shmem = rss_shmem_kb or 0
        rss = anon + file + shmem
        lines += [
            b"VmPeak:\t" + kb(rss * 2 + 4096),
            b"VmSize:\t" + kb(rss * 2 + 4096),
            b"VmLck:\t" + kb(0),
            b"VmPin:\t" + kb(0),
            b"VmHWM:\t" + kb(rss),
            b"VmRSS:\t" + kb(rss),
            b"RssAnon:\t" + kb(anon),
            b"RssFile:\t" + kb(file),
            b"RssShmem:\t" + kb(shmem),
            b"VmData:\t" + kb(anon + 1024),
            b"VmStk:\t" + kb(132),
            b"VmExe:\t" + kb(4),
            b"VmLib:\t" + kb(4760),
            b"VmPTE:\t" + kb(pte_kb or 0),
            b"VmSwap:\t" + kb(swap_kb or 0),
            b"HugetlbPages:\t" + kb(0),
            b"CoreDumping:\t0",
            b"THP_enabled:\t1",
            b"untag_mask:\t0xffffffffffffffff",
        ]
    lines += [
        b"Threads:\t%d" % num_threads,
        b"SigQ:\t0/96551",
        b"SigPnd:\t0000000000000000",
        b"ShdPnd:\t0000000000000000",
        b"SigBlk:\t0000000000000000",
        b"SigIgn:\t0000000001001007",
        b"SigCgt:\t0000000000000000",
        b"CapInh:\t0000000000000000",
        b"CapPrm:\t000001ffffffffff",
        b"CapEff:\t000001ffffffffff",
        b"CapBnd:\t000001ffffffffff",
        b"CapAmb:\t0000000000000000",
        b"NoNewPrivs:\t0",
        b"Seccomp:\t0",
        b"Seccomp_filters:\t0",
        b"Speculation_Store_Bypass:\tthread vulnerable",
        b"SpeculationIndirectBranch:\tconditional enabled",
        b"Cpus_allowed:\t3",
        b"Cpus_allowed_list:\t0-1",
        b"Mems_allowed_list:\t0",
        b"voluntary_ctxt_switches:\t320",
        b"nonvoluntary_ctxt_switches:\t11",
    ]
    return b"\n".join(lines) + b"\n"


def meminfo_text(
    mem_total_kb: int,
    mem_available_kb: int | None,
    swap_total_kb: int = 0,
    swap_free_kb: int = 0,
) -> bytes:
    """``/proc/meminfo`` (the kernel's ``show_val_kb`` layout); MemAvailable optional."""

    def line(name: str, value: int) -> bytes:
        return f"{name + ':':<16}{value:>8} kB\n".encode()

    free = mem_available_kb if mem_available_kb is not None else mem_total_kb // 2
    out = line("MemTotal", mem_total_kb) + line("MemFree", max(free - 1024, 0))
    if mem_available_kb is not None:
        out += line("MemAvailable", mem_available_kb)
    out += line("Buffers", 39692) + line("Cached", 654808) + line("SwapCached", 0)
    out += line("Active", 162920) + line("Inactive", 528164)
    out += line("Active(anon)", 1520) + line("Inactive(anon)", 3920)
    out += line("SwapTotal", swap_total_kb) + line("SwapFree", swap_free_kb)
    out += line("Dirty", 632) + line("AnonPages", 769160) + line("Shmem", 8856)
    out += line("VmallocTotal", 34359738367)
    out += b"HugePages_Total:       0\nHugePages_Free:        0\n"
    out += line("Hugepagesize", 2048) + line("DirectMap4k", 20480)
    return out


def psi_text(
    some: tuple[float, float, float, int] = (0.0, 0.0, 0.0, 0),
    full: tuple[float, float, float, int] | None = (0.0, 0.0, 0.0, 0),
) -> bytes:
    """A PSI file: ``some avg10=0.00 avg60=0.00 avg300=0.00 total=0`` (+ ``full``)."""

    def line(kind: str, v: tuple[float, float, float, int]) -> str:
        return f"{kind} avg10={v[0]:.2f} avg60={v[1]:.2f} avg300={v[2]:.2f} total={v[3]}\n"

    text = line("some", some)
    if full is not None:
        text += line("full", full)
    return text.encode()


def flat_keyed(values: Mapping[str, int]) -> bytes:
    return "".join(f"{k} {v}\n" for k, v in values.items()).encode()


@dataclass(frozen=True)
class Mount:
    """One mountinfo line."""

    mount_id: int
    parent_id: int
    dev: str
    root: bytes
    mount_point: bytes
    options: str
    fstype: str
    source: str
    super_options: str
    optional: tuple[str, ...] = ()

    def line(self) -> bytes:
        head = b"%d %d %s %s %s %s" % (
            self.mount_id,
            self.parent_id,
            self.dev.encode(),
            escape_mount_path(self.root),
            escape_mount_path(self.mount_point),
            self.options.encode(),
        )
        opt = b"".join(b" " + o.encode() for o in self.optional)
        tail = b" - %s %s %s" % (
            self.fstype.encode(),
            escape_mount_path(self.source.encode()),
            self.super_options.encode(),
        )
        return head + opt + tail


_BASE_MOUNTS = [
    Mount(22, 27, "0:21", b"/", b"/proc", "rw,relatime", "proc", "proc", "rw"),
    Mount(23, 27, "0:22", b"/", b"/sys", "rw,relatime", "sysfs", "sysfs", "rw"),
    Mount(24, 27, "0:6", b"/", b"/dev", "rw,relatime", "devtmpfs", "devtmpfs",
          "rw,size=12358300k,nr_inodes=3089575,mode=755"),
    Mount(25, 24, "0:23", b"/", b"/dev/shm", "rw,relatime", "tmpfs", "tmpfs", "rw,size=24731708k"),
    Mount(26, 24, "0:24", b"/", b"/dev/pts", "rw,relatime", "devpts", "devpts",
          "rw,mode=600,ptmxmode=000"),
    Mount(27, 1, "254:0", b"/", b"/", "rw,relatime", "ext4", "/dev/vda",
          "rw,discard,resv_strict,resuid=65534,resgid=65534"),
]

#: The live machine's layout: a tmpfs at /sys/fs/cgroup, one v1 hierarchy per
#: controller (memory at /sys/fs/cgroup/memory), cgroup2 at /sys/fs/cgroup/unified.
HYBRID_MOUNTS: tuple[Mount, ...] = (
    *_BASE_MOUNTS,
    Mount(31, 23, "0:28", b"/", b"/sys/fs/cgroup", "rw,relatime", "tmpfs", "tmpfs", "rw,mode=755"),
    Mount(32, 31, "0:29", b"/", b"/sys/fs/cgroup/cpu", "rw,relatime", "cgroup", "cgroup", "rw,cpu"),
    Mount(33, 31, "0:30", b"/", b"/sys/fs/cgroup/cpuacct", "rw,relatime", "cgroup", "cgroup",
          "rw,cpuacct"),
    Mount(34, 31, "0:31", b"/", b"/sys/fs/cgroup/cpuset", "rw,relatime", "cgroup", "cgroup",
          "rw,cpuset"),
    Mount(35, 31, "0:32", b"/", b"/sys/fs/cgroup/memory", "rw,relatime", "cgroup", "cgroup",
          "rw,memory"),
    Mount(36, 31, "0:33", b"/", b"/sys/fs/cgroup/devices", "rw,relatime", "cgroup", "cgroup",
          "rw,devices"),
    Mount(37, 31, "0:34", b"/", b"/sys/fs/cgroup/freezer", "rw,relatime", "cgroup", "cgroup",
          "rw,freezer"),
    Mount(38, 31, "0:35", b"/", b"/sys/fs/cgroup/blkio", "rw,relatime", "cgroup", "cgroup",
          "rw,blkio"),
    Mount(39, 31, "0:36", b"/", b"/sys/fs/cgroup/pids", "rw,relatime", "cgroup", "cgroup",
          "rw,pids"),
    Mount(40, 31, "0:37", b"/", b"/sys/fs/cgroup/systemd", "rw,relatime", "cgroup", "cgroup",
          "rw,name=systemd"),
    Mount(41, 31, "0:38", b"/", b"/sys/fs/cgroup/unified", "rw,relatime", "cgroup2", "cgroup2",
          "rw"),
)

#: A systemd machine with only cgroup2, mounted at /sys/fs/cgroup.
V2_MOUNTS: tuple[Mount, ...] = (
    Mount(22, 1, "252:1", b"/", b"/", "rw,relatime", "ext4", "/dev/vda1", "rw", ("shared:1",)),
    Mount(23, 22, "0:21", b"/", b"/proc", "rw,nosuid,nodev,noexec,relatime", "proc", "proc",
          "rw", ("shared:12",)),
    Mount(24, 22, "0:22", b"/", b"/sys", "rw,nosuid,nodev,noexec,relatime", "sysfs", "sysfs",
          "rw", ("shared:2",)),
    Mount(25, 24, "0:26", b"/", b"/sys/fs/cgroup", "rw,nosuid,nodev,noexec,relatime", "cgroup2",
          "cgroup2", "rw,nsdelegate,memory_recursiveprot", ("shared:4",)),
    Mount(26, 24, "0:7", b"/", b"/sys/kernel/debug", "rw,nosuid,nodev,noexec,relatime", "debugfs",
          "debugfs", "rw", ("shared:27",)),
)


def mountinfo_text(mounts: Iterable[Mount]) -> bytes:
    return b"".join(m.line() + b"\n" for m in mounts)


# ------------------------------------------------------------------- kernel math


def c_div(a: int, b: int) -> int:
    """C division, truncating toward zero (independent of oomwarden's own)."""
    q = abs(a) // abs(b)
    return q if (a < 0) == (b < 0) else -q


def kernel_oom_score(points: int | None, totalpages: int) -> int:
    """``proc_oom_score()``: 0 for LONG_MIN, else ``(1000 + points*1000/tp)*2/3``."""
    if points is None:
        return 0
    return c_div((1000 + c_div(points * 1000, totalpages)) * 2, 3)


# ------------------------------------------------------------------ processes


@dataclass
class FakeProc:
    """One process of a fake /proc. Memory in kB, as /proc/PID/status shows it.

    ``rss_anon_kb=None`` means no mm (kernel thread, zombie): the status has
    no Vm lines. ``listed=False`` leaves the pid out of every cgroup.procs (a
    process born after the cgroup walk, or a zombie). ``omit`` names files of
    the pid directory not to write (``{"status"}``: the process exited
    between two reads).
    """

    pid: int
    comm: bytes
    state: str = "S"
    ppid: int = 1
    flags: int = USER_FLAGS
    num_threads: int = 1
    start_ticks: int = 1000
    uid: int = 0
    rss_anon_kb: int | None = 1024
    rss_file_kb: int | None = 2048
    rss_shmem_kb: int | None = 0
    pte_kb: int | None = 48
    swap_kb: int | None = 0
    kthread: bool = False
    oom_score_adj: int = 0
    #: None: computed from the tree's meminfo with the kernel's formula.
    oom_score: int | None = None
    memcg_v1: str | None = None
    cgroup_v2: str | None = None
    cmdline: tuple[bytes, ...] = ()
    listed: bool = True
    omit: frozenset[str] = frozenset()

    @property
    def has_mm(self) -> bool:
        return self.rss_anon_kb is not None and not self.kthread

    def pages(self, value_kb: int | None) -> int | None:
        return None if value_kb is None or not self.has_mm else value_kb * 1024 // PAGE_SIZE

    def badness(self, totalpages: int) -> int | None:
        """``oom_badness()`` for this process; None for LONG_MIN."""
        if self.pid == 1 or self.kthread or not self.has_mm or self.oom_score_adj == -1000:
            return None
        rss = sum((self.rss_anon_kb or 0, self.rss_file_kb or 0, self.rss_shmem_kb or 0))
        base = (rss + (self.swap_kb or 0)) * 1024 // PAGE_SIZE
        base += (self.pte_kb or 0) * 1024 // PAGE_SIZE
        return base + self.oom_score_adj * (totalpages // 1000)

    def stat(self) -> bytes:
        rss = None if not self.has_mm else self.pages(
            (self.rss_anon_kb or 0) + (self.rss_file_kb or 0) + (self.rss_shmem_kb or 0)
        )
        return stat_line(
            self.pid, self.comm, state=self.state, ppid=self.ppid, flags=self.flags,
            num_threads=self.num_threads, start_ticks=self.start_ticks, rss_pages=rss or 0,
        )

    def status(self) -> bytes:
        has_lines = self.rss_anon_kb is not None and not self.kthread
        return status_text(
            self.pid, self.comm, self.state, self.ppid, uid=self.uid, kthread=self.kthread,
            rss_anon_kb=self.rss_anon_kb if has_lines else None,
            rss_file_kb=self.rss_file_kb, rss_shmem_kb=self.rss_shmem_kb,
            pte_kb=self.pte_kb, swap_kb=self.swap_kb, num_threads=self.num_threads,
        )

    def cgroup_file(self, layout: str) -> bytes:
        """``/proc/PID/cgroup`` for the layout (``hybrid``, ``v2`` or ``v1``)."""
        v1 = self.memcg_v1 or "/"
        v2 = self.cgroup_v2 or "/"
        if layout == "v2":
            return f"0::{v2}\n".encode("utf-8", "surrogateescape")
        lines = [
            "9:name=systemd:/", "8:pids:/", "7:blkio:/", "6:freezer:/", "5:devices:/",
            f"4:memory:{v1}", "3:cpuset:/", "2:cpuacct:/", "1:cpu:/",
        ]
        if layout == "hybrid":
            lines.append(f"0::{v2}")
        return ("\n".join(lines) + "\n").encode("utf-8", "surrogateescape")


def kthread(pid: int, comm: bytes, *, ppid: int = 2, start_ticks: int = 6) -> FakeProc:
    """A kernel thread: PF_KTHREAD, Kthread: 1, no mm."""
    return FakeProc(
        pid, comm, state="S", ppid=ppid, flags=KTHREAD_FLAGS, start_ticks=start_ticks,
        rss_anon_kb=None, rss_file_kb=None, rss_shmem_kb=None, pte_kb=None, swap_kb=None,
        kthread=True,
    )


def zombie(pid: int, comm: bytes, *, ppid: int, start_ticks: int = 5000, **kw: object) -> FakeProc:
    """An exited, unreaped process: state Z, no Vm lines, listed in no cgroup.procs."""
    proc = FakeProc(
        pid, comm, state="Z", ppid=ppid, flags=0x0040414C, start_ticks=start_ticks,
        rss_anon_kb=None, rss_file_kb=None, rss_shmem_kb=None, pte_kb=None, swap_kb=None,
        listed=False,
    )
    for key, value in kw.items():
        setattr(proc, key, value)
    return proc


# ------------------------------------------------------------------- the tree


def _write(path: Path, data: bytes | str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)


def _limit(value: int | None) -> str:
    return "max" if value is None else str(value)


@dataclass
class FakeTree:
    """A fake machine below ``root``: ``proc/`` and ``sys/fs/cgroup/``.

    ``layout`` is ``hybrid`` (v1 memory + cgroup2 without memory, like the
    live machine), ``v2`` (cgroup2 with the memory controller) or ``v1``
    (v1 memory only). Call :meth:`write` after adding processes and cgroups.
    """

    root: Path
    layout: str = "hybrid"
    mem_total_kb: int = 16_000_000
    mem_available_kb: int | None = 12_000_000
    swap_total_kb: int = 0
    swap_free_kb: int = 0
    #: None: no proc/pressure/memory (PSI off).
    pressure: bytes | None = field(default_factory=psi_text)
    swappiness: int | None = 60
    procs: list[FakeProc] = field(default_factory=list)
    #: v1 and v2 cgroup directories made so far: path -> directory.
    v1_dirs: dict[str, Path] = field(default_factory=dict)
    v2_dirs: dict[str, Path] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.layout == "hybrid":
            self.v1(
                "/", limit=UNLIMITED_BYTES, memsw_limit=UNLIMITED_BYTES, usage=719253504
            )
            self.v2("/", controllers="hugetlb")
        elif self.layout == "v1":
            self.v1("/", limit=UNLIMITED_BYTES, memsw_limit=UNLIMITED_BYTES, usage=719253504)
        elif self.layout == "v2":
            self.v2("/", controllers="cpuset cpu io memory hugetlb pids rdma misc",
                    subtree_control="cpu io memory pids")
        else:
            raise ValueError(f"unknown layout {self.layout}")

    # paths --------------------------------------------------------------

    @property
    def proc(self) -> Path:
        return self.root / "proc"

    @property
    def v1_mount(self) -> Path:
        return self.root / "sys/fs/cgroup/memory"

    @property
    def v2_mount(self) -> Path:
        if self.layout == "v2":
            return self.root / "sys/fs/cgroup"
        return self.root / "sys/fs/cgroup/unified"

    @property
    def totalpages(self) -> int:
        return (self.mem_total_kb + self.swap_total_kb) * 1024 // PAGE_SIZE

    # building -----------------------------------------------------------

    def add(self, *procs: FakeProc) -> FakeTree:
        self.procs.extend(procs)
        return self

    def v1(
        self,
        path: str,
        *,
        usage: int = 4657152,
        limit: int = UNLIMITED_BYTES,
        memsw_usage: int | None = None,
        memsw_limit: int | None = UNLIMITED_BYTES,
        failcnt: int = 0,
        oom_kill_disable: int = 0,
        under_oom: int = 0,
        oom_kill: int | None = 0,
        swappiness: int = 60,
        use_hierarchy: int = 1,
        stat: Mapping[str, int] | None = None,
    ) -> Path:
        """A v1 memory cgroup directory with the files the kernel shows."""
        d = self.v1_mount / path.lstrip("/")
        d.mkdir(parents=True, exist_ok=True)
        files: dict[str, str | bytes] = {
            "memory.usage_in_bytes": f"{usage}\n",
            "memory.limit_in_bytes": f"{limit}\n",
            "memory.max_usage_in_bytes": f"{usage + 8192}\n",
            "memory.soft_limit_in_bytes": f"{UNLIMITED_BYTES}\n",
            "memory.failcnt": f"{failcnt}\n",
            "memory.swappiness": f"{swappiness}\n",
            "memory.use_hierarchy": f"{use_hierarchy}\n",
            "memory.oom_control": (
                f"oom_kill_disable {oom_kill_disable}\nunder_oom {under_oom}\n"
                + ("" if oom_kill is None else f"oom_kill {oom_kill}\n")
            ),
            "memory.stat": flat_keyed(stat if stat is not None else default_v1_stat(usage)),
            "cgroup.procs": "",
            "tasks": "",
            "notify_on_release": "0\n",
        }
        if memsw_limit is not None:
            files["memory.memsw.limit_in_bytes"] = f"{memsw_limit}\n"
            files["memory.memsw.usage_in_bytes"] = (
                f"{usage if memsw_usage is None else memsw_usage}\n"
            )
        if path == "/":
            files["cgroup.sane_behavior"] = "0\n"
        for name, data in files.items():
            _write(d / name, data)
        self.v1_dirs[path] = d
        return d

    def v2(
        self,
        path: str,
        *,
        memory: bool | None = None,
        controllers: str | None = None,
        subtree_control: str = "",
        current: int = 4657152,
        max: int | None = None,
        high: int | None = None,
        low: int = 0,
        min: int = 0,
        swap_current: int = 0,
        swap_max: int | None = None,
        oom_group: int = 0,
        events: Mapping[str, int] | None = None,
        pressure: bytes | None = b"",
        stat: Mapping[str, int] | None = None,
        kill: bool = True,
        freeze: bool = True,
    ) -> Path:
        """A cgroup2 directory. ``max``/``high``/``swap_max`` None are written ``max``.

        ``memory`` (default: the layout is v2) writes the memory controller's
        files; the root never has memory.current/max/events, cgroup.kill or
        cgroup.freeze (CFTYPE_NOT_ON_ROOT). ``pressure=None`` writes no
        memory.pressure; ``b""`` writes an all-zero one.
        """
        memory = (self.layout == "v2") if memory is None else memory
        is_root = path == "/"
        d = self.v2_mount / path.lstrip("/")
        d.mkdir(parents=True, exist_ok=True)
        if controllers is None:
            controllers = "cpu io memory pids" if memory else ""
        files: dict[str, str | bytes] = {
            "cgroup.controllers": (controllers + "\n") if controllers else "\n",
            "cgroup.subtree_control": (subtree_control + "\n") if subtree_control else "\n",
            "cgroup.procs": "",
            "cgroup.threads": "",
            "cgroup.max.depth": "max\n",
            "cgroup.max.descendants": "max\n",
            "cgroup.stat": "nr_descendants 0\nnr_dying_descendants 0\n",
            "cpu.stat": "usage_usec 0\nuser_usec 0\nsystem_usec 0\n",
            "cpu.pressure": psi_text(),
            "io.pressure": psi_text(),
        }
        if pressure is not None:
            files["memory.pressure"] = pressure or psi_text()
        if not is_root:
            files["cgroup.type"] = "domain\n"
            files["cgroup.events"] = "populated 1\nfrozen 0\n"
            if kill:
                files["cgroup.kill"] = ""
            if freeze:
                files["cgroup.freeze"] = "0\n"
        if memory:
            files["memory.stat"] = flat_keyed(stat if stat is not None else default_v2_stat())
            if not is_root:
                ev = {"low": 0, "high": 0, "max": 0, "oom": 0, "oom_kill": 0,
                      "oom_group_kill": 0}
                ev.update(events or {})
                files.update(
                    {
                        "memory.current": f"{current}\n",
                        "memory.max": f"{_limit(max)}\n",
                        "memory.high": f"{_limit(high)}\n",
                        "memory.low": f"{low}\n",
                        "memory.min": f"{min}\n",
                        "memory.peak": f"{current + 8192}\n",
                        "memory.swap.current": f"{swap_current}\n",
                        "memory.swap.max": f"{_limit(swap_max)}\n",
                        "memory.swap.events": "high 0\nmax 0\nfail 0\n",
                        "memory.events": flat_keyed(ev),
                        "memory.events.local": flat_keyed(ev),
                        "memory.oom.group": f"{oom_group}\n",
                    }
                )
        for name, data in files.items():
            _write(d / name, data)
        self.v2_dirs[path] = d
        return d

    # writing ------------------------------------------------------------

    def mounts(self) -> Sequence[Mount]:
        if self.layout == "v2":
            return V2_MOUNTS
        if self.layout == "v1":
            return tuple(m for m in HYBRID_MOUNTS if m.fstype != "cgroup2")
        return HYBRID_MOUNTS

    def write_proc(self, p: FakeProc) -> Path:
        d = self.proc / str(p.pid)
        oom_score = p.oom_score
        if oom_score is None:
            oom_score = kernel_oom_score(p.badness(self.totalpages), self.totalpages)
        files: dict[str, bytes] = {
            "stat": p.stat(),
            "status": p.status(),
            "oom_score_adj": b"%d\n" % p.oom_score_adj,
            "oom_score": b"%d\n" % oom_score,
            "cgroup": p.cgroup_file(self.layout),
            "cmdline": b"".join(a + b"\0" for a in p.cmdline),
        }
        d.mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            if name not in p.omit:
                _write(d / name, data)
        return d

    def write(self) -> Path:
        """Write proc/ and every cgroup.procs; returns the root."""
        proc = self.proc
        meminfo = meminfo_text(
            self.mem_total_kb, self.mem_available_kb, self.swap_total_kb, self.swap_free_kb
        )
        _write(proc / "meminfo", meminfo)
        if self.pressure is not None:
            _write(proc / "pressure/memory", self.pressure)
        if self.swappiness is not None:
            _write(proc / "sys/vm/swappiness", f"{self.swappiness}\n")
        _write(proc / "self/mountinfo", mountinfo_text(self.mounts()))
        members_v1: dict[str, list[int]] = {p: [] for p in self.v1_dirs}
        members_v2: dict[str, list[int]] = {p: [] for p in self.v2_dirs}
        for p in self.procs:
            self.write_proc(p)
            if not p.listed:
                continue
            if self.layout in ("hybrid", "v1"):
                members_v1[p.memcg_v1 or "/"].append(p.pid)
            if self.layout in ("hybrid", "v2"):
                members_v2[p.cgroup_v2 or "/"].append(p.pid)
        for dirs, members in ((self.v1_dirs, members_v1), (self.v2_dirs, members_v2)):
            for path, pids in members.items():
                text = "".join(f"{pid}\n" for pid in sorted(pids))
                _write(dirs[path] / "cgroup.procs", text)
        return self.root

    def cli_args(self) -> list[str]:
        return [
            "--proc-root", str(self.proc), "--fs-root", str(self.root), "--no-verify-fs",
        ]


def default_v1_stat(usage: int) -> dict[str, int]:
    rss = usage // 4 * 3 // PAGE_SIZE * PAGE_SIZE
    cache = usage - rss
    return {
        "cache": cache, "rss": rss, "rss_huge": 0, "shmem": 0, "mapped_file": 0,
        "dirty": 0, "writeback": 0, "swap": 0, "pgpgin": 32451, "pgpgout": 31924,
        "pgfault": 66997, "pgmajfault": 2, "inactive_anon": rss, "active_anon": 0,
        "inactive_file": cache, "active_file": 0, "unevictable": 0,
        "hierarchical_memory_limit": UNLIMITED_BYTES,
        "hierarchical_memsw_limit": UNLIMITED_BYTES,
        "total_cache": cache, "total_rss": rss,
    }


def default_v2_stat() -> dict[str, int]:
    return {
        "anon": 3493888, "file": 1163264, "kernel": 442368, "kernel_stack": 49152,
        "pagetables": 94208, "sec_pagetables": 0, "percpu": 1200, "sock": 0, "vmalloc": 0,
        "shmem": 0, "zswap": 0, "zswapped": 0, "file_mapped": 0, "file_dirty": 0,
        "file_writeback": 0, "swapcached": 0, "anon_thp": 0, "file_thp": 0, "shmem_thp": 0,
        "inactive_anon": 3481600, "active_anon": 12288, "inactive_file": 1163264,
        "active_file": 0, "unevictable": 0, "slab_reclaimable": 167936,
        "slab_unreclaimable": 121856, "slab": 289792, "workingset_refault_anon": 0,
        "workingset_refault_file": 0, "pgscan": 0, "pgsteal": 0, "pgfault": 2061,
        "pgmajfault": 0,
    }


def write_thread_status(proc_dir: Path, tid: int, status: bytes, rss_pages: int = 0) -> None:
    """``proc/PID/task/TID/status`` and ``stat``: a thread of a process (for a
    dead leader); ``rss_pages`` is the thread's stat rss (get_mm_rss)."""
    _write(proc_dir / "task" / str(tid) / "status", status)
    _write(proc_dir / "task" / str(tid) / "stat", stat_line(tid, b"thread", rss_pages=rss_pages))

