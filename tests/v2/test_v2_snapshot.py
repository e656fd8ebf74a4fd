"""The snapshot on a real cgroup v2 memory hierarchy (in the VM lane's guest)."""

from __future__ import annotations

import json

import pytest

from oomwarden.cli import main
from oomwarden.domains import resolve_cgroup
from oomwarden.model import HierarchyKind
from oomwarden.policy.engine import cgroup_domain, kernel_decision
from oomwarden.sources.snapshot import SourceConfig, build_snapshot

from v2env import MiB, V2Factory, events, page_size

pytestmark = pytest.mark.kernel


def test_snapshot_reads_a_v2_memory_cgroup(v2_factory: V2Factory,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    cg = v2_factory.create(64 * MiB, oom_group=True)
    hog = cg.start_hog(16)
    snap = build_snapshot(SourceConfig())
    current = int(cg.read("memory.current"))
    hierarchy = next(h for h in snap.hierarchies if h.kind is HierarchyKind.V2)
    assert hierarchy.verified and hierarchy.has_memory
    assert not any(h.kind is HierarchyKind.V1 for h in snap.hierarchies)  # cgroup_no_v1=all
    assert snap.cgroup(HierarchyKind.V2, "/") is not None
    c = resolve_cgroup(snap, f"v2:{cg.hierarchy_path}")
    assert c.path == cg.hierarchy_path and c.inode == cg.path.stat().st_ino
    assert c.memory_controller and c.verified
    assert c.limit == 64 * MiB
    assert c.oom_group is True
    assert c.has_kill and c.has_freeze
    assert c.pids == (hog.pid,)
    # memory.current: the hog's 16 MiB, and no more than the limit; the hog
    # waits, so a second read is close to the snapshot's.
    assert c.usage is not None and 16 * MiB <= c.usage <= 64 * MiB
    assert abs(c.usage - current) < 4 * MiB
    assert c.stat["anon"] >= 16 * MiB
    # memory.events: every counter the kernel has, and nothing went wrong yet.
    assert {"low", "high", "max", "oom", "oom_kill"} <= set(c.events)
    assert c.events["oom_kill"] == 0 and c.events == events(cg)
    # Per-cgroup PSI (psi=1 on the guest's command line).
    assert c.pressure is not None and c.pressure.full is not None
    # Unset limits read as unlimited, not as unknown.
    assert c.high is not None and c.high > 2**50
    task = snap.task(hog.pid)
    assert task is not None and task.cgroup_v2 == cg.hierarchy_path and task.memcg_v1 is None
    domain = cgroup_domain(snap, c)
    assert domain.totalpages == 64 * MiB // page_size()  # no swap in the guest
    decision = kernel_decision(snap, domain)
    assert decision.victim is not None and decision.victim.task.pid == hog.pid
    assert [x.task.pid for x in decision.selectable] == [hog.pid]
    # The CLI reads the same.
    assert main(["explain", "--cgroup", f"v2:{cg.hierarchy_path}", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["domain"] == f"cgroup:{cg.hierarchy_path}"
    assert out["totalpages"] == domain.totalpages
    assert out["victim"]["pid"] == hog.pid
