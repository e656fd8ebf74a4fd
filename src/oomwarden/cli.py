"""The ``oomwarden`` command line.

User-facing failures print one line on stderr (``oomwarden: error: ...``)
and exit with status 2; never a traceback.

``oomwarden run`` locks in memory (mlockall) every module it has imported,
so this module imports only what ``run`` and ``restore`` need and the
parsers of every subcommand (:mod:`oomwarden.cli_args`); the other
commands import their implementations when they run: ``simulate``,
``record`` and ``replay`` in :func:`main`, rich (:mod:`oomwarden.display`)
in the commands that print tables. ``tests/test_imports.py`` holds it to that.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import NoReturn

from oomwarden import __version__
from oomwarden.cli_args import add_simulate_command, add_trace_commands, positive, seconds_in
from oomwarden.config import DEFAULT_CONTROL_SOCKET, default_config, load_config, summarize
from oomwarden.control import MAX_PID, JsonObject, call
from oomwarden.daemon import warden_from_config
from oomwarden.decision import Candidate, Decision
from oomwarden.domains import resolve_cgroup
from oomwarden.errors import OomwardenError
from oomwarden.model import Snapshot
from oomwarden.policy.budget import signal_guard
from oomwarden.policy.decide import DEFAULT_BUDGET_S, decide
from oomwarden.policy.engine import cgroup_domain, system_domain
from oomwarden.policy.history import History
from oomwarden.policy.registry import load_policy
from oomwarden.sources.procfs import ReadOptions, with_details
from oomwarden.sources.snapshot import SOURCES, SourceConfig, build_snapshot, choose_source
from oomwarden.watchdog import DEFAULT_STATE_FILE, StateError, restore_state

EXIT_USAGE = 2
#: History window for policies that rank by growth: long enough to see a leak
#: or a fork storm, short enough for an interactive command.
DEFAULT_WINDOW_S = 2.0
MAX_WINDOW_S = 600.0
#: The longest budget a decision may have (a minute is already no OOM killer).
MAX_BUDGET_MS = 60_000


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"oomwarden: error: {message}\n")
        sys.exit(EXIT_USAGE)


_positive = positive
_seconds = seconds_in(0, MAX_WINDOW_S)


def _pid(text: str) -> int:
    value = positive(text)
    if value > MAX_PID:
        raise argparse.ArgumentTypeError(f"expected a pid (1 to {MAX_PID}), got {value}")
    return value


def _budget_ms(text: str) -> int:
    value = positive(text)
    if value > MAX_BUDGET_MS:
        raise argparse.ArgumentTypeError(f"expected at most {MAX_BUDGET_MS} ms, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="oomwarden",
        description="A programmable out-of-memory killer for Linux.",
    )
    parser.add_argument("--version", action="version", version=f"oomwarden {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    ex = sub.add_parser(
        "explain",
        help="rank the tasks of a domain now, with the reasons for every score",
        description="Rank the tasks of an OOM domain (the system, or one memory cgroup) "
        "as the policy would if memory ran out now.",
    )
    ex.add_argument("--cgroup", metavar="PATH",
                    help="a memory cgroup: a path inside a hierarchy (/a/b, v1:/a/b, v2:/a/b) "
                    "or a filesystem path (/sys/fs/cgroup/memory/a/b); default: the system")
    ex.add_argument("--policy", default="kernel", metavar="SPEC",
                    help="policy SPEC: a built-in name, a .py policy or a .toml rules file; "
                    "default: kernel")
    ex.add_argument("--window", type=_seconds, default=None, metavar="SECONDS",
                    help="take a first snapshot this long before the one ranked, for "
                    f"growth rates (default {DEFAULT_WINDOW_S:g} s for policies that need "
                    "history, else none)")
    ex.add_argument("--budget-ms", type=_budget_ms, default=int(DEFAULT_BUDGET_S * 1000),
                    metavar="MS", help="the policy's time budget for the whole decision "
                    f"(default {DEFAULT_BUDGET_S * 1000:.0f}); past it the kernel policy decides")
    ex.add_argument("--top", type=_positive, default=10, metavar="N",
                    help="show the N best candidates (default 10)")
    ex.add_argument("--all", action="store_true",
                    help="show every task of the domain, unkillable ones included")
    ex.add_argument("--json", action="store_true", help="print one JSON object")
    ex.add_argument("--proc-root", default="/proc", metavar="DIR",
                    help="read processes from DIR instead of /proc (recorded trees)")
    ex.add_argument("--fs-root", default="/", metavar="DIR",
                    help="take cgroup mount points from mountinfo below DIR (recorded trees)")
    ex.add_argument("--no-verify-fs", action="store_true",
                    help="do not statfs-check cgroup mounts (recorded trees only)")
    ex.add_argument("--source", choices=SOURCES, default="auto",
                    help="the task snapshot backend: the BPF task iterator (bpf), /proc "
                    "(procfs), or bpf where it loads, else procfs with a line saying why "
                    "(auto, the default; docs/bpf.md)")
    cc = sub.add_parser(
        "check-config",
        help="check a daemon config file and summarise its watches",
        description="Load and check a config file completely, as `oomwarden run` would "
        "(policies included), and summarise each watch. A bad file: one line naming "
        "the file, the line and the key, and exit status 2.",
    )
    cc.add_argument("file", nargs="?", metavar="FILE", help="the TOML config file")
    cc.add_argument("--default", action="store_true",
                    help="show the built-in default config (earlyoom's thresholds), used "
                    "when no config file is given")
    rn = sub.add_parser(
        "run",
        help="the daemon: handle memory cgroup OOMs and memory thresholds",
        description="Run in the foreground until SIGTERM or SIGINT. With no --config, "
        "earlyoom's defaults (the system domain, MemAvailable and SwapFree thresholds, "
        "the kernel policy). Every decision is one JSON line in the decision log.",
    )
    rn.add_argument("--config", metavar="FILE", help="the TOML config file")
    rn.add_argument("--dry-run", action="store_true",
                    help="decide and log, but never pause the kernel's killer and never "
                    "signal or delete anything")
    rn.add_argument("--socket", metavar="PATH",
                    help="serve the control socket at PATH instead of the config's "
                    "control_socket; 'none': no control socket")
    rn.add_argument("--state-file", metavar="FILE", default=DEFAULT_STATE_FILE,
                    help="where to list the cgroups whose OOM killer the warden paused, for "
                    f"`oomwarden restore` (default {DEFAULT_STATE_FILE})")
    rs = sub.add_parser(
        "restore",
        help="give the kernel its OOM killer back in the cgroups a dead warden paused",
        description="Read the state file of a warden that was killed (with its "
        "watchdog), turn the kernel's OOM killer back on in every cgroup it lists that "
        "still exists, and remove the file. Nothing to do without a state file. For "
        "systemd's ExecStopPost=.",
    )
    rs.add_argument("--state-file", metavar="FILE", default=DEFAULT_STATE_FILE,
                    help=f"the state file (default {DEFAULT_STATE_FILE})")
    _add_control_commands(sub)
    add_simulate_command(sub)
    add_trace_commands(sub)
    return parser


def _socket_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--socket", metavar="PATH", default=DEFAULT_CONTROL_SOCKET,
                   help="the running daemon's control socket (default "
                   f"{DEFAULT_CONTROL_SOCKET}; the config's control_socket)")


def _add_control_commands(sub: argparse._SubParsersAction[_Parser]) -> None:
    """``victim add|list|remove`` and ``status``: requests to a running
    ``oomwarden run`` over its control socket (docs/control.md)."""
    vi = sub.add_parser(
        "victim",
        help="the running daemon's victim queues: victims chosen ahead of an OOM",
        description="Queue a process or a cgroup to be killed first on the next OOM in its "
        "domain, list the queues, remove an entry. A queued process is held by a pidfd "
        "(when it exits it leaves the queue; a recycled PID is never hit), a cgroup by its "
        "inode. Root may queue anything; another user only its own processes and the "
        "cgroups it owns.",
    )
    vsub = vi.add_subparsers(dest="victim_command", required=True, parser_class=_Parser)
    va = vsub.add_parser("add", help="queue a process or a cgroup",
                         description="Queue a process (--pid) or a memory cgroup (--cgroup).")
    target = va.add_mutually_exclusive_group(required=True)
    target.add_argument("--pid", type=_pid, metavar="PID", help="a process")
    target.add_argument("--cgroup", metavar="PATH",
                        help="a memory cgroup, as `explain --cgroup` takes it")
    va.add_argument("--domain", metavar="DOMAIN",
                    help='the queue: "system" or "cgroup:/PATH" (default: the deepest watched '
                    "domain that holds the victim)")
    _socket_arg(va)
    vl = vsub.add_parser("list", help="list the queued victims, oldest first per domain")
    vl.add_argument("--json", action="store_true", help="print the response body as JSON")
    _socket_arg(vl)
    vr = vsub.add_parser("remove", help="remove a queue entry",
                         description="Remove a queue entry by its id (`victim list` shows it).")
    vr.add_argument("entry", type=_positive, metavar="ID", help="the entry's id")
    _socket_arg(vr)
    st = sub.add_parser(
        "status",
        help="what the running daemon watches, its queues, its last decisions",
        description="Ask the running daemon for its watches, queue sizes, last decisions "
        "and the kernel's own kills it counted.",
    )
    st.add_argument("--json", action="store_true", help="print the response body as JSON")
    _socket_arg(st)


def cmd_run(args: argparse.Namespace) -> int:
    config = load_config(args.config) if args.config else default_config()
    for line in summarize(config):
        shown = (f"control socket: {args.socket} (--socket)"
                 if args.socket is not None and line.startswith("control socket: ") else line)
        sys.stderr.write(f"oomwarden: {shown}\n")
    warden = warden_from_config(config, dry_run=args.dry_run)
    warden.state_file = args.state_file
    if args.socket is not None:
        warden.control_socket = None if args.socket == "none" else args.socket
    if args.config:
        path = args.config
        warden.reload = lambda: warden_from_config(load_config(path), dry_run=args.dry_run)
    return warden.run()


def cmd_restore(args: argparse.Namespace) -> int:
    try:
        restored, skipped = restore_state(args.state_file)
    except StateError as e:
        raise OomwardenError(str(e)) from None
    for what in restored:
        sys.stderr.write(f"oomwarden: restored {what}\n")
    for why in skipped:
        sys.stderr.write(f"oomwarden: skipped {why}\n")
    if not restored and not skipped:
        sys.stderr.write(f"oomwarden: nothing to restore ({args.state_file} does not exist: "
                         "the last warden exited cleanly)\n")
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    """Load and check a config file (or take the built-in default) and print
    a summary of every watch."""
    if args.default == (args.file is not None):
        raise OomwardenError("check-config: give a config FILE or --default (one of them)")
    config = default_config() if args.default else load_config(args.file)
    name = "the built-in default config" if args.default else f"config {config.source}"
    sys.stdout.write("".join(f"{line}\n" for line in [*summarize(config), f"{name} is valid"]))
    sys.stdout.flush()
    return 0


def _take_snapshot(args: argparse.Namespace, details: bool = False) -> Snapshot:
    config = SourceConfig(
        proc_root=args.proc_root,
        fs_root=args.fs_root,
        verify_fs=not args.no_verify_fs,
        read=ReadOptions(oom_score=True, details=details),
        source=getattr(args, "source", "procfs"),
    )
    choice = choose_source(config)
    if choice.reason is not None and not getattr(args, "_source_said", False):
        sys.stderr.write(f"oomwarden: {choice.reason}\n")
        args._source_said = True
    return build_snapshot(replace(config, source=choice.backend))


def _with_details(decision: Decision, proc_root: str, shown: Sequence[Candidate]) -> Decision:
    """Read exe and cmdline for the candidates that are shown, only."""
    wanted = {c.task.identity for c in shown}
    if decision.victim is not None:
        wanted.add(decision.victim.task.identity)
    cands = tuple(
        c._replace(task=with_details(proc_root, c.task)) if c.task.identity in wanted else c
        for c in decision.candidates
    )
    victim = decision.victim
    if victim is not None:
        victim = next((c for c in cands if c.task.identity == victim.task.identity), victim)
    return replace(decision, candidates=cands, victim=victim)


def cmd_explain(args: argparse.Namespace) -> int:
    from oomwarden import display  # noqa: PLC0415 (rich: not in the daemon's memory)

    policy = load_policy(args.policy)
    history: History | None = None
    window = args.window if args.window is not None else (
        DEFAULT_WINDOW_S if policy.needs_history else 0.0
    )
    if window > 0:
        history = History(_take_snapshot(args))
        time.sleep(window)
    snapshot = _take_snapshot(args, details=policy.needs_details)
    if args.cgroup is not None:
        domain = cgroup_domain(snapshot, resolve_cgroup(snapshot, args.cgroup))
    else:
        domain = system_domain(snapshot)
    decision = decide(snapshot, domain, policy, history=history, guard=signal_guard,
                      budget_s=args.budget_ms / 1000)
    shown = decision.candidates if args.all else decision.selectable[: args.top]
    decision = _with_details(decision, args.proc_root, shown)
    if args.json:
        json.dump(decision.to_json(top=args.top, all_tasks=args.all), sys.stdout, indent=1)
        sys.stdout.write("\n")
        return 0
    display.print_decision(decision, snapshot, all_tasks=args.all, top=args.top)
    return 0


def cmd_victim(args: argparse.Namespace) -> int:
    from oomwarden import display  # noqa: PLC0415 (rich: not in the daemon's memory)

    if args.victim_command == "add":
        req: JsonObject = {"op": "victim.add"}
        if args.pid is not None:
            req["pid"] = args.pid
        else:
            req["cgroup"] = args.cgroup
        if args.domain is not None:
            req["domain"] = args.domain
        body = call(args.socket, req)
        display.say_entry("queued", body.get("entry"))
        return 0
    if args.victim_command == "remove":
        body = call(args.socket, {"op": "victim.remove", "entry": args.entry})
        display.say_entry("removed", body.get("removed"), fallback=args.entry)
        return 0
    body = call(args.socket, {"op": "victim.list"})
    if args.json:
        _print_json(body)
        return 0
    entries = body.get("entries")
    entries = entries if isinstance(entries, list) else []
    display.print_victims(entries)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from oomwarden import display  # noqa: PLC0415 (rich: not in the daemon's memory)

    body = call(args.socket, {"op": "status"})
    if args.json:
        _print_json(body)
        return 0
    display.print_status(body, display.out_console())
    return 0


def _print_json(body: JsonObject) -> None:
    json.dump(body, sys.stdout, indent=1)
    sys.stdout.write("\n")


def _silence_stdout() -> None:
    """After a failed write, point stdout at /dev/null so that the
    interpreter's final flush does not print a second error."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if sys.stdout is None:  # started with stdout closed (`>&-`)
        sys.stderr.write("oomwarden: error: standard output is closed\n")
        return EXIT_USAGE
    try:
        if args.command == "explain":
            return cmd_explain(args)
        if args.command == "check-config":
            return cmd_check_config(args)
        if args.command == "run":
            return cmd_run(args)
        if args.command == "restore":
            return cmd_restore(args)
        if args.command == "victim":
            return cmd_victim(args)
        if args.command == "status":
            return cmd_status(args)
        # imported here, not at the top: not in the daemon's memory
        if args.command == "simulate":
            from oomwarden.simulate.command import cmd_simulate  # noqa: PLC0415

            return cmd_simulate(args)
        if args.command == "record":
            from oomwarden.trace_cli import cmd_record  # noqa: PLC0415

            return cmd_record(args)
        if args.command == "replay":
            from oomwarden.trace_cli import cmd_replay  # noqa: PLC0415

            return cmd_replay(args)
    except OomwardenError as e:
        sys.stderr.write(f"oomwarden: error: {e}\n")
        return EXIT_USAGE
    except BrokenPipeError:
        _silence_stdout()  # the reader went away (`| head`): not an error
        return 0
    except KeyboardInterrupt:
        sys.stderr.write("oomwarden: interrupted\n")
        return 130
    except OSError as e:
        _silence_stdout()
        where = f"{e.filename}: " if e.filename else "writing the output: "
        sys.stderr.write(f"oomwarden: error: {where}{e.strerror or e}\n")
        return EXIT_USAGE
    parser.error(f"unknown command {args.command}")


if __name__ == "__main__":
    sys.exit(main())
