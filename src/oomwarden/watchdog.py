"""The watchdog: gives the kernel its OOM killer back if the warden dies.

usage: python -m oomwarden.watchdog WARDEN_PID CGROUP_DIR...

The warden pauses the kernel's killer in the memory cgroups it handles
(v1 ``memory.oom_control`` oom_kill_disable=1). If the warden is SIGKILLed,
nothing would turn it back on, and a cgroup at its limit would hang for
ever. This small process, in a session of its own and deaf to SIGINT,
SIGTERM and SIGHUP, waits on a pidfd of the warden and, the moment the warden
is gone, writes ``0`` to ``memory.oom_control`` of every cgroup it was given
and of every cgroup below them (a child made while its parent was paused
inherits the setting). It does nothing else, and exits after restoring (or
when the warden, exiting cleanly, has restored everything itself and kills it).
"""

from __future__ import annotations

import os
import select
import signal
import sys


def restore(dirs: list[str]) -> int:
    """Turn the kernel's OOM killer back on; returns how many writes failed."""
    failed = 0
    for top in dirs:
        for dirpath, _subdirs, files in os.walk(top):
            if "memory.oom_control" not in files:
                continue
            try:
                with open(os.path.join(dirpath, "memory.oom_control"), "w") as f:
                    f.write("0")
            except OSError:
                failed += 1  # the cgroup is gone: nothing to restore
    return failed


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        sys.stderr.write("usage: python -m oomwarden.watchdog WARDEN_PID CGROUP_DIR...\n")
        return 2
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    pid = int(argv[0])
    dirs = argv[1:]
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return 1 if restore(dirs) else 0  # already gone
    sys.stdout.write("watching\n")
    sys.stdout.flush()
    select.select([fd], [], [])  # readable when the warden has exited
    return 1 if restore(dirs) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
