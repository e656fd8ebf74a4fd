"""A simulation scenario: a TOML file, checked completely at load.

``load_scenario(path)`` reads and checks a scenario file and returns a frozen
:class:`Scenario`, or raises :class:`ScenarioError` with one line naming the
file, the line and the key (``leak.toml:12: process[2].rate: expected a size
such as "64M", got a boolean (true)``). The format is in ``docs/simulate.md``.
"""

from __future__ import annotations

import difflib
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, cast

from oomwarden.config import (
    DEFAULT_MARGIN_PERCENT,
    EARLYOOM_PERCENT,
    MARGIN_PERCENT_RANGE,
    PERCENT_RANGE,
    PRESSURE_KEYS,
    PSI_PERCENT_RANGE,
    THRESHOLD_KEYS,
    Pressure,
    Threshold,
)
from oomwarden.errors import OomwardenError
from oomwarden.limits import MAX_STEPS as MAX_STEPS  # noqa: PLC0414 (a re-export)
from oomwarden.textfile import (
    KeyPath,
    TomlChecker,
    printable,
    read_text_file,
    toml_error_message,
    type_name,
)

PAGE = 4096
MAX_SCENARIO_BYTES = 1 << 20
#: Bounds that keep a run small and its numbers in range (and MAX_STEPS, in
#: oomwarden.limits).
MAX_PROCESSES = 10_000
MAX_SIZE = 1 << 50  # 1 PiB
DEFAULT_STEPS = 300
DEFAULT_STEP_SECONDS = 1.0
DEFAULT_LATENCY_STEPS = 2
DEFAULT_COOLDOWN_STEPS = 5
DEFAULT_HISTORY_STEPS = 5
DEFAULT_RECOVERY_STEPS = 10
#: The memory fill (share of the limit) at which the pressure model starts to
#: report stalls: reclaim begins well before the limit.
DEFAULT_PRESSURE_START = 0.9

Profile = Literal["steady", "leak", "spike", "sawtooth", "fork_storm", "tmpfs"]
PROFILES: tuple[Profile, ...] = ("steady", "leak", "spike", "sawtooth", "fork_storm", "tmpfs")
WardenTrigger = Literal["threshold", "margin", "pressure"]
WARDEN_TRIGGERS: tuple[WardenTrigger, ...] = ("threshold", "margin", "pressure")

TOP_KEYS = ("scenario", "domain", "warden", "earlyoom", "cgroup", "tmpfs", "process")
SCENARIO_KEYS = ("name", "steps", "step_seconds", "seed", "policies", "recovery_steps")
DOMAIN_KEYS = ("limit", "swap")
WARDEN_KEYS = ("triggers", "latency_steps", "cooldown_steps", "history_steps", "threshold",
               "margin_percent", "pressure", "pressure_start")
EARLYOOM_KEYS = ("prefer", "avoid")
CGROUP_KEYS = ("path",)
TMPFS_KEYS = ("path", "size", "importance")
PROCESS_KEYS = ("name", "exe", "cgroup", "parent", "importance", "oom_score_adj", "start",
                "count", "profile", "size", "rate", "jitter", "spike_at", "spike_size",
                "spike_steps", "period", "peak", "children_per_step", "child_size",
                "max_children", "child_importance", "tmpfs", "rename_at", "rename_to")
#: Keys that belong to one profile only (a stray one is an error, not ignored).
PROFILE_KEYS: dict[str, tuple[Profile, ...]] = {
    "rate": ("leak", "tmpfs"),
    "spike_at": ("spike",), "spike_size": ("spike",), "spike_steps": ("spike",),
    "period": ("sawtooth",), "peak": ("sawtooth",),
    "children_per_step": ("fork_storm",), "child_size": ("fork_storm",),
    "max_children": ("fork_storm",), "child_importance": ("fork_storm",),
    "tmpfs": ("tmpfs",),
}

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTP]?)(?:i?B)?\s*$", re.IGNORECASE)
_SCALE = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
_COMM_MAX = 15  # TASK_COMM_LEN - 1


