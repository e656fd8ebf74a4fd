"""The simulator: deterministic, conserving, agreeing with the kernel replica,
every scenario with every built-in, one-line errors, a real PNG."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from oomwarden.policy.registry import builtins, load_policy
from oomwarden.simulate import ScenarioError, load_scenario, parse_scenario, simulate
from oomwarden.simulate.report import compare, plot

SCENARIOS = sorted((Path(__file__).parent.parent / "scenarios").glob("*.toml"))
LEAKER = Path(__file__).parent.parent / "scenarios" / "leaker-beside-database.toml"

#: The kernel alone: a warden that never acts (latency longer than the run).
KERNEL_ONLY = """
[scenario]
steps = 120
[domain]
limit = "1G"
swap = "{swap}"
[warden]
latency_steps = 100000
[[cgroup]]
path = "/a"
[[process]]
name = "big"
profile = "steady"
size = "300M"
oom_score_adj = {adj}
[[process]]
name = "leaky"
cgroup = "/a"
profile = "leak"
size = "10M"
rate = "9M"
jitter = 0.05
[[process]]
name = "same"
profile = "steady"
size = "100M"
count = 3
[[process]]
name = "storm"
profile = "fork_storm"
size = "4M"
children_per_step = 3
child_size = "2M"
max_children = 60
start = 30
"""


def test_scenario_library_has_the_eight_cases() -> None:
    assert len(SCENARIOS) >= 8
    for path in SCENARIOS:
        first = path.read_text().splitlines()[0]
        assert first.startswith("# Teaches:"), path
    readme = (SCENARIOS[0].parent / "README.md").read_text()
    for path in SCENARIOS:
        assert path.name in readme, path.name


def test_same_seed_same_bytes_and_other_seeds_differ() -> None:
    sc = load_scenario(str(LEAKER))
    a = compare(sc, ["kernel", "growth", "oomd-growth"], seed=7).dumps()
    b = compare(sc, ["kernel", "growth", "oomd-growth"], seed=7).dumps()
    assert a == b
    c = compare(parse_scenario(KERNEL_ONLY.format(swap="0", adj=0), "k.toml"), ["kernel"],
                seed=1).dumps()
    d = compare(parse_scenario(KERNEL_ONLY.format(swap="0", adj=0), "k.toml"), ["kernel"],
                seed=2).dumps()
    assert c != d  # the jitter follows the seed


@pytest.mark.parametrize("path", SCENARIOS, ids=lambda p: p.stem)
def test_memory_is_conserved_at_every_step(path: Path) -> None:
    sc = load_scenario(str(path))
    for name in ("kernel", "growth"):
        r = simulate(sc, load_policy(name))
        assert len(r.usage) == sc.steps
        # the running sum (growth minus what kills and deletions freed) equals
        # the processes' memory plus the tmpfs contents, at every step
        assert r.usage == r.accounted
        per_step = [sum(s[i] for s in r.series.values())
                    + sum(t[i] for t in r.tmpfs_series.values()) for i in range(sc.steps)]
        assert per_step == r.usage


@pytest.mark.parametrize(("swap", "adj"), [("0", 0), ("256M", 0), ("0", 500), ("128M", -1000)])
def test_kernel_model_agrees_with_the_replica_on_every_decision(swap: str, adj: int) -> None:
    """At every kernel OOM, rebuild the domain from the run's own record (the
    memory of each process that step, the victims with the bytes they
    freed), check the snapshot the simulator built against it (tasks, sizes,
    swap) and pick the victim by hand with oom_badness's arithmetic."""
    sc = parse_scenario(KERNEL_ONLY.format(swap=swap, adj=adj), "kernel-only.toml")
    page = 4096
    totalpages = sc.limit // page + sc.swap // page
    for name in ("kernel", "growth"):  # the warden never acts: only the kernel kills
        r = simulate(sc, load_policy(name), keep_snapshots=True)
        assert r.warden_decisions == 0
        kernel_kills = [k for k in r.kills if k.by == "kernel"]
        assert kernel_kills, "the kernel never fired"
        assert len(kernel_kills) == len(r.kernel_snapshots)
        swapped = 0
        for j, ((snap, decision), kill) in enumerate(zip(r.kernel_snapshots, kernel_kills,
                                                          strict=True)):
            step = kill.step
            # living before this kill: the survivors of the step, and this
            # step's later victims with what they freed
            mem = {pid: s[step] for pid, s in r.series.items() if s[step] > 0}
            mem.update({k.pid: k.freed_bytes for k in kernel_kills[j:]
                        if k.step == step and k.pid is not None})
            demand = sum(mem.values())
            swap_used = min(max(0, demand - sc.limit), sc.swap)
            assert {t.pid for t in snap.tasks} == set(mem)
            for t in snap.tasks:
                assert (t.rss_anon or 0) + (t.swap or 0) == mem[t.pid] // page
            assert sum(t.swap or 0 for t in snap.tasks) * page == swap_used
            assert snap.system.swap_free == sc.swap - swap_used
            assert snap.system.mem_available == max(0, sc.limit - (demand - swap_used))
            swapped += swap_used
            # oom_badness by hand: rss + swap + page tables (the model's:
            # one page of tables per 512 pages), plus adj * (totalpages / 1000)
            ranked = []
            for pid, size in mem.items():
                a = adj if r.names[pid] == "big" else 0
                if a == -1000:
                    continue  # OOM_SCORE_ADJ_MIN: never chosen
                pages = size // page
                ranked.append((pages + pages // 512 + a * (totalpages // 1000), pid))
            points, pid = max(ranked)  # ties: the newest (pids grow with start)
            assert kill.pid == pid
            assert decision.victim is not None and decision.victim.points == points
            if adj == -1000:
                assert kill.comm != "big"
        assert (swapped > 0) is (sc.swap > 0), "swap was never in play"


def test_growth_beats_kernel_on_the_leaker_by_importance() -> None:
    c = compare(load_scenario(str(LEAKER)), ["kernel", "growth"])
    kernel, growth = c.results
    assert growth.importance_lost < kernel.importance_lost
    assert [k.comm for k in growth.kills] == ["api-server"]
    assert kernel.kills[0].comm == "postgres"
    assert growth.recovered


@pytest.mark.parametrize("path", SCENARIOS, ids=lambda p: p.stem)
def test_every_scenario_runs_with_every_builtin(path: Path) -> None:
    sc = load_scenario(str(path))
    names = sorted(builtins())
    c = compare(sc, names)
    assert [r.policy for r in c.results] == names
    for r in c.results:
        assert r.fallbacks == 0, r.notes
        assert r.usage == r.accounted
    scenario_own = compare(sc, [])  # the scenario's own list, files included
    assert len(scenario_own.results) == len(sc.policies)


@pytest.mark.parametrize(
    ("text", "needles"),
    [
        ("[domain]\nlimit = \"1G\"\n", ["process: no [[process]]"]),
        ("[[process]]\nname='a'\nprofile='steady'\nsize='1M'\n", ["domain: missing"]),
        ("[domain]\nlimit = true\n", [":2: domain.limit: expected a size", "boolean"]),
        ("[domain]\nlimit='1G'\n[[process]]\nname='a'\nprofile='leek'\nsize='1M'\n",
         [":5: process[1].profile: 'leek'", "did you mean 'leak'"]),
        ("[domain]\nlimit='1G'\n[[process]]\nname='a'\nprofile='leak'\nsize='1M'\n",
         [":3: process[1].rate: missing"]),
        ("[domain]\nlimit='1G'\n[[process]]\nname='a'\nprofile='steady'\nsize='1M'\nrate='2M'\n",
         [":7: process[1].rate: has no effect with profile 'steady'"]),
        ("[domain]\nlimit='1G'\n[[process]]\nname='a'\nprofile='steady'\nsize='1M'\n"
         "cgroup='/x'\n", [":7: process[1].cgroup: '/x' is not a declared [[cgroup]]"]),
        ("[domain]\nlimit='1G'\nswapp='1G'\n", [":3: domain.swapp: unknown key",
                                                 "did you mean domain.swap?"]),
        ("[domain]\nlimit='1G'\n[warden]\ntriggers=['oom']\n",
         [":4: warden.triggers: 'oom' is unknown"]),
        ("[domain]\nlimit='1G'\n[earlyoom]\navoid='(sshd'\n", [":4: earlyoom.avoid: bad regex"]),
        ("[domain\nlimit='1G'\n", [":1:", "invalid TOML"]),
        ("[domain]\nlimit='1G'\n[[process]]\nname='a'\nprofile='steady'\nsize='1M'\n"
         "oom_score_adj=2000\n", [":7: process[1].oom_score_adj: 2000 is outside -1000..1000"]),
    ],
)
def test_scenario_errors_are_one_line(text: str, needles: list[str]) -> None:
    with pytest.raises(ScenarioError) as e:
        parse_scenario(text, "bad.toml")
    message = str(e.value)
    assert "\n" not in message and message.startswith("bad.toml:"), message
    for needle in needles:
        assert needle in message, message


def _cli(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "oomwarden.cli", "simulate", *argv],
                          capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["/no/such/scenario.toml"], "scenario file /no/such/scenario.toml does not exist"),
        ([str(LEAKER), "--policy", "nope"], "unknown policy 'nope'"),
        ([str(LEAKER), "--steps", "0"], "--steps"),
        ([str(LEAKER), "--seed", "x"], "--seed"),
        ([str(LEAKER), "--policy", "kernel", "--plot", "/no/such/dir/x.png"], "--plot"),
    ],
)
def test_cli_errors_are_one_line_status_2(argv: list[str], needle: str) -> None:
    r = _cli(*argv)
    assert r.returncode == 2, r
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("oomwarden: error: "), r.stderr
    assert needle in lines[0]


