"""TOML rules: protect, prefer, avoid or pin tasks by what they are.

A rules file is compiled once, at load, into an immutable :class:`RuleSet`
(frozen dataclasses, precompiled regexes and globs, tuples, uids resolved from
user names); evaluating a task only runs the precompiled matchers. The format,
its semantics and examples are in ``docs/rules.md``; in short::

    [policy]
    base = "kernel"            # or "largest": what scores tasks no rule decides
    victim = "process"         # process | tree | cgroup

    [[rule]]
    name = "protect postgres"
    match.exe = "^/usr/lib/postgresql/[^/]+/bin/postgres$"
    action = "protect"

Semantics, per task, rules in file order:

* a rule matches when every one of its ``match.*`` keys matches (AND); a key
  whose value is unknown for the task (``exe`` and ``cmdline`` outside a
  details read, a missing uid or cgroup) never matches, and the verdict says so;
* the first matching *deciding* rule (protect, points, victim-first,
  victim-last) decides: protect ignores the task, points fixes its points,
  victim-first / victim-last put it above / below every task without such a
  rule;
* every matching prefer / avoid rule adjusts the base points, in file order
  (multiply first, then add), unless the deciding rule is protect or points;
* a task no rule touches gets the base: the kernel's badness (``DEFAULT``) or
  rss + swap.

Every error in a rules file is one :class:`PolicyError` line naming the file,
the line and the key.
"""

from __future__ import annotations

import difflib
import fnmatch
import functools
import itertools
import math
import os
import pwd
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal, cast

from oomwarden.errors import PolicyError
from oomwarden.model import Task
from oomwarden.policy.api import (
    DEFAULT,
    IGNORE,
    VICTIM_KINDS,
    Context,
    Policy,
    Verdict,
    VictimKind,
    select,
)
from oomwarden.textfile import KeyLines, one_line, read_text_file, toml_error_message, type_name
from oomwarden.units import fmt_bytes

Action = Literal["protect", "prefer", "avoid", "points", "victim-first", "victim-last"]
ACTIONS: tuple[Action, ...] = ("protect", "prefer", "avoid", "points", "victim-first",
                               "victim-last")
#: Actions that decide a task's fate: the first matching one wins.
DECIDING: frozenset[str] = frozenset({"protect", "points", "victim-first", "victim-last"})
Base = Literal["kernel", "largest"]
BASES: tuple[Base, ...] = ("kernel", "largest")

TOP_KEYS = ("policy", "rule")
POLICY_KEYS = ("base", "victim", "description")
RULE_KEYS = ("name", "action", "match", "add", "multiply", "points")
MATCH_KEYS = ("comm", "exe", "cmdline", "cgroup", "uid", "user")

#: Ordinary points (the base, adjusted, or fixed) are clamped to +-LIMIT so
#: that the victim-first / victim-last bands (+-BAND + points) stay apart from
#: them and inside a signed 64-bit value.
LIMIT = 2**61
BAND = 2**62

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(%|B|K|KiB|M|MiB|G|GiB|T|TiB)\s*$", re.IGNORECASE)
_UNIT = {"b": 1, "k": 1024, "kib": 1024, "m": 1024**2, "mib": 1024**2, "g": 1024**3,
         "gib": 1024**3, "t": 1024**4, "tib": 1024**4}


# -- the compiled form ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Amount:
    """A number of pages to add or subtract: pages, bytes, or a share of the
    domain (``totalpages``), converted per decision."""

    unit: Literal["pages", "bytes", "percent"]
    value: float
    text: str

    def pages(self, totalpages: int, page_size: int) -> int:
        if self.unit == "pages":
            return int(self.value)
        if self.unit == "bytes":
            return int(self.value) // max(1, page_size)
        return int(totalpages * self.value / 100)

    def describe(self, pages: int, page_size: int) -> str:
        if self.unit == "pages":
            return f"{pages} pages ({fmt_bytes(pages * page_size)})"
        return f"{self.text} = {pages} pages"


