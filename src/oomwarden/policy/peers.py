"""Peer OOM killers' victim choice, as named built-ins for side-by-side runs.

Each is an emulation of the peer's *ranking* inside oomwarden's engine (the
engine still applies its guarantees: never the kernel's unkillable, a cgroup
victim never the root). Their sources, read for this module:

* ``earlyoom`` (rfjakob/earlyoom ``kill.c``): badness is the process's
  ``/proc/PID/oom_score``, ``+300`` when its name matches ``--prefer``,
  ``-300`` when it matches ``--avoid`` (``BADNESS_PREFER``/``BADNESS_AVOID``);
  the highest badness wins and equal badness goes to the larger VmRSS; pid 1
  is never considered. Its thresholds (MemAvailable and SwapFree both at or
  below 10 %, SIGKILL at 5 %) are the ``threshold`` trigger
  (:class:`oomwarden.config.Threshold`), not part of the ranking.
* ``oomd-growth`` (facebookincubator/oomd ``KillMemoryGrowth-inl.h``,
  defaults in ``KillMemoryGrowth.h``): three phases over cgroups: a cgroup
  using at least ``size_threshold`` (50) % of the total of the candidates is
  killed first (largest first); else one whose growth ratio (usage now /
  usage earlier) is at least ``min_growth_ratio`` (1.25) and whose size is in
  the top ``100 - growing_size_percentile`` (80) %, highest ratio first; else
  the largest.
* ``systemd-oomd`` (systemd ``src/oom/oomd-util.h``, ``oomd.conf(5)``): when
  swap use is at or above ``SwapUsedLimit`` (90 %), the cgroup with the most
  swap (only cgroups above 5 % of swap, the manager's threshold: from memory of
  ``oomd-manager.c``, not re-read); otherwise the pressure rule: the cgroup
  with the highest page-scan (reclaim) rate, then the largest usage. The
  pgscan rate needs the previous interval's counter, which a policy context
  does not carry: the cgroup's memory PSI (``some avg10``) stands for it.

Units: oomd and systemd-oomd kill cgroups. A task's unit here is its cgroup on
the domain's memory hierarchy; a task in the root cgroup (or none) is a unit
of its own, and the engine then kills only the process (it never kills "/").
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable

from oomwarden.model import Task
from oomwarden.policy.api import Context, Policy, Verdict, select
from oomwarden.policy.kernel import badness_points, oom_score
from oomwarden.units import fmt_bytes

#: earlyoom's ``BADNESS_PREFER`` and ``BADNESS_AVOID`` (kill.c).
EARLYOOM_PREFER = 300
EARLYOOM_AVOID = -300
#: oomd ``KillMemoryGrowth`` defaults.
OOMD_SIZE_THRESHOLD_PERCENT = 50
OOMD_GROWING_SIZE_PERCENTILE = 80
OOMD_MIN_GROWTH_RATIO = 1.25
#: systemd-oomd: ``SwapUsedLimit=`` default, and the least swap a cgroup must
#: use to be a swap-rule candidate (percent of total swap).
SYSTEMD_SWAP_USED_LIMIT_PERCENT = 90
SYSTEMD_SWAP_CANDIDATE_PERCENT = 5

#: Bands: a phase sits above every lower phase; sizes in pages stay below 2^30
#: (4 TiB) inside a band that also orders by a ratio.
_BAND_TOP = 2**62
_BAND_MID = 2**61
_LOW_BITS = 2**30
_RATIO_CAP = 10**6


def _size(task: Task) -> int:
    return (task.rss or 0) + (task.swap or 0)


# -- earlyoom --------------------------------------------------------------------------


def earlyoom_policy(prefer: str | None = None, avoid: str | None = None) -> Policy:
    """earlyoom's ranking with its ``--prefer`` / ``--avoid`` regexes (POSIX
    extended in earlyoom, Python ``re`` here, searched in the process name as
    ``regexec`` does). :class:`re.error` for a bad regex."""
    prefer_re = re.compile(prefer) if prefer else None
    avoid_re = re.compile(avoid) if avoid else None

    def evaluate(task: Task, ctx: Context) -> Verdict:
        system_total = ctx.snapshot.system.totalpages
        points = badness_points(task, system_total)
        score = oom_score(points, system_total)
        reasons = [f"oom_score {score}"]
        if prefer_re is not None and prefer_re.search(task.comm):
            score += EARLYOOM_PREFER
            reasons.append(f"name {task.comm!r} matches --prefer: +{EARLYOOM_PREFER}")
        if avoid_re is not None and avoid_re.search(task.comm):
            score += EARLYOOM_AVOID
            reasons.append(f"name {task.comm!r} matches --avoid: {EARLYOOM_AVOID}")
        rss = task.rss or 0
        # badness first, VmRSS breaks ties; badness may be negative with --avoid.
        return select((score + 2000) * 2**40 + min(rss, 2**40 - 1), *reasons,
                      f"VmRSS {fmt_bytes(rss * ctx.page_size)} breaks ties")

    return Policy("earlyoom", evaluate,
                  description="earlyoom: the highest oom_score (+300 --prefer, -300 --avoid), "
                              "VmRSS on ties")


# -- units (cgroups) for oomd and systemd-oomd ------------------------------------------------


class _Units:
    """Per-decision sums over each task's unit (cgroup, or the process)."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.size: dict[str, int] = {}
        self.swap: dict[str, int] = {}
        self.then: dict[str, float] = {}
        self.known_then = ctx.window_seconds is not None
        window = ctx.window_seconds or 0.0
        for t in ctx.tasks:
            key = self.key(t)
            size = _size(t)
            self.size[key] = self.size.get(key, 0) + size
            self.swap[key] = self.swap.get(key, 0) + (t.swap or 0)
            growth = ctx.growth(t)
            # Not seen then (born in the window): it had nothing then.
            earlier = size - growth * window / ctx.page_size if growth is not None else 0.0
            self.then[key] = self.then.get(key, 0.0) + max(0.0, earlier)

    def key(self, task: Task) -> str:
        path = self.ctx.cgroup_path(task)
        if path is None or path == "/":
            return f"pid:{task.pid}"
        return path

    @functools.cached_property
    def oomd_limits(self) -> tuple[int, int]:
        """oomd's size threshold (OOMD_SIZE_THRESHOLD_PERCENT of all units'
        total) and growth floor (the smallest size in the top
        ``100 - OOMD_GROWING_SIZE_PERCENTILE`` %)."""
        sizes = sorted(self.size.values(), reverse=True)
        nth = max(0, math.ceil(len(sizes) * (100 - OOMD_GROWING_SIZE_PERCENTILE) / 100) - 1)
        return sum(sizes) * OOMD_SIZE_THRESHOLD_PERCENT // 100, sizes[nth] if sizes else 0

    def ratio(self, key: str) -> float | None:
        if not self.known_then:
            return None
        then = self.then.get(key, 0.0)
        now = self.size.get(key, 0)
        if then <= 0:
            return float(_RATIO_CAP) if now > 0 else 1.0
        return min(now / then, float(_RATIO_CAP))


