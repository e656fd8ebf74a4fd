"""TOML rules (policy/rules.py): compiled once, matched on literal snapshots.

Every action, AND of keys, rule order, every load error with its file, line
and key, user names, the comm-alone caveat, the engine end to end, and a
property: random rule sets over random snapshots never crash, decide the same
twice, and never choose a protected task.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from oomwarden.decision import Candidate, Decision
from oomwarden.errors import PolicyError
from oomwarden.model import (
    Cgroup,
    Hierarchy,
    HierarchyKind,
    Snapshot,
    SystemMemory,
    Task,
    page_counter_max_bytes,
)
from oomwarden.policy.api import Policy
from oomwarden.policy.decide import decide
from oomwarden.policy.engine import kernel_decision, system_domain
from oomwarden.policy.rules import BAND, RuleSet, load_rules, parse_rules, read_rules

FIXTURES = Path(__file__).parent / "fixtures" / "rules"
DOCS = Path(__file__).parent.parent / "docs" / "rules.md"
PAGE = 4096
V1, V2 = HierarchyKind.V1, HierarchyKind.V2
TOTAL = 1_000_000  # system pages: totalpages / 1000 = 1000
#: The helper task's kernel points: rss 60000 + 30000 + 10000, swap 5000, page tables 200.
KP = 105_200


def task(pid: int = 100, **kw: Any) -> Task:
    """A killable user process in memcg /a; memory in pages."""
    base: dict[str, Any] = {
        "pid": pid, "tgid": pid, "ppid": 1, "comm": f"p{pid}", "state": "S",
        "start_ticks": 1000 + pid, "uid": 1000, "kthread": False, "has_mm": True,
        "rss_anon": 60_000, "rss_file": 30_000, "rss_shmem": 10_000, "swap": 5_000,
        "pgtables": 200, "oom_score_adj": 0, "memcg_v1": "/a",
        "global_init": pid == 1,
    }
    base.update(kw)
    return Task(**base)


def cgroup(path: str, kind: HierarchyKind = V1, inode: int = 1000) -> Cgroup:
    return Cgroup(kind=kind, path=path, fs_path=f"/sys/fs/cgroup/memory{path}", inode=inode,
                  memory_controller=True, verified=True, limit=page_counter_max_bytes(PAGE))


def snap(*tasks: Task, cgroups: tuple[Cgroup, ...] = (),
         hierarchies: tuple[Hierarchy, ...] = ()) -> Snapshot:
    system = SystemMemory(mem_total=TOTAL * PAGE, mem_available=TOTAL * PAGE // 2,
                          swap_total=0, swap_free=0, pressure=None, page_size=PAGE)
    return Snapshot(taken_ns=0, system=system, tasks=tasks, cgroups=cgroups,
                    hierarchies=hierarchies)


def rules(tmp_path: Path, text: str, name: str = "rules.toml") -> Policy:
    path = tmp_path / name
    path.write_text(text)
    return load_rules(str(path))


def run(policy: Policy, s: Snapshot) -> Decision:
    d = decide(s, system_domain(s), policy, budget_s=10.0)
    assert d.fallback is None, d.fallback
    return d


def cand(d: Decision, pid: int) -> Candidate:
    return next(c for c in d.candidates if c.task.pid == pid)


def victim_pid(d: Decision) -> int | None:
    return None if d.victim is None else d.victim.task.pid


def error(tmp_path: Path, text: str) -> str:
    path = tmp_path / "rules.toml"
    path.write_text(text)
    with pytest.raises(PolicyError) as e:
        load_rules(str(path))
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"{path}:"), msg
    return msg[len(str(path)):]


# ------------------------------------------------------------------- actions


def test_no_rule_matches_the_kernel_decides(tmp_path: Path) -> None:
    policy = rules(tmp_path, '[[rule]]\nmatch.comm = "^nothing$"\naction = "protect"\n')
    s = snap(task(100), task(101, rss_anon=90_000))
    d = run(policy, s)
    assert victim_pid(d) == victim_pid(kernel_decision(s, system_domain(s))) == 101
    assert cand(d, 100).points == KP and cand(d, 100).verdict == "default"


def test_protect_ignores_the_task_and_the_next_largest_goes(tmp_path: Path) -> None:
    policy = rules(tmp_path, """
[[rule]]
name = "protect the db"
match.exe = "^/usr/lib/postgresql/[^/]+/bin/postgres$"
action = "protect"
""")
    db = task(100, rss_anon=900_000, exe="/usr/lib/postgresql/16/bin/postgres")
    s = snap(db, task(101), task(102, exe="/tmp/usr/lib/postgresql/16/bin/postgres"))
    d = run(policy, s)
    assert cand(d, 100).verdict == "ignore"
    assert "protected by rule 'protect the db'" in cand(d, 100).notes
    # an anchored exe regex: a copy elsewhere is not protected; equal points,
    # the kernel's tie rule keeps the one met last
    assert victim_pid(d) == 102


def test_points_fix_the_score(tmp_path: Path) -> None:
    policy = rules(tmp_path, '[[rule]]\nname = "pin"\nmatch.comm = "^p100$"\n'
                             'action = "points"\npoints = 123\n')
    d = run(policy, snap(task(100, rss_anon=900_000), task(101)))
    assert cand(d, 100).points == 123
    assert cand(d, 100).notes[0] == "rule 'pin' (points): fixed at 123 points"
    assert victim_pid(d) == 101


def test_prefer_multiplies_and_adds(tmp_path: Path) -> None:
    policy = rules(tmp_path, """
