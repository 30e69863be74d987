"""`cifar-mlops`: thin click commands: parse, call, print.

One error boundary (`_Commands.invoke`): a `UserError` from anywhere becomes one
line on stderr and its exit code, Ctrl-C exits 130, and anything else is a bug
that keeps its traceback. Heavy libraries are imported only inside the commands
that need them (`process.heavy_imports`), so `--help` and `experiments` answer
at once; option choices are read from the modules that own them.
"""

from __future__ import annotations

import importlib
import os
import sys
import time

import click
from tabulate import tabulate

from cifar_mlops import backend, progress
from cifar_mlops import config as cfg
from cifar_mlops.errors import UserError
from cifar_mlops.process import heavy_imports


def fail(message: str, code: int) -> None:
    """Print a one-line error and exit non-zero (no traceback)."""
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def one_line(err: BaseException, default: str = "") -> str:
    """The error's message and its notes (e.g. what became of the run), as one line."""
    notes = "; ".join(getattr(err, "__notes__", ()))
    text = str(err) or default
    return f"{text} ({notes})" if notes else text


def _end_adopted_run(reason: str, err: UserError | None = None) -> None:
    """A command that fails before adopting the run `mlflow run` created for it ends that run FAILED
    (not a run whose resume was refused: refusing changes nothing)."""
    if not os.environ.get("MLFLOW_RUN_ID") or getattr(err, "run_id", None) == os.environ["MLFLOW_RUN_ID"]:
        return
    from cifar_mlops.tracking import runs

    try:
        runs.fail_adopted_run(reason)
    except UserError:  # the store itself is what failed: nothing can be recorded there
        pass


class _Commands(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except UserError as err:
            _end_adopted_run(one_line(err), err)
            fail(one_line(err), err.exit_code)
        except KeyboardInterrupt as err:
            fail(one_line(err, "interrupted"), 130)
        except Exception as err:
            refused = _refused_by_server(err)
            if refused is None:
                raise  # a bug: its traceback
            _end_adopted_run(one_line(refused), refused)
            fail(one_line(refused), refused.exit_code)


def _refused_by_server(err: Exception) -> UserError | None:
    """A team server's 401/403 (or 5xx) that no command turned into its own line yet."""
    if "mlflow" not in sys.modules:
        return None
    from cifar_mlops.tracking import store

    return store.refusal(err) or store.server_failure(err)


class ChoiceOf(click.Choice):
    """`click.Choice` over the tuple `module.NAME` declares, read when first needed (parsing, `--help`):
    those modules import MLflow or Optuna, which `cifar-mlops --help` must not pay for."""

    def __init__(self, module: str, name: str) -> None:  # no super().__init__: `choices` is computed
        self.owner = (module, name)
        self.case_sensitive = True

    @property
    def choices(self) -> tuple[str, ...]:
        module, name = self.owner
        return tuple(getattr(importlib.import_module(module), name))


def text_table(rows: list[dict], markdown: bool = False) -> str:
    """Rows as an aligned text table (GitHub markdown when `markdown`), cells printed as given
    (tabulate, what pandas' `to_markdown` uses, without pandas' import time)."""
    return tabulate(rows, headers="keys", tablefmt="github" if markdown else "plain", disable_numparse=True)


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="cifar-mlops", prog_name="cifar-mlops")
@click.option("--backend", "backend_name", type=click.Choice(backend.BACKENDS), envvar="KERAS_BACKEND",
              show_envvar=True, help=f"The Keras backend of this command and the workers it starts [default: {backend.DEFAULT}].")
def main(backend_name: str | None) -> None:
    """Reproduce, track and compare CIFAR-10 ablation experiments (MLflow + Keras + Optuna)."""
    if backend_name:
        backend.select(backend_name)


@main.command()
@click.option("--models", "show_models", is_flag=True, help="List the registered model factories instead.")
def experiments(show_models: bool) -> None:
    """The catalogue: each study's enhancement table and each iteration's key settings."""
    from cifar_mlops import models

    if show_models:
        entries = [models.get_model_entry(name) for name in models.list_models()]
        click.echo(text_table([{"model": e.name, "registered as": f"cifar10-{e.family}",
                                "description": e.description} for e in entries]))
        return
    resolved = [cfg.resolve(exp_id) for exp_id in cfg.list_experiments()]
    for study, title in cfg.STUDY_TITLES.items():
        ids, matrix = cfg.study_enhancement_matrix(study, resolved)
        click.echo(f"\n{title}\n")
        click.echo(text_table([{"Enhancement": label, **{i: "✔" if u else "" for i, u in zip(ids, used)}}
                               for label, used in matrix], markdown=True))
    click.echo("\nIterations (resolved settings)\n")
    click.echo(text_table([_settings_row(c) for c in resolved]))
    click.echo("\nDetails: experiments/<id>.yaml and experiments/enhancements.yaml; "
               "train one with `cifar-mlops train --exp <id>`.")


