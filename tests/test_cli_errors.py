"""The CLI's error contract, end to end in a child process: one line on
stderr, exit status 2, never a traceback; a closed reader is not an error."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

HYBRID = Path(__file__).parent / "fixtures" / "hybrid"
TREE = ["--proc-root", str(HYBRID / "proc"), "--fs-root", str(HYBRID), "--no-verify-fs"]


def oomwarden(*argv: str, stdout: object = subprocess.PIPE) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "oomwarden.cli", *argv],
        stdout=stdout, stderr=subprocess.PIPE, text=True, timeout=60, check=False,
    )


def one_error_line(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode == 2, result
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("oomwarden: error: "), result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.parametrize(
    ("argv", "needles"),
    [
        (["--cgroup", ""], ["empty cgroup path"]),
        (["--cgroup", "v1:"], ["no path in cgroup 'v1:'"]),
        (["--cgroup", "cgroup:"], ["no path in cgroup"]),
        (["--cgroup", "/no/such/group"], ["no cgroup /no/such/group"]),
        (["--policy", "nope"], ["unknown policy 'nope'", "kernel"]),
        (["--policy", "/no/such/policy.py"], ["does not exist"]),
        (["--top", "0"], ["--top", ">= 1"]),
        (["--top", "x"], ["--top"]),
    ],
)
def test_bad_input_is_one_line_and_status_2(argv: list[str], needles: list[str]) -> None:
    one_error_line(oomwarden("explain", *TREE, *argv), *needles)


def test_unreadable_proc_root(tmp_path: Path) -> None:
    one_error_line(oomwarden("explain", "--proc-root", str(tmp_path / "none")), "proc root")


def test_wrong_fs_root(tmp_path: Path) -> None:
    result = oomwarden("explain", "--proc-root", str(HYBRID / "proc"), "--fs-root",
                       str(tmp_path), "--no-verify-fs")
    one_error_line(result, "is not a directory", "--fs-root")


def test_full_disk_on_output() -> None:
    with open("/dev/full", "w") as full:
        one_error_line(oomwarden("explain", *TREE, stdout=full), "No space left")
    with open("/dev/full", "w") as full:
        one_error_line(oomwarden("explain", *TREE, "--json", stdout=full), "No space left")


@pytest.mark.parametrize("extra", [[], ["--json"]])
def test_closed_reader_is_not_an_error(extra: list[str]) -> None:
    """`oomwarden explain | head -1`: both output forms exit 0 quietly."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "oomwarden.cli", "explain", *TREE, "--all", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.readline()
    proc.stdout.close()  # the reader goes away after one line
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 0, err
    assert err == ""
