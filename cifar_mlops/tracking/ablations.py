"""Ablation runs: one parent run per ablation in `cifar10-ablation`, one nested run per (variant, seed)."""

from __future__ import annotations

import io
import re
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd

from cifar_mlops.tracking import store
from cifar_mlops.tracking.runs import (
    description_tag,
    run_text_artifact,
    tagged_parent_run,
)

ABLATION_TAG = "ablation"  # on the parent and on every (variant, seed) run: which ablation it belongs to
ABLATION_KIND = "ablation"  # tag `kind` of a parent run: never a result row of the report


def ablation_run(name: str, tags: dict[str, Any], *, agreed: Callable[[], str | None] = lambda: None,
                 claim: Callable[[str], str] | None = None) -> tuple[str, str]:
    """The ablation's parent run, RUNNING: `mlflow run`'s own run, else the one the processes running it
    `agreed()` on, else the one tagged `ablation=name` in `cifar10-ablation` (a rerun continues it), else a new
    one, kept if `claim(its id)` says so (see `runs.open_parent_run`). Returns (run id, experiment name)."""
    return tagged_parent_run(ABLATION_TAG, ABLATION_KIND, name, f"ablation {name}", tags, agreed=agreed, claim=claim)


def finished_children(parent_run_id: str) -> list[dict[str, Any]]:
    """The parent's FINISHED nested runs: {"run_id", "tags", "metrics"} each."""
    client = store.client()
    parent = client.get_run(parent_run_id)
    found = client.search_runs([parent.info.experiment_id], filter_string=(
        f"tags.mlflow.parentRunId = '{parent_run_id}' and attributes.status = 'FINISHED'"), max_results=5000)
    return [{"run_id": r.info.run_id, "tags": dict(r.data.tags), "metrics": dict(r.data.metrics)} for r in found]


DIGEST_TAG = "config_sha256"  # on every (variant, seed) run: the digest of the resolved config it trained


class FinishedByDigest:
    """The FINISHED runs of a parent run's experiment that carry a config digest (any ablation's, any `select`
    step's), the earliest per digest: read whole on first use, then only the runs that ended since (minus a
    margin for other machines' clocks): a FINISHED run stays FINISHED."""

    MARGIN_MS = 10 * 60 * 1000

    def __init__(self, parent_run_id: str) -> None:
        self.parent_run_id = parent_run_id
        self.by_digest: dict[str, tuple[int, dict[str, Any]]] = {}
        self.since: int | None = None  # the latest end time seen

    def find(self, digests: set[str]) -> dict[str, dict[str, Any]]:
        """digest -> {"run_id", "tags", "metrics"} of a FINISHED run that trained it, for the digests found."""
        client = store.client()
        experiment_id = client.get_run(self.parent_run_id).info.experiment_id
        query = f"tags.{DIGEST_TAG} IS NOT NULL and attributes.status = 'FINISHED'"
        if self.since is not None:
            query += f" and attributes.end_time >= {self.since - self.MARGIN_MS}"
        token = None
        while True:
            page = client.search_runs([experiment_id], filter_string=query, max_results=1000, page_token=token)
            for r in page:
                digest, start = r.data.tags[DIGEST_TAG], r.info.start_time or 0
                if digest not in self.by_digest or start < self.by_digest[digest][0]:
                    self.by_digest[digest] = (start, {"run_id": r.info.run_id, "tags": dict(r.data.tags),
                                                      "metrics": dict(r.data.metrics)})
                self.since = max(self.since or 0, r.info.end_time or 0)
            token = page.token
            if not token:
                break
        return {digest: self.by_digest[digest][1] for digest in digests if digest in self.by_digest}


def csv_artifact(run_id: str, path: str) -> pd.DataFrame | None:
    """A CSV artifact of a run as a DataFrame (e.g. its test predictions), None when it is missing."""
    text = run_text_artifact(run_id, path)
    return None if text is None else pd.read_csv(io.StringIO(text))


