"""The ablation report: the studies' tables and plots regenerated from tracked runs.

`build()` reads the FINISHED runs of an MLflow experiment (through `tracking`),
keeps one run per iteration, data source and seed (the latest, or the best by
validation accuracy), averages over seeds, and lays out per study:

- the enhancement check-mark table (from the catalogue),
- the results table(s), one per data source: real CIFAR-10, a CIFAR-10 subset
  or sample, synthetic data (never mixed: each table says what it holds), with
  the improvement over the iteration each one builds on (the catalogue's
  `parent`) and the studies' published figures beside ours, marked as such,
- study B's training vs validation accuracy per epoch for its final iteration.

`render(report, fmt)` gives markdown (pastes into a README; plots as PNG files
beside it), one self-contained HTML file (plots embedded as data URIs) or CSV
(one row per table row, full run ids, every number unrounded).
"""

from __future__ import annotations

import base64
import csv
import html
import io
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from cifar_mlops import config as cfg
from cifar_mlops import tracking

SELECTIONS = ("latest", "best")
FORMATS = ("markdown", "html", "csv")
SUFFIXES = {"markdown": ".md", "html": ".html", "csv": ".csv"}

# The studies' own figures: the one place they are kept. Study A: full CIFAR-10
# on GPU (train and official test set); study B: its 5,000/5,000 split of the
# CIFAR-10 training set (validation), train accuracy of the final model.
PUBLISHED: dict[str, dict[str, float]] = {
    "2.4": {"train_f1_macro": 0.9442, "test_f1_macro": 0.8874, "train_accuracy": 0.9430, "test_accuracy": 0.8842},
    "3.1": {"train_f1_macro": 0.9802, "test_f1_macro": 0.9235, "train_accuracy": 0.9802, "test_accuracy": 0.9234},
    "3.2": {"train_f1_macro": 0.9859, "test_f1_macro": 0.9342, "train_accuracy": 0.9859, "test_accuracy": 0.9341},
    "b0": {"val_accuracy": 0.5336},
    "b5": {"val_accuracy": 0.667, "train_accuracy": 0.9596},
}
PUBLISHED_NOTE = {
    "A": "the study's own figures (full CIFAR-10, GPU), not runs of this store",
    "B": "the study's own figures (5,000/5,000 split of CIFAR-10), not runs of this store",
}
PUBLISHED_MARK = "published"

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


class ReportError(ValueError):
    """A user-facing, one-line report error."""


# ---------------------------------------------------------------------------
# Rows: one per iteration and data source, over the runs chosen for each seed


@dataclass
class Row:
    exp_id: str
    study: str
    family: str
    parent: str | None
    data_source: str
    runs: list[dict[str, Any]]  # the chosen run of each seed, seeds ascending
    published: bool = False
    values: dict[str, float] = field(default_factory=dict)  # published figures only

    def samples(self, key: str) -> list[float]:
        if self.published:
            return [self.values[key]] if key in self.values else []
        return [float(r["metrics"][key]) for r in self.runs if key in r["metrics"]]

    def mean(self, key: str) -> float | None:
        values = self.samples(key)
        return sum(values) / len(values) if values else None

    def std(self, key: str) -> float | None:
        values = self.samples(key)
        if len(values) < 2:
            return None
        mean = sum(values) / len(values)
        return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))  # sample std over seeds

    @property
    def seeds(self) -> list[str]:
        return [r["params"].get("train.seed", "") for r in self.runs]

    @property
    def wall_seconds(self) -> float | None:
        spans = [(r["end_time"] - r["start_time"]) / 1000 for r in self.runs if r["end_time"] and r["start_time"]]
        return sum(spans) / len(spans) if spans else None

    @property
    def epochs(self) -> str:
        counts = {str(int(r["metrics"]["epochs_run"])) if "epochs_run" in r["metrics"]
                  else r["params"].get("train.epochs", "") for r in self.runs}
        return "/".join(sorted(c for c in counts if c)) or "—"


