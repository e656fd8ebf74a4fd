#!/usr/bin/env python3
"""Benchmark: oomwarden's snapshot + kernel ranking against a psutil baseline.

For each N the benchmark starts N extra sleeping processes (``sleep`` started
with ``posix_spawn`` into a process group of their own), then times, in the
same run and interleaved:

* **oomwarden**: ``build_snapshot(SourceConfig())`` followed by
  ``kernel_decision(snap, system_domain(snap))`` -- the hot path with its
  defaults (no ``oom_score``, no exe/cmdline);
* **bpf**: the same with ``SourceConfig(source="bpf")``: the tasks from one
  pass of the BPF task iterator (docs/bpf.md), where it loads;
* **procfs snap**, **bpf snap**, **bpf cold**: ``build_snapshot`` alone (the
  same Snapshot, no ranking) from procfs, from BPF, and from BPF with its task
  cache emptied before each pass (every record decoded). Issue 8's figure,
  ``bpf speed-up over procfs``, is procfs snap / bpf snap; the cold ratio and
  the snapshot + ranking ratio are printed beside it;
* **psutil**: the obvious psutil way to do the same job --
  ``psutil.process_iter(['pid', 'name', 'memory_info'])``, one read of
  ``/proc/PID/oom_score_adj`` per process, ``rss + adj * totalpages / 1000``
  points, sorted.

Each figure is the median of ``--reps`` timed repetitions after one untimed
warm-up of each. The sleepers are always killed (SIGKILL) and reaped
afterwards, also on Ctrl-C or SIGTERM; only processes this script started are
signalled. Nothing here allocates memory on purpose: a sleeper costs a few
hundred KiB of kernel memory and page tables.

Run from the repository root::

    .venv/bin/python bench/snapshot.py           # N = 1,000 and 5,000
    .venv/bin/python bench/snapshot.py --quick   # N = 2,000 only (< 40 s)
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from functools import partial
from types import FrameType
from typing import Literal

import psutil

from oomwarden.errors import BpfError
from oomwarden.policy.engine import kernel_decision, system_domain
from oomwarden.sources import bpf as bpf_sources
from oomwarden.sources.snapshot import SourceConfig, build_snapshot, choose_source

DEFAULT_SIZES = (1000, 5000)
QUICK_SIZES = (2000,)
DEFAULT_REPS = 7
QUICK_REPS = 5
#: The issue's targets: speed-up over psutil, and ms for 5,000 extra tasks.
TARGET_SPEEDUP = 3.0
TARGET_MS = 150.0
TARGET_N = 5000
#: Issue 8: the BPF source against procfs at 5,000 extra tasks.
TARGET_BPF_SPEEDUP = 20.0

#: The sleepers' own timeout: a safety net if this script is SIGKILLed and so
#: cannot clean up. Long enough for any run, short enough not to linger.
SLEEP_SECONDS = 900
#: How long to wait for the sleepers to exec and to be reaped.
SETTLE_TIMEOUT = 20.0
REAP_TIMEOUT = 15.0
#: Spawn this many with SIGINT/SIGTERM blocked, so every PID is recorded.
SPAWN_CHUNK = 64
#: Refuse to start sleepers that could need more than this share of MemAvailable.
SLEEPER_KIB_ESTIMATE = 512
MAX_MEM_SHARE = 0.25

_STOP_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM, signal.SIGHUP})
#: Dispositions to reset in the children (Python ignores SIGPIPE and SIGXFSZ).
_CHILD_SIGDEF = (
    signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGPIPE, signal.SIGXFSZ,
)


class BenchError(Exception):
    """The benchmark cannot run here (no sleep binary, no PIDs, no memory)."""


# -- the sleepers -----------------------------------------------------------


class Sleepers:
    """N ``sleep`` children in one new process group; always cleaned up."""

    def __init__(self, count: int, sleep_bin: str) -> None:
        self.count = count
        self.sleep_bin = sleep_bin
        self.pids: list[int] = []
        self.pgid = 0

    def start(self) -> None:
        argv = ["sleep", str(SLEEP_SECONDS)]
        env = {"PATH": "/usr/bin:/bin", "LC_ALL": "C"}
        while len(self.pids) < self.count:
            chunk = min(SPAWN_CHUNK, self.count - len(self.pids))
            # Blocked, a Ctrl-C waits until the chunk's PIDs are recorded.
            old = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
            try:
                for _ in range(chunk):
                    pid = os.posix_spawn(
                        self.sleep_bin,
                        argv,
                        env,
                        setpgroup=self.pgid,  # 0 first: a new group led by it
                        setsigmask=(),
                        setsigdef=_CHILD_SIGDEF,
                    )
                    self.pids.append(pid)
                    if not self.pgid:
                        self.pgid = pid
            except OSError as e:
                raise BenchError(
                    f"could not start sleeper {len(self.pids) + 1} of {self.count}: "
                    f"{e.strerror} (PID or process limits?)"
                ) from None
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, old)
        self._settle()

    def _settle(self) -> None:
        """Wait until every sleeper runs ``sleep`` and is asleep."""
        deadline = time.monotonic() + SETTLE_TIMEOUT
        pending = list(self.pids)
        while pending:
            still: list[int] = []
            for pid in pending:
                try:
                    with open(f"/proc/{pid}/stat", "rb") as f:
                        stat = f.read()
                except OSError:
                    continue  # died already: reaped in cleanup
                state = stat[stat.rfind(b")") + 2 :][:1]
                if b"(sleep)" not in stat or state not in (b"S", b"Z"):
                    still.append(pid)
            pending = still
            if pending:
                if time.monotonic() > deadline:
                    raise BenchError(f"{len(pending)} sleepers did not settle in time")
                time.sleep(0.02)

    def _our_group_children(self) -> set[int]:
        """Children of this process in the sleepers' group (for stray PIDs)."""
        found: set[int] = set()
        if not self.pgid:
            return found
        try:
            children = psutil.Process().children()
        except psutil.Error:
            return found
        for child in children:
            try:
                if os.getpgid(child.pid) == self.pgid:
                    found.add(child.pid)
            except OSError:
                continue
        return found

    def cleanup(self) -> int:
        """SIGKILL and reap every sleeper; returns how many could not be reaped.

        Only unreaped children are signalled: their PIDs cannot have been
        reused by anyone else.
        """
        pending = set(self.pids) | self._our_group_children()
        for pid in pending:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + REAP_TIMEOUT
        while pending:
            progressed = False
            for pid in list(pending):
                try:
                    done, _ = os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    done = pid  # not our child (any more): nothing to reap
                if done:
                    pending.discard(pid)
                    progressed = True
            if not pending or time.monotonic() > deadline:
                break
            if not progressed:
                time.sleep(0.01)
        self.pids = sorted(pending)
        return len(pending)


