"""Optuna's search around `train()`: sampler, pruner, suggest, the study's summary and figures.

`tune(exp_id, trials)` searches the experiment's `search:` block. Each trial
resolves the experiment with the trial's values as overrides (the same
validation as `train`), calls the same `train(config)` (no registration), and
lands as a nested MLflow run under one parent run per study in
`cifar10-tuning`. Several processes (on one or many machines) cooperate on one
study through its storage (`execution.queue.open_storage`: `optuna.journal`
beside the SQLite MLflow store by default, `--storage postgresql://...` for many
machines); worker processes, liveness and dead workers' trials are
`cifar_mlops.execution`'s.

Nested run states: COMPLETE -> FINISHED, PRUNED -> KILLED (tag
`pruned_at_epoch`, no failure), FAIL -> FAILED; every trial run carries the tag
`state` with the Optuna state and `trial_number`.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
from optuna.trial import TrialState

from cifar_mlops import backend, progress
from cifar_mlops import config as cfg
from cifar_mlops.errors import UserError, first_line, redact
from cifar_mlops.execution import queue
from cifar_mlops.execution.workers import run_worker_processes, worker_args

OBJECTIVE = "val_accuracy"  # maximized; also the per-epoch metric the pruner watches
SAMPLERS = ("tpe", "random")
PRUNERS = ("median", "percentile", "successive-halving", "hyperband", "none")
SEARCHED_SECTION = "train"  # every search dimension overrides train.<name>
TRIAL_METRICS = ("val_accuracy", "val_f1_macro", "train_accuracy", "test_accuracy", "epochs_run")
COUNTED_STATES = ("COMPLETE", "PRUNED", "FAIL", "RUNNING")  # TuneResult.counts and the parent's trials_* tags
DASHBOARD_URL = "http://127.0.0.1:8080"  # where `optuna-dashboard STORAGE` serves by default


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
# Sampler, pruner


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


def fail_dead_trials(study: optuna.Study) -> list[int]:
    """`execution.queue.fail_dead_trials`, with a progress line for each trial failed."""
    return queue.fail_dead_trials(study, lambda trial, reason: log(progress_line(study, trial, reason)))


# ---------------------------------------------------------------------------
# One worker: load data once, run trials


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker process needs (passed as JSON to `cifar-mlops worker`, see `execution.workers`)."""

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

    def run(self) -> int:
        try:
            return run_worker(self)
        except (UserError, KeyboardInterrupt) as err:
            err.add_note(f"worker {self.index}")
            raise


def run_worker(spec: WorkerSpec, bar: progress.RunsBar | None = None) -> int:
    """Run up to `spec.trials` trials of the study in this process; return how many finished. `bar`: the
    command's progress bar, told of each trial (a worker process has none: it logs a line per trial)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from cifar_mlops import data
    from cifar_mlops.tracking import store, studies
    from cifar_mlops.train import RunContext, TrainingFailed, train

    store.quiet_mlflow()
    config = base_config(spec.exp_id, spec.overrides)
    study = optuna.load_study(study_name=spec.study_name, storage=queue.open_storage(spec.storage),
                              sampler=make_sampler(spec.sampler, spec.seed), pruner=make_pruner(spec.pruner, config))
    log(f"worker {spec.index}: loading data once for all its trials")
    splits = data.load_splits(config.data)
    worker = f"{socket.gethostname()}:{os.getpid()}"

    def objective(trial: optuna.Trial) -> float:
        queue.claim(trial)
        if bar is not None:
            bar.start(f"trial {trial.number}")
        values = suggest(trial, config.search)
        trial_config = cfg.resolve(spec.exp_id, {**spec.overrides, **values})
        run_ids: list[str] = []

        def started(run_id: str) -> None:
            run_ids.append(run_id)
            trial.set_user_attr("mlflow_run_id", run_id)

        # the run's tags name its trial before the trial names its run: a worker killed in between still
        # leaves a run that the next process can match to the trial and close
        context = RunContext(experiment=spec.experiment, parent_run_id=spec.parent_run_id, on_start=started,
                             tags={"trial_number": trial.number, "optuna_study": spec.study_name, "state": "RUNNING",
                                   "worker": worker, "mlflow.runName": f"{spec.exp_id} trial {trial.number}"})
        try:
            metrics = train(trial_config, context, splits=splits, register=False,
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
            studies.end_trial_run(run_id, trial.state.name)
        if bar is None:
            log(f"worker {spec.index}: {progress_line(study, trial)}")
        else:
            bar.finished(progress_line(study, trial))

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
    """One line on a finished trial: outcome, params, the study's best so far. `reason`: why it failed (a dead
    worker's trial)."""
    params = " ".join(f"{k}={_fmt(v)}" for k, v in trial.params.items())
    if trial.state == TrialState.COMPLETE:
        outcome = f"{OBJECTIVE}={trial.value:.4f}"
    elif trial.state == TrialState.PRUNED:
        last = max(trial.intermediate_values) + 1 if trial.intermediate_values else 0
        outcome = f"pruned after epoch {last}"
    else:
        outcome = f"failed ({reason or 'see its run'})"[:200]
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
    dashboard: str = ""  # how to open the study in optuna-dashboard (`dashboard_command`)


