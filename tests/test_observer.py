"""The OOM observer (issue 8, item 3): the record decoder on crafted bytes,
cgroup ids to paths, the observer catching a kernel OOM kill in a child
memcg, the daemon logging it from BPF, the fallback to /dev/kmsg, the
routing of a global OOM's kill, and no fd or BPF link left after a stop.

Memory pressure is made only in child memory cgroups of this process's own
(64 MiB, MemcgFactory), the daemon watches only them (dry run: the kernel
kills), and every process signalled was started here.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import select
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from oomwarden import observer as obs
from oomwarden.config import load_config
from oomwarden.daemon import warden_from_config
from oomwarden.errors import BpfError
from oomwarden.model import Hierarchy
from oomwarden.observer import CgroupNames, ObservedKill, ObserverSource
from oomwarden.sources import bpf as bpf_source
from oomwarden.sources.cgroupfs import find_hierarchies
from oomwarden.triggers import KernelKill
from test_daemon import config

from conftest import need
from kernelenv import MemcgFactory, Warden, decisions

MiB = 1 << 20
PSIZE = os.sysconf("SC_PAGE_SIZE")
BPFTOOL = "/usr/sbin/bpftool"
#: How long a kill may take to reach the observer or the log, at most.
KILL_WAIT_S = 20.0


def _record(**kw: object) -> bytes:
    """A good ``struct ow_kill``: pid 42 killed at the limit of memcg 7."""
    fields: dict[str, object] = {
        "magic": obs.MAGIC, "flags": obs.AT_LIMIT | obs.HAS_MM | obs.HAS_SIGNAL | obs.CURRENT,
        "time": 5_000_000_000, "pid": 42, "tgid": 42, "uid": 1000, "oom_pid": 42,
        "oom_tgid": 42, "chosen": 0, "constraint": -1, "order": 0, "memcg": 7, "dfl": 1,
        "oom_memcg": 7, "points": 0, "totalpages": 0, "limit": 16384, "file": 10,
        "anon": 16000, "shmem": 3, "swap": 0, "pte": 8 * PSIZE, "adj": 0, "pad0": 0,
        "pad1": 0, "comm": b"grower", "oom_comm": b"grower",
    }
    fields.update(kw)
    return obs.RECORD.pack(*fields.values())


def _with_oc(**kw: object) -> bytes:
    """A record where the OOM in progress was seen (fentry on out_of_memory)."""
    fields: dict[str, object] = {
        "flags": obs.HAS_OC | obs.KILLED | obs.HAS_MM | obs.HAS_SIGNAL, "pid": 43, "tgid": 43,
        "oom_pid": 42, "oom_tgid": 42, "chosen": 43, "constraint": 3, "order": 0,
        "oom_memcg": 7, "points": 16020, "totalpages": 16384, "limit": 16384,
    }
    fields.update(kw)
    return _record(**fields)


class _Names(CgroupNames):
    """Fixed ids: memcg 7 is /app, 8 is /app/job; v2 id 1 is /."""

    def __init__(self) -> None:
        super().__init__(())

    def memcg(self, ino: int) -> str | None:
        return {7: "/app", 8: "/app/job"}.get(ino)

    def dfl(self, ino: int) -> str | None:
        return "/" if ino == 1 else None


class _Gone(CgroupNames):
    """Every cgroup removed (rmdir) before its id was looked up."""

    def __init__(self) -> None:
        super().__init__(())

    def memcg(self, ino: int) -> str | None:
        return None

    def dfl(self, ino: int) -> str | None:
        return None


# -- the decoder, on crafted bytes --------------------------------------------------------


def test_decode_a_kill_found_at_the_limit() -> None:
    r = obs.decode_record(_record(anon=-2))
    assert (r.pid, r.tgid, r.uid, r.comm, r.oom_comm) == (42, 42, 1000, "grower", "grower")
    assert (r.memcg_ino, r.dfl_ino, r.oom_memcg_ino, r.oom_limit) == (7, 1, 7, 16384)
    assert r.at_limit and not r.has_oc and r.domain_from == "memcg at its limit"
    assert (r.constraint, r.order, r.totalpages, r.chosen_points) == (None, None, None, None)
    assert (r.rss_anon, r.rss_file, r.rss_shmem, r.pgtables_bytes) == (0, 10, 3, 8 * PSIZE)
    assert r.oom_score_adj == 0 and not r.killed and not r.group_member


def test_decode_a_kill_with_the_oom_control() -> None:
    r = obs.decode_record(_with_oc())
    assert r.has_oc and r.killed and r.domain_from == "oom_control"
    assert (r.constraint, r.order, r.totalpages, r.chosen_points) == (
        "CONSTRAINT_MEMCG", 0, 16384, 16020)
    assert r.chosen_tgid == 43 and not r.group_member
    member = obs.decode_record(_with_oc(pid=44, tgid=44))
    assert member.group_member  # killed, not the chosen one: its oom.group's
    system = obs.decode_record(_with_oc(constraint=0, oom_memcg=0, limit=0))
    assert system.constraint == "CONSTRAINT_NONE" and system.oom_memcg_ino == 0


@pytest.mark.parametrize(("data", "words"), [
    (_record()[:-1], "175 bytes, expected 176"),
    (_record() + b"\0", "177 bytes"),
    (_record(magic=0x314B574E), "bad magic"),
    (_record(flags=0x40 | obs.AT_LIMIT), "unknown flags"),
    (_record(pad0=1), "padding"),
    (_record(pid=0), "out of range"),
    (_record(tgid=bpf_source.PID_MAX_LIMIT + 1), "out of range"),
    (_record(oom_pid=41), "'current' flag"),
    (_record(constraint=9), "unknown constraint"),
    (_record(points=5), "without the OOM in progress"),
    (_record(flags=obs.KILLED | obs.CURRENT), "without the OOM in progress"),
    (_record(flags=obs.CURRENT | obs.HAS_MM), "without the flag"),
    (_record(flags=obs.AT_LIMIT | obs.HAS_OC | obs.CURRENT), "both"),
    (_record(limit=0), "limit 0 pages"),
    (_with_oc(constraint=0), "with constraint CONSTRAINT_NONE"),
    (_with_oc(order=40), "order 40"),
    (_record(adj=1001), "oom_score_adj 1001"),
    (_record(flags=obs.AT_LIMIT | obs.HAS_MM | obs.CURRENT, adj=5), "without a signal"),
    (_record(pte=-1), "negative page-table"),
    (_record(flags=obs.AT_LIMIT | obs.HAS_SIGNAL | obs.CURRENT), "without an mm"),
])
def test_decode_refuses_bad_records(data: bytes, words: str) -> None:
    with pytest.raises(BpfError, match=words):
        obs.decode_record(data)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2 * obs.RECORD_SIZE))
def test_garbage_raises_only_bpf_error(data: bytes) -> None:
    with contextlib.suppress(BpfError):
        obs.decode_record(data)


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=obs.RECORD_SIZE - 8, max_size=obs.RECORD_SIZE - 8),
       st.sampled_from([0, obs.AT_LIMIT, obs.HAS_OC, obs.HAS_OC | obs.KILLED,
                        obs.AT_LIMIT | obs.HAS_MM | obs.HAS_SIGNAL]))
def test_garbage_behind_a_good_magic_raises_only_bpf_error(body: bytes, flags: int) -> None:
    data = struct.pack("<II", obs.MAGIC, flags) + body
    try:
        r = obs.decode_record(data)
    except BpfError:
        return
    # what decodes also turns into a kill (or a mark) without raising
    obs.to_kill(r, _Names(), kill_known=True, boot_offset_ns=0)


# -- records to kills ------------------------------------------------------------------


def test_a_kill_at_the_limit_says_why() -> None:
    r = obs.decode_record(_record(memcg=8))
    kill = obs.to_kill(r, _Names(), kill_known=False, boot_offset_ns=1_000)
    assert isinstance(kill, ObservedKill) and isinstance(kill, KernelKill)
    assert (kill.pid, kill.comm, kill.task_memcg, kill.oom_memcg) == (42, "grower", "/app/job",
                                                                      "/app")
    assert kill.constraint == "CONSTRAINT_MEMCG" and kill.kind == "killed?"
    assert kill.time_ns == 5_000_001_000 and kill.cgroup_v2 == "/"
    # badness from the record's own counters: rss + swap + page-table pages (adj 0)
    assert kill.points == 10 + 16000 + 3 + 8
    assert "at the limit of /app (" in kill.detail and "seen by BPF" in kill.detail
    assert kill.oom_fields()["from"] == "memcg at its limit"
    assert kill.oom_fields()["limit_pages"] == 16384
    assert kill.victim_fields()["rss_bytes"] == {"anon": 16000 * PSIZE, "file": 10 * PSIZE,
                                                 "shmem": 3 * PSIZE}


def test_none_at_its_limit_is_a_system_oom() -> None:
    r = obs.decode_record(_record(flags=obs.HAS_MM | obs.HAS_SIGNAL | obs.CURRENT,
                                  oom_memcg=0, limit=0))
    kill = obs.to_kill(r, _Names(), kill_known=False, boot_offset_ns=0)
    assert kill is not None and kill.oom_memcg == "" and kill.constraint == "CONSTRAINT_NONE"
    assert "system-wide OOM" in kill.detail


def test_kinds_where_the_kill_probe_is_attached() -> None:
    names = _Names()
    chosen = obs.to_kill(obs.decode_record(_with_oc()), names, kill_known=True,
                         boot_offset_ns=0)
    assert chosen is not None and chosen.kind == "killed" and chosen.points is not None
    assert "16020 points of 16384 pages" in chosen.detail
    member = obs.to_kill(obs.decode_record(_with_oc(pid=44, tgid=44)), names,
                         kill_known=True, boot_offset_ns=0)
    assert member is not None and member.kind == "oom.group member"
    # marked without passing __oom_kill_process: exiting already, not a kill
    marked = obs.decode_record(_with_oc(flags=obs.HAS_OC | obs.HAS_MM | obs.HAS_SIGNAL))
    assert obs.to_kill(marked, names, kill_known=True, boot_offset_ns=0) is None
    # without the kill probe the two cannot be told apart: a kill, flagged
    kill = obs.to_kill(marked, names, kill_known=False, boot_offset_ns=0)
    assert kill is not None and kill.kind == "killed?"


# -- cgroup ids to paths (live hierarchies) ----------------------------------------------


def _memory_hierarchy() -> Hierarchy:
    found = [h for h in find_hierarchies() if h.has_memory and h.verified]
    need(bool(found), "no verified memory cgroup hierarchy is mounted")
    return found[0]


def test_cgroup_ids_become_paths_by_handle_and_by_walk(memcg_factory: MemcgFactory) -> None:
    h = _memory_hierarchy()
    cg = memcg_factory.create(limit_bytes=64 * MiB)
    ino = cg.path.stat().st_ino
    names = CgroupNames([h])
    assert names.memcg(ino) == cg.hierarchy_path
    assert names.by_handle  # root here: open_by_handle_at is allowed
    walked = CgroupNames([h])
    walked.by_handle = False  # as without CAP_DAC_READ_SEARCH
    assert walked.memcg(ino) == cg.hierarchy_path
    assert walked.memcg(os.stat(h.mount_point).st_ino) == h.root
    os.rmdir(cg.path)
    memcg_factory.children.remove(cg)
    assert CgroupNames([h]).memcg(ino) is None  # gone: ESTALE, never another cgroup
    assert names.memcg(0) is None


# -- the observer on the real kernel ------------------------------------------------------


@pytest.fixture
def source() -> Iterator[ObserverSource]:
    src, why = obs.open_source()
    need(src is not None, f"the BPF OOM observer cannot be had here: {why}")
    assert src is not None
    try:
        yield src
    finally:
        src.close()


def _wait_kill(src: ObserverSource, pid: int) -> ObservedKill:
    """The observer's kill of ``pid`` (other tests may make kills of their own)."""
    ep = select.epoll()
    try:
        ep.register(src.fd, select.EPOLLIN)
        deadline = time.monotonic() + KILL_WAIT_S
        while time.monotonic() < deadline:
            if ep.poll(0.5):
                src.fired(select.EPOLLIN)
            for kill in src.kills:
                if kill.pid == pid:
                    assert isinstance(kill, ObservedKill)
                    return kill
    finally:
        ep.close()
    raise AssertionError(f"the observer saw no kill of pid {pid}: {src.kills}, bad records "
                         f"{src.bad_records} ({src.last_problem})")


