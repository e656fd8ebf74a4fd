"""Snapshot data model: frozen, typed, and ``None`` means *unknown*, never 0.

A :class:`Snapshot` is the whole picture at one instant: system memory and
PSI, every process (:class:`Task`), every memory-relevant cgroup
(:class:`Cgroup`) on every hierarchy (:class:`Hierarchy`). The decision core
reads snapshots only; it never touches /proc itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType

#: The kernel's ``PAGE_COUNTER_MAX`` on 64-bit (``LONG_MAX / PAGE_SIZE``) in
#: pages for 4 KiB pages. A v2 ``max`` and a v1 "unlimited" limit both mean this
#: value inside the kernel, and ``mem_cgroup_get_max()`` computes with it, so we
#: store unlimited limits as this number of bytes rather than as ``None``
#: (which would mean "unknown").
PAGE_COUNTER_MAX_PAGES_4K = (2**63 - 1) // 4096


def page_counter_max_bytes(page_size: int) -> int:
    """The byte value the kernel shows for an unlimited v1 limit."""
    return ((2**63 - 1) // page_size) * page_size


def _frozen_map(d: Mapping[str, int] | None) -> Mapping[str, int]:
    return MappingProxyType(dict(d or {}))


EMPTY_MAP: Mapping[str, int] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class PsiLine:
    """One line of a PSI file (``some`` or ``full``)."""

    avg10: float
    avg60: float
    avg300: float
    total_us: int


@dataclass(frozen=True, slots=True)
class Pressure:
    """Memory pressure (PSI). ``full`` is None where the kernel has no full line."""

    some: PsiLine
    full: PsiLine | None


@dataclass(frozen=True, slots=True)
class SystemMemory:
    """System-wide memory, in bytes, from /proc/meminfo and /proc/pressure/memory."""

    mem_total: int
    mem_available: int | None
    swap_total: int
    swap_free: int
    #: None when PSI is off or unsupported (never a zero stand-in).
    pressure: Pressure | None
    page_size: int = 4096
    #: vm.swappiness; None where unknown.
    swappiness: int | None = None

    @property
    def totalpages(self) -> int:
        """``totalram_pages() + total_swap_pages``: the system OOM domain's size."""
        return self.mem_total // self.page_size + self.swap_total // self.page_size

    @property
    def available_percent(self) -> float:
        """MemAvailable in percent of MemTotal (unknown MemAvailable counts as 0)."""
        return 100.0 * (self.mem_available or 0) / max(1, self.mem_total)

    @property
    def swap_free_percent(self) -> float | None:
        """SwapFree in percent of SwapTotal; None without swap."""
        return None if self.swap_total == 0 else 100.0 * self.swap_free / self.swap_total


class HierarchyKind(StrEnum):
    V1 = "v1"
    V2 = "v2"


@dataclass(frozen=True, slots=True)
class Hierarchy:
    """A mounted cgroup hierarchy found in mountinfo."""

    kind: HierarchyKind
    #: Where it is mounted, as seen from the filesystem root the source was given.
    mount_point: str
    #: The cgroup path inside the hierarchy that is mounted there ("/" usually).
    root: str
    #: v1: the controllers of the mount (e.g. ``("memory",)``); v2: the
    #: controllers enabled at its root (``cgroup.controllers``).
    controllers: tuple[str, ...]
    #: True when statfs() showed the cgroup / cgroup2 magic. Limits read from an
    #: unverified hierarchy are never trusted by the warden.
    verified: bool

    @property
    def has_memory(self) -> bool:
        return "memory" in self.controllers


@dataclass(frozen=True, slots=True)
class OomControl:
    """v1 ``memory.oom_control``."""

    oom_kill_disable: bool
    under_oom: bool
    oom_kill: int | None


@dataclass(frozen=True, slots=True)
class Cgroup:
    """One cgroup on one hierarchy, with the memory files it has.

    On the hybrid layout of this project's machines a v2 cgroup may have no
    memory controller at all and still carry ``memory.pressure`` (PSI is a core
    cgroup feature), ``cgroup.kill`` and ``cgroup.freeze``; such a cgroup has
    ``memory_controller=False`` and its pressure set.
    """

    kind: HierarchyKind
    #: Path inside the hierarchy: "/" for its root, "/a/b" below it.
    path: str
    #: The filesystem path of its directory.
    fs_path: str
    #: Inode number of the directory: the cgroup's identity (a cgroup removed
    #: and made again under the same name is a different cgroup).
    inode: int
    memory_controller: bool
    verified: bool
    #: Current usage in bytes (v1 usage_in_bytes, v2 memory.current).
    usage: int | None = None
    #: Hard limit in bytes (v1 limit_in_bytes, v2 memory.max); unlimited is the
    #: kernel's PAGE_COUNTER_MAX in bytes, see :func:`page_counter_max_bytes`.
    limit: int | None = None
    # v1 only
    memsw_usage: int | None = None
    memsw_limit: int | None = None
    failcnt: int | None = None
    oom_control: OomControl | None = None
    swappiness: int | None = None
    use_hierarchy: bool | None = None
    # v2 only
    high: int | None = None
    low: int | None = None
    min: int | None = None
    swap_current: int | None = None
    swap_max: int | None = None
    oom_group: bool | None = None
    events: Mapping[str, int] = field(default_factory=lambda: EMPTY_MAP)
    has_kill: bool = False
    has_freeze: bool = False
    # both
    stat: Mapping[str, int] = field(default_factory=lambda: EMPTY_MAP)
    pressure: Pressure | None = None
    pids: tuple[int, ...] = ()

    @property
    def name(self) -> str:
        return f"{self.kind.value}:{self.path}"


