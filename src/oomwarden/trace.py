"""Traces: a compressed, versioned stream of snapshots (``docs/trace-format.md``).

A trace is JSON lines inside one gzip member (or plain JSON lines, for
measurements). The first line is the header (format, version, host facts,
the recorder's options, the schema: the field names of every record type),
then one line per snapshot, then an end line. Every snapshot line is
compressed with a ``Z_SYNC_FLUSH`` and flushed to the file as it is taken, so
a recorder killed at any point leaves every whole line before the kill
readable; the reader says the trace was cut short instead of refusing it.

Snapshots are stored field by field, in the order of the dataclasses'
fields, and decode into objects equal to the ones encoded (``==`` on the
frozen dataclasses), so that :func:`oomwarden.policy.decide.decide` on a
replayed snapshot gives what it gave on the live one. With ``delta`` on, a
task, cgroup or hierarchy unchanged since the previous snapshot is stored
as its index in that snapshot's list.

Every line ends with a tab and the CRC32 of its JSON (8 lowercase hex
digits), checked before the line is used: gzip's own CRC covers the whole
stream and is only checked at its end, which a cut trace never reaches, so
without it a damaged record in a cut trace would read as valid but wrong data.

Everything that goes wrong reading a trace is a :class:`TraceError` with one
line: a foreign file, another version, a corrupt stream, a line whose CRC32
does not match, a record that is not what the schema says.
"""

from __future__ import annotations

import dataclasses
import json
import operator
import os
import time
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import IO, Any

from oomwarden import __version__
from oomwarden.errors import TraceError
from oomwarden.limits import DEFAULT_LEVEL as DEFAULT_LEVEL  # noqa: PLC0414 (a re-export)
from oomwarden.model import (
    Cgroup,
    Hierarchy,
    HierarchyKind,
    OomControl,
    Pressure,
    PsiLine,
    Snapshot,
    SystemMemory,
    Task,
)

FORMAT = "oomwarden-trace"
#: 2: every line carries its CRC32 (1, unreleased, had none).
VERSION = 2
#: Between a line's JSON and its CRC32 (JSON as written never holds a raw tab).
CRC_SEP = b"\t"
#: gzip's magic number: the stream is compressed.
GZIP_MAGIC = b"\x1f\x8b"
#: zlib's wbits for a gzip container.
GZIP_WBITS = 31
#: Longest line the reader accepts (a snapshot of 100,000 tasks is ~25 MB).
MAX_LINE = 256 * 1024 * 1024
READ_CHUNK = 1 << 16

#: The record types and the dataclasses stored field by field.
_CLASSES: dict[str, type[Any]] = {
    "task": Task, "cgroup": Cgroup, "hierarchy": Hierarchy, "system": SystemMemory,
    "pressure": Pressure, "psi": PsiLine, "oom_control": OomControl,
}
#: Snapshot fields stored apart: the lists that are delta-encoded.
_LISTS = ("tasks", "cgroups", "hierarchies")


def schema() -> dict[str, list[str]]:
    """Field names of every stored class, in stored order (in the header)."""
    out = {name: [f.name for f in dataclasses.fields(cls)] for name, cls in _CLASSES.items()}
    out["snapshot"] = [f.name for f in dataclasses.fields(Snapshot) if f.name not in _LISTS]
    return out


# -- encoding -------------------------------------------------------------------------------


Encoded = Any  # nested tuples of JSON scalars: hashable, and dumped as arrays


def _enc_value(value: object) -> Encoded:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, HierarchyKind):
        return value.value
    if isinstance(value, tuple):
        return tuple(_enc_value(v) for v in value)
    if isinstance(value, Mapping):
        return tuple((k, v) for k, v in value.items())
    if dataclasses.is_dataclass(value):
        return tuple(_enc_value(getattr(value, f.name)) for f in dataclasses.fields(value))
    raise TypeError(f"cannot store {type(value).__name__} in a trace")


#: A task's fields are all plain values (``cmdline`` a tuple of strings):
#: one attrgetter call gives its stored tuple, the hot path of the recorder.
_TASK_FIELDS = operator.attrgetter(*(f.name for f in dataclasses.fields(Task)))


def encode_item(item: object) -> Encoded:
    """One task, cgroup or hierarchy as a hashable tuple (its fields in order)."""
    if type(item) is Task:
        return _TASK_FIELDS(item)
    return _enc_value(item)


