"""Forward selection: the next iteration, chosen by the paired test (`cifar-mlops select --exp ID`).

Greedy forward selection from experiment ID. The candidates are the catalogue's enhancements of its study that
it lacks (or `--candidates`), less those the study's rules forbid (`config.load_study_rules`: rules are data in
the catalogue). Each step is an add-one ablation (`ablate.ablate(..., base=...)`) of the current best against
each remaining candidate, with `--seeds auto`; the candidate with the largest effect whose verdict is `helps`
and whose interval clears `--min-effect` is kept and becomes the next step's base. Selection stops when no
candidate helps, when none is left, or when `--budget` CPU- or GPU-minutes of training are spent (it says
what was left undecided).

Every variant of every step is the start experiment with a list of enhancements, so a (configuration, seed)
has one config digest wherever it comes up: a run FINISHED in the store (an earlier step's, an earlier
ablation's, a killed `select`'s) is reused, never trained again, and rerunning the command resumes it and
replays its decisions. The kept iterations are written as experiment files (`<ID>-select-<n>.yaml` in
`config.generated_dir()`) that `cifar-mlops train --exp` trains like any other.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import yaml

from cifar_mlops import ablate as ablation
from cifar_mlops import ablation_stats, progress
from cifar_mlops import config as cfg
from cifar_mlops.errors import UserError
from cifar_mlops.progress import log

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

WHAT_IT_SHOWS = (
    "What this shows: each kept step helped at its own level (its repeated interval, Bonferroni over that step's "
    "candidates, on these settings and seeds); what it does not: greedy selection adds one change at a time, so it "
    "can miss changes that only help together and never tries another order, the error rates of the steps add up "
    "along the path, and the path as a whole was not tested against the start on fresh seeds.")


class SelectionError(UserError):
    """A selection that cannot start as asked (a forbidden or known candidate, a budget of 0, ...)."""

    exit_code = 2


@dataclass
class Step:
    """One step: the add-one ablation of the current best (`base`: enhancements added to the start so far)."""

    number: int
    base: tuple[str, ...]
    ablation: ablation.AblationResult
    table: pd.DataFrame  # one row per candidate: `step_table`
    kept: str | None
    undecided: list[str]  # candidates left inconclusive because the budget stopped the step
    runs: pd.DataFrame  # the step's (variant, seed) runs: variant, seed, run_id, metrics


@dataclass
class SelectionResult:
    name: str
    exp_id: str
    run_id: str
    experiment: str
    tracking_uri: str
    steps: list[Step]
    kept: list[str]
    files: list[Path]  # the generated iterations, one per kept step
    stopped: str  # why the selection ended
    left_out: list[str]  # candidates the study's rules ruled out, with the reason
    fit_minutes: float  # what every run the steps used consumed (`ablation_stats.compute_seconds`), in minutes
    runs: int  # how many distinct runs the steps used
    trained: int  # ... trained by this command
    registered: str = ""  # what --register did
    fit_unit: str = "CPU-minutes"  # the unit of fit_minutes (`ablation_stats.compute_unit`)
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def final_id(self) -> str:
        return self.files[-1].stem if self.files else self.exp_id


# ---------------------------------------------------------------------------
# Candidates and the study's rules


def candidates(config: cfg.ExperimentConfig, named: Sequence[str] = ()) -> tuple[list[str], list[str]]:
    """(the candidates of a selection from `config`, the lines saying which the study's rules left out).

    `named` (`--candidates`): each must exist, be new to the experiment and be allowed by its study's rules;
    empty: every enhancement of the study's catalogue rows that the experiment lacks and the rules allow."""
    catalogue = cfg.load_enhancements()
    rules = cfg.load_study_rules().get(config.study)
    if named:
        if len(set(named)) != len(named):
            raise SelectionError(f"--candidates names {', '.join(n for n in named if named.count(n) > 1)} twice")
        for name in named:
            if name not in catalogue:
                raise SelectionError(f"unknown enhancement {name!r} in --candidates; known: {', '.join(catalogue)}")
            if name in config.enhancements:
                raise SelectionError(f"{config.exp_id} already has {name} (its enhancements: "
                                     f"{', '.join(config.enhancements)}): a candidate must be new to it")
            refusal = rules.refusal(name, catalogue[name]) if rules else None
            if refusal:
                raise SelectionError(f"study {config.study}'s rules forbid candidate {refusal}")
        return list(named), []
    chosen, left_out = [], []
    for name, entry in catalogue.items():
        if config.study not in entry.get("studies", []) or name in config.enhancements:
            continue
        refusal = rules.refusal(name, entry) if rules else None
        if refusal:
            left_out.append(refusal)
        else:
            chosen.append(name)
    if not chosen:
        raise SelectionError(f"{config.exp_id} has no candidates: every enhancement of study {config.study!r} is "
                             f"in it or ruled out{f' ({len(left_out)} by the rules)' if left_out else ''}")
    return chosen, left_out


# ---------------------------------------------------------------------------
# A step's decision


def step_table(effects: pd.DataFrame, metric: str) -> pd.DataFrame:
    """The step's verdict rows (the primary metric), one per candidate: candidate, effect, ci_low, ci_high
    (fractions), level, verdict, vs_min_effect, seeds, open (left open by the budget)."""
    rows = effects[(effects["role"] == ablation_stats.VERDICT) & (effects["metric"] == metric)]
    return pd.DataFrame({"candidate": rows["effect"].astype(str), "effect": rows["mean_diff"].astype(float),
                         "ci_low": rows["ci_low"].astype(float), "ci_high": rows["ci_high"].astype(float),
                         "level": rows["level"].astype(float), "verdict": rows["verdict"].astype(str),
                         "vs_min_effect": rows["vs_min_effect"].fillna("").astype(str),
                         "seeds": rows["n_seeds"].astype(int),
                         "open": rows.get("sequential_status", pd.Series(dtype=str)).reindex(rows.index)
                         == ablation_stats.OPEN}).reset_index(drop=True)


def kept_candidate(table: pd.DataFrame) -> str | None:
    """The candidate with the largest effect among those that help and clear min-effect (ties: the first)."""
    helping = table[(table["verdict"] == ablation_stats.HELPS) & (table["vs_min_effect"] == "clears")]
    return None if helping.empty else str(helping.loc[helping["effect"].idxmax(), "candidate"])


def _pp(value: float) -> str:
    return ("-inf" if value < 0 else "+inf") if math.isinf(value) else f"{100 * value:+.2f}"


def step_markdown(step: Step, min_effect_pp: float) -> str:
    """A step's table: candidate, effect and interval (pp), level, verdict, vs min-effect, seeds, kept."""
    rows = [{"candidate": r.candidate,
             "effect, pp [interval]": ablation_stats.interval_text(r.effect, r.ci_low, r.ci_high),
             "level": f"{100 * r.level:.4g}%" if np.isfinite(r.level) else "", "verdict": r.verdict,
             f"vs min-effect {min_effect_pp:g} pp": r.vs_min_effect, "seeds": str(r.seeds),
             "kept": "kept" if r.candidate == step.kept else ("budget" if r.open else "")}
            for r in step.table.itertuples()]
    return pd.DataFrame(rows).to_markdown(index=False, disable_numparse=True)


def path_markdown(exp_id: str, steps: list[Step]) -> str:
    """The path table: one row per step: its base, candidates, what it kept with its effect and interval."""
    rows = []
    for step in steps:
        row = step.table[step.table["candidate"] == step.kept]
        kept = "nothing" if row.empty else step.kept
        evidence = "" if row.empty else (f"{_pp(row['effect'].iloc[0])} [{_pp(row['ci_low'].iloc[0])}, "
                                         f"{_pp(row['ci_high'].iloc[0])}] at {100 * row['level'].iloc[0]:.4g}%, "
                                         f"{row['seeds'].iloc[0]} seeds")
        rows.append({"step": str(step.number), "base": label(exp_id, step.base),
                     "candidates": str(len(step.table)), "kept": kept, "effect, pp [interval]": evidence,
                     "runs": f"{step.ablation.trained} trained, {step.ablation.reused} reused"})
    return pd.DataFrame(rows).to_markdown(index=False, disable_numparse=True)


def label(exp_id: str, added: Sequence[str]) -> str:
    return exp_id + "".join(f" +{name}" for name in added)


# ---------------------------------------------------------------------------
# The generated iterations


def iteration_id(exp_id: str, n: int, run_id: str) -> str:
    """The id of the iteration with the first n kept enhancements: `<exp_id>-select-<n>`, unless that file already
    holds another selection's iteration (another `select` from the same start, or a file of the user's): then
    `<exp_id>-select-<n>-<the selection run's id, 8 characters>`, so that one selection never overwrites another's.
    A rerun of the same selection (the same run) writes its own files again."""
    plain = f"{exp_id}-select-{n}"
    path = cfg.generated_dir() / f"{plain}.yaml"
    if not path.exists():
        return plain
    try:
        owner = ((yaml.safe_load(path.read_text()) or {}).get("selected") or {}).get("run_id")
    except (OSError, yaml.YAMLError, AttributeError):
        owner = None
    return plain if owner == run_id else f"{plain}-{run_id[:8]}"


def write_iteration(exp_id: str, config: cfg.ExperimentConfig, kept: list[str], steps: list[Step],
                    selected: dict[str, Any], parent: str) -> Path:
    """Write the iteration of the start plus the `kept` enhancements (`iteration_id`) in `cfg.generated_dir()`,
    `parent` the iteration before it; checked to resolve; return its path."""
    folder = cfg.generated_dir()
    n = len(kept)
    new_id = iteration_id(exp_id, n, selected["run_id"])
    kept_steps = [s for s in steps if s.kept][:n]
    block = {**selected, "steps": [
        {"step": s.number, "added": s.kept, **_evidence(s)} for s in kept_steps]}
    document = {
        "description": f"{exp_id} plus what forward selection kept: {', '.join(kept)} (cifar-mlops select)",
        "study": config.study, "extends": exp_id, "parent": parent, "enhancements": list(kept), "selected": block}
    header = (f"# Written by `cifar-mlops select --exp {exp_id}` (MLflow run {selected['run_id']}): iteration {n} of "
              f"its forward selection.\n# Train it with `cifar-mlops train --exp {new_id}`; a rerun of the selection "
              "writes it again.\n")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{new_id}.yaml"
        path.write_text(header + yaml.safe_dump(document, sort_keys=False))
    except OSError as err:
        raise SelectionError(f"cannot write the selected iteration into {folder}: {err.strerror or err}") from None
    cfg.resolve(new_id)  # it trains like any other: a file that does not resolve is a bug here
    return path


def _evidence(step: Step) -> dict[str, Any]:
    row = step.table[step.table["candidate"] == step.kept].iloc[0]
    return {"effect_pp": round(100 * float(row["effect"]), 4),
            "interval_pp": [round(100 * float(row["ci_low"]), 4), round(100 * float(row["ci_high"]), 4)],
            "level": float(row["level"]), "verdict": str(row["verdict"]), "seeds": int(row["seeds"]),
            "ablation_run_id": step.ablation.parent_run_id}


# ---------------------------------------------------------------------------
# The path plot


def path_plot(exp_id: str, steps: list[Step], metric: str) -> Figure:
    """The primary metric of each iteration along the path (mean over its seeds, 95% t-interval of the mean,
    descriptive), each arrow labelled with the step's paired effect and its repeated interval."""
    import matplotlib.pyplot as plt
    from scipy import stats

    points = []  # (label, values)
    for step in steps:
        base_id = label(exp_id, step.base)
        values = step.runs.loc[step.runs["variant"] == base_id, metric].to_numpy(float)
        points.append((base_id, values))
    last = steps[-1] if steps else None
    if last is not None and last.kept:
        kept_id = f"{label(exp_id, last.base)} +{last.kept}"
        points.append((kept_id, last.runs.loc[last.runs["variant"] == kept_id, metric].to_numpy(float)))
    figure, axes = plt.subplots(figsize=(max(6.5, 1.8 * len(points) + 2.0), 4.5))
    x = np.arange(len(points))
    means = np.array([100 * v.mean() if len(v) else np.nan for _, v in points])
    half = np.array([100 * stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v)) if len(v) > 1 else 0.0
                     for _, v in points])
    axes.errorbar(x, means, yerr=half, fmt="o-", color="tab:blue", capsize=4)
    for i, step in enumerate(steps):
        if step.kept and i + 1 < len(points):
            row = step.table[step.table["candidate"] == step.kept].iloc[0]
            axes.annotate(f"{_pp(row['effect'])} pp\n[{_pp(row['ci_low'])}, {_pp(row['ci_high'])}]",
                          ((x[i] + x[i + 1]) / 2, np.nanmean(means[i:i + 2])), ha="center", va="bottom", fontsize=8)
    names = [exp_id] + [f"+{s.kept}" for s in steps if s.kept]
    axes.set_xticks(x, names[:len(points)], rotation=15, ha="right")
    axes.set_ylabel(f"{metric.replace('_', ' ')} %\n(mean over seeds, 95% t-interval)", fontsize=9)
    axes.set_title(f"Forward selection from {exp_id}\neach step: paired effect, pp [repeated interval]", fontsize=10)
    figure.tight_layout()
    return figure


