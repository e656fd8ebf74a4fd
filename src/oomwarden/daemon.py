"""The daemon: memory-cgroup OOM events -> snapshot -> engine -> executor -> log.

This first daemon handles the ``oom`` trigger of cgroup v1 memory cgroups:
user-space OOM handling as the kernel offers it. For each watched cgroup it
pauses the kernel's killer (``memory.oom_control`` oom_kill_disable=1) and
asks for an eventfd on ``memory.oom_control`` through ``cgroup.event_control``.
When the cgroup reaches its limit, the kernel stops its tasks and wakes the
warden, which decides (bounded by the budget) and kills.

The kernel's own killer stays the safety net, always:

* if a decision fails, selects nothing, aborts, or its actions fail, the
  warden hands that OOM to the kernel (oom_kill_disable=0) and takes it back
  once the cgroup is out of its OOM;
* on every exit path the warden restores oom_kill_disable=0 itself;
* a watchdog process (:mod:`oomwarden.watchdog`) restores it if the warden is
  SIGKILLed;
* in dry-run mode the kernel's killer is never paused: the warden listens to
  the same events, logs what it would have done, and signals nothing.

One event loop (``selectors``), no polling: eventfds, and a self-pipe for
SIGTERM / SIGINT / SIGHUP. Every decision is one JSON line in the decision log
and every kill one human line on stderr.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import select
import selectors
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, TextIO

from oomwarden.actions.executor import Executor, Result
from oomwarden.config import Config, Threshold
from oomwarden.decision import Decision
from oomwarden.domains import resolve_cgroup
from oomwarden.errors import ConfigError, OomwardenError
from oomwarden.model import Cgroup, HierarchyKind, Snapshot
from oomwarden.policy.api import Event, Policy
from oomwarden.policy.budget import signal_guard
from oomwarden.policy.decide import DEFAULT_BUDGET_S, decide
from oomwarden.policy.engine import cgroup_domain, system_domain
from oomwarden.policy.history import History
from oomwarden.sources.parse import parse_proc_cgroup
from oomwarden.sources.procfs import ReadOptions, read_system
from oomwarden.sources.snapshot import SourceConfig, build_snapshot

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
#: The exit status when the daemon had to stop on an error.
EXIT_FAILED = 2
#: How long the watchdog may take to say it is armed.
WATCHDOG_ARM_S = 10.0
_libc = ctypes.CDLL(None, use_errno=True)

#: Growth policies: a snapshot every second, the last few kept.
HISTORY_S = 1.0
HISTORY_KEPT = 3
#: The threshold checks: at least this far apart, and the memory fill rate
#: earlyoom assumes when it spaces its checks (bytes per second).
THRESHOLD_MIN_S = 0.1
FILL_RATE = 6e9


class DaemonError(OomwardenError):
    """The daemon cannot start (a watch that cannot be set up)."""


@dataclass
class WatchSpec:
    """One watched memory cgroup, as the configuration gives it."""

    cgroup: str
    policy: Policy
    sigterm_grace_s: float = 0.0
    cooldown_s: float = 5.0
    dry_run: bool = False


@dataclass
class ThresholdSpec:
    """The system domain watched by MemAvailable / SwapFree levels (earlyoom)."""

    policy: Policy
    threshold: Threshold
    sigterm_grace_s: float = 0.0
    cooldown_s: float = 5.0
    dry_run: bool = False


@dataclass
class _Threshold:
    spec: ThresholdSpec
    next_check: float = 0.0
    last_action: float = -1e9
    decisions: int = 0


@dataclass
class _Watch:
    spec: WatchSpec
    path: str  # inside the hierarchy
    fs_path: str
    inode: int
    event_fd: int
    control_fd: int
    paused: bool = False  # we set oom_kill_disable=1
    handed_over: bool = False
    last_kill: float = 0.0
    decisions: int = 0

    @property
    def oom_control(self) -> str:
        return os.path.join(self.fs_path, "memory.oom_control")


@dataclass
class Warden:
    """The daemon. ``run()`` stays in the foreground until SIGTERM/SIGINT."""

    specs: list[WatchSpec]
    decision_log: str
    thresholds: list[ThresholdSpec] = field(default_factory=list)
    budget_s: float = DEFAULT_BUDGET_S
    dry_run: bool = False
    stderr: TextIO = field(default_factory=lambda: sys.stderr)
    watches: list[_Watch] = field(default_factory=list)
    _thresholds: list[_Threshold] = field(default_factory=list)
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

    # -- set-up -------------------------------------------------------------------------

    def start(self) -> None:
        """Set every watch up, or none (a failure undoes what was done)."""
        self._protect_self()
        try:
            os.makedirs(os.path.dirname(self.decision_log) or ".", exist_ok=True)
            self._log = open(self.decision_log, "a", buffering=1)  # noqa: SIM115
        except OSError as e:
            raise DaemonError(f"cannot open the decision log {self.decision_log}: "
                              f"{e.strerror}") from None
        try:
            snapshot = build_snapshot(SourceConfig())
            for spec in self.specs:
                self.watches.append(self._watch(spec, snapshot))
            self._thresholds = [_Threshold(t) for t in self.thresholds]
            to_pause = [w for w in self.watches if not (self.dry_run or w.spec.dry_run)]
            if to_pause:
                # The watchdog is armed *before* the first cgroup is paused:
                # from the first write on, a dead warden is covered.
                self._arm_watchdog([w.fs_path for w in to_pause])
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

    @staticmethod
    def _write_disable(w: _Watch, value: str) -> None:
        with open(w.oom_control, "w") as f:
            f.write(value)

    def _protect_self(self) -> None:
        """Lock the warden's memory and exempt it from the kernel's killer,
        where permitted; say once where not. Then warm up: one decision per
        policy on the current snapshot, so that nothing is imported or first
        compiled on the OOM path."""
        if self.lock_memory and _libc.mlockall(MCL_CURRENT | MCL_FUTURE) != 0:
            self._warn_once("mlock", "cannot lock its memory (mlockall: "
                            f"{os.strerror(ctypes.get_errno())}): it may be paged out")
        try:
            with open("/proc/self/oom_score_adj", "w") as f:
                f.write("-1000")
        except OSError as e:
            self._warn_once("adj", f"cannot set its oom_score_adj to -1000 ({e.strerror}; "
                            "CAP_SYS_RESOURCE is missing): the kernel may kill the warden")
        snapshot = build_snapshot(SourceConfig())
        policies = [s.policy for s in self.specs] + [t.policy for t in self.thresholds]
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

    def _reload(self, selector: selectors.BaseSelector) -> None:
        """SIGHUP: the config anew. A bad config keeps the old one running."""
        if self.reload is None:
            self._say("SIGHUP: no config file to reload")
            return
        try:
            fresh = self.reload()
            # The new watches are checked before the running ones are given
            # up: a cgroup that is gone or not watchable keeps the old config.
            snapshot = build_snapshot(SourceConfig())
            for spec in fresh.specs:
                self._check_watch(spec, snapshot)
        except OomwardenError as e:
            self._say(f"reload failed, keeping the running config: {e}")
            return
        for w in self.watches:
            with contextlib.suppress(KeyError, ValueError):
                selector.unregister(w.event_fd)
        self.stop()
        self.specs, self.thresholds = fresh.specs, fresh.thresholds
        self.decision_log, self.budget_s = fresh.decision_log, fresh.budget_s
        try:
            self.start()
        except OomwardenError as e:
            self._say(f"reload failed while setting up, the kernel's killer is in charge: {e}")
            self._stop = True
            self._exit_code = EXIT_FAILED
            return
        for w in self.watches:
            selector.register(w.event_fd, selectors.EVENT_READ, w)
        self._say(f"reloaded: watching {len(self.watches)} memory cgroups and "
                  f"{len(self._thresholds)} memory thresholds")

    @staticmethod
    def _check_watch(spec: WatchSpec, snapshot: Any) -> Cgroup:
        """Everything a watch needs, without touching the cgroup: run on a
        reload before the running watches are given up."""
        cg = resolve_cgroup(snapshot, spec.cgroup)
        if cg.kind is not HierarchyKind.V1 or not cg.memory_controller:
            raise DaemonError(f"{spec.cgroup}: the oom trigger needs a cgroup v1 memory "
                              f"cgroup (found {cg.name})")
        if not cg.verified:
            raise DaemonError(f"{cg.fs_path} is not on a cgroup filesystem: its limit "
                              "limits nothing")
        if cg.path == "/":
            raise DaemonError("the root memory cgroup has no limit of its own")
        own = _own_memcg()
        if own is not None and (own == cg.path or own.startswith(cg.path.rstrip("/") + "/")):
            raise DaemonError(f"{spec.cgroup}: the warden itself runs in {own}: at that "
                              "cgroup's limit it would be paused with the others")
        return cg

    def _watch(self, spec: WatchSpec, snapshot: Any) -> _Watch:
        cg = self._check_watch(spec, snapshot)
        control = os.path.join(cg.fs_path, "memory.oom_control")
        control_fd = os.open(control, os.O_RDONLY | os.O_CLOEXEC)
        event_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        try:
            with open(os.path.join(cg.fs_path, "cgroup.event_control"), "w") as f:
                f.write(f"{event_fd} {control_fd}")
            return _Watch(spec, cg.path, cg.fs_path, cg.inode, event_fd, control_fd)
        except OSError as e:
            os.close(event_fd)
            os.close(control_fd)
            raise DaemonError(f"{spec.cgroup}: cannot set up OOM events: {e.strerror}") from None

    # -- the loop -------------------------------------------------------------------------

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

        old_wakeup = signal.set_wakeup_fd(write_end)
        for s in previous:
            signal.signal(s, wake)
        try:
            self.start()
        except BaseException:
            signal.set_wakeup_fd(old_wakeup)
            for s, handler in previous.items():
                signal.signal(s, handler)
            os.close(read_end)
            os.close(write_end)
            raise
        selector = selectors.DefaultSelector()
        selector.register(read_end, selectors.EVENT_READ, None)
        for w in self.watches:
            selector.register(w.event_fd, selectors.EVENT_READ, w)
        self._say(f"watching {len(self.watches)} memory cgroups and "
                  f"{len(self._thresholds)} memory thresholds"
                  + (" (dry run: the kernel's killer stays in charge)" if self.dry_run else ""))
        self._notify("READY=1")
        try:
            while not self._stop:
                if self._reload_wanted:
                    self._reload_wanted = False
                    self._reload(selector)
                self._watchdog_ping()
                timeout = HANDBACK_POLL_S if any(w.handed_over for w in self.watches) else IDLE_S
                now = time.monotonic()
                for t in self._thresholds:
                    timeout = min(timeout, max(0.0, t.next_check - now))
                if self._needs_history():
                    timeout = min(timeout, max(0.0, self._next_history - now))
                for key, _ in selector.select(timeout):
                    if key.data is None:
                        with contextlib.suppress(OSError):
                            os.read(read_end, 512)
                        continue
                    watch = key.data
                    try:
                        self._on_event(watch)
                    except Exception as e:
                        self._hand_over(watch, f"internal error: {type(e).__name__}: {e}")
                self._take_back()
                for t in self._thresholds:
                    if time.monotonic() >= t.next_check:
                        try:
                            self._check_threshold(t)
                        except Exception as e:
                            self._say(f"threshold check failed: {type(e).__name__}: {e}")
                            t.next_check = time.monotonic() + IDLE_S
                if self._needs_history() and time.monotonic() >= self._next_history:
                    self._keep_history()
        finally:
            self.stop()  # before the default handlers are back
            selector.close()
            signal.set_wakeup_fd(old_wakeup)
            for s, handler in previous.items():
                signal.signal(s, handler)
            os.close(read_end)
            os.close(write_end)
        return self._exit_code

    def _on_event(self, w: _Watch) -> None:
        event_ns = time.time_ns()
        try:
            os.read(w.event_fd, 8)
        except OSError:
            return
        dry = self.dry_run or w.spec.dry_run
        if not dry and not self._under_oom(w):
            return  # a wake-up without an OOM (e.g. the cgroup was removed)
        # In a dry run the kernel's killer was never paused: by now it has
        # usually acted, and the decision shows what the warden would do next.
        snapshot = build_snapshot(SourceConfig(only=("v1", w.path), cgroup_stat=False,
                                               read=self._read_options(w.spec.policy)))
        cg = next((c for c in snapshot.cgroups
                   if c.kind is HierarchyKind.V1 and c.path == w.path), None)
        if cg is None or cg.inode != w.inode:
            self._hand_over(w, "the watched cgroup changed")
            return
        # The cgroup's tasks are paused while the warden decides: the
        # decision gets at most EVENT_BUDGET_S whatever the configured budget.
        decision = decide(snapshot, cgroup_domain(snapshot, cg), w.spec.policy,
                          history=self._history_for(snapshot, w.spec.policy),
                          event=Event("oom", f"cgroup:{w.path}"), guard=signal_guard,
                          budget_s=min(self.budget_s, EVENT_BUDGET_S))
        decided_ns = time.time_ns()
        # No SIGTERM grace here: tasks waiting in a v1 OOM sleep killable, a
        # SIGTERM would only wait; hooks get a short leash for the same reason.
        executor = Executor(dry_run=dry, protect=frozenset(self._own_pids()),
                            hook_timeout_s=EVENT_BUDGET_S, domain=("v1", w.path))
        try:
            results = executor.run(decision.actions, self._hook_env(decision))
        except Exception as e:
            self._hand_over(w, f"the executor failed: {e}")
            return
        done_ns = time.time_ns()
        w.decisions += 1
        self._record(f"cgroup:{w.path}", decision, results, (event_ns, decided_ns, done_ns),
                     dry)
        if not dry and (not decision.actions or not any(r.ok for r in results)):
            self._hand_over(w, "no action succeeded" if decision.actions else
                            "the policy chose nothing")
        elif not dry and self._still_under_oom(w):
            self._hand_over(w, "the actions did not end the OOM")
        elif not dry:
            w.last_kill = time.monotonic()

    @staticmethod
    def _read_options(policy: Policy) -> ReadOptions:
        return ReadOptions(details=policy.needs_details)

    def _needs_history(self) -> bool:
        return any(w.spec.policy.needs_history for w in self.watches) or any(
            t.spec.policy.needs_history for t in self._thresholds)

    def _keep_history(self) -> None:
        self._history.append(build_snapshot(SourceConfig()))
        del self._history[:-HISTORY_KEPT]
        self._next_history = time.monotonic() + HISTORY_S

    def _history_for(self, now: Snapshot, policy: Policy) -> History | None:
        """The newest kept snapshot at least HISTORY_S older than ``now``."""
        if not policy.needs_history:
            return None
        for old in reversed(self._history):
            if now.taken_ns - old.taken_ns >= HISTORY_S * 1e9:
                return History(old)
        return History(self._history[0]) if self._history else None

    def _check_threshold(self, t: _Threshold) -> None:
        """earlyoom's rule: both MemAvailable and SwapFree at or below a level.
        The next check comes sooner the nearer memory is to the level (at the
        fill rate earlyoom assumes, 6 GB/s), between 0.1 and 1 s."""
        now = time.monotonic()
        try:
            memory = read_system()
        except OomwardenError as e:
            self._say(f"cannot read memory: {e}")
            t.next_check = now + IDLE_S
            return
        available = memory.mem_available if memory.mem_available is not None else 0
        mem_pct = 100.0 * available / max(1, memory.mem_total)
        swap_pct = (None if memory.swap_total == 0 else
                    100.0 * memory.swap_free / memory.swap_total)
        level = t.spec.threshold.level(mem_pct, swap_pct)
        headroom = available - memory.mem_total * t.spec.threshold.mem_available_percent / 100
        t.next_check = now + min(IDLE_S, max(THRESHOLD_MIN_S, headroom / FILL_RATE))
        if level is None or now - t.last_action < t.spec.cooldown_s:
            return
        event_ns = time.time_ns()
        snapshot = build_snapshot(SourceConfig(read=self._read_options(t.spec.policy)))
        decision = decide(snapshot, system_domain(snapshot), t.spec.policy,
                          history=self._history_for(snapshot, t.spec.policy),
                          event=Event("threshold", "system",
                                      f"MemAvailable {mem_pct:.1f}%, level {level}"),
                          guard=signal_guard, budget_s=self.budget_s)
        decided_ns = time.time_ns()
        dry = self.dry_run or t.spec.dry_run
        executor = Executor(dry_run=dry, sigterm_grace_s=t.spec.sigterm_grace_s,
                            term_only=level == "term", protect=frozenset(self._own_pids()))
        results = executor.run(decision.actions, self._hook_env(decision))
        t.decisions += 1
        t.last_action = time.monotonic()
        self._record("system", decision, results, (event_ns, decided_ns, time.time_ns()), dry)

    def _still_under_oom(self, w: _Watch) -> bool:
        """After the actions: is the cgroup still stuck at its limit?"""
        deadline = time.monotonic() + SETTLE_S
        while time.monotonic() < deadline:
            if not self._under_oom(w):
                return False
            time.sleep(0.01)
        return self._under_oom(w)

    def _under_oom(self, w: _Watch) -> bool:
        try:
            with open(w.oom_control) as f:
                return "under_oom 1" in f.read()
        except OSError:
            return False

    def _hand_over(self, w: _Watch, why: str) -> None:
        """Let the kernel's killer resolve this OOM; take it back afterwards."""
        if not w.paused:
            return
        restore_subtree(w.fs_path)
        w.handed_over = True
        self._say(f"cgroup:{w.path}: {why}; the kernel's own killer resolves this OOM")

    def _take_back(self) -> None:
        for w in self.watches:
            if w.handed_over and not self._under_oom(w):
                w.handed_over = False
                try:
                    if os.stat(w.fs_path).st_ino != w.inode:
                        continue  # removed and made again: not the cgroup we watch
                    self._write_disable(w, "1")
                except OSError:
                    continue

    # -- output ---------------------------------------------------------------------------

    def _record(self, where: str, d: Decision, results: list[Result],
                times_ns: tuple[int, int, int], dry: bool) -> None:
        record = d.to_json(top=10)
        event_ns, decided_ns, done_ns = times_ns
        record.update({
            "time_ns": {"event": event_ns, "decided": decided_ns, "done": done_ns},
            "dry_run": dry,
            "results": [{"action": r.action, "ok": r.ok, "detail": r.detail,
                         "seconds": r.seconds, "killed": list(r.killed),
                         "freed_bytes": r.freed_bytes} for r in results],
        })
        if self._log is not None:
            try:
                self._log.write(json.dumps(record, default=str) + "\n")
            except (OSError, ValueError) as e:  # a full disk must not stop the warden
                self._warn_once("log", f"cannot write the decision log: {e}")
        v = d.victim
        what = "would kill" if dry else "killed"
        if v is not None:
            self._say(f"{where}: {what} pid {v.task.pid} ({v.task.comm}) under "
                      f"{d.policy}, {v.points} points"
                      + (f" (fallback: {d.fallback})" if d.fallback else ""))
        for r in results:
            if not r.ok:
                self._say(f"{where}: {r.action} failed: {r.detail}")

    def _hook_env(self, d: Decision) -> dict[str, str]:
        v = d.victim
        if v is None:
            return {"OOMWARDEN_DOMAIN": d.domain.name}
        return {"OOMWARDEN_DOMAIN": d.domain.name, "OOMWARDEN_VICTIM_PID": str(v.task.pid),
                "OOMWARDEN_VICTIM_COMM": v.task.comm,
                "OOMWARDEN_VICTIM_CGROUP": v.cgroup_path() or ""}

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
            for fd in (w.event_fd, w.control_fd):
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.watches.clear()
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


