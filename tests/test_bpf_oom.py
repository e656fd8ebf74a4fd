"""BPF OOM struct_ops (docs/bpf-oom.md): detection in BTF, the handler object,
the ranked-victim map, and the ``struct_ops`` line of ``status``.

What can run here and does: detection against this kernel's BTF (checked
against ``bpftool``'s own dump, and shown to find a struct that exists and
not one that does not), the object built by ``make bpf`` (its sections, its
struct_ops variable, and its map layout compared with the Python one), a map
of that layout written and read back through libbpf, and the daemon's status.
What cannot: loading or attaching the handler (this kernel has no
``bpf_oom_ops``), so no test here runs it.

Real-kernel tests use ``conftest.need()``: under ``OOMWARDEN_REQUIRE_KERNEL=1``
a missing BTF, object or BPF permission fails them instead of skipping.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from oomwarden import bpf_oom
from oomwarden.decision import Candidate, Decision, Domain
from oomwarden.errors import BpfError
from oomwarden.model import Task
from test_control_live import LiveWarden, cli

from conftest import need
from kernelenv import ChildMemcg, MemcgFactory

REPO = Path(__file__).resolve().parent.parent
OBJECT = REPO / "src" / "oomwarden" / "bpf" / "oom_ops.bpf.o"
VMLINUX = "/sys/kernel/btf/vmlinux"
BPFTOOL = shutil.which("bpftool") or ("/usr/sbin/bpftool" if os.path.exists(
    "/usr/sbin/bpftool") else None)
MiB = 1024 * 1024


def _need_btf() -> None:
    need(os.path.exists(VMLINUX), f"no kernel BTF at {VMLINUX}")


def _bpftool_types(path: str) -> list[dict[str, Any]]:
    need(BPFTOOL is not None, "bpftool is not installed (make bpf installs it)")
    assert BPFTOOL is not None
    out = subprocess.run([BPFTOOL, "-j", "btf", "dump", "file", path], capture_output=True,
                         check=True, timeout=60)
    types: list[dict[str, Any]] = json.loads(out.stdout)["types"]
    return types


# -- detection ------------------------------------------------------------------------------


def test_detection_on_this_kernel_agrees_with_bpftool() -> None:
    """The detector's answer for bpf_oom_ops / bpf_oom_kill_process is what
    bpftool's own dump of the kernel's BTF says, whichever it is."""
    _need_btf()
    types = _bpftool_types(VMLINUX)
    has_struct = any(t["kind"] == "STRUCT" and t["name"] == "bpf_oom_ops" for t in types)
    has_kfunc = any(t["kind"] == "FUNC" and t["name"] == "bpf_oom_kill_process" for t in types)
    got = bpf_oom.detect()
    assert got.available == (has_struct and has_kfunc), got
    assert "\n" not in got.detail
    if not has_struct:
        assert got.detail == (
            "not in this kernel: its BTF has no struct bpf_oom_ops (the BPF OOM series is "
            "not merged); the warden kills from user space")


def test_the_detector_finds_what_exists_and_only_that() -> None:
    """A struct_ops struct and a kfunc this kernel does have are found; names
    it does not have, or a FUNC asked for as a STRUCT, are not."""
    _need_btf()
    types = _bpftool_types(VMLINUX)
    names = {(t["kind"], t["name"]) for t in types}
    need(("STRUCT", "tcp_congestion_ops") in names and ("FUNC", "bpf_task_from_pid") in names,
         "this kernel's BTF lacks tcp_congestion_ops or bpf_task_from_pid")
    assert bpf_oom.detect("tcp_congestion_ops", "bpf_task_from_pid").available
    if ("STRUCT", "sched_ext_ops") in names:
        assert bpf_oom.detect("sched_ext_ops", "bpf_task_from_pid").available
    missing = bpf_oom.detect("ow_no_such_struct_ops", "bpf_task_from_pid")
    assert not missing.available
    assert missing.detail.startswith("not in this kernel: its BTF has no struct "
                                     "ow_no_such_struct_ops")
    no_kfunc = bpf_oom.detect("tcp_congestion_ops", "ow_no_such_kfunc")
    assert not no_kfunc.available and "no kfunc ow_no_such_kfunc" in no_kfunc.detail
    # the kind is part of the question: out_of_memory is a FUNC, not a STRUCT
    assert ("FUNC", "out_of_memory") in names
    asked = [("out_of_memory", bpf_oom.BTF_KIND_STRUCT), ("out_of_memory", bpf_oom.BTF_KIND_FUNC)]
    assert bpf_oom.find_btf_types(asked) == {asked[0]: False, asked[1]: True}


def test_no_btf_and_no_libbpf_are_one_line(monkeypatch: pytest.MonkeyPatch,
                                           tmp_path: Path) -> None:
    missing = bpf_oom.detect(btf_path=str(tmp_path / "nothing"))
    assert not missing.available
    assert missing.detail == (f"not detectable: cannot read BTF of {tmp_path / 'nothing'}: No "
                              "such file or directory; the warden kills from user space")
    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"\x00" * 64)
    assert not bpf_oom.detect(btf_path=str(garbage)).available

    def no_libbpf(name: str, argtypes: list[Any], restype: Any) -> Any:
        raise BpfError("cannot load libbpf.so.1 (libbpf.so.1: cannot open shared object "
                       "file); install Debian's libbpf1")

    monkeypatch.setattr(bpf_oom, "libbpf_function", no_libbpf)
    got = bpf_oom.detect()
    assert not got.available and "\n" not in got.detail
    assert got.detail.startswith("not detectable: cannot load libbpf.so.1")
    assert got.status_part() == {"in_use": False, "detail": got.detail}


# -- the handler object ---------------------------------------------------------------------


def _elf_sections(path: Path) -> list[str]:
    """Section names of a little-endian ELF64 file."""
    data = path.read_bytes()
    assert data[:4] == b"\x7fELF" and data[4] == 2 and data[5] == 1
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    headers = [struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize) for i in range(shnum)]
    str_off, str_size = headers[shstrndx][4], headers[shstrndx][5]
    strtab = data[str_off:str_off + str_size]
    return [strtab[h[0]:strtab.index(b"\0", h[0])].decode() for h in headers]


@pytest.fixture(scope="module")
def object_types() -> dict[str, Any]:
    need(OBJECT.is_file(), f"no {OBJECT.name}: `make bpf` did not build it (see "
                           ".cache/bpf/build.log)")
    return {"sections": _elf_sections(OBJECT), "types": _bpftool_types(str(OBJECT))}


def _named(types: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (found,) = [t for t in types if t["kind"] == kind and t["name"] == name]
    return found


def test_the_object_carries_the_struct_ops(object_types: dict[str, Any]) -> None:
    sections = object_types["sections"]
    types = object_types["types"]
    assert "struct_ops.s/handle_out_of_memory" in sections  # sleepable: the kfunc sleeps
    assert ".struct_ops.link" in sections and ".maps" in sections and "license" in sections
    ops = _named(types, "STRUCT", "bpf_oom_ops___ow")
    assert [m["name"] for m in ops["members"]] == ["handle_out_of_memory", "name"]
    link = _named(types, "DATASEC", ".struct_ops.link")
    by_id = {t["id"]: t for t in types}
    (var,) = [by_id[v["type_id"]] for v in link["vars"]]
    assert var["name"] == "oomwarden_oom_ops" and var["type_id"] == ops["id"]
    _named(types, "FUNC", "ow_handle_oom")
    ksyms = _named(types, "DATASEC", ".ksyms")
    assert {by_id[v["type_id"]]["name"] for v in ksyms["vars"]} == {
        "bpf_oom_kill_process", "bpf_task_is_oom_victim", "bpf_task_from_pid",
        "bpf_task_release"}
    maps = _named(types, "DATASEC", ".maps")
    assert {by_id[v["type_id"]]["name"] for v in maps["vars"]} == {"ow_ranked", "ow_oom_stats"}
    # the struct_ops type is a flavour: no clash with a vmlinux.h that has the real one
    assert not [t for t in types if t["kind"] == "STRUCT" and t["name"] == "bpf_oom_ops"]
    # and the detector, pointed at the object, finds what it declares
    assert bpf_oom.detect("bpf_oom_ops___ow", btf_path=str(OBJECT)).available


def test_the_map_layout_is_the_objects(object_types: dict[str, Any]) -> None:
    """struct ow_ranked / ow_victim in the object's BTF are the Python layout."""
    types = object_types["types"]
    by_id = {t["id"]: t for t in types}
    ranked = _named(types, "STRUCT", "ow_ranked")
    victim = _named(types, "STRUCT", "ow_victim")
    assert ranked["size"] == bpf_oom.RANKED_SIZE and victim["size"] == bpf_oom.VICTIM.size
    assert [(m["name"], m["bits_offset"] // 8) for m in ranked["members"]] == [
        ("magic", 0), ("count", 4), ("generation", 8), ("written_ns", 16),
        ("victims", bpf_oom.RANKED_HEAD.size)]
    array = by_id[ranked["members"][-1]["type_id"]]
    assert array["kind"] == "ARRAY" and array["nr_elems"] == bpf_oom.RANKED_MAX
    assert array["type_id"] == victim["id"]
    assert [(m["name"], m["bits_offset"] // 8) for m in victim["members"]] == [
        ("pid", 0), ("flags", 4), ("start_ticks", 8)]


# -- the ranking ----------------------------------------------------------------------------


def _task(pid: int, ticks: int) -> Task:
    return Task(pid=pid, tgid=pid, ppid=1, comm=f"p{pid}", state="S", start_ticks=ticks, uid=0,
                kthread=False, has_mm=True, rss_anon=100, rss_file=0, rss_shmem=0, swap=0,
                pgtables=1, oom_score_adj=0)


def _decision(*cands: tuple[int, int, str, int | None], aborted: bool = False) -> Decision:
    candidates = tuple(Candidate(_task(pid, ticks), verdict, points)  # type: ignore[arg-type]
                       for pid, ticks, verdict, points in cands)
    return Decision(Domain("system", 1000), "kernel", candidates, None, aborted=aborted)


def test_ranking_is_the_queue_then_the_policy() -> None:
    decision = _decision((10, 1, "select", 900), (11, 2, "default", 500), (12, 3, "ignore", None),
                         (13, 4, "unkillable", None), (20, 5, "select", 100))
    R = bpf_oom.RankedVictim
    assert bpf_oom.ranking_for([(20, 5), (30, 6)], decision) == (
        R(20, 5), R(30, 6), R(10, 1), R(11, 2))
    # a recycled pid (same pid, other start time) is another process
    assert bpf_oom.ranking_for([(10, 99)], decision)[:2] == (R(10, 99), R(10, 1))
    assert bpf_oom.ranking_for([], _decision((10, 1, "select", 9), aborted=True)) == ()
    assert bpf_oom.ranking_for([(1, 1), (2, 2)], None, limit=1) == (R(1, 1),)
    many = _decision(*[(100 + i, i, "select", 1000 - i) for i in range(20)])
    assert len(bpf_oom.ranking_for([], many)) == bpf_oom.RANKED_MAX


def test_pack_and_unpack() -> None:
    R = bpf_oom.RankedVictim
    ranking = bpf_oom.Ranking((R(42, 123456), R(7, 1)), generation=3, written_ns=10**12)
    data = bpf_oom.pack_ranking(ranking)
    assert len(data) == bpf_oom.RANKED_SIZE
    assert bpf_oom.unpack_ranking(data) == ranking
    assert bpf_oom.unpack_ranking(bpf_oom.pack_ranking(bpf_oom.Ranking((), 0, 0))).victims == ()
    for bad in (bpf_oom.Ranking(tuple(R(i + 1, 0) for i in range(9)), 0, 0),
                bpf_oom.Ranking((R(0, 1),), 0, 0), bpf_oom.Ranking((R(2**31, 1),), 0, 0),
                bpf_oom.Ranking((R(1, -1),), 0, 0)):
        with pytest.raises(BpfError):
            bpf_oom.pack_ranking(bad)
    for junk in (b"", data[:-1], b"\0" * bpf_oom.RANKED_SIZE,
                 data[:4] + struct.pack("<I", 9) + data[8:]):
        with pytest.raises(BpfError):
            bpf_oom.unpack_ranking(junk)


# -- the map, through libbpf ----------------------------------------------------------------


@pytest.fixture
def ranked_map() -> Iterator[bpf_oom.RankedMap]:
    try:
        m = bpf_oom.RankedMap()
    except BpfError as e:
        need(False, f"cannot make a BPF map here: {e}")
        raise
    try:
        yield m
    finally:
        m.close()


def test_the_map_round_trips(ranked_map: bpf_oom.RankedMap) -> None:
    R = bpf_oom.RankedVictim
    domain = 4242
    assert ranked_map.read(domain) is None
    first = ranked_map.write(domain, [R(100, 5), R(200, 6)])
    system = ranked_map.write(bpf_oom.SYSTEM_DOMAIN, [R(300, 7)])
    assert ranked_map.read(domain) == first
    assert ranked_map.read(bpf_oom.SYSTEM_DOMAIN) == system
    second = ranked_map.write(domain, [R(200, 6)])
    assert second.generation > first.generation and second.written_ns >= first.written_ns
    assert ranked_map.read(domain) == second  # replaced whole
    assert ranked_map.remove(domain) and not ranked_map.remove(domain)
    assert ranked_map.read(domain) is None and ranked_map.read(0) == system
    with pytest.raises(BpfError):
        ranked_map.write(domain, [R(i + 1, 0) for i in range(bpf_oom.RANKED_MAX + 1)])


def test_the_map_is_bounded_and_closes() -> None:
    before = len(os.listdir("/proc/self/fd"))
    try:
        small = bpf_oom.RankedMap(max_domains=2)
    except BpfError as e:
        need(False, f"cannot make a BPF map here: {e}")
        raise
    try:
        small.write(1, [])
        small.write(2, [])
        with pytest.raises(BpfError, match="cannot write the ranking of domain 3"):
            small.write(3, [])
    finally:
        small.close()
        small.close()
    assert len(os.listdir("/proc/self/fd")) == before
    with pytest.raises(BpfError, match="closed"):
        small.read(1)


# -- status ---------------------------------------------------------------------------------


@pytest.mark.kernel
def test_the_daemons_status_says_what_struct_ops_is(memcg_factory: MemcgFactory,
                                                    tmp_path: Path, sockdir: Path) -> None:
    """``oomwarden status`` of a running daemon (dry run, one child memcg)
    has the ``struct_ops`` part, never in use, with the detector's line."""
    cg: ChildMemcg = memcg_factory.create(limit_bytes=64 * MiB)
    sock = str(sockdir / "c.sock")
    expected = bpf_oom.detect()
    warden = LiveWarden(tmp_path, cg, sock)
    try:
        shown = cli("status", "--json", "--socket", sock)
        assert shown.returncode == 0, shown.stderr
        assert json.loads(shown.stdout)["bpf"]["struct_ops"] == {
            "in_use": False, "detail": expected.detail}
        text = cli("status", "--socket", sock)
        assert text.returncode == 0, text.stderr
        # (the console wraps long lines at its width: compare the words)
        assert f"BPF struct_ops: not in use: {expected.detail}" in " ".join(text.stdout.split())
    finally:
        assert warden.stop() == 0