def choose_runs(runs: list[dict[str, Any]], selection: str) -> list[dict[str, Any]]:
    """One run per seed (`train.seed`; ensembles have none): the latest, or the best by val_accuracy."""
    by_seed: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        by_seed.setdefault(run["params"].get("train.seed", ""), []).append(run)

    def rank(run: dict[str, Any]) -> tuple:
        if selection == "best":
            return (run["metrics"].get("val_accuracy", float("-inf")), run["start_time"])
        return (run["start_time"],)

    def seed_order(seed: str) -> tuple:
        return (0, int(seed), "") if seed.lstrip("-").isdigit() else (1, 0, seed)

    return [max(by_seed[seed], key=rank) for seed in sorted(by_seed, key=seed_order)]


def build_rows(runs: list[dict[str, Any]], selection: str, catalogue: dict[str, cfg.Config]) -> list[Row]:
    grouped: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for run in runs:
        source = run["tags"].get("data_source", "unknown")
        grouped.setdefault((run["tags"]["exp_id"], source), []).append(run)
    rows = []
    for (exp_id, source), group in grouped.items():
        known = catalogue.get(exp_id)
        tags = group[0]["tags"]
        study = known.study if known else tags.get("study", "")
        parent = known.parent if known else (tags.get("parent") if tags.get("parent") not in (None, "none") else None)
        rows.append(Row(exp_id=exp_id, study=study if study in cfg.STUDY_TITLES else OTHER_STUDY,
                        family=known.family if known else tags.get("family", "?"), parent=parent,
                        data_source=source, runs=choose_runs(group, selection)))
    order = {exp_id: i for i, exp_id in enumerate(catalogue)}
    rows.sort(key=lambda r: (order.get(r.exp_id, len(order)), r.exp_id))
    return rows


# ---------------------------------------------------------------------------
# The document: sections of paragraphs, tables and figures, rendered three ways


@dataclass
class Table:
    title: str
    columns: list[str]
    cells: list[list[str]]
    records: list[dict[str, Any]]  # the same rows for CSV: full ids, raw numbers
    note: str = ""


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


def _fraction(row: Row, key: str, percent: bool = False) -> str:
    mean, std = row.mean(key), row.std(key)
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
    cell: Callable[[Row], str]


def _improvement(rows_by_id: dict[str, Row], key: str, percent: bool) -> Column:
    def cell(row: Row) -> str:
        if row.published:
            return ""
        if not row.parent:
            return "— (first)"
        parent = rows_by_id.get(row.parent)
        mine, theirs = row.mean(key), parent.mean(key) if parent else None
        if parent is None or theirs is None:
            return f"— (no run of {row.parent})"
        if mine is None:
            return "—"
        delta = mine - theirs
        return f"{delta * 100:+.2f} pp" if percent else f"{delta:+.4f}"
    return Column(f"Δ {METRIC_LABELS[key]} vs builds on", cell)


def _improvement_value(row: Row, rows_by_id: dict[str, Row], key: str) -> float | None:
    parent = rows_by_id.get(row.parent) if row.parent and not row.published else None
    mine, theirs = row.mean(key), (parent.mean(key) if parent else None)
    return None if mine is None or theirs is None else mine - theirs


def _trail_columns(source: str) -> list[Column]:
    return [
        Column("Data", lambda r: PUBLISHED_MARK if r.published else DATA_SOURCES.get(r.data_source, r.data_source)),
        Column("Seeds", lambda r: "" if r.published else str(len(r.runs))),
        Column("Epochs", lambda r: "" if r.published else r.epochs),
        Column("Wall time", lambda r: "" if r.published else _seconds(r.wall_seconds)),
        Column("Run", lambda r: PUBLISHED_MARK if r.published else ", ".join(x["run_id"][:8] for x in r.runs)),
        Column("Model version", lambda r: "" if r.published else
               ", ".join(x["tags"].get("registered_version", "not registered") for x in r.runs)),
    ]


def _gap(row: Row) -> str:
    train, val = row.mean("train_accuracy"), row.mean("val_accuracy")
    return "—" if train is None or val is None else f"{(train - val) * 100:+.2f} pp"


