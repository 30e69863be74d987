"""Optuna storages as the shared store of many trainings: a queue of fixed tasks, dead workers, one parent run.

Storages (`open_storage`): a journal file (default `optuna.journal` beside the SQLite MLflow store, safe for
several local processes) or a database URL (PostgreSQL for many machines; its trials get Optuna's heartbeat).

A queue (`run_queue`) holds fixed tasks (an ablation's (variant, seed) runs), one enqueued trial each, nothing
searched. Every process that runs the same command, on this machine or another on the same storage, queues the
tasks not done yet and drains the queue with `study.optimize`, so Optuna's own heartbeat covers each task on a
database storage. Two processes may queue one task twice: the earliest waiting or running trial of a task runs
it, and a later one is told PRUNED (`DUPLICATE`). Only public Optuna calls are used.

Dead workers (`fail_dead_trials`): a RUNNING trial whose worker on this machine is gone (by pid and start time,
`liveness.process_alive`) is told FAIL at once; one on another machine after its heartbeat goes stale
(database storages: `HEARTBEAT_SECONDS`, `GRACE_SECONDS`).
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from cifar_mlops import progress
from cifar_mlops.errors import UserError, first_line, redact
from cifar_mlops.execution.liveness import process_alive, process_started
from cifar_mlops.execution.workers import run_worker_processes

DEFAULT_JOURNAL = "optuna.journal"
HEARTBEAT_SECONDS = 20  # database storages: a running trial's process writes a heartbeat this often
GRACE_SECONDS = 60  # ... and a trial without one for this long is failed by the next process
# What the database says to the processes that lose the race to create Optuna's tables in an empty database
CONCURRENT_CREATION_ERRORS = ("duplicate key value", "already exists", "UniqueViolation", "IntegrityError")
HEARTBEAT_REASON = "its worker stopped (no heartbeat); trial marked FAIL"
QUEUE_POLL_SECONDS = 5  # how often a process whose own tasks are done looks at the others' again
TASK = "task"  # user attr of a queued trial: what to run
OUTCOME = "outcome"  # user attr of a queued trial told PRUNED without running: why
DUPLICATE = "duplicate: an earlier trial of the queue holds this task"
NOTHING_LEFT = "no task: another process took the last one"
CLAIM = "claim"  # user attr of a finished trial holding a process's proposal in `elect`
KIND = "kind"  # user attr of a study: what it is, shown on its page in optuna-dashboard beside tuning studies
QUEUE_KIND = "run queue (not a tuning study): one trial per run of an ablation or selection, value 0"

optuna.logging.set_verbosity(optuna.logging.WARNING)  # the commands' progress lines replace Optuna's
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


@contextlib.contextmanager
def _quiet():
    """Without Optuna's warning that heartbeats are "experimental" (since Optuna 2.9), wherever filters were reset."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


class QueueError(UserError):
    """A storage or queue that cannot be opened as asked (a malformed URL, an unreachable server, ...)."""

    exit_code = 2


def log(message: str) -> None:
    progress.log(message)


# ---------------------------------------------------------------------------
# Storages


def journal_path(storage: str | None) -> Path | None:
    """The journal file `storage` names (None, a path, or `journal:PATH`), or None for a database URL.

    None: `optuna.journal` beside a SQLite MLflow store, else in the working directory
    (`mlflow run` starts entry points in the project folder, not where the store is)."""
    if not storage:
        uri = os.environ.get("MLFLOW_TRACKING_URI", "")
        folder = Path(uri[len("sqlite:///"):]).resolve().parent if uri.startswith("sqlite:///") else Path.cwd()
        return folder / DEFAULT_JOURNAL
    if storage.startswith("journal:"):
        return Path(storage[len("journal:"):]).expanduser().resolve()
    if "://" in storage:
        return None
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", storage):
        raise QueueError(f"malformed storage URL {redact(storage)!r}: expected dialect://..., e.g. "
                         "postgresql://user@host:5432/db or sqlite:///optuna.db, or a journal file path")
    return Path(storage).expanduser().resolve()


