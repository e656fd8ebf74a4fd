"""``make demo`` where the memory controller is on cgroup v2 (the guest)."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.kernel


def test_the_demo_on_cgroup_v2() -> None:
    done = subprocess.run([sys.executable, "-m", "oomwarden.demo"], capture_output=True,
                          text=True, timeout=600, check=False)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert "cgroup v2: the warden acts before the limit" in out, out
    assert "the leaker is dead, the database lives" in out, out
    assert "the kernel killed" not in out, out
