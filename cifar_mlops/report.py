"""The ablation report: the studies' tables and plots regenerated from tracked runs.

`build()` reads the FINISHED runs of an MLflow experiment (through `tracking`, as
`mlflow.search_runs`' DataFrame), keeps one run per iteration, data source and seed
(the latest, or the best by validation accuracy), averages over seeds with pandas
(mean, sample std), and lays out per study:

- the enhancement check-mark table (from the catalogue),
- the results table(s), one per data source: real CIFAR-10, a CIFAR-10 subset
  or sample, synthetic data (never mixed: each table says what it holds), with
  the improvement over the iteration each one builds on (the catalogue's
  `parent`) and the studies' published figures (the experiment files'
  `published:` blocks) beside ours, marked as such,
- study B's training vs validation accuracy per epoch for its final iteration.

`render(report, fmt)` gives markdown (pastes into a README; plots as PNG files
beside it), one self-contained HTML file (plots embedded as data URIs) or CSV
(one row per table row, full run ids, every number unrounded).
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import io
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
import pandas as pd

from cifar_mlops import config as cfg
from cifar_mlops.errors import UserError
from cifar_mlops.tracking import results, store
from cifar_mlops.tracking.runs import ABLATION_EXPERIMENT

SELECTIONS = ("latest", "best")
FORMATS = ("markdown", "html", "csv")
SUFFIXES = {"markdown": ".md", "html": ".html", "csv": ".csv"}

PUBLISHED_MARK = "published"
PUBLISHED_FALLBACK_NOTE = "the study's own figures, not runs of this store"  # a `published:` block without a note

# data_source tag -> what the reader is told, in plain words
DATA_SOURCES = {
    "cifar10": "CIFAR-10",
    "cifar10-partial": "CIFAR-10 subset/sample (not the official test set)",
    "synthetic": "synthetic (NOT CIFAR-10)",
}
TABLE_TITLES = {
    "cifar10": "Results on CIFAR-10",
    "cifar10-partial": "Results on a CIFAR-10 subset/sample (not the official test set)",
    "synthetic": "Results on synthetic data (NOT CIFAR-10 results)",
}
SOURCE_ORDER = ("cifar10", "cifar10-partial", "synthetic")
REAL_SOURCES = ("cifar10", "cifar10-partial")
FINAL_ITERATION = {"B": "b5"}  # whose per-epoch curves are plotted
OTHER_STUDY = "other"
STUDY_HEADINGS = {**cfg.STUDY_TITLES, OTHER_STUDY: "Other experiments (smoke tests and iterations outside the studies)"}

METRICS = tuple(f"{split}_{name}" for split in ("train", "val", "test") for name in ("accuracy", "f1_macro", "loss"))
METRIC_LABELS = {"train_f1_macro": "F1 train", "val_f1_macro": "F1 val", "test_f1_macro": "F1 test",
                 "train_accuracy": "Acc train", "val_accuracy": "Val acc", "test_accuracy": "Acc test"}
SEED_KEYS = ["exp_id", "data_source", "seed"]  # one chosen run per ...
ROW_KEYS = ["exp_id", "data_source"]  # ... and one row per these, over the seeds


class ReportError(UserError):
    """A report that cannot be made as asked (unknown selection or format)."""

    exit_code = 2


# ---------------------------------------------------------------------------
# Rows: one per iteration and data source, over the runs chosen for each seed


def _text(column: pd.Series, missing: str = "") -> pd.Series:
    """A column of tags or params as text, `missing` where a run has none (such columns are all-NaN floats
    when no run has the key)."""
    return column.astype(object).where(column.notna(), missing).astype(str)


def tidy_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """`mlflow.search_runs`' columns as the report uses them: one row per run, plain column names
    (exp_id, data_source, seed, start_time, wall_seconds, epochs, model_version, the metrics ...)."""
    wanted = ["tags.exp_id", "tags.data_source", "tags.study", "tags.family", "tags.parent",
              "tags.registered_version", "params.train.seed", "params.train.epochs", "start_time", "end_time",
              "metrics.epochs_run", "metrics.fit_seconds", *(f"metrics.{m}" for m in METRICS)]
    runs = runs.reindex(columns=runs.columns.union(wanted, sort=False))
    start, end = pd.to_datetime(runs["start_time"], utc=True), pd.to_datetime(runs["end_time"], utc=True)
    epochs_run = runs["metrics.epochs_run"].map(lambda v: "" if pd.isna(v) else str(int(v)), na_action=None)
    epochs = epochs_run.where(epochs_run != "", _text(runs["params.train.epochs"]))
    return pd.DataFrame({
        "run_id": runs["run_id"].astype(str),
        "exp_id": runs["tags.exp_id"].astype(str),
        "data_source": _text(runs["tags.data_source"], "unknown"),
        "seed": _text(runs["params.train.seed"]),  # ensembles have none
        "start_time": start,
        "wall_seconds": (end - start).dt.total_seconds(),  # a run's start to end: training, evaluation, logging
        "epochs": epochs.astype(str),
        "model_version": _text(runs["tags.registered_version"]),
        "tag_study": runs["tags.study"], "tag_family": runs["tags.family"], "tag_parent": runs["tags.parent"],
        "fit_seconds": runs["metrics.fit_seconds"].astype(float),
        **{m: runs[f"metrics.{m}"].astype(float) for m in METRICS},
    })


def choose_runs(runs: pd.DataFrame, selection: str) -> pd.DataFrame:
    """One run per iteration, data source and seed (`train.seed`): the latest, or the best by val_accuracy
    (the latest among equals); seeds ascending (numbers first) within each iteration and data source."""
    if selection == "best":
        ranked = runs.assign(_rank=runs["val_accuracy"].fillna(float("-inf"))).sort_values(
            ["_rank", "start_time"], kind="stable").drop(columns="_rank")
    else:
        ranked = runs.sort_values("start_time", kind="stable")
    chosen = ranked.groupby(SEED_KEYS, sort=False).tail(1)
    numeric = pd.to_numeric(chosen["seed"], errors="coerce")
    return (chosen.assign(_other=numeric.isna(), _number=numeric)
            .sort_values(["exp_id", "data_source", "_other", "_number", "seed"], kind="stable")
            .drop(columns=["_other", "_number"]).reset_index(drop=True))


def _epochs_text(epochs: pd.Series) -> str:
    return "/".join(sorted({e for e in epochs if e})) or "—"


def summarise(chosen: pd.DataFrame) -> pd.DataFrame:
    """One row per iteration and data source: mean and sample std (ddof 1, NaN for one seed) of every
    metric over the chosen runs, their seeds, run ids and model versions (lists, seeds ascending)."""
    grouped = chosen.groupby(ROW_KEYS, sort=False)
    described = grouped.agg(n_seeds=("run_id", "size"), seeds=("seed", list), run_ids=("run_id", list),
                            model_versions=("model_version", list), epochs=("epochs", _epochs_text),
                            tag_study=("tag_study", "first"), tag_family=("tag_family", "first"),
                            tag_parent=("tag_parent", "first"))
    means = grouped[["wall_seconds", "fit_seconds", *METRICS]].mean()
    stds = grouped[list(METRICS)].std(ddof=1).add_suffix("_std")
    return pd.concat([described, means, stds], axis=1).reset_index()


def build_rows(runs: pd.DataFrame, selection: str, catalogue: dict[str, cfg.Config]) -> pd.DataFrame:
    """The report's rows from `mlflow.search_runs`' frame of result runs, in catalogue order; study,
    family and builds-on (`parent`, "" for none) from the catalogue (from the run's tags for an iteration
    it does not know)."""
    rows = summarise(choose_runs(tidy_runs(runs), selection))

    def known(exp_id: str, attr: str, tag: Any) -> str:
        if exp_id in catalogue:
            return getattr(catalogue[exp_id], attr) or ""
        if attr == "parent":  # "": builds on nothing
            return "" if pd.isna(tag) or tag == "none" else str(tag)
        return "?" if pd.isna(tag) else str(tag)

    study = [known(e, "study", t) for e, t in zip(rows["exp_id"], rows["tag_study"])]
    order = {exp_id: i for i, exp_id in enumerate(catalogue)}
    rows = rows.assign(
        study=[s if s in cfg.STUDY_TITLES else OTHER_STUDY for s in study],
        family=[known(e, "family", t) for e, t in zip(rows["exp_id"], rows["tag_family"])],
        parent=[known(e, "parent", t) for e, t in zip(rows["exp_id"], rows["tag_parent"])],
        published=False, note="", _order=rows["exp_id"].map(order).fillna(len(order)))
    return (rows.sort_values(["_order", "exp_id"], kind="stable")
            .drop(columns=["_order", "tag_study", "tag_family", "tag_parent"]).reset_index(drop=True))


def published_rows(study: str, catalogue: dict[str, cfg.Config]) -> pd.DataFrame:
    """The study's published figures (the experiment files' `published:` blocks) as rows, by exp_id."""
    records = [{"exp_id": c.exp_id, "data_source": PUBLISHED_MARK, "study": study, "family": c.family,
                "parent": c.parent or "", "published": True, "note": c.published.note or PUBLISHED_FALLBACK_NOTE,
                "n_seeds": 0, "seeds": [], "run_ids": [], "model_versions": [], "epochs": "",
                **c.published.values()}
               for c in catalogue.values() if c.study == study and c.published is not None]
    columns = ["exp_id", "data_source", "study", "family", "parent", "published", "note", "n_seeds", "seeds",
               "run_ids", "model_versions", "epochs", "wall_seconds", "fit_seconds",
               *(name for m in METRICS for name in (m, f"{m}_std"))]
    return pd.DataFrame.from_records(records, columns=columns).set_index("exp_id", drop=False)


# ---------------------------------------------------------------------------
# The document: sections of paragraphs, tables and figures, rendered three ways


@dataclass
class Table:
    title: str
    frame: pd.DataFrame  # the cells as shown: one column per header, text
    records: pd.DataFrame  # the same rows for CSV: full ids, raw numbers (none for the check marks)
    note: str = ""

    @property
    def columns(self) -> list[str]:
        return [str(c) for c in self.frame.columns]

    @property
    def published(self) -> list[bool]:
        """Whether each row holds a study's published figures (not runs of this store)."""
        if "published" in self.records and len(self.records) == len(self.frame):
            return [bool(p) for p in self.records["published"]]
        return [False] * len(self.frame)

    @property
    def rows(self) -> list[tuple[bool, list[str]]]:
        """(published?, the row's cells as text) for each row."""
        return list(zip(self.published, ([str(c) for c in row] for row in self.frame.itertuples(index=False))))


