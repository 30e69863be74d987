"""Served models: how trained models and ensembles are logged, what they take and give, loading them back.

Every logged model is an `image_model` (its code is that module): raw uint8 (n, 32, 32, 3)
pixels or encoded images in, a table of class names and probabilities out. A trained model
is one Keras member, an ensemble several; `mlflow models serve` serves either as it is.
"""

from __future__ import annotations

import functools
import os
import tempfile
import warnings
from collections.abc import Callable, Sequence
from importlib import metadata
from typing import TYPE_CHECKING, Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema, TensorSpec

from cifar_mlops import backend
from cifar_mlops.errors import first_line
from cifar_mlops.tracking import image_model, store
from cifar_mlops.tracking.registry import RegisteredVersion, RegistryError

if TYPE_CHECKING:  # pragma: no cover
    import keras

MODEL_ARTIFACT = "model"
MEMBER_ARTIFACT = "member_{}"
RAW_IMAGE_SHAPE = (-1, 32, 32, 3)
# What a logged model needs to be served; pinned from this environment so that
# logging never pays MLflow's pip-requirement inference (~9 s per model).
# The backend's own distributions come first: the one the model was trained on.
SERVING_PACKAGES = ("keras", "numpy", "pandas", "pillow", "mlflow")


@functools.cache
def serving_requirements() -> tuple[str, ...]:
    import keras

    pins = []
    for package in (*backend.PACKAGES[keras.backend.backend()], *SERVING_PACKAGES):
        try:
            pins.append(f"{package}=={metadata.version(package).split('+')[0]}")  # no local build tag (+cpu)
        except metadata.PackageNotFoundError:
            continue
    return tuple(pins)


def pixel_signature(num_classes: int) -> ModelSignature:
    """A Keras member's: raw uint8 32x32 RGB pixels in, class probabilities out."""
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint8), RAW_IMAGE_SHAPE, image_model.INPUT_NAME)]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, num_classes), "probabilities")]),
    )


def image_signature(class_names: Sequence[str]) -> ModelSignature:
    """A registered model's: pixels or encoded images in (see `image_model`), a table of classes out."""
    return ModelSignature(
        # An object tensor of shape (-1,) is the one input MLflow's checks pass both as a
        # (n, 32, 32, 3) tensor and as a DataFrame column of strings; `to_pixels` checks the rest.
        inputs=Schema([TensorSpec(np.dtype(object), (-1,), image_model.INPUT_NAME)]),
        outputs=Schema([ColSpec("string", image_model.LABEL), ColSpec("float", image_model.PROBABILITY),
                        *(ColSpec("float", name) for name in class_names)]),
    )


def image_contract(version: RegisteredVersion) -> int:
    """Check that `version` takes raw uint8 (n, 32, 32, 3) images and gives class probabilities; return how many.

    Versions logged from `image_model` (images in, a table out) and earlier plain Keras versions
    (uint8 (-1, 32, 32, 3) in, (-1, C) probabilities out) both qualify.
    """
    try:
        info = mlflow.models.get_model_info(version.uri)
    except mlflow.exceptions.MlflowException as err:
        raise RegistryError(f"{version}: cannot read its model ({first_line(err)})") from None
    signature = info.signature
    expected = f"uint8 {RAW_IMAGE_SHAPE}"
    if signature is None or signature.inputs is None:
        raise RegistryError(f"{version} has no signature; an ensemble member must take {expected} raw images")
    inputs, outputs = signature.inputs.inputs, (signature.outputs.inputs if signature.outputs else [])
    spec = inputs[0] if len(inputs) == 1 else None
    if spec is not None and spec.to_dict() == image_signature([]).inputs.inputs[0].to_dict():
        names = [getattr(column, "name", None) for column in outputs]
        if names[:2] == [image_model.LABEL, image_model.PROBABILITY] and len(names) > 2:
            return len(names) - 2
        raise RegistryError(f"{version} outputs {names}, not a label, its probability and one column per class")
    if not (isinstance(spec, TensorSpec) and spec.type == np.dtype(np.uint8) and tuple(spec.shape) == RAW_IMAGE_SHAPE):
        raise RegistryError(f"{version} takes {_described(inputs)}, not raw {expected} images: "
                            "it cannot join this ensemble")
    out = outputs[0] if len(outputs) == 1 else None
    if not (isinstance(out, TensorSpec) and len(out.shape) == 2 and out.shape[-1] and out.shape[-1] > 0):
        raise RegistryError(f"{version} outputs {_described(outputs) or 'nothing'}, not (-1, classes) "
                            "probabilities: it cannot join this ensemble")
    return int(out.shape[-1])


