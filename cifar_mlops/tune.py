"""Optuna study around `train()`: the only module importing optuna.

`tune(exp_id, trials)` searches the experiment's `search:` block. Each trial
resolves the experiment with the trial's values as overrides (the same
validation as `train`), calls the same `train(config)` (no registration), and
lands as a nested MLflow run under one parent run per study in
`cifar10-tuning`. Several processes (on one or many machines) cooperate on one
study through its storage:

- default: a journal file `optuna.journal` beside the SQLite MLflow store (the
  working directory by default), safe for several local processes (Optuna's
  JournalFileBackend with its symlink lock);
- `--storage postgresql://...` (or any SQLAlchemy URL) for many machines.

A worker that dies leaves its trial RUNNING; it is marked FAIL (and its
nested run FAILED) by the next process that looks at the study: at once when
the dead worker ran on this machine (its pid is gone), and for RDB storages
after its heartbeat goes stale (`HEARTBEAT_SECONDS`, `GRACE_SECONDS`).

Nested run states: COMPLETE -> FINISHED, PRUNED -> KILLED (tag
`pruned_at_epoch`, no failure), FAIL -> FAILED; every trial run carries the tag
`state` with the Optuna state and `trial_number`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
from optuna.trial import TrialState

from cifar_mlops import backend, progress
from cifar_mlops import config as cfg
from cifar_mlops.errors import UserError, first_line, redact

DEFAULT_JOURNAL = "optuna.journal"
OBJECTIVE = "val_accuracy"  # maximized; also the per-epoch metric the pruner watches
HEARTBEAT_SECONDS = 20  # RDB storages: a running trial's process writes a heartbeat this often
GRACE_SECONDS = 60  # ... and a trial without one for this long is failed by the next process
# What the database says to the processes that lose the race to create Optuna's tables in an empty database
CONCURRENT_CREATION_ERRORS = ("duplicate key value", "already exists", "UniqueViolation", "IntegrityError")
SAMPLERS = ("tpe", "random")
PRUNERS = ("median", "percentile", "successive-halving", "hyperband", "none")
SEARCHED_SECTION = "train"  # every search dimension overrides train.<name>
TRIAL_METRICS = ("val_accuracy", "val_f1_macro", "train_accuracy", "test_accuracy", "epochs_run")
COUNTED_STATES = ("COMPLETE", "PRUNED", "FAIL", "RUNNING")  # TuneResult.counts and the parent's trials_* tags

optuna.logging.set_verbosity(optuna.logging.WARNING)  # our own progress line replaces Optuna's
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


class TuneError(UserError):
    """A study that cannot start as asked (bad storage, empty search space, another experiment's study, ...)."""

    exit_code = 2


def log(message: str) -> None:
    progress.log(message, prefix="cifar-mlops tune")


# ---------------------------------------------------------------------------
# The experiment and its search space


def study_name_for(exp_id: str) -> str:
    return f"cifar10-{exp_id}"


def base_config(exp_id: str, overrides: dict[str, Any]) -> cfg.ExperimentConfig:
    """The experiment with the user's overrides, checked to be tunable at every end of its search space."""
    config = cfg.resolve(exp_id, overrides)
    if config.kind != "train":
        raise TuneError(f"{exp_id} is an ensemble experiment; only trainable experiments can be tuned")
    dimensions = config.search.dimensions()
    if not dimensions:
        raise TuneError(f"experiment {exp_id} has an empty search space; add a `search:` block "
                        "(e.g. learning_rate: {low: 1.0e-4, high: 1.0e-2, log: true}) to its file or base")
    for name, dimension in dimensions.items():  # each extreme must resolve, e.g. epochs vs warmup_epochs
        values = dimension if isinstance(dimension, tuple) else (dimension.low, dimension.high)
        for value in values:
            try:
                cfg.resolve(exp_id, {**overrides, f"{SEARCHED_SECTION}.{name}": value})
            except cfg.ConfigError as err:
                raise cfg.ConfigError(f"search.{name} = {value!r} does not resolve: {err}") from None
    return config


def suggest(trial: optuna.Trial, space: cfg.SearchSpace) -> dict[str, Any]:
    """The trial's values as config overrides (`train.<name>` -> value)."""
    values: dict[str, Any] = {}
    for name, dimension in space.dimensions().items():
        if isinstance(dimension, tuple):
            value = trial.suggest_categorical(name, list(dimension))
        elif isinstance(dimension, cfg.IntRange):
            value = trial.suggest_int(name, dimension.low, dimension.high, step=dimension.step)
        else:
            value = trial.suggest_float(name, dimension.low, dimension.high, log=dimension.log)
        values[f"{SEARCHED_SECTION}.{name}"] = value
    return values


def as_overrides(params: dict[str, Any]) -> dict[str, Any]:
    return {f"{SEARCHED_SECTION}.{name}": value for name, value in params.items()}


# ---------------------------------------------------------------------------
# Storage, sampler, pruner


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
        raise TuneError(f"malformed storage URL {redact(storage)!r}: expected dialect://..., e.g. "
                        "postgresql://user@host:5432/db or sqlite:///optuna.db, or a journal file path")
    return Path(storage).expanduser().resolve()


def open_storage(storage: str | None) -> optuna.storages.BaseStorage:
    """Open (creating if needed) the study storage; every failure is one TuneError line."""
    path = journal_path(storage)
    if path is not None:
        if not path.parent.is_dir():
            raise TuneError(f"journal storage {path}: folder {path.parent} does not exist")
        from optuna.storages.journal import JournalFileBackend, JournalFileSymlinkLock

        try:
            # The symlink lock is atomic on local disks and NFS; a lock left by a killed
            # process is broken after its grace period.
            return optuna.storages.JournalStorage(
                JournalFileBackend(str(path), lock_obj=JournalFileSymlinkLock(str(path), grace_period=30)))
        except Exception as err:  # noqa: BLE001 - a corrupt or unreadable file
            raise TuneError(f"cannot open journal storage {path}: {first_line(err)}") from None
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        url = make_url(storage)
    except ArgumentError as err:
        raise TuneError(f"malformed storage URL {redact(storage)!r}: {first_line(err)}") from None
    shown = redact(storage)
    engine_kwargs: dict[str, Any] = {}
    if url.get_backend_name() in ("postgresql", "mysql"):
        engine_kwargs["connect_args"] = {"connect_timeout": 10}
    attempt = 0
    while True:
        attempt += 1
        try:
            with warnings.catch_warnings():  # heartbeats are "experimental" since Optuna 2.9
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(
                    storage, engine_kwargs=engine_kwargs, heartbeat_interval=HEARTBEAT_SECONDS,
                    grace_period=GRACE_SECONDS, heartbeat_stale_trial_callback=_stale_trial_failed)
        except Exception as err:  # noqa: BLE001 - unknown dialect, unreachable server, bad credentials
            # Commands started together on an empty database all create Optuna's tables; the
            # losers fail on the database's own catalogue. Once one has won, the tables exist.
            if attempt < 5 and any(text in str(err) for text in CONCURRENT_CREATION_ERRORS):
                time.sleep(0.5 * attempt)
                continue
            raise TuneError(f"cannot open Optuna storage {shown}: {first_line(err)}") from None


def make_sampler(name: str, seed: int | None) -> optuna.samplers.BaseSampler:
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    # constant_liar: parallel workers do not all pick the same promising point
    return optuna.samplers.TPESampler(seed=seed, constant_liar=True)


def make_pruner(name: str, config: cfg.ExperimentConfig) -> optuna.pruners.BasePruner:
    space = config.search
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=space.pruning_startup_trials,
                                           n_warmup_steps=space.pruning_warmup_epochs)
    if name == "percentile":
        return optuna.pruners.PercentilePruner(space.pruning_percentile, n_startup_trials=space.pruning_startup_trials,
                                               n_warmup_steps=space.pruning_warmup_epochs)
    if name == "successive-halving":
        # a rung at each 0-based epoch max(1, warm-up) x factor**k (epochs 2, 4 and 10 with the defaults): only
        # the best 1/factor of the trials that reached a rung go on, so most trials cost two epochs
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=max(1, space.pruning_warmup_epochs),
                                                      reduction_factor=space.pruning_reduction_factor)
    if name == "hyperband":
        max_epochs = space.epochs.high if space.epochs else config.train.epochs
        return optuna.pruners.HyperbandPruner(min_resource=max(1, space.pruning_warmup_epochs),
                                              max_resource=max(max_epochs, 1),
                                              reduction_factor=space.pruning_reduction_factor)
    return optuna.pruners.NopPruner()


