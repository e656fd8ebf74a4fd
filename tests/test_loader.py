"""Python policy modules: ``oomwarden.policy.loader.load_module``.

Every way a policy file can be wrong is one line naming the file (and the
line or the hook); loaded as root, a file (or its directory) that someone
else could change is refused, as sudo refuses such files. These tests run as
root (here and in CI): the ownership checks are exercised for real.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import textwrap
import time
from pathlib import Path

import pytest

from oomwarden.errors import PolicyError
from oomwarden.model import Snapshot, SystemMemory, Task
from oomwarden.policy import loader
from oomwarden.policy.api import DEFAULT, IGNORE, Policy, Verdict
from oomwarden.policy.decide import decide
from oomwarden.policy.engine import kernel_decision, system_domain
from oomwarden.policy.loader import load_module

PYPOLICIES = Path(__file__).parent / "fixtures" / "pypolicies"
DOC = Path(__file__).parent.parent / "docs" / "python-policies.md"

as_root = pytest.mark.skipif(os.geteuid() != 0, reason="ownership checks apply as root only")

OK_BODY = """
from oomwarden.policy.api import DEFAULT

def evaluate(task, ctx):
    return DEFAULT
"""


def write(directory: Path, text: str, name: str = "policy.py", mode: int = 0o644) -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(text))
    path.chmod(mode)
    return path


def refused(path: Path | str, *needles: str, **kw: object) -> str:
    """The one-line PolicyError for ``path``, holding the file name and needles."""
    with pytest.raises(PolicyError) as info:
        load_module(str(path), **kw)  # type: ignore[arg-type]
    message = str(info.value)
    assert "\n" not in message, message
    assert str(path) in message, message
    for needle in needles:
        assert needle in message, message
    return message


def task(pid: int, rss: int, **kw: object) -> Task:
    base: dict[str, object] = {
        "pid": pid, "tgid": pid, "ppid": 1, "comm": f"p{pid}", "state": "S",
        "start_ticks": 1000 + pid, "uid": 0, "kthread": False, "has_mm": True,
        "rss_anon": rss, "rss_file": 0, "rss_shmem": 0, "swap": 0, "pgtables": 10,
        "oom_score_adj": 0, "global_init": pid == 1,
    }
    base.update(kw)
    return Task(**base)  # type: ignore[arg-type]


SNAP = Snapshot(
    taken_ns=0,
    system=SystemMemory(mem_total=1_000_000 * 4096, mem_available=None, swap_total=0,
                        swap_free=0, pressure=None),
    tasks=(task(1, 50_000), task(100, 1_000), task(200, 30_000, comm="postgres"),
           task(300, 20_000)),
)


# ------------------------------------------------------------------ a good file


def test_loads_evaluate_with_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, '"""Protect postgres.\n\nMore words."""\n' + textwrap.dedent("""
        from oomwarden.policy.api import DEFAULT, IGNORE

        def evaluate(task, ctx):
            return IGNORE if task.comm == "postgres" else DEFAULT
    """))
    policy = load_module(str(path))
    assert isinstance(policy, Policy)
    assert policy.name == "policy.py"  # no NAME: the file's name
    assert policy.victim == "process" and policy.needs_history is False
    assert policy.handle is None and policy.evaluate is not None and not policy.kernel
    assert policy.description == "Protect postgres."
    assert policy.evaluate(SNAP.tasks[2], None) is IGNORE  # type: ignore[arg-type]
    d = decide(SNAP, system_domain(SNAP), policy)
    assert d.fallback is None and d.victim is not None and d.victim.task.pid == 300


def test_settings_are_read(tmp_path: Path) -> None:
    path = write(tmp_path, """
        from oomwarden.policy.api import KillProcess

        NAME = "my-policy"
        VICTIM = "cgroup"
        NEEDS_HISTORY = True

        def handle(event, ctx):
            return []
    """)
    policy = load_module(str(path))
    assert (policy.name, policy.victim, policy.needs_history) == ("my-policy", "cgroup", True)
    assert policy.evaluate is None and policy.handle is not None


@pytest.mark.parametrize("victim", ["process", "tree", "cgroup"])
def test_every_victim_kind(tmp_path: Path, victim: str) -> None:
    path = write(tmp_path, OK_BODY + f"\nVICTIM = {victim!r}\n")
    assert load_module(str(path)).victim == victim


def test_both_hooks(tmp_path: Path) -> None:
    path = write(tmp_path, OK_BODY + "\ndef handle(event, ctx):\n    return None\n")
    policy = load_module(str(path))
    assert policy.evaluate is not None and policy.handle is not None


def test_a_hook_set_to_none_is_absent(tmp_path: Path) -> None:
    policy = load_module(str(write(tmp_path, OK_BODY + "\nhandle = None\n")))
    assert policy.handle is None and policy.evaluate is not None


@pytest.mark.parametrize(
    "definition",
    [
        "def evaluate(task, ctx):\n    return DEFAULT",
        "def evaluate(t, c, /):\n    return DEFAULT",  # positional-only
        "def evaluate(task, ctx, *, k=1):\n    return DEFAULT",
        "def evaluate(task, ctx, **kw):\n    return DEFAULT",
        "evaluate = lambda task, ctx: DEFAULT",
        "class _P:\n    def run(self, task, ctx):\n        return DEFAULT\nevaluate = _P().run",
        "import functools\ndef _f(x, task, ctx):\n    return DEFAULT\n"
        "evaluate = functools.partial(_f, 1)",
    ],
)
def test_accepted_signatures(tmp_path: Path, definition: str) -> None:
    path = write(tmp_path, "from oomwarden.policy.api import DEFAULT\n" + definition + "\n")
    policy = load_module(str(path))
    assert policy.evaluate is not None and policy.evaluate(SNAP.tasks[1], None) is DEFAULT  # type: ignore[arg-type]


def test_each_load_is_a_fresh_module_not_left_in_sys_modules(tmp_path: Path) -> None:
    path = write(tmp_path, """
        from oomwarden.policy.api import DEFAULT
        import sys
        SEEN = []
        IN_SYS_MODULES = __name__ in sys.modules

        def evaluate(task, ctx):
            SEEN.append(task.pid)
            return DEFAULT
    """)
    before = set(sys.modules)
    a, b = load_module(str(path)), load_module(str(path))
    assert set(sys.modules) == before
    assert a.evaluate is not None and b.evaluate is not None
    ga = a.evaluate.__globals__  # type: ignore[attr-defined]
    gb = b.evaluate.__globals__  # type: ignore[attr-defined]
    assert ga is not gb and ga["__name__"] != gb["__name__"]
    assert ga["IN_SYS_MODULES"] is True  # while it ran (dataclasses need it)
    assert ga["__file__"] == str(path)
    a.evaluate(SNAP.tasks[1], None)  # type: ignore[arg-type]
    assert ga["SEEN"] == [100] and gb["SEEN"] == []


def test_no_pycache_is_written(tmp_path: Path) -> None:
    load_module(str(write(tmp_path, OK_BODY)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["policy.py"]


def test_a_policy_may_define_dataclasses(tmp_path: Path) -> None:
    path = write(tmp_path, "from __future__ import annotations\n" + OK_BODY + textwrap.dedent("""
        from dataclasses import dataclass, field

        @dataclass(frozen=True)
        class _Rule:
            comm: str
            points: int = 0
            tags: list[str] = field(default_factory=list)

        RULES = (_Rule("a"),)
    """))
    assert load_module(str(path)).evaluate is not None


def test_a_symlink_to_a_safe_file_loads(tmp_path: Path) -> None:
    target = write(tmp_path, OK_BODY)
    link = tmp_path / "link.py"
    link.symlink_to(target)
    assert load_module(str(link)).name == "link.py"


# ------------------------------------------------------------------- the file itself


def test_missing_file(tmp_path: Path) -> None:
    refused(tmp_path / "nope.py", "does not exist")
    refused(tmp_path / "no" / "dir" / "nope.py", "does not exist")


def test_a_directory_is_not_a_policy(tmp_path: Path) -> None:
    (tmp_path / "dir.py").mkdir()
    refused(tmp_path / "dir.py", "not a regular file", "directory")


def test_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.py"
    os.mkfifo(fifo)
    started = time.monotonic()
    refused(fifo, "not a regular file", "FIFO")
    assert time.monotonic() - started < 1.0


def test_a_device_is_refused() -> None:
    refused("/dev/null", "not a regular file", "character device")


def test_unreadable_path(tmp_path: Path) -> None:
    afile = write(tmp_path, OK_BODY)
    refused(f"{afile}/inner.py", "cannot be read", "Not a directory")


def test_empty_path() -> None:
    with pytest.raises(PolicyError, match="empty path"):
        load_module("")


def test_a_dangling_symlink(tmp_path: Path) -> None:
    link = tmp_path / "dangling.py"
    link.symlink_to(tmp_path / "gone.py")
    refused(link, "does not exist")


# --------------------------------------------------------------- ownership (as root)


@as_root
def test_world_writable_file_is_refused_as_root(tmp_path: Path) -> None:
    path = write(tmp_path, OK_BODY, mode=0o666)
    refused(path, "writable by group and others", "0666", "chmod go-w")


@as_root
@pytest.mark.parametrize(("mode", "who"), [(0o664, "group"), (0o646, "others")])
def test_group_or_other_writable_file_is_refused_as_root(
    tmp_path: Path, mode: int, who: str
) -> None:
    path = write(tmp_path, OK_BODY, mode=mode)
    message = refused(path, f"writable by {who}", f"{mode:04o}")
    assert " and " not in message.split("writable by")[1].split("(")[0]


@as_root
def test_file_owned_by_another_user_is_refused_as_root(tmp_path: Path) -> None:
    path = write(tmp_path, OK_BODY)
    os.chown(path, 1000, 1000)
    refused(path, "owned by uid 1000, not root")


@as_root
def test_safe_root_file_is_accepted(tmp_path: Path) -> None:
    path = write(tmp_path, OK_BODY, mode=0o644)
    assert path.stat().st_uid == 0
    assert load_module(str(path)).evaluate is not None
    # read-only for everyone is fine too
    path.chmod(0o400)
    assert load_module(str(path)).evaluate is not None


@as_root
def test_group_writable_directory_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "shared"
    d.mkdir()
    path = write(d, OK_BODY)
    d.chmod(0o777)
    refused(path, f"is in {d}", "writable by group and others", "0777")
    d.chmod(0o775)
    refused(path, "writable by group")


@as_root
def test_sticky_world_writable_directory_is_accepted(tmp_path: Path) -> None:
    """Like /tmp: others can add files but not replace root's."""
    d = tmp_path / "sticky"
    d.mkdir()
    path = write(d, OK_BODY)
    d.chmod(0o1777)
    assert load_module(str(path)).evaluate is not None