def _prepare_study(spec: WorkerSpec, config: cfg.ExperimentConfig) -> tuple[optuna.Study, list[int]]:
    """The study (created or loaded, checked to tune this experiment) and the trials of dead workers it had,
    now failed."""
    storage = queue.open_storage(spec.storage)
    try:
        study = optuna.create_study(study_name=spec.study_name, storage=storage, load_if_exists=True,
                                    direction="maximize", sampler=make_sampler(spec.sampler, spec.seed),
                                    pruner=make_pruner(spec.pruner, config))
    except Exception as err:  # noqa: BLE001 - e.g. the database went away
        raise TuneError(f"cannot create study {spec.study_name!r} in {redact(spec.storage) or queue.DEFAULT_JOURNAL}: "
                        f"{first_line(err)}") from None
    owner = study.user_attrs.get("exp_id")
    if owner is None:
        study.set_user_attr("exp_id", spec.exp_id)
        study.set_user_attr("objective", OBJECTIVE)
        study.set_user_attr(queue.KIND, f"tuning study of experiment {spec.exp_id}")
    elif owner != spec.exp_id:
        raise TuneError(f"study {spec.study_name!r} tunes experiment {owner}, not {spec.exp_id}; "
                        "pass another --study name")
    return study, fail_dead_trials(study)


def _parent_run(study: optuna.Study, spec: WorkerSpec, tags: dict[str, Any]) -> tuple[str, str]:
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
        winner = study.user_attrs.get("mlflow_parent_run_id")  # read from the storage again
        if winner and winner != run_id and not adopted:  # another process started at once
            studies.delete_run(run_id)
            run_id, experiment = studies.study_run(spec.study_name, tags, reuse_run_id=winner)
    return run_id, experiment


def tune(exp_id: str, trials: int, *, study_name: str | None = None, storage: str | None = None,
         workers: int = 1, timeout: float | None = None, sampler: str = "tpe", pruner: str = "median",
         seed: int | None = None, overrides: dict[str, Any] | None = None,
         register_best: bool = False) -> TuneResult:
    """Run `trials` more trials of experiment `exp_id`'s study on `workers` processes, under a progress bar
    (`progress.runs_bar`); return the summary."""
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
    storage = queue.absolute(storage)  # workers may start elsewhere
    spec = WorkerSpec(exp_id=exp_id, overrides=overrides, study_name=study_name, storage=storage,
                      sampler=sampler, pruner=pruner, parent_run_id="", experiment="", seed=seed)
    study, failed_dead = _prepare_study(spec, config)  # logs each failed trial of a dead worker

    store.quiet_mlflow()
    tags = {"optuna_study": study_name, "optuna_storage": redact(storage), "exp_id": exp_id, "family": config.family,
            "objective": f"maximize {OBJECTIVE}", "sampler": sampler, "pruner": pruner,
            "search_space": json.dumps(config.search.model_dump(mode="json", exclude_none=True)),
            "overrides": " ".join(f"{k}={v}" for k, v in overrides.items()) or "none"}
    parent_run_id, experiment = _parent_run(study, spec, tags)
    result = TuneResult(study_name=study_name, storage=redact(storage), parent_run_id=parent_run_id,
                        tracking_uri=store.configure_store(), experiment=experiment, failed_dead=failed_dead,
                        dashboard=dashboard_command(storage, queue.open_storage(storage).get_study_id_from_name(
                            study_name)))  # optuna-dashboard numbers its pages by the study's id
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
        with progress.runs_bar("tune", trials, unit="trials") as bar:
            if workers == 1:
                run_worker(specs[0], bar)
            else:
                with progress.every(queue.QUEUE_POLL_SECONDS, lambda: bar.set_done(*trials_since(study, offset))):
                    result.worker_failures = run_worker_processes(
                        [(f"{s.trials} trials", worker_args(s)) for s in specs], result.tracking_uri)
            if result.worker_failures:
                status = "FAILED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except BaseException:
        status = "FAILED"
        raise
    finally:
        _finish(study, result, status)

    if register_best and result.best:
        from cifar_mlops.train import RunContext, train

        best_config = cfg.resolve(exp_id, {**overrides, **as_overrides(result.best["params"])})
        log(f"retraining the best configuration (trial {result.best['number']}) once, to register it")
        train(best_config, RunContext(tags={"optuna_study": study_name, "tuned_from_trial": result.best["number"],
                                            "tuning_parent_run": parent_run_id}), register=True)
        result.registered = f"{registry.registered_model_name(best_config.family)} (see `mlflow ui`)"
        studies.tag_run(parent_run_id, {"best_registered": "yes"})
    return result


