"""The control socket: a running warden's JSON-lines channel (``docs/control.md``).

**Server.** :class:`ControlServer` listens on a Unix stream socket and keeps
its own ``select.epoll`` over the listening socket and its clients; the
daemon registers that epoll's fd (:meth:`ControlServer.fileno`) with
``EPOLLIN`` in its own loop and calls :meth:`~ControlServer.handle` when it is
readable, and :meth:`~ControlServer.tick` once :meth:`~ControlServer.next_deadline`
has passed. Nothing blocks; each call does a bounded amount of work in a
bounded time, and nothing a client sends makes it raise.

**Protocol.** One JSON object per line, UTF-8, a request gives exactly one
response line, in order::

    {"op": "victim.add", "pid": 4242, "id": 7}
    {"ok": true, "id": 7, "entry": {"id": 3, "kind": "process", "pid": 4242, ...}}
    {"ok": false, "error": {"code": "forbidden", "message": "..."}}

Every request is validated completely (types, ranges, unknown fields) before
the handler sees it: :func:`validate_request` is pure.

**Authorisation** is by ``SO_PEERCRED`` (the peer's pid, uid and gid at
connect). The rules are the pure functions below: :func:`authorise_op`, which
the server applies before calling the handler (read-only ops, ``reload``),
and :func:`check_queue_process`, :func:`check_queue_cgroup`,
:func:`check_remove`, :func:`check_queue_share` and
:func:`check_explain_policy`, which the handler calls once it has read the
facts they need (a process's real uid through its pidfd, a cgroup directory's
owner, who queued an entry). Every refusal is an error response and a log line.

**Handler.** The daemon implements :class:`ControlHandler`: one method per
op, given the validated request and the :class:`Peer`; it returns the
response body (a JSON-serialisable dict) or raises :class:`RequestError`.
Any other exception is a bug: the client gets ``internal`` and the log the
details.

**Client.** :func:`request` sends one request and returns the response;
:func:`call` returns the body, raising :class:`RequestError` on a refusal.
"""

from __future__ import annotations

import contextlib
import difflib
import errno
import functools
import json
import math
import os
import select
import socket
import stat
import struct
import sys
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from oomwarden import textfile
from oomwarden.errors import ControlError

JsonObject = dict[str, Any]

# -- the protocol's vocabulary ------------------------------------------------------------

OP_VICTIM_ADD: Final = "victim.add"
OP_VICTIM_LIST: Final = "victim.list"
OP_VICTIM_REMOVE: Final = "victim.remove"
OP_STATUS: Final = "status"
OP_EXPLAIN: Final = "explain"
OP_RELOAD: Final = "reload"
#: Every op and the fields it takes (besides ``op`` and ``id``).
OP_FIELDS: Final[dict[str, tuple[str, ...]]] = {
    OP_VICTIM_ADD: ("pid", "cgroup", "domain"),
    OP_VICTIM_LIST: (),
    OP_VICTIM_REMOVE: ("entry",),
    OP_STATUS: (),
    OP_EXPLAIN: ("cgroup", "policy", "top"),
    OP_RELOAD: (),
}
OPS: Final = tuple(OP_FIELDS)
#: Ops that change nothing: open to every local user unless
#: ``Limits.read_only_for_all`` is False.
READ_ONLY_OPS: Final = frozenset({OP_VICTIM_LIST, OP_STATUS, OP_EXPLAIN})
#: Ops for root only.
ROOT_OPS: Final = frozenset({OP_RELOAD})

#: Every error code a response may carry (docs/control.md says when each is given).
ERROR_CODES: Final = (
    "bad_json",          # not UTF-8, not JSON, NaN/Infinity, a duplicate key, too deep
    "bad_request",       # JSON, but not an object
    "too_long",          # a line over Limits.max_line_bytes (the connection is closed)
    "unknown_op",        # "op" names no op
    "unknown_field",     # a field the op does not take
    "bad_field",         # a field missing, of the wrong type or out of range
    "forbidden",         # the peer may not do this (SO_PEERCRED)
    "rate_limited",      # the peer's uid is over its request rate
    "too_many_clients",  # the connection cap (the connection is closed)
    "queue_full",        # the victim queues (or the peer's share) are full
    "duplicate",         # that victim is queued already
    "not_found",         # no such process, cgroup, queue entry or domain
    "gone",              # it went away while the request was served
    "bad_config",        # reload: the new config is refused (the running one stays)
    "unavailable",       # the daemon cannot do this now (no config file to reload, ...)
    "internal",          # a bug in the warden (logged)
)
_CODES = frozenset(ERROR_CODES)

#: PID_MAX_LIMIT on 64-bit kernels: no pid is larger.
MAX_PID: Final = 1 << 22
#: PATH_MAX: the longest cgroup path or policy SPEC taken.
MAX_PATH_BYTES: Final = 4096
MAX_ENTRY_ID: Final = (1 << 63) - 1
#: explain over the socket: at most this many candidates (the response stays small).
MAX_EXPLAIN_TOP: Final = 100
DEFAULT_EXPLAIN_TOP: Final = 10
DEFAULT_EXPLAIN_POLICY: Final = "kernel"
#: The request's own "id" (echoed): a string this long at most, or an integer
#: that JSON tools keep exactly (|n| <= 2**53).
MAX_TAG_CHARS: Final = 256
MAX_TAG_INT: Final = 1 << 53
#: sun_path holds 108 bytes, the last one a NUL.
MAX_SOCKET_PATH_BYTES: Final = 107
#: What a user other than root may hold in the victim queues at once
#: (check_queue_share): one user cannot fill the daemon's queue.
DEFAULT_MAX_ENTRIES_PER_UID: Final = 64
#: A client reads a response this long at most.
MAX_CLIENT_RESPONSE_BYTES: Final = 64 << 20
#: What handle()/tick() get when the caller gives no budget.
DEFAULT_BUDGET_S: Final = 0.01
#: After accept() failed for want of fds or memory, the listener rests this long
#: (level-triggered epoll would otherwise wake the loop at once, forever).
ACCEPT_PAUSE_S: Final = 0.1
#: Log lines of one kind for one uid: the first LOG_BURST in each
#: LOG_INTERVAL_S in full, the rest folded into one line that counts them (a
#: flood of refusals does not flood the journal).
LOG_INTERVAL_S: Final = 1.0
LOG_BURST: Final = 10
_RECV_BYTES = 64 * 1024
_PEERCRED = struct.Struct("3i")


