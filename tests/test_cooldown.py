"""The daemon's cooldown rules on synthetic results (no kernel needed)."""

from __future__ import annotations

import os
from pathlib import Path

from oomwarden.actions.executor import Result
from oomwarden.daemon import _Cooldown
from oomwarden.sources.parse import parse_stat


def _me() -> tuple[int, int]:
    """A victim that is certainly alive: this process."""
    return os.getpid(), parse_stat(Path("/proc/self/stat").read_bytes()).start_ticks


def kill(*, exited: bool, victim: tuple[int, int] = (1 << 22, 1)) -> Result:
    return Result("kill_process", True, "", 0.0, (victim[0],), signal_ns=1,
                  exit_ns=2 if exited else None, victims=(victim,), exited=exited)


def test_memory_gone_and_conditions_cleared_end_it_early() -> None:
    c = _Cooldown(60.0)
    c.start([kill(exited=True)], lag_s=0.0, resolved=True)
    assert not c.holds("margin") and not c.holds("oom")


def test_a_kill_that_left_the_conditions_holding_waits_it_out() -> None:
    c = _Cooldown(60.0)
    c.start([kill(exited=True)], lag_s=0.0, resolved=False)
    assert c.holds("margin") and c.holds("threshold")
    assert not c.holds("oom")  # exact: a new OOM after the victim is gone is a new OOM


def test_a_victim_still_alive_holds_it_until_it_is_gone() -> None:
    c = _Cooldown(60.0)
    c.start([kill(exited=False, victim=_me())], lag_s=0.0, resolved=True)
    assert c.holds("margin") and c.holds("oom")
    c.start([kill(exited=False, victim=(_me()[0], _me()[1] + 1))], lag_s=0.0, resolved=True)
    assert not c.holds("margin")  # that pid names another process: the victim is gone


def test_psi_waits_one_window_after_any_kill() -> None:
    c = _Cooldown(60.0)
    c.start([kill(exited=True)], lag_s=2.0, resolved=True)  # e.g. an oom or margin kill
    assert c.holds("pressure") and not c.holds("margin")


def test_a_decision_that_killed_nothing_still_holds() -> None:
    c = _Cooldown(60.0)
    c.start([], lag_s=2.0, resolved=False)
    assert c.holds("margin") and c.holds("threshold") and c.holds("pressure")
    c.start([], lag_s=2.0, resolved=True)  # e.g. files deleted, the margin cleared
    assert not c.holds("pressure")  # no PSI lag without a kill


def test_sigterm_only_may_escalate_to_the_kill_level() -> None:
    c = _Cooldown(60.0)
    c.start([kill(exited=False, victim=_me())], lag_s=0.0, resolved=False, term_only=True)
    assert c.holds("threshold") and not c.holds("threshold", escalate=True)


def test_the_timeout_ends_everything_and_a_dry_run_holds_to_it() -> None:
    c = _Cooldown(0.0)
    c.start([kill(exited=False, victim=_me())], lag_s=5.0, resolved=False)
    assert not c.holds("pressure") and not c.holds("oom")
    d = _Cooldown(60.0)
    d.start_dry()
    assert d.holds("margin") and d.holds("oom")
