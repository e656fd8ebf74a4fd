"""``oomwarden record`` and ``oomwarden replay`` (docs/trace-format.md).

Kept apart from :mod:`oomwarden.cli`, which only dispatches to
:func:`cmd_record` and :func:`cmd_replay`, importing this module when one of
them runs (the two subcommands' parsers are in :mod:`oomwarden.cli_args`).
"""

from __future__ import annotations

import argparse
import json
import os
import select
import signal
import statistics
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from types import FrameType
from typing import Any, TextIO

from rich.console import Console
from rich.table import Table
from rich.text import Text

from oomwarden.display import literal, out_console
from oomwarden.domains import resolve_cgroup
from oomwarden.errors import OomwardenError
from oomwarden.policy.decide import DEFAULT_BUDGET_S
from oomwarden.policy.registry import load_policy
from oomwarden.replay import (
    PolicyRun,
    ReplayPoint,
    describe_outcome,
    parse_triggers,
    replay,
)
from oomwarden.sources.procfs import ReadOptions
from oomwarden.sources.snapshot import SourceConfig, build_snapshot
from oomwarden.trace import TraceStats, TraceWriter, open_trace
from oomwarden.units import fmt_bytes

#: Off a terminal, the progress line is written this often (not overwritten).
PLAIN_PROGRESS_S = 10.0
#: Reasons shown per victim in the replay table.
TABLE_REASONS = 2


# -- record -----------------------------------------------------------------------------


