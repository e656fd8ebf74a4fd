"""Build a :class:`Snapshot` from a proc root and a filesystem root.

The pid -> cgroup map comes from each cgroup's ``cgroup.procs`` (one read per
cgroup) instead of one ``/proc/PID/cgroup`` read per process; only processes
that appeared after the cgroup walk fall back to their own cgroup file.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from oomwarden.errors import SourceError
from oomwarden.model import Cgroup, Hierarchy, HierarchyKind, Snapshot
from oomwarden.sources.cgroupfs import WalkReport, find_hierarchies, walk_hierarchy
from oomwarden.sources.procfs import (
    CgroupMap,
    ReadOptions,
    ReadStats,
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
    if config.cgroups:
        hierarchies = find_hierarchies(
            config.proc_root, config.fs_root, verify=config.verify_fs
        )
        for h in hierarchies:
            if config.only is not None and h.kind.value != config.only[0]:
                continue
            cgroups.extend(walk_hierarchy(
                h, psize=psize, report=walk, with_stat=config.cgroup_stat,
                below=None if config.only is None else config.only[1],
            ))
    system = read_system(config.proc_root, psize=psize)
    stats = ReadStats()
    kept = hierarchies if config.only is None else tuple(
        h for h in hierarchies if h.kind.value == config.only[0])
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