class ScenarioError(OomwardenError):
    """A scenario file that cannot be read or is wrong: one line naming the
    file, the line and the key."""


@dataclass(frozen=True, slots=True)
class ProcessSpec:
    """One ``[[process]]`` (after ``count`` expansion: one per process)."""

    name: str
    exe: str
    cgroup: str
    parent: str | None
    importance: float
    oom_score_adj: int
    start: int
    profile: Profile
    size: int
    rate: int = 0
    jitter: float = 0.0
    spike_at: int = 0
    spike_size: int = 0
    spike_steps: int = 1
    period: int = 1
    peak: int = 0
    children_per_step: int = 0
    child_size: int = 0
    max_children: int = 0
    child_importance: float = 0.0
    tmpfs: str | None = None
    rename_at: int | None = None
    rename_to: str | None = None


@dataclass(frozen=True, slots=True)
class TmpfsSpec:
    path: str
    size: int
    importance: float


@dataclass(frozen=True, slots=True)
class WardenSpec:
    """The warden's trigger model: which triggers, how long a trigger must
    hold before the warden acts (``latency_steps``: its polling and PSI
    window), how long it waits after acting, and its history window."""

    triggers: tuple[WardenTrigger, ...] = ("threshold",)
    latency_steps: int = DEFAULT_LATENCY_STEPS
    cooldown_steps: int = DEFAULT_COOLDOWN_STEPS
    history_steps: int = DEFAULT_HISTORY_STEPS
    threshold: Threshold = field(default_factory=Threshold)
    margin_percent: float = DEFAULT_MARGIN_PERCENT
    pressure: Pressure = field(default_factory=Pressure)
    pressure_start: float = DEFAULT_PRESSURE_START


@dataclass(frozen=True, slots=True)
class Scenario:
    source: str
    name: str
    steps: int
    step_seconds: float
    seed: int
    #: Policy SPECs to run when the command line names none (files resolved
    #: against the scenario's directory).
    policies: tuple[str, ...]
    recovery_steps: int
    limit: int
    swap: int
    warden: WardenSpec
    cgroups: tuple[str, ...]
    tmpfs: tuple[TmpfsSpec, ...]
    processes: tuple[ProcessSpec, ...]
    earlyoom_prefer: str | None = None
    earlyoom_avoid: str | None = None


