"""The trace format: exact round trips (fixture trees, the live machine, random
snapshots), the decision core giving the same answer on a replayed snapshot,
truncated files read up to the cut, and garbage refused with TraceError only."""

from __future__ import annotations

import dataclasses
import gzip
import io
import json
import zlib
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from oomwarden.errors import OomwardenError, TraceError
from oomwarden.model import (
    Cgroup,
    Hierarchy,
    HierarchyKind,
    OomControl,
    Pressure,
    PsiLine,
    Snapshot,
    SystemMemory,
    Task,
)
from oomwarden.policy.decide import decide
from oomwarden.policy.engine import cgroup_domain, system_domain
from oomwarden.policy.history import History
from oomwarden.policy.registry import load_policy
from oomwarden.sources.procfs import ReadOptions
from oomwarden.sources.snapshot import SourceConfig, build_snapshot
from oomwarden.trace import (
    FORMAT,
    VERSION,
    TraceReader,
    TraceWriter,
    read_trace,
    seal,
    unseal,
)

FIXTURES = Path(__file__).parent / "fixtures"
PAGE = 4096
HOST = {"hostname": "test", "kernel_release": "6.18.0", "page_size": PAGE,
        "clock_ticks": 100, "boot_id": "b"}


def write(snapshots: list[Snapshot], *, compress: bool = True, delta: bool = True,
          close: bool = True) -> bytes:
    buf = io.BytesIO()
    w = TraceWriter(buf, options={"interval_s": 1.0}, compress=compress, delta=delta,
                    host=HOST, wall_clock=lambda: 1, monotonic=lambda: 2)
    for i, s in enumerate(snapshots):
        w.write(s, wall_ns=1000 + i)
    if close:
        w.close()
    return buf.getvalue()


def read(data: bytes) -> tuple[list[Snapshot], TraceReader]:
    reader = TraceReader(io.BytesIO(data), "t.trace")
    return [r.snapshot for r in reader], reader


def fixture(name: str) -> Snapshot:
    root = FIXTURES / name
    return build_snapshot(SourceConfig(
        proc_root=str(root / "proc"), fs_root=str(root), verify_fs=False, page_size=PAGE,
        read=ReadOptions(oom_score=True, details=True)))


# -- round trips on real snapshots ---------------------------------------------------------


@pytest.mark.parametrize("name", ["hybrid", "v2"])
@pytest.mark.parametrize(("compress", "delta"), [(True, True), (True, False), (False, True)])
def test_fixture_trees_round_trip(name: str, compress: bool, delta: bool) -> None:
    snap = fixture(name)
    assert snap.tasks and snap.cgroups and snap.hierarchies
    # the same tree twice, then once with one task changed: the delta refers
    # back to most items and stores the changed one in full
    changed = dataclasses.replace(snap, taken_ns=snap.taken_ns + 10**9, tasks=(
        dataclasses.replace(snap.tasks[0], rss_anon=(snap.tasks[0].rss_anon or 0) + 1),
        *snap.tasks[1:]))
    snaps = [snap, dataclasses.replace(snap, taken_ns=snap.taken_ns + 5 * 10**8), changed]
    got, reader = read(write(snaps, compress=compress, delta=delta))
    assert got == snaps
    assert reader.complete and not reader.truncated
    assert reader.header.host == HOST and reader.header.delta is delta


def test_every_cgroup_field_survives_on_v2() -> None:
    snap = fixture("v2")
    (got,), _ = read(write([snap]))
    for before, after in zip(snap.cgroups, got.cgroups, strict=True):
        for f in dataclasses.fields(Cgroup):
            assert getattr(before, f.name) == getattr(after, f.name), f.name
    assert any(c.pressure is not None for c in got.cgroups)
    assert any(c.events for c in got.cgroups) and any(c.stat for c in got.cgroups)
    assert got.hierarchies == snap.hierarchies


