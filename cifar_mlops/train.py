"""train(config) -> metrics: the one training routine.

Load data, build the registered model, compile, fit (with a frozen-backbone
warm-up first when the config asks for transfer learning), evaluate on train,
val and test, and track all of it in one MLflow run; register the model when
everything above succeeded.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from cifar_mlops import backend, data, evaluation
from cifar_mlops.batchnorm import seed_generators
from cifar_mlops.config import DataConfig, ExperimentConfig, TrainConfig, check_kind, flatten, with_overrides
from cifar_mlops.errors import UserError, first_line
from cifar_mlops.models import create_model, init_from_data
from cifar_mlops.progress import detail, keras_verbosity, log
from cifar_mlops.tracking import registry, runs
from cifar_mlops.tracking.image_model import flip_averaged, predict_in_batches


class TrainingFailed(UserError):
    """Training could not go on (e.g. the loss diverged, or the experiment is not a training); the message says what to change."""


# the fit's times a training logs (`FitClock`); `ablation_stats.compute_seconds` chooses what counts of them
FIT_TIMES = ("fit_seconds", "fit_cpu_seconds", "fit_gpu_seconds")


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
    """Compile with every variable of the training step made here. On TensorFlow, Keras otherwise creates
    the optimizer's slots and a metric named by a string inside the first trace of the training step, and
    TensorFlow traces a step that created variables twice: for MobileNetV2 about 10 s more per phase."""
    import keras

    model.compile(
        optimizer=build_optimizer(cfg, learning_rate, total_steps),
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=cfg.label_smoothing),
        metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")],  # the labels are one-hot
        steps_per_execution=cfg.steps_per_execution,
    )
    model.optimizer.build(model.trainable_variables)  # after `trainable` is set: a frozen backbone gets no slots


# The models measured to train as accurately and faster in mixed_bfloat16 than in float32 on a CPU with
# bfloat16 instructions, on TensorFlow (benchmarks/RESULTS.md: "bfloat16 on this CPU" for cnn_b5, 3 seeds;
# "Beyond study B's rules" for cnn_b9, one seed in each); every other model was slower there (MobileNetV2's
# depthwise convolutions) or was not measured, and stays float32 on a CPU.
CPU_BFLOAT16_MODELS = frozenset({"cnn_b5", "cnn_b9"})


def dtype_policy(cfg: TrainConfig, model_name: str) -> str:
    """The Keras dtype policy `train.precision` means on this machine for this model. auto: mixed_float16
    where a GPU is visible; on a CPU, mixed_bfloat16 for CPU_BFLOAT16_MODELS where the CPU has bfloat16
    instructions and the backend is TensorFlow (where it was measured), else float32."""
    if cfg.precision != "auto":
        return cfg.precision
    if backend.gpu_count():
        return "mixed_float16"
    if model_name in CPU_BFLOAT16_MODELS and backend.current() == "tensorflow" and backend.cpu_has_bfloat16():
        return "mixed_bfloat16"
    return "float32"


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


def validate_each_epoch(val_ds, bn_batches, bn_images: int):
    """At each epoch's end, first of the callbacks that read its logs: set the BatchNorm statistics from the
    epoch's weights (`batchnorm.recompute` over `bn_images` training images), then evaluate the validation
    split and add `val_loss` and `val_accuracy` to the epoch's logs, where early stopping, Optuna's pruning,
    the run's curves and the checkpoint read them. (Keras's own validation runs before any callback could
    correct the statistics.)"""
    import keras

    from cifar_mlops import batchnorm

    class ValidateEachEpoch(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.forward = {}  # the compiled forward pass, per set of training BatchNorm layers (warm-up freezes some)

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            bn_batches.clock.epoch = epoch  # the epoch's own order and augmentation: a resumed run draws the same
            layers = tuple(id(layer) for layer in batchnorm.trainable_batchnorms(self.model))
            if layers not in self.forward:
                self.forward[layers] = batchnorm.compiled_forward(self.model)
            batchnorm.recompute(self.model, bn_batches, bn_images, self.forward[layers])
            results = self.model.evaluate(val_ds, verbose=0, return_dict=True)
            if logs is not None:
                logs.update({f"val_{name}": float(value) for name, value in results.items()})

    return ValidateEachEpoch()


def follow_epochs(clock):
    """Tells the training batches' `pipeline.EpochClock` which epoch begins, before Keras starts that epoch's pass over it."""
    import keras

    class FollowEpochs(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
            clock.epoch = epoch

    return FollowEpochs()


def random_state(model) -> list[list[int]]:
    """The state of the model's own random generators (dropout): `model.save` does not keep it."""
    return [[int(v) for v in variable.numpy()] for variable in seed_generators(model)]


