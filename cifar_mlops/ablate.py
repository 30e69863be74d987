"""Ablations: variants generated from the catalogue, trained over paired seeds, effects with statistics.

`ablate(exp_id, design, seeds)` builds the design's variants, never written by hand:

- `leave-one-out`: the experiment, and the experiment without each of its enhancements;
- `add-one`: the experiment's `parent`, and the parent plus each enhancement of its study it lacks;
- `path`: the chain of iterations as the `parent:` links run (b0 -> ... -> b5), model refinements included;
- `variants`: the experiment and an explicit list of experiment ids, each compared with it.

Every (variant, seed) is an ordinary run of the same `train()`, nested under one parent run per
ablation in `cifar10-ablation`; seed k sets `train.seed = k` and `data.seed = k` for every variant (same split,
initialisation and shuffling; `--fixed-split` keeps the experiment's data.seed for every seed), so differences
pair by seed and the seeds sample both training randomness and the split. A (variant, seed) already FINISHED with
the same resolved config is reused, never retrained, so rerunning the command resumes it. The effect
of a change is metric(with it) - metric(without it); `ablation_stats` tests it.

The runs go through a queue (`execution.queue`, in `optuna.journal` beside the SQLite MLflow store unless
`--storage` names another): every process running the same ablation, worker processes (`--workers`) and
commands started at the same moment on this machine or another, agrees on one parent run and trains each
(variant, seed) once.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from cifar_mlops import ablation_stats, evaluation, progress
from cifar_mlops import config as cfg
from cifar_mlops.ablation_stats import Comparison
from cifar_mlops.errors import UserError
from cifar_mlops.progress import log

DESIGNS = ("leave-one-out", "add-one", "path", "variants")
COMPARED_METRICS = ("test_accuracy", "test_f1_macro", "val_accuracy", "val_f1_macro")


class AblationError(UserError):
    """An ablation that cannot be built as asked (no variants, an unknown enhancement, an ensemble, ...)."""

    exit_code = 2


@dataclass(frozen=True)
class Variant:
    """One arm of an ablation: an experiment, with its own enhancements or another list of them."""

    id: str  # e.g. "2.4", "2.4 -adamw", "2.3 +adamw", "b3"
    exp_id: str
    enhancements: tuple[str, ...] | None = None  # None: the experiment's own
    removed: str = ""
    added: str = ""

    def config(self, overrides: dict[str, Any], seed: int, fixed_split: bool = False) -> cfg.ExperimentConfig:
        """The variant's config at `seed`: train.seed = seed, and data.seed = seed unless the split is fixed."""
        seeded = {"train.seed": seed, **({} if fixed_split else {"data.seed": seed})}
        config = cfg.resolve(self.exp_id, {**overrides, **seeded}, enhancements=self.enhancements)
        cfg.check_kind(config, "train")
        return config


@dataclass
class Design:
    name: str  # what the ablation is called in its tags, e.g. "2.4 leave-one-out"
    variants: list[Variant]
    comparisons: list[Comparison]
    skipped: list[str] = field(default_factory=list)  # changes that could not be made, with the reason


