"""Replay: the triggers a trace shows, the history policies get, the CLI of
``record`` and ``replay``, and, on the real kernel, a recorded OOM replayed
against what the daemon did."""

from __future__ import annotations

import dataclasses
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import MappingProxyType

import pytest

from oomwarden.model import Cgroup, HierarchyKind, OomControl, Snapshot
from oomwarden.policy.registry import load_policy
from oomwarden.replay import (
    PolicyRun,
    ReplayError,
    Triggers,
    fired,
    parse_triggers,
    replay,
)
from oomwarden.sources.procfs import ReadOptions
from oomwarden.sources.snapshot import SourceConfig, build_snapshot
from oomwarden.trace import TraceRecord, TraceStats, open_trace, read_trace
from test_daemon import config, wait_dead

from conftest import need
from kernelenv import MemcgFactory, Warden, decisions

FIXTURES = Path(__file__).parent / "fixtures"
PAGE = 4096
MiB = 1 << 20
S = 10**9
CLI = [sys.executable, "-m", "oomwarden.cli"]


def hybrid() -> Snapshot:
    root = FIXTURES / "hybrid"
    return build_snapshot(SourceConfig(
        proc_root=str(root / "proc"), fs_root=str(root), verify_fs=False, page_size=PAGE,
        read=ReadOptions(oom_score=True)))


def limited(snap: Snapshot) -> Cgroup:
    """The v1 memory cgroup of the fixture with tasks and a limit of its own
    (1 GiB). Chosen by its limit, not by its place in the list: the list
    follows the order a directory is read in, which differs between clones
    (CI once got the unlimited sibling, and the `oom` point, rightly, did
    not come)."""
    return min((c for c in snap.cgroups if c.kind is HierarchyKind.V1 and c.memory_controller
                and c.path != "/" and c.pids and c.limit is not None and c.limit < 1 << 40),
               key=lambda c: c.path)


def with_cgroup(snap: Snapshot, cg: Cgroup, **changes: object) -> tuple[Snapshot, Cgroup]:
    new = dataclasses.replace(cg, **changes)  # type: ignore[arg-type]
    return dataclasses.replace(snap, cgroups=tuple(new if c is cg else c
                                                   for c in snap.cgroups)), new


def at(snap: Snapshot, seconds: float) -> Snapshot:
    return dataclasses.replace(snap, taken_ns=snap.taken_ns + int(seconds * S))


ONLY_CGROUPS = Triggers(threshold=None, pressure=None)


def test_margin_and_oom_triggers() -> None:
    base = hybrid()
    cg = limited(base)
    quiet, cg0 = with_cgroup(base, cg, limit=100 * MiB, usage=50 * MiB,
                             stat=MappingProxyType({"total_inactive_file": 0}),
                             oom_control=OomControl(True, False, 0))
    near, _ = with_cgroup(quiet, cg0, usage=95 * MiB)
    cached, _ = with_cgroup(quiet, cg0, usage=95 * MiB,
                            stat=MappingProxyType({"total_inactive_file": 40 * MiB}))
    under, _ = with_cgroup(quiet, cg0, oom_control=OomControl(True, True, 0))
    killed, _ = with_cgroup(quiet, cg0, oom_control=OomControl(True, False, 1))
    assert fired(0, quiet, None, ONLY_CGROUPS, system=False, cgroups=None) == []
    (f,) = fired(1, near, quiet, ONLY_CGROUPS, system=False, cgroups=None)
    assert (f.index, f.cgroup, f.trigger) == (1, (cg.kind, cg.path), "margin")
    # page cache reclaim drops at once is no reason: the working set is 55 MiB
    assert fired(1, cached, quiet, ONLY_CGROUPS, system=False, cgroups=None) == []
    (f,) = fired(1, under, quiet, ONLY_CGROUPS, system=False, cgroups=None)
    assert (f.index, f.trigger) == (1, "oom")
    # a kill seen in the counters: the point is the snapshot before it
    (f,) = fired(5, killed, quiet, ONLY_CGROUPS, system=False, cgroups=None)
    assert (f.index, f.trigger) == (4, "oom")


