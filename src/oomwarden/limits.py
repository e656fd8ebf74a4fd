"""Defaults and bounds that a subcommand's argument parser shows or checks
and its implementation enforces, kept once, here, in a module that imports
nothing: building ``oomwarden``'s parser (every subcommand's, for ``--help``
and parsing) must not load the implementations, since ``oomwarden run``
locks in memory every module it imports (issue 4: at most 25 MiB).

The modules that enforce them re-export them under the same names
(:data:`oomwarden.trace.DEFAULT_LEVEL`, :data:`oomwarden.simulate.scenario.MAX_STEPS`).
"""

from __future__ import annotations

#: A trace's default compression level: with delta encoding, 6 stores a
#: steady snapshot in less than half the bytes of level 1 for ~2 ms more per
#: snapshot of 2,000 tasks, next to the ~70 ms the snapshot itself takes
#: (docs/benchmarks.md).
DEFAULT_LEVEL = 6
#: The most steps a simulation (and any step count in a scenario) may have:
#: keeps a run small and its numbers in range.
MAX_STEPS = 100_000
