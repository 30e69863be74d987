"""Forward selections: one parent run per `cifar-mlops select` in `cifar10-ablation`, each step's ablation parent
run nested under it, the path table as its description and a plot of the path as an artifact."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from cifar_mlops.tracking import store
from cifar_mlops.tracking.runs import description_tag, log_batch, tagged_parent_run

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

SELECTION_TAG = "selection"  # on the parent run and on each step's ablation parent run: which selection
SELECTION_KIND = "selection"  # tag `kind` of a selection's parent run: never a result row of the report
STEP_TAG = "selection_step"  # on each step's ablation parent run: its step number
MODEL_TAG = "selection_model"  # on the training of the final iteration that `--register` registers


def selection_run(name: str, tags: dict[str, Any], *, agreed: Callable[[], str | None] = lambda: None,
                  claim: Callable[[str], str] | None = None) -> tuple[str, str]:
    """The selection's parent run, RUNNING: `mlflow run`'s own run, else the one the processes running it
    `agreed()` on, else the latest tagged `selection=name` (a rerun continues it), else a new one (kept if
    `claim(its id)` says so). Returns (run id, experiment name)."""
    return tagged_parent_run(SELECTION_TAG, SELECTION_KIND, name, f"select {name}", tags, agreed=agreed, claim=claim)


def tag_step(ablation_run_id: str, name: str, step: int) -> None:
    """Mark a step's ablation parent run as step `step` of selection `name`."""
    log_batch(ablation_run_id, tags={SELECTION_TAG: name, STEP_TAG: step})


def run_metrics(run_ids: Iterable[str], names: Iterable[str]) -> dict[str, dict[str, float]]:
    """run id -> those of the metrics `names` it logged (a name it did not log is left out), each run once."""
    client = store.client()
    names = list(names)
    found = {run_id: client.get_run(run_id).data.metrics for run_id in dict.fromkeys(run_ids)}
    return {run_id: {name: float(metrics[name]) for name in names if name in metrics} for run_id, metrics in found.items()}


def model_training(selection_run_id: str, exp_id: str) -> str | None:
    """The FINISHED training of `exp_id` nested under the selection that `--register` made, if any."""
    client = store.client()
    experiment_id = client.get_run(selection_run_id).info.experiment_id
    found = client.search_runs([experiment_id], filter_string=(
        f"tags.mlflow.parentRunId = '{selection_run_id}' and tags.{MODEL_TAG} = '{exp_id}' "
        "and attributes.status = 'FINISHED'"), max_results=1)
    return found[0].info.run_id if found else None


def describe(run_id: str, markdown: str) -> None:
    """Set the selection run's description (markdown; where cut, it points to selection.md)."""
    log_batch(run_id, tags=description_tag(markdown, "selection.md"))


def finish(run_id: str, status: str, *, tags: dict[str, Any], figure: Figure | None, texts: dict[str, str]) -> None:
    """Record the selection's outcome and end its parent run with `status`."""
    from cifar_mlops.tracking.runs import finish_run

    finish_run(run_id, status, tags=tags, metrics={}, figures={"selection_path": figure} if figure else {},
               texts=texts)
