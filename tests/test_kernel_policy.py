"""The pure core with literal dataclasses: policy/kernel.py and policy/engine.py.

Expected values are worked out by hand from mm/oom_kill.c and
mm/memcontrol.c (``oom_badness``, ``proc_oom_score``, ``mem_cgroup_get_max``,
``select_bad_process``) in the comments next to each assertion.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from oomwarden.decision import Domain
from oomwarden.errors import CgroupNotFound
from oomwarden.model import (
    Cgroup,
    HierarchyKind,
    Snapshot,
    SystemMemory,
    Task,
    page_counter_max_bytes,
)
from oomwarden.policy import load_policy
from oomwarden.policy.engine import cgroup_domain, kernel_decision, system_domain
from oomwarden.policy.kernel import (
    LONG_MIN,
    badness,
    badness_points,
    c_div,
    memcg_totalpages,
    oom_score,
    unkillable_reason,
)

PAGE = 4096
GIB = 1024**3
PAGE_COUNTER_MAX = (2**63 - 1) // PAGE  # 2251799813685247 pages on 64-bit, 4 KiB pages
UNLIMITED = page_counter_max_bytes(PAGE)

V1, V2 = HierarchyKind.V1, HierarchyKind.V2


def task(pid: int = 100, **kw: Any) -> Task:
    """A killable user process; memory in pages."""
    base: dict[str, Any] = {
        "pid": pid, "tgid": pid, "ppid": 1, "comm": f"p{pid}", "state": "S",
        "start_ticks": 1000, "uid": 0, "kthread": False, "has_mm": True,
        "rss_anon": 60_000, "rss_file": 30_000, "rss_shmem": 10_000, "swap": 5_000,
        "pgtables": 200, "oom_score_adj": 0,
        # As read from the initial PID namespace: pid 1 is the global init.
        "global_init": pid == 1,
    }
    base.update(kw)
    return Task(**base)


def system(mem_pages: int = 1_000_000, swap_pages: int = 0, swappiness: int | None = 60,
           ) -> SystemMemory:
    return SystemMemory(
        mem_total=mem_pages * PAGE, mem_available=mem_pages * PAGE // 2,
        swap_total=swap_pages * PAGE, swap_free=swap_pages * PAGE, pressure=None,
        page_size=PAGE, swappiness=swappiness,
    )


def cgroup(kind: HierarchyKind = V2, path: str = "/a", **kw: Any) -> Cgroup:
    base: dict[str, Any] = {
        "kind": kind, "path": path, "fs_path": f"/sys/fs/cgroup{path}", "inode": 1000,
        "memory_controller": True, "verified": True, "limit": UNLIMITED,
    }
    base.update(kw)
    return Cgroup(**base)


def snap(*tasks: Task, sysmem: SystemMemory | None = None, cgroups: tuple[Cgroup, ...] = ()
         ) -> Snapshot:
    return Snapshot(taken_ns=0, system=sysmem or system(), tasks=tasks, cgroups=cgroups)


# ------------------------------------------------------------------- oom_badness

TOTAL = 1_000_000  # pages; totalpages / 1000 = 1000


def test_badness_plain() -> None:
    b = badness(task(), TOTAL)
    assert b is not None
    # rss 60000 + 30000 + 10000, swap 5000, page tables 200
    assert (b.rss, b.swap, b.pgtables, b.adj, b.adj_pages) == (100_000, 5_000, 200, 0, 0)
    assert b.points == 105_200


@pytest.mark.parametrize(
    ("adj", "points"),
    [
        (1000, 105_200 + 1000 * 1000),
        (1, 105_200 + 1000),
        (-1, 105_200 - 1000),
        (-500, 105_200 - 500_000),  # -394800
        (-999, 105_200 - 999_000),  # -893800
    ],
)
def test_badness_adj(adj: int, points: int) -> None:
    b = badness(task(oom_score_adj=adj), TOTAL)
    assert b is not None and b.points == points and b.adj_pages == adj * 1000


def test_badness_adj_uses_integer_division_of_totalpages() -> None:
    # totalpages / 1000 is integer division first: 1_234_567 / 1000 = 1234
    b = badness(task(oom_score_adj=250), 1_234_567)
    assert b is not None and b.adj_pages == 250 * 1234 and b.points == 105_200 + 308_500
    # a domain under 1000 pages: the adj term vanishes entirely
    b = badness(task(oom_score_adj=-999), 999)
    assert b is not None and b.adj_pages == 0 and b.points == 105_200


@pytest.mark.parametrize(
    ("t", "why"),
    [
        (task(oom_score_adj=-1000), "-1000"),
        (task(pid=1, tgid=1, oom_score_adj=1000), "init"),
        (task(kthread=True, has_mm=False, rss_anon=None, rss_file=None, rss_shmem=None,
              swap=None, pgtables=None), "kernel thread"),
        (task(state="Z", has_mm=False, rss_anon=None, rss_file=None, rss_shmem=None,
              swap=None, pgtables=None), "zombie"),
        (task(oom_score_adj=None), "unknown"),
        (task(rss_file=None), "unknown"),
    ],
)
def test_unkillable(t: Task, why: str) -> None:
    assert badness(t, TOTAL) is None
    reason = unkillable_reason(t)
    assert reason is not None and why in reason


def test_pid1_and_kthread_are_unkillable_even_with_memory() -> None:
    # oom_unkillable_task() comes before anything else: a kthread that somehow
    # had counters, or init with a huge rss, are still LONG_MIN.
    assert badness(task(pid=1, rss_anon=10**9), TOTAL) is None
    assert badness(task(kthread=True), TOTAL) is None


def test_container_init_is_killable() -> None:
    """Pid 1 of a container's PID namespace is not the global init: the
    kernel's is_global_init() is false for it and it may be chosen."""
    b = badness(task(pid=1, global_init=False, rss_anon=10**6), TOTAL)
    assert b is not None and b.points == 10**6 + 30_000 + 10_000 + 5_000 + 200


