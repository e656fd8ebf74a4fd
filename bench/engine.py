#!/usr/bin/env python3
"""Decision time of the policy engine on synthetic snapshots.

For 1,000, 5,000 and 10,000 tasks (``--tasks`` to choose), times the whole
decision (``decide()``) for three policies, and for the two per-task ones the
same policy function called in a bare loop over the same tasks, in the same
run, so that the engine's own overhead shows:

* ``kernel``: the exact replica (its own fast path, no per-task callback);
* a 20-rule TOML file (protect, prefer, avoid, points, victim-first rules on
  comm, exe, cmdline, cgroup and uid);
* a trivial ``.py`` policy (``return DEFAULT``).

Each figure is the median of ``--reps`` runs after one warm-up; it prints
µs per task. Targets (issue 3): 10,000 tasks decided in under 50 ms with
``kernel`` and with the 20-rule file.

Run from the repository root: ``.venv/bin/python bench/engine.py``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

from oomwarden.decision import Domain
from oomwarden.model import (
    Cgroup,
    Hierarchy,
    HierarchyKind,
    Snapshot,
    SystemMemory,
    Task,
    page_counter_max_bytes,
)
from oomwarden.policy.api import Context, Policy
from oomwarden.policy.decide import decide
from oomwarden.policy.engine import system_domain
from oomwarden.policy.registry import load_policy

PAGE = 4096
SIZES = (1000, 5000, 10_000)
TARGET_N = 10_000
TARGET_MS = 50.0
CGROUPS = ("/system.slice/db.service", "/system.slice/ssh.service", "/batch.slice/job-1",
           "/batch.slice/job-2", "/user.slice/user-1000.slice/session-2.scope", "/app")
COMMS = ("postgres", "sshd", "python3", "make", "cc1plus", "java", "bash", "node", "redis")

RULES = """
[policy]
base = "kernel"
victim = "process"
""" + "".join(
    f"""
