"""BatchNorm statistics that match the weights: "precise BN" (Wu and Johnson 2021, "Rethinking 'Batch' in
BatchNorm", section 3).

A BatchNormalization layer normalises with the batch's own statistics in training and with moving averages
of them at inference. Those averages lag the weights by about 1 / (1 - momentum) steps and start from
(0, 1): Keras's MobileNetV2 and DenseNet-121 build theirs with momentum 0.999 and 0.99, so a training of a
few hundred steps evaluates with statistics that belong to no set of weights, and the model predicts one
class. Before every evaluation that counts (each epoch's validation, hence the final evaluation, the
checkpoints and the registered model, which all follow an epoch's end), `recompute` replaces them with the
mean of the batch statistics of the current, unchanged weights over a fixed number of training images.

Only layers that train are recomputed: a frozen backbone (transfer learning's warm-up) keeps its ImageNet
statistics, and Keras runs its BatchNorm layers in inference mode anyway.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import keras

    from cifar_mlops.pipeline import Batches


def trainable_batchnorms(model: keras.Model) -> list:
    """The BatchNormalization layers of `model` (nested models included) that train."""
    import keras

    def walk(layer) -> Iterator:
        for child in getattr(layer, "layers", ()):
            yield child
            yield from walk(child)

    return [layer for layer in walk(model)
            if isinstance(layer, keras.layers.BatchNormalization) and layer.trainable]


def seed_generators(model: keras.Model) -> list:
    """The state variables of `model`'s random generators (its dropout layers' seed generators): what `recompute`
    puts back after its forward passes, and what a checkpoint keeps (`train.random_state`)."""
    return [v for v in model.non_trainable_variables if v.path.endswith("seed_generator_state")]


def recompute(model: keras.Model, batches: Batches, images: int, forward: Callable | None = None) -> int:
    """Set the moving statistics of `model`'s training BatchNorm layers to the mean of their batch statistics
    over the first batches of `batches` (training batches, augmented as in training) holding at least `images`
    images, with the weights unchanged; return the images used (0: nothing to recompute).

    Each batch is forwarded in training mode with momentum 0, so the moving statistics become that batch's;
    they are summed here and their mean assigned at the end, as in Wu and Johnson's implementation.
    `forward(x)`: `model(x, training=True)`, compiled (`compiled_forward`) where a caller recomputes often.
    """
    import keras

    layers = trainable_batchnorms(model)
    if not layers or images <= 0:
        return 0
    forward = forward or (lambda x: model(x, training=True))
    momentums = [layer.momentum for layer in layers]
    # the forward passes draw dropout masks: the generators are put back, so the training goes on as without them
    generators = seed_generators(model)
    generator_states = [keras.ops.convert_to_numpy(v) for v in generators]
    sums = [np.zeros((2, *layer.moving_mean.shape), np.float64) for layer in layers]
    count = batches_used = 0
    try:
        for layer in layers:
            layer.momentum = 0.0
        for i in range(min(len(batches), -(-images // batches.batch_size))):
            x, _ = batches[i]
            forward(x)
            for layer, total in zip(layers, sums):
                total += [keras.ops.convert_to_numpy(layer.moving_mean), keras.ops.convert_to_numpy(layer.moving_variance)]
            count += len(x)
            batches_used = i + 1
    finally:
        for layer, momentum in zip(layers, momentums):
            layer.momentum = momentum
        for variable, state in zip(generators, generator_states):
            variable.assign(state)
    for layer, total in zip(layers, sums):
        layer.moving_mean.assign(total[0] / batches_used)
        layer.moving_variance.assign(total[1] / batches_used)
    return count


def compiled_forward(model: keras.Model) -> Callable:
    """`model(x, training=True)` for `recompute`: a `tf.function` on TensorFlow, where a call outside a graph
    runs layer by layer and costs about as much as a whole training step (measured on MobileNetV2); the plain
    call on JAX and PyTorch. The graph keeps the momentum it was traced with: trace it inside `recompute`."""
    import keras

    if keras.backend.backend() != "tensorflow":
        return lambda x: model(x, training=True)
    import tensorflow as tf

    return tf.function(lambda x: model(x, training=True), reduce_retracing=True)
