"""The policy API: what a policy returns, and the read-only context it gets.

Three shapes, as the LKML thread discussed them:

* a per-task ``evaluate(task, ctx) -> Verdict``: :data:`DEFAULT` (no opinion:
  the kernel's badness decides), :data:`IGNORE` (never this task),
  :func:`select` (a candidate with these points) or :data:`ABORT` (stop, kill
  nothing this time). The engine keeps the candidate with the most points,
  with the kernel's tie rule (the task met last wins);
* an event handler ``handle(event, ctx) -> list[Action]``: kill a process, a
  process tree or a cgroup, delete files on a tmpfs, run a hook. An empty list
  means "no opinion": the per-task selection runs;
* victim queues (in the daemon).

Everything a policy is given is immutable: tasks, cgroups and the snapshot are
frozen dataclasses, the context exposes methods and tuples only. A policy that
tries to change them raises, and the engine falls back to the kernel policy.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

from oomwarden.model import Cgroup, Pressure, Snapshot, Task

VictimKind = Literal["process", "tree", "cgroup"]
VICTIM_KINDS: tuple[VictimKind, ...] = ("process", "tree", "cgroup")


class Verdict(NamedTuple):
    """A per-task policy's answer. Use the constants and :func:`select`.

    Immutable; a named tuple because one is made per task on the OOM path."""

    kind: Literal["default", "ignore", "select", "abort"]
    points: int | None = None
    #: Why, in words: shown by ``explain`` and kept in the decision log.
    reasons: tuple[str, ...] = ()

    def because(self, *reasons: str) -> Verdict:
        """The same verdict with reasons attached."""
        return Verdict(self.kind, self.points, (*self.reasons, *reasons))


DEFAULT = Verdict("default")
IGNORE = Verdict("ignore")
ABORT = Verdict("abort")


def select(points: int, *reasons: str) -> Verdict:
    """A candidate with ``points`` (an int; more points are killed first)."""
    if type(points) is not int:
        raise TypeError(f"select() takes an int, not {type(points).__name__}")
    return Verdict("select", points, reasons)


# -- actions -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class KillProcess:
    """Kill one process, identified by (pid, start time) so that a recycled PID
    is never hit. ``tree=True`` kills it with all its descendants."""

    pid: int
    start_ticks: int
    reason: str = ""
    tree: bool = False
    #: Members of the tree not to kill (the kernel never would, or the policy
    #: protected them).
    spare_pids: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class KillCgroup:
    """Kill every process of a cgroup, identified by hierarchy, path and inode
    (a cgroup removed and made again under the same name is not hit)."""

    kind: str
    path: str
    inode: int
    reason: str = ""
    #: Members not to kill: as the kernel's ``memory.oom.group`` kill skips
    #: ``oom_score_adj`` -1000 tasks, and tasks the policy protected. With any,
    #: the executor kills the others one by one instead of ``cgroup.kill``.
    spare_pids: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class DeleteFiles:
    """Delete regular files (never following symlinks), only on a tmpfs: the
    executor refuses anything else, checked with statfs, not by path."""

    paths: tuple[str, ...]
    reason: str = ""


@dataclass(frozen=True, slots=True)
class RunHook:
    """Run a program (argv, no shell) with a timeout."""

    argv: tuple[str, ...]
    timeout_s: float = 10.0
    reason: str = ""


Action = KillProcess | KillCgroup | DeleteFiles | RunHook
ACTION_TYPES = (KillProcess, KillCgroup, DeleteFiles, RunHook)


@dataclass(frozen=True, slots=True)
class Event:
    """What started a decision: the trigger and the domain it concerns."""

    trigger: str
    domain: str
    detail: str = ""


# -- the context -----------------------------------------------------------------


class Context:
    """Read-only view a policy works with. Built by the engine per decision.

    The object refuses new or changed attributes, and everything it hands out
    is immutable. The three lookups a per-task policy calls most are plain
    attributes holding functions (no wrapper call on the OOM path):

    * ``ctx.kernel_points(task)``: the kernel's ``oom_badness()`` for this task
      in this domain, or None where the kernel would never pick it;
    * ``ctx.cgroup_path(task)``: the task's cgroup path on the domain's memory
      hierarchy (None where unknown);
    * ``ctx.cgroup_of(task)``: that cgroup, or None.
    """

    __slots__ = ("_impl", "cgroup_of", "cgroup_path", "kernel_points")
    _impl: ContextImpl
    kernel_points: Callable[[Task], int | None]
    cgroup_path: Callable[[Task], str | None]
    cgroup_of: Callable[[Task], Cgroup | None]

    def __init__(self, impl: ContextImpl) -> None:
        object.__setattr__(self, "_impl", impl)
        object.__setattr__(self, "kernel_points", impl.kernel_points)
        object.__setattr__(self, "cgroup_path", impl.cgroup_path)
        object.__setattr__(self, "cgroup_of", impl.cgroup_of)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"the policy context is read-only (tried to set {name})")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"the policy context is read-only (tried to delete {name})")

    # what the decision is about
    @property
    def snapshot(self) -> Snapshot:
        """The whole snapshot (frozen)."""
        return self._impl.snapshot

    @property
    def domain(self) -> str:
        """``"system"`` or ``"cgroup:/path"``."""
        return self._impl.domain_name

    @property
    def totalpages(self) -> int:
        """The domain's size in pages (the kernel's ``totalpages``)."""
        return self._impl.totalpages

    @property
    def page_size(self) -> int:
        return self._impl.page_size

    @property
    def tasks(self) -> tuple[Task, ...]:
        """The domain's tasks, in the kernel's scan order."""
        return self._impl.tasks

    # lookups
    def cgroup(self, path: str) -> Cgroup | None:
        """A cgroup of the domain's memory hierarchy by path."""
        return self._impl.cgroup(path)

    def pressure_of(self, task: Task) -> tuple[Cgroup, Pressure] | None:
        """Memory pressure (PSI) of the task's cgroup: the memory hierarchy's
        where it has ``memory.pressure``, else the v2 cgroup's (the hybrid
        layout keeps PSI on v2 while the memory controller is on v1)."""
        return self._impl.pressure_of(task)

    def parent(self, task: Task) -> Task | None:
        """The task's parent process, if it is in the snapshot."""
        return self._impl.parent(task)

    def children(self, task: Task) -> tuple[Task, ...]:
        return self._impl.children(task)

    def descendants(self, task: Task) -> tuple[Task, ...]:
        """Every process below ``task`` in the process tree (bounded)."""
        return self._impl.descendants(task)

    # history
    def growth(self, task: Task) -> float | None:
        """Resident+swap growth in bytes per second over the history window,
        or None without history (or for a process the history did not see)."""
        return self._impl.growth(task)

    def tree_growth(self, task: Task) -> float | None:
        """The same for the task with all its descendants."""
        return self._impl.tree_growth(task)

    @property
    def window_seconds(self) -> float | None:
        """How far back the history reaches, or None without history."""
        return self._impl.window_seconds

    # the per-task selection, from inside a handler
    def select(self) -> Sequence[object]:
        """Run the per-task selection now and return its ranked candidates
        (best first); a handler can act on them or return nothing."""
        return self._impl.run_selection()


