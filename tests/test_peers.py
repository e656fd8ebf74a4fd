"""The peer emulations (earlyoom, oomd-growth, systemd-oomd) on literal snapshots."""

from __future__ import annotations

from typing import Any

from oomwarden.model import (
    Cgroup,
    Hierarchy,
    HierarchyKind,
    Pressure,
    PsiLine,
    Snapshot,
    SystemMemory,
    Task,
    page_counter_max_bytes,
)
from oomwarden.policy.api import KillCgroup, KillProcess
from oomwarden.policy.decide import decide
from oomwarden.policy.engine import system_domain
from oomwarden.policy.history import History
from oomwarden.policy.peers import earlyoom_policy
from oomwarden.policy.registry import load_policy

PAGE = 4096
V2 = HierarchyKind.V2
HIER = (Hierarchy(V2, "/sys/fs/cgroup", "/", ("memory",), True),)


def task(pid: int, **kw: Any) -> Task:
    base: dict[str, Any] = {
        "pid": pid, "tgid": pid, "ppid": 1, "comm": f"p{pid}", "state": "S",
        "start_ticks": 1000 + pid, "uid": 0, "kthread": False, "has_mm": True,
        "rss_anon": 1000, "rss_file": 0, "rss_shmem": 0, "swap": 0, "pgtables": 0,
        "oom_score_adj": 0, "cgroup_v2": "/",
    }
    base.update(kw)
    return Task(**base)


def psi(avg10: float) -> Pressure:
    return Pressure(PsiLine(avg10, 0, 0, 0), PsiLine(avg10 / 2, 0, 0, 0))


def cg(path: str, i: int, **kw: Any) -> Cgroup:
    return Cgroup(kind=V2, path=path, fs_path="/sys/fs/cgroup" + path, inode=100 + i,
                  memory_controller=True, verified=True, limit=page_counter_max_bytes(PAGE),
                  **kw)


def snap(*tasks: Task, swap_total: int = 0, swap_free: int = 0, taken_ns: int = 10**10,
         pressures: dict[str, float] | None = None, mem_available: int = 100_000 * PAGE
         ) -> Snapshot:
    paths = ["/", *sorted({t.cgroup_v2 for t in tasks if t.cgroup_v2 not in (None, "/")})]
    p = pressures or {}
    cgroups = tuple(cg(path, i, pressure=psi(p[path]) if path in p else None)
                    for i, path in enumerate(paths))
    system = SystemMemory(1_000_000 * PAGE, mem_available, swap_total, swap_free, None, PAGE,
                          60)
    return Snapshot(taken_ns, system, tasks, HIER, cgroups)


def victim(policy_name: str, s: Snapshot, **kw: Any) -> Any:
    d = decide(s, system_domain(s), load_policy(policy_name), **kw)
    assert d.fallback is None, d.fallback
    return d


def test_earlyoom_is_the_kernel_score_with_prefer_and_avoid() -> None:
    s = snap(task(10, rss_anon=400_000, comm="Xorg"), task(11, rss_anon=300_000, comm="java"),
             task(12, rss_anon=200_000, comm="sshd"))
    assert victim("earlyoom", s).victim.task.pid == 10  # plain oom_score: the largest
    both = earlyoom_policy(prefer="^java$", avoid="^(Xorg|sshd)$")
    d = decide(s, system_domain(s), both)
    assert d.victim.task.pid == 11
    assert any("--prefer: +300" in r for r in d.victim.reasons)
    # avoid is a -300 on the score, not a protection: alone, an avoided task still goes
    alone = snap(task(12, rss_anon=200_000, comm="sshd"))
    assert decide(alone, system_domain(alone), both).victim.task.pid == 12


def test_earlyoom_breaks_ties_by_rss() -> None:
    # equal oom_score (both round to the same kernel-scale score), larger VmRSS wins
    s = snap(task(10, rss_anon=100_001), task(11, rss_anon=100_000))
    assert victim("earlyoom", s).victim.task.pid == 10