def _settings_row(c: cfg.Config) -> dict[str, str]:
    if c.kind == "ensemble":
        members = " + ".join(f"{m.registered_model}@{m.exp_id or m.alias or m.version}" for m in c.members)
        return {"id": c.exp_id, "model": "ensemble", "data": f"{c.voting} vote", "description": members}
    d, m, t = c.data, c.model, c.train
    weights = f"+{m.weights if m.weights == 'imagenet' else 'file'}" if m.weights else ""
    return {"id": c.exp_id, "model": m.name + weights, "px": str(m.image_size), "epochs": str(t.epochs),
            "batch": str(t.batch_size), "optimizer": t.optimizer, "lr": f"{t.learning_rate:g}",
            "data": f"{d.source} {d.split} {d.train_size or 'rest'}/{d.val_size}", "description": c.description}


def _options(*options):
    """Several click options as one decorator, in the order given."""
    def decorate(command):
        for option in reversed(options):
            command = option(command)
        return command

    return decorate


def _override_options(set_example: str):
    """`--set`, `--overrides` and `--data-dir`: how every command that resolves experiments changes them
    (the MLproject entry points take `overrides` and `data_dir`)."""
    return _options(
        click.option("--set", "set_pairs", multiple=True, metavar="KEY=VALUE",
                     help=f"Override a setting, e.g. --set {set_example} (repeatable; wins over the experiment file)."),
        click.option("--overrides", default="", metavar="'K=V K=V'",
                     help="The same overrides as one space- or comma-separated string (the MLproject parameter)."),
        click.option("--data-dir", default="", type=click.Path(file_okay=False),
                     help="An existing cifar-10-batches-py folder (default: $CIFAR10_DIR, else download and cache)."),
    )


def _override_values(set_pairs: tuple[str, ...], overrides: str, data_dir: str) -> dict:
    """What `_override_options` say, as dotted overrides."""
    values = cfg.parse_overrides([*cfg.split_overrides(overrides), *set_pairs])
    if data_dir:
        values.setdefault("data.data_dir", data_dir)
    return values


def _experiment_options(exp_help: str, set_example: str, register_help: str, exp_required: bool = True):
    """The options `train` and `ensemble` share (the MLproject entry points mirror them)."""
    return _options(
        click.option("--exp", "exp_id", required=exp_required, default=None if exp_required else "", help=exp_help),
        _override_options(set_example),
        click.option("--register/--no-register", default=True, show_default=True, help=register_help),
    )


# What `ablate` and `select` (whose steps are ablations) share: the verdicts' metric and how the runs are shared.
_PRIMARY_METRIC = click.option(
    "--metric", default="test_accuracy", show_default=True,
    help="The primary metric, the one the verdicts are about (test_accuracy, test_f1_macro, val_accuracy, "
         "val_f1_macro); the others are shown, descriptive.")
_PAIRED_RUNS = _options(
    click.option("--fixed-split/--seeded-split", default=False, show_default=True,
                 help="--seeded-split: seed k also draws the train/validation split (data.seed = k); --fixed-split: "
                      "every seed trains on the experiment's one split (the verdicts then hold for that split)."),
    click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
                 help="Worker processes on this machine sharing the runs (one GPU each when GPUs are visible)."),
    click.option("--storage", default="", metavar="URL",
                 help="The runs' queue, shared by every process and machine running the same command: "
                      "postgresql://..., or a journal file (default: optuna.journal beside a SQLite MLflow store, "
                      "else ./optuna.journal)."))
_VERBOSE = click.option("--verbose", type=click.BOOL, is_flag=False, flag_value=True, default=False, metavar="[BOOL]",
                        help="Each run's own lines too, Keras's per epoch included (off under the command's "
                             "progress bar).")


@main.command()
@_experiment_options("Experiment id from the catalogue, e.g. 2.4 or smoke (with --resume: optional, must be the run's).",
                     "train.epochs=5", "Register the trained model as a new version of cifar10-<family>.",
                     exp_required=False)
@click.option("--seeds", default="", metavar="N|S,S,...",
              help="Train once per seed (train.seed): 0..N-1, or a list (default: the experiment's own seed).")
@click.option("--resume", "resume_id", default="", metavar="RUN_ID",
              help="Go on with training run RUN_ID from its last checkpoint, in that run, with its own config.")
@click.option("--force", type=click.BOOL, is_flag=False, flag_value=True, default=False, metavar="[BOOL]",
              help="With --resume: resume a FAILED run too (never a RUNNING one whose process may still be alive).")
@_VERBOSE
def train(exp_id: str, set_pairs: tuple[str, ...], overrides: str, data_dir: str, register: bool, seeds: str,
          resume_id: str, force: bool, verbose: bool) -> None:
    """Train, evaluate, track and register one experiment (or resume a lost training: --resume)."""
    pairs = [*cfg.split_overrides(overrides), *set_pairs]
    if (resume_id.strip() or os.environ.get("MLFLOW_RUN_ID")) and _resume(resume_id.strip(), exp_id, pairs,
                                                                          data_dir, register, seeds, force):
        return
    if force:
        raise cfg.ConfigError("--force goes with --resume RUN_ID")
    if not exp_id:
        raise cfg.ConfigError("give --exp ID (an experiment of `cifar-mlops experiments`), or --resume RUN_ID")
    _run_experiment("train", exp_id, pairs, data_dir, register, cfg.parse_seeds(seeds) if seeds.strip() else None,
                    verbose)