class _Stop:
    """SIGINT/SIGTERM set a flag and wake the sleep (a self-pipe): a record
    is never cut in the middle by a signal."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self.rfd = -1

    def handler(self, signum: int, _frame: FrameType | None) -> None:
        self.signal = signum

    def sleep(self, seconds: float) -> None:
        if seconds > 0 and self.signal is None:
            select.select([self.rfd], [], [], seconds)
            with suppress(OSError):
                os.read(self.rfd, 512)


@contextmanager
def _stoppable() -> Iterator[_Stop]:
    stop = _Stop()
    rfd, wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    stop.rfd = rfd
    old_fd = signal.set_wakeup_fd(wfd, warn_on_full_buffer=False)
    old = {s: signal.signal(s, stop.handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        signal.set_wakeup_fd(old_fd)
        os.close(rfd)
        os.close(wfd)


def _progress(stats: TraceStats, path: str) -> str:
    per = stats.steady_bytes_per_kilotask
    ms = statistics.median(stats.seconds) * 1000 if stats.seconds else 0.0
    mean = stats.tasks / stats.snapshots if stats.snapshots else 0
    return (f"{path}: {stats.snapshots} snapshots, {mean:.0f} tasks each, "
            f"{fmt_bytes(stats.bytes_written)} written, "
            f"{'-' if per is None else f'{per:,.0f}'} B per snapshot per 1,000 tasks "
            f"(after the first), {ms:.0f} ms per snapshot")


class _Progress:
    """Writes progress to stderr until a write fails (its reader gone: a
    closed pipe, a full disk); then stops writing, and the recording goes on."""

    def __init__(self, err: TextIO) -> None:
        self.err = err
        self.broken = False

    def write(self, text: str) -> None:
        if self.broken:
            return
        try:
            self.err.write(text)
            self.err.flush()
        except (OSError, ValueError):
            self.broken = True


def cmd_record(args: argparse.Namespace, err: TextIO | None = None) -> int:
    err = err or sys.stderr
    read = ReadOptions(details=args.details)
    only: tuple[str, str] | None = None
    if args.cgroup is not None:
        first = build_snapshot(SourceConfig(cgroup_stat=False))
        cg = resolve_cgroup(first, args.cgroup)
        only = (cg.kind.value, cg.path)
    config = SourceConfig(read=read, only=only)
    options: dict[str, Any] = {
        "interval_s": args.interval, "duration_s": args.duration,
        "cgroup": None if only is None else {"kind": only[0], "path": only[1]},
        "details": args.details, "cgroup_stat": config.cgroup_stat,
        "level": None if args.no_compress else args.level,
    }
    try:
        terminal = err.isatty()
    except (OSError, ValueError):
        terminal = False
    progress = _Progress(err)
    stats = TraceStats()
    reason = "stopped"
    with open(args.out, "wb") as out, _stoppable() as stop:
        writer = TraceWriter(out, options=options, compress=not args.no_compress,
                             level=args.level, delta=not args.no_delta)
        started = time.monotonic()
        next_at = started
        shown_at = started
        try:
            while True:
                wall = time.time_ns()
                t0 = time.perf_counter()
                snapshot = build_snapshot(config)
                if only is not None and not any(
                        c.kind.value == only[0] and c.path == only[1] for c in snapshot.cgroups):
                    reason = f"the cgroup {only[0]}:{only[1]} is gone"
                    break
                writer.write(snapshot, wall)
                stats.seconds.append(time.perf_counter() - t0)
                if stats.snapshots == 0:
                    stats.first_bytes = writer.bytes_written
                    stats.first_tasks = writer.tasks
                stats.snapshots, stats.tasks = writer.snapshots, writer.tasks
                stats.bytes_written = writer.bytes_written
                now = time.monotonic()
                if terminal:
                    progress.write("\r" + _progress(stats, args.out) + "\x1b[K")
                elif now - shown_at >= PLAIN_PROGRESS_S or stats.snapshots == 1:
                    progress.write("oomwarden: recording " + _progress(stats, args.out)
                                   + "\n")
                    shown_at = now
                next_at += args.interval
                if next_at < now:  # late: skip the slots missed, keep the grid
                    next_at += (now - next_at) // args.interval * args.interval + args.interval
                if args.duration is not None and next_at - started > args.duration:
                    reason = "duration"
                    break
                stop.sleep(next_at - time.monotonic())
                if stop.signal is not None:
                    reason = signal.Signals(stop.signal).name
                    break
        finally:
            writer.close(reason)
            stats.bytes_written = writer.bytes_written
    if terminal:
        progress.write("\n")
    progress.write(f"oomwarden: recorded {_progress(stats, args.out)}; "
                   f"{time.monotonic() - started:.1f} s ({reason})\n")
    return 0


# -- replay -----------------------------------------------------------------------------


def _runs(specs: Sequence[str]) -> list[PolicyRun]:
    runs: list[PolicyRun] = []
    seen: dict[str, int] = {}
    for spec in specs:
        seen[spec] = seen.get(spec, 0) + 1
        label = spec if seen[spec] == 1 else f"{spec}#{seen[spec]}"
        runs.append(PolicyRun(label, load_policy(spec)))
    return runs


@dataclass(frozen=True, slots=True)
class _Cell:
    """What the table shows of one policy's decision at one point."""

    outcome: str
    points: int | None
    reasons: tuple[str, ...]
    fallback: str | None


@dataclass(frozen=True, slots=True)
class _Row:
    """What the table shows of one point (not the whole decisions: a point
    of 2,000 tasks holds about half a megabyte of them)."""

    index: int
    taken_ns: int
    domain: str
    triggers: tuple[str, ...]
    cells: tuple[_Cell, ...]
    agree: bool


def _row(p: ReplayPoint) -> _Row:
    cells = tuple(
        _Cell(describe_outcome(d), None if d.victim is None else d.victim.points,
              () if d.victim is None else tuple(d.victim.reasons[:TABLE_REASONS]),
              d.fallback)
        for _, d in p.decisions)
    return _Row(p.index, p.taken_ns, p.domain.name, p.triggers, cells, p.agree)


def details_notes(runs: Sequence[PolicyRun], options: Mapping[str, Any]) -> list[str]:
    """A note for each policy that matches on exe/cmdline when the trace was
    recorded without them (``record --details``)."""
    if options.get("details"):
        return []
    return [f"policy {run.label} matches on exe/cmdline, which this trace lacks (recorded "
            "without --details): its rules on them never match; re-record with --details"
            for run in runs if run.policy.needs_details]