def build_design(exp_id: str, design: str, *, enhancements: Sequence[str] = (), variants: Sequence[str] = (),
                 overrides: dict[str, Any] | None = None, base: Sequence[str] | None = None) -> Design:
    """The variants and comparisons of `design` on experiment `exp_id`, each checked to resolve. `base` (add-one
    only): add to experiment `exp_id` itself with these enhancements instead of to its parent (`select`'s steps)."""
    overrides = overrides or {}
    if design not in DESIGNS:
        raise AblationError(f"unknown design {design!r}; choose one of {', '.join(DESIGNS)}")
    reference = Variant(exp_id, exp_id)
    cfg.check_kind(cfg.resolve(exp_id, overrides), "train")  # an ensemble's members are trained apart
    config = reference.config(overrides, 0)
    named = list(enhancements)
    catalogue = cfg.load_enhancements()
    unknown = [name for name in named if name not in catalogue]
    if unknown:
        raise AblationError(f"unknown enhancement {unknown[0]!r}; known: {', '.join(catalogue)}")

    if design == "leave-one-out":
        foreign = [name for name in named if name not in config.enhancements]
        if foreign:
            raise AblationError(f"{exp_id} does not use enhancement {foreign[0]!r} (it uses "
                                f"{', '.join(config.enhancements) or 'none'}): there is nothing to leave out")
        candidates = [Variant(f"{exp_id} -{name}", exp_id, tuple(e for e in config.enhancements if e != name),
                              removed=name) for name in (named or config.enhancements)]
        comparisons = [Comparison(v.removed, reference.id, v.id) for v in candidates]
        arms = [reference, *candidates]
    elif design == "add-one":
        if not config.parent and base is None:
            raise AblationError(f"{exp_id} has no parent: add-one adds enhancements to the iteration it builds on")
        start = Variant(config.parent, config.parent) if base is None else Variant(
            exp_id + "".join(f" +{name}" for name in base if name not in config.enhancements), exp_id, tuple(base))
        parent = start.config(overrides, 0)
        study = [name for name, entry in catalogue.items() if config.study in entry.get("studies", [])]
        added = named or [name for name in study if name not in parent.enhancements]
        candidates = [Variant(f"{start.id} +{name}", start.exp_id, (*parent.enhancements, name), added=name)
                      for name in added if name not in parent.enhancements]
        comparisons = [Comparison(v.added, v.id, start.id) for v in candidates]
        arms = [start, *candidates]
    elif design == "path":
        chain = [exp_id]
        while (parent_id := cfg.resolve(chain[0]).parent) is not None and parent_id not in chain:
            chain.insert(0, parent_id)
        arms = [Variant(step, step) for step in chain]
        comparisons = [Comparison(f"{before.id} -> {after.id}", after.id, before.id)
                       for before, after in zip(arms, arms[1:])]
    else:  # variants
        if not variants:
            raise AblationError("--design variants compares --exp with the experiments of --variants ID,ID; give some")
        candidates = [Variant(other, other) for other in variants if other != exp_id]
        comparisons = [Comparison(f"{v.id} vs {exp_id}", v.id, exp_id) for v in candidates]
        arms = [reference, *candidates]

    skipped, usable = [], []
    for variant in arms:
        try:
            variant.config(overrides, 0)
            usable.append(variant)
        except cfg.ConfigError as err:
            change = variant.removed or variant.added or variant.id
            skipped.append(f"{change}: skipped, the variant {variant.id!r} does not resolve ({err})")
    ids = {v.id for v in usable}
    comparisons = [c for c in comparisons if c.with_ in ids and c.without in ids]
    if not comparisons:
        reason = "; ".join(skipped) or f"{exp_id} has {'no enhancements' if design != 'path' else 'no parent'}"
        raise AblationError(f"the {design} design of {exp_id} has no variants to compare ({reason})")
    # the name finds the parent run again on a rerun: it says which changes were asked for
    chosen = ",".join(variants if design == "variants" else named)
    what = design if base is None else f"{design} from {arms[0].id}"
    return Design(f"{exp_id} {what}{f' {chosen}' if chosen else ''}", usable, comparisons, skipped)


@dataclass
class AblationResult:
    design: Design
    parent_run_id: str
    experiment: str
    tracking_uri: str
    summary: pd.DataFrame  # one row per variant: mean and std over seeds
    effects: pd.DataFrame  # one row per (comparison, metric): ablation_stats.effects
    trained: int = 0
    reused: int = 0
    seed_sources: str = ""  # which sources of variance each seed changes (`seed_sources`)
    noise: pd.DataFrame = field(default_factory=pd.DataFrame)  # where the noise comes from: ablation_stats.noise_table
    comparisons: pd.DataFrame = field(default_factory=pd.DataFrame)  # ablation_stats.comparison_summary


