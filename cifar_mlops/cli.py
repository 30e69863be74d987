"""`cifar-mlops`: thin click commands: parse, call, print.

TensorFlow and MLflow are imported only inside the commands that need them, so
`--help` and `experiments` answer at once.
"""

from __future__ import annotations

import contextlib
import gc
import os
import sys
import tempfile

import click

from cifar_mlops import config as cfg
from cifar_mlops.errors import StoreUnavailable


def fail(message: str, code: int = 1) -> None:
    """Print a one-line error and exit non-zero (no traceback)."""
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


class _Commands(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except StoreUnavailable as err:
            fail(str(err))


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="cifar-mlops", prog_name="cifar-mlops")
def main() -> None:
    """Reproduce, track and compare CIFAR-10 ablation experiments (MLflow + Keras + Optuna)."""


@main.command()
@click.option("--models", "show_models", is_flag=True, help="List the registered model factories instead.")
def experiments(show_models: bool) -> None:
    """The catalogue: each study's enhancement table and each iteration's key settings."""
    from cifar_mlops import models

    if show_models:
        for name in models.list_models():
            entry = models.get_model_entry(name)
            click.echo(f"{name:<12} cifar10-{entry.family:<12} {entry.description}")
        return
    try:
        resolved = [cfg.resolve(exp_id) for exp_id in cfg.list_experiments()]
        catalogue = cfg.load_enhancements()
    except cfg.ConfigError as err:
        fail(str(err), 2)
    for study, title in cfg.STUDY_TITLES.items():
        iterations = [c for c in resolved if c.study == study]
        rows = [name for name, entry in catalogue.items() if study in entry.get("studies", [])]
        click.echo(f"\n{title}\n")
        click.echo(enhancement_table(iterations, rows, catalogue))
    click.echo("\nIterations (resolved settings)\n")
    click.echo(settings_table(resolved))
    click.echo("\nDetails: experiments/<id>.yaml and experiments/enhancements.yaml; "
               "train one with `cifar-mlops train --exp <id>`.")


def enhancement_table(iterations: list[cfg.Config], rows: list[str], catalogue: dict) -> str:
    ids, matrix = cfg.enhancement_matrix(iterations, rows, catalogue)
    width = max([len(label) for label, _ in matrix] + [len("Enhancement")])
    lines = [f"{'Enhancement':<{width}} | " + " | ".join(f"{i:^4}" for i in ids)]
    lines.append("-" * width + "-|-" + "-|-".join("----" for _ in ids))
    for label, used in matrix:
        lines.append(f"{label:<{width}} | " + " | ".join(f"{'✔' if u else ' ':^4}" for u in used))
    return "\n".join(lines)


def settings_table(resolved: list[cfg.Config]) -> str:
    header = ("id", "model", "px", "epochs", "batch", "optimizer", "lr", "data", "description")
    rows = []
    for c in resolved:
        if c.kind == "ensemble":
            members = " + ".join(f"{m.registered_model}@{m.exp_id or m.alias or m.version}" for m in c.members)
            rows.append((c.exp_id, "ensemble", "", "", "", "", "", f"{c.voting} vote", members))
            continue
        d, m, t = c.data, c.model, c.train
        sizes = f"{d.train_size or 'rest'}/{d.val_size}"
        weights = f"+{m.weights if m.weights == 'imagenet' else 'file'}" if m.weights else ""
        rows.append((c.exp_id, m.name + weights, str(m.image_size), str(t.epochs), str(t.batch_size),
                     t.optimizer, f"{t.learning_rate:g}", f"{d.source} {d.split} {sizes}", c.description))
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header) - 1)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths) + "  {}"
    return "\n".join(fmt.format(*r) for r in [header, *rows])


