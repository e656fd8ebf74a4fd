"""Whole-pipeline robustness: random machines, some of their files garbled.

Whatever the trees hold, `oomwarden explain` ends in one of two ways: a
ranking (exit 0, valid JSON) or one error line with exit status 2. Never a
traceback, never another status.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from oomwarden import cli

from treebuilder import FakeProc, FakeTree

PROCS = st.builds(
    FakeProc,
    pid=st.integers(2, 99_999),
    comm=st.binary(max_size=20),
    state=st.sampled_from("RSDZTXI"),
    ppid=st.integers(0, 99_999),
    num_threads=st.integers(1, 4),
    start_ticks=st.integers(0, 2**40),
    uid=st.integers(0, 2**32 - 2),
    rss_anon_kb=st.none() | st.integers(0, 2**34),
    rss_file_kb=st.integers(0, 2**30),
    swap_kb=st.integers(0, 2**30),
    kthread=st.booleans(),
    oom_score_adj=st.integers(-1000, 1000),
    memcg_v1=st.sampled_from([None, "/", "/job"]),
    cgroup_v2=st.sampled_from([None, "/", "/job.scope"]),
    listed=st.booleans(),
    omit=st.frozensets(st.sampled_from(["stat", "status", "oom_score_adj", "cgroup"])),
)
GARBAGE = st.binary(max_size=120) | st.sampled_from(
    [b"", b"max\n", b"-1\n", b"9" * 5000, b"some avg10=x\n", b"a b c\n", b"\xff\xfe\n"]
)


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(
    layout=st.sampled_from(["hybrid", "v2", "v1"]),
    procs=st.lists(PROCS, max_size=8, unique_by=lambda p: p.pid),
    garble=st.lists(st.tuples(st.integers(0, 10**6), GARBAGE), max_size=3),
    cgroup=st.sampled_from([None, "/job", "v2:/job.scope", "/"]),
)
def test_explain_ends_in_a_ranking_or_one_error_line(
    capsys: pytest.CaptureFixture[str],
    layout: str,
    procs: list[FakeProc],
    garble: list[tuple[int, bytes]],
    cgroup: str | None,
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tree = FakeTree(Path(tmp), layout=layout)
        if layout != "v2":
            tree.v1("/job", limit=256 * 1024**2)
        tree.v2("/job.scope")
        tree.add(FakeProc(1, b"init", ppid=0, start_ticks=1), *procs)
        tree.write()
        files = _files(tree.root)
        for index, data in garble:
            files[index % len(files)].write_bytes(data)
        argv = ["explain", *tree.cli_args(), "--all", "--json"]
        if cgroup is not None:
            argv += ["--cgroup", cgroup]
        capsys.readouterr()
        code = cli.main(argv)
        out, err = capsys.readouterr()
    event(f"exit status {code}")
    assert code in (0, 2), (code, err)
    if code == 0:
        decision = json.loads(out)
        assert err == ""
        assert decision["considered"] == len(decision["candidates"])
        assert decision["victim"] is None or decision["victim"]["verdict"] == "select"
    else:
        lines = err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("oomwarden: error: "), err
        assert out == ""
