"""Study A: MobileNetV2 and DenseNet-121 from `keras.applications`.

Each model is: raw uint8 image -> (resize to `config.image_size`) -> the
backbone's own normalization -> the no-top backbone (a nested model named
"backbone", which training freezes for warm-up) -> (dropout) -> softmax.

`config.weights`:
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

from cifar_mlops.models import register_model

if TYPE_CHECKING:  # pragma: no cover
    import keras

    from cifar_mlops.config import ModelConfig

KERAS_APPLICATIONS_URL = "https://storage.googleapis.com/tensorflow/keras-applications/"
MOBILENET_ALPHAS = (0.35, 0.5, 0.75, 1.0, 1.3, 1.4)
MOBILENET_SIZES = (96, 128, 160, 192, 224)  # input sizes with their own ImageNet weights; others use 224's
DENSENET121_BLOCKS = (6, 12, 24, 16)
DENSENET121_NOTOP = "densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5"
DENSENET121_NOTOP_MD5 = "30ee3e1110167f948a6b9946edeeb738"  # the hash keras.applications checks
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # DenseNet's "torch" preprocessing, on [0, 1] pixels
IMAGENET_STD = (0.229, 0.224, 0.225)


class WeightsUnavailable(RuntimeError):
    """Pretrained weights could not be found or downloaded; the message says what to put where."""


@register_model("mobilenetv2", family="mobilenetv2")
def mobilenetv2(config: "ModelConfig", num_classes: int) -> "keras.Model":
    """MobileNetV2 (keras.applications), width = alpha, inputs scaled to [-1, 1]."""
    import keras

    _reject(config, blocks=config.blocks is not None)
    weights = None
    if config.weights is not None:
        if config.weights == "imagenet" and config.width not in MOBILENET_ALPHAS:
            raise ValueError(
                f"model.weights={config.weights!r} needs a published MobileNetV2 width "
                f"{MOBILENET_ALPHAS}; got model.width={config.width} (use weights: null to train it from scratch)"
            )
        rows = config.image_size if config.image_size in MOBILENET_SIZES else 224
        fname = f"mobilenet_v2_weights_tf_dim_ordering_tf_kernels_{float(config.width)}_{rows}_no_top.h5"
        weights = _weights_file(config.weights, fname, f"{KERAS_APPLICATIONS_URL}mobilenet_v2/{fname}")
    size = config.image_size
    backbone = keras.applications.MobileNetV2(
        input_shape=(size, size, 3), alpha=config.width, include_top=False, pooling="avg", weights=None, name="backbone"
    )
    normalize = keras.layers.Rescaling(1 / 127.5, offset=-1.0, name="normalize")
    return _assemble(config, num_classes, backbone, normalize, weights)


@register_model("densenet121", family="densenet121")
def densenet121(config: "ModelConfig", num_classes: int) -> "keras.Model":
    """DenseNet-121 (keras.applications; `model.blocks` sets layers per dense block), ImageNet mean/std."""
    import keras

    _reject(config, width=config.width != 1.0)
    blocks = tuple(config.blocks or DENSENET121_BLOCKS)
    weights = None
    if config.weights is not None:
        if config.weights == "imagenet" and blocks != DENSENET121_BLOCKS:
            raise ValueError(
                f"model.weights={config.weights!r} needs DenseNet-121's blocks {DENSENET121_BLOCKS}; "
                f"got model.blocks={blocks} (use weights: null to train it from scratch)"
            )
        url = f"{KERAS_APPLICATIONS_URL}densenet/{DENSENET121_NOTOP}"
        weights = _weights_file(config.weights, DENSENET121_NOTOP, url, md5=DENSENET121_NOTOP_MD5)
    size = config.image_size
    # keras.applications exports only the fixed variants; DenseNet(blocks) is their common builder.
    from keras.src.applications.densenet import DenseNet

    backbone = DenseNet(
        list(blocks), include_top=False, weights=None, input_shape=(size, size, 3), pooling="avg", name="backbone"
    )
    normalize = keras.layers.Normalization(
        mean=[255 * m for m in IMAGENET_MEAN], variance=[(255 * s) ** 2 for s in IMAGENET_STD], name="normalize"
    )
    return _assemble(config, num_classes, backbone, normalize, weights)


def _assemble(config, num_classes, backbone, normalize, weights_path) -> "keras.Model":
    """image -> (resize) -> normalize -> backbone (+ its weights) -> (dropout) -> probabilities."""
    import keras
    from keras import layers

    if weights_path is not None:
        try:
            backbone.load_weights(weights_path)
        except ValueError as err:
            raise ValueError(f"{weights_path} does not fit the {config.name} backbone: {err}") from None
    inputs = keras.Input(shape=(32, 32, 3), dtype="uint8", name="image")
    x = inputs
    if config.image_size != 32:  # Resizing outputs float32 whatever the interpolation
        x = layers.Resizing(config.image_size, config.image_size, interpolation=config.interpolation, name="resize")(x)
    x = backbone(normalize(x))
    if config.dropout:
        x = layers.Dropout(config.dropout, name="dropout")(x)
    outputs = layers.Dense(num_classes, activation="softmax", dtype="float32", name="probabilities")(x)
    return keras.Model(inputs, outputs, name=config.name)


def _reject(config: "ModelConfig", **unused: bool) -> None:
    """ValueError naming a knob set away from its default that this model does not use."""
    for knob, is_set in unused.items():
        if is_set:
            raise ValueError(f"model.{knob}={getattr(config, knob)!r} is not used by {config.name}; remove it")


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
    except Exception as err:  # offline, proxy, HTTP error, bad hash: all mean the same to the user
        reason = (str(err).splitlines() or [type(err).__name__])[0].rsplit(" -- ", 1)[-1]  # drop the URL
        raise WeightsUnavailable(f"cannot download ImageNet weights {fname} ({reason}); {remedy}") from None


def _md5(path: str) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
