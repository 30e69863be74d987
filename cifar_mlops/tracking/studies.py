"""Tuning runs: one parent run per Optuna study, one nested run per trial."""

from __future__ import annotations

from typing import Any

import mlflow
from mlflow import MlflowClient

from cifar_mlops.tracking import store
from cifar_mlops.tracking.runs import FAILURE_TAG, is_active, log_batch, open_parent_run

TUNING_EXPERIMENT = "cifar10-tuning"
# An Optuna trial state -> the status of the trial's run (PRUNED: stopped early on purpose, not a failure)
RUN_STATUS = {"COMPLETE": "FINISHED", "PRUNED": "KILLED"}


def study_run(study_name: str, tags: dict[str, str], reuse_run_id: str | None = None) -> tuple[str, str]:
    """The study's parent run, RUNNING: `mlflow run`'s own run, else `reuse_run_id` if it still exists,
    else a new run in `cifar10-tuning`. Returns (run id, experiment name)."""
    def earlier(client: MlflowClient, experiment_id: str) -> str | None:
        return reuse_run_id if reuse_run_id and is_active(reuse_run_id) else None

    return open_parent_run(TUNING_EXPERIMENT, study_name, tags, earlier)


def run_links(run_ids: list[str]) -> dict[str, str]:
    """Each run's page in MLflow's UI as a link relative to the UI (for a run's description: right on any
    server that shows it), in the training view; runs that are gone are left out."""
    client = store.client()
    links = {}
    for run_id in run_ids:
        try:
            experiment_id = client.get_run(run_id).info.experiment_id
        except mlflow.exceptions.MlflowException:
            continue
        links[run_id] = f"#/{store.run_page(experiment_id, run_id)}?{store.TRAINING_VIEW}"
    return links


def delete_run(run_id: str) -> None:
    store.client().delete_run(run_id)


def tag_run(run_id: str, tags: dict[str, Any]) -> None:
    store.configure_store()
    log_batch(run_id, tags=tags)


def end_trial_run(run_id: str, state: str, reason: str | None = None) -> None:
    """Give a trial's nested run its final Optuna state: tag `state`, and a status that says the same.

    COMPLETE -> FINISHED; PRUNED -> KILLED (stopped early on purpose: no failure_reason,
    tag `pruned_at_epoch`); FAIL -> FAILED (with `failure_reason`)."""
    client = store.client()
    try:
        run = client.get_run(run_id)
    except mlflow.exceptions.MlflowException:
        return
    tags: dict[str, Any] = {"state": state}
    if state == "PRUNED":
        if FAILURE_TAG in run.data.tags:
            client.delete_tag(run_id, FAILURE_TAG)
        tags["pruned_at_epoch"] = (int(run.data.metrics.get("epochs_run", 0))
                                   or len(client.get_metric_history(run_id, "epoch_val_accuracy")))
    elif state != "COMPLETE" and FAILURE_TAG not in run.data.tags:
        tags[FAILURE_TAG] = reason or f"trial ended {state}"
    log_batch(run_id, tags=tags)
    status = RUN_STATUS.get(state, "FAILED")
    if run.info.status != status:
        client.set_terminated(run_id, status)


def running_child_runs(parent_run_id: str) -> list[tuple[str, dict[str, str]]]:
    """(run id, tags) of the parent's nested runs that are still RUNNING."""
    client = store.client()
    parent = client.get_run(parent_run_id)
    runs = client.search_runs([parent.info.experiment_id], filter_string=(
        f"tags.mlflow.parentRunId = '{parent_run_id}' and attributes.status = 'RUNNING'"))
    return [(r.info.run_id, dict(r.data.tags)) for r in runs]