def absolute(storage: str | None) -> str | None:
    """`storage` as worker processes started elsewhere read it (a journal file by its absolute path)."""
    path = journal_path(storage)
    return storage if path is None else f"journal:{path}"


def open_storage(storage: str | None) -> optuna.storages.BaseStorage:
    """Open (creating if needed) the storage; every failure is one QueueError line."""
    path = journal_path(storage)
    if path is not None:
        if not path.parent.is_dir():
            raise QueueError(f"journal storage {path}: folder {path.parent} does not exist")
        from optuna.storages.journal import JournalFileBackend, JournalFileSymlinkLock

        try:
            # The symlink lock is atomic on local disks and NFS; a lock left by a killed
            # process is broken after its grace period.
            return optuna.storages.JournalStorage(
                JournalFileBackend(str(path), lock_obj=JournalFileSymlinkLock(str(path), grace_period=30)))
        except Exception as err:  # noqa: BLE001 - a corrupt or unreadable file
            raise QueueError(f"cannot open journal storage {path}: {first_line(err)}") from None
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        url = make_url(storage)
    except ArgumentError as err:
        raise QueueError(f"malformed storage URL {redact(storage)!r}: {first_line(err)}") from None
    engine_kwargs: dict[str, Any] = {}
    if url.get_backend_name() in ("postgresql", "mysql"):
        engine_kwargs["connect_args"] = {"connect_timeout": 10}
    attempt = 0
    while True:
        attempt += 1
        try:
            with _quiet():
                return optuna.storages.RDBStorage(
                    storage, engine_kwargs=engine_kwargs, heartbeat_interval=HEARTBEAT_SECONDS,
                    grace_period=GRACE_SECONDS, heartbeat_stale_trial_callback=_stale_trial_failed)
        except Exception as err:  # noqa: BLE001 - unknown dialect, unreachable server, bad credentials
            # Commands started together on an empty database all create Optuna's tables; the
            # losers fail on the database's own catalogue. Once one has won, the tables exist.
            if attempt < 5 and any(text in str(err) for text in CONCURRENT_CREATION_ERRORS):
                time.sleep(0.5 * attempt)
                continue
            raise QueueError(f"cannot open Optuna storage {redact(storage)}: {first_line(err)}") from None


# ---------------------------------------------------------------------------
# Workers of a trial, and the trials of dead workers


def claim(trial: optuna.Trial) -> None:
    """Record on `trial` the process running it (host, pid, start time): how `fail_dead_trials` tells a dead
    worker's trial."""
    for key, value in {"worker_host": socket.gethostname(), "worker_pid": os.getpid(),
                       "worker_start": process_started()}.items():
        trial.set_user_attr(key, value)


def _worker_gone(attrs: dict[str, Any]) -> bool:
    """Whether the worker that `claim` recorded ran on this machine and has ended."""
    if attrs.get("worker_host") != socket.gethostname() or "worker_pid" not in attrs:
        return False
    started = attrs.get("worker_start")
    return not process_alive(int(attrs["worker_pid"]), started if isinstance(started, float) else None)


def end_trial_run(trial: optuna.trial.FrozenTrial, reason: str) -> None:
    """End a failed trial's MLflow run (if it recorded one, user attr `mlflow_run_id`) FAILED with `reason`."""
    run_id = trial.user_attrs.get("mlflow_run_id")
    if run_id:
        from cifar_mlops.tracking import studies

        studies.end_trial_run(run_id, "FAIL", reason)


