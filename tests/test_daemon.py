"""The daemon on the real kernel: v1 user-space OOM handling in child memory
cgroups, the watchdog, dry runs, and the threshold trigger (dry run only,
as the system domain must be in tests).

Every cgroup here is a child of the test's own memory cgroup with a limit of
256 MiB; every process signalled was started by the test; the warden runs as
a subprocess and is always stopped.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import need
from kernelenv import ChildMemcg, Hog, MemcgFactory, Warden, decisions, remove_cgroup_dir

pytestmark = pytest.mark.kernel
MiB = 1024 * 1024


def config(tmp_path: Path, cg: ChildMemcg, policy: str = "kernel", extra: str = "") -> Path:
    path = tmp_path / "oomwarden.toml"
    path.write_text(f"""
decision_log = "{tmp_path / 'decisions.jsonl'}"
{extra}
[[watch]]
domain = "cgroup:{cg.hierarchy_path}"
triggers = ["oom"]
policy = "{policy}"
""")
    path.chmod(0o644)
    return path


def oom_control(cg: ChildMemcg) -> dict[str, int]:
    return {k: int(v) for k, v in (line.split() for line in cg.read("memory.oom_control")
                                   .splitlines())}


GROWER_MIB = 136  # needs more than the others leave; fits once one of them is gone


def scene(cg: ChildMemcg) -> tuple[Hog, Hog]:
    """A big process and a smaller one the kernel's formula prefers (adj 500)."""
    return cg.start_hog(80, adj=0), cg.start_hog(40, adj=500)


def wait_dead(hogs: list[Hog], timeout: float = 20.0) -> list[Hog]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        dead = [h for h in hogs if h.proc.poll() is not None]
        if dead:
            return dead
        time.sleep(0.02)
    return []


@pytest.fixture
def cg(memcg_factory: MemcgFactory) -> Iterator[ChildMemcg]:
    yield memcg_factory.create(limit_bytes=256 * MiB)


def test_the_warden_kills_instead_of_the_kernel(cg: ChildMemcg, tmp_path: Path) -> None:
    big, favoured = scene(cg)
    warden = Warden(config(tmp_path, cg))
    try:
        warden.wait_for("watching 1 memory cgroup")
        assert oom_control(cg)["oom_kill_disable"] == 1
        grower = cg.start_grower(GROWER_MIB)
        dead = wait_dead([big, favoured, grower])
        assert dead == [favoured] and favoured.proc.returncode == -9
        line = warden.wait_for("killed pid")
        assert str(favoured.pid) in line
        assert oom_control(cg)["oom_kill"] == 0  # the kernel killed nothing
        (record,) = decisions(tmp_path)
        assert record["trigger"] == "oom" and record["victim"]["pid"] == favoured.pid
        assert record["results"][0]["ok"] and record["fallback"] is None
    finally:
        assert warden.stop() == 0
    assert oom_control(cg)["oom_kill_disable"] == 0  # restored on exit


def test_dry_run_leaves_the_kernel_in_charge(cg: ChildMemcg, tmp_path: Path) -> None:
    big, favoured = scene(cg)
    warden = Warden(config(tmp_path, cg), "--dry-run")
    try:
        warden.wait_for("watching 1 memory cgroup")
        assert oom_control(cg)["oom_kill_disable"] == 0
        grower = cg.start_grower(GROWER_MIB)
        dead = wait_dead([big, favoured, grower])
        assert dead == [favoured]  # the kernel's own kill
        warden.wait_for("would kill pid")
        assert oom_control(cg)["oom_kill"] >= 1
        # The kernel acted first (its killer was never paused): the record says
        # what the warden would do next, and nothing was signalled by it. A
        # snapshot taken while the kernel's victim was still exiting may name
        # it; the executor then refuses it as gone, which signals nothing too.
        record = decisions(tmp_path)[0]
        assert record["dry_run"] and record["trigger"] == "oom"
        details = [str(r["detail"]) for r in record["results"]]
        assert details and all("dry run" in d or d.startswith("refused:") for d in details), details
        assert big.proc.poll() is None
    finally:
        assert warden.stop() == 0


