"""The engine: run any policy over a domain, bounded, with the kernel as fallback.

Pure: it reads snapshots and returns a :class:`Decision`. The two things it
needs from outside come in as arguments: a clock (for the time spent) and a
``guard`` that can stop a policy that runs past its budget (the CLI and the
daemon pass :func:`oomwarden.policy.budget.signal_guard`; the default only
measures).

What the engine guarantees, whatever the policy does:

* the kernel's unkillable tasks (init, kernel threads, zombies, vfork
  children, ``oom_score_adj`` -1000) are never asked about and never chosen;
* a task the policy ignores is never chosen;
* among candidates the most points win; equal points go to the task the
  kernel's scan meets last (its tie rule);
* a policy that raises, returns something that is not a verdict (or, from a
  handler, not a list of actions), tries to change what it was given, or
  overruns its budget is stopped: the kernel policy decides instead, and the
  decision says why in ``fallback``.
"""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import fields, replace
from operator import itemgetter

from oomwarden.decision import Candidate, Decision, Domain
from oomwarden.decision import Verdict as CandidateVerdict
from oomwarden.model import Cgroup, HierarchyKind, Pressure, Snapshot, Task
from oomwarden.policy.api import (
    ACTION_TYPES,
    Action,
    Context,
    ContextImpl,
    Event,
    KillCgroup,
    KillProcess,
    Policy,
    RunHook,
    Verdict,
)
from oomwarden.policy.api import (
    DEFAULT as DEFAULT_VERDICT,
)
from oomwarden.policy.engine import ScanKey, kernel_decision, scan_order
from oomwarden.policy.history import History
from oomwarden.policy.kernel import badness_points, unkillable_reason

#: The whole decision's time budget. The thread asked for bounded callbacks;
#: 50 ms keeps a decision well inside the kernel's OOM retry loop while still
#: letting a Python policy look at ~10,000 tasks.
DEFAULT_BUDGET_S = 0.050
#: How deep a process tree is followed (fork bombs nest).
MAX_TREE_DEPTH = 64
#: Budgets outside this range are clamped (a timer cannot take more).
MIN_BUDGET_S = 0.001
MAX_BUDGET_S = 60.0
#: A policy's error messages are cut here in the decision record.
MAX_MESSAGE = 300
#: A handler's actions per decision, and a hook's longest timeout.
MAX_ACTIONS = 1000
MAX_HOOK_TIMEOUT_S = 600.0
#: Points must fit the kernel's own type (a signed 64-bit long).
POINTS_MIN, POINTS_MAX = -(2**63), 2**63 - 1


_POINTS_THEN_ORDER = itemgetter(0, 1)


class PolicyOverrun(BaseException):
    """Raised inside a policy that ran past its budget. A BaseException, so
    that a policy's ``except Exception`` cannot swallow it."""


class PolicyFailure(Exception):
    """A policy broke the contract (bad verdict, bad actions)."""


Guard = Callable[[float], AbstractContextManager[None]]


@contextmanager
def no_guard(_seconds: float) -> Iterator[None]:
    """Measure only: an overrun is noticed afterwards, not interrupted."""
    yield


class _Tree:
    """Parent -> children over one snapshot, for trees and descendants."""

    def __init__(self, tasks: Sequence[Task]) -> None:
        self.children: dict[int, list[Task]] = {}
        self.by_pid: dict[int, Task] = {}
        for t in tasks:
            self.children.setdefault(t.ppid, []).append(t)
            self.by_pid[t.pid] = t

    def parent(self, task: Task) -> Task | None:
        return self.by_pid.get(task.ppid) if task.ppid != task.pid else None

    def kids(self, task: Task) -> tuple[Task, ...]:
        return tuple(self.children.get(task.pid, ()))

    def descendants(self, task: Task) -> tuple[Task, ...]:
        out: list[Task] = []
        level = [task]
        seen = {task.pid}
        for _ in range(MAX_TREE_DEPTH):
            nxt = [k for t in level for k in self.children.get(t.pid, ()) if k.pid not in seen]
            if not nxt:
                break
            seen.update(k.pid for k in nxt)
            out.extend(nxt)
            level = nxt
        return tuple(out)


def memory_kind(snapshot: Snapshot, domain: Domain) -> HierarchyKind:
    """The hierarchy whose cgroups are the domain's memory cgroups."""
    if domain.cgroup is not None:
        return domain.cgroup.kind
    return next((h.kind for h in snapshot.hierarchies if h.has_memory), HierarchyKind.V1)