@dataclass(frozen=True, slots=True)
class Rule:
    """One compiled rule: matchers (None where the rule has no such key), the
    action and its numbers, and the reason texts worked out at load."""

    index: int
    name: str
    line: int
    action: Action
    keys: tuple[str, ...]
    comm: re.Pattern[str] | None = None
    exe: re.Pattern[str] | None = None
    cmdline: re.Pattern[str] | None = None
    cgroup: tuple[re.Pattern[str], ...] | None = None
    uids: frozenset[int] | None = None
    add: Amount | None = None
    multiply: float | None = None
    points: int | None = None
    #: Set when the rule matches only on names a process chooses itself
    #: (comm, cmdline): the caveat that goes with a protection or avoidance.
    spoofable: str | None = None
    #: The reason given when keys of the rule are unknown for a task, by the
    #: tuple of those keys (worked out at load: none is formatted per task).
    unknown_notes: Mapping[tuple[str, ...], str] = field(default_factory=lambda: _NO_NOTES)

    @property
    def label(self) -> str:
        return f"rule '{self.name}'"

    def passes(self, key: str, value: object) -> bool:
        """Whether this rule's ``match.<key>`` holds for a known value (the
        rule has that key)."""
        if key == "comm":
            return self.comm is not None and self.comm.search(cast(str, value)) is not None
        if key == "uid":
            return self.uids is not None and value in self.uids
        if key == "cgroup":
            path = cast(str, value)
            return self.cgroup is not None and any(g.match(path) for g in self.cgroup)
        if key == "exe":
            return self.exe is not None and self.exe.search(cast(str, value)) is not None
        argv = cast("tuple[str, ...]", value)
        return self.cmdline is not None and self.cmdline.search(" ".join(argv)) is not None



_NO_NOTES: Mapping[tuple[str, ...], str] = MappingProxyType({})
#: The keys whose value a task may lack, in the order the notes name them.
UNKNOWABLE = ("uid", "cgroup", "exe", "cmdline")


def _unknown_notes(name: str, action: str, keys: tuple[str, ...]
                   ) -> Mapping[tuple[str, ...], str]:
    """Every note a rule may need about unknown values, made once."""
    have = [k for k in UNKNOWABLE if k in keys or (k == "uid" and "user" in keys)]
    notes: dict[tuple[str, ...], str] = {}
    for n in range(1, len(have) + 1):
        for combo in itertools.combinations(have, n):
            verb = "is" if n == 1 else "are"
            notes[combo] = (f"rule '{name}' ({action}) not applied: {' and '.join(combo)} "
                            f"{verb} unknown for this task (not read in this snapshot), so the "
                            "rule does not match")
    return MappingProxyType(notes)


def _clamp(points: int) -> int:
    return -LIMIT if points < -LIMIT else LIMIT if points > LIMIT else points


MISSING_UID, MISSING_CGROUP, MISSING_EXE, MISSING_CMDLINE = 1, 2, 4, 8

#: How many distinct values of one key (comm names, cgroup paths, ...) keep
#: their match results in memory. Bounded: processes choose their names.
CACHE_SIZE = 32768


