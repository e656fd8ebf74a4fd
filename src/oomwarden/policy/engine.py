"""Ranking the tasks of a domain with the kernel's policy.

Pure: reads a :class:`Snapshot` and a :class:`Domain`, returns a
:class:`Decision`. No files, no clock.
"""

from __future__ import annotations

from collections.abc import Callable

from oomwarden.decision import Candidate, Decision, Domain
from oomwarden.errors import CgroupNotFound
from oomwarden.model import Cgroup, HierarchyKind, Snapshot, Task, page_counter_max_bytes
from oomwarden.policy.kernel import badness_points, memcg_totalpages, unkillable_reason


def system_domain(snapshot: Snapshot) -> Domain:
    return Domain(kind="system", totalpages=snapshot.system.totalpages)


def cgroup_domain(snapshot: Snapshot, cg: Cgroup) -> Domain:
    """The memcg OOM domain of ``cg``; the root cgroup's OOM is the system's."""
    if cg.path == "/":
        return system_domain(snapshot)
    if not cg.memory_controller:
        raise CgroupNotFound(
            f"cgroup {cg.kind.value}:{cg.path} has no memory controller, so it is no OOM "
            "domain (on this layout the memory controller is on the other hierarchy)"
        )
    return Domain(kind="cgroup", totalpages=memcg_totalpages(cg, snapshot.system), cgroup=cg)


def _cgroup_order(snapshot: Snapshot, domain: Domain) -> dict[str, int]:
    kind = domain.cgroup.kind if domain.cgroup is not None else None
    return {c.path: i for i, c in enumerate(snapshot.cgroups) if c.kind is kind}


def _task_cgroup(task: Task, domain: Domain) -> str | None:
    cg = domain.cgroup
    if cg is None:
        return None
    return task.memcg_v1 if cg.kind is HierarchyKind.V1 else task.cgroup_v2


ScanKey = tuple[int, int, int, int]


def scan_order(snapshot: Snapshot, domain: Domain) -> Callable[[Task], ScanKey]:
    """The position at which the kernel's scan meets a task (later is larger):
    cgroup pre-order index, then, on v2, the position in ``cgroup.procs``
    (css_task_iter order; v1 sorts that file), then start time and pid."""
    if domain.cgroup is None:  # the system: for_each_process, creation order
        return lambda task: (0, 0, task.start_ticks, task.pid)
    order = _cgroup_order(snapshot, domain)
    listed: dict[int, int] = {}
    if domain.cgroup is not None and domain.cgroup.kind is HierarchyKind.V2:
        listed = {
            pid: i for c in snapshot.cgroups if c.kind is HierarchyKind.V2
            for i, pid in enumerate(c.pids)
        }
    # Not listed (born after the walk): the kernel adds new tasks at the tail,
    # so it meets them after every listed one.
    unlisted = len(listed)

    def key(task: Task) -> ScanKey:
        group = order.get(_task_cgroup(task, domain) or "", 0)
        return (group, listed.get(task.pid, unlisted), task.start_ticks, task.pid)

    return key


def kernel_decision(snapshot: Snapshot, domain: Domain) -> Decision:
    """``select_bad_process()`` over the domain's tasks, with reasons."""
    total = domain.totalpages
    key = scan_order(snapshot, domain)
    ranked: list[tuple[int, ScanKey, Candidate]] = []
    excluded: list[Candidate] = []
    for task in domain.tasks(snapshot):
        points = badness_points(task, total)
        if points is None:
            why = unkillable_reason(task) or "unkillable"
            excluded.append(Candidate(task, "unkillable", None, (why,), total))
            continue
        ranked.append((points, key(task), Candidate(task, "select", points, (), total)))
    # Most points first; among equal points the one the kernel meets last wins.
    ranked.sort(key=lambda r: (r[0], r[1]), reverse=True)
    candidates = [r[2] for r in ranked]
    victim: Candidate | None = None
    if candidates:
        top = candidates[0]
        note = "most points in the domain: the kernel's choice"
        ties = [c for c in candidates[1:6] if c.points == top.points]
        if ties:
            note += (
                f" (ties with pid {', '.join(str(c.task.pid) for c in ties)}; "
                "the kernel keeps the one it meets last)"
            )
        victim = top._replace(notes=(*top.notes, note))
        candidates[0] = victim
    excluded.sort(key=lambda c: c.task.pid)
    notes: list[str] = []
    if snapshot.skipped_unreadable:
        notes.append(
            f"{snapshot.skipped_unreadable} processes could not be read and are not ranked"
        )
    if snapshot.skipped_cgroups or snapshot.degraded_cgroups:
        notes.append(
            f"{snapshot.skipped_cgroups} cgroups were left out and "
            f"{snapshot.degraded_cgroups} cgroup files ignored: they did not parse "
            f"({'; '.join(snapshot.cgroup_problems[:2])})"
        )
    if snapshot.skipped_unparsable:
        first = "; ".join(snapshot.problems[:2])
        notes.append(
            f"{snapshot.skipped_unparsable} processes are not ranked: their /proc files did not "
            f"parse ({first})"
        )
    cg = domain.cgroup
    if cg is not None and not cg.verified:
        notes.append(
            f"the limit of {cg.fs_path} is unverified: its filesystem is not a cgroup "
            "filesystem, so it may limit nothing"
        )
    if cg is not None and cg.limit is not None and cg.limit >= page_counter_max_bytes(
        snapshot.system.page_size
    ):
        notes.append(
            f"{cg.name} has no memory limit of its own: an OOM reaches it only through "
            "an ancestor's limit or the system's"
        )
    return Decision(
        domain=domain,
        policy="kernel",
        candidates=(*candidates, *excluded),
        victim=victim,
        notes=tuple(notes),
    )
