"""What the running warden answers on its control socket (``docs/control.md``).

:class:`WardenControl` implements :class:`oomwarden.control.ControlHandler`
on a :class:`oomwarden.daemon.Warden`: the victim queues, ``status``,
``explain`` on the warden's own snapshot, and ``reload``. The server
(:class:`oomwarden.control.ControlServer`) has validated every request and
applied the rules by op; the rules by target (whose process, whose cgroup,
which policy) are applied here, with the facts read through the pidfd or
directory fd the queue keeps.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from oomwarden import __version__
from oomwarden.control import (
    Explain,
    JsonObject,
    Peer,
    RequestError,
    VictimAdd,
    VictimRemove,
    check_explain_policy,
    check_queue_cgroup,
    check_queue_process,
    check_queue_share,
    check_remove,
)
from oomwarden.domains import memory_hierarchy, resolve_cgroup, within
from oomwarden.errors import OomwardenError
from oomwarden.model import HierarchyKind
from oomwarden.policy.budget import signal_guard
from oomwarden.policy.decide import decide
from oomwarden.policy.engine import cgroup_domain, system_domain
from oomwarden.policy.registry import builtins, load_policy
from oomwarden.queues import CgroupEntry, Entry, ProcessEntry, QueueError
from oomwarden.sources.cgroupfs import find_hierarchies
from oomwarden.sources.fsmagic import is_cgroup_fs
from oomwarden.sources.snapshot import SourceConfig, build_snapshot

if TYPE_CHECKING:
    from oomwarden.daemon import Warden

#: explain over the socket: its policy's budget (the loop waits meanwhile).
EXPLAIN_BUDGET_S = 0.05


class WardenControl:
    """The control socket's handler for one :class:`Warden`."""

    def __init__(self, warden: Warden) -> None:
        self.w = warden

    # -- the queues -------------------------------------------------------------------

    def _domains(self) -> dict[str, str | None]:
        """Watched domain names -> their cgroup path (None: the system)."""
        out: dict[str, str | None] = {w.name: w.path for w in self.w.watches}
        if self.w.systems:
            out["system"] = None
        return out

    def _domain_for(self, requested: str | None, cgroup: str | None, what: str) -> str:
        """The queue of a victim whose memory cgroup is ``cgroup``: the one
        asked for (it must hold the victim), else the deepest watched domain
        holding it, else the system's."""
        domains = self._domains()
        if requested is not None:
            if requested not in domains:
                raise RequestError("not_found", f"no watched domain {requested} (watched: "
                                   f"{', '.join(sorted(domains)) or 'none'})")
            top = domains[requested]
            if top is not None and not within(cgroup, top):
                raise RequestError("bad_field", f"{what} is not inside {requested} (its "
                                   f"cgroup: {cgroup})")
            return requested
        inside = [(name, top) for name, top in domains.items()
                  if top is not None and within(cgroup, top)]
        if inside:
            return max(inside, key=lambda d: len(d[1] or ""))[0]
        if "system" in domains:
            return "system"
        raise RequestError("not_found", f"no watched domain holds {what} (its cgroup: "
                           f"{cgroup})")

    @staticmethod
    def _kind() -> HierarchyKind:
        """The hierarchy that has the memory controller (where a queued
        process's cgroup is read): v2 where a cgroup2 hierarchy has it."""
        try:
            return memory_hierarchy(find_hierarchies())
        except OomwardenError:
            return HierarchyKind.V1

    def victim_add(self, request: VictimAdd, peer: Peer) -> JsonObject:
        queue = self.w.queue
        check_queue_share(peer, sum(1 for e in queue.entries if e.by_uid == peer.uid))
        if request.pid is not None:
            entry: Entry = self._add_process(request, peer)
        else:
            entry = self._add_cgroup(request, peer)
        self.w.watch_queued(entry)
        self.w.say(f"queue: {peer} queued {_show(entry)} in {entry.domain} (entry {entry.id})")
        return {"entry": entry.describe()}

    def _add_process(self, request: VictimAdd, peer: Peer) -> ProcessEntry:
        assert request.pid is not None
        queue = self.w.queue
        if request.pid in self.w.own_pids():
            raise RequestError("forbidden", "the warden and its watchdog are never victims")
        try:
            entry = queue.add_process(request.pid, "?", peer.uid, self._kind())
        except QueueError as e:
            raise RequestError(e.code, str(e)) from None
        try:
            # the uid was read after the pidfd was taken: that process's; the
            # rule comes before anything is said about the queue's contents
            check_queue_process(peer, entry.pid, entry.uid)
            for other in queue.entries:
                if isinstance(other, ProcessEntry) and other is not entry \
                        and other.pid == entry.pid and other.start_ticks == entry.start_ticks \
                        and queue.why_dead(other) is None:
                    raise RequestError("duplicate", f"pid {entry.pid} is queued already "
                                       f"(entry {other.id})")
            entry.domain = self._domain_for(request.domain, entry.cgroup, f"pid {entry.pid}")
        except BaseException:
            queue.remove(entry.id)
            raise
        return entry

    def _add_cgroup(self, request: VictimAdd, peer: Peer) -> CgroupEntry:
        assert request.cgroup is not None
        kind, path, fs_path = _memory_cgroup(request.cgroup)
        queue = self.w.queue
        try:
            entry = queue.add_cgroup(kind, path, fs_path, "?", peer.uid)
        except QueueError as e:
            raise RequestError(e.code, str(e)) from None
        try:
            for other in queue.entries:
                if isinstance(other, CgroupEntry) and other is not entry \
                        and other.inode == entry.inode and other.kind is kind \
                        and queue.why_dead(other) is None:
                    raise RequestError("duplicate", f"cgroup {path} is queued already (entry "
                                       f"{other.id})")
            check_queue_cgroup(peer, path, os.fstat(entry.dirfd).st_uid)
            entry.domain = self._domain_for(request.domain, path, f"cgroup {path}")
        except BaseException:
            queue.remove(entry.id)
            raise
        return entry

    def victim_list(self, peer: Peer) -> JsonObject:
        return {"entries": [e.describe() for e in self.w.queue.entries]}

    def victim_remove(self, request: VictimRemove, peer: Peer) -> JsonObject:
        entry = self.w.queue.get(request.entry)
        if entry is None:
            raise RequestError("not_found", f"no queue entry {request.entry} (removed, hit, "
                               "or its process exited)")
        check_remove(peer, entry.id, entry.by_uid)
        self.w.unwatch_queued(entry)
        self.w.queue.remove(entry.id)
        self.w.say(f"queue: {peer} removed entry {entry.id} ({_show(entry)})")
        return {"removed": entry.describe()}

    # -- status, explain, reload --------------------------------------------------------

    def status(self, peer: Peer) -> JsonObject:
        w = self.w
        watches: list[JsonObject] = [
            {"domain": x.name, "hierarchy": x.kind.value, "triggers": list(x.spec.triggers),
             "policy": x.spec.policy.name, "victim": x.spec.policy.victim,
             "dry_run": w.dry_run or x.spec.dry_run, "paused": x.paused,
             "handed_over": x.handed_over, "decisions": x.decisions}
            for x in w.watches]
        watches += [
            {"domain": "system", "hierarchy": None,
             "triggers": [t for t, on in (("threshold", s.threshold is not None),
                                          ("pressure", s.pressure is not None)) if on],
             "policy": s.policy.name, "victim": s.policy.victim,
             "dry_run": w.dry_run or s.dry_run}
            for s in w.systems]
        return {"version": __version__, "pid": os.getpid(), "started_ns": w.started_ns,
                "dry_run": w.dry_run, "config": w.config_path, "watches": watches,
                "queues": w.queue.sizes(), "queue_limit": w.queue.cap,
                "last_decisions": list(w.last_decisions),
                "kernel_kills": dict(w.kernel_kill_counts), "bpf": w.bpf_status()}

    def explain(self, request: Explain, peer: Peer) -> JsonObject:
        configured = {x.spec.policy.name: x.spec.policy for x in self.w.watches}
        configured.update({s.policy.name: s.policy for s in self.w.systems})
        check_explain_policy(request.policy, set(builtins()) | set(configured))
        policy = configured.get(request.policy) or load_policy(request.policy)
        try:
            snapshot = build_snapshot(SourceConfig(source=self.w.snapshot_source))
            if request.cgroup is None:
                domain = system_domain(snapshot)
            else:
                cg = resolve_cgroup(snapshot, request.cgroup)
                if not cg.memory_controller:
                    raise RequestError("bad_field", f"{cg.name} has no memory controller")
                domain = cgroup_domain(snapshot, cg)
        except RequestError:
            raise
        except OomwardenError as e:
            raise RequestError("not_found", str(e)) from None
        decision = decide(snapshot, domain, policy, guard=signal_guard,
                          budget_s=EXPLAIN_BUDGET_S)
        body = decision.to_json(top=request.top)
        for c in [body.get("victim"), *body.get("candidates", [])]:
            if isinstance(c, dict):  # what the asking user might not read itself
                c.pop("exe", None)
                c.pop("cmdline", None)
        return {"decision": body}

    def reload(self, peer: Peer) -> JsonObject:
        if self.w.reload is None:
            raise RequestError("unavailable", "the warden runs on the built-in defaults, "
                               "without a config file to reload")
        error = self.w.reload_now()
        if error is not None:
            raise RequestError("bad_config", error)
        return {"config": self.w.config_path,
                "watches": len(self.w.watches) + len(self.w.systems)}