def restore_random_state(model, states: list[list[int]]) -> None:
    variables = seed_generators(model)
    if len(variables) != len(states):
        raise TrainingFailed(f"the checkpoint holds {len(states)} random generator states, the model has "
                             f"{len(variables)}; it was written by another version of the model")
    for variable, state in zip(variables, states):
        variable.assign(state)


def resumable(config: ExperimentConfig, parent_run_id: str | None) -> bool:
    """Whether a training writes checkpoints: a training of its own (tuning trials and ablation runs are run
    again by their queue instead) with train.checkpoint_every > 0 and no early stopping (its state is not kept)."""
    cfg = config.train
    return parent_run_id is None and cfg.checkpoint_every > 0 and cfg.early_stopping_patience is None


class FitClock:
    """The fit's times (FIT_TIMES) from its start, added to those of the epochs a resumed run trained before:
    `fit_seconds` wall-clock; `fit_cpu_seconds` the CPU time of this process (user + system, every thread: Keras's,
    the input pipeline's, the tracking's; in a worker process, that worker's own), `time.process_time`;
    `fit_gpu_seconds` the wall-clock x `gpus`, the GPUs the training runs on (0 on a CPU)."""

    def __init__(self, gpus: int, before: Mapping[str, Any] | None = None) -> None:
        # before: a resumed run's checkpoint state. One written before CPU and GPU time were measured lacks them:
        # the run then logs fit_seconds alone (what its whole fit took is not known), as the ones before it did.
        self.gpus = gpus
        self.before = ({name: 0.0 for name in FIT_TIMES} if before is None else
                       {name: float(before[name]) for name in FIT_TIMES if name in before})
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def state(self) -> dict[str, float]:
        """The times so far, for a checkpoint: every one known (fit_gpu_seconds 0.0 on a CPU)."""
        wall, cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu
        spent = {"fit_seconds": wall, "fit_cpu_seconds": cpu, "fit_gpu_seconds": wall * self.gpus}
        return {name: self.before[name] + spent[name] for name in FIT_TIMES if name in self.before}

    def metrics(self) -> dict[str, float]:
        """The times so far, as the run logs them: fit_gpu_seconds only where a GPU trained."""
        return {name: value for name, value in self.state().items() if name != "fit_gpu_seconds" or value > 0}


