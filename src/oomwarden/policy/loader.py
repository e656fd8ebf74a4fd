"""Python policy modules: a ``.py`` file defining ``evaluate`` and/or ``handle``.

``load_module(path)`` checks the file, runs it once as a fresh module and
returns a :class:`~oomwarden.policy.api.Policy`. Everything that can be wrong
with a policy file is found here, at load time, and reported as one line
naming the file (and the line or the hook where that applies), so that a typo
is a clear error when the warden starts instead of a silent fallback when
memory runs out:

* the file is missing, unreadable or not a regular file;
* loaded as root, the file is not owned by root or is writable by group or
  others, or the directory holding it is not owned by root or is writable by
  group or others without the sticky bit (what ``sudo`` refuses for its own
  files): whoever can change the file can run code as root;
* the file does not compile, or raises (or runs too long) while it is run;
* it has an ``except:`` or ``except BaseException:`` that does not re-raise:
  that would swallow the budget's interruption
  (:class:`~oomwarden.policy.decide.PolicyOverrun`, a BaseException);
* it defines neither hook, a name that looks like a misspelt hook
  (``evalute``, ``handel``, ``Evaluate``: "did you mean evaluate?"), a hook
  that is not a plain function taking two positional parameters, or a bad
  ``VICTIM``, ``NAME``, ``NEEDS_HISTORY`` or ``NEEDS_DETAILS``.

The file is read once through one file descriptor: the bytes checked are the
bytes run. It is compiled in memory (no ``__pycache__`` is written next to
it) and executed in a new module object made with
:func:`importlib.util.module_from_spec`, under a unique name that is in
``sys.modules`` only while the file runs. Relative imports are not supported
(the module has no package), and the file's directory is not put on
``sys.path``.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import inspect
import itertools
import os
import re
import stat
import sys
import traceback
from types import ModuleType
from typing import Any, NoReturn, cast

from oomwarden.errors import PolicyError
from oomwarden.policy.api import VICTIM_KINDS, Evaluate, Handle, Policy
from oomwarden.policy.budget import signal_guard
from oomwarden.policy.decide import PolicyOverrun
from oomwarden.textfile import printable

HOOKS = ("evaluate", "handle")
#: What each hook is called with, for messages.
HOOK_PARAMS = {"evaluate": "(task, ctx)", "handle": "(event, ctx)"}
SETTINGS = ("VICTIM", "NAME", "NEEDS_HISTORY", "NEEDS_DETAILS")
#: How long running the file (its top level: imports, tables) may take.
DEFAULT_IMPORT_TIMEOUT_S = 10.0
#: A policy file larger than this is refused (a policy is code, not data).
MAX_SOURCE_BYTES = 4 * 1024 * 1024
#: difflib ratio above which a defined name is taken for a misspelt hook.
NEAR_MISS_CUTOFF = 0.8
MAX_NAME_LEN = 64
_counter = itertools.count(1)
_unsafe_chars = re.compile(r"[^A-Za-z0-9_]")


def load_module(
    path: str,
    *,
    check_owner: bool | None = None,
    import_timeout_s: float = DEFAULT_IMPORT_TIMEOUT_S,
) -> Policy:
    """Load the policy file at ``path``; :class:`PolicyError` (one line) if it
    cannot be used.

    ``check_owner`` turns the ownership and mode checks on or off; by default
    they run when the process runs as root (effective uid 0).
    """
    if check_owner is None:
        check_owner = os.geteuid() == 0
    where = printable(path)
    source = _read_checked(path, where, check_owner)
    module = _run(path, where, source, import_timeout_s)
    return _policy_from(module, path, where)


# -- the file ----------------------------------------------------------------------


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _fail(message: str) -> NoReturn:
    raise PolicyError(_one_line(message)) from None


def _read_checked(path: str, where: str, check_owner: bool) -> bytes:
    """The file's bytes, read through one descriptor that was checked."""
    if not path:
        _fail("policy file: empty path")
    real = os.path.realpath(path)
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; O_NOFOLLOW:
        # the path was resolved, a symlink appearing since is refused.
        fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        _fail(f"policy file {where} does not exist")
    except OSError as e:
        _fail(f"policy file {where} cannot be read: {e.strerror or e}")
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            _fail(f"policy file {where} is not a regular file ({_file_type(st.st_mode)})")
        if check_owner:
            _check_file_owner(where, st)
            dirs = dict.fromkeys((
                os.path.dirname(os.path.abspath(path)), os.path.dirname(real)
            ))
            for directory in dirs:
                _check_dir_owner(where, directory)
        if st.st_size > MAX_SOURCE_BYTES:
            _fail(f"policy file {where} is {st.st_size} bytes, more than the "
                  f"{MAX_SOURCE_BYTES} a policy file may have")
        chunks: list[bytes] = []
        size = 0
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
            size += len(chunk)
            if size > MAX_SOURCE_BYTES:
                _fail(f"policy file {where} grew past {MAX_SOURCE_BYTES} bytes while read")
        return b"".join(chunks)
    except OSError as e:
        _fail(f"policy file {where} cannot be read: {e.strerror or e}")
    finally:
        os.close(fd)