@contextmanager
def _stop_signals_ignored() -> Iterator[None]:
    """Let nothing interrupt the cleanup (a second Ctrl-C included)."""
    saved = {sig: signal.signal(sig, signal.SIG_IGN) for sig in _STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


@contextmanager
def sleepers(count: int, sleep_bin: str) -> Iterator[Sleepers]:
    group = Sleepers(count, sleep_bin)
    try:
        group.start()
        yield group
    finally:
        with _stop_signals_ignored():
            left = group.cleanup()
        if left:
            print(
                f"WARNING: {left} sleepers not reaped after {REAP_TIMEOUT:.0f} s: "
                f"{group.pids[:20]}",
                file=sys.stderr,
            )


class Stopped(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised like a Ctrl-C so that the cleanup runs."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"signal {signal.Signals(signum).name}")
        self.signum = signum


def _raise_on_signal(signum: int, _frame: FrameType | None) -> None:
    raise Stopped(signum)


# -- the jobs -----------------------------------------------------------------


def rank(source: Literal["procfs", "bpf"]) -> int:
    """Full snapshot + kernel ranking of the system domain; tasks seen."""
    snap = build_snapshot(SourceConfig(source=source))
    decision = kernel_decision(snap, system_domain(snap))
    assert len(decision.candidates) == len(snap.tasks)
    return len(snap.tasks)


def snapshot_only(source: Literal["procfs", "bpf"]) -> int:
    """The snapshot alone (no ranking). From BPF, records unchanged since the
    last pass reuse their tasks (the iterator's TaskCache): warm."""
    return len(build_snapshot(SourceConfig(source=source)).tasks)


def bpf_snapshot_cold() -> int:
    """The BPF snapshot with the cache emptied first: every record decoded."""
    bpf_sources.load().cache.clear()
    return snapshot_only("bpf")


def bpf_available() -> str | None:
    """None where the BPF source loads, else the reason (one line)."""
    try:
        choose_source(SourceConfig(source="bpf"))
    except BpfError as e:
        return str(e)
    return None


_PAGE = os.sysconf("SC_PAGE_SIZE")


def psutil_rank() -> int:
    """The natural psutil version: rss pages + oom_score_adj share, sorted."""
    total_pages = (psutil.virtual_memory().total + psutil.swap_memory().total) // _PAGE
    adj_unit = total_pages // 1000
    ranked: list[tuple[int, int, str]] = []
    seen = 0
    for proc in psutil.process_iter(["pid", "name", "memory_info"]):
        seen += 1
        info = proc.info
        mem = info["memory_info"]
        if mem is None:  # access denied or zombie
            continue
        try:
            with open(f"/proc/{info['pid']}/oom_score_adj", "rb") as f:
                adj = int(f.read())
        except (OSError, ValueError):
            continue  # gone meanwhile
        if adj <= -1000:
            continue
        ranked.append((mem.rss // _PAGE + adj * adj_unit, info["pid"], info["name"]))
    ranked.sort(reverse=True)
    return seen


# -- timing -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Timing:
    seconds: list[float]
    tasks: list[int]

    @property
    def median_ms(self) -> float:
        return statistics.median(self.seconds) * 1000

    @property
    def min_ms(self) -> float:
        return min(self.seconds) * 1000

    @property
    def max_ms(self) -> float:
        return max(self.seconds) * 1000

    @property
    def median_tasks(self) -> int:
        return round(statistics.median(self.tasks))

    @property
    def tasks_per_second(self) -> float:
        return self.median_tasks / (self.median_ms / 1000)


def _timed(job: Callable[[], int]) -> tuple[float, int]:
    gc.collect()
    t0 = time.perf_counter()
    tasks = job()
    return time.perf_counter() - t0, tasks


def build_floor(workdir: str) -> str | None:
    """Compile bench/procfs_floor.c; None (and a line saying why) without a compiler."""
    cc = shutil.which("cc") or shutil.which("gcc")
    source = os.path.join(os.path.dirname(os.path.abspath(__file__)), "procfs_floor.c")
    if cc is None:
        print("C floor: no C compiler, not measured")
        return None
    exe = os.path.join(workdir, "procfs_floor")
    done = subprocess.run([cc, "-O2", "-o", exe, source], capture_output=True, text=True,
                          timeout=120, check=False)
    if done.returncode != 0:
        print(f"C floor: compiling failed, not measured: {done.stderr.strip()[:200]}")
        return None
    return exe


def measure_floor(exe: str, reps: int) -> Timing:
    """The C reader's own timing of one pass (process start-up excluded)."""
    seconds: list[float] = []
    tasks: list[int] = []
    for _ in range(reps + 1):  # the first is the warm-up
        out = subprocess.run([exe], capture_output=True, text=True, timeout=60, check=True)
        n, ns = out.stdout.split()
        seconds.append(int(ns) / 1e9)
        tasks.append(int(n))
    return Timing(seconds[1:], tasks[1:])


#: The jobs timed against each other, by name; the BPF ones only where it loads.
JOBS: dict[str, Callable[[], int]] = {
    "oomwarden": partial(rank, "procfs"), "psutil": psutil_rank,
    "procfs snap": partial(snapshot_only, "procfs"), "bpf": partial(rank, "bpf"),
    "bpf snap": partial(snapshot_only, "bpf"), "bpf cold": bpf_snapshot_cold,
}
BPF_JOBS = ("bpf", "bpf snap", "bpf cold")


def measure(reps: int, with_bpf: bool = False) -> dict[str, Timing]:
    """One warm-up of each, then ``reps`` interleaved rounds (order alternating)."""
    names = [n for n in JOBS if with_bpf or n not in BPF_JOBS]
    for name in names:
        JOBS[name]()
    sinks: dict[str, tuple[list[float], list[int]]] = {n: ([], []) for n in names}
    for i in range(reps):
        for name in names if i % 2 == 0 else names[::-1]:
            seconds, tasks = _timed(JOBS[name])
            sinks[name][0].append(seconds)
            sinks[name][1].append(tasks)
    return {n: Timing(*sink) for n, sink in sinks.items()}


@dataclass(frozen=True, slots=True)
class Result:
    extra: int
    timings: dict[str, Timing]
    floor: Timing | None

    @property
    def ours(self) -> Timing:
        return self.timings["oomwarden"]

    @property
    def speedup(self) -> float:
        return self.timings["psutil"].median_ms / self.ours.median_ms

    def ratio(self, slow: str, fast: str) -> float | None:
        if slow not in self.timings or fast not in self.timings:
            return None
        return self.timings[slow].median_ms / self.timings[fast].median_ms

    @property
    def bpf_speedup(self) -> float | None:
        """The issue's figure: the snapshot from procfs over the snapshot from
        BPF (warm), the same Snapshot type, no ranking on either side."""
        return self.ratio("procfs snap", "bpf snap")


def _row(label: str, t: Timing) -> str:
    return (
        f"  {label:<11} {t.median_tasks:>6} tasks  median {t.median_ms:8.1f} ms  "
        f"(min {t.min_ms:.1f}, max {t.max_ms:.1f})  {t.tasks_per_second:>9,.0f} tasks/s"
    )


def run_one(
    extra: int, reps: int, sleep_bin: str, floor_exe: str | None, with_bpf: bool = False
) -> Result:
    t0 = time.perf_counter()
    with sleepers(extra, sleep_bin):
        started = time.perf_counter() - t0
        print(f"N = {extra:,} extra sleeping tasks (started in {started:.1f} s), "
              f"median of {reps} after 1 warm-up:", flush=True)
        timings = measure(reps, with_bpf)
        floor = measure_floor(floor_exe, reps) if floor_exe else None
    result = Result(extra, timings, floor)
    for name, timing in timings.items():
        print(_row(name, timing))
    base = timings["psutil"]
    if floor is not None:
        print(_row("C reads", floor))
        print(f"  ceiling    psutil / C reads = {base.median_ms / floor.median_ms:.2f} "
              "(the most any reader of these three files could gain)")
    print(f"  ratio      psutil / oomwarden = {result.speedup:.2f}", flush=True)
    for slow, fast, what in (
        ("procfs snap", "bpf snap", "snapshot alone, BPF warm: unchanged records reuse "
         "their tasks"),
        ("procfs snap", "bpf cold", "snapshot alone, BPF cold: every record decoded"),
        ("oomwarden", "bpf", "snapshot + kernel ranking, BPF warm"),
    ):
        ratio = result.ratio(slow, fast)
        if ratio is not None:
            print(f"  ratio      {slow} / {fast} = {ratio:.1f} ({what})", flush=True)
    return result


# -- main -----------------------------------------------------------------------


def _check_room(extra: int) -> None:
    """Refuse N that could press on memory."""
    available_kib = psutil.virtual_memory().available // 1024
    need_kib = extra * SLEEPER_KIB_ESTIMATE
    if need_kib > MAX_MEM_SHARE * available_kib:
        raise BenchError(
            f"{extra:,} sleepers may need ~{need_kib // 1024:,} MiB, more than "
            f"{MAX_MEM_SHARE:.0%} of MemAvailable ({available_kib // 1024:,} MiB)"
        )


def _sleep_binary() -> str:
    for candidate in ("/bin/sleep", "/usr/bin/sleep", shutil.which("sleep")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise BenchError("no sleep binary found")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/snapshot.py",
        description=(
            "Time oomwarden's snapshot + kernel ranking against the obvious psutil "
            "implementation, with N extra sleeping processes started (and always "
            "removed) by the benchmark."
        ),
    )
    parser.add_argument(
        "--quick", action="store_true",
        help=f"only N = {QUICK_SIZES[0]:,}, {QUICK_REPS} repetitions (under 40 s)",
    )
    parser.add_argument(
        "-n", "--extra", type=int, action="append", metavar="N",
        help="extra sleeping processes to start (repeatable; default "
        + ", ".join(f"{n:,}" for n in DEFAULT_SIZES) + ")",
    )
    parser.add_argument(
        "--reps", type=int, default=None,
        help=f"timed repetitions per N (default {DEFAULT_REPS}, --quick {QUICK_REPS}; min 5)",
    )
    parser.add_argument(
        "--no-floor", action="store_true",
        help="skip the C reference reader (bench/procfs_floor.c)",
    )
    parser.add_argument(
        "--check", action="store_true",
        help=f"exit 1 unless the speed-up is >= {TARGET_SPEEDUP:g}x and N = {TARGET_N:,} "
        f"takes < {TARGET_MS:g} ms",
    )
    args = parser.parse_args(argv)
    if args.reps is not None and args.reps < 5:
        parser.error("--reps must be at least 5")
    if args.extra and any(n < 0 for n in args.extra):
        parser.error("N must not be negative")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = sorted(set(args.extra)) if args.extra else (
        list(QUICK_SIZES) if args.quick else list(DEFAULT_SIZES)
    )
    reps = args.reps or (QUICK_REPS if args.quick else DEFAULT_REPS)
    signal.signal(signal.SIGTERM, _raise_on_signal)
    signal.signal(signal.SIGHUP, _raise_on_signal)
    started = time.perf_counter()
    try:
        sleep_bin = _sleep_binary()
        for n in sizes:
            _check_room(n)
        print(f"oomwarden snapshot benchmark: kernel {os.uname().release}, "
              f"{os.cpu_count()} CPUs, python {sys.version.split()[0]}, "
              f"psutil {psutil.__version__}")
        with tempfile.TemporaryDirectory(prefix="oomwarden-bench-") as workdir:
            floor_exe = None if args.no_floor else build_floor(workdir)
            no_bpf = bpf_available()
            if no_bpf is not None:
                print(f"BPF source: not measured: {no_bpf}")
            results = [run_one(n, reps, sleep_bin, floor_exe, no_bpf is None) for n in sizes]
    except BenchError as e:
        print(f"bench/snapshot.py: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        signum = e.signum if isinstance(e, Stopped) else signal.SIGINT
        print(f"\ninterrupted ({signal.Signals(signum).name}); sleepers removed", file=sys.stderr)
        return 128 + signum

    largest = results[-1]
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    met_speed = largest.speedup >= TARGET_SPEEDUP
    target_row = next((r for r in results if r.extra == TARGET_N), None)
    print()
    print(f"total run time: {time.perf_counter() - started:.1f} s")
    print(f"peak RSS of the benchmark process: {peak_kib / 1024:.1f} MiB")
    if target_row is not None:
        ms = target_row.ours.median_ms
        verdict = "met" if ms < TARGET_MS else "NOT met"
        print(f"target {TARGET_N:,} extra tasks ranked in < {TARGET_MS:g} ms: "
              f"{ms:.1f} ms, {verdict}")
    else:
        print(f"target {TARGET_N:,} extra tasks in < {TARGET_MS:g} ms: not measured "
              f"(N = {TARGET_N:,} was not run)")
    print(f"target speed-up >= {TARGET_SPEEDUP:g}x at N = {largest.extra:,}: "
          f"{'met' if met_speed else 'NOT met'}")
    print(f"procfs speed-up over psutil: {largest.speedup:.1f}x")
    if largest.bpf_speedup is not None:
        print(f"target bpf speed-up >= {TARGET_BPF_SPEEDUP:g}x at N = {largest.extra:,}: "
              f"{'met' if largest.bpf_speedup >= TARGET_BPF_SPEEDUP else 'NOT met'}")
        cold = largest.ratio("procfs snap", "bpf cold")
        whole = largest.ratio("oomwarden", "bpf")
        print(f"bpf cold (every record decoded): {cold or 0:.1f}x; snapshot + ranking: "
              f"{whole or 0:.1f}x")
        print(f"bpf speed-up over procfs: {largest.bpf_speedup:.1f}x")
    else:
        print("bpf speed-up over procfs: not measured (the BPF source cannot be had here)")
    if args.check:
        ok = met_speed and target_row is not None and target_row.ours.median_ms < TARGET_MS
        return 0 if ok else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