@as_root
def test_directory_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "home"
    d.mkdir(mode=0o755)
    path = write(d, OK_BODY)
    os.chown(d, 1000, 1000)
    refused(path, f"is in {d}", "owned by uid 1000")


@as_root
def test_symlink_checks_the_target_and_its_directory(tmp_path: Path) -> None:
    unsafe = tmp_path / "unsafe"
    unsafe.mkdir()
    target = write(unsafe, OK_BODY)
    unsafe.chmod(0o777)
    link = tmp_path / "link.py"
    link.symlink_to(target)
    refused(link, f"is in {unsafe}")
    # and a link kept in an unsafe directory (it could be swapped) is refused too
    safe_target = write(tmp_path, OK_BODY, name="safe.py")
    link2 = unsafe / "link2.py"
    link2.symlink_to(safe_target)
    refused(link2, f"is in {unsafe}")


@as_root
def test_target_owned_by_another_user_through_a_symlink(tmp_path: Path) -> None:
    target = write(tmp_path, OK_BODY, name="target.py")
    os.chown(target, 1000, 1000)
    link = tmp_path / "link.py"
    link.symlink_to(target)
    refused(link, "owned by uid 1000")


def test_checks_can_be_turned_off_and_follow_the_euid(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, OK_BODY, mode=0o666)
    if os.geteuid() == 0:
        os.chown(path, 1000, 1000)
    assert load_module(str(path), check_owner=False).evaluate is not None
    monkeypatch.setattr(loader.os, "geteuid", lambda: 1000)
    assert load_module(str(path)).evaluate is not None  # not root: not checked
    monkeypatch.setattr(loader.os, "geteuid", lambda: 0)
    with pytest.raises(PolicyError):
        load_module(str(path))


