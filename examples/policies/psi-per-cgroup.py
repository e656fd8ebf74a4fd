"""Shed the cgroup that stalls most on memory (PSI), whole.

A cgroup whose tasks spent at least 10% of the last 10 s fully stalled on
memory (``full avg10``) is a candidate, the most stalled first and the
largest within it; everything else ranks by size behind them. The victim is
the cgroup (systemd-oomd's unit). Where no PSI is known for a task's cgroup,
it ranks by size too.
"""

from oomwarden.policy import select

NAME = "psi-per-cgroup"
VICTIM = "cgroup"
THRESHOLD = 10.0  # percent of time fully stalled over 10 s
STALLED = 2**40   # stalled cgroups rank above every size


def evaluate(task, ctx):
    size = (task.rss or 0) + (task.swap or 0)
    found = ctx.pressure_of(task)
    if found is not None:
        cgroup, psi = found
        stall = psi.full.avg10 if psi.full is not None else psi.some.avg10
        if stall >= THRESHOLD:
            return select(STALLED * int(stall * 100) + size,
                          f"{cgroup.name} stalls {stall:.1f}% (full avg10)")
        return select(size, f"{cgroup.name} stalls {stall:.1f}%, under {THRESHOLD}%: by size")
    return select(size, "no PSI for its cgroup: by size")
