"""The daemon's configuration: a TOML file, checked completely at load.

``load_config(path)`` reads a config file and ``parse_config(text, source)``
a config text; both return a frozen :class:`Config` or raise
:class:`ConfigError`. Everything is checked here, once, before the daemon
starts anything (or keeps its old config on SIGHUP): types, ranges, unknown
keys, duplicate domains, the syntax of cgroup globs, PSI windows the kernel
would refuse, and every policy SPEC, which is loaded here (a ``.py`` policy is
run once, a rules file compiled). Nothing in a :class:`Config` can fail later.
``default_config()`` is what the warden runs without a config file: earlyoom's
defaults. The format, every key and the defaults are in ``docs/config.md``::

    decision_log = "/var/log/oomwarden/decisions.jsonl"
    control_socket = "/run/oomwarden/control.sock"
    budget_ms = 50

    [[watch]]
    domain = "cgroup:/app.slice/*.service"   # or "system"
    triggers = ["oom", "pressure"]
    policy = "growth"                        # a policy SPEC
    victim = "process"                       # process | tree | cgroup
    sigterm_grace_ms = 0                     # 0: SIGKILL at once
    cooldown_s = 5
    dry_run = false
    pressure.full_avg10 = 40

:class:`ConfigError` is defined here for now (a subclass of
:class:`~oomwarden.errors.OomwardenError`, so the CLI prints it as one line
and exits with status 2); it is to move to :mod:`oomwarden.errors` beside
``PolicyError``. Every ConfigError about the file's content is one line naming
the file, the line and the key, watches counted from 1 in file order::

    oomwarden.toml:14: watch[2].cooldown_s: 0 is outside 0.1..600

A policy that fails to load keeps its own message behind that prefix::

    oomwarden.toml:9: watch[1].policy: rules file /etc/oomwarden/r.toml does not exist
"""

from __future__ import annotations

import difflib
import fnmatch
import os
import stat
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Literal, cast

from oomwarden.control import MAX_SOCKET_PATH_BYTES
from oomwarden.errors import ConfigError, OomwardenError
from oomwarden.policy.api import VICTIM_KINDS, Policy, VictimKind
from oomwarden.policy.registry import builtins, load_policy
from oomwarden.textfile import (
    KeyPath,
    TomlChecker,
    num_text,
    printable,
    read_text_file,
    toml_error_message,
    type_name,
)

Trigger = Literal["oom", "pressure", "threshold", "events", "margin"]
TRIGGERS: tuple[Trigger, ...] = ("oom", "pressure", "threshold", "events", "margin")
#: Triggers that need a cgroup: the system has no limit and no memory.events.
CGROUP_ONLY_TRIGGERS: frozenset[str] = frozenset({"events", "margin"})
PolicyKind = Literal["built-in", "python", "rules"]

DEFAULT_DECISION_LOG = "/var/log/oomwarden/decisions.jsonl"
DEFAULT_CONTROL_SOCKET = "/run/oomwarden/control.sock"
DEFAULT_BUDGET_MS = 50
BUDGET_MS_RANGE = (1, 60_000)
DEFAULT_VICTIM: VictimKind = "process"
DEFAULT_SIGTERM_GRACE_MS = 0
SIGTERM_GRACE_MS_RANGE = (0, 60_000)
DEFAULT_COOLDOWN_S = 5.0
COOLDOWN_S_RANGE = (0.1, 600.0)
PERCENT_RANGE = (0.0, 100.0)
#: earlyoom's defaults (``-m 10 -s 10``, KILL_PERCENT = PERCENT / 2): see
#: ``docs/config.md`` for the source.
EARLYOOM_PERCENT = 10.0
EARLYOOM_KILL_PERCENT = 5.0
#: A PSI trigger needs a stall time above zero; its window is 0.5 s to 10 s.
PSI_PERCENT_RANGE = (0.01, 100.0)
PSI_WINDOW_S_RANGE = (0.5, 10.0)
DEFAULT_PSI_WINDOW_S = 2.0
DEFAULT_FULL_AVG10 = 40.0
#: Without CAP_SYS_RESOURCE the kernel takes only windows that are a
#: multiple of this (``psi_trigger_create``: "unprivileged" triggers).
UNPRIVILEGED_PSI_WINDOW_STEP_S = 2
CAP_SYS_RESOURCE = 24
DEFAULT_MARGIN_PERCENT = 5.0
MARGIN_PERCENT_RANGE = (0.1, 50.0)
#: The memory.high guard: this far below memory.max (cgroup v2 only).
HIGH_GUARD_PERCENT_RANGE = (0.1, 50.0)
#: A config file larger than this is refused (a typo naming a log or a device).
MAX_CONFIG_BYTES = 1 << 20

