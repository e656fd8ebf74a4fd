"""``oomwarden simulate``: the subcommand's arguments and its run (wired in
:mod:`oomwarden.cli`)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from oomwarden.simulate.report import compare, plot, print_table, progress_wanted
from oomwarden.simulate.scenario import MAX_STEPS, load_scenario


def _steps(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if not 1 <= value <= MAX_STEPS:
        raise argparse.ArgumentTypeError(f"expected 1 to {MAX_STEPS}, got {value}")
    return value


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"expected 0 to 2^63-1, got {value}")
    return value


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


def cmd_simulate(args: argparse.Namespace) -> int:
    scenario = load_scenario(args.scenario)
    comparison = compare(scenario, args.policy, seed=args.seed, steps=args.steps,
                         progress=progress_wanted())
    if args.plot:
        plot(comparison, args.plot)
    if args.json:
        sys.stdout.write(comparison.dumps())
        sys.stdout.flush()
        return 0
    print_table(comparison)
    if args.plot:
        sys.stdout.write(f"plot written to {args.plot}\n")
    return 0
