"""Memory cgroups on both hierarchies, found from mountinfo.

Hierarchies come from ``PROC/self/mountinfo`` (never from a guessed path):
``/sys/fs/cgroup`` may be a plain tmpfs where a ``memory.max`` limits nothing,
so every mount point is also checked with statfs for the cgroup / cgroup2
magic and marked ``verified``.

All paths in mountinfo are re-rooted under ``fs_root`` so that a recorded or
hand-built tree (``tests/fixtures/...``) reads exactly like the live machine.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

from oomwarden.errors import ParseError, SourceError
from oomwarden.model import (
    Cgroup,
    Hierarchy,
    HierarchyKind,
    Pressure,
    page_counter_max_bytes,
)
from oomwarden.sources.fsmagic import is_cgroup_fs
from oomwarden.sources.parse import (
    parse_flat_keyed,
    parse_limit,
    parse_mountinfo,
    parse_oom_control,
    parse_psi,
    parse_single_int,
    v1_controllers,
)

#: Bounds on a hierarchy walk: a runaway tree must not stall the OOM path.
MAX_CGROUPS = 100_000
MAX_DEPTH = 64
#: How many parse problems a walk keeps word for word.
MAX_PROBLEMS = 5

_T = TypeVar("_T")


def reroot(fs_root: str, path: str) -> str:
    """``path`` (absolute, as the kernel shows it) below ``fs_root``."""
    if fs_root in ("", "/"):
        return path
    return os.path.join(fs_root, path.lstrip("/"))


def find_hierarchies(
    proc_root: str = "/proc", fs_root: str = "/", *, verify: bool = True
) -> tuple[Hierarchy, ...]:
    """The v1 memory hierarchy and the v2 hierarchy, where mounted.

    One entry per kind (the first mount of it; bind mounts of the same
    hierarchy are skipped). ``verify=False`` skips the statfs check and marks
    nothing verified: for reading recorded trees.
    """
    path = f"{proc_root}/self/mountinfo"
    try:
        with open(path, "rb") as f:
            mounts = parse_mountinfo(f.read())
    except OSError as e:
        raise SourceError(f"cannot read {path}: {e.strerror}") from None
    except ParseError as e:
        raise ParseError(f"{path}: {e}") from None
    found: list[Hierarchy] = []
    seen: set[HierarchyKind] = set()
    for m in mounts:
        if m.kind in seen:
            continue
        mount_point = reroot(fs_root, m.mount_point)
        if m.kind is HierarchyKind.V1:
            controllers = v1_controllers(m.super_options)
            if "memory" not in controllers:
                continue
        if not os.path.isdir(mount_point):
            raise SourceError(
                f"{path} lists a {m.kind.value} cgroup hierarchy at {m.mount_point}, but "
                f"{mount_point} is not a directory (wrong --fs-root?)"
            )
        if m.kind is HierarchyKind.V2:
            controllers = _v2_controllers(mount_point)
        verified = verify and is_cgroup_fs(mount_point, m.kind is HierarchyKind.V2)
        found.append(
            Hierarchy(
                kind=m.kind,
                mount_point=mount_point,
                root=m.root,
                controllers=controllers,
                verified=verified,
            )
        )
        seen.add(m.kind)
    return tuple(found)


def _v2_controllers(mount_point: str) -> tuple[str, ...]:
    try:
        with open(os.path.join(mount_point, "cgroup.controllers"), "rb") as f:
            return tuple(f.read().decode("ascii", "replace").split())
    except OSError:
        return ()


def _reader(dir_path: str) -> Callable[[str], bytes | None]:
    def read(name: str) -> bytes | None:
        try:
            with open(os.path.join(dir_path, name), "rb") as f:
                return f.read()
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.ENODEV, errno.EOPNOTSUPP, errno.EACCES,
                           errno.EPERM, errno.EINVAL):
                return None
            raise
    return read


def _opt_int(read: Callable[[str], bytes | None], name: str) -> int | None:
    data = read(name)
    return None if data is None else parse_single_int(data, name)


def _opt_limit(
    read: Callable[[str], bytes | None], name: str, unlimited: int
) -> int | None:
    data = read(name)
    return None if data is None else parse_limit(data, name, unlimited)


@dataclass
class WalkReport:
    """What a cgroup walk could not use, for notes and counts."""

    #: Cgroups left out because a file that matters (a limit, usage,
    #: oom_control, cgroup.procs) did not parse. Their children are still read.
    skipped: int = 0
    #: Informational files (memory.stat, memory.events, memory.pressure) that
    #: did not parse; the cgroup is kept with that field empty or None.
    degraded: int = 0
    #: The first messages, word for word.
    problems: list[str] = field(default_factory=list)

    def note(self, message: str) -> None:
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(message)


def _informational(
    fs_path: str, report: WalkReport | None, parse: Callable[[], _T], empty: _T
) -> _T:
    """Parse a file that informs but decides nothing; a bad one is reported,
    not fatal (strict, raising, when there is no report to write to)."""
    try:
        return parse()
    except ParseError as e:
        if report is None:
            raise
        report.degraded += 1
        report.note(f"{fs_path}: {e}")
        return empty


def _opt_pressure(read: Callable[[str], bytes | None]) -> Pressure | None:
    data = read("memory.pressure")
    if data is None:
        return None
    return parse_psi(data, "memory.pressure")


def _pids(read: Callable[[str], bytes | None]) -> tuple[int, ...]:
    data = read("cgroup.procs")
    if not data:
        return ()
    return tuple(parse_single_int(line, "cgroup.procs") for line in data.split())


def read_cgroup(
    hierarchy: Hierarchy,
    path: str,
    fs_path: str,
    *,
    psize: int = 4096,
    with_stat: bool = True,
    report: WalkReport | None = None,
    with_pids: bool = True,
) -> Cgroup:
    """Read one cgroup directory. Missing files are None (unknown).

    With a ``report``, a malformed memory.stat, memory.events or
    memory.pressure is noted there and left empty; without one it raises."""
    try:
        inode = os.stat(fs_path).st_ino
    except OSError as e:
        raise SourceError(f"cannot stat cgroup {fs_path}: {e.strerror}") from None
    read = _reader(fs_path)
    unlimited = page_counter_max_bytes(psize)
    stat_data = read("memory.stat") if with_stat else None
    stat: Mapping[str, int] = _informational(
        fs_path, report,
        lambda: parse_flat_keyed(stat_data, "memory.stat") if stat_data is not None else {},
        {},
    )
    pressure = _informational(fs_path, report, lambda: _opt_pressure(read), None)
    try:
        if hierarchy.kind is HierarchyKind.V1:
            oom = read("memory.oom_control")
            swappiness = _opt_int(read, "memory.swappiness")
            use_hier = _opt_int(read, "memory.use_hierarchy")
            return Cgroup(
                kind=hierarchy.kind,
                path=path,
                fs_path=fs_path,
                inode=inode,
                memory_controller=True,
                verified=hierarchy.verified,
                usage=_opt_int(read, "memory.usage_in_bytes"),
                limit=_opt_limit(read, "memory.limit_in_bytes", unlimited),
                memsw_usage=_opt_int(read, "memory.memsw.usage_in_bytes"),
                memsw_limit=_opt_limit(read, "memory.memsw.limit_in_bytes", unlimited),
                failcnt=_opt_int(read, "memory.failcnt"),
                oom_control=None if oom is None else parse_oom_control(oom),
                swappiness=swappiness,
                use_hierarchy=None if use_hier is None else bool(use_hier),
                stat=stat,
                pressure=pressure,
                pids=_pids(read) if with_pids else (),
            )
        events_data = read("memory.events")
        events: Mapping[str, int] = _informational(
            fs_path, report,
            lambda: (parse_flat_keyed(events_data, "memory.events")
                     if events_data is not None else {}),
            {},
        )
        oom_group = _opt_int(read, "memory.oom.group")
        current = _opt_int(read, "memory.current")
        is_root = path == "/"
        return Cgroup(
            kind=hierarchy.kind,
            path=path,
            fs_path=fs_path,
            inode=inode,
            memory_controller=current is not None or (is_root and hierarchy.has_memory),
            verified=hierarchy.verified,
            usage=current,
            limit=_opt_limit(read, "memory.max", unlimited),
            high=_opt_limit(read, "memory.high", unlimited),
            low=_opt_limit(read, "memory.low", unlimited),
            min=_opt_limit(read, "memory.min", unlimited),
            swap_current=_opt_int(read, "memory.swap.current"),
            swap_max=_opt_limit(read, "memory.swap.max", unlimited),
            oom_group=None if oom_group is None else bool(oom_group),
            events=events,
            has_kill=os.path.exists(os.path.join(fs_path, "cgroup.kill")),
            has_freeze=os.path.exists(os.path.join(fs_path, "cgroup.freeze")),
            stat=stat,
            pressure=pressure,
            pids=_pids(read) if with_pids else (),
        )
    except ParseError as e:
        raise ParseError(f"{fs_path}: {e}") from None


def _join(root: str, rel: str) -> str:
    if not rel:
        return root
    return root.rstrip("/") + "/" + rel


def walk_hierarchy(
    hierarchy: Hierarchy,
    *,
    psize: int = 4096,
    below: str | None = None,
    report: WalkReport | None = None,
    with_stat: bool = True,
    with_pids: bool = True,
) -> list[Cgroup]:
    """Every cgroup of ``hierarchy`` in pre-order (children by inode, i.e. by
    creation), bounded by :data:`MAX_CGROUPS` and :data:`MAX_DEPTH`.

    A cgroup removed during the walk is skipped (a normal race): its
    directory must still be there, with the same inode, after its files were
    read. A cgroup whose deciding files do not parse is left out (its
    children are still read), and an odd informational file only empties its
    field; both go to ``report``: one odd file must not cost every decision.
    ``below``, a path inside the hierarchy, limits the walk to that subtree.
    ``with_stat=False`` leaves out memory.stat (costly on v2 with many cgroups);
    ``with_pids=False`` leaves out cgroup.procs (``pids`` empty: a source that
    knows each task's cgroup fills them in).
    """
    out: list[Cgroup] = []
    start_rel = ""
    if below is not None and below != hierarchy.root:
        prefix = hierarchy.root.rstrip("/") + "/"
        if hierarchy.root != "/" and not below.startswith(prefix):
            return out
        start_rel = below[len(prefix) :] if hierarchy.root != "/" else below.lstrip("/")
    report = report if report is not None else WalkReport()
    stack: list[tuple[str, int]] = [(start_rel, 0)]
    visited = 0
    while stack and visited < MAX_CGROUPS:
        visited += 1
        rel, depth = stack.pop()
        fs_path = _join(hierarchy.mount_point, rel)
        path = _join(hierarchy.root, rel) if rel else hierarchy.root
        try:
            cg: Cgroup | None = read_cgroup(
                hierarchy, path, fs_path, psize=psize, with_stat=with_stat, report=report,
                with_pids=with_pids,
            )
            if cg is not None and os.stat(fs_path).st_ino != cg.inode:
                continue  # removed (and perhaps made again) while we read it
        except (SourceError, OSError):
            continue
        except ParseError as e:
            report.skipped += 1
            report.note(str(e))
            cg = None  # left out, but its children are still walked
        if cg is not None:
            out.append(cg)
        if depth >= MAX_DEPTH:
            continue
        try:
            with os.scandir(fs_path) as it:
                children = [
                    (e.inode(), e.name) for e in it if e.is_dir(follow_symlinks=False)
                ]
        except OSError:
            continue
        children.sort(reverse=True)  # popped in ascending inode order
        for _, name in children:
            stack.append((_join(rel, name) if rel else name, depth + 1))
    return out
