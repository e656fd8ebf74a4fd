"""BPF OOM struct_ops: is it in this kernel, and the ranked-victim map.

Roman Gushchin's "mm: BPF OOM" series (not merged; docs/bpf-oom.md follows
its bpf-next v3 revision) lets a BPF program, a ``struct bpf_oom_ops``
attached to a cgroup, handle an OOM before the kernel picks a victim. The
warden's design for it: user space ranks ahead of time, where it may
allocate and take locks, and keeps the head of every domain's ranking in a
BPF hash map; the in-kernel handler (``bpf/oom_ops.bpf.c``) only re-checks
the head and calls the kill kfunc.

This module holds the two parts that run here:

* :func:`detect`: whether the kernel's BTF has ``struct bpf_oom_ops`` and
  the ``bpf_oom_kill_process`` kfunc (libbpf's BTF API through the ctypes
  binding of :mod:`oomwarden.sources.bpf`), as one line for ``status``
  (the ``struct_ops`` part of its ``bpf`` section);
* the ranked map: its layout (mirroring ``struct ow_ranked`` of
  oom_ops.bpf.c), what goes in it (:func:`ranking_for`: the victim queue
  first, then the policy's ranking), and :class:`RankedMap`, which writes and
  reads such a map through libbpf. Nothing loads the handler here (this
  kernel has no ``bpf_oom_ops``): the map is tested on its own.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from oomwarden.decision import Decision
from oomwarden.errors import BpfError
from oomwarden.sources.bpf import libbpf_function, libbpf_last_message, trim_heap

#: What the series adds to the kernel's BTF (v3: include/linux/bpf_oom.h and
#: mm/oom_kill.c).
STRUCT_OPS_NAME = "bpf_oom_ops"
KILL_KFUNC = "bpf_oom_kill_process"
#: BTF kinds (include/uapi/linux/btf.h).
BTF_KIND_STRUCT = 4
BTF_KIND_FUNC = 12

_FALLBACK = "the warden kills from user space"


@dataclass(frozen=True, slots=True)
class StructOpsSupport:
    """Whether the kernel can run the warden's BPF OOM handler."""

    available: bool
    #: One line: what was found, or why not.
    detail: str

    def status_part(self) -> dict[str, Any]:
        """The ``struct_ops`` part of ``status``'s ``bpf`` section: never in
        use (the warden does not load the handler yet)."""
        return {"in_use": False, "detail": self.detail}


def _load_btf(btf_path: str | None) -> int:
    """A ``struct btf *`` of the running kernel (``btf_path`` None) or of the
    file ``btf_path`` (raw BTF or an ELF object with a .BTF section)."""
    if btf_path is None:
        load = libbpf_function("btf__load_vmlinux_btf", [], ctypes.c_void_p)
        btf = load()
        where = "the kernel's BTF"
    else:
        parse = libbpf_function("btf__parse", [ctypes.c_char_p, ctypes.c_void_p],
                                ctypes.c_void_p)
        btf = parse(os.fsencode(btf_path), None)
        where = f"BTF of {btf_path}"
    if not btf:
        err = ctypes.get_errno()
        reason = os.strerror(err) if err else (libbpf_last_message() or "libbpf failed")
        raise BpfError(f"cannot read {where}: {reason}")
    return int(btf)


def find_btf_types(wanted: Sequence[tuple[str, int]], *,
                   btf_path: str | None = None) -> dict[tuple[str, int], bool]:
    """For every ``(name, kind)``: whether the BTF (the kernel's, or the file
    ``btf_path``) has a type of that name and kind. :class:`BpfError` (one
    line) where the BTF or libbpf cannot be had."""
    btf = _load_btf(btf_path)
    try:
        find = libbpf_function("btf__find_by_name_kind",
                               [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_uint32],
                               ctypes.c_int32)
        return {(name, kind): find(btf, name.encode(), kind) > 0 for name, kind in wanted}
    finally:
        libbpf_function("btf__free", [ctypes.c_void_p], None)(btf)
        trim_heap()