def _path_function(snapshot: Snapshot, domain: Domain) -> Callable[[Task], str | None]:
    """A task's cgroup path on the domain's memory hierarchy; with no memory
    hierarchy known (a literal snapshot), the one path the task has."""
    if domain.cgroup is None and not any(h.has_memory for h in snapshot.hierarchies):
        return lambda t: t.memcg_v1 if t.memcg_v1 is not None else t.cgroup_v2
    if memory_kind(snapshot, domain) is HierarchyKind.V1:
        return lambda t: t.memcg_v1
    return lambda t: t.cgroup_v2


def _cgroup_path(
    task: Task, domain: Domain, snapshot: Snapshot
) -> tuple[HierarchyKind, str | None]:
    kind = memory_kind(snapshot, domain)
    return kind, task.memcg_v1 if kind is HierarchyKind.V1 else task.cgroup_v2


def oom_group_target(snapshot: Snapshot, domain: Domain, task: Task) -> Cgroup | None:
    """``mem_cgroup_get_oom_group()``: the highest cgroup between the task's
    and the OOM domain's (inclusive) with ``memory.oom.group`` set, or None."""
    kind, path = _cgroup_path(task, domain, snapshot)
    if path is None:
        return None
    stop = domain.cgroup.path if domain.cgroup is not None else "/"
    chosen: Cgroup | None = None
    current = path
    for _ in range(MAX_TREE_DEPTH):
        cg = snapshot.cgroup(kind, current)
        if cg is not None and cg.oom_group:
            chosen = cg
        if current in (stop, "/"):
            break
        current = current.rsplit("/", 1)[0] or "/"
    return chosen


def decide(
    snapshot: Snapshot,
    domain: Domain,
    policy: Policy,
    *,
    history: History | None = None,
    event: Event | None = None,
    guard: Guard = no_guard,
    budget_s: float = DEFAULT_BUDGET_S,
    clock: Callable[[], float] = time.perf_counter,
) -> Decision:
    """Run ``policy`` over ``domain`` at ``snapshot``; never raises for what a
    policy does (that ends in the kernel's fallback)."""
    with _gc_paused():
        return _decide(snapshot, domain, policy, history, event, guard, budget_s, clock)


@contextmanager
def _gc_paused() -> Iterator[None]:
    """No cyclic garbage collection during a decision: it allocates one small
    object per task and makes no cycles, and a collection pass would walk the
    whole snapshot again and again (a third of the time at 10,000 tasks)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _decide(  # noqa: PLR0917 (the public decide() takes these by keyword)
    snapshot: Snapshot,
    domain: Domain,
    policy: Policy,
    history: History | None,
    event: Event | None,
    guard: Guard,
    budget_s: float,
    clock: Callable[[], float],
) -> Decision:
    trigger = event.trigger if event is not None else "explain"
    if policy.kernel:
        base = kernel_decision(snapshot, domain)
        return _with_actions(replace(base, trigger=trigger), snapshot, domain, "process")
    event = event or Event(trigger=trigger, domain=domain.name)
    budget_s = min(max(budget_s, MIN_BUDGET_S), MAX_BUDGET_S)
    run = _Run(snapshot, domain, policy, history)
    started = clock()
    failure: str | None = None
    decision: Decision | None = None
    try:
        with guard(budget_s):
            decision = run.decide(event)
    except PolicyOverrun:
        failure = f"overran its budget of {budget_s * 1000:.0f} ms and was stopped"
    except PolicyFailure as e:
        failure = _safe_text(e)
    except BaseException as e:
        # its own BaseException subclasses, even KeyboardInterrupt; a real Ctrl-C
        # during a decision of at most a few dozen ms is then the only loss)
        failure = f"raised {type(e).__name__}: {_safe_text(e)}"
    spent = clock() - started
    if failure is None and spent > budget_s:
        failure = f"took {spent * 1000:.1f} ms, over its budget of {budget_s * 1000:.0f} ms"
    if failure is not None or decision is None:
        base = kernel_decision(snapshot, domain)
        return _with_actions(
            replace(base, policy=policy.name, trigger=trigger, policy_seconds=spent,
                    fallback=f"policy {policy.name} {failure}; the kernel policy decided"),
            snapshot, domain, "process",
        )
    return replace(decision, policy_seconds=spent, trigger=trigger)


def _safe_repr(value: object) -> str:
    """A policy's value, shown safely (its ``__repr__`` may raise or be huge)."""
    try:
        text = repr(value)
    except BaseException:
        return f"(a {type(value).__name__} that cannot be shown)"
    return text if len(text) <= 80 else text[:80] + "..."


