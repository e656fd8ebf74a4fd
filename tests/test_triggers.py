"""Pre-OOM triggers on the real kernel: v1 vmpressure, per-cgroup PSI through a
cgroup2 twin, the working-set margin, and the cooldown.

Every memory cgroup here is a child of the test's own memory cgroup (limit at
most 256 MiB), every cgroup2 twin is made under this process's own cgroup2
cgroup; all are removed afterwards; only processes the test started are
signalled; the warden runs as a subprocess and is always stopped.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from oomwarden.triggers import KmsgSource, parse_oom_kill

from conftest import need
from kernelenv import ChildMemcg, MemcgFactory, TwinFactory, Warden, decisions

pytestmark = pytest.mark.kernel
MiB = 1024 * 1024


def watch_config(tmp_path: Path, cg: ChildMemcg, triggers: str, extra: str = "") -> Path:
    path = tmp_path / "oomwarden.toml"
    path.write_text(f"""
decision_log = "{tmp_path / 'decisions.jsonl'}"
[[watch]]
domain = "cgroup:{cg.hierarchy_path}"
triggers = {triggers}
policy = "kernel"
{extra}
""")
    path.chmod(0o644)
    return path


def wait_records(tmp_path: Path, n: int, timeout: float = 20.0) -> list[dict[str, object]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = decisions(tmp_path)
        if len(found) >= n:
            return found
        time.sleep(0.05)
    return decisions(tmp_path)


def test_vmpressure_critical_fires_at_the_limit(memcg_factory: MemcgFactory,
                                                tmp_path: Path) -> None:
    """A v1 memory cgroup without a cgroup2 twin: 'pressure' listens to
    memory.pressure_level at 'critical', which the kernel signals when
    reclaim fails at the limit. The test pauses the kernel's killer in its
    own cgroup, so that only the warden can end the OOM."""
    cg = memcg_factory.create(limit_bytes=96 * MiB)
    cg.write("memory.oom_control", "1")  # restored to 0 by the factory's cleanup
    warden = Warden(watch_config(tmp_path, cg, '["pressure"]'))
    try:
        warden.wait_for("memory.pressure_level at 'critical'")
        warden.wait_for("watching 1 memory cgroup (pressure)")
        grower = cg.start_grower(200)
        line = warden.wait_for("pressure: killed pid")
        assert f"pid {grower.pid} " in line
        assert grower.proc.wait(timeout=10) == -9
    finally:
        assert warden.stop() == 0
    (record,) = wait_records(tmp_path, 1)
    assert record["trigger"] == "pressure"
    assert "memory.pressure_level critical" in str(record["event_detail"])


def cold_file(path: Path, mib: int) -> Path:
    """``mib`` MiB written to ``path``, on disk and out of the page cache: a
    reader's page cache is charged to its own memcg."""
    with open(path, "wb") as f:
        f.write(os.urandom(MiB) * mib)
        f.flush()
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    return path


def test_margin_kills_before_the_limit_and_ignores_page_cache(
        memcg_factory: MemcgFactory, tmp_path: Path) -> None:
    """Page cache filling the cgroup up to its limit is no reason to kill (the
    working set stays small); a process whose own memory crosses the margin is."""
    cg = memcg_factory.create(limit_bytes=128 * MiB)
    data = cold_file(tmp_path / "cache.bin", 200)
    warden = Warden(watch_config(tmp_path, cg, '["margin"]', "margin_percent = 20"))
    reader = None
    try:
        warden.wait_for("watching 1 memory cgroup (margin)")
        reader = subprocess.Popen(
            [sys.executable, "-c",
             f"import os\nopen({str(cg.path / 'cgroup.procs')!r}, 'w')"
             ".write(str(os.getpid()))\n"
             f"fd = os.open({str(data)!r}, os.O_RDONLY)\n"
             "while os.read(fd, 1 << 20): pass\nprint('read', flush=True)\n"
             "import time; time.sleep(60)"],
            stdout=subprocess.PIPE)
        assert reader.stdout is not None and reader.stdout.readline().strip() == b"read"
        usage = int(cg.read("memory.usage_in_bytes"))
        assert usage > 110 * MiB, usage  # page cache up to the limit
        time.sleep(1.0)  # the margin source polls every 0.1 s while above it
        assert reader.poll() is None and decisions(tmp_path) == []
        hog = cg.start_hog(110)  # anon: the working set crosses 80 % of 128 MiB
        line = warden.wait_for("margin: killed pid")
        assert f"pid {hog.pid} " in line and hog.proc.wait(timeout=10) == -9
        assert reader.poll() is None
    finally:
        if reader is not None:
            reader.kill()
            reader.wait(timeout=10)
            if reader.stdout is not None:
                reader.stdout.close()
        assert warden.stop() == 0
    (record,) = wait_records(tmp_path, 1)
    assert record["trigger"] == "margin" and "working set" in str(record["event_detail"])
    times = record["time_ns"]
    assert isinstance(times, dict)
    assert times["event"] <= times["decided"] <= times["signal"] <= times["exit"] \
        <= times["done"]
    assert isinstance(record["freed_bytes"], int) and record["freed_bytes"] >= 90 * MiB
    memory = record["memory_bytes"]
    assert isinstance(memory, dict) and memory["before"] - memory["after"] >= 80 * MiB


