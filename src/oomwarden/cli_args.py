"""The argument parsers of ``oomwarden simulate``, ``record`` and ``replay``,
apart from their implementations (:mod:`oomwarden.simulate.command`,
:mod:`oomwarden.trace_cli`), which :func:`oomwarden.cli.main` imports only
when one of them runs: this module imports nothing but argparse and
:mod:`oomwarden.limits`, so that ``oomwarden run``, which builds the whole
parser, keeps none of them in its locked memory.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from oomwarden.limits import DEFAULT_LEVEL, MAX_STEPS

# -- value checkers, for every subcommand's arguments (cli.py uses them too) ------------


def whole_number(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None


def positive(text: str) -> int:
    """A whole number >= 1."""
    value = whole_number(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {value}")
    return value


def int_in(low: int, high: int, shown: str | None = None) -> Callable[[str], int]:
    """A checker of whole numbers from ``low`` to ``high`` (said as ``shown``)."""
    def check(text: str) -> int:
        value = whole_number(text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"expected {shown or f'{low} to {high}'}, "
                                             f"got {value}")
        return value
    return check


def seconds_in(low: float, high: float) -> Callable[[str], float]:
    """A checker of seconds from ``low`` to ``high``."""
    def check(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"expected {low:g} to {high:g} seconds, "
                                             f"got {value:g}")
        return value
    return check


# -- simulate ---------------------------------------------------------------------------

_steps = int_in(1, MAX_STEPS)
_seed = int_in(0, 2**63 - 1, "0 to 2^63-1")


def add_simulate_command(sub: Any) -> None:
    """The ``simulate`` subparser on ``sub`` (argparse's subparsers action)."""
    sm = sub.add_parser(
        "simulate",
        help="compare policies on a synthetic scenario: kills, importance lost, time at the "
        "limit",
        description="Run a deterministic simulation of memory in one domain (a scenario "
        "file, docs/simulate.md) once per policy, with the kernel's OOM killer (the exact "
        "badness) and the warden's triggers, and compare the outcomes. Without --policy, "
        "the scenario's own list.",
    )
    sm.add_argument("scenario", metavar="SCENARIO", help="a scenario TOML file")
    sm.add_argument("--policy", action="append", default=[], metavar="SPEC",
                    help="a policy SPEC (repeat to compare several)")
    sm.add_argument("--json", action="store_true",
                    help="print one JSON object (the same seed gives the same bytes)")
    sm.add_argument("--plot", metavar="PNG", help="write a plot: one panel per policy")
    sm.add_argument("--seed", type=_seed, default=None, metavar="N",
                    help="the seed of the memory jitter (default: the scenario's)")
    sm.add_argument("--steps", type=_steps, default=None, metavar="N",
                    help="run this many steps (default: the scenario's)")


# -- record and replay ------------------------------------------------------------------

#: Snapshots at most this often (a snapshot of 2,000 tasks takes ~50 ms) and
#: at least this often.
MIN_INTERVAL_S = 0.05
MAX_INTERVAL_S = 3600.0
MAX_DURATION_S = 30 * 24 * 3600.0


_interval = seconds_in(MIN_INTERVAL_S, MAX_INTERVAL_S)
_duration = seconds_in(MIN_INTERVAL_S, MAX_DURATION_S)
_level = int_in(1, 9)
_top = positive


def add_trace_commands(sub: argparse._SubParsersAction[Any]) -> None:
    rc = sub.add_parser(
        "record",
        help="record a trace of snapshots, for `oomwarden replay`",
        description="Take a snapshot every --interval seconds (the whole system, or one "
        "cgroup subtree) and write each to FILE as it is taken: a compressed, versioned "
        "stream (docs/trace-format.md). Stops at --duration, Ctrl-C or SIGTERM; a killed "
        "recorder leaves a readable trace.",
    )
    rc.add_argument("--out", required=True, metavar="FILE", help="the trace file (replaced)")
    rc.add_argument("--interval", type=_interval, default=1.0, metavar="S",
                    help="seconds between snapshots (default 1)")
    rc.add_argument("--duration", type=_duration, default=None, metavar="S",
                    help="stop after this many seconds (default: until Ctrl-C or SIGTERM)")
    rc.add_argument("--cgroup", metavar="PATH",
                    help="only this cgroup subtree (as `explain --cgroup` takes it)")
    rc.add_argument("--details", action="store_true",
                    help="also read every process's exe and cmdline (policies matching "
                    "names need them; costs one more read per process)")
    rc.add_argument("--level", type=_level, default=DEFAULT_LEVEL, metavar="N",
                    help=f"gzip level 1..9 (default {DEFAULT_LEVEL})")
    rc.add_argument("--no-compress", action="store_true", help="plain JSON lines")
    rc.add_argument("--no-delta", action="store_true",
                    help="every process and cgroup in full in every snapshot")
    rp = sub.add_parser(
        "replay",
        help="run policies over a recorded trace: each one's victim, where they disagree",
        description="Walk a trace; wherever a trigger would have fired (and at every "
        "snapshot with --every) run each policy, with the history the daemon would have "
        "had, and report each one's victim and reasons.",
    )
    rp.add_argument("file", metavar="FILE", help="a trace from `oomwarden record`")
    rp.add_argument("--policy", action="append", metavar="SPEC",
                    help="a policy SPEC; repeat to compare (default: kernel)")
    rp.add_argument("--every", action="store_true",
                    help="decide at every snapshot too, in the --cgroup domain (default: the "
                    "recorded cgroup, or the system)")
    rp.add_argument("--json", action="store_true", help="one JSON object per point")
    rp.add_argument("--cgroup", metavar="PATH",
                    help="only this memory cgroup's domain (as `explain --cgroup` takes it)")
    rp.add_argument("--trigger", action="append", metavar="SPEC",
                    help="oom, limit, margin[:PERCENT], threshold[:MEM[:SWAP]], "
                    "pressure[:full=P][,some=P]; repeat (default: oom, margin:10, "
                    "threshold:10, pressure:full=40)")
    rp.add_argument("--top", type=_top, default=5, metavar="N",
                    help="candidates per decision in --json (default 5)")