@dataclass(frozen=True, slots=True)
class Limits:
    """What one client, one uid and all clients together may cost the
    warden. The defaults are sized for a CLI that sends a request now and
    then, and a warden whose memory is locked."""

    #: A request line at most (without its newline). Longer: ``too_long``,
    #: then the connection is closed.
    max_line_bytes: int = 64 * 1024
    #: Connections at most; beyond it a new one gets ``too_many_clients`` and
    #: is closed at once.
    max_clients: int = 64
    #: Connections per uid at most (root is exempt): one user cannot take
    #: every slot.
    max_clients_per_uid: int = 16
    #: A client that neither completes a request line nor reads any of its
    #: responses for this long is closed (a silent client, a slow drip, a
    #: reader that stopped).
    idle_timeout_s: float = 10.0
    #: Requests per second per peer uid (a token bucket shared by that uid's
    #: connections), and its burst. Over it: ``rate_limited``; a connection
    #: refused ``rate_burst`` times in a row is closed.
    rate_per_s: float = 50.0
    rate_burst: int = 100
    #: One response at most; a larger one is replaced by ``internal``.
    max_response_bytes: int = 1 << 20
    #: Unread responses per client at most: over it, the client is closed.
    max_output_bytes: int = 1 << 20
    #: Unread responses of all clients together at most: the client whose
    #: response goes over it is closed.
    max_total_output_bytes: int = 8 << 20
    #: Work per handle() call: requests served, connections accepted.
    max_requests_per_call: int = 64
    max_accepts_per_call: int = 16
    #: Read-only ops (victim.list, status, explain) for every local user;
    #: False: for root only.
    read_only_for_all: bool = True

    def __post_init__(self) -> None:
        for name in ("max_line_bytes", "max_clients", "max_clients_per_uid", "rate_burst",
                     "max_response_bytes", "max_output_bytes", "max_total_output_bytes",
                     "max_requests_per_call", "max_accepts_per_call"):
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise ValueError(f"Limits.{name}: expected a whole number >= 1, got {value!r}")
        for name in ("idle_timeout_s", "rate_per_s"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"Limits.{name}: expected a number > 0, got {value!r}")


@dataclass(frozen=True, slots=True)
class Peer:
    """The connected process's credentials, from ``SO_PEERCRED`` at connect."""

    pid: int
    uid: int
    gid: int

    @property
    def root(self) -> bool:
        return self.uid == 0

    def __str__(self) -> str:
        return f"pid {self.pid} (uid {self.uid})"


class RequestError(ControlError):
    """A request refused: ``code`` (one of :data:`ERROR_CODES`) and a
    one-line ``message``. The handler raises it; :func:`call` raises it
    when the daemon refused."""

    def __init__(self, code: str, message: str) -> None:
        if code not in _CODES:
            raise ValueError(f"unknown control error code {code!r}")
        super().__init__(message)
        self.code = code
        self.message = one_line(message)

    def __str__(self) -> str:
        return f"{self.message} ({self.code})"


# -- requests -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class VictimAdd:
    """Exactly one of ``pid`` and ``cgroup``. ``cgroup`` is as
    ``explain --cgroup`` takes it; ``domain`` is ``system`` or
    ``cgroup:/PATH``, None: the daemon picks (the deepest watched domain
    holding the victim)."""

    pid: int | None = None
    cgroup: str | None = None
    domain: str | None = None


@dataclass(frozen=True, slots=True)
class VictimRemove:
    entry: int


@dataclass(frozen=True, slots=True)
class Explain:
    cgroup: str | None = None
    policy: str = DEFAULT_EXPLAIN_POLICY
    top: int = DEFAULT_EXPLAIN_TOP


Body = VictimAdd | VictimRemove | Explain | None
Tag = str | int


@dataclass(frozen=True, slots=True)
class Request:
    """A validated request: its op, the fields (None for ops without any)
    and the client's ``id`` to echo (None: none given)."""

    op: str
    body: Body = None
    tag: Tag | None = None


class ControlHandler(Protocol):
    """What the daemon implements. Each method gets a request validated
    completely and the peer's credentials; it returns the response body
    (a dict, JSON-serialisable, without the keys ``ok``, ``id``, ``error``)
    or raises :class:`RequestError`. It runs in the daemon's loop: it must
    not block. Shapes of the bodies: docs/control.md."""

    def victim_add(self, request: VictimAdd, peer: Peer) -> JsonObject: ...

    def victim_list(self, peer: Peer) -> JsonObject: ...

    def victim_remove(self, request: VictimRemove, peer: Peer) -> JsonObject: ...

    def status(self, peer: Peer) -> JsonObject: ...

    def explain(self, request: Explain, peer: Peer) -> JsonObject: ...

    def reload(self, peer: Peer) -> JsonObject: ...


def one_line(text: str, limit: int = 500) -> str:
    """A message as one printable line, at most ``limit`` characters."""
    text = textfile.one_line(text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _shown(value: object, limit: int = 60) -> str:
    """A client's value in a message: repr, escaped, cut short."""
    text = repr(value)
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return one_line(text)


def _kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number with a fraction"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:20]} is out of range")
    return value


def _no_duplicates(pairs: list[tuple[str, Any]]) -> JsonObject:
    out: JsonObject = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {_shown(key)}")
        out[key] = value
    return out


