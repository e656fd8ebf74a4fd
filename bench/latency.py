#!/usr/bin/env python3
"""OOM kill latency: the kernel's own memcg OOM killer against the warden.

In a child memory cgroup of this process's own (cgroup v1, limit 128 MiB, no
swap), a "grower" allocates until the cgroup runs out; the time measured runs
from the OOM (an eventfd on ``memory.oom_control``, registered by this
benchmark: the same instrument for both) to the grower's exit (its pidfd
becoming readable). Two modes, each ``--runs`` times, in the same run:

* **kernel**: the kernel's own killer;
* **warden**: ``oomwarden run`` with the ``kernel`` policy on that cgroup,
  the kernel's killer paused. Its snapshots come from the BPF task iterator
  where it loads (docs/bpf.md); ``OOMWARDEN_BPF_OBJECT=/nonexistent`` in the
  environment makes it use procfs, for a comparison in the same conditions.

With 10 and with 500 extra (sleeping) processes in the cgroup. Prints p50 and
p95 of each and the warden/kernel p50 ratios; then the warden's idle CPU time over
``--idle`` seconds and its RSS. ``--quick``: 5 runs each, 10 s idle, 10 tasks.

Run as root from the repository root: ``.venv/bin/python bench/latency.py``.
Everything it starts is killed and its cgroup removed, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import select
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from oomwarden.sandbox import (
    ChildMemcg,
    MemcgFactory,
    own_v1_memcg_dir,
    start_warden,
)

LIMIT_MIB = 128
GROWER_MIB = 192
RUN_TIMEOUT_S = 10.0


def oom_eventfd(cg: ChildMemcg) -> tuple[int, int]:
    control = os.open(cg.path / "memory.oom_control", os.O_RDONLY | os.O_CLOEXEC)
    efd = os.eventfd(0, os.EFD_CLOEXEC)
    (cg.path / "cgroup.event_control").write_text(f"{efd} {control}")
    return efd, control


def one_run(cg: ChildMemcg, efd: int) -> float | None:
    """Seconds from the OOM to the grower's exit; None if it did not happen."""
    grower = cg.start_grower(GROWER_MIB)
    pidfd = os.pidfd_open(grower.pid)
    try:
        ready, _, _ = select.select([efd], [], [], RUN_TIMEOUT_S)
        if not ready:
            return None
        t0 = time.perf_counter()
        os.read(efd, 8)
        ready, _, _ = select.select([pidfd], [], [], RUN_TIMEOUT_S)
        t1 = time.perf_counter()
        return t1 - t0 if ready else None
    finally:
        os.close(pidfd)
        grower.proc.kill()
        grower.proc.wait(timeout=10)
        cg.hogs.remove(grower)
        time.sleep(0.05)
        with_drained(efd)


def with_drained(efd: int) -> None:
    """Late notifications of the last OOM must not start the next run's clock."""
    while select.select([efd], [], [], 0.05)[0]:
        os.read(efd, 8)


def sleepers(cg: ChildMemcg, n: int) -> list[subprocess.Popen[bytes]]:
    procs = []
    for _ in range(n):
        p = subprocess.Popen(["sleep", "600"])
        (cg.path / "cgroup.procs").write_text(str(p.pid))
        procs.append(p)
    return procs


def oom_kills(cg: ChildMemcg) -> int:
    """The kernel's own OOM kills in the cgroup so far."""
    return int(cg.read("memory.oom_control").split("oom_kill ")[-1].split()[0])


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def cpu_and_rss(pid: int) -> tuple[float, int]:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])
    rss_kb = next(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text()
                  .splitlines() if line.startswith("VmRSS:"))
    return ticks / os.sysconf("SC_CLK_TCK"), rss_kb * 1024


def main() -> int:
    parser = argparse.ArgumentParser(prog="bench/latency.py", description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--idle", type=float, default=60.0, help="idle CPU window (s)")
    parser.add_argument("--quick", action="store_true", help="5 runs each, 10 s idle, 10 tasks")
    args = parser.parse_args()
    runs, idle = (5, 10.0) if args.quick else (args.runs, args.idle)
    task_counts = (10,) if args.quick else (10, 500)
    parent, why = own_v1_memcg_dir()
    if parent is None or os.geteuid() != 0:
        print(f"bench/latency.py needs root and a writable v1 memory cgroup: {why}")
        return 2
    factory = MemcgFactory(parent, prefix="oomwarden-bench")
    results: dict[tuple[str, int], list[float]] = {}
    idle_cpu = rss = None
    try:
        with tempfile.TemporaryDirectory(prefix="oomwarden-bench-") as tmp:
            for n in task_counts:
                cg = factory.create(limit_bytes=LIMIT_MIB * 1024 * 1024)
                extra = sleepers(cg, n)
                efd, control = oom_eventfd(cg)
                try:
                    for mode in ("kernel", "warden"):
                        warden = start_warden(cg, tmp) if mode == "warden" else None
                        kernel_kills = oom_kills(cg)
                        try:
                            times = [t for _ in range(runs) if (t := one_run(cg, efd)) is not None]
                            results[(mode, n)] = times
                            if warden is not None and oom_kills(cg) != kernel_kills:
                                print(f"WARNING: the kernel killed during the warden runs "
                                      f"({n} tasks): those figures are not the warden's")
                            if warden is not None and n == task_counts[0]:
                                cpu0, _ = cpu_and_rss(warden.pid)
                                time.sleep(idle)
                                cpu1, rss = cpu_and_rss(warden.pid)
                                idle_cpu = cpu1 - cpu0
                        finally:
                            if warden is not None:
                                warden.stop()
                finally:
                    os.close(efd)
                    os.close(control)
                    for p in extra:
                        p.kill()
                        p.wait(timeout=5)
    finally:
        factory.cleanup()
    print(f"OOM kill latency, from the OOM eventfd to the grower's exit (limit {LIMIT_MIB} "
          f"MiB, grower {GROWER_MIB} MiB, {runs} runs each):")
    ratio = None
    others: list[str] = []
    for n in task_counts:
        k, w = results.get(("kernel", n), []), results.get(("warden", n), [])
        if not k or not w:
            print(f"  {n} tasks: too few completed runs (kernel {len(k)}, warden {len(w)})")
            continue
        kp50, wp50 = statistics.median(k) * 1000, statistics.median(w) * 1000
        print(f"  {n:>3} tasks  kernel p50 {kp50:6.1f} ms  p95 {percentile(k, 95) * 1000:6.1f} ms"
              f"   warden p50 {wp50:6.1f} ms  p95 {percentile(w, 95) * 1000:6.1f} ms"
              f"   ({len(k)}/{len(w)} runs)")
        if n == task_counts[0]:
            ratio = wp50 / kp50
        else:
            others.append(f"warden/kernel p50 ratio at {n} tasks: {wp50 / kp50:.2f}")
    if idle_cpu is not None and rss is not None:
        print(f"warden idle CPU: {idle_cpu * 1000:.0f} ms over {idle:g} s "
              f"({idle_cpu * 1000 * 60 / idle:.0f} ms per minute); RSS {rss / 2**20:.1f} MiB")
    for line in others:
        print(line)
    if ratio is not None:
        print(f"warden/kernel p50 ratio: {ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
