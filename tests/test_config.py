"""The daemon's config (config.py) and ``oomwarden check-config``.

Every key and its default, every error with its exact ``file:line: key``,
relative policy paths, a policy that fails to load, cgroup globs, earlyoom's
defaults, the shipped example config, the CLI's exit codes and one-line
errors, and a property: random configs made of valid and invalid pieces
either load or raise ConfigError, never anything else.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from oomwarden import config as config_module
from oomwarden.cli import main
from oomwarden.config import (
    DEFAULT_CONTROL_SOCKET,
    DEFAULT_DECISION_LOG,
    PRESSURE_KEYS,
    THRESHOLD_KEYS,
    TOP_KEYS,
    WATCH_KEYS,
    Config,
    ConfigError,
    Domain,
    Pressure,
    Threshold,
    default_config,
    has_cap_sys_resource,
    load_config,
    parse_config,
    summarize,
)
from oomwarden.errors import OomwardenError
from oomwarden.policy.registry import load_policy

ROOT = Path(__file__).parent.parent
FIXTURES = Path(__file__).parent / "fixtures" / "config"
PACKAGED = ROOT / "packaging" / "oomwarden.toml"
DOCS = ROOT / "docs" / "config.md"
SRC = "oomwarden.toml"
#: A minimal valid watch, lines 1-4 of a text that starts with it.
W = '[[watch]]\ndomain = "system"\ntriggers = ["oom"]\npolicy = "kernel"\n'


def parse(text: str, *, cap: bool = False, base_dir: str | os.PathLike[str] = "/nonexistent"
          ) -> Config:
    return parse_config(text, SRC, base_dir=str(base_dir), cap_sys_resource=cap)


def error(text: str, **kw: object) -> str:
    with pytest.raises(ConfigError) as info:
        parse(text, **kw)  # type: ignore[arg-type]
    message = str(info.value)
    assert "\n" not in message and len(message.splitlines()) == 1, message
    return message


def watch(*lines: str, domain: str = "system", triggers: str = '["oom"]',
          policy: str = "kernel") -> str:
    """A watch on lines 1-4 and the given lines from line 5 on."""
    head = f'[[watch]]\ndomain = "{domain}"\ntriggers = {triggers}\npolicy = "{policy}"\n'
    return head + "".join(f"{line}\n" for line in lines)


@pytest.fixture
def fx(tmp_path: Path) -> Path:
    """A copy of tests/fixtures/config and of packaging/oomwarden.toml, owned by
    the test's user with modes 0644 and 0755: read as root, a config (and a
    .py policy) must be root's and not group- or world-writable, whoever
    owns the checkout."""
    copy = tmp_path / "config"
    shutil.copytree(FIXTURES, copy)
    shutil.copy(PACKAGED, copy / "oomwarden.toml")
    for path in (copy, *copy.rglob("*")):
        path.chmod(0o755 if path.is_dir() else 0o644)
    return copy


# -- defaults and every key -------------------------------------------------------------


def test_minimal_config_takes_every_default() -> None:
    cfg = parse(W)
    assert cfg.source == SRC and not cfg.builtin_default
    assert cfg.decision_log == DEFAULT_DECISION_LOG == "/var/log/oomwarden/decisions.jsonl"
    assert cfg.control_socket == DEFAULT_CONTROL_SOCKET == "/run/oomwarden/control.sock"
    assert cfg.budget_ms == 50
    (w,) = cfg.watches
    assert (w.index, w.line, w.name) == (1, 1, "watch[1]")
    assert w.domain == Domain("system") and w.domain.system and w.domain.path is None
    assert w.triggers == ("oom",)
    assert (w.policy_spec, w.policy_kind, w.policy.name) == ("kernel", "built-in", "kernel")
    assert w.victim == "process" and w.victim_from_policy and w.policy.victim == "process"
    assert w.sigterm_grace_ms == 0
    assert w.cooldown_s == 5.0 and isinstance(w.cooldown_s, float)
    assert w.dry_run is False
    assert (w.threshold, w.pressure, w.margin_percent) == (None, None, None)


def test_trigger_tables_default_when_their_trigger_is_on() -> None:
    cfg = parse(watch(domain="cgroup:/a", triggers='["threshold", "pressure", "margin"]'))
    (w,) = cfg.watches
    assert w.threshold == Threshold(10.0, 10.0, 5.0, 5.0)
    assert w.pressure == Pressure(some_avg10=None, full_avg10=40.0, window_s=2.0)
    assert w.margin_percent == 5.0


def test_full_fixture_sets_every_key(fx: Path) -> None:
    cfg = load_config(str(fx / "full.toml"), cap_sys_resource=False)
    assert cfg.decision_log == "/var/lib/oomwarden/log.jsonl"
    assert cfg.control_socket == "/run/oomwarden-test/ctl.sock"
    assert cfg.budget_ms == 120
    one, two, three = cfg.watches
    assert (one.index, one.line, two.line, three.line) == (1, 6, 26, 32)
    assert one.domain.system and one.triggers == ("threshold", "pressure", "oom")
    assert one.policy.name == "largest" and one.policy_kind == "built-in"
    assert one.victim == "tree" and not one.victim_from_policy
    assert one.policy.victim == "tree"  # the engine reads the policy's victim kind
    assert (one.sigterm_grace_ms, one.cooldown_s, one.dry_run) == (1500, 2.5, True)
    assert one.threshold == Threshold(20.0, 100.0, 7.5, 50.0)
    assert one.pressure == Pressure(60.0, 25.5, 4.0)
    assert one.margin_percent is None
    # a rules file, named relative to the config file's directory
    assert two.domain.is_glob and two.domain.path == "/app.slice/*.service"
    assert two.triggers == ("oom", "events", "margin") and two.margin_percent == 2.5
    assert two.policy_kind == "rules"
    assert two.policy_spec == str(fx / "policies" / "protect.toml")
    assert two.victim == "tree" and two.victim_from_policy  # the rules file's [policy] victim
    # a .py policy, its victim overridden by the watch; an inline pressure table
    assert three.policy_kind == "python" and three.policy.name == "always-default"
    assert three.policy_spec == str(fx / "policies" / "default.py")
    assert three.victim == "cgroup" and three.policy.victim == "cgroup"
    assert three.pressure == Pressure(some_avg10=30.0, full_avg10=None, window_s=2.0)


def test_numbers_may_be_integers_or_floats() -> None:
    cfg = parse(watch("cooldown_s = 1", "sigterm_grace_ms = 60000", "dry_run = true",
                      triggers='["threshold"]') + "[watch.threshold]\nmem_available_percent = 0\n")
    (w,) = cfg.watches
    assert w.cooldown_s == 1.0 and isinstance(w.cooldown_s, float)
    assert w.sigterm_grace_ms == 60000 and w.dry_run
    assert w.threshold == Threshold(0.0, 10.0, 0.0, 5.0)


@pytest.mark.parametrize("victim", ["process", "tree", "cgroup"])
def test_victim_kinds(victim: str) -> None:
    (w,) = parse(watch(f'victim = "{victim}"', policy="growth")).watches
    assert w.victim == victim and w.policy.victim == victim and not w.victim_from_policy


def test_victim_defaults_to_the_policy_s_own() -> None:
    growth, pressure = parse(watch(policy="growth") + watch(domain="cgroup:/x",
                                                            policy="pressure")).watches
    assert growth.victim == "tree" and growth.victim_from_policy
    assert pressure.victim == "cgroup" and pressure.victim_from_policy


@pytest.mark.parametrize(("given", "term", "kill"), [
    ({}, 10.0, 5.0),                   # earlyoom: PERCENT=10, KILL_PERCENT=5
    ({"term": 30}, 30.0, 15.0),        # earlyoom -m 30: KILL_PERCENT=15
    ({"term": 20, "kill": 18}, 20.0, 18.0),
    ({"term": 10, "kill": 10}, 10.0, 10.0),  # always SIGKILL
])
def test_threshold_kill_level_defaults_to_half(given: dict[str, int], term: float,
                                               kill: float) -> None:
    lines = ["[watch.threshold]"]
    if "term" in given:
        lines.append(f"mem_available_percent = {given['term']}")
    if "kill" in given:
        lines.append(f"mem_available_kill_percent = {given['kill']}")
    (w,) = parse(watch(*lines, triggers='["threshold"]')).watches
    assert w.threshold is not None
    assert (w.threshold.mem_available_percent, w.threshold.mem_available_kill_percent) == (
        term, kill)
    assert (w.threshold.swap_free_percent, w.threshold.swap_free_kill_percent) == (10.0, 5.0)


def test_threshold_levels_need_both_figures() -> None:
    t = Threshold()
    assert t.level(50, 50) is None
    assert t.level(9, 50) is None            # memory low, swap plentiful: nothing
    assert t.level(50, 3) is None
    assert t.level(10, 10) == "term"         # at or below
    assert t.level(4, 8) == "term"           # memory at the kill level, swap not
    assert t.level(5, 5) == "kill"
    assert t.level(5, None) == "kill"        # no swap: memory alone
    assert t.level(9.9, None) == "term"
    assert Threshold(swap_free_percent=100, swap_free_kill_percent=100).level(8, 90) == "term"


def test_pressure_trigger_lines() -> None:
    assert Pressure().trigger_lines() == ("full 800000 2000000\n",)
    assert Pressure(10, 5, 4).trigger_lines() == ("some 400000 4000000\n",
                                                  "full 200000 4000000\n")
    assert Pressure(0.01, None, 0.5).trigger_lines() == ("some 50 500000\n",)


def test_psi_window_multiple_of_two_only_without_cap_sys_resource() -> None:
    text = watch(triggers='["pressure"]') + "[watch.pressure]\nwindow_s = 3\n"
    (w,) = parse(text, cap=True).watches
    assert w.pressure == Pressure(window_s=3.0)
    assert error(text, cap=False) == (
        "oomwarden.toml:6: watch[1].pressure.window_s: 3 is not a multiple of 2; without "
        "CAP_SYS_RESOURCE (absent here) the kernel takes only PSI windows of 2, 4, 6, 8 or "
        "10 s")
    for ok in (2, 4.0, 10):
        parse(watch(triggers='["pressure"]') + f"[watch.pressure]\nwindow_s = {ok}\n")
    parse(watch(triggers='["pressure"]') + "[watch.pressure]\nwindow_s = 0.5\n", cap=True)


def test_has_cap_sys_resource(tmp_path: Path) -> None:
    status = tmp_path / "status"
    status.write_text("Name:\tx\nCapEff:\t000001fffeffffff\n")  # this machine kind: bit 24 off
    assert not has_cap_sys_resource(str(status))
    status.write_text("CapEff:\t000001ffffffffff\n")
    assert has_cap_sys_resource(str(status))
    status.write_text("CapEff:\tzz\n")
    assert not has_cap_sys_resource(str(status))
    assert not has_cap_sys_resource(str(tmp_path / "none"))
    assert isinstance(has_cap_sys_resource(), bool)


# -- domains and globs -------------------------------------------------------------------


@pytest.mark.parametrize(("spec", "path", "glob"), [
    ("system", None, False),
    ("cgroup:/a", "/a", False),
    ("cgroup:/system.slice/ssh.service", "/system.slice/ssh.service", False),
    ("cgroup:/app.slice/*.service", "/app.slice/*.service", True),
    ("cgroup:/user.slice/user-?.slice", "/user.slice/user-?.slice", True),
    ("cgroup:/build/job-[0-9]*", "/build/job-[0-9]*", True),
    ("cgroup:/x/[!a]", "/x/[!a]", True),
    ("cgroup:/x/[]]", "/x/[]]", True),
    ("cgroup:/x/[!]]", "/x/[!]]", True),
    ("cgroup:/x/[^]", "/x/[^]", True),
    ("cgroup:/with space", "/with space", False),
])
def test_domains_are_stored_as_written(spec: str, path: str | None, glob: bool) -> None:
    (w,) = parse(watch(domain=spec)).watches
    assert w.domain.spec == spec and w.domain.path == path and w.domain.is_glob == glob


def test_globs_match_one_component_per_level() -> None:
    d = Domain("cgroup:/app.slice/*.service")
    assert d.matches("/app.slice/web.service")
    assert not d.matches("/app.slice/web.service/child")
    assert not d.matches("/app.slice/a/b.service")
    assert not d.matches("/other.slice/web.service")
    assert Domain("cgroup:/build/job-[0-9]*").matches("/build/job-7x")
    assert not Domain("cgroup:/build/job-[0-9]*").matches("/build/job-x")
    assert Domain("cgroup:/a").matches("/a") and not Domain("cgroup:/a").matches("/a/b")
    assert not Domain("system").matches("/a")


def test_watch_for_takes_the_first_match() -> None:
    cfg = parse(watch(domain="cgroup:/app/*") + watch(domain="cgroup:/app/web")
                + watch(domain="system"))
    assert cfg.watch_for("/app/web") is cfg.watches[0]
    assert cfg.watch_for("/other") is None
    assert cfg.watch_for(None) is cfg.watches[2]


# -- policies ----------------------------------------------------------------------------


def test_relative_policy_paths_resolve_against_the_config_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "etc" / "rules").mkdir(parents=True)
    (tmp_path / "etc" / "rules" / "r.toml").write_text(
        '[[rule]]\nname = "x"\nmatch.comm = "^x$"\naction = "protect"\n')
    conf = tmp_path / "etc" / "oomwarden.toml"
    conf.write_text(watch(policy="rules/r.toml"))
    monkeypatch.chdir(tmp_path)  # not the config's directory
    (w,) = load_config(str(conf)).watches
    assert w.policy_spec == str(tmp_path / "etc" / "rules" / "r.toml")
    assert w.policy_kind == "rules"
    # a relative config path works the same
    (w2,) = load_config("etc/oomwarden.toml").watches
    assert w2.policy_spec == w.policy_spec
    # parse_config: base_dir, else the source's directory
    (w3,) = parse(watch(policy="r.toml"), base_dir=tmp_path / "etc" / "rules").watches
    assert w3.policy_spec == str(tmp_path / "etc" / "rules" / "r.toml")
    (w4,) = parse_config(watch(policy="../etc/rules/r.toml"), str(tmp_path / "x" / "c.toml"),
                         cap_sys_resource=False).watches
    assert w4.policy_spec == w.policy_spec


def test_an_absolute_policy_path_stays(tmp_path: Path) -> None:
    rules = tmp_path / "abs.toml"
    rules.write_text('[policy]\nbase = "largest"\n')
    (w,) = parse(watch(policy=str(rules))).watches
    assert w.policy_spec == str(rules) and w.policy_kind == "rules"


def test_a_policy_file_that_fails_to_load_names_the_config_line_and_key(fx: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(str(fx / "bad-policy.toml"))
    broken = fx / "policies" / "broken.toml"
    assert str(info.value) == (
        f"{fx / 'bad-policy.toml'}:5: watch[1].policy: {broken}:3: rule \"typo\": "
        "action: unknown action 'protekt' (expected protect, prefer, avoid, points, "
        "victim-first, victim-last); did you mean protect?")


@pytest.mark.parametrize(("spec", "message"), [
    ("nope", "watch[1].policy: unknown policy 'nope' (built-ins: "),
    ("missing.toml", "watch[1].policy: rules file /nonexistent/missing.toml does not exist"),
    ("missing.py", "watch[1].policy: policy file /nonexistent/missing.py does not exist"),
    ("/no/such/policy", "watch[1].policy: policy file /no/such/policy does not exist"),
    ("", "watch[1].policy: unknown policy ''"),
])
def test_bad_policy_specs(spec: str, message: str) -> None:
    assert error(watch(policy=spec)).startswith(f"oomwarden.toml:4: {message}")


def test_each_policy_file_loads_once_and_only_when_the_rest_is_right(
        monkeypatch: pytest.MonkeyPatch) -> None:
    loaded: list[str] = []
    def counting(spec: str) -> object:
        loaded.append(spec)
        return load_policy(spec)

    monkeypatch.setattr(config_module, "load_policy", counting)
    parse(watch(policy="growth") + watch(domain="cgroup:/a", policy="growth"))
    assert loaded == ["growth"]
    loaded.clear()
    error(watch(policy="growth") + watch("cooldown_s = 0", domain="cgroup:/a"))
    assert loaded == []  # a mistake anywhere: no policy code runs


# -- every error, with its file, line and key -------------------------------------------

LONG = "/run/" + "s" * 103  # 108 bytes


@pytest.mark.parametrize(("text", "expected"), [
    # top level
    ('decison_log = "/x"\n' + W,
     "oomwarden.toml:1: decison_log: unknown key (expected decision_log, control_socket, "
     "budget_ms, watch); did you mean decision_log?"),
    ("decision_log = 5\n" + W,
     "oomwarden.toml:1: decision_log: expected a path (a string), got an integer (5)"),
    ('decision_log = ""\n' + W, "oomwarden.toml:1: decision_log: empty path"),
    ('decision_log = "log.jsonl"\n' + W,
     "oomwarden.toml:1: decision_log: 'log.jsonl' is not an absolute path (it must start "
     "with /)"),
    ('decision_log = "/var/log/"\n' + W,
     "oomwarden.toml:1: decision_log: '/var/log/' names a directory; give a file path"),
    ('decision_log = "/var/log/a\\nb"\n' + W,
     "oomwarden.toml:1: decision_log: '/var/log/a\\nb' has a non-printable character"),
    (f'control_socket = "{LONG}"\n' + W,
     f"oomwarden.toml:1: control_socket: '{LONG}' is 108 bytes long; a socket path has at "
     "most 107"),
    ('decision_log = "/x"\ncontrol_socket = "/x"\n' + W,
     "oomwarden.toml:2: control_socket: the same path as decision_log"),
    ("budget_ms = 0\n" + W, "oomwarden.toml:1: budget_ms: 0 is outside 1..60000"),
    ("budget_ms = 60001\n" + W, "oomwarden.toml:1: budget_ms: 60001 is outside 1..60000"),
    ("budget_ms = 1.5\n" + W,
     "oomwarden.toml:1: budget_ms: expected a whole number, got a float (1.5)"),
    ("budget_ms = 2.0\n" + W,  # the float shown as written, not as "2"
     "oomwarden.toml:1: budget_ms: expected a whole number, got a float (2.0)"),
    ("budget_ms = 1979-05-27\n" + W,
     "oomwarden.toml:1: budget_ms: expected a whole number, got a date"),
    ("budget_ms = true\n" + W,
     "oomwarden.toml:1: budget_ms: expected a whole number, got a boolean (true)"),
    # the watch list
    ("budget_ms = 5\n",
     "oomwarden.toml:1: watch: no [[watch]] table; a config file needs at least one (the "
     "built-in default applies only when no config file is given)"),
    ("budget_ms = 5\nwatch = []\n",
     "oomwarden.toml:2: watch: the list of watches is empty; a config file needs at least one"),
    ('\n[watch]\ndomain = "system"\n',
     "oomwarden.toml:2: watch: expected [[watch]] tables (an array of tables), not a single "
     "[watch] table"),
    ("watch = 3\n", "oomwarden.toml:1: watch: expected [[watch]] tables, got an integer (3)"),
    ("watch = [1]\n", "oomwarden.toml:1: watch[1]: expected a table, got an integer (1)"),
    # required keys, unknown keys
    ('[[watch]]\ntriggers = ["oom"]\npolicy = "kernel"\n',
     "oomwarden.toml:1: watch[1].domain: missing; every watch needs domain, triggers, policy"),
    ('[[watch]]\ndomain = "system"\npolicy = "kernel"\n',
     "oomwarden.toml:1: watch[1].triggers: missing; every watch needs domain, triggers, "
     "policy"),
    (W + '\n[[watch]]\ndomain = "cgroup:/a"\ntriggers = ["oom"]\n',
     "oomwarden.toml:6: watch[2].policy: missing; every watch needs domain, triggers, policy"),
    (watch("domian = 1"),
     "oomwarden.toml:5: watch[1].domian: unknown key (expected watch[1].domain, "
     "watch[1].triggers, watch[1].policy, watch[1].victim, watch[1].sigterm_grace_ms, "
     "watch[1].cooldown_s, watch[1].dry_run, watch[1].threshold, watch[1].pressure, "
     "watch[1].margin_percent, watch[1].high_guard_percent); did you mean watch[1].domain?"),
    # domain
    (watch(domain="System"),
     "oomwarden.toml:2: watch[1].domain: 'System' is neither \"system\" nor \"cgroup:/PATH\" "
     "(a path inside the memory cgroup hierarchy, globs allowed)"),
    (watch(domain="cgroup:app.slice"),
     "oomwarden.toml:2: watch[1].domain: 'cgroup:app.slice' is neither \"system\" nor "
     "\"cgroup:/PATH\" (a path inside the memory cgroup hierarchy, globs allowed)"),
    (watch(domain="/app.slice"),
     "oomwarden.toml:2: watch[1].domain: '/app.slice' is neither \"system\" nor "
     "\"cgroup:/PATH\" (a path inside the memory cgroup hierarchy, globs allowed)"),
    ('[[watch]]\ndomain = 7\ntriggers = ["oom"]\npolicy = "kernel"\n',
     "oomwarden.toml:2: watch[1].domain: expected \"system\" or \"cgroup:/PATH\", got an "
     "integer (7)"),
    (watch(domain="cgroup:/"),
     "oomwarden.toml:2: watch[1].domain: the root cgroup is the whole system; write "
     "\"system\""),
    (watch(domain="cgroup:/a/"),
     "oomwarden.toml:2: watch[1].domain: 'cgroup:/a/' ends with /; write it without"),
    (watch(domain="cgroup:/a//b"),
     "oomwarden.toml:2: watch[1].domain: 'cgroup:/a//b' has an empty component (//); write "
     "the plain path"),
    (watch(domain="cgroup:/a/../b"),
     "oomwarden.toml:2: watch[1].domain: 'cgroup:/a/../b' has a '..' component; write the "
     "plain path"),
    (watch(domain="cgroup:/./b"),
     "oomwarden.toml:2: watch[1].domain: 'cgroup:/./b' has a '.' component; write the plain "
     "path"),
    (watch(domain="cgroup:/a/**"),
     "oomwarden.toml:2: watch[1].domain: 'cgroup:/a/**': ** is not supported (a * matches "
     "within one path component; write one * per level)"),
    (watch(domain="cgroup:/a/job-[0-9"),
     "oomwarden.toml:2: watch[1].domain: 'cgroup:/a/job-[0-9': [ without a closing ]"),
    (watch(domain="cgroup:/a/b]"),
     "oomwarden.toml:2: watch[1].domain: 'cgroup:/a/b]': ] without ["),
    (watch(domain="cgroup:/a\\tb"),
     "oomwarden.toml:2: watch[1].domain: 'cgroup:/a\\tb' has a non-printable character"),
    (watch() + watch(domain="cgroup:/a") + watch(),
     "oomwarden.toml:10: watch[3].domain: 'system' is already watched by watch[1] (line 1); "
     "one watch per domain"),
    # triggers
    (watch(triggers='"oom"'),
     "oomwarden.toml:3: watch[1].triggers: expected a list of strings, got a string (\"oom\"); "
     "write [\"oom\"]"),
    (watch(triggers="5"),
     "oomwarden.toml:3: watch[1].triggers: expected a list of strings, got an integer (5)"),
    (watch(triggers="[]"),
     "oomwarden.toml:3: watch[1].triggers: empty; name at least one of oom, pressure, "
     "threshold, events, margin"),
    (watch(triggers="[1]"),
     "oomwarden.toml:3: watch[1].triggers: expected strings, got an integer (1)"),
    (watch(triggers='["oom", "oom"]'),
     "oomwarden.toml:3: watch[1].triggers: 'oom' is listed twice"),
    (watch(triggers='["pressur"]'),
     "oomwarden.toml:3: watch[1].triggers: unknown trigger 'pressur' (expected oom, pressure, "
     "threshold, events, margin); did you mean 'pressure'?"),
    (watch(triggers='["memory"]'),
     "oomwarden.toml:3: watch[1].triggers: unknown trigger 'memory' (expected oom, pressure, "
     "threshold, events, margin)"),
    (watch(triggers='["margin"]'),
     "oomwarden.toml:3: watch[1].triggers: 'margin' needs a cgroup domain (the system has no "
     "limit; use \"threshold\")"),
    (watch(triggers='["oom", "events"]'),
     "oomwarden.toml:3: watch[1].triggers: 'events' needs a cgroup domain (the system has no "
     "memory.events)"),
    # policy, victim
    ('[[watch]]\ndomain = "system"\ntriggers = ["oom"]\npolicy = ["kernel"]\n',
     "oomwarden.toml:4: watch[1].policy: expected a policy SPEC (a string), got a list"),
    (watch('victim = "pid"'),
     "oomwarden.toml:5: watch[1].victim: expected one of process, tree, cgroup, got 'pid'"),
    (watch("victim = 1"),
     "oomwarden.toml:5: watch[1].victim: expected one of process, tree, cgroup, got an "
     "integer (1)"),
    # numbers
    (watch("sigterm_grace_ms = -1"),
     "oomwarden.toml:5: watch[1].sigterm_grace_ms: -1 is outside 0..60000"),
    (watch("sigterm_grace_ms = 60001"),
     "oomwarden.toml:5: watch[1].sigterm_grace_ms: 60001 is outside 0..60000"),
    (watch("sigterm_grace_ms = 2.5"),
     "oomwarden.toml:5: watch[1].sigterm_grace_ms: expected a whole number, got a float (2.5)"),
    (watch('sigterm_grace_ms = "5"'),
     "oomwarden.toml:5: watch[1].sigterm_grace_ms: expected a whole number, got a string "
     "('5')"),
    (watch("cooldown_s = 0"), "oomwarden.toml:5: watch[1].cooldown_s: 0 is outside 0.1..600"),
    (watch("cooldown_s = 0.05"),
     "oomwarden.toml:5: watch[1].cooldown_s: 0.05 is outside 0.1..600"),
    (watch("cooldown_s = 600.5"),
     "oomwarden.toml:5: watch[1].cooldown_s: 600.5 is outside 0.1..600"),
    (watch("cooldown_s = nan"), "oomwarden.toml:5: watch[1].cooldown_s: nan is outside 0.1..600"),
    (watch("cooldown_s = inf"), "oomwarden.toml:5: watch[1].cooldown_s: inf is outside 0.1..600"),
    (watch("cooldown_s = true"),
     "oomwarden.toml:5: watch[1].cooldown_s: expected a number, got a boolean (true)"),
    (watch('dry_run = "yes"'),
     "oomwarden.toml:5: watch[1].dry_run: expected true or false, got a string ('yes')"),
    (watch("dry_run = 1"),
     "oomwarden.toml:5: watch[1].dry_run: expected true or false, got an integer (1)"),
    # threshold
    (watch("[watch.threshold]", "mem_available_percent = 5"),
     "oomwarden.toml:5: watch[1].threshold: has no effect without 'threshold' in triggers"),
    (watch("threshold = 5", triggers='["threshold"]'),
     "oomwarden.toml:5: watch[1].threshold: expected a table, got an integer (5)"),
    (watch("[watch.threshold]", "mem_avail_percent = 5", triggers='["threshold"]'),
     "oomwarden.toml:6: watch[1].threshold.mem_avail_percent: unknown key (expected "
     "watch[1].threshold.mem_available_percent, watch[1].threshold.swap_free_percent, "
     "watch[1].threshold.mem_available_kill_percent, "
     "watch[1].threshold.swap_free_kill_percent); did you mean "
     "watch[1].threshold.mem_available_percent?"),
    (watch("[watch.threshold]", "mem_available_percent = 101", triggers='["threshold"]'),
     "oomwarden.toml:6: watch[1].threshold.mem_available_percent: 101 is outside 0..100"),
    (watch("threshold.swap_free_percent = -0.5", triggers='["threshold"]'),
     "oomwarden.toml:5: watch[1].threshold.swap_free_percent: -0.5 is outside 0..100"),
    (watch("[watch.threshold]", "mem_available_percent = 4", "mem_available_kill_percent = 5",
           triggers='["threshold"]'),
     "oomwarden.toml:7: watch[1].threshold.mem_available_kill_percent: 5 is above "
     "mem_available_percent (4); the SIGKILL level must be at or below the SIGTERM level"),
    (watch("[watch.threshold]", "swap_free_kill_percent = 12", triggers='["threshold"]'),
     "oomwarden.toml:6: watch[1].threshold.swap_free_kill_percent: 12 is above "
     "swap_free_percent (10); the SIGKILL level must be at or below the SIGTERM level"),
    # pressure
    (watch("pressure = { full_avg10 = 5 }"),
     "oomwarden.toml:5: watch[1].pressure: has no effect without 'pressure' in triggers"),
    (watch("pressure = { full = 5 }", triggers='["pressure"]'),
     "oomwarden.toml:5: watch[1].pressure.full: unknown key (expected "
     "watch[1].pressure.some_avg10, watch[1].pressure.full_avg10, watch[1].pressure.window_s); "
     "did you mean watch[1].pressure.full_avg10?"),
    (watch("[watch.pressure]", "some_avg10 = 0", triggers='["pressure"]'),
     "oomwarden.toml:6: watch[1].pressure.some_avg10: 0 is outside 0.01..100"),
    (watch("[watch.pressure]", "full_avg10 = 100.5", triggers='["pressure"]'),
     "oomwarden.toml:6: watch[1].pressure.full_avg10: 100.5 is outside 0.01..100"),
    (watch("[watch.pressure]", "", "window_s = 0.4", triggers='["pressure"]'),
     "oomwarden.toml:7: watch[1].pressure.window_s: 0.4 is outside 0.5..10"),
    (watch("[watch.pressure]", "window_s = 12", triggers='["pressure"]'),
     "oomwarden.toml:6: watch[1].pressure.window_s: 12 is outside 0.5..10"),
    (watch("[watch.pressure]", "window_s = 1", triggers='["pressure"]'),
     "oomwarden.toml:6: watch[1].pressure.window_s: 1 is not a multiple of 2; without "
     "CAP_SYS_RESOURCE (absent here) the kernel takes only PSI windows of 2, 4, 6, 8 or 10 s"),
    (watch('pressure = "high"', triggers='["pressure"]'),
     "oomwarden.toml:5: watch[1].pressure: expected a table, got a string ('high')"),
    # margin
    (watch("margin_percent = 5", domain="cgroup:/a"),
     "oomwarden.toml:5: watch[1].margin_percent: has no effect without 'margin' in triggers"),
    (watch("margin_percent = 0", domain="cgroup:/a", triggers='["margin"]'),
     "oomwarden.toml:5: watch[1].margin_percent: 0 is outside 0.1..50"),
    (watch("margin_percent = 51", domain="cgroup:/a", triggers='["margin"]'),
     "oomwarden.toml:5: watch[1].margin_percent: 51 is outside 0.1..50"),
    # the memory.high guard
    (watch("high_guard_percent = 5"),
     "oomwarden.toml:5: watch[1].high_guard_percent: needs a cgroup domain (the system has "
     "no memory.high)"),
    (watch("high_guard_percent = 0", domain="cgroup:/a"),
     "oomwarden.toml:5: watch[1].high_guard_percent: 0 is outside 0.1..50"),
    (watch('high_guard_percent = "5%"', domain="cgroup:/a"),
     "oomwarden.toml:5: watch[1].high_guard_percent: expected a number, got a string ('5%')"),
    # the second watch, sub-tables, inline tables
    (W + "\n" + watch("[watch.pressure]", "window_s = 4", "some_avg10 = -1",
                      domain="cgroup:/a", triggers='["pressure"]'),
     "oomwarden.toml:12: watch[2].pressure.some_avg10: -1 is outside 0.01..100"),
    ('watch = [{ domain = "system", triggers = ["oom"], policy = "kernel", cooldown_s = 0 }]\n',
     "oomwarden.toml:1: watch[1].cooldown_s: 0 is outside 0.1..600"),
    # not TOML
    ("budget_ms = \n" + W, "oomwarden.toml:1: budget_ms: invalid TOML: invalid value"),
    (W + "policy = \"growth\"\n",
     "oomwarden.toml:5: policy: invalid TOML: cannot overwrite a value"),
    ("[[watch]\n", "oomwarden.toml:1: watch: invalid TOML: "),
])
def test_every_error_names_file_line_and_key(text: str, expected: str) -> None:
    message = error(text)
    assert message == expected or (expected.endswith(": ") and message.startswith(expected)), (
        message)


def test_the_example_from_the_brief(fx: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(str(fx / "bad-cooldown.toml"))
    assert str(info.value) == (
        f"{fx / 'bad-cooldown.toml'}:12: watch[2].cooldown_s: 0 is outside 0.1..600")


def test_config_error_is_an_oomwarden_error() -> None:
    assert issubclass(ConfigError, OomwardenError)


# -- the file ----------------------------------------------------------------------------


def test_file_errors(tmp_path: Path) -> None:
    def message(path: Path | str) -> str:
        with pytest.raises(ConfigError) as info:
            load_config(str(path), check_owner=False)
        return str(info.value)

    assert message(tmp_path / "none.toml") == f"config file {tmp_path}/none.toml does not exist"
    assert message(tmp_path) == f"config file {tmp_path} is a directory, not a file"
    assert message("") == "config file: empty path"
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert message(fifo) == f"config file {fifo} is not a regular file"  # and did not block
    big = tmp_path / "big.toml"
    big.write_bytes(b"#" * (config_module.MAX_CONFIG_BYTES + 1))
    assert "more than 1048576" in message(big)
    latin = tmp_path / "latin.toml"
    latin.write_bytes(W.encode() + b'# caf\xe9\n')
    assert message(latin) == f"{latin}:5: not UTF-8 text (a TOML file is UTF-8)"


@pytest.mark.skipif(os.geteuid() != 0, reason="ownership checks apply to root")
def test_read_as_root_the_config_must_be_root_s(tmp_path: Path) -> None:
    conf = tmp_path / "c.toml"
    conf.write_text(W)
    conf.chmod(0o644)
    load_config(str(conf))  # root's, 0644: fine
    conf.chmod(0o666)
    with pytest.raises(ConfigError, match=r"is writable by group and others \(mode 0666\)"):
        load_config(str(conf))
    load_config(str(conf), check_owner=False)
    conf.chmod(0o644)
    tmp_path.chmod(0o777)
    with pytest.raises(ConfigError, match=r"writable by group and others \(mode 0777\)"):
        load_config(str(conf))
    tmp_path.chmod(0o1777)  # sticky, like /tmp
    load_config(str(conf))
    tmp_path.chmod(0o755)
    os.chown(conf, 65534, 65534)
    with pytest.raises(ConfigError, match="is owned by uid 65534, not root"):
        load_config(str(conf))


# -- earlyoom's defaults and the shipped config ------------------------------------------


def test_default_config_is_earlyoom_s() -> None:
    cfg = default_config()
    assert cfg.builtin_default and cfg.source == "<built-in default>"
    assert (cfg.decision_log, cfg.control_socket, cfg.budget_ms) == (
        DEFAULT_DECISION_LOG, DEFAULT_CONTROL_SOCKET, 50)
    (w,) = cfg.watches
    assert w.domain.system and w.triggers == ("threshold",)
    assert w.policy_spec == "kernel" and w.policy.kernel and w.victim == "process"
    # earlyoom: SIGTERM when both MemAvailable and SwapFree are at or below 10 %,
    # SIGKILL at or below 5 % (KILL_PERCENT = PERCENT / 2)
    assert w.threshold == Threshold(10.0, 10.0, 5.0, 5.0)
    assert (w.sigterm_grace_ms, w.cooldown_s, w.dry_run) == (0, 5.0, False)
    assert (w.pressure, w.margin_percent) == (None, None)


def test_packaged_config_is_the_default_with_comments(fx: Path) -> None:
    cfg = load_config(str(fx / "oomwarden.toml"))
    (w,) = cfg.watches
    (d,) = default_config().watches
    assert dataclasses.replace(w, line=0, victim_from_policy=True) == d
    assert (cfg.decision_log, cfg.control_socket, cfg.budget_ms) == (
        DEFAULT_DECISION_LOG, DEFAULT_CONTROL_SOCKET, 50)
    text = PACKAGED.read_text()
    comments = sum(1 for line in text.splitlines() if line.startswith("#"))
    assert comments > 60  # every key is explained


def test_packaged_examples_are_valid_once_uncommented(tmp_path: Path) -> None:
    text = PACKAGED.read_text()
    examples = text[text.index("# --- examples"):]
    setting = re.compile(r"^# (\[\[?watch[a-z.]*\]\]?|[a-z_0-9]+ = .*?)(\s+#.*)?$")
    lines = [m.group(1) for line in examples.splitlines() if (m := setting.match(line))]
    assert sum(line == "[[watch]]" for line in lines) == 2
    conf = tmp_path / "oomwarden.toml"
    conf.write_text(text + "\n" + "\n".join(lines) + "\n")
    (tmp_path / "build-rules.toml").write_text('[policy]\nvictim = "cgroup"\n')
    cfg = load_config(str(conf), cap_sys_resource=False)
    assert [w.domain.spec for w in cfg.watches] == [
        "system", "cgroup:/app.slice/*.service", "cgroup:/build.slice"]
    assert cfg.watches[1].pressure == Pressure(60.0, 40.0, 2.0)
    assert cfg.watches[2].dry_run and cfg.watches[2].policy_kind == "rules"


def test_summary_names_every_watch_setting(fx: Path) -> None:
    cfg = load_config(str(fx / "full.toml"), cap_sys_resource=False)
    text = "\n".join(summarize(cfg))
    for needle in ("3 watches", "/var/lib/oomwarden/log.jsonl", "/run/oomwarden-test/ctl.sock",
                   "120 ms", "watch[1] (line 6): domain system",
                   "SIGTERM at MemAvailable <= 20% and SwapFree <= 100%",
                   "SIGKILL at <= 7.5% and <= 50%",
                   "pressure (some >= 60% or full >= 25.5% over 4 s)",
                   "policy: largest (built-in, per-task)",
                   "victim: tree; cooldown: 2.5 s; dry run: yes",
                   "SIGTERM, then SIGKILL after 1500 ms",
                   "domain cgroup:/app.slice/*.service (a glob",
                   "margin (working set within 2.5% of the limit)",
                   "rules file " + str(fx / "policies" / "protect.toml"),
                   "victim: tree (the policy's)", "always-default (Python policy",
                   "victim: cgroup; cooldown: 5 s; "
                   "dry run: no", "kill: SIGKILL at once"):
        assert needle in text, needle


# -- the CLI -----------------------------------------------------------------------------


def test_check_config_valid(fx: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = str(fx / "full.toml")
    assert main(["check-config", path]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    lines = out.splitlines()
    assert lines[-1] == f"config {path} is valid"
    assert lines[0] == f"config {path}: 3 watches"
    assert sum(line.startswith("watch[") for line in lines) == 3
    for needle in ("domain", "triggers:", "policy:", "victim:", "cooldown:", "dry run:",
                   "kill:"):
        assert sum(needle in line for line in lines) >= 3, needle


def test_check_config_default(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", "--default"]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert "built-in default config (earlyoom's thresholds" in out
    assert "SIGTERM at MemAvailable <= 10% and SwapFree <= 10%, SIGKILL at <= 5%" in out
    assert "policy: kernel (built-in" in out
    assert out.splitlines()[-1] == "the built-in default config is valid"


def test_check_config_packaged(fx: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", str(fx / "oomwarden.toml")]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"config {fx / 'oomwarden.toml'} is valid"


@pytest.mark.parametrize(("argv", "expected"), [
    (["check-config", "{fx}/bad-cooldown.toml"],
     "oomwarden: error: {fx}/bad-cooldown.toml:12: watch[2].cooldown_s: 0 is outside 0.1..600"),
    (["check-config", "{fx}/bad-policy.toml"],
     "oomwarden: error: {fx}/bad-policy.toml:5: watch[1].policy: {fx}/policies/broken.toml:3: "
     "rule \"typo\": action: unknown action"),
    (["check-config", "{fx}/bad-toml.toml"],
     "oomwarden: error: {fx}/bad-toml.toml:4: policy: invalid TOML: "),
    (["check-config", "/no/such/oomwarden.toml"],
     "oomwarden: error: config file /no/such/oomwarden.toml does not exist"),
    (["check-config", "{fx}"], "oomwarden: error: config file {fx} is a directory, not a file"),
    (["check-config"], "oomwarden: error: check-config: give a config FILE or --default"),
    (["check-config", "--default", "{fx}/oomwarden.toml"],
     "oomwarden: error: check-config: give a config FILE or --default"),
    (["check-config", "--nope"], "oomwarden: error: unrecognized arguments: --nope"),
])
def test_check_config_errors_are_one_line_and_status_2(
        argv: list[str], expected: str, fx: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = [a.replace("{fx}", str(fx)) for a in argv]
    try:
        status = main(argv)
    except SystemExit as e:  # argparse's own usage errors
        status = e.code  # type: ignore[assignment]
    out, err = capsys.readouterr()
    assert status == 2
    assert out == ""
    assert len(err.splitlines()) == 1 and err.endswith("\n"), err
    assert err.startswith(expected.replace("{fx}", str(fx))), err
    assert "Traceback" not in err


def test_explain_still_works(capsys: pytest.CaptureFixture[str]) -> None:
    hybrid = Path(__file__).parent / "fixtures" / "hybrid"
    assert main(["explain", "--proc-root", str(hybrid / "proc"), "--fs-root", str(hybrid),
                 "--no-verify-fs", "--json"]) == 0
    assert '"domain"' in capsys.readouterr().out


# -- docs --------------------------------------------------------------------------------


def test_docs_name_every_key() -> None:
    docs = DOCS.read_text()
    for key in (*TOP_KEYS, *WATCH_KEYS, *THRESHOLD_KEYS, *PRESSURE_KEYS):
        assert f"`{key}`" in docs, key
    for trigger in config_module.TRIGGERS:
        assert f'`"{trigger}"`' in docs, trigger
    assert "earlyoom" in docs and "CAP_SYS_RESOURCE" in docs


# -- property: anything loads or is one ConfigError --------------------------------------

#: Per key: right values, wrong values (the property mixes them, mostly right).
TOP_PIECES: dict[str, tuple[list[str], list[str]]] = {
    "budget_ms": (["50", "1", "60000"], ["0", "1e3", '"x"']),
    "decision_log": (['"/var/log/x.jsonl"'], ['"rel"', '"/d/"', '""']),
    "control_socket": (['"/run/x.sock"'], ['"/var/log/x.jsonl"', "[]", f'"{LONG}"']),
}
WATCH_PIECES: dict[str, tuple[list[str], list[str]]] = {
    "victim": (['"cgroup"', '"tree"', '"process"'], ['"pid"', "1"]),
    "sigterm_grace_ms": (["0", "500", "60000"], ["-3", "1.5", "60001"]),
    "cooldown_s": (["5", "0.1", "600"], ["0", "nan", '"5"']),
    "dry_run": (["true", "false"], ["0"]),
    "margin_percent": (["5", "0.1"], ["99", "0"]),
}
DOMAINS = (['"system"', '"cgroup:/a"', '"cgroup:/a/*.service"', '"cgroup:/b/[0-9]"'],
           ['"cgroup:/"', '"cgroup:a"', '"cgroup:/a/[x"', "3", '"cgroup:/a/**"'])
TRIGGER_SETS = (['["oom"]', '["threshold", "pressure"]', '["margin", "oom"]', '["events"]',
                 '["pressure"]', '["threshold"]', '["oom", "margin", "pressure", "threshold"]'],
                ["[]", '["oom", "oom"]', '"oom"', '["nope"]'])
POLICIES = (['"kernel"', '"growth"', '"pressure"', '"largest"'],
            ['"nope"', '"missing.toml"', '"missing.py"', "1"])
SUB_TABLES = {
    "threshold": (["mem_available_percent = 15", "mem_available_kill_percent = 3",
                   "swap_free_percent = 100", "swap_free_kill_percent = 0"],
                  ["mem_available_kill_percent = 30", "swap_free_percent = 101", "bogus = 2"]),
    "pressure": (["some_avg10 = 50", "full_avg10 = 10", "window_s = 6", "window_s = 2"],
                 ["window_s = 3", "window_s = 0.1", "some_avg10 = 0", "full = 1"]),
}
JUNK = st.text(alphabet=st.characters(min_codepoint=9, max_codepoint=0x2030), max_size=12)


def _rarely(draw: st.DrawFn, one_in: int) -> bool:
    """True one time in ``one_in``; False for hypothesis's simplest example,
    so that the simplest config is a valid one."""
    return draw(st.integers(0, one_in - 1)) == one_in - 1


@st.composite
def configs(draw: st.DrawFn) -> str:
    """A config text, mostly right, with a wrong value, a missing or unknown
    key, a duplicate domain or a line of junk here and there."""
    def pick(choices: tuple[list[str], list[str]]) -> str:
        good, bad = choices
        return draw(st.sampled_from(bad if _rarely(draw, 15) else good))

    def junk() -> list[str]:
        return [draw(JUNK)] if _rarely(draw, 20) else []

    parts: list[str] = []
    for key, choices in TOP_PIECES.items():
        if draw(st.booleans()):
            parts.append(f"{key} = {pick(choices)}")
    parts += junk()
    for _ in range(0 if _rarely(draw, 20) else draw(st.integers(1, 3))):
        parts.append("[[watch]]")
        triggers = pick(TRIGGER_SETS)
        for key, value in (("domain", pick(DOMAINS)), ("triggers", triggers),
                           ("policy", pick(POLICIES))):
            if not _rarely(draw, 30):
                parts.append(f"{key} = {value}")
        for key, choices in WATCH_PIECES.items():
            wanted = key != "margin_percent" or "margin" in triggers or _rarely(draw, 10)
            if wanted and draw(st.booleans()):
                parts.append(f"{key} = {pick(choices)}")
        if _rarely(draw, 30):
            parts.append("typo = 1")
        parts += junk()
        for table, choices in SUB_TABLES.items():
            if (table in triggers or _rarely(draw, 10)) and draw(st.booleans()):
                parts.append(f"[watch.{table}]")
                parts += [pick(choices) for _ in range(draw(st.integers(0, 2)))]
    return "\n".join(parts) + "\n"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(configs(), st.booleans())
def test_random_configs_load_or_raise_one_config_error(text: str, cap: bool) -> None:
    try:
        cfg = parse_config(text, "fuzz.toml", base_dir="/nonexistent", cap_sys_resource=cap)
    except ConfigError as e:
        message = str(e)
        assert len(message.splitlines()) == 1 and "\n" not in message, message
        m = re.match(r"fuzz\.toml:(\d+): ", message)
        assert m is not None, message
        assert 1 <= int(m.group(1)) <= text.count("\n") + 1, message
        return
    assert isinstance(cfg, Config) and cfg.watches
    domains = [w.domain.spec for w in cfg.watches]
    assert len(set(domains)) == len(domains)
    for w in cfg.watches:
        assert w.triggers and len(set(w.triggers)) == len(w.triggers)
        assert 0.1 <= w.cooldown_s <= 600 and 0 <= w.sigterm_grace_ms <= 60000
        assert w.policy.victim == w.victim
        assert (w.threshold is not None) == ("threshold" in w.triggers)
        assert (w.pressure is not None) == ("pressure" in w.triggers)
        assert (w.margin_percent is not None) == ("margin" in w.triggers)
        if w.pressure is not None and not cap:
            assert w.pressure.window_s % 2 == 0


def test_docs_examples_load(tmp_path: Path) -> None:
    """Every ```toml block of docs/config.md with a [[watch]] loads; the one
    showing the default is the default."""
    blocks = re.findall(r"```toml\n(.*?)```", DOCS.read_text(), re.DOTALL)
    (tmp_path / "db-host.toml").write_text(
        '[[rule]]\nname = "db"\nmatch.comm = "^postgres$"\naction = "protect"\n')
    loaded = []
    for i, block in enumerate(b for b in blocks if "[[watch]]" in b):
        conf = tmp_path / f"c{i}.toml"
        conf.write_text(block)
        loaded.append(load_config(str(conf), cap_sys_resource=False))
    assert len(loaded) >= 5
    (first,) = loaded[0].watches
    (d,) = default_config().watches
    assert dataclasses.replace(first, line=0, victim_from_policy=True) == d
