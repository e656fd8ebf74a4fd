"""The daemon: triggers -> snapshot -> engine -> executor -> decision log.

Triggers (``oomwarden.triggers`` holds the pre-OOM sources), on the hierarchy
that has the memory controller:

* ``oom`` on a cgroup v1 memory cgroup: user-space OOM handling as the kernel
  offers it. The warden pauses the kernel's killer (``memory.oom_control``
  oom_kill_disable=1) and asks for an eventfd on ``memory.oom_control``
  through ``cgroup.event_control``. When the cgroup reaches its limit, the
  kernel stops its tasks and wakes the warden, which decides (bounded by the
  budget) and kills.
* ``oom`` on a cgroup v2 memory cgroup (its killer cannot be paused): the
  pre-OOM signals ``events``, ``pressure`` and ``margin``; with a
  ``memory.high`` guard where configured.
* ``pressure``: PSI triggers (``/proc/pressure/memory``, a v2 cgroup's
  ``memory.pressure``, or the cgroup2 twin's of a v1 memory cgroup), else v1's
  ``memory.pressure_level`` at ``critical``.
* ``events`` (v2): ``memory.events`` high / max / oom, with the working set
  still near the bound.
* ``margin``: a memory cgroup's working set near its limit.
* ``threshold``: earlyoom's MemAvailable / SwapFree levels on the system.
* ``oom`` on the system: its pre-OOM signals, ``pressure`` and ``threshold``.

The victim queue of a domain goes first; then its policy. A decision starts
the domain's cooldown (:class:`_Cooldown`). Every kill the kernel makes in a
watched domain is logged too (the BPF observer, else ``/dev/kmsg``;
``memory.events``).

The kernel's own killer stays the safety net, always:

* if a decision fails, selects nothing, aborts, or its actions fail, the
  warden hands that OOM to the kernel (oom_kill_disable=0) and takes it back
  once the cgroup is out of its OOM;
* on every exit path the warden restores oom_kill_disable=0 itself;
* a watchdog process (:mod:`oomwarden.watchdog`) restores it if the warden is
  SIGKILLed;
* in dry-run mode the kernel's killer is never paused: the warden listens to
  the same events, logs what it would have done, and signals nothing.

One event loop (``epoll``: PSI triggers report POLLPRI), no busy polling:
eventfds, PSI and memory.events fds, queued pidfds, the BPF observer's ring
buffer or /dev/kmsg, and a
self-pipe for SIGTERM / SIGINT / SIGHUP; only the threshold and the margins
are read on an interval. Every
decision is one JSON line in the decision log and every kill one human line
on stderr.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, Literal, TextIO

from oomwarden.actions.executor import HOOK_TIMEOUT_S, Executor, Result
from oomwarden.bpf_oom import detect as detect_bpf_oom
from oomwarden.config import Config, Pressure, Threshold
from oomwarden.control import ControlServer
from oomwarden.control_handler import WardenControl
from oomwarden.decision import Decision, Domain
from oomwarden.domains import memory_hierarchy, mount_relative, resolve_cgroup, within
from oomwarden.errors import BpfError, ConfigError, ControlError, OomwardenError
from oomwarden.model import Cgroup, HierarchyKind, OomControl, Snapshot
from oomwarden.observer import ObservedKill, ObserverSource
from oomwarden.observer import open_source as open_observer
from oomwarden.policy.api import Action, Event, KillCgroup, KillProcess, Policy
from oomwarden.policy.budget import signal_guard
from oomwarden.policy.decide import DEFAULT_BUDGET_S, decide
from oomwarden.policy.engine import cgroup_domain, system_domain
from oomwarden.policy.history import HISTORY_S, History, history_for
from oomwarden.queues import CgroupEntry, ProcessEntry, VictimQueue
from oomwarden.sources import bpf as bpf_source
from oomwarden.sources.cgroupfs import find_hierarchies
from oomwarden.sources.fsmagic import is_cgroup_fs
from oomwarden.sources.parse import parse_oom_control, parse_proc_cgroup, parse_stat
from oomwarden.sources.procfs import ReadOptions, read_system
from oomwarden.sources.snapshot import SourceConfig, build_snapshot, choose_source
from oomwarden.triggers import (
    EventsSource,
    KernelKill,
    KmsgSource,
    MarginSource,
    PressureLevelSource,
    PsiSource,
    Source,
    TriggerError,
    TriggerGone,
    V1EventSource,
    V2MarginSource,
)
from oomwarden.watchdog import (
    DEFAULT_STATE_FILE,
    StateError,
    remove_state,
    restore,
    restore_state,
    write_state,
)

#: How often a cgroup handed to the kernel is checked for the end of its OOM.
HANDBACK_POLL_S = 0.1
#: How long the loop sleeps at most with nothing to do (it wakes on events).
IDLE_S = 1.0
MCL_CURRENT, MCL_FUTURE = 1, 2
#: The warm-up decision's budget.
WARM_UP_BUDGET_S = 0.05
#: An OOM event's decision and hooks, at most (the cgroup is paused meanwhile).
EVENT_BUDGET_S = 1.0
#: After the actions, how long the OOM may take to clear before the kernel
#: is handed the rest.
SETTLE_S = 0.5
#: vmpressure events and memory.events counts from before a kill may arrive
#: after it.
VMPRESSURE_LAG_S = 1.0
#: How many decisions ``status`` shows.
LAST_DECISIONS = 20
#: How long one round of the control socket may take in the loop.
CONTROL_BUDGET_S = 0.01
#: How long /dev/kmsg gets to name a kill memory.events counted.
KILLS_SETTLE_S = 0.5
#: A cgroup handed to the kernel is taken back after the kernel killed, or
#: after it stayed out of its OOM this long.
TAKE_BACK_QUIET_S = 1.0
#: The exit status when the daemon had to stop on an error.
EXIT_FAILED = 2
#: How long the watchdog may take to say it is armed.
WATCHDOG_ARM_S = 10.0
_libc = ctypes.CDLL(None, use_errno=True)
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")

#: Growth policies: a snapshot every HISTORY_S, the last few kept.
HISTORY_KEPT = 3
#: The threshold checks: at least this far apart, and the memory fill rate
#: earlyoom assumes when it spaces its checks (bytes per second).
THRESHOLD_MIN_S = 0.1
FILL_RATE = 6e9


class DaemonError(OomwardenError):
    """The daemon cannot start (a watch that cannot be set up)."""


#: PSI on the whole system.
SYSTEM_PSI = "/proc/pressure/memory"
#: An ``oom`` event met by a cooldown (the last victims' memory not gone
#: yet) is checked again this often, for at most EVENT_BUDGET_S: the cgroup's
#: tasks are paused meanwhile.
RECHECK_S = 0.02


@dataclass
class WatchSpec:
    """One watched memory cgroup, as the configuration gives it."""

    cgroup: str
    policy: Policy
    sigterm_grace_s: float = 0.0
    cooldown_s: float = 5.0
    dry_run: bool = False
    triggers: tuple[str, ...] = ("oom",)
    pressure: Pressure | None = None
    margin_percent: float | None = None
    high_guard_percent: float | None = None


@dataclass
class SystemSpec:
    """The system domain: earlyoom's MemAvailable / SwapFree levels
    (``threshold``) and system-wide PSI (``pressure``)."""

    policy: Policy
    threshold: Threshold | None
    sigterm_grace_s: float = 0.0
    cooldown_s: float = 5.0
    dry_run: bool = False
    pressure: Pressure | None = None


@dataclass
class _Cooldown:
    """After a decision in a domain, no other kill there until its effect is
    in, or ``seconds`` pass. The effect is in when the victims' memory is gone
    (they exited, or ``process_mrelease`` freed it) and, for the pre-OOM
    triggers, the domain's exact conditions (margin, threshold) no longer hold
    right after the actions: a kill that left them holding (the memory is in
    tmpfs, or another process) waits out the whole cooldown instead of being
    followed by one kill after another. PSI (``lag_until``) also waits one
    window after any kill: its figures still hold the stalls from before."""

    seconds: float
    until: float = 0.0
    lag_until: float = 0.0
    victims: tuple[tuple[int, int], ...] = ()
    memory_gone: bool = True
    #: The conditions no longer held after the actions.
    resolved: bool = True
    #: The last action was SIGTERM only (earlyoom's first level): reaching
    #: the kill level may escalate at once.
    term_only: bool = False
    dry: bool = False

    def start(self, results: list[Result], *, lag_s: float, resolved: bool,
              term_only: bool = False) -> None:
        now = time.monotonic()
        kills = [r for r in results if r.ok and r.killed]
        self.until = now + self.seconds
        self.lag_until = now + min(lag_s, self.seconds) if kills else now
        self.victims = tuple(v for r in kills for v in r.victims)
        self.memory_gone = all(r.exited or r.released_ns is not None for r in kills)
        self.resolved = resolved
        self.term_only = term_only
        self.dry = False

    def start_dry(self) -> None:
        """A dry run's decision: nothing exits, so the whole cooldown holds
        (the log does not repeat the same decision at every firing)."""
        self.until = time.monotonic() + self.seconds
        self.dry = True

    def holds(self, trigger: str, escalate: bool = False) -> bool:
        now = time.monotonic()
        if now >= self.until:
            return False
        if self.dry:
            return True
        if escalate and self.term_only:
            return False
        if trigger in ("pressure", "events") and now < self.lag_until:
            return True
        if not self.memory_gone and all(_gone(pid, start) for pid, start in self.victims):
            self.memory_gone = True
        if trigger == "oom":  # exact: a new event is a new OOM
            return not self.memory_gone
        return not (self.memory_gone and self.resolved)


@dataclass
class _System:
    spec: SystemSpec
    cooldown: _Cooldown
    sources: list[Source] = field(default_factory=list)
    next_check: float = 0.0
    decisions: int = 0

    @property
    def name(self) -> str:
        return "system"

    @property
    def dry(self) -> bool:
        return self.spec.dry_run


@dataclass
class _Watch:
    spec: WatchSpec
    path: str  # inside the hierarchy
    fs_path: str
    inode: int
    cooldown: _Cooldown
    kind: HierarchyKind = HierarchyKind.V1
    #: v2 memory.high guard: the value to write back on exit (None: not set).
    high_restore: str | None = None
    #: The ``oom`` trigger's eventfd (-1: no ``oom``).
    event_fd: int = -1
    sources: list[Source] = field(default_factory=list)
    paused: bool = False  # we set oom_kill_disable=1
    handed_over: bool = False
    decisions: int = 0
    #: An ``oom`` event deferred by the cooldown: when to look again, and
    #: until when at most.
    recheck_at: float | None = None
    recheck_until: float = 0.0
    recheck_event_ns: int = 0
    #: The kernel's kill count when the OOM was handed over, and since when
    #: the cgroup has been out of its OOM.
    handed_kills: int | None = None
    quiet_since: float | None = None
    #: Kernel kills named (BPF observer or /dev/kmsg) since the last reconciliation, and
    #: when memory.events first showed kills not yet reconciled.
    kmsg_kills: int = 0
    kills_seen_at: float | None = None

    @property
    def name(self) -> str:
        return f"cgroup:{self.path}"

    @property
    def dry(self) -> bool:
        return self.spec.dry_run

    @property
    def oom_control(self) -> str:
        return os.path.join(self.fs_path, "memory.oom_control")


@dataclass
class Warden:
    """The daemon. ``run()`` stays in the foreground until SIGTERM/SIGINT."""

    specs: list[WatchSpec]
    decision_log: str
    systems: list[SystemSpec] = field(default_factory=list)
    budget_s: float = DEFAULT_BUDGET_S
    dry_run: bool = False
    stderr: TextIO = field(default_factory=lambda: sys.stderr)
    watches: list[_Watch] = field(default_factory=list)
    _systems: list[_System] = field(default_factory=list)
    _watchdog: subprocess.Popen[bytes] | None = None
    _stop: bool = False
    _log: TextIO | None = None
    #: The snapshots growth policies compare with: taken every HISTORY_S while
    #: some watch needs them; the decision uses the newest one at least
    #: HISTORY_S old.
    _history: list[Snapshot] = field(default_factory=list)
    _next_history: float = 0.0
    #: Builds the daemon anew from the config file (SIGHUP); None: no reload.
    reload: Callable[[], Warden] | None = None
    _reload_wanted: bool = False
    lock_memory: bool = True
    _warned: set[str] = field(default_factory=set)
    _next_ping: float = 0.0
    _exit_code: int = 0
    _epoll: select.epoll | None = None
    #: Victims queued ahead of time (the control socket fills it).
    queue: VictimQueue = field(default_factory=VictimQueue)
    #: The control socket's path (None: not served), the config file (None:
    #: the built-in defaults), for ``status``.
    control_socket: str | None = None
    config_path: str | None = None
    started_ns: int = field(default_factory=time.time_ns)
    #: The last decisions, summed up for ``status``; the kernel's kills per
    #: domain since start.
    last_decisions: deque[dict[str, Any]] = field(
        default_factory=lambda: deque(maxlen=LAST_DECISIONS))
    kernel_kill_counts: dict[str, int] = field(default_factory=dict)
    _control: ControlServer | None = None
    #: The kernel's own OOM kills, read from /dev/kmsg (None: unreadable,
    #: or the BPF observer is in use).
    _kmsg: KmsgSource | None = None
    #: The kernel's own OOM kills, seen by BPF (None: not loaded; /dev/kmsg).
    _observer: ObserverSource | None = None
    #: Where snapshots come from (``SourceConfig.source``): the BPF task
    #: iterator where it loads, else procfs (docs/bpf.md).
    snapshot_source: Literal["auto", "procfs", "bpf"] = "auto"
    #: What the BPF parts are doing, for ``status`` (:meth:`bpf_status`):
    #: name -> {"in_use": bool, "detail": one line}.
    bpf_parts: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: Lists the paused cgroups for ``oomwarden restore`` (None: none kept).
    state_file: str | None = DEFAULT_STATE_FILE
    _state_written: bool = False
    #: fd -> what it stands for: None (the signal pipe), a watch (its ``oom``
    #: eventfd), or (owner, source).
    _fds: dict[int, Any] = field(default_factory=dict)

    def _sources(self, **kw: Any) -> SourceConfig:
        """A snapshot's sources, with the daemon's task source."""
        return SourceConfig(source=self.snapshot_source, **kw)

    def _choose_snapshot_source(self) -> None:
        """Say once, at start, where the tasks come from (and why not BPF)."""
        try:
            choice = choose_source(self._sources())
        except BpfError as e:
            raise DaemonError(f"the BPF snapshot source cannot be had: {e}") from None
        if choice.backend == "bpf":
            detail = f"BPF task iterator ({os.path.basename(bpf_source.load().object_path)})"
        else:
            detail = choice.reason or "procfs (as configured)"
            if choice.reason:
                self._warn_once("bpf-snapshot", choice.reason)
        self.bpf_parts["snapshot"] = {"in_use": choice.backend == "bpf", "detail": detail}

    def bpf_status(self) -> dict[str, dict[str, Any]]:
        """The BPF parts for ``status`` (docs/control.md): each one's name,
        whether it is in use, and one line saying what it does or why not."""
        return {name: dict(part) for name, part in self.bpf_parts.items()}

    # -- set-up -------------------------------------------------------------------------

    def start(self) -> None:
        """Set every watch up, or none (a failure undoes what was done)."""
        # BPF OOM struct_ops (docs/bpf-oom.md): detected for status, never loaded yet.
        self.bpf_parts["struct_ops"] = detect_bpf_oom().status_part()
        self._protect_self()
        self._restore_leftovers()
        self._choose_snapshot_source()
        try:
            os.makedirs(os.path.dirname(self.decision_log) or ".", exist_ok=True)
            self._log = open(self.decision_log, "a", buffering=1)  # noqa: SIM115
        except OSError as e:
            raise DaemonError(f"cannot open the decision log {self.decision_log}: "
                              f"{e.strerror}") from None
        try:
            snapshot = build_snapshot(self._sources())
            self._warm_up(snapshot)
            for spec in self.specs:
                self.watches.append(self._watch(spec, snapshot))
            for sys_spec in self.systems:
                self._systems.append(self._system(sys_spec))
            if self.watches or self._systems:
                # The kernel's own kills: the BPF observer where it loads,
                # else /dev/kmsg (docs/bpf.md, "The observer").
                self._observer, why = open_observer()
                self.bpf_parts["observer"] = {"in_use": self._observer is not None,
                                              "detail": why}
                if self._observer is None:
                    self._warn_once("observer", f"BPF OOM observer not used: {why}; the "
                                    "kernel's OOM kills are read from /dev/kmsg")
                    try:
                        self._kmsg = KmsgSource.open()
                    except TriggerError as e:
                        self._warn_once("kmsg", f"cannot read the kernel's log ({e}): its own "
                                        "OOM kills are logged from memory.events counts only "
                                        "(cgroup v2), without the victim")
            live = [w for w in self.watches if not (self.dry_run or w.spec.dry_run)]
            to_pause = [w for w in live if w.event_fd >= 0]
            guards = [(w, g) for w in live if (g := self._plan_guard(w)) is not None]
            if to_pause or guards:
                # The watchdog is armed and the state file written *before*
                # the first cgroup is paused or guarded: from the first write
                # on, a dead warden is covered.
                self._arm_watchdog([w.fs_path for w in to_pause]
                                   + [f"high:{w.high_restore}:{w.inode}:{w.fs_path}"
                                      for w, _ in guards])
                self._write_state([(w.fs_path, w.inode, None) for w in to_pause]
                                  + [(w.fs_path, w.inode, w.high_restore) for w, _ in guards])
                for w, guard in guards:
                    with open(os.path.join(w.fs_path, "memory.high"), "w") as f:
                        f.write(str(guard))
                for w in to_pause:
                    self._write_disable(w, "1")
                    w.paused = True
        except OSError as e:
            self.stop()
            raise DaemonError(f"cannot set the watches up: {e.strerror or e}") from None
        except BaseException:
            self.stop()
            raise

    def _arm_watchdog(self, cgroup_dirs: list[str]) -> None:
        self._watchdog = subprocess.Popen(
            [sys.executable, "-m", "oomwarden.watchdog", str(os.getpid()), *cgroup_dirs],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, start_new_session=True,
        )
        assert self._watchdog.stdout is not None
        ready, _, _ = select.select([self._watchdog.stdout], [], [], WATCHDOG_ARM_S)
        line = self._watchdog.stdout.readline() if ready else b""
        if line.strip() != b"watching":
            raise DaemonError("the watchdog did not start: the kernel's killer is left in "
                              "charge")

    def _restore_leftovers(self) -> None:
        """A state file left by a warden killed with its watchdog (and no
        ``oomwarden restore`` since): restore what it lists before anything
        is read as "the original value"."""
        if self.state_file is None or self._state_written:
            return
        try:
            restored, skipped = restore_state(self.state_file)
        except StateError as e:
            if e.running:
                raise DaemonError(f"{e}: give this warden another --state-file") from None
            raise DaemonError(f"{e}: check it, then remove it (or run `oomwarden restore`)"
                              ) from None
        for what in restored:
            self._say(f"left over by a warden that was killed: restored {what}")
        for why in skipped:
            self._say(f"left over by a warden that was killed: skipped {why}")

    def _write_state(self, cgroups: list[tuple[str, int, str | None]]) -> None:
        if self.state_file is None:
            return
        try:
            write_state(self.state_file, cgroups)
            self._state_written = True
        except OSError as e:
            self._warn_once("state", f"cannot write the state file {self.state_file} "
                            f"({e.strerror}): if the warden and its watchdog are killed "
                            "together, the paused cgroups stay paused until restored by hand")

    @staticmethod
    def _write_disable(w: _Watch, value: str) -> None:
        with open(w.oom_control, "w") as f:
            f.write(value)

    def _protect_self(self) -> None:
        """Lock the warden's memory and exempt it from the kernel's killer,
        where permitted; say once where not."""
        if self.lock_memory and _libc.mlockall(MCL_CURRENT | MCL_FUTURE) != 0:
            self._warn_once("mlock", "cannot lock its memory (mlockall: "
                            f"{os.strerror(ctypes.get_errno())}): it may be paged out")
        try:
            with open("/proc/self/oom_score_adj", "w") as f:
                f.write("-1000")
        except OSError as e:
            self._warn_once("adj", f"cannot set its oom_score_adj to -1000 ({e.strerror}; "
                            "CAP_SYS_RESOURCE is missing): the kernel may kill the warden")

    def _warm_up(self, snapshot: Snapshot) -> None:
        """One decision per policy on the start's snapshot, so that nothing
        is imported or first compiled on the OOM path."""
        policies = [s.policy for s in self.specs] + [t.policy for t in self.systems]
        for policy in {id(p): p for p in policies}.values():
            # bounded: a slow policy must not hold up the start
            decide(snapshot, system_domain(snapshot), policy, guard=signal_guard,
                   budget_s=min(self.budget_s, WARM_UP_BUDGET_S))

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            self._say(message)

    def _notify(self, message: str) -> None:
        """sd_notify, where systemd asked for it (NOTIFY_SOCKET)."""
        target = os.environ.get("NOTIFY_SOCKET")
        if not target:
            return
        address = "\0" + target[1:] if target.startswith("@") else target
        with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX,
                                                         socket.SOCK_DGRAM) as sock:
            sock.sendto(message.encode(), address)

    def _watchdog_ping(self) -> None:
        usec = os.environ.get("WATCHDOG_USEC")
        if not usec or not usec.isdigit():
            return
        now = time.monotonic()
        if now >= self._next_ping:
            self._notify("WATCHDOG=1")
            self._next_ping = now + int(usec) / 2e6

    def _reload(self) -> str | None:
        """SIGHUP (or ``reload`` on the control socket): the config anew. A
        bad config keeps the old one running. Returns why it failed, or None."""
        if self.reload is None:
            self._say("SIGHUP: no config file to reload")
            return "no config file to reload"
        try:
            fresh = self.reload()
            # The new watches are checked before the running ones are given
            # up: a cgroup that is gone or not watchable keeps the old config.
            snapshot = build_snapshot(self._sources())
            for spec in fresh.specs:
                self._check_watch(spec, snapshot)
        except OomwardenError as e:
            self._say(f"reload failed, keeping the running config: {e}")
            return str(e)
        self._unregister_all()
        self.stop()
        self.specs, self.systems = fresh.specs, fresh.systems
        self.decision_log, self.budget_s = fresh.decision_log, fresh.budget_s
        try:
            self.start()
        except OomwardenError as e:
            self._say(f"reload failed while setting up, the kernel's killer is in charge: {e}")
            self._stop = True
            self._exit_code = EXIT_FAILED
            return f"failed while setting up, the warden stops: {e}"
        self._register_all()
        self._say(f"reloaded: {self._summary()}")
        return None

    @staticmethod
    def _check_watch(spec: WatchSpec, snapshot: Any) -> Cgroup:
        """Everything a watch needs, without touching the cgroup: run on a
        reload before the running watches are given up."""
        cg = resolve_cgroup(snapshot, spec.cgroup)
        if not cg.memory_controller:
            raise DaemonError(f"{spec.cgroup}: not a memory cgroup (found {cg.name}, without "
                              "the memory controller)")
        if cg.kind is HierarchyKind.V1 and "events" in spec.triggers:
            raise DaemonError(f"{spec.cgroup}: the 'events' trigger reads memory.events, "
                              "which a cgroup v1 memory cgroup lacks (use 'oom', 'pressure' "
                              "or 'margin')")
        if not cg.verified:
            raise DaemonError(f"{cg.fs_path} is not on a cgroup filesystem: its limit "
                              "limits nothing")
        if cg.path == "/":
            raise DaemonError("the root memory cgroup has no limit of its own")
        own, own2 = _own_cgroups()
        if (spec.high_guard_percent is not None and cg.kind is HierarchyKind.V2
                and within(own2, cg.path)):
            raise DaemonError(f"{spec.cgroup}: the warden itself runs in {own2}: a memory.high "
                              "guard there would throttle the warden with the others")
        if "oom" in spec.triggers and cg.kind is HierarchyKind.V1 and within(own, cg.path):
            raise DaemonError(f"{spec.cgroup}: the warden itself runs in {own}: at that "
                              "cgroup's limit it would be paused with the others")
        return cg

    def _watch(self, spec: WatchSpec, snapshot: Any) -> _Watch:
        cg = self._check_watch(spec, snapshot)
        w = _Watch(spec, cg.path, cg.fs_path, cg.inode, _Cooldown(spec.cooldown_s), cg.kind)
        if cg.kind is HierarchyKind.V2:
            try:
                self._watch_v2(w)
            except (TriggerError, OSError) as e:
                _close_watch(w)
                why = e.strerror if isinstance(e, OSError) else str(e)
                raise DaemonError(f"{spec.cgroup}: {why}") from None
            except BaseException:
                _close_watch(w)
                raise
            return w
        try:
            if "oom" in spec.triggers:
                self._watch_oom(w)
            if "pressure" in spec.triggers:
                w.sources.extend(self._cgroup_pressure(w, spec.pressure or Pressure()))
            if "margin" in spec.triggers:
                w.sources.append(MarginSource.open(cg.fs_path, cg.inode,
                                                   spec.margin_percent or 5.0))
        except (TriggerError, DaemonError) as e:
            _close_watch(w)
            raise DaemonError(f"{spec.cgroup}: {e}") from None
        except BaseException:
            _close_watch(w)
            raise
        return w

    def _watch_v2(self, w: _Watch) -> None:
        """cgroup v2: the kernel's killer cannot be paused, so ``oom`` stands
        for the pre-OOM signals: memory.events (high, max, oom), PSI (the
        watch's levels or the defaults) and the margin (its percent or 5 %)."""
        spec = w.spec
        oom = "oom" in spec.triggers
        # Always open: its oom_kill count logs the kernel's kills; it fires
        # only with "events" (or "oom").
        w.sources.append(EventsSource.open(w.fs_path, fires=oom or "events" in spec.triggers))
        if oom or "pressure" in spec.triggers:
            for line in (spec.pressure or Pressure()).trigger_lines():
                w.sources.append(PsiSource.open(os.path.join(w.fs_path, "memory.pressure"),
                                                line))
        if oom or "margin" in spec.triggers:
            w.sources.append(V2MarginSource.open(w.fs_path, spec.margin_percent or 5.0))

    def _plan_guard(self, w: _Watch) -> int | None:
        """The memory.high guard: ``high_guard_percent`` below memory.max,
        only if lower than what is there. Returns the value to write (the old
        one is kept in ``high_restore``), None for no guard. Nothing is
        written here: the watchdog and the state file cover it first."""
        percent = w.spec.high_guard_percent
        if percent is None or w.kind is not HierarchyKind.V2:
            return None
        with open(os.path.join(w.fs_path, "memory.max")) as f:
            limit = f.read().strip()
        with open(os.path.join(w.fs_path, "memory.high")) as f:
            old = f.read().strip()
        if limit == "max":
            self._say(f"{w.name}: no memory.high guard: memory.max is not set")
            return None
        guard = int(int(limit) * (1 - percent / 100)) // PAGE_SIZE * PAGE_SIZE
        if old != "max" and int(old) <= guard:
            self._say(f"{w.name}: memory.high is {old} already, at or below the guard")
            return None
        w.high_restore = old
        return guard

    @staticmethod
    def _restore_guard(w: _Watch) -> None:
        """memory.high back, if the cgroup is still the one guarded (inode)."""
        if w.high_restore is None:
            return
        if _same_cgroup(w):
            with contextlib.suppress(OSError), open(os.path.join(w.fs_path, "memory.high"),
                                                    "w") as f:
                f.write(w.high_restore)
        w.high_restore = None

    @staticmethod
    def _watch_oom(w: _Watch) -> None:
        w.event_fd = V1EventSource.register(w.fs_path, "memory.oom_control", "")

    def _cgroup_pressure(self, w: _Watch, pressure: Pressure) -> list[Source]:
        """PSI from the cgroup2 twin where there is one, else vmpressure."""
        twin = _cgroup2_twin(w.path)
        if twin is not None:
            out: list[Source] = []
            try:
                for line in pressure.trigger_lines():
                    out.append(PsiSource.open(os.path.join(twin, "memory.pressure"), line))
            except BaseException:
                for src in out:
                    src.close()
                raise
            return out
        self._say(f"{w.name}: no cgroup2 twin with PSI (a v1 memory cgroup has none of its "
                  "own): 'pressure' uses memory.pressure_level at 'critical' (reclaim "
                  "failing) instead of the PSI levels")
        return [PressureLevelSource.open(w.fs_path, w.inode)]

    def _system(self, spec: SystemSpec) -> _System:
        owner = _System(spec, _Cooldown(spec.cooldown_s))
        if spec.pressure is not None:
            try:
                for line in spec.pressure.trigger_lines():
                    owner.sources.append(PsiSource.open(SYSTEM_PSI, line))
            except TriggerError as e:
                for src in owner.sources:
                    src.close()
                raise DaemonError(f"system: {e}") from None
        return owner

    # -- the loop -------------------------------------------------------------------------

    def _summary(self) -> str:
        n_cg = len(self.watches)
        kinds = sorted({t for w in self.watches for t in w.spec.triggers})
        parts = [f"watching {n_cg} memory cgroup{'s' if n_cg != 1 else ''}"
                 + (f" ({', '.join(kinds)})" if kinds else "")]
        for sysw in self._systems:
            what = [x for x, on in (("threshold", sysw.spec.threshold is not None),
                                    ("pressure", sysw.spec.pressure is not None)) if on]
            parts.append(f"the system ({', '.join(what)})")
        return " and ".join(parts)

    def _register(self, fd: int, mask: int, data: Any) -> None:
        assert self._epoll is not None
        self._epoll.register(fd, mask)
        self._fds[fd] = data

    def _register_all(self) -> None:
        for w in self.watches:
            if w.event_fd >= 0:
                self._register(w.event_fd, select.EPOLLIN, w)
            for src in w.sources:
                if src.fd >= 0:  # (a source without an fd is polled only)
                    self._register(src.fd, src.mask, (w, src))
        for sysw in self._systems:
            for src in sysw.sources:
                self._register(src.fd, src.mask, (sysw, src))
        if self._kmsg is not None:
            self._register(self._kmsg.fd, self._kmsg.mask, self._kmsg)
        if self._observer is not None:
            self._register(self._observer.fd, self._observer.mask, self._observer)
        for entry in self.queue.entries:
            if isinstance(entry, ProcessEntry):
                self._register(entry.pidfd, select.EPOLLIN, entry)

    def _unregister_all(self) -> None:
        """Every watch's fds out of the loop (the signal pipe and the control
        socket stay: they outlive a reload)."""
        assert self._epoll is not None
        for fd, data in list(self._fds.items()):
            if data is not None and not isinstance(data, ControlServer):
                with contextlib.suppress(OSError, ValueError):
                    self._epoll.unregister(fd)
                del self._fds[fd]

    def _drop_source(self, owner: _Watch | _System, src: Source, why: str) -> None:
        if src not in owner.sources:
            return
        self._unwatch_fd(src.fd)
        src.close()
        owner.sources.remove(src)
        self._say(f"{owner.name}: {src.trigger} trigger stopped: {why}")

    def _drop_watch(self, w: _Watch, why: str) -> None:
        for fd in [w.event_fd, *(src.fd for src in w.sources)]:
            self._unwatch_fd(fd)
        _close_watch(w)
        w.paused = False
        self.watches.remove(w)
        self._say(f"{w.name}: stopped watching: {why}")

    def _timeout(self) -> float:
        now = time.monotonic()
        timeout = (HANDBACK_POLL_S if any(w.handed_over for w in self.watches) else IDLE_S)
        for w in self.watches:
            if w.recheck_at is not None:
                timeout = min(timeout, w.recheck_at - now)
            if w.kills_seen_at is not None:
                timeout = min(timeout, w.kills_seen_at + KILLS_SETTLE_S - now)
            for src in w.sources:
                if src.next_poll is not None:
                    timeout = min(timeout, src.next_poll - now)
        for sysw in self._systems:
            if sysw.spec.threshold is not None:
                timeout = min(timeout, sysw.next_check - now)
        if self._needs_history():
            timeout = min(timeout, self._next_history - now)
        if self._control is not None:
            deadline = self._control.next_deadline()
            if deadline is not None:
                timeout = min(timeout, deadline - now)
        return max(0.0, timeout)

    def run(self) -> int:
        # Handlers first: a SIGTERM while the watches are set up ends the run
        # through stop(), which restores what was done.
        read_end, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT,
                                                       signal.SIGHUP)}

        def wake(signum: int, _frame: FrameType | None) -> None:
            if signum in (signal.SIGTERM, signal.SIGINT):
                self._stop = True
            elif signum == signal.SIGHUP:
                self._reload_wanted = True

        def restore_signals() -> None:
            signal.set_wakeup_fd(old_wakeup)
            for s, handler in previous.items():
                signal.signal(s, handler)
            os.close(read_end)
            os.close(write_end)

        old_wakeup = signal.set_wakeup_fd(write_end)
        for s in previous:
            signal.signal(s, wake)
        try:
            self.start()
        except BaseException:
            restore_signals()
            raise
        self._epoll = select.epoll()
        self._register(read_end, select.EPOLLIN, None)
        self._register_all()
        if self.control_socket is not None:
            try:
                self._control = ControlServer(self.control_socket, WardenControl(self),
                                              log=self._say)
            except (ControlError, OSError) as e:
                self.stop()
                self._epoll.close()
                self._epoll = None
                restore_signals()
                raise DaemonError(f"cannot serve the control socket: {e}") from None
            self._register(self._control.fileno(), select.EPOLLIN, self._control)
            self._say(f"serving the control socket at {self.control_socket}")
        self._say(self._summary()
                  + (" (dry run: the kernel's killer stays in charge)" if self.dry_run else ""))
        self._notify("READY=1")
        try:
            while not self._stop:
                if self._reload_wanted:
                    self._reload_wanted = False
                    self._reload()
                self._watchdog_ping()
                try:
                    ready = self._epoll.poll(self._timeout())
                except InterruptedError:
                    ready = []
                for fd, events in ready:
                    self._dispatch(fd, events, read_end)
                self._take_back()
                self._due()
        finally:
            self.stop()  # before the default handlers are back
            if self._control is not None:
                self._control.close()
                self._control = None
            self.queue.close()
            self._epoll.close()
            self._epoll = None
            self._fds.clear()
            restore_signals()
        return self._exit_code

    def _dispatch(self, fd: int, events: int, read_end: int) -> None:
        if fd not in self._fds:
            return  # dropped earlier in this round
        data = self._fds[fd]
        if data is None:
            with contextlib.suppress(OSError):
                os.read(read_end, 512)
            return
        if isinstance(data, _Watch):
            try:
                self._on_oom_event(data)
            except Exception as e:
                self._hand_over(data, f"internal error: {type(e).__name__}: {e}")
            return
        if isinstance(data, ProcessEntry):
            self._queued_exited(data)
            return
        if isinstance(data, ControlServer):
            data.handle(CONTROL_BUDGET_S)
            return
        if isinstance(data, KmsgSource | ObserverSource):
            data.fired(events)
            for kill in data.kills:
                self._kernel_kill(kill)
            data.kills.clear()
            return
        owner, src = data
        try:
            detail = src.fired(events)
        except TriggerGone as e:
            self._drop_source(owner, src, str(e))
            return
        except OSError as e:
            self._say(f"{owner.name}: {src.trigger} trigger failed to read: {e}")
            return
        if isinstance(src, EventsSource) and src.kernel_kills and isinstance(owner, _Watch) \
                and owner.kills_seen_at is None:
            owner.kills_seen_at = time.monotonic()  # reconciled in _due
        self._fire(owner, src.trigger, detail)

    def _reconcile_kills(self, w: _Watch) -> None:
        """memory.events oom_kill rose by N; the BPF observer or /dev/kmsg
        named M of those kills in this domain. After KILLS_SETTLE_S (the
        kernel prints the kill after it counts it), the N - M kills not named
        are logged without a victim: the kernel prints one ``oom-kill:`` line
        per OOM, not per member of a ``memory.oom.group``, and rate-limits
        them (the observer names every member)."""
        events = next((src for src in w.sources if isinstance(src, EventsSource)), None)
        if events is None or w.kills_seen_at is None:
            return
        if time.monotonic() - w.kills_seen_at < KILLS_SETTLE_S:
            return
        unnamed = events.kernel_kills - w.kmsg_kills
        if unnamed > 0:
            self._record_kernel_kill(w, None, unnamed)
        events.kernel_kills = 0
        w.kmsg_kills = 0
        w.kills_seen_at = None

    def _queued_exited(self, entry: ProcessEntry) -> None:
        """A queued process exited before any OOM needed it: it leaves the
        queue, and the log says so."""
        self._unwatch_fd(entry.pidfd)
        if entry in self.queue.entries:
            self.queue.exited(entry)
        self._say(f"{entry.domain}: queue entry {entry.id}: pid {entry.pid} ({entry.comm}) "
                  "exited; it leaves the queue")
        self._write_record({"domain": entry.domain, "trigger": "queue", "policy": "queue",
                            "victim": None, "event_detail": f"queue entry {entry.id}: pid "
                            f"{entry.pid} ({entry.comm}) exited; it leaves the queue",
                            "queue": {"head": None, "skipped": [{**entry.describe(),
                                                                 "fate": "exited"}]},
                            "time_ns": {"event": time.time_ns()}, "actions": [],
                            "results": [], "dry_run": self.dry_run})

    def _kernel_kill(self, kill: KernelKill) -> None:
        """A kill the kernel made: logged in the deepest watched domain that
        holds the limit it was made at (``oom_memcg``) or the victim
        (``task_memcg``: a limit above the domain, or a global OOM); a global
        OOM's kill that no watched cgroup holds, in the system domain where
        one is watched; kills elsewhere are not ours to log."""
        inside = [w for w in self.watches
                  if any(path and within(path, w.path)
                         for path in (kill.oom_memcg, kill.task_memcg))]
        if inside:
            w = max(inside, key=lambda w: len(w.path))
            w.kmsg_kills += 1
            self._record_kernel_kill(w, kill, 1)
        elif self._systems and kill.constraint not in ("", "CONSTRAINT_MEMCG") \
                and not kill.oom_memcg:
            # (a memcg OOM whose cgroup is gone by now has no path: not global)
            self._record_kernel_kill(self._systems[0], kill, 1)

    def _record_kernel_kill(self, w: _Watch | _System, kill: KernelKill | None,
                            count: int) -> None:
        now = time.time_ns()
        extra: dict[str, Any] = {"source": "kmsg" if kill is not None else "memory.events"}
        if isinstance(kill, ObservedKill):
            detail = f"the kernel killed {kill.detail}"
            victim: dict[str, object] | None = {"pid": kill.pid, "comm": kill.comm,
                                                "cgroup": kill.task_memcg,
                                                **kill.victim_fields()}
            extra = {"source": "bpf", "oom": kill.oom_fields()}
            now = kill.time_ns or now
        elif kill is not None:
            where = (f"at the limit of {kill.oom_memcg}" if kill.oom_memcg
                     else f"in a system-wide OOM ({kill.constraint})")
            detail = (f"the kernel killed pid {kill.pid} ({kill.comm}) of {kill.task_memcg} "
                      f"{where}: {kill.detail}")
            victim = {"pid": kill.pid, "comm": kill.comm, "cgroup": kill.task_memcg}
        else:
            detail = (f"the kernel killed {count} process{'es' if count != 1 else ''} "
                      "(memory.events oom_kill) that /dev/kmsg did not name")
            victim = None
        record: dict[str, Any] = {
            "domain": w.name,
            "hierarchy": w.kind.value if isinstance(w, _Watch) else None,
            "trigger": "kernel_kill", "policy": None, "victim": victim, "kernel_kills": count,
            "event_detail": detail, **extra,
            "dry_run": self.dry_run or w.dry, "actions": [], "results": [],
            "time_ns": {"event": now}}
        self._write_record(record)
        self.kernel_kill_counts[w.name] = self.kernel_kill_counts.get(w.name, 0) + count
        self._say(f"{w.name}: {detail}")

    def _fire(self, owner: _Watch | _System, trigger: str, detail: str | None,
              term_only: bool = False) -> None:
        if detail is None:
            return
        try:
            self._act(owner, trigger, detail, term_only=term_only)
        except Exception as e:  # the warden carries on; the kernel is the safety net
            self._say(f"{owner.name}: {trigger} decision failed: {type(e).__name__}: {e}")

    def _due(self) -> None:
        """What the loop does on an interval: polled sources, deferred OOMs,
        thresholds, history."""
        now = time.monotonic()
        for w in list(self.watches):
            self._reconcile_kills(w)
            if w.recheck_at is not None and now >= w.recheck_at:
                self._recheck_oom(w)
            for src in list(w.sources):
                if isinstance(src, MarginSource) and now >= src.refresh_due:
                    self._rearm(w, src)
                    if src not in w.sources:
                        continue  # dropped: its cgroup is gone
                if src.next_poll is not None and now >= src.next_poll:
                    try:
                        detail = src.poll()
                    except TriggerGone as e:
                        self._drop_source(w, src, str(e))
                        continue
                    self._fire(w, src.trigger, detail)
        for sysw in self._systems:
            if sysw.spec.threshold is not None and time.monotonic() >= sysw.next_check:
                try:
                    self._check_threshold(sysw)
                except Exception as e:
                    self._say(f"threshold check failed: {type(e).__name__}: {e}")
                    sysw.next_check = time.monotonic() + IDLE_S
        if self._needs_history() and time.monotonic() >= self._next_history:
            self._keep_history()
        if self._control is not None:
            deadline = self._control.next_deadline()
            if deadline is not None and time.monotonic() >= deadline:
                self._control.tick(CONTROL_BUDGET_S)

    def _rearm(self, w: _Watch, src: MarginSource) -> None:
        old = src.fd
        try:
            changed = src.rearm()
        except TriggerError as e:
            self._drop_source(w, src, str(e))
            return
        if changed:
            self._fds.pop(old, None)  # closed: epoll forgot it
            self._register(src.fd, src.mask, (w, src))

    # -- acting ---------------------------------------------------------------------------

    def _on_oom_event(self, w: _Watch) -> None:
        event_ns = time.time_ns()
        try:
            os.read(w.event_fd, 8)
        except OSError:
            return
        dry = self.dry_run or w.spec.dry_run
        if not _same_cgroup(w):
            self._drop_watch(w, "the cgroup is gone")
            return
        if not dry and not self._under_oom(w):
            return  # a wake-up without an OOM
        if not dry and w.handed_over:
            return  # the kernel's killer resolves this one
        if not dry and w.cooldown.holds("oom"):
            # The last victims' memory is not gone yet: their exit may end
            # this OOM. Look again shortly (the tasks stay paused), at most
            # for EVENT_BUDGET_S.
            if w.recheck_at is None:
                w.recheck_until = time.monotonic() + EVENT_BUDGET_S
                w.recheck_event_ns = event_ns
            w.recheck_at = time.monotonic() + RECHECK_S
            return
        self._handle_oom(w, event_ns)

    def _recheck_oom(self, w: _Watch) -> None:
        if not self._under_oom(w):
            w.recheck_at = None
            return
        if w.cooldown.holds("oom") and time.monotonic() < w.recheck_until:
            w.recheck_at = time.monotonic() + RECHECK_S
            return
        w.recheck_at = None
        try:
            self._handle_oom(w, w.recheck_event_ns)
        except Exception as e:
            self._hand_over(w, f"internal error: {type(e).__name__}: {e}")

    def _handle_oom(self, w: _Watch, event_ns: int) -> None:
        dry = self.dry_run or w.spec.dry_run
        # In a dry run the kernel's killer was never paused: by now it has
        # usually acted, and the decision shows what the warden would do next.
        usage_before = _usage(w)
        snapshot, cg = self._watched_snapshot(w)
        if cg is None:
            self._hand_over(w, "the watched cgroup changed")
            return
        # The cgroup's tasks are paused while the warden decides: the
        # decision gets at most EVENT_BUDGET_S whatever the configured budget.
        # No SIGTERM grace here: tasks waiting in a v1 OOM sleep killable, a
        # SIGTERM would only wait; hooks get a short leash for the same reason.
        executor = Executor(dry_run=dry, protect=frozenset(self._own_pids()),
                            hook_timeout_s=EVENT_BUDGET_S, domain=("v1", w.path),
                            freeze=False)
        detail = ("memory.oom_control: under_oom (the kernel's killer paused)" if w.paused
                  else "memory.oom_control: OOM notification")
        try:
            decision, results = self._decide_execute(
                w, snapshot, cgroup_domain(snapshot, cg), Event("oom", w.name, detail),
                executor, budget_s=min(self.budget_s, EVENT_BUDGET_S), event_ns=event_ns,
                usage_before=usage_before)
        except Exception as e:
            self._hand_over(w, f"the executor failed: {e}")
            return
        if dry:
            return
        w.cooldown.start(results, lag_s=self._lag(w), resolved=True)
        if not decision.actions or not any(r.ok for r in results):
            self._hand_over(w, "no action succeeded" if decision.actions else
                            "the policy chose nothing")
        elif self._still_under_oom(w):
            self._hand_over(w, "the actions did not end the OOM")

    def _watched_snapshot(self, w: _Watch) -> tuple[Snapshot, Cgroup | None]:
        """A snapshot of the watched cgroup's subtree only, and the watched
        cgroup in it (None: not there, or another cgroup now: another inode)."""
        snapshot = build_snapshot(self._sources(only=(w.kind.value, w.path), cgroup_stat=False,
                                               read=self._read_options(w.spec.policy)))
        cg = snapshot.cgroup(w.kind, w.path)
        return snapshot, cg if cg is not None and cg.inode == w.inode else None

    def _act(self, owner: _Watch | _System, trigger: str, detail: str,
             term_only: bool = False) -> None:
        """A pre-OOM trigger fired: decide and act, unless the domain's
        cooldown holds."""
        if owner.cooldown.holds(trigger, escalate=trigger == "threshold" and not term_only):
            return
        dry = self.dry_run or owner.dry
        event_ns = time.time_ns()
        policy = owner.spec.policy
        if isinstance(owner, _System):
            usage_before = _available()
            snapshot = build_snapshot(self._sources(read=self._read_options(policy)))
            domain = system_domain(snapshot)
            confine = None
        else:
            usage_before = _usage(owner)
            snapshot, cg = self._watched_snapshot(owner)
            if cg is None:
                if not _same_cgroup(owner):
                    self._drop_watch(owner, "the cgroup is gone")
                else:
                    self._say(f"{owner.name}: {trigger} fired, but the cgroup could not be read")
                return
            domain = cgroup_domain(snapshot, cg)
            confine = (owner.kind.value, owner.path)
        # One loop: while cgroups are paused at their limit (``oom``), nothing
        # here may wait longer than an OOM event's own budget.
        paused = any(w.paused for w in self.watches)
        grace = owner.spec.sigterm_grace_s
        executor = Executor(dry_run=dry,
                            sigterm_grace_s=min(grace, EVENT_BUDGET_S) if paused else grace,
                            term_only=term_only, protect=frozenset(self._own_pids()),
                            hook_timeout_s=EVENT_BUDGET_S if paused else HOOK_TIMEOUT_S,
                            domain=confine)
        _decision, results = self._decide_execute(
            owner, snapshot, domain, Event(trigger, owner.name, detail), executor,
            budget_s=self.budget_s, event_ns=event_ns, usage_before=usage_before)
        if dry:
            owner.cooldown.start_dry()
        else:
            owner.cooldown.start(results, lag_s=self._lag(owner),
                                 resolved=not self._conditions_hold(owner),
                                 term_only=term_only)

    def _decide_execute(self, owner: _Watch | _System, snapshot: Snapshot, domain: Domain,
                        event: Event, executor: Executor, *, budget_s: float, event_ns: int,
                        usage_before: int | None) -> tuple[Decision, list[Result]]:
        """Decide, act, log. A handler whose actions freed nothing (no kill,
        no bytes, the domain's memory no better) is followed by the per-task
        selection of the same policy (DESIGN.md: the fallback), decided, acted
        on and logged as a second record. Returns the last decision and every
        result. The domain's victim queue goes first: its oldest live entry is
        killed before any policy runs."""
        queued = self._from_queue(owner, domain, event, executor, event_ns=event_ns,
                                  usage_before=usage_before)
        if queued is not None:
            return queued
        policy = owner.spec.policy
        history = self._history_for(snapshot, policy)
        decision = decide(snapshot, domain, policy, history=history, event=event,
                          guard=signal_guard, budget_s=budget_s)
        decided_ns = time.time_ns()
        results = executor.run(decision.actions, self._hook_env(decision))
        owner.decisions += 1
        after = self._memory(owner)
        dry = executor.dry_run
        self._record(owner.name, decision, results, (event_ns, decided_ns, time.time_ns()),
                     dry=dry, usage=(usage_before, after), detail=event.detail)
        handled = policy.handle is not None and decision.victim is None and decision.actions
        if not handled or dry or _progress(results, usage_before, after,
                                           system=isinstance(owner, _System)):
            return decision, results
        event_ns = time.time_ns()
        fallback = decide(snapshot, domain, dataclasses.replace(policy, handle=None),
                          history=history, event=event, guard=signal_guard,
                          budget_s=budget_s)
        why = f"the handler of {policy.name} freed nothing: its per-task selection decided"
        fallback = dataclasses.replace(
            fallback, fallback=f"{why}; {fallback.fallback}" if fallback.fallback else why)
        decided_ns = time.time_ns()
        more = executor.run(fallback.actions, self._hook_env(fallback))
        owner.decisions += 1
        self._record(owner.name, fallback, more, (event_ns, decided_ns, time.time_ns()),
                     dry=dry, usage=(after, self._memory(owner)), detail=event.detail)
        return fallback, results + more

    def _from_queue(self, owner: _Watch | _System, domain: Domain, event: Event,
                    executor: Executor, *, event_ns: int, usage_before: int | None
                    ) -> tuple[Decision, list[Result]] | None:
        """Kill the oldest live queue entry of this domain; entries found dead
        on the way, or whose kill is refused, leave the queue, and the record
        says so. None: nothing in the queue was killed (the policy decides)."""
        skipped: list[dict[str, Any]] = []
        for _ in range(len(self.queue.entries) + 1):
            entry, dead = self.queue.head(owner.name)
            skipped += [{**e.describe(), "fate": why} for e, why in dead]
            if entry is None:
                break
            action: Action
            if isinstance(entry, ProcessEntry):
                action = KillProcess(entry.pid, entry.start_ticks,
                                     f"queue entry {entry.id} (pid {entry.pid}, {entry.comm})")
            else:
                action = KillCgroup(entry.kind.value, entry.path, entry.inode,
                                    f"queue entry {entry.id} (cgroup {entry.path})")
            decision = Decision(domain, "queue", (), None, trigger=event.trigger,
                                actions=(action,), victim_kind="process"
                                if isinstance(entry, ProcessEntry) else "cgroup",
                                notes=(f"the oldest live entry of the victim queue of "
                                       f"{owner.name}: entry {entry.id}",))
            decided_ns = time.time_ns()
            results = executor.run(decision.actions, {"OOMWARDEN_DOMAIN": owner.name})
            owner.decisions += 1
            fate = "killed" if any(r.ok for r in results) else \
                "refused: " + "; ".join(r.detail for r in results)
            if executor.dry_run and fate == "killed":
                fate = "would be killed (dry run)"
            elif entry in self.queue.entries:
                self._unwatch_fd(entry.pidfd if isinstance(entry, ProcessEntry) else -1)
                self.queue.remove(entry.id)
            self._record(owner.name, decision, results, (event_ns, decided_ns, time.time_ns()),
                         dry=executor.dry_run, usage=(usage_before, self._memory(owner)),
                         detail=event.detail,
                         queue={"head": {**entry.describe(), "fate": fate},
                                "skipped": skipped})
            if any(r.ok for r in results):
                return decision, results
            skipped.append({**entry.describe(), "fate": fate})
        if skipped:
            # nothing killed from the queue: the dead entries are still news
            self._write_record({"domain": owner.name, "trigger": "queue", "policy": "queue",
                                "victim": None, "event_detail": event.detail,
                                "queue": {"head": None, "skipped": skipped},
                                "time_ns": {"event": event_ns}, "actions": [],
                                "results": [], "dry_run": executor.dry_run})
        return None

    def _unwatch_fd(self, fd: int) -> None:
        if fd >= 0 and fd in self._fds and self._epoll is not None:
            with contextlib.suppress(OSError, ValueError):
                self._epoll.unregister(fd)
            del self._fds[fd]

    @staticmethod
    def _lag(owner: _Watch | _System) -> float:
        """How long pressure signals lag after a kill: the window of the
        watch's PSI triggers; VMPRESSURE_LAG_S for v1's vmpressure, whose
        events from the reclaim before the kill arrive after it; 0 without
        a pressure trigger."""
        lags = [0.0]
        if any(isinstance(src, PsiSource) for src in owner.sources):
            lags.append((owner.spec.pressure or Pressure()).window_s)
        if any(isinstance(src, PressureLevelSource | EventsSource) for src in owner.sources):
            lags.append(VMPRESSURE_LAG_S)
        return max(lags)

    def _conditions_hold(self, owner: _Watch | _System) -> bool:
        """Whether the domain's exact pre-OOM conditions still hold: a
        working set within its margin, memory at a threshold level."""
        if isinstance(owner, _System):
            threshold = owner.spec.threshold
            if threshold is None:
                return False
            try:
                memory = read_system()
            except OomwardenError:
                return True
            return threshold.level(memory.available_percent,
                                   memory.swap_free_percent) is not None
        for src in owner.sources:
            if isinstance(src, MarginSource | V2MarginSource) or (
                    isinstance(src, EventsSource) and src.fires):
                try:
                    if src.over():
                        return True
                except TriggerGone:
                    return False
        return False

    @staticmethod
    def _memory(owner: _Watch | _System) -> int | None:
        return _available() if isinstance(owner, _System) else _usage(owner)

    @staticmethod
    def _read_options(policy: Policy) -> ReadOptions:
        return ReadOptions(details=policy.needs_details)

    def _needs_history(self) -> bool:
        return any(w.spec.policy.needs_history for w in self.watches) or any(
            t.spec.policy.needs_history for t in self._systems)

    def _keep_history(self) -> None:
        self._history.append(build_snapshot(self._sources()))
        del self._history[:-HISTORY_KEPT]
        self._next_history = time.monotonic() + HISTORY_S

    def _history_for(self, now: Snapshot, policy: Policy) -> History | None:
        """The newest kept snapshot at least HISTORY_S older than ``now``."""
        if not policy.needs_history:
            return None
        old = history_for(now, self._history)
        return None if old is None else History(old)

    def _check_threshold(self, t: _System) -> None:
        """earlyoom's rule: both MemAvailable and SwapFree at or below a level.
        The next check comes sooner the nearer memory is to the level (at the
        fill rate earlyoom assumes, 6 GB/s), between 0.1 and 1 s."""
        threshold = t.spec.threshold
        assert threshold is not None
        now = time.monotonic()
        try:
            memory = read_system()
        except OomwardenError as e:
            self._say(f"cannot read memory: {e}")
            t.next_check = now + IDLE_S
            return
        mem_pct, swap_pct = memory.available_percent, memory.swap_free_percent
        level = threshold.level(mem_pct, swap_pct)
        headroom = ((memory.mem_available or 0)
                    - memory.mem_total * threshold.mem_available_percent / 100)
        t.next_check = now + min(IDLE_S, max(THRESHOLD_MIN_S, headroom / FILL_RATE))
        if level is None:
            return
        self._fire(t, "threshold", f"MemAvailable {mem_pct:.1f}%, level {level}",
                   term_only=level == "term")

    def _still_under_oom(self, w: _Watch) -> bool:
        """After the actions: is the cgroup still stuck at its limit?"""
        deadline = time.monotonic() + SETTLE_S
        while time.monotonic() < deadline:
            if not self._under_oom(w):
                return False
            time.sleep(0.01)
        return self._under_oom(w)

    @staticmethod
    def _under_oom(w: _Watch) -> bool:
        control = _oom_control(w)
        return control is not None and control.under_oom

    def _hand_over(self, w: _Watch, why: str) -> None:
        """Let the kernel's killer resolve this OOM; take it back afterwards."""
        if not w.paused:
            return
        control = _oom_control(w)
        restore_subtree(w.fs_path)
        w.handed_over = True
        w.handed_kills = control.oom_kill if control is not None else None
        w.quiet_since = None
        w.recheck_at = None
        self._say(f"{w.name}: {why}; the kernel's own killer resolves this OOM")

    def _take_back(self) -> None:
        """Pause the kernel's killer again once the OOM it was handed is over:
        the kernel has killed (``oom_kill`` rose) and the cgroup is out of its
        OOM, or it has stayed out for TAKE_BACK_QUIET_S. (Right after the
        hand-over the waiting tasks are woken and ``under_oom`` reads 0 for a
        moment before their retry meets the limit again: taking the cgroup
        back then would pause the kernel before it killed.)"""
        now = time.monotonic()
        for w in self.watches:
            if not w.handed_over:
                continue
            control = _oom_control(w)
            if control is None or control.under_oom:
                w.quiet_since = None
                continue
            killed = (control.oom_kill is not None and w.handed_kills is not None
                      and control.oom_kill > w.handed_kills)
            if w.quiet_since is None:
                w.quiet_since = now
            if not killed and now - w.quiet_since < TAKE_BACK_QUIET_S:
                continue
            w.handed_over = False
            if not _same_cgroup(w):
                continue  # removed (and perhaps made again): not the cgroup we watch
            with contextlib.suppress(OSError):
                self._write_disable(w, "1")

    # -- output ---------------------------------------------------------------------------

    def _record(self, where: str, d: Decision, results: list[Result],
                times_ns: tuple[int, int, int], *, dry: bool,
                usage: tuple[int | None, int | None], detail: str,
                queue: dict[str, Any] | None = None) -> None:
        record = d.to_json(top=10)
        event_ns, decided_ns, done_ns = times_ns
        signals = [r.signal_ns for r in results if r.signal_ns is not None]
        kills = [r for r in results if r.ok and r.killed and r.signal_ns is not None]
        released = [r.released_ns for r in kills if r.released_ns is not None]
        exits = [r.exit_ns for r in kills if r.exit_ns is not None]
        before, after = usage
        gained = None
        if not dry and before is not None and after is not None:
            gained = max(0, after - before if where == "system" else before - after)
        record.update({
            "time_ns": {"event": event_ns, "decided": decided_ns,
                        "signal": min(signals) if signals else None,
                        # every victim's, or none
                        "released": max(released) if kills and len(released) == len(kills)
                        else None,
                        "exit": max(exits) if kills and len(exits) == len(kills) else None,
                        "done": done_ns},
            "event_detail": detail,
            **({"queue": queue} if queue is not None else {}),
            "dry_run": dry,
            "freed_bytes": gained,
            "memory_bytes": {"what": "MemAvailable" if where == "system" else "usage",
                             "before": before, "after": after},
            "results": [{"action": r.action, "ok": r.ok, "detail": r.detail,
                         "seconds": r.seconds, "killed": list(r.killed),
                         "freed_bytes": r.freed_bytes, "exited": r.exited}
                        for r in results],
        })
        self._write_record(record)
        v = d.victim
        head = (queue or {}).get("head")
        self.last_decisions.append({
            "time_ns": event_ns, "domain": where, "trigger": d.trigger, "policy": d.policy,
            "victim": None if v is None else {"pid": v.task.pid, "comm": v.task.comm,
                                              "cgroup": v.cgroup_path()},
            "queue_entry": head["id"] if head else None, "dry_run": dry})
        what = "would kill" if dry else "killed"
        if head:
            target = (f"pid {head['pid']} ({head['comm']})" if head["kind"] == "process"
                      else f"cgroup {head['cgroup']}")
            self._say(f"{where}: {d.trigger}: queue entry {head['id']}: {target}: "
                      f"{head['fate']}")
        if v is not None:
            self._say(f"{where}: {d.trigger}: {what} pid {v.task.pid} ({v.task.comm}) under "
                      f"{d.policy}, {v.points} points"
                      + (f" (fallback: {d.fallback})" if d.fallback else ""))
        for r in results:
            if not r.ok:
                self._say(f"{where}: {r.action} failed: {r.detail}")

    def _write_record(self, record: dict[str, Any]) -> None:
        if self._log is not None:
            try:
                self._log.write(json.dumps(record, default=str) + "\n")
            except (OSError, ValueError) as e:  # a full disk must not stop the warden
                self._warn_once("log", f"cannot write the decision log: {e}")

    def _hook_env(self, d: Decision) -> dict[str, str]:
        v = d.victim
        if v is None:
            return {"OOMWARDEN_DOMAIN": d.domain.name}
        return {"OOMWARDEN_DOMAIN": d.domain.name, "OOMWARDEN_VICTIM_PID": str(v.task.pid),
                "OOMWARDEN_VICTIM_COMM": v.task.comm,
                "OOMWARDEN_VICTIM_CGROUP": v.cgroup_path() or ""}

    def say(self, line: str) -> None:
        self._say(line)

    def own_pids(self) -> set[int]:
        return self._own_pids()

    def watch_queued(self, entry: ProcessEntry | CgroupEntry) -> None:
        """A new queue entry: its pidfd joins the loop (its exit is news)."""
        if isinstance(entry, ProcessEntry) and self._epoll is not None:
            self._register(entry.pidfd, select.EPOLLIN, entry)

    def unwatch_queued(self, entry: ProcessEntry | CgroupEntry) -> None:
        if isinstance(entry, ProcessEntry):
            self._unwatch_fd(entry.pidfd)

    def reload_now(self) -> str | None:
        """A reload asked for on the control socket: None, or why it failed
        (the running config stays)."""
        return self._reload()

    def _own_pids(self) -> set[int]:
        pids = {os.getpid()}
        if self._watchdog is not None:
            pids.add(self._watchdog.pid)
        return pids

    def _say(self, line: str) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.stderr.write(f"oomwarden: {line}\n")
            self.stderr.flush()

    # -- shutdown -------------------------------------------------------------------------

    def stop(self) -> None:
        """Restore every setting changed, on every exit path."""
        for w in self.watches:
            if w.paused:
                restore_subtree(w.fs_path)
                w.paused = False
            self._restore_guard(w)
            _close_watch(w)
        self.watches.clear()
        if self._state_written and self.state_file is not None:
            remove_state(self.state_file)
            self._state_written = False
        for sysw in self._systems:
            for src in sysw.sources:
                src.close()
        self._systems.clear()
        if self._kmsg is not None:
            self._kmsg.close()
            self._kmsg = None
        if self._observer is not None:
            self._observer.close()  # links destroyed, ring buffer freed, object closed
            self._observer = None
        bpf_source.unload_all()  # the task iterator's link and object
        if self._watchdog is not None:
            self._watchdog.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._watchdog.wait(timeout=5)
            if self._watchdog.stdout is not None:
                self._watchdog.stdout.close()
            self._watchdog = None
        if self._log is not None:
            with contextlib.suppress(OSError):
                self._log.close()
            self._log = None