def test_the_observer_catches_a_kernel_kill_in_a_child_memcg(
        source: ObserverSource, memcg_factory: MemcgFactory) -> None:
    cg = memcg_factory.create(limit_bytes=64 * MiB)
    grower = cg.start_grower(200)
    comm = os.path.basename(sys.executable)[:15]  # what exec sets comm to
    assert grower.proc.wait(timeout=KILL_WAIT_S) == -9
    kill = _wait_kill(source, grower.pid)
    assert (kill.pid, kill.comm) == (grower.pid, comm)
    assert kill.task_memcg == cg.hierarchy_path
    assert kill.oom_memcg == cg.hierarchy_path and kill.constraint == "CONSTRAINT_MEMCG"
    r = kill.record
    assert r is not None and r.oom_pid == grower.pid  # it ran into the limit itself
    if not r.has_oc:  # inferred: the limit it is at is the one set here
        assert r.oom_limit == 64 * MiB // PSIZE
    assert r.rss_anon is not None and r.rss_anon * PSIZE > 32 * MiB
    assert source.bad_records == 0 and source.observer is not None
    assert source.observer.lost() == 0


# -- the daemon -----------------------------------------------------------------------------


def _kernel_kills(tmp_path: Path) -> list[dict[str, object]]:
    return [r for r in decisions(tmp_path) if r["trigger"] == "kernel_kill"]


