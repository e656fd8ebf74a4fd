"""Property tests for every parser in oomwarden.sources.parse.

Two kinds of property per parser:

* robustness: arbitrary bytes (and near-miss, kernel-shaped bytes) either
  parse or raise :class:`ParseError`; nothing else escapes;
* round trip: well-formed text generated here in the kernel's own format
  (hostile command names, escaped mount paths, PSI averages, ...) parses back
  to the values it was made from.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from oomwarden.errors import OomwardenError, ParseError
from oomwarden.model import HierarchyKind, OomControl, PsiLine
from oomwarden.sources.parse import (
    _parse_status_lines,
    parse_flat_keyed,
    parse_limit,
    parse_meminfo,
    parse_mountinfo,
    parse_oom_control,
    parse_oom_score_adj,
    parse_proc_cgroup,
    parse_psi,
    parse_single_int,
    parse_stat,
    parse_status,
    v1_controllers,
)

from treebuilder import (
    PF_KTHREAD,
    Mount,
    escape_mount_path,
    meminfo_text,
    mountinfo_text,
    stat_line,
    status_text,
)

PROPS = settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
FUZZ = settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)

UNLIMITED = 9223372036854771712
U64 = st.integers(min_value=0, max_value=2**64 - 1)
KB = st.integers(min_value=0, max_value=2**40)

# --------------------------------------------------------------------- fuzzing

#: Tokens the parsers look for, to steer random input into the deeper branches.
_TOKENS = [
    b"(", b")", b" ", b"\t", b"\n", b"\r", b":", b"=", b"-", b",", b"0", b"1", b"-1",
    b"18446744073709551615", b"9" * 30, b"1e5", b"nan", b"inf", b"1.5", b"100.01", b"kB",
    b"max", b"some", b"full", b"avg10", b"avg60", b"avg300", b"total", b"MemTotal",
    b"MemAvailable", b"SwapTotal", b"SwapFree", b"VmRSS", b"RssAnon", b"Kthread", b"Uid",
    b"oom_kill_disable", b"under_oom", b"oom_kill", b"cgroup", b"cgroup2", b"memory",
    b"0::/", b"4:memory:/a", b"\\040", b"\\134", b"\\", b"\xff", b"\x00", b"\xc3\xa9",
    b"S", b"Z", b"/", b"1_0", b" - ", b"\x0b", b"\x0c",
]
FUZZ_BYTES = st.one_of(
    st.binary(max_size=400),
    st.lists(st.sampled_from(_TOKENS) | st.binary(max_size=4), max_size=60).map(b"".join),
)


def only_parse_error(fn: Callable[[bytes], Any], data: bytes) -> None:
    try:
        fn(data)
    except ParseError as e:
        assert isinstance(e, OomwardenError) and isinstance(e, ValueError)
        assert str(e)


def _mutations(valid: bytes) -> st.SearchStrategy[bytes]:
    """Valid text with a random slice replaced, cut or duplicated."""

    @st.composite
    def mutate(draw: st.DrawFn) -> bytes:
        if not valid:
            return draw(FUZZ_BYTES)
        i = draw(st.integers(0, len(valid)))
        j = draw(st.integers(i, min(len(valid), i + 40)))
        repl = draw(st.sampled_from(_TOKENS) | st.binary(max_size=6))
        return valid[:i] + repl + valid[j:]

    return mutate()


_STAT = stat_line(4242, b"a) (b\n\xff", state="S", ppid=1, start_ticks=38608)
_STATUS = status_text(4242, b"bash", rss_anon_kb=1172, rss_file_kb=3072, rss_shmem_kb=0,
                      pte_kb=48, swap_kb=0)
_MEMINFO = meminfo_text(24731708, 23599224, 2097148, 1987132)
_PSI = (b"some avg10=0.00 avg60=0.00 avg300=0.00 total=1988\n"
        b"full avg10=0.00 avg60=0.00 avg300=0.00 total=1411\n")
_MOUNTINFO = (b"35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n"
              b"41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n")
_CGROUP = b"9:name=systemd:/\n4:memory:/process_api/x\n0::/\n"
_FLAT = b"anon 3493888\nfile 1163264\noom_kill 0\n"
_OOM = b"oom_kill_disable 0\nunder_oom 0\noom_kill 0\n"


#: Every parser with a valid sample of what the kernel writes for it.
PARSERS: list[tuple[str, Callable[[bytes], Any], bytes]] = [
    ("stat", parse_stat, _STAT),
    ("status", parse_status, _STATUS),
    ("meminfo", parse_meminfo, _MEMINFO),
    ("psi", parse_psi, _PSI),
    ("memory.stat", lambda d: parse_flat_keyed(d, "memory.stat"), _FLAT),
    ("memory.events", lambda d: parse_flat_keyed(d, "memory.events"), _FLAT),
    ("oom_control", parse_oom_control, _OOM),
    ("mountinfo", parse_mountinfo, _MOUNTINFO),
    ("proc cgroup", parse_proc_cgroup, _CGROUP),
    ("oom_score_adj", parse_oom_score_adj, b"-1000\n"),
    ("single int", lambda d: parse_single_int(d, "memory.current"), b"4096\n"),
]


@pytest.mark.parametrize(("name", "parse", "valid"), PARSERS, ids=[p[0] for p in PARSERS])
@FUZZ
@given(data=st.data())
def test_random_input_parses_or_raises_parse_error(
    name: str, parse: Callable[[bytes], Any], valid: bytes, data: st.DataObject
) -> None:
    """Random bytes, and the kernel's own text with a slice replaced, cut or
    repeated: the parser returns or raises ParseError, nothing else."""
    only_parse_error(parse, data.draw(st.one_of(FUZZ_BYTES, _mutations(valid)), label=name))


@pytest.mark.parametrize(("name", "parse", "valid"), PARSERS, ids=[p[0] for p in PARSERS])
def test_huge_numbers_raise_parse_error(
    name: str, parse: Callable[[bytes], Any], valid: bytes
) -> None:
    """int() refuses more than 4,300 digits with a plain ValueError: every
    number of every sample, grown past that, must still end in ParseError."""
    digits = re.compile(rb"\d+")
    for m in digits.finditer(valid):
        grown = valid[: m.start()] + b"7" * 5000 + valid[m.end():]
        only_parse_error(parse, grown)


@FUZZ
@given(st.one_of(FUZZ_BYTES, _mutations(b"9223372036854771712\n"), _mutations(b"max\n")))
def test_limit_fuzz(data: bytes) -> None:
    try:
        value = parse_limit(data, "memory.max", UNLIMITED)
    except ParseError:
        return
    assert value >= 0


@FUZZ
@given(st.one_of(FUZZ_BYTES, _mutations(b"-1000\n")))
def test_single_int_fuzz(data: bytes) -> None:
    only_parse_error(lambda d: parse_single_int(d, "oom_score_adj"), data)


# ------------------------------------------------------------------------ stat

COMM = st.binary(min_size=0, max_size=64)
STATE = st.sampled_from("RSDTtXZPI")


@PROPS
@given(
    pid=st.integers(1, 2**22),
    comm=COMM,
    state=STATE,
    ppid=st.integers(0, 2**22),
    flags=st.integers(0, 2**32 - 1),
    num_threads=st.integers(1, 2**16),
    start_ticks=U64,
    rss_pages=U64,
)
@example(pid=21620, comm=b"a) (b\n\xff", state="S", ppid=21578, flags=0x400040,
         num_threads=1, start_ticks=38608, rss_pages=15036)
@example(pid=1, comm=b") S 2 3 4 5 6 7", state="Z", ppid=0, flags=PF_KTHREAD,
         num_threads=1, start_ticks=0, rss_pages=0)
@example(pid=7, comm=b"", state="R", ppid=1, flags=0, num_threads=1, start_ticks=1,
         rss_pages=0)
def test_stat_round_trip(
    *,
    pid: int, comm: bytes, state: str, ppid: int, flags: int, num_threads: int,
    start_ticks: int, rss_pages: int,
) -> None:
    line = stat_line(pid, comm, state=state, ppid=ppid, flags=flags, num_threads=num_threads,
                     start_ticks=start_ticks, rss_pages=rss_pages)
    st_ = parse_stat(line)
    assert (st_.pid, st_.comm, st_.state, st_.ppid) == (pid, comm, state, ppid)
    assert (st_.flags, st_.num_threads, st_.start_ticks) == (flags, num_threads, start_ticks)
    assert st_.kthread == bool(flags & PF_KTHREAD)


def test_stat_live_line_hostile_comm() -> None:
    """A line recorded from the live kernel (PR_SET_NAME b'a) (b\\n\\xff')."""
    line = (
        b"21620 (a) (b\n\xff) S 21578 21572 5039 0 -1 4194368 12586 0 0 0 1 4 0 0 20 0 1 0 "
        b"38608 67616768 14999 18446744073709551615 94143321571328 94143321571669 "
        b"140723177715040 0 0 0 0 16781319 0 1 0 0 17 0 0 0 0 0 0 94143321583024 "
        b"94143321583640 94143910424576 140723177720052 140723177720102 140723177720102 "
        b"140723177721807 0\n"
    )
    s = parse_stat(line)
    assert s.pid == 21620 and s.comm == b"a) (b\n\xff" and s.state == "S"
    assert s.ppid == 21578 and s.flags == 4194368 and not s.kthread
    assert s.num_threads == 1 and s.start_ticks == 38608


@pytest.mark.parametrize(
    "line",
    [
        b"",
        b"1 comm S 0",  # no parentheses
        b"1 )x( S " + b"0 " * 30,  # ')' before '('
        b"1 (x) S " + b"0 " * 10,  # too few fields
        b"x (init) S " + b"0 " * 30,  # pid not a number
        b"1 (init) \xff " + b"0 " * 30,  # state not ASCII
        b"1 (init) S 0 0 0 0 0 flags " + b"0 " * 20,
    ],
)
def test_stat_malformed(line: bytes) -> None:
    with pytest.raises(ParseError):
        parse_stat(line)


# ---------------------------------------------------------------------- status

MEM_KB = st.integers(0, 2**36)


@PROPS
@given(
    pid=st.integers(1, 2**22),
    comm=COMM,
    state=STATE,
    ppid=st.integers(0, 2**22),
    uid=st.integers(0, 2**32 - 2),
    kthread=st.booleans(),
    mem=st.none() | st.tuples(MEM_KB, MEM_KB, MEM_KB, MEM_KB, MEM_KB),
    threads=st.integers(1, 1000),
)
@example(pid=5, comm=b"x\nVmRSS:\t 100 kB", state="Z", ppid=1, uid=0, kthread=False,
         mem=None, threads=1)
@example(pid=5, comm=b"a) (b\n\xff\\n", state="S", ppid=1, uid=1000, kthread=False,
         mem=(1, 2, 3, 4, 5), threads=3)
def test_status_round_trip(
    *,
    pid: int, comm: bytes, state: str, ppid: int, uid: int, kthread: bool,
    mem: tuple[int, int, int, int, int] | None, threads: int,
) -> None:
    anon, file, shmem, pte, swap = mem if mem is not None else (None,) * 5
    text = status_text(pid, comm, state, ppid, uid=uid, kthread=kthread, rss_anon_kb=anon,
                       rss_file_kb=file, rss_shmem_kb=shmem, pte_kb=pte, swap_kb=swap,
                       num_threads=threads)
    s = parse_status(text)
    assert (s.tgid, s.ppid, s.uid, s.kthread) == (pid, ppid, uid, kthread)
    assert s.has_mm == (mem is not None)
    assert (s.rss_anon_kb, s.rss_file_kb, s.rss_shmem_kb, s.pte_kb, s.swap_kb) == (
        anon, file, shmem, pte, swap
    )


def test_status_without_kthread_line_is_unknown() -> None:
    s = parse_status(b"Name:\tbash\nTgid:\t7\nPPid:\t1\nUid:\t0\t0\t0\t0\n")
    assert s.kthread is None and not s.has_mm and s.rss_anon_kb is None and s.tgid == 7


@pytest.mark.parametrize(
    "text", [b"VmRSS:\n", b"VmRSS:\t   x kB\n", b"Tgid:\t\n", b"Uid:\tabc\t0\n"]
)
def test_status_malformed(text: bytes) -> None:
    with pytest.raises(ParseError):
        parse_status(b"Name:\tbash\n" + text)


# --------------------------------------------------------------------- meminfo


@st.composite
def meminfo_values(draw: st.DrawFn) -> tuple[int, int | None, int, int]:
    total = draw(KB)
    avail = draw(st.none() | st.integers(0, total))
    swap_total = draw(KB)
    swap_free = draw(st.integers(0, swap_total))
    return total, avail, swap_total, swap_free


@PROPS
@given(meminfo_values())
@example((24731708, 23599224, 0, 0))
@example((0, 0, 0, 0))
def test_meminfo_round_trip(values: tuple[int, int | None, int, int]) -> None:
    total, avail, swap_total, swap_free = values
    info = parse_meminfo(meminfo_text(total, avail, swap_total, swap_free))
    assert info.mem_total == total * 1024
    assert info.mem_available == (None if avail is None else avail * 1024)
    assert info.swap_total == swap_total * 1024
    assert info.swap_free == swap_free * 1024


@PROPS
@given(total=KB, excess=st.integers(1, 2**30))
def test_meminfo_available_above_total_is_rejected(total: int, excess: int) -> None:
    with pytest.raises(ParseError, match=r"MemAvailable \(\d+\) cannot exceed MemTotal"):
        parse_meminfo(meminfo_text(total, total + excess))


@PROPS
@given(swap_total=KB, excess=st.integers(1, 2**30))
def test_meminfo_swap_free_above_total_is_rejected(swap_total: int, excess: int) -> None:
    with pytest.raises(ParseError, match="SwapFree"):
        parse_meminfo(meminfo_text(1024, 512, swap_total, swap_total + excess))


@pytest.mark.parametrize("missing", [b"MemTotal", b"SwapTotal", b"SwapFree"])
def test_meminfo_missing_line(missing: bytes) -> None:
    text = b"\n".join(
        line for line in _MEMINFO.splitlines() if not line.startswith(missing + b":")
    )
    with pytest.raises(ParseError, match=missing.decode()):
        parse_meminfo(text)


@pytest.mark.parametrize(
    "line",
    [
        b"MemTotal:       -5 kB",
        b"MemTotal:       5 MB",
        b"MemTotal:       5 kB extra",
        b"MemTotal:",
        b"Mem\xffTotal:  5 kB",
    ],
)
def test_meminfo_malformed(line: bytes) -> None:
    with pytest.raises(ParseError):
        parse_meminfo(_MEMINFO + line + b"\n")


# ------------------------------------------------------------------------- PSI

HUNDREDTHS = st.integers(0, 10000)
PSI_VALUES = st.tuples(HUNDREDTHS, HUNDREDTHS, HUNDREDTHS, st.integers(0, 2**63 - 1))


def _psi_line(kind: str, v: tuple[int, int, int, int]) -> str:
    names = ("avg10", "avg60", "avg300")
    avgs = " ".join(f"{n}={x // 100}.{x % 100:02d}" for n, x in zip(names, v[:3], strict=True))
    return f"{kind} {avgs} total={v[3]}\n"


@PROPS
@given(some=PSI_VALUES, full=st.none() | PSI_VALUES)
@example(some=(0, 0, 0, 0), full=(0, 0, 0, 0))
@example(some=(10000, 10000, 10000, 2**63 - 1), full=None)
def test_psi_round_trip(
    some: tuple[int, int, int, int], full: tuple[int, int, int, int] | None
) -> None:
    text = _psi_line("some", some) + ("" if full is None else _psi_line("full", full))
    p = parse_psi(text.encode(), "memory.pressure")

    def expect(v: tuple[int, int, int, int]) -> PsiLine:
        return PsiLine(v[0] / 100, v[1] / 100, v[2] / 100, v[3])

    assert p.some == expect(some)
    assert p.full == (None if full is None else expect(full))


@pytest.mark.parametrize(
    "text",
    [
        b"",
        b"full avg10=0.00 avg60=0.00 avg300=0.00 total=0\n",  # no some line
        b"some avg10=100.01 avg60=0.00 avg300=0.00 total=0\n",
        b"some avg10=-0.01 avg60=0.00 avg300=0.00 total=0\n",
        b"some avg10=nan avg60=0.00 avg300=0.00 total=0\n",
        b"some avg10=0.00 avg60=0.00 avg300=0.00 total=-1\n",
        b"some avg10=0.00 avg60=0.00 total=0\n",
        b"some avg10=0.00 avg60=0.00 avg300=0.00 total\n",
        b"some avg10=0.00 avg60=0.00 avg300=0.00 total=1.5\n",
        b"half avg10=0.00 avg60=0.00 avg300=0.00 total=0\n",
    ],
)
def test_psi_malformed(text: bytes) -> None:
    with pytest.raises(ParseError):
        parse_psi(text)


# ----------------------------------------------------- memory.stat / memory.events

KEY = st.text("abcdefghijklmnopqrstuvwxyz_0123456789", min_size=1, max_size=30)


@PROPS
@given(st.dictionaries(KEY, st.integers(-(2**63), 2**64 - 1), max_size=20))
def test_flat_keyed_round_trip(values: dict[str, int]) -> None:
    text = "".join(f"{k} {v}\n" for k, v in values.items()).encode()
    assert parse_flat_keyed(text, "memory.stat") == values


def test_flat_keyed_memory_events() -> None:
    text = b"low 0\nhigh 12\nmax 57\noom 2\noom_kill 2\noom_group_kill 1\n"
    assert parse_flat_keyed(text, "memory.events") == {
        "low": 0, "high": 12, "max": 57, "oom": 2, "oom_kill": 2, "oom_group_kill": 1,
    }


@pytest.mark.parametrize("text", [b"anon\n", b"anon 1 2\n", b"anon x\n", b"\xff 1\n"])
def test_flat_keyed_malformed(text: bytes) -> None:
    with pytest.raises(ParseError, match=r"memory\.events"):
        parse_flat_keyed(text, "memory.events")


# ------------------------------------------------------------------ oom_control


@PROPS
@given(disable=st.booleans(), under=st.booleans(), kills=st.none() | st.integers(0, 2**32))
def test_oom_control_round_trip(disable: bool, under: bool, kills: int | None) -> None:
    text = f"oom_kill_disable {int(disable)}\nunder_oom {int(under)}\n"
    if kills is not None:
        text += f"oom_kill {kills}\n"
    assert parse_oom_control(text.encode()) == OomControl(disable, under, kills)


@pytest.mark.parametrize("text", [b"under_oom 0\n", b"oom_kill_disable 0\n", b""])
def test_oom_control_missing_key(text: bytes) -> None:
    with pytest.raises(ParseError, match="missing"):
        parse_oom_control(text)


# -------------------------------------------------------------------- mountinfo

#: A path component as a directory name may hold it: any byte but '/' and NUL.
PATH_BYTES = st.lists(
    st.binary(min_size=1, max_size=8).filter(lambda b: b"/" not in b and b"\0" not in b),
    max_size=4,
).map(lambda parts: b"/" + b"/".join(parts))
FSTYPE = st.sampled_from(["cgroup", "cgroup2", "tmpfs", "ext4", "proc", "sysfs", "cgroupfs"])
OPTION = st.text("abcdefghijklmnopqrstuvwxyz_=.0123456789", min_size=1, max_size=12)


@st.composite
def mounts(draw: st.DrawFn) -> list[Mount]:
    out = []
    for i in range(draw(st.integers(0, 6))):
        out.append(
            Mount(
                mount_id=draw(st.integers(0, 10**6)),
                parent_id=draw(st.integers(0, 10**6)),
                dev=f"0:{i}",
                root=draw(PATH_BYTES),
                mount_point=draw(PATH_BYTES),
                options="rw,relatime",
                fstype=draw(FSTYPE),
                source=draw(st.sampled_from(["cgroup", "cgroup2", "none", "/dev/vda"])),
                super_options=",".join(draw(st.lists(OPTION, min_size=1, max_size=5))),
                optional=tuple(
                    draw(st.lists(st.sampled_from(["shared:4", "master:1", "unbindable"]),
                                  max_size=2))
                ),
            )
        )
    return out


def _decoded(path: bytes) -> str:
    return path.decode("utf-8", "surrogateescape")


# The first example is the live machine's hierarchies; the second a mount point
# with a carriage return, which the kernel does not escape in mountinfo (only
# space, tab, newline and backslash are), so it must survive the line split.
@PROPS
@given(mounts())
@example([
    Mount(35, 31, "0:32", b"/", b"/sys/fs/cgroup/memory", "rw,relatime", "cgroup", "cgroup",
          "rw,memory"),
    Mount(41, 31, "0:38", b"/", b"/sys/fs/cgroup/unified", "rw,relatime", "cgroup2",
          "cgroup2", "rw"),
])
@example([
    Mount(35, 31, "0:32", b"/", b"/mnt/a\rb", "rw", "tmpfs", "tmpfs", "rw"),
    Mount(41, 31, "0:38", b"/", b"/sys/fs/cgroup", "rw", "cgroup2", "cgroup2", "rw"),
])
def test_mountinfo_round_trip(ms: list[Mount]) -> None:
    entries = parse_mountinfo(mountinfo_text(ms))
    wanted = [m for m in ms if m.fstype in ("cgroup", "cgroup2")]
    assert len(entries) == len(wanted)
    for e, m in zip(entries, wanted, strict=True):
        assert e.kind is (HierarchyKind.V1 if m.fstype == "cgroup" else HierarchyKind.V2)
        assert e.root == _decoded(m.root)
        assert e.mount_point == _decoded(m.mount_point)
        assert e.super_options == tuple(m.super_options.split(","))


def test_mountinfo_escapes() -> None:
    path = b"/mnt/with space\tand\nnewline\\back\xff"
    line = Mount(7, 1, "0:1", b"/a b", path, "rw", "cgroup", "cgroup", "rw,memory").line()
    assert b" " not in escape_mount_path(path)
    [e] = parse_mountinfo(line + b"\n")
    assert e.mount_point == _decoded(path) and e.root == "/a b"
    assert v1_controllers(e.super_options) == ("memory",)


def test_mountinfo_v1_controllers() -> None:
    assert v1_controllers(("rw", "name=systemd")) == ()
    assert v1_controllers(("rw", "cpu", "cpuacct")) == ("cpu", "cpuacct")


@pytest.mark.parametrize(
    "line",
    [
        b"35 31 0:32 / /sys/fs/cgroup/memory rw,relatime cgroup cgroup rw,memory",  # no ' - '
        b"35 31 0:32 / - cgroup cgroup rw",  # separator too early
        b"35 31 0:32 / /m rw - cgroup cgroup",  # no super options
        b"x 31 0:32 / /m rw - cgroup cgroup rw",  # mount id
    ],
)
def test_mountinfo_malformed(line: bytes) -> None:
    with pytest.raises(ParseError):
        parse_mountinfo(line + b"\n")


# ----------------------------------------------------------------- /proc/PID/cgroup

#: A cgroup path as /proc/PID/cgroup prints it: raw bytes (no escaping). A
#: newline in a cgroup name is inherently ambiguous there and is left out; a
#: carriage return is not.
CG_PATH = st.lists(
    st.binary(min_size=1, max_size=8).filter(
        lambda b: b"/" not in b and b"\0" not in b and b"\n" not in b
    ),
    max_size=4,
).map(lambda parts: b"/" + b"/".join(parts))
V1_SETS = st.sampled_from(
    [b"memory", b"cpu,cpuacct", b"name=systemd", b"pids", b"memory,swap", b"blkio"]
)


@st.composite
def proc_cgroup(draw: st.DrawFn) -> tuple[bytes, bytes | None, bytes | None]:
    lines = []
    memcg: bytes | None = None
    unified: bytes | None = None
    for i, ctrl in enumerate(draw(st.lists(V1_SETS, max_size=6, unique=True)), start=1):
        path = draw(CG_PATH)
        lines.append(b"%d:%s:%s" % (i, ctrl, path))
        if b"memory" in ctrl.split(b","):
            memcg = path
    if draw(st.booleans()):
        unified = draw(CG_PATH)
        lines.append(b"0::" + unified)
    return b"".join(line + b"\n" for line in lines), memcg, unified


@PROPS
@given(proc_cgroup())
@example((b"4:memory:/process_api/ef4818f338df58c588b38e13dd105152\n0::/\n",
          b"/process_api/ef4818f338df58c588b38e13dd105152", b"/"))
@example((b"0::/user.slice/a:b c\xff\n", None, b"/user.slice/a:b c\xff"))
@example((b"4:memory:/user.slice/a\rb\n0::/user.slice/a\rb\n",
          b"/user.slice/a\rb", b"/user.slice/a\rb"))
def test_proc_cgroup_round_trip(case: tuple[bytes, bytes | None, bytes | None]) -> None:
    text, memcg, unified = case
    got = parse_proc_cgroup(text)
    assert got == (
        None if memcg is None else _decoded(memcg),
        None if unified is None else _decoded(unified),
    )


@pytest.mark.parametrize("text", [b"4:memory\n", b"x:memory:/\n", b"/a\n"])
def test_proc_cgroup_malformed(text: bytes) -> None:
    with pytest.raises(ParseError):
        parse_proc_cgroup(text)


# ------------------------------------------------------------- limits, single ints


@PROPS
@given(value=st.integers(0, 2**64 - 1), nl=st.sampled_from([b"", b"\n", b" \n"]))
def test_limit_round_trip(value: int, nl: bytes) -> None:
    assert parse_limit(b"%d%s" % (value, nl), "memory.max", UNLIMITED) == value


@pytest.mark.parametrize("text", [b"max", b"max\n", b" max \n"])
def test_limit_max_is_unlimited(text: bytes) -> None:
    assert parse_limit(text, "memory.max", UNLIMITED) == UNLIMITED


@PROPS
@given(st.integers(-(2**64), -1))
def test_limit_negative_rejected(value: int) -> None:
    with pytest.raises(ParseError, match=r"memory\.high"):
        parse_limit(b"%d\n" % value, "memory.high", UNLIMITED)


@pytest.mark.parametrize("text", [b"", b"MAX\n", b"1k\n", b"max max\n", b"0x10\n"])
def test_limit_malformed(text: bytes) -> None:
    with pytest.raises(ParseError):
        parse_limit(text, "memory.max", UNLIMITED)


@PROPS
@given(
    value=st.integers(-(2**64), 2**64),
    pad=st.tuples(st.sampled_from([b"", b" ", b"\t"]), st.sampled_from([b"", b"\n", b" \n"])),
)
def test_single_int_round_trip(value: int, pad: tuple[bytes, bytes]) -> None:
    assert parse_single_int(pad[0] + b"%d" % value + pad[1], "oom_score_adj") == value


@pytest.mark.parametrize("text", [b"", b"\n", b"1 2\n", b"abc", b"\xff", b"1.0"])
def test_single_int_malformed(text: bytes) -> None:
    with pytest.raises(ParseError, match="oom_score_adj"):
        parse_single_int(text, "oom_score_adj")



@PROPS
@given(
    pid=st.integers(1, 2**22),
    mem=st.none() | st.tuples(MEM_KB, MEM_KB, MEM_KB, MEM_KB, MEM_KB),
    kthread=st.booleans(),
    edits=st.lists(st.tuples(st.sampled_from(["drop", "dup", "swap"]), st.integers(0, 60)),
                   max_size=4),
)
def test_status_fast_path_agrees_with_the_reference(
    *, pid: int, mem: tuple[int, int, int, int, int] | None, kthread: bool,
    edits: list[tuple[str, int]],
) -> None:
    """parse_status takes a regex fast path for the kernel's layout; on any
    layout (lines dropped, repeated, reordered) it must give what the
    line-by-line reference parser gives, or raise ParseError where it does."""
    anon, file, shmem, pte, swap = mem if mem is not None else (None,) * 5
    lines = status_text(pid, b"job", "S", 1, uid=1000, kthread=kthread, rss_anon_kb=anon,
                        rss_file_kb=file, rss_shmem_kb=shmem, pte_kb=pte,
                        swap_kb=swap).split(b"\n")
    for op, at in edits:
        i = at % len(lines)
        if op == "drop":
            del lines[i]
        elif op == "dup":
            lines.insert(i, lines[i])
        else:
            j = (i + 1) % len(lines)
            lines[i], lines[j] = lines[j], lines[i]
    text = b"\n".join(lines)
    try:
        expected: Any = _parse_status_lines(text)
    except ParseError:
        expected = ParseError
    try:
        got: Any = parse_status(text)
    except ParseError:
        got = ParseError
    assert got == expected