@dataclass(frozen=True)
class Curve:
    """One trial that ran to its end: its val_accuracy after each of its epochs, and its value."""

    values: tuple[float, ...]  # fractions; values[0] after epoch 1
    value: float  # the trial's objective (the run's final val_accuracy)


@dataclass(frozen=True)
class Replayed:
    """What a pruner would have done to a study: per trial, the epochs it ran and whether it was pruned."""

    epochs: tuple[int, ...]
    pruned: tuple[bool, ...]
    best_value: float  # best value of the trials it let finish


def replay_pruning(curves: list[Curve], pruner_name: str, config: cfg.ExperimentConfig) -> Replayed:
    """Replay pruner `pruner_name` (with `config`'s search.pruning_* settings) on a study's finished trials.

    The trials are told to a fresh in-memory study in their order, one epoch at a time, exactly as a
    one-worker `tune` reports them (the last epoch reported, never pruned): the pruner sees only the
    values up to each epoch, and a trial it stops ends there. With a seeded sampler the trials a pruned
    study proposes do not depend on the pruner, so this is that study, without training anything again.
    """
    study = optuna.create_study(direction="maximize", pruner=make_pruner(pruner_name, config),
                                sampler=optuna.samplers.RandomSampler(seed=0))
    epochs, pruned, values = [], [], []
    for curve in curves:
        trial = study.ask()
        for epoch, value in enumerate(curve.values):
            trial.report(value, step=epoch)
            if epoch + 1 < len(curve.values) and trial.should_prune():
                study.tell(trial, state=TrialState.PRUNED)
                epochs.append(epoch + 1)
                pruned.append(True)
                break
        else:
            study.tell(trial, curve.value)
            epochs.append(len(curve.values))
            pruned.append(False)
            values.append(curve.value)
    return Replayed(tuple(epochs), tuple(pruned), max(values, default=float("nan")))