def test_the_daemon_logs_the_kernel_kill_from_bpf(memcg_factory: MemcgFactory,
                                                  tmp_path: Path) -> None:
    src, why = obs.open_source()
    need(src is not None, f"the BPF OOM observer cannot be had here: {why}")
    assert src is not None
    src.close()
    cg = memcg_factory.create(limit_bytes=64 * MiB)
    warden = Warden(config(tmp_path, cg), "--dry-run")
    try:
        warden.wait_for("watching 1 memory cgroup (oom)")
        grower = cg.start_grower(200)
        assert grower.proc.wait(timeout=KILL_WAIT_S) == -9
        line = warden.wait_for(f"the kernel killed pid {grower.pid} ")
        assert f"at the limit of {cg.hierarchy_path}" in line and "seen by BPF" in line
    finally:
        assert warden.stop() == 0
    assert not [x for x in warden.lines if "observer not used" in x], warden.lines
    (kill,) = _kernel_kills(tmp_path)
    assert kill["source"] == "bpf" and kill["domain"] == f"cgroup:{cg.hierarchy_path}"
    victim = kill["victim"]
    assert isinstance(victim, dict)
    assert (victim["pid"], victim["cgroup"]) == (grower.pid, cg.hierarchy_path)
    assert victim["thread"] == grower.pid and victim["oom_score_adj"] == 0
    oom = kill["oom"]
    assert isinstance(oom, dict) and oom["memcg"] == cg.hierarchy_path
    assert oom["from"] in ("oom_control", "memcg at its limit")
    assert "seen by BPF" in str(kill["event_detail"])


