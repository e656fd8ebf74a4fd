"""The kernel's own OOM choice under cgroup v2, reproduced (in the VM lane's guest).

v2 has no ``oom_kill_disable``: the kernel's killer cannot be paused at the
limit for a snapshot, as the v1 test does. Two ways round it:

* lowering ``memory.max`` below what a cgroup's waiting processes hold: the
  kernel reclaims, then runs its memcg OOM killer (``memory_max_write``) over
  processes that do not change, with ``totalpages`` from the *new* limit, so
  a snapshot taken before the write predicts its victim exactly;
* a process running into ``memory.max`` in a cgroup with ``memory.oom.group``:
  the kernel kills the whole group, whichever member it picks, and the
  warden's decision names that group.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import time

import pytest

from oomwarden.decision import Domain
from oomwarden.domains import resolve_cgroup
from oomwarden.errors import TaskGone
from oomwarden.model import Task
from oomwarden.policy.api import KillCgroup
from oomwarden.policy.decide import decide
from oomwarden.policy.engine import cgroup_domain, kernel_decision
from oomwarden.policy.kernel import badness_points, memcg_totalpages, oom_score
from oomwarden.policy.registry import load_policy
from oomwarden.sources.procfs import ReadOptions, initial_pidns, read_task
from oomwarden.sources.snapshot import SourceConfig, build_snapshot

from v2env import KernelLog, MiB, V2Factory, alive, events, page_size, wait_until

pytestmark = pytest.mark.kernel


def test_memcg_oom_kills_the_predicted_victim(v2_factory: V2Factory) -> None:
    """The bigger process wins by a few MiB with the lowered memory.max as
    totalpages; its negative oom_score_adj would make it lose with the
    cgroup's old limit. The kernel must kill it, and only it."""
    psize = page_size()
    cg = v2_factory.create(256 * MiB)
    big = cg.start_hog(80)
    small = cg.start_hog(40)
    snap = build_snapshot(SourceConfig())
    c = resolve_cgroup(snap, f"v2:{cg.hierarchy_path}")
    # Anonymous memory cannot be reclaimed (no swap): a limit 16 MiB under it
    # forces one kill, and either process's death is enough to fit again.
    new_max = (c.stat["anon"] - 16 * MiB) // psize * psize
    new_total = memcg_totalpages(dataclasses.replace(c, limit=new_max), snap.system)
    old_total = memcg_totalpages(c, snap.system)
    assert new_total == new_max // psize and old_total == 256 * MiB // psize
    t_big, t_small = snap.task(big.pid), snap.task(small.pid)
    assert t_big is not None and t_small is not None
    big_pts, small_pts = badness_points(t_big, new_total), badness_points(t_small, new_total)
    assert big_pts is not None and small_pts is not None
    # oom_score_adj so that big stays ahead by about 4 MiB under the new total.
    adj = -((big_pts - small_pts - 1024) // (new_total // 1000))
    assert -1000 < adj < 0
    assert big_pts + adj * (new_total // 1000) > small_pts
    assert big_pts + adj * (old_total // 1000) < small_pts, "the totals would not be told apart"
    with open(f"/proc/{big.pid}/oom_score_adj", "w") as f:
        f.write(str(adj))
    snap = build_snapshot(SourceConfig())
    c = resolve_cgroup(snap, f"v2:{cg.hierarchy_path}")
    domain = Domain(kind="cgroup", totalpages=new_total, cgroup=c)
    decision = kernel_decision(snap, domain)
    assert decision.victim is not None
    assert {x.task.pid for x in decision.selectable} == {big.pid, small.pid}
    predicted = decision.victim.task.pid
    assert predicted == big.pid, decision.to_json()
    before = events(cg)
    log = KernelLog()
    try:
        cg.write("memory.max", str(new_max))  # returns once usage fits under it
        wait_until("the kernel killed", lambda: bool(log.killed()))
        wait_until("its victim exited", lambda: not alive(log.killed()[0]))
        time.sleep(0.3)
        kills = log.killed()
    finally:
        log.close()
    # The kernel's own choice is its first kill.
    assert kills[0] == predicted, (kills, decision.to_json())
    assert big.proc.wait(timeout=10) == -signal.SIGKILL
    # On this kernel (6.1) a second process usually dies too: the victim's
    # pages are still charged when it stops counting as an OOM victim in
    # progress (MMF_OOM_SKIP, as we read the code), and memory_max_write's
    # loop, out of reclaim retries, calls the OOM killer again at once.
    assert kills in ([big.pid], [big.pid, small.pid]), kills
    after = events(cg)
    assert after["oom_kill"] - before["oom_kill"] == len(kills)
    assert after["oom"] > before["oom"]
    assert int(cg.read("memory.current")) <= new_max


def test_oom_group_kernel_kills_the_group_the_warden_names(v2_factory: V2Factory) -> None:
    """memory.oom.group: the kernel kills every member at once when one runs
    into memory.max; the warden's decision is a KillCgroup of that cgroup."""
    cg = v2_factory.create(128 * MiB, oom_group=True)
    inner = v2_factory.create(inside=cg)
    hogs = [cg.start_hog(24), inner.start_hog(24)]
    snap = build_snapshot(SourceConfig())
    c = resolve_cgroup(snap, f"v2:{cg.hierarchy_path}")
    decision = decide(snap, cgroup_domain(snap, c), load_policy("kernel"))
    assert decision.victim is not None and decision.victim_kind == "cgroup"
    assert decision.actions == (KillCgroup("v2", c.path, c.inode, decision.actions[0].reason),)
    before = events(cg)
    assert before["oom_group_kill"] == 0
    log = KernelLog()
    try:
        grower = cg.start_grower(160)  # more than fits: it runs into memory.max
        members = [*hogs, grower]
        wait_until("the group died", lambda: all(h.proc.poll() is not None for h in members))
        kills = log.killed()
        group_lines = [line for line in log.lines() if "memory.oom.group" in line]
    finally:
        log.close()
    assert all(h.proc.returncode == -signal.SIGKILL for h in members)
    assert group_lines, "the kernel did not say it killed the group"
    # Every member, in one group kill (the count may run past the members:
    # the same race as above may pick a member once more before it exits).
    assert set(kills) == {h.pid for h in members}, kills
    after = events(cg)
    assert after["oom_group_kill"] - before["oom_group_kill"] >= 1
    assert after["oom_kill"] - before["oom_kill"] == len(kills)
    wait_until("the cgroup emptied", lambda: "populated 0" in cg.read("cgroup.events"))


def test_every_guest_process_matches_proc_oom_score(v2_factory: V2Factory) -> None:
    """The system domain on the guest's kernel (6.1): ``/proc/PID/oom_score``
    of every process equals the warden's, hogs spread over oom_score_adj."""
    for size, adj in ((60, 0), (30, 700), (10, -500)):
        v2_factory.create(256 * MiB).start_hog(size, adj)
    snap = build_snapshot(SourceConfig(read=ReadOptions(oom_score=True)))
    total = snap.system.totalpages
    assert len(snap.tasks) >= 5
    assert (snap.skipped_unreadable, snap.skipped_unparsable) == (0, 0)
    proc_fd = os.open("/proc", os.O_RDONLY | os.O_DIRECTORY)
    try:
        pidns = initial_pidns(proc_fd)
        for task in snap.tasks:
            assert _agrees(task, total, proc_fd, pidns), f"oom_score differs: {task}"
    finally:
        os.close(proc_fd)
    assert any(alive(h.pid) for c in v2_factory.children for h in c.hogs)


def _agrees(task: Task, total: int, proc_fd: int, pidns: bool) -> bool:
    """Ours equals the kernel's oom_score, at once or on one of 20 re-reads
    (a process may change between two of its files: this test's own pytest);
    True too when the process has exited meanwhile."""
    t = task
    for _ in range(20):
        assert t.kernel_oom_score is not None
        if oom_score(badness_points(t, total), total) == t.kernel_oom_score:
            return True
        time.sleep(0.01)
        try:
            t = read_task(proc_fd, str(task.pid), page_size(), ReadOptions(oom_score=True),
                          initial_pidns=pidns)
        except TaskGone:
            return True
        if t.start_ticks != task.start_ticks:
            return True
    return False