def config_digest(config: cfg.ExperimentConfig) -> str:
    """What says two runs trained the same thing: the resolved config, as it is logged."""
    return hashlib.sha256(cfg.to_yaml(config).encode()).hexdigest()


@dataclass
class AblationSpec:
    """What a run of the ablation is: the command's arguments (also what a worker process is given)."""

    exp_id: str
    design: str
    seeds: list[int]
    enhancements: list[str] = field(default_factory=list)
    variants: list[str] = field(default_factory=list)
    overrides: dict[str, Any] = field(default_factory=dict)
    register: bool = False
    storage: str | None = None  # the queue's storage (None: optuna.journal beside the SQLite MLflow store)
    fixed_split: bool = False  # True: data.seed stays the experiment's, every seed trains on the same split
    parent_run_id: str = ""
    base: list[str] | None = None  # add-one from the experiment itself with these enhancements (`build_design`)

    def run(self) -> int:
        return run_worker(self)


class Ablation:
    """The (variant, seed) tasks of one ablation, and training the ones not yet FINISHED in its parent run."""

    def __init__(self, spec: AblationSpec, plan: Design) -> None:
        self.spec, self.plan = spec, plan
        self.tasks = {f"{v.id}|{seed}": (v, seed) for seed in spec.seeds for v in plan.variants}  # seed-major
        self.elsewhere = None  # the store's FINISHED runs by config digest (`finished`), read on first use
        self.digests: dict[str, str] = {}  # task -> its config's digest (resolving costs ~50 ms a config)

    def config(self, task: str) -> cfg.ExperimentConfig:
        variant, seed = self.tasks[task]
        return variant.config(self.spec.overrides, seed, self.spec.fixed_split)

    def finished(self) -> dict[str, dict[str, Any]]:
        """task -> its FINISHED run (tags, metrics), for the tasks whose run trained the same resolved config: its
        own nested run, else one anywhere in the store's ablation experiment with the same config digest (another
        ablation's, a `select` step's): a (configuration, seed) is trained once per store."""
        from cifar_mlops.tracking import ablations

        by_key = {(c["tags"].get("variant"), c["tags"].get("seed"), c["tags"].get("config_sha256")): c
                  for c in ablations.finished_children(self.spec.parent_run_id)}
        if self.elsewhere is None:
            self.elsewhere = ablations.FinishedByDigest(self.spec.parent_run_id)
            self.digests = {task: config_digest(self.config(task)) for task in self.tasks}
        digests = self.digests
        anywhere = self.elsewhere.find(set(digests.values()))
        found = {}
        for task, (variant, seed) in self.tasks.items():
            child = by_key.get((variant.id, str(seed), digests[task])) or anywhere.get(digests[task])
            if child is not None:
                found[task] = child
        return found

    def is_done(self, task: str) -> bool:
        return task in self.finished()

    def work(self, task: str, bar: progress.RunsBar | None = None) -> None:
        """Train `task` as a nested run of the ablation, unless another process has meanwhile; tell `bar` (the
        command's progress bar; a worker process has none and logs a line)."""
        from cifar_mlops.train import RunContext, train

        if self.is_done(task):
            return
        variant, seed = self.tasks[task]
        if bar is not None:
            bar.start(f"{variant.id} seed {seed}")
        config = self.config(task)
        tags = {"ablation": self.plan.name, "variant": variant.id, "seed": seed, "config_sha256": config_digest(config),
                "mlflow.runName": f"{variant.id} seed {seed}",
                **({"removed": variant.removed} if variant.removed else {}),
                **({"added": variant.added} if variant.added else {})}
        metrics = train(config, RunContext(parent_run_id=self.spec.parent_run_id, tags=tags),
                        register=self.spec.register)
        if bar is not None:
            bar.finished(f"{variant.id} seed {seed}", f"test_accuracy={metrics['test_accuracy']:.4f}")
            return
        left = len(self.tasks) - len(self.finished())
        log(f"[{len(self.tasks) - left}/{len(self.tasks)}] {variant.id} seed {seed}: "
            f"test_accuracy={metrics['test_accuracy']:.4f}; {left} run{'s' if left != 1 else ''} left")

    def metrics(self) -> pd.DataFrame:
        """The FINISHED tasks' metrics so far, one row each (variant, seed, run_id, COMPARED_METRICS and the fit
        times, `ablation_stats.FIT_METRICS`, NaN where a run did not log one), in task order: what a round of
        `--seeds auto` is decided on."""
        finished = self.finished()
        fit_times = ablation_stats.FIT_METRICS
        return pd.DataFrame([{"variant": variant.id, "seed": seed, "run_id": finished[task]["run_id"],
                              **{key: float(finished[task]["metrics"][key]) for key in COMPARED_METRICS},
                              **{key: float(finished[task]["metrics"].get(key, np.nan)) for key in fit_times}}
                             for task, (variant, seed) in self.tasks.items() if task in finished],
                            columns=["variant", "seed", "run_id", *COMPARED_METRICS, *fit_times])

    def results(self, tasks: Sequence[str] | None = None
                ) -> tuple[pd.DataFrame, dict[tuple[str, int], np.ndarray], dict[int, np.ndarray]]:
        """The metrics of `tasks` (default: every task; one row each), their predicted label per test image, and
        each seed's test labels (the variants of one seed are scored on the same images; with data.seed = seed,
        seeds may differ)."""
        from cifar_mlops.tracking import ablations

        finished = self.finished()
        tasks = list(self.tasks) if tasks is None else list(tasks)
        missing = [task for task in tasks if task not in finished]
        if missing:
            raise AblationError(f"{len(missing)} run(s) of ablation {self.plan.name!r} did not finish "
                                f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); "
                                "rerun the same command to run them")
        rows, predictions, labels = [], {}, {}
        for task in tasks:
            variant, seed = self.tasks[task]
            child = finished[task]
            table = ablations.csv_artifact(child["run_id"], evaluation.TEST_PREDICTIONS)
            if table is None:
                raise AblationError(f"run {child['run_id']} ({variant.id} seed {seed}) has no "
                                    f"{evaluation.TEST_PREDICTIONS}; delete it and rerun the ablation to retrain it")
            table = table.sort_values("test_index")
            pairs = table[["test_index", "label"]].to_numpy()
            if not np.array_equal(labels.setdefault(seed, pairs), pairs):
                raise AblationError(f"{variant.id} seed {seed} was tested on other images than the first run of "
                                    f"seed {seed}; an ablation pairs runs on the same test images (same data settings)")
            predictions[(variant.id, seed)] = table["predicted"].to_numpy()
            rows.append({"variant": variant.id, "seed": seed, "run_id": child["run_id"],
                         **{key: float(child["metrics"][key]) for key in COMPARED_METRICS}})
        return pd.DataFrame(rows), predictions, {seed: pairs[:, 1] for seed, pairs in labels.items()}


