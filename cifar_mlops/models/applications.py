"""Study A: MobileNetV2 and DenseNet-121 from `keras.applications`.

Each model is: raw uint8 image -> (resize to `image_size`) -> the
backbone's own normalization -> the no-top backbone (a nested model named
"backbone", which training freezes for warm-up) -> (dropout) -> softmax.

`weights`:
- None: random initialization;
- "imagenet": the Keras no-top file, taken from the Keras cache
  ($KERAS_HOME/models, default ~/.keras/models) when present, else downloaded
  there; offline without the file -> `WeightsUnavailable` saying what to put where;
- a path to a no-top weights file (the Keras `.h5` format, or a Keras 3
  `.weights.h5`): loaded into the backbone.

Pretrained weights only fit the published shapes: MobileNetV2 widths (alpha)
0.35/0.5/0.75/1.0/1.3/1.4 and DenseNet-121's blocks (6, 12, 24, 16).
"""

from __future__ import annotations

import hashlib
import os
from typing import TYPE_CHECKING

from cifar_mlops.errors import UserError, first_line
from cifar_mlops.models.registry import ModelSettingError, register_model

if TYPE_CHECKING:  # pragma: no cover
    import keras

KERAS_APPLICATIONS_URL = "https://storage.googleapis.com/tensorflow/keras-applications/"
MOBILENET_ALPHAS = (0.35, 0.5, 0.75, 1.0, 1.3, 1.4)
MOBILENET_SIZES = (96, 128, 160, 192, 224)  # input sizes with their own ImageNet weights; others use 224's
DENSENET121_BLOCKS = (6, 12, 24, 16)
DENSENET121_NOTOP = "densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5"
DENSENET121_NOTOP_MD5 = "30ee3e1110167f948a6b9946edeeb738"  # the hash keras.applications checks
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # DenseNet's "torch" preprocessing, on [0, 1] pixels
IMAGENET_STD = (0.229, 0.224, 0.225)


class WeightsUnavailable(UserError):
    """Pretrained weights could not be found or downloaded; the message says what to put where."""


@register_model("mobilenetv2", family="mobilenetv2")
def mobilenetv2(*, num_classes: int = 10, image_size: int = 32, interpolation: str = "bilinear",
                width: float = 1.0, weights: str | None = None, dropout: float = 0.0) -> keras.Model:
    """MobileNetV2 (keras.applications), width = alpha, inputs scaled to [-1, 1]."""
    import keras

    weights_path = None
    if weights is not None:
        if weights == "imagenet" and width not in MOBILENET_ALPHAS:
            raise ModelSettingError(
                f"model.weights={weights!r} needs a published MobileNetV2 width "
                f"{MOBILENET_ALPHAS}; got model.width={width} (use weights: null to train it from scratch)"
            )
        rows = image_size if image_size in MOBILENET_SIZES else 224
        fname = f"mobilenet_v2_weights_tf_dim_ordering_tf_kernels_{float(width)}_{rows}_no_top.h5"
        weights_path = _weights_file(weights, fname, f"{KERAS_APPLICATIONS_URL}mobilenet_v2/{fname}")
    backbone = keras.applications.MobileNetV2(input_shape=(image_size, image_size, 3), alpha=width,
                                              include_top=False, pooling="avg", weights=None, name="backbone")
    normalize = keras.layers.Rescaling(1 / 127.5, offset=-1.0, name="normalize")
    return _assemble("mobilenetv2", backbone, normalize, weights_path, num_classes=num_classes,
                     image_size=image_size, interpolation=interpolation, dropout=dropout)


