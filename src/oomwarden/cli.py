"""The ``oomwarden`` command line.

User-facing failures print one line on stderr (``oomwarden: error: ...``)
and exit with status 2; never a traceback.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Literal, NoReturn

from rich.console import Console
from rich.table import Table
from rich.text import Text

from oomwarden import __version__
from oomwarden.config import DEFAULT_CONTROL_SOCKET, default_config, load_config, summarize
from oomwarden.control import MAX_PID, JsonObject, call
from oomwarden.daemon import warden_from_config
from oomwarden.decision import Candidate, Decision, action_to_json
from oomwarden.domains import resolve_cgroup
from oomwarden.errors import OomwardenError
from oomwarden.model import Snapshot
from oomwarden.policy.api import Action
from oomwarden.policy.budget import signal_guard
from oomwarden.policy.decide import DEFAULT_BUDGET_S, decide
from oomwarden.policy.engine import cgroup_domain, system_domain
from oomwarden.policy.history import History
from oomwarden.policy.registry import load_policy
from oomwarden.simulate.command import add_simulate_command, cmd_simulate
from oomwarden.sources.procfs import ReadOptions, with_details
from oomwarden.sources.snapshot import SOURCES, SourceConfig, build_snapshot, choose_source
from oomwarden.trace_cli import add_trace_commands, cmd_record, cmd_replay
from oomwarden.units import fmt_bytes
from oomwarden.watchdog import DEFAULT_STATE_FILE, StateError, restore_state

EXIT_USAGE = 2
#: History window for policies that rank by growth: long enough to see a leak
#: or a fork storm, short enough for an interactive command.
DEFAULT_WINDOW_S = 2.0
MAX_WINDOW_S = 600.0
#: The longest budget a decision may have (a minute is already no OOM killer).
MAX_BUDGET_MS = 60_000


class _Console(Console):
    """Rich turns a broken pipe into ``SystemExit(1)``; we treat it like any
    other closed reader (``main`` exits 0, as with ``--json``)."""

    def on_broken_pipe(self) -> None:
        raise BrokenPipeError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"oomwarden: error: {message}\n")
        sys.exit(EXIT_USAGE)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {value}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not 0 <= value <= MAX_WINDOW_S:
        raise argparse.ArgumentTypeError(f"expected 0 to {MAX_WINDOW_S:g} seconds, got {value}")
    return value


def _pid(text: str) -> int:
    value = _positive(text)
    if value > MAX_PID:
        raise argparse.ArgumentTypeError(f"expected a pid (1 to {MAX_PID}), got {value}")
    return value


def _budget_ms(text: str) -> int:
    value = _positive(text)
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
    _print_table(decision, snapshot, all_tasks=args.all, top=args.top)
    return 0


def cmd_victim(args: argparse.Namespace) -> int:
    if args.victim_command == "add":
        req: JsonObject = {"op": "victim.add"}
        if args.pid is not None:
            req["pid"] = args.pid
        else:
            req["cgroup"] = args.cgroup
        if args.domain is not None:
            req["domain"] = args.domain
        body = call(args.socket, req)
        _say_entry("queued", body.get("entry"))
        return 0
    if args.victim_command == "remove":
        body = call(args.socket, {"op": "victim.remove", "entry": args.entry})
        _say_entry("removed", body.get("removed"), fallback=args.entry)
        return 0
    body = call(args.socket, {"op": "victim.list"})
    if args.json:
        _print_json(body)
        return 0
    entries = body.get("entries")
    entries = entries if isinstance(entries, list) else []
    console = _out_console()
    if not entries:
        console.print("the victim queues are empty")
        return 0
    table = Table(title=f"victim queues: {len(entries)} entr{'y' if len(entries) == 1 else 'ies'}"
                  " (each domain's oldest goes first)", title_justify="left")
    columns: tuple[tuple[str, Literal["left", "right"]], ...] = (
        ("id", "right"), ("domain", "left"), ("victim", "left"), ("uid", "right"),
        ("queued", "left"), ("by uid", "right"))
    for name, justify in columns:
        table.add_column(name, justify=justify, overflow="fold")
    for item in entries:
        e = item if isinstance(item, dict) else {"id": item}
        table.add_row(_cell(e.get("id")), _cell(e.get("domain")), _victim_text(e),
                      _cell(e.get("uid")), _when(e.get("added_ns")), _cell(e.get("by_uid")))
    console.print(table)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    body = call(args.socket, {"op": "status"})
    if args.json:
        _print_json(body)
        return 0
    _print_status(body, _out_console())
    return 0


def _out_console() -> _Console:
    console = _Console()
    return console if console.is_terminal else _Console(width=140)


def _print_json(body: JsonObject) -> None:
    json.dump(body, sys.stdout, indent=1)
    sys.stdout.write("\n")


def _cell(value: object) -> Text:
    """Any value from the daemon as literal text: "-" for none."""
    if value is None:
        return Text("-")
    if isinstance(value, bool):
        return Text("yes" if value else "no")
    if isinstance(value, str):
        return literal(value)
    if isinstance(value, list) and all(isinstance(v, str | int) for v in value):
        return literal(", ".join(str(v) for v in value))
    if isinstance(value, int | float):
        return Text(str(value))
    return literal(json.dumps(value, separators=(",", ":")))


def _when(value: object) -> Text:
    """Wall-clock nanoseconds (or a decision record's ``time_ns`` stages) as
    local time."""
    if isinstance(value, dict):
        value = value.get("event")
    if isinstance(value, int | float) and not isinstance(value, bool):
        try:
            stamp = datetime.datetime.fromtimestamp(value / 1e9)
        except (OverflowError, OSError, ValueError):
            return _cell(value)
        return Text(stamp.strftime("%Y-%m-%d %H:%M:%S"))
    return _cell(value)


def _victim_text(e: JsonObject) -> Text:
    """A queue entry's or a decision's victim: ``pid 42 (comm)`` or the cgroup."""
    pid, comm, cgroup = e.get("pid"), e.get("comm"), e.get("cgroup")
    if e.get("kind") == "cgroup" or (pid is None and cgroup is not None):
        return Text.assemble("cgroup ", _cell(cgroup))
    if pid is None:
        return Text("-")
    text = Text.assemble("pid ", _cell(pid))
    if comm is not None:
        text.append_text(Text.assemble(" (", _cell(comm), ")"))
    return text


def _say_entry(what: str, entry: object, fallback: int | None = None) -> None:
    console = _out_console()
    if not isinstance(entry, dict):
        console.print(f"{what} entry {fallback}" if fallback is not None else what)
        return
    console.print(Text.assemble(f"{what} entry ", _cell(entry.get("id")), ": ",
                                _victim_text(entry), " in ", _cell(entry.get("domain"))))


_STATUS_KEYS = ("version", "pid", "started_ns", "dry_run", "config", "watches", "queues",
                "queue_limit", "last_decisions", "kernel_kills", "bpf")


def _print_status(body: JsonObject, console: _Console) -> None:
    """The status body (docs/control.md), whatever of it is there: a key
    missing or of another shape is skipped or shown as JSON, never fatal."""
    head = [Text.assemble("oomwarden ", _cell(body.get("version")))]
    if "pid" in body:
        head.append(Text.assemble("pid ", _cell(body["pid"])))
    if "started_ns" in body:
        head.append(Text.assemble("since ", _when(body["started_ns"])))
    if body.get("dry_run") is True:
        head.append(Text("dry run"))
    if "config" in body:
        head.append(Text.assemble("config ", _cell(body["config"])))
    console.print(Text(", ").join(head))
    watches = body.get("watches")
    if isinstance(watches, list) and watches:
        table = Table(title="watches", title_justify="left")
        for name in ("domain", "triggers", "policy", "victim", "dry run"):
            table.add_column(name, overflow="fold")
        for item in watches:
            w = item if isinstance(item, dict) else {"domain": item}
            table.add_row(_cell(w.get("domain")), _cell(w.get("triggers")),
                          _cell(w.get("policy")), _cell(w.get("victim")),
                          _cell(w.get("dry_run")))
        console.print(table)
    elif "watches" in body:
        console.print(Text.assemble("watches: ", _cell(watches or "none")))
    queues = body.get("queues")
    if isinstance(queues, dict):
        sizes = [Text.assemble(literal(str(k)), " ", _cell(v)) for k, v in queues.items()]
        limit = body.get("queue_limit")
        console.print(Text.assemble("queues: ", Text(", ").join(sizes) if sizes else "empty",
                                    *((" (at most ", _cell(limit), ")") if limit else ())))
    elif "queues" in body:
        console.print(Text.assemble("queues: ", _cell(queues)))
    decisions = body.get("last_decisions")
    if isinstance(decisions, list) and decisions:
        table = Table(title="last decisions", title_justify="left")
        for name in ("time", "domain", "trigger", "victim", "queue entry", "dry run"):
            table.add_column(name, overflow="fold")
        for item in decisions:
            d = item if isinstance(item, dict) else {}
            victim = d.get("victim")
            table.add_row(_when(d.get("time_ns")), _cell(d.get("domain")),
                          _cell(d.get("trigger")),
                          _victim_text(victim) if isinstance(victim, dict) else _cell(victim),
                          _cell(d.get("queue_entry")), _cell(d.get("dry_run")))
        console.print(table)
    elif "last_decisions" in body:
        console.print("last decisions: none")
    kills = body.get("kernel_kills")
    if isinstance(kills, dict):
        parts = [Text.assemble(literal(str(k)), " ", _cell(v)) for k, v in kills.items()]
        console.print(Text.assemble("the kernel's own OOM kills: ",
                                    Text(", ").join(parts) if parts else "none"))
    elif "kernel_kills" in body:
        console.print(Text.assemble("the kernel's own OOM kills: ", _cell(kills)))
    bpf = body.get("bpf")
    if isinstance(bpf, dict):
        for name, part in bpf.items():
            if isinstance(part, dict):
                state = "in use" if part.get("in_use") is True else "not in use"
                console.print(Text.assemble("BPF ", literal(str(name)), ": ", state, ": ",
                                            _cell(part.get("detail"))))
            else:
                console.print(Text.assemble("BPF ", literal(str(name)), ": ", _cell(part)))
    elif "bpf" in body:
        console.print(Text.assemble("BPF: ", _cell(bpf)))
    for key, value in body.items():
        if key not in _STATUS_KEYS:
            console.print(Text.assemble(literal(str(key)), ": ", _cell(value)))


_CONTROL = {c: f"\\x{c:02x}" for c in range(32)} | {10: "\\n", 9: "\\t", 127: "\\x7f"}


def _out_encoding() -> str:
    return getattr(sys.stdout, "encoding", None) or "utf-8"


def literal(text: str) -> Text:
    """Process and cgroup names as literal, printable text: never Rich markup
    (anyone can name a process ``[red]``), control characters escaped,
    undecodable bytes (surrogate-escaped) shown as ``\\xff``, and characters
    the output's encoding lacks shown as escapes too."""
    safe = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    encoding = _out_encoding()
    safe = safe.encode(encoding, "backslashreplace").decode(encoding)
    return Text(safe.translate(_CONTROL))


def _short_path(path: str | None, width: int = 28) -> str:
    if path is None:
        return "?"
    return path if len(path) <= width else "..." + path[-(width - 3):]


def _print_table(decision: Decision, snapshot: Snapshot, *, all_tasks: bool, top: int) -> None:
    console = _Console()
    if not console.is_terminal:
        console = _Console(width=140)  # a pipe or a file: don't squeeze to 80 columns
    shown = decision.candidates if all_tasks else decision.selectable[:top]
    d = decision.domain
    size = fmt_bytes(d.totalpages * snapshot.system.page_size)
    title = Text.assemble(
        "domain ", literal(d.name), f" ({size} = {d.totalpages} pages), policy ",
        literal(decision.policy),
        f": {len(decision.selectable)} killable of {len(decision.candidates)} tasks",
    )
    table = Table(title=title, title_justify="left")
    table.add_column("pid", justify="right", no_wrap=True, min_width=7)
    table.add_column("comm", no_wrap=True, max_width=16, overflow="ellipsis")
    table.add_column("cgroup", no_wrap=True, max_width=28, overflow="ellipsis")
    kernel = decision.policy == "kernel" and decision.fallback is None
    last = "score" if kernel else "kernel"
    for name, width in (("rss", 10), ("swap", 8), ("adj", 5), ("points", 8), (last, 5)):
        table.add_column(name, justify="right", no_wrap=True, min_width=width)
    if all_tasks:
        table.add_column("why not", overflow="fold")
    victim_id = decision.victim.task.identity if decision.victim is not None else None
    kind = d.cgroup.kind if d.cgroup is not None else None
    for c in shown:
        t = c.task
        cells: list[str | Text] = [
            str(t.pid),
            literal(t.comm),
            literal(_short_path(c.cgroup_path(kind))),
            fmt_bytes(t.rss_bytes),
            fmt_bytes(t.swap_bytes),
            "?" if t.oom_score_adj is None else str(t.oom_score_adj),
            "-" if c.points is None else str(c.points),
            _last_cell(c, kernel),
        ]
        if all_tasks:
            cells.append("" if c.verdict in ("select", "default")
                         else literal("; ".join(c.reasons)))
        table.add_row(*cells, style="bold red" if t.identity == victim_id else None)
    console.print(table)
    if decision.fallback is not None:
        console.print(Text.assemble("fallback: ", literal(decision.fallback)), style="yellow")
    v = decision.victim
    if v is None:
        if not decision.actions:
            console.print("victim: none")
    else:
        console.print(Text.assemble(
            f"victim: pid {v.task.pid} (", literal(v.task.comm), f"), {v.points} points"
        ))
        for reason in v.reasons:
            console.print(Text.assemble("  - ", literal(reason)))
    for action in decision.actions:
        console.print(Text.assemble("action: ", literal(_describe(action))))
    if decision.policy_seconds is not None:
        console.print(f"time in the policy: {decision.policy_seconds * 1000:.1f} ms")
    for note in decision.notes:
        console.print(Text.assemble("note: ", literal(note)))


def _last_cell(c: Candidate, kernel: bool) -> str:
    """Kernel policy: the kernel-scale score; others: the kernel's points."""
    value = c.oom_score if kernel else c.kernel_points
    return "-" if value is None else str(value)


def _describe(action: Action) -> str:
    data = action_to_json(action)
    name = str(data.pop("action"))
    return name + " " + ", ".join(
        f"{k}={v}" for k, v in data.items() if v not in ("", None, [], False))


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
        if args.command == "simulate":
            return cmd_simulate(args)
        if args.command == "record":
            return cmd_record(args)
        if args.command == "replay":
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
