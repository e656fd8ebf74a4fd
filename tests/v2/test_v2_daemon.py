"""The daemon on a real cgroup v2 memory hierarchy (in the VM lane's guest):
acting before the kernel's killer, which v2 cannot pause.

Python is 13-30x slower in the guest: waits are long, the scenes small.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from oomwarden.sandbox import ChildMemcg

from kernelenv import Warden, decisions
from v2env import MiB, V2Factory, events, need, wait_until

pytestmark = pytest.mark.kernel
#: Starting the warden in the guest (imports, a warm-up decision) is slow.
START_S = 180.0


def run_warden(tmp_path: Path, watch: str, *extra: str) -> Warden:
    """The warden on this ``[[watch]]`` table, its decision log in ``tmp_path``."""
    config = tmp_path / "oomwarden.toml"
    config.write_text(f'decision_log = "{tmp_path / "decisions.jsonl"}"\n\n[[watch]]\n{watch}\n')
    config.chmod(0o644)
    return Warden(config, *extra, stop_s=60.0, kill_s=10.0)


def domain(cg: ChildMemcg) -> str:
    return f'domain = "cgroup:{cg.hierarchy_path}"'


def test_the_leaker_dies_the_database_lives_and_the_kernel_never_kills(
        v2_factory: V2Factory, tmp_path: Path) -> None:
    """The demo's scene under v2: a database holding steadily, a leaker
    growing; `oom` (events, PSI, the margin) with the growth policy and a
    memory.high guard. The warden kills the leaker before memory.max, the
    kernel's oom_kill stays 0, and memory.high is back to "max" afterwards."""
    cg = v2_factory.create(256 * MiB)
    database = cg.start_hog(100, name="database")
    warden = run_warden(tmp_path, f'{domain(cg)}\ntriggers = ["oom", "margin"]\n'
                    'policy = "growth"\nmargin_percent = 25\nhigh_guard_percent = 20')
    try:
        warden.wait_for("watching 1 memory cgroup (margin, oom)", timeout=START_S)
        guard = int(cg.read("memory.high"))
        assert guard == 256 * MiB * 8 // 10 // 4096 * 4096, guard
        leaker = cg.start_leaker(20, name="leaker")
        line = warden.wait_for(f"killed pid {leaker.pid} ", timeout=120)
        assert "growth" in line
        assert leaker.proc.wait(timeout=30) == -signal.SIGKILL
        assert database.proc.poll() is None
        assert events(cg)["oom_kill"] == 0
    finally:
        assert warden.stop() == 0
    assert cg.read("memory.high").strip() == "max"
    kills = [r for r in decisions(tmp_path) if r["victim"]]
    assert kills[0]["trigger"] in ("margin", "events", "pressure")
    assert kills[0]["victim"]["pid"] == leaker.pid  # type: ignore[index]


def test_an_oom_group_dies_whole_through_cgroup_kill(v2_factory: V2Factory,
                                                     tmp_path: Path) -> None:
    """A watch on a parent: its child with memory.oom.group holds the largest
    process, so the whole child is the victim, killed with cgroup.kill; the
    other child lives."""
    parent = v2_factory.create(256 * MiB)
    parent.write("cgroup.subtree_control", "+memory")
    group = v2_factory.create(inside=parent, oom_group=True)
    other = v2_factory.create(inside=parent)
    members = [group.start_hog(80), group.start_hog(80)]
    warden = run_warden(tmp_path, f'{domain(parent)}\ntriggers = ["margin"]\npolicy = "kernel"\n'
                    "margin_percent = 20")
    try:
        warden.wait_for("watching 1 memory cgroup (margin)", timeout=START_S)
        survivor = other.start_hog(60)  # the working set crosses 80 % of 256 MiB
        warden.wait_for("margin: killed pid", timeout=120)
        for m in members:
            assert m.proc.wait(timeout=30) == -signal.SIGKILL
        assert survivor.proc.poll() is None
        wait_until("the group emptied", lambda: "populated 0" in group.read("cgroup.events"))
    finally:
        assert warden.stop() == 0
    (record,) = [r for r in decisions(tmp_path) if r["victim"]]
    (result,) = record["results"]  # type: ignore[misc]
    assert result["action"] == "kill_cgroup" and "cgroup.kill on" in result["detail"]
    assert events(parent)["oom_kill"] == 0


def test_a_dry_run_logs_the_kernels_kill(v2_factory: V2Factory, tmp_path: Path) -> None:
    """Dry run: the kernel's killer acts at memory.max; the warden logs that
    kill with its victim (from /dev/kmsg), so no kill goes unexplained."""
    need(os.access("/dev/kmsg", os.R_OK), "/dev/kmsg is not readable")
    cg = v2_factory.create(64 * MiB)
    warden = run_warden(tmp_path, f'{domain(cg)}\ntriggers = ["events"]\npolicy = "kernel"',
                    "--dry-run")
    try:
        warden.wait_for("watching 1 memory cgroup (events)", timeout=START_S)
        grower = cg.start_grower(200)
        assert grower.proc.wait(timeout=60) == -signal.SIGKILL
        warden.wait_for(f"the kernel killed pid {grower.pid} ", timeout=60)
    finally:
        assert warden.stop() == 0
    kills = [r for r in decisions(tmp_path) if r["trigger"] == "kernel_kill"]
    assert kills and kills[0]["victim"]["pid"] == grower.pid  # type: ignore[index]