def checkpointing(run: runs.TrainingRun, config: ExperimentConfig, history: dict[str, list[float]],
                  clock: FitClock):
    """Writes the run's checkpoint at the end of every `train.checkpoint_every` epochs: the model with its
    optimizer state, the epochs done, the model's random state, the history so far (the data order of
    every epoch follows from train.seed and the epoch) and the fit's times (`clock`). It collects the history
    of the epochs it sees."""
    import keras

    every = config.train.checkpoint_every

    class Checkpointing(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.history = {key: list(values) for key, values in history.items()}

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            for key, value in (logs or {}).items():
                self.history.setdefault(key, []).append(float(value))
            if (epoch + 1) % every == 0:
                run.log_checkpoint(self.model, {
                    "format": 1, "epoch": epoch + 1, "seed": config.train.seed, "history": self.history,
                    **clock.state(),
                    "random_state": random_state(self.model), "keras": keras.__version__})

    return Checkpointing()


def training_phases(config: ExperimentConfig) -> list[tuple[int, int, float, bool]]:
    """(first epoch, end epoch, learning rate, backbone frozen) for each fit call."""
    cfg = config.train
    if cfg.warmup_epochs == 0:
        return [(0, cfg.epochs, cfg.learning_rate, False)]
    return [(0, cfg.warmup_epochs, cfg.learning_rate, True),
            (cfg.warmup_epochs, cfg.epochs, cfg.learning_rate * cfg.finetune_lr_factor, False)]


def fit(model, config: ExperimentConfig, splits: data.Splits, callbacks: Iterable = (),
        start: int = 0, devices: int = 1) -> dict[str, list[float]]:
    """Fit `model` on the training split, validating each epoch; return the merged Keras history.

    `devices`: how many a data-parallel training splits each batch between (`backend.data_parallel`).
    `start`: the epochs done already (a resumed training, `model` loaded from their checkpoint,
    compiled, with its optimizer state): phases ending before it are skipped, the one holding it
    goes on with that optimizer, and the history returned is of the epochs trained here.
    """
    import keras

    from cifar_mlops.pipeline import Batches, EpochClock

    cfg = config.train
    clock = EpochClock(start)
    train_ds = Batches(splits.x_train, splits.y_train, batch_size=cfg.batch_size, num_classes=splits.num_classes,
                       training=True, augment=config.augment, seed=cfg.seed, clock=clock, multiple_of=devices)
    val_ds = Batches(splits.x_val, splits.y_val, batch_size=cfg.batch_size, num_classes=splits.num_classes,
                     training=False, multiple_of=devices)
    bn_ds = Batches(splits.x_train, splits.y_train, batch_size=cfg.batch_size, num_classes=splits.num_classes,
                    training=True, augment=config.augment, seed=cfg.seed, clock=EpochClock(start),
                    multiple_of=devices)
    steps_per_epoch = len(train_ds)  # the batches an epoch has (with several devices, maybe one fewer)
    class_weight = data.class_weights(splits.y_train, splits.num_classes) if cfg.class_weight == "balanced" else None
    callbacks = [follow_epochs(clock), stop_on_nan(), validate_each_epoch(val_ds, bn_ds, cfg.bn_recompute_images),
                 *callbacks]
    if cfg.early_stopping_patience:
        callbacks.append(keras.callbacks.EarlyStopping(monitor="val_accuracy", patience=cfg.early_stopping_patience,
                                                       restore_best_weights=True))
    verbose = keras_verbosity()  # 0 inside ablate / tune / train --seeds (their bar), unless --verbose
    history: dict[str, list[float]] = {}
    for first, end, learning_rate, frozen in training_phases(config):
        if end <= start:
            continue
        if first >= start:
            if frozen or first > 0:
                model.get_layer("backbone").trainable = not frozen
                detail(f"epochs {first + 1}-{end}: backbone {'frozen' if frozen else 'fine-tuned'}, "
                       f"learning rate {learning_rate:g}")
            compile_model(model, cfg, learning_rate, (end - first) * steps_per_epoch)
        else:  # resumed inside this phase: the checkpoint's model is compiled for it
            log(f"epochs {start + 1}-{end}: going on from the checkpoint after epoch {start}")
        phase = model.fit(train_ds, epochs=end, initial_epoch=max(first, start),
                          class_weight=class_weight, callbacks=callbacks, verbose=verbose,
                          shuffle=False)  # the dataset orders each epoch itself (data.epoch_order)
        for key, values in phase.history.items():
            history.setdefault(key, []).extend(float(v) for v in values)
        if model.stop_training:  # early stopping ends the whole run, not just this phase
            break
    return history


def predictor(model, devices: int) -> Callable:
    """One batch -> its probabilities. `predict_on_batch` skips `predict`'s per-call set-up, but under a
    TensorFlow MirroredStrategy it runs the whole batch on every device and returns every copy."""
    if devices == 1:
        return model.predict_on_batch
    return lambda images: model.predict(images, batch_size=len(images), verbose=0)


def tracked_splits(run: runs.TrainingRun, data_config: DataConfig, splits: data.Splits | None = None) -> data.Splits:
    """The splits a run uses, loaded here unless a caller that runs many times passes them, and logged."""
    if splits is None:
        detail("loading data")
        splits = data.load_splits(data_config)
    detail(f"data: {splits.source} from {splits.location}: "
           f"{len(splits.y_train)} train / {len(splits.y_val)} val / {len(splits.y_test)} test images")
    run.log_data(splits)
    return splits


@dataclass
class ResumedTraining:
    """A run to go on with (`runs.resume_point`) and the model loaded from its checkpoint."""

    point: runs.ResumePoint
    model: Any


@dataclass(frozen=True)
class RunContext:
    """Where a training's run goes and who is told about it: built by the caller of `train` (the CLI and the
    MLproject entry points, tuning, ablations), which the training itself does not need to know about."""

    experiment: str = runs.ABLATION_EXPERIMENT  # the MLflow experiment of a new run
    parent_run_id: str | None = None  # a nested run under this one (a tuning trial's, an ablation's)
    tags: Mapping[str, Any] = field(default_factory=dict)  # set on the run as soon as it exists
    on_start: Callable[[str], None] | None = None  # called with the run's id once it is described
    resume: ResumedTraining | None = None  # go on in that run from its checkpoint (see `resume()`)


def train(config: ExperimentConfig, context: RunContext | None = None, *, splits: data.Splits | None = None,
          callbacks: Iterable = (), register: bool = True) -> dict[str, float]:
    """Train, evaluate, track and (if `register`) register experiment `config`; return its metrics.

    `context`: where its run goes (default: a new run of its own in `cifar10-ablation`, or the one `mlflow run`
    made); `splits` lets a caller that trains many times (tuning) load the data once.
    """
    import keras

    context = context or RunContext()
    resume = context.resume
    check_kind(config, "train")
    checkpoints = resumable(config, context.parent_run_id)
    if resume is None:  # before any device scope opens: clearing the session would end it
        keras.backend.clear_session()
        keras.utils.set_random_seed(config.train.seed)
    if register:  # a user who may not register learns it before any run starts or epoch trains
        registry.check_may_register(config.family, None if resume else context.experiment)
    # the devices first: a training that cannot have them starts no run
    with backend.data_parallel(config.train.devices, config.train.batch_size) as devices, \
            runs.TrainingRun(config, experiment=context.experiment, parent_run_id=context.parent_run_id,
                             tags=context.tags, on_start=context.on_start, resume=resume.point if resume else None,
                             heartbeat=checkpoints) as run:
        detail(f"{config.exp_id}: tracking {run.url_hint}")
        splits = tracked_splits(run, config.data, splits)

        if resume is None:
            policy = dtype_policy(config.train, config.model.name)
            run.log(params={"train.dtype_policy": policy, "train.backend": keras.backend.backend()})
            with building_with_policy(policy):  # the model keeps it; compile adds loss scaling for mixed_float16
                model = create_model(config.model.name, num_classes=splits.num_classes, **config.model.settings())
            detail(f"model {config.model.name}: {model.count_params():,} parameters, input 32x32 uint8 -> "
                   f"{config.model.image_size}x{config.model.image_size} {config.model.interpolation}, {policy}, "
                   f"on {keras.backend.backend()}" + (f", {devices} devices" if devices > 1 else ""))
            for name in init_from_data(model, splits.x_train, seed=config.train.seed):
                detail(f"layer {name} set from the training images")
            start, history, fit_before = 0, {}, None
        else:
            model, state = resume.model, resume.point.state
            start, history, fit_before = resume.point.epoch, state["history"], state
            log(f"resuming after epoch {start} of {config.train.epochs}, from the run's checkpoint")

        fit_callbacks = [run.epoch_callback(), *callbacks]
        clock = FitClock(devices if backend.gpu_count() else 0, fit_before)
        if checkpoints:  # after the epoch's metrics are logged: a checkpoint never runs ahead of them
            fit_callbacks.append(checkpointing(run, config, history, clock))
        trained = fit(model, config, splits, callbacks=fit_callbacks, start=start, devices=devices)
        fit_times = clock.metrics()
        history = {key: [*history.get(key, []), *trained.get(key, [])] for key in {*history, *trained}}

        detail("evaluating on train, val and test" + (", with test-time flips" if config.model.test_time_flip else ""))
        predict = predictor(model, devices)
        if config.model.test_time_flip:  # as the logged model predicts where it is served
            predict = flip_averaged(predict)
        probabilities = {split: predict_in_batches(predict, x, config.train.batch_size)
                         for split, (x, _) in splits.by_split().items()}
        metrics, texts, figures = evaluation.evaluate(splits, probabilities, config.exp_id)
        metrics.update(fit_times)
        metrics["epochs_run"] = float(len(history.get("loss", [])))
        figures["learning_curves"] = evaluation.learning_curves_figure(history, config.exp_id)
        run.log_results(metrics, texts, figures)
        evaluation.close(figures)

        model_uri = run.log_trained_model(model, splits.class_names, config.train.batch_size)
        if register:
            version = run.register(model_uri, metrics)
            name = registry.registration_name(config.family)
            log(f"registered {name} version {version}: {run.version_link(name, version)}")
        detail(" ".join(f"{k}={metrics[k]:.4f}" for k in ("train_accuracy", "val_accuracy", "test_accuracy", "test_f1_macro")))
        return metrics


def resume(run_id: str, *, force: bool = False, exp_id: str | None = None, overrides: dict[str, Any] | None = None,
           register: bool = True, callbacks: Iterable = ()) -> dict[str, float]:
    """Go on with training run `run_id` from its checkpoint, in that run; return its metrics.

    It trains with the run's own config.yaml: `exp_id` and `overrides`, when given, must agree with it,
    except `data.data_dir`, where its images are on this machine (they must be the same images: the
    data fingerprint is checked). Whatever is refused (see `runs.resume_point`) changes nothing.
    """
    import keras

    point = runs.resume_point(run_id, force=force)
    try:
        config = resumed_config(point, exp_id, overrides or {})
        splits = data.load_splits(config.data)
        if splits.fingerprint != point.tags.get("data_fingerprint"):
            raise runs.ResumeRefused(f"the images found ({splits.location}) are not the ones run {run_id} trained on "
                                     "(another data fingerprint); pass --data-dir with that CIFAR-10 folder", run_id)
        keras.backend.clear_session()
        keras.utils.set_random_seed(config.train.seed)
        # the model is loaded where it will train: on its devices
        with backend.data_parallel(config.train.devices, config.train.batch_size):
            try:
                model = keras.saving.load_model(point.model_path)
                restore_random_state(model, point.state["random_state"])
            except Exception as err:  # noqa: BLE001 - Keras raises many kinds for a file it cannot load
                raise runs.ResumeRefused(f"the checkpoint of run {run_id} cannot be loaded "
                                         f"({first_line(err, typed=True, limit=200)})",
                                         run_id) from None
            return train(config, RunContext(resume=ResumedTraining(point, model)), splits=splits, callbacks=callbacks,
                         register=register)
    finally:
        point.close()


def resumed_config(point: runs.ResumePoint, exp_id: str | None, overrides: dict[str, Any]) -> ExperimentConfig:
    """The config a resumed run trains with: its own; `exp_id` and `overrides` may only repeat it (or move
    `data.data_dir`)."""
    config = point.config
    if exp_id and exp_id != config.exp_id:
        raise runs.ResumeRefused(f"run {point.run_id} is a training of {config.exp_id}, not {exp_id}; a resumed run "
                                 "keeps its own config (drop --exp)", point.run_id)
    if not overrides:
        return config
    changed = with_overrides(config, overrides, f"config.yaml of run {point.run_id}")
    before, after = flatten(config.model_dump(mode="json")), flatten(changed.model_dump(mode="json"))
    differ = [key for key in after if after[key] != before.get(key) and key != "data.data_dir"]
    if differ:
        key = differ[0]
        raise runs.ResumeRefused(f"--set {key}={after[key]}: run {point.run_id} trains with {key}={before.get(key)}, "
                                 "and a resumed run keeps the config it started with (drop that --set)", point.run_id)
    return changed
