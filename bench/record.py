#!/usr/bin/env python3
"""Benchmark: what ``oomwarden record`` costs per snapshot, and its bytes.

Starts ``--extra`` sleeping processes (bench/snapshot.py's sleepers: always
killed and reaped afterwards, only they are signalled), takes ``--count``
whole-system snapshots ``--interval`` apart as the recorder does (default
1 s: the delta sees what a second changes), then writes that same list with
each encoding and reports, per encoding: the time to encode and write one
snapshot (median), the first snapshot's bytes, and the steady-state bytes
per snapshot per 1,000 tasks (every snapshot after the first). The snapshot
build time (the larger cost) is reported once.

Run from the repository root::

    .venv/bin/python bench/record.py              # ~2,000 tasks
    .venv/bin/python bench/record.py --extra 0    # the machine as it is
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time

from oomwarden.model import Snapshot
from oomwarden.sources.snapshot import SourceConfig, build_snapshot
from oomwarden.trace import TraceReader, TraceWriter
from snapshot import BenchError, _check_room, _sleep_binary, sleepers

ENCODINGS = (
    ("gzip 1 + delta", True, 1, True),
    ("gzip 1, no delta", True, 1, False),
    ("gzip 6 + delta (default)", True, 6, True),
    ("gzip 6, no delta", True, 6, False),
    ("plain + delta", False, 1, True),
    ("plain, no delta", False, 1, False),
)


def capture(count: int, interval: float) -> tuple[list[Snapshot], list[float]]:
    snaps: list[Snapshot] = []
    seconds: list[float] = []
    next_at = time.monotonic()
    for _ in range(count):
        time.sleep(max(0.0, next_at - time.monotonic()))
        next_at += interval
        t0 = time.perf_counter()
        snaps.append(build_snapshot(SourceConfig()))
        seconds.append(time.perf_counter() - t0)
    return snaps, seconds


def encode(snaps: list[Snapshot], compress: bool, level: int, delta: bool
           ) -> tuple[float, int, float, float]:
    """(median ms per write, first snapshot's bytes, steady bytes per snapshot
    per 1,000 tasks, ms to read one back)."""
    buf = io.BytesIO()
    w = TraceWriter(buf, compress=compress, level=level, delta=delta)
    header = w.bytes_written
    times: list[float] = []
    sizes: list[int] = []
    for s in snaps:
        t0 = time.perf_counter()
        sizes.append(w.write(s))
        times.append(time.perf_counter() - t0)
    w.close()
    tasks = sum(len(s.tasks) for s in snaps[1:])
    steady = sum(sizes[1:]) * 1000 / tasks
    t0 = time.perf_counter()
    buf.seek(0)
    got = [r.snapshot for r in TraceReader(buf)]
    read_ms = (time.perf_counter() - t0) * 1000 / len(got)
    assert got == snaps and header > 0
    return statistics.median(times) * 1000, sizes[0], steady, read_ms


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--extra", type=int, default=1900, help="sleepers to add (default 1900)")
    p.add_argument("--count", type=int, default=11, help="snapshots (default 11)")
    p.add_argument("--interval", type=float, default=1.0, help="seconds apart (default 1)")
    args = p.parse_args(argv)
    if args.count < 2:
        p.error("--count must be at least 2")
    try:
        _check_room(args.extra)
        with sleepers(args.extra, _sleep_binary()):
            snaps, build = capture(args.count, args.interval)
    except BenchError as e:
        print(f"bench/record.py: {e}", file=sys.stderr)
        return 2
    tasks = statistics.mean(len(s.tasks) for s in snaps)
    cgroups = statistics.mean(len(s.cgroups) for s in snaps)
    print(f"{args.count} snapshots {args.interval:g} s apart, {tasks:.0f} tasks and "
          f"{cgroups:.0f} cgroups each; build_snapshot median "
          f"{statistics.median(build) * 1000:.1f} ms (min {min(build) * 1000:.1f})")
    print(f"{'encoding':28} {'write ms':>9} {'first B':>9} {'B/snap/1k tasks':>16} "
          f"{'read ms':>8}")
    for label, compress, level, delta in ENCODINGS:
        ms, first, steady, read_ms = encode(snaps, compress, level, delta)
        print(f"{label:28} {ms:9.1f} {first:9,} {steady:16,.0f} {read_ms:8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
