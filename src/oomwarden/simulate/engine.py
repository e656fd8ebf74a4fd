"""The simulator: memory in one domain, step by step, with the kernel's OOM
killer and the warden deciding through the same core the daemon runs.

Every step:

1. processes whose start step has come are spawned (fork storms add their
   children);
2. each process's memory follows its profile (a seeded jitter per process,
   the same for every policy); tmpfs writers grow their tmpfs;
3. beyond the limit, anonymous memory goes to swap (spread over processes in
   proportion to their size; tmpfs stays resident); when RAM and swap are both
   full the **kernel** fires: a real :class:`~oomwarden.model.Snapshot` is
   built and :func:`~oomwarden.policy.decide.decide` runs the ``kernel``
   policy (the exact ``oom_badness`` replica), its victim is killed, again
   until the demand fits;
4. the pressure model is updated (an EMA of a stall share that rises as RAM
   fills, per domain and per cgroup: a model, not the kernel's PSI);
5. the **warden**'s triggers are evaluated (``threshold`` with earlyoom's
   levels, ``margin`` of the limit, ``pressure``); a trigger that has held for
   ``latency_steps`` steps, outside the cooldown, makes the warden take a
   snapshot (with a history snapshot ``history_steps`` earlier for policies
   that need one), call ``decide()`` with the chosen policy and carry out its
   actions: kill a process, a tree, a cgroup, or delete tmpfs files.

A killed process frees all its memory; a tmpfs keeps its pages until its
files are deleted. Everything is integer bytes rounded to pages, and the
domain's usage is kept by its own running sum so that tests can check it
against the processes and tmpfs at every step. The policy clock is a
constant: a decision never falls back for time, so runs are deterministic.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from oomwarden.decision import Decision
from oomwarden.model import (
    Cgroup,
    Hierarchy,
    HierarchyKind,
    PsiLine,
    Snapshot,
    SystemMemory,
    Task,
    page_counter_max_bytes,
)
from oomwarden.model import Pressure as PsiPressure
from oomwarden.policy.api import DeleteFiles, Event, KillCgroup, KillProcess, Policy
from oomwarden.policy.decide import decide
from oomwarden.policy.engine import system_domain
from oomwarden.policy.history import History
from oomwarden.policy.registry import KERNEL
from oomwarden.simulate.scenario import PAGE, ProcessSpec, Scenario

V2 = HierarchyKind.V2
UNLIMITED = page_counter_max_bytes(PAGE)
HIER = (Hierarchy(V2, "/sim", "/", ("memory",), True),)
FIRST_PID = 1000
#: Clock ticks per second (USER_HZ) for start times.
TICKS = 100
#: A decision's budget in the simulator (the clock is constant: never hit).
SIM_BUDGET_S = 60.0
#: Kernel kills per step at most (a domain whose demand cannot fit stops there).
MAX_KERNEL_KILLS_PER_STEP = 1000


def _pages(n: int) -> int:
    return -(-n // PAGE)


@dataclass(slots=True)
class _Proc:
    pid: int
    ppid: int
    comm: str
    exe: str
    cgroup: str
    importance: float
    adj: int
    start: int
    ticks: int
    spec: ProcessSpec | None  # None: a fork storm's child (steady)
    size: int
    rng: random.Random | None
    alive: bool = True
    mem: int = 0
    children: int = 0
    tmpfs: str | None = None


@dataclass(frozen=True, slots=True)
class Kill:
    """One process (or tmpfs) lost: when, by whom, why."""

    step: int
    by: str  # "warden" or "kernel"
    pid: int | None
    comm: str
    importance: float
    freed_bytes: int
    what: str = "process"  # process | tmpfs

    def to_json(self) -> dict[str, Any]:
        return {"step": self.step, "by": self.by, "what": self.what, "pid": self.pid,
                "comm": self.comm, "importance": self.importance,
                "freed_bytes": self.freed_bytes}


@dataclass(slots=True)
class Result:
    """One policy's run over one scenario."""

    policy: str
    steps: int
    kills: list[Kill] = field(default_factory=list)
    steps_at_limit: int = 0
    kernel_ooms: int = 0
    warden_decisions: int = 0
    fallbacks: int = 0
    recovered: bool = False
    final_usage: int = 0
    peak_usage: int = 0
    #: Wall time of the run (not in the JSON: it is not deterministic).
    seconds: float = 0.0
    # per step, for tests and the plot
    usage: list[int] = field(default_factory=list)
    accounted: list[int] = field(default_factory=list)
    series: dict[int, list[int]] = field(default_factory=dict)
    names: dict[int, str] = field(default_factory=dict)
    tmpfs_series: dict[str, list[int]] = field(default_factory=dict)
    #: Kernel decisions with their snapshots (``keep_snapshots``).
    kernel_snapshots: list[tuple[Snapshot, Decision]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def importance_lost(self) -> float:
        return round(math.fsum(k.importance for k in self.kills), 6)

    @property
    def process_kills(self) -> list[Kill]:
        """The processes lost (not the tmpfs emptied)."""
        return [k for k in self.kills if k.what == "process"]

    def to_json(self) -> dict[str, Any]:
        procs = self.process_kills
        return {
            "policy": self.policy,
            "kills": len(procs),
            "warden_kills": sum(1 for k in procs if k.by == "warden"),
            "kernel_kills": sum(1 for k in self.kills if k.by == "kernel"),
            "tmpfs_deleted": sum(1 for k in self.kills if k.what == "tmpfs"),
            "importance_lost": self.importance_lost,
            "steps_at_limit": self.steps_at_limit,
            "kernel_ooms": self.kernel_ooms,
            "warden_decisions": self.warden_decisions,
            "fallbacks": self.fallbacks,
            "recovered": self.recovered,
            "final_usage_bytes": self.final_usage,
            "peak_usage_bytes": self.peak_usage,
            "victims": [k.to_json() for k in self.kills],
            "notes": self.notes,
        }


class Simulation:
    """One run of one policy over a scenario (use :func:`simulate`)."""

    def __init__(self, scenario: Scenario, policy: Policy, *, seed: int | None = None,
                 steps: int | None = None, keep_snapshots: bool = False) -> None:
        self.sc = scenario
        self.policy = policy
        self.seed = scenario.seed if seed is None else seed
        self.steps = scenario.steps if steps is None else steps
        self.keep = keep_snapshots
        self.procs: list[_Proc] = []
        self.by_name: dict[str, _Proc] = {}
        self.tmpfs: dict[str, int] = {t.path: _pages(t.size) * PAGE for t in scenario.tmpfs}
        self.tmpfs_importance = {t.path: t.importance for t in scenario.tmpfs}
        #: The cgroup a tmpfs's pages are charged to: that of its first writer
        #: in the scenario (the kernel charges shmem pages to the cgroup that
        #: wrote them, and they stay charged after the writer exits), else
        #: the domain's root.
        self.tmpfs_owner = {t.path: "/" for t in scenario.tmpfs}
        for spec in scenario.processes:
            if spec.tmpfs is not None and self.tmpfs_owner.get(spec.tmpfs, "/") == "/":
                self.tmpfs_owner[spec.tmpfs] = spec.cgroup
        self.usage = sum(self.tmpfs.values())
        self.next_pid = FIRST_PID
        self.cgroup_paths = self._cgroup_order(scenario.cgroups)
        self.psi_some = 0.0
        self.psi_full = 0.0
        self.cg_psi: dict[str, float] = dict.fromkeys(self.cgroup_paths, 0.0)
        self.alpha = 1 - math.exp(-scenario.step_seconds / 10.0)
        #: Per step: (pid, mem, comm) of the living, and the swap in use.
        self.past: list[tuple[tuple[tuple[int, int, str], ...], int]] = []
        self.held = 0
        self.cooldown_until = 0
        self.kernel_held = 0
        self.result = Result(policy.name, self.steps)

    @staticmethod
    def _cgroup_order(declared: tuple[str, ...]) -> list[str]:
        paths = {"/"}
        for p in declared:
            parts = p.strip("/").split("/")
            for i in range(1, len(parts) + 1):
                paths.add("/" + "/".join(parts[:i]))
        return sorted(paths, key=lambda p: [] if p == "/" else p.strip("/").split("/"))

    # -- processes ------------------------------------------------------------------------

    def _spawn(self, step: int, spec: ProcessSpec | None, parent: _Proc | None) -> _Proc:
        pid = self.next_pid
        self.next_pid += 1
        ticks = int(step * self.sc.step_seconds * TICKS)
        if spec is not None:
            ppid = self.by_name[spec.parent].pid if spec.parent in self.by_name else 1
            p = _Proc(pid, ppid, spec.name, spec.exe, spec.cgroup, spec.importance,
                      spec.oom_score_adj, step, ticks, spec, spec.size,
                      random.Random(f"{self.seed}:{spec.name}") if spec.jitter else None,
                      tmpfs=spec.tmpfs)
            self.by_name[spec.name] = p
        else:
            assert parent is not None and parent.spec is not None
            ps = parent.spec
            p = _Proc(pid, parent.pid, parent.comm, parent.exe, parent.cgroup,
                      ps.child_importance, parent.adj, step, ticks, None, ps.child_size, None)
        self.procs.append(p)
        self.result.names[pid] = p.comm
        return p

    def _target(self, p: _Proc, step: int) -> int:
        """The memory the process wants at this step, in bytes (page-rounded)."""
        s = p.spec
        age = step - p.start
        if s is None:
            want = p.size
        elif s.profile == "leak":
            want = s.size + s.rate * age
        elif s.profile == "spike":
            on = s.spike_at <= age < s.spike_at + s.spike_steps
            want = s.size + (s.spike_size if on else 0)
        elif s.profile == "sawtooth":
            want = s.size + (s.peak - s.size) * (age % s.period) // s.period
        else:
            want = s.size
        if p.rng is not None and s is not None:
            want = int(want * (1 + s.jitter * (2 * p.rng.random() - 1)))
        return _pages(max(0, want)) * PAGE

    def _evolve(self, step: int) -> dict[str, int]:
        """Spawn, grow and shrink; the growth per cgroup this step."""
        for spec in self.sc.processes:
            if spec.start == step:
                self._spawn(step, spec, None)
        grown: dict[str, int] = {}
        for p in list(self.procs):
            if not p.alive:
                continue
            s = p.spec
            new = self._target(p, step)
            delta = new - p.mem
            p.mem = new
            if s is not None and s.rename_at is not None and step - p.start == s.rename_at:
                p.comm = s.rename_to or p.comm
            if s is not None and s.profile == "tmpfs" and p.tmpfs is not None and step > p.start:
                write = _pages(s.rate) * PAGE
                self.tmpfs[p.tmpfs] += write
                delta += write
            if s is not None and s.profile == "fork_storm":
                for _ in range(min(s.children_per_step, s.max_children - p.children)):
                    child = self._spawn(step, None, p)
                    child.mem = _pages(child.size) * PAGE
                    p.children += 1
                    delta += child.mem
            self.usage += delta
            if delta > 0:
                grown[p.cgroup] = grown.get(p.cgroup, 0) + delta
        return grown

    # -- memory state -----------------------------------------------------------------------

    def _state(self) -> tuple[int, int, int]:
        """(demand, RAM used, swap used) now."""
        proc_mem = sum(p.mem for p in self.procs if p.alive)
        demand = proc_mem + sum(self.tmpfs.values())
        swap_used = min(max(0, demand - self.sc.limit), self.sc.swap, proc_mem)
        return demand, demand - swap_used, swap_used

    def _over(self) -> bool:
        _, ram, _ = self._state()
        return ram > self.sc.limit

    # -- snapshots ------------------------------------------------------------------------------

    def _tasks(self, living: list[tuple[_Proc, int, str]], swap_used: int) -> tuple[Task, ...]:
        total = sum(m for _, m, _ in living)
        swap_pages = swap_used // PAGE
        shares: list[int] = []
        if total > 0 and swap_pages:
            shares = [swap_pages * m // total for _, m, _ in living]
            # the pages rounded away go to the largest, in pid order on ties
            rest = swap_pages - sum(shares)
            order = sorted(range(len(living)), key=lambda i: (-living[i][1], living[i][0].pid))
            for i in order[:rest]:
                shares[i] += 1
        tasks = []
        for i, (p, mem, comm) in enumerate(living):
            pages = mem // PAGE
            swap = shares[i] if shares else 0
            swap = min(swap, pages)
            tasks.append(Task(
                pid=p.pid, tgid=p.pid, ppid=p.ppid, comm=comm, state="S", start_ticks=p.ticks,
                uid=0, kthread=False, has_mm=True, rss_anon=pages - swap, rss_file=0,
                rss_shmem=0, swap=swap, pgtables=pages // 512, oom_score_adj=p.adj,
                cgroup_v2=p.cgroup, exe=p.exe, cmdline=(p.exe,), page_size=PAGE))
        return tuple(tasks)

    def _snapshot(self, step: int, living: list[tuple[_Proc, int, str]], swap_used: int,
                  tmpfs: dict[str, int]) -> Snapshot:
        tasks = self._tasks(living, swap_used)
        tmpfs_total = sum(tmpfs.values())
        sc = self.sc
        proc_mem = sum(m for _, m, _ in living)
        ram = proc_mem + tmpfs_total - swap_used
        system = SystemMemory(
            mem_total=sc.limit, mem_available=max(0, sc.limit - ram), swap_total=sc.swap,
            swap_free=sc.swap - swap_used, pressure=_psi(self.psi_some, self.psi_full),
            page_size=PAGE, swappiness=60)
        members: dict[str, list[Task]] = {}
        for t in tasks:
            members.setdefault(t.cgroup_v2 or "/", []).append(t)
        cgroups = []
        for i, path in enumerate(self.cgroup_paths):
            inside = [t for cg, ts in members.items() if _under(cg, path) for t in ts]
            charged = sum(size for fs, size in tmpfs.items()
                          if _under(self.tmpfs_owner.get(fs, "/"), path))
            psi = self.cg_psi.get(path, 0.0)
            cgroups.append(Cgroup(
                kind=V2, path=path, fs_path="/sim" + (path if path != "/" else ""),
                inode=1000 + i, memory_controller=True, verified=True,
                usage=sum((t.rss or 0) for t in inside) * PAGE + charged,
                limit=UNLIMITED, swap_current=sum(t.swap or 0 for t in inside) * PAGE,
                swap_max=UNLIMITED, oom_group=False, has_kill=True,
                pressure=_psi(psi, psi * 0.5),
                pids=tuple(t.pid for t in members.get(path, ()))))
        return Snapshot(taken_ns=int(step * sc.step_seconds * 1e9), system=system, tasks=tasks,
                        hierarchies=HIER, cgroups=tuple(cgroups))

    def _now(self, step: int) -> Snapshot:
        living = [(p, p.mem, p.comm) for p in self.procs if p.alive]
        _, _, swap = self._state()
        return self._snapshot(step, living, swap, dict(self.tmpfs))

    def _then(self, step: int) -> Snapshot | None:
        back = step - self.sc.warden.history_steps
        if back < 0 or back >= len(self.past):
            back = 0
        if not self.past or back >= step:
            return None
        rows, swap = self.past[back]
        by_pid = {p.pid: p for p in self.procs}
        living = [(by_pid[pid], mem, comm) for pid, mem, comm in rows]
        tmpfs_then = {fs: s[back] for fs, s in self.result.tmpfs_series.items()}
        return self._snapshot(back, living, swap, tmpfs_then)

    # -- acting ----------------------------------------------------------------------------------

    def _kill(self, p: _Proc, step: int, by: str) -> None:
        if not p.alive:
            return
        p.alive = False
        self.usage -= p.mem
        self.result.kills.append(Kill(step, by, p.pid, p.comm, p.importance, p.mem))
        p.mem = 0

    def _apply(self, decision: Decision, step: int, by: str) -> int:
        """Carry the decision's actions out; the number of things removed."""
        done = 0
        by_pid = {p.pid: p for p in self.procs if p.alive}
        for action in decision.actions:
            if isinstance(action, KillProcess):
                p = by_pid.get(action.pid)
                if p is None or p.ticks != action.start_ticks:
                    continue
                doomed = [p]
                if action.tree:
                    level = [p.pid]
                    while level:
                        kids = [q for q in by_pid.values() if q.ppid in level and q not in doomed]
                        doomed.extend(kids)
                        level = [q.pid for q in kids]
                for q in doomed:
                    if q.pid not in action.spare_pids:
                        self._kill(q, step, by)
                        done += 1
            elif isinstance(action, KillCgroup):
                for q in by_pid.values():
                    inside = q.cgroup == action.path or q.cgroup.startswith(action.path + "/")
                    if inside and q.pid not in action.spare_pids:
                        self._kill(q, step, by)
                        done += 1
            elif isinstance(action, DeleteFiles):
                for fs, size in self.tmpfs.items():
                    if size and any(path == fs or path.startswith(fs + "/")
                                    for path in action.paths):
                        self.tmpfs[fs] = 0
                        self.usage -= size
                        self.result.kills.append(Kill(step, by, None, fs,
                                                      self.tmpfs_importance.get(fs, 0.0),
                                                      size, what="tmpfs"))
                        done += 1
            else:
                self.result.notes.append(f"step {step}: {type(action).__name__} is not "
                                         "simulated")
        return done

    def _kernel(self, step: int) -> None:
        fired = False
        for _ in range(MAX_KERNEL_KILLS_PER_STEP):
            if not self._over():
                break
            fired = True
            snap = self._now(step)
            decision = decide(snap, system_domain(snap), KERNEL,
                              event=Event("oom", "system"), clock=_zero)
            if self.keep:
                self.result.kernel_snapshots.append((snap, decision))
            if not self._apply(decision, step, "kernel"):
                self.result.notes.append(f"step {step}: the kernel found nothing to kill")
                break
        if fired:
            self.result.kernel_ooms += 1

    def _pressure(self, grown: dict[str, int]) -> None:
        _, ram, _ = self._state()
        start = self.sc.warden.pressure_start
        fill = min(1.0, ram / self.sc.limit)
        stall = max(0.0, (fill - start) / (1 - start)) * 100
        full = max(0.0, stall - 20) * 1.25
        a = self.alpha
        self.psi_some += a * (stall - self.psi_some)
        self.psi_full += a * (full - self.psi_full)
        total_growth = sum(grown.values())
        for path in self.cg_psi:
            share = 0.0
            if total_growth:
                share = sum(g for cg, g in grown.items() if _under(cg, path)) / total_growth
            here = stall * (0.25 + 0.75 * share)
            self.cg_psi[path] += a * (here - self.cg_psi[path])

    def _triggered(self) -> str | None:
        w = self.sc.warden
        sc = self.sc
        _, ram, swap_used = self._state()
        for trigger in w.triggers:
            if trigger == "threshold":
                mem_pct = (sc.limit - ram) * 100 / sc.limit
                swap_pct = (sc.swap - swap_used) * 100 / sc.swap if sc.swap else None
                if w.threshold.level(mem_pct, swap_pct) is not None:
                    return trigger
            elif trigger == "margin":
                if ram >= sc.limit * (1 - w.margin_percent / 100):
                    return trigger
            else:
                p = w.pressure
                if ((p.some_avg10 is not None and self.psi_some >= p.some_avg10)
                        or (p.full_avg10 is not None and self.psi_full >= p.full_avg10)):
                    return trigger
        return None

    def _warden(self, step: int) -> None:
        trigger = self._triggered()
        self.held = self.held + 1 if trigger else 0
        if trigger is None or self.held < self.sc.warden.latency_steps:
            return
        if step < self.cooldown_until:
            return
        snap = self._now(step)
        history = None
        if self.policy.needs_history:
            then = self._then(step)
            history = History(then) if then is not None else None
        decision = decide(snap, system_domain(snap), self.policy, history=history,
                          event=Event(trigger, "system"), budget_s=SIM_BUDGET_S, clock=_zero)
        self.result.warden_decisions += 1
        if decision.fallback is not None:
            self.result.fallbacks += 1
            self.result.notes.append(f"step {step}: {decision.fallback}")
        if (not self._apply(decision, step, "warden") and decision.actions
                and self.policy.handle is not None and self.policy.evaluate is not None):
            # The handler's actions freed nothing: the per-task selection
            # runs, as in the daemon.
            decision = decide(snap, system_domain(snap), replace(self.policy, handle=None),
                              history=history, event=Event(trigger, "system"),
                              budget_s=SIM_BUDGET_S, clock=_zero)
            self._apply(decision, step, "warden")
        self.held = 0
        self.cooldown_until = step + self.sc.warden.cooldown_steps + 1

    # -- the run --------------------------------------------------------------------------

    def run(self, on_step: Callable[[], None] | None = None) -> Result:
        started = time.perf_counter()
        r = self.result
        for fs in self.tmpfs:
            r.tmpfs_series[fs] = []
        last_kernel = -1
        for step in range(self.steps):
            grown = self._evolve(step)
            # At the limit: RAM full (demand reached limit + swap) before the
            # kernel acted, the kernel fired, or RAM still full at the end.
            _, ram_before, _ = self._state()
            before = r.kernel_ooms
            self._kernel(step)
            fired = r.kernel_ooms > before
            if fired:
                last_kernel = step
            self._pressure(grown)
            self._warden(step)
            demand, ram, swap = self._state()
            if fired or ram_before >= self.sc.limit or ram >= self.sc.limit:
                r.steps_at_limit += 1
            r.usage.append(self.usage)
            r.accounted.append(demand)
            r.peak_usage = max(r.peak_usage, self.usage)
            rows = tuple((p.pid, p.mem, p.comm) for p in self.procs if p.alive)
            self.past.append((rows, swap))
            for p in self.procs:
                s = r.series.get(p.pid)
                if s is None:
                    s = r.series[p.pid] = [0] * step
                s.append(p.mem)
            for fs, size in self.tmpfs.items():
                r.tmpfs_series[fs].append(size)
            if on_step is not None:
                on_step()
        _, ram, _ = self._state()
        r.final_usage = self.usage
        r.recovered = (ram < self.sc.limit and self._triggered() is None
                       and (last_kernel < 0 or self.steps - 1 - last_kernel
                            >= self.sc.recovery_steps))
        r.seconds = time.perf_counter() - started
        return r


def _under(cgroup: str, path: str) -> bool:
    """Whether ``cgroup`` is ``path`` or below it."""
    return path in ("/", cgroup) or cgroup.startswith(path + "/")


def _psi(some: float, full: float) -> PsiPressure:
    return PsiPressure(PsiLine(round(some, 2), 0.0, 0.0, 0),
                       PsiLine(round(full, 2), 0.0, 0.0, 0))


def _zero() -> float:
    return 0.0


def simulate(scenario: Scenario, policy: Policy, *, seed: int | None = None,
             steps: int | None = None, keep_snapshots: bool = False,
             on_step: Callable[[], None] | None = None) -> Result:
    """Run ``policy`` over ``scenario``."""
    return Simulation(scenario, policy, seed=seed, steps=steps,
                      keep_snapshots=keep_snapshots).run(on_step)