def _safe_text(e: BaseException) -> str:
    """An exception's message, whatever its ``__str__`` does (a policy's
    exception may raise there, or hold an int too long to print)."""
    try:
        text = str(e)
    except BaseException:
        return "(its message could not be printed)"
    return text if len(text) <= MAX_MESSAGE else text[:MAX_MESSAGE] + "..."


def _with_actions(
    decision: Decision, snapshot: Snapshot, domain: Domain, victim_kind: str
) -> Decision:
    """The victim's kill. ``memory.oom.group`` turns a process victim into its
    group, as the kernel does; a tree or a cgroup is killed without the members
    the kernel never kills or the policy protected (``spare_pids``); a cgroup
    victim must be a cgroup of the domain other than the root, else only the
    process is killed."""
    victim = decision.victim
    if victim is None or decision.actions or decision.aborted:
        return replace(decision, victim_kind=victim_kind)
    task = victim.task
    ignored = frozenset(c.task.pid for c in decision.candidates if c.verdict == "ignore")
    group = oom_group_target(snapshot, domain, task)
    notes = decision.notes
    action: Action
    if group is not None:
        action = KillCgroup(group.kind.value, group.path, group.inode,
                            f"memory.oom.group is set on {group.path}",
                            _spare(_members(snapshot, group), ignored, domain))
        victim_kind = "cgroup"
    elif victim_kind == "cgroup":
        kind, path = _cgroup_path(task, domain, snapshot)
        cg = snapshot.cgroup(kind, path) if path is not None else None
        if cg is None or not _inside(cg, domain):
            where = "unknown" if cg is None else f"{cg.name}, not a cgroup of {domain.name}"
            action = KillProcess(task.pid, task.start_ticks,
                                 f"its cgroup is {where}: only the process is killed")
            notes = (*notes, f"cgroup victim refused: {where}; pid {task.pid} alone is killed")
            victim_kind = "process"
        else:
            action = KillCgroup(cg.kind.value, cg.path, cg.inode, "the policy kills cgroups",
                                _spare(_members(snapshot, cg), ignored, domain))
    elif victim_kind == "tree":
        tree = _Tree(snapshot.tasks)
        spare = _spare((task, *tree.descendants(task)), ignored, domain)
        action = KillProcess(task.pid, task.start_ticks, "the chosen victim, with its tree",
                             tree=True, spare_pids=spare)
    else:
        action = KillProcess(task.pid, task.start_ticks, "the chosen victim")
    return replace(decision, actions=(action,), victim_kind=victim_kind, notes=notes)


def _inside(cg: Cgroup, domain: Domain) -> bool:
    """A cgroup of the domain other than the root (never kill "/")."""
    if cg.path == "/":
        return False
    d = domain.cgroup
    if d is None:
        return True
    return cg.kind is d.kind and (cg.path == d.path or cg.path.startswith(d.path + "/"))


def _members(snapshot: Snapshot, cg: Cgroup) -> tuple[Task, ...]:
    prefix = cg.path.rstrip("/") + "/"
    out = []
    for t in snapshot.tasks:
        path = t.memcg_v1 if cg.kind is HierarchyKind.V1 else t.cgroup_v2
        if path is not None and (path == cg.path or path.startswith(prefix)):
            out.append(t)
    return tuple(out)


def _spare(members: Sequence[Task], ignored: frozenset[int], domain: Domain) -> tuple[int, ...]:
    """Members not to kill: what the kernel never kills, or the policy ignored."""
    return tuple(sorted(
        t.pid for t in members
        if t.pid in ignored or badness_points(t, domain.totalpages) is None
    ))


