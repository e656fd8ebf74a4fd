"""The engine and the built-in policies on literal snapshots (pure core)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from oomwarden.errors import PolicyError
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
from oomwarden.policy import (
    ABORT,
    DEFAULT,
    IGNORE,
    Context,
    DeleteFiles,
    Event,
    KillCgroup,
    KillProcess,
    Policy,
    RunHook,
    Verdict,
    select,
)
from oomwarden.policy.decide import decide, oom_group_target
from oomwarden.policy.engine import kernel_decision, system_domain
from oomwarden.policy.history import History
from oomwarden.policy.registry import builtins, load_policy

PAGE = 4096
MiB = 1024 * 1024
V1, V2 = HierarchyKind.V1, HierarchyKind.V2
UNLIMITED = page_counter_max_bytes(PAGE)


def task(pid: int, **kw: Any) -> Task:
    base: dict[str, Any] = {
        "pid": pid, "tgid": pid, "ppid": 1, "comm": f"p{pid}", "state": "S",
        "start_ticks": 1000 + pid, "uid": 0, "kthread": False, "has_mm": True,
        "rss_anon": 1000, "rss_file": 0, "rss_shmem": 0, "swap": 0, "pgtables": 10,
        "oom_score_adj": 0, "global_init": pid == 1, "cgroup_v2": "/app",
    }
    base.update(kw)
    return Task(**base)


def sysmem(pages: int = 1_000_000) -> SystemMemory:
    return SystemMemory(pages * PAGE, pages * PAGE // 2, 0, 0, None, PAGE, 60)


def cg(path: str, **kw: Any) -> Cgroup:
    base: dict[str, Any] = {"kind": V2, "path": path, "fs_path": "/sys/fs/cgroup" + path,
                            "inode": 100 + len(path), "memory_controller": True,
                            "verified": True, "limit": UNLIMITED}
    base.update(kw)
    return Cgroup(**base)


HIER = (Hierarchy(V2, "/sys/fs/cgroup", "/", ("memory",), True),)


def snap(*tasks: Task, cgroups: tuple[Cgroup, ...] = (), taken_ns: int = 10**10) -> Snapshot:
    return Snapshot(taken_ns, sysmem(), tasks, HIER, cgroups or (cg("/"), cg("/app")))


def run(policy: Policy, s: Snapshot, **kw: Any) -> Any:
    return decide(s, system_domain(s), policy, **kw)


def per_task(fn: Any, **kw: Any) -> Policy:
    return Policy("test", evaluate=fn, **kw)


# -- verdict paths -----------------------------------------------------------------


def test_default_everywhere_is_the_kernel_replica() -> None:
    s = snap(task(1), task(10, rss_anon=5000), task(11, rss_anon=9000, oom_score_adj=-500),
             task(12, rss_anon=700, oom_score_adj=900))
    d = run(per_task(lambda t, c: DEFAULT), s)
    k = kernel_decision(s, system_domain(s))
    assert d.victim.task.pid == k.victim.task.pid == 12
    assert [c.task.pid for c in d.selectable] == [c.task.pid for c in k.selectable]
    assert d.fallback is None and d.policy == "test"


def test_select_points_decide_and_ignore_never_wins() -> None:
    s = snap(task(10), task(11), task(12))
    d = run(per_task(lambda t, c: IGNORE if t.pid == 12 else select(t.pid)), s)
    assert d.victim.task.pid == 11
    assert {c.task.pid: c.verdict for c in d.candidates}[12] == "ignore"
    assert d.actions == (KillProcess(11, 1011, "the chosen victim"),)


def test_abort_kills_nothing() -> None:
    s = snap(task(10), task(11))
    d = run(per_task(lambda t, c: ABORT if t.pid == 11 else select(5)), s)
    assert d.aborted and d.victim is None and d.actions == () and d.fallback is None


def test_ignore_everything_selects_nothing() -> None:
    d = run(per_task(lambda t, c: IGNORE), snap(task(10)))
    assert d.victim is None and not d.aborted and "selected no task" in d.notes[0]


def test_unkillable_tasks_are_never_asked() -> None:
    asked: list[int] = []

    def ev(t: Task, c: Context) -> Verdict:
        asked.append(t.pid)
        return select(10**9)

    s = snap(task(1), task(2, kthread=True, has_mm=False), task(3, oom_score_adj=-1000),
             task(4, in_vfork=True), task(10))
    d = run(per_task(ev), s)
    assert asked == [10] and d.victim.task.pid == 10


def test_tie_goes_to_the_task_met_last() -> None:
    s = snap(task(10, start_ticks=5), task(11, start_ticks=3))
    d = run(per_task(lambda t, c: select(7)), s)
    assert d.victim.task.pid == 10  # started later: met later by the kernel's scan


def test_victim_kinds_and_oom_group() -> None:
    cgs = (cg("/"), cg("/app", oom_group=False), cg("/app/job", oom_group=True),
           cg("/app/job/x"))
    t = task(10, cgroup_v2="/app/job/x")
    s = snap(t, cgroups=cgs)
    assert oom_group_target(s, system_domain(s), t) == cgs[2]
    d = run(per_task(lambda t, c: select(1)), s)
    assert d.actions == (KillCgroup("v2", "/app/job", cgs[2].inode,
                                    "memory.oom.group is set on /app/job"),)
    assert d.victim_kind == "cgroup"
    s2 = snap(task(10, cgroup_v2="/app"))
    d = run(per_task(lambda t, c: select(1), victim="tree"), s2)
    assert d.actions[0] == KillProcess(10, 1010, "the chosen victim, with its tree", tree=True)
    d = run(per_task(lambda t, c: select(1), victim="cgroup"), s2)
    assert isinstance(d.actions[0], KillCgroup) and d.actions[0].path == "/app"


def test_handler_actions_and_selection_from_inside() -> None:
    seen: list[int] = []

    def handle(event: Event, ctx: Context) -> list[Any]:
        best = ctx.select()
        seen.extend(c.task.pid for c in best)  # type: ignore[attr-defined]
        return [DeleteFiles(("/dev/shm/cache",), "free the cache first")]

    s = snap(task(10, rss_anon=5), task(11, rss_anon=50))
    d = decide(s, system_domain(s), Policy("h", evaluate=lambda t, c: DEFAULT, handle=handle),
               event=Event("oom", "system"))
    assert seen == [11, 10]
    assert d.actions == (DeleteFiles(("/dev/shm/cache",), "free the cache first"),)
    assert d.trigger == "oom" and d.victim is None


def test_empty_handler_falls_through_to_the_selection() -> None:
    s = snap(task(10, rss_anon=5), task(11, rss_anon=50))
    d = run(Policy("h", evaluate=lambda t, c: DEFAULT, handle=lambda e, c: []), s)
    assert d.victim.task.pid == 11 and d.fallback is None


@pytest.mark.parametrize(
    "policy",
    [
        per_task(lambda t, c: None),
        per_task(lambda t, c: 5),
        per_task(lambda t, c: Verdict("select", None)),
        per_task(lambda t, c: Verdict("maybe")),  # type: ignore[arg-type]
        per_task(lambda t, c: 1 / 0),
        Policy("h", handle=lambda e, c: "kill everything"),  # type: ignore[arg-type,return-value]
        Policy("h", handle=lambda e, c: [42]),  # type: ignore[list-item]
    ],
)
def test_broken_policies_fall_back_to_the_kernel(policy: Policy) -> None:
    s = snap(task(10, rss_anon=5), task(11, rss_anon=50, oom_score_adj=100))
    d = run(policy, s)
    assert d.fallback is not None and "the kernel policy decided" in d.fallback
    assert d.victim.task.pid == kernel_decision(s, system_domain(s)).victim.task.pid


def test_a_policy_cannot_change_what_it_is_given() -> None:
    def mutate(t: Task, c: Context) -> Verdict:
        t.pid = 1  # type: ignore[misc]
        return DEFAULT

    def poke(t: Task, c: Context) -> Verdict:
        c.totalpages = 1  # type: ignore[misc]
        return DEFAULT

    s = snap(task(10), task(11, rss_anon=5_000))
    for fn in (mutate, poke):
        d = run(per_task(fn), s)
        assert d.fallback is not None and "raised" in d.fallback
        assert d.victim.task.pid == kernel_decision(s, system_domain(s)).victim.task.pid == 11
    assert [t.pid for t in s.tasks] == [10, 11]


def test_overrun_measured_without_a_guard_falls_back() -> None:
    ticks = iter([0.0, 1.0])
    d = run(per_task(lambda t, c: DEFAULT), snap(task(10)), clock=lambda: next(ticks))
    assert d.fallback is not None and "over its budget" in d.fallback


# -- history ----------------------------------------------------------------------------


def test_growth_counts_children_born_in_the_window_for_their_parent() -> None:
    then = snap(task(10, rss_anon=200_000, start_ticks=1),
                task(20, rss_anon=10_000, start_ticks=2), taken_ns=0)
    storm = [task(100 + i, ppid=20, rss_anon=3_000, start_ticks=50 + i) for i in range(30)]
    now = snap(task(10, rss_anon=205_000, start_ticks=1),
               task(20, rss_anon=10_000, start_ticks=2), *storm, taken_ns=2 * 10**9)
    d = run(builtins()["growth"], now, history=History(then))
    # 30 children x 3000 pages in 2 s beat pid 10's 5000 pages in 2 s
    assert d.victim.task.pid == 20 and d.victim_kind == "tree"
    assert d.actions[0] == KillProcess(20, 2, "the chosen victim, with its tree", tree=True)
    assert any("30 new descendants" in r for r in d.victim.reasons)


def test_growth_without_history_ranks_trees_by_size() -> None:
    s = snap(task(10, rss_anon=50_000), task(20, rss_anon=1_000),
             *[task(100 + i, ppid=20, rss_anon=2_000) for i in range(30)])
    d = run(builtins()["growth"], s)
    assert d.victim.task.pid == 20 and "no history" in d.victim.reasons[0]


def test_a_recycled_pid_is_not_the_same_process() -> None:
    then = snap(task(10, rss_anon=100, start_ticks=1), taken_ns=0)
    now = snap(task(10, rss_anon=90_000, start_ticks=999), taken_ns=10**9)
    assert History(then).growth(now, now.tasks[0]) is None


# -- built-ins ---------------------------------------------------------------------------


def test_largest_ignores_adj() -> None:
    s = snap(task(10, rss_anon=5000, oom_score_adj=-900), task(11, rss_anon=4000,
                                                               oom_score_adj=900))
    assert run(builtins()["largest"], s).victim.task.pid == 10


def test_swap_prefers_the_swapper() -> None:
    s = snap(task(10, rss_anon=90_000), task(11, rss_anon=10, swap=500))
    assert run(builtins()["swap"], s).victim.task.pid == 11


def test_youngest_above_the_floor() -> None:
    big_old = task(10, rss_anon=50_000, start_ticks=1)
    big_new = task(11, rss_anon=20_000, start_ticks=500)
    small_newest = task(12, rss_anon=10, start_ticks=900)
    assert run(builtins()["youngest"], snap(big_old, big_new, small_newest)).victim.task.pid == 11


def test_priority_classes() -> None:
    cgs = (cg("/"), cg("/system.slice/db.service"), cg("/batch.slice/job"),
           cg("/user.slice/u"))
    s = snap(task(10, rss_anon=90_000, cgroup_v2="/system.slice/db.service"),
             task(11, rss_anon=10, cgroup_v2="/batch.slice/job"),
             task(12, rss_anon=500, cgroup_v2="/user.slice/u"), cgroups=cgs)
    d = run(builtins()["priority"], s)
    assert [c.task.pid for c in d.selectable] == [11, 12, 10]


def test_pressure_kills_the_stalling_cgroup() -> None:
    calm = Pressure(PsiLine(1.0, 1.0, 1.0, 10), PsiLine(0.5, 0.5, 0.5, 5))
    hot = Pressure(PsiLine(60.0, 40.0, 10.0, 10), PsiLine(30.0, 20.0, 5.0, 5))
    cgs = (cg("/"), cg("/a", pressure=calm), cg("/b", pressure=hot))
    s = snap(task(10, rss_anon=90_000, cgroup_v2="/a"), task(11, rss_anon=10, cgroup_v2="/b"),
             cgroups=cgs)
    d = run(builtins()["pressure"], s)
    assert d.victim.task.pid == 11 and isinstance(d.actions[0], KillCgroup)
    assert d.actions[0].path == "/b"


def test_every_builtin_by_spec_and_unknown_spec() -> None:
    for name in ("kernel", "largest", "growth", "pressure", "swap", "youngest", "priority"):
        assert load_policy(name).name == name
    with pytest.raises(PolicyError, match="unknown policy 'nope'"):
        load_policy("nope")


# -- properties ------------------------------------------------------------------------

TASKS = st.lists(
    st.builds(
        lambda pid, rss, adj, swap, kth, start, path: task(
            pid, rss_anon=rss, oom_score_adj=adj, swap=swap, kthread=kth, has_mm=not kth,
            start_ticks=start, cgroup_v2=path),
        st.integers(1, 400), st.integers(0, 10**6), st.integers(-1000, 1000),
        st.integers(0, 10**5), st.booleans(), st.integers(0, 10**4),
        st.sampled_from(["/app", "/system.slice/x", "/batch.slice/y", "/user.slice/z", "/"]),
    ),
    max_size=25, unique_by=lambda t: t.pid,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tasks=TASKS, name=st.sampled_from(["kernel", "largest", "growth", "pressure", "swap",
                                          "youngest", "priority"]))
def test_builtins_never_crash_never_pick_the_unkillable_and_are_deterministic(
    tasks: list[Task], name: str
) -> None:
    cgs = (cg("/"), cg("/app"), cg("/system.slice/x"), cg("/batch.slice/y"),
           cg("/user.slice/z"))
    s = snap(*tasks, cgroups=cgs)
    policy = builtins()[name]
    a = run(policy, s)
    b = run(policy, s)
    assert a.fallback is None, a.fallback
    assert (a.victim and a.victim.task.pid) == (b.victim and b.victim.task.pid)
    if a.victim is not None:
        v = a.victim.task
        assert not v.kthread and not v.global_init and v.oom_score_adj != -1000
        assert a.victim.points == max(c.points for c in a.selectable)  # type: ignore[type-var]
        (action,) = a.actions
        if isinstance(action, KillCgroup):  # never the root; never kills the protected
            assert action.path != "/"
            members = [t for t in tasks if t.cgroup_v2 == action.path]
            assert {t.pid for t in members if t.oom_score_adj == -1000 or t.kthread} <= set(
                action.spare_pids)
        else:
            assert isinstance(action, KillProcess) and action.pid == v.pid


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tasks=TASKS, kind=st.sampled_from(["process", "tree", "cgroup"]),
       ignore_mod=st.integers(2, 5))
def test_units_never_take_ignored_or_unkillable_members(
    tasks: list[Task], kind: str, ignore_mod: int
) -> None:
    """Whatever the victim kind, the kill spares every member the policy ignored
    or the kernel would never kill, and a cgroup kill is never the root."""
    tasks = [replace(t, ppid=tasks[0].pid) if i % 3 == 0 and tasks else t
             for i, t in enumerate(tasks)]
    cgs = (cg("/"), cg("/app"), cg("/system.slice/x"), cg("/batch.slice/y"),
           cg("/user.slice/z"))
    s = snap(*tasks, cgroups=cgs)
    policy = per_task(lambda t, c: IGNORE if t.pid % ignore_mod == 0 else select(t.pid),
                      victim=kind)  # type: ignore[arg-type]
    d = run(policy, s)
    assert d.fallback is None
    if d.victim is None:
        return
    ignored = {t.pid for t in tasks if t.pid % ignore_mod == 0}
    unkillable = {t.pid for t in tasks
                  if t.kthread or t.global_init or t.oom_score_adj == -1000 or not t.has_mm}
    (action,) = d.actions
    assert isinstance(action, (KillProcess, KillCgroup))
    if isinstance(action, KillCgroup):
        assert action.path != "/"
        members = {t.pid for t in tasks if t.cgroup_v2 == action.path}
        assert (members & (ignored | unkillable)) <= set(action.spare_pids)
    elif action.tree:
        assert action.pid not in ignored | unkillable
        below, level = set(), {action.pid}
        while level:
            level = {t.pid for t in tasks if t.ppid in level and t.pid not in below}
            below |= level
        assert (below & (ignored | unkillable)) <= set(action.spare_pids)
    else:
        assert action.pid == d.victim.task.pid and action.pid not in ignored | unkillable


# -- review findings: victims and actions the engine must refuse or trim ----------------


def test_a_storm_started_by_init_is_credited_to_its_topmost_newborn() -> None:
    """Children of a newborn forked by init: init can never be the victim, so
    the storm counts for the newborn that started it."""
    then = snap(task(1, rss_anon=500), task(10, rss_anon=50_000, start_ticks=1), taken_ns=0)
    starter = task(30, ppid=1, rss_anon=100, start_ticks=60)
    storm = [task(100 + i, ppid=30, rss_anon=3_000, start_ticks=70 + i) for i in range(30)]
    now = snap(task(1, rss_anon=500), task(10, rss_anon=52_000, start_ticks=1), starter,
               *storm, taken_ns=10**9)
    d = run(builtins()["growth"], now, history=History(then))
    assert d.victim is not None and d.victim.task.pid == 30


def test_a_cgroup_victim_is_never_the_root_cgroup() -> None:
    s = snap(task(10, cgroup_v2="/", rss_anon=9_000), task(11, cgroup_v2="/app"))
    d = run(per_task(lambda t, c: select(t.rss_anon or 0), victim="cgroup"), s)
    assert d.victim.task.pid == 10 and d.victim_kind == "process"
    assert d.actions == (KillProcess(10, 1010, d.actions[0].reason),)  # type: ignore[union-attr]
    assert any("cgroup victim refused" in n for n in d.notes)


def test_tree_and_cgroup_kills_spare_what_must_not_die() -> None:
    parent = task(10, rss_anon=90_000)
    protected_child = task(11, ppid=10, oom_score_adj=-1000)
    ignored_child = task(12, ppid=10)
    plain_child = task(13, ppid=10)
    s = snap(parent, protected_child, ignored_child, plain_child)
    policy = per_task(lambda t, c: IGNORE if t.pid == 12 else select(t.rss_anon or 0),
                      victim="tree")
    d = run(policy, s)
    assert d.actions[0] == KillProcess(10, 1010, "the chosen victim, with its tree",
                                       tree=True, spare_pids=(11, 12))
    d = run(per_task(policy.evaluate, victim="cgroup"), s)  # type: ignore[arg-type]
    kill = d.actions[0]
    assert isinstance(kill, KillCgroup) and kill.path == "/app" and kill.spare_pids == (11, 12)


@pytest.mark.parametrize(
    "action",
    [
        KillProcess(10, 1010, reason=object()),  # type: ignore[arg-type]
        KillProcess(10, 1010, tree=1),  # type: ignore[arg-type]
        KillProcess(10, 10**30),
        RunHook(("/bin/true",), timeout_s=float("nan")),
        RunHook(("/bin/true",), timeout_s=10**9),
        DeleteFiles(("relative/path",)),
        KillCgroup("v2", "/", 100 + 1),
    ],
)
def test_handler_actions_must_be_plain_and_sane(action: Any) -> None:
    s = snap(task(10), task(11, rss_anon=50_000))
    d = run(Policy("h", handle=lambda e, c: [action]), s)
    assert d.fallback is not None and d.victim.task.pid == 11


def test_points_must_fit_64_bits() -> None:
    d = run(per_task(lambda t, c: select(2**70)), snap(task(10)))
    assert d.fallback is not None and "64 bits" in d.fallback


def test_a_policy_raising_keyboard_interrupt_only_costs_its_decision() -> None:
    def interrupt(t: Task, c: Context) -> Verdict:
        raise KeyboardInterrupt

    d = run(per_task(interrupt), snap(task(10)))
    assert d.fallback is not None and "KeyboardInterrupt" in d.fallback


def test_an_exception_that_cannot_print_itself() -> None:
    class Mute(Exception):
        def __str__(self) -> str:
            raise RuntimeError("no")

    def raise_mute(t: Task, c: Context) -> Verdict:
        raise Mute

    d = run(per_task(raise_mute), snap(task(10)))
    assert d.fallback is not None and "could not be printed" in d.fallback


def test_handle_only_policy_keeps_its_name_when_it_passes() -> None:
    s = snap(task(10), task(11, rss_anon=50_000))
    d = run(Policy("just-a-handler", handle=lambda e, c: []), s)
    assert d.policy == "just-a-handler" and d.victim.task.pid == 11 and d.fallback is None