# ------------------------------------------------------------ compiling and running it


def test_syntax_error_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, "x = 1\n\ndef evaluate(task, ctx):\n    return (\n")
    refused(path, f"{path}:4:", "SyntaxError", "never closed")


def test_indentation_error_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, "def evaluate(task, ctx):\nreturn 1\n")
    refused(path, f"{path}:2:", "IndentationError")


def test_null_bytes(tmp_path: Path) -> None:
    path = tmp_path / "nul.py"
    path.write_bytes(b"x = 1\x00\n")
    path.chmod(0o644)
    refused(path, "null bytes")


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin.py"
    path.write_bytes(b"def evaluate(task, ctx):\n    return None\n\nCAFE = 'caf\xe9'\n")
    path.chmod(0o644)
    refused(path, f"{path}:4:", "SyntaxError", "utf-8")


def test_exception_at_import_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, """
        from oomwarden.policy.api import DEFAULT

        LIMITS = {"a": 1}
        WORST = LIMITS["b"]

        def evaluate(task, ctx):
            return DEFAULT
    """)
    refused(path, f"{path}:5:", "KeyError: 'b'")


def test_exception_in_a_function_called_at_import(tmp_path: Path) -> None:
    path = write(tmp_path, 'def _setup():\n    raise ValueError("two\\nlines")\n\n_setup()\n')
    refused(path, f"{path}:2:", "ValueError: two lines")