# ---------------------------------------------------------------------------
# The selection


def selection_name(exp_id: str, named: Sequence[str]) -> str:
    """What finds the selection's parent run again on a rerun: the start and the candidates asked for."""
    return f"{exp_id} select" + (" " + ",".join(named) if named else "")


def select(exp_id: str, *, candidates_named: Sequence[str] = (), overrides: dict[str, Any] | None = None,
           alpha: float = 0.05, metric: str = ablation_stats.PRIMARY_METRIC,
           min_effect_pp: float = 100 * ablation_stats.DEFAULT_MIN_EFFECT,
           max_seeds: int = ablation_stats.DEFAULT_MAX_SEEDS, budget_minutes: float | None = None,
           workers: int = 1, storage: str | None = None, fixed_split: bool = False,
           register: bool = False) -> SelectionResult:
    """Greedy forward selection from experiment `exp_id` (see the module's docstring). Everything asked is
    checked before anything is tracked or trained. `budget_minutes` (None: none): the CPU- or GPU-minutes of training
    (as each run measures them, `ablation_stats.compute_seconds`, summed over the distinct runs the steps used) after
    which no step or round starts."""
    from cifar_mlops.execution import queue
    from cifar_mlops.tracking import ablations, runs, selections, store

    overrides = dict(overrides or {})
    if budget_minutes is not None and not budget_minutes > 0:
        raise SelectionError(f"--budget must be a positive number of minutes (leave it out for none), got "
                             f"{budget_minutes:g}")
    ablation_stats.check_metric(metric)
    ablation_stats.check_min_effect(min_effect_pp)
    ablation_stats.SequentialDesign(max_seeds=max_seeds, alpha=alpha)  # checks --max-seeds and --alpha
    if workers < 1:
        raise SelectionError(f"--workers must be at least 1 (got {workers})")
    config = cfg.resolve(exp_id, overrides)
    cfg.check_kind(config, "train")  # an ensemble: one line, nothing trained
    pool, left_out = candidates(config, list(candidates_named))
    ablation.build_design(exp_id, "add-one", enhancements=pool, base=config.enhancements, overrides=overrides)
    name = selection_name(exp_id, list(candidates_named))
    settings = {"metric": metric, "alpha": alpha, "min_effect_pp": min_effect_pp, "max_seeds": max_seeds,
                "overrides": overrides}
    for line in left_out:
        log(f"left out by study {config.study}'s rules: {line}")

    store.quiet_mlflow()
    study = queue.open_queue(f"selection {name}", queue.absolute(storage))
    parent = f"parent run in {store.configure_store()}"
    run_id, experiment = selections.selection_run(name, {
        "start": exp_id, "candidates": ",".join(pool), "metric": metric, "alpha": alpha,
        "min_effect_pp": min_effect_pp, "max_seeds": max_seeds,
        "budget_minutes": "none" if budget_minutes is None else budget_minutes,
        "split": "fixed" if fixed_split else "data.seed = seed",
        "overrides": " ".join(f"{k}={v}" for k, v in overrides.items()) or "none"},
        agreed=lambda: queue.elect(study, parent, valid=runs.is_active),
        claim=lambda new: queue.elect(study, parent, new, valid=runs.is_active))
    log(f"selection {name!r}: {len(pool)} candidates ({', '.join(pool)}); parent run {run_id} in MLflow "
        f"experiment {experiment!r}")
    selected = {"selection": name, "run_id": run_id, **settings}

    steps: list[Step] = []
    kept: list[str] = []
    files: list[Path] = []
    fits: dict[str, dict[str, float]] = {}  # run id -> its fit times (ablation_stats.FIT_METRICS), every run used

    def used(run_ids=None) -> pd.DataFrame:  # the fit times of `run_ids` (default: every run the steps used)
        return pd.DataFrame([fits[r] for r in (fits if run_ids is None else run_ids) if r in fits],
                            columns=list(ablation_stats.FIT_METRICS))

    trained, stopped, registered = 0, "", ""
    # one bar over the whole selection: each step's ablation counts on it (`progress.Nested`), so its total grows
    # as the steps plan their runs and each line names the step
    bar = progress.open_bar("select", 0)
    try:
        remaining = list(pool)
        while True:
            spent = ablation_stats.compute_minutes(used())
            if not remaining:
                stopped = "no candidates left"
                break
            if budget_minutes is not None and spent >= budget_minutes:
                stopped = (f"the budget of {budget_minutes:g} minutes is spent ({spent:.1f} "
                           f"{ablation_stats.compute_unit(used())}); left "
                           f"undecided: {', '.join(remaining)}")
                break
            base = (*config.enhancements, *kept)
            allowance = 0.0
            if budget_minutes is not None:  # the step's ablation counts its base's runs, counted here already
                carried = steps[-1].runs.loc[steps[-1].runs["variant"] == label(exp_id, kept), "run_id"] \
                    if steps else []
                allowance = budget_minutes - spent + ablation_stats.compute_minutes(used(carried))
            number = len(steps) + 1
            log(f"step {number}: {label(exp_id, kept)} against {len(remaining)} candidate(s)")
            bar.set_section(f"step {number}")
            result = ablation.ablate(exp_id, "add-one", None, enhancements=remaining, overrides=overrides,
                                     alpha=alpha, workers=workers, storage=storage, metric=metric,
                                     fixed_split=fixed_split, min_effect_pp=min_effect_pp, max_seeds=max_seeds,
                                     budget_minutes=allowance, base=base, nested_in=run_id)
            selections.tag_step(result.parent_run_id, name, number)
            frame = ablations.csv_artifact(result.parent_run_id, "ablation_runs.csv")
            fits.update(selections.run_metrics(frame["run_id"], ablation_stats.FIT_METRICS))
            trained += result.trained
            table = step_table(result.effects, metric)
            step = Step(number, tuple(kept), result, table, kept_candidate(table),
                        table.loc[table["open"], "candidate"].tolist(), frame)
            steps.append(step)
            if step.kept is None:
                stopped = (f"no candidate helps by at least {min_effect_pp:g} pp" if not step.undecided else
                           f"the budget of {budget_minutes:g} minutes is spent; left undecided: "
                           f"{', '.join(step.undecided)}")
                break
            kept.append(step.kept)
            remaining.remove(step.kept)
            files.append(write_iteration(exp_id, config, kept, steps, selected,
                                         parent=files[-1].stem if files else exp_id))
            log(f"step {number}: kept {step.kept}; wrote {files[-1].name}")
        if register:
            bar.set_section("register")
            registered = _register(exp_id, files, overrides, run_id, name, bar)
        bar.close()
    except BaseException as err:
        bar.close()
        status, reason = runs.failure(err)
        selections.finish(run_id, status, tags=reason, figure=None, texts={})
        if isinstance(err, (UserError, KeyboardInterrupt)):
            err.add_note(f"selection {name!r}: rerun the same command to resume it (finished runs are reused)")
        raise

    outcome = SelectionResult(name, exp_id, run_id, experiment, store.configure_store(), steps, kept, files,
                              stopped, left_out, ablation_stats.compute_minutes(used()), len(fits), trained,
                              registered, settings=settings, fit_unit=ablation_stats.compute_unit(used()))
    _record(outcome, config.study, min_effect_pp, metric)
    return outcome