def _same_decisions(live: list[Snapshot], replayed: list[Snapshot]) -> None:
    for policy_name in ("kernel", "largest", "growth", "youngest"):
        policy = load_policy(policy_name)
        for i in range(1, len(live)):
            assert replayed[i] == live[i]
            cgroup_domains = [cgroup_domain(live[i], c) for c in live[i].cgroups
                              if c.memory_controller and c.path != "/"]
            domains = [system_domain(live[i]), *cgroup_domains[:3]]
            for domain in domains:
                rdomain = (system_domain(replayed[i]) if domain.cgroup is None else
                           cgroup_domain(replayed[i], replayed[i].cgroup(
                               domain.cgroup.kind, domain.cgroup.path)))  # type: ignore[arg-type]
                a = decide(live[i], domain, policy, history=History(live[i - 1]),
                           budget_s=60)
                b = decide(replayed[i], rdomain, policy, history=History(replayed[i - 1]),
                           budget_s=60)
                ja, jb = a.to_json(top=None), b.to_json(top=None)
                ja.pop("policy_ms")
                jb.pop("policy_ms")
                assert ja == jb, (policy_name, domain.name)


def test_decide_on_a_replayed_fixture_gives_the_same_decision() -> None:
    snap = fixture("hybrid")
    grown = dataclasses.replace(snap, taken_ns=snap.taken_ns + 2 * 10**9, tasks=tuple(
        dataclasses.replace(t, rss_anon=(t.rss_anon or 0) + 1000 * (i % 3)) if t.has_mm else t
        for i, t in enumerate(snap.tasks)))
    live = [snap, grown]
    replayed, _ = read(write(live))
    assert replayed == live
    _same_decisions(live, replayed)


def test_the_live_machine_round_trips() -> None:
    config = SourceConfig(read=ReadOptions(oom_score=True, details=True))
    live = [build_snapshot(config), build_snapshot(config)]
    replayed, reader = read(write(live))
    assert replayed == live and reader.complete
    _same_decisions(live, replayed)


def test_a_trace_is_a_gzip_file_of_json_lines(tmp_path: Path) -> None:
    data = write([fixture("v2")])
    lines = gzip.decompress(data).splitlines()
    assert all(unseal(x) is not None for x in lines)  # JSON, a tab, its CRC32
    header, snap, end = (json.loads(x.rpartition(b"\t")[0]) for x in lines)
    assert header["format"] == FORMAT and header["version"] == VERSION
    assert header["schema"]["task"][0] == "pid"
    assert snap["t"] == "snap" and snap["i"] == 0 and snap["wall_ns"] == 1000
    assert end == {"t": "end", "snapshots": 1, "reason": "stopped"}
    path = tmp_path / "x.trace"
    path.write_bytes(data)
    _header, records, complete = read_trace(str(path))
    assert complete and len(records) == 1 and records[0].wall_ns == 1000


# -- a killed recorder ---------------------------------------------------------------------


