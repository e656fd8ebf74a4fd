"""The watchdog: gives the kernel its OOM killer back if the warden dies.

usage: python -m oomwarden.watchdog WARDEN_PID OOM_CONTROL_FILE...

The warden pauses the kernel's killer in the memory cgroups it handles
(v1 ``memory.oom_control`` oom_kill_disable=1). If the warden is SIGKILLed,
nothing would turn it back on, and a cgroup at its limit would hang for
ever. This small process waits on a pidfd of the warden and, the moment the
warden is gone, writes ``0`` to every file it was given. It does nothing
else, holds no memory to speak of, and exits after restoring (or when the
warden, exiting cleanly, has restored everything itself and kills it).
"""

from __future__ import annotations

import os
import select
import sys


def restore(files: list[str]) -> int:
    """Turn the kernel's OOM killer back on; returns how many writes failed."""
    failed = 0
    for path in files:
        try:
            with open(path, "w") as f:
                f.write("0")
        except OSError:
            failed += 1  # the cgroup is gone: nothing to restore
    return failed


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        sys.stderr.write("usage: python -m oomwarden.watchdog WARDEN_PID OOM_CONTROL...\n")
        return 2
    pid = int(argv[0])
    files = argv[1:]
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return restore(files)  # already gone
    sys.stdout.write("watching\n")
    sys.stdout.flush()
    select.select([fd], [], [])  # readable when the warden has exited
    return 1 if restore(files) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
