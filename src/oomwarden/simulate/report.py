"""Running several policies over a scenario, and showing the outcome: a rich
table, one JSON object (deterministic: the same seed gives the same bytes),
a PNG plot (matplotlib, Agg backend)."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from rich.console import Console
from rich.progress import Progress, TaskID
from rich.table import Table
from rich.text import Text

from oomwarden.errors import OomwardenError, PolicyError
from oomwarden.policy.api import Policy
from oomwarden.policy.peers import earlyoom_policy
from oomwarden.policy.registry import load_policy
from oomwarden.simulate.engine import Result, simulate
from oomwarden.simulate.scenario import Scenario
from oomwarden.units import fmt_bytes

#: Show a progress bar from this many steps in all (steps x policies).
PROGRESS_FROM_STEPS = 5_000
#: The plot shows this many processes by name; the rest are summed.
PLOT_NAMED = 7


@dataclass(frozen=True, slots=True)
class Comparison:
    scenario: Scenario
    seed: int
    steps: int
    results: tuple[Result, ...]

    def to_json(self) -> dict[str, Any]:
        sc = self.scenario
        return {
            "scenario": sc.name, "source": os.path.basename(sc.source), "seed": self.seed,
            "steps": self.steps, "step_seconds": sc.step_seconds, "limit_bytes": sc.limit,
            "swap_bytes": sc.swap, "triggers": list(sc.warden.triggers),
            "latency_steps": sc.warden.latency_steps,
            "processes": len(sc.processes),
            "policies": [r.to_json() for r in self.results],
        }

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=1, sort_keys=True) + "\n"


def scenario_policy(spec: str, scenario: Scenario) -> Policy:
    """The policy a SPEC names; ``earlyoom`` takes the scenario's prefer and
    avoid regexes."""
    if spec == "earlyoom" and (scenario.earlyoom_prefer or scenario.earlyoom_avoid):
        return earlyoom_policy(scenario.earlyoom_prefer, scenario.earlyoom_avoid)
    return load_policy(spec)


def compare(scenario: Scenario, specs: Sequence[str], *, seed: int | None = None,
            steps: int | None = None, progress: bool = False) -> Comparison:
    if not specs:
        specs = scenario.policies
    seen: set[str] = set()
    policies: list[Policy] = []
    for spec in specs:
        if spec in seen:
            raise PolicyError(f"policy {spec!r} is given twice")
        seen.add(spec)
        policies.append(scenario_policy(spec, scenario))
    names = [p.name for p in policies]
    for i, p in enumerate(policies):  # two files may share a name: keep rows apart
        if names.count(p.name) > 1:
            policies[i] = replace(p, name=f"{p.name}#{i + 1}")
    n = scenario.steps if steps is None else steps
    s = scenario.seed if seed is None else seed
    results: list[Result] = []
    show = progress and n * len(policies) >= PROGRESS_FROM_STEPS
    if show:
        with Progress(console=Console(stderr=True), transient=True) as bar:
            for p in policies:
                task = bar.add_task(f"{p.name}", total=n)

                def advance(t: TaskID = task) -> None:
                    bar.advance(t)

                results.append(simulate(scenario, p, seed=s, steps=n, on_step=advance))
    else:
        results = [simulate(scenario, p, seed=s, steps=n) for p in policies]
    return Comparison(scenario, s, n, tuple(results))


def _victims(r: Result, limit: int = 4) -> Text:
    parts = []
    for k in r.kills[:limit]:
        who = "k" if k.by == "kernel" else "w"
        parts.append(f"{k.step}:{k.comm}({who})")
    more = len(r.kills) - limit
    text = ", ".join(parts) + (f", +{more} more" if more > 0 else "")
    return Text(text or "-")


def table(c: Comparison) -> Table:
    sc = c.scenario
    title = (f"{sc.name}: {c.steps} steps of {sc.step_seconds:g} s, limit "
             f"{fmt_bytes(sc.limit)}, swap {fmt_bytes(sc.swap)}, warden on "
             f"{'+'.join(sc.warden.triggers)} after {sc.warden.latency_steps} steps, seed {c.seed}")
    t = Table(title=Text(title), title_justify="left")
    t.add_column("policy", no_wrap=True)
    for name in ("kills", "by warden", "by kernel", "importance lost", "steps at limit",
                 "kernel OOMs", "recovered", "run ms"):
        t.add_column(name, justify="right", no_wrap=True)
    t.add_column("victims (step:name, w=warden k=kernel)", overflow="fold")
    best = min(r.importance_lost for r in c.results)
    for r in c.results:
        procs = r.process_kills
        style = "bold green" if r.importance_lost == best else None
        tmpfs = sum(1 for k in r.kills if k.what == "tmpfs")
        kills = str(len(procs)) + (f" +{tmpfs} tmpfs" if tmpfs else "")
        t.add_row(Text(r.policy), kills, str(sum(1 for k in procs if k.by == "warden")),
                  str(sum(1 for k in procs if k.by == "kernel")), f"{r.importance_lost:g}",
                  str(r.steps_at_limit), str(r.kernel_ooms), "yes" if r.recovered else "no",
                  f"{r.seconds * 1000:.0f}", _victims(r), style=style)
    return t


def print_table(c: Comparison) -> None:
    console = Console()
    if not console.is_terminal:
        console = Console(width=160)
    console.print(table(c))
    for r in c.results:
        for note in r.notes[:3]:
            console.print(Text.assemble(f"note ({r.policy}): ", Text(note)))


def plot(c: Comparison, path: str) -> None:
    """One panel per policy: memory of each process (stacked), tmpfs, the
    limit and limit + swap, and the kills."""
    try:
        import matplotlib  # noqa: PLC0415 (only --plot needs it)

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError as e:
        raise OomwardenError(f"--plot needs matplotlib ({e})") from None
    sc = c.scenario
    n = len(c.results)
    fig, axes = plt.subplots(n, 1, figsize=(9, 2.4 * n + 0.6), sharex=True, squeeze=False,
                             dpi=80)
    gib = float(1 << 30)
    steps = list(range(c.steps))
    # The same processes, in the same order and colours, in every panel.
    peak: dict[int, int] = {}
    for r in c.results:
        for pid, s in r.series.items():
            peak[pid] = max(peak.get(pid, 0), max(s, default=0))
    named = sorted(sorted(peak, key=lambda pid: (-peak[pid], pid))[:PLOT_NAMED])
    palette = [plt.get_cmap("tab10")(i) for i in range(10)]
    for ax, r in zip((a[0] for a in axes), c.results, strict=True):
        rows: list[list[float]] = [[v / gib for v in r.series.get(pid, [0] * c.steps)]
                                   for pid in named]
        labels = [f"{r.names.get(pid, '?')} ({pid})" for pid in named]
        colors: list[object] = [palette[i % len(palette)] for i in range(len(named))]
        rest = [pid for pid in r.series if pid not in named]
        if rest:
            rows.append([sum(r.series[pid][i] for pid in rest) / gib for i in steps])
            labels.append(f"{len(rest)} others")
            colors.append("lightgrey")
        for fs, s in r.tmpfs_series.items():
            rows.append([v / gib for v in s])
            labels.append(f"tmpfs {fs}")
            colors.append("khaki")
        ax.stackplot(steps, rows, labels=labels, colors=colors, alpha=0.85, linewidth=0)
        ax.axhline(sc.limit / gib, color="black", linestyle="-", linewidth=1.2, label="limit")
        if sc.swap:
            ax.axhline((sc.limit + sc.swap) / gib, color="black", linestyle=":",
                       linewidth=1.0, label="limit + swap")
        for k in r.kills:
            color = "red" if k.by == "kernel" else "blue"
            ax.axvline(k.step, color=color, linewidth=0.6, alpha=0.5)
            before = r.usage[k.step - 1] if 0 < k.step <= len(r.usage) else 0
            ax.plot([k.step], [before / gib],
                    marker="x", color=color, markersize=7, linestyle="none")
        ax.set_title(f"{r.policy}: {len(r.process_kills)} kills, "
                     f"importance lost {r.importance_lost:g}, {r.steps_at_limit} steps at the "
                     f"limit (x: blue warden, red kernel)", fontsize=9, loc="left")
        ax.set_ylabel("GiB")
        ax.set_ylim(0, max(sc.limit + sc.swap, max(r.usage, default=0)) / gib * 1.08)
        ax.legend(loc="lower right", fontsize=6, ncol=3, framealpha=0.7)
    axes[-1][0].set_xlabel(f"step ({sc.step_seconds:g} s)")
    fig.suptitle(f"{sc.name} (seed {c.seed})", fontsize=10)
    fig.tight_layout()
    try:
        fig.savefig(path, format="png")
    except OSError as e:
        raise OomwardenError(f"--plot {path}: {e.strerror or e}") from None
    finally:
        plt.close(fig)


def progress_wanted() -> bool:
    return sys.stderr.isatty()