def detect(struct_name: str = STRUCT_OPS_NAME, kfunc_name: str = KILL_KFUNC, *,
           btf_path: str | None = None) -> StructOpsSupport:
    """Whether ``struct <struct_name>`` and the kfunc ``kfunc_name`` are in
    the kernel's BTF (or in ``btf_path``'s). Never raises: a missing BTF or
    libbpf is ``available=False`` with the reason."""
    try:
        wanted = [(struct_name, BTF_KIND_STRUCT), (kfunc_name, BTF_KIND_FUNC)]
        has_struct, has_kfunc = find_btf_types(wanted, btf_path=btf_path).values()
    except BpfError as e:
        return StructOpsSupport(False, f"not detectable: {e}; {_FALLBACK}")
    where = "this kernel" if btf_path is None else btf_path
    if not has_struct:
        return StructOpsSupport(
            False, f"not in {where}: its BTF has no struct {struct_name} (the BPF OOM series "
                   f"is not merged); {_FALLBACK}")
    if not has_kfunc:
        return StructOpsSupport(
            False, f"not usable in {where}: its BTF has struct {struct_name} but no kfunc "
                   f"{kfunc_name} (another revision of the series?); {_FALLBACK}")
    return StructOpsSupport(
        True, f"available, not used: {where} has struct {struct_name} and {kfunc_name}, "
              f"but the warden does not load its handler (oom_ops.bpf.o) yet; {_FALLBACK}")


# -- the ranked-victim map (struct ow_ranked in oom_ops.bpf.c) ---------------------------

#: Victims per domain the handler looks at, at most (OW_RANKED_MAX).
RANKED_MAX = 8
#: Domains the map holds (OW_DOMAINS_MAX).
DOMAINS_MAX = 256
RANKED_MAGIC = 0x314B524F  # "ORK1"
#: struct ow_victim: pid, flags, start_ticks.
VICTIM = struct.Struct("<iIQ")
#: struct ow_ranked before its victims: magic, count, generation, written_ns.
RANKED_HEAD = struct.Struct("<IIQQ")
RANKED_SIZE = RANKED_HEAD.size + RANKED_MAX * VICTIM.size
KEY = struct.Struct("<Q")
#: The system-wide domain's key (a memcg OOM's is its cgroup's kernfs id).
SYSTEM_DOMAIN = 0
assert RANKED_SIZE == 152


@dataclass(frozen=True, slots=True)
class RankedVictim:
    """A process as the handler re-checks it: its pid and its start time in
    clock ticks (``/proc/PID/stat`` field 22)."""

    pid: int
    start_ticks: int


@dataclass(frozen=True, slots=True)
class Ranking:
    """One domain's value in the map."""

    victims: tuple[RankedVictim, ...]
    generation: int
    #: CLOCK_BOOTTIME of the write, ns (the handler ignores an old ranking).
    written_ns: int


def pack_ranking(ranking: Ranking) -> bytes:
    """The bytes of ``struct ow_ranked``; :class:`BpfError` for what the
    handler could not hold."""
    if len(ranking.victims) > RANKED_MAX:
        raise BpfError(f"a ranking holds at most {RANKED_MAX} victims, "
                       f"not {len(ranking.victims)}")
    out = bytearray(RANKED_SIZE)
    RANKED_HEAD.pack_into(out, 0, RANKED_MAGIC, len(ranking.victims), ranking.generation,
                          ranking.written_ns)
    for i, v in enumerate(ranking.victims):
        if not 0 < v.pid < 2**31 or not 0 <= v.start_ticks < 2**64:
            raise BpfError(f"victim {i}: pid {v.pid}, start_ticks {v.start_ticks} out of range")
        VICTIM.pack_into(out, RANKED_HEAD.size + i * VICTIM.size, v.pid, 0, v.start_ticks)
    return bytes(out)


def unpack_ranking(data: bytes) -> Ranking:
    """The inverse of :func:`pack_ranking`; :class:`BpfError` for anything else."""
    if len(data) != RANKED_SIZE:
        raise BpfError(f"a ranking is {RANKED_SIZE} bytes, not {len(data)}")
    magic, count, generation, written_ns = RANKED_HEAD.unpack_from(data)
    if magic != RANKED_MAGIC or count > RANKED_MAX:
        raise BpfError(f"not a ranking: magic {magic:#x}, count {count}")
    victims = tuple(RankedVictim(pid, ticks) for pid, _flags, ticks in (
        VICTIM.unpack_from(data, RANKED_HEAD.size + i * VICTIM.size) for i in range(count)))
    return Ranking(victims, generation, written_ns)