def test_import_of_a_missing_module(tmp_path: Path) -> None:
    path = write(tmp_path, "import no_such_module_here\n" + OK_BODY)
    refused(path, f"{path}:1:", "ModuleNotFoundError", "no_such_module_here")


def test_relative_imports_are_not_supported(tmp_path: Path) -> None:
    write(tmp_path, "X = 1\n", name="helper.py")
    path = write(tmp_path, "from . import helper\n" + OK_BODY)
    refused(path, f"{path}:1:", "relative imports are not supported")


def test_sibling_files_are_not_importable(tmp_path: Path) -> None:
    """The policy's directory is not put on sys.path."""
    write(tmp_path, "X = 1\n", name="helper_policy_sibling.py")
    path = write(tmp_path, "import helper_policy_sibling\n" + OK_BODY)
    refused(path, "ModuleNotFoundError")


def test_sys_exit_at_import(tmp_path: Path) -> None:
    path = write(tmp_path, "import sys\nsys.exit(3)\n")
    refused(path, f"{path}:2:", "sys.exit(3)")


def test_a_file_that_never_finishes_loading_is_stopped(tmp_path: Path) -> None:
    path = write(tmp_path, "while True:\n    pass\n")
    started = time.monotonic()
    refused(path, "took more than 0.1 s to load", import_timeout_s=0.1)
    assert time.monotonic() - started < 1.0