def _study_columns(study: str, rows_by_id: dict[str, Row], source: str) -> tuple[list[Column], str]:
    iteration = Column("Iteration", lambda r: f"{r.exp_id} ({PUBLISHED_MARK})" if r.published else r.exp_id)
    builds_on = Column("Builds on", lambda r: "" if r.published else (r.parent or "—"))
    if study == "B":
        columns = [iteration, builds_on,
                   Column("Val acc", lambda r: _fraction(r, "val_accuracy", True)),
                   Column("Test acc", lambda r: _fraction(r, "test_accuracy", True)),
                   Column("Train acc", lambda r: _fraction(r, "train_accuracy", True)),
                   Column("Gap train−val", _gap),
                   _improvement(rows_by_id, "val_accuracy", True)]
        return columns + _trail_columns(source), "val_accuracy"
    model = Column("Model", lambda r: "" if r.published else r.family)
    columns = [iteration, model, builds_on,
               Column("F1 train", lambda r: _fraction(r, "train_f1_macro")),
               Column("F1 test", lambda r: _fraction(r, "test_f1_macro")),
               Column("Acc train", lambda r: _fraction(r, "train_accuracy")),
               Column("Acc test", lambda r: _fraction(r, "test_accuracy"))]
    if study == OTHER_STUDY:
        columns.insert(6, Column("Acc val", lambda r: _fraction(r, "val_accuracy")))
    return columns + [_improvement(rows_by_id, "test_accuracy", False)] + _trail_columns(source), "test_accuracy"


def _published_rows(study: str, catalogue: dict[str, cfg.Config]) -> dict[str, Row]:
    rows = {}
    for exp_id, values in PUBLISHED.items():
        known = catalogue.get(exp_id)
        if known is not None and known.study == study:
            rows[exp_id] = Row(exp_id=exp_id, study=study, family=known.family, parent=known.parent,
                               data_source=PUBLISHED_MARK, runs=[], published=True, values=values)
    return rows


def _results_table(study: str, source: str, rows: list[Row], published: dict[str, Row], selection: str) -> Table:
    rows_by_id = {r.exp_id: r for r in rows}
    columns, improvement_key = _study_columns(study, rows_by_id, source)
    laid_out: list[Row] = []
    for row in rows:
        laid_out.append(row)
        if source in REAL_SOURCES and row.exp_id in published:
            laid_out.append(published[row.exp_id])
    title = TABLE_TITLES.get(source, f"Results on data source {source!r}")
    notes = [f"Improvement: {improvement_key} minus that of the iteration it builds on (catalogue `parent`), "
             f"within this table."]
    if source == "synthetic":
        notes.insert(0, "Synthetic CIFAR-shaped data: a pipeline check, these are NOT CIFAR-10 results.")
    elif source == "cifar10-partial":
        notes.insert(0, "A subset or sample of CIFAR-10: test figures are not on the official test set.")
    if any(r.published for r in laid_out):
        notes.append(f"{PUBLISHED_MARK}: {PUBLISHED_NOTE.get(study, 'the study own figures')}.")
    records = []
    for row in laid_out:
        record: dict[str, Any] = {
            "study": study, "exp_id": row.exp_id, "published": row.published, "builds_on": row.parent or "",
            "family": row.family, "data_source": row.data_source, "selection": "" if row.published else selection,
            "seeds": ";".join(row.seeds), "n_seeds": len(row.runs),
            "run_ids": ";".join(r["run_id"] for r in row.runs),
            "model_versions": ";".join(r["tags"].get("registered_version", "") for r in row.runs),
            "epochs": "" if row.published else row.epochs, "wall_seconds": row.wall_seconds,
            "fit_seconds": row.mean("fit_seconds"),
        }
        for split in ("train", "val", "test"):
            for metric in ("accuracy", "f1_macro", "loss"):
                key = f"{split}_{metric}"
                record[key], record[f"{key}_std"] = row.mean(key), row.std(key)
        record[f"improvement_{improvement_key}"] = _improvement_value(row, rows_by_id, improvement_key)
        records.append(record)
    return Table(title=title, columns=[c.header for c in columns],
                 cells=[[c.cell(r) for c in columns] for r in laid_out], records=records, note=" ".join(notes))