def test_the_watchdog_restores_memory_high_when_the_warden_dies(
        v2_factory: V2Factory, tmp_path: Path) -> None:
    cg = v2_factory.create(128 * MiB)
    cg.write("memory.high", str(120 * MiB))
    warden = run_warden(tmp_path, f'{domain(cg)}\ntriggers = ["events"]\npolicy = "kernel"\n'
                    "high_guard_percent = 10")
    try:
        warden.wait_for("watching 1 memory cgroup (events)", timeout=START_S)
        assert int(cg.read("memory.high")) < 120 * MiB
        state = json.loads((tmp_path / "paused.json").read_text())
        assert state["cgroups"][0]["memory_high"] == str(120 * MiB)
        warden.proc.kill()
        warden.proc.wait(timeout=30)
        wait_until("the watchdog restored memory.high",
                   lambda: int(cg.read("memory.high")) == 120 * MiB, timeout=30)
    finally:
        warden.stop()


def test_page_cache_at_the_limit_is_no_reason_to_kill(v2_factory: V2Factory,
                                                      tmp_path: Path) -> None:
    """A cgroup reading files sits at memory.max with `high`/`max` counted on
    every reclaiming charge: `oom` (events, PSI, margin) must not kill for
    that (the review saw 6 kills in 10 s before the working-set check)."""
    cg = v2_factory.create(96 * MiB)
    # On the project's 9p share (cache=loose): real page cache; the guest's
    # /tmp and /var/tmp are tmpfs, whose pages would stay charged to the writer.
    data = Path(__file__).resolve().parents[2] / ".cache" / f"oomwarden-cache-{os.getpid()}.bin"
    data.parent.mkdir(exist_ok=True)
    with open(data, "wb") as f:
        for _ in range(160):
            f.write(os.urandom(MiB))
        f.flush()
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    database = cg.start_hog(16, name="database")
    reader = subprocess.Popen(
        [sys.executable, "-c", "import os, time\n"
         f"open({str(cg.path / 'cgroup.procs')!r}, 'w').write(str(os.getpid()))\n"
         "end = time.monotonic() + 120\n"
         "while time.monotonic() < end:\n"
         f"    fd = os.open({str(data)!r}, os.O_RDONLY)\n"
         "    while os.read(fd, 1 << 20): pass\n"
         "    os.close(fd)\n"])
    warden = run_warden(tmp_path, f'{domain(cg)}\ntriggers = ["oom"]\npolicy = "kernel"')
    try:
        warden.wait_for("watching 1 memory cgroup (oom)", timeout=START_S)
        wait_until("page cache filled the cgroup",
                   lambda: events(cg).get("max", 0) > 0, timeout=60)
        time.sleep(10)
        assert database.proc.poll() is None and reader.poll() is None
    finally:
        reader.kill()
        reader.wait(timeout=30)
        data.unlink(missing_ok=True)
        assert warden.stop() == 0
    assert [r for r in decisions(tmp_path) if r["victim"]] == []


def test_every_kill_of_an_oom_group_is_logged(v2_factory: V2Factory, tmp_path: Path) -> None:
    """The kernel prints one oom-kill line per OOM, not one per member of a
    memory.oom.group: the members it did not name are logged from the
    memory.events count, so the logged kills add up to oom_kill."""
    cg = v2_factory.create(96 * MiB, oom_group=True)
    sleepers = [v2_factory.start_sleeper(cg), v2_factory.start_sleeper(cg)]
    warden = run_warden(tmp_path, f'{domain(cg)}\ntriggers = ["events"]\npolicy = "kernel"',
                    "--dry-run")
    try:
        warden.wait_for("watching 1 memory cgroup (events)", timeout=START_S)
        grower = cg.start_grower(200)
        assert grower.proc.wait(timeout=60) == -signal.SIGKILL
        for s in sleepers:
            assert s.wait(timeout=30) == -signal.SIGKILL
        killed = events(cg)["oom_kill"]
        wait_until("every kill logged", lambda: sum(
            int(r["kernel_kills"]) for r in decisions(tmp_path)  # type: ignore[call-overload]
            if r["trigger"] == "kernel_kill") >= killed, timeout=30)
    finally:
        assert warden.stop() == 0
    logged = [r for r in decisions(tmp_path) if r["trigger"] == "kernel_kill"]
    assert sum(int(r["kernel_kills"]) for r in logged) == killed  # type: ignore[call-overload]
