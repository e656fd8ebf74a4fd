"""The watchdog: gives the kernel its OOM killer back if the warden dies.

usage: python -m oomwarden.watchdog WARDEN_PID CGROUP_DIR|high:VALUE:INODE:CGROUP_DIR...

The warden pauses the kernel's killer in the memory cgroups it handles
(v1 ``memory.oom_control`` oom_kill_disable=1). If the warden is SIGKILLed,
nothing would turn it back on, and a cgroup at its limit would hang for
ever. This small process, in a session of its own and deaf to SIGINT,
SIGTERM and SIGHUP, waits on a pidfd of the warden and, the moment the warden
is gone, writes ``0`` to ``memory.oom_control`` of every cgroup it was given
and of every cgroup below them (a child made while its parent was paused
inherits the setting); an argument ``high:VALUE:INODE:DIR`` (a cgroup v2
memory.high guard) gets VALUE written back to ``DIR/memory.high`` if DIR is
still that inode. It does nothing else,
and exits after restoring (or when the warden, exiting cleanly, has restored
everything itself and kills it).

What the watchdog cannot survive is being killed together with the warden
(systemd kills the whole unit's cgroup after a missed ``WatchdogSec=``). For
that the warden also writes a **state file** (default
``/run/oomwarden/paused.json``) listing the cgroups it paused, before the
first pause, and removes it on a clean exit; ``oomwarden restore`` (the
unit's ``ExecStopPost=``) reads it and restores them, see :func:`restore_state`.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import sys

from oomwarden.sources.fsmagic import CGROUP2_SUPER_MAGIC, CGROUP_SUPER_MAGIC, fs_magic

#: Where the warden lists the cgroups it paused (the unit's RuntimeDirectory).
DEFAULT_STATE_FILE = "/run/oomwarden/paused.json"
#: A state file larger than this is not one the warden wrote.
MAX_STATE_BYTES = 1 << 20


def restore(dirs: list[str]) -> int:
    """Turn the kernel's OOM killer back on (``high:VALUE:DIR``: write a
    memory.high back); returns how many writes failed."""
    failed = 0
    for top in dirs:
        if top.startswith("high:"):
            _, value, inode, directory = top.split(":", 3)
            try:
                if os.stat(directory).st_ino != int(inode):
                    continue  # removed and made again: not the cgroup guarded
                with open(os.path.join(directory, "memory.high"), "w") as f:
                    f.write(value)
            except (OSError, ValueError):
                failed += 1
            continue
        for dirpath, _subdirs, files in os.walk(top):
            if "memory.oom_control" not in files:
                continue
            try:
                with open(os.path.join(dirpath, "memory.oom_control"), "w") as f:
                    f.write("0")
            except OSError:
                failed += 1  # the cgroup is gone: nothing to restore
    return failed


def write_state(path: str, cgroups: list[tuple[str, int, str | None]]) -> None:
    """List the cgroups about to be changed, as (directory, inode, the
    memory.high to write back or None for a paused v1 OOM killer),
    atomically (a new file renamed over the old one)."""
    os.makedirs(os.path.dirname(path) or ".", mode=0o755, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    state = {"version": 1, "pid": os.getpid(),
             "cgroups": [{"dir": d, "inode": inode} if high is None else
                         {"dir": d, "inode": inode, "memory_high": high}
                         for d, inode, high in cgroups]}
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, json.dumps(state).encode() + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _a_warden(pid: int) -> bool:
    """Whether ``pid`` is a live oomwarden process (its command line says so)."""
    if pid <= 0:
        return False
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"oomwarden" in f.read()
    except OSError:
        return False


def remove_state(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


class StateError(Exception):
    """The state file cannot be read, is not one the warden wrote, or belongs
    to a warden that is running (``running``)."""

    def __init__(self, message: str, running: bool = False) -> None:
        super().__init__(message)
        self.running = running


def restore_state(path: str) -> tuple[list[str], list[str]]:
    """Restore the kernel's killer in every cgroup a state file lists, and
    remove the file. Returns (what was restored, skipped "dir: why").
    A cgroup is written only if it is still the same one (its inode) on a
    cgroup v1 filesystem (statfs, not the path)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        return [], []
    except OSError as e:
        raise StateError(f"{path}: {e.strerror}") from None
    try:
        data = os.read(fd, MAX_STATE_BYTES + 1)
    except OSError as e:
        raise StateError(f"{path}: {e.strerror}") from None
    finally:
        os.close(fd)
    try:
        if len(data) > MAX_STATE_BYTES:
            raise ValueError
        state = json.loads(data)
        entries = [(str(e["dir"]), int(e["inode"]),
                    None if e.get("memory_high") is None else str(e["memory_high"]))
                   for e in state["cgroups"]]
        if state.get("version") != 1 or not all(os.path.isabs(d) for d, _, _ in entries):
            raise ValueError
        if any(h is not None and not (h == "max" or h.isdigit()) for _, _, h in entries):
            raise ValueError
        owner = int(state.get("pid", 0))
    except (ValueError, TypeError, KeyError, AttributeError):
        raise StateError(f"{path}: not a state file written by oomwarden") from None
    if owner != os.getpid() and _a_warden(owner):
        raise StateError(f"{path} belongs to a warden that is running (pid {owner})",
                         running=True)
    restored: list[str] = []
    skipped: list[str] = []
    for directory, inode, high in entries:
        want, fs = ((CGROUP2_SUPER_MAGIC, "cgroup2") if high is not None
                    else (CGROUP_SUPER_MAGIC, "cgroup v1"))
        try:
            if fs_magic(directory) != want:
                skipped.append(f"{directory}: not on a {fs} filesystem")
                continue
            if os.stat(directory).st_ino != inode:
                skipped.append(f"{directory}: another cgroup now")
                continue
        except OSError:
            skipped.append(f"{directory}: gone")
            continue
        if high is not None:
            if restore([f"high:{high}:{inode}:{directory}"]):
                skipped.append(f"{directory}: could not write memory.high")
            else:
                restored.append(f"memory.high of {directory} (to {high})")
        elif restore([directory]):
            skipped.append(f"{directory}: could not write every memory.oom_control")
        else:
            restored.append(f"the kernel's OOM killer in {directory}")
    remove_state(path)
    return restored, skipped


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
