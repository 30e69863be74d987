"""Study B: small CNNs trained from scratch, one factory per iteration.

Study B's constraints hold for every model here: no known architecture (no
residual connections, no dense concatenation, one convolution per stage rather
than a VGG stack), and no augmentation inside the model. Each iteration is a
tiny function calling `_plain_cnn`; the first line of its docstring says what
changed against the previous iteration (the catalogue shows it).

`config.width` multiplies every filter count and hidden unit; `config.dropout`,
when set, replaces an iteration's own dropout rate before the classifier;
`config.image_size` resizes the 32x32 input first (skipped at 32).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cifar_mlops.models import register_model

if TYPE_CHECKING:  # pragma: no cover
    import keras

    from cifar_mlops.config import ModelConfig

FAMILY = "cnn"


def _plain_cnn(
    config: "ModelConfig",
    num_classes: int,
    *,
    stages: tuple[int, ...],
    kernel: int | tuple[int, ...] = 3,
    batchnorm: bool = False,
    dropout: float = 0.0,
    dense_units: int = 0,
    head: str = "flatten",
) -> "keras.Model":
    """Stages of [conv -> (batchnorm) -> relu -> max-pool], then a head -> (dropout) -> softmax.

    stages: filters per stage (before `config.width`); kernel: one size, or one per stage;
    dropout: right before the classifier (`config.dropout` replaces it when set); dense_units: 0 for none;
    head: "flatten" (keeps positions) or "avg" (global average pooling).
    """
    import keras
    from keras import layers

    if config.blocks is not None:
        raise ValueError(f"model.blocks is a DenseNet setting; {config.name} does not use it")
    if config.weights is not None:
        raise ValueError(f"model.weights: {config.name} trains from scratch (no pretrained weights); remove it")
    kernels = (kernel,) * len(stages) if isinstance(kernel, int) else kernel
    scale = lambda n: max(4, round(n * config.width))  # noqa: E731

    inputs = keras.Input(shape=(32, 32, 3), dtype="uint8", name="image")
    x = inputs
    if config.image_size != 32:
        x = layers.Resizing(config.image_size, config.image_size, interpolation=config.interpolation, name="resize")(x)
    x = layers.Rescaling(1 / 255, name="rescale")(x)  # also casts uint8 -> float32
    for i, (filters, size) in enumerate(zip(stages, kernels), start=1):
        x = layers.Conv2D(scale(filters), size, padding="same", use_bias=not batchnorm, name=f"conv{i}")(x)
        if batchnorm:
            # momentum 0.9, not Keras's 0.99: with ~80 steps per epoch on 5,000 images the moving
            # statistics would otherwise lag for several epochs and validation sits near chance.
            x = layers.BatchNormalization(momentum=0.9, name=f"bn{i}")(x)
        x = layers.Activation("relu", name=f"relu{i}")(x)
        x = layers.MaxPooling2D(name=f"pool{i}")(x)
    x = layers.GlobalAveragePooling2D(name="avg_pool")(x) if head == "avg" else layers.Flatten(name="flatten")(x)
    if dense_units:
        x = layers.Dense(scale(dense_units), activation="relu", name="dense")(x)
    dropout = config.dropout or dropout
    if dropout:
        x = layers.Dropout(dropout, name="dropout")(x)
    outputs = layers.Dense(num_classes, activation="softmax", dtype="float32", name="probabilities")(x)
    return keras.Model(inputs, outputs, name=config.name)


@register_model("cnn_tiny", family=FAMILY)
def cnn_tiny(config: "ModelConfig", num_classes: int) -> "keras.Model":
    """Smoke-test CNN: two narrow stages, global average pooling; trains in seconds."""
    return _plain_cnn(config, num_classes, stages=(8, 16), head="avg")


@register_model("cnn_b0", family=FAMILY)
def cnn_b0(config: "ModelConfig", num_classes: int) -> "keras.Model":
    """Baseline: two 3x3 conv stages (32, 64 filters), max pooling, a 128-unit dense layer."""
    return _plain_cnn(config, num_classes, stages=(32, 64), dense_units=128)


@register_model("cnn_b1", family=FAMILY)
def cnn_b1(config: "ModelConfig", num_classes: int) -> "keras.Model":
    """More filters: stages of 64 and 128 filters (was 32, 64)."""
    return _plain_cnn(config, num_classes, stages=(64, 128), dense_units=128)


@register_model("cnn_b2", family=FAMILY)
def cnn_b2(config: "ModelConfig", num_classes: int) -> "keras.Model":
    """A third conv stage (32, 64, 128 filters): a 4x4 map before the dense layer, a third of b1's weights."""
    return _plain_cnn(config, num_classes, stages=(32, 64, 128), dense_units=128)


@register_model("cnn_b3", family=FAMILY)
def cnn_b3(config: "ModelConfig", num_classes: int) -> "keras.Model":
    """Batch normalization after every convolution."""
    return _plain_cnn(config, num_classes, stages=(32, 64, 128), batchnorm=True, dense_units=128)


@register_model("cnn_b4", family=FAMILY)
def cnn_b4(config: "ModelConfig", num_classes: int) -> "keras.Model":
    """Dropout 0.2 before the classifier (regularisation against overfitting)."""
    return _plain_cnn(config, num_classes, stages=(32, 64, 128), batchnorm=True, dense_units=128, dropout=0.2)


@register_model("cnn_b5", family=FAMILY)
def cnn_b5(config: "ModelConfig", num_classes: int) -> "keras.Model":
    """Final: a fourth stage, twice the filters (64-512), global average pooling instead of the dense layer, dropout 0.5."""
    return _plain_cnn(config, num_classes, stages=(64, 128, 256, 512), batchnorm=True, head="avg", dropout=0.5)
