"""Build a :class:`Snapshot` from a proc root and a filesystem root.

The pid -> cgroup map comes from each cgroup's ``cgroup.procs`` (one read per
cgroup) instead of one ``/proc/PID/cgroup`` read per process; only processes
that appeared after the cgroup walk fall back to their own cgroup file.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Literal

from oomwarden.errors import BpfError, SourceError
from oomwarden.model import Cgroup, Hierarchy, HierarchyKind, Snapshot, Task
from oomwarden.sources import bpf
from oomwarden.sources.cgroupfs import WalkReport, find_hierarchies, walk_hierarchy
from oomwarden.sources.procfs import (
    CgroupMap,
    ReadOptions,
    ReadStats,
    is_live_procfs,
    page_size,
    read_system,
    read_tasks,
)


@dataclass(frozen=True, slots=True)
class SourceConfig:
    """Where and what to read. The defaults read the live machine."""

    proc_root: str = "/proc"
    #: Mount points from mountinfo are taken below this root.
    fs_root: str = "/"
    #: statfs-check every hierarchy (turn off only for recorded trees).
    verify_fs: bool = True
    read: ReadOptions = field(default_factory=ReadOptions)
    cgroups: bool = True
    #: Read memory.stat of every cgroup (off on a hot path with many cgroups).
    cgroup_stat: bool = True
    page_size: int | None = None
    #: Only this cgroup subtree (hierarchy kind value, path): its cgroups and
    #: the processes in them, not the whole machine. The OOM path of a memory
    #: cgroup domain needs no more, and reads much less on a busy host.
    only: tuple[str, str] | None = None
    #: The task source: ``procfs``, ``bpf`` (the BPF task iterator, or a
    #: :class:`BpfError`), or ``auto`` (bpf where it loads, else procfs; see
    #: :func:`choose_source` for the reason it gives).
    source: Literal["auto", "procfs", "bpf"] = "procfs"
    #: The BPF object; None: :func:`oomwarden.sources.bpf.default_object_path`.
    bpf_object: str | None = None


SOURCES = ("auto", "procfs", "bpf")


@dataclass(frozen=True, slots=True)
class SourceChoice:
    """The backend a config resolves to, and (for ``auto`` falling back to
    procfs) the one line saying why BPF is not used."""

    backend: Literal["procfs", "bpf"]
    reason: str | None = None


def choose_source(config: SourceConfig) -> SourceChoice:
    """Resolve ``config.source``. ``bpf`` raises :class:`BpfError` when the
    iterator cannot be had; ``auto`` then says why and takes procfs. A proc
    root that is not the live /proc (a recorded tree) is procfs's, silently."""
    if config.source == "procfs":
        return SourceChoice("procfs")
    try:
        bpf.check_proc_root(config.proc_root)
        bpf.load(config.bpf_object)
    except BpfError as e:
        if config.source == "bpf":
            raise
        if is_live_procfs(config.proc_root):
            return SourceChoice("procfs", f"BPF snapshot source not used: {e}; using procfs")
        return SourceChoice("procfs")
    except OSError as e:
        if config.source == "bpf":
            raise BpfError(f"cannot open {config.proc_root}: {e.strerror}") from None
        return SourceChoice("procfs")
    return SourceChoice("bpf")


