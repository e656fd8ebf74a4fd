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

#: Interval of the repeated interruption after the budget ran out.
REARM_S = 0.005


@contextmanager
def signal_guard(seconds: float) -> Iterator[None]:
    """Interrupt the block with PolicyOverrun after ``seconds``."""
    if threading.current_thread() is not threading.main_thread() or not 0 < seconds < 3600:
        yield
        return

    def overrun(_signum: int, _frame: FrameType | None) -> None:
        raise PolicyOverrun

    previous = signal.signal(signal.SIGALRM, overrun)
    # Fires again every 5 ms after the first: a policy that swallows one
    # PolicyOverrun is interrupted again (the engine then also sees the time
    # spent and discards the result). Deliberately catching BaseException in a
    # loop still defeats it: policies are trusted code.
    signal.setitimer(signal.ITIMER_REAL, seconds, REARM_S)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