@register_model("densenet121", family="densenet121")
def densenet121(*, num_classes: int = 10, image_size: int = 32, interpolation: str = "bilinear",
                weights: str | None = None, blocks: tuple[int, ...] | None = None,
                dropout: float = 0.0) -> keras.Model:
    """DenseNet-121 (keras.applications; `model.blocks` sets layers per dense block), ImageNet mean/std."""
    import keras

    blocks = tuple(blocks or DENSENET121_BLOCKS)
    weights_path = None
    if weights is not None:
        if weights == "imagenet" and blocks != DENSENET121_BLOCKS:
            raise ModelSettingError(
                f"model.weights={weights!r} needs DenseNet-121's blocks {DENSENET121_BLOCKS}; "
                f"got model.blocks={blocks} (use weights: null to train it from scratch)"
            )
        url = f"{KERAS_APPLICATIONS_URL}densenet/{DENSENET121_NOTOP}"
        weights_path = _weights_file(weights, DENSENET121_NOTOP, url, md5=DENSENET121_NOTOP_MD5)
    # keras.applications exports only the fixed variants; DenseNet(blocks) is their common builder.
    from keras.src.applications.densenet import DenseNet

    backbone = DenseNet(list(blocks), include_top=False, weights=None, input_shape=(image_size, image_size, 3),
                        pooling="avg", name="backbone")
    normalize = keras.layers.Normalization(
        mean=[255 * m for m in IMAGENET_MEAN], variance=[(255 * s) ** 2 for s in IMAGENET_STD], name="normalize"
    )
    return _assemble("densenet121", backbone, normalize, weights_path, num_classes=num_classes,
                     image_size=image_size, interpolation=interpolation, dropout=dropout)


def _assemble(name: str, backbone, normalize, weights_path: str | None, *, num_classes: int, image_size: int,
              interpolation: str, dropout: float) -> keras.Model:
    """image -> (resize) -> normalize -> backbone (+ its weights) -> (dropout) -> probabilities."""
    import keras
    from keras import layers

    if weights_path is not None:
        try:
            backbone.load_weights(weights_path)
        except ValueError as err:
            raise ModelSettingError(f"{weights_path} does not fit the {name} backbone: {err}") from None
    inputs = keras.Input(shape=(32, 32, 3), dtype="uint8", name="image")
    x = inputs
    if image_size != 32:  # Resizing outputs float32 whatever the interpolation
        x = layers.Resizing(image_size, image_size, interpolation=interpolation, name="resize")(x)
    x = backbone(normalize(x))
    if dropout:
        x = layers.Dropout(dropout, name="dropout")(x)
    outputs = layers.Dense(num_classes, activation="softmax", dtype="float32", name="probabilities")(x)
    return keras.Model(inputs, outputs, name=name)


def _weights_file(weights: str, fname: str, url: str, md5: str | None = None) -> str:
    """The local no-top weights file for `weights` ("imagenet" or a path), checked to exist."""
    if weights != "imagenet":
        path = os.path.expanduser(weights)
        if not os.path.isfile(path):
            raise WeightsUnavailable(
                f"model.weights file not found: {path} (expected a no-top Keras weights file such as {fname})"
            )
        return path
    # Keras reads KERAS_HOME once, at import; reading it here lets it change at run time.
    cache_dir = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    target = os.path.join(cache_dir, "models", fname)
    remedy = f"download {url} to {target}, or pass --set model.weights=/path/to/{fname}"
    if os.path.exists(target):
        # keras.utils.get_file would re-download a file whose hash differs (and delete it when offline).
        if md5 and _md5(target) != md5:
            raise WeightsUnavailable(f"{target} is not the Keras ImageNet file (md5 differs from {md5}); {remedy}")
        return target
    import keras

    try:
        return keras.utils.get_file(fname, url, cache_subdir="models", cache_dir=cache_dir, file_hash=md5)
    except Exception as err:  # noqa: BLE001 - get_file raises a bare Exception: offline, proxy, HTTP error, bad hash
        reason = first_line(err).rsplit(" -- ", 1)[-1]  # drop the URL
        raise WeightsUnavailable(f"cannot download ImageNet weights {fname} ({reason}); {remedy}") from None


def _md5(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "md5").hexdigest()