[[rule]]
name = "batch jobs first"
match.comm = "^p100$"
action = "prefer"
multiply = 2.0

[[rule]]
name = "and more"
match.comm = "^p100$"
action = "prefer"
add = 1000
""")
    d = run(policy, snap(task(100), task(101, rss_anon=150_000)))
    c = cand(d, 100)
    # (105200 x 2) + 1000 = 211400, above the other's 195200
    assert c.points == 2 * KP + 1000
    # Reasons are worded once per combination of rules; the points are the
    # candidate's own.
    assert c.notes[:3] == ("base: the kernel's badness",
                           "rule 'batch jobs first' (prefer): x2",
                           "rule 'and more' (prefer): +1000 pages (3.9 MiB)")
    assert victim_pid(d) == 100


def test_avoid_multiplies_and_subtracts(tmp_path: Path) -> None:
    policy = rules(tmp_path, """
[[rule]]
name = "spare it"
match.comm = "^p101$"
action = "avoid"
multiply = 0.5
add = "1MiB"
""")
    d = run(policy, snap(task(100), task(101, rss_anon=150_000)))
    # (195200 x 0.5) - 256 pages = 97344
    assert cand(d, 101).points == 195_200 // 2 - 256
    assert cand(d, 101).notes[1] == "rule 'spare it' (avoid): x0.5 -1MiB = 256 pages"
    assert victim_pid(d) == 100


def test_add_as_a_share_of_the_domain(tmp_path: Path) -> None:
    policy = rules(tmp_path, '[[rule]]\nmatch.comm = "^p100$"\naction = "prefer"\n'
                             'add = "45%"\n')
    d = run(policy, snap(task(100)))
    assert cand(d, 100).points == KP + 450_000


def test_multiply_acts_on_the_magnitude_of_negative_points(tmp_path: Path) -> None:
    # oom_score_adj -500 gives 105200 - 500000 = -394800 points: preferring
    # must raise them and avoiding lower them.
    policy = rules(tmp_path, """
[[rule]]
match.comm = "^p100$"
action = "prefer"
multiply = 1.5

[[rule]]
match.comm = "^p101$"
action = "avoid"
multiply = 0.5
""")
    d = run(policy, snap(task(100, oom_score_adj=-500), task(101, oom_score_adj=-500)))
    assert cand(d, 100).points == -394_800 + 197_400
    assert cand(d, 101).points == -394_800 - 197_400


def test_victim_first_beats_everything_and_keeps_the_usual_order(tmp_path: Path) -> None:
    policy = rules(tmp_path, '[[rule]]\nname = "build"\nmatch.cgroup = "/build/*"\n'
                             'action = "victim-first"\n')
    s = snap(task(100, rss_anon=5_000_000),
             task(101, memcg_v1="/build/cc1"),
             task(102, memcg_v1="/build/ld", rss_anon=70_000))
    d = run(policy, s)
    assert victim_pid(d) == 102
    assert cand(d, 102).points == BAND + KP + 10_000
    assert cand(d, 101).points == BAND + KP
    assert ("rule 'build' (victim-first): chosen before every task without victim-first "
            "(2^62 + its points)") in cand(d, 102).notes
    assert [c.task.pid for c in d.selectable] == [102, 101, 100]


def test_victim_last_goes_only_when_nothing_else_can(tmp_path: Path) -> None:
    policy = rules(tmp_path, '[[rule]]\nname = "session"\nmatch.cgroup = "/session"\n'
                             'action = "victim-last"\n')
    d = run(policy, snap(task(100, memcg_v1="/session", rss_anon=5_000_000), task(101)))
    assert victim_pid(d) == 101
    assert cand(d, 100).points == -BAND + KP + 4_940_000
    d = run(policy, snap(task(100, memcg_v1="/session")))
    assert victim_pid(d) == 100


def test_largest_base(tmp_path: Path) -> None:
    policy = rules(tmp_path, '[policy]\nbase = "largest"\n\n[[rule]]\nmatch.comm = "^zzz$"\n'
                             'action = "protect"\n')
    # oom_score_adj is not counted: the larger one goes, adj or not
    d = run(policy, snap(task(100, oom_score_adj=1000), task(101, rss_anon=70_000)))
    assert victim_pid(d) == 101
    assert cand(d, 101).points == 115_000
    assert cand(d, 101).notes[0] == "base: rss + swap = 115000 pages (449.2 MiB)"
    d = run(policy, snap(task(100, swap=None)))
    assert cand(d, 100).notes[0].endswith("; swap unknown, counted as 0")


def test_victim_kind_reaches_the_decision(tmp_path: Path) -> None:
    policy = rules(tmp_path, '[policy]\nvictim = "tree"\n')
    assert policy.victim == "tree" and policy.name == "rules.toml"
    d = run(policy, snap(task(100)))
    assert d.victim_kind == "tree" and d.actions[0].tree  # type: ignore[union-attr]


# ------------------------------------------------------------------- matching


def test_all_keys_must_match(tmp_path: Path) -> None:
    policy = rules(tmp_path, """
