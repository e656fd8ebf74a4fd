"""``oomwarden simulate``: a deterministic discrete-time simulator of memory in
one domain, with the kernel's OOM killer and the warden deciding through the
same decision core the daemon runs (see ``docs/simulate.md``).

``scenario`` reads and checks a scenario file, ``engine`` runs one policy
over it, ``report`` compares policies (table, JSON, plot).
"""

from __future__ import annotations

from oomwarden.simulate.engine import Kill, Result, simulate
from oomwarden.simulate.scenario import Scenario, ScenarioError, load_scenario, parse_scenario

__all__ = ["Kill", "Result", "Scenario", "ScenarioError", "load_scenario", "parse_scenario",
           "simulate"]
