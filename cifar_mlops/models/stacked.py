"""Beyond study B's rules: a CNN with two convolutions per stage (a VGG-style stack).

Study B forbids known architectures; b9 lifts that rule (and the no-augmentation rule) to see
how far this project gets on the sample. The network follows the small fast CIFAR-10 trainers:
an optional fixed patch-whitening first layer (the same as study B's, set by
`cnn.init_whitening`), then per stage a convolution, max pooling, batch normalization and GELU,
a second convolution with batch normalization and GELU; a global max pool and the classifier.
No residual connections: every convolution feeds the next.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cifar_mlops.models.cnn import FAMILY, whitening
from cifar_mlops.models.registry import register_model

if TYPE_CHECKING:  # pragma: no cover
    import keras


def stacked_cnn(name: str, stages: tuple[int, ...], *, num_classes: int = 10, width: float = 1.0,
                dropout: float = 0.0, whiten: int = 0) -> keras.Model:
    """Stages of [conv -> max-pool -> batchnorm -> gelu -> conv -> batchnorm -> gelu], global max pooling,
    (dropout), softmax.

    stages: filters per stage (before `width`). The settings: width multiplies every filter count;
    dropout: a rate before the classifier (0: none); whiten: the side of the patches a fixed first
    layer whitens (0: none), set from the training images by `cnn.init_whitening` before training.
    """
    import keras
    from keras import layers

    inputs = keras.Input(shape=(32, 32, 3), dtype="uint8", name="image")
    x = layers.Rescaling(1 / 255, name="rescale")(inputs)  # also casts uint8 -> float32
    if whiten:
        x = layers.Activation("gelu", name="whiten_gelu")(whitening(x, whiten))
    for i, filters in enumerate(stages, start=1):
        filters = max(4, round(filters * width))
        for part in ("a", "b"):
            x = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"conv{i}{part}")(x)
            if part == "a":  # pooled right after the first convolution: the second runs at a quarter of the cost
                x = layers.MaxPooling2D(name=f"pool{i}")(x)
            # momentum 0.9 (Keras: 0.99): a few thousand images make ~30 steps an epoch (see cnn.plain_cnn)
            x = layers.BatchNormalization(momentum=0.9, name=f"bn{i}{part}")(x)
            x = layers.Activation("gelu", name=f"gelu{i}{part}")(x)
    x = layers.GlobalMaxPooling2D(name="max_pool")(x)
    if dropout:
        x = layers.Dropout(dropout, name="dropout")(x)
    outputs = layers.Dense(num_classes, activation="softmax", dtype="float32", name="probabilities")(x)
    return keras.Model(inputs, outputs, name=name)


@register_model("cnn_b9", family=FAMILY, settings_of=stacked_cnn)
def cnn_b9(**settings) -> keras.Model:
    """Beyond the study's rules: two convolutions per stage (VGG-style), 64-128-256 filters, GELU, global max pooling."""
    return stacked_cnn("cnn_b9", stages=(64, 128, 256), **settings)