def test_cli_json_is_deterministic_and_the_table_prints() -> None:
    a = _cli(str(LEAKER), "--policy", "kernel", "--policy", "growth", "--json", "--seed", "3")
    b = _cli(str(LEAKER), "--policy", "kernel", "--policy", "growth", "--json", "--seed", "3")
    assert a.returncode == 0 and a.stdout == b.stdout and a.stdout.startswith("{")
    t = _cli(str(LEAKER), "--policy", "kernel", "--policy", "growth", "--steps", "80")
    assert t.returncode == 0 and "importance lost" in t.stdout and "growth" in t.stdout


def test_plot_is_a_small_valid_png(tmp_path: Path) -> None:
    out = tmp_path / "x.png"
    plot(compare(load_scenario(str(SCENARIOS[0])), ["kernel", "growth"]), str(out))
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    assert len(data) < 200_000


def test_a_few_hundred_steps_and_dozens_of_processes_run_fast() -> None:
    text = KERNEL_ONLY.format(swap="0", adj=0).replace("steps = 120", "steps = 400").replace(
        'count = 3', 'count = 40').replace('size = "100M"\ncount', 'size = "10M"\ncount')
    sc = parse_scenario(text, "fast.toml")
    for name in ("kernel", "growth"):
        r = simulate(sc, load_policy(name))
        assert r.seconds < 1.0, (name, r.seconds)


