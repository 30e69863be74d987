"""Runs: start one (or adopt the one `mlflow run` made), describe it, log to it in batches, end it.

A training run is a context manager: it ends FINISHED when its block completes,
FAILED (with the reason as a tag) when the block raises, KILLED on Ctrl-C; a
model version is registered only from inside a run that got that far.
"""

from __future__ import annotations

import functools
import os
import subprocess
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag

from cifar_mlops.config import Config, to_yaml
from cifar_mlops.errors import UserError
from cifar_mlops.progress import log
from cifar_mlops.tracking import registry, served, store

if TYPE_CHECKING:  # pragma: no cover
    import keras
    from matplotlib.figure import Figure

    from cifar_mlops.data import Splits

ABLATION_EXPERIMENT = "cifar10-ablation"
FAILURE_TAG = "failure_reason"
TAG_LIMIT, PARAM_LIMIT = 5000, 6000  # characters MLflow keeps of a tag / param value
BATCH_LIMIT = 100  # MLflow takes at most 100 params and 100 tags (1000 metrics) per log_batch


def log_batch(run_id: str, *, params: Mapping[str, Any] | None = None, metrics: Mapping[str, float] | None = None,
              tags: Mapping[str, Any] | None = None, step: int = 0) -> None:
    """Params, metrics and tags of one run in as few requests as MLflow allows; values cut to its limits."""
    now = int(time.time() * 1000)
    entries = {
        "params": [Param(k, str(v)[:PARAM_LIMIT]) for k, v in (params or {}).items()],
        "metrics": [Metric(k, float(v), now, step) for k, v in (metrics or {}).items()],
        "tags": [RunTag(k, str(v)[:TAG_LIMIT]) for k, v in (tags or {}).items()],
    }
    client = MlflowClient()
    longest = max(len(v) for v in entries.values())
    for start in range(0, longest, BATCH_LIMIT):
        client.log_batch(run_id, **{kind: values[start:start + BATCH_LIMIT] for kind, values in entries.items()})


def failure(exc: BaseException | None) -> tuple[str, dict[str, str]]:
    """The status a run ends with after `exc` (None: success) and the tags that say why."""
    if exc is None:
        return "FINISHED", {}
    if isinstance(exc, KeyboardInterrupt):
        return "KILLED", {FAILURE_TAG: "interrupted (Ctrl-C)"}
    return "FAILED", {FAILURE_TAG: f"{type(exc).__name__}: {exc}"}


def experiment_id(client: MlflowClient, name: str) -> str:
    """The id of experiment `name`, created if missing (by this process or, at the same moment, another)."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name)
    except mlflow.exceptions.MlflowException:  # another process created it meanwhile
        return client.get_experiment_by_name(name).experiment_id


def experiment_of(run_id: str) -> str:
    """The name of the experiment holding run `run_id`."""
    client = MlflowClient()
    return client.get_experiment(client.get_run(run_id).info.experiment_id).name


@functools.cache
def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def run_text_artifact(run_id: str, path: str) -> str | None:
    """A text artifact of a run (e.g. its `config.yaml`), or None when it is missing."""
    store.configure_store()
    try:
        return mlflow.artifacts.load_text(f"runs:/{run_id}/{path}")
    except (mlflow.exceptions.MlflowException, OSError):  # a missing run or file: not there
        return None


def open_parent_run(experiment: str, name: str, tags: dict[str, Any],
                    earlier: Callable[[MlflowClient, str], str | None]) -> tuple[str, str]:
    """A parent run (a tuning study's, an ablation's), RUNNING: `mlflow run`'s own run, else the one
    `earlier(client, experiment id)` finds (a rerun continues it), else a new run in `experiment`.
    Returns (run id, experiment name)."""
    client = store.client()
    run_id = adopted_run_id()
    if run_id:
        os.environ.pop("MLFLOW_RUN_ID", None)  # its children start their own nested runs, not this one
        adopted_experiment(run_id, usual=experiment)
    else:
        run_id = earlier(client, experiment_id(client, experiment))
    if run_id is None:
        run_id = client.create_run(experiment_id(client, experiment), run_name=name).info.run_id
    elif client.get_run(run_id).info.status != "RUNNING":
        client.update_run(run_id, status="RUNNING")
    log_batch(run_id, tags={**tags, "mlflow.runName": name, "git_commit": git_commit()})
    return run_id, experiment_of(run_id)


def finish_run(run_id: str, status: str, *, tags: dict[str, Any], metrics: dict[str, float],
               figures: dict[str, Figure], texts: dict[str, str]) -> None:
    """Record a parent run's outcome (a tuning study's, an ablation's) and end it with `status`."""
    client = store.client()
    log_batch(run_id, tags=tags, metrics=metrics)
    for name, figure in figures.items():
        client.log_figure(run_id, figure, f"{name}.png")
    for name, text in texts.items():
        client.log_text(run_id, text, name)
    client.set_terminated(run_id, status)


