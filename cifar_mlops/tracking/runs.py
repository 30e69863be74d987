"""Runs: start one (or adopt the one `mlflow run` made), describe it, log to it in batches, end it.

A training run is a context manager: it ends FINISHED when its block completes,
FAILED (with the reason as a tag) when the block raises, KILLED on Ctrl-C; a
model version is registered only from inside a run that got that far.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import socket
import subprocess
import tempfile
import time
import warnings
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_TAG_VAL_LENGTH

from cifar_mlops.config import Config, ConfigError, ExperimentConfig, from_yaml, to_yaml
from cifar_mlops.errors import UserError, first_line
from cifar_mlops.execution.liveness import Heartbeat, process_alive, process_started
from cifar_mlops.progress import log
from cifar_mlops.tracking import registry, served, store

if TYPE_CHECKING:  # pragma: no cover
    import keras
    from matplotlib.figure import Figure

    from cifar_mlops.data import Splits

ABLATION_EXPERIMENT = "cifar10-ablation"
FAILURE_TAG = "failure_reason"
DESCRIPTION_TAG = "mlflow.note.content"  # a run's description: the UI renders it as markdown on the run's page
# The characters MLflow's stores accept in a tag / param value (8000 / 6000 in MLflow 3.17): MLflow's own limits,
# so a description is cut where the store would refuse it, not earlier.
TAG_LIMIT, PARAM_LIMIT = MAX_TAG_VAL_LENGTH, MAX_PARAM_VAL_LENGTH


def log_batch(run_id: str, *, params: Mapping[str, Any] | None = None, metrics: Mapping[str, float] | None = None,
              tags: Mapping[str, Any] | None = None, step: int = 0) -> None:
    """Params, metrics and tags of one run in as few requests as MLflow allows (its client splits them into
    batches of its limits); values cut to its limits quietly."""
    now = int(time.time() * 1000)
    MlflowClient().log_batch(run_id, params=[Param(k, str(v)[:PARAM_LIMIT]) for k, v in (params or {}).items()],
                             metrics=[Metric(k, float(v), now, step) for k, v in (metrics or {}).items()],
                             tags=[RunTag(k, str(v)[:TAG_LIMIT]) for k, v in (tags or {}).items()])


def failure(exc: BaseException | None) -> tuple[str, dict[str, str]]:
    """The status a run ends with after `exc` (None: success) and the tags that say why."""
    if exc is None:
        return "FINISHED", {}
    if isinstance(exc, KeyboardInterrupt):
        return "KILLED", {FAILURE_TAG: "interrupted (Ctrl-C)"}
    return "FAILED", {FAILURE_TAG: f"{type(exc).__name__}: {exc}"}


def experiment_id(client: MlflowClient, name: str) -> str:
    """The id of experiment `name`, created if missing (by this process or, at the same moment, another), with
    the kind that opens it in the UI's training view (`store.EXPERIMENT_TAGS`)."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name, tags=store.EXPERIMENT_TAGS)
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


def is_active(run_id: str) -> bool:
    """Whether run `run_id` exists and is not deleted."""
    try:
        return store.client().get_run(run_id).info.lifecycle_stage == "active"
    except mlflow.exceptions.MlflowException:
        return False


def open_parent_run(experiment: str, name: str, tags: dict[str, Any],
                    earlier: Callable[[MlflowClient, str], str | None],
                    claim: Callable[[str], str] | None = None) -> tuple[str, str]:
    """A parent run (a tuning study's, an ablation's), RUNNING: `mlflow run`'s own run, else the one
    `earlier(client, experiment id)` finds (a rerun continues it), else a new run in `experiment`.
    `claim(new run id)`: the run that processes started at the same moment agreed on; a new run that lost
    is deleted before anything is logged to it. Returns (run id, experiment name)."""
    client = store.client()
    run_id = adopted_run_id()
    if run_id:
        os.environ.pop("MLFLOW_RUN_ID", None)  # its children start their own nested runs, not this one
        adopted_experiment(run_id, usual=experiment)
    else:
        run_id = earlier(client, experiment_id(client, experiment))
    if run_id is None:
        with store.permission_checked(f"create a run in experiment {experiment!r}", "EDIT", f"experiment {experiment}"):
            run_id = client.create_run(experiment_id(client, experiment), run_name=name).info.run_id
        agreed = claim(run_id) if claim is not None else run_id
        if agreed != run_id:  # another process made the parent run at the same moment
            client.delete_run(run_id)
            run_id = agreed
    if client.get_run(run_id).info.status != "RUNNING":
        client.update_run(run_id, status="RUNNING")
    log_batch(run_id, tags={**tags, "mlflow.runName": name, "git_commit": git_commit()})
    return run_id, experiment_of(run_id)


