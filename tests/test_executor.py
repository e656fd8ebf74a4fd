"""The executor on the real kernel: processes, trees, cgroups, files, hooks.

Every process signalled here was started by the test, inside a child memory
cgroup it created under its own (limit <= 1 GiB), removed afterwards.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from oomwarden.actions.executor import Executor
from oomwarden.model import HierarchyKind
from oomwarden.policy import DeleteFiles, KillCgroup, KillProcess, RunHook
from oomwarden.sources.cgroupfs import find_hierarchies
from oomwarden.sources.fsmagic import TMPFS_MAGIC, fs_magic, is_cgroup_fs
from oomwarden.sources.parse import parse_stat

from conftest import need
from kernelenv import ChildMemcg, MemcgFactory, TwinFactory

pytestmark = pytest.mark.kernel
MiB = 1024 * 1024

TREE = r"""
import os, sys, time
depth = int(sys.argv[1])
for procs in sys.argv[2:]:
    with open(procs, "w") as f:
        f.write(str(os.getpid()))
def spawn(level):
    for _ in range(3):
        if os.fork() == 0:
            if level > 1:
                spawn(level - 1)
            time.sleep(60)
            os._exit(0)
spawn(depth)
print("ready", flush=True)
time.sleep(60)
"""


def start_ticks(pid: int) -> int:
    return parse_stat(Path(f"/proc/{pid}/stat").read_bytes()).start_ticks


def alive(pid: int) -> bool:
    try:
        state = parse_stat(Path(f"/proc/{pid}/stat").read_bytes()).state
    except OSError:
        return False
    return state not in ("Z", "X")


def wait_gone(pids: list[int], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(alive(p) for p in pids):
            return True
        time.sleep(0.02)
    return False


def usage(cg: ChildMemcg) -> int:
    return int(cg.read("memory.usage_in_bytes"))


@pytest.fixture(autouse=True)
def _pidfds() -> None:
    need(hasattr(os, "pidfd_open"), "no pidfd_open in this Python/kernel")


def test_kill_a_process_and_free_its_memory(memcg_factory: MemcgFactory) -> None:
    cg = memcg_factory.create(limit_bytes=512 * MiB)
    hog = cg.start_hog(200)
    before = usage(cg)
    r = Executor().execute(KillProcess(hog.pid, start_ticks(hog.pid), "test"))
    assert r.ok and r.killed == (hog.pid,) and "released" in r.detail, r
    assert hog.proc.wait(timeout=5) == -9
    assert usage(cg) < before - 150 * MiB


def test_a_kill_reports_its_stages_and_its_victims(
        memcg_factory: MemcgFactory) -> None:
    """The decision log's per-stage timestamps: signal <= memory released <=
    exit, and the victims' identity (for the cooldown)."""
    cg = memcg_factory.create(limit_bytes=512 * MiB)
    hog = cg.start_hog(100)
    ticks = start_ticks(hog.pid)
    before_ns = time.time_ns()
    r = Executor().execute(KillProcess(hog.pid, ticks, "test"))
    assert r.ok and r.exited is True, r
    assert r.signal_ns is not None and r.released_ns is not None and r.exit_ns is not None
    assert before_ns <= r.signal_ns <= r.released_ns <= r.exit_ns <= time.time_ns()
    assert r.victims == ((hog.pid, ticks),) and r.freed_bytes is None
    other = cg.start_hog(10)
    dry = Executor(dry_run=True).execute(KillProcess(other.pid, start_ticks(other.pid)))
    assert dry.ok and dry.signal_ns is None and dry.exit_ns is None and dry.exited is None
    assert other.proc.poll() is None


def test_a_recycled_identity_is_refused(memcg_factory: MemcgFactory) -> None:
    hog = memcg_factory.create(limit_bytes=256 * MiB).start_hog(10)
    r = Executor().execute(KillProcess(hog.pid, start_ticks(hog.pid) + 1, "stale"))
    assert not r.ok and "another process" in r.detail
    assert hog.proc.poll() is None