def _experiment_options(exp_help: str, set_example: str, register_help: str):
    """The options `train` and `ensemble` share (the MLproject entry points mirror them)."""
    options = [
        click.option("--exp", "exp_id", required=True, help=exp_help),
        click.option("--set", "set_pairs", multiple=True, metavar="KEY=VALUE",
                     help=f"Override a setting, e.g. --set {set_example} (repeatable; wins over the experiment file)."),
        click.option("--overrides", default="", metavar="'K=V K=V'",
                     help="The same overrides as one space- or comma-separated string (the MLproject parameter)."),
        click.option("--data-dir", default="", type=click.Path(file_okay=False),
                     help="An existing cifar-10-batches-py folder (default: $CIFAR10_DIR, else download and cache)."),
        click.option("--register/--no-register", default=True, show_default=True, help=register_help),
    ]

    def decorate(command):
        for option in reversed(options):
            command = option(command)
        return command

    return decorate


@main.command()
@_experiment_options("Experiment id from the catalogue, e.g. 2.4 or smoke.", "train.epochs=5",
                     "Register the trained model as a new version of cifar10-<family>.")
def train(exp_id: str, set_pairs: tuple[str, ...], overrides: str, data_dir: str, register: bool) -> None:
    """Train, evaluate, track and register one experiment."""
    config = _resolve_command_config(exp_id, "train", [*cfg.split_overrides(overrides), *set_pairs], data_dir)

    with heavy_imports():
        import keras  # noqa: F401  (here, to be frozen, not later while loading data)
        from cifar_mlops import data, models, tracking
        from cifar_mlops.train import TrainingFailed, train as run_training

    tracking.quiet_mlflow()
    try:
        metrics = run_training(config, register=register)
    except (data.DataError, models.WeightsUnavailable, TrainingFailed, ValueError) as err:
        fail(f"{exp_id}: {err} (the run is marked FAILED)")
    except KeyboardInterrupt:
        fail(f"{exp_id}: interrupted; the run is marked KILLED and nothing was registered", 130)
    click.echo(" ".join(f"{k}={v:.4f}" for k, v in metrics.items() if k.startswith(("val_", "test_"))))


@main.command()
@_experiment_options("An ensemble experiment id, e.g. 3.2 or smoke-ensemble.", "fit_weights=true",
                     "Register the ensemble as a new version of cifar10-ensemble.")
def ensemble(exp_id: str, set_pairs: tuple[str, ...], overrides: str, data_dir: str, register: bool) -> None:
    """Soft-vote registered model versions; evaluate, track and register the ensemble."""
    config = _resolve_command_config(exp_id, "ensemble", [*cfg.split_overrides(overrides), *set_pairs], data_dir)

    with heavy_imports():
        import keras  # noqa: F401  (the members are Keras models)
        from cifar_mlops import data, tracking
        from cifar_mlops import ensemble as voting

    tracking.quiet_mlflow()
    try:
        members = voting.resolve_members(config)
    except (tracking.RegistryError, voting.EnsembleFailed) as err:
        _fail_before_run(f"{exp_id}: {err}")
    try:
        metrics = voting.build(config, register=register, members=members)
    except (data.DataError, voting.EnsembleFailed, ValueError) as err:
        fail(f"{exp_id}: {err} (the run is marked FAILED)")
    except KeyboardInterrupt:
        fail(f"{exp_id}: interrupted; the run is marked KILLED and nothing was registered", 130)
    click.echo(" ".join(f"{k}={v:.4f}" for k, v in metrics.items()
                        if k.startswith(("val_", "test_", "ensemble_gain_"))))


def _resolve_command_config(exp_id: str, kind: str, pairs: list[str], data_dir: str) -> cfg.Config:
    """The experiment a `train`/`ensemble` command runs, with its overrides; a one-line error otherwise."""
    try:
        values = _ensemble_overrides(pairs) if kind == "ensemble" else cfg.parse_overrides(pairs)
        if data_dir:
            values.setdefault("data.data_dir", data_dir)
        config = cfg.resolve(exp_id, values)
        if config.kind != kind:  # the command named by the experiment's kind runs it
            described = {"ensemble": "an ensemble", "train": "a training"}[config.kind]
            raise cfg.ConfigError(f"{exp_id} is {described} experiment; run `cifar-mlops {config.kind} --exp {exp_id}`")
    except cfg.ConfigError as err:
        _fail_before_run(str(err))
    return config


ENSEMBLE_TOP_LEVEL = ("members", "voting", "fit_weights", "batch_size")