def test_vfork_child_is_unkillable() -> None:
    assert badness(task(in_vfork=True), TOTAL) is None
    assert unkillable_reason(task(in_vfork=True)) is not None


def test_oom_rss_is_what_the_kernel_ranks_by() -> None:
    """get_mm_rss() (stat) may differ from the exact status sums; the points
    use the former, the split stays for display."""
    b = badness(task(oom_rss=99_000), TOTAL)
    assert b is not None and b.rss == 99_000 and b.points == 99_000 + 5_000 + 200


def test_adj_minus_999_is_killable() -> None:
    assert unkillable_reason(task(oom_score_adj=-999)) is None


# ------------------------------------------------------------------ oom_score()


@pytest.mark.parametrize(
    ("points", "total", "score"),
    [
        (None, TOTAL, 0),  # LONG_MIN -> 0
        (0, TOTAL, 666),  # 1000 * 2 / 3 = 666.67 -> 666
        (105_200, TOTAL, 736),  # 105200000/1e6 = 105 -> 1105*2/3 = 736.67 -> 736
        (TOTAL, TOTAL, 1333),  # 2000*2/3
        (2 * TOTAL, TOTAL, 2000),
        (-TOTAL, TOTAL, 0),
        # negative points: C truncates toward zero, floor division would not
        (-394_800, TOTAL, 404),  # -394.8 -> -394 (floor: -395 -> 403)
        (-893_800, TOTAL, 71),  # -893.8 -> -893 -> 107*2/3 = 71.3 -> 71
        (-1, TOTAL, 666),  # -0.001 -> 0 (floor: -1 -> 666 too, but 999*2/3 = 666)
        (-1_001, 1_000, 0),  # -1001 -> (1000-1001)*2 = -2, -2/3 -> 0 (floor: -1)
        (-1_500_000, TOTAL, -333),  # -1000/3 -> -333 in C long arithmetic (floor: -334)
        # the live machine: hog, 68310 rss + 147 page-table pages, 6182927 pages of RAM
        (68_457, 6_182_927, 674),
        # the live machine: bash, 1061 + 12 pages
        (1_073, 6_182_927, 666),
    ],
)
def test_oom_score_c_arithmetic(points: int | None, total: int, score: int) -> None:
    assert oom_score(points, total) == score


