"""`make demo`'s main job, end to end: the warden kills the leaker and the
database lives (it runs in a child memory cgroup the demo makes and removes)."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.kernel


def test_the_demo_kills_the_leaker_not_the_database() -> None:
    done = subprocess.run([sys.executable, "-m", "oomwarden.demo"], capture_output=True,
                          text=True, timeout=180, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "the leaker is dead, the database lives" in done.stdout
    assert "the kernel would have killed" in done.stdout and "(database)" in done.stdout
    assert "removed the demo cgroup" in done.stdout