def cmd_replay(args: argparse.Namespace) -> int:
    runs = _runs(args.policy or ["kernel"])
    triggers = parse_triggers(args.trigger or [])
    reader, raw = open_trace(args.file)
    recorded_cg = reader.header.options.get("cgroup")
    recorded = None
    if isinstance(recorded_cg, dict) and isinstance(recorded_cg.get("kind"), str) and \
            isinstance(recorded_cg.get("path"), str):
        recorded = (recorded_cg["kind"], recorded_cg["path"])
    notes = details_notes(runs, reader.header.options)
    for note in notes:
        sys.stderr.write(f"oomwarden: warning: {note}\n")
    sys.stderr.flush()
    rows: list[_Row] = []
    npoints = 0
    first_ns: int | None = None
    snapshots = 0

    def counted() -> Iterator[Any]:
        nonlocal first_ns, snapshots
        for rec in reader:
            if first_ns is None:
                first_ns = rec.snapshot.taken_ns
            snapshots += 1
            yield rec

    with raw:
        for point in replay(counted(), runs, triggers=triggers, every=args.every,
                            cgroup=args.cgroup, recorded=recorded,
                            budget_s=DEFAULT_BUDGET_S):
            npoints += 1
            if args.json:
                doc = point.to_json(top=args.top)
                doc["notes"] = notes
                json.dump(doc, sys.stdout, separators=(",", ":"))
                sys.stdout.write("\n")
            else:
                rows.append(_row(point))
    disagree = sum(1 for r in rows if not r.agree) if not args.json else None
    if args.json:
        sys.stdout.flush()
    else:
        console = out_console()
        _print_replay(console, rows, runs, first_ns or 0, literal)
        console.print(f"{snapshots} snapshots, {npoints} points; the policies disagree at "
                      f"{disagree}" if len(runs) > 1 else
                      f"{snapshots} snapshots, {npoints} points")
    if reader.truncated:
        sys.stderr.write(f"oomwarden: {args.file} was cut short after {snapshots} snapshots "
                         "(a recorder killed or still running): replayed what is there\n")
    if snapshots == 0:
        raise OomwardenError(f"{args.file}: the trace holds no snapshot")
    return 0


def _print_replay(console: Console, points: Sequence[_Row], runs: Sequence[PolicyRun],
                  first_ns: int, literal: Any) -> None:
    if not points:
        console.print("no trigger fired in the trace (--every decides at every snapshot)")
        return
    table = Table(title=f"replay: {len(points)} points", title_justify="left")
    table.add_column("rec", justify="right", no_wrap=True)
    table.add_column("t (s)", justify="right", no_wrap=True)
    table.add_column("domain", overflow="fold", max_width=30)
    table.add_column("trigger", overflow="fold")
    for run in runs:
        table.add_column(run.label, overflow="fold")
    if len(runs) > 1:
        table.add_column("agree", no_wrap=True)
    for p in points:
        cells: list[Text | str] = [str(p.index), f"{(p.taken_ns - first_ns) / 1e9:.1f}",
                                   literal(p.domain), ", ".join(p.triggers)]
        for c in p.cells:
            cell = literal(c.outcome)
            if c.points is not None:
                cell.append(f"\n{c.points} points", style="dim")
                for reason in c.reasons:
                    cell.append_text(Text("\n- ", style="dim"))
                    cell.append_text(literal(reason).copy())
            if c.fallback is not None:
                cell.append_text(Text.assemble("\nfallback: ", literal(c.fallback),
                                               style="yellow"))
            cells.append(cell)
        if len(runs) > 1:
            cells.append(Text("yes") if p.agree else Text("NO", style="bold red"))
        table.add_row(*cells)
    console.print(table)
