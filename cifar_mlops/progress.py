"""Progress on stderr, so stdout carries only results: log lines, and one bar per long command.

`log(message)`: one line. `detail(message)`: a line about one training's steps, left out under a bar.
`runs_bar(command, total)`: the bar of a command that trains many runs (`ablate`, `tune`, `train --seeds`,
`select`): runs done / total, the current run, elapsed time and an estimate of the time left (tqdm). On a terminal
it is one line that updates (log lines print above it); elsewhere (a log file, a pipe) it prints one line per
finished run. While it is open, the runs of this process and of the worker processes it starts are quiet: no
Keras per-epoch lines (`keras_verbosity`), no `detail` lines; `verbose` (`--verbose`, `set_verbose`) keeps both,
Keras's as one line per epoch.

    with progress.runs_bar("ablate", total=len(tasks), done=len(reused)) as bar:
        for task in pending:
            bar.start(task)                          # the current run
            metrics = train(...)
            bar.finished(task, f"test_accuracy={metrics['test_accuracy']:.4f}")

Runs that other processes train (worker processes, other machines): `bar.set_done(n, running)` with what the
queue reports, e.g. from `every(seconds, poll)`, a thread that polls while the workers run.

A long command that runs another inside (`select` runs one `ablate` per step) still shows one bar: a bar opened
while another is open in this process has no line of its own, it counts on the open one (`Nested`). The open
bar's `section` (e.g. "step 2") names the part now running in its lines, so its total grows as the inner
commands plan their runs and each line says which part a run belongs to.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TextIO

RUN_OUTPUT = "CIFAR_MLOPS_RUN_OUTPUT"  # what a training prints: "quiet" under a bar, "verbose" with --verbose
REFRESH_SECONDS = 1.0  # a terminal's bar redraws its clock this often between runs
FALLBACK_COLUMNS = 120  # the bar's width on a terminal that reports no size

_active: list[RunsBar] = []  # the bar open in this process, if any: `log` prints above it


def log(message: str, prefix: str = "cifar-mlops") -> None:
    line = f"[{prefix}] {message}"
    if _active and _active[-1].interactive:
        _active[-1].write(line)
    else:
        print(line, file=sys.stderr, flush=True)


def detail(message: str) -> None:
    """`log`, except in the quiet runs under a progress bar (in this process or the command's that started it)."""
    if os.environ.get(RUN_OUTPUT) != "quiet":
        log(message)


def set_verbose(verbose: bool) -> None:
    """`--verbose`: the runs under every bar of this command and of its worker processes print all they would
    alone (Keras: one line per epoch)."""
    if verbose:
        os.environ[RUN_OUTPUT] = "verbose"


def keras_verbosity() -> int:
    """`verbose` for Keras's `fit`: 0 inside a long command's runs (its bar says how far it is; `--verbose`: 2,
    one line per epoch), else 1 (Keras's own bar) on a terminal and 2 elsewhere."""
    chosen = os.environ.get(RUN_OUTPUT, "")
    if chosen:
        return 0 if chosen == "quiet" else 2
    return 1 if sys.stderr.isatty() else 2


def _columns(stream: TextIO) -> int:
    """The width of the terminal `stream` writes to, 0 when it says none."""
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (OSError, ValueError, AttributeError):
        return 0


def _clock(seconds: float) -> str:
    from tqdm import tqdm

    return tqdm.format_interval(seconds)


class RunsBar:
    """The runs of one command: how many are done of how many, which one runs, how long it took so far and how
    long the rest should take (the mean time of the runs finished here, so reused runs do not speed it up)."""

    def __init__(self, command: str, total: int, *, done: int = 0, unit: str = "runs", verbose: bool | None = None,
                 stream: TextIO | None = None, interactive: bool | None = None) -> None:
        """Open the bar (`close()` ends it): the runs are quiet meanwhile, in this process and the worker processes
        started meanwhile (they inherit the setting), unless `verbose` (None: as `set_verbose` said)."""
        self.command, self.total, self.done, self.initial, self.unit = command, total, done, done, unit
        self.section = ""  # the part of the command now running (`set_section`), named in its lines
        self._output_before = os.environ.get(RUN_OUTPUT)
        if verbose is None:
            verbose = self._output_before == "verbose"
        os.environ[RUN_OUTPUT] = "verbose" if verbose else "quiet"
        self.stream = stream or sys.stderr
        self.interactive = self.stream.isatty() if interactive is None else interactive
        self.started = time.monotonic()
        self.current = ""
        self._lock = threading.RLock()
        self._bar = None
        if self.interactive:
            from tqdm import tqdm

            sized = _columns(self.stream) > 0  # a terminal that reports no size: tqdm would print nothing
            self._bar = tqdm(total=total, initial=done, file=self.stream, desc=f"[cifar-mlops {command}]",
                             unit=unit, dynamic_ncols=sized, ncols=None if sized else FALLBACK_COLUMNS,
                             nrows=None if sized else 24, leave=True, mininterval=0,
                             bar_format="{desc} {bar:20} {n_fmt}/{total_fmt} " + unit + " [{elapsed} elapsed, ? left]")
            self._redraw()
            self._stop = threading.Event()
            self._ticker = threading.Thread(target=self._tick, name="progress-bar", daemon=True)
            self._ticker.start()
        _active.append(self)

    # -- what the command tells it

    def start(self, name: str) -> None:
        """Run `name` starts (in this process)."""
        with self._lock:
            self.current = name
            self._redraw()

    def finished(self, name: str, outcome: str = "", count: int = 1) -> None:
        """Run `name` finished (`outcome`: a few words, e.g. its metric)."""
        with self._lock:
            self.done += count
            self.current = ""
            self._line(f"{name}{': ' + outcome if outcome else ''}")

    def reused(self, count: int) -> None:
        """`count` runs found done already (another command's): counted, but not in the estimate of time left."""
        with self._lock:
            self.done += count
            self.initial += count
            self._redraw()

    def set_done(self, done: int, running: Sequence[str] = ()) -> None:
        """What a queue reports: `done` runs finished in all (never fewer than already shown), `running` now."""
        with self._lock:
            self.current = ", ".join(running)
            if done > self.done:
                finished, self.done = done - self.done, done
                self._line(f"{finished} more finished" + (f"; running: {self.current}" if self.current else ""))
            else:
                self._redraw()

    def set_section(self, name: str) -> None:
        """The part of the command that runs from now on (e.g. "step 2"; "": none): its lines and the current run
        are named after it."""
        with self._lock:
            self.section = name
            self._redraw()

    def add_total(self, more: int) -> None:
        """More runs than first planned (e.g. another round of seeds)."""
        with self._lock:
            self.total += more
            if self._bar is not None:
                self._bar.total = self.total
            self._redraw()

    def write(self, line: str, file: TextIO | None = None) -> None:
        """A line on `file` (default: the bar's stream; e.g. sys.stdout for a result), above the bar on a terminal."""
        with self._lock:
            if self._bar is not None:
                self._bar.write(line, file=file or self.stream)
            else:
                print(line, file=file or self.stream, flush=True)

    def close(self) -> None:
        """End the bar (again: nothing); the runs print as before it."""
        with self._lock:
            if self in _active:
                _active.remove(self)
                if self._output_before is None:
                    os.environ.pop(RUN_OUTPUT, None)
                else:
                    os.environ[RUN_OUTPUT] = self._output_before
            if self._bar is not None:
                self._stop.set()
                self._bar.close()
                self._bar = None
        if self.interactive:
            self._ticker.join(timeout=5)

    # -- what it shows

    def remaining(self) -> float | None:
        """Seconds left by the mean time of the runs finished since the bar opened; None before the first."""
        ran = self.done - self.initial
        if ran <= 0:
            return None
        return (time.monotonic() - self.started) / ran * max(self.total - self.done, 0)

    def status(self) -> str:
        """done/total, elapsed and left, as a line says them."""
        left = self.remaining()
        return (f"{self.done}/{self.total} {self.unit} done | elapsed {_clock(time.monotonic() - self.started)}, "
                f"left ~{_clock(left) if left is not None else '?'}")

    def _line(self, what: str) -> None:
        if self._bar is None:  # a log file: one line per finished run
            where = f"{self.section}: " if self.section else ""
            print(f"[cifar-mlops {self.command}] {self.status()} | {where}{what}", file=self.stream, flush=True)
            return
        self._bar.n = self.done
        self._redraw()

    def _redraw(self) -> None:
        if self._bar is None:
            return
        self._bar.n = self.done
        where = f"{self.section}: " if self.section else ""
        self._bar.set_postfix_str(f"now: {where}{self.current}" if self.current else self.section, refresh=False)
        left = self.remaining()
        # tqdm's own rate counts the runs reused at the start; the mean of the runs trained here replaces it
        self._bar.bar_format = ("{desc} {bar:20} {n_fmt}/{total_fmt} " + self.unit + " [{elapsed} elapsed, "
                                f"{'~' + _clock(left) if left is not None else '?'} left]" + "{postfix}")
        self._bar.refresh()

    def _tick(self) -> None:
        while not self._stop.wait(REFRESH_SECONDS):
            with self._lock:
                if self._bar is not None:
                    self._redraw()


class Nested(RunsBar):
    """A bar opened while another (`host`) is open in this process, e.g. each step's `ablate` inside `select`: it
    draws and prints nothing and leaves the runs' output as the host set it; what it is told counts on the host
    (runs planned, reused, started, finished), so the command shows one bar. Its own `done` and `total` are its
    part's, as the command that opened it reads them back."""

    def __init__(self, command: str, total: int, *, done: int = 0, unit: str = "runs", verbose: bool | None = None,
                 stream: TextIO | None = None, interactive: bool | None = None) -> None:
        self.host = _active[-1]
        self.command, self.total, self.done, self.initial, self.unit = command, total, done, done, unit
        self.section, self.current = "", ""
        self.interactive, self.stream, self._lock = self.host.interactive, self.host.stream, self.host._lock
        self._bar = None
        self.host.add_total(total)
        self.host.reused(done)

    def start(self, name: str) -> None:
        self.host.start(name)

    def finished(self, name: str, outcome: str = "", count: int = 1) -> None:
        with self._lock:
            self.done += count
            self.host.finished(name, outcome, count)

    def reused(self, count: int) -> None:
        with self._lock:
            self.done += count
            self.host.reused(count)

    def set_done(self, done: int, running: Sequence[str] = ()) -> None:
        with self._lock:
            more = max(done - self.done, 0)
            self.done += more
            self.host.set_done(self.host.done + more, running)

    def set_section(self, name: str) -> None:
        self.host.set_section(name)

    def add_total(self, more: int) -> None:
        with self._lock:
            self.total += more
            self.host.add_total(more)

    def write(self, line: str, file: TextIO | None = None) -> None:
        self.host.write(line, file)

    def close(self) -> None:
        """Nothing to end: the host's bar stays open."""

    def remaining(self) -> float | None:
        return self.host.remaining()

    def status(self) -> str:
        return self.host.status()


def open_bar(command: str, total: int, **options: object) -> RunsBar:
    """The command's bar (`RunsBar`, `options` its keywords) or, while another is open in this process (each step's
    `ablate` inside `select`), a `Nested` one that counts on it: one bar per command."""
    return (Nested if _active else RunsBar)(command, total, **options)


@contextlib.contextmanager
def runs_bar(command: str, total: int, *, done: int = 0, unit: str = "runs", verbose: bool | None = None,
             stream: TextIO | None = None) -> Iterator[RunsBar]:
    """`open_bar`, closed at the end of the block."""
    bar = open_bar(command, total, done=done, unit=unit, verbose=verbose, stream=stream)
    try:
        yield bar
    finally:
        bar.close()


@contextlib.contextmanager
def every(seconds: float, poll: Callable[[], None] | None) -> Iterator[None]:
    """Call `poll()` every `seconds` on a thread while the block runs, and once after it (None: nothing)."""
    if poll is None:
        yield
        return
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(seconds):
            try:
                poll()
            except Exception as err:  # noqa: BLE001 - a failed look at the queue must not end the command
                log(f"progress: could not read the queue ({type(err).__name__}: {err})")

    thread = threading.Thread(target=loop, name="progress-poll", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        with contextlib.suppress(Exception):
            poll()