@pytest.mark.parametrize(
    ("handler", "line"),
    [
        ("try:\n        pass\n    except:\n        pass", "except:"),
        ("try:\n        pass\n    except BaseException:\n        pass", "except BaseException:"),
        ("try:\n        pass\n    except (ValueError, BaseException):\n        return None",
         "except (ValueError, BaseException):"),
        ("import builtins\n    try:\n        pass\n    except builtins.BaseException:\n"
         "        pass", "except builtins.BaseException:"),
    ],
)
def test_handlers_that_swallow_the_budget_are_refused(
    tmp_path: Path, handler: str, line: str
) -> None:
    path = write(tmp_path, f"def evaluate(task, ctx):\n    {handler}\n")
    refused(path, line, "would swallow the time budget", "catch Exception instead")


def test_handlers_that_reraise_or_catch_exception_are_fine(tmp_path: Path) -> None:
    path = write(tmp_path, """
        from oomwarden.policy.api import DEFAULT

        def evaluate(task, ctx):
            try:
                pass
            except BaseException:
                raise
            try:
                pass
            except Exception:
                pass
            return DEFAULT
    """)
    assert load_module(str(path)).evaluate is not None


# -------------------------------------------------------------------- hooks


def test_no_hook_at_all(tmp_path: Path) -> None:
    path = write(tmp_path, "X = 1\n\ndef helper(a, b):\n    return a\n")
    refused(path, "defines neither evaluate(task, ctx) nor handle(event, ctx)")


def test_empty_file(tmp_path: Path) -> None:
    refused(write(tmp_path, ""), "defines neither")


@pytest.mark.parametrize(
    ("defined", "hook"),
    [
        ("evalute", "evaluate"),
        ("evaluat", "evaluate"),
        ("Evaluate", "evaluate"),
        ("EVALUATE", "evaluate"),
        ("handel", "handle"),
        ("handler", "handle"),
        ("Handle", "handle"),
    ],
)
def test_near_miss_names(tmp_path: Path, defined: str, hook: str) -> None:
    path = write(tmp_path, f"X = 1\n\n\ndef {defined}(a, b):\n    return None\n")
    refused(path, f"{path}:4:", f"defines {defined}, not {hook}", f"did you mean {hook}?")


def test_near_miss_next_to_the_other_hook(tmp_path: Path) -> None:
    """A misspelt handle would be silently unused: refused."""
    path = write(tmp_path, OK_BODY + "\ndef handel(event, ctx):\n    return []\n")
    refused(path, "did you mean handle?")


def test_near_miss_class(tmp_path: Path) -> None:
    path = write(tmp_path, "class Evaluate:\n    pass\n")
    refused(path, "did you mean evaluate?")


def test_imported_and_private_names_are_not_near_misses(tmp_path: Path) -> None:
    path = write(tmp_path, """
        from oomwarden.policy.api import DEFAULT, Evaluate, Handle

        def _handel(x):
            return x

        def evaluate(task, ctx):
            return DEFAULT
    """)
    assert load_module(str(path)).handle is None


def test_unrelated_names_are_fine(tmp_path: Path) -> None:
    path = write(tmp_path, OK_BODY + "\ndef evaluation_window(a):\n    return a\n")
    assert load_module(str(path)).evaluate is not None


@pytest.mark.parametrize(("value", "kind"), [("3", "int"), ("'DEFAULT'", "str")])
def test_hook_not_callable(tmp_path: Path, value: str, kind: str) -> None:
    path = write(tmp_path, f"evaluate = {value}\n")
    refused(path, "evaluate is not callable", f"it is of type {kind}")


def test_hook_is_a_class(tmp_path: Path) -> None:
    path = write(tmp_path, "class evaluate:\n    def __init__(self, task, ctx):\n        pass\n")
    refused(path, "evaluate is a class")


def test_hook_is_async(tmp_path: Path) -> None:
    path = write(tmp_path, "\nasync def handle(event, ctx):\n    return []\n")
    refused(path, f"{path}:2:", "handle is an async function")


def test_hook_is_a_generator(tmp_path: Path) -> None:
    path = write(tmp_path, "def handle(event, ctx):\n    yield 1\n")
    refused(path, f"{path}:1:", "handle is a generator", "a list of actions")


