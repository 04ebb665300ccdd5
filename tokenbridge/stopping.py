"""Stopping a stage on SIGTERM or SIGINT without losing its work.

Every stage process installs `install()`: a signal raises `Stopped` where the process is, and atomic writes
(`tokenbridge.io.atomic_path`) keep whatever it was writing from appearing half-done. Training loops go further:
inside `safe_points()` a signal only asks to stop, the loop finishes its current step, saves a resumable
checkpoint and raises `Stopped` there (`requested`); a second signal stops at once. The tracked stage marks its
MLflow run KILLED (`tokenbridge.tracking.stage_run`).
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator
from types import FrameType

_STATE: dict[str, object] = {"deferring": False, "requested": None}


class Stopped(KeyboardInterrupt):
    """The stage was asked to stop (SIGTERM or SIGINT) and did; `saved` says what progress was kept. An interrupt,
    so no `except Exception` on the way up swallows it."""

    def __init__(self, signal_name: str, saved: str = "nothing in progress was kept; a rerun starts it again"):
        super().__init__(f"stopped by {signal_name}: {saved}")
        self.signal_name = signal_name

    @property
    def exit_code(self) -> int:
        """What a shell reports for a process ended by this signal (130 for SIGINT, 143 for SIGTERM)."""
        return 128 + signal.Signals[self.signal_name].value


def _handle(number: int, frame: FrameType | None) -> None:
    name = signal.Signals(number).name
    if _STATE["deferring"] and _STATE["requested"] is None:
        _STATE["requested"] = name
        # Written, not printed: in a flow, print goes through Prefect's loggers, whose locks the interrupted code may
        # hold (a handler runs in the main thread between its bytecodes).
        sys.stderr.write(f"\n{name}: stopping after this step, with a checkpoint; send it again to stop at once\n")
        sys.stderr.flush()
        return
    raise Stopped(name)


def install() -> None:
    """Turn SIGTERM and SIGINT into `Stopped` in this process (from its main thread only, as Python requires)."""
    if threading.current_thread() is threading.main_thread():
        for number in (signal.SIGTERM, signal.SIGINT):
            signal.signal(number, _handle)


@contextlib.contextmanager
def safe_points() -> Iterator[None]:
    """Within: a first signal only sets `requested()`, for the loop to stop at its next safe point."""
    _STATE["deferring"], _STATE["requested"] = True, None
    try:
        yield
    finally:
        _STATE["deferring"], _STATE["requested"] = False, None


def requested() -> str | None:
    """The name of the signal that asked this process to stop, if one did."""
    requested_by = _STATE["requested"]
    return requested_by if isinstance(requested_by, str) else None