@dataclass(frozen=True, slots=True)
class Index:
    """The rules' keys compiled for the hot path: per key, a function from a
    value to the bit mask of the rules that pass (bit ``i`` for rule ``i``;
    a rule without that key always passes), memoised per value in a bounded
    LRU cache. A task is then a few lookups and ANDs, however many rules."""

    everything: int = 0
    comm: Callable[[str], int] | None = None
    uid: Callable[[int], int] | None = None
    cgroup: Callable[[str], int] | None = None
    exe: Callable[[str], int] | None = None
    cmdline: Callable[[tuple[str, ...]], int] | None = None
    uid_rules: int = 0
    cgroup_rules: int = 0
    exe_rules: int = 0
    cmdline_rules: int = 0
    #: (rules whose key values are unknown, which keys) -> the notes saying so
    #: in file order, and the DEFAULT verdict carrying them: made once per
    #: combination, not per task (hot-path snapshots lack every exe).
    notes: Callable[[int, int], tuple[str, ...]] = lambda _rules, _missing: ()
    default: Callable[[int, int], Verdict] = lambda _rules, _missing: DEFAULT

    @staticmethod
    def build(rules: tuple[Rule, ...]) -> Index:
        everything = (1 << len(rules)) - 1
        masks: dict[str, Callable[[Any], int] | None] = {}
        having: dict[str, int] = {}
        for key in MATCH_KEYS:
            if key == "user":
                continue  # folded into the uids
            with_key = tuple(r for r in rules if key in r.keys or (key == "uid" and r.uids))
            having[key] = sum(1 << (r.index - 1) for r in with_key)
            masks[key] = _mask_function(key, with_key, everything & ~having[key])
        by_flag = ((MISSING_UID, having["uid"], "uid"),
                   (MISSING_CGROUP, having["cgroup"], "cgroup"),
                   (MISSING_EXE, having["exe"], "exe"),
                   (MISSING_CMDLINE, having["cmdline"], "cmdline"))

        @functools.lru_cache(maxsize=CACHE_SIZE)
        def notes(unmatched: int, missing: int) -> tuple[str, ...]:
            out: list[str] = []
            for rule in rules:
                bit = 1 << (rule.index - 1)
                if unmatched & bit:
                    keys = tuple(k for flag, with_key, k in by_flag
                                 if missing & flag and with_key & bit)
                    out.append(rule.unknown_notes[keys])
            return tuple(out)

        @functools.lru_cache(maxsize=CACHE_SIZE)
        def default(unmatched: int, missing: int) -> Verdict:
            return DEFAULT.because(*notes(unmatched, missing))

        return Index(everything=everything, comm=masks["comm"], uid=masks["uid"],
                     cgroup=masks["cgroup"], exe=masks["exe"], cmdline=masks["cmdline"],
                     uid_rules=having["uid"], cgroup_rules=having["cgroup"],
                     exe_rules=having["exe"], cmdline_rules=having["cmdline"],
                     notes=notes, default=default)


def _mask_function(key: str, rules: tuple[Rule, ...], base: int
                   ) -> Callable[[Any], int] | None:
    if not rules:
        return None
    bits = tuple((1 << (r.index - 1), r) for r in rules)
    if key == "cmdline":  # join the arguments once, not once per rule
        patterns = tuple((bit, r.cmdline) for bit, r in bits if r.cmdline is not None)

        @functools.lru_cache(maxsize=CACHE_SIZE)
        def cmdline_mask(argv: tuple[str, ...]) -> int:
            text = " ".join(argv)
            out = base
            for bit, pattern in patterns:
                if pattern.search(text) is not None:
                    out |= bit
            return out

        return cmdline_mask

    @functools.lru_cache(maxsize=CACHE_SIZE)
    def mask(value: Any) -> int:
        out = base
        for bit, rule in bits:
            if rule.passes(key, value):
                out |= bit
        return out

    return mask