def trials_since(study: optuna.Study, offset: int) -> tuple[int, list[str]]:
    """What the study says of the trials numbered from `offset` on (this command's, with several workers): how
    many ended (COMPLETE, PRUNED or FAIL), and which run now."""
    done, running = 0, []
    for trial in study.get_trials(deepcopy=False):
        if trial.number >= offset:
            if trial.state == TrialState.RUNNING:
                running.append(f"trial {trial.number}")
            elif trial.state.is_finished():
                done += 1
    return done, running


def dashboard_command(storage: str | None, study_id: int | None = None) -> str:
    """The command that opens optuna-dashboard (the `dashboard` extra) on the study's storage, and the page of
    study `study_id` there: a journal file by its path, a database by its URL without the password (psycopg
    reads it from $PGPASSWORD or ~/.pgpass), a relative SQLite path made absolute."""
    path = queue.journal_path(storage)
    if path is not None:
        target = str(path)
    else:
        target = re.sub(r"(://[^:/@]*):[^@]*@", r"\1@", storage)
        if target.startswith("sqlite:///") and not target.startswith("sqlite:////"):
            target = "sqlite:///" + str(Path(target[len("sqlite:///"):]).resolve())
    page = f"{DASHBOARD_URL}/dashboard" + (f"/studies/{study_id}" if study_id is not None else "")
    return f"`optuna-dashboard {shlex.quote(target)}`, then open {page}"


def _finish(study: optuna.Study, result: TuneResult, status: str) -> None:
    """Fail trials of dead workers, close their runs, and record the study on the parent run."""
    from cifar_mlops.tracking import runs, studies

    result.failed_dead += fail_dead_trials(study)
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    for run_id, tags in studies.running_child_runs(result.parent_run_id):
        number = tags.get("trial_number")
        trial = trials.get(int(number)) if number and number.isdigit() else None
        if trial is not None and trial.state != TrialState.RUNNING:
            studies.end_trial_run(run_id, trial.state.name)

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
    tags[runs.DESCRIPTION_TAG] = study_note(study, result)  # the run page's description, as markdown
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
    table = best_frame(study, top)
    return "no completed trials yet" if table.empty else table.to_string(index=False)


def study_note(study: optuna.Study, result: TuneResult, top: int = 5) -> str:
    """The parent run's description (markdown, on its page in MLflow's UI): the study, its trial counts, the
    `top` trials as a table whose run ids link to the trials' runs, how to open it in optuna-dashboard."""
    from cifar_mlops.tracking import studies

    counts = ", ".join(f"{n} {state}" for state, n in result.counts.items() if n or state != "RUNNING")
    lines = [f"**Optuna study `{result.study_name}`**, storage `{result.storage or queue.DEFAULT_JOURNAL}`: "
             f"{sum(result.counts.values())} trials ({counts}); maximizing `{OBJECTIVE}`."]
    table = best_frame(study, top)
    if table.empty:
        lines.append("No completed trial yet.")
    else:
        links = studies.run_links([r for r in table["run_id"] if r])
        table["run_id"] = [f"[{r[:8]}]({links[r]})" if r in links else r for r in table["run_id"]]
        lines += [f"Best {len(table)} trials:", table.to_markdown(index=False, disable_numparse=True)]
    if result.dashboard:
        lines.append(f"Every trial in optuna-dashboard: {result.dashboard}.")
    return "\n\n".join(lines)


def best_frame(study: optuna.Study, top: int = 5) -> pd.DataFrame:
    """`best_table`'s rows as text cells (no row: no completed trial yet)."""
    frame = trials_frame(study)
    complete = (frame[frame["state"] == TrialState.COMPLETE.name]
                .sort_values("value", ascending=False, kind="stable").head(top))
    if complete.empty:
        return pd.DataFrame()
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
    return table


def _fmt4(value: Any) -> str:
    return "—" if pd.isna(value) else f"{value:.4f}"


def _cell(value: Any) -> str:
    return "" if pd.isna(value) else _fmt(value)