@pytest.mark.parametrize(
    ("definition", "shown"),
    [
        ("def evaluate(task):", "evaluate(task)"),
        ("def evaluate():", "evaluate()"),
        ("def evaluate(task, ctx, extra):", "evaluate(task, ctx, extra)"),
        ("def evaluate(task, ctx, extra=1):", "evaluate(task, ctx, extra=1)"),
        ("def evaluate(*args):", "evaluate(*args)"),
        ("def evaluate(task, *rest):", "evaluate(task, *rest)"),
        ("def evaluate(*, task, ctx):", "evaluate(*, task, ctx)"),
        ("def evaluate(task, ctx, *, key):", "evaluate(task, ctx, *, key)"),
        ("def handle(event):", "handle(event)"),
    ],
)
def test_bad_signatures(tmp_path: Path, definition: str, shown: str) -> None:
    path = write(tmp_path, f"\n\n{definition}\n    return None\n")
    hook = shown.split("(", maxsplit=1)[0]
    params = "(task, ctx)" if hook == "evaluate" else "(event, ctx)"
    refused(path, f"{path}:3:", shown, "exactly two positional parameters",
            f"def {hook}{params}")


def test_bad_signature_of_a_lambda(tmp_path: Path) -> None:
    path = write(tmp_path, "evaluate = lambda task: None\n")
    refused(path, "evaluate(task)", "exactly two")


# ---------------------------------------------------------------- settings


@pytest.mark.parametrize("value", ["'proc'", "'Process'", "1", "None", "('process',)"])
def test_bad_victim(tmp_path: Path, value: str) -> None:
    path = write(tmp_path, OK_BODY + f"\nVICTIM = {value}\n")
    refused(path, "VICTIM", "is not one of 'process', 'tree', 'cgroup'")


@pytest.mark.parametrize("value", ["''", "42", "'two\\nlines'", "' padded '", "'x' * 65"])
def test_bad_name(tmp_path: Path, value: str) -> None:
    path = write(tmp_path, OK_BODY + f"\nNAME = {value}\n")
    refused(path, "NAME", "non-empty string")


def test_name_kernel_is_reserved(tmp_path: Path) -> None:
    refused(write(tmp_path, OK_BODY + "\nNAME = 'kernel'\n"), "reserved")


@pytest.mark.parametrize("setting", ["NEEDS_HISTORY", "NEEDS_DETAILS"])
@pytest.mark.parametrize("value", ["'yes'", "1", "None"])
def test_bad_flags(tmp_path: Path, setting: str, value: str) -> None:
    path = write(tmp_path, OK_BODY + f"\n{setting} = {value}\n")
    refused(path, setting, "must be True or False")


def test_needs_details(tmp_path: Path) -> None:
    """exe and cmdline are read before deciding only for a policy that asks
    (where Policy carries needs_details)."""
    policy = load_module(str(write(tmp_path, OK_BODY + "\nNEEDS_DETAILS = True\n")))
    assert policy.needs_details is True
    plain = load_module(str(write(tmp_path, OK_BODY, name="plain.py")))
    assert plain.needs_details is False


@pytest.mark.parametrize(
    ("line", "key", "setting"),
    [
        ("NEED_HISTORY = True", "NEED_HISTORY", "NEEDS_HISTORY"),
        ("needs_history = True", "needs_history", "NEEDS_HISTORY"),
        ("VICTIMS = 'tree'", "VICTIMS", "VICTIM"),
        ("NEED_DETAILS = True", "NEED_DETAILS", "NEEDS_DETAILS"),
        ("needs_details = True", "needs_details", "NEEDS_DETAILS"),
        ("victim = 'cgroup'", "victim", "VICTIM"),
    ],
)
def test_misspelt_settings(tmp_path: Path, line: str, key: str, setting: str) -> None:
    path = write(tmp_path, OK_BODY + f"\n{line}\n")
    refused(path, f"sets {key}, not {setting}", f"did you mean {setting}?")