def _close_watch(w: _Watch) -> None:
    if w.event_fd >= 0:
        with contextlib.suppress(OSError):
            os.close(w.event_fd)
    w.event_fd = -1
    for src in w.sources:
        src.close()
    w.sources.clear()


#: What this daemon implements, by domain kind; the others are refused at
#: start rather than silently not watched.
SUPPORTED = {"v1": ("oom", "pressure", "margin"),
             "v2": ("oom", "pressure", "margin", "events"),
             "system": ("threshold", "pressure", "oom")}


def warden_from_config(config: Config, *, dry_run: bool = False) -> Warden:
    """The daemon for a validated config. A cgroup domain is on the hierarchy
    that has the memory controller; a glob is expanded over its cgroups that
    exist at start."""
    specs: list[WatchSpec] = []
    systems: list[SystemSpec] = []
    snapshot = None
    for w in config.watches:
        if w.domain.system:
            kind = "system"
        else:
            snapshot = snapshot or build_snapshot(SourceConfig())
            kind = memory_hierarchy(snapshot.hierarchies).value
        for trigger in w.triggers:
            if trigger not in SUPPORTED[kind]:
                why = ("cgroup v1 has no memory.events (use 'oom', 'pressure' or 'margin')"
                       if trigger == "events" else f"supported there: "
                       f"{', '.join(SUPPORTED[kind])}")
                where = "system" if kind == "system" else f"cgroup {kind}"
                raise ConfigError(f"{config.source}: {w.name}: the {trigger!r} trigger on a "
                                  f"{where} domain is not implemented: {why}")
        if w.high_guard_percent is not None and kind != "v2":
            raise ConfigError(f"{config.source}: {w.name}: high_guard_percent needs cgroup v2 "
                              "(the memory controller is on cgroup v1 here)")
        grace = w.sigterm_grace_ms / 1000
        if w.domain.system:
            # "oom" on the system: its pre-OOM signals, PSI and the threshold.
            oom = "oom" in w.triggers
            threshold = w.threshold or (Threshold() if oom else None)
            pressure = w.pressure or (Pressure() if oom else None)
            systems.append(SystemSpec(w.policy, threshold, grace, w.cooldown_s, w.dry_run,
                                      pressure))
            continue
        assert snapshot is not None
        path = w.domain.path or "/"
        paths = [path]
        if w.domain.is_glob:
            paths = [c.path for c in snapshot.cgroups
                     if c.kind.value == kind and w.domain.matches(c.path)]
            if not paths:
                raise ConfigError(f"{config.source}: {w.name}: {w.domain.spec} matches no "
                                  "memory cgroup now")
        specs.extend(WatchSpec(f"{kind}:{p}", w.policy, grace, w.cooldown_s, w.dry_run,
                               tuple(w.triggers), w.pressure, w.margin_percent,
                               w.high_guard_percent)
                     for p in paths)
    return Warden(specs, config.decision_log, systems=systems,
                  budget_s=config.budget_ms / 1000, dry_run=dry_run,
                  control_socket=config.control_socket,
                  config_path=None if config.builtin_default else config.source)