def encode_snapshot(snapshot: Snapshot, previous: dict[str, dict[Encoded, int]] | None
                    ) -> tuple[dict[str, Any], dict[str, dict[Encoded, int]]]:
    """The snapshot's record and the index of its items for the next delta
    (``previous`` None: no delta, every item in full)."""
    rec: dict[str, Any] = {
        "s": [_enc_value(getattr(snapshot, f.name)) for f in dataclasses.fields(Snapshot)
              if f.name not in _LISTS],
    }
    index: dict[str, dict[Encoded, int]] = {}
    for name in _LISTS:
        items = [encode_item(x) for x in getattr(snapshot, name)]
        if previous is not None:
            before = previous.get(name, {})
            rec[name] = [before.get(x, x) for x in items]
        else:
            rec[name] = items
        index[name] = {x: i for i, x in enumerate(items)}
    return rec, index


# -- decoding (every value checked: a corrupt record is a TraceError) -----------------------


class _Bad(Exception):
    """A value is not what the schema says (turned into a TraceError with the place)."""


def _int(v: object) -> int:
    if type(v) is not int:
        raise _Bad(f"expected an integer, got {_show(v)}")
    return v


def _str(v: object) -> str:
    if type(v) is not str:
        raise _Bad(f"expected a string, got {_show(v)}")
    return v


def _bool(v: object) -> bool:
    if type(v) is not bool:
        raise _Bad(f"expected true or false, got {_show(v)}")
    return v


def _float(v: object) -> float:
    if type(v) is float:
        return v
    if type(v) is int:  # json writes 1.0 as 1.0, but a hand-made file may write 1
        return float(v)
    raise _Bad(f"expected a number, got {_show(v)}")


def _list(v: object) -> list[Any]:
    if type(v) is not list:
        raise _Bad(f"expected a list, got {_show(v)}")
    return v


def _optional(f: Callable[[object], Any]) -> Callable[[object], Any]:
    return lambda v: None if v is None else f(v)


def _tuple_of(f: Callable[[object], Any]) -> Callable[[object], Any]:
    return lambda v: tuple(f(x) for x in _list(v))


def _mapping(v: object) -> Mapping[str, int]:
    out: dict[str, int] = {}
    for pair in _list(v):
        k, n = _pair(pair)
        out[_str(k)] = _int(n)
    return MappingProxyType(out)


def _pair(v: object) -> tuple[object, object]:
    items = _list(v)
    if len(items) != 2:
        raise _Bad(f"expected a pair, got {_show(v)}")
    return items[0], items[1]


def _kind(v: object) -> HierarchyKind:
    try:
        return HierarchyKind(_str(v))
    except ValueError:
        raise _Bad(f"expected a hierarchy kind (v1, v2), got {_show(v)}") from None


def _show(v: object) -> str:
    text = json.dumps(v, ensure_ascii=True) if not isinstance(v, str) else repr(v)
    return text if len(text) <= 40 else text[:40] + "..."


def _dataclass(cls: type[Any]) -> Callable[[object], Any]:
    def decode(v: object) -> Any:
        values = _list(v)
        if len(values) != len(decoders):
            raise _Bad(f"a {cls.__name__} has {len(decoders)} fields, this one {len(values)}")
        kwargs = {}
        for (name, dec), x in zip(decoders, values, strict=True):
            try:
                kwargs[name] = dec(x)
            except _Bad as e:
                raise _Bad(f"{cls.__name__}.{name}: {e}") from None
        return cls(**kwargs)

    decoders: list[tuple[str, Callable[[object], Any]]] = []
    # filled in below, once every class's decoder exists
    _PENDING.append((cls, decoders))
    return decode


_PENDING: list[tuple[type[Any], list[tuple[str, Callable[[object], Any]]]]] = []
_DECODERS: dict[str, Callable[[object], Any]] = {
    "int": _int, "str": _str, "bool": _bool, "float": _float,
    "HierarchyKind": _kind, "Mapping[str, int]": _mapping,
    "tuple[str, ...]": _tuple_of(_str), "tuple[int, ...]": _tuple_of(_int),
    "PsiLine": _dataclass(PsiLine), "Pressure": _dataclass(Pressure),
    "OomControl": _dataclass(OomControl), "SystemMemory": _dataclass(SystemMemory),
    "Task": _dataclass(Task), "Cgroup": _dataclass(Cgroup), "Hierarchy": _dataclass(Hierarchy),
}


def _decoder_for(annotation: str) -> Callable[[object], Any]:
    """The decoder of a field from its annotation (``int | None``...). A field
    type this module does not know fails at import: a new model field must be
    taught to the trace format (and the version raised)."""
    text = annotation.replace(" ", "")
    if text.endswith("|None"):
        return _optional(_decoder_for(text[: -len("|None")]))
    text = text.replace(",", ", ")
    if text not in _DECODERS:
        raise TypeError(f"the trace format cannot store a field of type {annotation}")
    return _DECODERS[text]