def _resume(resume_id: str, exp_id: str, pairs: list[str], data_dir: str, register: bool, seeds: str,
            force: bool) -> bool:
    """`train --resume RUN_ID`, and `mlflow run --run-id RUN_ID` of a training run (its run holds one already);
    False when `mlflow run` gave a new run, which trains as usual."""
    if seeds.strip() and resume_id:
        raise cfg.ConfigError("--resume goes on with one run; it does not combine with --seeds")
    values = cfg.parse_overrides(pairs)
    if data_dir:
        values.setdefault("data.data_dir", data_dir)
    with heavy_imports():
        import keras  # noqa: F401  (imported here, to be frozen)

        from cifar_mlops import train as training
        from cifar_mlops.tracking import runs, store

    store.quiet_mlflow()
    adopted = runs.adopted_run_id()
    if adopted and resume_id and resume_id != adopted:
        raise runs.ResumeRefused(f"`mlflow run` made run {adopted} for this command; to resume run {resume_id} "
                                 f"through MLflow Projects, pass --run-id {resume_id} to `mlflow run` instead", resume_id)
    if adopted and not resume_id:
        if not runs.is_training_run(adopted):
            return False
        if seeds.strip():
            raise cfg.ConfigError("--resume goes on with one run; it does not combine with --seeds")
    metrics = training.resume(resume_id or adopted, force=force, exp_id=exp_id or None, overrides=values,
                              register=register)
    click.echo(" ".join(f"{k}={v:.4f}" for k, v in metrics.items() if k.startswith(("val_", "test_"))))
    return True


@main.command()
@_experiment_options("An ensemble experiment id, e.g. 3.2 or smoke-ensemble.", "fit_weights=true",
                     "Register the ensemble as a new version of cifar10-ensemble.")
def ensemble(exp_id: str, set_pairs: tuple[str, ...], overrides: str, data_dir: str, register: bool) -> None:
    """Soft-vote registered model versions; evaluate, track and register the ensemble."""
    _run_experiment("ensemble", exp_id, [*cfg.split_overrides(overrides), *set_pairs], data_dir, register)


def _run_experiment(kind: str, exp_id: str, pairs: list[str], data_dir: str, register: bool,
                    seeds: list[int] | None = None, verbose: bool = False) -> None:
    """Resolve the experiment (a bad one fails before anything heavy is imported), run it (once per seed
    when `seeds`, with a progress bar; `verbose`: Keras's epoch lines too), print its metrics."""
    values = _ensemble_overrides(pairs) if kind == "ensemble" else cfg.parse_overrides(pairs)
    if data_dir:
        values.setdefault("data.data_dir", data_dir)
    configs = [cfg.resolve(exp_id, values if seeds is None else {**values, "train.seed": seed})
               for seed in (seeds or [None])]
    for config in configs:
        cfg.check_kind(config, kind)

    with heavy_imports():
        import keras  # noqa: F401  (imported here, to be frozen, not later while loading data)

        from cifar_mlops.tracking import store
        if kind == "train":
            from cifar_mlops.train import train as run
        else:
            from cifar_mlops.ensemble import build as run

    store.quiet_mlflow()
    shown = ("val_", "test_", "ensemble_gain_") if kind == "ensemble" else ("val_", "test_")
    if seeds is None:
        metrics = run(configs[0], register=register)
        click.echo(" ".join(f"{k}={v:.4f}" for k, v in metrics.items() if k.startswith(shown)))
        return
    with progress.runs_bar("train", len(configs), verbose=verbose) as bar:  # --seeds: one bar over the seeds
        for config in configs:
            bar.start(f"{exp_id} seed {config.train.seed}")
            metrics = run(config, register=register)
            bar.finished(f"{exp_id} seed {config.train.seed}", f"test_accuracy={metrics['test_accuracy']:.4f}")
            bar.write(f"seed {config.train.seed}: " + " ".join(f"{k}={v:.4f}" for k, v in metrics.items()
                                                               if k.startswith(shown)), file=sys.stdout)


ENSEMBLE_TOP_LEVEL = ("members", "voting", "fit_weights", "batch_size")


def _ensemble_overrides(pairs: list[str]) -> dict:
    """`--set` for an ensemble: `section.key=value`, plus its top-level keys (`fit_weights=true`)."""
    top = [p for p in pairs if p.partition("=")[0].strip() in ENSEMBLE_TOP_LEVEL]
    values = cfg.parse_overrides([p for p in pairs if p not in top])
    for pair in top:  # parsed as if in a section, to share the YAML typing of values
        [(dotted, value)] = cfg.parse_overrides([f"top.{pair.strip()}"]).items()
        values[dotted.removeprefix("top.")] = value
    return values