def v2_pair(base: Snapshot, *, a_limit: int | None, b_limit: int | None,
            a_events: dict[str, int], b_events: dict[str, int]) -> Snapshot:
    """The fixture with two v2 memory cgroups /a and /a/b (None: no limit)."""
    model = next(c for c in base.cgroups if c.kind is HierarchyKind.V2 and c.path != "/")
    unlimited = 9223372036854771712

    def make(path: str, inode: int, limit: int | None, events: dict[str, int]) -> Cgroup:
        return dataclasses.replace(model, path=path, fs_path="/sys/fs/cgroup" + path,
                                   inode=inode, memory_controller=True, usage=50 * MiB,
                                   limit=unlimited if limit is None else limit,
                                   events=MappingProxyType(events), pids=())

    return dataclasses.replace(base, cgroups=(*base.cgroups, make("/a", 91, a_limit, a_events),
                                              make("/a/b", 92, b_limit, b_events)))


NO_EVENTS = {"oom": 0, "oom_kill": 0, "max": 0}
ONE_OOM = {"oom": 1, "oom_kill": 1, "max": 3}
OOM_ONLY = Triggers(margin_percent=None, threshold=None, pressure=None)


def test_v2_oom_counts_are_hierarchical_the_point_is_the_limited_cgroup() -> None:
    base = hybrid()
    # one OOM in /a/b (limited) counts in /a too: one point, for /a/b
    quiet = v2_pair(base, a_limit=None, b_limit=100 * MiB, a_events=NO_EVENTS,
                    b_events=NO_EVENTS)
    oom = v2_pair(base, a_limit=None, b_limit=100 * MiB, a_events=ONE_OOM, b_events=ONE_OOM)
    (f,) = fired(3, oom, quiet, OOM_ONLY, system=False, cgroups=None)
    assert (f.index, f.cgroup, f.trigger) == (2, (HierarchyKind.V2, "/a/b"), "oom")
    # oom and oom_kill reported apart (one OOM is not "0 -> 2")
    assert "oom 0 -> 1, oom_kill 0 -> 1" in f.detail
    # both limited: the rise in /a is explained by /a/b's own
    quiet = v2_pair(base, a_limit=200 * MiB, b_limit=100 * MiB, a_events=NO_EVENTS,
                    b_events=NO_EVENTS)
    oom = v2_pair(base, a_limit=200 * MiB, b_limit=100 * MiB, a_events=ONE_OOM,
                  b_events=ONE_OOM)
    assert [f.cgroup for f in fired(3, oom, quiet, OOM_ONLY, system=False, cgroups=None)] == \
        [(HierarchyKind.V2, "/a/b")]
    # /a's own limit reached, the victim in /a/b (no limit there): the point is /a
    quiet = v2_pair(base, a_limit=200 * MiB, b_limit=None, a_events=NO_EVENTS,
                    b_events=NO_EVENTS)
    oom = v2_pair(base, a_limit=200 * MiB, b_limit=None, a_events=ONE_OOM,
                  b_events={"oom": 0, "oom_kill": 1, "max": 0})
    assert [f.cgroup for f in fired(3, oom, quiet, OOM_ONLY, system=False, cgroups=None)] == \
        [(HierarchyKind.V2, "/a")]
    # a cgroup with no limit of its own is never an OOM point
    quiet = v2_pair(base, a_limit=None, b_limit=None, a_events=NO_EVENTS, b_events=NO_EVENTS)
    oom = v2_pair(base, a_limit=None, b_limit=None, a_events=ONE_OOM, b_events=ONE_OOM)
    assert fired(3, oom, quiet, OOM_ONLY, system=False, cgroups=None) == []


def test_v1_under_oom_only_for_the_top_limited_cgroup() -> None:
    base = hybrid()
    cg = limited(base)  # /process_api/<id>, below the unlimited /process_api
    parent = base.cgroup(HierarchyKind.V1, "/process_api")
    assert parent is not None and cg.path.startswith("/process_api/")
    snap, _ = with_cgroup(base, cg, limit=100 * MiB, oom_control=OomControl(True, True, 0))
    snap, _ = with_cgroup(snap, parent, oom_control=OomControl(True, True, 0))
    # the parent (no limit of its own) is not a point; the child is below an
    # under_oom parent (the kernel marks the subtree), so it is not either
    assert fired(0, snap, None, OOM_ONLY, system=False, cgroups=None) == []
    snap, _ = with_cgroup(base, cg, limit=100 * MiB, oom_control=OomControl(True, True, 0))
    assert [f.cgroup for f in fired(0, snap, None, OOM_ONLY, system=False, cgroups=None)] \
        == [(HierarchyKind.V1, cg.path)]


