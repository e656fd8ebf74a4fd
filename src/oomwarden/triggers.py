"""Pre-OOM trigger sources: file descriptors the daemon's epoll loop waits on.

Each source says *that* a domain may need a kill; the daemon then snapshots,
decides and acts (with the watch's cooldown). Sources, by domain:

* **PSI** (``pressure``): a trigger written to ``/proc/pressure/memory`` (the
  system) or to a cgroup's ``memory.pressure``; the kernel raises POLLPRI when
  tasks stalled on memory for the given time within the window
  (``Documentation/accounting/psi.rst``). One trigger per open file. A v1
  memory cgroup has no PSI file of its own; on a hybrid host its twin in the
  cgroup2 hierarchy (the same path: systemd keeps both trees alike) has one,
  and counts the stalls of the same tasks when they are in both.
* **vmpressure** (``pressure`` on a v1 memory cgroup with no cgroup2 twin):
  an eventfd on ``memory.pressure_level`` at level ``critical``, which the
  kernel signals when reclaim in the cgroup is failing (no PSI figures: the
  watch's PSI levels do not apply there).
* **margin**: the cgroup's working set (usage less its inactive file cache,
  as kubelet counts it: page cache that reclaim drops at once is no reason to
  kill) within ``margin_percent`` of its limit. On v1 an eventfd on
  ``memory.usage_in_bytes`` (a usage threshold, ``cgroup.event_control``)
  wakes the warden when usage crosses the margin; above it, the working set is
  read on a short interval until usage falls back.

Every source here is I/O only; what to do about a firing is the daemon's.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import time
from dataclasses import dataclass, field

from oomwarden.errors import OomwardenError, ParseError
from oomwarden.sources.parse import parse_flat_keyed, parse_limit

EPOLLIN = select.EPOLLIN
EPOLLPRI = select.EPOLLPRI
EPOLLERR = select.EPOLLERR
#: Above the margin's usage threshold, the working set is read this often
#: when near it, backing off up to MARGIN_POLL_MAX_S when well below it.
MARGIN_POLL_S = 0.1
MARGIN_POLL_MAX_S = 2.0
#: How often a margin source re-reads the limit (a changed limit moves the
#: usage threshold).
LIMIT_REFRESH_S = 5.0
#: memory.events counts only while usage is this near memory.high or .max.
EVENTS_NEAR_PERCENT = 5.0
#: At most this many /dev/kmsg records per wake-up, and kills kept.
MAX_KMSG_RECORDS = 256
#: v1's "unlimited": PAGE_COUNTER_MAX pages, rounded by the kernel.
V1_UNLIMITED = 1 << 62


class TriggerError(OomwardenError):
    """A trigger cannot be set up (the message says why, in one line)."""


class TriggerGone(OomwardenError):
    """A trigger's cgroup was removed: the source is dead."""


@dataclass
class Source:
    """One file descriptor of the loop and what its readiness means."""

    trigger: str
    #: What it watches, for the log: "PSI full 40% of 2 s on /proc/pressure/memory".
    what: str
    fd: int
    mask: int
    #: When the loop should call :meth:`poll` (monotonic), None: never.
    next_poll: float | None = None

    def fired(self, events: int) -> str | None:
        """The fd is ready: the detail if the trigger holds now, else None.
        Raises :class:`TriggerGone` when its cgroup is gone."""
        raise NotImplementedError

    def poll(self) -> str | None:
        """Called at ``next_poll``: the detail if the trigger holds now."""
        self.next_poll = None
        return None

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