def _ensemble_overrides(pairs: list[str]) -> dict:
    """`--set` for an ensemble: `section.key=value`, plus its top-level keys (`fit_weights=true`)."""
    top = [p for p in pairs if p.partition("=")[0].strip() in ENSEMBLE_TOP_LEVEL]
    values = cfg.parse_overrides([p for p in pairs if p not in top])
    for pair in top:  # parsed as if in a section, to share the YAML typing of values
        [(dotted, value)] = cfg.parse_overrides([f"top.{pair.strip()}"]).items()
        values[dotted.removeprefix("top.")] = value
    return values


def _optional_float(ctx: click.Context, param: click.Parameter, value: str) -> float | None:
    if value is None or str(value).strip().lower() in ("", "none"):
        return None
    try:
        return float(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a number") from None


@main.command()
@click.argument("model_name", metavar="MODEL")
@click.option("--version", "version", required=True, type=click.IntRange(min=1), help="The candidate version.")
@click.option("--alias", default="champion", show_default=True, help="The alias the candidate competes for.")
@click.option("--metric", default="test_accuracy", show_default=True,
              type=click.Choice(["test_accuracy", "test_f1_macro", "test_loss"]),
              help="Compared on the same test images (test_loss: lower is better).")
@click.option("--min-delta", default=0.0, show_default=True, type=float,
              help="The least improvement of the metric that promotes (and it must be > 0).")
@click.option("--alpha", default="", callback=_optional_float, metavar="A",
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
        from cifar_mlops import data, tracking
        from cifar_mlops import promote as rule

    tracking.quiet_mlflow()
    try:
        decision = rule.decide(model_name, version, alias=alias, metric=metric, min_delta=min_delta, alpha=alpha,
                               dry_run=dry_run, force=force, exp_id=exp_id or None, data_dir=data_dir or None)
    except (tracking.RegistryError, rule.PromotionError, data.DataError) as err:
        _fail_before_run(str(err))
    # `mlflow run -e promote`: the decision on the run it created, too
    tracking.annotate_adopted_run({**decision.tags(), "promotion_dry_run": str(dry_run).lower()}, {})
    for line in decision.lines():
        click.echo(line)


@main.command(name="models")
@click.argument("names", nargs=-1, metavar="[MODEL]...")
def models_command(names: tuple[str, ...]) -> None:
    """List registered models: versions, aliases, experiment ids, test accuracy."""
    with heavy_imports():
        from cifar_mlops import tracking

    tracking.quiet_mlflow()
    registered = tracking.list_registered()
    if names:
        unknown = [n for n in names if n not in {name for name, _ in registered}]
        if unknown:
            fail(f"unknown registered model {unknown[0]!r} (registered: "
                 f"{', '.join(name for name, _ in registered) or 'none yet'})")
        registered = [(name, versions) for name, versions in registered if name in names]
    if not registered:
        click.echo(f"no registered models in {tracking.configure_store()}; "
                   "train one with `cifar-mlops train --exp smoke`")
        return
    import time

    header = ("model", "version", "aliases", "exp_id", "test_accuracy", "data", "created (UTC)", "members")
    rows = [header]
    for name, versions in registered:
        for v in reversed(versions):
            created = time.strftime("%Y-%m-%d %H:%M", time.gmtime(v.created_ms / 1000)) if v.created_ms else ""
            rows.append((name, str(v.version), ",".join(f"@{a}" for a in v.aliases) or "-", v.exp_id,
                         v.tags.get("test_accuracy", "?"), v.tags.get("data_source", "?"), created,
                         v.tags.get("members", "")))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header) - 1)]
    for r in rows:
        click.echo(("  ".join(f"{c:<{w}}" for c, w in zip(r, widths)) + "  " + r[-1]).rstrip())


@main.command()
@click.option("--exp", "exp_id", required=True, help="Experiment id from the catalogue, e.g. 2.4 or smoke.")
@click.option("--trials", type=click.IntRange(min=1), default=20, show_default=True,
              help="Trials to add to the study in this invocation (shared out among the workers).")