def parse_size(value: object) -> int | None:
    """``"64M"``, ``"1.5G"``, ``"512KiB"`` or an integer number of bytes; None
    if it is none of these."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value >= 0 else None
    if not isinstance(value, str):
        return None
    m = _SIZE.match(value)
    if m is None:
        return None
    return int(float(m.group(1)) * _SCALE[m.group(2).upper()])


def load_scenario(path: str) -> Scenario:
    text = read_text_file(path, what="scenario file", max_bytes=MAX_SCENARIO_BYTES,
                          error=ScenarioError, where=printable(path))
    return parse_scenario(text, path, base_dir=os.path.dirname(os.path.abspath(path)))


def parse_scenario(text: str, source: str, *, base_dir: str | None = None) -> Scenario:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ScenarioError(toml_error_message(str(e), text, printable(source))) from None
    if base_dir is None:
        base_dir = os.path.dirname(os.path.abspath(source))
    return _Checker(printable(source), text, base_dir).scenario(data)


class _Checker(TomlChecker):
    error = ScenarioError

    def __init__(self, source: str, text: str, base_dir: str) -> None:
        super().__init__(source, text)
        self.base_dir = base_dir

    # generic values
    def table(self, path: KeyPath, label: str, value: object, keys: tuple[str, ...]
              ) -> Mapping[str, object]:
        if not isinstance(value, dict):
            self.fail(path, f"{label}: expected a table, got {type_name(value)}")
        for key in value:
            if key not in keys:
                close = difflib.get_close_matches(key, keys, n=1)
                hint = f"; did you mean {label + '.' if label else ''}{close[0]}?" if close else ""
                self.fail((*path, key), f"{label + '.' if label else ''}{key}: unknown key "
                          f"(expected {', '.join(keys)}){hint}")
        return cast("Mapping[str, object]", value)

    def array(self, data: Mapping[str, object], key: str) -> list[Mapping[str, object]]:
        if key not in data:
            return []
        value = data[key]
        if not isinstance(value, list):
            self.fail((key,), f"{key}: expected [[{key}]] tables, got {type_name(value)}")
        for i, item in enumerate(value):
            if not isinstance(item, dict):
                self.fail((key, i), f"{key}[{i + 1}]: expected a table, got {type_name(item)}")
        return cast("list[Mapping[str, object]]", value)

    def integer(self, path: KeyPath, label: str, value: object, lo: int, hi: int) -> int:
        return int(self.number(path, label, value, (lo, hi), integer=True))

    def size(self, path: KeyPath, label: str, value: object) -> int:
        n = parse_size(value)
        if n is None:
            self.fail(path, f"{label}: expected a size such as \"64M\" or a number of bytes, "
                      f"got {type_name(value)}")
        if n > MAX_SIZE:
            self.fail(path, f"{label}: {value} is more than 1P")
        return n

    def string(self, path: KeyPath, label: str, value: object) -> str:
        if not isinstance(value, str):
            self.fail(path, f"{label}: expected a string, got {type_name(value)}")
        if not value or not value.isprintable():
            self.fail(path, f"{label}: {value!r} is empty or has a non-printable character")
        return value

    def abs_path(self, path: KeyPath, label: str, value: object) -> str:
        text = self.string(path, label, value)
        if not text.startswith("/") or "//" in text or (text != "/" and text.endswith("/")):
            self.fail(path, f"{label}: {text!r} is not a plain absolute path")
        return text

    def regex(self, path: KeyPath, label: str, value: object) -> str:
        text = self.string(path, label, value)
        try:
            re.compile(text)
        except re.error as e:
            self.fail(path, f"{label}: bad regex {text!r}: {e}")
        return text

    # the file
    def scenario(self, data: Mapping[str, object]) -> Scenario:
        self.table((), "", data, TOP_KEYS)
        head = self.table(("scenario",), "scenario", data.get("scenario", {}), SCENARIO_KEYS)
        name = self.string(("scenario", "name"), "scenario.name",
                           head.get("name", os.path.basename(self.source)))
        steps = self.integer(("scenario", "steps"), "scenario.steps",
                             head.get("steps", DEFAULT_STEPS), 1, MAX_STEPS)
        step_s = self.number(("scenario", "step_seconds"), "scenario.step_seconds",
                             head.get("step_seconds", DEFAULT_STEP_SECONDS), (0.001, 3600.0))
        seed = self.integer(("scenario", "seed"), "scenario.seed", head.get("seed", 0),
                            0, 2**63 - 1)
        recovery = self.integer(("scenario", "recovery_steps"), "scenario.recovery_steps",
                                head.get("recovery_steps", DEFAULT_RECOVERY_STEPS), 1, MAX_STEPS)
        policies = self.policies(head)
        if "domain" not in data:
            self.fail((), "domain: missing; a scenario needs a [domain] with its limit")
        dom = self.table(("domain",), "domain", data["domain"], DOMAIN_KEYS)
        if "limit" not in dom:
            self.fail(("domain",), "domain.limit: missing; the domain's memory size")
        limit = self.size(("domain", "limit"), "domain.limit", dom["limit"])
        if limit < 16 * PAGE:
            self.fail(("domain", "limit"), f"domain.limit: {limit} bytes is too small "
                      "(at least 64K)")
        swap = self.size(("domain", "swap"), "domain.swap", dom.get("swap", 0))
        warden = self.warden(data.get("warden", {}))
        prefer = avoid = None
        if "earlyoom" in data:
            eo = self.table(("earlyoom",), "earlyoom", data["earlyoom"], EARLYOOM_KEYS)
            if "prefer" in eo:
                prefer = self.regex(("earlyoom", "prefer"), "earlyoom.prefer", eo["prefer"])
            if "avoid" in eo:
                avoid = self.regex(("earlyoom", "avoid"), "earlyoom.avoid", eo["avoid"])
        cgroups: list[str] = []
        for i, raw in enumerate(self.array(data, "cgroup")):
            label = f"cgroup[{i + 1}]"
            t = self.table(("cgroup", i), label, raw, CGROUP_KEYS)
            if "path" not in t:
                self.fail(("cgroup", i), f"{label}.path: missing")
            p = self.abs_path(("cgroup", i, "path"), f"{label}.path", t["path"])
            if p == "/" or p in cgroups:
                self.fail(("cgroup", i, "path"), f"{label}.path: {p!r} is the root or "
                          "declared twice")
            cgroups.append(p)
        tmpfs: list[TmpfsSpec] = []
        for i, raw in enumerate(self.array(data, "tmpfs")):
            label = f"tmpfs[{i + 1}]"
            t = self.table(("tmpfs", i), label, raw, TMPFS_KEYS)
            if "path" not in t:
                self.fail(("tmpfs", i), f"{label}.path: missing")
            p = self.abs_path(("tmpfs", i, "path"), f"{label}.path", t["path"])
            if any(x.path == p for x in tmpfs):
                self.fail(("tmpfs", i, "path"), f"{label}.path: {p!r} is declared twice")
            tmpfs.append(TmpfsSpec(
                p, self.size(("tmpfs", i, "size"), f"{label}.size", t.get("size", 0)),
                self.number(("tmpfs", i, "importance"), f"{label}.importance",
                            t.get("importance", 0), (0, 1e9))))
        processes = self.processes(data, cgroups, tmpfs, steps)
        if not processes:
            self.fail((), "process: no [[process]]; a scenario needs at least one")
        return Scenario(
            source=self.source, name=name, steps=steps, step_seconds=float(step_s), seed=seed,
            policies=policies, recovery_steps=recovery, limit=limit, swap=swap, warden=warden,
            cgroups=tuple(cgroups), tmpfs=tuple(tmpfs), processes=tuple(processes),
            earlyoom_prefer=prefer, earlyoom_avoid=avoid)

    def policies(self, head: Mapping[str, object]) -> tuple[str, ...]:
        value = head.get("policies", ["kernel", "growth"])
        path: KeyPath = ("scenario", "policies")
        if not isinstance(value, list) or not value:
            self.fail(path, f"scenario.policies: expected a non-empty list of policy SPECs, "
                      f"got {type_name(value)}")
        out: list[str] = []
        for v in value:
            spec = self.string(path, "scenario.policies", v)
            if spec.endswith((".py", ".toml")):
                spec = os.path.normpath(os.path.join(self.base_dir, spec))
            out.append(spec)
        return tuple(out)

    def warden(self, value: object) -> WardenSpec:
        w = self.table(("warden",), "warden", value, WARDEN_KEYS)
        triggers: tuple[WardenTrigger, ...] = ("threshold",)
        if "triggers" in w:
            raw = w["triggers"]
            if not isinstance(raw, list) or not raw:
                self.fail(("warden", "triggers"), "warden.triggers: expected a non-empty "
                          f"list of {', '.join(WARDEN_TRIGGERS)}, got {type_name(raw)}")
            out: list[WardenTrigger] = []
            for item in raw:
                if item not in WARDEN_TRIGGERS or item in out:
                    self.fail(("warden", "triggers"), f"warden.triggers: {item!r} is unknown "
                              f"or repeated (expected {', '.join(WARDEN_TRIGGERS)})")
                out.append(cast("WardenTrigger", item))
            triggers = tuple(out)
        latency = self.integer(("warden", "latency_steps"), "warden.latency_steps",
                               w.get("latency_steps", DEFAULT_LATENCY_STEPS), 1, MAX_STEPS)
        cooldown = self.integer(("warden", "cooldown_steps"), "warden.cooldown_steps",
                                w.get("cooldown_steps", DEFAULT_COOLDOWN_STEPS), 0, MAX_STEPS)
        history = self.integer(("warden", "history_steps"), "warden.history_steps",
                               w.get("history_steps", DEFAULT_HISTORY_STEPS), 1, MAX_STEPS)
        threshold = Threshold()
        if "threshold" in w:
            here: KeyPath = ("warden", "threshold")
            t = self.table(here, "warden.threshold", w["threshold"], THRESHOLD_KEYS)
            values: dict[str, float] = {}
            for key in THRESHOLD_KEYS:
                if key in t:
                    values[key] = self.number((*here, key), f"warden.threshold.{key}", t[key],
                                              PERCENT_RANGE)
            for figure in ("mem_available", "swap_free"):
                term, kill = f"{figure}_percent", f"{figure}_kill_percent"
                values.setdefault(term, EARLYOOM_PERCENT)
                values.setdefault(kill, values[term] / 2)
                if values[kill] > values[term]:
                    self.fail((*here, kill), f"warden.threshold.{kill}: above {term}")
            threshold = Threshold(**values)
        margin = self.number(("warden", "margin_percent"), "warden.margin_percent",
                             w.get("margin_percent", DEFAULT_MARGIN_PERCENT),
                             MARGIN_PERCENT_RANGE)
        pressure = Pressure()
        if "pressure" in w:
            here = ("warden", "pressure")
            p = self.table(here, "warden.pressure", w["pressure"], PRESSURE_KEYS)
            some = full = None
            if "some_avg10" in p:
                some = self.number((*here, "some_avg10"), "warden.pressure.some_avg10",
                                   p["some_avg10"], PSI_PERCENT_RANGE)
            if "full_avg10" in p:
                full = self.number((*here, "full_avg10"), "warden.pressure.full_avg10",
                                   p["full_avg10"], PSI_PERCENT_RANGE)
            if "window_s" in p:
                self.fail((*here, "window_s"), "warden.pressure.window_s: the simulator's "
                          "window is warden.latency_steps")
            pressure = Pressure(some_avg10=some, full_avg10=full) if (some or full) else (
                Pressure())
        start = self.number(("warden", "pressure_start"), "warden.pressure_start",
                            w.get("pressure_start", DEFAULT_PRESSURE_START), (0.0, 0.999))
        return WardenSpec(triggers, latency, cooldown, history, threshold, float(margin),
                          pressure, float(start))

    def processes(self, data: Mapping[str, object], cgroups: list[str],
                  tmpfs: list[TmpfsSpec], steps: int) -> list[ProcessSpec]:
        out: list[ProcessSpec] = []
        names: set[str] = set()
        for i, raw in enumerate(self.array(data, "process")):
            path: KeyPath = ("process", i)
            label = f"process[{i + 1}]"
            t = self.table(path, label, raw, PROCESS_KEYS)
            for key in ("name", "profile", "size"):
                if key not in t:
                    self.fail(path, f"{label}.{key}: missing; every process needs a name, "
                              "a profile and a size")

            def at(key: str, path: KeyPath = path) -> KeyPath:
                return (*path, key)

            name = self.string(at("name"), f"{label}.name", t["name"])
            profile = t["profile"]
            if profile not in PROFILES:
                close = difflib.get_close_matches(str(profile), PROFILES, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                self.fail(at("profile"), f"{label}.profile: {profile!r} is not one of "
                          f"{', '.join(PROFILES)}{hint}")
            prof: Profile = profile
            for key, owners in PROFILE_KEYS.items():
                if key in t and prof not in owners:
                    self.fail(at(key), f"{label}.{key}: has no effect with profile "
                              f"{prof!r} (only with {', '.join(owners)})")
            cgroup = "/"
            if "cgroup" in t:
                cgroup = self.abs_path(at("cgroup"), f"{label}.cgroup", t["cgroup"])
                if cgroup != "/" and cgroup not in cgroups:
                    self.fail(at("cgroup"), f"{label}.cgroup: {cgroup!r} is not a declared "
                              "[[cgroup]]")
            parent = None
            if "parent" in t:
                parent = self.string(at("parent"), f"{label}.parent", t["parent"])
                if parent not in names:
                    self.fail(at("parent"), f"{label}.parent: no process named {parent!r} "
                              "before this one")
            count = self.integer(at("count"), f"{label}.count", t.get("count", 1), 1, 1000)
            room = _COMM_MAX - (0 if count == 1 else len(f"-{count}"))
            if len(name) > room:
                self.fail(at("name"), f"{label}.name: {name!r} is longer than {room} "
                          "characters (a comm has 15, and count adds a -N suffix)")
            kw: dict[str, object] = {
                "exe": self.abs_path(at("exe"), f"{label}.exe", t["exe"]) if "exe" in t
                else f"/usr/bin/{name}",
                "cgroup": cgroup, "parent": parent,
                "importance": float(self.number(at("importance"), f"{label}.importance",
                                                t.get("importance", 1), (0, 1e9))),
                "oom_score_adj": self.integer(at("oom_score_adj"), f"{label}.oom_score_adj",
                                              t.get("oom_score_adj", 0), -1000, 1000),
                "start": self.integer(at("start"), f"{label}.start", t.get("start", 0), 0,
                                      steps),
                "profile": prof,
                "size": self.size(at("size"), f"{label}.size", t["size"]),
                "jitter": float(self.number(at("jitter"), f"{label}.jitter",
                                            t.get("jitter", 0), (0, 0.5))),
            }
            for key in ("rate", "spike_size", "peak", "child_size"):
                if key in t:
                    kw[key] = self.size(at(key), f"{label}.{key}", t[key])
            for key, lo in (("spike_at", 0), ("spike_steps", 1), ("period", 1),
                            ("children_per_step", 1), ("max_children", 1), ("rename_at", 0)):
                if key in t:
                    kw[key] = self.integer(at(key), f"{label}.{key}", t[key], lo, MAX_STEPS)
            if "child_importance" in t:
                kw["child_importance"] = float(self.number(
                    at("child_importance"), f"{label}.child_importance",
                    t["child_importance"], (0, 1e9)))
            self.requires(path, label, t, prof)
            if prof == "sawtooth" and cast("int", kw.get("peak", 0)) < cast("int", kw["size"]):
                self.fail(at("peak"), f"{label}.peak: below size")
            if "tmpfs" in t:
                fs = self.abs_path(at("tmpfs"), f"{label}.tmpfs", t["tmpfs"])
                if not any(x.path == fs for x in tmpfs):
                    self.fail(at("tmpfs"), f"{label}.tmpfs: {fs!r} is not a declared [[tmpfs]]")
                kw["tmpfs"] = fs
            if ("rename_at" in t) != ("rename_to" in t):
                self.fail(at("rename_at" if "rename_at" in t else "rename_to"),
                          f"{label}: rename_at and rename_to go together")
            if "rename_to" in t:
                new = self.string(at("rename_to"), f"{label}.rename_to", t["rename_to"])
                if len(new) > _COMM_MAX:
                    self.fail(at("rename_to"), f"{label}.rename_to: longer than 15 characters")
                kw["rename_to"] = new
            if sum(1 for _ in out) + count > MAX_PROCESSES:
                self.fail(path, f"{label}: more than {MAX_PROCESSES} processes")
            for n in range(count):
                pname = name if count == 1 else f"{name}-{n + 1}"
                if pname in names:
                    self.fail(at("name"), f"{label}.name: {pname!r} is declared twice")
                names.add(pname)
                out.append(ProcessSpec(name=pname, **kw))  # type: ignore[arg-type]
        return out

    def requires(self, path: KeyPath, label: str, t: Mapping[str, object],
                 profile: Profile) -> None:
        needed = {"leak": ("rate",), "spike": ("spike_at", "spike_size"),
                  "sawtooth": ("period", "peak"),
                  "fork_storm": ("children_per_step", "child_size", "max_children"),
                  "tmpfs": ("rate", "tmpfs")}.get(profile, ())
        for key in needed:
            if key not in t:
                self.fail(path, f"{label}.{key}: missing; profile {profile!r} needs "
                          f"{', '.join(needed)}")