METRIC_LABELS = {"train_f1_macro": "F1 train", "test_f1_macro": "F1 test", "train_accuracy": "Acc train",
                 "val_accuracy": "Val acc", "test_accuracy": "Acc test"}


def _published_table(study: str, published: dict[str, Row]) -> Table:
    """The study's published figures on their own (when no real-data table sets them beside ours)."""
    keys = [k for k in METRIC_LABELS if any(k in r.values for r in published.values())]
    return Table(
        title=f"Published figures: {PUBLISHED_NOTE[study]}",
        columns=["Iteration", *[METRIC_LABELS[k] for k in keys]],
        cells=[[f"{r.exp_id} ({PUBLISHED_MARK})", *[_fraction(r, k, percent=study == "B") for k in keys]]
               for r in published.values()],
        records=[{"study": study, "exp_id": r.exp_id, "published": True, "builds_on": r.parent or "",
                  "family": r.family, "data_source": PUBLISHED_MARK, **r.values} for r in published.values()],
        note="No run on real CIFAR-10 in this store yet to set beside them.")


def _check_marks(study: str, resolved: list[cfg.Config]) -> Table:
    ids, matrix = cfg.study_enhancement_matrix(study, resolved)
    return Table(title="Enhancements per iteration (from the catalogue)", columns=["Enhancement", *ids],
                 cells=[[label, *["✔" if used else "" for used in marks]] for label, marks in matrix],
                 records=[], note="")


def _iteration_changes(study: str, resolved: list[cfg.Config]) -> str:
    """Each iteration's catalogue description: study B's model refinements (b1-b4) are not enhancements,
    so the check marks alone leave their columns empty."""
    changes = [f"{c.exp_id}{f' (on {c.parent})' if c.parent else ''}: {c.description.rstrip('.')}"
               for c in resolved if c.study == study]
    return "What each iteration changes: " + "; ".join(changes) + "."


def _curves_figure(row: Row, history: Callable[[str, str], list[tuple[int, float]]]) -> Figure:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib.ticker import MaxNLocator

    label = DATA_SOURCES.get(row.data_source, row.data_source)
    figure, axes = plt.subplots(figsize=(7.5, 4.2))
    for i, run in enumerate(row.runs):
        seed = f" (seed {run['params'].get('train.seed', '?')})" if len(row.runs) > 1 else ""
        for key, name, color in (("epoch_train_accuracy", "training", "tab:blue"),
                                 ("epoch_val_accuracy", "validation", "tab:orange")):
            points = history(run["run_id"], key)
            if points:
                axes.plot([s for s, _ in points], [v * 100 for _, v in points], marker="o", color=color,
                          alpha=1.0 if i == 0 else 0.6, label=f"{name}{seed}")
    if row.data_source in REAL_SOURCES and row.exp_id in PUBLISHED:
        published = PUBLISHED[row.exp_id]
        for key, name, color in (("train_accuracy", "training", "tab:blue"), ("val_accuracy", "validation", "tab:orange")):
            if key in published:
                axes.axhline(published[key] * 100, color=color, linestyle="--", linewidth=1,
                             label=f"{name}, {PUBLISHED_MARK} ({published[key] * 100:.2f}%)")
    axes.set(xlabel="epoch", ylabel="accuracy (%)", title=f"{row.exp_id}: training vs validation accuracy ({label})")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    return Figure(name=f"{row.exp_id}_accuracy_{row.data_source}",
                  caption=f"{row.exp_id}, final iteration: training vs validation accuracy per epoch, "
                          f"{label}, runs {', '.join(r['run_id'][:8] for r in row.runs)}", png=buffer.getvalue())