# ---------------------------------------------------------------------------
# Dead workers


def _process_start(pid: int) -> str:
    """The process's start time (clock ticks since boot), '' if unknown or gone; 'Z' for a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    fields = stat.rsplit(")", 1)[1].split()
    return "Z" if fields[0] in ("Z", "X") else fields[19]


def _alive(pid: int, started: str) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    now = _process_start(pid)
    if now == "Z":
        return False
    return not (started and now and now != started)  # a different process reusing the pid


HEARTBEAT_REASON = "its worker stopped (no heartbeat); trial marked FAIL"


def _end_trial_run(trial: optuna.trial.FrozenTrial, reason: str) -> None:
    """End a failed trial's nested run (if it got one) FAILED with `reason`."""
    run_id = trial.user_attrs.get("mlflow_run_id")
    if run_id:
        from cifar_mlops.tracking import studies

        studies.end_trial_run(run_id, "FAIL", reason)


def _stale_trial_failed(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """Heartbeat callback (RDB storages): the trial's worker went silent; end its nested run too."""
    _end_trial_run(trial, HEARTBEAT_REASON)


def _record_fail_reason(storage: optuna.storages.BaseStorage, study: optuna.Study, number: int, reason: str) -> None:
    """Keep why trial `number`, started by a process now dead, is failed: its system attr `fail_reason`
    (which `progress_line` shows and `_finish` gives a still-open nested run).

    Optuna has no public call for this: `Study.tell` sets the state but takes no reason, and
    `Trial.set_user_attr` needs the live `Trial` object of the process that ran it. So this calls the
    storage's own methods (`BaseStorage`, "not supposed to be directly accessed by library users"), on
    the storage this process opened, by study name and trial number. It must come before the trial is
    told FAIL: a finished trial cannot change (`UpdateFinishedTrialError`)."""
    study_id = storage.get_study_id_from_name(study.study_name)
    trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, number)
    storage.set_trial_system_attr(trial_id, "fail_reason", reason)


def fail_dead_trials(study: optuna.Study, storage: optuna.storages.BaseStorage) -> list[int]:
    """Mark FAIL the RUNNING trials whose worker is gone, end their nested runs, log a progress line for
    each; return their numbers. `storage`: the one `study` was opened on.

    Local workers are checked by pid (immediate); workers elsewhere by Optuna's
    heartbeat (RDB storages only, after GRACE_SECONDS)."""
    host = socket.gethostname()
    failed: list[int] = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        attrs = trial.user_attrs
        if attrs.get("worker_host") != host or "worker_pid" not in attrs:
            continue
        if _alive(int(attrs["worker_pid"]), str(attrs.get("worker_start", ""))):
            continue
        reason = f"worker pid {attrs['worker_pid']} died during the trial"
        try:
            _record_fail_reason(storage, study, trial.number, reason)
            # any process may tell a RUNNING trial by number; one finished meanwhile is left as it is
            told = study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another process finished it between our read and our write
        if told.state != TrialState.FAIL:
            continue
        _end_trial_run(told, reason)
        log(progress_line(study, told))
        failed.append(told.number)
    before = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)  # no-op unless the storage has heartbeats
    stale = [t for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)) if t.number not in before]
    for trial in stale:
        log(progress_line(study, trial, reason=HEARTBEAT_REASON))
    return sorted(set(failed) | {t.number for t in stale})