def test_a_policy_that_raises_still_ends_the_oom(cg: ChildMemcg, tmp_path: Path) -> None:
    policy = tmp_path / "broken.py"
    policy.write_text("def evaluate(task, ctx):\n    raise RuntimeError('broken')\n")
    policy.chmod(0o644)
    big, favoured = scene(cg)
    warden = Warden(config(tmp_path, cg, str(policy)))
    try:
        warden.wait_for("watching 1 memory cgroup")
        grower = cg.start_grower(GROWER_MIB)
        assert wait_dead([big, favoured, grower]) == [favoured]
        warden.wait_for("killed pid")
        record = decisions(tmp_path)[0]
        assert "RuntimeError: broken" in str(record["fallback"])
        assert oom_control(cg)["oom_kill"] == 0
    finally:
        assert warden.stop() == 0


def test_sigkill_the_warden_mid_oom_the_kernel_takes_over(
    cg: ChildMemcg, tmp_path: Path
) -> None:
    policy = tmp_path / "slow.py"
    policy.write_text("import time\n\ndef evaluate(task, ctx):\n    time.sleep(30)\n")
    policy.chmod(0o644)
    big, favoured = scene(cg)
    warden = Warden(config(tmp_path, cg, str(policy), extra="budget_ms = 60000"))
    try:
        warden.wait_for("watching 1 memory cgroup")
        grower = cg.start_grower(GROWER_MIB)
        deadline = time.monotonic() + 20
        while oom_control(cg)["under_oom"] != 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.3)  # the warden is now inside its slow policy
        warden.proc.kill()
        warden.proc.wait(timeout=5)
        started = time.monotonic()
        dead = wait_dead([big, favoured, grower], timeout=5)
        assert dead and time.monotonic() - started < 2.0, "the cgroup hung"
        assert oom_control(cg)["oom_kill_disable"] == 0 and oom_control(cg)["oom_kill"] >= 1
    finally:
        warden.stop()


def _children(pid: int) -> list[int]:
    out: list[int] = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/children") as f:
            out.extend(int(x) for x in f.read().split())
    return out