def decode_line(line: bytes) -> object:
    """A request line's JSON value; ``bad_json`` if it has none."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RequestError("bad_json", f"not UTF-8 (byte {e.start})") from None
    if not text.strip():
        raise RequestError("bad_json", "an empty line (expected one JSON object)")
    try:
        return json.loads(text, parse_constant=_reject_constant, parse_float=_float,
                          object_pairs_hook=_no_duplicates)
    except RecursionError:
        raise RequestError("bad_json", "nested too deep") from None
    except json.JSONDecodeError as e:
        raise RequestError("bad_json", f"{e.msg} at column {e.colno}") from None
    except ValueError as e:  # our hooks, or an integer with too many digits
        raise RequestError("bad_json", str(e)) from None


def request_tag(obj: JsonObject) -> Tag | None:
    """The request's ``id``, to echo; ``bad_field`` if it is not a short
    string or an exact integer."""
    if "id" not in obj:
        return None
    tag = obj["id"]
    if isinstance(tag, str) and len(tag) <= MAX_TAG_CHARS:
        return tag
    if type(tag) is int and -MAX_TAG_INT <= tag <= MAX_TAG_INT:
        return tag
    raise RequestError("bad_field", f"id: expected a string of at most {MAX_TAG_CHARS} "
                       f"characters or an integer within +-2**53, got {_kind(tag)}")


def validate_request(obj: object) -> Request:
    """Check a decoded request completely; :class:`RequestError` names the
    first problem (``bad_request``, ``unknown_op``, ``unknown_field``,
    ``bad_field``)."""
    if not isinstance(obj, dict):
        raise RequestError("bad_request", f"expected a JSON object, got {_kind(obj)}")
    tag = request_tag(obj)
    if "op" not in obj:
        raise RequestError("bad_field", f"op: missing (one of {', '.join(OPS)})")
    op = obj["op"]
    if not isinstance(op, str):
        raise RequestError("bad_field", f"op: expected a string, got {_kind(op)}")
    if op not in OP_FIELDS:
        close = difflib.get_close_matches(op, OPS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise RequestError("unknown_op", f"unknown op {_shown(op)} (expected one of "
                           f"{', '.join(OPS)}){hint}")
    takes = OP_FIELDS[op]
    unknown = sorted(k for k in obj if k not in takes and k not in ("op", "id"))
    if unknown:
        what = ", ".join(_shown(k, 40) for k in unknown[:3])
        more = f" and {len(unknown) - 3} more" if len(unknown) > 3 else ""
        takes_text = ", ".join(takes) if takes else "no fields"
        hint = (" (the queue entry is \"entry\"; \"id\" is the request's own, echoed)"
                if op == OP_VICTIM_REMOVE else "")
        raise RequestError("unknown_field", f"{op}: unknown field{'s' if len(unknown) > 1 else ''}"
                           f" {what}{more}; it takes {takes_text}{hint}")
    body: Body = None
    if op == OP_VICTIM_ADD:
        pid = _int(obj, "pid", 1, MAX_PID)
        cgroup = _path(obj, "cgroup")
        if (pid is None) == (cgroup is None):
            raise RequestError("bad_field", "victim.add: give exactly one of pid and cgroup")
        body = VictimAdd(pid=pid, cgroup=cgroup, domain=_domain(obj))
    elif op == OP_VICTIM_REMOVE:
        entry = _int(obj, "entry", 1, MAX_ENTRY_ID)
        if entry is None:
            raise RequestError("bad_field", "entry: missing: the id of a queue entry "
                               "(victim.list shows them)")
        body = VictimRemove(entry=entry)
    elif op == OP_EXPLAIN:
        top = _int(obj, "top", 1, MAX_EXPLAIN_TOP)
        policy = _path(obj, "policy")
        body = Explain(cgroup=_path(obj, "cgroup"),
                       policy=DEFAULT_EXPLAIN_POLICY if policy is None else policy,
                       top=DEFAULT_EXPLAIN_TOP if top is None else top)
    return Request(op=op, body=body, tag=tag)


def _int(obj: JsonObject, name: str, low: int, high: int) -> int | None:
    if name not in obj:
        return None
    value = obj[name]
    if type(value) is not int:
        raise RequestError("bad_field", f"{name}: expected an integer, got {_kind(value)}")
    if not low <= value <= high:
        shown = str(value) if abs(value) < 10**30 else "a huge integer"
        raise RequestError("bad_field", f"{name}: {shown} is outside {low}..{high}")
    return value


def _path(obj: JsonObject, name: str) -> str | None:
    if name not in obj:
        return None
    value = obj[name]
    if not isinstance(value, str):
        raise RequestError("bad_field", f"{name}: expected a string, got {_kind(value)}")
    if not value:
        raise RequestError("bad_field", f"{name}: empty")
    if not value.isprintable():
        raise RequestError("bad_field", f"{name}: {_shown(value)} has a non-printable "
                           "character")
    if len(value.encode("utf-8")) > MAX_PATH_BYTES:
        raise RequestError("bad_field", f"{name}: longer than {MAX_PATH_BYTES} bytes")
    return value


def _domain(obj: JsonObject) -> str | None:
    value = _path(obj, "domain")
    if value is None or value == "system":
        return value
    cgroup = value.removeprefix("cgroup:")
    parts = cgroup.split("/")
    if (not value.startswith("cgroup:/") or cgroup == "/" or parts[-1] == ""
            or any(p in ("", ".", "..") for p in parts[1:])):
        raise RequestError("bad_field", f"domain: {_shown(value)} is neither \"system\" nor "
                           "\"cgroup:/PATH\" (a plain path inside the memory cgroup "
                           "hierarchy, not the root)")
    return value


# -- authorisation: pure rules ----------------------------------------------------------------


def authorise_op(op: str, peer: Peer, *, read_only_for_all: bool = True) -> None:
    """The rule by op alone, applied by the server before the handler:
    read-only ops for everyone (or root only), ``reload`` for root only;
    ``victim.add``/``victim.remove`` go on to the handler's target checks."""
    if peer.root:
        return
    if op in ROOT_OPS:
        raise RequestError("forbidden", f"{op} is for root only (uid {peer.uid} asked)")
    if op in READ_ONLY_OPS and not read_only_for_all:
        raise RequestError("forbidden", f"{op} is for root only on this warden (uid "
                           f"{peer.uid} asked; read-only requests are not open to all users)")