def test_memory_gone_ends_the_cooldown_early(memcg_factory: MemcgFactory,
                                             tmp_path: Path) -> None:
    """cooldown_s = 60, yet a second process crossing the margin right after
    the first kill is killed at once: the first victim's memory is gone."""
    cg = memcg_factory.create(limit_bytes=128 * MiB)
    warden = Warden(watch_config(tmp_path, cg, '["margin"]',
                                 "margin_percent = 20\ncooldown_s = 60"))
    try:
        warden.wait_for("watching 1 memory cgroup (margin)")
        # growers: killed while they still grow, they never say "ready"
        first = cg.start_grower(110)
        warden.wait_for(f"killed pid {first.pid} ")
        second = cg.start_grower(110)
        warden.wait_for(f"killed pid {second.pid} ", timeout=10)
    finally:
        assert warden.stop() == 0
    assert len(wait_records(tmp_path, 2)) == 2


def test_a_kill_that_leaves_the_margin_crossed_waits_out_the_cooldown(
        memcg_factory: MemcgFactory, tmp_path: Path) -> None:
    """Most of the cgroup's memory is a tmpfs file no process holds: killing
    a small process does not bring the working set below the margin, so the
    cooldown (30 s) holds instead of the other small process being killed
    next (the review's repro: both were killed 0.1 s apart)."""
    cg = memcg_factory.create(limit_bytes=160 * MiB)
    shm = Path("/dev/shm") / f"oomwarden-test-{os.getpid()}-{time.monotonic_ns()}"
    try:
        small = [cg.start_hog(4), cg.start_hog(4)]
        subprocess.run(  # charged to the cgroup, held by no process once it exits
            [sys.executable, "-c", "import os\n"
             f"open({str(cg.path / 'cgroup.procs')!r}, 'w').write(str(os.getpid()))\n"
             f"with open({str(shm)!r}, 'wb') as f:\n"
             "    for _ in range(130): f.write(b'x' * (1 << 20))\n"],
            check=True, timeout=60)
        warden = Warden(watch_config(tmp_path, cg, '["margin"]',
                                     "margin_percent = 20\ncooldown_s = 30"))
        try:
            warden.wait_for("margin: killed pid")
            time.sleep(2.0)
            assert sum(h.proc.poll() is None for h in small) == 1
        finally:
            assert warden.stop() == 0
    finally:
        shm.unlink(missing_ok=True)
    assert len(decisions(tmp_path)) == 1


def test_a_removed_cgroup_stops_its_triggers(memcg_factory: MemcgFactory,
                                             tmp_path: Path) -> None:
    cg = memcg_factory.create(limit_bytes=128 * MiB)
    warden = Warden(watch_config(tmp_path, cg, '["oom", "margin"]'))
    try:
        warden.wait_for("watching 1 memory cgroup (margin, oom)")
        cg.path.rmdir()
        warden.wait_for("stopped watching: the cgroup is gone")
        time.sleep(0.3)
        assert warden.proc.poll() is None
    finally:
        assert warden.stop() == 0


def test_a_dry_run_logs_once_per_cooldown(memcg_factory: MemcgFactory,
                                          tmp_path: Path) -> None:
    """Above the margin in a dry run nothing is killed, so nothing frees the
    memory: the cooldown keeps the log to one decision, not one per poll."""
    cg = memcg_factory.create(limit_bytes=128 * MiB)
    warden = Warden(watch_config(tmp_path, cg, '["margin"]',
                                 "margin_percent = 20\ncooldown_s = 30"), "--dry-run")
    try:
        warden.wait_for("watching 1 memory cgroup (margin)")
        hog = cg.start_hog(110)
        warden.wait_for(f"would kill pid {hog.pid} ")
        time.sleep(1.5)  # 15 polls above the margin
        assert hog.proc.poll() is None
    finally:
        assert warden.stop() == 0
    assert len(decisions(tmp_path)) == 1


@pytest.fixture
def twin(memcg_factory: MemcgFactory, twin_factory: TwinFactory) -> tuple[ChildMemcg, Path]:
    cg = memcg_factory.create(limit_bytes=64 * MiB)
    return cg, twin_factory.make(cg, "v2")