TOP_KEYS = ("decision_log", "control_socket", "budget_ms", "watch")
WATCH_KEYS = ("domain", "triggers", "policy", "victim", "sigterm_grace_ms", "cooldown_s",
              "dry_run", "threshold", "pressure", "margin_percent", "high_guard_percent")
REQUIRED_WATCH_KEYS = ("domain", "triggers", "policy")
THRESHOLD_KEYS = ("mem_available_percent", "swap_free_percent", "mem_available_kill_percent",
                  "swap_free_kill_percent")
PRESSURE_KEYS = ("some_avg10", "full_avg10", "window_s")

SYSTEM = "system"
CGROUP_PREFIX = "cgroup:"
DEFAULT_SOURCE = "<built-in default>"
_GLOB_CHARS = frozenset("*?[]")


# -- the typed config ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Domain:
    """Where a watch looks: ``system``, or a memory cgroup by path inside its
    hierarchy (``cgroup:/a/b``), or every cgroup a glob matches
    (``cgroup:/app.slice/*.service``). A glob is matched one path component
    at a time: ``*`` never crosses a ``/``."""

    spec: str

    @property
    def system(self) -> bool:
        return self.spec == SYSTEM

    @property
    def path(self) -> str | None:
        """The cgroup path or glob (``/a/b``); None for the system."""
        return None if self.system else self.spec[len(CGROUP_PREFIX):]

    @property
    def is_glob(self) -> bool:
        return not self.system and any(c in _GLOB_CHARS for c in self.spec)

    def matches(self, cgroup_path: str) -> bool:
        """Whether a cgroup (a path inside its hierarchy) is this domain."""
        path = self.path
        if path is None:
            return False
        if not self.is_glob:
            return cgroup_path == path
        want = path.split("/")
        have = cgroup_path.split("/")
        return len(want) == len(have) and all(
            fnmatch.fnmatchcase(h, w) for h, w in zip(have, want, strict=True))


@dataclass(frozen=True, slots=True)
class Threshold:
    """earlyoom's two levels on system-wide MemAvailable and SwapFree, in
    percent of MemTotal and SwapTotal. *Both* figures at or below their
    SIGTERM level: the victim gets SIGTERM; both at or below their kill level:
    SIGKILL. With no swap at all, the swap condition always holds."""

    mem_available_percent: float = EARLYOOM_PERCENT
    swap_free_percent: float = EARLYOOM_PERCENT
    mem_available_kill_percent: float = EARLYOOM_KILL_PERCENT
    swap_free_kill_percent: float = EARLYOOM_KILL_PERCENT

    def level(self, mem_available_percent: float, swap_free_percent: float | None
              ) -> Literal["kill", "term"] | None:
        """Which level the figures have reached (``swap_free_percent`` None
        where there is no swap): ``"kill"``, ``"term"`` or None."""
        def below(mem: float, swap: float) -> bool:
            return mem_available_percent <= mem and (
                swap_free_percent is None or swap_free_percent <= swap)
        if below(self.mem_available_kill_percent, self.swap_free_kill_percent):
            return "kill"
        if below(self.mem_available_percent, self.swap_free_percent):
            return "term"
        return None


@dataclass(frozen=True, slots=True)
class Pressure:
    """PSI thresholds: the share of time (percent) in which some task
    (``some``) or every non-idle task (``full``) stalled on memory, over a
    window of ``window_s``; None where not watched."""

    some_avg10: float | None = None
    full_avg10: float | None = DEFAULT_FULL_AVG10
    window_s: float = DEFAULT_PSI_WINDOW_S

    def trigger_lines(self) -> tuple[str, ...]:
        """What to write to a ``memory.pressure`` or ``/proc/pressure/memory``
        file descriptor, one line per trigger: ``full STALL_US WINDOW_US``."""
        window_us = round(self.window_s * 1_000_000)
        out: list[str] = []
        for kind, percent in (("some", self.some_avg10), ("full", self.full_avg10)):
            if percent is not None:
                stall_us = max(1, min(window_us, round(window_us * percent / 100)))
                out.append(f"{kind} {stall_us} {window_us}\n")
        return tuple(out)