def description_tag(markdown: str, whole: str) -> dict[str, str]:
    """A run's description (`mlflow.note.content`, rendered as markdown on the run's page) as a tag, cut at a
    line to what a tag keeps and then saying where the whole text is (`whole`: an artifact of the run)."""
    if len(markdown) <= TAG_LIMIT:
        return {DESCRIPTION_TAG: markdown}
    note = f"\n\n(cut to fit the description: the whole is {whole})"
    return {DESCRIPTION_TAG: markdown[:TAG_LIMIT - len(note)].rsplit("\n", 1)[0] + note}


def tagged_parent_run(tag: str, kind: str, name: str, run_name: str, tags: dict[str, Any], *,
                      agreed: Callable[[], str | None] = lambda: None,
                      claim: Callable[[str], str] | None = None) -> tuple[str, str]:
    """The parent run of a command that reruns resume (an ablation, a selection), RUNNING, in ABLATION_EXPERIMENT:
    `mlflow run`'s own run, else the one the processes running it `agreed()` on, else the latest tagged
    `tag=name` and `kind=kind` (a rerun continues it), else a new one, kept if `claim(its id)` says so
    (`open_parent_run`). Returns (run id, experiment name)."""
    def earlier(client: MlflowClient, experiment_id: str) -> str | None:
        run_id = agreed()
        if run_id:
            return run_id
        found = client.search_runs([experiment_id], filter_string=f"tags.{tag} = '{name}' and tags.kind = '{kind}'",
                                   order_by=["attributes.start_time DESC"], max_results=1)
        return found[0].info.run_id if found else None

    return open_parent_run(ABLATION_EXPERIMENT, run_name, {**tags, "kind": kind, tag: name}, earlier, claim)


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
# Checkpoints, and resuming a training from its run's last one

# A checkpoint is one file (model.keras + state.json) in the run's folder CHECKPOINT_FOLDER, named by the epochs
# done and the SHA-256 of its bytes (`checkpoint_path`): a file cut short by an interrupted upload does not match
# its name. The last CHECKPOINTS_KEPT are kept, so the one before an upload that was cut short is still there.
CHECKPOINT_FOLDER = "checkpoint"
CHECKPOINTS_KEPT = 2
LEGACY_CHECKPOINT = "checkpoint/checkpoint.zip"  # runs from before: their one checkpoint, its sha in the tag
CHECKPOINT_TAG = "checkpoint"  # "<epochs done> <sha256 of the file>" of the newest one, set once it is complete
TRAINER_TAG = "trainer"  # "<host> <pid> <start time>" of the process training the run
HEARTBEAT_TAG = "heartbeat"  # ms since 1970, renewed every HEARTBEAT_SECONDS while that process trains
HEARTBEAT_SECONDS = 30
SILENT_SECONDS = 120  # a RUNNING run unheard of for this long has lost its process: it may be resumed
RESUMED_TAG = "resumed_from_epoch"  # the epochs done when it was last resumed


class ResumeRefused(UserError):
    """A run that cannot be resumed as asked; nothing was changed. `run_id`: the run refused."""

    def __init__(self, message: str, run_id: str) -> None:
        super().__init__(message)
        self.run_id = run_id