@pytest.mark.parametrize("swap", ["0", "256M"])
def test_every_kernel_oom_step_is_a_step_at_the_limit(swap: str) -> None:
    # A leak and no warden action: the kernel kills, and a step where it did
    # was at the limit (counted before its kills freed memory).
    sc = parse_scenario(KERNEL_ONLY.format(swap=swap, adj=0), "kernel-only.toml")
    r = simulate(sc, load_policy("kernel"))
    assert r.warden_decisions == 0
    assert r.kernel_ooms > 0
    assert r.steps_at_limit >= r.kernel_ooms


TMPFS_OWNER = """
[scenario]
steps = 10
[domain]
limit = "1G"
[warden]
latency_steps = 100000
[[cgroup]]
path = "/w"
[[tmpfs]]
path = "/dev/shm/a"
size = "40M"
[[tmpfs]]
path = "/dev/shm/orphan"
size = "8M"
[[process]]
name = "writer"
cgroup = "/w"
profile = "tmpfs"
tmpfs = "/dev/shm/a"
size = "4M"
rate = "4M"
"""


def test_a_tmpfs_stays_charged_to_its_writers_cgroup_after_the_writer_dies() -> None:
    from oomwarden.simulate.engine import Simulation  # noqa: PLC0415

    sim = Simulation(parse_scenario(TMPFS_OWNER, "t.toml"), load_policy("kernel"))
    sim.run()
    mib = 1 << 20
    a = sim.tmpfs["/dev/shm/a"]
    assert a > 40 * mib
    writer = next(p for p in sim.procs if p.comm == "writer")
    sim._kill(writer, 9, "kernel")
    snap = sim._now(9)
    usage = {c.path: c.usage for c in snap.cgroups}
    # the writer is gone, its tmpfs pages are still /w's; an unowned tmpfs is the root's
    assert usage["/w"] == a
    assert usage["/"] == a + 8 * mib