def ablate(exp_id: str, design: str, seeds: Sequence[int] | None, *, enhancements: Sequence[str] = (),
           variants: Sequence[str] = (), overrides: dict[str, Any] | None = None, alpha: float = 0.05,
           register: bool = False, workers: int = 1, storage: str | None = None, metric: str = "test_accuracy",
           fixed_split: bool = False, min_effect_pp: float = 100 * ablation_stats.DEFAULT_MIN_EFFECT,
           max_seeds: int = ablation_stats.DEFAULT_MAX_SEEDS, budget_minutes: float = 0.0,
           base: Sequence[str] | None = None, nested_in: str | None = None) -> AblationResult:
    """Train (or reuse) every (variant, seed) of the ablation, then test each change's effect.

    seeds None (`--seeds auto`): seeds in rounds (`ablation_stats.sequential_step`): every variant gets the first
    look's seeds, then only the variants of comparisons still open get the next look's, until every comparison is
    decided or at `max_seeds`, or what the runs' training consumed passes `budget_minutes` (0: no budget): their CPU-
    or GPU-minutes as each run measures them (`ablation_stats.compute_seconds`), summed over the ablation's runs,
    wherever they ran. A rerun replays the rounds on the finished runs.
    The runs go through the ablation's queue (`execution.queue.run_queue`, in `storage`), shared by `workers`
    processes on this machine and by the same command started anywhere else on the same storage.
    `base`: see `build_design`; `nested_in`: a run the ablation's parent run is nested under (a `select` step's)."""
    from cifar_mlops.execution import queue
    from cifar_mlops.execution.workers import worker_args
    from cifar_mlops.tracking import ablations, runs, store

    auto = seeds is None
    if budget_minutes and not auto:
        raise AblationError("--budget goes with --seeds auto (a fixed list of seeds trains them all)")
    if budget_minutes < 0:
        raise AblationError(f"--budget must be a number of minutes >= 0 (0: none), got {budget_minutes:g}")
    sequential = ablation_stats.SequentialDesign(max_seeds=max_seeds, alpha=alpha)  # checks --max-seeds, --alpha
    spec = AblationSpec(exp_id, design, list(range(max_seeds)) if auto else list(seeds), list(enhancements),
                        list(variants), dict(overrides or {}), register, queue.absolute(storage),
                        fixed_split=fixed_split, base=None if base is None else list(base))
    ablation_stats.check_seeds(spec.seeds)
    ablation_stats.check_metric(metric)
    ablation_stats.check_min_effect(min_effect_pp)
    if not 0 < alpha < 1:
        raise AblationError(f"--alpha must be in (0, 1), got {alpha}")
    if workers < 1:
        raise AblationError(f"--workers must be at least 1 (got {workers})")
    plan = build_design(exp_id, design, enhancements=enhancements, variants=variants, overrides=spec.overrides,
                        base=spec.base)
    for line in plan.skipped:
        log(line)
    store.quiet_mlflow()
    study = queue.open_queue(queue_name(plan), spec.storage)
    parent = f"parent run in {store.configure_store()}"  # one per MLflow store the queue serves
    spec.parent_run_id, experiment = ablations.ablation_run(plan.name, {
        "ablation_of": exp_id, "design": design,
        "seeds": f"auto (at most {max_seeds})" if auto else ",".join(map(str, seeds)),
        "variants": " | ".join(v.id for v in plan.variants), "split": "fixed" if fixed_split else "data.seed = seed",
        "overrides": " ".join(f"{k}={v}" for k, v in spec.overrides.items()) or "none",
        **({"mlflow.parentRunId": nested_in} if nested_in else {})},
        agreed=lambda: queue.elect(study, parent, valid=runs.is_active),
        claim=lambda run_id: queue.elect(study, parent, run_id, valid=runs.is_active))
    ablation = Ablation(spec, plan)

    bar, asked = progress.open_bar("ablate", 0), set()  # one bar over every round: the runs asked for so far

    def run(tasks: list[str]) -> int:
        pending = [task for task in tasks if not ablation.is_done(task)]
        new = [task for task in tasks if task not in asked]
        asked.update(new)
        bar.add_total(len(new))
        bar.reused(len(set(new) - set(pending)))
        if pending:
            before = bar.done  # with worker processes, the bar counts what the queue reports done

            def polled(done: int, running: list[str]) -> None:
                bar.set_done(before + done, [f"{ablation.tasks[t][0].id} seed {ablation.tasks[t][1]}" for t in running])

            failures = queue.run_queue(queue_name(plan), spec.storage, pending, lambda task: ablation.work(task, bar),
                                       ablation.is_done, study=study, tracking_uri=store.configure_store(),
                                       workers=[worker_args(spec)] * workers if workers > 1 else [], on_progress=polled)
            for failure in failures:
                log(f"{failure}; its run was picked up by another process")
            finished = ablation.finished()  # with the runs that other commands on the same queue trained
            bar.set_done(before + sum(task in finished for task in pending))
        return len(pending)

    state, figure = None, None
    try:
        if auto:
            wanted, trained = [f"{v.id}|{seed}" for seed in range(sequential.looks[0]) for v in plan.variants], 0
            log(f"ablation {plan.name!r}: {len(plan.variants)} variants, seeds in rounds (looks at "
                f"{', '.join(map(str, sequential.looks))} seeds); parent run {spec.parent_run_id} in MLflow "
                f"experiment {experiment!r}")
            while True:
                trained += run(wanted)
                so_far = ablation.metrics()
                state = ablation_stats.sequential_step(so_far, plan.comparisons, sequential, metric=metric,
                                                       min_effect=min_effect_pp / 100)
                minutes, unit = ablation_stats.compute_minutes(so_far), ablation_stats.compute_unit(so_far)
                decided = ", ".join(f"{r.effect}: {r.verdict} ({r.status}, {r.n_seeds} seeds)"
                                    for r in state.table.itertuples())
                log(f"round at {max(so_far.groupby('variant')['seed'].nunique())} seeds: {decided}; "
                    f"{minutes:.1f} {unit}")
                if state.done:
                    break
                if budget_minutes and minutes >= budget_minutes:
                    log(f"--budget {budget_minutes:g} minutes spent ({minutes:.1f} {unit}): the open comparisons stay "
                        "inconclusive; rerun with a larger --budget to go on")
                    break
                wanted = [f"{v}|{seed}" for seed in range(state.next_seeds) for v in state.needs_seeds]
            ran = [task for task in ablation.tasks if task in set(ablation.finished())]
            reused = len(ran) - trained
        else:
            log(f"ablation {plan.name!r}: {len(plan.variants)} variants x {len(seeds)} seeds = "
                f"{len(ablation.tasks)} runs; parent run {spec.parent_run_id} in MLflow experiment {experiment!r}")
            ran = list(ablation.tasks)
            trained = run(ran)
            reused = len(ran) - trained
        frame, predictions, labels = ablation.results(ran)
        bar.close()

        summary = ablation_stats.variant_summary(frame)
        effects = ablation_stats.effects(frame, plan.comparisons, predictions, labels, alpha=alpha, metric=metric,
                                         min_effect=min_effect_pp / 100)
        if state is not None:
            effects = ablation_stats.with_sequential_verdicts(effects, state, sequential)
        figure = ablation_stats.forest_plot(effects, min_effect=min_effect_pp / 100)
        reference = plan.variants[0].config(spec.overrides, 0, fixed_split)
        sources = seed_sources(reference, fixed_split)
        noise = ablation_stats.noise_table(frame, plan.comparisons, predictions, labels, alpha=alpha,
                                           same_images=same_test_images(reference, fixed_split))
        fit = ablation.metrics()
        compared = ablation_stats.comparison_summary(effects, noise, fit)
        verdicts = "\n\n".join([f"# Ablation {plan.name}", sources, ablation_stats.comparison_markdown(compared),
                                 ablation_stats.noise_markdown(noise)])
        document = "\n\n".join([verdicts, variants_markdown(summary), ablation_stats.effects_markdown(effects),
                                 ablation_stats.image_level_markdown(effects), *plan.skipped])
        used = fit[fit["run_id"].isin(frame["run_id"])]
        tags, metrics = ablations.comparison_record(
            compared, verdicts + "\n\nThe whole tables: `ablation.md`.", ablation_stats.compute_minutes(used),
            ablation_stats.compute_measure(used, "the ablation's runs"))
        runs.finish_run(spec.parent_run_id, "FINISHED", tags={"runs_trained": trained, "runs_reused": reused, **tags},
                        metrics=metrics, figures={"forest_plot": figure},
                        texts={"ablation.md": document + "\n", "ablation_effects.csv": effects.to_csv(index=False),
                               "ablation_runs.csv": frame.to_csv(index=False),
                               "ablation_variants.csv": summary.to_csv(index=False),
                               "ablation_noise.csv": noise.to_csv(index=False),
                               "ablation_comparisons.csv": compared.to_csv(index=False)})
    except BaseException as err:
        bar.close()
        status, reason = runs.failure(err)
        runs.finish_run(spec.parent_run_id, status, tags=reason, metrics={}, figures={}, texts={})
        if isinstance(err, (UserError, KeyboardInterrupt)):
            err.add_note(f"ablation {plan.name!r}: rerun the same command to resume it (finished runs are reused)")
        raise
    finally:
        if figure is not None:
            evaluation.close({"forest_plot": figure})
    return AblationResult(plan, spec.parent_run_id, experiment, store.configure_store(), summary, effects,
                          trained=trained, reused=reused, seed_sources=sources, noise=noise, comparisons=compared)


