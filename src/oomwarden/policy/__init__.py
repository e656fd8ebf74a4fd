"""The pure decision core: policies read snapshots and return decisions.

Policy authors import from here::

    from oomwarden.policy import DEFAULT, IGNORE, ABORT, select, KillCgroup

``api`` defines verdicts, actions and the read-only context; ``kernel`` is
the exact replica of the kernel's choice; ``decide`` is the engine (budget,
fallback); ``builtin`` holds the built-in policies; ``rules`` compiles TOML
rules; ``loader`` loads ``.py`` policies; ``registry`` maps a SPEC to a policy.
"""

from __future__ import annotations

from oomwarden.policy.api import (
    ABORT,
    DEFAULT,
    IGNORE,
    Context,
    DeleteFiles,
    Event,
    KillCgroup,
    KillProcess,
    Policy,
    RunHook,
    Verdict,
    select,
)

__all__ = [
    "ABORT",
    "DEFAULT",
    "IGNORE",
    "Context",
    "DeleteFiles",
    "Event",
    "KillCgroup",
    "KillProcess",
    "Policy",
    "RunHook",
    "Verdict",
    "load_policy",
    "select",
]


def load_policy(spec: str) -> Policy:
    """The policy named by ``spec`` (see :mod:`oomwarden.policy.registry`)."""
    from oomwarden.policy.registry import load_policy as load  # noqa: PLC0415 (import cycle)

    return load(spec)