@dataclass(frozen=True, slots=True)
class RuleSet:
    """A compiled rules file; :meth:`evaluate` is the policy's per-task hook."""

    name: str
    source: str
    base: Base
    victim: VictimKind
    rules: tuple[Rule, ...]
    description: str = ""
    #: Built from ``rules`` at construction.
    index: Index = field(init=False, repr=False, compare=False)
    #: Plans per combination of matching rules (bounded; see :meth:`_plan`).
    _plans: dict[tuple[int, int, int, Context], Plan] = field(
        init=False, repr=False, compare=False)
    _last: list[tuple[int, int, int, Context]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "index", Index.build(self.rules))
        object.__setattr__(self, "_plans", {})
        object.__setattr__(self, "_last", [])

    @property
    def needs_details(self) -> bool:
        """Whether some rule matches on ``exe`` or ``cmdline``, which snapshots
        read only with details (``ReadOptions(details=True)``)."""
        return bool(self.index.exe_rules or self.index.cmdline_rules)

    def policy(self) -> Policy:
        desc = self.description or (
            f"{len(self.rules)} rules from {self.source}; tasks no rule decides: "
            + ("the kernel's badness" if self.base == "kernel" else "rss + swap")
        )
        return Policy(name=self.name, evaluate=self.evaluate, victim=self.victim,
                      description=desc, needs_details=self.needs_details)

    def evaluate(self, task: Task, ctx: Context) -> Verdict:
        ix = self.index
        ok = ix.everything  # bit i set: rule i still matches on the keys seen so far
        unknown = 0  # the rules with a key whose value is unknown for this task
        missing = 0  # which keys are unknown: MISSING_UID | MISSING_CGROUP | ...
        if ix.comm is not None:
            ok &= ix.comm(task.comm)
        if ok and ix.uid is not None:
            if task.uid is None:
                unknown |= ix.uid_rules
                missing |= MISSING_UID
            else:
                ok &= ix.uid(task.uid)
        if ok and ix.cgroup is not None:
            path = ctx.cgroup_path(task)
            if path is None:
                unknown |= ix.cgroup_rules
                missing |= MISSING_CGROUP
            else:
                ok &= ix.cgroup(path)
        if ok and ix.exe is not None:
            if task.exe is None:
                unknown |= ix.exe_rules
                missing |= MISSING_EXE
            else:
                ok &= ix.exe(task.exe)
        if ok and ix.cmdline is not None:
            if task.cmdline is None:
                unknown |= ix.cmdline_rules
                missing |= MISSING_CMDLINE
            else:
                ok &= ix.cmdline(task.cmdline)
        matched = ok & ~unknown
        unmatched = ok & unknown  # known keys matched, but some key is unknown
        if not matched:  # the common case: no rule decides or adjusts anything
            if self.base == "kernel":
                return ix.default(unmatched, missing) if unmatched else DEFAULT
            size, why = self._largest(task, ctx)
            return select(size, why, *(ix.notes(unmatched, missing) if unmatched else ()))
        plan = self._plans.get((matched, unmatched, missing, ctx))
        if plan is None:
            plan = self._plan(matched, unmatched, missing, ctx)
        if plan.verdict is not None:  # protect or fixed points: the same for every task
            return plan.verdict
        # the base, adjusted
        if self.base == "kernel":
            kernel = ctx.kernel_points(task)
            if kernel is None:  # the kernel never picks it; the engine skips it anyway
                return DEFAULT.because(*plan.notes, "the kernel's points are unknown: no opinion")
            points = _clamp(kernel)
            base_reason: tuple[str, ...] = ()
        else:
            points, why = self._largest(task, ctx)
            base_reason = (why,)
        for multiply, add in plan.steps:
            if multiply is not None:
                # On the magnitude, so that preferring always raises and avoiding
                # always lowers, negative points (oom_score_adj < 0) included.
                points += int(abs(points) * (multiply - 1.0))
            points = _clamp(points + add)
        points += plan.band
        if not base_reason:  # the plan's own tuple: shared, checked once by the engine
            return Verdict("select", points, plan.reasons)
        return select(points, *base_reason, *plan.reasons)

    def _plan(self, matched: int, unmatched: int, missing: int, ctx: Context) -> Plan:
        """What a combination of matching rules does, worked out once per
        combination and decision (the context: an ``add`` may be a share of
        the domain) instead of once per task."""
        if len(self._plans) >= CACHE_SIZE or any(k[3] is not ctx for k in self._last):
            self._plans.clear()
            self._last.clear()
        plan = self._make_plan(matched, unmatched, missing, ctx.totalpages, ctx.page_size)
        key = (matched, unmatched, missing, ctx)
        self._plans[key] = plan
        self._last[:] = [key]
        return plan

    def _make_plan(self, matched: int, unmatched: int, missing: int, totalpages: int,
                   page_size: int) -> Plan:
        deciding: Rule | None = None
        adjusting: list[Rule] = []
        notes: list[str] = []
        rules = self.rules
        while matched:  # in file order
            bit = matched & -matched
            matched ^= bit
            rule = rules[bit.bit_length() - 1]
            if rule.action in DECIDING:
                if deciding is None:
                    deciding = rule
                else:
                    notes.append(f"{rule.label} ({rule.action}) also matched; "
                                 f"{deciding.label} came first and decides")
            else:
                adjusting.append(rule)
        if unmatched:
            notes += self.index.notes(unmatched, missing)
        if deciding is not None and deciding.action in ("protect", "points"):
            reasons: list[str] = []
            if deciding.action == "protect":
                reasons.append(f"protected by {deciding.label}")
            else:
                reasons.append(f"{deciding.label} (points): fixed at {deciding.points} points")
            if deciding.spoofable:
                reasons.append(deciding.spoofable)
            reasons += [f"{r.label} ({r.action}) also matched; not applied: "
                        f"{deciding.label} ({deciding.action}) decides" for r in adjusting]
            reasons += notes
            if deciding.action == "protect":
                return Plan(IGNORE.because(*reasons), (), (), 0, tuple(notes))
            assert deciding.points is not None
            return Plan(select(deciding.points, *reasons), (), (), 0, tuple(notes))
        reasons = ["base: the kernel's badness" if self.base == "kernel" else "base: by size"]
        steps: list[tuple[float | None, int]] = []
        for rule in adjusting:
            pages = rule.add.pages(totalpages, page_size) if rule.add is not None else 0
            add = pages if rule.action == "prefer" else -pages
            steps.append((rule.multiply, add))
            said = []
            if rule.multiply is not None:
                said.append(f"x{rule.multiply:g}")
            if rule.add is not None:
                said.append(("+" if add >= 0 else "-")
                            + rule.add.describe(pages, page_size))
            reasons.append(f"{rule.label} ({rule.action}): {' '.join(said)}")
            if rule.spoofable:
                reasons.append(rule.spoofable)
        band = 0
        if deciding is not None:
            if deciding.action == "victim-first":
                band = BAND
                reasons.append(f"{deciding.label} (victim-first): chosen before every task "
                               "without victim-first (2^62 + its points)")
            else:
                band = -BAND
                reasons.append(f"{deciding.label} (victim-last): chosen only after every task "
                               "without victim-last (-2^62 + its points)")
                if deciding.spoofable:
                    reasons.append(deciding.spoofable)
        return Plan(None, tuple(steps), (*reasons, *notes), band, tuple(notes))

    def _largest(self, task: Task, ctx: Context) -> tuple[int, str]:
        rss, swap = task.rss, task.swap
        size = (rss or 0) + (swap or 0)
        why = f"base: rss + swap = {size} pages ({fmt_bytes(size * ctx.page_size)})"
        if rss is None or swap is None:
            missing = " and ".join(n for n, v in (("rss", rss), ("swap", swap)) if v is None)
            why += f"; {missing} unknown, counted as 0"
        return _clamp(size), why