def _register(exp_id: str, files: list[Path], overrides: dict[str, Any], run_id: str, name: str,
              bar: progress.RunsBar) -> str:
    """Train the final iteration once (its own seed) nested under the selection and register its model; one more
    run on the selection's `bar`."""
    from cifar_mlops.tracking import selections
    from cifar_mlops.train import RunContext, train

    if not files:
        return "nothing was kept: no new iteration to register"
    final = files[-1].stem
    done = selections.model_training(run_id, final)
    if done:
        return f"{final} was trained and registered by an earlier run of this selection (run {done})"
    bar.add_total(1)
    bar.start(final)
    metrics = train(cfg.resolve(final, overrides), RunContext(parent_run_id=run_id, tags={
        selections.MODEL_TAG: final, selections.SELECTION_TAG: name}), register=True)
    bar.finished(final, metric_text(metrics))
    return f"{final} trained once and registered ({metric_text(metrics)})"


def metric_text(metrics: dict[str, float]) -> str:
    return f"test_accuracy {metrics.get('test_accuracy', float('nan')):.4f}"


def report_markdown(outcome: SelectionResult, study: str, min_effect_pp: float) -> str:
    """What the command prints and the parent run's description holds."""
    parts = [f"# Selection {outcome.name}", path_markdown(outcome.exp_id, outcome.steps)]
    for step in outcome.steps:
        parts += [f"## Step {step.number}: {label(outcome.exp_id, step.base)} + each candidate "
                  f"(ablation {step.ablation.design.name!r}: {step.ablation.trained} runs trained, "
                  f"{step.ablation.reused} reused)", step_markdown(step, min_effect_pp),
                  f"Kept: {step.kept or 'nothing'}."]
    parts.append(f"Stopped: {outcome.stopped}.")
    if outcome.left_out:
        parts.append(f"Left out by study {study}'s rules: " + "; ".join(outcome.left_out) + ".")
    if outcome.files:
        parts.append(f"Path: {' -> '.join([outcome.exp_id, *(f'+{k}' for k in outcome.kept)])}; the selected "
                     f"iteration is {outcome.final_id} (`cifar-mlops train --exp {outcome.final_id}`).")
    else:
        parts.append(f"Path: nothing kept; {outcome.exp_id} stays the best iteration found.")
    if outcome.registered:
        parts.append(f"Register: {outcome.registered}.")
    parts.append(f"Training time: {outcome.fit_minutes:.1f} {outcome.fit_unit}, summed over the {outcome.runs} "
                 f"distinct runs the steps used ({ablation_stats.COMPUTE_TIME}); "
                 f"{outcome.trained} of them trained by this command, {outcome.runs - outcome.trained} reused.")
    parts.append(WHAT_IT_SHOWS)
    return "\n\n".join(parts)


