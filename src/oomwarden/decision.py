"""Domains and decisions: what ``explain`` prints and the decision log stores.

A :class:`Decision` is the one object shared by ``oomwarden explain`` and the
daemon's decision log: the domain, its size, the policy, the ranked candidates
with the reasons for each score, the victim, and ``fallback`` (null, or why
the kernel policy decided instead of the configured one).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Literal, NamedTuple

from oomwarden.model import Cgroup, HierarchyKind, Snapshot, Task
from oomwarden.policy.api import Action, DeleteFiles, KillCgroup, KillProcess, RunHook
from oomwarden.policy.kernel import badness as kernel_badness
from oomwarden.policy.kernel import oom_score as kernel_oom_score
from oomwarden.units import fmt_bytes

#: ``select`` (the policy's points), ``default`` (the policy had no opinion:
#: the kernel's points), ``ignore`` (the policy said never), ``unkillable``
#: (the kernel never would).
Verdict = Literal["select", "default", "ignore", "unkillable"]


@dataclass(frozen=True, slots=True)
class Domain:
    """Where memory runs out: the whole system, or one memory cgroup subtree."""

    kind: Literal["system", "cgroup"]
    totalpages: int
    cgroup: Cgroup | None = None

    @property
    def name(self) -> str:
        if self.cgroup is None:
            return "system"
        return f"cgroup:{self.cgroup.path}"

    def contains(self, task: Task) -> bool:
        cg = self.cgroup
        if cg is None:
            return True
        path = task.memcg_v1 if cg.kind is HierarchyKind.V1 else task.cgroup_v2
        if path is None:
            return False
        return cg.path in (path, "/") or path.startswith(cg.path + "/")

    def tasks(self, snapshot: Snapshot) -> list[Task]:
        return [t for t in snapshot.tasks if self.contains(t)]


class Candidate(NamedTuple):
    """One task as a policy saw it.

    Immutable, and a named tuple rather than a dataclass: one is built per
    task on the OOM path, where a frozen dataclass costs three times as much.
    Reasons are formatted only when asked for (``reasons``): ranking thousands
    of tasks must not build thousands of strings.
    """

    task: Task
    verdict: Verdict
    points: int | None
    #: Reasons given as text (unkillable, ties, policy notes).
    notes: tuple[str, ...] = ()
    #: Set when ``points`` are the kernel's badness in a domain of this many
    #: pages: the kernel-scale score and the badness terms derive from it.
    totalpages: int | None = None
    #: For another policy: what the kernel's badness would have been.
    kernel_points: int | None = None

    @property
    def oom_score(self) -> int | None:
        """Kernel-scale score ``(1000 + points*1000/totalpages)*2/3``."""
        if self.totalpages is None:
            return None
        return kernel_oom_score(self.points, self.totalpages)

    @property
    def reasons(self) -> tuple[str, ...]:
        if self.totalpages is None or self.points is None:
            if self.kernel_points is not None:
                return (*self.notes, f"the kernel's points: {self.kernel_points}")
            return self.notes
        b = kernel_badness(self.task, self.totalpages)
        if b is None:
            return self.notes
        psize = self.task.page_size
        total = self.totalpages
        out = [
            f"rss {fmt_bytes(b.rss * psize)} + swap {fmt_bytes(b.swap * psize)} + "
            f"page tables {fmt_bytes(b.pgtables * psize)} = {b.rss + b.swap + b.pgtables} pages"
        ]
        if b.adj:
            out.append(f"oom_score_adj {b.adj:+d} x {total // 1000} pages = {b.adj_pages:+d} pages")
        out.append(f"{b.points} points of {total} ({100.0 * b.points / total:.1f}% of the domain)")
        return (*out, *self.notes)

    def cgroup_path(self, kind: HierarchyKind | None = None) -> str | None:
        """The task's cgroup on ``kind``'s hierarchy; with no kind, its memory
        cgroup where it has a v1 one, else its v2 cgroup."""
        if kind is HierarchyKind.V1:
            return self.task.memcg_v1
        if kind is HierarchyKind.V2:
            return self.task.cgroup_v2
        return self.task.memcg_v1 if self.task.memcg_v1 is not None else self.task.cgroup_v2

    def to_json(self, kind: HierarchyKind | None = None) -> dict[str, Any]:
        """``cgroup`` is the task's path on ``kind``'s hierarchy (the domain's).
        ``oom_score`` is on the kernel's scale for this candidate's domain: for a
        memory cgroup it uses the cgroup's size, while ``kernel_oom_score`` (read
        from /proc) is always the system one."""
        t = self.task
        out: dict[str, Any] = {
            "pid": t.pid,
            "start_ticks": t.start_ticks,
            "comm": t.comm,
            "state": t.state,
            "uid": t.uid,
            "cgroup": self.cgroup_path(kind),
            "memcg_v1": t.memcg_v1,
            "cgroup_v2": t.cgroup_v2,
            "rss_bytes": t.rss_bytes,
            "rss_anon_bytes": None if t.rss_anon is None else t.rss_anon * t.page_size,
            "rss_file_bytes": None if t.rss_file is None else t.rss_file * t.page_size,
            "rss_shmem_bytes": None if t.rss_shmem is None else t.rss_shmem * t.page_size,
            "swap_bytes": t.swap_bytes,
            "pgtables_bytes": None if t.pgtables is None else t.pgtables * t.page_size,
            "oom_score_adj": t.oom_score_adj,
            "points": self.points,
            "verdict": self.verdict,
            "reasons": list(self.reasons),
        }
        if self.oom_score is not None:
            out["oom_score"] = self.oom_score
        if self.totalpages is None:
            out["kernel_points"] = self.kernel_points
        if t.kernel_oom_score is not None:
            out["kernel_oom_score"] = t.kernel_oom_score
        if t.exe is not None:
            out["exe"] = t.exe
        if t.cmdline is not None:
            out["cmdline"] = list(t.cmdline)
        return out


@dataclass(frozen=True, slots=True)
class Decision:
    """A ranked choice for one domain at one snapshot."""

    domain: Domain
    policy: str
    #: Killable candidates first, best first; then ignored and unkillable tasks.
    candidates: tuple[Candidate, ...]
    victim: Candidate | None
    fallback: str | None = None
    notes: tuple[str, ...] = ()
    #: What started the decision ("explain", "oom", "pressure", ...).
    trigger: str = "explain"
    #: What to do: the victim's kill, or a handler's actions.
    actions: tuple[Action, ...] = ()
    #: The policy stopped the search (ABORT): kill nothing this time.
    aborted: bool = False
    #: Seconds spent in the policy's own code (None for the kernel fast path).
    policy_seconds: float | None = None
    #: What a selected task stands for: the process, its tree, or its cgroup.
    victim_kind: str = "process"

    @property
    def selectable(self) -> tuple[Candidate, ...]:
        return tuple(c for c in self.candidates if c.verdict in ("select", "default"))

    def to_json(self, top: int | None = 10, all_tasks: bool = False) -> dict[str, Any]:
        shown = self.candidates if all_tasks else self.selectable[: top if top else None]
        cg = self.domain.cgroup
        kind = None if cg is None else cg.kind
        return {
            "domain": self.domain.name,
            "hierarchy": None if cg is None else cg.kind.value,
            "totalpages": self.domain.totalpages,
            "policy": self.policy,
            "victim": None if self.victim is None else self.victim.to_json(kind),
            "candidates": [c.to_json(kind) for c in shown],
            "considered": len(self.candidates),
            "selectable": len(self.selectable),
            "fallback": self.fallback,
            "notes": list(self.notes),
            "trigger": self.trigger,
            "victim_kind": self.victim_kind,
            "actions": [action_to_json(a) for a in self.actions],
            "aborted": self.aborted,
            "policy_ms": None if self.policy_seconds is None else self.policy_seconds * 1000,
        }


def action_to_json(action: Action) -> dict[str, Any]:
    """``{"action": "kill_process", ...fields}``."""
    names = {KillProcess: "kill_process", KillCgroup: "kill_cgroup",
             DeleteFiles: "delete_files", RunHook: "run_hook"}
    out: dict[str, Any] = {"action": names[type(action)]}
    for f in fields(action):
        value = getattr(action, f.name)
        out[f.name] = list(value) if isinstance(value, tuple) else value
    return out