@dataclass
class Figure:
    name: str  # file name stem
    caption: str
    png: bytes


@dataclass
class Section:
    title: str
    blocks: list[Table | Figure | str] = field(default_factory=list)


@dataclass
class Report:
    title: str
    header: list[str]
    sections: list[Section]
    experiment: str
    selection: str

    @property
    def tables(self) -> list[Table]:
        return [b for s in self.sections for b in s.blocks if isinstance(b, Table)]

    @property
    def figures(self) -> list[Figure]:
        return [b for s in self.sections for b in s.blocks if isinstance(b, Figure)]


def _number(row: dict[str, Any], key: str) -> float | None:
    value = row.get(key)
    return None if value is None or pd.isna(value) else float(value)


def _fraction(row: dict[str, Any], key: str, percent: bool = False) -> str:
    mean, std = _number(row, key), _number(row, f"{key}_std")
    if mean is None:
        return "—"
    scale, digits, unit = (100, 2, "%") if percent else (1, 4, "")
    text = f"{mean * scale:.{digits}f}{unit}"
    return f"{text} ± {std * scale:.{digits}f}{unit}" if std is not None else text


def _seconds(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest:02d} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


@dataclass
class Column:
    header: str
    cell: Callable[[dict[str, Any]], str]  # a row (a record of the rows frame) -> its text


