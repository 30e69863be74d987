"""BatchNorm statistics that match the weights: "precise BN" (Wu and Johnson 2021, "Rethinking 'Batch' in
BatchNorm", section 3).

A BatchNormalization layer normalises with the batch's own statistics in training and with moving averages
of them at inference. Those averages lag the weights by about 1 / (1 - momentum) steps and start from
(0, 1): Keras's MobileNetV2 and DenseNet-121 build theirs with momentum 0.999 and 0.99, so a training of a
few hundred steps evaluates with statistics that belong to no set of weights, and the model predicts one
class. Before every evaluation that counts (each epoch's validation, hence the final evaluation, the
checkpoints and the registered model, which all follow an epoch's end), `recompute` replaces them with the
mean of the batch statistics of the current, frozen weights over a fixed number of training images.

Only layers that train are recomputed: a frozen backbone (transfer learning's warm-up) keeps its ImageNet
statistics, and Keras runs its BatchNorm layers in inference mode anyway.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

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


def recompute(model: keras.Model, batches: Batches, images: int) -> int:
    """Set the moving statistics of `model`'s training BatchNorm layers to the mean of their batch statistics
    over the first batches of `batches` (training batches, augmented as in training) holding at least `images`
    images, with the weights unchanged; return the images used (0: nothing to recompute).

    Batch i (from 1) is forwarded in training mode with momentum (i - 1) / i, so after n batches each moving
    mean and variance is the plain mean of the n batch values, as in Wu and Johnson's implementation.
    """
    layers = trainable_batchnorms(model)
    if not layers or images <= 0:
        return 0
    momentums = [layer.momentum for layer in layers]
    seen = 0
    try:
        for i in range(min(len(batches), -(-images // batches.batch_size))):
            x, _ = batches[i]
            for layer in layers:
                layer.momentum = i / (i + 1)
            model(x, training=True)
            seen += len(x)
    finally:
        for layer, momentum in zip(layers, momentums):
            layer.momentum = momentum
    return seen