@pytest.mark.parametrize("compress", [True, False])
def test_a_cut_trace_reads_up_to_the_cut(compress: bool) -> None:
    snap = fixture("v2")
    snaps = [dataclasses.replace(snap, taken_ns=snap.taken_ns + i) for i in range(3)]
    data = write(snaps, compress=compress, close=False)  # no end marker, no trailer
    got, reader = read(data)
    assert got == snaps and reader.truncated and not reader.complete
    full = write(snaps, compress=compress)
    header_end = len(write([], compress=compress, close=False))
    for cut in range(header_end, len(full), max(1, len(full) // 150)):
        got, reader = read(full[:cut])
        assert got == snaps[:len(got)]
        assert reader.truncated != reader.complete


# -- refusals ------------------------------------------------------------------------------


def _obj(line: bytes) -> dict[str, object]:
    body = unseal(line)
    assert body is not None
    obj = json.loads(body)
    assert isinstance(obj, dict)
    return obj


def _sealed(obj: object) -> bytes:
    return seal(json.dumps(obj).encode())[:-1]


def _rewrite_header(data: bytes, **changes: object) -> bytes:
    lines = gzip.decompress(data).split(b"\n")
    header = _obj(lines[0])
    header.update(changes)
    lines[0] = _sealed(header)
    return gzip.compress(b"\n".join(lines))


@pytest.mark.parametrize(("changes", "message"), [
    ({"version": 1}, "trace format version 1; this oomwarden reads version 2 only"),
    ({"format": "other"}, "not an oomwarden trace"),
    ({"schema": {"task": ["pid"]}}, "schema differs"),
])
def test_another_version_or_format_is_refused(changes: dict[str, object], message: str) -> None:
    data = _rewrite_header(write([fixture("v2")]), **changes)
    with pytest.raises(TraceError, match=message):
        read(data)


def test_wrong_values_are_refused_with_the_place() -> None:
    lines = gzip.decompress(write([fixture("v2")], delta=False)).split(b"\n")
    rec: Any = _obj(lines[1])
    rec["tasks"][0][0] = "1"  # pid as a string
    lines[1] = _sealed(rec)
    with pytest.raises(TraceError, match=r"record 1: tasks\[0\]: Task.pid: expected an integer"):
        read(gzip.compress(b"\n".join(lines)))
    rec["tasks"][0] = 5  # a back-reference with nothing before it
    lines[1] = _sealed(rec)
    with pytest.raises(TraceError, match="refers to item 5"):
        read(gzip.compress(b"\n".join(lines)))


@pytest.mark.parametrize("data", [b"", b"\x1f\x8b", b"hello\n", b"{}\n", b"[1]\n",
                                  gzip.compress(b"\xff\xfe\n"), b"\x1f\x8b" + b"\0" * 40])
def test_garbage_is_refused(data: bytes) -> None:
    with pytest.raises(TraceError):
        read(data)


# -- random snapshots ----------------------------------------------------------------------

texts = st.text(st.characters(codec="utf-8") | st.sampled_from("\udcff\udc80\n)("),
                max_size=12)
opt_int = st.none() | st.integers(-(2**63), 2**64)
small = st.integers(0, 2**40)
finite = st.floats(allow_nan=False)
psi = st.builds(PsiLine, finite, finite, finite, small)
pressure = st.none() | st.builds(Pressure, psi, st.none() | psi)
kinds = st.sampled_from(list(HierarchyKind))
maps = st.dictionaries(texts, st.integers(0, 2**64), max_size=4).map(MappingProxyType)

tasks = st.builds(
    Task, pid=st.integers(1, 2**22), tgid=small, ppid=small, comm=texts,
    state=st.sampled_from("RSDZXI"), start_ticks=small, uid=opt_int, kthread=st.booleans(),
    has_mm=st.booleans(), rss_anon=opt_int, rss_file=opt_int, rss_shmem=opt_int, swap=opt_int,
    pgtables=opt_int, oom_score_adj=st.none() | st.integers(-1000, 1000),
    memcg_v1=st.none() | texts, cgroup_v2=st.none() | texts, kernel_oom_score=opt_int,
    exe=st.none() | texts, cmdline=st.none() | st.tuples(texts, texts), page_size=small,
    oom_rss=opt_int, global_init=st.booleans(), in_vfork=st.booleans())
cgroups = st.builds(
    Cgroup, kind=kinds, path=texts, fs_path=texts, inode=small,
    memory_controller=st.booleans(), verified=st.booleans(), usage=opt_int, limit=opt_int,
    memsw_usage=opt_int, memsw_limit=opt_int, failcnt=opt_int,
    oom_control=st.none() | st.builds(OomControl, st.booleans(), st.booleans(), opt_int),
    swappiness=opt_int, use_hierarchy=st.none() | st.booleans(), high=opt_int, low=opt_int,
    min=opt_int, swap_current=opt_int, swap_max=opt_int, oom_group=st.none() | st.booleans(),
    events=maps, has_kill=st.booleans(), has_freeze=st.booleans(), stat=maps,
    pressure=pressure, pids=st.lists(small, max_size=4).map(tuple))
hierarchies = st.builds(Hierarchy, kinds, texts, texts, st.lists(texts, max_size=3).map(tuple),
                        st.booleans())
systems = st.builds(SystemMemory, small, opt_int, small, small, pressure, small, opt_int)
snapshots = st.builds(
    Snapshot, taken_ns=st.integers(0, 2**63), system=systems,
    tasks=st.lists(tasks, max_size=5).map(tuple),
    hierarchies=st.lists(hierarchies, max_size=2).map(tuple),
    cgroups=st.lists(cgroups, max_size=3).map(tuple),
    build_seconds=st.none() | finite, skipped_gone=small, skipped_unreadable=small,
    skipped_unparsable=small, problems=st.lists(texts, max_size=2).map(tuple),
    skipped_cgroups=small, degraded_cgroups=small,
    cgroup_problems=st.lists(texts, max_size=2).map(tuple))


@st.composite
def sequences(draw: st.DrawFn) -> list[Snapshot]:
    """Snapshots that share items, as consecutive snapshots do."""
    first = draw(snapshots)
    out = [first]
    for _ in range(draw(st.integers(0, 3))):
        nxt = draw(snapshots)
        keep = draw(st.lists(st.sampled_from(out[-1].tasks), max_size=5)) if out[-1].tasks \
            else []
        kept_cg = list(out[-1].cgroups[: draw(st.integers(0, 3))])
        out.append(dataclasses.replace(
            nxt, tasks=(*keep, *nxt.tasks), cgroups=(*nxt.cgroups, *kept_cg),
            hierarchies=out[-1].hierarchies if draw(st.booleans()) else nxt.hierarchies))
    return out


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sequences(), st.booleans(), st.booleans())
def test_random_snapshots_round_trip_exactly(snaps: list[Snapshot], compress: bool,
                                             delta: bool) -> None:
    got, reader = read(write(snaps, compress=compress, delta=delta))
    assert got == snaps and reader.complete
    for a, b in zip(got, snaps, strict=True):
        assert [t.comm for t in a.tasks] == [t.comm for t in b.tasks]  # surrogates too


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_are_refused_with_trace_error(data: bytes) -> None:
    try:
        read(data)
    except TraceError:
        return
    raise AssertionError("garbage was read as a trace")


_SAMPLE: list[bytes] = []


def _sample(compress: bool) -> bytes:
    if not _SAMPLE:
        snap = fixture("v2")
        snaps = [snap, dataclasses.replace(snap, taken_ns=snap.taken_ns + 1)]
        _SAMPLE.extend([write(snaps, compress=False), write(snaps, compress=True)])
    return _SAMPLE[int(compress)]


@settings(max_examples=300, deadline=None)
@given(st.booleans(), st.data())
def test_a_damaged_trace_is_read_or_refused_never_another_exception(
        compress: bool, data: st.DataObject) -> None:
    raw = bytearray(_sample(compress))
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(raw) - 1))
        raw[at] = data.draw(st.integers(0, 255))
    try:
        got, _ = read(bytes(raw))
    except TraceError:
        return
    except OomwardenError as e:  # pragma: no cover - would be a bug
        raise AssertionError(f"not a TraceError: {e!r}") from e
    assert all(isinstance(s, Snapshot) for s in got)