#: What this daemon implements so far; the others are refused at start
#: rather than silently not watched.
SUPPORTED = {"oom": "cgroup", "threshold": "system"}


def warden_from_config(config: Config, *, dry_run: bool = False) -> Warden:
    """The daemon for a validated config. A glob domain is expanded over the
    v1 memory cgroups that exist at start."""
    specs: list[WatchSpec] = []
    thresholds: list[ThresholdSpec] = []
    snapshot = None
    for w in config.watches:
        for trigger in w.triggers:
            want = SUPPORTED.get(trigger)
            kind = "system" if w.domain.system else "cgroup"
            if want != kind:
                raise ConfigError(
                    f"{config.source}: {w.name}: the {trigger!r} trigger on a {kind} domain is "
                    "not implemented by this daemon yet (supported: 'oom' on memory cgroups, "
                    "'threshold' on the system)")
        grace = w.sigterm_grace_ms / 1000
        if w.domain.system:
            assert w.threshold is not None
            thresholds.append(ThresholdSpec(w.policy, w.threshold, grace, w.cooldown_s,
                                            w.dry_run))
            continue
        path = w.domain.path or "/"
        paths = [path]
        if w.domain.is_glob:
            snapshot = snapshot or build_snapshot(SourceConfig())
            paths = [c.path for c in snapshot.cgroups
                     if c.kind is HierarchyKind.V1 and w.domain.matches(c.path)]
            if not paths:
                raise ConfigError(f"{config.source}: {w.name}: {w.domain.spec} matches no "
                                  "memory cgroup now")
        specs.extend(WatchSpec(f"v1:{p}", w.policy, grace, w.cooldown_s, w.dry_run)
                     for p in paths)
    return Warden(specs, config.decision_log, thresholds=thresholds,
                  budget_s=config.budget_ms / 1000, dry_run=dry_run)


def restore_subtree(fs_path: str) -> None:
    """oom_kill_disable=0 on a cgroup and every cgroup below it: a child made
    while its parent was paused inherits the setting, and restoring the parent
    does not reset it."""
    for dirpath, _dirs, files in os.walk(fs_path):
        if "memory.oom_control" in files:
            with contextlib.suppress(OSError), open(
                os.path.join(dirpath, "memory.oom_control"), "w"
            ) as f:
                f.write("0")


def _own_memcg() -> str | None:
    """This process's v1 memory cgroup path."""
    try:
        with open("/proc/self/cgroup", "rb") as f:
            memcg, _ = parse_proc_cgroup(f.read())
    except (OSError, OomwardenError):
        return None
    return memcg