def seed_sources(config: cfg.ExperimentConfig, fixed_split: bool) -> str:
    """One line: which sources of variance a seed changes (what the verdicts generalise over), for `config`."""
    changed = ["the weights' initialisation, the batch order and the augmentation draws (train.seed = seed)"]
    if fixed_split:
        fixed = (f"the split is fixed (data.seed = {config.data.seed}, --fixed-split): every seed trains on the "
                 "same images, so the verdicts hold for that one training subset")
    else:
        split = "which training images are held out for validation"
        if config.data.source == "synthetic":
            split += ", and the generated images themselves (train and test)"
        elif config.data.test_size is not None:
            split += f", and which {config.data.test_size} test images are scored"
        changed.append(f"{split} (data.seed = seed)")
        fixed = "the variants of one seed share all of it, so the differences pair by seed"
    return f"Each seed changes {' and '.join(changed)}; {fixed}."


def same_test_images(config: cfg.ExperimentConfig, fixed_split: bool) -> bool:
    """Whether every seed scores the same test images: the split fixed, or real images with no data.test_size (the
    whole test set); synthetic images and a data.test_size draw follow data.seed = seed (`seed_sources`)."""
    return fixed_split or (config.data.source != "synthetic" and config.data.test_size is None)


def queue_name(plan: Design) -> str:
    return f"ablation {plan.name}"


