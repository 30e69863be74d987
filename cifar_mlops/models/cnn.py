"""Study B: small CNNs trained from scratch, one factory per iteration.

Study B's constraints hold for every model here: no known architecture (no
residual connections, no dense concatenation, one convolution per stage rather
than a VGG stack), and no augmentation inside the model. Each iteration is a
tiny function calling `plain_cnn`; the first line of its docstring says what
changed against the previous iteration (the catalogue shows it).

Every variant takes the settings of `plain_cnn` (width, dropout, stage_dropout,
whiten, image_size, interpolation); none takes pretrained weights or DenseNet's
blocks. The whitening layer (`whiten`) is an initialisation, not a block: one
fixed linear filter bank computed from the training images' patches, in front
of the same plain stages.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cifar_mlops.models.registry import register_model

if TYPE_CHECKING:  # pragma: no cover
    import keras

FAMILY = "cnn"
WHITENING_LAYER = "whiten"


def plain_cnn(
    name: str,
    stages: tuple[int, ...],
    kernel: int | tuple[int, ...] = 3,
    batchnorm: bool = False,
    own_dropout: float = 0.0,
    dense_units: int = 0,
    head: str = "flatten",
    *,  # the settings (keyword-only): what `model.*` may set
    num_classes: int = 10,
    image_size: int = 32,
    interpolation: str = "bilinear",
    width: float = 1.0,
    dropout: float = 0.0,
    stage_dropout: float = 0.0,
    whiten: int = 0,
) -> keras.Model:
    """Stages of [conv -> (batchnorm) -> relu -> max-pool -> (dropout)], then a head -> (dropout) -> softmax.

    The architecture: stages: filters per stage (before `width`); kernel: one size, or one per
    stage; own_dropout: the iteration's rate right before the classifier; dense_units: 0 for
    none; head: "flatten" (keeps positions) or "avg" (global average pooling).
    The settings every variant takes: width multiplies every filter count and hidden unit;
    dropout, when set, replaces the iteration's own rate; image_size resizes the 32x32 input
    first (skipped at 32) with `interpolation`; stage_dropout: a rate after every stage's
    pooling (0: none); whiten: the side of the patches a fixed first layer whitens (0: none),
    set from the training images by `init_whitening` before training.
    """
    import keras
    from keras import layers

    kernels = (kernel,) * len(stages) if isinstance(kernel, int) else kernel

    def scale(n: int) -> int:
        return max(4, round(n * width))

    inputs = keras.Input(shape=(32, 32, 3), dtype="uint8", name="image")
    x = inputs
    if image_size != 32:
        x = layers.Resizing(image_size, image_size, interpolation=interpolation, name="resize")(x)
    x = layers.Rescaling(1 / 255, name="rescale")(x)  # also casts uint8 -> float32
    if whiten:
        x = whitening(x, whiten)  # the relu after the first stage keeps both signs
    for i, (filters, size) in enumerate(zip(stages, kernels), start=1):
        x = layers.Conv2D(scale(filters), size, padding="same", use_bias=not batchnorm, name=f"conv{i}")(x)
        if batchnorm:
            # momentum 0.9, not Keras's 0.99: with ~80 steps per epoch on 5,000 images the moving
            # statistics would otherwise lag for several epochs and validation sits near chance.
            x = layers.BatchNormalization(momentum=0.9, name=f"bn{i}")(x)
        x = layers.Activation("relu", name=f"relu{i}")(x)
        x = layers.MaxPooling2D(name=f"pool{i}")(x)
        if stage_dropout:
            x = layers.Dropout(stage_dropout, name=f"dropout{i}")(x)
    x = layers.GlobalAveragePooling2D(name="avg_pool")(x) if head == "avg" else layers.Flatten(name="flatten")(x)
    if dense_units:
        x = layers.Dense(scale(dense_units), activation="relu", name="dense")(x)
    rate = dropout or own_dropout
    if rate:
        x = layers.Dropout(rate, name="dropout")(x)
    outputs = layers.Dense(num_classes, activation="softmax", dtype="float32", name="probabilities")(x)
    return keras.Model(inputs, outputs, name=name)


def whitening(x, side: int):
    """The fixed patch-whitening layer on `x`: each of the side*side*3 whitened directions of a patch twice,
    with both signs, so the activation after it keeps both halves. Frozen; `init_whitening` sets it."""
    from keras import layers

    return layers.Conv2D(2 * side * side * 3, side, padding="same", trainable=False, name=WHITENING_LAYER)(x)


def init_whitening(model: keras.Model, images, seed: int = 0, patches: int = 100_000, eps: float = 5e-4) -> bool:
    """Set the model's fixed whitening layer (if it has one) from training images: its filters map every
    k x k patch onto its principal directions scaled to unit variance (ZCA's first half, as fast CIFAR-10
    trainers initialise their first layer), from `patches` random patches. Returns whether it had one.

    `eps` regularises the smallest directions, relative to the mean variance of a patch value.
    """
    import numpy as np

    if WHITENING_LAYER not in [layer.name for layer in model.layers]:
        return False
    layer = model.get_layer(WHITENING_LAYER)
    kernel, _ = layer.get_weights()
    side, channels = kernel.shape[0], kernel.shape[2]
    rng = np.random.default_rng(seed)
    pick = rng.integers(len(images), size=patches)
    rows, cols = (rng.integers(images.shape[axis] - side + 1, size=patches) for axis in (1, 2))
    x = np.stack([images[pick, rows + dy, cols + dx] for dy in range(side) for dx in range(side)], axis=1)
    x = x.reshape(patches, side * side * channels).astype(np.float64) / 255  # as the layer sees it (rescaled)
    mean, covariance = x.mean(axis=0), np.cov(x, rowvar=False)
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)
    scaled = eigenvectors / np.sqrt(eigenvalues + eps * np.trace(covariance) / len(covariance))
    filters = np.concatenate([scaled, -scaled], axis=1)  # (k*k*c, 2*k*k*c), rows in (dy, dx, c) order
    layer.set_weights([filters.reshape(kernel.shape).astype(kernel.dtype), (-mean @ filters).astype(kernel.dtype)])
    return True


def init_from_data(model: keras.Model, images, seed: int = 0) -> list[str]:
    """Set the layers a model computes from its training images instead of learning them (a CNN's fixed
    patch-whitening layer), once, before training; the names of the layers set."""
    return [WHITENING_LAYER] if init_whitening(model, images, seed=seed) else []


@register_model("cnn_tiny", family=FAMILY, settings_of=plain_cnn)
def cnn_tiny(**settings) -> keras.Model:
    """Smoke-test CNN: two narrow stages, global average pooling; trains in seconds."""
    return plain_cnn("cnn_tiny", stages=(8, 16), head="avg", **settings)


@register_model("cnn_b0", family=FAMILY, settings_of=plain_cnn)
def cnn_b0(**settings) -> keras.Model:
    """Baseline: two 3x3 conv stages (32, 64 filters), max pooling, a 128-unit dense layer."""
    return plain_cnn("cnn_b0", stages=(32, 64), dense_units=128, **settings)


@register_model("cnn_b1", family=FAMILY, settings_of=plain_cnn)
def cnn_b1(**settings) -> keras.Model:
    """More filters: stages of 64 and 128 filters (was 32, 64)."""
    return plain_cnn("cnn_b1", stages=(64, 128), dense_units=128, **settings)


@register_model("cnn_b2", family=FAMILY, settings_of=plain_cnn)
def cnn_b2(**settings) -> keras.Model:
    """A third conv stage (32, 64, 128 filters): a 4x4 map before the dense layer, a third of b1's weights."""
    return plain_cnn("cnn_b2", stages=(32, 64, 128), dense_units=128, **settings)


@register_model("cnn_b3", family=FAMILY, settings_of=plain_cnn)
def cnn_b3(**settings) -> keras.Model:
    """Batch normalization after every convolution."""
    return plain_cnn("cnn_b3", stages=(32, 64, 128), batchnorm=True, dense_units=128, **settings)


@register_model("cnn_b4", family=FAMILY, settings_of=plain_cnn)
def cnn_b4(**settings) -> keras.Model:
    """Dropout 0.2 before the classifier (regularisation against overfitting)."""
    return plain_cnn("cnn_b4", stages=(32, 64, 128), batchnorm=True, dense_units=128, own_dropout=0.2, **settings)


@register_model("cnn_b5", family=FAMILY, settings_of=plain_cnn)
def cnn_b5(**settings) -> keras.Model:
    """Final: a fourth stage, twice the filters (64-512), global average pooling instead of the dense layer, dropout 0.5."""
    return plain_cnn("cnn_b5", stages=(64, 128, 256, 512), batchnorm=True, head="avg", own_dropout=0.5, **settings)