class _Run:
    """One decision's state: the context and the per-task selection."""

    def __init__(
        self, snapshot: Snapshot, domain: Domain, policy: Policy, history: History | None
    ) -> None:
        self.snapshot = snapshot
        self.domain = domain
        self.policy = policy
        self.tasks = tuple(domain.tasks(snapshot))
        self.tree = _Tree(snapshot.tasks)
        self.history = history
        self._selection: Decision | None = None
        #: The kernel's points, computed once per task by the selection loop
        #: and handed to a policy that asks (``ctx.kernel_points``).
        self.kernel_cache: dict[int, int] = {}
        kind = memory_kind(snapshot, domain)
        self.kind = kind
        total = domain.totalpages
        self.ctx = Context(ContextImpl(
            snapshot=snapshot,
            domain_name=domain.name,
            totalpages=total,
            page_size=snapshot.system.page_size,
            tasks=self.tasks,
            kernel_points=_cached_points(self.kernel_cache, total),
            cgroup_path=_path_function(snapshot, domain),
            cgroup_of=self._cgroup_of,
            cgroup=lambda path: snapshot.cgroup(kind, path),
            pressure_of=self._pressure_of,
            parent=self.tree.parent,
            children=self.tree.kids,
            descendants=self.tree.descendants,
            growth=self._growth,
            tree_growth=self._tree_growth,
            window_seconds=None if history is None else history.window_seconds(snapshot),
            run_selection=self._select_from_handler,
        ))

    def _cgroup_of(self, task: Task) -> Cgroup | None:
        path = task.memcg_v1 if self.kind is HierarchyKind.V1 else task.cgroup_v2
        return None if path is None else self.snapshot.cgroup(self.kind, path)

    def _pressure_of(self, task: Task) -> tuple[Cgroup, Pressure] | None:
        cg = self._cgroup_of(task)
        if cg is not None and cg.pressure is not None:
            return cg, cg.pressure
        if task.cgroup_v2 is not None:
            v2 = self.snapshot.cgroup(HierarchyKind.V2, task.cgroup_v2)
            if v2 is not None and v2.pressure is not None:
                return v2, v2.pressure
        return None

    def _growth(self, task: Task) -> float | None:
        return None if self.history is None else self.history.growth(self.snapshot, task)

    def _tree_growth(self, task: Task) -> float | None:
        if self.history is None:
            return None
        return self.history.tree_growth(self.snapshot, task, self.tree.descendants(task))

    def _select_from_handler(self) -> Sequence[Candidate]:
        if self._selection is None:
            self._selection = self.select()
        return self._selection.selectable

    def decide(self, event: Event) -> Decision:
        policy = self.policy
        if policy.handle is not None:
            actions = policy.handle(event, self.ctx)
            checked = _check_actions(actions, policy.name, self.snapshot, self.domain)
            if checked:
                base = self._selection or Decision(self.domain, policy.name, (), None)
                notes = (*base.notes, f"handler of {policy.name} acted")
                if base.aborted:
                    notes = (*notes, "its per-task selection had aborted; the handler's "
                                     "actions stand")
                return replace(base, actions=tuple(self._grouped(a) for a in checked),
                               victim=None, victim_kind=policy.victim, aborted=False,
                               notes=notes)
        if policy.evaluate is None:
            base = kernel_decision(self.snapshot, self.domain)
            return _with_actions(
                replace(base, policy=policy.name,
                        notes=(*base.notes, f"handler of {policy.name} returned nothing: "
                                            "the kernel's badness ranked")),
                self.snapshot, self.domain, policy.victim)
        decision = self._selection or self.select()
        return _with_actions(decision, self.snapshot, self.domain, policy.victim)

    def _grouped(self, action: Action) -> Action:
        """A handler's process kill becomes its ``memory.oom.group``, as the
        kernel turns any OOM victim into its group."""
        if not isinstance(action, KillProcess):
            return action
        task = self.snapshot.task(action.pid)
        group = None if task is None else oom_group_target(self.snapshot, self.domain, task)
        if group is None:
            return action
        return KillCgroup(group.kind.value, group.path, group.inode,
                          f"{action.reason}; memory.oom.group is set on {group.path}",
                          _spare(_members(self.snapshot, group), frozenset(), self.domain))

    def select(self) -> Decision:
        """The per-task selection (``select_bad_process`` with the policy's say).

        Runs once per task of the domain on the OOM path: names are bound
        locally and reasons are left as the verdict gave them (the kernel's
        points are kept as a number and worded only when shown)."""
        policy = self.policy
        evaluate = policy.evaluate
        domain = self.domain
        total = domain.totalpages
        ctx = self.ctx
        kernel_cache = self.kernel_cache
        key = scan_order(self.snapshot, domain)
        ranked: list[tuple[int, ScanKey, Candidate]] = []
        others: list[Candidate] = []
        aborted_at: Task | None = None
        no_opinion = ("no opinion: the kernel's badness decides",)
        checked_reasons: tuple[str, ...] = ()
        ignored = ("ignored by the policy",)
        # The kernel's view of every task, fixed before any policy code runs:
        # a policy that reaches round a frozen task (object.__setattr__)
        # cannot make an unkillable task killable.
        tasks = self.tasks
        points_of = [badness_points(t, total) for t in tasks]
        keys = [key(t) for t in tasks]
        for i, task in enumerate(tasks):
            kernel_points = points_of[i]
            if kernel_points is None:
                why = unkillable_reason(task) or "unkillable"
                others.append(Candidate(task, "unkillable", None, (why,)))
                continue
            kernel_cache[task.pid] = kernel_points
            verdict = DEFAULT_VERDICT if evaluate is None else evaluate(task, ctx)
            if type(verdict) is not Verdict:
                raise PolicyFailure(
                    f"returned {_safe_repr(verdict)} for pid {task.pid}, not a verdict "
                    "(DEFAULT, IGNORE, ABORT or select(points))"
                )
            reasons = verdict.reasons
            if reasons is not checked_reasons:  # policies often reuse theirs
                if type(reasons) is not tuple or not all(type(r) is str for r in reasons):
                    raise PolicyFailure(f"returned reasons {_safe_repr(reasons)} for pid "
                                        f"{task.pid}: reasons must be a tuple of strings")
                checked_reasons = reasons
            kind = verdict.kind
            if kind == "select":
                points = verdict.points
                if type(points) is not int or not POINTS_MIN <= points <= POINTS_MAX:
                    raise PolicyFailure(f"returned select({_safe_repr(points)}) for pid "
                                        f"{task.pid}: points must be an int that fits "
                                        "64 bits")
                verdict_name: CandidateVerdict = "select"
            elif kind == "default":
                points = kernel_points
                reasons = reasons + no_opinion if reasons else no_opinion
                verdict_name = "default"
            elif kind == "ignore":
                others.append(Candidate(task, "ignore", None, reasons or ignored,
                                        None, kernel_points))
                continue
            elif kind == "abort":
                aborted_at = task
                break
            else:
                raise PolicyFailure(f"returned a verdict of kind {_safe_repr(kind)} for pid "
                                    f"{task.pid}: not DEFAULT, IGNORE, ABORT or select")
            ranked.append((points, keys[i],
                           Candidate(task, verdict_name, points, reasons, None, kernel_points)))
        if aborted_at is not None:
            return Decision(
                domain, policy.name, tuple(c for _, _, c in ranked) + tuple(others), None,
                aborted=True,
                notes=(f"policy {policy.name} aborted the search at pid {aborted_at.pid}: "
                       "nothing is killed this time",),
                victim_kind=policy.victim,
            )
        ranked.sort(key=_POINTS_THEN_ORDER, reverse=True)
        candidates = [r[2] for r in ranked]
        victim = None
        if candidates:
            top = candidates[0]
            victim = top._replace(notes=(*top.notes, f"most points under {policy.name}"))
            candidates[0] = victim
        others.sort(key=lambda c: c.task.pid)
        notes: tuple[str, ...] = ()
        if victim is None:
            notes = (f"policy {policy.name} selected no task: nothing is killed by "
                     "oomwarden (the kernel's own killer stays the safety net)",)
        return Decision(domain, policy.name, (*candidates, *others), victim, notes=notes,
                        victim_kind=policy.victim)