@dataclass
class ResumePoint:
    """A run that may be resumed, and its checkpoint, downloaded (into `folder`, removed by `close`)."""

    run_id: str
    experiment_id: str
    experiment: str
    status: str  # before resuming: RUNNING (its process lost), KILLED or FAILED (with --force)
    config: ExperimentConfig
    epoch: int  # epochs done, from the checkpoint
    state: dict[str, Any]  # the checkpoint's state.json (history, random state, ...)
    model_path: Path  # the checkpoint's model.keras (with its optimizer state)
    tags: dict[str, str]
    logged_steps: dict[str, set[int]] = field(default_factory=dict)  # per-epoch metric -> steps already logged
    logged_final: set[str] = field(default_factory=set)  # final metrics (step 0) logged before it stopped
    folder: tempfile.TemporaryDirectory | None = None
    checkpoint: str = ""  # the checkpoint's path in the run

    def close(self) -> None:
        if self.folder is not None:
            self.folder.cleanup()


def _still_training(tags: Mapping[str, str], now_ms: int) -> str | None:
    """Why a RUNNING run's process may still be training (None: it is gone)."""
    host, pid, started = (*tags.get(TRAINER_TAG, "").split(" "), "", "")[:3]  # started: not in older runs' tags
    if host == socket.gethostname() and pid.isdigit():
        # a restarted container reuses pids: a recorded pid that is this process's is not this process
        if int(pid) != os.getpid() and process_alive(int(pid), float(started) if started else None):
            return f"it is still training on this machine as process {pid}; stop that process first"
        return None
    beat = tags.get(HEARTBEAT_TAG, "")
    silent = (now_ms - int(beat)) / 1000 if beat.isdigit() else None
    if silent is not None and silent < SILENT_SECONDS:
        return (f"it was heard from {silent:.0f} s ago (host {host or '?'}, process {pid or '?'}), so it may still be "
                f"training there; once it has been silent for {SILENT_SECONDS} s it can be resumed (--force does not "
                "skip this: two processes would write one run)")
    return None


def resume_point(run_id: str, *, force: bool = False) -> ResumePoint:
    """Run `run_id` and its checkpoint, downloaded, when it may be resumed; else `ResumeRefused`.

    Refused: an unknown or deleted run, one that is not a training of its own (a tuning trial,
    an ablation's run, an ensemble), one that ended FINISHED, a FAILED one unless `force`, a RUNNING
    one whose process may still be training (even with `force`), early stopping, no (complete) checkpoint.
    Nothing is changed, whatever the answer.
    """
    store.configure_store()
    client = store.client()
    try:
        run = client.get_run(run_id)
    except mlflow.exceptions.MlflowException as err:
        if err.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise
        raise ResumeRefused(f"there is no run {run_id!r} in {mlflow.get_tracking_uri()}; "
                            "--resume takes the id of a training run", run_id) from None
    tags, status = run.data.tags, run.info.status
    if run.info.lifecycle_stage == "deleted":
        raise ResumeRefused(f"run {run_id} is deleted; restore it (`mlflow runs restore --run-id {run_id}`) first", run_id)
    exp = tags.get("exp_id", "?")
    if status == "FINISHED":
        raise ResumeRefused(f"run {run_id} ({exp}) ended FINISHED: a finished training is not resumed; train it "
                            f"again with `cifar-mlops train --exp {exp}`", run_id)
    if status == "FAILED" and not force:
        why = f" ({tags[FAILURE_TAG]})" if FAILURE_TAG in tags else ""
        raise ResumeRefused(f"run {run_id} ({exp}) ended FAILED{why}; resume it anyway with --force", run_id)
    if "mlflow.parentRunId" in tags:
        raise ResumeRefused(f"run {run_id} is a run of a tuning study or an ablation (parent run "
                            f"{tags['mlflow.parentRunId']}); rerun that `tune` or `ablate` command, which runs "
                            "its lost trials again", run_id)
    text = run_text_artifact(run_id, "config.yaml")
    try:
        config = from_yaml(text, f"config.yaml of run {run_id}") if text is not None else None
    except ConfigError as err:
        raise ResumeRefused(str(err), run_id) from None
    if not isinstance(config, ExperimentConfig):
        raise ResumeRefused(f"run {run_id} is not a training of `cifar-mlops train` (it has no training "
                            "config.yaml); nothing to resume", run_id)
    if config.train.early_stopping_patience is not None:
        raise ResumeRefused(f"run {run_id} ({exp}) trains with early stopping (train.early_stopping_patience), "
                            f"which is not resumed; train it again with `cifar-mlops train --exp {exp}`", run_id)
    if status == "RUNNING":  # even with --force: two processes must never write one run
        reason = _still_training(tags, int(time.time() * 1000))
        if reason:
            raise ResumeRefused(f"run {run_id} ({exp}) is RUNNING and {reason}", run_id)
    found = checkpoints(run_id, tags)
    if not found:
        raise ResumeRefused(f"run {run_id} ({exp}) has no checkpoint (it stopped before its first one, or "
                            f"train.checkpoint_every is 0); train it again with `cifar-mlops train --exp {exp}`", run_id)

    folder = tempfile.TemporaryDirectory(prefix="cifar-mlops-resume-")
    unusable: list[str] = []
    try:
        for epoch, sha, path in found:  # the newest complete one
            try:
                point = _download_checkpoint(run, config, epoch, sha, path, Path(folder.name, str(epoch)))
                break
            except ResumeRefused as err:
                unusable.append(str(err))
        else:
            raise ResumeRefused("; ".join(unusable) + f"; train it again with `cifar-mlops train --exp {exp}`", run_id)
    except BaseException:
        folder.cleanup()
        raise
    for reason in unusable:
        log(f"{reason}; going on from the one after epoch {point.epoch}")
    point.folder = folder
    for key in (k for k in run.data.metrics if k.startswith("epoch_")):
        point.logged_steps[key] = {m.step for m in client.get_metric_history(run_id, key)}
    point.logged_final = {k for k in run.data.metrics if not k.startswith(("epoch_", "system/"))}
    return point


