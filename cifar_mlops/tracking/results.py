"""Reading finished result runs for reports, and logging a report as a run of its own."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlflow.entities import ViewType

from cifar_mlops.errors import UserError
from cifar_mlops.tracking import store
from cifar_mlops.tracking.runs import (
    adopted_run_id,
    description_tag,
    experiment_id,
    experiment_of,
    failure,
    git_commit,
    log_batch,
)

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

REPORT_EXPERIMENT = "cifar10-reports"
REPORT_KIND = "report"  # tag `kind` of a report run: never a result row
# Columns every frame of result runs has, even when no run carries them (e.g. an empty experiment)
RESULT_COLUMNS = ("run_id", "experiment_id", "status", "start_time", "end_time", "tags.exp_id", "tags.kind",
                  "tags.data_source", "tags.ablation")


class ReportSourceError(UserError):
    """The experiment a report reads its runs from does not exist."""

    exit_code = 2


def finished_result_runs(experiment: str) -> pd.DataFrame:
    """Every FINISHED, active run of `experiment` that has an `exp_id` tag and is neither a report run
    nor an ablation's variant run,
    newest first: `mlflow.search_runs`' frame (run_id, experiment_id, status, start_time, end_time as UTC
    timestamps, `metrics.*`, `params.*`, `tags.*`), with the columns `tags.exp_id`, `tags.kind` and
    `tags.data_source` always present (missing values: NaN)."""
    import mlflow

    client = store.client()
    found = client.get_experiment_by_name(experiment)
    if found is None:
        known = ", ".join(sorted(e.name for e in client.search_experiments())) or "none"
        raise ReportSourceError(f"no MLflow experiment {experiment!r} in {mlflow.get_tracking_uri()} "
                                f"(experiments: {known}); train one with `cifar-mlops train --exp smoke`")
    runs = mlflow.search_runs(experiment_ids=[found.experiment_id], filter_string="attributes.status = 'FINISHED'",
                              run_view_type=ViewType.ACTIVE_ONLY, order_by=["attributes.start_time DESC"],
                              output_format="pandas")
    runs = runs.reindex(columns=[*runs.columns, *(c for c in RESULT_COLUMNS if c not in runs.columns)])
    # an ablation's variant runs are not the iteration's results (a variant may lack an enhancement)
    results = runs[runs["tags.exp_id"].notna() & (runs["tags.exp_id"] != "") & (runs["tags.kind"] != REPORT_KIND)
                   & runs["tags.ablation"].isna()]
    return results.reset_index(drop=True)


def metric_history(run_id: str, key: str) -> list[tuple[int, float]]:
    """(step, value) of a run's metric, by step (e.g. `epoch_val_accuracy`, step = epoch)."""
    return sorted((m.step, m.value) for m in store.client().get_metric_history(run_id, key))


def log_report_run(folder: str | Path, tags: dict[str, Any], params: dict[str, Any],
                   description: str = "") -> tuple[str, str]:
    """Log every file in `folder` as artifacts of a FINISHED report run (tag kind=report), `description`
    (markdown) on its page: the run `mlflow run` created for us, else a new run in `cifar10-reports`.
    Returns (run id, experiment name)."""
    client = store.client()
    with store.permission_checked(f"create a report run in experiment {REPORT_EXPERIMENT!r}", "EDIT",
                                  f"experiment {REPORT_EXPERIMENT}"):
        run_id = adopted_run_id() or client.create_run(experiment_id(client, REPORT_EXPERIMENT),
                                                       run_name="report").info.run_id
    try:
        log_batch(run_id, tags={"kind": REPORT_KIND})  # first: a report run must never count as a result
        log_batch(run_id, params=params, tags={**tags, "mlflow.runName": "report", "git_commit": git_commit(),
                                               **(description_tag(description, "report.md") if description else {})})
        client.log_artifacts(run_id, str(folder))
    except BaseException as err:
        status, reason = failure(err)
        log_batch(run_id, tags=reason)
        client.set_terminated(run_id, status)
        raise
    client.set_terminated(run_id, "FINISHED")
    return run_id, experiment_of(run_id)
