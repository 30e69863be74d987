"""BatchNorm statistics that match the weights (cifar_mlops.batchnorm): recomputed before every evaluation that
counts, so what is validated, logged, pruned on and registered is the model its weights make."""

from __future__ import annotations

import keras
import mlflow
import numpy as np
import pytest

from cifar_mlops import batchnorm
from cifar_mlops.models import create_model
from cifar_mlops.pipeline import Batches
from cifar_mlops.train import train
from tests.conftest import tiny

pytestmark = pytest.mark.core


def conv_bn_model(momentum: float = 0.999) -> keras.Model:
    inputs = keras.Input((32, 32, 3), dtype="uint8")
    x = keras.layers.Rescaling(1 / 255)(inputs)
    x = keras.layers.Conv2D(4, 3, name="conv")(x)
    x = keras.layers.BatchNormalization(momentum=momentum, name="bn")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(10, activation="softmax")(x))


def images(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, n)


def first_bn_input_mean(model: keras.Model, x: np.ndarray) -> np.ndarray:
    """The mean per channel of what a MobileNetV2's first BatchNorm (bn_Conv1) receives for images `x` (no
    BatchNorm comes before it, so training and inference mode give the same values)."""
    backbone = model.get_layer("backbone")
    probe = keras.Model(backbone.inputs, backbone.get_layer("bn_Conv1").input)
    values = probe(model.get_layer("normalize")(x), training=False)
    return keras.ops.convert_to_numpy(values).mean(axis=(0, 1, 2))


def test_recompute_sets_the_mean_of_the_batch_statistics_and_keeps_the_momentum() -> None:
    model = conv_bn_model(momentum=0.999)
    x, y = images(96)
    batches = Batches(x, y, batch_size=32, num_classes=10, training=True)
    seen = batchnorm.recompute(model, batches, images=64)  # the first two batches of epoch 0

    assert seen == 64
    bn = model.get_layer("bn")
    assert bn.momentum == 0.999
    conv = keras.Model(model.inputs, model.get_layer("conv").output)
    used = np.concatenate([batches[0][0], batches[1][0]])
    outputs = keras.ops.convert_to_numpy(conv(used)).reshape(2, 32, -1, 4)  # (batch, image, position, channel)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(bn.moving_mean), outputs.mean(axis=(0, 1, 2)),
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(bn.moving_variance), outputs.var(axis=(1, 2)).mean(axis=0),
                               rtol=1e-3, atol=1e-5)


def test_a_frozen_batchnorm_keeps_its_statistics() -> None:
    model = conv_bn_model()
    bn = model.get_layer("bn")
    before = [keras.ops.convert_to_numpy(v).copy() for v in (bn.moving_mean, bn.moving_variance)]
    bn.trainable = False
    x, y = images(32)

    assert batchnorm.recompute(model, Batches(x, y, batch_size=32, num_classes=10, training=True), 32) == 0
    for variable, value in zip((bn.moving_mean, bn.moving_variance), before):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(variable), value)


def test_a_frozen_backbone_keeps_its_statistics_and_the_head_still_counts() -> None:
    model = create_model("mobilenetv2", width=0.35, dropout=0.2)
    assert batchnorm.trainable_batchnorms(model)  # nested in the backbone, found
    model.get_layer("backbone").trainable = False
    assert batchnorm.trainable_batchnorms(model) == []


def test_each_epoch_is_validated_with_the_statistics_of_its_weights(store) -> None:
    """What every later callback (early stopping, Optuna's pruning, the run's curves, the checkpoint) reads at an
    epoch's end: the first BatchNorm's moving mean is the mean of its inputs over the training images under the
    epoch's weights, not Keras's lagging average, and val_accuracy is the accuracy of that model."""
    seen: list[tuple[float, float, np.ndarray, np.ndarray]] = []

    class Probe(keras.callbacks.Callback):
        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            bn = self.model.get_layer("backbone").get_layer("bn_Conv1")
            evaluated = self.model.evaluate(val, verbose=0, return_dict=True)["accuracy"]
            seen.append((logs["val_accuracy"], evaluated, keras.ops.convert_to_numpy(bn.moving_mean),
                         first_bn_input_mean(self.model, splits_x)))

    # 2.4 is MobileNetV2 (momentum 0.999) at batch 256; 64 training images in two batches of 32, all recomputed.
    config = tiny("2.4", train__epochs=2, data__synthetic_train_pool=104, data__val_size=40,
                  train__bn_recompute_images=1024)
    from cifar_mlops import data

    splits = data.load_splits(config.data)
    splits_x = splits.x_train
    val = Batches(splits.x_val, splits.y_val, batch_size=32, num_classes=10, training=False)
    metrics = train(config, splits=splits, callbacks=[Probe()], register=False)

    assert len(seen) == 2
    for logged, evaluated, moving_mean, input_mean in seen:
        assert logged == pytest.approx(evaluated, abs=1e-6)
        np.testing.assert_allclose(moving_mean, input_mean, rtol=0.02, atol=1e-3)
    assert metrics["val_accuracy"] == pytest.approx(seen[-1][0], abs=1e-6)  # the final evaluation: the same model
    # the logged model, what is registered and served, holds the last epoch's statistics
    [run] = mlflow.search_runs(search_all_experiments=True, output_format="list")
    served = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model").unwrap_python_model()
    logged = served.member_models[0].get_raw_model().get_layer("backbone").get_layer("bn_Conv1")
    np.testing.assert_allclose(keras.ops.convert_to_numpy(logged.moving_mean), seen[-1][2], rtol=1e-6, atol=1e-7)


def test_recomputing_nothing_keeps_the_moving_averages(store) -> None:
    """bn_recompute_images=0: Keras's moving averages are evaluated as they are (0.999 over 4 steps: still
    about their initial zeros), the contrast that shows the test above measures the recomputation."""
    config = tiny("2.4", train__epochs=2, data__synthetic_train_pool=104, data__val_size=40,
                  train__bn_recompute_images=0)
    moving: list[np.ndarray] = []

    class Probe(keras.callbacks.Callback):
        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            bn = self.model.get_layer("backbone").get_layer("bn_Conv1")
            moving.append(keras.ops.convert_to_numpy(bn.moving_mean))

    train(config, callbacks=[Probe()], register=False)
    assert np.abs(moving[-1]).max() < 0.05
