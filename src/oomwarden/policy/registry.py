"""Policies: the pure decision core.

A policy SPEC is a built-in name. This foundation ships ``kernel``, the exact
replica of the kernel's ``oom_badness()`` / ``select_bad_process()``; other
built-ins, Python policy modules and TOML rules plug in here.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from oomwarden.decision import Decision, Domain
from oomwarden.errors import PolicyError
from oomwarden.model import Snapshot
from oomwarden.policy.engine import kernel_decision

Policy = Callable[[Snapshot, Domain], Decision]

BUILTINS: dict[str, Policy] = {
    "kernel": kernel_decision,
}


def load_policy(spec: str) -> Policy:
    """The policy named by ``spec``; :class:`PolicyError` if there is none."""
    if spec in BUILTINS:
        return BUILTINS[spec]
    if spec.endswith((".py", ".toml")) or os.sep in spec:
        if not os.path.exists(spec):
            raise PolicyError(f"policy file {spec} does not exist")
        raise PolicyError(
            f"policy file {spec}: policy files are not supported yet (built-ins: "
            f"{', '.join(sorted(BUILTINS))})"
        )
    raise PolicyError(f"unknown policy {spec!r} (built-ins: {', '.join(sorted(BUILTINS))})")