def test_threshold_and_pressure_on_the_system() -> None:
    base = hybrid()
    mem = base.system
    low = dataclasses.replace(base, system=dataclasses.replace(
        mem, mem_available=mem.mem_total // 20, swap_total=0, swap_free=0))
    names = [f.trigger for f in fired(0, low, None, Triggers(), system=True, cgroups=[])]
    assert names == ["threshold"]
    assert fired(0, low, None, Triggers(), system=False, cgroups=[]) == []
    assert mem.pressure is not None
    stalled = dataclasses.replace(base, system=dataclasses.replace(
        mem, pressure=dataclasses.replace(mem.pressure, some=dataclasses.replace(
            mem.pressure.some, avg10=30.0))))
    trig = parse_triggers(["pressure:some=25"])
    assert [f.trigger for f in fired(0, stalled, None, trig, system=True, cgroups=[])] == \
        ["pressure"]


@pytest.mark.parametrize("spec", ["bogus", "margin:x", "margin:150", "threshold:1:2:3",
                                  "pressure:half=3", "oom:1"])
def test_bad_triggers_are_refused(spec: str) -> None:
    with pytest.raises(ReplayError, match="--trigger"):
        parse_triggers([spec])


def test_replay_gives_growth_the_daemons_history() -> None:
    base = hybrid()
    records = [TraceRecord(i, i, at(base, i * 0.4)) for i in range(6)]
    runs = [PolicyRun("kernel", load_policy("kernel")), PolicyRun("growth",
                                                                   load_policy("growth"))]
    points = list(replay(records, runs, every=True, triggers=Triggers(
        oom=False, margin_percent=None, threshold=None, pressure=None)))
    assert [p.index for p in points] == list(range(6))
    assert all(p.triggers == ("every",) and p.domain.name == "system" for p in points)
    # the newest snapshot at least 1 s older; before there is one, the oldest
    assert [p.history_s for p in points] == [None, pytest.approx(0.4), pytest.approx(0.8),
                                             pytest.approx(1.2), pytest.approx(1.2),
                                             pytest.approx(1.2)]
    doc = points[3].to_json()
    assert set(doc["decisions"]) == {"kernel", "growth"} and "agree" in doc


def test_replay_of_one_cgroup_at_a_counter_rise() -> None:
    base = hybrid()
    cg = limited(base)
    before, cg0 = with_cgroup(base, cg, oom_control=OomControl(True, False, 0))
    after, _ = with_cgroup(at(before, 1), cg0, oom_control=OomControl(True, False, 1))
    records = [TraceRecord(0, 0, before), TraceRecord(1, 1, after)]
    (point,) = replay(records, [PolicyRun("kernel", load_policy("kernel"))],
                      cgroup=f"v1:{cg.path}")
    assert point.index == 0 and point.triggers == ("oom",)
    assert point.domain.name == f"cgroup:{cg.path}"


# -- the commands ---------------------------------------------------------------------------


def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout,
                          check=False)


def test_record_then_replay(tmp_path: Path) -> None:
    out = tmp_path / "t.trace"
    done = run("record", "--out", str(out), "--interval", "0.2", "--duration", "0.7")
    assert done.returncode == 0, done.stderr
    assert "recorded" in done.stderr and "B per snapshot per 1,000 tasks" in done.stderr
    header, records, complete = read_trace(str(out))
    assert complete and 3 <= len(records) <= 5
    assert header.options["interval_s"] == 0.2 and header.host["page_size"] > 0
    shown = run("replay", str(out), "--every", "--json", "--policy", "kernel",
                "--policy", "largest")
    assert shown.returncode == 0, shown.stderr
    lines = [json.loads(x) for x in shown.stdout.splitlines()]
    assert [x["record"] for x in lines] == list(range(len(records)))
    assert all(set(x["decisions"]) == {"kernel", "largest"} for x in lines)
    table = run("replay", str(out), "--every", "--policy", "kernel", "--policy", "growth")
    assert table.returncode == 0 and "replay:" in table.stdout and "agree" in table.stdout


def test_the_recorder_goes_on_when_its_stderr_reader_is_gone(tmp_path: Path) -> None:
    out = tmp_path / "t.trace"
    proc = subprocess.Popen([*CLI, "record", "--out", str(out), "--interval", "0.2",
                             "--duration", "1.5"], stderr=subprocess.PIPE)
    assert proc.stderr is not None
    proc.stderr.close()  # the progress line's reader goes away at once
    try:
        code = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)
    reader, raw = open_trace(str(out))
    with raw:
        records = list(reader)
    assert code == 0
    assert reader.complete and reader.end_reason == "duration" and len(records) >= 6