# ---------------------------------------------------------------------------
# The run `mlflow run` created for this process


def adopted_run_id() -> str | None:
    """The run `mlflow run` created for this process, if any (it passes it in MLFLOW_RUN_ID)."""
    return os.environ.get("MLFLOW_RUN_ID") or None


def adopted_experiment(run_id: str, usual: str) -> str:
    """The name of the experiment `mlflow run` chose for run `run_id`; a note when it is not the usual one."""
    chosen = experiment_of(run_id)
    if chosen != usual:
        log(f"note: `mlflow run` put this run in experiment {chosen!r}, not {usual!r} where `cifar-mlops` "
            f"keeps these runs; add --experiment-name {usual} to `mlflow run` to keep them together")
    return chosen


def fail_adopted_run(reason: str) -> None:
    """End the run `mlflow run` created for us as FAILED when we fail before adopting it."""
    run_id = adopted_run_id()
    if run_id is None:
        return
    client = store.client()
    if client.get_run(run_id).info.status == "RUNNING":
        log_batch(run_id, tags={FAILURE_TAG: reason})
        client.set_terminated(run_id, "FAILED")


def log_to_adopted_run(file: str | Path, params: dict[str, Any], tags: dict[str, Any]) -> str | None:
    """Under `mlflow run`: log `file` as an artifact of the run it created for us, with params and tags;
    return that run's id (None, and nothing logged, when there is no such run)."""
    run_id = adopted_run_id()
    if run_id is not None:
        store.configure_store()
        log_batch(run_id, params=params, tags=tags)
        store.client().log_artifact(run_id, str(file))
    return run_id


def annotate_adopted_run(tags: dict[str, Any]) -> None:
    """Record tags on the run `mlflow run` created for this process, if any."""
    run_id = adopted_run_id()
    if run_id is not None:
        store.configure_store()
        log_batch(run_id, tags=tags)


# ---------------------------------------------------------------------------
# One training (or ensemble evaluation) of one experiment