@dataclass(frozen=True, slots=True)
class Watch:
    """One ``[[watch]]``: where, on what, with which policy, how to kill."""

    #: 1-based, in file order; ``line`` is the line of its ``[[watch]]`` (0
    #: in :func:`default_config`).
    index: int
    line: int
    domain: Domain
    triggers: tuple[Trigger, ...]
    #: The SPEC as loaded: a built-in name, or an absolute file path (a
    #: relative one is resolved against the config file's directory).
    policy_spec: str
    policy_kind: PolicyKind
    #: The loaded policy, its ``victim`` set to this watch's.
    policy: Policy = field(repr=False, compare=False)
    victim: VictimKind
    #: True when ``victim`` was not given and comes from the policy.
    victim_from_policy: bool
    sigterm_grace_ms: int
    cooldown_s: float
    dry_run: bool
    #: Set (with its defaults where keys are not given) when the trigger is.
    threshold: Threshold | None
    pressure: Pressure | None
    margin_percent: float | None
    #: cgroup v2: set memory.high this far (percent) below memory.max while
    #: watched (throttling gives the warden time); None: no guard.
    high_guard_percent: float | None = None

    @property
    def name(self) -> str:
        return f"watch[{self.index}]"


@dataclass(frozen=True, slots=True)
class Config:
    """A whole config: global settings and the watches in file order."""

    source: str
    watches: tuple[Watch, ...]
    decision_log: str = DEFAULT_DECISION_LOG
    control_socket: str = DEFAULT_CONTROL_SOCKET
    budget_ms: int = DEFAULT_BUDGET_MS
    #: True for :func:`default_config`: the daemon says so at start.
    builtin_default: bool = False

    def watch_for(self, cgroup_path: str | None) -> Watch | None:
        """The first watch whose domain is this cgroup (None: the system)."""
        for w in self.watches:
            if (w.domain.system if cgroup_path is None else w.domain.matches(cgroup_path)):
                return w
        return None


def default_config() -> Config:
    """What the warden runs without a config file: earlyoom's defaults. The
    system domain, the ``threshold`` trigger, the ``kernel`` policy; SIGTERM
    when MemAvailable and SwapFree are both at or below 10 % of their totals,
    SIGKILL at or below 5 %."""
    watch = Watch(
        index=1, line=0, domain=Domain(SYSTEM), triggers=("threshold",), policy_spec="kernel",
        policy_kind="built-in", policy=builtins()["kernel"], victim=DEFAULT_VICTIM,
        victim_from_policy=True, sigterm_grace_ms=DEFAULT_SIGTERM_GRACE_MS,
        cooldown_s=DEFAULT_COOLDOWN_S, dry_run=False, threshold=Threshold(), pressure=None,
        margin_percent=None,
    )
    return Config(source=DEFAULT_SOURCE, watches=(watch,), builtin_default=True)


# -- reading ------------------------------------------------------------------------------


def load_config(path: str, *, check_owner: bool | None = None,
                cap_sys_resource: bool | None = None) -> Config:
    """The config in the file ``path``, checked completely.

    The file must be a regular file of at most :data:`MAX_CONFIG_BYTES`
    (opened without blocking: a FIFO cannot hang the load), in UTF-8. Read as
    root (``check_owner`` None: when the effective uid is 0), the file and its
    directory must be owned by root and not writable by group or others (a
    sticky directory excepted): whoever could edit the config would choose
    the files root writes and the policies root runs. ``cap_sys_resource``
    (None: this process's) decides which PSI windows the kernel takes.
    """
    where = printable(path)
    if not path:
        raise ConfigError("config file: empty path")
    if check_owner is None:
        check_owner = os.geteuid() == 0
    owner_check = None
    if check_owner:
        def owner_check(info: os.stat_result) -> None:
            _check_owner(where, info, path)
    text = read_text_file(path, what="config file", max_bytes=MAX_CONFIG_BYTES,
                          error=ConfigError, where=where, check=owner_check)
    return parse_config(text, path, base_dir=os.path.dirname(os.path.abspath(path)),
                        cap_sys_resource=cap_sys_resource)


def _check_owner(where: str, info: os.stat_result, path: str) -> None:
    if info.st_uid != 0:
        raise ConfigError(f"config file {where} is owned by uid {info.st_uid}, not root: "
                          "read as root, a config file must be owned by root (chown root)")
    if info.st_mode & 0o022:
        raise ConfigError(f"config file {where} is writable by {_writers(info.st_mode)} (mode "
                          f"{stat.S_IMODE(info.st_mode):04o}): read as root, a config file "
                          "must be writable by root only (chmod go-w)")
    for directory in dict.fromkeys((os.path.dirname(os.path.abspath(path)),
                                    os.path.dirname(os.path.realpath(path)))):
        try:
            st = os.stat(directory)
        except OSError as e:
            raise ConfigError(f"config file {where}: its directory {printable(directory)} cannot "
                              f"be read: {e.strerror or e}") from None
        if st.st_uid != 0:
            raise ConfigError(f"config file {where} is in {printable(directory)}, owned by uid "
                              f"{st.st_uid}, not root: read as root, a config file's "
                              "directory must be owned by root")
        if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
            raise ConfigError(f"config file {where} is in {printable(directory)}, writable by "
                              f"{_writers(st.st_mode)} (mode {stat.S_IMODE(st.st_mode):04o}): "
                              "read as root, a config file's directory must be writable by "
                              "root only (or sticky)")