[[rule]]
name = "both"
match.comm = "^worker$"
match.uid = 1000
match.cgroup = "/jobs/*"
action = "protect"
""")
    s = snap(task(100, comm="worker", memcg_v1="/jobs/1"),
             task(101, comm="worker", memcg_v1="/jobs/1", uid=0),
             task(102, comm="worker", memcg_v1="/other"),
             task(103, comm="other", memcg_v1="/jobs/1"))
    d = run(policy, s)
    assert [c.task.pid for c in d.candidates if c.verdict == "ignore"] == [100]


def test_uid_list_user_name_and_cmdline(tmp_path: Path) -> None:
    policy = rules(tmp_path, """
[[rule]]
name = "root's daemons"
match.user = "root"
match.cmdline = "--daemon( |$)"
action = "protect"

[[rule]]
name = "these users"
match.uid = [1001, 1002]
action = "points"
points = 7
""")
    s = snap(task(100, uid=0, cmdline=("/usr/sbin/thing", "--daemon")),
             task(101, uid=0, cmdline=("/usr/sbin/thing", "--daemonize")),
             task(102, uid=1002), task(103, uid=1000))
    d = run(policy, s)
    assert cand(d, 100).verdict == "ignore"
    assert cand(d, 101).verdict == "default"
    assert cand(d, 102).points == 7 and cand(d, 103).points == KP


def test_user_name_resolves_at_load() -> None:
    ruleset = read_rules(str(FIXTURES / "server.toml"))
    assert ruleset.rules[0].uids == frozenset({0})  # "root"


def test_cgroup_glob_on_the_memory_hierarchy(tmp_path: Path) -> None:
    policy = rules(tmp_path, '[[rule]]\nmatch.cgroup = "/system.slice/*"\naction = "protect"\n')
    v1 = Hierarchy(V1, "/sys/fs/cgroup/memory", "/", ("memory",), True)
    v2 = Hierarchy(V2, "/sys/fs/cgroup/unified", "/", (), True)
    # memory on v1 (the hybrid layout): the v1 path counts, not the v2 one
    s = snap(task(100, memcg_v1="/system.slice/db.service", cgroup_v2="/user.slice"),
             task(101, memcg_v1="/user.slice", cgroup_v2="/system.slice/x.service"),
             hierarchies=(v1, v2))
    d = run(policy, s)
    assert cand(d, 100).verdict == "ignore" and cand(d, 101).verdict == "default"
    # memory on v2 (pure cgroup v2)
    v2m = Hierarchy(V2, "/sys/fs/cgroup", "/", ("memory",), True)
    s = snap(task(100, memcg_v1=None, cgroup_v2="/user.slice"),
             task(101, memcg_v1=None, cgroup_v2="/system.slice/x.service"),
             hierarchies=(v2m,))
    d = run(policy, s)
    assert cand(d, 100).verdict == "default" and cand(d, 101).verdict == "ignore"


def test_unknown_exe_is_no_match_and_says_so(tmp_path: Path) -> None:
    policy = rules(tmp_path, """
[[rule]]
name = "protect the db"
match.exe = "^/usr/bin/db$"
match.uid = 1000
action = "protect"

[[rule]]
name = "prefer chrome"
match.cmdline = "chrome"
action = "prefer"
add = 10
""")
    d = run(policy, snap(task(100), task(101, uid=0)))
    c = cand(d, 100)
    assert c.verdict == "default" and c.points == KP  # not protected on unknown data
    assert ("rule 'protect the db' (protect) not applied: exe is unknown for this task "
            "(not read in this snapshot), so the rule does not match") in c.notes
    assert any("rule 'prefer chrome' (prefer) not applied: cmdline is unknown" in n
               for n in c.notes)
    # the uid rules it out anyway: nothing said about its exe
    assert not any("protect the db" in n for n in cand(d, 101).notes)


def test_unknown_uid_and_cgroup(tmp_path: Path) -> None:
    policy = rules(tmp_path, '[[rule]]\nname = "r"\nmatch.uid = 0\nmatch.cgroup = "/a"\n'
                             'action = "protect"\n')
    d = run(policy, snap(task(100, uid=None, memcg_v1=None, cgroup_v2=None)))
    assert cand(d, 100).verdict == "default"
    assert "uid and cgroup are unknown" in cand(d, 100).notes[0]


def test_first_deciding_rule_wins_and_prefers_still_add(tmp_path: Path) -> None:
    policy = rules(tmp_path, """
[[rule]]
name = "prefer all"
match.cgroup = "*"
action = "prefer"
add = 100

[[rule]]
name = "first"
match.comm = "^p10[01]$"
action = "victim-first"

[[rule]]
name = "protect p100"
match.comm = "^p100$"
action = "protect"

