"""The kernel's own victim choice, replicated exactly (mm/oom_kill.c).

``oom_badness()``::

    if the task is unkillable (global init, kernel thread)      -> LONG_MIN
    if it has no mm (zombie; find_lock_task_mm found none)      -> LONG_MIN
    if oom_score_adj == -1000 (or MMF_OOM_SKIP, or in vfork)    -> LONG_MIN
    points = get_mm_rss() + swap entries + page-table pages
    points += oom_score_adj * (totalpages / 1000)               (integer division)

``get_mm_rss()`` reads the per-CPU rss counters without summing them; it is
``/proc/PID/stat`` field 24 (``Task.oom_rss``), not the exact sums that
``/proc/PID/status`` shows since Linux 6.16 (see
``test_kernel_ranks_by_unsummed_rss_like_us``: the kernel's ``oom_score``
follows the stat value where the two fall on different sides of a step).
The swap term has no such unsummed source: with swap in use it may be
off by the per-CPU slack (at most ``nr_cpus * max(32, 2 * nr_cpus)`` pages).

``/proc/PID/oom_score`` scales that for the system domain:
``(1000 + points * 1000 / totalpages) * 2 / 3`` in C long arithmetic
(division truncates toward zero), and 0 for LONG_MIN.

``select_bad_process()`` walks the tasks and keeps a task when
``points >= chosen_points``: among equal points the task met *last* wins. The
system walk is ``for_each_process`` (creation order); a memcg walk is
``mem_cgroup_scan_tasks`` (the cgroups of the subtree in pre-order, creation
order among siblings, and each cgroup's tasks in css_task_iter order). The
engine orders by (cgroup pre-order index, position in the cgroup's v2
``cgroup.procs`` (css_task_iter order; v1 sorts that file, so it is not
used there), start time, pid): start time has clock-tick resolution, so two
processes started in the same tick are ordered by pid, which is creation
order unless PIDs wrapped between them.

Not visible from user space and so not modelled: MMF_OOM_SKIP (already
reaped), oom_task_origin (swapoff/KSM) and cpuset/mempolicy constraints.
``in_vfork()`` is detected where the reader can: a child that shares its
parent's mm (``kcmp(KCMP_VM)``) while the parent waits in state D.
"""

from __future__ import annotations

from dataclasses import dataclass

from oomwarden.model import Cgroup, HierarchyKind, SystemMemory, Task

LONG_MIN = -(2**63)
OOM_SCORE_ADJ_MIN = -1000
OOM_SCORE_ADJ_MAX = 1000
#: vm.swappiness when it cannot be read: the kernel's default.
DEFAULT_SWAPPINESS = 60


def _to_long(value: int) -> int:
    """Wrap to a signed 64-bit value, as the C arithmetic does."""
    value &= 2**64 - 1
    return value - 2**64 if value >= 2**63 else value


def c_div(a: int, b: int) -> int:
    """C integer division: truncates toward zero."""
    q = abs(a) // abs(b)
    return q if (a >= 0) == (b >= 0) else -q


def unkillable_reason(task: Task) -> str | None:
    """Why the kernel will never pick this task, or None if it may."""
    if task.global_init:
        return "init (pid 1 of the initial PID namespace) is never killed"
    if task.kthread:
        return "kernel thread"
    if not task.has_mm:
        return "no memory to free (zombie or exiting)" if task.is_zombie else "no mm"
    if task.in_vfork:
        return "vfork child sharing its parent's memory: killing it frees nothing"
    if task.oom_score_adj is not None and task.oom_score_adj <= OOM_SCORE_ADJ_MIN:
        return "oom_score_adj -1000: exempt from the OOM killer"
    if task.oom_score_adj is None or task.rss is None:
        return "memory counters unknown"
    return None


@dataclass(frozen=True, slots=True)
class Badness:
    """The parts of ``oom_badness()`` for one task."""

    rss: int
    swap: int
    pgtables: int
    adj: int
    #: ``oom_score_adj * (totalpages / 1000)``
    adj_pages: int
    points: int


def badness(task: Task, totalpages: int) -> Badness | None:
    """``oom_badness(task, totalpages)``; None where the kernel returns LONG_MIN."""
    if unkillable_reason(task) is not None:
        return None
    rss = task.rss or 0
    swap = task.swap or 0
    pgtables = task.pgtables or 0
    adj = task.oom_score_adj or 0
    base = rss + swap + pgtables
    adj_pages = _to_long(adj * (totalpages // 1000))
    return Badness(rss, swap, pgtables, adj, adj_pages, _to_long(base + adj_pages))


def badness_points(task: Task, totalpages: int) -> int | None:
    """Just the points of :func:`badness` (the ranking hot path)."""
    adj = task.oom_score_adj
    rss = task.rss
    if (
        task.global_init
        or task.kthread
        or not task.has_mm
        or task.in_vfork
        or adj is None
        or adj <= OOM_SCORE_ADJ_MIN
        or rss is None
    ):
        return None
    points = rss + (task.swap or 0) + (task.pgtables or 0) + adj * (totalpages // 1000)
    if -(2**63) <= points < 2**63:
        return points
    return _to_long(points)


def oom_score(points: int | None, totalpages: int) -> int:
    """The kernel-scale score ``/proc/PID/oom_score`` shows for these points."""
    if points is None:
        return 0
    return c_div((1000 + c_div(points * 1000, totalpages)) * 2, 3)


def memcg_totalpages(cg: Cgroup, system: SystemMemory) -> int:
    """``mem_cgroup_get_max()``: the memcg OOM domain's size in pages.

    v1 (memsw accounting): limit + min(memsw limit - limit, total swap) when
    the cgroup's swappiness is non-zero; v2: limit + min(swap.max, total swap)
    when vm.swappiness is non-zero. ``?: 1`` as in ``constrained_alloc()``.
    """
    psize = system.page_size
    total_swap = system.swap_total // psize
    unlimited_pages = (2**63 - 1) // psize
    limit = unlimited_pages if cg.limit is None else cg.limit // psize
    total = limit
    vm_swappiness = DEFAULT_SWAPPINESS if system.swappiness is None else system.swappiness
    if cg.kind is HierarchyKind.V1:
        swappiness = cg.swappiness if cg.swappiness is not None else vm_swappiness
        if swappiness:
            memsw = unlimited_pages if cg.memsw_limit is None else cg.memsw_limit // psize
            swap = (memsw - limit) & (2**64 - 1)  # unsigned long in the kernel
            total += min(swap, total_swap)
    elif vm_swappiness:
        swap_max = unlimited_pages if cg.swap_max is None else cg.swap_max // psize
        total += min(swap_max, total_swap)
    return total or 1