def _optional_number(kind: type):
    """A click callback: '' or 'none' (the MLproject default) -> None, else a `kind` (int or float)."""
    def convert(ctx: click.Context, param: click.Parameter, value: str) -> float | int | None:
        if value is None or str(value).strip().lower() in ("", "none"):
            return None
        try:
            return kind(value)
        except ValueError:
            raise click.BadParameter(f"{value!r} is not {'an integer' if kind is int else 'a number'}") from None
    return convert


@main.command()
@click.argument("model_name", metavar="MODEL")
@click.option("--version", "version", required=True, type=click.IntRange(min=1), help="The candidate version.")
@click.option("--alias", default="champion", show_default=True, help="The alias the candidate competes for.")
@click.option("--metric", default="test_accuracy", show_default=True, type=ChoiceOf("cifar_mlops.promote", "METRICS"),
              help="Compared on the same test images (test_loss: lower is better).")
@click.option("--min-delta", default=0.0, show_default=True, type=float,
              help="The least improvement of the metric that promotes (and it must be > 0).")
@click.option("--alpha", default="", callback=_optional_number(float), metavar="A",
              help="Also require McNemar's exact test on the paired predictions to give p < A (empty: no test).")
@click.option("--dry-run", type=click.BOOL, is_flag=False, flag_value=True, default=False, metavar="[BOOL]",
              help="Decide and print, change nothing (no alias, no tags).")
@click.option("--force", type=click.BOOL, is_flag=False, flag_value=True, default=False, metavar="[BOOL]",
              help="Promote even if the rule says no (the decision is tagged `forced`).")
@click.option("--exp", "exp_id", default="",
              help="Score on this experiment's test split (default: the candidate's own run's data).")
@click.option("--data-dir", default="", type=click.Path(file_okay=False),
              help="Where real CIFAR-10 is on this machine, if not where the candidate's run read it.")
def promote(model_name: str, version: int, alias: str, metric: str, min_delta: float, alpha: float | None,
            dry_run: bool, force: bool, exp_id: str, data_dir: str) -> None:
    """Move ALIAS (@champion) of MODEL to VERSION only if it beats the current holder on the same test images."""
    with heavy_imports():
        import keras  # noqa: F401  (the versions compared are Keras models)

        from cifar_mlops import promote as rule
        from cifar_mlops.tracking import runs, store

    store.quiet_mlflow()
    decision = rule.decide(model_name, version, alias=alias, metric=metric, min_delta=min_delta, alpha=alpha,
                           dry_run=dry_run, force=force, exp_id=exp_id or None, data_dir=data_dir or None)
    # `mlflow run -e promote`: the decision on the run it created, too
    runs.annotate_adopted_run({**decision.tags(), "promotion_dry_run": str(dry_run).lower()})
    for line in decision.lines():
        click.echo(line)


@main.command(name="models")
@click.argument("names", nargs=-1, metavar="[MODEL]...")
@click.option("--version", "version", type=click.IntRange(min=1), default=None,
              help="With one MODEL: that version's description (what it is, each promotion's account) and tags.")
def models_command(names: tuple[str, ...], version: int | None) -> None:
    """List registered models: versions, aliases, experiment ids, test accuracy."""
    with heavy_imports():
        from cifar_mlops.tracking import registry, store

    store.quiet_mlflow()
    if version is not None:
        if len(names) != 1:
            raise UserError("--version N goes with exactly one MODEL, e.g. `cifar-mlops models cifar10-cnn --version 2`")
        found = registry.find_version(names[0], version=version)
        click.echo(f"{found}" + (" " + " ".join(f"@{a}" for a in found.aliases) if found.aliases else ""))
        click.echo(f"page: {store.ui_link(store.configure_store(), store.version_page(found.name, found.version))}\n")
        click.echo((found.description or "(no description)") + "\n")
        click.echo(text_table([{"tag": key, "value": value} for key, value in sorted(found.tags.items())]))
        return
    registered = registry.list_registered()
    if names:
        unknown = [n for n in names if n not in {name for name, _ in registered}]
        if unknown:
            raise UserError(f"unknown registered model {unknown[0]!r} (registered: "
                            f"{', '.join(name for name, _ in registered) or 'none yet'})")
        registered = [(name, versions) for name, versions in registered if name in names]
    if not registered:
        click.echo(f"no registered models in {store.configure_store()}; "
                   "train one with `cifar-mlops train --exp smoke`")
        return
    click.echo(text_table([
        {"model": name, "version": str(v.version), "aliases": ",".join(f"@{a}" for a in v.aliases) or "-",
         "exp_id": v.exp_id, "test_accuracy": v.tags.get("test_accuracy", "?"),
         "data": v.tags.get("data_source", "?"),
         "created (UTC)": time.strftime("%Y-%m-%d %H:%M", time.gmtime(v.created_ms / 1000)) if v.created_ms else "",
         "members": v.tags.get("members", "")}
        for name, versions in registered for v in reversed(versions)]))