def test_psi_of_the_cgroup2_twin(twin: tuple[ChildMemcg, Path], tmp_path: Path) -> None:
    """A reader that keeps refilling its page cache in a 64 MiB memcg stalls
    in reclaim; being in the twin too, its stalls show in the twin's
    memory.pressure, and the warden's PSI trigger there fires."""
    cg, twin_dir = twin
    data = cold_file(tmp_path / "big.bin", 160)
    warden = Warden(watch_config(tmp_path, cg, '["pressure"]',
                                 "[watch.pressure]\nsome_avg10 = 0.25\nwindow_s = 2"))
    reader = None
    try:
        line = warden.wait_for("watching 1 memory cgroup (pressure)")
        assert "pressure_level" not in "\n".join(warden.lines), line
        reader = subprocess.Popen(
            [sys.executable, "-c",
             "import os, time\n"
             f"open({str(cg.path / 'cgroup.procs')!r}, 'w').write(str(os.getpid()))\n"
             f"open({str(twin_dir / 'cgroup.procs')!r}, 'w').write(str(os.getpid()))\n"
             "end = time.monotonic() + 30\n"
             "while time.monotonic() < end:\n"
             f"    fd = os.open({str(data)!r}, os.O_RDONLY)\n"
             "    while os.read(fd, 1 << 20): pass\n"
             "    os.close(fd)\n"])
        killed = warden.wait_for("pressure: killed pid", timeout=30)
        assert f"pid {reader.pid} " in killed
        assert reader.wait(timeout=10) == -9
    finally:
        if reader is not None and reader.poll() is None:
            reader.kill()
            reader.wait(timeout=10)
        assert warden.stop() == 0
    (record,) = wait_records(tmp_path, 1)
    assert record["trigger"] == "pressure"
    assert "PSI some" in str(record["event_detail"])
    assert str(twin_dir) in str(record["event_detail"])


def _policy(tmp_path: Path, body: str) -> str:
    path = tmp_path / "handler.py"
    path.write_text(body)
    path.chmod(0o644)
    return str(path)


def test_a_handler_that_frees_nothing_is_followed_by_the_per_task_selection(
        memcg_factory: MemcgFactory, tmp_path: Path) -> None:
    """DESIGN.md: if a handler's actions free nothing, the per-task selection
    runs as the fallback. The handler runs a hook that frees nothing; the
    policy's own selection (the kernel's badness) then kills the hog."""
    cg = memcg_factory.create(limit_bytes=128 * MiB)
    policy = _policy(tmp_path, "from oomwarden.policy import DEFAULT, RunHook\n"
                               "def handle(event, ctx):\n"
                               "    return [RunHook(('/bin/true',), reason='frees nothing')]\n"
                               "def evaluate(task, ctx):\n    return DEFAULT\n")
    path = watch_config(tmp_path, cg, '["margin"]', "margin_percent = 20")
    path.write_text(path.read_text().replace('policy = "kernel"', f'policy = "{policy}"'))
    warden = Warden(path)
    try:
        warden.wait_for("watching 1 memory cgroup (margin)")
        grower = cg.start_grower(110)
        line = warden.wait_for("margin: killed pid")
        assert f"pid {grower.pid} " in line and grower.proc.wait(timeout=10) == -9
    finally:
        assert warden.stop() == 0
    first, second = wait_records(tmp_path, 2)[:2]
    assert [a["action"] for a in first["actions"]] == ["run_hook"]  # type: ignore[union-attr]
    assert first["fallback"] is None
    assert "freed nothing" in str(second["fallback"])
    assert second["victim"]["pid"] == grower.pid  # type: ignore[index]