def ranking_for(queued: Iterable[tuple[int, int]], decision: Decision | None,
                limit: int = RANKED_MAX) -> tuple[RankedVictim, ...]:
    """What the map holds for one domain, best first: the live processes of
    the victim queue (``(pid, start_ticks)``, oldest entry first, as
    ``VictimQueue.head`` would take them), then the killable candidates of the
    policy's ``decision`` in rank order; each process once, at most ``limit``.
    An aborted decision adds nothing (the policy said: kill nothing)."""
    out: list[RankedVictim] = []
    seen: set[tuple[int, int]] = set()

    def add(pid: int, ticks: int) -> None:
        if len(out) < limit and (pid, ticks) not in seen:
            seen.add((pid, ticks))
            out.append(RankedVictim(pid, ticks))

    for pid, ticks in queued:
        add(pid, ticks)
    if decision is not None and not decision.aborted:
        for c in decision.candidates:
            if c.verdict in ("select", "default") and c.points is not None:
                add(c.task.pid, c.task.start_ticks)
    return tuple(out)


BPF_MAP_TYPE_HASH = 1
BPF_ANY = 0


class RankedMap:
    """The ``ow_ranked`` map: every domain's ranking, replaced whole on each
    write (a hash map element is swapped in, so the handler never reads half
    of one ranking and half of another).

    ``fd`` is the map of a loaded oom_ops.bpf.o (``bpf_map__fd``), kept open
    by its owner; without it a map of the same layout is made here (what the
    tests use: the handler cannot be loaded on a kernel without the series)."""

    def __init__(self, fd: int | None = None, max_domains: int = DOMAINS_MAX) -> None:
        self._owned = fd is None
        self._generation = 0
        if fd is None:
            create = libbpf_function("bpf_map_create",
                                     [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32,
                                      ctypes.c_uint32, ctypes.c_uint32, ctypes.c_void_p],
                                     ctypes.c_int)
            fd = create(BPF_MAP_TYPE_HASH, b"ow_ranked", KEY.size, RANKED_SIZE, max_domains,
                        None)
            if fd < 0:
                raise BpfError(f"cannot create the ranked-victim map: {os.strerror(-fd)}")
        self.fd: int = fd

    def write(self, domain: int, victims: Sequence[RankedVictim]) -> Ranking:
        """Replace ``domain``'s ranking (0: the system) with ``victims``."""
        self._generation += 1
        ranking = Ranking(tuple(victims), self._generation,
                          time.clock_gettime_ns(time.CLOCK_BOOTTIME))
        value = pack_ranking(ranking)
        update = libbpf_function("bpf_map_update_elem",
                                 [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                                  ctypes.c_uint64], ctypes.c_int)
        rc = update(self._fd(), KEY.pack(domain), value, BPF_ANY)
        if rc < 0:
            raise BpfError(f"cannot write the ranking of domain {domain}: {os.strerror(-rc)}")
        return ranking

    def read(self, domain: int) -> Ranking | None:
        """``domain``'s ranking, or None where there is none (the handler
        then leaves the choice to the kernel)."""
        lookup = libbpf_function("bpf_map_lookup_elem",
                                 [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p], ctypes.c_int)
        buf = ctypes.create_string_buffer(RANKED_SIZE)
        rc = lookup(self._fd(), KEY.pack(domain), buf)
        if rc == -errno.ENOENT:
            return None
        if rc < 0:
            raise BpfError(f"cannot read the ranking of domain {domain}: {os.strerror(-rc)}")
        return unpack_ranking(buf.raw)

    def remove(self, domain: int) -> bool:
        """Drop ``domain``'s ranking (a watch removed); False if there was none."""
        delete = libbpf_function("bpf_map_delete_elem", [ctypes.c_int, ctypes.c_void_p],
                                 ctypes.c_int)
        rc = delete(self._fd(), KEY.pack(domain))
        if rc == -errno.ENOENT:
            return False
        if rc < 0:
            raise BpfError(f"cannot remove the ranking of domain {domain}: {os.strerror(-rc)}")
        return True

    def _fd(self) -> int:
        if self.fd < 0:
            raise BpfError("the ranked-victim map is closed")
        return self.fd

    def close(self) -> None:
        """Close the map made here (idempotent; a borrowed fd stays open)."""
        if self._owned and self.fd >= 0:
            os.close(self.fd)
        self.fd = -1

    def __enter__(self) -> RankedMap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