def _file_type(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return name
    return f"mode {mode:o}"


def _check_file_owner(where: str, st: os.stat_result) -> None:
    if st.st_uid != 0:
        _fail(f"policy file {where} is owned by uid {st.st_uid}, not root: loaded as root, "
              "a policy file must be owned by root (chown root)")
    if st.st_mode & 0o022:
        _fail(f"policy file {where} is writable by {_writers(st.st_mode)} "
              f"(mode {stat.S_IMODE(st.st_mode):04o}): loaded as root, a policy file must "
              "be writable by root only (chmod go-w)")


def _check_dir_owner(where: str, directory: str) -> None:
    try:
        st = os.stat(directory)
    except OSError as e:
        _fail(f"policy file {where}: its directory {printable(directory)} cannot be read: "
              f"{e.strerror or e}")
    if st.st_uid != 0:
        _fail(f"policy file {where} is in {printable(directory)}, owned by uid {st.st_uid}, not "
              "root: loaded as root, a policy file's directory must be owned by root")
    if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
        _fail(f"policy file {where} is in {printable(directory)}, writable by "
              f"{_writers(st.st_mode)} (mode {stat.S_IMODE(st.st_mode):04o}): loaded as "
              "root, a policy file's directory must be writable by root only (or sticky)")


def _writers(mode: int) -> str:
    who = [w for bit, w in ((stat.S_IWGRP, "group"), (stat.S_IWOTH, "others")) if mode & bit]
    return " and ".join(who)


# -- running it --------------------------------------------------------------------


def _run(path: str, where: str, source: bytes, timeout_s: float) -> ModuleType:
    """Compile and run the file as a fresh module."""
    filename = os.path.abspath(path)
    try:
        tree = ast.parse(source, filename)
        code = compile(tree, filename, "exec", dont_inherit=True)
    except SyntaxError as e:
        line = f":{e.lineno}" if e.lineno else ""
        _fail(f"policy file {where}{line}: {type(e).__name__}: {e.msg}")
    except ValueError as e:  # null bytes
        _fail(f"policy file {where}: does not compile: {e}")
    _check_handlers(tree, where)
    stem = _unsafe_chars.sub("_", os.path.splitext(os.path.basename(path))[0])
    name = f"oomwarden_policy_{next(_counter)}_{stem}"
    spec = importlib.util.spec_from_file_location(name, filename)
    if spec is None:  # pragma: no cover - a .py path always gets a spec
        _fail(f"policy file {where} cannot be loaded as a module")
    module = importlib.util.module_from_spec(spec)
    module.__package__ = ""
    sys.modules[name] = module  # while it runs (dataclasses, typing look it up)
    try:
        with signal_guard(timeout_s):
            exec(code, module.__dict__)
    except PolicyOverrun:
        _fail(f"policy file {where} took more than {timeout_s:g} s to load and was stopped")
    except BaseException as e:
        # SystemExit, KeyboardInterrupt and its own BaseException subclasses included)
        _fail(f"policy file {where}{_line_in(e, filename)}: {_describe(e)}")
    finally:
        sys.modules.pop(name, None)
    return module


_SWALLOWING = frozenset({"BaseException", "PolicyOverrun"})


def _catches_everything(node: ast.expr | None) -> bool:
    if node is None:
        return True  # a bare except:
    if isinstance(node, ast.Tuple):
        return any(_catches_everything(e) for e in node.elts)
    if isinstance(node, ast.Name):
        return node.id in _SWALLOWING
    return isinstance(node, ast.Attribute) and node.attr in _SWALLOWING


def _check_handlers(tree: ast.AST, where: str) -> None:
    """Refuse ``except:`` and ``except BaseException`` that do not re-raise:
    they would swallow the budget's interruption (:class:`PolicyOverrun`)."""
    for node in ast.walk(tree):
        if not isinstance(node, ast.ExceptHandler) or not _catches_everything(node.type):
            continue
        if any(isinstance(s, ast.Raise) and s.exc is None for s in node.body):
            continue
        what = "except:" if node.type is None else f"except {ast.unparse(node.type)}:"
        _fail(f"policy file {where}:{node.lineno}: {what} would swallow the time budget's "
              "interruption; catch Exception instead (or re-raise with a bare raise)")


def _line_in(error: BaseException, filename: str) -> str:
    """``:N`` for the deepest frame of the policy file in the traceback."""
    frames = [f for f in traceback.extract_tb(error.__traceback__) if f.filename == filename]
    return f":{frames[-1].lineno}" if frames else ""


def _describe(error: BaseException) -> str:
    try:
        message = str(error)
    except BaseException:
        message = "(its message could not be printed)"
    message = message if len(message) <= 300 else message[:300] + "..."
    text = f"{type(error).__name__}: {message}" if message else type(error).__name__
    if isinstance(error, SystemExit):
        try:
            code = repr(error.code)[:80]
        except BaseException:
            code = "?"
        text = f"called sys.exit({code}) while loading"
    if isinstance(error, ImportError) and "relative import" in message:
        text += " (relative imports are not supported in a policy file)"
    return text


# -- what it defines ------------------------------------------------------------------


def _policy_from(module: ModuleType, path: str, where: str) -> Policy:
    namespace = vars(module)
    hooks = {h: namespace.get(h) for h in HOOKS}
    defined = {h: f for h, f in hooks.items() if f is not None}
    for hook in HOOKS:
        if hook not in defined:
            near = _near_miss(hook, module)
            if near is not None:
                line = _def_line(namespace[near], path)
                _fail(f"policy file {where}{line}: defines {near}, not {hook}: "
                      f"did you mean {hook}? (a helper's name should start with _)")
    if not defined:
        _fail(f"policy file {where} defines neither evaluate{HOOK_PARAMS['evaluate']} nor "
              f"handle{HOOK_PARAMS['handle']}")
    for hook, fn in defined.items():
        _check_hook(hook, fn, path, where)
    _check_settings(module, where)
    victim = namespace.get("VICTIM", "process")
    if not isinstance(victim, str) or victim not in VICTIM_KINDS:
        _fail(f"policy file {where}: VICTIM = {victim!r:.60} is not one of "
              f"{', '.join(repr(k) for k in VICTIM_KINDS)}")
    name = namespace.get("NAME", os.path.basename(path))
    if (not isinstance(name, str) or not name or not name.isprintable() or name != name.strip()
            or len(name) > MAX_NAME_LEN):
        _fail(f"policy file {where}: NAME = {name!r:.80} must be a non-empty string of at most "
              f"{MAX_NAME_LEN} printable characters")
    if name == "kernel":
        _fail(f"policy file {where}: NAME = 'kernel' is reserved for the kernel policy")
    flags: dict[str, bool] = {}
    for setting in ("NEEDS_HISTORY", "NEEDS_DETAILS"):
        value = namespace.get(setting, False)
        if not isinstance(value, bool):
            _fail(f"policy file {where}: {setting} = {value!r:.60} must be True or False")
        flags[setting.lower()] = value
    doc = (module.__doc__ or "").strip()
    policy = Policy(
        name=name,
        evaluate=cast(Evaluate | None, defined.get("evaluate")),
        handle=cast(Handle | None, defined.get("handle")),
        victim=victim,
        needs_history=flags["needs_history"],
        # exe and cmdline are read before deciding only for a policy that asks
        needs_details=flags["needs_details"],
        description=doc.splitlines()[0] if doc else f"Python policy {where}",
    )
    return policy


def _own_callables(module: ModuleType) -> dict[str, Any]:
    """Public callables the file itself defines (not what it imported)."""
    return {
        k: v for k, v in vars(module).items()
        if not k.startswith("_") and callable(v)
        and getattr(v, "__module__", None) == module.__name__
    }


def _near_miss(hook: str, module: ModuleType) -> str | None:
    names = [n for n in _own_callables(module) if n not in HOOKS]
    lowered = {n.lower(): n for n in names}
    match = difflib.get_close_matches(hook, list(lowered), n=1, cutoff=NEAR_MISS_CUTOFF)
    return lowered[match[0]] if match else None


def _check_settings(module: ModuleType, where: str) -> None:
    """``victim = ...``, ``NEED_HISTORY = ...``: a setting that would be ignored."""
    for key in vars(module):
        if key in SETTINGS or key.startswith("_"):
            continue
        value = vars(module)[key]
        for setting in SETTINGS:
            if setting == "NAME":
                continue  # too short and too common a word to guess at
            lowercase = key == setting.lower() and (
                value in VICTIM_KINDS if setting == "VICTIM" else isinstance(value, bool)
            )
            if lowercase or (
                key.isupper() and difflib.SequenceMatcher(None, key, setting).ratio() >= 0.85
            ):
                _fail(f"policy file {where} sets {key}, not {setting}: did you mean {setting}?")


def _def_line(fn: object, path: str) -> str:
    code = getattr(fn, "__code__", None)
    if code is None or code.co_filename != os.path.abspath(path):
        return ""
    return f":{code.co_firstlineno}"


def _check_hook(hook: str, fn: object, path: str, where: str) -> None:
    what = f"{hook}{HOOK_PARAMS[hook]}"
    if not callable(fn):
        _fail(f"policy file {where}: {hook} is not callable (it is of type {type(fn).__name__}); "
              f"define it as def {what}")
    line = _def_line(fn, path)
    if isinstance(fn, type):
        _fail(f"policy file {where}{line}: {hook} is a class; define it as a function, "
              f"def {what}")
    if inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn):
        _fail(f"policy file {where}{line}: {hook} is an async function; define it with "
              "def, not async def")
    if inspect.isgeneratorfunction(fn):
        _fail(f"policy file {where}{line}: {hook} is a generator (it yields); it must return "
              + ("a verdict" if hook == "evaluate" else "a list of actions"))
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return  # a builtin without a signature: the engine's fallback covers it
    positional = [p for p in sig.parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    try:
        sig.bind(object(), object())
    except TypeError:
        ok = False
    else:
        ok = len(positional) == 2
    if not ok:
        _fail(f"policy file {where}{line}: {hook}{sig} does not take exactly two "
              f"positional parameters: a hook is def {what}")