@main.command()
@click.argument("paths", nargs=-1, required=True, metavar="PATH...")
@click.option("--model", "model_uri", required=True, metavar="URI",
              help="A logged model: models:/NAME@ALIAS, models:/NAME/VERSION or runs:/RUN_ID/model.")
@click.option("--out", default="", metavar="FILE", help="Write a .csv or .jsonl file (default: CSV on stdout).")
@click.option("--top-k", type=click.IntRange(min=0), default=0, show_default=True, metavar="K",
              help="Give the K most probable classes (label, probability, label_2, probability_2, ...) "
                   "instead of every class's probability; 0: every class.")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True,
              help="Files decoded and predicted at a time.")
def predict(paths: tuple[str, ...], model_uri: str, out: str, top_k: int, batch_size: int) -> None:
    """Predict image files (PNG, JPEG, ... of any size) and every file under folders: one row per file."""
    with heavy_imports():
        from cifar_mlops import predict as predicting
        from cifar_mlops.tracking import store

    store.quiet_mlflow()
    if out:
        predicting.output_format(out)  # a bad name fails before any work
    table = predicting.predict(model_uri, paths, batch_size=batch_size, top_k=top_k)
    failed = int((table[predicting.ERROR] != "").sum())
    if out:
        predicting.write(table, out)
    else:
        click.echo(table.to_csv(index=False), nl=False)
    click.echo(f"{len(table) - failed} of {len(table)} files predicted" + (f" into {out}" if out else "")
               + (f"; {failed} could not be read or decoded (see their error column)" if failed else ""), err=True)
    if out:
        logged_in = predicting.log_to_adopted_run(out, model_uri, paths, top_k)
        if logged_in:
            click.echo(f"logged {out} as an artifact of run {logged_in}", err=True)


@main.command()
@click.option("--exp", "exp_id", required=True, help="Experiment id from the catalogue, e.g. 2.4 or smoke.")
@click.option("--trials", type=click.IntRange(min=1), default=20, show_default=True,
              help="Trials to add to the study in this invocation (shared out among the workers).")
@click.option("--study", "study_name", default="", metavar="NAME",
              help="Optuna study name (default: cifar10-<exp>, so rerunning resumes the study).")
@click.option("--storage", default="", metavar="URL",
              help="Optuna storage: postgresql://..., sqlite:///..., or a journal file path "
                   "(default: optuna.journal beside a SQLite MLflow store, else ./optuna.journal; safe for several "
                   "local processes).")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Worker processes on this machine (one GPU each when GPUs are visible).")
@click.option("--timeout", type=click.FloatRange(min=0), default=0, show_default=True,
              help="Stop starting new trials after this many seconds per worker (0: no limit).")
@click.option("--sampler", type=ChoiceOf("cifar_mlops.tune", "SAMPLERS"), default="tpe", show_default=True)
@click.option("--pruner", type=ChoiceOf("cifar_mlops.tune", "PRUNERS"), default="median", show_default=True,
              help="Stops unpromising trials early on per-epoch val_accuracy (median: below the median of the "
                   "finished trials' at the same epoch, once 2 have finished; search.pruning_* tune it).")
@click.option("--seed", default="", metavar="INT", help="Sampler seed (default: random).")
@_override_options("data.val_size=1000 (every trial)")
@click.option("--register-best", type=click.BOOL, is_flag=False, flag_value=True, default=False,
              metavar="[true|false]", help="Retrain the best trial's configuration once and register it.")
@_VERBOSE
def tune(exp_id: str, trials: int, study_name: str, storage: str, workers: int, timeout: float, sampler: str,
         pruner: str, seed: str, set_pairs: tuple[str, ...], overrides: str, data_dir: str,
         register_best: bool, verbose: bool) -> None:
    """Tune an experiment with Optuna: one nested MLflow run per trial under one parent run per study."""
    with heavy_imports():
        if workers == 1:  # the trials run in this process; with more, only the workers train
            import keras  # noqa: F401  (imported here, to be frozen)
        from cifar_mlops import tune as tuning
        from cifar_mlops.tracking import store

    values = _override_values(set_pairs, overrides, data_dir)
    progress.set_verbose(verbose)
    if seed.strip() and not seed.strip().lstrip("-").isdigit():
        raise tuning.TuneError(f"--seed must be an integer (got {seed!r})")
    result = tuning.tune(exp_id, trials, study_name=study_name or None, storage=storage or None,
                         workers=workers, timeout=timeout or None, sampler=sampler, pruner=pruner,
                         seed=int(seed) if seed.strip() else None, overrides=values,
                         register_best=register_best)
    counts = ", ".join(f"{n} {state}" for state, n in result.counts.items() if n or state != "RUNNING")
    click.echo(f"study {result.study_name} ({result.storage}): {sum(result.counts.values())} trials: {counts}")
    click.echo(result.table)
    if result.best:
        params = " ".join(f"train.{k}={v}" for k, v in result.best["params"].items())
        click.echo(f"best: trial {result.best['number']} val_accuracy={result.best['value']:.4f}  {params}")
    if result.registered:
        click.echo(f"registered the best configuration as a new version of {result.registered}")
    click.echo(f"parent run {result.parent_run_id} in MLflow experiment {result.experiment!r}; to see it, "
               f"{store.where_to_see_run(result.tracking_uri, result.parent_run_id)}")
    click.echo(f"every trial in optuna-dashboard (pip install 'cifar-mlops[dashboard]'): run {result.dashboard}")
    if result.worker_failures:
        lost = f"; trials {', '.join(map(str, result.failed_dead))} marked FAIL" if result.failed_dead else ""
        raise UserError(f"{'; '.join(result.worker_failures)}{lost}; rerun the same command to continue the study")


