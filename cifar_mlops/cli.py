"""`cifar-mlops`: thin click commands: parse, call, print.

TensorFlow and MLflow are imported only inside the commands that need them, so
`--help` and `experiments` answer at once.
"""

from __future__ import annotations

import sys

import click

from cifar_mlops import config as cfg

STUDY_TITLES = {
    "A": "Study A: MobileNetV2 (1.x, 2.x) and DenseNet-121 (3.x); 3.2 soft-votes 2.4 and 3.1",
    "B": "Study B: a small CNN from scratch (no known architecture, 5,000/5,000 random split)",
}


def fail(message: str, code: int = 1) -> None:
    """Print a one-line error and exit non-zero (no traceback)."""
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
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
    for study, title in STUDY_TITLES.items():
        iterations = [c for c in resolved if c.study == study]
        rows = [name for name, entry in catalogue.items() if study in entry.get("studies", [])]
        click.echo(f"\n{title}\n")
        click.echo(enhancement_table(iterations, rows, catalogue))
    click.echo("\nIterations (resolved settings)\n")
    click.echo(settings_table(resolved))
    click.echo("\nDetails: experiments/<id>.yaml and experiments/enhancements.yaml; "
               "train one with `cifar-mlops train --exp <id>`.")


def enhancement_table(iterations: list[cfg.Config], rows: list[str], catalogue: dict) -> str:
    width = max([len(catalogue[r]["label"]) for r in rows] + [len("Enhancement")])
    ids = [c.exp_id for c in iterations if c.kind == "train"]
    lines = [f"{'Enhancement':<{width}} | " + " | ".join(f"{i:^4}" for i in ids)]
    lines.append("-" * width + "-|-" + "-|-".join("----" for _ in ids))
    for row in rows:
        marks = ["✔" if row in c.enhancements else " " for c in iterations if c.kind == "train"]
        lines.append(f"{catalogue[row]['label']:<{width}} | " + " | ".join(f"{m:^4}" for m in marks))
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


@main.command()
@click.option("--exp", "exp_id", required=True, help="Experiment id from the catalogue, e.g. 2.4 or smoke.")
@click.option("--set", "set_pairs", multiple=True, metavar="KEY=VALUE",
              help="Override a setting, e.g. --set train.epochs=5 (repeatable; wins over the experiment file).")
@click.option("--overrides", default="", metavar="'K=V K=V'",
              help="The same overrides as one space- or comma-separated string (the MLproject parameter).")
@click.option("--data-dir", default="", type=click.Path(file_okay=False),
              help="An existing cifar-10-batches-py folder (default: $CIFAR10_DIR, else download and cache).")
@click.option("--register/--no-register", default=True, show_default=True,
              help="Register the trained model as a new version of cifar10-<family>.")
def train(exp_id: str, set_pairs: tuple[str, ...], overrides: str, data_dir: str, register: bool) -> None:
    """Train, evaluate, track and register one experiment."""
    try:
        pairs = [*cfg.split_overrides(overrides), *set_pairs]
        values = cfg.parse_overrides(pairs)
        if data_dir:
            values.setdefault("data.data_dir", data_dir)
        config = cfg.resolve(exp_id, values)
        if config.kind != "train":
            raise cfg.ConfigError(f"{exp_id} is an ensemble experiment; run `cifar-mlops ensemble --exp {exp_id}`")
    except cfg.ConfigError as err:
        _fail_before_run(str(err))

    quiet_tensorflow()
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


def quiet_tensorflow() -> None:
    """Keep TensorFlow's C++ start-up chatter (oneDNN, CPU features) off the terminal."""
    import os

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _fail_before_run(message: str) -> None:
    """A config error: if `mlflow run` already created our run, end it FAILED with the reason."""
    import os

    if os.environ.get("MLFLOW_RUN_ID"):
        from cifar_mlops import tracking

        tracking.configure_store()
        tracking.fail_adopted_run(message)
    fail(message, 2)


if __name__ == "__main__":
    main()
