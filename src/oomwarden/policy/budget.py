"""Stopping a policy that runs past its budget.

Python cannot kill a thread, so a policy stuck in ``while True: pass`` is
interrupted the way Ctrl-C interrupts it: a POSIX interval timer
(``setitimer(ITIMER_REAL)``) fires SIGALRM, whose handler raises
:class:`~oomwarden.policy.decide.PolicyOverrun` in the running code. That
exception derives from BaseException, so a policy's ``except Exception``
cannot swallow it. Signals reach only the main thread: elsewhere this guard
only measures, and the engine discards an overrun decision afterwards.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

from oomwarden.policy.decide import PolicyOverrun


@contextmanager
def signal_guard(seconds: float) -> Iterator[None]:
    """Interrupt the block with PolicyOverrun after ``seconds``."""
    if threading.current_thread() is not threading.main_thread() or seconds <= 0:
        yield
        return

    def overrun(_signum: int, _frame: FrameType | None) -> None:
        raise PolicyOverrun

    previous = signal.signal(signal.SIGALRM, overrun)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