def test_warden_and_watchdog_killed_together_then_restore(
    cg: ChildMemcg, tmp_path: Path
) -> None:
    """A SIGKILL of the whole unit takes the watchdog too: the state file
    names the paused cgroup, and `oomwarden restore` (ExecStopPost=) gives the
    kernel its killer back; a clean exit leaves no state file behind."""
    warden = Warden(config(tmp_path, cg))
    try:
        warden.wait_for("watching 1 memory cgroup")
        state = json.loads(warden.state_file.read_text())
        assert state["cgroups"] == [{"dir": str(cg.path), "inode": cg.path.stat().st_ino}]
        assert oom_control(cg)["oom_kill_disable"] == 1
        (watchdog,) = _children(warden.proc.pid)
        os.kill(watchdog, signal.SIGKILL)  # the watchdog first: it cannot restore
        warden.proc.kill()
        warden.proc.wait(timeout=5)
        time.sleep(0.2)
        assert oom_control(cg)["oom_kill_disable"] == 1  # nobody restored it
        done = subprocess.run([sys.executable, "-m", "oomwarden.cli", "restore",
                               "--state-file", str(warden.state_file)],
                              capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0, done.stderr
        assert f"restored the kernel's OOM killer in {cg.path}" in done.stderr
        assert oom_control(cg)["oom_kill_disable"] == 0
        assert not warden.state_file.exists()
        again = subprocess.run([sys.executable, "-m", "oomwarden.cli", "restore",
                                "--state-file", str(warden.state_file)],
                               capture_output=True, text=True, timeout=60, check=False)
        assert again.returncode == 0 and "nothing to restore" in again.stderr
    finally:
        warden.stop()
    clean = Warden(config(tmp_path, cg))
    try:
        clean.wait_for("watching 1 memory cgroup")
        assert clean.state_file.exists()
    finally:
        assert clean.stop() == 0
    assert not clean.state_file.exists() and oom_control(cg)["oom_kill_disable"] == 0


def test_restore_refuses_a_garbled_state_file_in_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "paused.json"
    for text in ("{", '{"version": 1, "cgroups": [{"dir": "relative", "inode": 1}]}',
                 '{"version": 2, "cgroups": []}', "[]"):
        bad.write_text(text)
        done = subprocess.run([sys.executable, "-m", "oomwarden.cli", "restore",
                               "--state-file", str(bad)],
                              capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 2, text
        assert done.stderr.strip().splitlines() == [
            f"oomwarden: error: {bad}: not a state file written by oomwarden"], text
    bad.write_text(json.dumps({"version": 1, "cgroups": [{"dir": str(tmp_path), "inode": 1}]}))
    done = subprocess.run([sys.executable, "-m", "oomwarden.cli", "restore",
                           "--state-file", str(bad)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0 and "not on a cgroup v1 filesystem" in done.stderr


def test_threshold_dry_run_on_the_system(tmp_path: Path) -> None:
    """The system domain in a test: dry run only. A level of 100% is always
    reached, so the threshold fires and the decision is logged, signalling
    nothing."""
    path = tmp_path / "oomwarden.toml"
    path.write_text(f"""
decision_log = "{tmp_path / 'decisions.jsonl'}"
[[watch]]
domain = "system"
triggers = ["threshold"]
policy = "largest"
dry_run = true
[watch.threshold]
mem_available_percent = 100
swap_free_percent = 100
""")
    path.chmod(0o644)
    warden = Warden(path, "--dry-run")
    try:
        warden.wait_for("would kill pid")
        record = decisions(tmp_path)[0]
        assert record["trigger"] == "threshold" and record["dry_run"]
        assert record["domain"] == "system" and record["policy"] == "largest"
        assert all("dry run" in r["detail"] for r in record["results"])
    finally:
        assert warden.stop() == 0


def test_unsupported_triggers_are_refused_at_start(cg: ChildMemcg, tmp_path: Path) -> None:
    path = tmp_path / "oomwarden.toml"
    path.write_text(f"""
decision_log = "{tmp_path / 'decisions.jsonl'}"
[[watch]]
domain = "cgroup:{cg.hierarchy_path}"
triggers = ["events"]
policy = "kernel"
""")
    path.chmod(0o644)
    done = subprocess.run([sys.executable, "-m", "oomwarden.cli", "run", "--config", str(path),
                           "--dry-run"], capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 2
    last = done.stderr.splitlines()[-1]
    assert "'events' trigger on a cgroup v1 domain is not implemented" in last
    assert "cgroup v1 has no memory.events" in last


def test_system_pressure_sets_up_a_psi_trigger_and_stops_cleanly(tmp_path: Path) -> None:
    """A dry run on the system domain (the only way a test may watch it):
    the PSI trigger on /proc/pressure/memory is accepted by the kernel (a
    2 s window: CAP_SYS_RESOURCE is missing here), and SIGTERM ends it."""
    need(os.path.exists("/proc/pressure/memory"), "no PSI (/proc/pressure/memory)")
    path = tmp_path / "oomwarden.toml"
    path.write_text(f"""
decision_log = "{tmp_path / 'decisions.jsonl'}"
[[watch]]
domain = "system"
triggers = ["pressure", "threshold"]
policy = "kernel"
[watch.pressure]
full_avg10 = 50
window_s = 2
""")
    path.chmod(0o644)
    warden = Warden(path, "--dry-run")
    try:
        warden.wait_for("the system (threshold, pressure)")
    finally:
        assert warden.stop() == 0


def test_sighup_with_a_bad_config_keeps_the_old_one(cg: ChildMemcg, tmp_path: Path) -> None:
    big, favoured = scene(cg)
    path = config(tmp_path, cg)
    warden = Warden(path)
    try:
        warden.wait_for("watching 1 memory cgroup")
        good = path.read_text()
        path.write_text(good + "\n[[watch]]\ndomain = 42\n")
        warden.proc.send_signal(signal.SIGHUP)
        warden.wait_for("reload failed, keeping the running config")
        assert oom_control(cg)["oom_kill_disable"] == 1
        grower = cg.start_grower(GROWER_MIB)
        assert wait_dead([big, favoured, grower]) == [favoured]
        warden.wait_for("killed pid")
        assert oom_control(cg)["oom_kill"] == 0
        path.write_text(good.replace('policy = "kernel"', 'policy = "largest"'))
        warden.proc.send_signal(signal.SIGHUP)
        warden.wait_for("reloaded: watching 1 memory cgroup")
        assert oom_control(cg)["oom_kill_disable"] == 1
    finally:
        assert warden.stop() == 0
    assert oom_control(cg)["oom_kill_disable"] == 0


def test_sighup_naming_a_vanished_cgroup_keeps_the_running_watch(
    cg: ChildMemcg, tmp_path: Path
) -> None:
    """A new config that parses but names a cgroup that is not there is
    refused before the running watch is given up: the cgroup stays covered."""
    big, favoured = scene(cg)
    path = config(tmp_path, cg)
    warden = Warden(path)
    try:
        warden.wait_for("watching 1 memory cgroup")
        good = path.read_text()
        path.write_text(good.replace(cg.hierarchy_path, cg.hierarchy_path + "/gone"))
        warden.proc.send_signal(signal.SIGHUP)
        warden.wait_for("reload failed, keeping the running config")
        assert warden.proc.poll() is None
        assert oom_control(cg)["oom_kill_disable"] == 1
        grower = cg.start_grower(GROWER_MIB)
        assert wait_dead([big, favoured, grower]) == [favoured]
        warden.wait_for("killed pid")
        assert oom_control(cg)["oom_kill"] == 0
    finally:
        assert warden.stop() == 0
    assert oom_control(cg)["oom_kill_disable"] == 0


def test_it_tells_systemd_it_is_ready(cg: ChildMemcg, tmp_path: Path) -> None:
    sock_path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(sock_path))
        sock.settimeout(20)
        env = {**os.environ, "NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "2000000"}
        proc = subprocess.Popen([sys.executable, "-m", "oomwarden.cli", "run", "--config",
                                 str(config(tmp_path, cg)), "--dry-run", "--socket", "none"],
                                env=env, stderr=subprocess.DEVNULL)
        try:
            messages = {sock.recv(256).decode() for _ in range(2)}
            assert messages == {"READY=1", "WATCHDOG=1"}
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=10) == 0


def test_actions_that_do_not_end_the_oom_hand_it_to_the_kernel(
    cg: ChildMemcg, tmp_path: Path
) -> None:
    """A handler whose kill succeeds but frees too little (a small sleeper)
    must not leave the cgroup paused: the warden hands the OOM to the kernel."""
    sleeper = subprocess.Popen(
        [sys.executable, "-c", "import os, time\n"
         f"open({str(cg.path / 'cgroup.procs')!r}, 'w').write(str(os.getpid()))\n"
         "print('in', flush=True)\ntime.sleep(60)\n"], stdout=subprocess.PIPE)
    policy = tmp_path / "small.py"
    policy.write_text("from oomwarden.policy import KillProcess\n\n"
                      "def handle(event, ctx):\n"
                      f"    t = next(t for t in ctx.tasks if t.pid == {sleeper.pid})\n"
                      "    return [KillProcess(t.pid, t.start_ticks, 'small')]\n")
    policy.chmod(0o644)
    try:
        assert sleeper.stdout is not None and sleeper.stdout.readline().strip() == b"in"
        big, favoured = scene(cg)
        warden = Warden(config(tmp_path, cg, str(policy)))
        try:
            warden.wait_for("watching 1 memory cgroup")
            grower = cg.start_grower(GROWER_MIB)
            warden.wait_for("the actions did not end the OOM")
            dead = wait_dead([big, favoured, grower], timeout=10)
            assert dead and oom_control(cg)["oom_kill"] >= 1  # the kernel resolved it
        finally:
            assert warden.stop() == 0
        assert sleeper.wait(timeout=5) == -9
        assert oom_control(cg)["oom_kill_disable"] == 0
    finally:
        sleeper.kill()
        sleeper.wait(timeout=5)
        if sleeper.stdout is not None:
            sleeper.stdout.close()


def test_a_handler_freeing_nothing_and_no_selection_hands_over(
    cg: ChildMemcg, tmp_path: Path
) -> None:
    """A handler whose action "succeeds" but frees nothing is followed by the
    per-task selection; when that chooses nothing too, the kernel takes over."""
    policy = tmp_path / "noop.py"
    policy.write_text("from oomwarden.policy import IGNORE, RunHook\n\n"
                      "def handle(event, ctx):\n    return [RunHook(('/bin/true',))]\n\n"
                      "def evaluate(task, ctx):\n    return IGNORE\n")
    policy.chmod(0o644)
    big, favoured = scene(cg)
    warden = Warden(config(tmp_path, cg, str(policy)))
    try:
        warden.wait_for("watching 1 memory cgroup")
        grower = cg.start_grower(GROWER_MIB)
        warden.wait_for("the policy chose nothing; the kernel's own killer resolves")
        dead = wait_dead([big, favoured, grower], timeout=10)
        assert dead and oom_control(cg)["oom_kill"] >= 1  # the kernel resolved it
    finally:
        assert warden.stop() == 0
    assert oom_control(cg)["oom_kill_disable"] == 0
    first, second = decisions(tmp_path)[:2]
    assert [a["action"] for a in first["actions"]] == ["run_hook"]  # type: ignore[union-attr]
    assert "freed nothing" in str(second["fallback"]) and second["victim"] is None


def test_a_child_made_while_paused_is_restored_too(cg: ChildMemcg, tmp_path: Path) -> None:
    warden = Warden(config(tmp_path, cg))
    child = cg.path / "made-while-paused"
    try:
        warden.wait_for("watching 1 memory cgroup")
        child.mkdir()
        assert "oom_kill_disable 1" in (child / "memory.oom_control").read_text()
    finally:
        assert warden.stop() == 0
        try:
            assert "oom_kill_disable 0" in (child / "memory.oom_control").read_text()
        finally:
            child.rmdir()


def test_the_warden_refuses_to_watch_its_own_cgroup(tmp_path: Path) -> None:
    own = Path("/proc/self/cgroup").read_text().split(":memory:", 1)[1].split("\n")[0]
    path = tmp_path / "oomwarden.toml"
    path.write_text(f'decision_log = "{tmp_path / "d.jsonl"}"\n[[watch]]\n'
                    f'domain = "cgroup:{own}"\ntriggers = ["oom"]\npolicy = "kernel"\n')
    path.chmod(0o644)
    done = subprocess.run([sys.executable, "-m", "oomwarden.cli", "run", "--config", str(path)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2 and "the warden itself runs in" in done.stderr


def test_the_watchdog_survives_sigterm_and_restores(cg: ChildMemcg) -> None:
    sleeper = subprocess.Popen(["sleep", "30"])
    watchdog = subprocess.Popen([sys.executable, "-m", "oomwarden.watchdog", str(sleeper.pid),
                                 str(cg.path)], stdout=subprocess.PIPE)
    try:
        assert watchdog.stdout is not None and watchdog.stdout.readline() == b"watching\n"
        cg.write("memory.oom_control", "1")
        watchdog.send_signal(signal.SIGTERM)
        watchdog.send_signal(signal.SIGINT)
        time.sleep(0.2)
        assert watchdog.poll() is None  # deaf to both
        sleeper.kill()
        sleeper.wait(timeout=5)
        assert watchdog.wait(timeout=5) == 0
        assert oom_control(cg)["oom_kill_disable"] == 0
    finally:
        sleeper.kill()
        sleeper.wait(timeout=5)
        watchdog.kill()
        watchdog.wait(timeout=5)
        if watchdog.stdout is not None:
            watchdog.stdout.close()
        cg.write("memory.oom_control", "0")


def test_the_priority_policy_kills_the_batch_job_not_the_largest(
    cg: ChildMemcg, tmp_path: Path
) -> None:
    """Inside the watched cgroup, a small batch job and a large web process: the
    kernel would kill the larger; `priority` kills the batch class first."""
    batch, web = cg.path / "batch-job", cg.path / "web"
    batch.mkdir()
    web.mkdir()
    try:
        small = cg.start_hog(40)
        large = cg.start_hog(100)
        (batch / "cgroup.procs").write_text(str(small.pid))
        (web / "cgroup.procs").write_text(str(large.pid))
        warden = Warden(config(tmp_path, cg, "priority"))
        try:
            warden.wait_for("watching 1 memory cgroup")
            grower = cg.start_grower(120)
            dead = wait_dead([small, large, grower])
            assert dead == [small] and small.proc.returncode == -9
            record = decisions(tmp_path)[0]
            assert record["victim"]["pid"] == small.pid
            kernel_choice = max(record["candidates"], key=lambda c: c["kernel_points"])
            assert kernel_choice["pid"] != small.pid  # the kernel would have chosen another
            assert oom_control(cg)["oom_kill"] == 0
        finally:
            assert warden.stop() == 0
    finally:
        for hog in cg.hogs:
            hog.proc.kill()
            hog.proc.wait(timeout=5)
        for sub in (batch, web):
            remove_cgroup_dir(sub)


def test_a_left_over_state_file_is_restored_at_start(cg: ChildMemcg, tmp_path: Path) -> None:
    """A warden killed with its watchdog and no `oomwarden restore` since: the
    next warden restores what the state file lists before it pauses anything,
    and says so."""
    warden = Warden(config(tmp_path, cg))
    try:
        warden.wait_for("watching 1 memory cgroup")
        (watchdog,) = _children(warden.proc.pid)
        os.kill(watchdog, signal.SIGKILL)
        warden.proc.kill()
        warden.proc.wait(timeout=5)
    finally:
        warden.stop()
    assert warden.state_file.exists() and oom_control(cg)["oom_kill_disable"] == 1
    again = Warden(config(tmp_path, cg))
    try:
        again.wait_for(f"left over by a warden that was killed: restored the kernel's OOM "
                       f"killer in {cg.path}")
        again.wait_for("watching 1 memory cgroup")
    finally:
        assert again.stop() == 0
    assert not again.state_file.exists() and oom_control(cg)["oom_kill_disable"] == 0


def test_a_state_file_of_a_running_warden_is_not_touched(cg: ChildMemcg,
                                                         tmp_path: Path) -> None:
    """Two wardens on one state file: the second refuses to start, in one
    line, and the first's paused cgroup stays paused (by the first)."""
    first = Warden(config(tmp_path, cg))
    try:
        first.wait_for("watching 1 memory cgroup")
        other = tmp_path / "other"
        other.mkdir()
        done = subprocess.run(
            [sys.executable, "-m", "oomwarden.cli", "run", "--dry-run", "--socket", "none",
             "--config",
             str(config(other, cg)), "--state-file", str(first.state_file)],
            capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 2
        assert f"belongs to a warden that is running (pid {first.proc.pid})" in \
            done.stderr.splitlines()[-1]
        assert oom_control(cg)["oom_kill_disable"] == 1 and first.state_file.exists()
    finally:
        assert first.stop() == 0
