"""``make demo``: oomwarden explain on the live machine, then on a confined
memory cgroup where the kernel's real OOM killer confirms the prediction.

The confined part makes a child memory cgroup under this process's own v1
memory cgroup (statfs-verified, limit 256 MiB), starts three processes in it,
pauses the cgroup's OOM killer, lets one process run into the limit, shows
what ``oomwarden explain --cgroup`` predicts, lets the kernel kill, reports
whom it killed, and removes everything again (also on Ctrl-C or error).
Where no v1 memory controller is writable it says why and stops after the
live part.
"""

from __future__ import annotations

import signal
import sys
import time

from rich.console import Console

from oomwarden.cli import main as cli_main
from oomwarden.domains import resolve_cgroup
from oomwarden.errors import OomwardenError
from oomwarden.policy.engine import cgroup_domain, kernel_decision
from oomwarden.sandbox import Hog, MemcgFactory, own_v1_memcg_dir
from oomwarden.sources.snapshot import SourceConfig, build_snapshot

MiB = 1024 * 1024


def _confined(console: Console) -> int:
    parent, why = own_v1_memcg_dir()
    if parent is None:
        console.print(f"[yellow]skipping the confined part: {why}[/]")
        return 0
    factory = MemcgFactory(parent, prefix="oomwarden-demo")
    try:
        cg = factory.create(limit_bytes=256 * MiB)
        console.rule(f"[bold]2. a confined memory cgroup: {cg.hierarchy_path} (limit 256 MiB)")
        big = cg.start_hog(80, adj=0)
        small = cg.start_hog(40, adj=500)
        console.print(f"started pid {big.pid} (80 MiB, oom_score_adj 0) and "
                      f"pid {small.pid} (40 MiB, oom_score_adj 500)")
        cg.write("memory.oom_control", "1")
        grower = cg.start_grower(144, adj=0)
        console.print(f"pid {grower.pid} allocates 144 MiB and runs into the limit; "
                      "the kernel's killer is paused (oom_kill_disable=1)")
        deadline = time.monotonic() + 30
        while "under_oom 1" not in cg.read("memory.oom_control"):
            if time.monotonic() > deadline:
                console.print("[red]the cgroup did not reach its limit in 30 s[/]")
                return 1
            time.sleep(0.05)
        console.print(f"\n$ oomwarden explain --cgroup {cg.hierarchy_path}")
        cli_main(["explain", "--cgroup", cg.hierarchy_path])
        snap = build_snapshot(SourceConfig())
        domain = cgroup_domain(snap, resolve_cgroup(snap, cg.hierarchy_path))
        decision = kernel_decision(snap, domain)
        predicted = decision.victim.task.pid if decision.victim else None
        cg.write("memory.oom_control", "0")
        console.print("\nthe kernel's killer is resumed (oom_kill_disable=0) ...")
        hogs = (big, small, grower)
        deadline = time.monotonic() + 30
        dead: list[Hog] = []
        while not dead and time.monotonic() < deadline:
            dead = [h for h in hogs if h.proc.poll() is not None]
            time.sleep(0.05)
        if not dead:
            console.print("[red]the kernel killed nothing within 30 s[/]")
            return 1
        victim = dead[0]
        how = "SIGKILL" if victim.proc.returncode == -signal.SIGKILL else victim.proc.returncode
        ok = victim.pid == predicted
        verdict = "[green]as predicted[/]" if ok else "[red]NOT as predicted[/]"
        console.print(f"the kernel killed pid {victim.pid} ({how}): {verdict} "
                      f"(oomwarden predicted pid {predicted})")
        return 0 if victim.pid == predicted else 1
    finally:
        factory.cleanup()
        console.print("removed the confined cgroup and its processes")


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
    except (OSError, OomwardenError, RuntimeError) as e:
        console.print(f"[red]demo failed: {e}[/]")
        return 2


if __name__ == "__main__":
    sys.exit(main())