def check_queue_process(peer: Peer, pid: int, target_uid: int) -> None:
    """A user other than root may queue only a process whose real uid is its
    own. ``target_uid`` is read by the handler from ``/proc/PID/status``
    while it holds the process's pidfd (so that it is that process's)."""
    if peer.root or target_uid == peer.uid:
        return
    raise RequestError("forbidden", f"uid {peer.uid} may not queue pid {pid}: it runs as uid "
                       f"{target_uid} (a user other than root may queue only its own "
                       "processes)")


def check_queue_cgroup(peer: Peer, cgroup: str, owner_uid: int) -> None:
    """A user other than root may queue only a cgroup whose directory it
    owns (``owner_uid``: ``st_uid`` of the directory fd the handler opened
    and keeps)."""
    if peer.root or owner_uid == peer.uid:
        return
    raise RequestError("forbidden", f"uid {peer.uid} may not queue cgroup {cgroup}: its "
                       f"directory is owned by uid {owner_uid} (a user other than root may "
                       "queue only cgroups it owns)")


def check_remove(peer: Peer, entry: int, by_uid: int) -> None:
    """A user other than root may remove only the entries it queued itself."""
    if peer.root or by_uid == peer.uid:
        return
    raise RequestError("forbidden", f"uid {peer.uid} may not remove entry {entry}: uid "
                       f"{by_uid} queued it (a user other than root may remove only its own "
                       "entries)")


def check_queue_share(peer: Peer, held: int, cap: int = DEFAULT_MAX_ENTRIES_PER_UID) -> None:
    """A user other than root may hold ``cap`` entries at most (``held``: the
    entries it queued that are still there)."""
    if peer.root or held < cap:
        return
    raise RequestError("queue_full", f"uid {peer.uid} holds {held} queue entries already "
                       f"(at most {cap} for a user other than root)")


def check_explain_policy(spec: str, allowed: Collection[str]) -> None:
    """``explain`` over the socket takes a built-in policy name or the SPEC of
    a policy the running config already uses (``allowed``), never another
    file: a ``.py`` policy runs code, in the warden, as root."""
    if spec in allowed:
        return
    raise RequestError("forbidden", f"policy {_shown(spec)}: over the control socket only a "
                       "built-in policy or one the running config uses (a policy file runs "
                       "code in the warden); run `oomwarden explain --policy` yourself for "
                       "others")


# -- the server --------------------------------------------------------------------------------


@dataclass
class _Bucket:
    tokens: float
    last: float

    def refill(self, now: float, rate: float, burst: int) -> None:
        self.tokens = min(float(burst), self.tokens + max(0.0, now - self.last) * rate)
        self.last = now


@dataclass(eq=False)
class _Client:
    sock: socket.socket
    fd: int
    peer: Peer
    deadline: float
    inbuf: bytearray = field(default_factory=bytearray)
    #: inbuf[:scanned] holds no newline.
    scanned: int = 0
    outbuf: bytearray = field(default_factory=bytearray)
    eof: bool = False
    #: No more requests are read: close once the output is flushed.
    closing: bool = False
    mask: int = select.EPOLLIN
    strikes: int = 0

    def has_line(self) -> bool:
        found = self.inbuf.find(b"\n", self.scanned)
        if found < 0:
            self.scanned = len(self.inbuf)
            return False
        return True

    def pop_line(self) -> bytes | None:
        found = self.inbuf.find(b"\n", self.scanned)
        if found < 0:
            self.scanned = len(self.inbuf)
            return None
        line = bytes(self.inbuf[:found])
        del self.inbuf[: found + 1]
        self.scanned = 0
        return line[:-1] if line.endswith(b"\r") else line


@dataclass
class _Window:
    start: float
    logged: int = 0
    folded: int = 0
    last: str = ""


@dataclass
class _Throttle:
    """Log lines per (uid, kind): the first LOG_BURST of each LOG_INTERVAL_S
    in full, the rest counted and told in one line when the interval ends
    (``due()`` says when: the server's next_deadline includes it)."""

    log: Callable[[str], None]
    clock: Callable[[], float]
    _windows: dict[tuple[int, str], _Window] = field(default_factory=dict)

    def say(self, uid: int, kind: str, line: str) -> None:
        now = self.clock()
        key = (uid, kind)
        window = self._windows.get(key)
        if window is not None and now - window.start >= LOG_INTERVAL_S:
            self._end(key, window)
            window = None
        if window is None:
            window = self._windows[key] = _Window(start=now)
        if window.logged < LOG_BURST:
            window.logged += 1
            self.log(line)
        else:
            window.folded += 1
            window.last = line

    def _end(self, key: tuple[int, str], window: _Window) -> None:
        del self._windows[key]
        if window.folded:
            more = (f" (and {window.folded - 1} more like it within {LOG_INTERVAL_S:g} s)"
                    if window.folded > 1 else "")
            self.log(window.last + more)

    def flush(self) -> None:
        now = self.clock()
        for key, window in list(self._windows.items()):
            if now - window.start >= LOG_INTERVAL_S:
                self._end(key, window)

    def due(self) -> float | None:
        """When folded lines are to be told; None: none folded."""
        times = [w.start + LOG_INTERVAL_S for w in self._windows.values() if w.folded]
        return min(times) if times else None