def _improvement(key: str, percent: bool) -> Column:
    """Reads the row's `improvement` (its mean minus its parent's, within the table) and `parent_value`."""
    def cell(row: dict[str, Any]) -> str:
        if row["published"]:
            return ""
        if not row["parent"]:
            return "— (first)"
        if _number(row, "parent_value") is None:
            return f"— (no run of {row['parent']})"
        delta = _number(row, "improvement")
        if delta is None:
            return "—"
        return f"{delta * 100:+.2f} pp" if percent else f"{delta:+.4f}"
    return Column(f"Δ {METRIC_LABELS[key]} vs builds on", cell)


def _ours(text: Callable[[dict[str, Any]], str]) -> Callable[[dict[str, Any]], str]:
    """A cell that published rows leave empty."""
    return lambda r: "" if r["published"] else text(r)


def _trail_columns() -> list[Column]:
    return [
        Column("Data", lambda r: PUBLISHED_MARK if r["published"] else DATA_SOURCES.get(r["data_source"],
                                                                                         r["data_source"])),
        Column("Seeds", _ours(lambda r: str(r["n_seeds"]))),
        Column("Epochs", _ours(lambda r: r["epochs"])),
        Column("Wall time", _ours(lambda r: _seconds(_number(r, "wall_seconds")))),
        Column("Run", lambda r: PUBLISHED_MARK if r["published"] else ", ".join(x[:8] for x in r["run_ids"])),
        Column("Model version", _ours(lambda r: ", ".join(v or "not registered" for v in r["model_versions"]))),
    ]


