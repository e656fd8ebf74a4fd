"""Run one command in the VM lane's guest: a pure cgroup v2 kernel under qemu.

usage: python tests/vm/run.py [--timeout S] [--env K=V ...] [--cwd DIR] -- COMMAND...

Builds the guest when the cache does not hold it (``builder.py``), installs
qemu when it is missing, boots once, runs COMMAND inside (in ``--cwd``, by
default the current folder, at the same path as on the host), streams its
output to stdout and exits with its exit status. The guest sees the host's
``/`` read-only under a tmpfs overlay (so the host's Python and the
project's venv are at the same paths) and the project folder read-write.

The status comes back in a file on the project share, written by the guest's
init once the command has ended; no file means failure (status 125), with the
last lines of the guest's console. So does the total timeout (qemu is killed
then). qemu is always reaped.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import select
import shlex
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from builder import PROJECT, BuildError, Guest, build, cache_dir, ensure_qemu

#: The whole run (boot, command, shutdown) ends within this many seconds.
DEFAULT_TIMEOUT_S = 900.0
#: qemu's settings: TCG on every machine (KVM is not usable on this machine
#: kind), 2 vCPUs on 2 host threads, 1 GiB (plenty: qemu peaks at ~550 MB).
MEMORY_MIB = 1024
CPUS = 2
#: Lines of the guest's console kept for a failure report.
TAIL_LINES = 40
START = "OOMWARDEN-VM-START"
EXIT = "OOMWARDEN-VM-EXIT "
#: The guest's console gets this long after the command's end marker to power off.
SHUTDOWN_S = 30.0
#: Status for a run that produced none (boot failure, timeout, lost status).
NO_STATUS = 125


@dataclass
class Outcome:
    """What one boot gave."""

    #: The command's exit status; None when the guest reported none.
    status: int | None
    #: Why there is no status (or None).
    failure: str | None
    #: qemu start -> the command starting; the command's own run; everything.
    boot_s: float | None
    command_s: float | None
    total_s: float
    tail: list[str] = field(default_factory=list)


def qemu_argv(qemu: str, guest: Guest, project: Path, run_dir: Path,
              memory_mib: int = MEMORY_MIB) -> list[str]:
    append = " ".join([
        "console=ttyS0", "quiet", "panic=-1", "rdinit=/init",
        # the guest's cgroups: v2 only, with PSI (Debian's kernel has it off by default)
        "psi=1", "cgroup_no_v1=all",
        # seeds the kernel's RNG from the emulated CPU's RDRAND at once
        "random.trust_cpu=on", "tsc=reliable", "mitigations=off",
        f"oomwarden.run={run_dir}", f"oomwarden.project={project}",
    ])

    def share(path: Path, tag: str, readonly: bool) -> list[str]:
        # Commas in a qemu option value are doubled.
        spec = (f"local,path={str(path).replace(',', ',,')},mount_tag={tag},"
                "security_model=none,multidevs=remap")
        return ["-virtfs", spec + (",readonly=on" if readonly else "")]

    return [
        qemu, "-nodefaults", "-no-user-config", "-no-reboot",
        "-accel", "tcg,thread=multi", "-cpu", "max", "-smp", str(CPUS), "-m", str(memory_mib),
        "-display", "none", "-chardev", "stdio,id=console,signal=off",
        "-serial", "chardev:console",
        "-kernel", str(guest.kernel), "-initrd", str(guest.initramfs), "-append", append,
        *share(Path("/"), "hostroot", readonly=True),
        *share(project, "project", readonly=False),
    ]


def command_script(argv: list[str], cwd: Path, env: dict[str, str]) -> str:
    lines = ["# written by tests/vm/run.py; run by the guest's init", "set -u"]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in sorted(env.items())]
    lines += [f"cd {shlex.quote(str(cwd))} || exit {NO_STATUS}", f"exec {shlex.join(argv)}"]
    return "\n".join(lines) + "\n"


def guest_env(extra: dict[str, str]) -> dict[str, str]:
    env = {
        "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"),
        "HOME": "/root",
        "LANG": "C.UTF-8",
        "TERM": "dumb",
        "PYTHONUNBUFFERED": "1",
        "OOMWARDEN_IN_VM": "1",
    }
    env.update(extra)
    return env


def _check_path(path: Path) -> None:
    if any(c.isspace() for c in str(path)):
        raise BuildError(f"{path}: the VM lane cannot pass a path with white space to the guest")


def boot(argv: list[str], *, guest: Guest, qemu: str, project: Path = PROJECT,
         cwd: Path | None = None, env: dict[str, str] | None = None,
         timeout_s: float = DEFAULT_TIMEOUT_S, out: TextIO = sys.stdout) -> Outcome:
    """Boot the guest once, run ``argv`` in it, stream its output to ``out``."""
    project = project.resolve()
    cwd = (cwd or Path.cwd()).resolve()
    for path in (project, cwd):
        _check_path(path)
    runs = project / ".cache" / "vm" / "runs"
    run_dir = runs / uuid.uuid4().hex[:16]
    run_dir.mkdir(parents=True)
    try:
        (run_dir / "command.sh").write_text(command_script(argv, cwd, guest_env(env or {})))
        return _boot(qemu_argv(qemu, guest, project, run_dir), run_dir, timeout_s, out)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def _boot(argv: list[str], run_dir: Path, timeout_s: float, out: TextIO) -> Outcome:
    started = time.monotonic()
    deadline = started + timeout_s
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
    phase = "boot"
    marker_status: int | None = None
    command_started: float | None = None
    command_ended: float | None = None
    failure: str | None = None
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    pending = b""
    try:
        while True:
            now = time.monotonic()
            if now >= deadline:
                failure = f"timed out after {timeout_s:g} s ({phase})"
                break
            if phase == "shutdown" and command_ended is not None and \
                    now - command_ended > SHUTDOWN_S:
                break  # the status is in; a guest that does not power off is killed below
            ready, _, _ = select.select([fd], [], [], min(1.0, deadline - now))
            if not ready:
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                break  # qemu closed its output: it exited
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for raw in lines:
                line = raw.decode("utf-8", "replace").rstrip("\r")
                tail.append(line)
                if phase == "boot" and line.strip() == START:
                    phase, command_started = "command", time.monotonic()
                elif phase == "command" and line.startswith(EXIT):
                    phase, command_ended = "shutdown", time.monotonic()
                    with contextlib.suppress(ValueError):
                        marker_status = int(line[len(EXIT):].strip())
                elif phase == "command":
                    out.write(line + "\n")
                    out.flush()
    finally:
        if proc.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5 if failure is None else 0.1)
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        proc.stdout.close()
    if pending:
        tail.append(pending.decode("utf-8", "replace").rstrip("\r"))
    total = time.monotonic() - started
    boot_s = None if command_started is None else command_started - started
    command_s = None if command_started is None or command_ended is None \
        else command_ended - command_started
    status: int | None = None
    if failure is None:
        try:
            status = int((run_dir / "status").read_text().strip())
        except (OSError, ValueError):
            failure = ("the guest did not start the command" if command_started is None
                       else "the guest wrote no exit status")
            failure += f" (qemu exit status {proc.returncode})"
        if status is not None and marker_status is not None and status != marker_status:
            failure = f"exit status {status} in the file, {marker_status} on the console"
            status = None
    return Outcome(status, failure, boot_s, command_s, total, list(tail))


def report_failure(outcome: Outcome, err: TextIO = sys.stderr) -> None:
    err.write(f"vm: error: {outcome.failure}; the guest console's last lines:\n")
    for line in outcome.tail:
        err.write(f"vm| {line}\n")
    err.flush()


def timings(outcome: Outcome) -> str:
    def fmt(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f} s"

    return (f"boot {fmt(outcome.boot_s)}, command {fmt(outcome.command_s)}, "
            f"total {fmt(outcome.total_s)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Run a command in the VM lane's cgroup v2 guest.",
        usage="%(prog)s [options] -- COMMAND...")
    parser.add_argument("--timeout", type=float, default=float(
        os.environ.get("OOMWARDEN_VM_TIMEOUT", DEFAULT_TIMEOUT_S)),
        help="seconds for the whole run (default: $OOMWARDEN_VM_TIMEOUT or %(default)s)")
    parser.add_argument("--env", action="append", default=[], metavar="K=V",
                        help="an environment variable for the command (repeatable)")
    parser.add_argument("--cwd", type=Path, help="where the command runs (default: here)")
    parser.add_argument("--cache", help="artefact folder (default: .cache/vm in the project)")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given (after --)")
    env = {}
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            parser.error(f"--env {item!r}: expected K=V")
        env[key] = value
    try:
        guest = build(cache_dir(args.cache))
        qemu = ensure_qemu()
        outcome = boot(command, guest=guest, qemu=qemu, cwd=args.cwd, env=env,
                       timeout_s=args.timeout)
    except BuildError as e:
        print(f"vm: error: {e}", file=sys.stderr)
        return NO_STATUS
    print(f"vm: {timings(outcome)}", file=sys.stderr)
    if outcome.status is None:
        report_failure(outcome)
        return NO_STATUS
    return outcome.status


if __name__ == "__main__":
    sys.exit(main())
