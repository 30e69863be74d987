"""Whether a process still lives, and the heartbeat a process gives while it works (psutil, threads; no Optuna)."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

import psutil


def process_started(pid: int | None = None) -> float:
    """When process `pid` (default: this one) started, in seconds since 1970: with its pid, what tells it apart
    from a later process given the same pid."""
    return psutil.Process(os.getpid() if pid is None else pid).create_time()


def process_alive(pid: int, started: float | None = None) -> bool:
    """Whether process `pid` on this machine still runs (a zombie does not); with `started` (`process_started`
    when it was recorded), only if it is that same process and not a later one given its pid."""
    if not psutil.pid_exists(pid):
        return False
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
        return started is None or abs(process.create_time() - started) < 0.01
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:  # someone else's process: it exists
        return True


class Heartbeat:
    """Calls `beat()` now, then every `seconds` on a thread until `stop()` (or the end of a `with` block).

    A beat that raises one of `tolerated` is skipped: a missed beat only makes the work look lost sooner."""

    def __init__(self, beat: Callable[[], None], seconds: float, name: str = "heartbeat",
                 tolerated: tuple[type[BaseException], ...] = ()) -> None:
        self.beat, self.seconds, self.tolerated = beat, seconds, tolerated
        self.stopped = threading.Event()
        beat()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopped.wait(self.seconds):
            try:
                self.beat()
            except self.tolerated:
                pass

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join(timeout=5)

    def __enter__(self) -> Heartbeat:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