def steps_frame(outcome: SelectionResult) -> pd.DataFrame:
    """Every step's candidate rows, with the step number, base and ablation run: `selection_steps.csv`."""
    frames = [step.table.assign(step=step.number, base=label(outcome.exp_id, step.base),
                                kept=step.table["candidate"] == step.kept,
                                ablation_run_id=step.ablation.parent_run_id) for step in outcome.steps]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _record(outcome: SelectionResult, study: str, min_effect_pp: float, metric: str) -> None:
    from cifar_mlops import evaluation
    from cifar_mlops.tracking import selections

    document = report_markdown(outcome, study, min_effect_pp)
    figure = path_plot(outcome.exp_id, outcome.steps, metric) if outcome.steps else None
    selections.describe(outcome.run_id, document)
    try:
        selections.finish(outcome.run_id, "FINISHED", tags={
            "kept": ",".join(outcome.kept) or "none", "selected_iteration": outcome.final_id,
            "stopped": outcome.stopped, "fit_minutes": f"{outcome.fit_minutes:.2f}",
            "fit_minutes_measure": outcome.fit_unit, "runs_used": outcome.runs,
            "runs_trained": outcome.trained}, figure=figure,
            texts={"selection.md": document + "\n", "selection_steps.csv": steps_frame(outcome).to_csv(index=False)})
    finally:
        if figure is not None:
            evaluation.close({"selection_path": figure})