@main.command()
@click.option("--exp", "exp_id", required=True, help="Experiment id from the catalogue, e.g. 2.4 or b5.")
@click.option("--design", type=ChoiceOf("cifar_mlops.ablate", "DESIGNS"), default="leave-one-out", show_default=True,
              help="leave-one-out: without each enhancement; add-one: the parent plus each one it lacks; "
                   "path: the chain of parents; variants: --variants against --exp.")
@click.option("--seeds", default="3", show_default=True, metavar="N|S,S,...|auto",
              help="Seeds 0..N-1, or a list; seed k is the same for every variant (paired). auto: seeds in rounds, "
                   "more only for the variants of comparisons still open (intervals valid under repeated looks).")
@click.option("--max-seeds", default=12, show_default=True, type=int,
              help="With --seeds auto: the most seeds a comparison gets; open at this many, it ends inconclusive.")
@click.option("--budget", default=0.0, show_default=True, type=float, metavar="MINUTES",
              help="With --seeds auto: no new round once the runs' CPU- or GPU-minutes (each run's fit as it "
                   "measures it: its process's CPU time, or wall time x GPUs on GPUs; summed over the runs) reach "
                   "this; 0: no budget.")
@click.option("--enhancements", default="", metavar="A,B",
              help="Only these enhancements (leave-one-out: to remove; add-one: to add). Default: all.")
@click.option("--variants", default="", metavar="ID,ID",
              help="With --design variants: the experiments compared with --exp.")
@click.option("--alpha", default=0.05, show_default=True, type=float,
              help="Error rate of the verdicts: intervals at 1 - alpha / (number of changes), Bonferroni.")
@_PRIMARY_METRIC
@click.option("--min-effect", default=1.0, show_default=True, type=float, metavar="PP",
              help="The smallest effect of interest, in percentage points of the primary metric: 'equivalent' "
                   "when the verdict's interval lies inside +-PP; 'helps'/'hurts' say whether they clear it.")
@_PAIRED_RUNS
@_override_options("train.epochs=5 (every variant)")
@click.option("--register/--no-register", default=False, show_default=True,
              help="Also register every variant's model (off: an ablation's runs are measurements).")
@_VERBOSE
def ablate(exp_id: str, design: str, seeds: str, max_seeds: int, budget: float, enhancements: str, variants: str,
           alpha: float, metric: str, min_effect: float, fixed_split: bool, workers: int, storage: str,
           set_pairs: tuple[str, ...], overrides: str, data_dir: str, register: bool, verbose: bool) -> None:
    """Did each enhancement help? Train variants of an experiment over paired seeds and test the effects."""
    with heavy_imports():
        import keras  # noqa: F401  (the variants train here: imported here, to be frozen)

        from cifar_mlops import ablate as ablation
        from cifar_mlops.tracking import store

    values = _override_values(set_pairs, overrides, data_dir)
    progress.set_verbose(verbose)
    names = [n.strip() for n in enhancements.split(",") if n.strip()]
    result = ablation.ablate(exp_id, design, None if seeds.strip() == "auto" else cfg.parse_seeds(seeds),
                             enhancements=names, max_seeds=max_seeds, budget_minutes=budget,
                             variants=[v.strip() for v in variants.split(",") if v.strip()], overrides=values,
                             alpha=alpha, register=register, workers=workers, storage=storage or None,
                             metric=metric, fixed_split=fixed_split, min_effect_pp=min_effect)
    click.echo(f"\nAblation {result.design.name}: {result.trained} runs trained, {result.reused} reused\n")
    click.echo(result.seed_sources + "\n")
    click.echo(ablation.variants_markdown(result.summary))
    click.echo("")
    click.echo(ablation.ablation_stats.effects_markdown(result.effects))
    click.echo("\n" + ablation.ablation_stats.image_level_markdown(result.effects))
    click.echo("\n" + ablation.ablation_stats.comparison_markdown(result.comparisons))
    click.echo("\n" + ablation.ablation_stats.noise_markdown(result.noise))
    for line in result.design.skipped:
        click.echo(line)
    click.echo(f"\nparent run {result.parent_run_id} in MLflow experiment {result.experiment!r} (forest plot, "
               f"tables as markdown and CSV); to see it, {store.where_to_see_run(result.tracking_uri, result.parent_run_id)}")


@main.command(name="select")
@click.option("--exp", "exp_id", required=True, help="The experiment to start from, e.g. b5.")
@click.option("--candidates", default="", metavar="A,B",
              help="The enhancements to try (default: every one of the study's the experiment lacks and its rules "
                   "allow).")