class TrainingRun:
    """One MLflow run for one training of one experiment config.

    `on_start(run_id)` runs right after the run is described (tuning tags the trial's run there).
    """

    def __init__(self, config: Config, *, experiment: str = ABLATION_EXPERIMENT, parent_run_id: str | None = None,
                 on_start: Callable[[str], None] | None = None) -> None:
        self.config = config
        self.experiment = experiment
        self.parent_run_id = parent_run_id
        self.on_start = on_start
        self.run_id: str = ""
        self.data_source = "unknown"  # set by log_data

    # -- lifecycle ---------------------------------------------------------
    def __enter__(self) -> TrainingRun:
        store.configure_store()
        adopted = adopted_run_id() if self.parent_run_id is None else None
        if adopted:  # `mlflow run` made it and chose its experiment; MLflow refuses it under any other
            mlflow.set_experiment(experiment_id=MlflowClient().get_run(adopted).info.experiment_id)
            run = mlflow.start_run(run_id=adopted)
            self.experiment = adopted_experiment(adopted, usual=self.experiment)
        else:
            mlflow.set_experiment(self.experiment)
            run = mlflow.start_run(run_name=self.config.exp_id, parent_run_id=self.parent_run_id,
                                   nested=self.parent_run_id is not None)
        self.run_id = run.info.run_id
        try:
            self._describe_run()
        except BaseException as err:  # a run that started must not stay RUNNING
            self.__exit__(type(err), err, err.__traceback__)
            raise
        return self

    def _describe_run(self) -> None:
        config = self.config
        log_batch(self.run_id, params=config.flat_params(), tags={
            "mlflow.runName": config.exp_id, "exp_id": config.exp_id, "family": config.family,
            "study": config.study, "enhancements": ",".join(config.enhancements) or "none",
            "parent": config.parent or "none", "git_commit": git_commit(),
        })
        mlflow.log_text(to_yaml(config), "config.yaml")
        if self.on_start is not None:
            self.on_start(self.run_id)

    def __exit__(self, exc_type, exc, tb) -> bool:
        status, tags = failure(exc)
        if tags:
            log_batch(self.run_id, tags=tags)
        mlflow.end_run(status)
        if isinstance(exc, (UserError, KeyboardInterrupt)):  # what the one-line error tells the user
            exc.add_note(f"run {self.run_id} of {self.config.exp_id} is marked {status}; nothing was registered")
        return False

    @property
    def url_hint(self) -> str:
        return f"run {self.run_id} in experiment {self.experiment!r} of {mlflow.get_tracking_uri()}"

    # -- what it logs --------------------------------------------------------
    def log_data(self, splits: Splits) -> None:
        """Where the images came from (tags, params) and the three splits as MLflow datasets."""
        self.data_source = splits.source
        log_batch(self.run_id, tags={"data_source": splits.source, "data_location": splits.location,
                                     "data_fingerprint": splits.fingerprint},
                  params={"data.source_checksum": splits.source_checksum, "data.num_train": len(splits.y_train),
                          "data.num_val": len(splits.y_val), "data.num_test": len(splits.y_test)})
        contexts = {"train": "train", "val": "validation", "test": "test"}
        for split, (x, y) in splits.by_split().items():
            with warnings.catch_warnings():  # a plain path is "ambiguous" to MLflow; it picks the right source
                warnings.simplefilter("ignore", UserWarning)
                dataset = mlflow.data.from_numpy(x, targets=y, source=splits.location,
                                                 name=f"{splits.source}-{contexts[split]}")
            _log_input(dataset, contexts[split])

    def log(self, *, params: dict[str, Any] | None = None, tags: dict[str, Any] | None = None) -> None:
        """What is known only once the run goes (e.g. `train.dtype_policy`, what `auto` means on this machine)."""
        log_batch(self.run_id, params=params, tags=tags)

    def epoch_callback(self) -> keras.callbacks.Callback:
        """Keras callback logging `epoch_{train,val}_{loss,accuracy}` with step = epoch (1-based)."""
        import keras

        run_id = self.run_id

        class EpochLogger(keras.callbacks.Callback):
            def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
                metrics = {}
                for key, value in (logs or {}).items():
                    if key == "learning_rate":
                        metrics["epoch_learning_rate"] = value
                    elif key.startswith("val_"):
                        metrics[f"epoch_val_{key[4:]}"] = value
                    else:
                        metrics[f"epoch_train_{key}"] = value
                log_batch(run_id, metrics=metrics, step=epoch + 1)

        return EpochLogger()

    def log_results(self, metrics: dict[str, float], texts: dict[str, str], figures: dict[str, Figure]) -> None:
        log_batch(self.run_id, metrics=metrics)
        for name, text in texts.items():
            mlflow.log_text(text, name)
        for name, figure in figures.items():
            mlflow.log_figure(figure, f"{name}.png")

    def log_trained_model(self, model: keras.Model, class_names: Sequence[str], batch_size: int) -> str:
        return served.log_trained_model(model, class_names, batch_size)

    def register(self, model_uri: str, metrics: dict[str, float], tags: dict[str, str] | None = None) -> int:
        """Register `model_uri` as a new version of `cifar10-<family>`; return the version number."""
        version = registry.register(model_uri, registry.registered_model_name(self.config.family), tags={
            "exp_id": self.config.exp_id, "run_id": self.run_id, "test_accuracy": f"{metrics['test_accuracy']:.4f}",
            "data_source": self.data_source, **(tags or {})})
        log_batch(self.run_id, tags={"registered_version": f"{registry.registered_model_name(self.config.family)}/{version}"})
        return version


def _log_input(dataset, context: str, attempts: int = 3) -> None:
    """`mlflow.log_input`, retried when another process logs the same dataset at the same moment.

    MLflow's store checks for the dataset row, then inserts it: two tuning workers starting
    their first trials together both insert, and the second fails on the unique constraint.
    On retry the row exists and MLflow links to it.
    """
    for attempt in range(1, attempts + 1):
        try:
            mlflow.log_input(dataset, context=context)
            return
        except mlflow.exceptions.MlflowException as err:
            if attempt == attempts or not any(s in str(err) for s in ("IntegrityError", "UniqueViolation")):
                raise
            time.sleep(0.2 * attempt)
