"""What the run does when the world misbehaves: Ctrl-C, an output that refuses writes.

Every fault ends the same way: each planned sample is accounted for (in a finished shard, or in a shard the
rerun redoes), no shard is marked complete that is not, and the user gets one line saying what happened
and what to do.
"""

from __future__ import annotations

import signal
import sys
import threading

RERUN = "rerun the same command to resume"


class Interrupted(RuntimeError):
    """The user pressed Ctrl-C: finished shards are closed, the rest is redone by the rerun."""

    def __init__(self, detail: str = ""):
        super().__init__(f"interrupted: {RERUN}" + (f" ({detail})" if detail else ""))


class OutputWriteError(OSError):
    """The run folder refused a write (full disk, quota, permissions, a bucket that keeps failing)."""

    def __init__(self, uri: str, cause: BaseException):
        reason = getattr(cause, "strerror", None) or str(cause) or type(cause).__name__
        super().__init__(f"cannot write {uri}: {reason} ({type(cause).__name__}); "
                         f"free space or fix the output, then {RERUN}")
        self.uri = uri


class InterruptGuard:
    """First SIGINT: `requested` turns true and the executor stops dispatching, lets the shards being
    written close, and returns. Second SIGINT: KeyboardInterrupt at once. Outside the main thread (where
    Python cannot take signals) it does nothing."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self) -> "InterruptGuard":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("interrupt: no new work is dispatched; closing the shards being written "
              "(Ctrl-C again to stop at once)", file=sys.stderr, flush=True)

    def __call__(self) -> bool:
        return self.requested