@click.option("--max-seeds", default=12, show_default=True, type=int,
              help="The most seeds a comparison of a step gets (seeds in rounds, as ablate --seeds auto).")
@click.option("--budget", default="", callback=_optional_number(float), metavar="MINUTES",
              help="Start no step or round once the steps' runs' CPU- or GPU-minutes (each run's fit as it measures "
                   "it, summed, as ablate --budget) reach this; empty: no budget.")
@click.option("--alpha", default=0.05, show_default=True, type=float,
              help="Error rate of each step's verdicts (Bonferroni over the step's candidates).")
@_PRIMARY_METRIC
@click.option("--min-effect", default=1.0, show_default=True, type=float, metavar="PP",
              help="A candidate is kept only when its whole interval lies at least PP percentage points above 0.")
@_PAIRED_RUNS
@_override_options("train.epochs=5 (every run of every step)")
@click.option("--register/--no-register", default=False, show_default=True,
              help="Train the final iteration once more and register its model.")
@_VERBOSE
def select_command(exp_id: str, candidates: str, max_seeds: int, budget: float | None, alpha: float, metric: str,
                   min_effect: float, fixed_split: bool, workers: int, storage: str, set_pairs: tuple[str, ...],
                   overrides: str, data_dir: str, register: bool, verbose: bool) -> None:
    """The next iteration, chosen by the paired test: greedy forward selection over the catalogue."""
    with heavy_imports():
        import keras  # noqa: F401  (the steps train here: imported here, to be frozen)

        from cifar_mlops import select as selection
        from cifar_mlops.tracking import store

    values = _override_values(set_pairs, overrides, data_dir)
    progress.set_verbose(verbose)
    result = selection.select(exp_id, candidates_named=[c.strip() for c in candidates.split(",") if c.strip()],
                              overrides=values, alpha=alpha, metric=metric, min_effect_pp=min_effect,
                              max_seeds=max_seeds, budget_minutes=budget, workers=workers,
                              storage=storage or None, fixed_split=fixed_split, register=register)
    document = selection.report_markdown(result, cfg.resolve(exp_id).study, min_effect)
    body, _, last = document.rpartition("\n\n")
    click.echo("\n" + body + "\n")
    click.echo(f"parent run {result.run_id} in MLflow experiment {result.experiment!r} (path plot, tables); "
               f"to see it, {store.where_to_see_run(result.tracking_uri, result.run_id)}\n")
    click.echo(last)


@main.command()
@click.option("--experiment", default="cifar10-ablation", show_default=True,
              help="The MLflow experiment whose FINISHED runs are reported.")
@click.option("--format", "fmt", type=ChoiceOf("cifar_mlops.report", "FORMATS"), default="markdown",
              show_default=True, help="markdown pastes into a README; html is one self-contained file.")
@click.option("--out", default="", metavar="PATH",
              help="Write here (markdown also writes its plots beside it as <stem>_*.png); default: stdout.")
@click.option("--latest/--best", "latest", default=True, show_default=True,
              help="Per iteration and seed: the latest run, or the best by val_accuracy.")
@click.option("--log", "log_run", type=click.BOOL, is_flag=False, flag_value=True, default=True,
              metavar="[BOOL]", show_default=True,
              help="Also log the report (md, html, csv) as artifacts of a `report` run in cifar10-reports.")
def report(experiment: str, fmt: str, out: str, latest: bool, log_run: bool) -> None:
    """The studies' ablation tables and plots, regenerated from tracked runs."""
    from pathlib import Path

    with heavy_imports():
        from cifar_mlops import report as reporting
        from cifar_mlops.tracking import store

    store.quiet_mlflow()
    document = reporting.build(experiment, "latest" if latest else "best")
    if out:
        try:
            written = reporting.write(document, fmt, Path(out))
        except OSError as err:
            raise reporting.ReportError(f"cannot write {out}: {err.strerror or err}") from None
        click.echo(f"wrote {', '.join(str(p) for p in written)}", err=True)
    else:
        click.echo(reporting.render(document, fmt))
        if fmt == "markdown" and document.figures:
            click.echo(f"({len(document.figures)} plot(s) not written: pass --out report.md to write them beside it)",
                       err=True)
    if log_run:
        run_id, logged_in = reporting.log(document)
        click.echo(f"logged as artifacts of report run {run_id} in MLflow experiment {logged_in!r}", err=True)


@main.command()
@click.option("--backend-store-uri", required=True, metavar="URL",
              help="The runs' PostgreSQL database, postgresql://USER@HOST:5432/DATABASE (created if missing; "
                   "its users and Optuna studies go to DATABASE_auth and DATABASE_optuna beside it).")