def _gap(row: dict[str, Any]) -> str:
    train, val = _number(row, "train_accuracy"), _number(row, "val_accuracy")
    return "—" if train is None or val is None else f"{(train - val) * 100:+.2f} pp"


def _study_columns(study: str) -> tuple[list[Column], str]:
    """The results table's columns for a study, and the metric its improvement column compares."""
    iteration = Column("Iteration", lambda r: f"{r['exp_id']} ({PUBLISHED_MARK})" if r["published"] else r["exp_id"])
    builds_on = Column("Builds on", _ours(lambda r: r["parent"] or "—"))
    if study == "B":
        columns = [iteration, builds_on,
                   Column("Val acc", lambda r: _fraction(r, "val_accuracy", True)),
                   Column("Test acc", lambda r: _fraction(r, "test_accuracy", True)),
                   Column("Train acc", lambda r: _fraction(r, "train_accuracy", True)),
                   Column("Gap train−val", _gap),
                   _improvement("val_accuracy", True)]
        return columns + _trail_columns(), "val_accuracy"
    columns = [iteration, Column("Model", _ours(lambda r: r["family"])), builds_on,
               Column("F1 train", lambda r: _fraction(r, "train_f1_macro")),
               Column("F1 test", lambda r: _fraction(r, "test_f1_macro")),
               Column("Acc train", lambda r: _fraction(r, "train_accuracy")),
               Column("Acc test", lambda r: _fraction(r, "test_accuracy"))]
    if study == OTHER_STUDY:
        columns.insert(6, Column("Acc val", lambda r: _fraction(r, "val_accuracy")))
    return columns + [_improvement("test_accuracy", False)] + _trail_columns(), "test_accuracy"


