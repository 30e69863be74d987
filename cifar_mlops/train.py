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
from typing import Iterable

import numpy as np

from cifar_mlops import data, evaluation, tracking
from cifar_mlops.config import ExperimentConfig, TrainConfig
from cifar_mlops.models import create_model
from cifar_mlops.progress import log


class TrainingFailed(RuntimeError):
    """Training could not go on (e.g. the loss diverged); the message says what to change."""


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


def predict_probabilities(model, images: np.ndarray, batch_size: int) -> np.ndarray:
    return np.asarray(model.predict(images, batch_size=batch_size, verbose=0), dtype=np.float32)


def train(config: ExperimentConfig, *, splits: data.Splits | None = None, callbacks: Iterable = (),
          register: bool = True, experiment: str = tracking.ABLATION_EXPERIMENT,
          parent_run_id: str | None = None) -> dict[str, float]:
    """Train, evaluate, track and (if `register`) register experiment `config`; return its metrics.

    `splits` lets a caller that trains many times (tuning) load the data once.
    """
    import keras

    if config.kind != "train":
        raise TrainingFailed(f"{config.exp_id} is an ensemble; build it with `cifar-mlops ensemble --exp {config.exp_id}`")
    with tracking.TrainingRun(config, experiment=experiment, parent_run_id=parent_run_id) as run:
        log(f"{config.exp_id}: tracking {run.url_hint}")
        splits = run.load_data(config.data, splits)

        keras.backend.clear_session()
        keras.utils.set_random_seed(config.train.seed)
        policy = dtype_policy(config.train)
        run.log_precision(policy)
        with building_with_policy(policy):  # the model keeps it; compile adds loss scaling for mixed_float16
            model = create_model(config.model, splits.num_classes)
        log(f"model {config.model.name}: {model.count_params():,} parameters, input 32x32 uint8 -> "
            f"{config.model.image_size}x{config.model.image_size} {config.model.interpolation}, {policy}")

        started = time.perf_counter()
        history = fit(model, config, splits, callbacks=[run.epoch_callback(), *callbacks])
        fit_seconds = time.perf_counter() - started

        log("evaluating on train, val and test")
        metrics: dict[str, float] = {}
        probabilities = {}
        for split, (x, y) in {"train": (splits.x_train, splits.y_train), "val": (splits.x_val, splits.y_val),
                              "test": (splits.x_test, splits.y_test)}.items():
            probabilities[split] = predict_probabilities(model, x, config.train.batch_size)
            metrics.update(evaluation.split_metrics(split, y, probabilities[split]))
        metrics["fit_seconds"] = fit_seconds
        metrics["epochs_run"] = float(len(history.get("loss", [])))

        figures = {
            "confusion_matrix": evaluation.confusion_matrix_figure(
                splits.y_test, probabilities["test"], splits.class_names, f"{config.exp_id}: test confusion matrix"),
            "learning_curves": evaluation.learning_curves_figure(history, config.exp_id),
        }
        report = evaluation.per_class_report(splits.y_test, probabilities["test"], splits.class_names)
        run.log_results(metrics, report, figures)
        for figure in figures.values():
            evaluation.close(figure)

        model_uri = run.log_model(model, splits.num_classes, example=splits.x_test[:2])
        if register:
            version = run.register(model_uri, metrics)
            log(f"registered {tracking.registered_model_name(config.family)} version {version}")
        log(" ".join(f"{k}={metrics[k]:.4f}" for k in ("train_accuracy", "val_accuracy", "test_accuracy", "test_f1_macro")))
        return metrics
