"""The executor's cgroup kill on a real cgroup v2 memory cgroup (in the VM lane's guest)."""

from __future__ import annotations

import signal

import pytest

from oomwarden.actions.executor import Executor
from oomwarden.domains import resolve_cgroup
from oomwarden.policy.api import KillCgroup
from oomwarden.policy.decide import decide
from oomwarden.policy.engine import cgroup_domain
from oomwarden.policy.registry import load_policy
from oomwarden.sources.snapshot import SourceConfig, build_snapshot

from v2env import MiB, V2Factory, events, wait_until

pytestmark = pytest.mark.kernel


def test_warden_kills_an_oom_group_through_cgroup_kill(v2_factory: V2Factory) -> None:
    """Decide (kernel policy, memory.oom.group set) -> KillCgroup -> the
    executor writes cgroup.kill: every member dies, nested ones too, and the
    kernel's killer had no part in it."""
    cg = v2_factory.create(128 * MiB, oom_group=True)
    inner = v2_factory.create(inside=cg)
    sleepers = [v2_factory.start_sleeper(cg), v2_factory.start_sleeper(cg),
                v2_factory.start_sleeper(inner)]
    snap = build_snapshot(SourceConfig())
    c = resolve_cgroup(snap, f"v2:{cg.hierarchy_path}")
    decision = decide(snap, cgroup_domain(snap, c), load_policy("kernel"))
    [action] = decision.actions
    assert isinstance(action, KillCgroup) and action.spare_pids == ()
    dry = Executor(dry_run=True).execute(action)
    assert dry.ok and "dry run" in dry.detail and all(s.poll() is None for s in sleepers)
    result = Executor().execute(action)
    assert result.ok and "cgroup.kill" in result.detail, result
    assert set(result.killed) == {s.pid for s in sleepers}
    for s in sleepers:
        assert s.wait(timeout=10) == -signal.SIGKILL
    wait_until("the cgroup emptied", lambda: "populated 0" in cg.read("cgroup.events"))
    assert events(cg)["oom_kill"] == 0


def test_a_member_the_kernel_spares_is_spared_one_by_one(v2_factory: V2Factory) -> None:
    """An oom_score_adj -1000 member (the kernel's oom.group kill skips it
    too) turns cgroup.kill into kills one by one through pidfds."""
    cg = v2_factory.create(128 * MiB, oom_group=True)
    doomed = [v2_factory.start_sleeper(cg), v2_factory.start_sleeper(cg)]
    exempt = v2_factory.start_sleeper(cg, adj=-1000)
    snap = build_snapshot(SourceConfig())
    c = resolve_cgroup(snap, f"v2:{cg.hierarchy_path}")
    decision = decide(snap, cgroup_domain(snap, c), load_policy("kernel"))
    [action] = decision.actions
    assert isinstance(action, KillCgroup) and action.spare_pids == (exempt.pid,)
    result = Executor().execute(action)
    assert result.ok and "one by one" in result.detail, result
    for s in doomed:
        assert s.wait(timeout=10) == -signal.SIGKILL
    assert exempt.poll() is None
    assert cg.pids() == [exempt.pid]


def test_a_recreated_cgroup_is_not_killed(v2_factory: V2Factory) -> None:
    """A KillCgroup names the cgroup by inode: the same path made again is
    another cgroup, and is refused."""
    cg = v2_factory.create(64 * MiB)
    sleeper = v2_factory.start_sleeper(cg)
    stale = KillCgroup("v2", cg.hierarchy_path, cg.path.stat().st_ino + 1, "test")
    result = Executor().execute(stale)
    assert not result.ok and "another cgroup" in result.detail, result
    assert sleeper.poll() is None