def _cells(columns: list[Column], rows: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame([[c.cell(r) for c in columns] for r in rows.to_dict("records")],
                        columns=[c.header for c in columns], dtype=object)


def _published_note(rows: pd.DataFrame) -> str:
    return "; ".join(dict.fromkeys(rows.loc[rows["published"].astype(bool), "note"]))


def _results_table(study: str, source: str, rows: pd.DataFrame, published: pd.DataFrame, selection: str) -> Table:
    """One study's rows of one data source, each followed by its published figures on real data."""
    columns, key = _study_columns(study)
    ours = rows.reset_index(drop=True)
    # the improvement: this row's mean minus that of the row it builds on, within this table
    parent_value = ours["parent"].map(ours.set_index("exp_id")[key])
    ours = ours.assign(parent_value=parent_value, improvement=ours[key] - parent_value, _order=range(len(ours)))
    beside = published[published.index.isin(ours["exp_id"])] if source in REAL_SOURCES else published.iloc[:0]
    beside = beside.assign(_order=beside["exp_id"].map(dict(zip(ours["exp_id"], ours["_order"]))),
                           parent_value=float("nan"), improvement=float("nan"))
    parts = [frame for frame in (ours, beside.reset_index(drop=True)) if len(frame)]
    laid_out = (pd.concat(parts, ignore_index=True) if len(parts) > 1 else parts[0]) \
        .sort_values(["_order", "published"], kind="stable").drop(columns="_order").reset_index(drop=True)

    notes = [f"Improvement: {key} minus that of the iteration it builds on (catalogue `parent`), within this table."]
    if source == "synthetic":
        notes.insert(0, "Synthetic CIFAR-shaped data: a pipeline check, these are NOT CIFAR-10 results.")
    elif source == "cifar10-partial":
        notes.insert(0, "A subset or sample of CIFAR-10: test figures are not on the official test set.")
    if laid_out["published"].any():
        notes.append(f"{PUBLISHED_MARK}: {_published_note(laid_out)}.")

    records = pd.DataFrame({
        "study": study, "exp_id": laid_out["exp_id"], "published": laid_out["published"].astype(bool),
        "builds_on": laid_out["parent"], "family": laid_out["family"],
        "data_source": laid_out["data_source"],
        "selection": laid_out["published"].map({True: "", False: selection}),
        "seeds": laid_out["seeds"].map(";".join), "n_seeds": laid_out["n_seeds"].astype(int),
        "run_ids": laid_out["run_ids"].map(";".join), "model_versions": laid_out["model_versions"].map(";".join),
        "epochs": laid_out["epochs"], "wall_seconds": laid_out["wall_seconds"],
        "fit_seconds": laid_out["fit_seconds"],
        **{name: laid_out[name] for m in METRICS for name in (m, f"{m}_std")},
        f"improvement_{key}": laid_out["improvement"],
    })
    return Table(title=TABLE_TITLES.get(source, f"Results on data source {source!r}"),
                 frame=_cells(columns, laid_out), records=records, note=" ".join(notes))


def _published_table(study: str, published: pd.DataFrame) -> Table:
    """The study's published figures on their own (when no real-data table sets them beside ours)."""
    keys = [k for k in METRIC_LABELS if published[k].notna().any()]
    iteration = Column("Iteration", lambda r: f"{r['exp_id']} ({PUBLISHED_MARK})")
    columns = [iteration, *(Column(METRIC_LABELS[k], lambda r, k=k: _fraction(r, k, percent=study == "B"))
                            for k in keys)]
    records = pd.DataFrame({"study": study, "exp_id": published["exp_id"], "published": True,
                            "builds_on": published["parent"], "family": published["family"],
                            "data_source": PUBLISHED_MARK, **{k: published[k] for k in keys}}).reset_index(drop=True)
    return Table(title=f"Published figures: {_published_note(published)}", frame=_cells(columns, published),
                 records=records, note="No run on real CIFAR-10 in this store yet to set beside them.")


def _check_marks(study: str, resolved: list[cfg.Config]) -> Table:
    ids, matrix = cfg.study_enhancement_matrix(study, resolved)
    frame = pd.DataFrame([[label, *["✔" if used else "" for used in marks]] for label, marks in matrix],
                         columns=["Enhancement", *ids], dtype=object)
    return Table(title="Enhancements per iteration (from the catalogue)", frame=frame, records=pd.DataFrame())


def _iteration_changes(study: str, resolved: list[cfg.Config]) -> str:
    """Each iteration's catalogue description: study B's model refinements (b1-b4) are not enhancements,
    so the check marks alone leave their columns empty."""
    changes = [f"{c.exp_id}{f' (on {c.parent})' if c.parent else ''}: {c.description.rstrip('.')}"
               for c in resolved if c.study == study]
    return "What each iteration changes: " + "; ".join(changes) + "."


def _curves_figure(row: dict[str, Any], published: dict[str, float],
                   history: Callable[[str, str], list[tuple[int, float]]]) -> Figure:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib.ticker import MaxNLocator

    label = DATA_SOURCES.get(row["data_source"], row["data_source"])
    figure, axes = plt.subplots(figsize=(7.5, 4.2))
    for i, (run_id, seed) in enumerate(zip(row["run_ids"], row["seeds"])):
        seed = f" (seed {seed or '?'})" if len(row["run_ids"]) > 1 else ""
        for key, name, color in (("epoch_train_accuracy", "training", "tab:blue"),
                                 ("epoch_val_accuracy", "validation", "tab:orange")):
            points = history(run_id, key)
            if points:
                axes.plot([s for s, _ in points], [v * 100 for _, v in points], marker="o", color=color,
                          alpha=1.0 if i == 0 else 0.6, label=f"{name}{seed}")
    if row["data_source"] in REAL_SOURCES:
        for key, name, color in (("train_accuracy", "training", "tab:blue"), ("val_accuracy", "validation", "tab:orange")):
            if key in published:
                axes.axhline(published[key] * 100, color=color, linestyle="--", linewidth=1,
                             label=f"{name}, {PUBLISHED_MARK} ({published[key] * 100:.2f}%)")
    axes.set(xlabel="epoch", ylabel="accuracy (%)",
             title=f"{row['exp_id']}: training vs validation accuracy ({label})")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    return Figure(name=f"{row['exp_id']}_accuracy_{row['data_source']}",
                  caption=f"{row['exp_id']}, final iteration: training vs validation accuracy per epoch, "
                          f"{label}, runs {', '.join(r[:8] for r in row['run_ids'])}", png=buffer.getvalue())


def _ablations(experiment: str) -> Section:
    """Every finished `cifar-mlops ablate` of the experiment: its variants, its effects and their forest plot,
    as the ablation's parent run logged them."""
    from cifar_mlops import ablate, ablation_stats
    from cifar_mlops.tracking import ablations

    section = Section("Ablations (`cifar-mlops ablate`): did each change help?")
    for i, found in enumerate(ablations.finished_ablations(experiment)):
        tags = found["tags"]
        section.blocks.append(f"Ablation {found['name']}: seeds {tags.get('seeds', '?')}, parent run "
                              f"{found['run_id'][:8]}; effect = metric with the change minus without it, paired by "
                              "seed; verdicts from the paired t-test across seeds, read off intervals at the level "
                              "they use (Bonferroni; ablations logged before issue 31: 95% intervals, Holm p).")
        empty = pd.DataFrame()  # the report's CSV holds results rows; the ablation's own CSVs are on its run
        section.blocks.append(Table(f"{found['name']}: variants (mean ± std over seeds)",
                                    ablate.variants_text(found["variants"]), empty))
        section.blocks.append(Table(f"{found['name']}: effects", ablation_stats.effects_text(found["effects"]), empty))
        if found.get("comparisons") is not None:  # logged since issue 31's item 5
            compared = found["comparisons"]
            unit = ablation_stats.minutes_header(compared)  # CPU- or GPU-minutes; wall-clock minutes before them
            section.blocks.append(Table(f"{found['name']}: verdicts, seeds and {unit}",
                                        ablation_stats.comparison_text(compared), empty,
                                        note=f"Minutes: {ablation_stats.minutes_meaning(compared)}."))
            section.blocks += [f"Where the noise comes from: {line}" for line in compared["noise"].dropna() if line]
        if found["forest_png"]:
            section.blocks.append(Figure(f"ablation_{i}_forest", f"{found['name']}: each change's effect on test "
                                         "accuracy with the interval its verdict uses", found["forest_png"]))
    return section


def _source_order(source: str) -> tuple:
    return (SOURCE_ORDER.index(source) if source in SOURCE_ORDER else len(SOURCE_ORDER), source)


def build(experiment: str = ABLATION_EXPERIMENT, selection: str = "latest", *,
          history: Callable[[str, str], list[tuple[int, float]]] | None = None) -> Report:
    """The report over the FINISHED runs of `experiment` (one run per iteration/data source/seed)."""
    if selection not in SELECTIONS:
        raise ReportError(f"selection must be one of {', '.join(SELECTIONS)}, not {selection!r}")
    history = history or results.metric_history
    resolved = [cfg.resolve(exp_id) for exp_id in cfg.list_experiments()]
    catalogue = {c.exp_id: c for c in resolved}
    runs = results.finished_result_runs(experiment)
    rows = build_rows(runs, selection, catalogue)

    chosen = ("the latest FINISHED run (by start time)" if selection == "latest"
              else "the FINISHED run with the best val_accuracy")
    header = [
        f"Runs: MLflow experiment `{experiment}` of `{store.configure_store()}`; {len(runs)} finished runs, "
        f"{len(rows)} iteration/data-source rows.",
        f"Selection ({selection}): for each iteration, data source and seed (`train.seed`), {chosen}; "
        "several seeds give mean ± sample std over the seeds. "
        "Wall time: a run's start to end (training, evaluation, logging), averaged over seeds.",
        "Data sources are never mixed: each results table holds one. Report runs (tag kind=report) are not results.",
        f"Generated {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
    ]
    sections = []
    for study in (*cfg.STUDY_TITLES, OTHER_STUDY):
        study_rows = rows[rows["study"] == study]
        if study == OTHER_STUDY and study_rows.empty:
            continue
        section = Section(STUDY_HEADINGS[study])
        if study in cfg.STUDY_TITLES:
            section.blocks += [_check_marks(study, resolved), _iteration_changes(study, resolved)]
        published = published_rows(study, catalogue)
        sources = sorted(set(study_rows["data_source"]), key=_source_order)
        if len(published) and not any(s in REAL_SOURCES for s in sources):
            section.blocks.append(_published_table(study, published))
        if study_rows.empty:
            section.blocks.append(f"No finished run of a study {study} iteration in `{experiment}` yet.")
        for source in sources:
            in_source = study_rows[study_rows["data_source"] == source]
            section.blocks.append(_results_table(study, source, in_source, published, selection))
            final = in_source[in_source["exp_id"] == FINAL_ITERATION.get(study)]
            if len(final):
                final_id = FINAL_ITERATION[study]
                figures = catalogue[final_id].published.values() if catalogue[final_id].published else {}
                section.blocks.append(_curves_figure(final.to_dict("records")[0], figures, history))
        if study in FINAL_ITERATION and not (study_rows["exp_id"] == FINAL_ITERATION[study]).any():
            section.blocks.append(f"No finished run of {FINAL_ITERATION[study]} (the final iteration): no curves.")
        sections.append(section)
    ablation_section = _ablations(experiment)
    if ablation_section.blocks:
        sections.append(ablation_section)
    return Report(title="CIFAR-10 ablation report", header=header, sections=sections, experiment=experiment,
                  selection=selection)


# ---------------------------------------------------------------------------
# Rendering


def _md_text(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render_markdown(report: Report, image_prefix: str = "") -> str:
    """Markdown (GitHub tables, by pandas/tabulate); figures as `![caption](<image_prefix><name>.png)`."""
    lines = [f"# {report.title}", ""] + [f"- {line}" for line in report.header] + [""]
    for section in report.sections:
        lines += [f"## {section.title}", ""]
        for block in section.blocks:
            if isinstance(block, Table):
                lines += [f"### {block.title}", ""]
                if block.note:
                    lines += [f"_{block.note}_", ""]
                if len(block.frame):
                    shown = block.frame.map(_md_text).rename(columns=_md_text)
                    lines += [shown.to_markdown(index=False, disable_numparse=True), ""]  # numbers stay as written
            elif isinstance(block, Figure):
                lines += [f"![{block.caption}]({image_prefix}{block.name}.png)", "", f"_{block.caption}_", ""]
            else:
                lines += [block, ""]
    return "\n".join(lines)


@functools.cache
def _html_template() -> jinja2.Template:
    """templates/report.html, shipped in the package (package data)."""
    env = jinja2.Environment(loader=jinja2.PackageLoader("cifar_mlops", "templates"), autoescape=True,
                             trim_blocks=True, lstrip_blocks=True, undefined=jinja2.StrictUndefined)
    env.tests.update(table=lambda block: isinstance(block, Table), figure=lambda block: isinstance(block, Figure))
    env.filters["base64"] = lambda png: base64.b64encode(png).decode("ascii")
    return env.get_template("report.html")


def render_html(report: Report) -> str:
    """One self-contained HTML file: inline style, figures as base64 data URIs, no scripts."""
    return _html_template().render(report=report)


CSV_FIRST = ["table", "study", "exp_id", "published", "data_source", "builds_on", "family", "selection", "n_seeds",
             "seeds", "run_ids", "model_versions", "epochs", "wall_seconds", "fit_seconds",
             *(f"{m}{std}" for m in METRICS for std in ("", "_std"))]


def csv_frame(report: Report) -> pd.DataFrame:
    """Every results row (ours and published) of every table, as one frame: full ids, unrounded numbers."""
    frames = [t.records.assign(table=t.title) for t in report.tables if len(t.records)]
    if not frames:
        return pd.DataFrame(columns=["table", "exp_id"])
    records = pd.concat(frames, ignore_index=True)
    if "n_seeds" in records:
        records["n_seeds"] = records["n_seeds"].astype("Int64")  # published-only tables have none: blank, not 0.0
    return records[[c for c in CSV_FIRST if c in records] + sorted(set(records.columns) - set(CSV_FIRST))]


def render_csv(report: Report) -> str:
    """`csv_frame` as CSV: one row per table row; missing numbers are empty."""
    return csv_frame(report).to_csv(index=False, lineterminator="\n")


def render(report: Report, fmt: str, image_prefix: str = "") -> str:
    if fmt == "markdown":
        return render_markdown(report, image_prefix)
    if fmt == "html":
        return render_html(report)
    if fmt == "csv":
        return render_csv(report)
    raise ReportError(f"format must be one of {', '.join(FORMATS)}, not {fmt!r}")


def write(report: Report, fmt: str, out: Path) -> list[Path]:
    """Write the report to `out`; markdown also writes its figures beside it (`<stem>_<figure>.png`)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    written = []
    prefix = f"{out.stem}_" if fmt == "markdown" else ""
    if fmt == "markdown":
        for figure in report.figures:
            path = out.parent / f"{prefix}{figure.name}.png"
            path.write_bytes(figure.png)
            written.append(path)
    out.write_text(render(report, fmt, image_prefix=prefix), encoding="utf-8")
    return [out, *written]


def log(report: Report) -> tuple[str, str]:
    """Log the report in every format (report.md + its PNGs, report.html, report.csv) as artifacts of a
    report run; returns (run id, MLflow experiment name)."""
    with tempfile.TemporaryDirectory() as folder:
        for fmt in FORMATS:
            write(report, fmt, Path(folder) / f"report{SUFFIXES[fmt]}")
        return results.log_report_run(
            folder, tags={"report_of_experiment": report.experiment, "selection": report.selection,
                          "rows": sum(len(t.records) for t in report.tables)},
            params={"experiment": report.experiment, "selection": report.selection},
            description=render_markdown(without_figures(report)) + "\n\nFigures: report.md (with its PNGs) and "
                                                                    "report.html in this run's artifacts.")


def without_figures(report: Report) -> Report:
    """The report's text and tables alone (a run's description shows no images of its artifacts)."""
    return dataclasses.replace(report, sections=[
        Section(s.title, [b for b in s.blocks if not isinstance(b, Figure)]) for s in report.sections])