@click.option("--study", "study_name", default="", metavar="NAME",
              help="Optuna study name (default: cifar10-<exp>, so rerunning resumes the study).")
@click.option("--storage", default="", metavar="URL",
              help="Optuna storage: postgresql://..., sqlite:///..., or a journal file path "
                   "(default: ./optuna.journal, safe for several local processes).")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Worker processes on this machine (one GPU each when GPUs are visible).")
@click.option("--timeout", type=click.FloatRange(min=0), default=0, show_default=True,
              help="Stop starting new trials after this many seconds per worker (0: no limit).")
@click.option("--sampler", type=click.Choice(["tpe", "random"]), default="tpe", show_default=True)
@click.option("--pruner", type=click.Choice(["median", "successive-halving", "hyperband", "none"]), default="median",
              show_default=True,
              help="Stops unpromising trials early on per-epoch val_accuracy.")
@click.option("--seed", default="", metavar="INT", help="Sampler seed (default: random).")
@click.option("--set", "set_pairs", multiple=True, metavar="KEY=VALUE",
              help="Override a setting for every trial, e.g. --set data.val_size=1000 (repeatable).")
@click.option("--overrides", default="", metavar="'K=V K=V'",
              help="The same overrides as one space- or comma-separated string (the MLproject parameter).")
@click.option("--data-dir", default="", type=click.Path(file_okay=False),
              help="An existing cifar-10-batches-py folder (default: $CIFAR10_DIR, else download and cache).")
@click.option("--register-best", type=click.BOOL, is_flag=False, flag_value=True, default=False,
              metavar="[true|false]", help="Retrain the best trial's configuration once and register it.")
def tune(exp_id: str, trials: int, study_name: str, storage: str, workers: int, timeout: float, sampler: str,
         pruner: str, seed: str, set_pairs: tuple[str, ...], overrides: str, data_dir: str,
         register_best: bool) -> None:
    """Tune an experiment with Optuna: one nested MLflow run per trial under one parent run per study."""
    with heavy_imports():
        if workers == 1:  # the trials run in this process; with more, only the workers train
            import keras  # noqa: F401
        from cifar_mlops import tune as tuning

    try:
        pairs = [*cfg.split_overrides(overrides), *set_pairs]
        values = cfg.parse_overrides(pairs)
        if data_dir:
            values.setdefault("data.data_dir", data_dir)
        if seed.strip() and not seed.strip().lstrip("-").isdigit():
            raise tuning.TuneError(f"--seed must be an integer (got {seed!r})")
        result = tuning.tune(exp_id, trials, study_name=study_name or None, storage=storage or None,
                             workers=workers, timeout=timeout or None, sampler=sampler, pruner=pruner,
                             seed=int(seed) if seed.strip() else None, overrides=values,
                             register_best=register_best)
    except (cfg.ConfigError, tuning.TuneError) as err:
        _fail_before_run(str(err))
    except KeyboardInterrupt:
        fail(f"{exp_id}: interrupted; the interrupted trial is FAIL, its run KILLED; rerun to resume the study", 130)
    except Exception as err:  # noqa: BLE001 - data, weights, training: the parent run is already FAILED
        from cifar_mlops import data, models
        from cifar_mlops.train import TrainingFailed

        if not isinstance(err, (data.DataError, models.WeightsUnavailable, TrainingFailed, ValueError)):
            raise
        fail(f"{exp_id}: {err} (the study's parent run is marked FAILED)")
    counts = ", ".join(f"{n} {state}" for state, n in result.counts.items() if n or state != "RUNNING")
    click.echo(f"study {result.study_name} ({result.storage}): {sum(result.counts.values())} trials: {counts}")
    click.echo(result.table)
    if result.best:
        params = " ".join(f"train.{k}={v}" for k, v in result.best["params"].items())
        click.echo(f"best: trial {result.best['number']} val_accuracy={result.best['value']:.4f}  {params}")
    if result.registered:
        click.echo(f"registered the best configuration as a new version of {result.registered}")
    click.echo(f"parent run {result.parent_run_id} in MLflow experiment {result.experiment!r}; see it with "
               f"`mlflow ui --backend-store-uri {result.tracking_uri} --workers 1`")
    if result.worker_failures:
        lost = f"; trials {', '.join(map(str, result.failed_dead))} marked FAIL" if result.failed_dead else ""
        fail(f"{'; '.join(result.worker_failures)}{lost}; rerun the same command to continue the study")


