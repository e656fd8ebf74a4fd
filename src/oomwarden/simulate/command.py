"""``oomwarden simulate``: the subcommand's run, which :mod:`oomwarden.cli`
imports when it runs (the subcommand's parser is in :mod:`oomwarden.cli_args`)."""

from __future__ import annotations

import argparse
import sys

from oomwarden.simulate.report import compare, plot, print_table, progress_wanted
from oomwarden.simulate.scenario import load_scenario


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