def _described(specs: list) -> str:
    return ", ".join(f"{getattr(s, 'type', '?')} {tuple(getattr(s, 'shape', None) or ())}" for s in specs)


def load_model(uri: str) -> Any:
    """A logged model as a pyfunc: `.predict(images) -> a table of labels and probabilities` (see `image_model`)."""
    store.configure_store()
    return mlflow.pyfunc.load_model(uri)


def load_probabilities(uri: str, batch_size: int) -> Callable[[np.ndarray], np.ndarray]:
    """A logged model as a function from uint8 (n, 32, 32, 3) images to (n, classes) probabilities."""
    store.configure_store()
    return image_model.load_member(uri, batch_size)


def predictor(uri: str, batch_size: int) -> Callable[[np.ndarray], pd.DataFrame]:
    """The model logged at `uri` as a function from uint8 (n, 32, 32, 3) images to its table of predictions.

    A version logged from `image_model` answers through its own `predict`, as when served; an
    earlier plain Keras version gets the same table, its classes named class_0, class_1, ...
    """
    model = load_model(uri)
    if "keras" not in model.metadata.flavors:
        return lambda images: model.predict({image_model.INPUT_NAME: images})
    probabilities = image_model.probabilities_of(model, batch_size)

    def table(images: np.ndarray) -> pd.DataFrame:
        p = probabilities(images)
        return image_model.predictions_table(p, [f"class_{i}" for i in range(p.shape[1])])
    return table


def log_trained_model(model: keras.Model, class_names: Sequence[str], batch_size: int,
                      test_time_flip: bool = False) -> str:
    """Log `model` on the active run as an `image_model` with one member (predicting with test-time flips
    where `test_time_flip`, as the run was evaluated); return its URI."""
    with tempfile.TemporaryDirectory(prefix="cifar-mlops-") as folder:
        member = os.path.join(folder, "keras")
        mlflow.keras.save_model(model, member, signature=pixel_signature(len(class_names)),
                                pip_requirements=list(serving_requirements()))
        return _log_image_model([member], [1.0], class_names, batch_size, test_time_flip=test_time_flip,
                                metadata={"members": ["the Keras model trained in this run"]})


def log_ensemble_model(members: list[RegisteredVersion], weights: list[float], class_names: Sequence[str],
                       batch_size: int) -> str:
    """Log the soft-voting `image_model` on the active run; return its URI.

    Its artifacts are copies of the members' model files, so deleting a member version later
    does not break a registered ensemble.
    """
    return _log_image_model([m.uri for m in members], weights, class_names, batch_size,
                            metadata={"members": [str(m) for m in members], "member_uris": [m.uri for m in members],
                                      "member_exp_ids": [m.exp_id for m in members],
                                      "weights": [float(w) for w in weights]})


def _log_image_model(member_uris: Sequence[str], weights: Sequence[float], class_names: Sequence[str],
                     batch_size: int, metadata: dict[str, Any], test_time_flip: bool = False) -> str:
    keys = [MEMBER_ARTIFACT.format(i) for i in range(len(member_uris))]
    model_config = {"member_keys": keys, "weights": [float(w) for w in weights], "batch_size": int(batch_size),
                    "class_names": [str(name) for name in class_names], "test_time_flip": test_time_flip}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        info = mlflow.pyfunc.log_model(
            name=MODEL_ARTIFACT, python_model=image_model.__file__,
            artifacts=dict(zip(keys, member_uris)), model_config={"image_model": model_config},
            signature=image_signature(class_names), pip_requirements=list(serving_requirements()),
            metadata=metadata,
        )
    return info.model_uri
