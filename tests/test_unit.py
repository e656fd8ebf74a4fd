"""The systemd unit (packaging/systemd/oomwarden.service) grants what the
warden needs: its own probes (the BPF task iterator, the BPF observer,
/dev/kmsg) are run under exactly the unit's capability bounding set, with
``setpriv``. (systemd itself is not run here; the other sandboxing options
are checked by reading the unit.)"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import need

UNIT = Path(__file__).resolve().parent.parent / "packaging" / "systemd" / "oomwarden.service"

PROBE = """
import os, sys
from oomwarden.errors import BpfError
from oomwarden.observer import open_source
from oomwarden.sources import bpf
failed = []
try:
    bpf.load()
except BpfError as e:
    failed.append(f"task iterator: {e}")
source, why = open_source()
if source is None:
    failed.append(f"observer: {why}")
else:
    source.close()
try:
    os.close(os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK))
except OSError as e:
    failed.append(f"/dev/kmsg: {e.strerror}")
print("; ".join(failed) or "ok")
"""


def _directive(name: str) -> list[str]:
    values = [line.split("=", 1)[1].split() for line in UNIT.read_text().splitlines()
              if line.startswith(f"{name}=")]
    return [v for vs in values for v in vs]


def _bounding_set() -> str:
    caps = _directive("CapabilityBoundingSet")
    assert caps and all(c.startswith("CAP_") for c in caps), caps
    return "-all," + ",".join("+" + c.removeprefix("CAP_").lower() for c in caps)


def _probe(bounding: str) -> str:
    done = subprocess.run(["setpriv", "--bounding-set", bounding, sys.executable, "-c", PROBE],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.mark.kernel
def test_the_units_capabilities_are_enough_for_bpf_and_kmsg() -> None:
    need(shutil.which("setpriv") is not None, "setpriv (util-linux) is not installed")
    need(_probe("-all,+bpf,+perfmon,+syslog,+dac_read_search,+dac_override") == "ok",
         "the BPF parts or /dev/kmsg cannot be had here even with their capabilities")
    assert _probe(_bounding_set()) == "ok"


@pytest.mark.kernel
def test_the_probe_fails_without_the_bpf_capabilities() -> None:
    """The probe can fail: without CAP_BPF and CAP_PERFMON (the unit's set
    before this was found) neither BPF part loads."""
    need(shutil.which("setpriv") is not None, "setpriv (util-linux) is not installed")
    without = ",".join(c for c in _bounding_set().split(",")
                       if c not in ("+bpf", "+perfmon"))
    said = _probe(without)
    assert "task iterator" in said and "observer" in said, said


def test_the_unit_leaves_dev_kmsg_readable() -> None:
    """ProtectKernelLogs=yes would hide /dev/kmsg, where the warden reads the
    kernel's OOM kills when BPF cannot be had."""
    assert _directive("ProtectKernelLogs") in ([], ["no"])