[[rule]]
name = "rule {i}"
{match}
action = "{action}"
{extra}
"""
    for i, (match, action, extra) in enumerate([
        ('match.exe = "^/usr/lib/postgresql/.*/bin/postgres$"', "protect", ""),
        ('match.cgroup = "/system.slice/ssh.service"', "protect", ""),
        ('match.uid = 0\nmatch.comm = "^systemd"', "protect", ""),
        ('match.cgroup = "/batch.slice/*"', "prefer", "multiply = 2.0"),
        ('match.comm = "^(cc1|cc1plus|ld)$"', "prefer", "add = 100000"),
        ('match.cmdline = "--max-old-space-size"', "prefer", "add = 50000"),
        ('match.comm = "^java$"', "avoid", "multiply = 0.5"),
        ('match.cgroup = "/user.slice/*"', "avoid", "add = 20000"),
        ('match.comm = "^bash$"', "avoid", "multiply = 0.8"),
        ('match.comm = "^node$"', "prefer", "multiply = 1.5"),
        ('match.comm = "^redis"', "points", "points = 5"),
        ('match.cgroup = "/app"', "prefer", "add = 1000"),
        ('match.uid = [1000, 1001]', "prefer", "add = 10"),
        ('match.comm = "^make$"', "prefer", "multiply = 1.1"),
        ('match.cmdline = "^python3 .*train"', "victim-first", ""),
        ('match.exe = "^/opt/"', "avoid", "add = 10"),
        ('match.comm = "^x"', "avoid", "add = 10"),
        ('match.comm = "^y"', "avoid", "add = 10"),
        ('match.comm = "^z"', "avoid", "add = 10"),
        ('match.cgroup = "/kubepods*/besteffort*"', "prefer", "multiply = 3.0"),
    ])
)
PY_POLICY = '''"""The trivial policy: no opinion on anything."""
from oomwarden.policy import DEFAULT


def evaluate(task, ctx):
    return DEFAULT
'''


def synthetic(n: int) -> Snapshot:
    """``n`` processes across a few cgroups and names, sizes spread widely."""
    unlimited = page_counter_max_bytes(PAGE)
    cgroups = tuple(
        Cgroup(HierarchyKind.V2, path, "/sys/fs/cgroup" + path, 100 + i, True, True,
               usage=0, limit=unlimited)
        for i, path in enumerate(("/", *CGROUPS))
    )
    tasks = []
    for i in range(n):
        pid = 100 + i
        comm = COMMS[i % len(COMMS)]
        tasks.append(Task(
            pid=pid, tgid=pid, ppid=1, comm=comm, state="S", start_ticks=1000 + i, uid=i % 3,
            kthread=False, has_mm=True, rss_anon=(i * 7919) % 200_000, rss_file=i % 1000,
            rss_shmem=0, swap=0, pgtables=10 + i % 50, oom_score_adj=(i % 11) * 10 - 50,
            cgroup_v2=CGROUPS[i % len(CGROUPS)], exe=f"/usr/bin/{comm}",
            cmdline=(comm, "--flag", str(i)),
        ))
    memory = SystemMemory(16 << 30, 8 << 30, 0, 0, None, PAGE, 60)
    hierarchies = (Hierarchy(HierarchyKind.V2, "/sys/fs/cgroup", "/", ("memory",), True),)
    return Snapshot(0, memory, tuple(tasks), hierarchies, cgroups)


def median_ms(job: Callable[[], object], reps: int) -> float:
    job()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        job()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def bare_loop(policy: Policy, snap: Snapshot) -> Callable[[], object]:
    """The same evaluate function over the same tasks, with no engine around it
    (the context comes from one engine run, so the policy sees the same API)."""
    assert policy.evaluate is not None
    evaluate = policy.evaluate
    captured: list[Context] = []

    def grab(task: Task, ctx: Context) -> object:
        captured.append(ctx)
        return evaluate(task, ctx)

    decide(snap, system_domain(snap), Policy("grab", evaluate=grab), budget_s=60)  # type: ignore[arg-type]
    ctx = captured[0]
    tasks = snap.tasks

    def loop() -> object:
        return [evaluate(t, ctx) for t in tasks]

    return loop


def _decision(snap: Snapshot, domain: Domain, policy: Policy) -> Callable[[], object]:
    return lambda: decide(snap, domain, policy, budget_s=60)


def main() -> int:
    parser = argparse.ArgumentParser(prog="bench/engine.py", description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, action="append", help="task counts (1000 5000 10000)")
    parser.add_argument("--reps", type=int, default=7, help="timed runs per figure (7)")
    args = parser.parse_args()
    sizes = tuple(args.tasks) if args.tasks else SIZES
    with tempfile.TemporaryDirectory(prefix="oomwarden-bench-") as tmp:
        rules_path = os.path.join(tmp, "twenty-rules.toml")
        py_path = os.path.join(tmp, "trivial.py")
        with open(rules_path, "w") as f:
            f.write(RULES)
        with open(py_path, "w") as f:
            f.write(PY_POLICY)
        os.chmod(py_path, 0o644)
        policies = [("kernel", load_policy("kernel")),
                    ("20 rules", load_policy(rules_path)),
                    ("trivial .py", load_policy(py_path))]
        print(f"engine benchmark: python {sys.version.split()[0]}, median of {args.reps}")
        verdicts: dict[str, float] = {}
        for n in sizes:
            snap = synthetic(n)
            domain = system_domain(snap)
            print(f"{n:,} tasks:")
            for label, policy in policies:
                ms = median_ms(_decision(snap, domain, policy), args.reps)
                line = f"  {label:<12} decide {ms:8.2f} ms  {ms * 1000 / n:6.2f} µs/task"
                if policy.evaluate is not None:
                    bare = median_ms(bare_loop(policy, snap), args.reps)
                    line += (f"   bare loop {bare:7.2f} ms   engine overhead "
                             f"{(ms - bare) * 1000 / n:5.2f} µs/task ({ms / bare:.1f}x)")
                print(line, flush=True)
                if n == TARGET_N:
                    verdicts[label] = ms
    for label in ("kernel", "20 rules"):
        if label in verdicts:
            ms = verdicts[label]
            print(f"target {TARGET_N:,} tasks with {label} in < {TARGET_MS:g} ms: "
                  f"{ms:.1f} ms, {'met' if ms < TARGET_MS else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