def test_a_handler_that_frees_memory_kills_nothing(memcg_factory: MemcgFactory,
                                                   tmp_path: Path) -> None:
    """A writer fills a tmpfs folder from inside the cgroup (its pages are
    charged there); the handler deletes the files at the margin, the bytes
    come back, and nobody is killed."""
    cg = memcg_factory.create(limit_bytes=128 * MiB)
    folder = Path("/dev/shm") / f"oomwarden-test-{os.getpid()}-{time.monotonic_ns()}"
    folder.mkdir()
    policy = _policy(tmp_path, "import os\nfrom oomwarden.policy import DEFAULT, DeleteFiles\n"
                               f"FOLDER = {str(folder)!r}\n"
                               "def handle(event, ctx):\n"
                               "    paths = tuple(sorted(e.path for e in os.scandir(FOLDER)))\n"
                               "    return [DeleteFiles(paths)] if paths else []\n"
                               "def evaluate(task, ctx):\n    return DEFAULT\n")
    path = watch_config(tmp_path, cg, '["margin"]', "margin_percent = 20")
    path.write_text(path.read_text().replace('policy = "kernel"', f'policy = "{policy}"'))
    warden = Warden(path)
    writer = None
    try:
        warden.wait_for("watching 1 memory cgroup (margin)")
        writer = subprocess.Popen(
            [sys.executable, "-c",
             "import os, time\n"
             f"open({str(cg.path / 'cgroup.procs')!r}, 'w').write(str(os.getpid()))\n"
             "block = b'x' * (1 << 20)\n"
             "for i in range(110):\n"
             f"    with open(os.path.join({str(folder)!r}, f'f{{i:03}}'), 'wb') as f:\n"
             "        f.write(block)\n"
             "    time.sleep(0.01)\n"
             "print('written', flush=True)\ntime.sleep(60)\n"],
            stdout=subprocess.PIPE)
        assert writer.stdout is not None
        assert writer.stdout.readline().strip() == b"written"
        time.sleep(0.5)
        assert writer.poll() is None
    finally:
        if writer is not None:
            writer.kill()
            writer.wait(timeout=10)
            if writer.stdout is not None:
                writer.stdout.close()
        assert warden.stop() == 0
        for f in folder.iterdir():
            f.unlink()
        folder.rmdir()
    records = decisions(tmp_path)
    assert records, "the margin never fired"
    assert all(r["fallback"] is None and r["victim"] is None for r in records)
    freed = [r["freed_bytes"] for r in records]
    assert all(isinstance(b, int) and b > 0 for b in freed), freed


def test_a_kernel_kill_is_logged_with_its_victim(memcg_factory: MemcgFactory,
                                                 tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """In a dry run the kernel's killer acts; /dev/kmsg tells the warden whom
    it killed and at which limit, and that becomes a decision-log record (no
    kill goes unexplained). (The BPF observer, which the daemon prefers, is
    kept out: tests/test_observer.py has its own.)"""
    need(os.access("/dev/kmsg", os.R_OK), "/dev/kmsg is not readable")
    monkeypatch.setenv("OOMWARDEN_BPF_OBSERVER", str(tmp_path / "missing.bpf.o"))
    cg = memcg_factory.create(limit_bytes=64 * MiB)
    warden = Warden(watch_config(tmp_path, cg, '["oom"]'), "--dry-run")
    try:
        warden.wait_for("watching 1 memory cgroup (oom)")
        grower = cg.start_grower(200)
        assert grower.proc.wait(timeout=20) == -9
        line = warden.wait_for(f"the kernel killed pid {grower.pid} ")
        assert f"at the limit of {cg.hierarchy_path}" in line
    finally:
        assert warden.stop() == 0
    kills = [r for r in decisions(tmp_path) if r["trigger"] == "kernel_kill"]
    assert len(kills) == 1, kills
    victim = kills[0]["victim"]
    assert isinstance(victim, dict) and victim["pid"] == grower.pid
    assert victim["cgroup"] == cg.hierarchy_path
    assert "Killed process" in str(kills[0]["event_detail"])


def test_the_oom_kill_line_is_parsed_by_position() -> None:
    line = ("oom-kill:constraint=CONSTRAINT_MEMCG,nodemask=(null),cpuset=/,mems_allowed=0,"
            "oom_memcg=/a,b,task_memcg=/a,b/c,task=x,task=y,pid=7,uid=0")
    assert parse_oom_kill(line) == {"constraint": "CONSTRAINT_MEMCG", "oom_memcg": "/a,b",
                                    "task_memcg": "/a,b/c", "task": "x,task=y", "pid": "7",
                                    "uid": "0"}
    # a process named ",oom_memcg=/app" dying in a global OOM is not /app's
    forged = ("oom-kill:constraint=CONSTRAINT_NONE,nodemask=(null),cpuset=/,mems_allowed=0,"
              "global_oom,task_memcg=/x,task=,oom_memcg=/app,pid=5,uid=0")
    fields = parse_oom_kill(forged)
    assert fields is not None and fields["oom_memcg"] == "" and fields["task_memcg"] == "/x"
    assert parse_oom_kill("oom-kill:garbage") is None
    src = KmsgSource("kernel", "", -1, 0)
    # facility 1 (user): a line anyone can write to /dev/kmsg is ignored
    src._take(f"12,1,0,-;{line}")
    src._take("12,2,0,-;Memory cgroup out of memory: Killed process 7 (x) total-vm:1kB")
    assert src.kills == []
    src._take(f"3,3,0,-;{line}")
    src._take("3,4,0,-;Memory cgroup out of memory: Killed process 7 (x) total-vm:1kB")
    (kill,) = src.kills
    assert (kill.pid, kill.oom_memcg, kill.task_memcg) == (7, "/a,b", "/a,b/c")
