"""The control socket (oomwarden.control) against a fake handler: every op,
every error code, SO_PEERCRED authorisation with a child that drops to
``nobody``, hostile clients, hypothesis fuzzing (the server keeps answering
and leaks no fd), the socket file's life, the client and the CLI.

The server runs as the daemon will run it: its epoll fd registered in an
outer epoll, ``handle()`` when that is readable and ``tick()`` once
``next_deadline()`` has passed, here in a background thread. Every wait is
bounded; sockets live in a short directory under /tmp (sun_path holds 107
bytes), removed afterwards.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from oomwarden import cli
from oomwarden.control import (
    ERROR_CODES,
    MAX_PID,
    OPS,
    ControlServer,
    Explain,
    Limits,
    Peer,
    RequestError,
    VictimAdd,
    VictimRemove,
    authorise_op,
    call,
    check_explain_policy,
    check_queue_cgroup,
    check_queue_process,
    check_queue_share,
    check_remove,
    decode_line,
    request,
    validate_request,
)
from oomwarden.errors import ControlError

from conftest import need

SRC = str(Path(__file__).resolve().parent.parent / "src")
NOBODY = 65534
#: A uid with no process of the test's and no passwd entry: "another user".
OTHER_UID = 4242
WAIT_S = 5.0
#: Limits that never rate-limit: for tests about something else.
FAST = Limits(rate_per_s=1e6, rate_burst=1_000_000)


# -- the fake handler -----------------------------------------------------------------------------


def real_uid(pid: int) -> tuple[int, str]:
    """The real uid and the state letter of a process, from /proc."""
    uid, state = None, "?"
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            uid = int(line.split()[1])
        elif line.startswith("State:"):
            state = line.split()[1]
    assert uid is not None
    return uid, state


class FakeHandler:
    """Queues in a list, never kills anything. Applies the authorisation
    rules of oomwarden.control the way the daemon does: the process's real
    uid from /proc, the "cgroup" directory's owner (any directory here)."""

    STATUS_SHAPE: dict[str, Any] = {  # noqa: RUF012
        "version": "0.1.0", "pid": 1, "started_ns": 1_700_000_000_000_000_000,
        "dry_run": True, "config": "/etc/oomwarden/oomwarden.toml",
        "watches": [{"domain": "cgroup:/app", "hierarchy": "v1", "triggers": ["oom"],
                     "policy": "growth", "victim": "process", "dry_run": False}],
        "queue_limit": 1024,
        "last_decisions": [{"time_ns": 1_700_000_000_000_000_000, "domain": "cgroup:/app",
                            "trigger": "oom", "policy": "queue",
                            "victim": {"pid": 4242, "comm": "leaker", "cgroup": "/app"},
                            "queue_entry": 1, "dry_run": False}],
        "kernel_kills": {"cgroup:/app": 2},
    }

    def __init__(self) -> None:
        self.entries: list[dict[str, Any]] = []
        self.next_id = 1
        self.cap = 8
        self.calls: list[tuple[str, Peer]] = []
        self.boom: str | None = None
        self.bodies: dict[str, object] = {}
        self.reload_outcome = "ok"
        self.padding = 0
        self.status_extra: dict[str, Any] = {}

    def _enter(self, op: str, peer: Peer) -> object | None:
        self.calls.append((op, peer))
        if self.boom == op:
            raise RuntimeError(f"boom in {op}")
        return self.bodies.get(op)

    def victim_add(self, request: VictimAdd, peer: Peer) -> dict[str, Any]:
        if (body := self._enter("victim.add", peer)) is not None:
            return body  # type: ignore[return-value]
        if len(self.entries) >= self.cap:
            raise RequestError("queue_full", f"the queue holds {self.cap} entries already")
        check_queue_share(peer, sum(e["by_uid"] == peer.uid for e in self.entries), cap=4)
        entry: dict[str, Any] = {"id": self.next_id, "domain": request.domain or "system",
                                 "added_ns": time.time_ns(), "by_uid": peer.uid}
        if request.pid is not None:
            try:
                uid, state = real_uid(request.pid)
            except FileNotFoundError:
                raise RequestError("not_found", f"no process {request.pid}") from None
            if state in ("Z", "X"):
                raise RequestError("gone", f"pid {request.pid} exited")
            check_queue_process(peer, request.pid, uid)
            if any(e.get("pid") == request.pid for e in self.entries):
                raise RequestError("duplicate", f"pid {request.pid} is queued already")
            entry.update(kind="process", pid=request.pid, uid=uid, comm="fake")
        else:
            assert request.cgroup is not None
            try:
                owner = os.stat(request.cgroup).st_uid
            except OSError:
                raise RequestError("not_found", f"no cgroup {request.cgroup}") from None
            check_queue_cgroup(peer, request.cgroup, owner)
            entry.update(kind="cgroup", cgroup=request.cgroup, inode=1)
        self.next_id += 1
        self.entries.append(entry)
        return {"entry": entry}

    def victim_list(self, peer: Peer) -> dict[str, Any]:
        if (body := self._enter("victim.list", peer)) is not None:
            return body  # type: ignore[return-value]
        return {"entries": list(self.entries)}

    def victim_remove(self, request: VictimRemove, peer: Peer) -> dict[str, Any]:
        if (body := self._enter("victim.remove", peer)) is not None:
            return body  # type: ignore[return-value]
        for e in self.entries:
            if e["id"] == request.entry:
                check_remove(peer, request.entry, e["by_uid"])
                self.entries.remove(e)
                return {"removed": e}
        raise RequestError("not_found", f"no queue entry {request.entry}")

    def status(self, peer: Peer) -> dict[str, Any]:
        if (body := self._enter("status", peer)) is not None:
            return body  # type: ignore[return-value]
        sizes: dict[str, int] = {}
        for e in self.entries:
            sizes[e["domain"]] = sizes.get(e["domain"], 0) + 1
        out = {**self.STATUS_SHAPE, "queues": sizes,
               "peer": {"pid": peer.pid, "uid": peer.uid, "gid": peer.gid},
               **self.status_extra}
        if self.padding:
            out["padding"] = "x" * self.padding
        return out

    def explain(self, request: Explain, peer: Peer) -> dict[str, Any]:
        if (body := self._enter("explain", peer)) is not None:
            return body  # type: ignore[return-value]
        check_explain_policy(request.policy, {"kernel", "growth"})
        if request.cgroup is not None and not os.path.isdir(request.cgroup):
            raise RequestError("not_found", f"no cgroup {request.cgroup}")
        return {"decision": {"domain": request.cgroup or "system", "policy": request.policy,
                             "top": request.top, "victim": None, "candidates": []}}

    def reload(self, peer: Peer) -> dict[str, Any]:
        if (body := self._enter("reload", peer)) is not None:
            return body  # type: ignore[return-value]
        if self.reload_outcome == "bad_config":
            raise RequestError("bad_config", "oomwarden.toml:3: budget_ms: 0 is outside 1..60000")
        if self.reload_outcome == "unavailable":
            raise RequestError("unavailable", "the warden runs without a config file")
        return {"config": "/etc/oomwarden/oomwarden.toml", "watches": 1}