def _memory_cgroup(spec: str) -> tuple[HierarchyKind, str, str]:
    """A memory cgroup as ``explain --cgroup`` takes it (``/a/b``, ``v1:``,
    ``v2:``, ``cgroup:`` prefixes, or a filesystem path below the mount), on
    the hierarchy that has the memory controller, statfs-verified; without
    reading any process. Returns (kind, path inside the hierarchy, fs path)."""
    try:
        hierarchies = find_hierarchies()
    except OomwardenError as e:
        raise RequestError("internal", str(e)) from None
    v2 = [h for h in hierarchies if h.kind is HierarchyKind.V2 and h.has_memory]
    v1 = [h for h in hierarchies if h.kind is HierarchyKind.V1 and h.has_memory]
    if not (v2 or v1) or not (v2 or v1)[0].verified:
        raise RequestError("not_found", "no verified memory cgroup hierarchy is mounted")
    chosen = (v2 or v1)[0]
    text = spec.removeprefix("cgroup:")
    for prefix, kind in (("v1:", HierarchyKind.V1), ("v2:", HierarchyKind.V2)):
        if text.startswith(prefix):
            if kind is not chosen.kind:
                raise RequestError("bad_field", f"{spec}: the memory controller is on "
                                   f"{chosen.kind.value} here")
            text = text[len(prefix):]
    mount = chosen.mount_point.rstrip("/")
    real = os.path.realpath(text) if os.path.isabs(text) else text
    if real == mount or real.startswith(mount + "/"):
        text = "/" + real[len(mount):].lstrip("/")
    path = os.path.normpath("/" + text.lstrip("/"))
    if ".." in path.split("/"):
        raise RequestError("bad_field", f"{spec}: not a cgroup path")
    fs_path = os.path.join(mount, path.lstrip("/"))
    if path == "/":
        raise RequestError("forbidden", "the root cgroup is never a victim")
    if not os.path.isdir(fs_path) or not is_cgroup_fs(fs_path, v2=chosen.kind is
                                                      HierarchyKind.V2):
        raise RequestError("not_found", f"no memory cgroup {path} ({fs_path})")
    return chosen.kind, path, fs_path


def _show(entry: Entry) -> str:
    if isinstance(entry, ProcessEntry):
        return f"pid {entry.pid} ({entry.comm})"
    return f"cgroup {entry.path}"