def _writers(mode: int) -> str:
    return " and ".join(w for bit, w in ((stat.S_IWGRP, "group"), (stat.S_IWOTH, "others"))
                        if mode & bit)


def has_cap_sys_resource(status_path: str = "/proc/self/status") -> bool:
    """Whether this process has CAP_SYS_RESOURCE in its effective set (read
    from ``CapEff``; False when that cannot be read, the stricter case)."""
    try:
        with open(status_path, encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> CAP_SYS_RESOURCE & 1)
    except (OSError, ValueError, IndexError):
        pass
    return False


def parse_config(text: str, source: str, *, base_dir: str | None = None,
                 cap_sys_resource: bool | None = None) -> Config:
    """The config in ``text``; ``source`` names it in errors. Relative policy
    files are resolved against ``base_dir`` (default: the directory of
    ``source``). ``cap_sys_resource`` (None: this process's) decides whether
    PSI windows must be a multiple of 2 s."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(toml_error_message(str(e), text, printable(source))) from None
    if base_dir is None:
        base_dir = os.path.dirname(os.path.abspath(source))
    if cap_sys_resource is None:
        cap_sys_resource = has_cap_sys_resource()
    return _Checker(printable(source), text, base_dir, cap_sys_resource).config(data)


# -- checking -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Checked:
    """A watch checked but for its policy, which is loaded in a second pass
    (a config with a mistake anywhere runs no policy code)."""

    index: int
    path: KeyPath
    domain: Domain
    triggers: tuple[Trigger, ...]
    spec: str
    policy_kind: PolicyKind
    victim: VictimKind | None
    sigterm_grace_ms: int
    cooldown_s: float
    dry_run: bool
    threshold: Threshold | None
    pressure: Pressure | None
    margin_percent: float | None
    high_guard_percent: float | None


class _Checker(TomlChecker):
    error = ConfigError

    def __init__(self, source: str, text: str, base_dir: str, cap_sys_resource: bool) -> None:
        super().__init__(source, text)
        self.base_dir = base_dir
        self.cap_sys_resource = cap_sys_resource

    # the file
    def config(self, data: Mapping[str, object]) -> Config:
        for key in data:
            if key not in TOP_KEYS:
                self.fail((key,), _unknown(key, TOP_KEYS))
        decision_log = self.file_path(data, "decision_log", DEFAULT_DECISION_LOG)
        control_socket = self.file_path(data, "control_socket", DEFAULT_CONTROL_SOCKET)
        if len(os.fsencode(control_socket)) > MAX_SOCKET_PATH_BYTES:
            self.fail(("control_socket",), f"control_socket: {control_socket!r} is "
                      f"{len(os.fsencode(control_socket))} bytes long; a socket path has at "
                      f"most {MAX_SOCKET_PATH_BYTES}")
        if decision_log == control_socket:
            self.fail(("control_socket",), "control_socket: the same path as decision_log")
        budget_ms = DEFAULT_BUDGET_MS
        if "budget_ms" in data:
            budget_ms = int(self.number(("budget_ms",), "budget_ms", data["budget_ms"],
                                        BUDGET_MS_RANGE, integer=True))
        checked = self.watches(data)
        policies: dict[str, Policy] = {}
        watches: list[Watch] = []
        for c in checked:
            if c.spec not in policies:
                policies[c.spec] = self.policy(c)
            policy = policies[c.spec]
            victim = policy.victim if c.victim is None else c.victim
            watches.append(Watch(
                index=c.index, line=self.lines.line(c.path), domain=c.domain,
                triggers=c.triggers, policy_spec=c.spec, policy_kind=c.policy_kind,
                policy=replace(policy, victim=victim), victim=victim,
                victim_from_policy=c.victim is None, sigterm_grace_ms=c.sigterm_grace_ms,
                cooldown_s=c.cooldown_s, dry_run=c.dry_run, threshold=c.threshold,
                pressure=c.pressure, margin_percent=c.margin_percent,
                high_guard_percent=c.high_guard_percent,
            ))
        return Config(source=self.source, watches=tuple(watches), decision_log=decision_log,
                      control_socket=control_socket, budget_ms=budget_ms)

    def file_path(self, data: Mapping[str, object], key: str, default: str) -> str:
        if key not in data:
            return default
        value = data[key]
        if not isinstance(value, str):
            self.fail((key,), f"{key}: expected a path (a string), got {type_name(value)}")
        if not value:
            self.fail((key,), f"{key}: empty path")
        if not value.isprintable():
            self.fail((key,), f"{key}: {value!r} has a non-printable character")
        if not value.startswith("/"):
            self.fail((key,), f"{key}: {value!r} is not an absolute path (it must start "
                      "with /)")
        if value.endswith("/"):
            self.fail((key,), f"{key}: {value!r} names a directory; give a file path")
        return value

    def watches(self, data: Mapping[str, object]) -> list[_Checked]:
        if "watch" not in data:
            self.fail((), "watch: no [[watch]] table; a config file needs at least one "
                      "(the built-in default applies only when no config file is given)")
        watches = data["watch"]
        if isinstance(watches, dict):
            self.fail(("watch",), "watch: expected [[watch]] tables (an array of tables), "
                      "not a single [watch] table")
        if not isinstance(watches, list):
            self.fail(("watch",), f"watch: expected [[watch]] tables, got {type_name(watches)}")
        if not watches:
            self.fail(("watch",), "watch: the list of watches is empty; a config file needs "
                      "at least one")
        out: list[_Checked] = []
        seen: dict[str, int] = {}
        for i, raw in enumerate(watches):
            path: KeyPath = ("watch", i)
            label = f"watch[{i + 1}]"
            if not isinstance(raw, dict):
                self.fail(path, f"{label}: expected a table, got {type_name(raw)}")
            w = self.watch(i + 1, path, label, raw)
            if w.domain.spec in seen:
                first = seen[w.domain.spec]
                self.fail((*path, "domain"), f"{label}.domain: {w.domain.spec!r} is already "
                          f"watched by watch[{first + 1}] (line "
                          f"{self.lines.line(('watch', first))}); one watch per domain")
            seen[w.domain.spec] = i
            out.append(w)
        return out

    # one watch
    def watch(self, index: int, path: KeyPath, label: str, raw: Mapping[str, object]
              ) -> _Checked:
        for key in raw:
            if key not in WATCH_KEYS:
                self.fail((*path, key), _unknown(key, WATCH_KEYS, f"{label}."))
        for key in REQUIRED_WATCH_KEYS:
            if key not in raw:
                self.fail(path, f"{label}.{key}: missing; every watch needs "
                          f"{', '.join(REQUIRED_WATCH_KEYS)}")
        domain = self.domain((*path, "domain"), f"{label}.domain", raw["domain"])
        triggers = self.triggers((*path, "triggers"), f"{label}.triggers", raw["triggers"])
        spec_value = raw["policy"]
        if not isinstance(spec_value, str):
            self.fail((*path, "policy"), f"{label}.policy: expected a policy SPEC (a string), "
                      f"got {type_name(spec_value)}")
        victim: VictimKind | None = None
        if "victim" in raw:
            value = raw["victim"]
            if not isinstance(value, str) or value not in VICTIM_KINDS:
                shown = repr(value) if isinstance(value, str) else type_name(value)
                self.fail((*path, "victim"), f"{label}.victim: expected one of "
                          f"{', '.join(VICTIM_KINDS)}, got {shown}")
            victim = value
        grace = DEFAULT_SIGTERM_GRACE_MS
        if "sigterm_grace_ms" in raw:
            grace = int(self.number((*path, "sigterm_grace_ms"), f"{label}.sigterm_grace_ms",
                                    raw["sigterm_grace_ms"], SIGTERM_GRACE_MS_RANGE,
                                    integer=True))
        cooldown = DEFAULT_COOLDOWN_S
        if "cooldown_s" in raw:
            cooldown = self.number((*path, "cooldown_s"), f"{label}.cooldown_s",
                                   raw["cooldown_s"], COOLDOWN_S_RANGE)
        dry_run = False
        if "dry_run" in raw:
            value = raw["dry_run"]
            if not isinstance(value, bool):
                self.fail((*path, "dry_run"), f"{label}.dry_run: expected true or false, got "
                          f"{type_name(value)}")
            dry_run = value
        threshold = self.threshold(path, label, raw, triggers)
        pressure = self.pressure(path, label, raw, triggers)
        margin = self.margin(path, label, raw, triggers)
        guard = None
        if "high_guard_percent" in raw:
            if domain.system:
                self.fail((*path, "high_guard_percent"), f"{label}.high_guard_percent: needs a "
                          "cgroup domain (the system has no memory.high)")
            guard = self.number((*path, "high_guard_percent"), f"{label}.high_guard_percent",
                                raw["high_guard_percent"], HIGH_GUARD_PERCENT_RANGE)
        for trigger in triggers:
            if trigger in CGROUP_ONLY_TRIGGERS and domain.system:
                why = ("the system has no limit; use \"threshold\"" if trigger == "margin"
                       else "the system has no memory.events")
                self.fail((*path, "triggers"), f"{label}.triggers: {trigger!r} needs a cgroup "
                          f"domain ({why})")
        spec, kind = self.resolve(spec_value)
        return _Checked(index=index, path=path, domain=domain, triggers=triggers, spec=spec,
                        policy_kind=kind, victim=victim, sigterm_grace_ms=grace,
                        cooldown_s=cooldown, dry_run=dry_run, threshold=threshold,
                        pressure=pressure, margin_percent=margin, high_guard_percent=guard)

    def domain(self, path: KeyPath, label: str, value: object) -> Domain:
        if not isinstance(value, str):
            self.fail(path, f"{label}: expected \"system\" or \"cgroup:/PATH\", got "
                      f"{type_name(value)}")
        if value == SYSTEM:
            return Domain(value)
        if not value.startswith(CGROUP_PREFIX + "/"):
            self.fail(path, f"{label}: {value!r} is neither \"system\" nor \"cgroup:/PATH\" "
                      "(a path inside the memory cgroup hierarchy, globs allowed)")
        cgroup = value[len(CGROUP_PREFIX):]
        if not cgroup.isprintable():
            self.fail(path, f"{label}: {value!r} has a non-printable character")
        if cgroup == "/":
            self.fail(path, f"{label}: the root cgroup is the whole system; write \"system\"")
        if cgroup.endswith("/"):
            self.fail(path, f"{label}: {value!r} ends with /; write it without")
        for part in cgroup[1:].split("/"):
            if part in ("", ".", ".."):
                shown = "an empty component (//)" if not part else f"a {part!r} component"
                self.fail(path, f"{label}: {value!r} has {shown}; write the plain path")
            if "**" in part:
                self.fail(path, f"{label}: {value!r}: ** is not supported (a * matches within "
                          "one path component; write one * per level)")
            problem = _bracket_problem(part)
            if problem:
                self.fail(path, f"{label}: {value!r}: {problem}")
        return Domain(value)

    def triggers(self, path: KeyPath, label: str, value: object) -> tuple[Trigger, ...]:
        if isinstance(value, str):
            self.fail(path, f"{label}: expected a list of strings, got {type_name(value)}; "
                      f"write [{value!r}]".replace("'", '"'))
        if not isinstance(value, list):
            self.fail(path, f"{label}: expected a list of strings, got {type_name(value)}")
        if not value:
            self.fail(path, f"{label}: empty; name at least one of {', '.join(TRIGGERS)}")
        out: list[Trigger] = []
        for item in value:
            if not isinstance(item, str):
                self.fail(path, f"{label}: expected strings, got {type_name(item)}")
            if item not in TRIGGERS:
                close = difflib.get_close_matches(item, TRIGGERS, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                self.fail(path, f"{label}: unknown trigger {item!r} (expected "
                          f"{', '.join(TRIGGERS)}){hint}")
            if item in out:
                self.fail(path, f"{label}: {item!r} is listed twice")
            out.append(item)
        return tuple(out)

    def table(self, path: KeyPath, label: str, value: object, keys: tuple[str, ...]
              ) -> Mapping[str, object]:
        if not isinstance(value, dict):
            self.fail(path, f"{label}: expected a table, got {type_name(value)}")
        for key in value:
            if key not in keys:
                self.fail((*path, key), _unknown(key, keys, f"{label}."))
        return cast("Mapping[str, object]", value)

    def unused(self, path: KeyPath, label: str, raw: Mapping[str, object], key: str, *,
               trigger: str, triggers: tuple[Trigger, ...]) -> bool:
        """Whether ``key`` is absent; an error if it is given without its trigger."""
        if key not in raw:
            return True
        if trigger not in triggers:
            self.fail((*path, key), f"{label}.{key}: has no effect without {trigger!r} in "
                      "triggers")
        return False

    def threshold(self, path: KeyPath, label: str, raw: Mapping[str, object],
                  triggers: tuple[Trigger, ...]) -> Threshold | None:
        if self.unused(path, label, raw, "threshold", trigger="threshold",
                       triggers=triggers):
            return Threshold() if "threshold" in triggers else None
        here, name = (*path, "threshold"), f"{label}.threshold"
        table = self.table(here, name, raw["threshold"], THRESHOLD_KEYS)
        values: dict[str, float] = {}
        for key in THRESHOLD_KEYS:
            if key in table:
                values[key] = self.number((*here, key), f"{name}.{key}", table[key],
                                          PERCENT_RANGE)
        for figure in ("mem_available", "swap_free"):
            term, kill = f"{figure}_percent", f"{figure}_kill_percent"
            values.setdefault(term, EARLYOOM_PERCENT)
            values.setdefault(kill, values[term] / 2)
            if values[kill] > values[term]:
                self.fail((*here, kill if kill in table else term),
                          f"{name}.{kill}: {num_text(values[kill])} is above {term} "
                          f"({num_text(values[term])}); the SIGKILL level must be at or below the "
                          "SIGTERM level")
        return Threshold(**values)

    def pressure(self, path: KeyPath, label: str, raw: Mapping[str, object],
                 triggers: tuple[Trigger, ...]) -> Pressure | None:
        if self.unused(path, label, raw, "pressure", trigger="pressure",
                       triggers=triggers):
            return Pressure() if "pressure" in triggers else None
        here, name = (*path, "pressure"), f"{label}.pressure"
        table = self.table(here, name, raw["pressure"], PRESSURE_KEYS)
        some = full = None
        if "some_avg10" in table:
            some = self.number((*here, "some_avg10"), f"{name}.some_avg10",
                               table["some_avg10"], PSI_PERCENT_RANGE)
        if "full_avg10" in table:
            full = self.number((*here, "full_avg10"), f"{name}.full_avg10",
                               table["full_avg10"], PSI_PERCENT_RANGE)
        if some is None and full is None:
            full = DEFAULT_FULL_AVG10
        window = DEFAULT_PSI_WINDOW_S
        if "window_s" in table:
            window = self.number((*here, "window_s"), f"{name}.window_s", table["window_s"],
                                 PSI_WINDOW_S_RANGE)
            step = UNPRIVILEGED_PSI_WINDOW_STEP_S
            if not self.cap_sys_resource and window % step:
                self.fail((*here, "window_s"), f"{name}.window_s: {num_text(window)} is not a "
                          f"multiple of {step}; without CAP_SYS_RESOURCE (absent here) the "
                          f"kernel takes only PSI windows of {step}, 4, 6, 8 or 10 s")
        return Pressure(some_avg10=some, full_avg10=full, window_s=window)

    def margin(self, path: KeyPath, label: str, raw: Mapping[str, object],
               triggers: tuple[Trigger, ...]) -> float | None:
        if self.unused(path, label, raw, "margin_percent", trigger="margin",
                       triggers=triggers):
            return DEFAULT_MARGIN_PERCENT if "margin" in triggers else None
        return self.number((*path, "margin_percent"), f"{label}.margin_percent",
                           raw["margin_percent"], MARGIN_PERCENT_RANGE)

    def number(self, path: KeyPath, label: str, value: object, bounds: tuple[float, float],
               integer: bool = False) -> float:
        """A number in a config is a float (an int as written too), unless
        ``integer``."""
        n = super().number(path, label, value, bounds, integer)
        return n if integer else float(n)

    # the policy, once the rest is known to be right
    def resolve(self, spec: str) -> tuple[str, PolicyKind]:
        """A SPEC with a relative file path made absolute (against the config
        file's directory), and what kind of policy it names."""
        if spec in builtins() or not spec.endswith((".py", ".toml")):
            return spec, "built-in"  # or an unknown name, which load_policy reports
        kind: PolicyKind = "python" if spec.endswith(".py") else "rules"
        return os.path.normpath(os.path.join(self.base_dir, spec)), kind

    def policy(self, watch: _Checked) -> Policy:
        try:
            return load_policy(watch.spec)
        except OomwardenError as e:
            self.fail((*watch.path, "policy"), f"watch[{watch.index}].policy: {e}")


def _bracket_problem(part: str) -> str | None:
    """What is wrong with the ``[...]`` sets of one glob component, if anything
    (fnmatch would take an unclosed ``[`` as a literal, silently). The rules
    are fnmatch's: ``!`` negates, a ``]`` first in the set is a member."""
    i, n = 0, len(part)
    while i < n:
        c = part[i]
        if c == "]":
            return "] without ["
        if c == "[":
            j = i + 1
            if j < n and part[j] == "!":
                j += 1
            if j < n and part[j] == "]":
                j += 1
            end = part.find("]", j)
            if end < 0:
                return "[ without a closing ]"
            i = end
        i += 1
    return None


# -- a summary, for check-config and the daemon's start -----------------------------------


def describe_policy(watch: Watch) -> str:
    """``growth (built-in, per-task)``, ``x.toml (rules file /etc/x.toml, ...)``."""
    p = watch.policy
    shape = " + ".join(s for s, hook in (("per-task", p.evaluate), ("handler", p.handle))
                       if hook is not None) or "per-task"
    if p.kernel:
        shape = "per-task, the kernel's own choice"
    if watch.policy_kind == "built-in":
        return f"{printable(p.name)} (built-in, {shape})"
    what = "Python policy" if watch.policy_kind == "python" else "rules file"
    return f"{printable(p.name)} ({what} {printable(watch.policy_spec)}, {shape})"


def describe_triggers(watch: Watch) -> str:
    parts: list[str] = []
    for t in watch.triggers:
        if t == "threshold" and watch.threshold is not None:
            th = watch.threshold
            parts.append(f"threshold (SIGTERM at MemAvailable <= "
                         f"{num_text(th.mem_available_percent)}% and SwapFree <= "
                         f"{num_text(th.swap_free_percent)}%, SIGKILL at <= "
                         f"{num_text(th.mem_available_kill_percent)}% and <= "
                         f"{num_text(th.swap_free_kill_percent)}%)")
        elif t == "pressure" and watch.pressure is not None:
            ps = watch.pressure
            levels = [f"{k} >= {num_text(v)}%" for k, v in (("some", ps.some_avg10),
                                                       ("full", ps.full_avg10)) if v is not None]
            parts.append(f"pressure ({' or '.join(levels)} over {num_text(ps.window_s)} s)")
        elif t == "margin" and watch.margin_percent is not None:
            parts.append(f"margin (working set within {num_text(watch.margin_percent)}% of the "
                         "limit)")
        else:
            parts.append(t)
    return ", ".join(parts)


def describe_kill(watch: Watch) -> str:
    """How this watch's victims are signalled."""
    grace = watch.sigterm_grace_ms
    plain = "SIGKILL at once" if grace == 0 else f"SIGTERM, then SIGKILL after {grace} ms"
    if watch.threshold is None:
        return plain
    text = "threshold: SIGTERM at its SIGTERM level, SIGKILL at its kill level"
    if grace:
        text += f" or {grace} ms after the SIGTERM"
    if len(watch.triggers) > 1:
        text += f"; other triggers: {plain}"
    return text


def summarize(config: Config) -> list[str]:
    """A short human summary: the settings, then each watch on a few lines."""
    where = ("the built-in default config (earlyoom's thresholds; no config file given)"
             if config.builtin_default else f"config {config.source}")
    n = len(config.watches)
    lines = [f"{where}: {n} watch{'es' if n != 1 else ''}",
             f"decision log: {printable(config.decision_log)}",
             f"control socket: {printable(config.control_socket)}",
             f"policy budget: {config.budget_ms} ms per decision"]
    for w in config.watches:
        at = f" (line {w.line})" if w.line else ""
        glob = " (a glob: every matching cgroup)" if w.domain.is_glob else ""
        kill = describe_kill(w)
        victim = f"{w.victim} (the policy's)" if w.victim_from_policy else w.victim
        lines += [
            f"{w.name}{at}: domain {w.domain.spec}{glob}",
            f"  triggers: {describe_triggers(w)}",
            f"  policy: {describe_policy(w)}",
            f"  victim: {victim}; cooldown: {num_text(w.cooldown_s)} s; "
            f"dry run: {'yes' if w.dry_run else 'no'}",
            f"  kill: {kill}",
        ]
        if w.high_guard_percent is not None:
            lines.append(f"  memory.high guard: {num_text(w.high_guard_percent)}% below memory.max "
                         "(cgroup v2; restored on exit)")
    return lines


# -- small helpers ------------------------------------------------------------------------

def _unknown(key: str, known: tuple[str, ...], prefix: str = "") -> str:
    options = [prefix + k for k in known]
    close = (difflib.get_close_matches(key, known, n=1)
             or difflib.get_close_matches(prefix + key, options, n=1))
    hint = f"; did you mean {prefix}{close[0].removeprefix(prefix)}?" if close else ""
    return f"{prefix}{key}: unknown key (expected {', '.join(options)}){hint}"
