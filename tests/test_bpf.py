"""The BPF snapshot source: the record decoder on crafted bytes, parity with
procfs on the real kernel, the fallback to procfs, and no leaked fds.

Parity, and the tolerance it allows (docs/bpf.md):

* ``oom_rss`` (file + anon + shmem, the unsummed per-CPU counters) is what
  both backends read from the same kernel counters (``get_mm_rss()``: stat
  field 24 for procfs, the percpu_counters' ``count`` for BPF): for a process
  whose memory does not move between the reads it is *equal*; page tables
  and ``oom_score_adj`` too.
* the split ``rss_anon/file/shmem`` and the swap entries: procfs shows the
  exact per-CPU sums (/proc/PID/status since Linux 6.16), BPF the unsummed
  counters as ``oom_badness()`` reads them; each may differ by the kernel's
  per-CPU slack, ``nr_cpus * max(32, 2 * nr_cpus)`` pages
  (``percpu_counter_batch`` folded in by each CPU at most once).

"Does not move" is decided by two procfs snapshots taken around the BPF one:
a process whose points differ between them is moving, and is left out of the
comparison (it is counted, and most of the tasks must be stable).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from oomwarden.errors import BpfError
from oomwarden.model import Cgroup, Hierarchy, HierarchyKind, Task
from oomwarden.policy.engine import kernel_decision, system_domain
from oomwarden.policy.kernel import badness_points
from oomwarden.sandbox import MemcgFactory
from oomwarden.sources import bpf
from oomwarden.sources.procfs import ReadOptions
from oomwarden.sources.snapshot import (
    SourceConfig,
    build_snapshot,
    choose_source,
    with_members,
)
from test_control_live import LiveWarden

from conftest import need

REPO = Path(__file__).resolve().parent.parent
NR_CPUS = os.cpu_count() or 1
#: The kernel's per-CPU slack of one percpu_counter, in pages.
SLACK = NR_CPUS * max(32, 2 * NR_CPUS)


def _record(**kw: object) -> bytes:
    fields: dict[str, object] = {
        "magic": bpf.MAGIC, "pid": 42, "tgid": 42, "ppid": 1, "start": 123_450_000_000,
        "memcg": 7, "dfl": 1, "file": 10, "anon": 20, "shmem": 3, "swap": 0,
        "pte": 8192, "uid": 1000, "state": 1, "exit_state": 0, "flags": 0, "adj": 0,
        "rflags": bpf.LEADER | bpf.HAS_MM | bpf.HAS_SIGNAL, "comm": b"worker", "pad": 0,
    }
    fields.update(kw)
    return bpf.RECORD.pack(*fields.values())


# -- the decoder, on crafted bytes ---------------------------------------------


def test_decode_one_record_into_a_task() -> None:
    recs = bpf.decode_records(_record())
    assert len(recs) == 1
    (task,) = bpf.records_to_tasks(recs, psize=4096, clk_tck=100)
    assert (task.pid, task.tgid, task.ppid, task.comm, task.state) == (42, 42, 1, "worker", "S")
    assert task.start_ticks == 12345  # ns // (1e9 / USER_HZ), /proc/PID/stat field 22
    assert (task.rss_file, task.rss_anon, task.rss_shmem, task.oom_rss) == (10, 20, 3, 33)
    assert (task.pgtables, task.oom_score_adj, task.uid) == (2, 0, 1000)
    assert task.has_mm and not task.kthread and not task.global_init and not task.in_vfork


def test_decode_clamps_negative_counters_like_get_mm_counter() -> None:
    (task,) = bpf.records_to_tasks(bpf.decode_records(_record(anon=-5, file=-1)),
                                   psize=4096, clk_tck=100)
    assert (task.rss_anon, task.rss_file, task.oom_rss) == (0, 0, 3)


def test_decode_kthread_zombie_vfork_and_stand_in() -> None:
    data = (
        _record(pid=2, tgid=2, comm=b"kthreadd", flags=bpf.PF_KTHREAD,
                rflags=bpf.LEADER | bpf.HAS_SIGNAL)
        # a zombie leader whose thread 51 still holds the mm
        + _record(pid=50, tgid=50, state=0, exit_state=0x20, rflags=bpf.LEADER | bpf.HAS_SIGNAL)
        + _record(pid=51, tgid=50, anon=99, rflags=bpf.HAS_MM | bpf.HAS_SIGNAL)
        + _record(pid=60, tgid=60, rflags=bpf.LEADER | bpf.HAS_MM | bpf.IN_VFORK | bpf.HAS_SIGNAL)
        + _record(pid=70, tgid=70, state=0x402)
    )
    k, z, v, idle = bpf.records_to_tasks(bpf.decode_records(data), psize=4096, clk_tck=100)
    assert k.kthread and not k.has_mm and k.rss is None
    assert z.state == "Z" and z.has_mm and z.rss_anon == 99
    assert v.in_vfork
    assert idle.state == "I"


@pytest.mark.parametrize(("data", "words"), [
    (_record()[:-1], "not a multiple"),
    (_record(magic=0xDEAD), "bad magic"),
    (_record(pid=-3), "out of range"),
    (_record(pid=5, tgid=6), "leader with pid 5"),
    (_record(adj=2000), "oom_score_adj 2000"),
    (_record(pte=-1), "negative page-table"),
])
def test_decode_refuses_bad_records(data: bytes, words: str) -> None:
    with pytest.raises(BpfError, match=words):
        bpf.decode_records(data)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=4 * bpf.RECORD_SIZE + 7))
def test_garbage_raises_only_bpf_error(data: bytes) -> None:
    try:
        recs = bpf.decode_records(data)
    except BpfError:
        return
    bpf.records_to_tasks(recs, psize=4096, clk_tck=100, proc_root="/nonexistent")


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(min_size=bpf.RECORD_SIZE - 8, max_size=bpf.RECORD_SIZE - 8),
                max_size=4))
def test_garbage_behind_a_good_magic_raises_only_bpf_error(bodies: list[bytes]) -> None:
    data = b"".join(bpf.MAGIC.to_bytes(4, "little") + b[:4] + b[4:] + b"\0" * 4 for b in bodies)
    try:
        recs = bpf.decode_records(data)
    except BpfError:
        return
    bpf.records_to_tasks(recs, psize=4096, clk_tck=100, proc_root="/nonexistent")


# -- the task cache and the subtree filter, on crafted bytes ---------------------------

_V1 = Hierarchy(HierarchyKind.V1, "/nonexistent/memory", "/", ("memory",), True)
_V2 = Hierarchy(HierarchyKind.V2, "/nonexistent/unified", "/", (), True)
#: Walked cgroups: v1 ids 7 (/a) and 8 (/a/b), v2 id 1 (/). Id 99 is unknown
#: (a cgroup made after the walk), and /nonexistent has no /proc to ask.
_WALKED = [
    Cgroup(HierarchyKind.V1, "/a", "/nonexistent/memory/a", 7, True, True),
    Cgroup(HierarchyKind.V1, "/a/b", "/nonexistent/memory/a/b", 8, True, True),
    Cgroup(HierarchyKind.V2, "/", "/nonexistent/unified", 1, True, True),
]


def _resolver() -> bpf.CgroupResolver:
    return bpf.CgroupResolver(_WALKED, (_V1, _V2), "/nonexistent")


#: A process as records: a plain leader, a kernel thread, a zombie leader
#: with a thread still holding the mm, a zombie alone, an exiting leader
#: without a signal struct.
_KINDS = st.sampled_from(["plain", "kthread", "zombie+thread", "zombie", "nosignal"])


def _process(pid: int, kind: str, memcg: int, anon: int, adj: int) -> bytes:
    if kind == "kthread":
        return _record(pid=pid, tgid=pid, memcg=memcg, flags=bpf.PF_KTHREAD,
                       rflags=bpf.LEADER | bpf.HAS_SIGNAL, adj=adj)
    if kind == "zombie+thread":
        return (_record(pid=pid, tgid=pid, memcg=memcg, state=0, exit_state=0x20, adj=adj,
                        rflags=bpf.LEADER | bpf.HAS_SIGNAL)
                + _record(pid=pid + 1, tgid=pid, memcg=memcg, anon=anon,
                          rflags=bpf.HAS_MM | bpf.HAS_SIGNAL))
    if kind == "zombie":
        return _record(pid=pid, tgid=pid, memcg=memcg, state=0, exit_state=0x20,
                       rflags=bpf.LEADER | bpf.HAS_SIGNAL, adj=adj)
    if kind == "nosignal":
        return _record(pid=pid, tgid=pid, memcg=memcg, anon=anon, rflags=bpf.LEADER | bpf.HAS_MM)
    return _record(pid=pid, tgid=pid, memcg=memcg, anon=anon, adj=adj)


_PROCESSES = st.lists(
    st.tuples(_KINDS, st.sampled_from([7, 8, 99]), st.integers(-3, 1 << 20),
              st.integers(-1000, 1000)),
    max_size=12,
)


def _data(procs: list[tuple[str, int, int, int]]) -> bytes:
    return b"".join(_process(100 + 10 * i, *p) for i, p in enumerate(procs))


def _reference(data: bytes, keep: bpf.Keep | None = None) -> list[Task]:
    tasks = bpf.records_to_tasks(bpf.decode_records(data), psize=4096, clk_tck=100,
                                 resolver=_resolver())
    return [t for t in tasks if keep is None or keep((t.memcg_v1, t.cgroup_v2))]


def _in_a(paths: tuple[str | None, str | None]) -> bool:
    return paths[0] in {"/a", "/a/b"}


def _only_b(paths: tuple[str | None, str | None]) -> bool:
    return paths[0] == "/a/b"


@settings(max_examples=300, deadline=None)
@given(_PROCESSES, _PROCESSES, st.sampled_from([None, _in_a, _only_b]))
def test_task_cache_gives_what_the_decoder_gives(
    first: list[tuple[str, int, int, int]],
    second: list[tuple[str, int, int, int]],
    keep: bpf.Keep | None,
) -> None:
    """Cold, then warm on a second pass that shares some processes and
    changes others: always exactly the reference decoding (filtered)."""
    cache = bpf.TaskCache()
    one = _data(first)
    # The second pass: the first's processes, some changed, then new ones.
    two = _data(first[: len(first) // 2] + second)
    scope = None if keep is None else keep.__name__
    for data in (one, two, two):
        got = cache.tasks(data, psize=4096, clk_tck=100, resolver=_resolver(), keep=keep,
                          scope=scope)
        assert got == _reference(data, keep)
    # The third pass repeated the second: every record that may be kept was
    # reused -- leaders with their own mm or kernel threads in a walked
    # cgroup, and (with a filter) every leader outside it.
    records = bpf.decode_records(two)
    inside = dict(zip([r.pid for r in records if r.leader],
                      [keep is None or keep((t.memcg_v1, t.cgroup_v2)) for t in
                       bpf.records_to_tasks(records, psize=4096, clk_tck=100,
                                            resolver=_resolver())], strict=True))
    reusable = sum(1 for r in records if r.leader and (
        not inside[r.pid]
        or ((r.has_mm or r.flags & bpf.PF_KTHREAD) and r.memcg_ino in (7, 8))))
    assert cache.last_hits == reusable


def test_task_cache_reuses_unchanged_tasks_and_never_a_stand_in() -> None:
    cache = bpf.TaskCache()
    data = _data([("plain", 7, 5, 0), ("kthread", 7, 0, 0), ("zombie+thread", 8, 9, 0),
                  ("plain", 99, 3, 0)])
    first = cache.tasks(data, psize=4096, clk_tck=100, resolver=_resolver())
    assert cache.last_hits == 0 and cache.last_records == 5
    second = cache.tasks(data, psize=4096, clk_tck=100, resolver=_resolver())
    # Reused: the plain leader and the kthread. Not: the zombie and its thread
    # (the leader takes the thread's counters), nor the task whose cgroup the
    # walk did not see.
    assert cache.last_hits == 2
    assert second == first
    assert second[0] is first[0] and second[1] is first[1]
    # Another page size is another cache.
    cache.tasks(data, psize=16384, clk_tck=100, resolver=_resolver())
    assert cache.last_hits == 0


def test_task_cache_outside_verdict_is_kept_and_a_changed_walk_is_checked() -> None:
    cache = bpf.TaskCache()
    data = _data([("plain", 7, 5, 0), ("plain", 8, 6, 0)])
    got = cache.tasks(data, psize=4096, clk_tck=100, resolver=_resolver(), keep=_only_b,
                      scope="b")
    assert [t.memcg_v1 for t in got] == ["/a/b"]
    got = cache.tasks(data, psize=4096, clk_tck=100, resolver=_resolver(), keep=_only_b,
                      scope="b")
    assert [t.memcg_v1 for t in got] == ["/a/b"] and cache.last_hits == 2
    # The whole system is another scope: the subtree's "outside" is not reused.
    got = cache.tasks(data, psize=4096, clk_tck=100, resolver=_resolver())
    assert [t.memcg_v1 for t in got] == ["/a", "/a/b"] and cache.last_hits == 0
    got = cache.tasks(data, psize=4096, clk_tck=100, resolver=_resolver())
    assert cache.last_hits == 2
    # A cgroup made elsewhere: the walk differs, but both tasks' ids still
    # name the same paths: both reused.
    more = [*_WALKED, Cgroup(HierarchyKind.V1, "/z", "/nonexistent/memory/z", 50, True, True)]
    got = cache.tasks(data, psize=4096, clk_tck=100,
                      resolver=bpf.CgroupResolver(more, (_V1, _V2), "/nonexistent"))
    assert cache.last_hits == 2 and [t.memcg_v1 for t in got] == ["/a", "/a/b"]
    # /a/b renamed to /a/c: that task is made again with its new path.
    renamed = [_WALKED[0], replace(_WALKED[1], path="/a/c"), _WALKED[2]]
    got = cache.tasks(data, psize=4096, clk_tck=100,
                      resolver=bpf.CgroupResolver(renamed, (_V1, _V2), "/nonexistent"))
    assert cache.last_hits == 1 and [t.memcg_v1 for t in got] == ["/a", "/a/c"]


def test_task_cache_needs_a_scope_for_a_filter() -> None:
    with pytest.raises(ValueError, match="scope"):
        bpf.TaskCache().tasks(b"", psize=4096, clk_tck=100, resolver=_resolver(), keep=_in_a)


def test_members_from_tasks_leave_read_hierarchies_alone() -> None:
    """v2 with the memory controller keeps cgroup.procs' order (the kernel's
    scan order, by which the kernel policy breaks ties); v1 takes the tasks'."""
    v2 = Cgroup(HierarchyKind.V2, "/w", "/x/w", 3, True, True, pids=(31, 32, 30))
    v1 = Cgroup(HierarchyKind.V1, "/a", "/y/a", 7, True, True)
    tasks = [Task(p, p, 1, "t", "S", 1, 0, False, True, 1, 1, 0, 0, 1, 0,
                  memcg_v1="/a", cgroup_v2="/w") for p in (32, 30, 31)]
    out = with_members([v1, v2], tasks, {HierarchyKind.V1})
    assert out[0].pids == (30, 31, 32) and out[1].pids == (31, 32, 30)
    assert with_members([v1, v2], tasks, set()) == [v1, v2]