def checkpoint_path(epoch: int, sha: str) -> str:
    """Where the checkpoint after `epoch` epochs whose file has SHA-256 `sha` is stored in its run."""
    return f"{CHECKPOINT_FOLDER}/epoch-{epoch:04d}-{sha}.zip"


def checkpoints(run_id: str, tags: Mapping[str, str]) -> list[tuple[int, str, str]]:
    """The run's checkpoints as (epochs done, SHA-256 its file must have, path), newest first, complete or not."""
    found = []
    for artifact in store.client().list_artifacts(run_id, CHECKPOINT_FOLDER):
        match = re.fullmatch(rf"{CHECKPOINT_FOLDER}/epoch-(\d+)-([0-9a-f]{{64}})\.zip", artifact.path)
        if match:
            found.append((int(match[1]), match[2], artifact.path))
        elif artifact.path == LEGACY_CHECKPOINT:
            epoch, _, sha = tags.get(CHECKPOINT_TAG, "").partition(" ")
            if epoch.isdigit():
                found.append((int(epoch), sha, artifact.path))
    return sorted(found, reverse=True)


def _download_checkpoint(run, config: ExperimentConfig, epoch: int, sha: str, path: str,
                         folder: Path) -> ResumePoint:
    run_id = run.info.run_id
    what = f"the checkpoint of run {run_id} after epoch {epoch}"
    try:
        file = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=str(folder)))
        with open(file, "rb") as f:
            actual = hashlib.file_digest(f, "sha256").hexdigest()
        if actual != sha:
            raise ResumeRefused(f"{what} is incomplete (its upload was cut off: the file is not the one written)",
                                run_id)
        with zipfile.ZipFile(file) as archive:
            archive.extractall(folder)
        state = json.loads((folder / "state.json").read_text())
    except (mlflow.exceptions.MlflowException, OSError, zipfile.BadZipFile, json.JSONDecodeError, KeyError) as err:
        raise ResumeRefused(f"{what} cannot be read ({first_line(err, typed=True)})", run_id) from None
    if state.get("epoch") != epoch:
        raise ResumeRefused(f"{what} holds epoch {state.get('epoch')}", run_id)
    experiment = MlflowClient().get_experiment(run.info.experiment_id).name
    return ResumePoint(run_id=run_id, experiment_id=run.info.experiment_id, experiment=experiment,
                       status=run.info.status, config=config, epoch=epoch, state=state,
                       model_path=folder / "model.keras", tags=dict(run.data.tags), checkpoint=path)


