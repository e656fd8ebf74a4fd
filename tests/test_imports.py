"""What ``oomwarden run`` loads: the daemon locks its memory (mlockall), so
every module ``oomwarden.cli`` imports stays resident (issue 4: at most
25 MiB). Building the parser must not load another subcommand's
implementation, nor rich (only the commands that print tables need it)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from oomwarden import limits, trace
from oomwarden.simulate import scenario

#: Loaded only by the subcommands that need them (simulate, record, replay,
#: and the tables of explain, status and victim list).
NOT_FOR_THE_DAEMON = (
    "matplotlib",
    "rich",
    "oomwarden.display",
    "oomwarden.replay",
    "oomwarden.simulate",
    "oomwarden.simulate.command",
    "oomwarden.simulate.engine",
    "oomwarden.simulate.report",
    "oomwarden.simulate.scenario",
    "oomwarden.trace",
    "oomwarden.trace_cli",
)


def modules_after(code: str) -> set[str]:
    """``sys.modules`` of a fresh interpreter after running ``code``."""
    result = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport json, sys; print(json.dumps(sorted(sys.modules)))"],
        capture_output=True, text=True, timeout=60, check=True,
    )
    return set(json.loads(result.stdout.splitlines()[-1]))


@pytest.mark.parametrize(
    "code",
    [
        "import oomwarden.cli",
        # what `oomwarden run` and `oomwarden restore` do before they start
        "import oomwarden.cli as c; c.build_parser().parse_args(['run', '--dry-run'])",
        "import oomwarden.cli as c; c.build_parser().parse_args(['restore'])",
    ],
)
def test_the_daemon_loads_no_other_subcommand(code: str) -> None:
    loaded = modules_after(code)
    assert "oomwarden.daemon" in loaded
    unwanted = sorted(m for m in loaded if m.split(".")[0] == "rich" or m in NOT_FOR_THE_DAEMON
                      or m.startswith("matplotlib."))
    assert unwanted == []


def test_the_limits_the_parsers_show_are_the_ones_enforced() -> None:
    """One place for each bound: the parsers and the implementations share it."""
    assert trace.DEFAULT_LEVEL is limits.DEFAULT_LEVEL
    assert scenario.MAX_STEPS is limits.MAX_STEPS
