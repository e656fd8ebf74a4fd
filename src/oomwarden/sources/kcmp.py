"""kcmp(2): do two processes share their memory (KCMP_VM)?

Used to recognise a vfork child, which shares its parent's mm until it
execs; the kernel's ``oom_badness()`` skips such a child (``in_vfork()``),
because killing it frees nothing. Python has no binding, so this calls
``syscall(2)`` through ctypes; architectures without a known number answer
None (unknown).
"""

from __future__ import annotations

import ctypes
import platform

KCMP_VM = 1
_SYS_KCMP = {"x86_64": 312, "aarch64": 272, "i686": 349, "i386": 349}

# The C library already loaded into this process (find_library would run
# ldconfig, ~20 ms at every start).
_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


def shares_mm(pid1: int, pid2: int) -> bool | None:
    """True if both processes use the same mm; None if it cannot be told."""
    number = _SYS_KCMP.get(platform.machine())
    if number is None:
        return None
    result = _syscall(
        ctypes.c_long(number), ctypes.c_int(pid1), ctypes.c_int(pid2),
        ctypes.c_int(KCMP_VM), ctypes.c_ulong(0), ctypes.c_ulong(0),
    )
    if result < 0:  # ESRCH (gone), EPERM (no ptrace access), ENOSYS
        return None
    return bool(result == 0)
