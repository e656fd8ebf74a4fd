#!/usr/bin/env python3
"""Where a procfs snapshot's time goes: each step on its own, same sleepers.

Starts N extra sleeping processes (``bench/snapshot.py``'s sleepers, always
removed), then times, each as the median of ``--reps`` passes:

* the bare reads of ``stat``, ``status`` and ``oom_score_adj`` through a
  ``/proc/PID`` directory fd, and the same opened by path (no parsing);
* reading ``status`` alone;
* each parser over the bytes read once (``parse_stat``, ``parse_status``,
  ``parse_oom_score_adj``);
* building one frozen ``Task`` per process;
* ``build_snapshot`` and ``kernel_decision`` as the warden runs them.

Run from the repository root: ``.venv/bin/python bench/breakdown.py [-n N]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from oomwarden.model import Task
from oomwarden.policy.engine import kernel_decision, system_domain
from oomwarden.sources.parse import (
    parse_oom_score_adj,
    parse_stat,
    parse_status,
)
from oomwarden.sources.snapshot import SourceConfig, build_snapshot
from snapshot import sleepers

FILES = ("stat", "status", "oom_score_adj")
FLAGS = os.O_RDONLY | os.O_CLOEXEC


def median_ms(job: Callable[[], object], reps: int) -> float:
    job()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        job()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def main() -> int:
    parser = argparse.ArgumentParser(prog="bench/breakdown.py", description=__doc__.split("\n")[0])
    parser.add_argument("-n", "--extra", type=int, default=5000, help="extra sleepers (5000)")
    parser.add_argument("--reps", type=int, default=5, help="passes per step (5)")
    args = parser.parse_args()
    with sleepers(args.extra, "/bin/sleep"):
        proc = os.open("/proc", os.O_RDONLY | os.O_DIRECTORY)
        try:
            names = [n for n in os.listdir(proc) if n.isdigit()]
            raw: list[list[bytes]] = []

            def by_dirfd() -> None:
                raw.clear()
                for name in names:
                    try:
                        d = os.open(name, FLAGS | os.O_DIRECTORY, dir_fd=proc)
                    except OSError:
                        continue
                    try:
                        got = []
                        for f in FILES:
                            fd = os.open(f, FLAGS, dir_fd=d)
                            got.append(os.read(fd, 16384))
                            os.close(fd)
                        raw.append(got)
                    except OSError:
                        pass
                    finally:
                        os.close(d)

            def by_path() -> None:
                for name in names:
                    for f in FILES:
                        try:
                            fd = os.open(f"{name}/{f}", FLAGS, dir_fd=proc)
                        except OSError:
                            break
                        os.read(fd, 16384)
                        os.close(fd)

            def status_only() -> None:
                for name in names:
                    try:
                        fd = os.open(f"{name}/status", FLAGS, dir_fd=proc)
                    except OSError:
                        continue
                    os.read(fd, 16384)
                    os.close(fd)

            args_ = (1, 1, 0, "x", "S", 5, 0, False, True, 1, 2, 3, 0, 4, 0, "/", "/",
                     None, None, None, 4096, 6)
            snap = build_snapshot(SourceConfig())
            steps: list[tuple[str, Callable[[], object]]] = [
                ("bare reads, /proc/PID dir fd", by_dirfd),
                ("bare reads, by path", by_path),
                ("reading status alone", status_only),
                ("parse_stat", lambda: [parse_stat(r[0]) for r in raw]),
                ("parse_status", lambda: [parse_status(r[1]) for r in raw]),
                ("parse_oom_score_adj", lambda: [parse_oom_score_adj(r[2]) for r in raw]),
                ("building frozen Tasks", lambda: [Task(*args_) for _ in raw]),
                ("build_snapshot", lambda: build_snapshot(SourceConfig())),
                ("kernel_decision", lambda: kernel_decision(snap, system_domain(snap))),
            ]
            print(f"{len(names)} processes, median of {args.reps} passes after a warm-up")
            for label, job in steps:
                print(f"  {label:<30} {median_ms(job, args.reps):8.1f} ms")
        finally:
            os.close(proc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
