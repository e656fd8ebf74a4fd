"""History for rates: an earlier snapshot, matched by process identity.

A process is the same process only if both its pid and its start time match
(a recycled PID is another process). Growth is (rss + swap) now minus then,
over the time between the snapshots. For a process tree, the tree's memory
now is compared with the same root's tree then; children born inside the
window count from zero, so a fork storm of small children shows as one fast
grower.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from oomwarden.model import Snapshot, Task

Identity = tuple[int, int]

#: Growth policies compare with a snapshot at least this old (the daemon
#: keeps one every HISTORY_S; replay applies the same rule to a trace).
HISTORY_S = 1.0


def history_index(now: Snapshot, earlier: Sequence[Snapshot]) -> int:
    """Where :func:`history_for` finds its snapshot in ``earlier`` (0 if none)."""
    for i in range(len(earlier) - 1, -1, -1):
        if now.taken_ns - earlier[i].taken_ns >= HISTORY_S * 1e9:
            return i
    return 0


def history_for(now: Snapshot, earlier: Sequence[Snapshot]) -> Snapshot | None:
    """The newest of ``earlier`` (oldest first) at least HISTORY_S older than
    ``now``; else the oldest there is; None without any."""
    return earlier[history_index(now, earlier)] if earlier else None


def _memory_bytes(task: Task) -> int | None:
    rss = task.rss
    if rss is None:
        return None
    return (rss + (task.swap or 0)) * task.page_size


@dataclass(frozen=True)
class History:
    """An earlier snapshot of the same machine."""

    previous: Snapshot
    _then: dict[Identity, int] = field(init=False, repr=False, compare=False)
    _tree_then: dict[int, list[Task]] = field(init=False, repr=False, compare=False)
    _by_pid: dict[int, Task] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        then: dict[Identity, int] = {}
        kids: dict[int, list[Task]] = {}
        for t in self.previous.tasks:
            m = _memory_bytes(t)
            if m is not None:
                then[t.identity] = m
            kids.setdefault(t.ppid, []).append(t)
        object.__setattr__(self, "_then", then)
        object.__setattr__(self, "_tree_then", kids)
        object.__setattr__(self, "_by_pid", {t.pid: t for t in self.previous.tasks})

    def window_seconds(self, now: Snapshot) -> float | None:
        seconds = (now.taken_ns - self.previous.taken_ns) / 1e9
        return seconds if seconds > 0 else None

    def growth(self, now: Snapshot, task: Task) -> float | None:
        """Bytes per second of (rss + swap) growth, None if unknown."""
        window = self.window_seconds(now)
        then = self._then.get(task.identity)
        mem = _memory_bytes(task)
        if window is None or then is None or mem is None:
            return None
        return (mem - then) / window

    def tree_growth(self, now: Snapshot, task: Task, descendants: Sequence[Task]) -> float | None:
        """Growth of ``task`` with ``descendants`` (now) against the same
        root's tree then; None if the root was not seen then."""
        window = self.window_seconds(now)
        if window is None or task.identity not in self._then:
            return None
        root_then = self._by_pid.get(task.pid)
        if root_then is None or root_then.start_ticks != task.start_ticks:
            return None
        mem_now = sum(_memory_bytes(t) or 0 for t in (task, *descendants))
        level = [task.pid]
        seen: set[int] = set()
        for _ in range(64):
            nxt: list[int] = []
            for pid in level:
                if pid in seen:
                    continue
                seen.add(pid)
                nxt.extend(k.pid for k in self._tree_then.get(pid, ()))
            level = nxt
            if not level:
                break
        mem_then = sum(
            self._then.get(self._by_pid[pid].identity, 0) for pid in seen if pid in self._by_pid
        )
        return (mem_now - mem_then) / window
