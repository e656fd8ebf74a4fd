"""A build host: when memory runs out, kill the whole build (its cgroup)
rather than one compiler, which would only fail the build more slowly while
make starts the next job. Builds run in their own cgroups below build.slice
(``systemd-run --scope --slice=build.slice make -j16``).

With a build running, the handler kills the build cgroup using the most
memory, whole. With none, it returns nothing and the kernel's own choice
stands, for that one process only: other services are never killed as a
cgroup.
"""

from oomwarden.policy import DEFAULT, IGNORE, KillCgroup

NAME = "kill-whole-build"
BUILDS = "/build.slice/"
NEVER = "/system.slice/ci-agent.service"


def handle(event, ctx):
    builds = {}
    for task in ctx.tasks:
        path = ctx.cgroup_path(task)
        if path is None or not path.startswith(BUILDS):
            continue
        unit = BUILDS + path[len(BUILDS):].split("/", 1)[0]  # the build's own cgroup
        builds[unit] = builds.get(unit, 0) + (task.rss or 0) + (task.swap or 0)
    for unit, _pages in sorted(builds.items(), key=lambda b: b[1], reverse=True):
        cgroup = ctx.cgroup(unit)
        if cgroup is not None:
            return [KillCgroup(cgroup.kind.value, cgroup.path, cgroup.inode,
                               f"the build in {unit}, whole ({event.trigger})")]
    return []


def evaluate(task, ctx):
    if ctx.cgroup_path(task) == NEVER:
        return IGNORE.because("the CI agent: never killed")
    return DEFAULT