def test_a_failing_bpf_pass_is_read_from_proc_under_auto(
    iterator: bpf.TaskIterator, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: object, **kw: object) -> list[Task]:
        raise BpfError("bpf_iter_create failed: Too many open files")

    monkeypatch.setattr(bpf, "read_tasks_bpf", broken)
    snap = build_snapshot(SourceConfig(source="auto"))
    assert snap.task(os.getpid()) is not None
    assert any("Too many open files" in p and "/proc" in p for p in snap.problems)
    with pytest.raises(BpfError, match="Too many open files"):
        build_snapshot(SourceConfig(source="bpf"))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=3 * bpf.RECORD_SIZE + 5))
def test_task_cache_on_garbage_raises_only_bpf_error(data: bytes) -> None:
    cache = bpf.TaskCache()
    for _ in range(2):
        try:
            cache.tasks(data, psize=4096, clk_tck=100, resolver=_resolver())
        except BpfError:
            return


def test_resolver_asks_proc_once_per_unseen_cgroup(tmp_path: Path) -> None:
    """Tasks in a cgroup the walk did not see: one /proc/PID/cgroup read for
    the first, kept for the others only because the directory has that inode."""
    mount = tmp_path / "memory"
    (mount / "new").mkdir(parents=True)
    ino = os.stat(mount / "new").st_ino
    proc = tmp_path / "proc"
    for pid in (10, 11, 12):
        (proc / str(pid)).mkdir(parents=True)
        (proc / str(pid) / "cgroup").write_text("4:memory:/new\n0::/\n")
    h1 = Hierarchy(HierarchyKind.V1, str(mount), "/", ("memory",), True)
    resolver = bpf.CgroupResolver([], (h1,), str(proc))
    assert [resolver.paths(pid, ino, 1) for pid in (10, 11, 12)] == [("/new", None)] * 3
    assert resolver.proc_reads == 1
    # An id whose directory does not have it (the task moved): asked each time.
    other = bpf.CgroupResolver([], (h1,), str(proc))
    assert [other.paths(pid, ino + 12345, 1) for pid in (10, 11)] == [("/new", None)] * 2
    assert other.proc_reads == 2