def test_a_zlib_stream_that_is_not_gzip_is_refused() -> None:
    with pytest.raises(TraceError):
        read(zlib.compress(b'{"format": "oomwarden-trace"}\n'))


def test_a_record_changed_without_its_crc_is_refused() -> None:
    lines = gzip.decompress(write([fixture("v2")], delta=False)).split(b"\n")
    body, _, crc = lines[1].rpartition(b"\t")
    lines[1] = body.replace(b'"wall_ns":1000', b'"wall_ns":1001') + b"\t" + crc
    with pytest.raises(TraceError, match=r"record 1 is damaged \(its CRC32 does not match\)"):
        read(gzip.compress(b"\n".join(lines)))
    lines = gzip.decompress(write([fixture("v2")])).split(b"\n")
    lines[0] = lines[0].replace(b'"hostname":"test"', b'"hostname":"tesT"')
    with pytest.raises(TraceError, match="header is damaged"):
        read(gzip.compress(b"\n".join(lines)))


_FLIP_SAMPLE: dict[bool, tuple[list[Snapshot], bytes]] = {}


def _flip_sample(compress: bool) -> tuple[list[Snapshot], bytes]:
    if compress not in _FLIP_SAMPLE:
        snap = fixture("v2")
        snaps = [dataclasses.replace(snap, taken_ns=snap.taken_ns + i,
                                     tasks=snap.tasks[i:]) for i in range(4)]
        _FLIP_SAMPLE[compress] = (snaps, write(snaps, compress=compress))
    return _FLIP_SAMPLE[compress]


@settings(max_examples=800, deadline=None)
@given(st.booleans(), st.booleans(), st.data())
def test_a_single_bit_flip_is_refused_or_yields_only_the_records_before_it(
        compress: bool, cut: bool, data: st.DataObject) -> None:
    # gzip's CRC is at the end of the stream, which a cut trace lacks: the
    # per-line CRC32 must catch the damage before the record is used
    snaps, full = _flip_sample(compress)
    raw = bytearray(full[:data.draw(st.integers(1, len(full) - 1))] if cut else full)
    at = data.draw(st.integers(0, len(raw) - 1))
    raw[at] ^= 1 << data.draw(st.integers(0, 7))
    got: list[Snapshot] = []
    try:
        reader = TraceReader(io.BytesIO(bytes(raw)))
        for rec in reader:
            got.append(rec.snapshot)
    except TraceError:
        pass
    assert got == snaps[:len(got)], "a damaged record was read as valid"
