"""Filesystem type checks through statfs(2).

``/sys/fs/cgroup`` is often a plain tmpfs; a ``memory.max`` file made in a
folder there limits nothing. Before trusting a limit, the warden checks that
the hierarchy's mount point really is a cgroup filesystem. Python's
``os.statvfs`` does not return ``f_type``, so this calls libc's ``statfs``.
"""

from __future__ import annotations

import ctypes
import os

CGROUP_SUPER_MAGIC = 0x27E0EB
CGROUP2_SUPER_MAGIC = 0x63677270
TMPFS_MAGIC = 0x01021994


class _StatFs(ctypes.Structure):
    # struct statfs on 64-bit Linux: f_type is the first word; the rest is
    # room enough for every architecture's layout (120 bytes on x86_64).
    _fields_ = [("f_type", ctypes.c_long), ("_rest", ctypes.c_byte * 256)]


# The C library already loaded into this process (find_library would run
# ldconfig, ~20 ms at every start).
_libc = ctypes.CDLL(None, use_errno=True)
_statfs = _libc.statfs
_statfs.argtypes = [ctypes.c_char_p, ctypes.POINTER(_StatFs)]
_statfs.restype = ctypes.c_int
_fstatfs = _libc.fstatfs
_fstatfs.argtypes = [ctypes.c_int, ctypes.POINTER(_StatFs)]
_fstatfs.restype = ctypes.c_int


def fs_magic(path: str | os.PathLike[str]) -> int:
    """The ``f_type`` of the filesystem holding ``path``; raises OSError."""
    buf = _StatFs()
    if _statfs(os.fsencode(path), ctypes.byref(buf)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), os.fspath(path))
    return int(buf.f_type) & 0xFFFFFFFF


def fd_magic(fd: int) -> int:
    """The ``f_type`` of the filesystem holding the open ``fd`` (fstatfs: no
    path to swap between check and use); raises OSError."""
    buf = _StatFs()
    if _fstatfs(fd, ctypes.byref(buf)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return int(buf.f_type) & 0xFFFFFFFF


def is_cgroup_fs(path: str | os.PathLike[str], v2: bool) -> bool:
    """True when ``path`` is on a cgroup (v1) or cgroup2 (v2) filesystem."""
    try:
        magic = fs_magic(path)
    except OSError:
        return False
    return magic == (CGROUP2_SUPER_MAGIC if v2 else CGROUP_SUPER_MAGIC)