@dataclass
class PsiSource(Source):
    path: str = ""

    @classmethod
    def open(cls, path: str, line: str) -> PsiSource:
        """A PSI trigger ``line`` (``some|full STALL_US WINDOW_US\\n``) on ``path``."""
        try:
            fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            raise TriggerError(f"{path}: {e.strerror}") from None
        try:
            os.write(fd, line.encode())
        except OSError as e:
            os.close(fd)
            kind, stall, window = line.split()
            hint = ""
            if e.errno == errno.EINVAL and int(window) % 2_000_000:
                hint = (" (without CAP_SYS_RESOURCE the kernel takes only windows of "
                        "2, 4, 6, 8 or 10 s)")
            raise TriggerError(f"{path}: PSI trigger {line.strip()!r} refused: "
                               f"{e.strerror}{hint}") from None
        kind, stall, window = line.split()
        share = 100 * int(stall) / int(window)
        return cls("pressure", f"PSI {kind} {share:g}% of {int(window) / 1e6:g} s on {path}",
                   fd, EPOLLPRI, path=path)

    def fired(self, events: int) -> str | None:
        if events & EPOLLERR:
            raise TriggerGone(f"{self.path}: the cgroup is gone")
        if not events & EPOLLPRI:
            return None
        try:
            figures = os.pread(self.fd, 256, 0).decode("ascii", "replace")
        except OSError:
            figures = ""
        kind = self.what.split()[1]
        line = next((x for x in figures.splitlines() if x.startswith(kind)), "")
        avg10 = next((w for w in line.split() if w.startswith("avg10=")), "")
        return f"{self.what}: fired ({kind} {avg10 or 'avg10=?'})"