for _cls, _decs in _PENDING:
    _decs.extend((f.name, _decoder_for(str(f.type))) for f in dataclasses.fields(_cls))
_SNAPSHOT_FIELDS = [(f.name, _decoder_for(str(f.type))) for f in dataclasses.fields(Snapshot)
                    if f.name not in _LISTS]
_ITEM_DECODERS = {"tasks": _DECODERS["Task"], "cgroups": _DECODERS["Cgroup"],
                  "hierarchies": _DECODERS["Hierarchy"]}


def decode_snapshot(rec: Mapping[str, Any], previous: Mapping[str, tuple[Any, ...]] | None
                    ) -> tuple[Snapshot, dict[str, tuple[Any, ...]]]:
    """A record back into a :class:`Snapshot`; ``previous`` holds the items of
    the previous snapshot for back-references. Raises :class:`_Bad`."""
    values = _list(rec.get("s"))
    if len(values) != len(_SNAPSHOT_FIELDS):
        raise _Bad(f"a snapshot has {len(_SNAPSHOT_FIELDS)} fields, this one {len(values)}")
    kwargs: dict[str, Any] = {}
    for (name, dec), x in zip(_SNAPSHOT_FIELDS, values, strict=True):
        try:
            kwargs[name] = dec(x)
        except _Bad as e:
            raise _Bad(f"Snapshot.{name}: {e}") from None
    items: dict[str, tuple[Any, ...]] = {}
    for name in _LISTS:
        dec = _ITEM_DECODERS[name]
        before = previous.get(name, ()) if previous is not None else ()
        out: list[Any] = []
        for i, x in enumerate(_list(rec.get(name))):
            if type(x) is int:
                if not 0 <= x < len(before):
                    raise _Bad(f"{name}[{i}] refers to item {x} of the previous snapshot, "
                               f"which had {len(before)}")
                out.append(before[x])
            else:
                try:
                    out.append(dec(x))
                except _Bad as e:
                    raise _Bad(f"{name}[{i}]: {e}") from None
        items[name] = tuple(out)
    kwargs.update(items)
    return Snapshot(**kwargs), items


# -- the header -----------------------------------------------------------------------------