def test_without_the_observer_the_daemon_reads_kmsg(memcg_factory: MemcgFactory,
                                                    tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    need(os.access("/dev/kmsg", os.R_OK), "/dev/kmsg is not readable")
    missing = tmp_path / "missing.bpf.o"
    monkeypatch.setenv(obs.OBJECT_ENV, str(missing))
    cg = memcg_factory.create(limit_bytes=64 * MiB)
    warden = Warden(config(tmp_path, cg), "--dry-run")
    try:
        warden.wait_for("watching 1 memory cgroup (oom)")
        grower = cg.start_grower(200)
        assert grower.proc.wait(timeout=KILL_WAIT_S) == -9
        warden.wait_for(f"the kernel killed pid {grower.pid} ")
    finally:
        assert warden.stop() == 0
    why = [x for x in warden.lines if "observer not used" in x]
    assert why == [f"oomwarden: BPF OOM observer not used: no BPF object at {missing} (build "
                   "it with `make bpf`); the kernel's OOM kills are read from /dev/kmsg"]
    assert not [x for x in warden.lines if "Traceback" in x]
    (kill,) = _kernel_kills(tmp_path)
    assert kill["source"] == "kmsg" and "Killed process" in str(kill["event_detail"])
    victim = kill["victim"]
    assert isinstance(victim, dict)
    assert (victim["pid"], victim["cgroup"]) == (grower.pid, cg.hierarchy_path)


def test_an_object_that_does_not_load_is_one_line(tmp_path: Path) -> None:
    src, why = obs.open_source(str(tmp_path / "missing.bpf.o"))
    assert src is None and why.startswith("no BPF object at ") and "\n" not in why
    bad = tmp_path / "bad.bpf.o"
    bad.write_bytes(b"\x7fELF" + b"\0" * 60)
    src, why = obs.open_source(str(bad))
    assert src is None and why.startswith(f"cannot open BPF object {bad}") and "\n" not in why


def test_a_global_kill_goes_to_the_system_watch(tmp_path: Path) -> None:
    """A global OOM's kill that no watched cgroup holds is logged under
    "system" when it is watched; a memcg OOM elsewhere is not ours to log.
    (Routing only: a real global OOM is never made in a test.)"""
    path = tmp_path / "oomwarden.toml"
    path.write_text(f"""
decision_log = "{tmp_path / 'decisions.jsonl'}"
[[watch]]
domain = "system"
triggers = ["threshold"]
policy = "largest"
dry_run = true
""")
    path.chmod(0o644)
    warden = warden_from_config(load_config(str(path)), dry_run=True)
    warden._systems = [warden._system(s) for s in warden.systems]
    with open(tmp_path / "decisions.jsonl", "a") as log:
        warden._log = log
        names = _Names()
        global_kill = obs.to_kill(obs.decode_record(_record(
            flags=obs.HAS_MM | obs.HAS_SIGNAL | obs.CURRENT, oom_memcg=0, limit=0)), names,
            kill_known=False, boot_offset_ns=0)
        memcg_kill = obs.to_kill(obs.decode_record(_record()), names, kill_known=False,
                                 boot_offset_ns=0)
        # A memcg OOM whose cgroups were removed before the ring buffer was
        # read: no paths, but not a global OOM either.
        gone_kill = obs.to_kill(obs.decode_record(_record()), _Gone(), kill_known=False,
                                boot_offset_ns=0)
        assert global_kill is not None and memcg_kill is not None and gone_kill is not None
        assert not gone_kill.oom_memcg and gone_kill.constraint == "CONSTRAINT_MEMCG"
        warden._kernel_kill(memcg_kill)
        warden._kernel_kill(gone_kill)
        warden._kernel_kill(global_kill)
        warden._log = None
    (record,) = _kernel_kills(tmp_path)
    assert record["domain"] == "system" and record["hierarchy"] is None
    assert record["source"] == "bpf" and record["dry_run"] is True
    assert warden.kernel_kill_counts == {"system": 1}
    assert json.dumps(record)  # every field is JSON


# -- no leaks --------------------------------------------------------------------------------


def _fds() -> dict[str, str]:
    out: dict[str, str] = {}
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            out[fd] = os.readlink(f"/proc/self/fd/{fd}")
    return out


def _own_link_ids() -> set[int]:
    """The BPF links this process holds an fd of (fdinfo ``link_id``)."""
    ids: set[int] = set()
    for fd in os.listdir("/proc/self/fdinfo"):
        with contextlib.suppress(OSError), open(f"/proc/self/fdinfo/{fd}") as f:
            for line in f:
                if line.startswith("link_id:"):
                    ids.add(int(line.split()[1]))
    return ids


def _system_links() -> list[dict[str, object]]:
    done = subprocess.run([BPFTOOL, "-j", "link", "show"], capture_output=True, text=True,
                          timeout=30, check=True)
    links: list[dict[str, object]] = json.loads(done.stdout or "[]")
    return links


def _system_link_ids() -> set[object]:
    return {link["id"] for link in _system_links()}


def test_no_fd_or_bpf_link_left_after_the_daemon_stops(memcg_factory: MemcgFactory,
                                                       tmp_path: Path) -> None:
    """A Warden started and stopped in this process (dry run, one child
    memcg watched) with the observer and the snapshot iterator loaded: every
    fd it opened is closed, and its BPF links are gone from the kernel."""
    need(os.access(BPFTOOL, os.X_OK), f"no {BPFTOOL}")
    src, why = obs.open_source()
    need(src is not None, f"the BPF OOM observer cannot be had here: {why}")
    assert src is not None
    src.close()
    cg = memcg_factory.create(limit_bytes=64 * MiB)
    warden = warden_from_config(load_config(str(config(tmp_path, cg))), dry_run=True)
    warden.state_file = None
    warden.lock_memory = False
    warden.stderr = io.StringIO()
    adj = Path("/proc/self/oom_score_adj").read_text()
    bpf_source.unload_all()
    fds_before = _fds()
    links_before = _own_link_ids()
    try:
        warden.start()
        assert warden.bpf_status()["observer"]["in_use"], warden.bpf_status()
        bpf_source.load()  # the snapshot iterator, as the daemon's snapshots load it
        held = _own_link_ids() - links_before
        assert len(held) >= 2, held  # mark_victim's and the iterator's
        assert held <= _system_link_ids()
    finally:
        warden.stop()
        Path("/proc/self/oom_score_adj").write_text(adj)
    left_links = [link for link in _system_links() if link["id"] in held]
    left_fds = {fd: what for fd, what in _fds().items() if fd not in fds_before}
    bpf_source.unload_all()
    assert not left_links, f"BPF links left after stop(): {left_links}"
    assert not left_fds, f"fds left after stop(): {left_fds}"


def test_no_fd_or_link_left_after_the_observer_closes(source: ObserverSource) -> None:
    assert source.observer is not None and "ow_mark_victim" in source.observer.programs
    held = _own_link_ids()
    fds = _fds()
    second = ObserverSource.open()
    loaded = second.observer
    assert loaded is not None
    extra = _own_link_ids() - held
    assert len(extra) == len(loaded.programs)
    second.close()
    second.close()  # idempotent
    assert _own_link_ids() == held and _fds() == fds
    if os.access(BPFTOOL, os.X_OK):
        assert not extra & _system_link_ids()
    with pytest.raises(BpfError, match="closed"):
        loaded.read()