def test_c_div() -> None:
    assert (c_div(7, 2), c_div(-7, 2), c_div(7, -2), c_div(-7, -2)) == (3, -3, -3, 3)
    assert c_div(0, 5) == 0 and LONG_MIN == -(2**63)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), total=st.integers(1, 2**52))
def test_oom_score_range(data: st.DataObject, total: int) -> None:
    points = data.draw(st.integers(-total, 2 * total))
    assert 0 <= oom_score(points, total) <= 2000


# ------------------------------------------------------------ mem_cgroup_get_max


def test_memcg_v1_memsw_swappiness_nonzero() -> None:
    # limit 1 GiB = 262144 pages, memsw 1.5 GiB = 393216 pages, 4 GiB swap = 1048576
    cg = cgroup(V1, limit=GIB, memsw_limit=GIB * 3 // 2, swappiness=60)
    sysm = system(swap_pages=1_048_576)
    assert memcg_totalpages(cg, sysm) == 262_144 + min(131_072, 1_048_576) == 393_216


def test_memcg_v1_swap_capped_by_total_swap() -> None:
    cg = cgroup(V1, limit=GIB, memsw_limit=4 * GIB, swappiness=60)
    assert memcg_totalpages(cg, system(swap_pages=1000)) == 262_144 + 1000


@pytest.mark.parametrize(
    ("cg_swappiness", "sys_swappiness", "expected"),
    [
        (0, 60, 262_144),  # the cgroup's own swappiness 0: no swap counted
        (60, 0, 393_216),  # v1 uses the cgroup's value, not vm.swappiness
        (None, 0, 262_144),  # unknown cgroup value: vm.swappiness
        (None, 60, 393_216),
    ],
)
def test_memcg_v1_swappiness(
    cg_swappiness: int | None, sys_swappiness: int, expected: int
) -> None:
    cg = cgroup(V1, limit=GIB, memsw_limit=GIB * 3 // 2, swappiness=cg_swappiness)
    assert memcg_totalpages(cg, system(swap_pages=1_048_576, swappiness=sys_swappiness)) == (
        expected
    )


def test_memcg_v1_unlimited_memsw() -> None:
    # memsw unlimited: swap = PAGE_COUNTER_MAX - limit, capped by the swap size
    cg = cgroup(V1, limit=GIB, memsw_limit=UNLIMITED, swappiness=60)
    assert memcg_totalpages(cg, system(swap_pages=1_048_576)) == 262_144 + 1_048_576


def test_memcg_v1_fully_unlimited() -> None:
    # limit and memsw both unlimited: memsw - limit = 0, so PAGE_COUNTER_MAX exactly
    cg = cgroup(V1, limit=UNLIMITED, memsw_limit=UNLIMITED, swappiness=60)
    assert memcg_totalpages(cg, system(swap_pages=1_048_576)) == PAGE_COUNTER_MAX
    assert PAGE_COUNTER_MAX == 2_251_799_813_685_247


def test_memcg_v2_swap_max() -> None:
    # 512 MiB = 131072 pages, swap.max 256 MiB = 65536 pages
    cg = cgroup(V2, limit=GIB // 2, swap_max=GIB // 4)
    assert memcg_totalpages(cg, system(swap_pages=1_048_576)) == 196_608
    assert memcg_totalpages(cg, system(swap_pages=1_000)) == 131_072 + 1_000


def test_memcg_v2_swappiness_is_the_system_one() -> None:
    # cgroup2 has no per-cgroup swappiness: mem_cgroup_swappiness() = vm_swappiness
    cg = cgroup(V2, limit=GIB // 2, swap_max=GIB // 4, swappiness=0)
    assert memcg_totalpages(cg, system(swap_pages=1_048_576, swappiness=60)) == 196_608
    cg = cgroup(V2, limit=GIB // 2, swap_max=GIB // 4, swappiness=60)
    assert memcg_totalpages(cg, system(swap_pages=1_048_576, swappiness=0)) == 131_072


def test_memcg_v2_unlimited() -> None:
    cg = cgroup(V2, limit=UNLIMITED, swap_max=UNLIMITED)
    assert memcg_totalpages(cg, system(swap_pages=0)) == PAGE_COUNTER_MAX
    cg = cgroup(V2, limit=GIB // 2, swap_max=UNLIMITED)
    assert memcg_totalpages(cg, system(swap_pages=1_048_576)) == 131_072 + 1_048_576
    # memory.max unknown (None): treated as unlimited like the kernel's default
    cg = cgroup(V2, limit=None, swap_max=0)
    assert memcg_totalpages(cg, system()) == PAGE_COUNTER_MAX


@pytest.mark.parametrize(
    "cg",
    [
        cgroup(V2, limit=0, swap_max=0),
        cgroup(V2, limit=PAGE - 1, swap_max=0),  # under one page rounds to 0 pages
        cgroup(V1, limit=0, memsw_limit=0, swappiness=0),
        cgroup(V1, limit=0, memsw_limit=0, swappiness=60),
    ],
)
def test_memcg_totalpages_never_zero(cg: Cgroup) -> None:
    # oc->totalpages = mem_cgroup_get_max(oc->memcg) ?: 1;
    assert memcg_totalpages(cg, system(swap_pages=1_048_576)) == 1


# --------------------------------------------------------------------- domains


def test_cgroup_domain_v1_root_is_the_system() -> None:
    s = snap(task())
    root = cgroup(V1, "/", limit=UNLIMITED, memsw_limit=UNLIMITED)
    assert cgroup_domain(s, root) == system_domain(s)
    assert system_domain(s) == Domain(kind="system", totalpages=1_000_000)


def test_cgroup_domain_v2_root_is_the_system() -> None:
    # The root memcg is never charged against a limit (try_charge() returns
    # early for it); memory running out there is the global OOM, whose
    # totalpages is RAM + swap, on cgroup2 exactly as on v1. The v2 root has no
    # memory.max, so a memcg domain for it would be PAGE_COUNTER_MAX pages.
    s = snap(task(), sysmem=system(swap_pages=1000))
    root = cgroup(V2, "/", limit=None, memory_controller=True)
    assert cgroup_domain(s, root) == system_domain(s)


def test_cgroup_domain_without_memory_controller() -> None:
    cg = cgroup(V2, "/sandbox", memory_controller=False, limit=None)
    with pytest.raises(CgroupNotFound, match="no memory controller"):
        cgroup_domain(snap(), cg)


def test_cgroup_domain_memcg() -> None:
    cg = cgroup(V2, "/app", limit=GIB, swap_max=0)
    d = cgroup_domain(snap(), cg)
    assert d.kind == "cgroup" and d.cgroup is cg and d.totalpages == 262_144
    assert d.name == "cgroup:/app"


def test_domain_contains() -> None:
    cg = cgroup(V2, "/a")
    d = Domain(kind="cgroup", totalpages=10, cgroup=cg)
    assert d.contains(task(cgroup_v2="/a")) and d.contains(task(cgroup_v2="/a/b"))
    assert not d.contains(task(cgroup_v2="/ab")) and not d.contains(task(cgroup_v2=None))
    assert not d.contains(task(memcg_v1="/a"))


# ------------------------------------------------------------- select_bad_process


def test_decision_ranks_and_explains() -> None:
    big = task(200, rss_anon=300_000, start_ticks=10)
    small = task(201, rss_anon=1_000, start_ticks=20)
    protected = task(202, rss_anon=900_000, oom_score_adj=-1000)
    neg = task(203, rss_anon=400_000, oom_score_adj=-500)  # 445200 - 500000 < 0
    init = task(1, rss_anon=500_000)
    kthr = task(2, kthread=True, has_mm=False, rss_anon=None, rss_file=None,
                rss_shmem=None, swap=None, pgtables=None)
    zomb = task(204, state="Z", has_mm=False, rss_anon=None, rss_file=None,
                rss_shmem=None, swap=None, pgtables=None)
    d = kernel_decision(snap(big, small, protected, neg, init, kthr, zomb),
                        system_domain(snap()))
    assert d.policy == "kernel" and d.victim is not None and d.victim.task.pid == 200
    assert [c.task.pid for c in d.selectable] == [200, 201, 203]
    assert [c.points for c in d.selectable] == [345_200, 46_200, 445_200 - 500_000]
    assert [c.oom_score for c in d.selectable] == [
        (1000 + 345) * 2 // 3, (1000 + 46) * 2 // 3, (1000 - 54) * 2 // 3,
    ]
    unk = [c for c in d.candidates if c.verdict == "unkillable"]
    assert [c.task.pid for c in unk] == [1, 2, 202, 204]
    assert all(c.points is None and c.oom_score == 0 and c.reasons for c in unk)
    assert any("oom_score_adj -500" in r for r in d.selectable[2].reasons)
    assert "the kernel's choice" in d.victim.reasons[-1]
    js = d.to_json(all_tasks=True)
    assert js["victim"]["pid"] == 200 and len(js["candidates"]) == 7


def test_no_killable_task_no_victim() -> None:
    d = kernel_decision(snap(task(1), task(5, oom_score_adj=-1000)), system_domain(snap()))
    assert d.victim is None and d.selectable == ()


def test_tie_later_start_wins() -> None:
    early = task(400, start_ticks=100)
    late = task(300, start_ticks=200)  # smaller pid, started later: met later
    d = kernel_decision(snap(early, late), system_domain(snap()))
    assert d.victim is not None and d.victim.task.pid == 300
    assert "ties with pid 400" in d.victim.reasons[-1]


def test_tie_same_tick_higher_pid_wins() -> None:
    a = task(500, start_ticks=100)
    b = task(501, start_ticks=100)
    d = kernel_decision(snap(b, a), system_domain(snap()))
    assert d.victim is not None and d.victim.task.pid == 501


def test_tie_memcg_cgroup_preorder_first() -> None:
    # mem_cgroup_scan_tasks walks the subtree in pre-order: /p, /p/a, /p/a/x, /p/b.
    # Equal points: the task in /p/b is met last even though it started first.
    cgs = (
        cgroup(V1, "/", limit=UNLIMITED),
        cgroup(V1, "/p", limit=GIB, memsw_limit=GIB, swappiness=60),
        cgroup(V1, "/p/a", limit=UNLIMITED),
        cgroup(V1, "/p/a/x", limit=UNLIMITED),
        cgroup(V1, "/p/b", limit=UNLIMITED),
        cgroup(V2, "/zzz", limit=UNLIMITED),  # other hierarchy: no index
    )
    in_b = task(600, start_ticks=1, memcg_v1="/p/b")
    in_x = task(601, start_ticks=999, memcg_v1="/p/a/x")
    in_p = task(602, start_ticks=5000, memcg_v1="/p")
    outside = task(603, start_ticks=1, memcg_v1="/q", rss_anon=10**7)
    s = snap(in_x, in_b, in_p, outside, cgroups=cgs)
    d = kernel_decision(s, cgroup_domain(s, cgs[1]))
    assert d.domain.totalpages == 262_144
    assert d.victim is not None and d.victim.task.pid == 600
    assert [c.task.pid for c in d.selectable] == [600, 601, 602]


def test_unverified_cgroup_note() -> None:
    cg = cgroup(V2, "/a", limit=GIB, swap_max=0, verified=False)
    s = snap(task(cgroup_v2="/a"), cgroups=(cg,))
    d = kernel_decision(s, cgroup_domain(s, cg))
    assert any("unverified" in n for n in d.notes)


def test_load_policy() -> None:
    policy = load_policy("kernel")
    assert policy.kernel and policy.name == "kernel"


# --------------------------------------------------------------- the property


def _kernel_select(tasks: list[Task], total: int) -> Task | None:
    """select_bad_process(): walk in creation order, keep on points >= chosen."""
    chosen: Task | None = None
    chosen_points = LONG_MIN
    for t in sorted(tasks, key=lambda t: (t.start_ticks, t.pid)):
        b = badness(t, total)
        if b is None or b.points < chosen_points:
            continue
        chosen, chosen_points = t, b.points
    return chosen


@st.composite
def tasks(draw: st.DrawFn) -> list[Task]:
    n = draw(st.integers(0, 12))
    pids = draw(st.lists(st.integers(1, 5000), min_size=n, max_size=n, unique=True))
    out = []
    for pid in pids:
        kind = draw(st.sampled_from(["user", "user", "user", "kthread", "zombie"]))
        small = st.integers(0, 2000)  # small values make ties likely
        t = task(
            pid,
            start_ticks=draw(st.integers(0, 20)),
            rss_anon=draw(small), rss_file=draw(small), rss_shmem=draw(small),
            swap=draw(small), pgtables=draw(st.integers(0, 50)),
            oom_score_adj=draw(st.sampled_from([-1000, -999, -500, -1, 0, 0, 0, 1, 500, 1000])
                               | st.integers(-1000, 1000)),
        )
        if kind == "kthread":
            t = dataclasses.replace(t, kthread=True, has_mm=False, rss_anon=None)
        elif kind == "zombie":
            t = dataclasses.replace(t, state="Z", has_mm=False, rss_anon=None)
        out.append(t)
    return out


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ts=tasks(), mem_pages=st.integers(1, 4_000_000), swap_pages=st.integers(0, 10**6))
def test_victim_has_max_points(ts: list[Task], mem_pages: int, swap_pages: int) -> None:
    s = snap(*ts, sysmem=system(mem_pages, swap_pages))
    domain = system_domain(s)
    total = domain.totalpages
    assert total == mem_pages + swap_pages
    d = kernel_decision(s, domain)
    killable = [t for t in ts if badness(t, total) is not None]
    assert len(d.candidates) == len(ts)
    assert {c.task.pid for c in d.selectable} == {t.pid for t in killable}
    expected = _kernel_select(ts, total)
    if expected is None:
        assert d.victim is None
        return
    assert d.victim is not None and d.victim.task.pid == expected.pid
    best = max(b.points for t in killable if (b := badness(t, total)) is not None)
    assert d.victim.points == best
    for c in d.candidates:
        assert c.oom_score is not None
        if c.points is not None and -total <= c.points <= 2 * total:
            assert 0 <= c.oom_score <= 2000
    points = [c.points for c in d.selectable if c.points is not None]
    assert len(points) == len(d.selectable) and points == sorted(points, reverse=True)


TASKS = st.builds(
    task,
    pid=st.integers(1, 4_000_000),
    rss_anon=st.none() | st.integers(0, 2**40),
    rss_file=st.integers(0, 2**40),
    rss_shmem=st.integers(0, 2**40),
    swap=st.none() | st.integers(0, 2**40),
    pgtables=st.none() | st.integers(0, 2**30),
    oom_score_adj=st.none() | st.integers(-1000, 1000),
    kthread=st.booleans(),
    has_mm=st.booleans(),
)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(t=TASKS, total=st.integers(1, 2**52))
def test_hot_path_points_equal_the_explained_badness(t: Task, total: int) -> None:
    """The ranking loop's inlined formula and the one the reasons are built
    from must never disagree, unkillable cases included."""
    b = badness(t, total)
    assert badness_points(t, total) == (None if b is None else b.points)


def test_tie_v2_memcg_follows_cgroup_procs_order() -> None:
    """On v2, cgroup.procs comes out in css_task_iter order, the order the
    kernel's memcg scan meets the tasks: a process moved in later is met later
    whatever its start time (v1 sorts cgroup.procs, so start time decides)."""
    moved_in_late = task(700, start_ticks=1, cgroup_v2="/p")
    started_late = task(701, start_ticks=900, cgroup_v2="/p")
    cgs = (cgroup(V2, "/p", limit=GIB, pids=(701, 700)),)
    s = snap(moved_in_late, started_late, cgroups=cgs)
    d = kernel_decision(s, cgroup_domain(s, cgs[0]))
    assert d.victim is not None and d.victim.task.pid == 700
    cgs = (cgroup(V2, "/p", limit=GIB, pids=(700, 701)),)
    s = snap(moved_in_late, started_late, cgroups=cgs)
    d = kernel_decision(s, cgroup_domain(s, cgs[0]))
    assert d.victim is not None and d.victim.task.pid == 701
