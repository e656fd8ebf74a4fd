"""Turning a user's ``--cgroup`` argument into a cgroup of the snapshot."""

from __future__ import annotations

import os
from collections.abc import Iterable

from oomwarden.errors import CgroupNotFound
from oomwarden.model import Cgroup, Hierarchy, HierarchyKind, Snapshot


def within(path: str | None, top: str) -> bool:
    """Whether cgroup ``path`` is ``top`` or below it (paths inside one
    hierarchy; ``top`` "/" holds every path). None (unknown) is not."""
    return path is not None and (path == top or path.startswith(top.rstrip("/") + "/"))


def memory_hierarchy(hierarchies: Iterable[Hierarchy]) -> HierarchyKind:
    """Where the memory controller is: v2 where a cgroup2 hierarchy has it,
    else the v1 memory hierarchy (hybrid hosts, as here)."""
    if any(h.kind is HierarchyKind.V2 and h.has_memory for h in hierarchies):
        return HierarchyKind.V2
    return HierarchyKind.V1


def mount_relative(root: str, path: str) -> str:
    """Cgroup ``path`` (inside a hierarchy) relative to a mount of that
    hierarchy whose root is ``root`` (mountinfo's root field), without a
    leading "/": join it to the mount point for the directory ("" is the
    mount point itself)."""
    rel = path[len(root):] if root != "/" and path.startswith(root) else path
    return rel.lstrip("/")


def _normalise(path: str) -> str:
    norm = os.path.normpath("/" + path.strip("/"))
    return "/" if norm in ("/", "//") else norm


def resolve_cgroup(snapshot: Snapshot, spec: str) -> Cgroup:
    """Find a cgroup by hierarchy path or by filesystem path.

    Accepted: ``/a/b`` (a path inside a hierarchy; the memory hierarchy is
    preferred), ``v1:/a/b`` or ``v2:/a/b`` (one hierarchy), ``cgroup:/a/b``
    (as in the config), or a filesystem path below a hierarchy's mount point
    (``/sys/fs/cgroup/memory/a/b``).
    """
    text = spec.strip()
    if not text:
        raise CgroupNotFound("empty cgroup path")
    kinds: tuple[HierarchyKind, ...] = (HierarchyKind.V1, HierarchyKind.V2)
    for prefix, only in (("v1:", HierarchyKind.V1), ("v2:", HierarchyKind.V2)):
        if text.startswith(prefix):
            kinds, text = (only,), text[len(prefix):]
    text = text.removeprefix("cgroup:")
    if not text.strip():
        raise CgroupNotFound(f"no path in cgroup {spec!r}")
    # A filesystem path below a mount point? The resolved path first (it
    # settles "..", symlinks), then the text as given.
    real = os.path.realpath(text) if os.path.isabs(text) else text
    looked: list[str] = []
    for candidate in dict.fromkeys((real, text)):
        for h in snapshot.hierarchies:
            mount = h.mount_point.rstrip("/")
            if not (candidate == mount or candidate.startswith(mount + "/")):
                continue
            inner = _normalise(h.root.rstrip("/") + "/" + candidate[len(mount):].lstrip("/"))
            if h.kind not in kinds:
                asked = "/".join(k.value for k in kinds)
                looked.append(f"{h.kind.value}:{inner}, not on the {asked} hierarchy asked for")
                continue
            cg = snapshot.cgroup(h.kind, inner)
            if cg is not None:
                return cg
            looked.append(f"{h.kind.value}:{inner}")
    if looked:
        raise CgroupNotFound(f"no cgroup at {spec} (looked for {'; '.join(looked)})")
    inner = _normalise(text)
    found = [c for k in kinds if (c := snapshot.cgroup(k, inner)) is not None]
    with_memory = [c for c in found if c.memory_controller]
    if with_memory:
        return with_memory[0]
    if found:
        return found[0]
    known = ", ".join(f"{h.kind.value} at {h.mount_point}" for h in snapshot.hierarchies)
    raise CgroupNotFound(
        f"no cgroup {inner} on any hierarchy ({known or 'no cgroup hierarchy mounted'})"
    )
