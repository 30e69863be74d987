"""Served models: how trained models and ensembles are logged, what they take and give, loading them back.

Every logged model takes raw uint8 (-1, 32, 32, 3) RGB images and returns
(-1, classes) float32 probabilities (its signature says so); a registered
version that does not cannot join an ensemble.
"""

from __future__ import annotations

import functools
import os
import warnings
from importlib import metadata
from typing import TYPE_CHECKING, Any

import mlflow
import numpy as np
from mlflow.models import Model, ModelSignature
from mlflow.types import Schema, TensorSpec

from cifar_mlops.tracking import soft_voting, store
from cifar_mlops.tracking.registry import RegisteredVersion, RegistryError

if TYPE_CHECKING:  # pragma: no cover
    import keras

MODEL_ARTIFACT = "model"
RAW_IMAGE_SHAPE = (-1, 32, 32, 3)
# What a logged model needs to be served; pinned from this environment so that
# logging never pays MLflow's pip-requirement inference (~9 s per model).
SERVING_PACKAGES = ("tensorflow-cpu", "tensorflow", "keras", "numpy", "mlflow")


@functools.cache
def serving_requirements() -> tuple[str, ...]:
    pins = []
    for package in SERVING_PACKAGES:
        try:
            pins.append(f"{package}=={metadata.version(package)}")
        except metadata.PackageNotFoundError:
            continue
    return tuple(pins)


def image_signature(num_classes: int) -> ModelSignature:
    """Raw uint8 32x32 RGB images in, class probabilities out."""
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint8), RAW_IMAGE_SHAPE, "image")]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, num_classes), "probabilities")]),
    )


def image_contract(version: RegisteredVersion) -> int:
    """Check that `version` takes raw uint8 (-1, 32, 32, 3) images and outputs (-1, C); return C."""
    try:
        info = mlflow.models.get_model_info(version.uri)
    except mlflow.exceptions.MlflowException as err:
        raise RegistryError(f"{version}: cannot read its model ({str(err).splitlines()[0]})") from None
    signature = info.signature
    expected = f"uint8 {RAW_IMAGE_SHAPE}"
    if signature is None or signature.inputs is None:
        raise RegistryError(f"{version} has no signature; an ensemble member must take {expected} raw images")
    inputs, outputs = signature.inputs.inputs, (signature.outputs.inputs if signature.outputs else [])
    spec = inputs[0] if len(inputs) == 1 else None
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
    """A registered (or any) model as a pyfunc: `.predict(uint8 images) -> probabilities`."""
    store.configure_store()
    return mlflow.pyfunc.load_model(uri)


class _KerasFlavor:
    """`mlflow.keras` with its model folder created before the input example is written.

    mlflow 3.17's `mlflow.keras.save_model` writes `input_example.json` before
    creating the folder, so `log_model(..., input_example=...)` fails with
    FileNotFoundError; creating the folder first is the whole fix.
    """

    __name__ = "mlflow.keras"

    @staticmethod
    def save_model(path: str, **kwargs: Any) -> None:
        os.makedirs(path, exist_ok=True)
        kwargs.pop("validate_serving_input", None)  # an option of Model.log, not of save_model
        mlflow.keras.save_model(path=path, **kwargs)


def log_keras_model(model: keras.Model, num_classes: int, example: np.ndarray) -> str:
    """Log the Keras model on the active run (flavour `mlflow.keras`, signature, input example); return its URI."""
    import keras

    # MLflow checks the input example by predicting it: keep Keras's progress bar
    # and its named-input warning out of the user's terminal meanwhile.
    keras.utils.disable_interactive_logging()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The structure of `inputs`")
            info = Model.log(
                artifact_path=None, name=MODEL_ARTIFACT, flavor=_KerasFlavor, model=model,
                signature=image_signature(num_classes), input_example=example,
                pip_requirements=list(serving_requirements()),
                # MLflow would reload the saved model and predict the example through a JSON
                # round trip (~80% of logging time); the tests reload logged models instead.
                validate_serving_input=False,
            )
    finally:
        keras.utils.enable_interactive_logging()
    return info.model_uri


def log_ensemble_model(members: list[RegisteredVersion], weights: list[float], num_classes: int,
                       batch_size: int) -> str:
    """Log the soft-voting pyfunc on the active run; return its URI.

    Its code is the module `soft_voting` (the one the ensemble was evaluated with); its
    artifacts are copies of the members' model files, so deleting a member version later
    does not break a registered ensemble.
    """
    keys = [f"member_{i}" for i in range(len(members))]
    model_config = {"member_keys": keys, "weights": [float(w) for w in weights], "batch_size": int(batch_size),
                    "num_classes": int(num_classes), "members": [str(m) for m in members],
                    "member_exp_ids": [m.exp_id for m in members]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        info = mlflow.pyfunc.log_model(
            name=MODEL_ARTIFACT, python_model=soft_voting.__file__,
            artifacts={key: m.uri for key, m in zip(keys, members)},
            model_config={"ensemble": model_config}, signature=image_signature(num_classes),
            pip_requirements=list(serving_requirements()),
            metadata={"members": [str(m) for m in members], "member_uris": [m.uri for m in members],
                      "weights": [float(w) for w in weights]},
        )
    return info.model_uri