def test_lowercase_names_that_are_not_settings_are_fine(tmp_path: Path) -> None:
    """A module-level loop variable ``name`` or a ``victim`` helper value."""
    path = write(tmp_path, OK_BODY + "\nfor name in ('a', 'b'):\n    pass\nvictim = 3\n")
    assert load_module(str(path)).name == "policy.py"


def test_name_with_odd_characters_in_the_path(tmp_path: Path) -> None:
    path = write(tmp_path, OK_BODY, name="my policy-v2.py")
    assert load_module(str(path)).name == "my policy-v2.py"
    bad = write(tmp_path, "def evalute(a, b):\n    pass\n", name="line\nbreak.py")
    with pytest.raises(PolicyError) as info:
        load_module(str(bad))
    assert "\n" not in str(info.value) and "line\\nbreak.py" in str(info.value)


# ------------------------------------------------------------- the example files


@pytest.mark.parametrize("name", sorted(p.name for p in PYPOLICIES.glob("*.py")))
def test_example_policies_load_and_decide(tmp_path: Path, name: str) -> None:
    """Every file in tests/fixtures/pypolicies (the docs' examples) loads, and
    (except the deliberately broken one) decides without a fallback."""
    copy = tmp_path / name
    shutil.copyfile(PYPOLICIES / name, copy)  # owned by the test's user
    copy.chmod(0o644)
    policy = load_module(str(copy))
    if name == "swallow_loop.py":
        return  # tests/test_engine_safety.py runs it under the guard
    d = decide(SNAP, system_domain(SNAP), policy)
    assert d.fallback is None, d.fallback
    if policy.evaluate is not None:
        verdict = policy.evaluate(SNAP.tasks[1], _ctx_for(policy))
        assert isinstance(verdict, Verdict)


def _ctx_for(policy: Policy) -> object:
    """A real Context, as the engine builds it (through a handler hook)."""
    seen: list[object] = []

    def grab(event: object, ctx: object) -> list[object]:
        seen.append(ctx)
        return []

    decide(SNAP, system_domain(SNAP), Policy("grab", handle=grab))  # type: ignore[arg-type]
    return seen[0]


def test_default_policy_matches_the_kernel_on_a_literal_snapshot(tmp_path: Path) -> None:
    copy = tmp_path / "default.py"
    shutil.copyfile(PYPOLICIES / "default.py", copy)
    copy.chmod(0o644)
    policy = load_module(str(copy))
    assert policy.name == "always-default"
    d = decide(SNAP, system_domain(SNAP), policy)
    k = kernel_decision(SNAP, system_domain(SNAP))
    assert d.victim is not None and k.victim is not None
    assert d.victim.task.pid == k.victim.task.pid == 200
    assert policy.evaluate is not None and policy.evaluate(SNAP.tasks[0], None) is DEFAULT  # type: ignore[arg-type]


def test_the_docs_examples_load(tmp_path: Path) -> None:
    """Every ``python`` block of docs/python-policies.md is a loadable policy,
    and every fixture file's hooks appear in the docs as they are."""
    text = DOC.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= 6
    for i, block in enumerate(blocks):
        policy = load_module(str(write(tmp_path, block, name=f"doc{i}.py")))
        assert policy.evaluate is not None or policy.handle is not None
    for f in PYPOLICIES.glob("*.py"):
        body = f.read_text()
        hook = body[body.index("\ndef "):].strip()
        assert hook in text, f"the docs do not show {f.name}'s hook as it is"


@pytest.mark.parametrize(
    "body",
    [
        "class Mine(BaseException):\n    pass\n\nraise Mine('at load')\n",
        "raise KeyboardInterrupt\n",
        "class Mute(Exception):\n    def __str__(self):\n        raise RuntimeError\n\n"
        "raise Mute()\n",
    ],
)
def test_anything_raised_at_load_is_one_line(tmp_path: Path, body: str) -> None:
    with pytest.raises(PolicyError, match=r"policy file .*:"):
        load_module(str(write(tmp_path, OK_BODY + "\n" + body)))