def test_oomd_growth_size_phase_then_growth_phase() -> None:
    big = task(10, rss_anon=600_000, cgroup_v2="/db")
    grower = task(11, rss_anon=150_000, cgroup_v2="/leak")
    small = [task(20 + i, rss_anon=50_000, cgroup_v2=f"/w{i}") for i in range(4)]
    then = snap(big, task(11, rss_anon=50_000, cgroup_v2="/leak"), *small, taken_ns=0)
    now = snap(big, grower, *small)
    # /db holds more than half of all usage: the size phase takes it
    d = victim("oomd-growth", now, history=History(then))
    assert d.victim.task.pid == 10 and isinstance(d.actions[0], KillCgroup)
    assert d.actions[0].path == "/db"
    # below 50 %: the grower (x3), among the top 20 % of the 6 units (ceil(6 * 0.2) = 2)
    big2 = task(10, rss_anon=300_000, cgroup_v2="/db")
    then2 = snap(big2, task(11, rss_anon=50_000, cgroup_v2="/leak"), *small, taken_ns=0)
    d2 = victim("oomd-growth", snap(big2, grower, *small), history=History(then2))
    assert d2.actions[0].path == "/leak"
    assert any("growth phase" in r for r in d2.victim.reasons)
    # the percentile rule: no unit over half (/db 200k of 590k), a fast grower
    # (x4) below the top 20 % of the 7 units (ceil(7 * 0.2) = 2: the floor is
    # the 2nd largest, /b's 150k) is no growth-phase victim: by size, /db
    db = task(10, rss_anon=200_000, cgroup_v2="/db")
    steady = task(12, rss_anon=150_000, cgroup_v2="/b")
    tiny_then = task(11, rss_anon=10_000, cgroup_v2="/leak")
    tiny_now = task(11, rss_anon=40_000, cgroup_v2="/leak")
    d3 = victim("oomd-growth", snap(db, steady, tiny_now, *small),
                history=History(snap(db, steady, tiny_then, *small, taken_ns=0)))
    assert d3.actions[0].path == "/db"
    reasons = " ".join(d3.victim.reasons)
    assert "by size" in reasons and "size phase" not in reasons
    # the same x4 grower at the floor (150k, from 37.5k) is in the top 20 %: it goes
    at_floor_then = task(11, rss_anon=37_500, cgroup_v2="/leak")
    at_floor = task(11, rss_anon=150_000, cgroup_v2="/leak")
    d4 = victim("oomd-growth", snap(db, steady, at_floor, *small),
                history=History(snap(db, steady, at_floor_then, *small, taken_ns=0)))
    assert d4.actions[0].path == "/leak"
    assert any("growth phase" in r for r in d4.victim.reasons)


def test_oomd_growth_root_tasks_are_their_own_unit() -> None:
    s = snap(task(10, rss_anon=900_000), task(11, rss_anon=10_000))
    d = victim("oomd-growth", s)
    assert d.victim.task.pid == 10 and isinstance(d.actions[0], KillProcess)


def test_systemd_oomd_swap_rule_then_pressure_rule() -> None:
    swapper = task(10, rss_anon=100_000, swap=90_000, cgroup_v2="/a")
    large = task(11, rss_anon=500_000, swap=10_000, cgroup_v2="/b")
    total = 100_000 * PAGE
    low_mem = 50_000 * PAGE  # MemAvailable 5 % of MemTotal
    low = snap(swapper, large, swap_total=total, swap_free=total // 20, mem_available=low_mem)
    d = victim("systemd-oomd", low)
    assert d.actions[0].path == "/a" and "swap rule" in " ".join(d.victim.reasons)
    # oomd-manager.c wants both below 100 - SwapUsedLimit (10 %), strictly:
    # swap low but MemAvailable 10 % (not below) or plenty: no swap rule
    for plenty in (100_000 * PAGE, 500_000 * PAGE):
        d = victim("systemd-oomd", snap(swapper, large, swap_total=total,
                                        swap_free=total // 20, mem_available=plenty))
        assert d.actions[0].path == "/b" and "swap rule" not in " ".join(d.victim.reasons)
    # MemAvailable low but swap free at 10 % (not below) or plenty: no swap rule
    for free in (total // 10, total // 2):
        d = victim("systemd-oomd", snap(swapper, large, swap_total=total, swap_free=free,
                                        mem_available=low_mem))
        assert d.actions[0].path == "/b" and "swap rule" not in " ".join(d.victim.reasons)
    # swap not low: the cgroup under most pressure, whatever its size
    calm = snap(swapper, large, swap_total=total, swap_free=total // 2,
                pressures={"/a": 5.0, "/b": 40.0})
    assert victim("systemd-oomd", calm).actions[0].path == "/b"
    calm2 = snap(swapper, large, swap_total=total, swap_free=total // 2,
                 pressures={"/a": 60.0, "/b": 40.0})
    assert victim("systemd-oomd", calm2).actions[0].path == "/a"
    # nothing known: the largest usage
    assert victim("systemd-oomd", snap(swapper, large)).actions[0].path == "/b"
