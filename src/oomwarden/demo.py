"""``make demo``: the warden against a leak, beside the kernel's own choice.

1. ``oomwarden explain`` on the live machine: what the kernel would kill now.
2. In a memory cgroup of its own (limit 512 MiB, no swap), a "database" holds
   300 MiB steadily and a "leaker" grows by 30 MiB a second. The warden runs
   (``oomwarden run``) with the ``growth`` policy on that cgroup and kills
   the leaker; the database lives. The demo prints the decision with its
   reasons beside the kernel's choice (the database: it is the largest) and
   removes everything again, also on Ctrl-C or error. The cgroup is:

   * a cgroup v2 child of this process's cgroup, where the memory controller
     is on cgroup v2 (and enabled for this cgroup's children): the kernel's
     killer cannot be paused there, so the warden acts before the limit, on
     ``memory.events`` (a ``memory.high`` guard 10 % below the limit), PSI
     and the working-set margin;
   * else a v1 child of this process's memory cgroup (statfs-verified), with
     the kernel's killer paused by the warden: it acts at the limit.

Not root, or no memory cgroup to make a child in: one line saying how to run it.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console

from oomwarden.cli import main as cli_main
from oomwarden.domains import memory_hierarchy
from oomwarden.model import HierarchyKind
from oomwarden.sandbox import (
    ChildMemcg,
    Hog,
    MemcgFactory,
    V2Factory,
    WardenProcess,
    own_v1_memcg_dir,
    own_v2_cgroup_dir,
    start_warden,
)
from oomwarden.sources.cgroupfs import find_hierarchies

MiB = 1024 * 1024
LIMIT_MIB = 512
DATABASE_MIB = 300
LEAK_MIB_PER_S = 30
WAIT_S = 60


def _confined(console: Console) -> int:
    if os.geteuid() != 0:
        console.print("the warden part of the demo needs root: run `sudo make demo`")
        return 0
    v2 = memory_hierarchy(find_hierarchies()) is HierarchyKind.V2
    parent, why = own_v2_cgroup_dir() if v2 else own_v1_memcg_dir()
    if parent is None:
        hint = ("on cgroup v2 a cgroup holding processes (a session scope) cannot give "
                "its children the memory controller: run it from a delegated cgroup with "
                "+memory in its cgroup.subtree_control and no process of its own, e.g. "
                "`systemd-run --scope -p Delegate=yes` and a leaf for the shell" if v2 else
                "it needs a writable v1 memory cgroup of its own")
        console.print(f"skipping the warden part: {why} ({hint})")
        return 0
    factory: MemcgFactory | V2Factory = (V2Factory(parent, prefix="oomwarden-demo") if v2
                                         else MemcgFactory(parent, prefix="oomwarden-demo"))
    warden: WardenProcess | None = None
    with tempfile.TemporaryDirectory(prefix="oomwarden-demo-") as tmp:
        try:
            cg: ChildMemcg = (factory.create(LIMIT_MIB * MiB) if isinstance(factory, V2Factory)
                              else factory.create(limit_bytes=LIMIT_MIB * MiB))
            console.rule(f"[bold]2. the warden, a database and a leak: {cg.hierarchy_path}")
            console.print(f"limit {LIMIT_MIB} MiB, " + (
                "cgroup v2: the warden acts before the limit (memory.high guard 10% below "
                "it, memory.events, PSI, the margin)" if v2 else
                "cgroup v1: the kernel's killer paused by the warden"))
            database = cg.start_hog(DATABASE_MIB, name="database")
            console.print(f"pid {database.pid} 'database' holds {DATABASE_MIB} MiB")
            log = Path(tmp) / "decisions.jsonl"
            warden = start_warden(cg, tmp, policy="growth",
                                  extra="high_guard_percent = 10" if v2 else "")
            leaker = cg.start_leaker(LEAK_MIB_PER_S, name="leaker")
            console.print(f"pid {leaker.pid} 'leaker' grows by {LEAK_MIB_PER_S} MiB/s")
            dead = _wait_for_a_death([database, leaker], console)
            if not dead:
                console.print(f"[red]nothing was killed within {WAIT_S} s[/]")
                return 1
            return _report(console, log, database, leaker, dead)
        finally:
            if warden is not None:
                warden.stop()
            factory.cleanup()
            console.print("removed the demo cgroup, its processes and the warden")


def _wait_for_a_death(hogs: list[Hog], console: Console) -> list[Hog]:
    deadline = time.monotonic() + WAIT_S
    with console.status("waiting for the cgroup to reach its limit ..."):
        while time.monotonic() < deadline:
            dead = [h for h in hogs if h.proc.poll() is not None]
            if dead:
                return dead
            time.sleep(0.05)
    return []


def _report(console: Console, log: Path, database: Hog, leaker: Hog, dead: list[Hog]) -> int:
    time.sleep(0.3)  # the warden writes its line right after the kill
    records = [json.loads(line) for line in log.read_text().splitlines() if line] \
        if log.exists() else []
    for r in records:
        if r.get("trigger") == "kernel_kill":
            console.print(f"[red]{r['event_detail']}[/]")
    records = [r for r in records if r.get("trigger") != "kernel_kill" and r.get("victim")]
    if not records:
        console.print("[red]the warden logged no kill[/]")
        return 1
    d = records[0]
    victim = d["victim"]
    console.print(f"\nthe warden's decision ({d['policy']}, "
                  f"{d['policy_ms']:.1f} ms in the policy):")
    console.print(f"  victim: pid {victim['pid']} ({victim['comm']})")
    for reason in victim["reasons"]:
        console.print(f"    - {reason}")
    kernel = max((c for c in d["candidates"] if c.get("kernel_points") is not None),
                 key=lambda c: c["kernel_points"], default=None)
    if kernel is not None:
        console.print(f"  the kernel would have killed: pid {kernel['pid']} ({kernel['comm']}), "
                      f"{kernel['kernel_points']} points (the largest)")
    ok = [h.pid for h in dead] == [leaker.pid] and database.proc.poll() is None
    verdict = "[green]the leaker is dead, the database lives[/]" if ok else \
        "[red]not as expected[/]"
    console.print(verdict)
    return 0 if ok else 1


def main() -> int:
    console = Console()
    if not console.is_terminal:
        console = Console(width=140)  # as explain's own tables
    console.rule("[bold]1. the live machine: what the kernel would kill now")
    console.print("$ oomwarden explain --top 5")
    status = cli_main(["explain", "--top", "5"])
    if status:
        return status
    try:
        return _confined(console)
    except (OSError, RuntimeError) as e:
        console.print(f"[red]demo failed: {e}[/]")
        return 2


if __name__ == "__main__":
    sys.exit(main())
