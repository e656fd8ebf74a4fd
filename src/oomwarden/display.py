"""What the commands print for a person: rich tables and text (``explain``,
``status``, ``victim``, ``replay``).

Apart from :mod:`oomwarden.cli` so that rich is loaded only by the commands
that print with it: ``oomwarden run`` locks in memory every module it
imports (rich is ~2 MiB of it).
"""

from __future__ import annotations

import datetime
import json
import sys
from typing import Any, Literal

from rich.console import Console
from rich.table import Table
from rich.text import Text

from oomwarden.control import JsonObject
from oomwarden.decision import Candidate, Decision, action_to_json
from oomwarden.model import Snapshot
from oomwarden.policy.api import Action
from oomwarden.units import fmt_bytes


class _Console(Console):
    """Rich turns a broken pipe into ``SystemExit(1)``; we treat it like any
    other closed reader (``main`` exits 0, as with ``--json``)."""

    def on_broken_pipe(self) -> None:
        raise BrokenPipeError


def out_console() -> _Console:
    """A console on stdout: 140 columns wide off a terminal (a pipe, a file)."""
    console = _Console()
    return console if console.is_terminal else _Console(width=140)


def print_victims(entries: list[Any]) -> None:
    """The body of ``victim list`` (docs/control.md): its entries as a table."""
    console = out_console()
    if not entries:
        console.print("the victim queues are empty")
        return
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


def say_entry(what: str, entry: object, fallback: int | None = None) -> None:
    console = out_console()
    if not isinstance(entry, dict):
        console.print(f"{what} entry {fallback}" if fallback is not None else what)
        return
    console.print(Text.assemble(f"{what} entry ", _cell(entry.get("id")), ": ",
                                _victim_text(entry), " in ", _cell(entry.get("domain"))))


_STATUS_KEYS = ("version", "pid", "started_ns", "dry_run", "config", "watches", "queues",
                "queue_limit", "last_decisions", "kernel_kills", "bpf")


def print_status(body: JsonObject, console: _Console) -> None:
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


def print_decision(decision: Decision, snapshot: Snapshot, *, all_tasks: bool, top: int) -> None:
    """``explain``'s table: the candidates shown, the victim and its reasons."""
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
