"""The pure decision core: policies read snapshots and return decisions.

``kernel`` is the exact replica of the kernel's choice; ``registry`` maps
policy SPECs to policies; ``engine`` ranks a domain's tasks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from oomwarden.policy.registry import Policy


def load_policy(spec: str) -> Policy:
    """The policy named by ``spec`` (see :mod:`oomwarden.policy.registry`)."""
    from oomwarden.policy.registry import load_policy as load  # noqa: PLC0415 (import cycle)

    return load(spec)