def build(experiment: str = tracking.ABLATION_EXPERIMENT, selection: str = "latest", *,
          history: Callable[[str, str], list[tuple[int, float]]] | None = None) -> Report:
    """The report over the FINISHED runs of `experiment` (one run per iteration/data source/seed)."""
    if selection not in SELECTIONS:
        raise ReportError(f"selection must be one of {', '.join(SELECTIONS)}, not {selection!r}")
    history = history or tracking.metric_history
    resolved = [cfg.resolve(exp_id) for exp_id in cfg.list_experiments()]
    catalogue = {c.exp_id: c for c in resolved}
    runs = tracking.finished_result_runs(experiment)
    rows = build_rows(runs, selection, catalogue)

    chosen = ("the latest FINISHED run (by start time)" if selection == "latest"
              else "the FINISHED run with the best val_accuracy")
    header = [
        f"Runs: MLflow experiment `{experiment}` of `{tracking.configure_store()}`; {len(runs)} finished runs, "
        f"{len(rows)} iteration/data-source rows.",
        f"Selection ({selection}): for each iteration, data source and seed (`train.seed`), {chosen}; "
        "several seeds give mean ± sample std over the seeds. "
        "Wall time: a run's start to end (training, evaluation, logging), averaged over seeds.",
        "Data sources are never mixed: each results table holds one. Report runs (tag kind=report) are not results.",
        f"Generated {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
    ]
    sections = []
    for study in (*cfg.STUDY_TITLES, OTHER_STUDY):
        study_rows = [r for r in rows if r.study == study]
        if study == OTHER_STUDY and not study_rows:
            continue
        section = Section(STUDY_HEADINGS[study])
        if study in cfg.STUDY_TITLES:
            section.blocks += [_check_marks(study, resolved), _iteration_changes(study, resolved)]
        published = _published_rows(study, catalogue) if study in PUBLISHED_NOTE else {}
        sources = sorted({r.data_source for r in study_rows},
                         key=lambda s: (SOURCE_ORDER.index(s) if s in SOURCE_ORDER else len(SOURCE_ORDER), s))
        if published and not any(s in REAL_SOURCES for s in sources):
            section.blocks.append(_published_table(study, published))
        if not study_rows:
            section.blocks.append(f"No finished run of a study {study} iteration in `{experiment}` yet.")
        for source in sources:
            in_source = [r for r in study_rows if r.data_source == source]
            section.blocks.append(_results_table(study, source, in_source, published, selection))
            final = next((r for r in in_source if r.exp_id == FINAL_ITERATION.get(study)), None)
            if final is not None:
                section.blocks.append(_curves_figure(final, history))
        if study in FINAL_ITERATION and not any(r.exp_id == FINAL_ITERATION[study] for r in study_rows):
            section.blocks.append(f"No finished run of {FINAL_ITERATION[study]} (the final iteration): no curves.")
        sections.append(section)
    return Report(title="CIFAR-10 ablation report", header=header, sections=sections, experiment=experiment,
                  selection=selection)


# ---------------------------------------------------------------------------
# Rendering


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ") or " "


def render_markdown(report: Report, image_prefix: str = "") -> str:
    """Markdown (GitHub tables); figures as `![caption](<image_prefix><name>.png)`."""
    lines = [f"# {report.title}", ""] + [f"- {line}" for line in report.header] + [""]
    for section in report.sections:
        lines += [f"## {section.title}", ""]
        for block in section.blocks:
            if isinstance(block, Table):
                lines += [f"### {block.title}", ""]
                if block.note:
                    lines += [f"_{block.note}_", ""]
                if block.cells:
                    lines.append("| " + " | ".join(_md_cell(c) for c in block.columns) + " |")
                    lines.append("|" + "|".join("---" for _ in block.columns) + "|")
                    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in block.cells]
                    lines.append("")
            elif isinstance(block, Figure):
                lines += [f"![{block.caption}]({image_prefix}{block.name}.png)", "", f"_{block.caption}_", ""]
            else:
                lines += [block, ""]
    return "\n".join(lines)


HTML_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto; max-width: 1400px;
       padding: 0 1rem; color: #1b1f24; background: #fff; line-height: 1.45; }
