"""train(config) -> metrics: the one training routine.

Load data, build the registered model, compile, fit (with a frozen-backbone
warm-up first when the config asks for transfer learning), evaluate on train,
val and test, and track all of it in one MLflow run; register the model when
everything above succeeded.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable, Iterable

from cifar_mlops import data, evaluation
from cifar_mlops.config import DataConfig, ExperimentConfig, TrainConfig, check_kind
from cifar_mlops.errors import UserError
from cifar_mlops.models import create_model
from cifar_mlops.progress import log
from cifar_mlops.tracking import registry, runs
from cifar_mlops.tracking.image_model import predict_in_batches


class TrainingFailed(UserError):
    """Training could not go on (e.g. the loss diverged, or the experiment is not a training); the message says what to change."""


def build_optimizer(cfg: TrainConfig, learning_rate: float, total_steps: int):
    import keras

    schedule = learning_rate
    if cfg.lr_schedule == "cosine":
        schedule = keras.optimizers.schedules.CosineDecay(learning_rate, decay_steps=max(total_steps, 1))
    if cfg.optimizer == "adamw":
        return keras.optimizers.AdamW(schedule, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return keras.optimizers.SGD(schedule, momentum=cfg.momentum, weight_decay=cfg.weight_decay or None)
    return keras.optimizers.Adam(schedule)


def compile_model(model, cfg: TrainConfig, learning_rate: float, total_steps: int) -> None:
    import keras

    model.compile(
        optimizer=build_optimizer(cfg, learning_rate, total_steps),
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=cfg.label_smoothing),
        metrics=["accuracy"],
        steps_per_execution=cfg.steps_per_execution,
    )


def dtype_policy(cfg: TrainConfig) -> str:
    """The Keras dtype policy `train.precision` means on this machine (auto: per device)."""
    if cfg.precision != "auto":
        return cfg.precision
    import tensorflow as tf

    return "mixed_float16" if tf.config.list_physical_devices("GPU") else "float32"


@contextlib.contextmanager
def building_with_policy(policy: str):
    """Layers built inside take `policy`; the global default is restored after (tuning trains many models)."""
    import keras

    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def stop_on_nan():
    import keras

    # Checked per epoch, not per batch: a batch hook makes Keras sync with the device after
    # every step, and a NaN anywhere in an epoch makes that epoch's mean loss NaN too.
    class StopOnNaN(keras.callbacks.Callback):
        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            loss = (logs or {}).get("loss")
            if loss is not None and not math.isfinite(float(loss)):
                raise TrainingFailed(
                    f"the training loss became {float(loss)} (epoch {epoch + 1}); "
                    "lower train.learning_rate or check the data"
                )

    return StopOnNaN()


def training_phases(config: ExperimentConfig) -> list[tuple[int, int, float, bool]]:
    """(first epoch, end epoch, learning rate, backbone frozen) for each fit call."""
    cfg = config.train
    if cfg.warmup_epochs == 0:
        return [(0, cfg.epochs, cfg.learning_rate, False)]
    return [(0, cfg.warmup_epochs, cfg.learning_rate, True),
            (cfg.warmup_epochs, cfg.epochs, cfg.learning_rate * cfg.finetune_lr_factor, False)]


def fit(model, config: ExperimentConfig, splits: data.Splits, callbacks: Iterable = ()) -> dict[str, list[float]]:
    """Fit `model` on the training split, validating each epoch; return the merged Keras history."""
    import keras

    cfg = config.train
    train_ds = data.make_dataset(splits.x_train, splits.y_train, batch_size=cfg.batch_size,
                                 num_classes=splits.num_classes, training=True, augment=config.augment, seed=cfg.seed)
    val_ds = data.make_dataset(splits.x_val, splits.y_val, batch_size=cfg.batch_size,
                               num_classes=splits.num_classes, training=False)
    steps_per_epoch = math.ceil(len(splits.y_train) / cfg.batch_size)
    class_weight = data.class_weights(splits.y_train, splits.num_classes) if cfg.class_weight == "balanced" else None
    callbacks = [stop_on_nan(), *callbacks]
    if cfg.early_stopping_patience:
        callbacks.append(keras.callbacks.EarlyStopping(monitor="val_accuracy", patience=cfg.early_stopping_patience,
                                                       restore_best_weights=True))
    verbose = 1 if sys.stderr.isatty() else 2
    history: dict[str, list[float]] = {}
    for first, end, learning_rate, frozen in training_phases(config):
        if frozen or first > 0:
            model.get_layer("backbone").trainable = not frozen
            log(f"epochs {first + 1}-{end}: backbone {'frozen' if frozen else 'fine-tuned'}, learning rate {learning_rate:g}")
        compile_model(model, cfg, learning_rate, (end - first) * steps_per_epoch)
        phase = model.fit(train_ds, validation_data=val_ds, epochs=end, initial_epoch=first,
                          class_weight=class_weight, callbacks=callbacks, verbose=verbose,
                          shuffle=False)  # the dataset reshuffles itself each epoch
        for key, values in phase.history.items():
            history.setdefault(key, []).extend(float(v) for v in values)
        if model.stop_training:  # early stopping ends the whole run, not just this phase
            break
    return history


def tracked_splits(run: runs.TrainingRun, data_config: DataConfig, splits: data.Splits | None = None) -> data.Splits:
    """The splits a run uses, loaded here unless a caller that runs many times passes them, and logged."""
    if splits is None:
        log("loading data")
        splits = data.load_splits(data_config)
    log(f"data: {splits.source} from {splits.location}: "
        f"{len(splits.y_train)} train / {len(splits.y_val)} val / {len(splits.y_test)} test images")
    run.log_data(splits)
    return splits


def train(config: ExperimentConfig, *, splits: data.Splits | None = None, callbacks: Iterable = (),
          register: bool = True, experiment: str = runs.ABLATION_EXPERIMENT, parent_run_id: str | None = None,
          on_run_start: Callable[[str], None] | None = None) -> dict[str, float]:
    """Train, evaluate, track and (if `register`) register experiment `config`; return its metrics.

    `splits` lets a caller that trains many times (tuning) load the data once;
    `on_run_start(run_id)` is called as soon as the run exists (tuning tags its trial there).
    """
    import keras

    check_kind(config, "train")
    with runs.TrainingRun(config, experiment=experiment, parent_run_id=parent_run_id, on_start=on_run_start) as run:
        log(f"{config.exp_id}: tracking {run.url_hint}")
        splits = tracked_splits(run, config.data, splits)

        keras.backend.clear_session()
        keras.utils.set_random_seed(config.train.seed)
        policy = dtype_policy(config.train)
        run.log(params={"train.dtype_policy": policy})
        with building_with_policy(policy):  # the model keeps it; compile adds loss scaling for mixed_float16
            model = create_model(config.model.name, num_classes=splits.num_classes, **config.model.settings())
        log(f"model {config.model.name}: {model.count_params():,} parameters, input 32x32 uint8 -> "
            f"{config.model.image_size}x{config.model.image_size} {config.model.interpolation}, {policy}")

        started = time.perf_counter()
        history = fit(model, config, splits, callbacks=[run.epoch_callback(), *callbacks])
        fit_seconds = time.perf_counter() - started

        log("evaluating on train, val and test")
        probabilities = {split: predict_in_batches(model.predict_on_batch, x, config.train.batch_size)
                         for split, (x, _) in splits.by_split().items()}
        metrics, texts, figures = evaluation.evaluate(splits, probabilities, config.exp_id)
        metrics["fit_seconds"] = fit_seconds
        metrics["epochs_run"] = float(len(history.get("loss", [])))
        figures["learning_curves"] = evaluation.learning_curves_figure(history, config.exp_id)
        run.log_results(metrics, texts, figures)
        evaluation.close(figures)

        model_uri = run.log_trained_model(model, splits.class_names, config.train.batch_size)
        if register:
            version = run.register(model_uri, metrics)
            log(f"registered {registry.registered_model_name(config.family)} version {version}")
        log(" ".join(f"{k}={metrics[k]:.4f}" for k in ("train_accuracy", "val_accuracy", "test_accuracy", "test_f1_macro")))
        return metrics