def _stale_trial_failed(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """Heartbeat callback (database storages): the trial's worker went silent; end its run too."""
    end_trial_run(trial, HEARTBEAT_REASON)


def fail_dead_trials(study: optuna.Study,
                     on_failed: Callable[[optuna.trial.FrozenTrial, str], None] | None = None) -> list[int]:
    """Tell FAIL the RUNNING trials whose worker is gone, end their runs, call `on_failed(trial, reason)` for
    each; return their numbers. Workers on this machine are checked by pid (at once), workers elsewhere by
    Optuna's heartbeat (database storages only, after GRACE_SECONDS)."""
    failed: list[int] = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if not _worker_gone(trial.user_attrs):
            continue
        reason = f"worker pid {trial.user_attrs['worker_pid']} died during the trial"
        try:
            # any process may tell a RUNNING trial by number; one finished meanwhile is left as it is
            told = study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another process finished it between our read and our write
        if told.state != TrialState.FAIL:
            continue
        end_trial_run(told, reason)
        if on_failed is not None:
            on_failed(told, reason)
        failed.append(told.number)
    before = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))}
    with _quiet():
        optuna.storages.fail_stale_trials(study)  # no-op unless the storage has heartbeats
    stale = [t for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)) if t.number not in before]
    for trial in stale:
        if on_failed is not None:
            on_failed(trial, HEARTBEAT_REASON)
    return sorted(set(failed) | {t.number for t in stale})


# ---------------------------------------------------------------------------
# One value every process agrees on


def elect(study: optuna.Study, key: str, candidate: str | None = None,
          valid: Callable[[str], bool] = lambda value: True) -> str | None:
    """The value of `key` the processes sharing `study` agreed on: the first `valid` one proposed.

    With a `candidate`, propose it first. A proposal is a finished trial added in one storage write
    (`study.add_trial`); the storage numbers trials in the order they are written, so a process that sees its
    own proposal sees every earlier one, and processes started at the same moment all pick the same.
    Without a candidate: the value agreed on so far, None if none."""
    if candidate is not None:
        study.add_trial(optuna.trial.create_trial(state=TrialState.COMPLETE, value=0.0,
                                                  user_attrs={CLAIM: key, "value": candidate}))
    for trial in sorted(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)), key=lambda t: t.number):
        if trial.user_attrs.get(CLAIM) == key and valid(trial.user_attrs["value"]):
            return trial.user_attrs["value"]
    return None


# ---------------------------------------------------------------------------
# A queue of fixed tasks


def open_queue(name: str, storage: str | None) -> optuna.Study:
    """The queue `name` (a study, created if missing, its user attr `kind` saying it is a queue), dead local
    workers' tasks failed. Its callers name it `ablation ...` or `selection ...`: in optuna-dashboard, beside the
    tuning studies (`cifar10-<exp>` or `tune --study NAME`), what a study is shows in its name."""
    opened = open_storage(storage)
    try:
        study = optuna.create_study(study_name=name, storage=opened, load_if_exists=True,
                                    sampler=optuna.samplers.RandomSampler(), pruner=optuna.pruners.NopPruner())
    except Exception as err:  # noqa: BLE001 - e.g. the database went away
        raise QueueError(f"cannot open queue {name!r} in {redact(storage) or DEFAULT_JOURNAL}: "
                         f"{first_line(err)}") from None
    if KIND not in study.user_attrs:
        study.set_user_attr(KIND, QUEUE_KIND)
    fail_dead_trials(study)
    return study


def _tasks(study: optuna.Study, states: tuple[TrialState, ...]) -> list[optuna.trial.FrozenTrial]:
    return [t for t in study.get_trials(deepcopy=False, states=states) if TASK in t.user_attrs]


def enqueue(study: optuna.Study, tasks: list[str]) -> None:
    """Queue each task that no WAITING or RUNNING trial holds yet."""
    held = {t.user_attrs[TASK] for t in _tasks(study, (TrialState.WAITING, TrialState.RUNNING))}
    for task in tasks:
        if task not in held:
            study.enqueue_trial({}, user_attrs={TASK: task})


def _holder(study: optuna.Study, trial: optuna.Trial, task: str) -> int | None:
    """The number of an earlier trial of `task`, WAITING or RUNNING, that runs it instead of `trial`: the
    earliest trial of a task runs it. (One that ended is no holder: whether its task is done is `is_done`'s
    to say, from the runs themselves.)"""
    for other in _tasks(study, (TrialState.WAITING, TrialState.RUNNING)):
        if other.number < trial.number and other.user_attrs[TASK] == task:
            return other.number
    return None


