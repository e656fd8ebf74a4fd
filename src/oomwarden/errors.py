"""The one error hierarchy of oomwarden.

Every failure that reaches a user is an :class:`OomwardenError`; the CLI prints
its message as one line on stderr and exits with status 2. Lower-level
``OSError``/``ValueError`` are translated into these classes at the I/O
boundary, in one place per source, so that callers only ever catch this tree::

    OomwardenError
    ├── ParseError          text from /proc or cgroupfs is not what the kernel writes
    ├── SourceError         a root (proc, cgroup) cannot be read or is not what it claims
    │   ├── TaskGone        a process vanished while it was being read (normal, skipped)
    │   └── BpfError        the BPF snapshot source cannot be had here, or sent bad records
    ├── CgroupNotFound      --cgroup names no memory cgroup on any hierarchy
    ├── PolicyError         an unknown policy name or a policy that cannot be loaded
    ├── ConfigError         a daemon config file that cannot be read or is wrong
    ├── DaemonError         the daemon cannot set a watch up (oomwarden.daemon)
    ├── ControlError        the control socket: cannot listen, no daemon, no answer
    │   └── RequestError    a request refused, with its code (oomwarden.control)
    └── TraceError          a trace file that is not one, of another version, or corrupt

Messages carry the values and the places involved, e.g.
``MemAvailable (X) cannot exceed MemTotal (Y)``.
"""

from __future__ import annotations


class OomwardenError(Exception):
    """Base of every error oomwarden raises on purpose."""


class ParseError(OomwardenError, ValueError):
    """Kernel-provided text did not parse; the message names the file or field."""


class SourceError(OomwardenError):
    """A snapshot source could not be read (missing root, permission, wrong fs type)."""


class TaskGone(SourceError):
    """A process exited (or its PID went away) while it was being read."""


class BpfError(SourceError):
    """The BPF task iterator cannot be built, loaded or attached here, or its
    records do not decode: one line saying why (the procfs source still works)."""


class CgroupNotFound(OomwardenError):
    """A cgroup path given by the user names no cgroup that oomwarden can see."""


class PolicyError(OomwardenError):
    """A policy SPEC is unknown or cannot be loaded."""


class ConfigError(OomwardenError):
    """A config file cannot be read or is wrong: one line naming the file, the
    line and the key."""


class ControlError(OomwardenError):
    """The control socket cannot be served (the path is taken, not a socket)
    or a client gets no answer (no daemon listening, a timeout): one line
    naming the socket."""


class TraceError(OomwardenError):
    """A trace file cannot be read: not a trace, another format version, or
    corrupt (one line naming the file and the record)."""