[[rule]]
name = "prefer again"
match.cgroup = "*"
action = "prefer"
add = 10
""")
    d = run(policy, snap(task(100), task(101), task(102)))
    # rule order: victim-first comes before the protection, so p100 is not protected
    assert cand(d, 100).verdict == "select"
    assert cand(d, 100).points == BAND + KP + 110
    assert ("rule 'protect p100' (protect) also matched; rule 'first' came first and decides"
            in cand(d, 100).notes)
    assert cand(d, 102).points == KP + 110
    reordered = rules(tmp_path, """
[[rule]]
name = "protect p100"
match.comm = "^p100$"
action = "protect"

[[rule]]
name = "first"
match.comm = "^p10[01]$"
action = "victim-first"
""", "reordered.toml")
    d = run(reordered, snap(task(100), task(101), task(102)))
    assert cand(d, 100).verdict == "ignore" and victim_pid(d) == 101


def test_adjustments_do_not_apply_under_protect_or_points(tmp_path: Path) -> None:
    policy = rules(tmp_path, """
[[rule]]
name = "more"
match.comm = "^p"
action = "prefer"
multiply = 3

[[rule]]
name = "fixed"
match.comm = "^p100$"
action = "points"
points = 5
""")
    d = run(policy, snap(task(100), task(101)))
    assert cand(d, 100).points == 5
    assert ("rule 'more' (prefer) also matched; not applied: rule 'fixed' (points) decides"
            in cand(d, 100).notes)
    assert cand(d, 101).points == 3 * KP


def test_comm_alone_protection_is_marked(tmp_path: Path) -> None:
    policy = rules(tmp_path, """
[[rule]]
name = "sshd"
match.comm = "^sshd$"
action = "protect"

[[rule]]
name = "sshd by exe"
match.exe = "^/usr/sbin/sshd$"
action = "protect"