def _unit_cache() -> Callable[[Context], _Units]:
    cache: list[_Units] = []

    def units(ctx: Context) -> _Units:
        if not cache or cache[0].ctx is not ctx:
            cache[:] = [_Units(ctx)]
        return cache[0]

    return units


def _oomd_growth() -> Callable[[Task, Context], Verdict]:
    units_of = _unit_cache()

    def evaluate(task: Task, ctx: Context) -> Verdict:
        u = units_of(ctx)
        key = u.key(task)
        size = u.size[key]
        size_threshold, growth_floor = u.oomd_limits
        shown = fmt_bytes(size * ctx.page_size)
        if size >= size_threshold:
            return select(_BAND_TOP + min(size, _BAND_MID - 1),
                          f"unit {key} uses {shown}, at least {OOMD_SIZE_THRESHOLD_PERCENT}% "
                          "of all units: size phase")
        ratio = u.ratio(key)
        if ratio is not None and ratio >= OOMD_MIN_GROWTH_RATIO and size >= growth_floor:
            return select(_BAND_MID + int(ratio * 1000) * _LOW_BITS + min(size, _LOW_BITS - 1),
                          f"unit {key} grew x{ratio:.2f} (>= {OOMD_MIN_GROWTH_RATIO}) and "
                          f"{shown} is in the top {100 - OOMD_GROWING_SIZE_PERCENTILE}%: "
                          "growth phase")
        why = "no history" if ratio is None else f"growth x{ratio:.2f}"
        return select(size, f"unit {key} uses {shown} ({why}): by size")

    return evaluate


def _systemd_oomd() -> Callable[[Task, Context], Verdict]:
    units_of = _unit_cache()

    def evaluate(task: Task, ctx: Context) -> Verdict:
        u = units_of(ctx)
        key = u.key(task)
        system = ctx.snapshot.system
        size = u.size[key]
        shown = fmt_bytes(size * ctx.page_size)
        if system.swap_total > 0:
            # oomd-manager.c: oomd_mem_available_below(100 - SwapUsedLimit) &&
            # oomd_swap_free_below(100 - SwapUsedLimit), both strictly below.
            free_percent = 100 - SYSTEMD_SWAP_USED_LIMIT_PERCENT
            used = system.swap_total - system.swap_free
            swap_pages = u.swap[key]
            floor = system.swap_total * SYSTEMD_SWAP_CANDIDATE_PERCENT // 100 // ctx.page_size
            mem_low = (system.mem_available is not None and system.mem_available * 100
                       < system.mem_total * free_percent)
            swap_low = system.swap_free * 100 < system.swap_total * free_percent
            if mem_low and swap_low and swap_pages > floor:
                assert system.mem_available is not None
                return select(_BAND_TOP + min(swap_pages, _BAND_MID - 1),
                              f"MemAvailable {system.mem_available * 100 // system.mem_total}% "
                              f"and swap free {system.swap_free * 100 // system.swap_total}% "
                              f"(swap {used * 100 // system.swap_total}% used), both below "
                              f"{free_percent}%: unit {key} swaps "
                              f"{fmt_bytes(swap_pages * ctx.page_size)}, the swap rule")
        found = ctx.pressure_of(task)
        if found is not None and key == found[0].path:
            stall = found[1].some.avg10
            return select(_BAND_MID + int(stall * 100) * _LOW_BITS + min(size, _LOW_BITS - 1),
                          f"unit {key}: memory some avg10 {stall:.2f}% stands for its "
                          f"reclaim rate; {shown} orders equal pressure")
        return select(size, f"unit {key}: no pressure known, {shown}: by usage")

    return evaluate


PEERS: dict[str, Policy] = {
    "earlyoom": earlyoom_policy(),
    "oomd-growth": Policy("oomd-growth", _oomd_growth(), victim="cgroup", needs_history=True,
                          description="oomd's kill_by_memory_size_or_growth: a cgroup above "
                                      "50% of the total, else the fastest grower (x1.25) "
                                      "among the top 20%, else the largest"),
    "systemd-oomd": Policy("systemd-oomd", _systemd_oomd(), victim="cgroup",
                           description="systemd-oomd: with MemAvailable and swap free both "
                                       "below 10% the cgroup with most swap, else the one "
                                       "under most pressure (reclaim), then the largest"),
}
