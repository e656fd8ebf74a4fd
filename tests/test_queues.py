"""Victim queues in the live daemon (cgroup v1 here): the queue's head goes
before the policy's choice, a dead head is skipped, a cgroup removed and made
again under the same name is not hit.

Every cgroup is a child of the test's own memory cgroup (limit 256 MiB); every
process signalled was started by the test; the warden is a subprocess,
always stopped; its control socket lives in a short temporary directory.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from oomwarden.control import RequestError, call
from test_daemon import GROWER_MIB, config, oom_control, scene, wait_dead

from kernelenv import ChildMemcg, MemcgFactory, Warden, decisions, remove_cgroup_dir

pytestmark = pytest.mark.kernel
MiB = 1024 * 1024


@pytest.fixture
def sock(sockdir: Path) -> str:
    return str(sockdir / "c.sock")


@pytest.fixture
def cg(memcg_factory: MemcgFactory) -> ChildMemcg:
    return memcg_factory.create(limit_bytes=256 * MiB)


def queue(sock: str, **fields: object) -> dict[str, object]:
    return call(sock, {"op": "victim.add", **fields})


def sleeper(cg: ChildMemcg) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [sys.executable, "-c", "import os, time\n"
         f"open({str(cg.path / 'cgroup.procs')!r}, 'w').write(str(os.getpid()))\n"
         "print('in', flush=True)\ntime.sleep(60)\n"], stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline().strip() == b"in"
    return proc


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=10)
    if proc.stdout is not None:
        proc.stdout.close()


def test_the_queue_head_dies_before_the_policys_choice(cg: ChildMemcg, tmp_path: Path,
                                                       sock: str) -> None:
    """The kernel policy would kill `favoured` (oom_score_adj 500); `big` was
    queued, so `big` dies and `favoured` lives. A queued process that exits
    first leaves the queue (logged) and is skipped."""
    big, favoured = scene(cg)
    early = sleeper(cg)
    warden = Warden(config(tmp_path, cg), "--socket", sock)
    try:
        warden.wait_for("watching 1 memory cgroup")
        first = queue(sock, pid=early.pid)["entry"]
        second = queue(sock, pid=big.pid)["entry"]
        assert isinstance(first, dict) and isinstance(second, dict)
        assert first["domain"] == second["domain"] == f"cgroup:{cg.hierarchy_path}"
        stop(early)
        warden.wait_for(f"queue entry {first['id']}: pid {early.pid}")  # (its exit logged)
        grower = cg.start_grower(GROWER_MIB)
        warden.wait_for(f"queue entry {second['id']}: pid {big.pid}")
        assert wait_dead([big, favoured, grower]) == [big]
        assert big.proc.wait(timeout=5) == -9 and favoured.proc.poll() is None
        assert call(sock, {"op": "victim.list"})["entries"] == []
        status = call(sock, {"op": "status"})
        assert status["last_decisions"][-1]["queue_entry"] == second["id"]  # type: ignore[index]
    finally:
        stop(early)
        assert warden.stop() == 0
    records = decisions(tmp_path)
    exited = [r for r in records if r["trigger"] == "queue"]
    assert exited and exited[0]["queue"]["skipped"][0]["fate"] == "exited"  # type: ignore[index]
    (kill,) = [r for r in records if r["policy"] == "queue" and r["trigger"] == "oom"]
    assert kill["queue"]["head"]["pid"] == big.pid  # type: ignore[index]
    assert kill["queue"]["head"]["fate"] == "killed"  # type: ignore[index]
    assert oom_control(cg)["oom_kill"] == 0


def test_a_cgroup_made_again_under_the_queued_name_is_not_hit(cg: ChildMemcg, tmp_path: Path,
                                                              sock: str) -> None:
    """A queued cgroup is held by its inode: removed and made again under the
    same name, it is another cgroup. The OOM goes to the policy, and the
    process in the new cgroup lives."""
    child = cg.path / "batch"
    child.mkdir()
    innocent = None
    warden = Warden(config(tmp_path, cg), "--socket", sock)
    try:
        warden.wait_for("watching 1 memory cgroup")
        entry = queue(sock, cgroup=f"{cg.hierarchy_path}/batch")["entry"]
        assert isinstance(entry, dict) and entry["kind"] == "cgroup"
        child.rmdir()
        child.mkdir()
        innocent = subprocess.Popen(
            [sys.executable, "-c", "import os, time\n"
             f"open({str(child / 'cgroup.procs')!r}, 'w').write(str(os.getpid()))\n"
             "print('in', flush=True)\ntime.sleep(60)\n"], stdout=subprocess.PIPE)
        assert innocent.stdout is not None and innocent.stdout.readline().strip() == b"in"
        big, favoured = scene(cg)
        grower = cg.start_grower(GROWER_MIB)
        warden.wait_for("killed pid")
        assert wait_dead([big, favoured, grower])
        time.sleep(0.3)
        assert innocent.poll() is None
    finally:
        if innocent is not None:
            stop(innocent)
        assert warden.stop() == 0
        remove_cgroup_dir(child)
    stale = [r for r in decisions(tmp_path) if r.get("queue")]
    assert stale, "the stale entry left no record"
    skipped = stale[0]["queue"]["skipped"]  # type: ignore[index]
    assert skipped[0]["id"] == entry["id"]
    assert "made again: another inode" in skipped[0]["fate"]


def test_explain_status_and_reload_over_the_socket(cg: ChildMemcg, tmp_path: Path,
                                                   sock: str) -> None:
    big, favoured = scene(cg)
    path = config(tmp_path, cg)
    warden = Warden(path, "--dry-run", "--socket", sock)
    try:
        warden.wait_for(f"serving the control socket at {sock}")
        decision = call(sock, {"op": "explain", "cgroup": cg.hierarchy_path, "top": 2})
        body = decision["decision"]
        assert isinstance(body, dict) and body["domain"] == f"cgroup:{cg.hierarchy_path}"
        assert body["victim"]["pid"] == favoured.pid  # the kernel's choice (adj 500)
        assert len(body["candidates"]) == 2 and "exe" not in body["victim"]
        with pytest.raises(RequestError) as refused:
            call(sock, {"op": "explain", "policy": str(tmp_path / "evil.py")})
        assert refused.value.code == "forbidden"
        status = call(sock, {"op": "status"})
        assert status["dry_run"] is True and status["config"] == str(path)
        assert [w["domain"] for w in status["watches"]] == [  # type: ignore[union-attr]
            f"cgroup:{cg.hierarchy_path}"]
        assert call(sock, {"op": "reload"}) == {"config": str(path), "watches": 1}
        warden.wait_for("reloaded:")
        path.write_text(path.read_text() + "\nbogus = 1\n")
        with pytest.raises(RequestError) as bad:
            call(sock, {"op": "reload"})
        assert bad.value.code == "bad_config" and "bogus" in bad.value.message
        assert call(sock, {"op": "status"})["watches"]  # still watching, old config
    finally:
        assert warden.stop() == 0
    assert not os.path.exists(sock)
    assert big.proc.poll() is None