def _cached_points(cache: dict[int, int], total: int) -> Callable[[Task], int | None]:
    """``ctx.kernel_points``: the selection loop's value where it has one."""
    get = cache.get

    def kernel_points(task: Task) -> int | None:
        points = get(task.pid)
        return points if points is not None else badness_points(task, total)

    return kernel_points


def _check_actions(
    actions: object, name: str, snapshot: Snapshot, domain: Domain
) -> tuple[Action, ...]:
    if actions is None:
        return ()
    if type(actions) not in (list, tuple):
        raise PolicyFailure(f"handler returned {_safe_repr(actions)}, not a list of actions")
    if len(actions) > MAX_ACTIONS:  # type: ignore[arg-type]
        raise PolicyFailure(f"handler returned {len(actions)} actions, "  # type: ignore[arg-type]
                            f"more than {MAX_ACTIONS}")
    for a in actions:  # type: ignore[attr-defined]
        if type(a) not in ACTION_TYPES:
            raise PolicyFailure(f"handler returned {_safe_repr(a)} among its actions, not an "
                                "action (KillProcess, KillCgroup, DeleteFiles, RunHook)")
        _check_fields(a)
        _check_action(a, snapshot, domain)
    return tuple(actions)  # type: ignore[arg-type]


#: Field types an action must have exactly (a policy may build one with any
#: values; what reaches the log and the executor must be plain data).
_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "pid": (int,), "start_ticks": (int,), "inode": (int,), "tree": (bool,),
    "reason": (str,), "kind": (str,), "path": (str,), "timeout_s": (int, float),
    "spare_pids": (tuple,), "paths": (tuple,), "argv": (tuple,),
}


