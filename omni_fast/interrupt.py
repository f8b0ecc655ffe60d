"""SIGINT (Ctrl-C) and SIGTERM (a scheduler's stop, `kill`) for long runs.

    with StopRequests() as stop:          # the training loop
        while ... and stop.signum is None:
            step()                        # a first signal lets the step in flight finish; the loop saves and ends
                                          # a second one raises Interrupted at once

Outside such a loop SIGTERM is made to behave as Ctrl-C does (`sigterm_interrupts()`): it raises Interrupted, a
KeyboardInterrupt, so the same handlers keep what is written and say so, and the exit status is 128 + the signal
number (130 for SIGINT, 143 for SIGTERM), as a shell reports a process the signal killed.
"""
from __future__ import annotations

import signal
import sys
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """A signal that stops the process at once; `signum` says which."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def exit_status(exc: BaseException) -> int:
    """128 + the signal number (a plain KeyboardInterrupt is SIGINT's)."""
    return 128 + int(getattr(exc, "signum", signal.SIGINT))


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


def _raise(signum, frame) -> None:
    raise Interrupted(signum)


def sigterm_interrupts() -> None:
    """SIGTERM raises Interrupted(SIGTERM) in the main thread from now on (Python's default is to die silently)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise)


class StopRequests:
    """The first SIGINT / SIGTERM inside the block is recorded in `signum` (and said on stderr); the second raises
    Interrupted. The previous handlers come back at the end of the block. Outside the main thread, where Python
    cannot install handlers, nothing changes."""

    def __init__(self, what: str = "stopping after the step in flight"):
        self.what = what
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            raise Interrupted(signum)
        self.signum = signum
        print(f"omni-fast: {signal_name(signum)} received: {self.what} (send it again to stop at once)",
              file=sys.stderr, flush=True)

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}