@dataclass(frozen=True, slots=True)
class ContextImpl:
    """The engine's side of a :class:`Context` (not for policies)."""

    snapshot: Snapshot
    domain_name: str
    totalpages: int
    page_size: int
    tasks: tuple[Task, ...]
    kernel_points: Callable[[Task], int | None]
    cgroup_path: Callable[[Task], str | None]
    cgroup_of: Callable[[Task], Cgroup | None]
    cgroup: Callable[[str], Cgroup | None]
    pressure_of: Callable[[Task], tuple[Cgroup, Pressure] | None]
    parent: Callable[[Task], Task | None]
    children: Callable[[Task], tuple[Task, ...]]
    descendants: Callable[[Task], tuple[Task, ...]]
    growth: Callable[[Task], float | None]
    tree_growth: Callable[[Task], float | None]
    window_seconds: float | None
    run_selection: Callable[[], Sequence[object]] = field(default=lambda: ())


# -- a policy ---------------------------------------------------------------------

Evaluate = Callable[[Task, Context], Verdict]
Handle = Callable[[Event, Context], Sequence[Action]]


@dataclass(frozen=True, slots=True)
class Policy:
    """A named policy: a per-task ``evaluate``, an event ``handle``, or both.

    ``victim`` says what a selected task stands for: the process itself, its
    process tree, or its cgroup. ``needs_history`` asks the caller for an
    earlier snapshot (growth policies).
    """

    name: str
    evaluate: Evaluate | None = None
    handle: Handle | None = None
    victim: VictimKind = "process"
    needs_history: bool = False
    #: The policy reads ``Task.exe`` or ``Task.cmdline``: the caller must read
    #: them for every task (two more reads per process).
    needs_details: bool = False
    #: For the ``kernel`` policy only: the exact replica's fast path.
    kernel: bool = False
    description: str = ""