# -- the server, served as the daemon will serve it -----------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Serving:
    """A ControlServer in a background thread: its fd in an outer epoll,
    handle() when readable, tick() when next_deadline() is past."""

    def __init__(self, path: str, handler: FakeHandler | None = None, *,
                 limits: Limits | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.path = path
        self.handler = handler if handler is not None else FakeHandler()
        self.logs: list[str] = []
        self.clock = clock
        self.server = ControlServer(path, self.handler, clock=clock,
                                    limits=limits if limits is not None else FAST,
                                    log=self.logs.append)
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        ep = select.epoll()
        try:
            ep.register(self.server.fileno(), select.EPOLLIN)
            ep.register(self._stop_r, select.EPOLLIN)
            while True:
                deadline = self.server.next_deadline()
                timeout = 0.2 if deadline is None else min(0.2, deadline - self.clock())
                ready = ep.poll(max(0.0, timeout))
                if any(fd == self._stop_r for fd, _ in ready):
                    return
                if ready:
                    self.server.handle(0.02)
                deadline = self.server.next_deadline()
                if deadline is not None and self.clock() >= deadline:
                    self.server.tick()
        except BaseException as e:
            self.error = e
        finally:
            ep.close()

    def stop(self) -> None:
        if self._stop_w < 0:
            return
        os.write(self._stop_w, b"x")
        self.thread.join(WAIT_S)
        alive = self.thread.is_alive()
        if not alive:
            self.server.close()
        os.close(self._stop_r)
        os.close(self._stop_w)
        self._stop_w = -1
        assert not alive, "the server thread did not stop"
        if self.error is not None:
            raise self.error

    def __enter__(self) -> Serving:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def wait_clients(self, n: int) -> None:
        wait_until(lambda: self.server.clients == n, f"{n} clients connected")

    def settle(self) -> None:
        """Every connection made so far accepted (the backlog is FIFO: a
        round trip behind them) and closed by the server."""
        assert ask(self.path, {"op": "status"})["ok"]
        self.wait_clients(0)

    def logged(self, needle: str) -> bool:
        return any(needle in line for line in list(self.logs))


def wait_until(cond: Callable[[], bool], what: str, timeout: float = WAIT_S) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, f"not within {timeout} s: {what}"
        time.sleep(0.01)


@pytest.fixture
def serving(sockdir: Path) -> Iterator[Serving]:
    with Serving(str(sockdir / "ctl.sock")) as s:
        yield s


def connect(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(WAIT_S)
    sock.connect(path)
    return sock


def read_lines(sock: socket.socket, n: int | None = None) -> tuple[list[dict[str, Any]], bool]:
    """Up to n response lines (None: until EOF) and whether EOF (or a reset)
    came; bounded by the socket's timeout."""
    buf = b""
    out: list[dict[str, Any]] = []
    while n is None or len(out) < n:
        while b"\n" in buf and (n is None or len(out) < n):
            line, buf = buf.split(b"\n", 1)
            out.append(json.loads(line))
        if n is not None and len(out) >= n:
            break
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return out, True
        if not chunk:
            assert not buf, f"an unterminated response: {buf[:80]!r}"
            return out, True
        buf += chunk
    return out, False


def ask(path: str, obj: dict[str, Any]) -> dict[str, Any]:
    return request(path, obj, timeout_s=WAIT_S)


def code(response: dict[str, Any]) -> str | None:
    assert isinstance(response["ok"], bool)
    if response["ok"]:
        return None
    error = response["error"]
    assert set(error) == {"code", "message"}
    assert error["code"] in ERROR_CODES
    assert "\n" not in error["message"] and error["message"].isprintable()
    return str(error["code"])


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def fd_table() -> dict[str, str]:
    out = {}
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            out[fd] = os.readlink(f"/proc/self/fd/{fd}")
    return out


@contextlib.contextmanager
def sleeper(uid: int | None = None) -> Iterator[subprocess.Popen[bytes]]:
    """A process to queue (never signalled by the server: the handler is fake)."""
    kwargs: dict[str, Any] = {}
    if uid is not None:
        kwargs = {"user": uid, "group": uid, "extra_groups": []}
    proc = subprocess.Popen(["sleep", "60"], **kwargs)
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait(WAIT_S)


# -- every op round-trips -------------------------------------------------------------------------


def test_every_op_round_trips(serving: Serving) -> None:
    path = serving.path
    with sleeper() as proc:
        added = ask(path, {"op": "victim.add", "pid": proc.pid, "domain": "system", "id": 7})
        assert added["ok"] is True and added["id"] == 7
        entry = added["entry"]
        assert entry["pid"] == proc.pid and entry["domain"] == "system"
        listed = ask(path, {"op": "victim.list", "id": "list-1"})
        assert listed["id"] == "list-1" and [e["id"] for e in listed["entries"]] == [entry["id"]]
        removed = ask(path, {"op": "victim.remove", "entry": entry["id"]})
        assert removed["ok"] and removed["removed"]["id"] == entry["id"] and "id" not in removed
    cg = ask(path, {"op": "victim.add", "cgroup": str(Path(path).parent)})
    assert cg["ok"] and cg["entry"]["kind"] == "cgroup"
    status = ask(path, {"op": "status"})
    assert status["ok"] and status["watches"][0]["domain"] == "cgroup:/app"
    assert status["queues"] == {"system": 1}
    assert status["peer"] == {"pid": os.getpid(), "uid": os.getuid(), "gid": os.getgid()}
    explained = ask(path, {"op": "explain", "policy": "growth", "top": 3})
    assert explained["decision"] == {"domain": "system", "policy": "growth", "top": 3,
                                     "victim": None, "candidates": []}
    default = ask(path, {"op": "explain"})["decision"]
    assert (default["policy"], default["top"]) == ("kernel", 10)
    assert ask(path, {"op": "reload"}) == {"ok": True, "config": "/etc/oomwarden/oomwarden.toml",
                                           "watches": 1}
    assert [op for op, _ in serving.handler.calls] == [
        "victim.add", "victim.list", "victim.remove", "victim.add", "status", "explain",
        "explain", "reload"]
    assert all(p == Peer(os.getpid(), os.getuid(), os.getgid())
               for _, p in serving.handler.calls)


def test_pipelined_requests_are_answered_in_order(serving: Serving) -> None:
    with connect(serving.path) as sock:
        sock.sendall(b"".join(json.dumps({"op": "status", "id": i}).encode() + b"\n"
                              for i in range(50)))
        responses, _ = read_lines(sock, 50)
    assert [r["id"] for r in responses] == list(range(50))


def test_call_returns_the_body_and_raises_the_refusal(serving: Serving) -> None:
    body = call(serving.path, {"op": "status", "id": 3})
    assert "ok" not in body and "id" not in body and body["version"] == "0.1.0"
    with pytest.raises(RequestError) as e:
        call(serving.path, {"op": "victim.remove", "entry": 99})
    assert e.value.code == "not_found" and str(e.value) == "no queue entry 99 (not_found)"


# -- every error code -----------------------------------------------------------------------------


def _one(serving: Serving, line: bytes) -> dict[str, Any]:
    with connect(serving.path) as sock:
        sock.sendall(line)
        (response,), _ = read_lines(sock, 1)
    return response


def _code_bad_json(s: Serving) -> dict[str, Any]:
    return _one(s, b'{"op": "status",\n')


def _code_bad_request(s: Serving) -> dict[str, Any]:
    return _one(s, b'["status"]\n')


def _code_too_long(s: Serving) -> dict[str, Any]:
    return _one(s, b"x" * (FAST.max_line_bytes + 10))


def _code_unknown_op(s: Serving) -> dict[str, Any]:
    return ask(s.path, {"op": "victim.ad"})


def _code_unknown_field(s: Serving) -> dict[str, Any]:
    return ask(s.path, {"op": "status", "verbose": True})


def _code_bad_field(s: Serving) -> dict[str, Any]:
    return ask(s.path, {"op": "victim.add", "pid": "1"})


def _code_forbidden(s: Serving) -> dict[str, Any]:
    return ask(s.path, {"op": "explain", "policy": "/tmp/evil.py"})


def _code_rate_limited(s: Serving) -> dict[str, Any]:
    with Serving(s.path + ".r", limits=Limits(rate_per_s=0.001, rate_burst=1)) as other:
        ask(other.path, {"op": "status"})
        return ask(other.path, {"op": "status"})


def _code_too_many_clients(s: Serving) -> dict[str, Any]:
    with Serving(s.path + ".c", limits=Limits(max_clients=1)) as other, \
            connect(other.path) as first:
        other.wait_clients(1)
        del first
        return ask(other.path, {"op": "status"})


def _code_queue_full(s: Serving) -> dict[str, Any]:
    s.handler.cap = 0
    return ask(s.path, {"op": "victim.add", "pid": os.getpid()})


def _code_duplicate(s: Serving) -> dict[str, Any]:
    assert ask(s.path, {"op": "victim.add", "pid": os.getpid()})["ok"]
    return ask(s.path, {"op": "victim.add", "pid": os.getpid()})


def _code_not_found(s: Serving) -> dict[str, Any]:
    return ask(s.path, {"op": "victim.remove", "entry": 12345})


def _code_gone(s: Serving) -> dict[str, Any]:
    zombie = subprocess.Popen(["true"])
    try:
        wait_until(lambda: real_uid(zombie.pid)[1] == "Z", "the child is a zombie")
        return ask(s.path, {"op": "victim.add", "pid": zombie.pid})
    finally:
        zombie.wait(WAIT_S)


def _code_bad_config(s: Serving) -> dict[str, Any]:
    s.handler.reload_outcome = "bad_config"
    return ask(s.path, {"op": "reload"})


def _code_unavailable(s: Serving) -> dict[str, Any]:
    s.handler.reload_outcome = "unavailable"
    return ask(s.path, {"op": "reload"})


def _code_internal(s: Serving) -> dict[str, Any]:
    s.handler.boom = "status"
    return ask(s.path, {"op": "status", "id": "x"})


SCENARIOS: dict[str, Callable[[Serving], dict[str, Any]]] = {
    name.removeprefix("_code_"): fn for name, fn in list(globals().items())
    if name.startswith("_code_")
}


def test_every_error_code_has_a_scenario() -> None:
    assert sorted(SCENARIOS) == sorted(ERROR_CODES)


@pytest.mark.parametrize("expected", ERROR_CODES)
def test_every_error_code_is_reachable(serving: Serving, expected: str) -> None:
    response = SCENARIOS[expected](serving)
    assert code(response) == expected, response
    assert serving.logged("refused: ") or serving.logged("internal error") or \
        expected in ("rate_limited", "too_many_clients")
    assert ask(serving.path, {"op": "victim.list"})["ok"]  # still serving


def test_internal_errors_hide_details_and_log_them(serving: Serving) -> None:
    serving.handler.boom = "victim.list"
    response = ask(serving.path, {"op": "victim.list", "id": 5})
    assert response == {"ok": False, "id": 5, "error": {
        "code": "internal", "message": "internal error in the warden (logged)"}}
    assert serving.logged("victim.list: internal error in the handler: RuntimeError: boom")


@pytest.mark.parametrize(("body", "needle"), [
    ([1, 2], "not an object"),
    ({"ok": False}, "reserved key 'ok'"),
    ({"error": 1}, "reserved key 'error'"),
    ({"x": object()}, "not JSON"),
    ({"x": float("nan")}, "not JSON"),
    ({1: "x"}, "string keys"),
    ({"x": "y" * (2 << 20)}, "is longer than"),
])
def test_a_bad_response_body_is_internal(serving: Serving, body: object, needle: str) -> None:
    serving.handler.bodies["status"] = body
    response = ask(serving.path, {"op": "status"})
    assert code(response) == "internal" and needle in response["error"]["message"]
    assert serving.logged(needle)


# -- validation (pure) ----------------------------------------------------------------------------


@pytest.mark.parametrize(("obj", "expected", "needle"), [
    (None, "bad_request", "got null"),
    ("status", "bad_request", "got a string"),
    ({}, "bad_field", "op: missing"),
    ({"op": 1}, "bad_field", "op: expected a string"),
    ({"op": "stats"}, "unknown_op", "did you mean 'status'"),
    ({"op": "status", "id": 1.5}, "bad_field", "id:"),
    ({"op": "status", "id": 2**60}, "bad_field", "id:"),
    ({"op": "status", "id": "x" * 257}, "bad_field", "id:"),
    ({"op": "status", "id": [1]}, "bad_field", "id:"),
    ({"op": "reload", "force": True}, "unknown_field", "it takes no fields"),
    ({"op": "victim.add"}, "bad_field", "exactly one of pid and cgroup"),
    ({"op": "victim.add", "pid": 1, "cgroup": "/a"}, "bad_field", "exactly one"),
    ({"op": "victim.add", "pid": True}, "bad_field", "pid: expected an integer, got a boolean"),
    ({"op": "victim.add", "pid": 1.0}, "bad_field", "pid: expected an integer"),
    ({"op": "victim.add", "pid": 0}, "bad_field", f"0 is outside 1..{MAX_PID}"),
    ({"op": "victim.add", "pid": MAX_PID + 1}, "bad_field", "outside"),
    ({"op": "victim.add", "pid": 10**100}, "bad_field", "a huge integer is outside"),
    ({"op": "victim.add", "cgroup": ""}, "bad_field", "cgroup: empty"),
    ({"op": "victim.add", "cgroup": "/a\x00b"}, "bad_field", "non-printable"),
    ({"op": "victim.add", "cgroup": "/a\nb"}, "bad_field", "non-printable"),
    ({"op": "victim.add", "cgroup": "/\ud800"}, "bad_field", "non-printable"),
    ({"op": "victim.add", "cgroup": "/" + "a" * 4096}, "bad_field", "longer than 4096"),
    ({"op": "victim.add", "pid": 5, "domain": "cgroup:"}, "bad_field", "neither"),
    ({"op": "victim.add", "pid": 5, "domain": "cgroup:/"}, "bad_field", "neither"),
    ({"op": "victim.add", "pid": 5, "domain": "cgroup:/a/"}, "bad_field", "neither"),
    ({"op": "victim.add", "pid": 5, "domain": "cgroup:/a/../b"}, "bad_field", "neither"),
    ({"op": "victim.add", "pid": 5, "domain": "/a"}, "bad_field", "neither"),
    ({"op": "victim.add", "pid": 5, "domain": 3}, "bad_field", "domain: expected a string"),
    ({"op": "victim.add", "pid": 5, "id": 1, "x": 1, "y": 2, "z": 3, "w": 4}, "unknown_field",
     "and 1 more"),
    ({"op": "victim.remove"}, "bad_field", "entry: missing"),
    ({"op": "victim.remove", "id": 3}, "bad_field", "entry: missing"),
    ({"op": "victim.remove", "entry": 3, "pid": 1}, "unknown_field",
     "\"id\" is the request's own"),
    ({"op": "victim.remove", "entry": -1}, "bad_field", "outside"),
    ({"op": "explain", "top": 0}, "bad_field", "top: 0 is outside 1..100"),
    ({"op": "explain", "top": 101}, "bad_field", "outside"),
    ({"op": "explain", "policy": None}, "bad_field", "policy: expected a string, got null"),
    ({"op": "explain", "all": True}, "unknown_field", "cgroup, policy, top"),
])
def test_validation(obj: object, expected: str, needle: str) -> None:
    with pytest.raises(RequestError) as e:
        validate_request(obj)
    assert e.value.code == expected
    assert needle in e.value.message, e.value.message
    assert "\n" not in e.value.message


def test_validation_accepts() -> None:
    r = validate_request({"op": "victim.add", "pid": 42, "domain": "cgroup:/a/b", "id": "c"})
    assert (r.op, r.body, r.tag) == ("victim.add", VictimAdd(pid=42, domain="cgroup:/a/b"), "c")
    r = validate_request({"op": "victim.add", "cgroup": "v1:/a b", "domain": "system"})
    assert r.body == VictimAdd(cgroup="v1:/a b", domain="system")
    assert validate_request({"op": "victim.remove", "entry": 3}).body == VictimRemove(3)
    assert validate_request({"op": "explain", "cgroup": "/a"}).body == Explain(cgroup="/a")
    for op in ("victim.list", "status", "reload"):
        assert validate_request({"op": op, "id": -5}).tag == -5


@pytest.mark.parametrize(("line", "needle"), [
    (b"\xff\xfe", "not UTF-8"),
    (b"", "empty line"),
    (b"   ", "empty line"),
    (b'{"op": NaN}', "NaN is not JSON"),
    (b'{"op": Infinity}', "Infinity is not JSON"),
    (b'{"top": 1e999}', "out of range"),
    (b'{"op": "status", "op": "reload"}', "duplicate key 'op'"),
    (b"[" * 50_000 + b"]" * 50_000, "nested too deep"),
    (b"1" * 5000, "digits"),
    (b'{"op": "status"} x', "Extra data"),
])
def test_decode_refuses(line: bytes, needle: str) -> None:
    with pytest.raises(RequestError) as e:
        decode_line(line)
    assert e.value.code == "bad_json" and needle in e.value.message, e.value.message


# -- authorisation (pure rules) -------------------------------------------------------------------


ROOT = Peer(100, 0, 0)
USER = Peer(200, 1000, 1000)


def test_authorisation_rules() -> None:
    for op in OPS:
        authorise_op(op, ROOT, read_only_for_all=False)
    for op in ("status", "victim.list", "explain", "victim.add", "victim.remove"):
        authorise_op(op, USER)
    with pytest.raises(RequestError, match=r"reload is for root only \(uid 1000 asked\)"):
        authorise_op("reload", USER)
    with pytest.raises(RequestError, match="status is for root only on this warden"):
        authorise_op("status", USER, read_only_for_all=False)
    authorise_op("victim.add", USER, read_only_for_all=False)  # target checks decide
    check_queue_process(ROOT, 1, 0)
    check_queue_process(USER, 5, 1000)
    with pytest.raises(RequestError, match="uid 1000 may not queue pid 1: it runs as uid 0"):
        check_queue_process(USER, 1, 0)
    check_queue_cgroup(ROOT, "/a", 1000)
    check_queue_cgroup(USER, "/u", 1000)
    with pytest.raises(RequestError, match="owned by uid 0"):
        check_queue_cgroup(USER, "/a", 0)
    check_remove(ROOT, 3, 1000)
    check_remove(USER, 3, 1000)
    with pytest.raises(RequestError, match="uid 0 queued it"):
        check_remove(USER, 3, 0)
    check_queue_share(ROOT, 10_000)
    check_queue_share(USER, 63)
    with pytest.raises(RequestError, match="holds 64 queue entries") as e:
        check_queue_share(USER, 64)
    assert e.value.code == "queue_full"
    check_explain_policy("growth", {"kernel", "growth"})
    with pytest.raises(RequestError, match="a policy file runs code") as e:
        check_explain_policy("/tmp/x.py", {"kernel"})
    assert e.value.code == "forbidden"


# -- SO_PEERCRED: a child that drops to nobody ----------------------------------------------------


CHILD = r"""
import json, os, sys
from oomwarden.control import ControlError, request
path, plan = sys.argv[1], json.loads(sys.argv[2])
out = []
for req in plan:
    req = {k: (os.getpid() if v == "$self" else v) for k, v in req.items()}
    try:
        out.append(request(path, req, timeout_s=5.0))
    except ControlError as e:
        out.append({"client_error": str(e)})
print(json.dumps({"pid": os.getpid(), "uid": os.getuid(), "responses": out}))
"""

HOLD = r"""
import json, socket, sys
path, n = sys.argv[1], int(sys.argv[2])
socks = []
for _ in range(n):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(path)
    socks.append(s)
s = socks[-1]
try:
    s.sendall(b'{"op": "status"}\n')
except OSError:
    pass  # refused and closed already: its one line is there to read
print(s.recv(65536).decode().strip())
"""


def _as(uid: int) -> dict[str, Any]:
    return {"user": uid, "group": uid, "extra_groups": [],
            "env": {"PYTHONPATH": SRC, "PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8"}}


@functools.cache
def _nobody_python() -> str | None:
    """An interpreter nobody may run (the venv's may live under /root)."""
    for exe in dict.fromkeys([sys.executable, os.path.realpath(sys.executable),
                              "/usr/bin/python3"]):
        try:
            probe = subprocess.run(
                [exe, "-c", "import sys, oomwarden.control; assert sys.version_info >= (3, 11)"],
                capture_output=True, timeout=30, check=False, **_as(NOBODY))
        except OSError:
            continue
        if probe.returncode == 0:
            return exe
    return None


def as_nobody(script: str, *args: str) -> str:
    need(os.geteuid() == 0, "dropping to nobody needs root")
    exe = _nobody_python()
    need(exe is not None, "no Python 3.11 interpreter that nobody may run")
    assert exe is not None
    done = subprocess.run([exe, "-c", script, *args], capture_output=True, text=True,
                          timeout=60, check=False, **_as(NOBODY))
    assert done.returncode == 0, done.stderr
    return str(done.stdout)


def nobody_asks(path: str, plan: list[dict[str, Any]]) -> dict[str, Any]:
    out = json.loads(as_nobody(CHILD, path, json.dumps(plan)))
    assert out["uid"] == NOBODY
    return out  # type: ignore[no-any-return]


def test_peercred_authorisation_as_nobody(serving: Serving, sockdir: Path) -> None:
    mine = sockdir / "nobodys"
    mine.mkdir()
    os.chown(mine, NOBODY, NOBODY)
    roots = sockdir / "roots"
    roots.mkdir()
    with sleeper() as root_proc, sleeper(OTHER_UID) as other_proc, sleeper(NOBODY) as own:
        root_entry = ask(serving.path, {"op": "victim.add", "pid": root_proc.pid})["entry"]
        out = nobody_asks(serving.path, [
            {"op": "reload"},
            {"op": "victim.add", "pid": 1},
            {"op": "victim.add", "pid": root_proc.pid},
            {"op": "victim.add", "pid": other_proc.pid},
            {"op": "victim.add", "cgroup": str(roots)},
            {"op": "victim.remove", "entry": root_entry["id"]},
            {"op": "victim.add", "pid": own.pid},
            {"op": "victim.add", "pid": "$self"},
            {"op": "victim.add", "cgroup": str(mine)},
            {"op": "status"},
            {"op": "victim.list"},
            {"op": "explain", "top": 1},
        ])
        r = out["responses"]
        assert [code(x) for x in r[:6]] == ["forbidden"] * 6, r
        assert "reload is for root only (uid 65534 asked)" in r[0]["error"]["message"]
        assert "uid 65534 may not queue pid 1: it runs as uid 0" in r[1]["error"]["message"]
        assert f"pid {other_proc.pid}: it runs as uid {OTHER_UID}" in r[3]["error"]["message"]
        assert "directory is owned by uid 0" in r[4]["error"]["message"]
        assert "uid 0 queued it" in r[5]["error"]["message"]
        assert [code(x) for x in r[6:]] == [None] * 6, r[6:]
        assert r[6]["entry"]["pid"] == own.pid and r[6]["entry"]["by_uid"] == NOBODY
        assert r[7]["entry"]["pid"] == out["pid"]
        assert r[8]["entry"]["cgroup"] == str(mine)
        # SO_PEERCRED saw the child, not whoever it claims to be
        assert r[9]["peer"] == {"pid": out["pid"], "uid": NOBODY, "gid": NOBODY}
        assert len(r[10]["entries"]) == 4
        own_entry = r[6]["entry"]["id"]
        again = nobody_asks(serving.path, [{"op": "victim.remove", "entry": own_entry}])
        assert again["responses"][0]["removed"]["id"] == own_entry
    refusals = [line for line in serving.logs if "refused: forbidden" in line]
    assert len(refusals) == 6 and all("pid " in line and "(uid 65534)" in line
                                      for line in refusals), refusals


def test_read_only_ops_can_be_root_only(sockdir: Path) -> None:
    with Serving(str(sockdir / "c.sock"), limits=Limits(read_only_for_all=False)) as s:
        out = nobody_asks(s.path, [{"op": "status"}, {"op": "victim.list"},
                                   {"op": "explain"}])
        assert [code(x) for x in out["responses"]] == ["forbidden"] * 3
        assert "read-only requests are not open to all users" in \
            out["responses"][0]["error"]["message"]
        assert ask(s.path, {"op": "status"})["ok"]  # root still may


def test_connections_per_uid_capped_root_exempt(sockdir: Path) -> None:
    limits = Limits(max_clients_per_uid=2)
    with Serving(str(sockdir / "c.sock"), limits=limits) as s:
        third = json.loads(as_nobody(HOLD, s.path, "3"))
        assert code(third) == "too_many_clients"
        assert "uid 65534 has 2 connections already" in third["error"]["message"]
        socks = [connect(s.path) for _ in range(4)]  # root: not capped per uid
        try:
            for sock in socks:
                sock.sendall(b'{"op":"status"}\n')
                assert read_lines(sock, 1)[0][0]["ok"]
        finally:
            for sock in socks:
                sock.close()


# -- hostile clients ------------------------------------------------------------------------------


def test_over_long_line_is_refused_and_closed(serving: Serving) -> None:
    with connect(serving.path) as sock:
        sock.sendall(b'{"op": "status", "pad": "' + b"x" * 70_000)
        responses, eof = read_lines(sock)
    assert [code(r) for r in responses] == ["too_long"] and eof
    with connect(serving.path) as sock:  # a long line with its newline, in one piece
        sock.sendall(b"y" * (FAST.max_line_bytes + 1) + b'\n{"op": "status"}\n')
        responses, eof = read_lines(sock)
    assert [code(r) for r in responses] == ["too_long"] and eof
    serving.wait_clients(0)
    assert serving.logged("too_long: a request line is 65536 bytes at most")
    assert ask(serving.path, {"op": "status"})["ok"]


def test_a_line_of_exactly_the_limit_is_read(serving: Serving) -> None:
    line = b'{"op": "status", "id": "' + b"x" * 10 + b'"}'
    line = line.replace(b"{", b"{" + b" " * (FAST.max_line_bytes - len(line)), 1)
    assert len(line) == FAST.max_line_bytes
    assert code(_one(serving, line + b"\n")) is None


def test_bad_json_and_garbage_keep_the_connection(serving: Serving) -> None:
    with connect(serving.path) as sock:
        sock.sendall(b'{"op":\n\x00\xff\xfe garbage \x1b[2J\n[]\n\n42\n'
                     b'{"op": "status", "id": 1}\r\n')
        responses, _ = read_lines(sock, 6)
    assert [code(r) for r in responses] == ["bad_json", "bad_json", "bad_request", "bad_json",
                                            "bad_request", None]
    assert responses[-1]["id"] == 1


def test_half_a_line_then_disconnect(serving: Serving) -> None:
    with connect(serving.path) as sock:
        sock.sendall(b'{"op": "status"}\n{"op": "vic')
        (first,), _ = read_lines(sock, 1)
    assert first["ok"]
    serving.settle()
    wait_until(lambda: serving.logged("disconnected in the middle of a request (11 bytes"),
               "the partial request logged")
    assert ask(serving.path, {"op": "status"})["ok"]


def test_half_close_gets_every_answer(serving: Serving) -> None:
    with connect(serving.path) as sock:
        sock.sendall(b'{"op": "status", "id": 1}\n{"op": "victim.list", "id": 2}\n')
        sock.shutdown(socket.SHUT_WR)
        responses, eof = read_lines(sock)
    assert [r["id"] for r in responses] == [1, 2] and eof


def test_idle_clients_are_closed(sockdir: Path) -> None:
    limits = Limits(idle_timeout_s=0.3)
    with Serving(str(sockdir / "c.sock"), limits=limits) as s:
        silent = connect(s.path)
        drip = connect(s.path)
        drip.sendall(b'{"op": "sta')
        start = time.monotonic()
        with silent, drip:
            assert read_lines(silent) == ([], True)
            assert read_lines(drip) == ([], True)
        assert time.monotonic() - start < 3.0
        s.wait_clients(0)
        assert s.logged("idle for 0.3 s (nothing sent): connection closed")
        assert s.logged("idle for 0.3 s (an unfinished request (11 bytes without a newline))")
        assert ask(s.path, {"op": "status"})["ok"]


def test_a_flood_is_rate_limited_per_uid(sockdir: Path) -> None:
    clock = FakeClock()  # frozen: no token comes back unless the test says so
    limits = Limits(rate_per_s=5, rate_burst=10)
    with Serving(str(sockdir / "c.sock"), limits=limits, clock=clock) as s:
        with connect(s.path) as flood:
            flood.sendall(b'{"op": "status"}\n' * 25)
            responses, eof = read_lines(flood)
        codes = [code(r) for r in responses]
        # the burst, then refusals; refused burst times in a row: closed
        assert codes == [None] * 10 + ["rate_limited"] * 10 and eof
        assert "over 5 requests per second (burst 10)" in responses[-1]["error"]["message"]
        assert s.logged("10 requests in a row over the rate: connection closed")
        # the bucket is the uid's, not the connection's
        assert code(ask(s.path, {"op": "status"})) == "rate_limited"

        def refusals() -> int:
            return sum("refused: rate_limited" in line for line in s.logs)

        # ten refusals logged in full, the eleventh folded until the second is over
        assert refusals() == 10
        clock.now += 1.0  # five more tokens, and the log's interval over
        wait_until(lambda: refusals() == 11, "the folded refusal told")
        with connect(s.path) as sock:
            sock.sendall(b'{"op": "status"}\n' * 6)
            responses, _ = read_lines(sock, 6)
        assert [code(r) for r in responses] == [None] * 5 + ["rate_limited"]


def test_the_connection_cap(sockdir: Path) -> None:
    with Serving(str(sockdir / "c.sock"), limits=Limits(max_clients=3)) as s:
        held = [connect(s.path) for _ in range(3)]
        try:
            s.wait_clients(3)
            with connect(s.path) as extra:
                responses, eof = read_lines(extra)
            assert [code(r) for r in responses] == ["too_many_clients"] and eof
            assert "3 clients are connected, the most there may be" in \
                responses[0]["error"]["message"]
            held.pop().close()
            s.wait_clients(2)
            assert ask(s.path, {"op": "status"})["ok"]
        finally:
            for sock in held:
                sock.close()
        assert s.logged("connection refused: 3 clients are connected")


def test_a_client_that_never_reads_is_dropped(sockdir: Path) -> None:
    limits = Limits(rate_per_s=1e6, rate_burst=10**6, max_output_bytes=256 * 1024)
    with Serving(str(sockdir / "c.sock"), limits=limits) as s:
        s.handler.padding = 100_000
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.settimeout(WAIT_S)
        with sock:
            sock.connect(s.path)
            sock.sendall(b'{"op": "status"}\n' * 40)  # 4 MB of answers, never read
            wait_until(lambda: s.logged("bytes of responses unread, more than 262144"),
                       "the reader dropped")
        s.settle()


def test_unread_output_of_all_clients_is_capped(sockdir: Path) -> None:
    limits = Limits(rate_per_s=1e6, rate_burst=10**6, max_output_bytes=1 << 20,
                    max_total_output_bytes=600_000)
    with Serving(str(sockdir / "c.sock"), limits=limits) as s:
        s.handler.padding = 100_000
        socks = []
        try:
            for _ in range(4):
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                sock.settimeout(WAIT_S)
                sock.connect(s.path)
                sock.sendall(b'{"op": "status"}\n' * 8)
                socks.append(sock)
            wait_until(lambda: s.logged("the unread responses of all clients are"),
                       "the total cap")
        finally:
            for sock in socks:
                sock.close()
        s.settle()


def test_a_client_gone_before_its_answers(serving: Serving) -> None:
    """EPIPE / ECONNRESET on write: the client is dropped quietly."""
    serving.handler.padding = 50_000
    for _ in range(5):
        sock = connect(serving.path)
        sock.sendall(b'{"op": "status"}\n' * 20)
        sock.close()
    serving.settle()


def test_handle_is_bounded_and_leftovers_are_due_at_once(sockdir: Path) -> None:
    """Driven by hand, as the daemon's loop will: handle() serves at most
    max_requests_per_call; what is left makes next_deadline() now."""
    clock = FakeClock()
    limits = Limits(max_requests_per_call=2, rate_per_s=1e6, rate_burst=10**6,
                    idle_timeout_s=10)
    logs: list[str] = []
    with ControlServer(str(sockdir / "h.sock"), FakeHandler(), clock=clock, limits=limits,
                       log=logs.append) as server, connect(str(sockdir / "h.sock")) as sock:
        assert server.next_deadline() is None
        assert select.select([server.fileno()], [], [], WAIT_S)[0]
        server.handle(1.0)
        assert server.clients == 1 and server.next_deadline() == clock.now + 10
        sock.sendall(b'{"op": "status"}\n' * 5)
        assert select.select([server.fileno()], [], [], WAIT_S)[0]
        server.handle(1.0)
        assert len(read_lines(sock, 2)[0]) == 2
        assert server.next_deadline() == clock.now  # two served, three waiting
        server.tick()
        assert len(read_lines(sock, 2)[0]) == 2
        server.tick()
        assert len(read_lines(sock, 1)[0]) == 1
        assert server.next_deadline() == clock.now + 10
        clock.now += 10
        server.tick()
        assert server.clients == 0 and server.next_deadline() is None
        assert read_lines(sock) == ([], True)
    assert any("idle for 10 s" in line for line in logs)


class _NoFds:
    """A listener whose accept() fails once for want of fds (EMFILE)."""

    def __init__(self, real: socket.socket) -> None:
        self.real = real
        self.failed = False

    def accept(self) -> tuple[socket.socket, Any]:
        if not self.failed:
            self.failed = True
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
        return self.real.accept()

    def close(self) -> None:
        self.real.close()


def test_out_of_fds_rests_the_listener(sockdir: Path) -> None:
    clock = FakeClock()
    logs: list[str] = []
    path = str(sockdir / "m.sock")
    with ControlServer(path, FakeHandler(), clock=clock, limits=FAST,
                       log=logs.append) as server, connect(path):
        server._listener = _NoFds(server._listener)  # type: ignore[assignment]
        assert select.select([server.fileno()], [], [], WAIT_S)[0]
        server.handle()
        assert server.clients == 0
        assert logs == ["control: accept failed: Too many open files; pausing for 0.1 s"]
        assert server.next_deadline() == clock.now + 0.1
        # the listener is out of the epoll meanwhile: no busy loop on it
        assert not select.select([server.fileno()], [], [], 0.05)[0]
        clock.now += 0.1
        server.tick()
        assert select.select([server.fileno()], [], [], WAIT_S)[0]
        server.handle()
        assert server.clients == 1


# -- fuzzing --------------------------------------------------------------------------------------


_leaf = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats()
         | st.text(max_size=20))
_json = st.recursive(_leaf, lambda kids: st.lists(kids, max_size=4)
                     | st.dictionaries(st.text(max_size=8), kids, max_size=4), max_leaves=10)
_names = st.sampled_from(["op", "id", "pid", "cgroup", "domain", "entry", "policy", "top",
                          "all", ""]) | st.text(max_size=8)
_values = (st.sampled_from([0, 1, -1, 2, MAX_PID, MAX_PID + 1, 2**53, 2**63, True, None, "",
                            "system", "cgroup:/a", "cgroup:/", "/tmp", "kernel", "growth",
                            "/tmp/x.py", "\x00", "\u2028", "\ud800"])
           | st.sampled_from(OPS) | _json)
_requests = st.builds(lambda op, rest: {"op": op, **rest},
                      st.sampled_from(OPS) | st.text(max_size=12) | _json,
                      st.dictionaries(_names, _values, max_size=4))


def _dump(obj: object) -> bytes:
    return json.dumps(obj).encode("utf-8", "surrogatepass")


_lines = st.one_of(
    _requests.map(_dump),
    _json.map(_dump),
    st.binary(max_size=200).map(lambda b: b.replace(b"\n", b"")),
)
_plans = st.fixed_dictionaries({
    "lines": st.lists(_lines, max_size=8),
    "pieces": st.integers(1, 4),
    "end": st.sampled_from(["read", "read", "half", "close", "partial"]),
    "tail": st.binary(min_size=1, max_size=40).map(lambda b: b.replace(b"\n", b"")),
})


def _play(path: str, plans: list[dict[str, Any]]) -> int:
    """Run one example's connections side by side; check every answer;
    return the number of requests sent."""
    socks = [connect(path) for _ in plans]
    sent = 0
    try:
        for sock, plan in zip(socks, plans, strict=True):
            data = b"".join(line + b"\n" for line in plan["lines"])
            if plan["end"] == "partial":
                data += plan["tail"] or b"{"
            cut = max(1, len(data) // plan["pieces"])
            for i in range(0, len(data), cut):
                sock.sendall(data[i:i + cut])
            sent += len(plan["lines"]) + (plan["end"] == "partial")
        for sock, plan in zip(socks, plans, strict=True):
            n = len(plan["lines"])
            if plan["end"] == "close":
                sock.close()
                continue
            if plan["end"] == "half":
                sock.shutdown(socket.SHUT_WR)
                responses, eof = read_lines(sock)
                assert eof
            else:
                responses, _ = read_lines(sock, n)
            assert len(responses) == n, (plan, responses)
            for r in responses:
                code(r)  # ok or one of the codes, one line each
    finally:
        for sock in socks:
            sock.close()
    return sent


def test_fuzz_the_protocol(sockdir: Path, record_property: Callable[[str, object], None],
                           capsys: pytest.CaptureFixture[str]) -> None:
    fds_before_server = fd_count()
    counted = {"requests": 0, "connections": 0}
    with Serving(str(sockdir / "f.sock"), limits=FAST) as s:
        s.handler.cap = 10**9  # no queue_full: keep the fake queue growing
        s.settle()  # the serving thread's own epoll is open by now
        fds_before = fd_count()
        table_before = fd_table()

        @settings(max_examples=400, deadline=None, database=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
        @given(st.lists(_plans, min_size=1, max_size=4))
        def run(plans: list[dict[str, Any]]) -> None:
            counted["requests"] += _play(s.path, plans)
            counted["connections"] += len(plans)
            del s.handler.entries[:]

        run()
        s.settle()  # it still answers, and every client is gone
        fds_after = fd_count()
        table_after = fd_table()
    fds_after_server = fd_count()
    with capsys.disabled():
        print(f"\ncontrol fuzz: {counted['requests']} requests over "
              f"{counted['connections']} connections; fds with the server up "
              f"{fds_before} before, {fds_after} after; without it {fds_before_server} "
              f"before, {fds_after_server} after")
    record_property("requests_fuzzed", counted["requests"])
    record_property("fds", [fds_before, fds_after, fds_before_server, fds_after_server])
    assert counted["requests"] > 1000
    assert fds_after == fds_before, sorted(set(table_after.items()) - set(table_before.items()))
    assert fds_after_server == fds_before_server


# -- the socket file ------------------------------------------------------------------------------


def test_directory_and_modes(sockdir: Path) -> None:
    path = sockdir / "run" / "oomwarden" / "ctl.sock"
    old = os.umask(0o077)
    try:
        with Serving(str(path)):
            assert (path.parent.stat().st_mode & 0o777) == 0o755
            assert (path.parent.parent.stat().st_mode & 0o777) == 0o755
            assert (path.stat().st_mode & 0o777) == 0o666
            assert path.is_socket()
    finally:
        os.umask(old)
    assert not path.exists()  # close() unlinks what it made


def test_a_stale_socket_is_replaced(sockdir: Path) -> None:
    path = str(sockdir / "s.sock")
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(path)
    dead.close()  # the file stays, nobody listens
    with pytest.raises(ControlError, match="no daemon is listening on"):
        ask(path, {"op": "status"})
    with Serving(path) as s:
        assert s.logged(f"removed the stale socket {path}")
        assert ask(path, {"op": "status"})["ok"]


def test_a_live_socket_is_refused(serving: Serving) -> None:
    with pytest.raises(ControlError) as e:
        ControlServer(serving.path, FakeHandler(), log=lambda _line: None)
    message = str(e.value)
    assert "\n" not in message
    assert message == (f"control socket {serving.path}: another process is listening on it "
                       "(another `oomwarden run`?); stop it or set control_socket elsewhere")
    assert ask(serving.path, {"op": "status"})["ok"]  # the first one is untouched


def test_a_full_backlog_still_counts_as_live(sockdir: Path) -> None:
    path = str(sockdir / "b.sock")
    busy = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    busy.bind(path)
    busy.listen(0)
    waiting = []
    try:
        for _ in range(4):  # fill the backlog: a connect would now block (EAGAIN)
            w = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            w.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                w.connect(path)
            waiting.append(w)
        with pytest.raises(ControlError, match="another process is listening"):
            ControlServer(path, FakeHandler(), log=lambda _line: None)
    finally:
        for w in waiting:
            w.close()
        busy.close()


@pytest.mark.parametrize("kind", ["file", "dir", "symlink"])
def test_a_path_that_is_not_a_socket_is_refused(sockdir: Path, kind: str) -> None:
    path = sockdir / "x.sock"
    if kind == "file":
        path.write_text("keep me")
    elif kind == "dir":
        path.mkdir()
    else:
        path.symlink_to(sockdir / "elsewhere")
    with pytest.raises(ControlError, match=r"exists and is .*, not a socket") as e:
        ControlServer(str(path), FakeHandler(), log=lambda _line: None)
    assert "\n" not in str(e.value)
    assert path.exists() or path.is_symlink()
    if kind == "file":
        assert path.read_text() == "keep me"


def test_close_leaves_a_socket_it_did_not_make(sockdir: Path) -> None:
    path = str(sockdir / "r.sock")
    server = ControlServer(path, FakeHandler(), log=lambda _line: None)
    os.unlink(path)
    other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    other.bind(path)
    try:
        server.close()
        server.close()  # twice: no harm
        assert os.path.exists(path)
        assert server.fileno() == -1 and server.next_deadline() is None
        server.handle()
        server.tick()
    finally:
        other.close()


def test_a_socket_path_too_long(sockdir: Path) -> None:
    path = str(sockdir / ("x" * 120))
    with pytest.raises(ControlError, match="bytes long; a socket path has at most 107"):
        ControlServer(path, FakeHandler(), log=lambda _line: None)
    with pytest.raises(ControlError, match="control socket"):
        ask(path, {"op": "status"})


def test_limits_are_checked() -> None:
    with pytest.raises(ValueError, match="max_clients"):
        Limits(max_clients=0)
    with pytest.raises(ValueError, match="rate_per_s"):
        Limits(rate_per_s=float("inf"))
    with pytest.raises(ValueError, match="unknown control error code"):
        RequestError("nope", "x")


# -- the client -----------------------------------------------------------------------------------


def test_client_without_a_daemon(sockdir: Path) -> None:
    path = str(sockdir / "none.sock")
    with pytest.raises(ControlError) as e:
        request(path, {"op": "status"})
    assert str(e.value) == (f"no daemon is listening on {path}: is `oomwarden run` running?")


def test_client_timeout_and_garbage(sockdir: Path) -> None:
    path = str(sockdir / "mute.sock")
    mute = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    mute.bind(path)
    mute.listen(4)
    try:
        start = time.monotonic()
        with pytest.raises(ControlError, match=r"no answer within 0\.3 s"):
            request(path, {"op": "status"}, timeout_s=0.3)
        assert time.monotonic() - start < 3
        mute.accept()[0].close()  # the connection that timed out

        def answer(data: bytes) -> None:
            conn, _ = mute.accept()
            with conn:
                conn.recv(1024)
                conn.sendall(data)

        for data, needle in [(b"hello\n", "the answer is not a response"),
                             (b'{"ok": 1}\n', "the answer is not a response"),
                             (b'{"ok": tru', "closed the connection without answering")]:
            t = threading.Thread(target=answer, args=(data,))
            t.start()
            with pytest.raises(ControlError, match=needle):
                request(path, {"op": "status"}, timeout_s=WAIT_S)
            t.join(WAIT_S)
    finally:
        mute.close()


# -- the CLI --------------------------------------------------------------------------------------


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = cli.main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def test_cli_victim_add_list_remove(serving: Serving, capsys: pytest.CaptureFixture[str]) -> None:
    sock = ("--socket", serving.path)
    with sleeper() as proc:
        status, out, _ = run_cli(capsys, "victim", "add", "--pid", str(proc.pid),
                                 "--domain", "system", *sock)
        assert status == 0
        assert out.strip() == f"queued entry 1: pid {proc.pid} (fake) in system"
        status, out, _ = run_cli(capsys, "victim", "add", "--cgroup", str(serving.path), *sock)
        assert status == 0 and out.startswith("queued entry 2: cgroup ")
        status, out, _ = run_cli(capsys, "victim", "list", *sock)
        assert status == 0
        assert "victim queues: 2 entries" in out and f"pid {proc.pid} (fake)" in out
        status, out, _ = run_cli(capsys, "victim", "list", "--json", *sock)
        assert [e["id"] for e in json.loads(out)["entries"]] == [1, 2]
        status, out, _ = run_cli(capsys, "victim", "remove", "1", *sock)
        assert status == 0 and out.strip() == f"removed entry 1: pid {proc.pid} (fake) in system"
        status, _, err = run_cli(capsys, "victim", "remove", "1", *sock)
        assert status == 2
        assert err == "oomwarden: error: no queue entry 1 (not_found)\n"
    run_cli(capsys, "victim", "remove", "2", *sock)
    status, out, _ = run_cli(capsys, "victim", "list", *sock)
    assert out.strip() == "the victim queues are empty"


def test_cli_status(serving: Serving, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run_cli(capsys, "status", "--socket", serving.path)
    assert status == 0
    for needle in ("oomwarden 0.1.0, pid 1, since ", "dry run", "cgroup:/app", "growth",
                   "last decisions", "pid 4242 (leaker)", "the kernel's own OOM kills: "
                   "cgroup:/app 2", "queues: empty (at most 1024)"):
        assert needle in out, (needle, out)
    status, out, _ = run_cli(capsys, "status", "--json", "--socket", serving.path)
    body = json.loads(out)
    assert body["watches"][0]["policy"] == "growth" and "ok" not in body


def test_cli_status_renders_any_shape(serving: Serving,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    serving.handler.bodies["status"] = {
        "version": ["odd"], "watches": "all of them", "queues": [1, 2],
        "last_decisions": [None, {"victim": "[red]x[/red]", "time_ns": "later"},
                           {"time_ns": {"event": 10**30}}],
        "kernel_kills": 3, "started_ns": -1, "extra": {"nested": [1, {"a": None}]},
        "note": "\x1b[2J[bold]hi\n",
    }
    status, out, _ = run_cli(capsys, "status", "--socket", serving.path)
    assert status == 0
    assert "[red]x[/red]" in out and "\x1b" not in out and "\\x1b[2J[bold]hi\\n" in out
    assert 'extra: {"nested":[1,{"a":null}]}' in out
    serving.handler.bodies["status"] = {}
    assert run_cli(capsys, "status", "--socket", serving.path)[0] == 0
    serving.handler.bodies["victim.list"] = {"entries": [7, {"kind": "cgroup"}, {"pid": "?"}]}
    assert run_cli(capsys, "victim", "list", "--socket", serving.path)[0] == 0


def test_cli_without_a_daemon_is_one_line(sockdir: Path) -> None:
    path = str(sockdir / "none.sock")
    for argv in (["status"], ["victim", "list"], ["victim", "add", "--pid", "1"],
                 ["victim", "remove", "3"]):
        done = subprocess.run([sys.executable, "-m", "oomwarden.cli", *argv, "--socket", path],
                              capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 2
        assert done.stderr == (f"oomwarden: error: no daemon is listening on {path}: is "
                               "`oomwarden run` running?\n")
        assert done.stdout == ""


@pytest.mark.parametrize(("argv", "needle"), [
    (["victim", "add"], "one of the arguments --pid --cgroup is required"),
    (["victim", "add", "--pid", "1", "--cgroup", "/a"], "not allowed with"),
    (["victim", "add", "--pid", str(MAX_PID + 1)], "expected a pid"),
    (["victim", "remove", "x"], "expected a whole number"),
    (["victim"], "required"),
])
def test_cli_usage_errors(argv: list[str], needle: str,
                          capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err