def test_the_live_figure_is_the_steady_state_one() -> None:
    stats = TraceStats(snapshots=1, tasks=1000, bytes_written=30_000, first_bytes=30_000,
                       first_tasks=1000)
    assert stats.steady_bytes_per_kilotask is None
    stats = dataclasses.replace(stats, snapshots=3, tasks=3000, bytes_written=32_000)
    assert stats.steady_bytes_per_kilotask == 1000  # 2,000 B over 2,000 tasks


EARLYOOM_PREFER_AVOID = str(Path(__file__).parent.parent / "examples" / "policies"
                            / "earlyoom-prefer-avoid.toml")


def test_replay_warns_when_a_name_policy_meets_a_trace_without_details(tmp_path: Path
                                                                       ) -> None:
    plain, detailed = tmp_path / "plain.trace", tmp_path / "detailed.trace"
    assert run("record", "--out", str(plain), "--duration", "0.1").returncode == 0
    assert run("record", "--out", str(detailed), "--duration", "0.1",
               "--details").returncode == 0
    for mode in ([], ["--json"]):
        shown = run("replay", str(plain), "--every", *mode, "--policy", "kernel",
                    "--policy", EARLYOOM_PREFER_AVOID)
        assert shown.returncode == 0, shown.stderr
        (warning,) = [x for x in shown.stderr.splitlines() if "warning" in x]
        assert EARLYOOM_PREFER_AVOID in warning and "exe/cmdline" in warning
        assert "--details" in warning and "kernel " not in warning
        if mode:
            (doc,) = [json.loads(x) for x in shown.stdout.splitlines()]
            (note,) = doc["notes"]
            assert EARLYOOM_PREFER_AVOID in note
    shown = run("replay", str(detailed), "--every", "--json", "--policy",
                EARLYOOM_PREFER_AVOID)
    assert shown.returncode == 0 and "warning" not in shown.stderr
    assert all(json.loads(x)["notes"] == [] for x in shown.stdout.splitlines())


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_a_stopped_or_killed_recorder_leaves_a_readable_trace(tmp_path: Path,
                                                              sig: signal.Signals) -> None:
    out = tmp_path / "t.trace"
    proc = subprocess.Popen([*CLI, "record", "--out", str(out), "--interval", "0.1"],
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and (not out.exists() or out.stat().st_size < 3000):
            time.sleep(0.05)
        time.sleep(0.3)
        proc.send_signal(sig)
        code = proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)
    _header, records, complete = read_trace(str(out))
    assert records
    assert complete is (sig == signal.SIGTERM) and code == (0 if complete else -9)
    shown = run("replay", str(out), "--every", "--json")
    assert shown.returncode == 0
    assert ("cut short" in shown.stderr) is (sig == signal.SIGKILL)


@pytest.mark.parametrize(("args", "message"), [
    (["replay", "/nonexistent.trace"], "/nonexistent.trace: No such file"),
    (["replay", "GARBAGE"], "not an oomwarden trace"),
    (["replay", "TRACE", "--trigger", "nope"], "--trigger 'nope': unknown trigger"),
    (["replay", "TRACE", "--policy", "nope"], "unknown policy 'nope'"),
    (["replay", "TRACE", "--cgroup", "/no/such/cgroup"], "no/such/cgroup"),
    (["record", "--out", "OUT", "--interval", "0"], "expected 0.05 to 3600 seconds"),
    (["record", "--out", "/nonexistent/dir/x.trace", "--duration", "1"], "No such file"),
    (["record", "--out", "OUT", "--cgroup", "/no/such/cgroup"], "no/such/cgroup"),
])
def test_errors_are_one_line_and_exit_2(tmp_path: Path, args: list[str], message: str) -> None:
    trace = tmp_path / "ok.trace"
    assert run("record", "--out", str(trace), "--duration", "0.1").returncode == 0
    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"garbage\n")
    args = [{"TRACE": str(trace), "GARBAGE": str(garbage), "OUT": str(tmp_path / "o")}
            .get(a, a) for a in args]
    done = run(*args)
    assert done.returncode == 2
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("oomwarden: error: "), done.stderr
    assert message in lines[0]