def run_worker(spec: AblationSpec) -> int:
    """One worker process of `ablate --workers K`: run the ablation's queued tasks; return how many."""
    from cifar_mlops.execution import queue
    from cifar_mlops.tracking import store

    store.quiet_mlflow()
    plan = build_design(spec.exp_id, spec.design, enhancements=spec.enhancements, variants=spec.variants,
                        overrides=spec.overrides, base=spec.base)
    return queue.drain(queue.open_queue(queue_name(plan), spec.storage), Ablation(spec, plan).work)


def variants_text(summary: pd.DataFrame) -> pd.DataFrame:
    """Each variant's mean ± std over seeds (percent), as text cells."""
    def cell(row: pd.Series, metric: str) -> str:
        mean, std = row[f"{metric}_mean"] * 100, row[f"{metric}_std"] * 100
        return f"{mean:.2f}" if pd.isna(std) else f"{mean:.2f} ± {std:.2f}"

    return pd.DataFrame({"variant": summary["variant"], "seeds": summary["n_seeds"].astype(str),
                         **{f"{metric} %": [cell(row, metric) for _, row in summary.iterrows()]
                            for metric in COMPARED_METRICS}})


def variants_markdown(summary: pd.DataFrame) -> str:
    """`variants_text` as a markdown table."""
    return variants_text(summary).to_markdown(index=False, disable_numparse=True)
