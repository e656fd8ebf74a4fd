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

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import replace

from oomwarden.decision import Candidate, Decision, Domain
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
    Verdict,
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
    trigger = event.trigger if event is not None else "explain"
    if policy.kernel:
        base = kernel_decision(snapshot, domain)
        return _with_actions(replace(base, trigger=trigger), snapshot, domain, "process")
    event = event or Event(trigger=trigger, domain=domain.name)
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
        failure = str(e)
    except Exception as e:  # the policy's own error, whatever it is
        failure = f"raised {type(e).__name__}: {e}"
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


def _with_actions(
    decision: Decision, snapshot: Snapshot, domain: Domain, victim_kind: str
) -> Decision:
    """The victim's kill, as the kernel does it: ``memory.oom.group`` turns a
    process victim into its group."""
    victim = decision.victim
    if victim is None or decision.actions or decision.aborted:
        return replace(decision, victim_kind=victim_kind)
    task = victim.task
    group = oom_group_target(snapshot, domain, task)
    action: Action
    if group is not None:
        action = KillCgroup(group.kind.value, group.path, group.inode,
                            f"memory.oom.group is set on {group.path}")
        victim_kind = "cgroup"
    elif victim_kind == "cgroup":
        kind, path = _cgroup_path(task, domain, snapshot)
        cg = snapshot.cgroup(kind, path) if path is not None else None
        if cg is None:
            action = KillProcess(task.pid, task.start_ticks, "its cgroup is unknown")
            victim_kind = "process"
        else:
            action = KillCgroup(cg.kind.value, cg.path, cg.inode, "the policy kills cgroups")
    else:
        action = KillProcess(task.pid, task.start_ticks, "the chosen victim",
                             tree=victim_kind == "tree")
    return replace(decision, actions=(action,), victim_kind=victim_kind)


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
        kind = memory_kind(snapshot, domain)
        self.kind = kind
        total = domain.totalpages
        self.ctx = Context(ContextImpl(
            snapshot=snapshot,
            domain_name=domain.name,
            totalpages=total,
            page_size=snapshot.system.page_size,
            tasks=self.tasks,
            kernel_points=lambda t: badness_points(t, total),
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
            checked = _check_actions(actions, policy.name)
            if checked:
                base = self._selection or Decision(self.domain, policy.name, (), None)
                return replace(base, actions=checked, victim=None,
                               victim_kind=policy.victim,
                               notes=(*base.notes, f"handler of {policy.name} acted"))
        if policy.evaluate is None:
            return _with_actions(kernel_decision(self.snapshot, self.domain), self.snapshot,
                                 self.domain, "process")
        decision = self._selection or self.select()
        return _with_actions(decision, self.snapshot, self.domain, policy.victim)

    def select(self) -> Decision:
        """The per-task selection (``select_bad_process`` with the policy's say)."""
        policy = self.policy
        evaluate = policy.evaluate
        domain = self.domain
        total = domain.totalpages
        key = scan_order(self.snapshot, domain)
        ranked: list[tuple[int, ScanKey, Candidate]] = []
        others: list[Candidate] = []
        aborted_at: Task | None = None
        for task in self.tasks:
            kernel_points = badness_points(task, total)
            if kernel_points is None:
                why = unkillable_reason(task) or "unkillable"
                others.append(Candidate(task, "unkillable", None, (why,)))
                continue
            verdict = Verdict("default") if evaluate is None else evaluate(task, self.ctx)
            if not isinstance(verdict, Verdict) or verdict.kind not in (
                "default", "ignore", "select", "abort"
            ):
                raise PolicyFailure(
                    f"returned {verdict!r:.80} for pid {task.pid}, not a verdict "
                    "(DEFAULT, IGNORE, ABORT or select(points))"
                )
            if verdict.kind == "abort":
                aborted_at = task
                break
            if verdict.kind == "ignore":
                others.append(Candidate(task, "ignore", None,
                                        verdict.reasons or ("ignored by the policy",),
                                        kernel_points=kernel_points))
                continue
            if verdict.kind == "default":
                points = kernel_points
                reasons = (*verdict.reasons, "no opinion: the kernel's badness decides")
            else:
                if isinstance(verdict.points, bool) or not isinstance(verdict.points, int):
                    raise PolicyFailure(f"returned select({verdict.points!r}) for pid "
                                        f"{task.pid}: points must be an int")
                points = verdict.points
                reasons = verdict.reasons
            ranked.append((points, key(task),
                           Candidate(task, "select", points,
                                     (*reasons, f"the kernel's points: {kernel_points}"),
                                     kernel_points=kernel_points)))
        if aborted_at is not None:
            return Decision(
                domain, policy.name, tuple(c for _, _, c in ranked) + tuple(others), None,
                aborted=True,
                notes=(f"policy {policy.name} aborted the search at pid {aborted_at.pid}: "
                       "nothing is killed this time",),
                victim_kind=policy.victim,
            )
        ranked.sort(key=lambda r: (r[0], r[1]), reverse=True)
        candidates = [r[2] for r in ranked]
        victim = None
        if candidates:
            top = candidates[0]
            victim = replace(top, notes=(*top.notes, f"most points under {policy.name}"))
            candidates[0] = victim
        others.sort(key=lambda c: c.task.pid)
        notes: tuple[str, ...] = ()
        if victim is None:
            notes = (f"policy {policy.name} selected no task: nothing is killed by "
                     "oomwarden (the kernel's own killer stays the safety net)",)
        return Decision(domain, policy.name, (*candidates, *others), victim, notes=notes,
                        victim_kind=policy.victim)


def _check_actions(actions: object, name: str) -> tuple[Action, ...]:
    if actions is None:
        return ()
    if isinstance(actions, (str, bytes)) or not isinstance(actions, (list, tuple)):
        raise PolicyFailure(f"handler returned {actions!r:.80}, not a list of actions")
    for a in actions:
        if not isinstance(a, ACTION_TYPES):
            raise PolicyFailure(f"handler returned {a!r:.80} among its actions, not an "
                                "action (KillProcess, KillCgroup, DeleteFiles, RunHook)")
    return tuple(actions)
