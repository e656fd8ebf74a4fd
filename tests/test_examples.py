"""Every policy in examples/policies/ loads and does what its header says."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from oomwarden.cli import main
from oomwarden.decision import Decision
from oomwarden.model import (
    Cgroup,
    Hierarchy,
    HierarchyKind,
    Pressure,
    PsiLine,
    Snapshot,
    SystemMemory,
    Task,
    page_counter_max_bytes,
)
from oomwarden.policy import DeleteFiles, KillCgroup, KillProcess, Policy, load_policy
from oomwarden.policy.decide import decide
from oomwarden.policy.engine import system_domain
from oomwarden.policy.history import History

EXAMPLES = Path(__file__).parent.parent / "examples" / "policies"
PAGE = 4096
V2 = HierarchyKind.V2


def load(name: str, tmp_path: Path) -> Policy:
    """Load a copy: as root, a .py policy must be root's and not group- or
    world-writable, whoever owns the checkout."""
    copy = tmp_path / name
    shutil.copy(EXAMPLES / name, copy)
    copy.chmod(0o644)
    return load_policy(str(copy))


def task(pid: int, cgroup: str = "/app", **kw: Any) -> Task:
    base: dict[str, Any] = {
        "pid": pid, "tgid": pid, "ppid": 1, "comm": f"p{pid}", "state": "S",
        "start_ticks": 100 + pid, "uid": 1000, "kthread": False, "has_mm": True,
        "rss_anon": 10_000, "rss_file": 0, "rss_shmem": 0, "swap": 0, "pgtables": 10,
        "oom_score_adj": 0, "cgroup_v2": cgroup, "exe": f"/usr/bin/p{pid}",
        "cmdline": (f"p{pid}",),
    }
    base.update(kw)
    return Task(**base)


def snap(*tasks: Task, pressure: dict[str, float] | None = None, taken_ns: int = 10**10
         ) -> Snapshot:
    paths = {"/", *(t.cgroup_v2 for t in tasks if t.cgroup_v2)}
    cgroups = tuple(
        Cgroup(V2, p, "/sys/fs/cgroup" + p, 1000 + i, True, True,
               limit=page_counter_max_bytes(PAGE),
               pressure=None if pressure is None or p not in pressure else Pressure(
                   PsiLine(pressure[p], pressure[p], pressure[p], 1),
                   PsiLine(pressure[p], pressure[p], pressure[p], 1)))
        for i, p in enumerate(sorted(paths))
    )
    memory = SystemMemory(1_000_000 * PAGE, 500_000 * PAGE, 0, 0, None, PAGE, 60)
    hierarchies = (Hierarchy(V2, "/sys/fs/cgroup", "/", ("memory",), True),)
    return Snapshot(taken_ns, memory, tasks, hierarchies, cgroups)


def run(policy: Policy, s: Snapshot, **kw: Any) -> Decision:
    d = decide(s, system_domain(s), policy, budget_s=5, **kw)
    assert d.fallback is None, d.fallback
    return d


def test_every_example_is_tested() -> None:
    tested = {"protect-db-kill-grower.py", "batch-before-interactive.toml",
              "tmpfs-cache-first.py", "kill-whole-build.py", "earlyoom-prefer-avoid.toml",
              "psi-per-cgroup.py"}
    assert {p.name for p in EXAMPLES.iterdir()} == tested


def test_protect_db_kill_grower(tmp_path: Path) -> None:
    policy = load("protect-db-kill-grower.py", tmp_path)
    assert policy.victim == "tree" and policy.needs_history and policy.needs_details
    db = dict(pid=10, exe="/usr/lib/postgresql/16/bin/postgres (deleted)", start_ticks=1)
    job = dict(pid=20, exe="/usr/bin/python3", start_ticks=2)
    then = snap(task(rss_anon=300_000, **db), task(rss_anon=20_000, **job), taken_ns=0)
    now = snap(task(rss_anon=400_000, **db), task(rss_anon=60_000, **job), taken_ns=2 * 10**9)
    d = run(policy, now, history=History(then))
    # The database grew more, but is protected; the job is the fastest other grower.
    assert d.victim is not None and d.victim.task.pid == 20
    assert d.actions == (KillProcess(20, 2, "the chosen victim, with its tree", tree=True),)
    assert {c.task.pid: c.verdict for c in d.candidates}[10] == "ignore"


def test_batch_before_interactive(tmp_path: Path) -> None:
    policy = load("batch-before-interactive.toml", tmp_path)
    s = snap(task(10, "/batch.slice/report", rss_anon=5_000),
             task(11, "/user.slice/user-1000.slice/session-2.scope", rss_anon=15_000),
             task(12, "/system.slice/db.service", rss_anon=900_000),
             task(13, "/app", rss_anon=12_000))
    d = run(policy, s)
    assert [c.task.pid for c in d.selectable] == [10, 13, 11, 12]


def test_tmpfs_cache_first(tmp_path: Path) -> None:
    policy = load("tmpfs-cache-first.py", tmp_path)
    assert policy.handle is not None
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "a.bin").write_bytes(b"x")
    (cache / "b.bin").write_bytes(b"y")
    (cache / "link").symlink_to(cache / "a.bin")
    policy.handle.__globals__["CACHE"] = str(cache)  # type: ignore[attr-defined]
    s = snap(task(10), task(11, rss_anon=90_000))
    d = run(policy, s)
    assert d.victim is None and len(d.actions) == 1
    action = d.actions[0]
    assert isinstance(action, DeleteFiles)
    assert sorted(action.paths) == [str(cache / "a.bin"), str(cache / "b.bin")]
    for f in cache.iterdir():
        f.unlink()
    d = run(policy, s)  # nothing to delete: the per-task selection
    assert d.victim is not None and d.victim.task.pid == 11


def test_kill_whole_build(tmp_path: Path) -> None:
    policy = load("kill-whole-build.py", tmp_path)
    s = snap(task(10, "/build.slice/run-42.scope", comm="cc1plus", rss_anon=3_000),
             task(11, "/build.slice/run-42.scope", comm="make", rss_anon=500),
             task(14, "/build.slice/run-7.scope/sub", comm="ld", rss_anon=9_000),
             task(12, "/app", rss_anon=400_000),
             task(13, "/system.slice/ci-agent.service", rss_anon=800_000))
    s = Snapshot(s.taken_ns, s.system, s.tasks, s.hierarchies, (
        *s.cgroups,
        Cgroup(V2, "/build.slice/run-7.scope", "/sys/fs/cgroup/build.slice/run-7.scope", 77,
               True, True, limit=page_counter_max_bytes(PAGE))))
    d = run(policy, s)
    # the build using the most memory, whole (run-7: 9,010 pages with its subgroup)
    assert d.victim is None and len(d.actions) == 1 and isinstance(d.actions[0], KillCgroup)
    assert d.actions[0].path == "/build.slice/run-7.scope" and d.actions[0].inode == 77
    # no build: the kernel's own choice, one process, never the CI agent
    s2 = snap(task(12, "/app", rss_anon=400_000),
              task(13, "/system.slice/ci-agent.service", rss_anon=800_000))
    d = run(policy, s2)
    assert d.victim is not None and d.victim.task.pid == 12
    assert d.actions == (KillProcess(12, 112, "the chosen victim"),)


def test_earlyoom_prefer_avoid(tmp_path: Path) -> None:
    policy = load("earlyoom-prefer-avoid.toml", tmp_path)
    s = snap(task(10, comm="Web Content", rss_anon=20_000),
             task(11, comm="sshd", exe="/usr/sbin/sshd", rss_anon=150_000),
             task(12, comm="sshd", exe="/tmp/x", rss_anon=90_000),  # a name, not sshd
             task(13, comm="worker", rss_anon=100_000))
    d = run(policy, s)
    order = [c.task.pid for c in d.selectable]
    # the browser (+10% of the domain) first; the real sshd (-10%) last; the
    # impostor named sshd is not avoided.
    assert order == [10, 13, 12, 11]


def test_psi_per_cgroup(tmp_path: Path) -> None:
    policy = load("psi-per-cgroup.py", tmp_path)
    s = snap(task(10, "/a", rss_anon=5_000), task(11, "/b", rss_anon=500_000),
             task(12, "/c", rss_anon=200_000),
             pressure={"/a": 35.0, "/b": 2.0, "/c": 12.0})
    d = run(policy, s)
    assert d.victim is not None and d.victim.task.pid == 10
    assert isinstance(d.actions[0], KillCgroup) and d.actions[0].path == "/a"
    assert [c.task.pid for c in d.selectable] == [10, 12, 11]


@pytest.mark.parametrize("name", sorted(p.name for p in EXAMPLES.iterdir()))
def test_every_example_explains_on_the_live_machine(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`oomwarden explain --policy EXAMPLE` runs on the live machine."""
    copy = tmp_path / name
    shutil.copy(EXAMPLES / name, copy)
    copy.chmod(0o644)
    assert main(["explain", "--policy", str(copy), "--json", "--window", "0.2"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["fallback"] is None and out["policy"]