@main.command()
@click.option("--experiment", default="cifar10-ablation", show_default=True,
              help="The MLflow experiment whose FINISHED runs are reported.")
@click.option("--format", "fmt", type=click.Choice(["markdown", "html", "csv"]), default="markdown",
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
        from cifar_mlops import tracking

    tracking.quiet_mlflow()
    try:
        document = reporting.build(experiment, "latest" if latest else "best")
    except (cfg.ConfigError, reporting.ReportError, tracking.ReportSourceError) as err:
        _fail_before_run(str(err))
    if out:
        try:
            written = reporting.write(document, fmt, Path(out))
        except OSError as err:
            _fail_before_run(f"cannot write {out}: {err.strerror or err}")
        click.echo(f"wrote {', '.join(str(p) for p in written)}", err=True)
    else:
        click.echo(reporting.render(document, fmt))
        if fmt == "markdown" and document.figures:
            click.echo(f"({len(document.figures)} plot(s) not written: pass --out report.md to write them beside it)",
                       err=True)
    if log_run:
        run_id, logged_in = reporting.log(document)
        click.echo(f"logged as artifacts of report run {run_id} in MLflow experiment {logged_in!r}", err=True)


@main.command("tune-worker", hidden=True)
@click.option("--spec", required=True, help="JSON from the coordinating `tune` process.")
def tune_worker(spec: str) -> None:
    """One worker process of `tune --workers K` (internal)."""
    with heavy_imports():
        import keras  # noqa: F401
        from cifar_mlops import data, models, tune as tuning
        from cifar_mlops.train import TrainingFailed

    worker = tuning.WorkerSpec.from_json(spec)
    try:
        tuning.run_worker(worker)
    except (cfg.ConfigError, tuning.TuneError, data.DataError, models.WeightsUnavailable, TrainingFailed) as err:
        fail(f"worker {worker.index}: {err}")
    except KeyboardInterrupt:
        fail(f"worker {worker.index}: interrupted", 130)


# TensorFlow's C++ start-up notices: absl logs them before it is initialised, so they bypass
# TF_CPP_MIN_LOG_LEVEL and print on every import (twice in tensorflow-cpu 2.21).
TENSORFLOW_IMPORT_NOISE = ("All log messages before absl::InitializeLog()", "oneDNN custom operations are on")


@contextlib.contextmanager
def heavy_imports():
    """Import TensorFlow, Keras, MLflow or Optuna quietly with the collector paused, then freeze them.

    Their millions of module objects live as long as the process. Left in the collector's
    generations, every full collection walks them all: while MLflow imports and maps its
    SQL store, during training and again at exit, ~1.5 s per `train` run on the 2-core
    machine of benchmarks/RESULTS.md. `gc.freeze` moves them to the permanent generation;
    later garbage is collected as usual.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ start-up chatter (CPU features)
    gc.disable()
    try:
        with stderr_without(TENSORFLOW_IMPORT_NOISE):
            yield
    finally:
        gc.freeze()
        gc.enable()


@contextlib.contextmanager
def stderr_without(noise: tuple[str, ...]):
    """Hold back what is written to file descriptor 2 (C++ code included), then pass on every line
    that contains none of `noise`."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            kept = [line for line in held.read().decode(errors="replace").splitlines(keepends=True)
                    if not any(text in line for text in noise)]
            sys.stderr.write("".join(kept))
            sys.stderr.flush()


def _fail_before_run(message: str) -> None:
    """A config error: if `mlflow run` already created our run, end it FAILED with the reason."""
    if os.environ.get("MLFLOW_RUN_ID"):
        from cifar_mlops import tracking

        tracking.configure_store()
        tracking.fail_adopted_run(message)
    fail(message, 2)


if __name__ == "__main__":
    main()