@dataclass
class V1EventSource(Source):
    """An eventfd registered through a v1 cgroup's ``cgroup.event_control``."""

    cgroup_dir: str = ""
    inode: int = 0

    @staticmethod
    def register(cgroup_dir: str, filename: str, args: str) -> int:
        """A new eventfd signalled on ``filename``'s event with ``args``."""
        target = os.path.join(cgroup_dir, filename)
        try:
            file_fd = os.open(target, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise TriggerError(f"{target}: {e.strerror}") from None
        event_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        try:
            with open(os.path.join(cgroup_dir, "cgroup.event_control"), "w") as f:
                f.write(f"{event_fd} {file_fd} {args}")
        except OSError as e:
            os.close(event_fd)
            raise TriggerError(f"{target}: cannot register for events: {e.strerror}") from None
        finally:
            os.close(file_fd)  # the kernel holds its own reference
        return event_fd

    def _consume(self) -> None:
        with contextlib.suppress(OSError):
            os.read(self.fd, 8)
        try:
            if os.stat(self.cgroup_dir).st_ino != self.inode:
                raise TriggerGone(f"{self.cgroup_dir}: removed and made again")
        except FileNotFoundError:
            raise TriggerGone(f"{self.cgroup_dir}: the cgroup is gone") from None


@dataclass
class PressureLevelSource(V1EventSource):
    @classmethod
    def open(cls, cgroup_dir: str, inode: int, level: str = "critical") -> PressureLevelSource:
        fd = cls.register(cgroup_dir, "memory.pressure_level", level)
        return cls("pressure", f"memory.pressure_level {level} on {cgroup_dir}", fd, EPOLLIN,
                   cgroup_dir=cgroup_dir, inode=inode)

    def fired(self, events: int) -> str | None:
        self._consume()
        return f"{self.what}: reclaim is failing"


@dataclass
class MarginSource(V1EventSource):
    """The working set within ``percent`` of a v1 memory cgroup's limit."""

    percent: float = 5.0
    limit: int = 0
    _refresh_at: float = field(default=0.0, repr=False)
    _interval: float = field(default=MARGIN_POLL_S, repr=False)

    @classmethod
    def open(cls, cgroup_dir: str, inode: int, percent: float) -> MarginSource:
        limit = _read_limit(cgroup_dir)
        if limit >= V1_UNLIMITED:
            raise TriggerError(f"{cgroup_dir} has no memory limit of its own: a margin to it "
                               "would never be reached")
        src = cls("margin", f"working set within {percent:g}% of the limit of {cgroup_dir}",
                  -1, EPOLLIN, cgroup_dir=cgroup_dir, inode=inode, percent=percent, limit=limit)
        src.fd = cls.register(cgroup_dir, "memory.usage_in_bytes", str(src.threshold))
        src._refresh_at = time.monotonic() + LIMIT_REFRESH_S
        src.next_poll = time.monotonic()  # usage may be above the margin already
        return src

    @property
    def threshold(self) -> int:
        return int(self.limit * (1 - self.percent / 100))

    def rearm(self) -> bool:
        """Re-read the limit; a changed limit gets a new usage threshold (a
        new eventfd: the old registration ends when its eventfd is closed).
        True when ``fd`` changed."""
        self._refresh_at = time.monotonic() + LIMIT_REFRESH_S
        limit = _read_limit(self.cgroup_dir)
        if limit == self.limit:
            return False
        self.limit = limit
        fd = self.register(self.cgroup_dir, "memory.usage_in_bytes", str(self.threshold))
        self.close()
        self.fd = fd
        self.next_poll = time.monotonic()
        return True

    @property
    def refresh_due(self) -> float:
        return self._refresh_at

    def fired(self, events: int) -> str | None:
        self._consume()
        return self.poll()

    def _figures(self) -> tuple[int, int] | None:
        """(usage, working set) now; None if unreadable. Raises TriggerGone."""
        try:
            usage = _read_int(self.cgroup_dir, "memory.usage_in_bytes")
            inactive = _read_inactive_file(self.cgroup_dir)
        except FileNotFoundError:
            raise TriggerGone(f"{self.cgroup_dir}: the cgroup is gone") from None
        except (OSError, ValueError):
            return None
        return usage, usage - inactive

    def over(self) -> bool:
        """Whether the working set is within the margin now."""
        figures = self._figures()
        return figures is not None and figures[1] >= self.threshold

    def poll(self) -> str | None:
        """Read usage, working set and limit. Below the usage threshold the
        polling stops (the eventfd wakes the warden); above it, with page
        cache keeping usage there, the next read comes after 0.1 s when the
        working set is within 10 % of the threshold, else after twice the
        last interval, up to MARGIN_POLL_MAX_S."""
        self.next_poll = None
        if self.limit >= V1_UNLIMITED:
            return None
        figures = self._figures()
        if figures is None:
            return None
        usage, working = figures
        if usage < self.threshold:
            self._interval = MARGIN_POLL_S
            return None
        if working < self.threshold * 0.9:
            self._interval = min(MARGIN_POLL_MAX_S, self._interval * 2)
        else:
            self._interval = MARGIN_POLL_S
        self.next_poll = time.monotonic() + self._interval
        if working < self.threshold:
            return None
        mib = 1 << 20
        return (f"working set {working / mib:.1f} MiB (usage {usage / mib:.1f} MiB) is within "
                f"{self.percent:g}% of the limit {self.limit / mib:.1f} MiB")


def _read_int(cgroup_dir: str, name: str) -> int:
    with open(os.path.join(cgroup_dir, name), "rb") as f:
        return int(f.read())


def _read_limit(cgroup_dir: str) -> int:
    try:
        with open(os.path.join(cgroup_dir, "memory.limit_in_bytes"), "rb") as f:
            return parse_limit(f.read(), "memory.limit_in_bytes", V1_UNLIMITED)
    except FileNotFoundError:
        raise TriggerError(f"{cgroup_dir}: the cgroup is gone") from None
    except OSError as e:
        raise TriggerError(f"{cgroup_dir}: cannot read its limit: {e.strerror}") from None
    except ParseError as e:
        raise TriggerError(f"{cgroup_dir}: cannot read its limit: {e}") from None


def _read_inactive_file(cgroup_dir: str) -> int:
    """``total_inactive_file`` (v1, hierarchical) from memory.stat, found
    directly rather than by parsing every line (it is read on an interval)."""
    with open(os.path.join(cgroup_dir, "memory.stat"), "rb") as f:
        data = f.read()
    at = data.find(b"\ntotal_inactive_file ")
    if at < 0:
        at = data.find(b"\ninactive_file ")
        if at < 0:
            raise ValueError("memory.stat has no inactive_file")
    end = data.find(b"\n", at + 1)
    return int(data[at:end if end >= 0 else None].split()[1])


# -- cgroup v2 ----------------------------------------------------------------------------


@dataclass
class EventsSource(Source):
    """A v2 cgroup's ``memory.events``: the kernel raises POLLPRI on the open
    file when a counter changes (``cgroup_file_notify``); a read re-arms it.
    Fires when ``high``, ``max`` or ``oom`` rose; ``oom_kill`` rising (the
    kernel killed) is kept in :attr:`kernel_kills` for the daemon to log."""

    path: str = ""
    counts: dict[str, int] = field(default_factory=dict)
    #: How many kills the kernel made since the last firing was read.
    kernel_kills: int = 0
    #: Whether the counters that fire (high, max, oom) are watched.
    fires: bool = True

    @classmethod
    def open(cls, cgroup_dir: str, *, fires: bool = True) -> EventsSource:
        path = os.path.join(cgroup_dir, "memory.events")
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise TriggerError(f"{path}: {e.strerror}") from None
        src = cls("events", f"memory.events of {cgroup_dir}", fd, EPOLLPRI, path=path,
                  fires=fires)
        src.counts = src._read()
        return src

    def _read(self) -> dict[str, int]:
        try:
            data = os.pread(self.fd, 4096, 0)
        except OSError as e:
            if e.errno == errno.ENODEV or not os.path.exists(self.path):
                raise TriggerGone(f"{self.path}: the cgroup is gone") from None
            return dict(self.counts)
        if not data and not os.path.exists(self.path):
            raise TriggerGone(f"{self.path}: the cgroup is gone")
        try:
            return parse_flat_keyed(data, "memory.events")
        except ParseError:
            return dict(self.counts)

    def fired(self, events: int) -> str | None:
        if events & EPOLLERR and not os.path.exists(self.path):
            raise TriggerGone(f"{self.path}: the cgroup is gone")
        now = self._read()
        rose = {k: now.get(k, 0) - self.counts.get(k, 0) for k in now}
        self.counts = now
        self.kernel_kills += max(0, rose.get("oom_kill", 0))
        if not self.fires:
            return None
        shown = [f"{k} +{rose[k]}" for k in ("high", "max", "oom") if rose.get(k, 0) > 0]
        if not shown or not self._at_a_boundary():
            return None  # counted before a kill that has freed the memory since
        return f"memory.events: {', '.join(shown)}"

    def _at_a_boundary(self) -> bool:
        """Whether the working set (``memory.current`` less ``inactive_file``)
        is still near ``memory.high`` or ``memory.max`` (within
        EVENTS_NEAR_PERCENT). The kernel counts ``high`` and ``max`` on every
        charge that had to reclaim, page cache included: a cgroup reading
        files sits at its limit with nothing wrong, and counts from before a
        kill that has freed the memory since are no reason for another."""
        try:
            return self.over()
        except TriggerGone:
            raise
        except (OSError, ValueError):
            return True

    def over(self) -> bool:
        cgroup_dir = os.path.dirname(self.path)
        try:
            bounds = [b for b in (_read_v2_bound(cgroup_dir, "memory.high"),
                                  _read_v2_bound(cgroup_dir, "memory.max")) if b is not None]
            if not bounds:
                return False
            usage = _read_int(cgroup_dir, "memory.current")
            near = min(bounds) * (1 - EVENTS_NEAR_PERCENT / 100)
            if usage < near:
                return False
            return usage - _read_inactive_file(cgroup_dir) >= near
        except FileNotFoundError:
            raise TriggerGone(f"{cgroup_dir}: the cgroup is gone") from None


@dataclass
class V2MarginSource(Source):
    """The working set (``memory.current`` less ``inactive_file``) within
    ``percent`` of ``memory.max`` of a v2 cgroup. v2 has no usage threshold
    notification: ``memory.current`` is read on an interval, 0.1 s when
    usage is within 10 % of the threshold, doubling up to MARGIN_POLL_MAX_S
    below that (one small read; memory.stat only above the threshold)."""

    cgroup_dir: str = ""
    percent: float = 5.0
    _interval: float = field(default=MARGIN_POLL_S, repr=False)

    @classmethod
    def open(cls, cgroup_dir: str, percent: float) -> V2MarginSource:
        limit = _read_v2_max(cgroup_dir)
        if limit is None:
            raise TriggerError(f"{cgroup_dir} has no memory.max: a margin to it would never "
                               "be reached")
        return cls("margin", f"working set within {percent:g}% of memory.max of {cgroup_dir}",
                   -1, 0, next_poll=time.monotonic(), cgroup_dir=cgroup_dir, percent=percent)

    def fired(self, events: int) -> str | None:
        return None  # no fd: polled only

    def _figures(self) -> tuple[int, int, int] | None:
        """(usage, working set, limit), None if unreadable or unlimited."""
        try:
            limit = _read_v2_max(self.cgroup_dir)
            usage = _read_int(self.cgroup_dir, "memory.current")
            if limit is None:
                return None
            working = usage
            if usage >= self._threshold(limit):
                working = usage - _read_inactive_file(self.cgroup_dir)
        except FileNotFoundError:
            raise TriggerGone(f"{self.cgroup_dir}: the cgroup is gone") from None
        except (OSError, ValueError):
            return None
        return usage, working, limit

    def _threshold(self, limit: int) -> int:
        return int(limit * (1 - self.percent / 100))

    def over(self) -> bool:
        figures = self._figures()
        return figures is not None and figures[1] >= self._threshold(figures[2])

    def poll(self) -> str | None:
        figures = self._figures()
        if figures is None:
            self.next_poll = time.monotonic() + MARGIN_POLL_MAX_S
            return None
        usage, working, limit = figures
        threshold = self._threshold(limit)
        if usage >= threshold * 0.9:
            self._interval = MARGIN_POLL_S
        else:
            self._interval = min(MARGIN_POLL_MAX_S, self._interval * 2)
        self.next_poll = time.monotonic() + self._interval
        if working < threshold:
            return None
        mib = 1 << 20
        return (f"working set {working / mib:.1f} MiB (usage {usage / mib:.1f} MiB) is within "
                f"{self.percent:g}% of memory.max {limit / mib:.1f} MiB")


def _read_v2_max(cgroup_dir: str) -> int | None:
    """memory.max, None for "max" (no limit)."""
    return _read_v2_bound(cgroup_dir, "memory.max")


def _read_v2_bound(cgroup_dir: str, name: str) -> int | None:
    """memory.max or memory.high, None for "max" (no bound)."""
    with open(os.path.join(cgroup_dir, name), "rb") as f:
        text = f.read().strip()
    return None if text == b"max" else int(text)


# -- the kernel's own kills ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class KernelKill:
    """One OOM kill the kernel made, as it logged it (``oom-kill:`` and
    ``Killed process`` lines of ``/dev/kmsg``)."""

    oom_memcg: str
    task_memcg: str
    pid: int
    comm: str
    constraint: str
    detail: str


@dataclass
class KmsgSource(Source):
    """``/dev/kmsg`` from its end on: every ``oom-kill:`` record the kernel
    prints from now on (``dump_oom_victim``), with the ``Killed process`` line
    that follows it. Records lost to a ring-buffer overrun (EPIPE) are
    skipped. Bounded: at most MAX_KMSG_RECORDS records per read."""

    kills: list[KernelKill] = field(default_factory=list)
    _pending: dict[int, dict[str, str]] = field(default_factory=dict, repr=False)

    @classmethod
    def open(cls) -> KmsgSource:
        try:
            fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            raise TriggerError(f"/dev/kmsg: {e.strerror}") from None
        os.lseek(fd, 0, os.SEEK_END)
        return cls("kernel", "the kernel's OOM kills (/dev/kmsg)", fd, EPOLLIN)

    def fired(self, events: int) -> str | None:
        for _ in range(MAX_KMSG_RECORDS):
            try:
                record = os.read(self.fd, 8192)
            except BlockingIOError:
                break
            except BrokenPipeError:
                continue  # overrun: the next read goes on from the oldest kept
            except OSError:
                break
            if not record:
                break
            self._take(record.decode("utf-8", "replace"))
        return None

    def _take(self, record: str) -> None:
        """One /dev/kmsg record: ``PRIO,SEQ,TIME,FLAGS;TEXT``. Only the
        kernel's own records count (facility 0): anyone may write to
        /dev/kmsg, and a forged ``oom-kill:`` line must not become a record."""
        prefix, _, rest = record.partition(";")
        try:
            if int(prefix.split(",", 1)[0]) >> 3 != 0:
                return
        except ValueError:
            return
        text = rest.split("\n", 1)[0]
        if text.startswith("oom-kill:"):
            fields = parse_oom_kill(text)
            if fields is not None:
                self._pending[int(fields["pid"])] = fields
                if len(self._pending) > MAX_KMSG_RECORDS:
                    self._pending.clear()
            return
        at = text.find("Killed process ")
        if at < 0:
            return
        words = text[at + len("Killed process "):].split()
        try:
            pid = int(words[0])
        except (IndexError, ValueError):
            return
        fields = self._pending.pop(pid, {})
        comm = words[1].strip("()") if len(words) > 1 else "?"
        self.kills.append(KernelKill(
            oom_memcg=fields.get("oom_memcg", ""), task_memcg=fields.get("task_memcg", ""),
            pid=pid, comm=fields.get("task", comm), constraint=fields.get("constraint", ""),
            detail=text[at:]))
        del self.kills[:-MAX_KMSG_RECORDS]


#: The longest comm (TASK_COMM_LEN - 1).
_COMM_MAX = 15


def parse_oom_kill(text: str) -> dict[str, str] | None:
    """The fields of the kernel's ``oom-kill:`` line (``dump_oom_victim``):
    ``oom-kill:constraint=C,nodemask=N,cpuset=S,mems_allowed=M,oom_memcg=P,
    task_memcg=Q,task=COMM,pid=N,uid=U``. Cgroup paths and the comm may hold
    commas, so the fields are found by position: ``pid`` and ``uid`` from the
    end, ``task=`` within the last 15 characters before them, the two paths
    between their own keys. None if the line does not have that shape."""
    body = text.removeprefix("oom-kill:")
    head, sep, tail = body.rpartition(",pid=")
    pid, _, uid = tail.partition(",uid=")
    if not sep or not pid.isdigit():
        return None
    task_at = head.find(",task=", max(0, len(head) - len(",task=") - _COMM_MAX))
    task_memcg_at = head.rfind(",task_memcg=", 0, max(0, task_at))
    if task_at < 0 or task_memcg_at < 0:
        return None
    oom_at = head.find(",oom_memcg=", 0, task_memcg_at)  # absent: a global OOM
    constraint = head.split(",", 1)[0].removeprefix("constraint=")
    return {"constraint": constraint,
            "oom_memcg": head[oom_at + len(",oom_memcg="):task_memcg_at] if oom_at >= 0 else "",
            "task_memcg": head[task_memcg_at + len(",task_memcg="):task_at],
            "task": head[task_at + len(",task="):], "pid": pid, "uid": uid}
