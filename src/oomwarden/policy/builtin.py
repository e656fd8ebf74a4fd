"""Built-in policies beyond ``kernel``: each a plain per-task ``evaluate``.

* ``largest``: the largest rss + swap, ``oom_score_adj`` not counted. Use it
  when adj values are stale or meaningless and size is what matters.
* ``growth``: the fastest grower among the large, with the children it forked
  inside the window (its process tree is the victim). Use it against leaks and
  fork storms: the process eating memory *now*, not the one big by design.
* ``pressure``: the cgroup under the most memory pressure (PSI). Use it when
  services live in their own cgroups and the one stalling most should go.
* ``swap``: the largest swap user (systemd-oomd's swap rule). Use it on
  swap-heavy hosts where swap, not RAM, runs out.
* ``youngest``: the newest process above a size floor. A freshly started job
  is the cheapest to lose; long-running services are not.
* ``priority``: the lowest class first (by cgroup: batch, burstable, default,
  user, guaranteed, system), the largest within it. Use it on mixed hosts.

Points are integers and only their order matters; each policy puts its
primary criterion in the high bits and size in the low bits, so ties in the
primary criterion go to the larger task. Every verdict carries its reasons.
"""

from __future__ import annotations

from collections.abc import Callable
from fnmatch import fnmatchcase

from oomwarden.model import Task
from oomwarden.policy.api import DEFAULT, Context, Policy, Verdict, select
from oomwarden.units import fmt_bytes

#: Primary criteria sit above this; sizes in pages stay below it (2^40 pages
#: is 4 PiB with 4 KiB pages).
HIGH = 2**40
#: A process (tree) is "large" for ``growth`` and ``youngest`` from this share
#: of the domain: oomd's size-or-growth plugin likewise only weighs the growth
#: of cgroups above a size threshold, so a tiny process growing fast from
#: nothing is not preferred over a real leak.
LARGE_SHARE = 0.01


def _size(task: Task) -> int:
    return (task.rss or 0) + (task.swap or 0)


def _mib(pages: int, ctx: Context) -> str:
    return fmt_bytes(pages * ctx.page_size)


# -- largest -------------------------------------------------------------------------


def _largest(task: Task, ctx: Context) -> Verdict:
    size = _size(task)
    return select(size, f"rss + swap = {_mib(size, ctx)} (oom_score_adj not counted)")


# -- swap ----------------------------------------------------------------------------


def _swap(task: Task, ctx: Context) -> Verdict:
    swap = task.swap or 0
    size = _size(task)
    if swap == 0:
        return select(size, f"uses no swap; rss {_mib(size, ctx)} orders it among non-swappers")
    return select(HIGH + swap, f"swap {_mib(swap, ctx)}")


# -- youngest --------------------------------------------------------------------------


def _youngest(task: Task, ctx: Context) -> Verdict:
    floor = max(1, int(ctx.totalpages * LARGE_SHARE))
    size = _size(task)
    if size >= floor:
        return select(HIGH + task.start_ticks,
                      f"{_mib(size, ctx)} is above the floor of {_mib(floor, ctx)}; "
                      f"started at tick {task.start_ticks}")
    return select(size, f"{_mib(size, ctx)} is below the floor of {_mib(floor, ctx)}: "
                        "ranked by size behind every process above it")


# -- growth ----------------------------------------------------------------------------