def _read_text(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def host_facts() -> dict[str, Any]:
    """What a reader needs to know about the machine a trace comes from."""
    u = os.uname()
    return {
        "hostname": u.nodename,
        "kernel_release": u.release,
        "machine": u.machine,
        "page_size": os.sysconf("SC_PAGE_SIZE"),
        "clock_ticks": os.sysconf("SC_CLK_TCK"),
        "boot_id": _read_text("/proc/sys/kernel/random/boot_id"),
    }


@dataclass(frozen=True)
class TraceHeader:
    version: int
    host: Mapping[str, Any]
    options: Mapping[str, Any]
    oomwarden: str
    #: Wall-clock and CLOCK_MONOTONIC nanoseconds when the recorder started.
    started_wall_ns: int
    started_monotonic_ns: int
    compression: str
    delta: bool


@dataclass(frozen=True)
class TraceRecord:
    """One snapshot of a trace and when it was taken (wall clock)."""

    index: int
    wall_ns: int
    snapshot: Snapshot


# -- writing --------------------------------------------------------------------------------


class TraceWriter:
    """Writes a trace to an open binary file, one flushed record per snapshot."""

    def __init__(self, out: IO[bytes], *, options: Mapping[str, Any] | None = None,
                 compress: bool = True, level: int = DEFAULT_LEVEL, delta: bool = True,
                 host: Mapping[str, Any] | None = None,
                 wall_clock: Callable[[], int] = time.time_ns,
                 monotonic: Callable[[], int] = time.monotonic_ns) -> None:
        self.out = out
        self.delta = delta
        self._z = zlib.compressobj(level, zlib.DEFLATED, GZIP_WBITS) if compress else None
        self._previous: dict[str, dict[Encoded, int]] | None = None
        self.snapshots = 0
        self.tasks = 0
        self.bytes_written = 0
        self.closed = False
        header = {
            "format": FORMAT, "version": VERSION, "oomwarden": __version__,
            "host": dict(host if host is not None else host_facts()),
            "options": dict(options or {}),
            "started_wall_ns": wall_clock(), "started_monotonic_ns": monotonic(),
            "compression": "gzip" if compress else "none", "delta": delta,
            "schema": schema(),
        }
        self._write(header)

    def _write(self, obj: Mapping[str, Any]) -> None:
        data = seal(json.dumps(obj, separators=(",", ":"), ensure_ascii=True).encode())
        if self._z is not None:
            data = self._z.compress(data) + self._z.flush(zlib.Z_SYNC_FLUSH)
        self.out.write(data)
        self.out.flush()
        self.bytes_written += len(data)

    def write(self, snapshot: Snapshot, wall_ns: int | None = None) -> int:
        """Append one snapshot; returns the bytes it took in the file."""
        before = self.bytes_written
        rec, index = encode_snapshot(snapshot, self._previous if self.delta else None)
        rec = {"t": "snap", "i": self.snapshots,
               "wall_ns": time.time_ns() if wall_ns is None else wall_ns, **rec}
        self._write(rec)
        self._previous = index
        self.snapshots += 1
        self.tasks += len(snapshot.tasks)
        return self.bytes_written - before

    def close(self, reason: str = "stopped") -> None:
        """Write the end marker and the gzip trailer (a complete file)."""
        if self.closed:
            return
        self.closed = True
        self._write({"t": "end", "snapshots": self.snapshots, "reason": reason})
        if self._z is not None:
            tail = self._z.flush(zlib.Z_FINISH)
            self.out.write(tail)
            self.out.flush()
            self.bytes_written += len(tail)


def seal(line: bytes) -> bytes:
    """A line of JSON as stored: the JSON, a tab, its CRC32 in 8 hex digits, a newline."""
    return line + CRC_SEP + b"%08x" % zlib.crc32(line) + b"\n"


# -- reading --------------------------------------------------------------------------------


def unseal(line: bytes) -> bytes | None:
    """The JSON of a stored line if its CRC32 matches, else None."""
    body, sep, crc = line.rpartition(CRC_SEP)
    if not sep or crc != b"%08x" % zlib.crc32(body):
        return None
    return body


def _lines(raw: IO[bytes], name: str) -> Iterator[tuple[bytes, bool]]:
    """(line, complete) pairs of the decompressed stream; a last line without
    its newline (a killed recorder) comes with complete=False."""
    first = raw.read(READ_CHUNK)
    z = zlib.decompressobj(GZIP_WBITS) if first[:2] == GZIP_MAGIC else None
    pending = b""
    chunk = first
    while chunk:
        if z is not None:
            try:
                data = z.decompress(chunk)
            except zlib.error as e:
                raise TraceError(f"{name}: corrupt compressed data ({e})") from None
            if z.eof and z.unused_data:
                raise TraceError(f"{name}: data after the end of the compressed stream")
        else:
            data = chunk
        pending += data
        *done, pending = pending.split(b"\n")
        for line in done:
            yield line, True
        if len(pending) > MAX_LINE:
            raise TraceError(f"{name}: a line longer than {MAX_LINE} bytes: not a trace")
        chunk = raw.read(READ_CHUNK)
    if pending:
        yield pending, False


def _json(line: bytes, name: str, what: str) -> dict[str, Any]:
    try:
        obj = json.loads(line)
    except (ValueError, RecursionError) as e:
        raise TraceError(f"{name}: {what} is not JSON ({str(e)[:80]})") from None
    if not isinstance(obj, dict):
        raise TraceError(f"{name}: {what} is not a JSON object")
    return obj


def _header(obj: Mapping[str, Any], name: str) -> TraceHeader:
    if obj.get("format") != FORMAT:
        raise TraceError(f"{name}: not an oomwarden trace (format {_show(obj.get('format'))})")
    version = obj.get("version")
    if version != VERSION or type(version) is not int:
        raise TraceError(f"{name}: trace format version {_show(version)}; this oomwarden "
                         f"reads version {VERSION} only")
    if obj.get("schema") != schema():
        raise TraceError(f"{name}: the trace's schema differs from this oomwarden's "
                         f"(written by another build of version {VERSION})")
    try:
        host, options = obj.get("host"), obj.get("options")
        if not isinstance(host, dict) or not isinstance(options, dict):
            raise _Bad("host and options must be objects")
        return TraceHeader(
            version=version, host=host, options=options,
            oomwarden=_str(obj.get("oomwarden")),
            started_wall_ns=_int(obj.get("started_wall_ns")),
            started_monotonic_ns=_int(obj.get("started_monotonic_ns")),
            compression=_str(obj.get("compression")), delta=_bool(obj.get("delta")))
    except _Bad as e:
        raise TraceError(f"{name}: bad header: {e}") from None


class TraceReader:
    """Reads a trace: ``header`` first, then iterate for :class:`TraceRecord`.

    After the iteration, ``complete`` says whether the end marker was there;
    ``truncated`` whether the file stopped in the middle (a killed recorder:
    every whole record before the cut is read)."""

    def __init__(self, raw: IO[bytes], name: str = "trace") -> None:
        self.name = name
        self._lines = _lines(raw, name)
        self.complete = False
        self.truncated = False
        self.end_reason: str | None = None
        try:
            first, whole = next(self._lines)
        except StopIteration:
            raise TraceError(f"{name}: empty file: not an oomwarden trace") from None
        if not whole:
            raise TraceError(f"{name}: no complete header: not an oomwarden trace, "
                             "or one cut short before its first record")
        body = unseal(first)
        try:
            obj = json.loads(body if body is not None else
                             first.rpartition(CRC_SEP)[0] or first)
        except (ValueError, RecursionError):
            obj = None
        if not isinstance(obj, dict):
            raise TraceError(f"{name}: not an oomwarden trace (its first line is not a JSON "
                             "object)")
        if body is None and obj.get("format") == FORMAT and obj.get("version") == VERSION:
            raise TraceError(f"{name}: the header is damaged (its CRC32 does not match)")
        self.header = _header(obj, name)

    def __iter__(self) -> Iterator[TraceRecord]:
        previous: dict[str, tuple[Any, ...]] | None = None
        expected = 0
        for line, whole in self._lines:
            if self.complete:
                raise TraceError(f"{self.name}: data after the end marker")
            if not whole:
                self.truncated = True
                return
            body = unseal(line)
            if body is None:
                raise TraceError(f"{self.name}: record {expected + 1} is damaged (its CRC32 "
                                 "does not match)")
            obj = _json(body, self.name, f"record {expected + 1}")
            kind = obj.get("t")
            if kind == "end":
                if obj.get("snapshots") != expected:
                    raise TraceError(f"{self.name}: the end marker counts "
                                     f"{_show(obj.get('snapshots'))} snapshots, the file "
                                     f"holds {expected}")
                self.complete = True
                reason = obj.get("reason")
                self.end_reason = reason if isinstance(reason, str) else None
                continue
            if kind != "snap":
                raise TraceError(f"{self.name}: record {expected + 1} has an unknown type "
                                 f"{_show(kind)}")
            if obj.get("i") != expected:
                raise TraceError(f"{self.name}: record {expected + 1} is numbered "
                                 f"{_show(obj.get('i'))}: records are missing or repeated")
            try:
                wall = _int(obj.get("wall_ns"))
                snapshot, items = decode_snapshot(
                    obj, previous if self.header.delta else None)
            except _Bad as e:
                raise TraceError(f"{self.name}: record {expected + 1}: {e}") from None
            except (TypeError, ValueError, RecursionError) as e:
                raise TraceError(f"{self.name}: record {expected + 1}: {e}") from None
            previous = items
            expected += 1
            yield TraceRecord(expected - 1, wall, snapshot)
        if not self.complete:
            self.truncated = True


def open_trace(path: str) -> tuple[TraceReader, IO[bytes]]:
    """A reader on ``path`` and the file to close; TraceError (or OSError
    naming the file) if it cannot be read as a trace."""
    raw = open(path, "rb")  # noqa: SIM115 (handed to the caller)
    try:
        return TraceReader(raw, path), raw
    except BaseException:
        raw.close()
        raise


def read_trace(path: str) -> tuple[TraceHeader, list[TraceRecord], bool]:
    """The whole trace in memory: header, records, and whether it is complete."""
    reader, raw = open_trace(path)
    with raw:
        records = list(reader)
    return reader.header, records, reader.complete


@dataclass
class TraceStats:
    """What a recorder reports: snapshots, tasks, bytes."""

    snapshots: int = 0
    tasks: int = 0
    bytes_written: int = 0
    seconds: list[float] = field(default_factory=list)
    #: Bytes (the header included) and tasks once the first snapshot was written.
    first_bytes: int = 0
    first_tasks: int = 0

    @property
    def steady_bytes_per_kilotask(self) -> float | None:
        """Bytes per snapshot per 1,000 tasks after the first snapshot (which
        holds every item in full, after the header): what a long recording
        costs. None before a second snapshot."""
        tasks = self.tasks - self.first_tasks
        if self.snapshots < 2 or tasks <= 0:
            return None
        return (self.bytes_written - self.first_bytes) * 1000 / tasks