[[rule]]
name = "agent"
match.cmdline = "agent"
action = "protect"
""")
    d = run(policy, snap(task(100, comm="sshd"), task(101, exe="/usr/sbin/sshd"),
                         task(102, cmdline=("agent",)), task(103)))
    assert ("protected by rule 'sshd' on comm alone: any process can take that name "
            "(prctl PR_SET_NAME); match.exe or match.cgroup cannot be faked"
            in cand(d, 100).notes)
    assert not any("alone" in n for n in cand(d, 101).notes)
    assert any("on its command line alone" in n for n in cand(d, 102).notes)


# ------------------------------------------------------------------- the engine, end to end


def test_server_fixture_end_to_end() -> None:
    policy = load_rules(str(FIXTURES / "server.toml"))
    assert policy.name == "server.toml"
    s = snap(
        task(100, comm="postgres", uid=0, rss_anon=5_000_000, memcg_v1="/db",
             exe="/usr/lib/postgresql/16/bin/postgres"),
        task(101, comm="sshd", memcg_v1="/system.slice/ssh.service", rss_anon=4_000_000),
        task(102, comm="job", memcg_v1="/batch/j1", rss_anon=100_000),
        task(103, comm="bash", uid=1000, memcg_v1="/user", rss_anon=150_000),
        task(104, comm="big", memcg_v1="/user", rss_anon=250_000),
    )
    d = run(policy, s)
    # batch job: (140000 + 5000 + 200) x 2 = 290400; big: 295200; bash avoided
    assert cand(d, 102).points == 290_400
    assert cand(d, 103).points == 195_200 - 50_000
    assert victim_pid(d) == 104
    assert {c.task.pid for c in d.candidates if c.verdict == "ignore"} == {100, 101}
    s2 = snap(*s.tasks, task(105, comm="cc1", memcg_v1="/build/x", rss_anon=1_000))
    assert victim_pid(run(policy, s2)) == 105
    # upgraded under the running server: still protected; a lookalike is not
    s3 = snap(dataclasses.replace(s.tasks[0], exe="/usr/lib/postgresql/16/bin/postgres (deleted)"),
              task(106, uid=0, exe="/usr/lib/postgresql/16/bin/postgres.evil", rss_anon=9_000_000))
    d3 = run(policy, s3)
    assert cand(d3, 100).verdict == "ignore" and victim_pid(d3) == 106


def test_earlyoom_fixture() -> None:
    policy = load_rules(str(FIXTURES / "earlyoom.toml"))
    s = snap(task(100, comm="backupd", rss_anon=900_000), task(101, comm="firefox"),
             task(102, comm="Xorg", rss_anon=500_000), task(103, rss_anon=400_000))
    d = run(policy, s)
    assert victim_pid(d) == 101  # 105200 + 450000 beats 505200
    assert cand(d, 100).verdict == "ignore"
    assert cand(d, 102).points == 545_200 - 450_000
    assert any("comm alone" in n for n in cand(d, 100).notes)


def test_systemd_fixture_kills_cgroups() -> None:
    policy = load_rules(str(FIXTURES / "systemd.toml"))
    session = "/user.slice/user-1000.slice/session-2.scope"
    cgs = (cgroup("/system.slice/postgresql.service", inode=1), cgroup(session, inode=2),
           cgroup("/user.slice/user-1000.slice/app.scope", inode=3))
    s = snap(task(100, memcg_v1="/system.slice/postgresql.service", rss_anon=9_000_000),
             task(101, memcg_v1=session, rss_anon=5_000_000),
             task(102, memcg_v1="/user.slice/user-1000.slice/app.scope"), cgroups=cgs)
    d = run(policy, s)
    assert victim_pid(d) == 102 and d.victim_kind == "cgroup"
    assert d.actions[0].inode == 3  # type: ignore[union-attr]
    d = run(policy, snap(*s.tasks[:2], cgroups=cgs))
    assert victim_pid(d) == 101  # "avoid": only when there is no other candidate
    d = run(policy, snap(s.tasks[0], cgroups=cgs))
    assert d.victim is None  # "omit": never


def test_layouts_fixture_names_every_key() -> None:
    ruleset = read_rules(str(FIXTURES / "layouts.toml"))
    assert [(r.name, r.line, r.keys) for r in ruleset.rules] == [
        ("dotted", 4, ("comm",)), ("sub-table", 10, ("comm", "uid")),
        ("inline", 18, ("comm", "cgroup")),
    ]
    d = run(ruleset.policy(), snap(task(100, comm="sub", uid=0), task(101, comm="inline",
                                                                     memcg_v1="/x/y")))
    assert (cand(d, 100).points, cand(d, 101).points) == (2, 3)


def test_registry_loads_toml(tmp_path: Path) -> None:
    from oomwarden.policy.registry import load_policy  # noqa: PLC0415

    path = tmp_path / "mine.toml"
    shutil.copy(FIXTURES / "server.toml", path)
    policy = load_policy(str(path))
    assert policy.name == "mine.toml" and policy.evaluate is not None


def test_needs_details_only_for_exe_or_cmdline() -> None:
    assert read_rules(str(FIXTURES / "server.toml")).needs_details  # match.exe
    assert not read_rules(str(FIXTURES / "systemd.toml")).needs_details  # cgroups only
    assert parse_rules('[[rule]]\nmatch.cmdline = "x"\naction = "protect"\n').needs_details


def test_compiled_rules_are_immutable() -> None:
    ruleset = read_rules(str(FIXTURES / "server.toml"))
    assert isinstance(ruleset.rules, tuple)
    with pytest.raises(dataclasses.FrozenInstanceError):
        ruleset.rules[0].name = "x"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        ruleset.base = "largest"  # type: ignore[misc]


# ------------------------------------------------------------------- errors: file, line, key


def test_fixture_errors() -> None:
    cases = {
        "bad-regex.toml": ':12: rule "protect db 2": match.exe: bad regex: unterminated '
                          "character set at position 6",
        "bad-key.toml": ':8: rule "prefer batch": match.exec: unknown key (expected '
                        "match.comm, match.exe, match.cmdline, match.cgroup, match.uid, "
                        "match.user); did you mean match.exe?",
        "bad-type.toml": ':10: rule "avoid x": add: \'x\' is not pages or a size (like 250000, '
                         '"512MiB", "1.5GiB" or "10%" of the domain)',
        "bad-toml.toml": ":3: match.comm: invalid TOML: invalid value",
        "bad-user.toml": ":3: rule \"protect the app user\": match.user: unknown user "
                         "'no-such-user-oomwarden'",
    }
    for name, expected in cases.items():
        path = str(FIXTURES / name)
        with pytest.raises(PolicyError) as e:
            load_rules(path)
        assert str(e.value) == path + expected


RULE = '[[rule]]\nname = "r"\nmatch.comm = "^a$"\naction = "protect"\n'


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # unknown keys, at every level
        ('nmae = 1\n', ":1: nmae: unknown key (expected policy, rule)"),
        ('[policy]\nbase = "kernel"\nvictm = "tree"\n',
         ":3: policy.victm: unknown key (expected policy.base, policy.victim, "
         "policy.description); did you mean policy.victim?"),
        (RULE + '\n[[rule]]\nname = "s"\nmatch.comm = "^b$"\naction = "protect"\nweight = 3\n',
         ':10: rule "s": weight: unknown key (expected name, action, match, add, multiply, '
         "points)"),
        (RULE + '[[rule]]\nmatch = { comm = "^b$", pid = 3 }\naction = "protect"\n',
         ":6: rule 2: match.pid: unknown key (expected match.comm, match.exe, "
         "match.cmdline, match.cgroup, match.uid, match.user); did you mean match.uid?"),
        # wrong types
        ('[[rule]]\nname = "r"\nmatch.uid = "abc"\naction = "protect"\n',
         ':3: rule "r": match.uid: expected a uid (an integer) or a list of them, '
         "got a string ('abc')"),
        ('[[rule]]\nmatch.uid = [0, true]\naction = "protect"\n',
         ":2: rule 1: match.uid: expected a uid (an integer) or a list of them, "
         "got a boolean (true)"),
        ('[[rule]]\nname = "r"\nmatch.comm = 5\naction = "protect"\n',
         ':3: rule "r": match.comm: expected a regex string, got an integer (5)'),
        ('[[rule]]\nname = "r"\nmatch.comm = "a"\naction = "prefer"\nadd = 1.5\n',
         ":5: rule \"r\": add: expected pages (an integer) or a size like \"512MiB\" or "
         "\"10%\", got a float (1.5)"),
        ('[[rule]]\nname = "r"\nmatch.comm = "a"\naction = "prefer"\nmultiply = "2"\n',
         ":5: rule \"r\": multiply: expected a number, got a string ('2')"),
        ('[[rule]]\nname = "r"\nmatch.comm = "a"\naction = "points"\npoints = 1.0\n',
         ":5: rule \"r\": points: expected an integer, got a float (1.0)"),
        ('[[rule]]\nname = 3\nmatch.comm = "a"\naction = "protect"\n',
         ":2: rule 1: name: expected a string, got an integer (3)"),
        ('policy = "kernel"\n', ":1: policy: expected a [policy] table"),
        ('[policy]\nbase = 1\n', ":2: policy.base: expected a string, got an integer (1)"),
        ('[rule]\nmatch.comm = "a"\n',
         ":1: rule: expected [[rule]] tables (an array of tables), not a single [rule] table"),
        ('[[rule]]\nname = "r"\nmatch = "a"\naction = "protect"\n',
         ':3: rule "r": match: expected match keys (match.exe = ..., match.comm = ...), '
         "got a string ('a')"),
        # unknown action, base, victim kind
        ('[[rule]]\nname = "r"\nmatch.comm = "a"\naction = "protekt"\n',
         ":4: rule \"r\": action: unknown action 'protekt' (expected protect, prefer, avoid, "
         "points, victim-first, victim-last); did you mean protect?"),
        ('[policy]\nbase = "biggest"\n',
         ':2: policy.base: unknown base \'biggest\' (expected "kernel" or "largest")'),
        ('\n[policy]\nvictim = "group"\n',
         ":3: policy.victim: unknown victim kind 'group' (expected process, tree or cgroup)"),
        # numbers on the wrong action, or missing
        (RULE + "add = 5\n", ':5: rule "r": add: only for action = "prefer" or "avoid" '
                             "(this rule's action is protect)"),
        ('[[rule]]\nname = "r"\nmatch.comm = "a"\naction = "victim-first"\nmultiply = 2\n',
         ':5: rule "r": multiply: only for action = "prefer" or "avoid" '
         "(this rule's action is victim-first)"),
        (RULE + "points = 5\n", ':5: rule "r": points: only for action = "points" '
                                "(this rule's action is protect)"),
        ('[[rule]]\nname = "r"\nmatch.comm = "a"\naction = "prefer"\n',
         ':4: rule "r": action: prefer needs add, multiply or both'),
        ('[[rule]]\nname = "r"\nmatch.comm = "a"\naction = "points"\n',
         ':4: rule "r": action: points needs points = N'),
        ('[[rule]]\nname = "r"\nmatch.comm = "a"\naction = "prefer"\nmultiply = 0.5\n',
         ':5: rule "r": multiply: prefer multiplies by more than 1, not 0.5'),
        ('[[rule]]\nname = "r"\nmatch.comm = "a"\naction = "avoid"\nmultiply = 2\n',
         ':5: rule "r": multiply: avoid multiplies by more than 0 and less than 1, not 2'),
        ('[[rule]]\nname = "r"\nmatch.comm = "a"\naction = "avoid"\nmultiply = nan\n',
         ':5: rule "r": multiply: nan is not a finite number'),
        ('[[rule]]\nname = "r"\nmatch.comm = "a"\naction = "avoid"\nadd = -5\n',
         ':5: rule "r": add: -5 pages: expected a positive number of pages (prefer adds it, '
         "avoid subtracts it)"),
        # a rule that cannot work
        ('\n\n[[rule]]\nname = "r"\naction = "protect"\n',
         ':3: rule "r": no match keys: a rule needs at least one of match.comm, match.exe, '
         "match.cmdline, match.cgroup, match.uid, match.user"),
        ('[[rule]]\nname = "r"\nmatch.comm = "a"\n',
         ':1: rule "r": action: missing (one of protect, prefer, avoid, points, '
         "victim-first, victim-last)"),
        ('[[rule]]\nname = "r"\nmatch.comm = ""\naction = "protect"\n',
         ':3: rule "r": match.comm: empty regex (it would match anything)'),
        ('[[rule]]\nname = "r"\nmatch.cgroup = "system.slice/*"\naction = "protect"\n',
         ":3: rule \"r\": match.cgroup: 'system.slice/*' can never match: cgroup paths start "
         'at the hierarchy root, like "/system.slice/*"'),
        ('[[rule]]\nname = "r"\nmatch.uid = 5\nmatch.user = "root"\naction = "protect"\n',
         ':4: rule "r": match.user: not among the uids of match.uid: the rule could never '
         "match"),
        ('[[rule]]\nname = "r"\nmatch.user = "1000"\naction = "protect"\n',
         ":3: rule \"r\": match.user: unknown user '1000' (a number goes in match.uid)"),
        (RULE + "\n" + RULE, ':7: rule "r": name: already used by the rule at line 1'),
        # bad regexes in each layout
        ('[[rule]]\nname = "x"\naction = "protect"\n[rule.match]\nuid = 0\ncmdline = "a)"\n',
         ':6: rule "x": match.cmdline: bad regex: unbalanced parenthesis at position 1'),
        ('[[rule]]\nname = "x"\naction = "protect"\nmatch = {uid = 0,\n'
         '  exe = "*"}\n',  # an inline table may not span lines: invalid TOML
         ":4: match: invalid TOML: invalid initial character for a key part"),
        ('[[rule]]\nname = "x"\naction = "protect"\nmatch = {uid = 0, exe = "*"}\n',
         ':4: rule "x": match.exe: bad regex: nothing to repeat at position 0'),
        # invalid TOML
        ('[[rule]]\nname = "r"\nname = "s"\n', ":3: name: invalid TOML: cannot overwrite a value"),
        ('[policy]\nbase = "kernel\n', ":2: base: invalid TOML: illegal character '\\n'"),
        ('[policy]\n[policy]\n', ":2: policy: invalid TOML: cannot declare ('policy',) twice"),
    ],
)
def test_error_names_file_line_and_key(tmp_path: Path, text: str, expected: str) -> None:
    assert error(tmp_path, text) == expected


def test_a_name_with_a_newline_keeps_the_error_on_one_line(tmp_path: Path) -> None:
    msg = error(tmp_path, '[[rule]]\nname = """multi\nline"""\naction = "protect"\n'
                          'match.comm = "("\n')
    assert msg == (':5: rule "multi\\nline": match.comm: bad regex: missing ), '
                   "unterminated subpattern at position 0")


def test_missing_unreadable_and_non_utf8_files(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(PolicyError, match=f"^rules file {re.escape(str(missing))} does not "
                                          "exist$"):
        load_rules(str(missing))
    with pytest.raises(PolicyError, match="is a directory"):
        load_rules(str(tmp_path))
    bad = tmp_path / "latin1.toml"
    bad.write_bytes(b"# ok\n# caf\xe9\n")
    with pytest.raises(PolicyError, match=r"latin1\.toml:2: not UTF-8 text"):
        load_rules(str(bad))


def test_unreadable_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "secret.toml"
    path.write_text(RULE)

    def refuse(*_a: object, **_k: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("oomwarden.policy.rules.os.open", refuse)
    with pytest.raises(PolicyError, match=r"secret\.toml cannot be read: Permission denied$"):
        load_rules(str(path))


def test_fifo_device_and_huge_files_are_refused_without_hanging(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.toml"
    os.mkfifo(fifo)
    with pytest.raises(PolicyError, match="not a regular file"):
        load_rules(str(fifo))
    link = tmp_path / "zero.toml"
    link.symlink_to("/dev/zero")
    with pytest.raises(PolicyError, match="not a regular file"):
        load_rules(str(link))
    big = tmp_path / "big.toml"
    big.write_bytes(b"#" * (2 << 20))
    with pytest.raises(PolicyError, match="more than"):
        load_rules(str(big))


@pytest.mark.parametrize("regex", ["x{99999999999}", "(" * 2000 + ")" * 2000])
def test_pathological_regexes_are_one_line_errors(tmp_path: Path, regex: str) -> None:
    path = tmp_path / "r.toml"
    path.write_text(f"[[rule]]\nmatch.comm = '{regex}'\naction = \"protect\"\n")
    with pytest.raises(PolicyError, match="bad regex"):
        load_rules(str(path))


def test_factor_out_of_range(tmp_path: Path) -> None:
    path = tmp_path / "r.toml"
    path.write_text('[[rule]]\nmatch.comm = "x"\naction = "prefer"\nmultiply = 1e308\n')
    with pytest.raises(PolicyError, match="outside"):
        load_rules(str(path))


def test_empty_file_is_the_base_policy(tmp_path: Path) -> None:
    policy = rules(tmp_path, "# nothing yet\n")
    s = snap(task(100), task(101, rss_anon=61_000))
    assert victim_pid(run(policy, s)) == victim_pid(kernel_decision(s, system_domain(s)))


def test_docs_examples_compile() -> None:
    """Every ```toml block of docs/rules.md is a valid rules file."""
    blocks = re.findall(r"```toml\n(.*?)```", DOCS.read_text(), re.S)
    assert len(blocks) >= 5
    for block in blocks:
        ruleset = parse_rules(block, "docs.toml")
        assert isinstance(ruleset, RuleSet)


# ------------------------------------------------------------------- the property

COMMS = ("p", "sshd", "postgres", "job", "a) (b\n\udcff", "")
PATHS = ("/a", "/system.slice/db.service", "/batch/j1", "/build", "/", None)
EXES = ("/usr/bin/db", "/tmp/x", None)
REGEXES = ("^p", "sshd", "^postgres$", "(?i)JOB", "b\\n", "^$|x", ".")
GLOBS = ("/system.slice/*", "/batch/*", "/build", "*", "/[ab]*")
EXE_REGEXES = ("^/usr/bin/db$", "^/tmp/", "db")
KILLABLE_ADJ = st.sampled_from((-1000, -999, -500, 0, 300, 1000))


@st.composite
def tasks(draw: st.DrawFn) -> tuple[Task, ...]:
    n = draw(st.integers(1, 7))
    out = []
    for i in range(n):
        pid = 100 + i
        out.append(task(
            pid,
            comm=draw(st.sampled_from(COMMS)),
            uid=draw(st.sampled_from((0, 1000, None))),
            memcg_v1=draw(st.sampled_from(PATHS)),
            exe=draw(st.sampled_from(EXES)),
            cmdline=draw(st.sampled_from((None, (), ("x", "--daemon"), ("job",)))),
            rss_anon=draw(st.integers(0, 3_000_000)),
            swap=draw(st.sampled_from((0, 5_000, None))),
            oom_score_adj=draw(KILLABLE_ADJ),
            start_ticks=draw(st.integers(0, 3)),
            kthread=draw(st.booleans()) and draw(st.booleans()),
        ))
    return tuple(out)


@st.composite
def rule_texts(draw: st.DrawFn) -> tuple[str, list[dict[str, Any]]]:
    """A rules file from valid pieces, in random layouts, and what it says."""
    n = draw(st.integers(0, 6))
    out = [f'[policy]\nbase = "{draw(st.sampled_from(("kernel", "largest")))}"\n']
    specs: list[dict[str, Any]] = []
    for i in range(n):
        match: dict[str, str] = {}
        keys = draw(st.sets(st.sampled_from(("comm", "exe", "cmdline", "cgroup", "uid",
                                             "user")), min_size=1, max_size=3))
        for key in sorted(keys):
            if key == "comm":
                match[key] = _q(draw(st.sampled_from(REGEXES)))
            elif key == "exe":
                match[key] = _q(draw(st.sampled_from(EXE_REGEXES)))
            elif key == "cmdline":
                match[key] = _q(draw(st.sampled_from(("daemon", "^job$", "x --"))))
            elif key == "cgroup":
                match[key] = _q(draw(st.sampled_from(GLOBS)))
            elif key == "uid" and "user" in keys:  # user "root": a uid list with 0
                match[key] = draw(st.sampled_from(("0", "[0, 1000]")))
            elif key == "uid":
                match[key] = draw(st.sampled_from(("0", "1000", "[0, 1000]")))
            else:
                match[key] = '"root"'
        action = draw(st.sampled_from(("protect", "prefer", "avoid", "points", "victim-first",
                                       "victim-last")))
        extra: list[str] = []
        if action == "prefer":
            extra = draw(st.sampled_from((["add = 5000"], ["multiply = 2.5"], ['add = "10%"'],
                                          ["multiply = 1.1", 'add = "64MiB"'])))
        elif action == "avoid":
            extra = draw(st.sampled_from((["add = 5000"], ["multiply = 0.25"],
                                          ["multiply = 0.5", 'add = "1%"'])))
        elif action == "points":
            extra = [f"points = {draw(st.integers(-(2**61), 2**61))}"]
        layout = draw(st.sampled_from(("dotted", "table", "inline")))
        lines = ["[[rule]]", f'name = "r{i}"', f'action = "{action}"', *extra]
        if layout == "dotted":
            lines += [f"match.{k} = {v}" for k, v in match.items()]
        elif layout == "inline":
            lines.append("match = { " + ", ".join(f"{k} = {v}" for k, v in match.items()) + " }")
        else:
            lines += ["[rule.match]", *(f"{k} = {v}" for k, v in match.items())]
        out.append("\n".join(lines) + "\n")
        specs.append({"action": action, "match": match})
    return "\n".join(out), specs


def _q(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _protected(t: Task, specs: list[dict[str, Any]]) -> bool:
    """An independent reading of the rules: is the first deciding rule that
    matches ``t`` a protection? (Unknown values never match.)"""
    for spec in specs:
        if spec["action"] in ("prefer", "avoid"):
            continue
        ok = True
        for key, raw in spec["match"].items():
            value = raw.strip('"').replace("\\\\", "\\")
            if key == "comm":
                ok = re.search(value, t.comm) is not None
            elif key == "exe":
                ok = t.exe is not None and re.search(value, t.exe) is not None
            elif key == "cmdline":
                ok = t.cmdline is not None and re.search(value, " ".join(t.cmdline)) is not None
            elif key == "cgroup":
                ok = t.memcg_v1 is not None and fnmatch.fnmatchcase(t.memcg_v1, value)
            elif key == "uid":
                uids = json.loads(raw)
                ok = t.uid in (uids if isinstance(uids, list) else [uids])
            else:
                ok = t.uid == 0
            if not ok:
                break
        if ok:
            return bool(spec["action"] == "protect")
    return False


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rule_texts(), tasks())
def test_random_rules_never_crash_are_deterministic_and_respect_protection(
    generated: tuple[str, list[dict[str, Any]]], ts: tuple[Task, ...]
) -> None:
    text, specs = generated
    ruleset = parse_rules(text, "random.toml")
    assert len(ruleset.rules) == len(specs)
    s = snap(*ts)
    d1 = run(ruleset.policy(), s)
    d2 = run(parse_rules(text, "random.toml").policy(), s)
    assert d1.candidates == d2.candidates and d1.victim == d2.victim
    for c in d1.candidates:
        if c.verdict != "unkillable":  # ignored exactly when a rule protects it
            assert (c.verdict == "ignore") == _protected(c.task, specs), (c, text)
    if d1.victim is not None:
        assert not _protected(d1.victim.task, specs)
        assert d1.victim.verdict in ("select", "default")
        assert d1.victim.task.oom_score_adj != -1000 and not d1.victim.task.kthread