# -- the real kernel ---------------------------------------------------------------


@pytest.fixture
def iterator() -> Iterator[bpf.TaskIterator]:
    try:
        it = bpf.TaskIterator(bpf.default_object_path())
    except BpfError as e:
        need(False, f"the BPF task iterator cannot be had here: {e}")
        raise
    try:
        yield it
    finally:
        it.close()


def _points(t: Task, totalpages: int) -> int | None:
    return badness_points(t, totalpages)


@pytest.mark.kernel
def test_parity_with_procfs(iterator: bpf.TaskIterator) -> None:
    """Every task, both backends: the same fields, the same points (rss within
    the tolerance in the module docstring), the same ranking and victim."""
    before = build_snapshot(SourceConfig(source="procfs"))
    fast = build_snapshot(SourceConfig(source="bpf"))
    after = build_snapshot(SourceConfig(source="procfs"))
    totalpages = before.system.totalpages
    b = {t.identity: t for t in before.tasks}
    a = {t.identity: t for t in after.tasks}
    f = {t.identity: t for t in fast.tasks}
    # Every process that lived through all three reads is in the BPF one.
    lived = set(b) & set(a)
    assert lived <= set(f), sorted(lived - set(f))[:10]
    stable = [i for i in lived
              if _points(b[i], totalpages) == _points(a[i], totalpages)
              and (b[i].rss_anon, b[i].rss_file, b[i].rss_shmem)
              == (a[i].rss_anon, a[i].rss_file, a[i].rss_shmem)]
    assert len(stable) >= 0.8 * len(lived), (len(stable), len(lived))
    for i in stable:
        p, q = b[i], f[i]
        assert (q.pid, q.tgid, q.ppid, q.uid, q.kthread, q.has_mm, q.global_init) == (
            p.pid, p.tgid, p.ppid, p.uid, p.kthread, p.has_mm, p.global_init), (p, q)
        # procfs shows a kthread's full name (a kworker's workqueue, a name
        # longer than comm's 16 bytes: proc_task_name()); the record has comm.
        assert p.comm == q.comm or (p.kthread and p.comm.startswith(q.comm)), (p, q)
        assert (q.oom_score_adj, q.pgtables, q.memcg_v1, q.cgroup_v2, q.in_vfork) == (
            p.oom_score_adj, p.pgtables, p.memcg_v1, p.cgroup_v2, p.in_vfork), (p, q)
        # get_mm_rss(): the same unsummed counters on both sides.
        assert q.oom_rss == p.oom_rss, (p, q)
        for name in ("rss_anon", "rss_file", "rss_shmem", "swap"):
            x, y = getattr(p, name), getattr(q, name)
            assert (x is None) == (y is None), (name, p, q)
            if x is not None:
                assert abs(x - y) <= SLACK, (name, x, y, SLACK, p.comm)
        assert _points(q, totalpages) == _points(p, totalpages), (p, q)
    # The ranking of the stable tasks is the same from both backends.
    dp = kernel_decision(before, system_domain(before))
    df = kernel_decision(fast, system_domain(fast))
    keep = set(stable)
    rank_p = [(c.task.identity, c.points) for c in dp.candidates if c.task.identity in keep]
    rank_f = [(c.task.identity, c.points) for c in df.candidates if c.task.identity in keep]
    assert rank_p == rank_f
    # The victim: the same wherever it is stable (the usual case).
    if dp.victim is not None and dp.victim.task.identity in keep:
        assert df.victim is not None
        assert df.victim.task.identity == dp.victim.task.identity
    # Each cgroup's members: BPF takes them from the tasks' ids, procfs from
    # cgroup.procs; the same for every process that lived through the reads.
    alive = {i[0] for i in lived}
    members_p = {(c.kind, c.path): set(c.pids) & alive for c in before.cgroups}
    members_f = {(c.kind, c.path): set(c.pids) & alive for c in fast.cgroups}
    for key, pids in members_p.items():
        if key in members_f:
            assert members_f[key] == pids, key
    assert sum(len(p) for p in members_f.values()) >= len(alive)