def _check_fields(a: Action) -> None:
    for f in fields(a):
        value = getattr(a, f.name)
        if type(value) not in _FIELD_TYPES[f.name]:
            raise PolicyFailure(f"handler returned {type(a).__name__} with {f.name}="
                                f"{_safe_repr(value)}: expected "
                                + " or ".join(t.__name__ for t in _FIELD_TYPES[f.name]))
        if type(value) is int and not POINTS_MIN <= value <= POINTS_MAX:
            raise PolicyFailure(f"handler returned {type(a).__name__} with {f.name} out of "
                                "range")
        if type(value) is tuple and not all(
            type(v) is (int if f.name == "spare_pids" else str) for v in value
        ):
            raise PolicyFailure(f"handler returned {type(a).__name__} with {f.name}="
                                f"{_safe_repr(value)} of the wrong types")
    if isinstance(a, RunHook) and not (
        math.isfinite(a.timeout_s) and 0 < a.timeout_s <= MAX_HOOK_TIMEOUT_S
    ):
        raise PolicyFailure(f"handler returned RunHook with timeout_s={a.timeout_s!r}: "
                            f"expected 0 < timeout_s <= {MAX_HOOK_TIMEOUT_S:g}")


def _check_action(a: Action, snapshot: Snapshot, domain: Domain) -> None:
    """What the engine guarantees for a selected victim holds for a handler's
    actions too: only a process or cgroup of this domain, as it was at snapshot
    time, and never what the kernel never kills."""
    if isinstance(a, KillProcess):
        t = snapshot.task(a.pid) if isinstance(a.pid, int) else None
        if t is None or t.start_ticks != a.start_ticks or not domain.contains(t):
            raise PolicyFailure(f"handler asked to kill pid {a.pid!r:.20} (start "
                                f"{a.start_ticks!r:.20}), which is not a process of "
                                f"{domain.name} in this snapshot")
        if badness_points(t, domain.totalpages) is None:
            raise PolicyFailure(f"handler asked to kill pid {t.pid} ({t.comm}), which the "
                                f"kernel never kills ({unkillable_reason(t) or 'unkillable'})")
    elif isinstance(a, KillCgroup):
        kinds = {k.value: k for k in HierarchyKind}
        cg = (snapshot.cgroup(kinds[a.kind], a.path)
              if a.kind in kinds and isinstance(a.path, str) else None)
        inside = cg is not None and cg.path != "/" and (
            domain.cgroup is None or (cg.kind is domain.cgroup.kind and (
                cg.path == domain.cgroup.path or cg.path.startswith(domain.cgroup.path + "/")
            ))
        )
        if cg is None or cg.inode != a.inode or not inside:
            raise PolicyFailure(f"handler asked to kill cgroup {a.kind!r:.10}:{a.path!r:.80} "
                                f"(inode {a.inode!r:.20}), which is not a cgroup of "
                                f"{domain.name} in this snapshot")
    elif isinstance(a, RunHook):
        if not a.argv or not all(isinstance(x, str) and x for x in a.argv):
            raise PolicyFailure(f"handler returned RunHook with argv {a.argv!r:.80}: an "
                                "empty argv or one that is not strings")
    elif not a.paths or not all(isinstance(p, str) and p.startswith("/") for p in a.paths):
        raise PolicyFailure(f"handler returned DeleteFiles with paths {a.paths!r:.80}: "
                            "paths must be absolute strings")
