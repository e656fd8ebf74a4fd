"""Bounded execution (issue 3, item 5), with the real ``signal_guard``.

Whatever a policy does (loop forever, swallow exceptions while looping,
sleep, raise, return garbage, try to change what it was given), the decision
made through ``decide(..., guard=signal_guard, budget_s=0.05)`` ends, quickly,
in exactly the kernel replica's choice, and ``fallback`` says why.

The policies that could hang run in a forked child with a hard timeout: were
the guard broken, the test fails in seconds instead of hanging the suite.

Also here: ABORT and IGNORE, and parity: a ``.py`` policy that returns
DEFAULT for every task, loaded with ``load_module``, chooses exactly the
kernel replica's victim, on literal snapshots, on the recorded trees
``tests/fixtures/{hybrid,v2}`` (every memory cgroup domain too) and on the
live machine.
"""

from __future__ import annotations

import dataclasses
import json
import os
import select as io_select
import shutil
import signal
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from oomwarden.decision import Decision, Domain
from oomwarden.model import Cgroup, HierarchyKind, Snapshot, SystemMemory, Task
from oomwarden.policy.api import (
    ABORT,
    DEFAULT,
    IGNORE,
    Action,
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
from oomwarden.policy.budget import signal_guard
from oomwarden.policy.decide import PolicyOverrun, decide
from oomwarden.policy.engine import cgroup_domain, kernel_decision, system_domain
from oomwarden.policy.loader import load_module
from oomwarden.sources.snapshot import SourceConfig, build_snapshot

FIXTURES = Path(__file__).parent / "fixtures"
PYPOLICIES = FIXTURES / "pypolicies"
PAGE = 4096
BUDGET_S = 0.05
#: A stopped policy must end the whole decision well under a second.
QUICK_S = 0.5
#: The safety net around a test that could hang if the guard were broken.
HARD_TIMEOUT_S = 5.0


# ------------------------------------------------------------- a literal snapshot


def task(pid: int, rss: int, **kw: Any) -> Task:
    """A killable process; memory in pages."""
    base: dict[str, Any] = {
        "pid": pid, "tgid": pid, "ppid": 1, "comm": f"p{pid}", "state": "S",
        "start_ticks": 1000 + pid, "uid": 1000, "kthread": False, "has_mm": True,
        "rss_anon": rss, "rss_file": 0, "rss_shmem": 0, "swap": 0, "pgtables": 10,
        "oom_score_adj": 0, "global_init": pid == 1,
    }
    base.update(kw)
    return Task(**base)


def literal_snapshot() -> Snapshot:
    """init and a kernel thread (never candidates), a -1000 giant (exempt), a
    zombie, and ordinary processes: 400 wins; 500 and 501 tie below it."""
    tasks = (
        task(1, 90_000),
        task(2, 0, comm="kthreadd", kthread=True, has_mm=False, rss_anon=None,
             rss_file=None, rss_shmem=None, swap=None, pgtables=None),
        task(100, 500_000, comm="sshd", oom_score_adj=-1000),
        task(150, 0, comm="defunct", state="Z", has_mm=False, rss_anon=None,
             rss_file=None, rss_shmem=None, swap=None, pgtables=None),
        task(200, 10_000, comm="bash"),
        task(300, 40_000, comm="postgres", oom_score_adj=-500),
        task(400, 60_000, comm="java", swap=5_000),
        task(500, 30_000, comm="worker-a"),
        task(501, 30_000, comm="worker-b"),
        task(600, 20_000, comm="nginx", oom_score_adj=300),
    )
    system = SystemMemory(mem_total=1_000_000 * PAGE, mem_available=100_000 * PAGE,
                          swap_total=0, swap_free=0, pressure=None, page_size=PAGE)
    return Snapshot(taken_ns=0, system=system, tasks=tasks)


SNAP = literal_snapshot()
DOMAIN = system_domain(SNAP)
KERNEL = kernel_decision(SNAP, DOMAIN)
assert KERNEL.victim is not None
KERNEL_PID = KERNEL.victim.task.pid  # 600: 20000 + 300 * 1000 points


def test_the_literal_snapshot_is_what_the_comments_say() -> None:
    ranked = [(c.task.pid, c.points) for c in KERNEL.selectable]
    assert ranked == [(600, 320_010), (400, 65_010), (501, 30_010), (500, 30_010),
                      (200, 10_010), (300, 40_010 - 500_000)]
    assert KERNEL_PID == 600


# ------------------------------------------------------------------------ helpers


def summary(d: Decision) -> dict[str, Any]:
    """What the tests compare, in JSON-safe form (it crosses a pipe)."""
    return {
        "victim": None if d.victim is None else d.victim.task.pid,
        "fallback": d.fallback,
        "aborted": d.aborted,
        "policy": d.policy,
        "policy_seconds": d.policy_seconds,
        "ranked": [c.task.pid for c in d.selectable],
        "actions": [repr(a) for a in d.actions],
    }


def run_guarded(policy: Policy, snapshot: Snapshot = SNAP, domain: Domain = DOMAIN,
                event: Event | None = None) -> dict[str, Any]:
    """``decide`` with the real guard, timed; returns its summary."""
    started = time.monotonic()
    d = decide(snapshot, domain, policy, event=event, guard=signal_guard, budget_s=BUDGET_S)
    out = summary(d)
    out["elapsed"] = time.monotonic() - started
    return out


def in_child(fn: Callable[[], dict[str, Any]], timeout_s: float = HARD_TIMEOUT_S
             ) -> dict[str, Any]:
    """Run ``fn`` in a forked child (its main thread, so signal_guard is armed)
    and return its result; fail, never hang, if it does not finish in time."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        status = 0
        try:
            os.close(read_end)
            try:
                result: dict[str, Any] = {"ok": fn()}
            except BaseException as e:
                result = {"error": "".join(traceback.format_exception(e))}
            data = json.dumps(result).encode()
            while data:
                data = data[os.write(write_end, data):]
        except BaseException:
            status = 1
        finally:
            os._exit(status)
    os.close(write_end)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            left = deadline - time.monotonic()
            ready = io_select.select([read_end], [], [], max(left, 0))[0] if left > 0 else []
            if not ready:
                os.kill(pid, signal.SIGKILL)  # the child this test started
                pytest.fail(f"the decision did not end within {timeout_s} s: the guard "
                            "did not stop the policy")
            chunk = os.read(read_end, 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(read_end)
        os.waitpid(pid, 0)
    result = json.loads(b"".join(chunks) or b'{"error": "the child died silently"}')
    if "error" in result:
        pytest.fail(f"in the child: {result['error']}")
    out: dict[str, Any] = result["ok"]
    return out


def assert_kernel_fallback(out: dict[str, Any], *why: str) -> None:
    """The decision is exactly the kernel replica's, and says why."""
    assert out["victim"] == KERNEL_PID
    assert out["ranked"] == [c.task.pid for c in KERNEL.selectable]
    assert out["actions"] == [repr(KillProcess(KERNEL_PID, 1000 + KERNEL_PID,
                                               "the chosen victim"))]
    assert not out["aborted"]
    fallback = out["fallback"]
    assert fallback is not None and "the kernel policy decided" in fallback
    for needle in why:
        assert needle in fallback, fallback
    assert out["elapsed"] < QUICK_S, out


def evaluating(fn: Callable[[Task, Context], object], name: str = "hostile") -> Policy:
    return Policy(name=name, evaluate=fn)  # type: ignore[arg-type]


def handling(fn: Callable[[Event, Context], object], name: str = "hostile") -> Policy:
    return Policy(name=name, handle=fn)  # type: ignore[arg-type]


def copy_policy(name: str, tmp_path: Path) -> str:
    """A copy of a pypolicies file, owned by the test's user and 0644 (the
    checkout may be owned by another user; loaded as root, it would be refused)."""
    copy = tmp_path / name
    shutil.copyfile(PYPOLICIES / name, copy)
    copy.chmod(0o644)
    return str(copy)


# ------------------------------------------------------------ policies that hang


def loops_forever(task: Task, ctx: Context) -> Verdict:
    while True:
        pass


def loops_swallowing_exceptions(task: Task, ctx: Context) -> Verdict:
    while True:
        try:
            while True:
                pass
        except Exception:  # PolicyOverrun is a BaseException: it gets through
            pass


def sleeps(task: Task, ctx: Context) -> Verdict:
    time.sleep(10)
    return DEFAULT


def slow_on_one_task(task: Task, ctx: Context) -> Verdict:
    if task.pid == 500:
        time.sleep(10)
    return select(10**9) if task.pid == 200 else DEFAULT


def handler_loops(event: Event, ctx: Context) -> list[Action]:
    while True:
        pass


@pytest.mark.parametrize(
    "policy",
    [
        evaluating(loops_forever),
        evaluating(loops_swallowing_exceptions),
        evaluating(sleeps),
        evaluating(slow_on_one_task),
        handling(handler_loops),
    ],
    ids=["loop", "loop-swallowing-exceptions", "sleep-10s", "sleep-mid-scan", "handler-loop"],
)
def test_a_policy_that_does_not_end_is_stopped(policy: Policy) -> None:
    out = in_child(lambda: run_guarded(policy))
    assert_kernel_fallback(out, f"policy {policy.name}", "overran its budget of 50 ms",
                           "was stopped")
    # stopped at the budget, not long after
    assert BUDGET_S <= out["policy_seconds"] < BUDGET_S + 0.2


def test_a_loaded_py_file_that_loops_is_stopped(tmp_path: Path) -> None:
    policy = load_module(copy_policy("swallow_loop.py", tmp_path))
    out = in_child(lambda: run_guarded(policy))
    assert_kernel_fallback(out, "policy swallow-loop", "overran")


def test_the_guard_restores_the_previous_sigalrm_handler() -> None:
    def run() -> dict[str, Any]:
        def mine(_signum: int, _frame: object) -> None:
            pass

        signal.signal(signal.SIGALRM, mine)
        out = run_guarded(evaluating(loops_forever))
        out["restored"] = signal.getsignal(signal.SIGALRM) is mine
        out["timer"] = signal.getitimer(signal.ITIMER_REAL)[0]
        return out

    out = in_child(run)
    assert out["restored"] and out["timer"] == 0.0
    assert_kernel_fallback(out, "overran")


def test_the_safety_net_itself_catches_a_hang() -> None:
    """Were the guard broken, in_child fails the test instead of hanging."""

    def hang() -> dict[str, Any]:
        time.sleep(60)
        return {}

    started = time.monotonic()
    with pytest.raises(pytest.fail.Exception, match=r"did not end within 0\.3 s"):
        in_child(hang, timeout_s=0.3)
    assert time.monotonic() - started < 2


# ---------------------------------------------------- policies that break the contract


def raises(task: Task, ctx: Context) -> Verdict:
    return Verdict("default") if task.pid < 400 else {}["no such key"]  # type: ignore[no-any-return]


def divides_by_zero(task: Task, ctx: Context) -> Verdict:
    return select(1 // 0)


def returns_none(task: Task, ctx: Context) -> None:
    return None


def returns_int(task: Task, ctx: Context) -> int:
    return 42


def returns_str(task: Task, ctx: Context) -> str:
    return "DEFAULT"


def returns_float_select(task: Task, ctx: Context) -> Verdict:
    return select(1.5)  # type: ignore[arg-type]


def returns_select_without_points(task: Task, ctx: Context) -> Verdict:
    return Verdict("select", None)


def returns_bool_points(task: Task, ctx: Context) -> Verdict:
    return Verdict("select", True)


def returns_unknown_kind(task: Task, ctx: Context) -> Verdict:
    return Verdict("kill")  # type: ignore[arg-type]


def returns_the_function(task: Task, ctx: Context) -> object:
    return DEFAULT if task.pid != 500 else returns_the_function


def changes_a_task(task: Task, ctx: Context) -> Verdict:
    task.pid = 1  # type: ignore[misc]
    return DEFAULT


def changes_a_tasks_memory(task: Task, ctx: Context) -> Verdict:
    task.rss_anon = 0  # type: ignore[misc]
    return DEFAULT


def sets_on_ctx(task: Task, ctx: Context) -> Verdict:
    ctx.totalpages = 1  # type: ignore[misc]
    return DEFAULT


def adds_to_ctx(task: Task, ctx: Context) -> Verdict:
    ctx.cache = {}  # type: ignore[attr-defined]
    return DEFAULT


def changes_the_snapshot(task: Task, ctx: Context) -> Verdict:
    ctx.snapshot.tasks = ()  # type: ignore[misc]
    return DEFAULT


def changes_the_task_list(task: Task, ctx: Context) -> Verdict:
    ctx.tasks.append(task)  # type: ignore[attr-defined]
    return DEFAULT


def raises_recursion_error(task: Task, ctx: Context) -> Verdict:
    raise RecursionError("deep")


@pytest.mark.parametrize(
    ("fn", "why"),
    [
        (raises, ["raised KeyError", "no such key"]),
        (divides_by_zero, ["raised ZeroDivisionError"]),
        (raises_recursion_error, ["raised RecursionError: deep"]),
        (returns_none, ["returned None for pid", "not a verdict"]),
        (returns_int, ["returned 42 for pid", "not a verdict"]),
        (returns_str, ["returned 'DEFAULT' for pid", "not a verdict"]),
        (returns_float_select, ["raised TypeError", "select() takes an int, not float"]),
        (returns_select_without_points, ["returned select(None)", "must be an int"]),
        (returns_bool_points, ["returned select(True)", "must be an int"]),
        (returns_unknown_kind, ["'kill'", "for pid 200"]),
        (returns_the_function, ["for pid 500", "not a verdict"]),
        (changes_a_task, ["raised FrozenInstanceError", "pid"]),
        (changes_a_tasks_memory, ["raised FrozenInstanceError", "rss_anon"]),
        (sets_on_ctx, ["raised AttributeError", "read-only"]),
        (adds_to_ctx, ["raised AttributeError", "read-only"]),
        (changes_the_snapshot, ["raised FrozenInstanceError"]),
        (changes_the_task_list, ["raised AttributeError", "tuple"]),
    ],
    ids=lambda v: v.__name__ if callable(v) else None,
)
def test_a_policy_that_breaks_the_contract_falls_back(
    fn: Callable[[Task, Context], object], why: list[str]
) -> None:
    out = run_guarded(evaluating(fn))
    assert_kernel_fallback(out, "policy hostile", *why)


def test_nothing_given_to_the_policy_changed() -> None:
    before = [dataclasses.astuple(t) for t in SNAP.tasks]
    for fn in (changes_a_task, changes_a_tasks_memory, changes_the_snapshot,
               changes_the_task_list):
        run_guarded(evaluating(fn))
    assert [dataclasses.astuple(t) for t in SNAP.tasks] == before
    assert kernel_decision(SNAP, DOMAIN).victim == KERNEL.victim


def test_frozen_instance_error_is_what_a_task_raises() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        SNAP.tasks[4].pid = 1  # type: ignore[misc]


# --------------------------------------------------------------------- handlers


def kill_event() -> Event:
    return Event(trigger="oom", domain="system")


@pytest.mark.parametrize(
    ("result", "why"),
    [
        ("kill java", "not a list of actions"),
        (42, "not a list of actions"),
        ({"pid": 400}, "not a list of actions"),
        (KillProcess(400, 1400), "not a list of actions"),
        ([1], "among its actions, not an action"),
        ([KillProcess(400, 1400), "KillProcess(500)"], "among its actions, not an action"),
        ([None], "among its actions, not an action"),
        ([Verdict("select", 1)], "among its actions, not an action"),
    ],
    ids=["str", "int", "dict", "bare-action", "int-item", "str-item", "none-item",
         "verdict-item"],
)
def test_a_handler_returning_garbage_falls_back(result: object, why: str) -> None:
    out = run_guarded(handling(lambda event, ctx: result), event=kill_event())
    assert_kernel_fallback(out, "handler returned", why)


def test_a_handler_that_raises_falls_back() -> None:
    def handle(event: Event, ctx: Context) -> list[Action]:
        raise OSError(2, "No such file or directory", "/dev/shm/cache")

    out = run_guarded(handling(handle), event=kill_event())
    assert_kernel_fallback(out, "raised FileNotFoundError", "/dev/shm/cache")


def test_a_handler_returning_a_generator_falls_back() -> None:
    out = run_guarded(handling(lambda e, c: (a for a in [KillProcess(400, 1400)])),
                      event=kill_event())
    assert_kernel_fallback(out, "not a list of actions")


def test_a_handler_with_a_bad_evaluate_falls_back_from_inside_ctx_select() -> None:
    """ctx.select() runs the per-task selection: its failure is the policy's."""

    def handle(event: Event, ctx: Context) -> list[Action]:
        ctx.select()
        return []

    policy = Policy("hostile", evaluate=returns_none, handle=handle)  # type: ignore[arg-type]
    assert_kernel_fallback(run_guarded(policy, event=kill_event()), "not a verdict")


def test_well_behaved_handlers_do_not_fall_back() -> None:
    acted = run_guarded(handling(lambda e, c: [DeleteFiles(("/dev/shm/x",))]),
                        event=kill_event())
    assert acted["fallback"] is None and acted["victim"] is None
    assert acted["actions"] == [repr(DeleteFiles(("/dev/shm/x",)))]
    for nothing in ([], (), None):
        out = run_guarded(handling(lambda e, c, r=nothing: r), event=kill_event())
        assert out["fallback"] is None and out["victim"] == KERNEL_PID


# ----------------------------------------------------------------- ABORT and IGNORE


def test_abort_stops_the_search_with_no_victim() -> None:
    seen: list[int] = []

    def evaluate(task: Task, ctx: Context) -> Verdict:
        seen.append(task.pid)
        return ABORT.because("maintenance") if task.comm == "java" else DEFAULT

    d = decide(SNAP, DOMAIN, evaluating(evaluate, "maint"), guard=signal_guard,
               budget_s=BUDGET_S)
    assert d.aborted and d.victim is None and d.actions == () and d.fallback is None
    assert seen[-1] == 400 and 500 not in seen  # nothing asked after the abort
    assert any("aborted the search at pid 400" in n for n in d.notes)
    assert d.to_json()["aborted"] is True and d.to_json()["victim"] is None


def test_abort_on_the_first_task() -> None:
    d = decide(SNAP, DOMAIN, evaluating(lambda t, c: ABORT), guard=signal_guard,
               budget_s=BUDGET_S)
    assert d.aborted and d.victim is None and d.actions == ()


def test_ignored_tasks_never_win() -> None:
    ignore_top = evaluating(lambda t, c: IGNORE if t.pid == KERNEL_PID else DEFAULT)
    d = decide(SNAP, DOMAIN, ignore_top, guard=signal_guard, budget_s=BUDGET_S)
    assert d.victim is not None and d.victim.task.pid == 400
    assert KERNEL_PID not in [c.task.pid for c in d.selectable]
    ignored = [c for c in d.candidates if c.verdict == "ignore"]
    assert [c.task.pid for c in ignored] == [KERNEL_PID]

    # even with a huge select() everywhere else ignored
    only_small = evaluating(lambda t, c: select(10**12) if t.pid == 200 else IGNORE)
    d = decide(SNAP, DOMAIN, only_small, guard=signal_guard, budget_s=BUDGET_S)
    assert d.victim is not None and d.victim.task.pid == 200

    everything = decide(SNAP, DOMAIN, evaluating(lambda t, c: IGNORE), guard=signal_guard,
                        budget_s=BUDGET_S)
    assert everything.victim is None and everything.actions == ()
    assert everything.fallback is None and not everything.aborted


def test_unkillable_tasks_are_never_asked_nor_chosen() -> None:
    asked: list[int] = []

    def evaluate(task: Task, ctx: Context) -> Verdict:
        asked.append(task.pid)
        return select(10**15)

    d = decide(SNAP, DOMAIN, evaluating(evaluate), guard=signal_guard, budget_s=BUDGET_S)
    assert not {1, 2, 100, 150} & set(asked)
    assert d.victim is not None and d.victim.task.pid not in {1, 2, 100, 150}


def test_select_ties_go_to_the_task_met_last() -> None:
    d = decide(SNAP, DOMAIN, evaluating(lambda t, c: select(7)), guard=signal_guard,
               budget_s=BUDGET_S)
    # every killable task has 7 points: the kernel keeps the one it meets last
    # (latest start time), 600
    assert d.victim is not None and d.victim.task.pid == 600


@st.composite
def snapshots_and_ignores(draw: st.DrawFn) -> tuple[Snapshot, frozenset[int]]:
    n = draw(st.integers(1, 12))
    tasks = tuple(
        task(10 + i, draw(st.integers(0, 200_000)),
             oom_score_adj=draw(st.sampled_from([-1000, -999, -500, 0, 0, 0, 1, 500, 1000])),
             start_ticks=draw(st.integers(0, 5)))
        for i in range(n)
    )
    ignored = draw(st.frozensets(st.sampled_from([t.pid for t in tasks])))
    system = SystemMemory(mem_total=draw(st.integers(1_000, 2_000_000)) * PAGE,
                          mem_available=None, swap_total=0, swap_free=0, pressure=None)
    return Snapshot(taken_ns=0, system=system, tasks=tasks), ignored


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(snapshots_and_ignores())
def test_ignored_never_win_and_the_rest_rank_as_the_kernel(
    case: tuple[Snapshot, frozenset[int]],
) -> None:
    snapshot, ignored = case
    policy = evaluating(lambda t, c: IGNORE if t.pid in ignored else DEFAULT)
    d = decide(snapshot, system_domain(snapshot), policy, guard=signal_guard, budget_s=1.0)
    assert d.fallback is None
    rest = dataclasses.replace(snapshot,
                               tasks=tuple(t for t in snapshot.tasks if t.pid not in ignored))
    k = kernel_decision(rest, system_domain(rest))
    assert (d.victim is None) == (k.victim is None)
    if d.victim is not None and k.victim is not None:
        assert d.victim.task.pid == k.victim.task.pid
        assert d.victim.task.pid not in ignored
    assert [c.task.pid for c in d.selectable] == [c.task.pid for c in k.selectable]


# --------------------------------------------------------------- parity: DEFAULT everywhere


@pytest.fixture(scope="module")
def default_policy(tmp_path_factory: pytest.TempPathFactory) -> Policy:
    policy = load_module(copy_policy("default.py", tmp_path_factory.mktemp("pypolicies")))
    assert policy.evaluate is not None and policy.handle is None and not policy.kernel
    return policy


def assert_parity(snapshot: Snapshot, domain: Domain, policy: Policy) -> None:
    """Same victim, same ranking, same action as the kernel replica."""
    d = decide(snapshot, domain, policy, guard=signal_guard, budget_s=5.0)
    k = decide(snapshot, domain, Policy("kernel", kernel=True))
    assert d.fallback is None, d.fallback
    assert not d.aborted
    assert (d.victim is None) == (k.victim is None), domain.name
    if d.victim is not None and k.victim is not None:
        assert d.victim.task.pid == k.victim.task.pid, domain.name
        assert d.victim.points == k.victim.points
    assert kernel_decision(snapshot, domain).victim == k.victim
    assert [(c.task.pid, c.points) for c in d.selectable] == [
        (c.task.pid, c.points) for c in k.selectable
    ], domain.name
    assert d.actions == k.actions
    assert d.policy == "always-default" and d.victim_kind == k.victim_kind


def memory_domains(snapshot: Snapshot) -> Iterator[Domain]:
    yield system_domain(snapshot)
    for cg in snapshot.cgroups:
        if cg.memory_controller and cg.path != "/":
            yield cgroup_domain(snapshot, cg)


def with_tie_snapshot() -> Snapshot:
    """Equal points everywhere, a v2 domain where cgroup.procs order decides."""
    cg = Cgroup(kind=HierarchyKind.V2, path="/job", fs_path="/sys/fs/cgroup/job", inode=7,
                memory_controller=True, verified=True, limit=100_000 * PAGE,
                pids=(31, 30, 32))
    tasks = tuple(task(p, 5_000, cgroup_v2="/job", start_ticks=9) for p in (30, 31, 32))
    return dataclasses.replace(SNAP, tasks=SNAP.tasks + tasks,
                               cgroups=(dataclasses.replace(cg, path="/", inode=1, pids=()),
                                        cg))


def test_parity_on_literal_snapshots(default_policy: Policy) -> None:
    assert_parity(SNAP, DOMAIN, default_policy)
    tied = with_tie_snapshot()
    for domain in memory_domains(tied):
        assert_parity(tied, domain, default_policy)
    job = cgroup_domain(tied, tied.cgroups[1])
    d = decide(tied, job, default_policy, guard=signal_guard, budget_s=5.0)
    assert d.victim is not None and d.victim.task.pid == 32  # listed last in cgroup.procs


def fixture_snapshot(name: str) -> Snapshot:
    root = FIXTURES / name
    return build_snapshot(SourceConfig(proc_root=str(root / "proc"), fs_root=str(root),
                                       verify_fs=False, page_size=PAGE))


@pytest.mark.parametrize("tree", ["hybrid", "v2"])
def test_parity_on_recorded_trees(default_policy: Policy, tree: str) -> None:
    snapshot = fixture_snapshot(tree)
    domains = list(memory_domains(snapshot))
    assert len(domains) > 2  # the system and several memory cgroups
    with_victim = 0
    for domain in domains:
        assert_parity(snapshot, domain, default_policy)
        with_victim += kernel_decision(snapshot, domain).victim is not None
    assert with_victim >= 2


def test_parity_on_the_recorded_victims(default_policy: Policy) -> None:
    """The recorded trees' system victims: hybrid's worker (oom_score_adj 300
    outweighs hog's 256 MiB), v2's java (see tests/fixtures/README.md)."""
    for tree, comm in (("hybrid", "worker"), ("v2", "java")):
        snapshot = fixture_snapshot(tree)
        d = decide(snapshot, system_domain(snapshot), default_policy, guard=signal_guard,
                   budget_s=5.0)
        assert d.victim is not None and d.victim.task.comm == comm


def test_parity_on_the_live_machine(default_policy: Policy) -> None:
    """Reads /proc only."""
    snapshot = build_snapshot(SourceConfig())
    assert len(snapshot.tasks) > 3
    for domain in memory_domains(snapshot):
        assert_parity(snapshot, domain, default_policy)


def test_parity_survives_hostile_neighbours(default_policy: Policy) -> None:
    """A failing policy's decision is the kernel's too: all roads lead there."""
    hostile = run_guarded(evaluating(raises))
    good = run_guarded(default_policy)
    assert hostile["victim"] == good["victim"] == KERNEL_PID
    assert good["fallback"] is None


def test_every_overrun_stays_under_a_second() -> None:
    """The three hanging shapes back to back, in one child: the whole run is quick."""

    def run() -> dict[str, Any]:
        started = time.monotonic()
        for fn in (loops_forever, loops_swallowing_exceptions, sleeps):
            out = run_guarded(evaluating(fn))
            assert out["victim"] == KERNEL_PID and "overran" in out["fallback"]
        return {"elapsed": time.monotonic() - started}

    assert in_child(run)["elapsed"] < 3 * QUICK_S


def test_policy_overrun_is_not_an_exception() -> None:
    assert issubclass(PolicyOverrun, BaseException)
    assert not issubclass(PolicyOverrun, Exception)


# ------------------------------------------ what a policy can no longer get past
#
# A policy must not end the warden (sys.exit, its own BaseException), crash the
# output (reasons that are not strings), or have a handler kill what the kernel
# never kills: each ends in the kernel's fallback.


class PolicysOwnBaseException(BaseException):
    pass


def calls_sys_exit(task: Task, ctx: Context) -> Verdict:
    raise SystemExit(3)


def raises_a_base_exception(task: Task, ctx: Context) -> Verdict:
    raise PolicysOwnBaseException("mine")


def reasons_not_strings(task: Task, ctx: Context) -> Verdict:
    return select(5, object())  # type: ignore[arg-type]


def reasons_not_a_tuple(task: Task, ctx: Context) -> Verdict:
    return Verdict("select", 5, "abc")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("fn", "why"),
    [
        (calls_sys_exit, ["raised SystemExit"]),
        (raises_a_base_exception, ["raised PolicysOwnBaseException: mine"]),
        (reasons_not_strings, ["reasons must be a tuple of strings"]),
        (reasons_not_a_tuple, ["reasons must be a tuple of strings"]),
    ],
    ids=lambda v: v.__name__ if callable(v) else None,
)
def test_engine_gap_policy_errors(fn: Callable[[Task, Context], object], why: list[str]
                                  ) -> None:
    def run() -> dict[str, Any]:
        return run_guarded(evaluating(fn))

    assert_kernel_fallback(in_child(run), *why)


@pytest.mark.parametrize(
    ("action", "why"),
    [
        (KillProcess(1, 1001), "never kills"),  # init
        (KillProcess(100, 1100), "never kills"),  # sshd, oom_score_adj -1000
        (KillProcess(2, 1002), "never kills"),  # a kernel thread
        (KillProcess(400, 999), "not a process of"),  # stale start time: a recycled pid
        (KillProcess(4242, 5242), "not a process of"),  # not in the snapshot
        (KillCgroup("v1", "/nope", 7), "not a cgroup of"),
        (RunHook(()), "empty"),
    ],
    ids=["init", "adj-1000", "kthread", "stale-start", "unknown-pid", "unknown-cgroup",
         "empty-hook"],
)
def test_engine_gap_handler_actions_are_checked(action: Action, why: str) -> None:
    out = run_guarded(handling(lambda e, c: [action]), event=kill_event())
    assert_kernel_fallback(out, why)