h1 { border-bottom: 2px solid #d0d7de; padding-bottom: .3rem; }
h2 { margin-top: 2.2rem; border-bottom: 1px solid #d0d7de; padding-bottom: .2rem; }
table { border-collapse: collapse; margin: .6rem 0 1.4rem; font-size: .88rem; }
th, td { border: 1px solid #d0d7de; padding: .3rem .55rem; text-align: right; white-space: nowrap; }
th { background: #f0f3f6; white-space: normal; vertical-align: bottom; }
td:first-child, th:first-child { text-align: left; }
tr.published td { background: #fff8e1; font-style: italic; }
td.mark { text-align: center; color: #1a7f37; font-weight: bold; }
p.note { color: #57606a; font-size: .88rem; margin: .2rem 0; }
p.synthetic { color: #9a6700; font-weight: bold; }
figure { margin: .5rem 0 1.5rem; } figure img { max-width: 100%; border: 1px solid #d0d7de; }
figcaption { color: #57606a; font-size: .85rem; }
.scroll { overflow-x: auto; }
"""


def render_html(report: Report) -> str:
    """One self-contained HTML file: inline style, figures as base64 data URIs, no scripts."""
    e = html.escape
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           f"<title>{e(report.title)}</title><style>{HTML_STYLE}</style></head><body>",
           f"<h1>{e(report.title)}</h1>", "<ul>" + "".join(f"<li>{e(line)}</li>" for line in report.header) + "</ul>"]
    for section in report.sections:
        out.append(f"<section><h2>{e(section.title)}</h2>")
        for block in section.blocks:
            if isinstance(block, Table):
                out.append(f"<h3>{e(block.title)}</h3>")
                if block.note:
                    css = "note synthetic" if "NOT CIFAR-10" in block.note else "note"
                    out.append(f'<p class="{css}">{e(block.note)}</p>')
                if block.cells:
                    out.append('<div class="scroll"><table><thead><tr>'
                               + "".join(f"<th>{e(c)}</th>" for c in block.columns) + "</tr></thead><tbody>")
                    for row in block.cells:
                        css = ' class="published"' if row and row[0].endswith(f"({PUBLISHED_MARK})") else ""
                        cells = "".join(f'<td class="mark">{e(c)}</td>' if c == "✔" else f"<td>{e(c)}</td>"
                                        for c in row)
                        out.append(f"<tr{css}>{cells}</tr>")
                    out.append("</tbody></table></div>")
            elif isinstance(block, Figure):
                data = base64.b64encode(block.png).decode("ascii")
                out.append(f'<figure><img alt="{e(block.caption)}" src="data:image/png;base64,{data}">'
                           f"<figcaption>{e(block.caption)}</figcaption></figure>")
            else:
                out.append(f'<p class="note">{e(block)}</p>')
        out.append("</section>")
    out.append("</body></html>")
    return "\n".join(out)


def render_csv(report: Report) -> str:
    """Every results row (ours and published) of every table: one CSV, full run ids, unrounded numbers."""
    records = [{"table": t.title, **r} for t in report.tables for r in t.records]
    metrics = [f"{split}_{name}{std}" for split in ("train", "val", "test") for name in ("accuracy", "f1_macro", "loss")
               for std in ("", "_std")]
    preferred = ["table", "study", "exp_id", "published", "data_source", "builds_on", "family", "selection",
                 "n_seeds", "seeds", "run_ids", "model_versions", "epochs", "wall_seconds", "fit_seconds", *metrics]
    present = {k for record in records for k in record}
    fields = [k for k in preferred if k in present] + sorted(present - set(preferred))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields or ["table", "exp_id"], lineterminator="\n")
    writer.writeheader()
    for record in records:
        writer.writerow({k: ("" if v is None else v) for k, v in record.items()})
    return buffer.getvalue()


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
        return tracking.log_report_run(
            folder, tags={"report_of_experiment": report.experiment, "selection": report.selection,
                          "rows": sum(len(t.records) for t in report.tables)},
            params={"experiment": report.experiment, "selection": report.selection})
