"""Real-kernel test helpers: most live in the package (the demo uses them
too); twins of a child memory cgroup in the other hierarchies, and the
daemon as a subprocess (``tests/`` and the VM lane's ``tests/v2``), are here."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import pytest

from oomwarden.sandbox import (
    ChildMemcg,
    Hog,
    MemcgFactory,
    own_v1_memcg_dir,
    remove_cgroup_dir,
)
from oomwarden.sandbox import WardenProcess as Warden
from oomwarden.sources.fsmagic import is_cgroup_fs
from oomwarden.sources.parse import parse_mountinfo, parse_proc_cgroup, v1_controllers

__all__ = ["ChildMemcg", "Hog", "MemcgFactory", "TwinFactory", "Warden", "decisions", "need",
           "own_v1_memcg_dir", "remove_cgroup_dir"]

REQUIRE_KERNEL = os.environ.get("OOMWARDEN_REQUIRE_KERNEL") == "1"


def need(condition: bool, why: str) -> None:
    """Skip (or, under ``OOMWARDEN_REQUIRE_KERNEL=1``, set by ``.ci/run`` and
    always in the VM lane's guest, fail) a real-kernel test whose capability
    is missing."""
    if condition:
        return
    if REQUIRE_KERNEL:
        pytest.fail(f"OOMWARDEN_REQUIRE_KERNEL=1 but {why}")
    pytest.skip(why)


def decisions(log_dir: Path) -> list[dict[str, object]]:
    """The records of ``log_dir``/decisions.jsonl (none while it is missing)."""
    log = log_dir / "decisions.jsonl"
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines() if line]


class TwinFactory:
    """Twins of a child memory cgroup: the same path in the cgroup2 hierarchy
    ("v2") or in the v1 freezer hierarchy ("freezer"), as systemd keeps the
    trees alike on hybrid hosts. Made only below this process's own cgroup in
    that hierarchy; only the directories made here are removed, afterwards."""

    def __init__(self) -> None:
        self.made: list[Path] = []

    @staticmethod
    def mount(kind: str) -> tuple[Path, str] | None:
        """(mount point, this process's cgroup there), verified; None if absent."""
        mounts = parse_mountinfo(Path("/proc/self/mountinfo").read_bytes())
        own_lines = Path("/proc/self/cgroup").read_text().splitlines()
        for m in mounts:
            if kind == "v2" and m.kind.value == "v2":
                _memcg, own = parse_proc_cgroup(Path("/proc/self/cgroup").read_bytes())
            elif kind == "freezer" and "freezer" in v1_controllers(m.super_options):
                own = next((line.split(":", 2)[2] for line in own_lines
                            if "freezer" in line.split(":", 2)[1].split(",")), None)
            else:
                continue
            if own is None or not is_cgroup_fs(m.mount_point, v2=kind == "v2"):
                return None
            return Path(m.mount_point), own
        return None

    def make(self, cg: ChildMemcg, kind: str) -> Path:
        found = self.mount(kind)
        need(found is not None, f"no verified {kind} hierarchy with this process in it")
        assert found is not None
        mount, own = found
        need(cg.hierarchy_path.startswith(own.rstrip("/") + "/"),
             f"the memcg's path is not below this process's {kind} cgroup {own}")
        path = mount
        for part in cg.hierarchy_path.strip("/").split("/"):
            path = path / part
            if not path.exists():
                path.mkdir()
                self.made.append(path)
        control = "memory.pressure" if kind == "v2" else "freezer.state"
        need((path / control).exists(), f"the {kind} twin has no {control}")
        return path

    def cleanup(self) -> None:
        for directory in reversed(self.made):
            with contextlib.suppress(OSError):
                if (directory / "cgroup.freeze").exists():
                    (directory / "cgroup.freeze").write_text("0")
                if (directory / "freezer.state").exists():
                    (directory / "freezer.state").write_text("THAWED")
            error = remove_cgroup_dir(directory)
            if error is not None:
                raise error
        self.made.clear()
