"""Delete the cache on /dev/shm/cache before killing anything (for the
tmpfs-filling scenario). A pure handler: it names the files to delete and
lets the executor (or the simulator) find out whether that frees anything;
if it frees nothing, the per-task selection (growth, by the evaluate below
deferring to the kernel's badness) runs."""

from oomwarden.policy import DEFAULT, DeleteFiles

NAME = "shm-cache-first"
CACHE = "/dev/shm/cache"


def handle(event, ctx):
    return [DeleteFiles((CACHE,), reason=f"empty {CACHE} before killing ({event.trigger})")]


def evaluate(task, ctx):
    return DEFAULT