# -- the real kernel ------------------------------------------------------------------------


@pytest.mark.kernel
def test_replay_of_a_recorded_oom_agrees_with_the_daemon(memcg_factory: MemcgFactory,
                                                         tmp_path: Path) -> None:
    """Record a child memcg (256 MiB) while the daemon handles an OOM in it
    with the ``kernel`` policy; replay the trace with ``kernel``.

    What "agrees" means: the recorder's snapshots are taken every 0.1 s, not
    at the instant of the daemon's own snapshot (taken when the kernel said
    the cgroup is out of memory, the leaker paused at the limit). So the
    points (memory) differ; what must match is the choice and the order:
    at the last recorded snapshot before the daemon's OOM event, and at the
    last trigger point (margin or oom) before it, the replay's victim is the
    process the daemon killed, and the replay's ranking of the cgroup's
    processes (pids, most points first) is the daemon's logged ranking.
    The scene makes that order stable over the last 0.1 s before the OOM:
    a 40 MiB process with oom_score_adj 500 (the kernel's choice), a leaker
    that is at ~130 MiB by then, a steady 80 MiB one.
    """
    need(sys.platform == "linux", "needs Linux")
    cg = memcg_factory.create(limit_bytes=256 * MiB)
    big = cg.start_hog(80, adj=0)
    favoured = cg.start_hog(40, adj=500)
    trace = tmp_path / "oom.trace"
    warden = Warden(config(tmp_path, cg))
    recorder = subprocess.Popen(
        [*CLI, "record", "--out", str(trace), "--interval", "0.1", "--duration", "60",
         "--cgroup", f"v1:{cg.hierarchy_path}"], stderr=subprocess.DEVNULL)
    try:
        warden.wait_for("watching 1 memory cgroup")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and (not trace.exists() or
                                               trace.stat().st_size < 2000):
            time.sleep(0.05)
        leaker = cg.start_leaker(40)
        dead = wait_dead([big, favoured, leaker], timeout=30)
        assert dead == [favoured] and favoured.proc.returncode == -9
        warden.wait_for("killed pid")
        time.sleep(0.3)
    finally:
        if recorder.poll() is None:
            recorder.send_signal(signal.SIGTERM)
        try:
            recorder.wait(timeout=10)
        finally:
            if recorder.poll() is None:
                recorder.kill()
                recorder.wait(timeout=5)
        assert warden.stop() == 0
    record = decisions(tmp_path)[0]
    assert record["trigger"] == "oom" and record["victim"]["pid"] == favoured.pid
    event_ns = record["time_ns"]["event"]
    daemon_ranking = [c["pid"] for c in record["candidates"]]
    assert daemon_ranking == [favoured.pid, leaker.pid, big.pid]

    _header, records, complete = read_trace(str(trace))
    assert complete and records
    runs = [PolicyRun("kernel", load_policy("kernel"))]
    before = [r for r in records if r.wall_ns < event_ns]
    assert len(before) >= 3, "the recorder saw nothing before the OOM"
    point = list(replay(before, runs, every=True, triggers=Triggers(
        oom=False, margin_percent=None, threshold=None, pressure=None)))[-1]
    assert point.index == before[-1].index
    ((_, decision),) = point.decisions
    assert decision.victim is not None and decision.victim.task.pid == favoured.pid
    assert [c.task.pid for c in decision.selectable] == daemon_ranking
    # the triggers a trace shows: the working set near the limit came first
    points = [p for p in replay(records, runs) if p.wall_ns < event_ns]
    assert points, "no trigger point before the OOM"
    last = points[-1]
    # docs/trace-format.md: on v1 an OOM the warden handled is no kernel kill,
    # so oom_control's oom_kill never rises: it shows as margin (under_oom
    # lasts milliseconds and a snapshot rarely catches it)
    assert "margin" in last.triggers
    assert not any("oom_kill" in d for p in points for d in p.details)
    ((_, decision),) = last.decisions
    assert decision.victim is not None and decision.victim.task.pid == favoured.pid
    assert [c.task.pid for c in decision.selectable] == daemon_ranking
