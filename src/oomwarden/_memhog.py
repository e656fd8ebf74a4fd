"""A test process: join a cgroup, set oom_score_adj, touch memory, wait.

usage: python -m oomwarden._memhog CGROUP_PROCS SIZE ADJ [NAME]

SIZE is one of:
- ``N``: touch N MiB, print "ready";
- ``grow:N``: allocate N MiB 8 MiB at a time without announcing itself (it is
  meant to run into its cgroup's limit, only ever inside a limited child
  cgroup);
- ``leak:R``: grow by R MiB per second (in tenths), for ever (only ever
  inside a limited child cgroup), after printing "ready";
- ``edge:K``: touch pages one by one, switching CPUs, until its badness as
  /proc/PID/status counts it is K pages past the next step of the system
  oom_score, then print "ready": a process whose score depends on which rss
  count the kernel uses (the per-CPU counters leave the two apart).

It then waits until stdin closes, at most 120 s: it never outlives a test.
"""

from __future__ import annotations

import mmap
import os
import select
import sys
import time

LIFETIME = 120.0


def _status_points() -> int:
    fields: dict[str, int] = {}
    with open("/proc/self/status") as f:
        for line in f:
            parts = line.split()
            if len(parts) > 1 and parts[0] in ("RssAnon:", "RssFile:", "RssShmem:", "VmPTE:"):
                fields[parts[0]] = int(parts[1])
    return sum(fields.values()) // 4


def _score(points: int, total: int) -> int:
    return (1000 + points * 1000 // total) * 2 // 3


def _edge(past: int) -> mmap.mmap:
    with open("/proc/meminfo") as f:
        total = next(int(line.split()[1]) // 4 for line in f if line.startswith("MemTotal:"))
    start = _status_points()
    target = start + 1
    while _score(target, total) == _score(target - 1, total):
        target += 1
    target += past
    pages = target - start + 4096
    area = mmap.mmap(-1, pages * 4096)
    cpus = sorted(os.sched_getaffinity(0))
    i = 0
    while _status_points() < target and i < pages:
        os.sched_setaffinity(0, {cpus[i % len(cpus)]})
        for _ in range(3):
            area[i * 4096] = 1
            i += 1
    os.sched_setaffinity(0, set(cpus))
    return area


def _name(name: str) -> None:
    """prctl(PR_SET_NAME): how the process shows in /proc and in the decision."""
    import ctypes  # noqa: PLC0415

    ctypes.CDLL(None).prctl(15, name.encode()[:15], 0, 0, 0)


def main() -> None:
    procs, size, adj = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if len(sys.argv) > 4:
        _name(sys.argv[4])
    with open("/proc/self/oom_score_adj", "w") as f:
        f.write(str(adj))
    with open(procs, "w") as f:
        f.write(str(os.getpid()))
    deadline = time.monotonic() + LIFETIME
    held: list[object] = []
    if size.startswith("grow:"):
        for _ in range(int(size[5:]) // 8):
            held.append(b"\x01" * (8 << 20))
    elif size.startswith("leak:"):
        step = max(1, int(float(size[5:]) * (1 << 20) / 10))
        print("ready", flush=True)
        while time.monotonic() < deadline:
            held.append(b"\x01" * step)
            time.sleep(0.1)
    elif size.startswith("edge:"):
        held.append(_edge(int(size[5:])))
        print("ready", flush=True)
    else:
        held.append(b"\x01" * (int(size) << 20))
        print("ready", flush=True)
    select.select([sys.stdin], [], [], max(0.0, deadline - time.monotonic()))


if __name__ == "__main__":
    main()
