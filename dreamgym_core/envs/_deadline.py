"""A wall-clock limit for one engine call, so a hung step becomes an ``EnvCrash`` (base.py).

SIGALRM is the only cheap way to interrupt a blocking call in-process, and Python delivers
signals to the main thread only: elsewhere (worker threads) the limit is skipped, never wrong.
A signal interrupts Python code and blocking socket reads (py4j/JVM engines); it cannot break a
loop inside a C extension until that loop returns to Python.
"""

from __future__ import annotations

import signal
import threading
import time
from contextlib import contextmanager


class StepTimeout(Exception):
    """The engine call ran past its deadline."""


@contextmanager
def deadline(seconds: float | None):
    """Raise ``StepTimeout`` inside the block after ``seconds`` (None or <= 0: no limit)."""
    if not seconds or seconds <= 0 or threading.current_thread() is not threading.main_thread():
        yield
        return

    def _on_alarm(signum, frame):
        raise StepTimeout(f"engine call exceeded {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, _on_alarm)
    old_delay, _ = signal.setitimer(signal.ITIMER_REAL, seconds)
    start = time.monotonic()
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if old_delay:  # someone else's alarm was pending (e.g. a test timeout): give back what is left
            signal.setitimer(signal.ITIMER_REAL, max(old_delay - (time.monotonic() - start), 1e-3))


def failure(exc: BaseException, started: float, seconds: float | None) -> str:
    """Describe an engine failure; engines wrap our StepTimeout in their own errors, so say so."""
    if seconds and time.monotonic() - started >= seconds:
        return f"timed out after {seconds:g} s"
    return f"{type(exc).__name__}: {exc}"