def _stderr_log(line: str) -> None:
    with contextlib.suppress(OSError, ValueError):
        sys.stderr.write(f"oomwarden: {line}\n")
        sys.stderr.flush()


class ControlServer:
    """The control socket's server. See the module's docstring for how the
    daemon drives it, and docs/control.md for the protocol.

    ``clock`` gives the time of ``next_deadline()`` (monotonic seconds) and
    measures budgets, idle clients and rates. ``log`` gets one line per
    refusal and per client dropped (a flood's folded, see :class:`_Throttle`).
    """

    def __init__(self, path: str, handler: ControlHandler, *,
                 clock: Callable[[], float] = time.monotonic, limits: Limits | None = None,
                 log: Callable[[str], None] = _stderr_log) -> None:
        self.path = path
        self.limits = limits if limits is not None else Limits()
        self._handler = handler
        self._clock = clock
        self._log = log
        self._throttle = _Throttle(log, clock)
        self._clients: dict[int, _Client] = {}
        self._per_uid: dict[int, int] = {}
        self._buckets: dict[int, _Bucket] = {}
        self._out_total = 0
        self._backlog = False
        self._accept_paused_until: float | None = None
        self._closed = False
        self._listener, self._identity = _listen(path, log)
        self._listen_fd = self._listener.fileno()
        try:
            self._epoll = select.epoll()
            self._epoll.register(self._listen_fd, select.EPOLLIN)
        except OSError as e:
            self._listener.close()
            self._unlink()
            raise ControlError(f"control socket {path}: {e.strerror or e}") from None

    # -- what the daemon's loop calls ------------------------------------------------------

    def fileno(self) -> int:
        """The server's epoll fd: readable when a connection or a request waits."""
        return -1 if self._closed else self._epoll.fileno()

    @property
    def clients(self) -> int:
        return len(self._clients)

    def handle(self, budget_s: float = DEFAULT_BUDGET_S) -> None:
        """Accept and serve what is ready, never blocking: at most
        ``max_accepts_per_call`` connections and ``max_requests_per_call``
        requests, and no new request once ``budget_s`` is spent (one at least
        is served). Requests left over make ``next_deadline()`` now."""
        if self._closed:
            return
        stop_at = self._clock() + max(0.0, budget_s)
        try:
            events = self._epoll.poll(0, self.limits.max_clients + 1)
        except InterruptedError:
            events = []
        for fd, mask in events:
            if fd == self._listen_fd:
                self._accept()
                continue
            client = self._clients.get(fd)
            if client is not None:
                self._guarded(client, functools.partial(self._on_event, client, mask))
        self._serve(stop_at)
        self._expire()

    def next_deadline(self) -> float | None:
        """When the server must be called again without its fd becoming
        readable (``tick()``): an idle client's deadline, the listener's rest
        after running out of fds, the end of a log interval with lines folded,
        or now when requests already read are waiting; None: nothing due."""
        if self._closed:
            return None
        if self._backlog:
            return self._clock()
        times = [c.deadline for c in self._clients.values()]
        if self._accept_paused_until is not None:
            times.append(self._accept_paused_until)
        folded = self._throttle.due()
        if folded is not None:
            times.append(folded)
        return min(times) if times else None

    def tick(self, budget_s: float = DEFAULT_BUDGET_S) -> None:
        """What is due by the clock: idle clients closed, the listener back
        after a rest, folded log lines told, requests left over by a bounded
        handle() served."""
        if self._closed:
            return
        self._serve(self._clock() + max(0.0, budget_s))
        self._expire()

    def close(self) -> None:
        """Close every client, the listener and the epoll, and unlink the
        socket file if it is still the one this server made."""
        if self._closed:
            return
        self._closed = True
        for client in list(self._clients.values()):
            self._drop(client)
        self._listener.close()
        self._epoll.close()
        self._unlink()

    def __enter__(self) -> ControlServer:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # -- connections -------------------------------------------------------------------------

    def _accept(self) -> None:
        for _ in range(self.limits.max_accepts_per_call):
            try:
                sock, _addr = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue
                # EMFILE, ENFILE, ENOBUFS, ENOMEM: rest the listener a moment,
                # the connections wait in the backlog meanwhile.
                self._throttle.say(-1, "accept", f"control: accept failed: "
                                   f"{e.strerror or e}; pausing for {ACCEPT_PAUSE_S:g} s")
                self._pause_accepting()
                return
            try:
                self._admit(sock)
            except Exception as e:  # never out of handle()
                sock.close()
                self._throttle.say(-1, "internal", f"control: internal error admitting a "
                                   f"client: {type(e).__name__}: {e}")

    def _pause_accepting(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._epoll.unregister(self._listen_fd)
        self._accept_paused_until = self._clock() + ACCEPT_PAUSE_S

    def _resume_accepting(self) -> None:
        if self._accept_paused_until is None or self._clock() < self._accept_paused_until:
            return
        self._accept_paused_until = None
        with contextlib.suppress(OSError, ValueError):
            self._epoll.register(self._listen_fd, select.EPOLLIN)

    def _admit(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        try:
            pid, uid, gid = _PEERCRED.unpack(
                sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
        except OSError:
            sock.close()
            return
        peer = Peer(pid, uid, gid)
        why = None
        if len(self._clients) >= self.limits.max_clients:
            why = f"{len(self._clients)} clients are connected, the most there may be"
        elif not peer.root and self._per_uid.get(uid, 0) >= self.limits.max_clients_per_uid:
            why = (f"uid {uid} has {self._per_uid[uid]} connections already, the most "
                   "one user may have")
        if why is not None:
            line = _error_line(None, "too_many_clients", why)
            with contextlib.suppress(OSError):
                sock.send(line, socket.MSG_NOSIGNAL)
            sock.close()
            self._throttle.say(uid, "too_many_clients",
                               f"control: {peer}: connection refused: {why}")
            return
        client = _Client(sock=sock, fd=sock.fileno(), peer=peer,
                         deadline=self._clock() + self.limits.idle_timeout_s)
        self._epoll.register(client.fd, client.mask)
        self._clients[client.fd] = client
        self._per_uid[uid] = self._per_uid.get(uid, 0) + 1

    def _drop(self, client: _Client) -> None:
        if not self._alive(client):
            return
        del self._clients[client.fd]
        with contextlib.suppress(OSError, ValueError):
            self._epoll.unregister(client.fd)
        client.sock.close()
        self._out_total -= len(client.outbuf)
        client.outbuf.clear()
        left = self._per_uid.get(client.peer.uid, 1) - 1
        if left > 0:
            self._per_uid[client.peer.uid] = left
        else:
            self._per_uid.pop(client.peer.uid, None)

    def _guarded(self, client: _Client, step: Callable[[], None]) -> None:
        """A step on one client; a bug there drops that client, not the server."""
        try:
            step()
        except Exception as e:
            self._throttle.say(client.peer.uid, "internal", f"control: {client.peer}: internal "
                               f"error, client dropped: {type(e).__name__}: {e}")
            self._drop(client)

    # -- reading and writing --------------------------------------------------------------------

    def _on_event(self, client: _Client, mask: int) -> None:
        if mask & select.EPOLLOUT or (client.outbuf and mask & (select.EPOLLHUP
                                                                   | select.EPOLLERR)):
            self._flush(client)
            if not self._alive(client):
                return
        if mask & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR) and self._reading(client):
            self._read(client)
        self._settle(client)

    def _alive(self, client: _Client) -> bool:
        return self._clients.get(client.fd) is client

    def _reading(self, client: _Client) -> bool:
        """Whether more input is wanted: not at EOF, not closing, and no
        complete request waiting (a client is read no faster than served)."""
        return not (client.eof or client.closing) and not client.has_line()

    def _read(self, client: _Client) -> None:
        try:
            data = client.sock.recv(_RECV_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:  # ECONNRESET and the like: nobody to answer
            self._drop(client)
            return
        if not data:
            client.eof = True
            return
        client.inbuf += data
        if not client.has_line() and len(client.inbuf) > self.limits.max_line_bytes:
            self._too_long(client)

    def _too_long(self, client: _Client) -> None:
        message = (f"a request line is {self.limits.max_line_bytes} bytes at most; "
                   "the connection is closed")
        self._refused(client, None, None, "too_long", message)
        client.inbuf.clear()
        client.scanned = 0
        client.closing = True

    def _flush(self, client: _Client) -> None:
        while client.outbuf:
            try:
                sent = client.sock.send(client.outbuf, socket.MSG_NOSIGNAL)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # EPIPE, ECONNRESET: the client went away
                self._drop(client)
                return
            del client.outbuf[:sent]
            self._out_total -= sent
            client.deadline = self._clock() + self.limits.idle_timeout_s

    def _settle(self, client: _Client) -> None:
        """Close a client that is done, else set what epoll watches for it."""
        if not self._alive(client):
            return
        done = client.closing or (client.eof and not client.has_line())
        if done and not client.outbuf:
            if client.eof and client.inbuf and not client.closing:
                self._throttle.say(client.peer.uid, "partial", f"control: {client.peer}: "
                                   f"disconnected in the middle of a request ("
                                   f"{len(client.inbuf)} bytes without a newline dropped)")
            self._drop(client)
            return
        mask = ((select.EPOLLIN if self._reading(client) else 0)
                | (select.EPOLLOUT if client.outbuf else 0))
        if mask != client.mask:
            self._epoll.modify(client.fd, mask)
            client.mask = mask

    def _send(self, client: _Client, line: bytes) -> None:
        client.outbuf += line
        self._out_total += len(line)
        limits = self.limits
        if len(client.outbuf) > limits.max_output_bytes:
            why = (f"{len(client.outbuf)} bytes of responses unread, more than "
                   f"{limits.max_output_bytes}")
        elif self._out_total > limits.max_total_output_bytes:
            why = (f"the unread responses of all clients are {self._out_total} bytes, more "
                   f"than {limits.max_total_output_bytes}")
        else:
            self._flush(client)
            return
        self._throttle.say(client.peer.uid, "unread", f"control: {client.peer}: "
                           f"client dropped: {why}")
        self._drop(client)

    # -- serving ----------------------------------------------------------------------------

    def _serve(self, stop_at: float) -> None:
        """Serve complete request lines, one per client in turn, within the
        call's bounds; note whether some are left over."""
        self._resume_accepting()
        served = 0
        while served < self.limits.max_requests_per_call:
            progress = False
            for client in list(self._clients.values()):
                if not self._alive(client) or client.closing:
                    continue
                if served and self._clock() >= stop_at:
                    break
                line = client.pop_line()
                if line is None:
                    continue
                self._guarded(client, functools.partial(self._serve_line, client, line))
                served += 1
                progress = True
                if served >= self.limits.max_requests_per_call:
                    break
            if not progress or self._clock() >= stop_at:
                break
        for client in list(self._clients.values()):
            self._guarded(client, functools.partial(self._settle, client))
        self._backlog = any(c.has_line() and not c.closing for c in self._clients.values())

    def _serve_line(self, client: _Client, line: bytes) -> None:
        limits = self.limits
        peer = client.peer
        now = self._clock()
        client.deadline = now + limits.idle_timeout_s
        if len(line) > limits.max_line_bytes:
            self._too_long(client)
            return
        bucket = self._bucket(peer.uid, now)
        if bucket.tokens < 1:
            client.strikes += 1
            self._refused(client, None, None, "rate_limited",
                          f"uid {peer.uid} is over {limits.rate_per_s:g} requests per second "
                          f"(burst {limits.rate_burst}); slow down")
            if client.strikes >= limits.rate_burst and self._alive(client):
                self._throttle.say(peer.uid, "strikes", f"control: {peer}: {client.strikes} "
                                   "requests in a row over the rate: connection closed")
                client.closing = True
            return
        bucket.tokens -= 1
        client.strikes = 0
        tag: Tag | None = None
        op: str | None = None
        try:
            obj = decode_line(line)
            if isinstance(obj, dict):
                tag = request_tag(obj)
            request = validate_request(obj)
            op = request.op
            authorise_op(op, peer, read_only_for_all=limits.read_only_for_all)
            body = self._dispatch(request, peer)
        except RequestError as e:
            self._refused(client, tag, op, e.code, e.message)
            return
        except Exception as e:  # a bug in the handler: the client hears "internal"
            self._throttle.say(peer.uid, "internal", f"control: {peer}: {op}: internal error "
                               f"in the handler: {type(e).__name__}: {one_line(str(e))}")
            self._refused(client, tag, op, "internal", "internal error in the warden "
                          "(logged)", log=False)
            return
        try:
            response = _ok_line(tag, body, limits.max_response_bytes)
        except RequestError as e:
            self._throttle.say(peer.uid, "internal", f"control: {peer}: {op}: internal error: "
                               f"{e.message}")
            self._refused(client, tag, op, "internal", e.message, log=False)
            return
        self._send(client, response)

    def _dispatch(self, request: Request, peer: Peer) -> JsonObject:
        handler = self._handler
        body = request.body
        op = request.op
        if op == OP_VICTIM_ADD and isinstance(body, VictimAdd):
            return handler.victim_add(body, peer)
        if op == OP_VICTIM_REMOVE and isinstance(body, VictimRemove):
            return handler.victim_remove(body, peer)
        if op == OP_EXPLAIN and isinstance(body, Explain):
            return handler.explain(body, peer)
        if op == OP_VICTIM_LIST:
            return handler.victim_list(peer)
        if op == OP_STATUS:
            return handler.status(peer)
        if op == OP_RELOAD:
            return handler.reload(peer)
        raise AssertionError(f"unhandled op {op!r}")  # validate_request knows every op

    def _refused(self, client: _Client, tag: Tag | None, op: str | None, code: str,
                 message: str, *, log: bool = True) -> None:
        if log:
            self._throttle.say(client.peer.uid, code, f"control: {client.peer}: "
                               f"{op or 'request'} refused: {code}: {one_line(message)}")
        self._send(client, _error_line(tag, code, message))

    def _bucket(self, uid: int, now: float) -> _Bucket:
        bucket = self._buckets.get(uid)
        if bucket is None:
            bucket = self._buckets[uid] = _Bucket(float(self.limits.rate_burst), now)
        else:
            bucket.refill(now, self.limits.rate_per_s, self.limits.rate_burst)
        return bucket

    def _expire(self) -> None:
        now = self._clock()
        self._resume_accepting()
        for client in list(self._clients.values()):
            if client.deadline > now:
                continue
            if client.outbuf:
                what = f"{len(client.outbuf)} bytes of responses unread"
            elif client.inbuf:
                what = f"an unfinished request ({len(client.inbuf)} bytes without a newline)"
            else:
                what = "nothing sent"
            self._throttle.say(client.peer.uid, "idle", f"control: {client.peer}: idle for "
                               f"{self.limits.idle_timeout_s:g} s ({what}): connection closed")
            self._drop(client)
        for uid, bucket in list(self._buckets.items()):
            if uid not in self._per_uid:
                bucket.refill(now, self.limits.rate_per_s, self.limits.rate_burst)
                if bucket.tokens >= self.limits.rate_burst:
                    del self._buckets[uid]  # as good as new
        self._throttle.flush()

    def _unlink(self) -> None:
        """Remove the socket file if it is still the one bound here."""
        with contextlib.suppress(OSError):
            info = os.lstat(self.path)
            if (info.st_dev, info.st_ino) == self._identity:
                os.unlink(self.path)


def _dumps(obj: JsonObject) -> bytes:
    return json.dumps(obj, ensure_ascii=True, allow_nan=False,
                      separators=(",", ":")).encode("ascii") + b"\n"


def _error_line(tag: Tag | None, code: str, message: str) -> bytes:
    obj: JsonObject = {"ok": False}
    if tag is not None:
        obj["id"] = tag
    obj["error"] = {"code": code, "message": one_line(message)}
    return _dumps(obj)


_RESERVED = frozenset({"ok", "id", "error"})


def _ok_line(tag: Tag | None, body: object, max_bytes: int) -> bytes:
    """The success line; a body that cannot be one is ``internal``."""
    if not isinstance(body, dict) or not all(isinstance(k, str) for k in body):
        raise RequestError("internal", f"the handler returned {_kind(body)}, not an object "
                           "with string keys")
    reserved = sorted(_RESERVED & body.keys())
    if reserved:
        raise RequestError("internal", f"the handler's response uses the reserved key "
                           f"{reserved[0]!r}")
    obj: JsonObject = {"ok": True}
    if tag is not None:
        obj["id"] = tag
    obj.update(body)
    try:
        line = _dumps(obj)
    except (TypeError, ValueError, RecursionError) as e:
        raise RequestError("internal", f"the handler's response is not JSON: "
                           f"{type(e).__name__}: {e}") from None
    if len(line) > max_bytes:
        raise RequestError("internal", f"the response ({len(line)} bytes) is longer than "
                           f"{max_bytes} bytes")
    return line


# -- the socket file --------------------------------------------------------------------------


def _listen(path: str, log: Callable[[str], None]) -> tuple[socket.socket, tuple[int, int]]:
    """Bind and listen at ``path`` (mode 0666), after making its directory
    (0755) and removing a stale socket there; ControlError, one line, if
    the path is taken."""
    if not path:
        raise ControlError("control socket: an empty path")
    size = len(os.fsencode(path))
    if size > MAX_SOCKET_PATH_BYTES:
        raise ControlError(f"control socket {path}: {size} bytes long; a socket path has at "
                           f"most {MAX_SOCKET_PATH_BYTES}")
    _make_dirs(os.path.dirname(os.path.abspath(path)))
    _clear_stale(path, log)
    sock = socket.socket(socket.AF_UNIX,
                         socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    try:
        try:
            sock.bind(path)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise ControlError(f"control socket {path}: taken by another process while "
                                   "starting (another `oomwarden run`?)") from None
            raise
        info = os.lstat(path)
        identity = (info.st_dev, info.st_ino)
        try:
            # Everyone may connect: SO_PEERCRED decides what each may do.
            os.chmod(path, 0o666)
            sock.listen(128)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise
    except OSError as e:
        sock.close()
        raise ControlError(f"control socket {path}: {e.strerror or e}") from None
    except BaseException:
        sock.close()
        raise
    return sock, identity


def _make_dirs(directory: str) -> None:
    missing: list[str] = []
    d = directory
    while not os.path.isdir(d):
        missing.append(d)
        parent = os.path.dirname(d)
        if parent == d:
            break
        d = parent
    for d in reversed(missing):
        try:
            os.mkdir(d, 0o755)
            os.chmod(d, 0o755)  # whatever the umask
        except FileExistsError:
            if not os.path.isdir(d):
                raise ControlError(f"control socket: {d} is not a directory") from None
        except OSError as e:
            raise ControlError(f"control socket: cannot make its directory {d}: "
                               f"{e.strerror or e}") from None


def _clear_stale(path: str, log: Callable[[str], None]) -> None:
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as e:
        raise ControlError(f"control socket {path}: {e.strerror or e}") from None
    if not stat.S_ISSOCK(info.st_mode):
        kind = ("a directory" if stat.S_ISDIR(info.st_mode) else "a symbolic link"
                if stat.S_ISLNK(info.st_mode) else "a regular file"
                if stat.S_ISREG(info.st_mode) else "not a socket")
        raise ControlError(f"control socket {path} exists and is {kind}, not a socket; "
                           "remove it or set control_socket elsewhere")
    probe = socket.socket(socket.AF_UNIX,
                          socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        pass  # nobody listens: stale
    except FileNotFoundError:
        return
    except BlockingIOError:  # its backlog is full: someone listens
        raise ControlError(_live(path)) from None
    except OSError as e:
        raise ControlError(f"control socket {path}: cannot tell whether a process listens "
                           f"on it: {e.strerror or e}") from None
    else:
        raise ControlError(_live(path))
    finally:
        probe.close()
    try:
        os.unlink(path)
    except FileNotFoundError:
        return
    except OSError as e:
        raise ControlError(f"control socket {path}: cannot remove the stale socket: "
                           f"{e.strerror or e}") from None
    log(f"control: removed the stale socket {path} (nothing listened on it)")


def _live(path: str) -> str:
    return (f"control socket {path}: another process is listening on it (another "
            "`oomwarden run`?); stop it or set control_socket elsewhere")


# -- the client ------------------------------------------------------------------------------


def request(path: str, obj: JsonObject, timeout_s: float = 5.0) -> JsonObject:
    """Send one request, return the response (``ok`` true or false).
    ControlError, one line, when there is no daemon or no valid answer."""
    data = _dumps(obj)
    deadline = time.monotonic() + timeout_s
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    with sock:
        sock.settimeout(timeout_s)
        try:
            sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            raise ControlError(f"no daemon is listening on {path}: is `oomwarden run` "
                               "running?") from None
        except PermissionError:
            raise ControlError(f"control socket {path}: permission denied") from None
        except TimeoutError:
            raise ControlError(f"control socket {path}: the daemon did not take the "
                               f"connection within {timeout_s:g} s") from None
        except OSError as e:
            raise ControlError(f"control socket {path}: {e.strerror or e}") from None
        try:
            # It may have answered and closed already (too_many_clients): read that.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                sock.sendall(data)
            buf = bytearray()
            while b"\n" not in buf:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                sock.settimeout(left)
                try:
                    chunk = sock.recv(_RECV_BYTES)
                except ConnectionResetError:
                    chunk = b""
                if not chunk:
                    raise ControlError(f"control socket {path}: the daemon closed the "
                                       "connection without answering")
                buf += chunk
                if len(buf) > MAX_CLIENT_RESPONSE_BYTES:
                    raise ControlError(f"control socket {path}: the answer is longer than "
                                       f"{MAX_CLIENT_RESPONSE_BYTES} bytes")
        except TimeoutError:
            raise ControlError(f"control socket {path}: no answer within {timeout_s:g} "
                               "s") from None
        except OSError as e:
            raise ControlError(f"control socket {path}: {e.strerror or e}") from None
    line = bytes(buf[: buf.index(b"\n")])
    try:
        response = json.loads(line)
    except ValueError:
        response = None
    if not isinstance(response, dict) or not isinstance(response.get("ok"), bool):
        raise ControlError(f"control socket {path}: the answer is not a response: "
                           f"{_shown(line, 80)}")
    return response


def call(path: str, obj: JsonObject, timeout_s: float = 5.0) -> JsonObject:
    """Send one request and return the body of the response (without ``ok``
    and ``id``); :class:`RequestError` if the daemon refused it."""
    response = request(path, obj, timeout_s)
    if response["ok"]:
        return {k: v for k, v in response.items() if k not in _RESERVED}
    error = response.get("error")
    code = error.get("code") if isinstance(error, dict) else None
    message = error.get("message") if isinstance(error, dict) else None
    if not isinstance(code, str) or not isinstance(message, str):
        raise ControlError(f"control socket {path}: a refusal without a code and a message")
    if code not in _CODES:  # a newer daemon's code: keep the message
        raise ControlError(f"{one_line(message)} ({_shown(code, 40)})")
    raise RequestError(code, message)