class _GrowthTable:
    """Per-snapshot attribution of growth: a process's own growth plus the
    memory of descendants born inside the window (a fork storm's children
    count for the process that forked them), computed once per decision."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx  # one table per decision (a context is made per decision)
        self.attributed: dict[int, float] = {}
        self.tree_pages: dict[int, int] = {}
        self.newborns: dict[int, int] = {}
        window = ctx.window_seconds
        in_domain = {t.pid for t in ctx.tasks}
        for t in ctx.tasks:
            own = ctx.growth(t)
            if own is not None:
                self.attributed[t.pid] = self.attributed.get(t.pid, 0.0) + own
                self.tree_pages[t.pid] = self.tree_pages.get(t.pid, 0) + _size(t)
                continue
            if window is None:
                continue
            # Not seen last time: born in the window. Its memory is growth of
            # the nearest ancestor that was there before, if that ancestor is
            # a killable process of the domain; else of the topmost newborn
            # ancestor (a storm started by init or from outside the domain).
            anchor: Task | None = None
            top_new = t
            up = ctx.parent(t)
            for _ in range(64):
                if up is None or up.pid not in in_domain:
                    break
                if ctx.growth(up) is not None:
                    if ctx.kernel_points(up) is not None:
                        anchor = up
                    break
                top_new = up
                up = ctx.parent(up)
            if anchor is None:
                anchor = top_new  # possibly t itself: grown from nothing
            grown = _size(t) * ctx.page_size / window
            self.attributed[anchor.pid] = self.attributed.get(anchor.pid, 0.0) + grown
            self.tree_pages[anchor.pid] = self.tree_pages.get(anchor.pid, 0) + _size(t)
            if anchor is not t:
                self.newborns[anchor.pid] = self.newborns.get(anchor.pid, 0) + 1


def _growth_policy() -> Callable[[Task, Context], Verdict]:
    cache: list[_GrowthTable] = []

    def table(ctx: Context) -> _GrowthTable:
        if not cache or cache[0].ctx is not ctx:
            cache[:] = [_GrowthTable(ctx)]
        return cache[0]

    def evaluate(task: Task, ctx: Context) -> Verdict:
        floor = max(1, int(ctx.totalpages * LARGE_SHARE))
        if ctx.window_seconds is None:
            size = _size(task) + sum(_size(d) for d in ctx.descendants(task))
            return select(size, f"no history yet: ranked by tree size {_mib(size, ctx)}")
        t = table(ctx)
        rate = t.attributed.get(task.pid)
        if rate is None:
            return select(0, "born inside the window: its growth counts for its parent")
        pages = t.tree_pages.get(task.pid, _size(task))
        per_s = fmt_bytes(int(rate)) + "/s"
        kids = t.newborns.get(task.pid, 0)
        with_kids = f" with {kids} new descendants" if kids else ""
        if pages >= floor and rate > 0:
            return select(HIGH + int(rate // ctx.page_size * 1000),
                          f"grew {per_s}{with_kids} over {ctx.window_seconds:.1f} s; "
                          f"{_mib(pages, ctx)} is above the floor of {_mib(floor, ctx)}")
        return select(pages, f"grew {per_s}{with_kids}; {_mib(pages, ctx)} "
                             f"(below the floor of {_mib(floor, ctx)} or not growing): by size")

    return evaluate


# -- pressure ----------------------------------------------------------------------------


def _pressure(task: Task, ctx: Context) -> Verdict:
    found = ctx.pressure_of(task)
    size = _size(task)
    if found is None:
        return DEFAULT.because("no memory pressure (PSI) known for its cgroup")
    cg, psi = found
    stalled = psi.full.avg10 if psi.full is not None else psi.some.avg10
    which = "full" if psi.full is not None else "some"
    return select(HIGH * int(stalled * 100 + 1) + size,
                  f"cgroup {cg.name}: memory {which} avg10 {stalled:.2f}%",
                  f"rss + swap {_mib(size, ctx)} orders it within the cgroup")


# -- priority ----------------------------------------------------------------------------

#: (class name, cgroup globs), lowest class (killed first) first. Kubernetes
#: QoS classes (BestEffort < Burstable < Guaranteed) and systemd's slices.
PRIORITY_CLASSES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("batch", ("*batch*", "/kubepods*/besteffort*", "/kubepods.slice/kubepods-besteffort*")),
    ("burstable", ("/kubepods*/burstable*", "/kubepods.slice/kubepods-burstable*")),
    ("default", ()),
    ("user", ("/user.slice*",)),
    ("guaranteed", ("/kubepods*",)),
    ("system", ("/system.slice*", "/init.scope*")),
)
_DEFAULT_CLASS = next(i for i, (n, _) in enumerate(PRIORITY_CLASSES) if n == "default")


def priority_class(path: str | None) -> int:
    """The class index of a cgroup path (first matching class wins)."""
    if path is not None:
        for index, (_, globs) in enumerate(PRIORITY_CLASSES):
            if any(fnmatchcase(path, g) for g in globs):
                return index
    return _DEFAULT_CLASS


def _priority(task: Task, ctx: Context) -> Verdict:
    cg = ctx.cgroup_of(task)
    path = cg.path if cg is not None else (task.cgroup_v2 or task.memcg_v1)
    index = priority_class(path)
    name = PRIORITY_CLASSES[index][0]
    size = _size(task)
    return select(HIGH * (len(PRIORITY_CLASSES) - index) + size,
                  f"class {name} (cgroup {path or '?'}; lower classes go first)",
                  f"rss + swap {_mib(size, ctx)} orders it within the class")


BUILTINS: dict[str, Policy] = {
    "largest": Policy("largest", _largest,
                      description="the largest rss + swap, oom_score_adj not counted"),
    "growth": Policy("growth", _growth_policy(), victim="tree", needs_history=True,
                     description="the fastest grower above 1% of the domain, with the children "
                                 "it forked inside the window; its whole process tree"),
    "pressure": Policy("pressure", _pressure, victim="cgroup",
                       description="the cgroup with the most memory pressure (PSI)"),
    "swap": Policy("swap", _swap, description="the largest swap user"),
    "youngest": Policy("youngest", _youngest,
                       description="the newest process above 1% of the domain"),
    "priority": Policy("priority", _priority,
                       description="lowest cgroup class first (batch, burstable, default, "
                                   "user, guaranteed, system), largest within it"),
}
