"""Empty a tmpfs cache folder before killing anything.

On an OOM the handler asks the executor to delete the cache's files (the
executor deletes only regular files on a tmpfs, checked with statfs, never
following symlinks). If the folder is empty or missing, the handler returns
nothing and the per-task selection runs: here the kernel's own choice. If the
deletion frees nothing, the daemon runs the per-task selection as well.
"""

import os

from oomwarden.policy import DEFAULT, DeleteFiles

NAME = "tmpfs-cache-first"
CACHE = "/dev/shm/app-cache"
MAX_FILES = 10_000  # bounded: the decision has a time budget


def handle(event, ctx):
    try:
        with os.scandir(CACHE) as entries:
            paths = tuple(
                e.path for _, e in zip(range(MAX_FILES), entries)
                if e.is_file(follow_symlinks=False)
            )
    except OSError:
        return []
    if not paths:
        return []
    return [DeleteFiles(paths, reason=f"empty {CACHE} before killing ({event.trigger})")]


def evaluate(task, ctx):
    return DEFAULT
