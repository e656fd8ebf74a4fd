"""Replay a trace: where would a trigger have fired, and what would each policy kill?

Pure over recorded snapshots: the same :func:`~oomwarden.policy.decide.decide`
the daemon runs, with the history the daemon would have had (the newest
snapshot at least ``HISTORY_S`` older). What a trace can show of the
daemon's triggers (``docs/trace-format.md#replay``):

* ``oom``: a memory cgroup with a limit of its own under OOM (v1
  ``under_oom``, the top-most such cgroup: the kernel marks the subtree), or
  whose OOM counter (v2 ``memory.events`` ``oom``, v1 ``oom_control``
  ``oom_kill``) is higher than in the previous snapshot while no limited
  cgroup below it saw its own counter rise (the counters are hierarchical:
  an OOM in ``/a/b`` counts in ``/a`` too); for a rise the point is the
  previous snapshot, the last one before the OOM. On v1 ``oom_kill`` counts
  the kernel's kills only, so an OOM the warden handled shows as ``margin``;
* ``limit``: a v1 ``failcnt`` or v2 ``max`` event count higher than in the
  previous snapshot (the cgroup reached its limit and reclaimed; not an OOM);
* ``margin``: a memory cgroup's working set (usage less inactive file cache,
  from its ``memory.stat``) within a margin of its limit, as the daemon's
  ``margin`` trigger;
* ``threshold``: the system's MemAvailable and SwapFree at or below
  earlyoom's levels, :meth:`oomwarden.config.Threshold.level`;
* ``pressure``: PSI ``avg10`` (system, or a cgroup's, or its v2 twin's) at or
  above the levels. The daemon's PSI triggers count stalls over their own
  window; a snapshot has the kernel's 10 s averages only, so this is near, not
  the same.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from oomwarden.config import Pressure as PressureLevels
from oomwarden.config import Threshold
from oomwarden.decision import Decision, Domain, action_to_json
from oomwarden.domains import resolve_cgroup
from oomwarden.errors import CgroupNotFound, OomwardenError
from oomwarden.model import Cgroup, HierarchyKind, Pressure, Snapshot, page_counter_max_bytes
from oomwarden.policy.api import Event, Policy
from oomwarden.policy.budget import signal_guard
from oomwarden.policy.decide import DEFAULT_BUDGET_S, Guard, decide, no_guard
from oomwarden.policy.engine import cgroup_domain, system_domain
from oomwarden.policy.history import History, history_index
from oomwarden.trace import TraceRecord

#: Default margin for the ``margin`` trigger, percent of the limit.
DEFAULT_MARGIN_PERCENT = 10.0
TRIGGER_NAMES = ("oom", "limit", "margin", "threshold", "pressure")


class ReplayError(OomwardenError):
    """A replay cannot run as asked (a bad --trigger, a cgroup not in the trace)."""


@dataclass(frozen=True)
class Triggers:
    """Which triggers a replay looks for, and their levels."""

    oom: bool = True
    limit: bool = False
    margin_percent: float | None = DEFAULT_MARGIN_PERCENT
    threshold: Threshold | None = field(default_factory=Threshold)
    pressure: PressureLevels | None = field(default_factory=PressureLevels)


def parse_triggers(specs: Sequence[str]) -> Triggers:
    """``--trigger`` values: ``oom``, ``limit``, ``margin[:PERCENT]``,
    ``threshold[:MEM_PERCENT[:SWAP_PERCENT]]``, ``pressure[:full=P][,some=P]``.
    None given: oom, margin 10 %, threshold (earlyoom's 10 %), pressure full 40 %."""
    if not specs:
        return Triggers()
    out = Triggers(oom=False, limit=False, margin_percent=None, threshold=None, pressure=None)
    for spec in specs:
        name, _, arg = spec.partition(":")
        try:
            if name == "oom" and not arg:
                out = replace(out, oom=True)
            elif name == "limit" and not arg:
                out = replace(out, limit=True)
            elif name == "margin":
                out = replace(out, margin_percent=_percent(arg) if arg else
                              DEFAULT_MARGIN_PERCENT)
            elif name == "threshold":
                parts = arg.split(":") if arg else []
                if len(parts) > 2:
                    raise ValueError("expected threshold[:MEM_PERCENT[:SWAP_PERCENT]]")
                mem = _percent(parts[0]) if parts else Threshold().mem_available_percent
                swap = _percent(parts[1]) if len(parts) > 1 else mem
                out = replace(out, threshold=Threshold(mem, swap, mem / 2, swap / 2))
            elif name == "pressure":
                some, full = None, PressureLevels().full_avg10
                if arg:
                    some, full = None, None
                    for item in arg.split(","):
                        key, eq, value = item.partition("=")
                        if key not in ("some", "full") or not eq:
                            raise ValueError("expected pressure[:full=PERCENT][,some=PERCENT]")
                        if key == "some":
                            some = _percent(value)
                        else:
                            full = _percent(value)
                out = replace(out, pressure=PressureLevels(some_avg10=some, full_avg10=full))
            else:
                raise ValueError(f"unknown trigger (known: {', '.join(TRIGGER_NAMES)})")
        except ValueError as e:
            raise ReplayError(f"--trigger {spec!r}: {e}") from None
    return out


def _percent(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"expected a percentage, got {text!r}") from None
    if not 0 <= value <= 100:
        raise ValueError(f"expected 0 to 100 percent, got {value:g}")
    return value


@dataclass(frozen=True)
class Fired:
    """A trigger that fired at one snapshot, for one domain."""

    index: int
    #: None: the system; else (kind, path) of the memory cgroup.
    cgroup: tuple[HierarchyKind, str] | None
    trigger: str
    detail: str


@dataclass(frozen=True)
class PolicyRun:
    label: str
    policy: Policy


@dataclass(frozen=True)
class ReplayPoint:
    """One point of the trace and each policy's decision there."""

    index: int
    wall_ns: int
    taken_ns: int
    domain: Domain
    triggers: tuple[str, ...]
    details: tuple[str, ...]
    decisions: tuple[tuple[str, Decision], ...]
    #: Seconds between this snapshot and the history the policies had.
    history_s: float | None

    @property
    def agree(self) -> bool:
        return len({outcome(d) for _, d in self.decisions}) <= 1

    def to_json(self, top: int = 5) -> dict[str, Any]:
        return {
            "record": self.index, "wall_ns": self.wall_ns, "taken_ns": self.taken_ns,
            "domain": self.domain.name, "triggers": list(self.triggers),
            "details": list(self.details), "history_s": self.history_s,
            "agree": self.agree,
            "victims": {label: describe_outcome(d) for label, d in self.decisions},
            "decisions": {label: d.to_json(top=top) for label, d in self.decisions},
        }


def outcome(d: Decision) -> tuple[Any, ...]:
    """What a decision would do, for comparing policies: the victim (by
    identity) and the targets of its actions (their reasons left out)."""
    victim = None if d.victim is None else d.victim.task.identity
    targets = tuple(
        tuple(sorted((k, str(v)) for k, v in action_to_json(a).items() if k != "reason"))
        for a in d.actions)
    return (victim, d.victim_kind if victim is not None or targets else None, targets)


def describe_outcome(d: Decision) -> str:
    if d.aborted:
        return "nothing (the policy aborted)"
    if d.victim is not None:
        t = d.victim.task
        kind = "" if d.victim_kind == "process" else f" ({d.victim_kind})"
        return f"pid {t.pid} ({t.comm}){kind}"
    if d.actions:
        return "; ".join(_action_text(a) for a in d.actions)
    return "nothing"


def _action_text(a: object) -> str:
    data = action_to_json(a)  # type: ignore[arg-type]
    name = data.pop("action")
    data.pop("reason", None)
    return f"{name} " + ", ".join(f"{k}={v}" for k, v in data.items()
                                  if v not in ("", None, [], False))


# -- triggers -----------------------------------------------------------------------


def _limited(cg: Cgroup, page_size: int) -> bool:
    return cg.limit is not None and cg.limit < page_counter_max_bytes(page_size) // 2


def working_set(cg: Cgroup) -> int | None:
    """Usage less the inactive file cache (as the daemon's margin trigger)."""
    if cg.usage is None:
        return None
    inactive = cg.stat.get("total_inactive_file", cg.stat.get("inactive_file"))
    return cg.usage - (inactive or 0)


def _pressure_of(snapshot: Snapshot, cg: Cgroup) -> Pressure | None:
    if cg.pressure is not None:
        return cg.pressure
    if cg.kind is HierarchyKind.V1:
        twin = snapshot.cgroup(HierarchyKind.V2, cg.path)
        return None if twin is None else twin.pressure
    return None


def _pressure_detail(p: Pressure | None, levels: PressureLevels) -> str | None:
    if p is None:
        return None
    if levels.full_avg10 is not None and p.full is not None and \
            p.full.avg10 >= levels.full_avg10:
        return f"PSI full avg10 {p.full.avg10:g}% >= {levels.full_avg10:g}%"
    if levels.some_avg10 is not None and p.some.avg10 >= levels.some_avg10:
        return f"PSI some avg10 {p.some.avg10:g}% >= {levels.some_avg10:g}%"
    return None


def _counters(cg: Cgroup) -> tuple[int, int]:
    """(OOM count, limit count) of a cgroup: v1 ``oom_control`` ``oom_kill``
    (the kernel's kills) and ``failcnt``; v2 ``memory.events`` ``oom`` (the
    limit reached and an allocation about to fail) and ``max``."""
    if cg.kind is HierarchyKind.V1:
        ooms = cg.oom_control.oom_kill if cg.oom_control is not None else None
        return ooms or 0, cg.failcnt or 0
    return cg.events.get("oom", 0), cg.events.get("max", 0)


def _oom_text(old: Cgroup, cg: Cgroup) -> str:
    if cg.kind is HierarchyKind.V1:
        return f"oom_control oom_kill {_counters(old)[0]} -> {_counters(cg)[0]}"
    return (f"memory.events oom {old.events.get('oom', 0)} -> {cg.events.get('oom', 0)}, "
            f"oom_kill {old.events.get('oom_kill', 0)} -> {cg.events.get('oom_kill', 0)}")


def _below(path: str, ancestor: str) -> bool:
    return path != ancestor and path.startswith(ancestor.rstrip("/") + "/")


def _parent(path: str) -> str:
    return path.rsplit("/", 1)[0] or "/"


def fired(index: int, snapshot: Snapshot, previous: Snapshot | None, triggers: Triggers,
          *, system: bool, cgroups: Iterable[tuple[HierarchyKind, str]] | None
          ) -> list[Fired]:
    """The triggers that fire at this snapshot (``oom`` and ``limit`` rises
    are given the previous snapshot's index). ``cgroups`` None: every memory
    cgroup below the root."""
    out: list[Fired] = []
    mem = snapshot.system
    if system and triggers.threshold is not None and mem.mem_available is not None:
        avail, swap = mem.available_percent, mem.swap_free_percent
        level = triggers.threshold.level(avail, swap)
        if level is not None:
            out.append(Fired(index, None, "threshold",
                             f"MemAvailable {avail:.1f}%, SwapFree "
                             f"{'-' if swap is None else f'{swap:.1f}%'}: the {level} level"))
    if system and triggers.pressure is not None:
        detail = _pressure_detail(mem.pressure, triggers.pressure)
        if detail is not None:
            out.append(Fired(index, None, "pressure", f"system {detail}"))
    wanted = None if cgroups is None else set(cgroups)
    before = {} if previous is None else {(c.kind, c.path): c for c in previous.cgroups}
    # Limited memory cgroups whose own OOM counter rose since the previous
    # snapshot (the counters are hierarchical: a rise below explains one above).
    rose: dict[tuple[HierarchyKind, str], Cgroup] = {}
    if triggers.oom:
        for cg in snapshot.cgroups:
            old = before.get((cg.kind, cg.path))
            if (cg.memory_controller and cg.path != "/" and _limited(cg, mem.page_size)
                    and old is not None and old.inode == cg.inode
                    and _counters(cg)[0] > _counters(old)[0]):
                rose[(cg.kind, cg.path)] = old
    for cg in snapshot.cgroups:
        key = (cg.kind, cg.path)
        if not cg.memory_controller or cg.path == "/" or (wanted is not None
                                                          and key not in wanted):
            continue
        old = before.get(key)
        if old is not None and old.inode != cg.inode:
            old = None  # another cgroup under the same name
        if triggers.oom and _limited(cg, mem.page_size):
            parent = snapshot.cgroup(cg.kind, _parent(cg.path))
            if (cg.oom_control is not None and cg.oom_control.under_oom
                    and not (parent is not None and parent.oom_control is not None
                             and parent.oom_control.under_oom)):
                out.append(Fired(index, key, "oom", "memory.oom_control: under_oom"))
            elif key in rose and old is not None and not any(
                    k[0] is cg.kind and _below(k[1], cg.path) for k in rose):
                out.append(Fired(index - 1, key, "oom",
                                 f"{_oom_text(old, cg)} by the next snapshot: the last "
                                 "snapshot before the OOM"))
        if triggers.limit and old is not None and _counters(cg)[1] > _counters(old)[1]:
            out.append(Fired(index - 1, key, "limit",
                             f"limit count {_counters(old)[1]} -> {_counters(cg)[1]} by the "
                             "next snapshot"))
        if triggers.margin_percent is not None and _limited(cg, mem.page_size):
            ws = working_set(cg)
            assert cg.limit is not None
            if ws is not None and ws >= cg.limit * (1 - triggers.margin_percent / 100):
                out.append(Fired(index, key, "margin",
                                 f"working set {ws} B within {triggers.margin_percent:g}% "
                                 f"of the limit {cg.limit} B"))
        if triggers.pressure is not None:
            detail = _pressure_detail(_pressure_of(snapshot, cg), triggers.pressure)
            if detail is not None:
                out.append(Fired(index, key, "pressure", detail))
    return out


# -- the replay ---------------------------------------------------------------------


@dataclass
class _Kept:
    record: TraceRecord
    history: Snapshot | None


def replay(records: Iterable[TraceRecord], policies: Sequence[PolicyRun], *,
           triggers: Triggers = Triggers(), every: bool = False,
           cgroup: str | None = None, recorded: tuple[str, str] | None = None,
           budget_s: float = DEFAULT_BUDGET_S, guard: Guard | None = None
           ) -> Iterator[ReplayPoint]:
    """Walk the records and yield a point wherever a trigger fires (and at
    every record with ``every``). ``cgroup``: only that memory cgroup's domain
    (a spec as ``explain --cgroup`` takes it); ``recorded``: the subtree the
    trace was recorded with (no system domain then)."""
    guard = guard or (signal_guard if budget_s > 0 else no_guard)
    target: tuple[HierarchyKind, str] | None = None
    earlier: list[Snapshot] = []
    last: _Kept | None = None
    pending: list[Fired] = []
    for rec in records:
        snap = rec.snapshot
        if target is None and (cgroup is not None or recorded is not None):
            target = _target(snap, cgroup, recorded)
        at = history_index(snap, earlier)
        hist = earlier[at] if earlier else None
        fires = fired(rec.index, snap, None if last is None else last.record.snapshot,
                      triggers, system=target is None and recorded is None,
                      cgroups=None if cgroup is None or target is None else [target])
        # Points of the previous record (counter rises) first, in order.
        if last is not None:
            yield from _points(last, [f for f in fires if f.index == last.record.index] +
                               pending, policies, budget_s=budget_s, guard=guard, every=every,
                               target=target)
        pending = [f for f in fires if f.index == rec.index]
        last = _Kept(rec, hist)
        # keep what a later history may need: this snapshot's history and
        # everything newer
        del earlier[:at]
        earlier.append(snap)
    if last is not None:
        yield from _points(last, pending, policies, budget_s=budget_s, guard=guard,
                           every=every, target=target)


def _target(snap: Snapshot, cgroup: str | None, recorded: tuple[str, str] | None
            ) -> tuple[HierarchyKind, str]:
    if cgroup is not None:
        cg = resolve_cgroup(snap, cgroup)
        if not cg.memory_controller:
            raise ReplayError(f"cgroup {cg.name} has no memory controller: no OOM domain")
        return cg.kind, cg.path
    assert recorded is not None
    return HierarchyKind(recorded[0]), recorded[1]


def _points(kept: _Kept, fires: list[Fired], policies: Sequence[PolicyRun], *,
            budget_s: float, guard: Guard, every: bool,
            target: tuple[HierarchyKind, str] | None) -> Iterator[ReplayPoint]:
    snap = kept.record.snapshot
    by_domain: dict[tuple[HierarchyKind, str] | None, list[Fired]] = {}
    for f in fires:
        by_domain.setdefault(f.cgroup, []).append(f)
    if every:
        by_domain.setdefault(target, [])
    for key in sorted(by_domain, key=lambda k: ("",) if k is None else (k[0].value, k[1])):
        domain = _domain(snap, key)
        if domain is None:
            continue
        fs = by_domain[key]
        names = tuple(dict.fromkeys(f.trigger for f in fs)) or ("every",)
        details = tuple(f.detail for f in fs)
        event = Event(names[0], domain.name, "; ".join(details) or "every snapshot (replay)")
        decisions = []
        for run in policies:
            hist = kept.history if run.policy.needs_history else None
            d = decide(snap, domain, run.policy,
                       history=None if hist is None else History(hist), event=event,
                       guard=guard, budget_s=budget_s or DEFAULT_BUDGET_S)
            decisions.append((run.label, d))
        window = None if kept.history is None else \
            (snap.taken_ns - kept.history.taken_ns) / 1e9
        yield ReplayPoint(kept.record.index, kept.record.wall_ns, snap.taken_ns, domain, names,
                          details, tuple(decisions), window)


def _domain(snap: Snapshot, key: tuple[HierarchyKind, str] | None) -> Domain | None:
    if key is None:
        return system_domain(snap)
    cg = snap.cgroup(*key)
    if cg is None:
        return None  # not in this snapshot (removed, or not yet made)
    try:
        return cgroup_domain(snap, cg)
    except CgroupNotFound:
        return None