def finished_ablations(experiment: str) -> list[dict[str, Any]]:
    """Every FINISHED ablation parent run of `experiment`, oldest first, with what it logged:
    {"run_id", "name", "tags", "variants" and "effects" (DataFrames), "forest_png" (bytes or None), "comparisons"
    (`ablation_stats.comparison_summary`; None when logged before it)}."""
    import tempfile
    from pathlib import Path

    import mlflow

    client = store.client()
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    parents = client.search_runs([found.experiment_id], filter_string=(
        f"tags.kind = '{ABLATION_KIND}' and attributes.status = 'FINISHED'"), order_by=["attributes.start_time ASC"])
    ablations = []
    for run in parents:
        variants = csv_artifact(run.info.run_id, "ablation_variants.csv")
        effects = csv_artifact(run.info.run_id, "ablation_effects.csv")
        if variants is None or effects is None:
            continue  # finished before it logged its tables: nothing to show
        with tempfile.TemporaryDirectory() as folder:
            try:
                png = Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="forest_plot.png",
                                                               dst_path=folder)).read_bytes()
            except (mlflow.exceptions.MlflowException, OSError):
                png = None
        ablations.append({"run_id": run.info.run_id, "name": run.data.tags.get(ABLATION_TAG, run.info.run_id),
                          "tags": dict(run.data.tags), "variants": variants, "effects": effects, "forest_png": png,
                          "comparisons": csv_artifact(run.info.run_id, "ablation_comparisons.csv")})
    return ablations


def metric_name(effect: str) -> str:
    """An effect's name as MLflow takes it in a metric or tag key ("b3 -> b4" -> "b3 to b4")."""
    return re.sub(r"[^\w.\- ]", "_", effect.replace("->", "to")).strip() or "_"


def comparison_record(summary: pd.DataFrame, description: str, minutes: float, minutes_meaning: str
                      ) -> tuple[dict[str, str], dict[str, float]]:
    """(tags, metrics) that put each comparison of `summary` (`ablation_stats.comparison_summary`) where the UI shows
    them on the ablation's parent run: tags `<effect>/verdict` (with vs min-effect), `<effect>/interval` (pp, its
    level) and `<effect>/noise` (the noise split's line); metrics `<effect>/difference_pp`, `/ci_low_pp`,
    `/ci_high_pp`, `/seeds`, `/fit_minutes` (its runs' CPU- or GPU-minutes, its unit in the summary's `fit_unit`);
    `fit_minutes` (every run of the ablation) with the tag `fit_minutes_measure` saying what they are; the run's
    description (`mlflow.note.content`, markdown): `description` cut to what a tag keeps."""
    from cifar_mlops.ablation_stats import interval_text  # here: the statistics' imports (matplotlib) only when used

    tags: dict[str, str] = {"fit_minutes_measure": minutes_meaning}
    metrics: dict[str, float] = {"fit_minutes": minutes}
    for row in summary.itertuples(index=False):
        key = metric_name(str(row.effect))
        versus = "" if pd.isna(row.vs_min_effect) or not row.vs_min_effect else f" (vs min-effect: {row.vs_min_effect})"
        tags[f"{key}/verdict"] = f"{row.verdict}{versus}"
        tags[f"{key}/interval"] = (f"{interval_text(row.mean_diff, row.ci_low, row.ci_high, ' pp')} "
                                   f"at {100 * row.level:.4g}%, {row.n_seeds} seeds")
        if isinstance(row.noise, str) and row.noise:
            tags[f"{key}/noise"] = row.noise
        metrics.update({f"{key}/difference_pp": 100 * row.mean_diff, f"{key}/ci_low_pp": 100 * row.ci_low,
                        f"{key}/ci_high_pp": 100 * row.ci_high, f"{key}/seeds": row.n_seeds,
                        f"{key}/fit_minutes": row.fit_minutes})
    metrics = {k: v for k, v in metrics.items() if np.isfinite(v)}  # an unbounded interval end has no metric
    tags.update(description_tag(description, "ablation.md"))
    return tags, metrics