def test_never_pid_1_the_warden_or_the_protected(memcg_factory: MemcgFactory) -> None:
    """Refusals come before any signal; checked in a dry run for pid 1 and this
    process (a regression must not be able to kill init or the test runner)."""
    hog = memcg_factory.create(limit_bytes=256 * MiB).start_hog(10)
    for pid in (1, os.getpid()):
        r = Executor(dry_run=True).execute(KillProcess(pid, start_ticks(pid)))
        assert not r.ok and "refused" in r.detail
    r = Executor(protect=frozenset({hog.pid})).execute(KillProcess(hog.pid,
                                                                   start_ticks(hog.pid)))
    assert not r.ok and "refused" in r.detail
    kthread = next(p for p in range(2, 200) if Path(f"/proc/{p}/stat").exists()
                   and parse_stat(Path(f"/proc/{p}/stat").read_bytes()).kthread)
    r = Executor(dry_run=True).execute(KillProcess(kthread, start_ticks(kthread)))
    assert not r.ok and "kernel thread" in r.detail
    assert hog.proc.poll() is None and alive(1)


def test_sigterm_first_then_sigkill(memcg_factory: MemcgFactory) -> None:
    cg = memcg_factory.create(limit_bytes=256 * MiB)
    polite = cg.start_hog(10)
    r = Executor(sigterm_grace_s=2.0).execute(KillProcess(polite.pid, start_ticks(polite.pid)))
    assert r.ok and "SIGTERM" in r.detail and polite.proc.wait(timeout=5) == -15
    stubborn = subprocess.Popen(
        [sys.executable, "-c",
         "import os, signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
         f"open({str(cg.path / 'cgroup.procs')!r}, 'w').write(str(os.getpid())); "
         "print('ready', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE)
    try:
        assert stubborn.stdout is not None and stubborn.stdout.readline().strip() == b"ready"
        started = time.monotonic()
        r = Executor(sigterm_grace_s=0.3).execute(
            KillProcess(stubborn.pid, start_ticks(stubborn.pid)))
        assert r.ok and "killed" in r.detail and stubborn.wait(timeout=5) == -9
        assert time.monotonic() - started >= 0.3
    finally:
        stubborn.kill()
        stubborn.wait(timeout=5)


def _tree(cg: ChildMemcg, depth: int, *twins: Path) -> subprocess.Popen[bytes]:
    """A process with 3 children a level, ``depth`` levels down (the deeper
    ones still forking when it returns), in the memcg and in each twin."""
    proc = subprocess.Popen([sys.executable, "-c", TREE, str(depth), str(cg.path / "cgroup.procs"),
                             *(str(t / "cgroup.procs") for t in twins)], stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
    return proc


def _end_tree(root: subprocess.Popen[bytes], cg: ChildMemcg) -> None:
    """Kill what is left of a tree: the root, then every process in its memcg
    (all started by this test: the memcg is its own)."""
    root.kill()
    root.wait(timeout=5)
    for pid in cg.pids():
        os.kill(pid, 9)
    wait_gone(cg.pids())


def test_kill_a_process_tree_sparing_one(memcg_factory: MemcgFactory) -> None:
    cg = memcg_factory.create(limit_bytes=512 * MiB)
    root = _tree(cg, 2)
    try:
        deadline = time.monotonic() + 10  # the grandchildren are forked after "ready"
        while len(cg.pids()) < 1 + 3 + 9 and time.monotonic() < deadline:
            time.sleep(0.02)
        members = cg.pids()
        assert len(members) == 1 + 3 + 9
        spared = next(p for p in members if p != root.pid)
        r = Executor().execute(KillProcess(root.pid, start_ticks(root.pid), tree=True,
                                           spare_pids=(spared,)))
        assert r.ok and len(r.killed) == 12, r
        assert root.wait(timeout=5) == -9
        assert wait_gone([p for p in members if p not in (spared, root.pid)])
        assert alive(spared)
    finally:
        _end_tree(root, cg)  # only the spared child of this test is left


def test_kill_a_v1_cgroup_one_by_one(memcg_factory: MemcgFactory) -> None:
    cg = memcg_factory.create(limit_bytes=512 * MiB)
    hogs = [cg.start_hog(20) for _ in range(3)]
    r = Executor().execute(KillCgroup("v1", cg.hierarchy_path, cg.path.stat().st_ino, "test"))
    assert r.ok and "one by one" in r.detail and sorted(r.killed) == sorted(h.pid for h in hogs)
    assert all(h.proc.wait(timeout=5) == -9 for h in hogs) and cg.pids() == []


def test_a_recreated_cgroup_is_not_the_one_queued(memcg_factory: MemcgFactory) -> None:
    cg = memcg_factory.create(limit_bytes=256 * MiB)
    hog = cg.start_hog(10)
    r = Executor().execute(KillCgroup("v1", cg.hierarchy_path, cg.path.stat().st_ino + 1))
    assert not r.ok and "another cgroup" in r.detail and hog.proc.poll() is None


@pytest.fixture
def v2_child() -> Iterator[Path]:
    """A child of this process's cgroup2 cgroup (no controllers needed: every
    cgroup2 directory has cgroup.kill), removed afterwards."""
    v2 = [h for h in find_hierarchies() if h.kind is HierarchyKind.V2 and h.verified]
    need(bool(v2), "no cgroup2 hierarchy mounted")
    own = Path("/proc/self/cgroup").read_text().split("0::", 1)[1].split("\n")[0]
    parent = Path(v2[0].mount_point) / own.lstrip("/")
    need(is_cgroup_fs(parent, v2=True) and os.access(parent, os.W_OK),
         f"cannot create cgroups in {parent}")
    path = parent / f"oomwarden-test-{uuid.uuid4().hex[:12]}"
    path.mkdir()
    try:
        yield path
    finally:
        if (path / "cgroup.kill").exists() and (path / "cgroup.procs").read_text().strip():
            (path / "cgroup.kill").write_text("1")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                path.rmdir()
                break
            except OSError:
                time.sleep(0.05)


def test_kill_a_v2_cgroup_with_cgroup_kill(v2_child: Path) -> None:
    sleepers = [subprocess.Popen(["sleep", "60"]) for _ in range(3)]
    try:
        for s in sleepers:
            (v2_child / "cgroup.procs").write_text(str(s.pid))
        rel = "/" + str(v2_child.relative_to(next(
            h.mount_point for h in find_hierarchies() if h.kind is HierarchyKind.V2)))
        r = Executor().execute(KillCgroup("v2", rel, v2_child.stat().st_ino, "test"))
        assert r.ok and "cgroup.kill" in r.detail, r
        assert all(s.wait(timeout=5) == -9 for s in sleepers)
    finally:
        for s in sleepers:
            s.kill()
            s.wait(timeout=5)


def test_dry_run_signals_nothing(memcg_factory: MemcgFactory) -> None:
    cg = memcg_factory.create(limit_bytes=256 * MiB)
    hog = cg.start_hog(10)
    ex = Executor(dry_run=True)
    for action in (KillProcess(hog.pid, start_ticks(hog.pid)),
                   KillProcess(hog.pid, start_ticks(hog.pid), tree=True),
                   KillCgroup("v1", cg.hierarchy_path, cg.path.stat().st_ino)):
        r = ex.execute(action)
        assert r.ok and "dry run" in r.detail
    time.sleep(0.1)
    assert hog.proc.poll() is None
    assert parse_stat(Path(f"/proc/{hog.pid}/stat").read_bytes()).state != "T"  # not stopped


@pytest.fixture
def shm_dir() -> Iterator[Path]:
    shm = Path("/dev/shm")
    need(shm.is_dir() and fs_magic(shm) == TMPFS_MAGIC, "/dev/shm is not a tmpfs")
    path = shm / f"oomwarden-test-{uuid.uuid4().hex[:12]}"
    path.mkdir()
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_delete_files_only_regular_files_on_a_tmpfs(shm_dir: Path, tmp_path: Path) -> None:
    need(fs_magic(tmp_path) != TMPFS_MAGIC, "the temporary folder is itself a tmpfs")
    (shm_dir / "a").write_bytes(b"x" * 65536)
    (shm_dir / "b").write_bytes(b"y" * 4096)
    (shm_dir / "sub").mkdir()
    outside = tmp_path / "precious"
    outside.write_text("keep me")
    (shm_dir / "link").symlink_to(outside)
    paths = (*(str(shm_dir / n) for n in ("a", "b", "sub", "link")), str(outside))
    r = Executor().execute(DeleteFiles(paths, "test"))
    assert r.ok and r.freed_bytes is not None and r.freed_bytes >= 65536 + 4096
    assert "2 files deleted" in r.detail
    assert "not a regular file" in r.detail and "not on a tmpfs" in r.detail
    assert not (shm_dir / "a").exists() and (shm_dir / "sub").is_dir()
    assert (shm_dir / "link").is_symlink() and outside.read_text() == "keep me"


def test_hooks_get_argv_no_shell_and_the_victim() -> None:
    ex = Executor()
    assert ex.execute(RunHook(("/bin/true",))).ok
    assert not ex.execute(RunHook(("/bin/false",))).ok
    check = RunHook(("/bin/sh", "-c", 'test "$OOMWARDEN_VICTIM_PID" = 42'))
    assert ex.execute(check, env={"OOMWARDEN_VICTIM_PID": "42"}).ok
    assert not ex.execute(RunHook(("/bin/sleep", "5"), timeout_s=0.2)).ok
    assert not ex.execute(RunHook(("/no/such/program",))).ok


def test_a_v1_cgroup_is_killed_through_its_cgroup2_twin(
        memcg_factory: MemcgFactory, twin_factory: TwinFactory) -> None:
    """A v1 memcg has no cgroup.kill; its cgroup2 twin holding exactly the
    same processes kills them all at once."""
    cg = memcg_factory.create(limit_bytes=256 * MiB)
    twin = twin_factory.make(cg, "v2")
    root = _tree(cg, 1, twin)
    try:
        members = cg.pids()
        assert len(members) == 1 + 3
        r = Executor().execute(KillCgroup("v1", cg.hierarchy_path, cg.path.stat().st_ino))
        assert r.ok and "cgroup.kill on" in r.detail and "cgroup2 twin" in r.detail, r
        assert r.exited and sorted(r.killed) == sorted(members)
        assert root.wait(timeout=5) == -9 and cg.pids() == []
    finally:
        _end_tree(root, cg)


@pytest.mark.parametrize("kind", ["v2", "freezer"])
def test_a_twin_freezes_the_cgroup_before_a_kill_one_by_one(
        memcg_factory: MemcgFactory, twin_factory: TwinFactory, kind: str) -> None:
    """With a member to spare, no cgroup.kill: the twin freezes the cgroup
    first (nothing forks meanwhile), the others die, the spared one lives on,
    thawed."""
    cg = memcg_factory.create(limit_bytes=256 * MiB)
    twin = twin_factory.make(cg, kind)
    root = _tree(cg, 1, twin)
    try:
        members = cg.pids()
        spared = next(p for p in members if p != root.pid)
        r = Executor().execute(KillCgroup("v1", cg.hierarchy_path, cg.path.stat().st_ino,
                                          spare_pids=(spared,)))
        assert r.ok and f"frozen first through {twin}" in r.detail, r
        assert sorted(r.killed) == sorted(p for p in members if p != spared)
        assert root.wait(timeout=5) == -9
        assert wait_gone([p for p in members if p != spared])
        assert cg.pids() == [spared] and alive(spared)
        state = parse_stat(Path(f"/proc/{spared}/stat").read_bytes()).state
        assert state in ("S", "R"), state  # thawed
        if kind == "v2":
            assert (twin / "cgroup.freeze").read_text().strip() == "0"
        else:
            assert (twin / "freezer.state").read_text().strip() == "THAWED"
    finally:
        _end_tree(root, cg)  # only the spared child of this test is left