def restore_subtree(fs_path: str) -> None:
    """oom_kill_disable=0 on a cgroup and every cgroup below it: a child made
    while its parent was paused inherits the setting, and restoring the parent
    does not reset it."""
    restore([fs_path])


def _own_cgroups() -> tuple[str | None, str | None]:
    """This process's v1 memory cgroup path and cgroup2 path (None: unknown)."""
    try:
        with open("/proc/self/cgroup", "rb") as f:
            return parse_proc_cgroup(f.read())
    except (OSError, OomwardenError):
        return None, None


def _gone(pid: int, start_ticks: int) -> bool:
    """Whether a victim's memory is gone: it exited (a zombie holds none) or
    its pid names another process now."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            info = parse_stat(f.read())
    except (OSError, OomwardenError):
        return True
    return info.start_ticks != start_ticks or info.state in ("Z", "X")


#: A handler made progress if the domain's memory got at least this much better.
PROGRESS_BYTES = 1 << 20


def _progress(results: list[Result], before: int | None, after: int | None, *,
              system: bool) -> bool:
    """Whether actions freed anything: a kill, bytes deleted, or the domain's
    memory (usage, or the system's MemAvailable) better by PROGRESS_BYTES."""
    if any(r.ok and (r.killed or (r.freed_bytes or 0) > 0) for r in results):
        return True
    if before is None or after is None:
        return False
    gained = after - before if system else before - after
    return gained >= PROGRESS_BYTES


def _oom_control(w: _Watch) -> OomControl | None:
    try:
        with open(w.oom_control, "rb") as f:
            return parse_oom_control(f.read())
    except (OSError, OomwardenError):
        return None


def _same_cgroup(w: _Watch) -> bool:
    try:
        return os.stat(w.fs_path).st_ino == w.inode
    except OSError:
        return False


def _usage(w: _Watch) -> int | None:
    name = "memory.current" if w.kind is HierarchyKind.V2 else "memory.usage_in_bytes"
    try:
        with open(os.path.join(w.fs_path, name), "rb") as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


def _available() -> int | None:
    try:
        return read_system().mem_available
    except OomwardenError:
        return None


def _cgroup2_twin(path: str) -> str | None:
    """The cgroup2 directory at the same path as a v1 memory cgroup, with a
    ``memory.pressure`` file, on a verified cgroup2 mount; None if none."""
    try:
        hierarchies = find_hierarchies()
    except OomwardenError:
        return None
    for h in hierarchies:
        if h.kind is not HierarchyKind.V2 or not h.verified:
            continue
        twin = os.path.join(h.mount_point, mount_relative(h.root, path))
        if (os.path.isfile(os.path.join(twin, "memory.pressure"))
                and is_cgroup_fs(twin, v2=True)):
            return twin
    return None