@dataclass(frozen=True, slots=True)
class Plan:
    """What one combination of matching rules does to any task it fits."""

    #: protect / fixed points: the verdict itself, the same for every task.
    verdict: Verdict | None
    #: (multiply or None, pages to add) per adjusting rule, in file order.
    steps: tuple[tuple[float | None, int], ...]
    #: The reasons, worded once (without the per-task numbers: the candidate
    #: carries its points and the kernel's).
    reasons: tuple[str, ...]
    #: +2^62 for victim-first, -2^62 for victim-last.
    band: int
    notes: tuple[str, ...]


# -- loading ---------------------------------------------------------------------------


def load_rules(path: str) -> Policy:
    """The policy of a TOML rules file; :class:`PolicyError` naming the file,
    line and key for anything wrong in it."""
    return read_rules(path).policy()


#: A rules file larger than this is refused (a typo pointing at a log file
#: or a device must not be read without end).
MAX_RULES_BYTES = 1 << 20
#: The range of ``multiply`` (a factor of 1e308 overflows every decision).
MIN_FACTOR, MAX_FACTOR = 1e-6, 1e6


def read_rules(path: str) -> RuleSet:
    """The compiled rules of ``path``: a regular file (opened without blocking,
    so a FIFO cannot hang the load) of at most :data:`MAX_RULES_BYTES`."""
    text = read_text_file(path, what="rules file", max_bytes=MAX_RULES_BYTES,
                          error=PolicyError)
    return parse_rules(text, path)