@dataclass(frozen=True, slots=True)
class Task:
    """One process (thread-group leader) at snapshot time.

    Memory is in pages of ``page_size`` bytes. ``has_mm`` is False for kernel
    threads and zombies: the kernel cannot free memory by killing them.

    Two views of resident memory: ``oom_rss`` is ``get_mm_rss()``, the per-CPU
    counters read without summing (``/proc/PID/stat`` field 24), which is what
    the kernel's ``oom_badness()`` uses; the split ``rss_anon/file/shmem``
    comes from ``/proc/PID/status``, which since Linux 6.16 sums the per-CPU
    counters exactly. The two may differ by the counters' per-CPU slack (up to
    ``nr_cpus * max(32, 2 * nr_cpus)`` pages each); the ranking uses ``oom_rss``.
    """

    pid: int
    tgid: int
    ppid: int
    comm: str
    state: str
    #: Start time in clock ticks since boot: (pid, start_ticks) is the identity.
    start_ticks: int
    uid: int | None
    kthread: bool
    has_mm: bool
    rss_anon: int | None
    rss_file: int | None
    rss_shmem: int | None
    swap: int | None
    pgtables: int | None
    oom_score_adj: int | None
    #: Path in the v1 memory hierarchy, None where unknown or not mounted.
    memcg_v1: str | None = None
    #: Path in the v2 hierarchy, None where unknown or not mounted.
    cgroup_v2: str | None = None
    #: The kernel's own /proc/PID/oom_score, when it was read.
    kernel_oom_score: int | None = None
    exe: str | None = None
    cmdline: tuple[str, ...] | None = None
    page_size: int = 4096
    #: ``get_mm_rss()`` as the OOM killer reads it; None where unknown.
    oom_rss: int | None = None
    #: The global init (pid 1 of the initial PID namespace): never killed.
    #: Pid 1 of a container's namespace is an ordinary process to the kernel.
    global_init: bool = False
    #: A vfork child still sharing its parent's mm (the kernel skips it).
    in_vfork: bool = False

    @property
    def rss(self) -> int | None:
        """Resident pages as the OOM killer counts them: ``oom_rss`` where
        known, else anon + file + shmem."""
        if self.oom_rss is not None:
            return self.oom_rss
        if self.rss_anon is None or self.rss_file is None or self.rss_shmem is None:
            return None
        return self.rss_anon + self.rss_file + self.rss_shmem

    @property
    def rss_bytes(self) -> int | None:
        rss = self.rss
        return None if rss is None else rss * self.page_size

    @property
    def swap_bytes(self) -> int | None:
        return None if self.swap is None else self.swap * self.page_size

    @property
    def identity(self) -> tuple[int, int]:
        return (self.pid, self.start_ticks)

    @property
    def is_zombie(self) -> bool:
        return self.state in ("Z", "X")


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything at one instant. Immutable; built by :mod:`oomwarden.sources`."""

    #: CLOCK_MONOTONIC nanoseconds when the snapshot started (set by the shell).
    taken_ns: int
    system: SystemMemory
    tasks: tuple[Task, ...]
    hierarchies: tuple[Hierarchy, ...] = ()
    cgroups: tuple[Cgroup, ...] = ()
    #: Seconds the snapshot took to build, for reporting only.
    build_seconds: float | None = None
    #: Processes that exited while being read (skipped, a normal race).
    skipped_gone: int = 0
    #: Processes that could not be read (permissions, hidepid).
    skipped_unreadable: int = 0
    #: Processes whose files did not parse (skipped, with the first messages).
    skipped_unparsable: int = 0
    #: The first messages about processes that did not parse.
    problems: tuple[str, ...] = ()
    #: Cgroups left out because a deciding file did not parse (their children
    #: are kept), and cgroups kept with an informational file left empty.
    skipped_cgroups: int = 0
    degraded_cgroups: int = 0
    cgroup_problems: tuple[str, ...] = ()

    def task(self, pid: int) -> Task | None:
        for t in self.tasks:
            if t.pid == pid:
                return t
        return None

    def cgroup(self, kind: HierarchyKind, path: str) -> Cgroup | None:
        for c in self.cgroups:
            if c.kind is kind and c.path == path:
                return c
        return None
