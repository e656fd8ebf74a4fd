"""Policy SPECs: a built-in name, a ``.py`` policy module, or a ``.toml`` rules file.

``load_policy(spec)`` turns a SPEC into a :class:`~oomwarden.policy.api.Policy`
or raises :class:`PolicyError` naming what is wrong and where.
"""

from __future__ import annotations

import os

from oomwarden.errors import PolicyError
from oomwarden.policy.api import Policy

KERNEL = Policy(
    name="kernel",
    kernel=True,
    description="the kernel's own choice, replicated exactly (oom_badness)",
)


def builtins() -> dict[str, Policy]:
    """Every built-in policy by name."""
    from oomwarden.policy.builtin import BUILTINS  # noqa: PLC0415 (builtin imports the API)
    from oomwarden.policy.peers import PEERS  # noqa: PLC0415 (peer emulations, same reason)

    return {"kernel": KERNEL, **BUILTINS, **PEERS}


def load_policy(spec: str) -> Policy:
    """The policy a SPEC names; :class:`PolicyError` if there is none."""
    known = builtins()
    if spec in known:
        return known[spec]
    if spec.endswith(".toml"):
        from oomwarden.policy.rules import load_rules  # noqa: PLC0415

        return load_rules(spec)
    if spec.endswith(".py"):
        from oomwarden.policy.loader import load_module  # noqa: PLC0415

        return load_module(spec)
    if os.sep in spec and not os.path.exists(spec):
        raise PolicyError(f"policy file {spec} does not exist")
    raise PolicyError(
        f"unknown policy {spec!r} (built-ins: {', '.join(sorted(known))}; or a .py or .toml file)"
    )