def parse_rules(text: str, source: str = "rules.toml") -> RuleSet:
    """Compile the rules in ``text``; ``source`` names it in errors and is the
    policy's name (its file name)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise _toml_error(str(e), text, source) from None
    return _Compiler(source, text).compile(data)


def _toml_error(message: str, text: str, source: str) -> PolicyError:
    return PolicyError(toml_error_message(message, text, source))


class _Compiler:
    """Validates the parsed TOML and builds the immutable rules."""

    def __init__(self, source: str, text: str) -> None:
        self.source = source
        self.lines = KeyLines(text)

    def fail(self, where: tuple[str | int, ...], context: str, message: str) -> PolicyError:
        prefix = f"{context}: " if context else ""
        return PolicyError(
            one_line(f"{self.source}:{self.lines.line(where)}: {prefix}{message}"))

    def compile(self, data: Mapping[str, object]) -> RuleSet:
        for key in data:
            if key not in TOP_KEYS:
                raise self.fail((key,), "", _unknown(key, TOP_KEYS))
        base: Base = "kernel"
        victim: VictimKind = "process"
        description = ""
        policy = data.get("policy", {})
        if not isinstance(policy, dict):
            raise self.fail(("policy",), "", "policy: expected a [policy] table")
        for key, value in policy.items():
            where = ("policy", key)
            if key not in POLICY_KEYS:
                raise self.fail(where, "", _unknown(f"policy.{key}", POLICY_KEYS, "policy."))
            if not isinstance(value, str):
                raise self.fail(where, "", f"policy.{key}: expected a string, "
                                           f"got {type_name(value)}")
            if key == "base":
                if value not in BASES:
                    raise self.fail(where, "", f"policy.base: unknown base {value!r} "
                                               "(expected \"kernel\" or \"largest\")")
                base = value
            elif key == "victim":
                if value not in VICTIM_KINDS:
                    raise self.fail(where, "", f"policy.victim: unknown victim kind {value!r} "
                                               "(expected process, tree or cgroup)")
                victim = value
            else:
                description = value
        raw_rules = data.get("rule", [])
        if isinstance(raw_rules, dict):
            raise self.fail(("rule",), "", "rule: expected [[rule]] tables (an array of "
                                           "tables), not a single [rule] table")
        if not isinstance(raw_rules, list):
            raise self.fail(("rule",), "", f"rule: expected [[rule]] tables, got "
                                           f"{type_name(raw_rules)}")
        rules: list[Rule] = []
        names: dict[str, int] = {}
        for i, raw in enumerate(raw_rules):
            if not isinstance(raw, dict):
                raise self.fail(("rule", i), "", f"rule: expected [[rule]] tables, got "
                                                 f"{type_name(raw)}")
            rule = self.rule(i, raw)
            if rule.name in names:
                raise self.fail(("rule", i, "name"), _context(rule.name, i, raw),
                                f"name: already used by the rule at line {names[rule.name]}")
            names[rule.name] = rule.line
            rules.append(rule)
        return RuleSet(name=os.path.basename(self.source) or self.source, source=self.source,
                       base=base, victim=victim, rules=tuple(rules), description=description)

    def rule(self, i: int, raw: dict[str, object]) -> Rule:
        here: tuple[str | int, ...] = ("rule", i)
        name = raw.get("name", f"rule {i + 1}")
        if not isinstance(name, str):
            raise self.fail((*here, "name"), f"rule {i + 1}",
                            f"name: expected a string, got {type_name(name)}")
        if not name.strip():
            raise self.fail((*here, "name"), f"rule {i + 1}", "name: empty")
        ctx = _context(name, i, raw)
        for key in raw:
            if key not in RULE_KEYS:
                raise self.fail((*here, key), ctx, _unknown(key, RULE_KEYS))
        match = raw.get("match")
        if match is None:
            raise self.fail(here, ctx, "no match keys: a rule needs at least one of "
                                       + ", ".join(f"match.{k}" for k in MATCH_KEYS))
        if not isinstance(match, dict):
            raise self.fail((*here, "match"), ctx, "match: expected match keys "
                            f"(match.exe = ..., match.comm = ...), got {type_name(match)}")
        for key in match:
            if key not in MATCH_KEYS:
                raise self.fail((*here, "match", key), ctx,
                                _unknown(f"match.{key}", MATCH_KEYS, "match."))
        if not match:
            raise self.fail((*here, "match"), ctx, "match: no match keys: a rule needs at "
                            "least one of " + ", ".join(f"match.{k}" for k in MATCH_KEYS))
        action = raw.get("action")
        if action is None:
            raise self.fail(here, ctx, "action: missing (one of " + ", ".join(ACTIONS) + ")")
        if not isinstance(action, str):
            raise self.fail((*here, "action"), ctx,
                            f"action: expected a string, got {type_name(action)}")
        if action not in ACTIONS:
            raise self.fail((*here, "action"), ctx, _unknown(action, ACTIONS, what="action"))
        act = action
        fields: dict[str, object] = {}
        for key, value in match.items():
            fields.update(self.matcher(key, value, (*here, "match", key), ctx))
        # match.uid and match.user are ANDed like every key: the uids in both.
        uid_sets = [cast("frozenset[int]", fields[k]) for k in ("uid", "user") if k in fields]
        uids = frozenset.intersection(*uid_sets) if uid_sets else None
        if uids is not None and not uids:
            raise self.fail((*here, "match", "user"), ctx, "match.user: not among the uids of "
                            "match.uid: the rule could never match")
        add = multiply = points = None
        for key in ("add", "multiply", "points"):
            if key not in raw:
                continue
            where = (*here, key)
            value = raw[key]
            if key == "points":
                if act != "points":
                    raise self.fail(where, ctx, f"points: only for action = \"points\" "
                                                f"(this rule's action is {act})")
                points = self.points(value, where, ctx)
            elif act not in ("prefer", "avoid"):
                raise self.fail(where, ctx, f"{key}: only for action = \"prefer\" or \"avoid\" "
                                            f"(this rule's action is {act})")
            elif key == "add":
                add = self.amount(value, where, ctx)
            else:
                multiply = self.factor(value, act, where, ctx)
        if act in ("prefer", "avoid") and add is None and multiply is None:
            raise self.fail((*here, "action"), ctx, f"action: {act} needs add, multiply or both")
        if act == "points" and points is None:
            raise self.fail((*here, "action"), ctx, "action: points needs points = N")
        keys = tuple(k for k in MATCH_KEYS if k in match)
        return Rule(
            index=i + 1, name=name, line=self.lines.line(here), action=act, keys=keys,
            add=add, multiply=multiply, points=points,
            spoofable=_spoofable(name, act, keys),
            unknown_notes=_unknown_notes(name, act, keys),
            comm=cast("re.Pattern[str] | None", fields.get("comm")),
            exe=cast("re.Pattern[str] | None", fields.get("exe")),
            cmdline=cast("re.Pattern[str] | None", fields.get("cmdline")),
            cgroup=cast("tuple[re.Pattern[str], ...] | None", fields.get("cgroup")),
            uids=uids,
        )

    def matcher(self, key: str, value: object, where: tuple[str | int, ...],
                ctx: str) -> dict[str, object]:
        label = f"match.{key}"
        if key in ("comm", "exe", "cmdline"):
            if not isinstance(value, str):
                raise self.fail(where, ctx, f"{label}: expected a regex string, "
                                            f"got {type_name(value)}")
            if not value:
                raise self.fail(where, ctx, f"{label}: empty regex (it would match anything)")
            try:
                return {key: re.compile(value)}
            except (re.error, OverflowError, RecursionError, ValueError) as e:
                raise self.fail(where, ctx, f"{label}: bad regex: {e}") from None
        if key == "cgroup":
            globs = self.strings(value, where, ctx, label, "a glob")
            for g in globs:
                if not g.startswith(("/", "*")):
                    raise self.fail(where, ctx, f"{label}: {g!r} can never match: cgroup paths "
                                                "start at the hierarchy root, like "
                                                "\"/system.slice/*\"")
            return {"cgroup": tuple(re.compile(fnmatch.translate(g)) for g in globs)}
        if key == "uid":
            items = value if isinstance(value, list) else [value]
            if not items:
                raise self.fail(where, ctx, f"{label}: empty list")
            for u in items:
                if isinstance(u, bool) or not isinstance(u, int):
                    raise self.fail(where, ctx, f"{label}: expected a uid (an integer) or a list "
                                                f"of them, got {type_name(u)}")
                if not 0 <= u < 2**32:
                    raise self.fail(where, ctx, f"{label}: {u} is not a uid (0 to 2^32-1)")
            return {"uid": frozenset(cast(list[int], items))}
        # user
        uids: set[int] = set()
        for user in self.strings(value, where, ctx, label, "a user name"):
            try:
                uids.add(pwd.getpwnam(user).pw_uid)
            except KeyError:
                hint = " (a number goes in match.uid)" if user.isdigit() else ""
                raise self.fail(where, ctx, f"{label}: unknown user {user!r}{hint}") from None
        return {"user": frozenset(uids)}

    def strings(self, value: object, where: tuple[str | int, ...], ctx: str, label: str,
                what: str) -> list[str]:
        items = value if isinstance(value, list) else [value]
        if not items:
            raise self.fail(where, ctx, f"{label}: empty list")
        for s in items:
            if not isinstance(s, str):
                raise self.fail(where, ctx, f"{label}: expected {what} (a string) or a list of "
                                            f"them, got {type_name(s)}")
            if not s:
                raise self.fail(where, ctx, f"{label}: empty string")
        return cast(list[str], items)

    def points(self, value: object, where: tuple[str | int, ...], ctx: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(where, ctx, f"points: expected an integer, got {type_name(value)}")
        if not -LIMIT <= value <= LIMIT:
            raise self.fail(where, ctx, f"points: {value} is out of range (-2^61 to 2^61)")
        return value

    def amount(self, value: object, where: tuple[str | int, ...], ctx: str) -> Amount:
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise self.fail(where, ctx, "add: expected pages (an integer) or a size like "
                                        f"\"512MiB\" or \"10%\", got {type_name(value)}")
        if isinstance(value, int):
            if not 0 < value <= LIMIT:
                raise self.fail(where, ctx, f"add: {value} pages: expected a positive number of "
                                            "pages (prefer adds it, avoid subtracts it)")
            return Amount("pages", value, str(value))
        m = _SIZE.match(value)
        if m is None:
            raise self.fail(where, ctx, f"add: {value!r} is not pages or a size (like 250000, "
                                        "\"512MiB\", \"1.5GiB\" or \"10%\" of the domain)")
        number, unit = float(m.group(1)), m.group(2).lower()
        if number <= 0:
            raise self.fail(where, ctx, f"add: {value!r}: expected a positive amount "
                                        "(prefer adds it, avoid subtracts it)")
        if unit == "%":
            if number > 1000:
                raise self.fail(where, ctx, f"add: {value!r}: at most 1000% of the domain")
            return Amount("percent", number, value.strip())
        size = int(number * _UNIT[unit])
        if size // 4096 > LIMIT:
            raise self.fail(where, ctx, f"add: {value!r} is out of range")
        return Amount("bytes", size, value.strip())

    def factor(self, value: object, action: str, where: tuple[str | int, ...],
               ctx: str) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.fail(where, ctx, f"multiply: expected a number, got {type_name(value)}")
        m = float(value)
        if not math.isfinite(m):
            raise self.fail(where, ctx, f"multiply: {value} is not a finite number")
        if not MIN_FACTOR <= m <= MAX_FACTOR:
            raise self.fail(where, ctx, f"multiply: {m:g} is outside {MIN_FACTOR:g} to "
                                        f"{MAX_FACTOR:g}")
        if action == "prefer" and not m > 1:
            raise self.fail(where, ctx, f"multiply: prefer multiplies by more than 1, not {m:g}")
        if action == "avoid" and not 0 < m < 1:
            raise self.fail(where, ctx, f"multiply: avoid multiplies by more than 0 and less "
                                        f"than 1, not {m:g}")
        return m


def _spoofable(name: str, action: str, keys: tuple[str, ...]) -> str | None:
    """The caveat of a protecting rule that matches on names alone."""
    if action not in ("protect", "avoid", "victim-last"):
        return None
    verb = {"protect": "protected", "avoid": "avoided", "victim-last": "put last"}[action]
    if keys == ("comm",):
        return (f"{verb} by rule '{name}' on comm alone: any process can take that name "
                "(prctl PR_SET_NAME); match.exe or match.cgroup cannot be faked")
    if set(keys) <= {"comm", "cmdline"}:
        return (f"{verb} by rule '{name}' on its command line alone: any process can rewrite "
                "its own command line; match.exe or match.cgroup cannot be faked")
    return None


def _context(name: object, i: int, raw: Mapping[str, object]) -> str:
    """How errors name a rule: ``rule "its name"``, or ``rule 3`` unnamed."""
    return f'rule "{name}"' if "name" in raw else f"rule {i + 1}"


def _unknown(key: str, known: tuple[str, ...], prefix: str = "", what: str = "key") -> str:
    options = [prefix + k for k in known]
    close = difflib.get_close_matches(key, options, n=1)
    hint = f"; did you mean {close[0]}?" if close else ""
    if what == "action":
        return f"action: unknown action {key!r} (expected {', '.join(known)}){hint}"
    return f"{key}: unknown key (expected {', '.join(options)}){hint}"
