"""A database host that also runs jobs.

Never the database: matched by executable path, which a process cannot fake
(any process can call itself "postgres" with prctl(PR_SET_NAME)), allowing for
the " (deleted)" that /proc shows after a package upgrade. Among the rest, the
built-in ``growth`` policy: the fastest grower above 1% of the domain, with the
children it forked inside the window, killed with its process tree.
"""

import re

from oomwarden.policy import IGNORE
from oomwarden.policy.builtin import BUILTINS

NAME = "protect-db-kill-grower"
VICTIM = "tree"
NEEDS_HISTORY = True  # growth rates need an earlier snapshot
NEEDS_DETAILS = True  # task.exe is read only for policies that ask

DATABASES = re.compile(
    r"^/usr/(lib/postgresql/[^/]+/bin/postgres|sbin/mysqld|bin/redis-server)( \(deleted\))?$"
)
_growth = BUILTINS["growth"].evaluate


def evaluate(task, ctx):
    if task.exe is not None and DATABASES.match(task.exe):
        return IGNORE.because(f"database {task.exe}: never killed")
    return _growth(task, ctx)