@pytest.mark.kernel
def test_parity_with_our_own_children(iterator: bpf.TaskIterator, tmp_path: Path) -> None:
    """Children of known sizes and oom_score_adj: both backends agree on each."""
    code = (
        "import os, sys, time\n"
        "b = bytearray(int(sys.argv[1]) << 20)\n"
        "for i in range(0, len(b), 4096): b[i] = 1\n"
        "open('/proc/self/oom_score_adj', 'w').write(sys.argv[2])\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )
    children = [subprocess.Popen([sys.executable, "-c", code, str(mib), str(adj)],
                                 stdout=subprocess.PIPE)
                for mib, adj in ((8, 0), (32, 100), (16, -500), (4, -1000))]
    try:
        for c in children:
            assert c.stdout is not None and c.stdout.readline() == b"ready\n"
        pids = {c.pid for c in children}
        proc = build_snapshot(SourceConfig(source="procfs"))
        fast = build_snapshot(SourceConfig(source="bpf"))
        total = proc.system.totalpages
        for pid in pids:
            p, q = proc.task(pid), fast.task(pid)
            assert p is not None and q is not None
            assert q.identity == p.identity
            assert q.oom_score_adj == p.oom_score_adj
            assert q.oom_rss == p.oom_rss and _points(q, total) == _points(p, total)
        ours_p = [c.task.pid for c in kernel_decision(proc, system_domain(proc)).candidates
                  if c.task.pid in pids]
        ours_f = [c.task.pid for c in kernel_decision(fast, system_domain(fast)).candidates
                  if c.task.pid in pids]
        assert ours_p == ours_f
    finally:
        for c in children:
            c.kill()
            c.wait()


@pytest.mark.kernel
def test_subtree_snapshot_matches_procfs(
    iterator: bpf.TaskIterator, memcg_factory: MemcgFactory
) -> None:
    """``only=`` a child memcg: the same processes and members from both
    backends, cold and warm (the second BPF pass reuses cached tasks)."""
    child = memcg_factory.create(128 << 20)
    hogs = [child.start_hog(mib) for mib in (2, 4, 8)]
    want = {h.pid for h in hogs}
    only = ("v1", child.hierarchy_path)
    bpf.load().cache.clear()
    proc = build_snapshot(SourceConfig(source="procfs", only=only))
    cold = build_snapshot(SourceConfig(source="bpf", only=only))
    warm = build_snapshot(SourceConfig(source="bpf", only=only))
    assert bpf.load().cache.last_hits >= len(want)
    for snap in (proc, cold, warm):
        assert {t.pid for t in snap.tasks} == want
        (cg,) = [c for c in snap.cgroups if c.path == child.hierarchy_path]
        assert set(cg.pids) == want
    total = proc.system.totalpages
    for pid in want:
        p, c, w = proc.task(pid), cold.task(pid), warm.task(pid)
        assert p is not None and c is not None and w is not None
        assert p.identity == c.identity == w.identity
        assert p.memcg_v1 == c.memcg_v1 == w.memcg_v1 == child.hierarchy_path
        assert _points(p, total) == _points(c, total) == _points(w, total)


@pytest.mark.kernel
def test_bpf_reads_exe_and_cmdline_only_when_asked(iterator: bpf.TaskIterator) -> None:
    plain = build_snapshot(SourceConfig(source="bpf"))
    me = plain.task(os.getpid())
    assert me is not None and me.exe is None and me.cmdline is None
    rich = build_snapshot(SourceConfig(source="bpf", read=ReadOptions(details=True)))
    me = rich.task(os.getpid())
    assert me is not None and me.exe is not None and me.cmdline


@pytest.mark.kernel
def test_no_fd_left_after_close() -> None:
    before = set(os.listdir("/proc/self/fd"))
    try:
        it = bpf.TaskIterator(bpf.default_object_path())
    except BpfError as e:
        need(False, f"the BPF task iterator cannot be had here: {e}")
        return
    for _ in range(3):
        bpf.decode_records(it.read())
    it.close()
    it.close()
    assert set(os.listdir("/proc/self/fd")) <= before


# -- the fallback ----------------------------------------------------------------------


def test_fallback_to_procfs_with_one_line(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.bpf.o")
    choice = choose_source(SourceConfig(source="auto", bpf_object=missing))
    assert choice.backend == "procfs"
    assert choice.reason is not None and "\n" not in choice.reason
    assert missing in choice.reason and "procfs" in choice.reason
    snap = build_snapshot(SourceConfig(source="auto", bpf_object=missing))
    assert snap.task(os.getpid()) is not None
    with pytest.raises(BpfError, match=r"missing\.bpf\.o"):
        build_snapshot(SourceConfig(source="bpf", bpf_object=missing))


def test_fallback_on_an_object_the_kernel_refuses(tmp_path: Path) -> None:
    bad = tmp_path / "bad.bpf.o"
    bad.write_bytes(b"\x7fELF not really")
    choice = choose_source(SourceConfig(source="auto", bpf_object=str(bad)))
    assert choice.backend == "procfs"
    assert choice.reason is not None and "\n" not in choice.reason and str(bad) in choice.reason


def test_a_recorded_tree_is_procfs_silently() -> None:
    tree = REPO / "tests" / "fixtures"
    choice = choose_source(SourceConfig(source="auto", proc_root=str(tree)))
    assert choice == type(choice)("procfs", None)


def _explain(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "oomwarden.cli", "explain", "--top", "1",
                           "--json", *args], capture_output=True, text=True, env=env,
                          timeout=120, check=False)


def test_explain_source_auto_falls_back_with_one_line(tmp_path: Path) -> None:
    env = {**os.environ, bpf.OBJECT_ENV: str(tmp_path / "missing.bpf.o")}
    done = _explain("--source", "auto", env=env)
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and "missing.bpf.o" in lines[0] and "procfs" in lines[0]
    done = _explain("--source", "bpf", env=env)
    assert done.returncode == 2 and len(done.stderr.splitlines()) == 1
    assert "missing.bpf.o" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.kernel
def test_explain_source_bpf(iterator: bpf.TaskIterator) -> None:
    done = _explain("--source", "bpf", env=dict(os.environ))
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert '"victim"' in done.stdout


# -- the daemon ------------------------------------------------------------------------


@pytest.mark.kernel
def test_the_daemon_snapshots_from_bpf_and_says_so(
    iterator: bpf.TaskIterator, memcg_factory: MemcgFactory, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, sockdir: Path,
) -> None:
    """``oomwarden run`` takes its snapshots from BPF where it loads, and its
    status says which source it uses; with the object missing it says, in
    one line at start, why it uses procfs."""
    cg = memcg_factory.create(64 << 20)
    (tmp_path / "a").mkdir()
    warden = LiveWarden(tmp_path / "a", cg, str(sockdir / "a.sock"))
    try:
        body = warden.ask({"op": "status"})
        assert body["bpf"]["snapshot"] == {
            "in_use": True, "detail": "BPF task iterator (tasks.bpf.o)"}, body
        assert "BPF snapshot source not used" not in warden.text()
    finally:
        assert warden.stop() == 0
    missing = str(tmp_path / "missing.bpf.o")
    monkeypatch.setenv(bpf.OBJECT_ENV, missing)
    (tmp_path / "b").mkdir()
    warden = LiveWarden(tmp_path / "b", cg, str(sockdir / "b.sock"))
    try:
        part = warden.ask({"op": "status"})["bpf"]["snapshot"]
        assert part["in_use"] is False and missing in part["detail"], part
        said = [line for line in warden.text().splitlines()
                if "BPF snapshot source not used" in line]
        assert len(said) == 1 and missing in said[0] and "procfs" in said[0], said
    finally:
        assert warden.stop() == 0