@click.option("--artifacts-destination", required=True, metavar="DIR|s3://BUCKET/PREFIX",
              help="Where the server keeps artifacts; clients send and fetch them through the server.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="0.0.0.0 to be reached from other machines (with --allowed-hosts).")
@click.option("--allowed-hosts", default="", metavar="HOST,HOST",
              help="The names other machines reach this server by (MLflow refuses other Host headers).")
@click.option("--port", type=click.IntRange(1, 65535), default=5000, show_default=True)
@click.option("--workers", type=click.IntRange(min=1), default=2, show_default=True,
              help="Server processes (each holds about 0.5 GB).")
@click.option("--admin", default="admin", show_default=True, help="The admin user, created on the first start.")
@click.option("--admin-password-file", default="", metavar="FILE",
              help="The admin's password (default: $MLFLOW_AUTH_ADMIN_PASSWORD; never on the command line).")
def server(backend_store_uri: str, artifacts_destination: str, host: str, allowed_hosts: str, port: int, workers: int,
           admin: str, admin_password_file: str) -> None:
    """Start the team's MLflow server: PostgreSQL, proxied artifacts, users and roles (basic-auth)."""
    from cifar_mlops import server as team_server

    team_server.serve(backend_store_uri, artifacts_destination, host=host, port=port, workers=workers, admin=admin,
                      admin_password_file=admin_password_file or None, allowed_hosts=allowed_hosts)


@main.group()
def team() -> None:
    """Users and roles on the team server (as its admin: MLFLOW_TRACKING_USERNAME/PASSWORD)."""


def _new_password(name: str, password_file: str) -> str:
    """A user's password from --password-file, $CIFAR_MLOPS_USER_PASSWORD, or a hidden prompt."""
    if password_file:
        try:
            return open(password_file).read().strip()
        except OSError as err:
            raise UserError(f"--password-file {password_file}: {err.strerror or err}") from None
    if os.environ.get("CIFAR_MLOPS_USER_PASSWORD"):
        return os.environ["CIFAR_MLOPS_USER_PASSWORD"]
    if not sys.stdin.isatty():
        raise UserError(f"no password for {name}: pass --password-file FILE or set CIFAR_MLOPS_USER_PASSWORD")
    return click.prompt(f"password for {name}", hide_input=True, confirmation_prompt=True)


_ROLE = click.option("--role", required=True, type=ChoiceOf("cifar_mlops.tracking.team", "ROLES"),
                     help="reader: reads runs and models; trainer: also trains, tunes and registers candidates; "
                          "maintainer: also promotes (moves the served models' aliases).")


@team.command("add-user")
@click.argument("name")
@_ROLE
@click.option("--password-file", default="", metavar="FILE",
              help="The new user's password (default: $CIFAR_MLOPS_USER_PASSWORD, else a prompt).")
def add_user(name: str, role: str, password_file: str) -> None:
    """Add user NAME with a role."""
    with heavy_imports():
        from cifar_mlops.tracking import store
        from cifar_mlops.tracking import team as team_roles

    store.quiet_mlflow()
    team_roles.add_user(name, _new_password(name, password_file), role)
    click.echo(f"added {name} as {role}", err=True)


@team.command("set-role")
@click.argument("name")
@_ROLE
def set_role(name: str, role: str) -> None:
    """Give existing user NAME exactly the grants of a role."""
    with heavy_imports():
        from cifar_mlops.tracking import store
        from cifar_mlops.tracking import team as team_roles

    store.quiet_mlflow()
    team_roles.set_role(name, role)
    click.echo(f"{name} is now {role}", err=True)


@team.command("remove-user")
@click.argument("name")
def remove_user(name: str) -> None:
    """Remove user NAME and its grants (what it logged stays)."""
    with heavy_imports():
        from cifar_mlops.tracking import store
        from cifar_mlops.tracking import team as team_roles

    store.quiet_mlflow()
    team_roles.remove_user(name)
    click.echo(f"removed {name}", err=True)


@team.command("set-password")
@click.argument("name")
@click.option("--password-file", default="", metavar="FILE",
              help="The new password (default: $CIFAR_MLOPS_USER_PASSWORD, else a prompt); never an argument.")
def set_password(name: str, password_file: str) -> None:
    """Give user NAME a new password."""
    with heavy_imports():
        from cifar_mlops.tracking import store
        from cifar_mlops.tracking import team as team_roles

    store.quiet_mlflow()
    team_roles.set_password(name, _new_password(name, password_file))
    click.echo(f"new password set for {name}", err=True)


@team.command("list")
def list_users() -> None:
    """The users and their roles (no password, no secret)."""
    with heavy_imports():
        from cifar_mlops.tracking import store
        from cifar_mlops.tracking import team as team_roles

    store.quiet_mlflow()
    click.echo(text_table(team_roles.list_users()))


@main.command(hidden=True)
@click.option("--spec", required=True, help="JSON from the coordinating process (`execution.workers.worker_args`).")
def worker(spec: str) -> None:
    """One worker process of `tune` or `ablate --workers K` (internal)."""
    with heavy_imports():
        import keras  # noqa: F401  (the worker trains: imported here, to be frozen)

        from cifar_mlops.execution import workers

        given = workers.from_json(spec)  # imports the module of its class (tune, ablate) while imports are frozen
    given.run()


if __name__ == "__main__":
    main()