# ---------------------------------------------------------------------------
# One worker: load data once, run trials


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker process needs (passed as JSON to `cifar-mlops tune-worker`)."""

    exp_id: str
    overrides: dict[str, Any]
    study_name: str
    storage: str | None
    sampler: str
    pruner: str
    parent_run_id: str
    experiment: str  # MLflow experiment holding the parent and its nested runs
    seed: int | None = None
    index: int = 0
    trials: int = 1
    timeout: float | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> WorkerSpec:
        return cls(**json.loads(text))


def run_worker(spec: WorkerSpec) -> int:
    """Run up to `spec.trials` trials of the study in this process; return how many finished."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from cifar_mlops import data
    from cifar_mlops.tracking import store, studies
    from cifar_mlops.train import TrainingFailed, train

    store.quiet_mlflow()
    config = base_config(spec.exp_id, spec.overrides)
    storage = open_storage(spec.storage)
    study = optuna.load_study(study_name=spec.study_name, storage=storage,
                              sampler=make_sampler(spec.sampler, spec.seed), pruner=make_pruner(spec.pruner, config))
    log(f"worker {spec.index}: loading data once for all its trials")
    splits = data.load_splits(config.data)
    host, pid = socket.gethostname(), os.getpid()
    started = _process_start(pid)

    def objective(trial: optuna.Trial) -> float:
        trial.set_user_attr("worker_host", host)
        trial.set_user_attr("worker_pid", pid)
        trial.set_user_attr("worker_start", started)
        values = suggest(trial, config.search)
        trial_config = cfg.resolve(spec.exp_id, {**spec.overrides, **values})
        run_ids: list[str] = []

        def tag_run(run_id: str) -> None:
            # the run's trial number first: a worker killed before the trial knows its run still
            # leaves a run that the next process can match to the trial and close
            studies.tag_run(run_id, {"trial_number": trial.number, "optuna_study": spec.study_name,
                                     "state": "RUNNING", "worker": f"{host}:{pid}",
                                     "mlflow.runName": f"{spec.exp_id} trial {trial.number}"})
            run_ids.append(run_id)
            trial.set_user_attr("mlflow_run_id", run_id)

        try:
            metrics = train(trial_config, splits=splits, register=False, experiment=spec.experiment,
                            parent_run_id=spec.parent_run_id, on_run_start=tag_run,
                            callbacks=[pruning_callback(trial, trial_config.train.epochs)])
        except optuna.TrialPruned:
            raise
        except BaseException as err:
            if run_ids:
                studies.end_trial_run(run_ids[-1], "FAIL", f"{type(err).__name__}: {err}")
            raise
        for key in TRIAL_METRICS:
            if key in metrics:
                trial.set_user_attr(key, float(metrics[key]))
        return float(metrics[OBJECTIVE])

    def finished(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        run_id = trial.user_attrs.get("mlflow_run_id")
        if run_id:
            studies.end_trial_run(run_id, trial.state.name, trial.system_attrs.get("fail_reason"))
        log(f"worker {spec.index}: {progress_line(study, trial)}")

    # a batch size too large for the device fails that trial, not the worker
    study.optimize(objective, n_trials=spec.trials, timeout=spec.timeout, callbacks=[finished],
                   catch=(TrainingFailed, cfg.ConfigError, *backend.out_of_memory_errors()), gc_after_trial=True)
    return spec.trials


def pruning_callback(trial: optuna.Trial, epochs: int):
    """optuna-integration's Keras pruning callback on `val_accuracy`, minus the check after the last epoch.

    Stopping then saves nothing and would throw away a finished trial's value; that epoch's
    value is still reported, so the pruner compares later trials against it.
    """
    from optuna_integration import KerasPruningCallback  # imports Keras: only in workers

    class PruneBeforeLastEpoch(KerasPruningCallback):
        def on_epoch_end(self, epoch: int, logs: dict[str, float] | None = None) -> None:
            if epoch + 1 < epochs:
                super().on_epoch_end(epoch, logs)
            elif logs and OBJECTIVE in logs:
                trial.report(float(logs[OBJECTIVE]), step=epoch)

    return PruneBeforeLastEpoch(trial, OBJECTIVE)


def progress_line(study: optuna.Study, trial: optuna.trial.FrozenTrial, reason: str | None = None) -> str:
    """One line on a finished trial: outcome, params, the study's best so far. `reason`: why it failed, when
    the trial itself does not say (its system attr `fail_reason`, set for a dead worker's trial)."""
    params = " ".join(f"{k}={_fmt(v)}" for k, v in trial.params.items())
    if trial.state == TrialState.COMPLETE:
        outcome = f"{OBJECTIVE}={trial.value:.4f}"
    elif trial.state == TrialState.PRUNED:
        last = max(trial.intermediate_values) + 1 if trial.intermediate_values else 0
        outcome = f"pruned after epoch {last}"
    else:
        outcome = f"failed ({trial.system_attrs.get('fail_reason') or reason or 'see its run'})"[:200]
    best = _best_trial(study)
    best_text = f"best: trial {best.number} {OBJECTIVE}={best.value:.4f}" if best else "best: none yet"
    return f"trial {trial.number} {trial.state.name}: {outcome} | {params} | {best_text}"


def _fmt(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    """`study.best_trial` (the first of equals), None before any trial completed."""
    try:
        return study.best_trial
    except ValueError:  # "No trials are completed yet."
        return None


# ---------------------------------------------------------------------------
# The coordinator: study, parent run, workers, summary


@dataclass
class TuneResult:
    study_name: str
    storage: str
    parent_run_id: str
    tracking_uri: str
    experiment: str
    counts: dict[str, int] = field(default_factory=dict)
    best: dict[str, Any] | None = None  # {"number", "value", "params", "run_id"}
    table: str = ""
    registered: str | None = None
    worker_failures: list[str] = field(default_factory=list)
    failed_dead: list[int] = field(default_factory=list)


def gpu_ids() -> list[str]:
    """The GPUs workers are spread over: $CUDA_VISIBLE_DEVICES if set, else what nvidia-smi lists."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [g for g in visible.split(",") if g.strip() and g.strip() != "-1"]
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [str(i) for i, line in enumerate(out.stdout.splitlines()) if line.startswith("GPU ")]


def _prepare_study(spec: WorkerSpec, config: cfg.ExperimentConfig
                   ) -> tuple[optuna.Study, optuna.storages.BaseStorage, list[int]]:
    """The study (created or loaded, checked to tune this experiment), its storage, and the trials of dead
    workers it had, now failed."""
    storage = open_storage(spec.storage)
    try:
        study = optuna.create_study(study_name=spec.study_name, storage=storage, load_if_exists=True,
                                    direction="maximize", sampler=make_sampler(spec.sampler, spec.seed),
                                    pruner=make_pruner(spec.pruner, config))
    except Exception as err:  # noqa: BLE001 - e.g. the database went away
        raise TuneError(f"cannot create study {spec.study_name!r} in {redact(spec.storage) or DEFAULT_JOURNAL}: "
                        f"{first_line(err)}") from None
    owner = study.user_attrs.get("exp_id")
    if owner is None:
        study.set_user_attr("exp_id", spec.exp_id)
        study.set_user_attr("objective", OBJECTIVE)
    elif owner != spec.exp_id:
        raise TuneError(f"study {spec.study_name!r} tunes experiment {owner}, not {spec.exp_id}; "
                        "pass another --study name")
    return study, storage, fail_dead_trials(study, storage)


def _parent_run(study: optuna.Study, storage: optuna.storages.BaseStorage, spec: WorkerSpec,
                tags: dict[str, Any]) -> tuple[str, str]:
    """Create (or reopen) the study's one parent run, remembered in the study, before any worker starts."""
    from cifar_mlops.tracking import runs, store, studies

    uri = store.configure_store()
    attrs = study.user_attrs
    reuse = attrs.get("mlflow_parent_run_id") if attrs.get("mlflow_tracking_uri") == uri else None
    adopted = runs.adopted_run_id()  # `mlflow run` made the parent run for us
    run_id, experiment = studies.study_run(spec.study_name, tags, reuse_run_id=reuse)
    if run_id != reuse:
        study.set_user_attr("mlflow_parent_run_id", run_id)
        study.set_user_attr("mlflow_tracking_uri", uri)
        time.sleep(0.2)
        winner = optuna.load_study(study_name=spec.study_name, storage=storage).user_attrs.get(
            "mlflow_parent_run_id")
        if winner and winner != run_id and not adopted:  # another process started at once
            studies.delete_run(run_id)
            run_id, experiment = studies.study_run(spec.study_name, tags, reuse_run_id=winner)
    return run_id, experiment


def tune(exp_id: str, trials: int, *, study_name: str | None = None, storage: str | None = None,
         workers: int = 1, timeout: float | None = None, sampler: str = "tpe", pruner: str = "median",
         seed: int | None = None, overrides: dict[str, Any] | None = None,
         register_best: bool = False) -> TuneResult:
    """Run `trials` more trials of experiment `exp_id`'s study on `workers` processes; return the summary."""
    from cifar_mlops.tracking import registry, store, studies

    overrides = dict(overrides or {})
    if trials < 1:
        raise TuneError(f"--trials must be at least 1 (got {trials})")
    if workers < 1:
        raise TuneError(f"--workers must be at least 1 (got {workers})")
    if sampler not in SAMPLERS or pruner not in PRUNERS:
        raise TuneError(f"--sampler is one of {', '.join(SAMPLERS)}; --pruner one of {', '.join(PRUNERS)}")
    config = base_config(exp_id, overrides)
    study_name = study_name or study_name_for(exp_id)
    if journal_path(storage) is not None:
        storage = f"journal:{journal_path(storage)}"  # absolute: workers may start elsewhere
    spec = WorkerSpec(exp_id=exp_id, overrides=overrides, study_name=study_name, storage=storage,
                      sampler=sampler, pruner=pruner, parent_run_id="", experiment="", seed=seed)
    study, study_storage, failed_dead = _prepare_study(spec, config)  # logs each failed trial of a dead worker

    store.quiet_mlflow()
    tags = {"optuna_study": study_name, "optuna_storage": redact(storage), "exp_id": exp_id, "family": config.family,
            "objective": f"maximize {OBJECTIVE}", "sampler": sampler, "pruner": pruner,
            "search_space": json.dumps(config.search.model_dump(mode="json", exclude_none=True)),
            "overrides": " ".join(f"{k}={v}" for k, v in overrides.items()) or "none"}
    parent_run_id, experiment = _parent_run(study, study_storage, spec, tags)
    result = TuneResult(study_name=study_name, storage=redact(storage), parent_run_id=parent_run_id,
                        tracking_uri=store.configure_store(), experiment=experiment, failed_dead=failed_dead)
    log(f"study {study_name!r} ({len(study.trials)} earlier trials) in {redact(storage)}; "
        f"parent run {parent_run_id} in MLflow experiment {experiment!r}")

    workers = min(workers, trials)
    offset = len(study.trials)
    shares = [trials // workers + (1 if i < trials % workers else 0) for i in range(workers)]
    specs = [WorkerSpec(**{**asdict(spec), "parent_run_id": parent_run_id, "experiment": experiment, "index": i,
                           "trials": shares[i], "timeout": timeout,
                           "seed": None if seed is None else (seed + 1009 * i + 7919 * offset) % 2**31})
             for i in range(workers)]
    status = "FINISHED"
    try:
        if workers == 1:
            run_worker(specs[0])
        else:
            result.worker_failures = _run_worker_processes(
                [(f"{s.trials} trials", ["tune-worker", "--spec", s.to_json()]) for s in specs], result.tracking_uri)
            if result.worker_failures:
                status = "FAILED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except BaseException:
        status = "FAILED"
        raise
    finally:
        _finish(study, study_storage, result, status)

    if register_best and result.best:
        from cifar_mlops.train import train

        best_config = cfg.resolve(exp_id, {**overrides, **as_overrides(result.best["params"])})
        log(f"retraining the best configuration (trial {result.best['number']}) once, to register it")
        train(best_config, register=True, on_run_start=lambda run_id: studies.tag_run(
            run_id, {"optuna_study": study_name, "tuned_from_trial": result.best["number"],
                     "tuning_parent_run": parent_run_id}))
        result.registered = f"{registry.registered_model_name(best_config.family)} (see `mlflow ui`)"
        studies.tag_run(parent_run_id, {"best_registered": "yes"})
    return result


def _run_worker_processes(workers: list[tuple[str, list[str]]], tracking_uri: str) -> list[str]:
    """Start one `cifar-mlops ARGS` process per (what it does, ARGS), each on its own GPU if there are
    any; wait for all; return what went wrong with them."""
    gpus = gpu_ids()
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_RUN_ID"}
    env["MLFLOW_TRACKING_URI"] = tracking_uri
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    processes = []
    for index, (what, args) in enumerate(workers):
        worker_env = dict(env)
        if gpus:
            worker_env["CUDA_VISIBLE_DEVICES"] = gpus[index % len(gpus)]
        processes.append(subprocess.Popen([sys.executable, "-m", "cifar_mlops.cli", *args], env=worker_env))
        where = f" on GPU {worker_env['CUDA_VISIBLE_DEVICES']}" if gpus else ""
        log(f"worker {index}: pid {processes[-1].pid}, {what}{where}")
    failures = []
    try:
        for index, process in enumerate(processes):
            code = process.wait()
            if code != 0:
                how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
                failures.append(f"worker {index} (pid {process.pid}) {how}")
    except KeyboardInterrupt:  # Ctrl-C reached the workers too: let them end their runs
        for process in processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        raise
    return failures


def _finish(study: optuna.Study, storage: optuna.storages.BaseStorage, result: TuneResult, status: str) -> None:
    """Fail trials of dead workers, close their runs, and record the study on the parent run."""
    from cifar_mlops.tracking import runs, studies

    result.failed_dead += fail_dead_trials(study, storage)
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    for run_id, tags in studies.running_child_runs(result.parent_run_id):
        number = tags.get("trial_number")
        trial = trials.get(int(number)) if number and number.isdigit() else None
        if trial is not None and trial.state != TrialState.RUNNING:
            studies.end_trial_run(run_id, trial.state.name, trial.system_attrs.get("fail_reason"))

    frame = trials_frame(study)
    result.counts = {state: int(n) for state, n in
                     frame["state"].value_counts().reindex(COUNTED_STATES, fill_value=0).items()}
    best = _best_trial(study)
    tags: dict[str, Any] = {"trials_total": len(frame), **{f"trials_{k.lower()}": v for k, v in result.counts.items()}}
    metrics: dict[str, float] = {f"trials_{k.lower()}": float(v) for k, v in result.counts.items()}
    texts = {}
    if best is not None:
        result.best = {"number": best.number, "value": best.value, "params": dict(best.params),
                       "run_id": best.user_attrs.get("mlflow_run_id", "")}
        tags.update({"best_trial": best.number, "best_value": f"{best.value:.6f}",
                     "best_run_id": result.best["run_id"]})
        tags.update({f"best.{SEARCHED_SECTION}.{k}": v for k, v in best.params.items()})
        metrics[f"best_{OBJECTIVE}"] = float(best.value)
        texts["best_params.json"] = json.dumps({"trial": best.number, OBJECTIVE: best.value,
                                                "params": as_overrides(best.params)}, indent=2)
    result.table = best_table(study)
    texts["best_trials.txt"] = result.table + "\n"
    if result.worker_failures:
        tags["failure_reason"] = "; ".join(result.worker_failures)
    figures = study_figures(study)
    try:
        runs.finish_run(result.parent_run_id, status, tags=tags, metrics=metrics, figures=figures,
                                  texts=texts)
    finally:
        from matplotlib import pyplot as plt

        for figure in figures.values():
            plt.close(figure)


def study_figures(study: optuna.Study) -> dict[str, Any]:
    """Optimization history, parameter importances, parallel coordinates, intermediate values (matplotlib).

    A plot the study cannot have yet (importances need 2 finished trials with varied
    params) is left out; the others are still logged."""
    import matplotlib

    matplotlib.use("Agg")
    from optuna.visualization import matplotlib as plots

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    wanted = {"optimization_history": plots.plot_optimization_history,
              "parallel_coordinate": plots.plot_parallel_coordinate,
              "intermediate_values": plots.plot_intermediate_values}
    if len(complete) >= 2:
        wanted["param_importances"] = plots.plot_param_importances
    figures = {}
    if not complete:
        return figures
    for name, plot in wanted.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                axes = plot(study)
        except Exception as err:  # noqa: BLE001 - e.g. importances of a parameter that never varied
            log(f"plot {name} skipped: {first_line(err)}")
            continue
        axes = axes.flat[0] if hasattr(axes, "flat") else axes
        figures[name] = axes.figure
    return figures


def trials_frame(study: optuna.Study) -> pd.DataFrame:
    """`study.trials_dataframe()`: one row per trial, columns number, value, state (its name), `params_*`,
    `user_attrs_*`, `system_attrs_*`; the first three even for a study without trials."""
    frame = study.trials_dataframe(attrs=("number", "value", "state", "params", "user_attrs", "system_attrs"))
    return frame.reindex(columns=frame.columns.union(["number", "value", "state"], sort=False))


def best_table(study: optuna.Study, top: int = 5) -> str:
    """The `top` completed trials, best first (equals in trial order), as a text table: trial, val_accuracy,
    test_accuracy, the searched params, the trial's run id."""
    frame = trials_frame(study)
    complete = (frame[frame["state"] == TrialState.COMPLETE.name]
                .sort_values("value", ascending=False, kind="stable").head(top))
    if complete.empty:
        return "no completed trials yet"
    extras = ["user_attrs_test_accuracy", "user_attrs_mlflow_run_id"]
    complete = complete.reindex(columns=complete.columns.union(extras, sort=False))
    params = sorted(c for c in complete.columns if c.startswith("params_") and complete[c].notna().any())
    table = pd.DataFrame({
        "trial": complete["number"],
        OBJECTIVE: complete["value"].map(_fmt4),
        "test_accuracy": complete["user_attrs_test_accuracy"].map(_fmt4),
        **{name.removeprefix("params_"): complete[name].map(_cell) for name in params},
        "run_id": complete["user_attrs_mlflow_run_id"].map(_cell),
    })
    return table.to_string(index=False)


def _fmt4(value: Any) -> str:
    return "—" if pd.isna(value) else f"{value:.4f}"


def _cell(value: Any) -> str:
    return "" if pd.isna(value) else _fmt(value)


# ---------------------------------------------------------------------------
# A queue of fixed tasks (an ablation's (variant, seed) runs): one enqueued trial each, nothing searched.
# The same storages, dead-worker checks and worker processes as tuning; processes on many machines
# share a queue through a database storage.

QUEUE_POLL_SECONDS = 5  # how often a process whose own tasks are done looks at the others' again


def open_queue(name: str, storage: str | None) -> tuple[optuna.Study, optuna.storages.BaseStorage]:
    """The queue `name` (a study, created if missing) and its storage, dead local workers' tasks failed."""
    opened = open_storage(storage)
    try:
        study = optuna.create_study(study_name=name, storage=opened, load_if_exists=True,
                                    sampler=optuna.samplers.RandomSampler(), pruner=optuna.pruners.NopPruner())
    except Exception as err:  # noqa: BLE001 - e.g. the database went away
        raise TuneError(f"cannot open queue {name!r} in {redact(storage) or DEFAULT_JOURNAL}: "
                        f"{first_line(err)}") from None
    fail_dead_trials(study, opened)
    return study, opened


def enqueue(study: optuna.Study, tasks: list[str]) -> None:
    """Queue each task that no WAITING or RUNNING trial holds yet."""
    held = {t.user_attrs.get("task") for t in study.get_trials(
        deepcopy=False, states=(TrialState.WAITING, TrialState.RUNNING))}
    for task in tasks:
        if task not in held:
            study.enqueue_trial({}, user_attrs={"task": task})


def _take_waiting_trial(study: optuna.Study,
                        storage: optuna.storages.BaseStorage) -> tuple[optuna.Trial, int] | None:
    """The oldest WAITING trial, now RUNNING in this process, and its storage id; None when none is left.

    `study.ask()` pops a waiting trial, but on an empty queue it creates a new one instead of saying
    so, and Optuna has no public "pop or nothing": this is its `Study._pop_waiting_trial_id` written
    with the storage's own calls. The storage's state change is atomic, so two processes never win
    the same trial."""
    study_id = storage.get_study_id_from_name(study.study_name)
    for waiting in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, waiting.number)
        try:
            if storage.set_trial_state_values(trial_id, state=TrialState.RUNNING):
                return optuna.trial.Trial(study, trial_id), trial_id
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
    return None


def drain_queue(study: optuna.Study, storage: optuna.storages.BaseStorage, work: Callable[[str], None]) -> int:
    """Run `work(task)` for queued tasks until none is waiting; return how many this process ran.
    A task whose work raises is told FAIL and the error goes on (the next command queues it again)."""
    host, pid = socket.gethostname(), os.getpid()
    started = _process_start(pid)
    ran = 0
    while (taken := _take_waiting_trial(study, storage)) is not None:
        trial, trial_id = taken
        for key, value in {"worker_host": host, "worker_pid": pid, "worker_start": started}.items():
            trial.set_user_attr(key, value)  # how `fail_dead_trials` tells a dead worker's task
        try:
            with _heartbeat(storage, trial_id):
                work(trial.user_attrs["task"])
        except BaseException:
            study.tell(trial, state=TrialState.FAIL)
            raise
        study.tell(trial, 0.0)
        ran += 1
    return ran


@contextlib.contextmanager
def _heartbeat(storage: optuna.storages.BaseStorage, trial_id: int):
    """While inside, a database storage hears from this trial every HEARTBEAT_SECONDS, as in
    `study.optimize`; a process on another machine fails it after GRACE_SECONDS without one."""
    if not (isinstance(storage, optuna.storages.RDBStorage) and storage.get_heartbeat_interval()):
        yield
        return
    stop = threading.Event()

    def beat() -> None:
        while not stop.is_set():
            storage.record_heartbeat(trial_id)
            stop.wait(HEARTBEAT_SECONDS)

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def run_queue(name: str, storage: str | None, tasks: list[str], work: Callable[[str], None],
              is_done: Callable[[str], bool], *, workers: int = 1,
              worker_args: Callable[[int], list[str]] | None = None, tracking_uri: str = "") -> list[str]:
    """Queue `tasks` and run them all: in this process, or in `workers` processes `cifar-mlops
    worker_args(i)` (each draining the same queue), with any process of another machine on the same
    storage. A task lost with a dead worker is queued again and run here; returns what went wrong
    with the worker processes. `work` must skip a task that `is_done` (another process finished it)."""
    study, opened = open_queue(name, storage)
    enqueue(study, tasks)
    failures: list[str] = []
    if workers > 1 and worker_args is not None:
        failures = _run_worker_processes([(f"tasks of queue {name!r}", worker_args(i)) for i in range(workers)],
                                         tracking_uri)
    while True:
        drain_queue(study, opened, work)
        fail_dead_trials(study, opened)
        if study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            time.sleep(QUEUE_POLL_SECONDS)  # another process is still on a task
            continue
        left = [task for task in tasks if not is_done(task)]
        if not left:
            return failures
        log(f"queue {name!r}: {len(left)} task(s) lost with a worker; running them here")
        enqueue(study, left)