def build_snapshot(
    config: SourceConfig = SourceConfig(),
    *,
    clock: Callable[[], int] = time.monotonic_ns,
) -> Snapshot:
    """Read everything once. Raises :class:`SourceError` for an unreadable root."""
    started = clock()
    t0 = time.perf_counter()
    if not os.path.isdir(config.proc_root):
        raise SourceError(f"cannot read proc root {config.proc_root}: not a directory")
    psize = config.page_size or page_size()
    hierarchies: tuple[Hierarchy, ...] = ()
    cgroups: list[Cgroup] = []
    walk = WalkReport()
    # BPF records carry each task's cgroup ids: the cgroups' member lists
    # then come from the tasks, and cgroup.procs is not read -- except on a
    # v2 hierarchy with the memory controller, whose cgroup.procs order is
    # the kernel's scan order (the kernel policy breaks ties by it).
    use_bpf = choose_source(config).backend == "bpf"
    derived: set[HierarchyKind] = set()
    if config.cgroups:
        hierarchies = find_hierarchies(
            config.proc_root, config.fs_root, verify=config.verify_fs
        )
        for h in hierarchies:
            if config.only is not None and h.kind.value != config.only[0]:
                continue
            with_pids = not use_bpf or (h.kind is HierarchyKind.V2 and h.has_memory)
            if not with_pids:
                derived.add(h.kind)
            cgroups.extend(walk_hierarchy(
                h, psize=psize, report=walk, with_stat=config.cgroup_stat,
                below=None if config.only is None else config.only[1],
                with_pids=with_pids,
            ))
    system = read_system(config.proc_root, psize=psize)
    stats = ReadStats()
    kept = hierarchies if config.only is None else tuple(
        h for h in hierarchies if h.kind.value == config.only[0])
    if use_bpf:
        try:
            tasks = bpf.read_tasks_bpf(
                bpf.load(config.bpf_object), proc_root=config.proc_root, psize=psize,
                options=config.read, cgroups=cgroups, hierarchies=kept, stats=stats,
                only=None if config.only is None else HierarchyKind(config.only[0]),
                scope=config.only,
            )
        except BpfError as e:
            if config.source == "bpf":
                raise
            # auto: a pass that fails (an fd limit, a kernel error) is read
            # from /proc instead, and the snapshot says so.
            snap = build_snapshot(replace(config, source="procfs"), clock=clock)
            return replace(snap, problems=(*snap.problems,
                                           f"BPF task iterator failed ({e}); read /proc"))
        cgroups = with_members(cgroups, tasks, derived)
    else:
        tasks = read_tasks(
            config.proc_root,
            psize=psize,
            options=config.read,
            stats=stats,
            cgroup_map=cgroup_map(cgroups, kept, config.proc_root),
            pids=None if config.only is None else sorted({p for c in cgroups for p in c.pids}),
        )
    return Snapshot(
        taken_ns=started,
        system=system,
        tasks=tuple(tasks),
        hierarchies=hierarchies,
        cgroups=tuple(cgroups),
        build_seconds=time.perf_counter() - t0,
        skipped_gone=stats.gone,
        skipped_unreadable=stats.unreadable,
        skipped_unparsable=stats.unparsable,
        problems=tuple(stats.problems),
        skipped_cgroups=walk.skipped,
        degraded_cgroups=walk.degraded,
        cgroup_problems=tuple(walk.problems),
    )


def cgroup_map(
    cgroups: list[Cgroup], hierarchies: tuple[Hierarchy, ...], proc_root: str
) -> CgroupMap:
    """The pid -> path maps of the hierarchies that are mounted."""
    v1: dict[int, str] | None = None
    v2: dict[int, str] | None = None
    if any(h.kind is HierarchyKind.V1 for h in hierarchies):
        v1 = {}
    if any(h.kind is HierarchyKind.V2 for h in hierarchies):
        v2 = {}
    for cg in cgroups:
        target = v1 if cg.kind is HierarchyKind.V1 else v2
        if target is None:
            continue
        for pid in cg.pids:
            target[pid] = cg.path
    return CgroupMap(v1=v1, v2=v2)


def with_members(
    cgroups: list[Cgroup], tasks: list[Task], kinds: set[HierarchyKind] | None = None
) -> list[Cgroup]:
    """The cgroups (of ``kinds``, default all) with ``pids`` taken from the
    tasks' paths, sorted, for a source that knows each task's cgroup (BPF)
    instead of reading cgroup.procs. One difference: cgroup.procs also lists
    a process one of whose threads (not its leader) is in the cgroup; here a
    process is where its leader is. (v1 sorts cgroup.procs too; v2 lists in
    the kernel's scan order, which is why v2 memory hierarchies keep theirs.)"""
    if kinds is not None and not kinds:
        return cgroups
    v1: defaultdict[str | None, list[int]] = defaultdict(list)
    v2: defaultdict[str | None, list[int]] = defaultdict(list)
    for t in tasks:
        pid = t.pid
        v1[t.memcg_v1].append(pid)
        v2[t.cgroup_v2].append(pid)
    out: list[Cgroup] = []
    for cg in cgroups:
        if kinds is not None and cg.kind not in kinds:
            out.append(cg)
            continue
        members = (v1 if cg.kind is HierarchyKind.V1 else v2).get(cg.path, [])
        out.append(replace(cg, pids=tuple(sorted(members))))
    return out