def drain(study: optuna.Study, work: Callable[[str], None]) -> int:
    """Run `work(task)` for queued tasks until none is waiting; return how many this process ran.

    The trials run in `study.optimize` (Optuna's heartbeat on database storages): each takes the oldest
    waiting task. Optuna has no "take a waiting trial or none" call (`study.ask` makes a new trial when none is
    waiting), so the loop stops once none is waiting, and a trial that found none, or a task held by an
    earlier trial, is told PRUNED without running. A task whose work raises is told FAIL and the error goes on
    (the next command queues it again)."""
    ran = 0

    def objective(trial: optuna.Trial) -> float:
        nonlocal ran
        claim(trial)
        task = trial.user_attrs.get(TASK)
        if task is None or _holder(study, trial, task) is not None:
            trial.set_user_attr(OUTCOME, NOTHING_LEFT if task is None else DUPLICATE)
            raise optuna.TrialPruned()
        work(task)
        ran += 1
        return 0.0

    def stop_when_empty(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if not _tasks(study, (TrialState.WAITING,)):
            study.stop()

    if _tasks(study, (TrialState.WAITING,)):
        study.optimize(objective, callbacks=[stop_when_empty])
    return ran


def task_progress(study: optuna.Study, tasks: Sequence[str], since: int = 0) -> tuple[int, list[str]]:
    """What the queue says of `tasks` in its trials numbered from `since` on: how many are done (a COMPLETE
    trial), and which run now (a RUNNING one)."""
    wanted = set(tasks)
    done, running = set(), []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING)):
        task = trial.user_attrs.get(TASK)
        if trial.number >= since and task in wanted:
            if trial.state == TrialState.COMPLETE:
                done.add(task)
            else:
                running.append(task)
    return len(done), running


def run_queue(name: str, storage: str | None, tasks: list[str], work: Callable[[str], None],
              is_done: Callable[[str], bool], *, study: optuna.Study | None = None,
              workers: Sequence[list[str]] = (), tracking_uri: str = "",
              on_progress: Callable[[int, list[str]], None] | None = None) -> list[str]:
    """Queue `tasks` and run them all: in this process, with a `cifar-mlops ARGS` worker process for each ARGS
    of `workers` (each draining the same queue), and any process of another machine on the same storage. A
    task lost with a dead worker is queued again and run here; returns what went wrong with the worker
    processes. `work` must skip a task that `is_done` (another process finished it). `study`: the queue
    already opened (`open_queue`). `on_progress(done, running)`: told what the queue says of `tasks`
    (`task_progress`) every QUEUE_POLL_SECONDS while the worker processes run (a progress bar's count)."""
    study = study or open_queue(name, storage)
    held = [t.number for t in _tasks(study, (TrialState.WAITING, TrialState.RUNNING)) if t.user_attrs[TASK] in tasks]
    since = min([*held, len(study.get_trials(deepcopy=False))])  # the trials that run `tasks` now, and later ones
    enqueue(study, tasks)
    failures: list[str] = []
    if workers:
        poll = None if on_progress is None else lambda: on_progress(*task_progress(study, tasks, since))
        with progress.every(QUEUE_POLL_SECONDS, poll):
            failures = run_worker_processes([(f"tasks of queue {name!r}", args) for args in workers], tracking_uri)
    while True:
        drain(study, work)
        fail_dead_trials(study)
        if _tasks(study, (TrialState.RUNNING,)):
            time.sleep(QUEUE_POLL_SECONDS)  # another process is still on a task
            continue
        left = [task for task in tasks if not is_done(task)]
        if not left:
            return failures
        log(f"queue {name!r}: {len(left)} task(s) lost with a worker; running them here")
        enqueue(study, left)