def is_training_run(run_id: str) -> bool:
    """Whether run `run_id` already holds a training (described by `TrainingRun`): `mlflow run --run-id` resumes it."""
    return "exp_id" in store.client().get_run(run_id).data.tags


def _heartbeat(run_id: str) -> Heartbeat:
    """Tags the run with who trains it, then renews HEARTBEAT_TAG every HEARTBEAT_SECONDS until stopped."""
    log_batch(run_id, tags={TRAINER_TAG: f"{socket.gethostname()} {os.getpid()} {process_started()}"})
    return Heartbeat(lambda: log_batch(run_id, tags={HEARTBEAT_TAG: int(time.time() * 1000)}), HEARTBEAT_SECONDS,
                     name=f"heartbeat-{run_id[:8]}", tolerated=(mlflow.exceptions.MlflowException, OSError))


# ---------------------------------------------------------------------------
# One training (or ensemble evaluation) of one experiment


class TrainingRun:
    """One MLflow run for one training of one experiment config.

    `tags` are set on the run once it is described (an ablation's variant and seed), then `on_start(run_id)` runs
    (tuning tags the trial's run there).
    `resume`: reopen that run instead (described already) and go on from its checkpoint;
    `heartbeat`: say who trains the run while it does (a resumable training: see `resume_point`).
    """

    def __init__(self, config: Config, *, experiment: str = ABLATION_EXPERIMENT, parent_run_id: str | None = None,
                 tags: Mapping[str, Any] | None = None, on_start: Callable[[str], None] | None = None,
                 resume: ResumePoint | None = None, heartbeat: bool = False) -> None:
        self.config = config
        self.experiment = experiment
        self.parent_run_id = parent_run_id
        self.tags = dict(tags or {})
        self.on_start = on_start
        self.resume = resume
        self.checkpoints = [resume.checkpoint] if resume is not None else []  # the newest complete ones, in order
        self.heartbeat: Heartbeat | bool = heartbeat or resume is not None
        self.run_id: str = ""
        self.data_source = "unknown"  # set by log_data

    # -- lifecycle ---------------------------------------------------------
    def __enter__(self) -> TrainingRun:
        store.configure_store()
        if self.resume is not None:
            return self._reopen()
        adopted = adopted_run_id() if self.parent_run_id is None else None
        if adopted:  # `mlflow run` made it and chose its experiment; MLflow refuses it under any other
            mlflow.set_experiment(experiment_id=MlflowClient().get_run(adopted).info.experiment_id)
            run = mlflow.start_run(run_id=adopted, log_system_metrics=self._system_metrics())
            self.experiment = adopted_experiment(adopted, usual=self.experiment)
        else:
            with store.permission_checked(f"create a run in experiment {self.experiment!r}", "EDIT",
                                          f"experiment {self.experiment}"):
                mlflow.set_experiment(experiment_id=experiment_id(MlflowClient(), self.experiment))
                run = mlflow.start_run(run_name=self.config.exp_id, parent_run_id=self.parent_run_id,
                                       nested=self.parent_run_id is not None,
                                       log_system_metrics=self._system_metrics())
        self.run_id = run.info.run_id
        try:
            self._describe_run()
            if self.heartbeat:
                self.heartbeat = _heartbeat(self.run_id)
        except BaseException as err:  # a run that started must not stay RUNNING
            self.__exit__(type(err), err, err.__traceback__)
            raise
        return self

    def _system_metrics(self) -> bool:
        """Whether MLflow samples system metrics (system/*: CPU, memory, disk, network, GPU where there is one)
        while the run goes, every `track.system_metrics_interval` seconds (0: off; an ensemble's run: off)."""
        interval = self.config.track.system_metrics_interval if isinstance(self.config, ExperimentConfig) else 0.0
        if interval > 0:  # read by the monitor that start_run makes (an environment variable of this process)
            mlflow.set_system_metrics_sampling_interval(interval)
        return interval > 0

    def _describe_run(self) -> None:
        config = self.config
        log_batch(self.run_id, params=config.flat_params(), tags={
            "mlflow.runName": config.exp_id, "exp_id": config.exp_id, "family": config.family,
            "study": config.study, "enhancements": ",".join(config.enhancements) or "none",
            "parent": config.parent or "none", "git_commit": git_commit(), **self.tags,
        })
        mlflow.log_text(to_yaml(config), "config.yaml")
        if self.on_start is not None:
            self.on_start(self.run_id)

    def _reopen(self) -> TrainingRun:
        """The run of `self.resume` RUNNING again, in its own experiment, its failure (if any) forgotten."""
        point = self.resume
        mlflow.set_experiment(experiment_id=point.experiment_id)
        self.run_id = mlflow.start_run(run_id=point.run_id, log_system_metrics=self._system_metrics()).info.run_id
        self.experiment = point.experiment
        try:
            if FAILURE_TAG in point.tags:
                MlflowClient().delete_tag(self.run_id, FAILURE_TAG)
            log_batch(self.run_id, tags={RESUMED_TAG: point.epoch,
                                         "resume_count": int(point.tags.get("resume_count", "0")) + 1})
            self.heartbeat = _heartbeat(self.run_id)
        except BaseException as err:  # a reopened run must not stay RUNNING
            self.__exit__(type(err), err, err.__traceback__)
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if isinstance(self.heartbeat, Heartbeat):
            self.heartbeat.stop()
        status, tags = failure(exc)
        if tags:
            log_batch(self.run_id, tags=tags)
        mlflow.end_run(status)
        if isinstance(exc, (UserError, KeyboardInterrupt)):  # what the one-line error tells the user
            exc.add_note(f"run {self.run_id} of {self.config.exp_id} is marked {status}; nothing was registered")
        return False

    @property
    def url_hint(self) -> str:
        """Where the run is, and how to open its page in MLflow's UI (training view)."""
        page = store.run_page(mlflow.get_run(self.run_id).info.experiment_id, self.run_id)
        return f"run {self.run_id} in experiment {self.experiment!r}; {store.where_to_look(mlflow.get_tracking_uri(), page)}"

    def version_description(self, metrics: Mapping[str, float], backend: str) -> str:
        """What a version registered from this run is (markdown: the version's description in the UI)."""
        config = self.config
        made = (f"seed {config.train.seed}" if isinstance(config, ExperimentConfig) else
                "soft voting over " + ", ".join(f"{m.registered_model}@{m.exp_id or m.alias or m.version}"
                                                for m in config.members))
        uri = mlflow.get_tracking_uri()
        link = store.ui_link(uri, store.run_page(mlflow.get_run(self.run_id).info.experiment_id, self.run_id))
        return "\n".join([
            f"Experiment **{config.exp_id}**" + (f": {config.description.strip()}" if config.description.strip() else ""),
            "",
            f"- data: {self.data_source}" + (" (NOT CIFAR-10)" if self.data_source == "synthetic" else ""),
            f"- test accuracy {metrics['test_accuracy']:.4f}, test F1 (macro) {metrics['test_f1_macro']:.4f}",
            f"- {made}, Keras backend {backend}",
            f"- run [{self.run_id}]({link}) in MLflow experiment `{self.experiment}`",
        ])

    def version_link(self, name: str, version: int) -> str:
        """The page of a version registered from this run in MLflow's UI (training view)."""
        return store.ui_link(mlflow.get_tracking_uri(), store.version_page(name, version))

    # -- what it logs --------------------------------------------------------
    def log_data(self, splits: Splits) -> None:
        """Where the images came from (tags, params) and the three splits as MLflow datasets
        (a resumed run has them: only where they are read from now is noted)."""
        self.data_source = splits.source
        if self.resume is not None:
            log_batch(self.run_id, tags={"data_location": splits.location})
            return
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
        """Keras callback logging `epoch_{train,val}_{loss,accuracy}` with step = epoch (1-based).

        A resumed run logs no step twice: an epoch trained again after its checkpoint (same data
        order, same numbers) keeps the values its first training logged.
        """
        import keras

        run_id = self.run_id
        logged = self.resume.logged_steps if self.resume is not None else {}

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
                metrics = {k: v for k, v in metrics.items() if epoch + 1 not in logged.get(k, ())}
                log_batch(run_id, metrics=metrics, step=epoch + 1)

        return EpochLogger()

    def log_checkpoint(self, model: keras.Model, state: dict[str, Any]) -> None:
        """Write `model` (with its optimizer state) and `state` (JSON; `state["epoch"]`: epochs done) as a
        checkpoint of the run (`checkpoint_path`); once its upload is complete, tag it as the newest and delete
        every other checkpoint file but the one before it."""
        with tempfile.TemporaryDirectory(prefix="cifar-mlops-checkpoint-") as folder:
            model_file, state_file = Path(folder, "model.keras"), Path(folder, "state.json")
            model.save(model_file)
            state_file.write_text(json.dumps(state))
            archive = Path(folder, "checkpoint.zip")
            with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as bundle:  # .keras is compressed already
                bundle.write(model_file, model_file.name)
                bundle.write(state_file, state_file.name)
            with open(archive, "rb") as f:
                sha = hashlib.file_digest(f, "sha256").hexdigest()
            path = checkpoint_path(state["epoch"], sha)
            archive = archive.rename(Path(folder, Path(path).name))
            MlflowClient().log_artifact(self.run_id, str(archive), CHECKPOINT_FOLDER)
        log_batch(self.run_id, tags={CHECKPOINT_TAG: f"{state['epoch']} {sha}"})
        self.checkpoints = [*self.checkpoints, path][-CHECKPOINTS_KEPT:]
        _delete_artifacts(self.run_id, [artifact.path for artifact in store.client().list_artifacts(
            self.run_id, CHECKPOINT_FOLDER) if artifact.path not in self.checkpoints])

    def log_results(self, metrics: dict[str, float], texts: dict[str, str], figures: dict[str, Figure]) -> None:
        """The final metrics (step 0), texts and figures; a resumed run that logged some final metrics before it
        stopped keeps those (the same checkpoint evaluates the same) and logs no step 0 twice."""
        logged = self.resume.logged_final if self.resume is not None else set()
        log_batch(self.run_id, metrics={k: v for k, v in metrics.items() if k not in logged})
        for name, text in texts.items():
            mlflow.log_text(text, name)
        for name, figure in figures.items():
            mlflow.log_figure(figure, f"{name}.png")

    def log_trained_model(self, model: keras.Model, class_names: Sequence[str], batch_size: int) -> str:
        return served.log_trained_model(model, class_names, batch_size, self.config.model.test_time_flip)

    def register(self, model_uri: str, metrics: dict[str, float], tags: dict[str, str] | None = None) -> int:
        """Register `model_uri` as a new version of `cifar10-<family>` (or its candidates model, see
        `registry.registration_name`), tagged with the Keras backend it ran on; return the version number."""
        import keras

        name = registry.registration_name(self.config.family)
        version = registry.register(model_uri, name, tags={
            "exp_id": self.config.exp_id, "run_id": self.run_id, "test_accuracy": f"{metrics['test_accuracy']:.4f}",
            "data_source": self.data_source, "backend": keras.backend.backend(), **(tags or {})},
            description=self.version_description(metrics, keras.backend.backend()))
        log_batch(self.run_id, tags={"registered_version": f"{name}/{version}"})
        return version


def _delete_artifacts(run_id: str, paths: list[str]) -> None:
    """Delete these artifacts of the run where its artifact store can (a local folder, S3, an MLflow server's
    proxied store); where it cannot, they stay."""
    if not paths:
        return
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    repository = get_artifact_repository(store.client().get_run(run_id).info.artifact_uri)
    for path in paths:
        try:
            repository.delete_artifacts(path)
        except (mlflow.exceptions.MlflowException, NotImplementedError, OSError):
            return


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
