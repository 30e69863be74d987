"""Soft voting over CIFAR-10 models: the code that evaluates an ensemble is the code that serves it.

`cifar-mlops ensemble` computes its logged metrics with `predict_in_batches` and
`soft_vote` from this module, and logs this very file as the registered
ensemble's model code (MLflow "models from code"), so a served ensemble
predicts exactly what was evaluated. Where it is served it needs only mlflow,
numpy and its members' own flavours (Keras). Training evaluates its model with
the same `predict_in_batches`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import numpy as np
from mlflow.models import set_model
from mlflow.pyfunc import PythonModel


def normalized(weights: Sequence[float]) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64)
    return w / w.sum()


def soft_vote(probabilities: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """Weighted mean of the members' class probabilities, (N, classes) float32."""
    stacked = np.stack([np.asarray(p, dtype=np.float64) for p in probabilities])
    return np.tensordot(normalized(weights), stacked, axes=1).astype(np.float32)


def predict_in_batches(predict: Callable[[np.ndarray], np.ndarray], images: np.ndarray,
                       batch_size: int) -> np.ndarray:
    """`predict(batch)` over `images`, `batch_size` at a time, as float32 (N, classes).

    Keras's per-call progress bar and its "structure of `inputs`" warning (a model with a
    named input fed a plain array, as MLflow's pyfunc does) are held back meanwhile.
    """
    import keras

    keras.utils.disable_interactive_logging()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The structure of `inputs`")
            chunks = [np.asarray(predict(images[i:i + batch_size]), dtype=np.float32)
                      for i in range(0, len(images), batch_size)]
    finally:
        keras.utils.enable_interactive_logging()
    return np.concatenate(chunks) if chunks else np.zeros((0, 0), np.float32)


class SoftVotingEnsemble(PythonModel):
    """Raw uint8 (N, 32, 32, 3) images in, the members' weighted mean probabilities (N, classes) out.

    Members are the models copied into this model's artifacts; weights and batch size are in
    the model config.
    """

    _skip_type_hint_validation = True  # the signature is logged explicitly: no type-hint check or warning

    def load_context(self, context) -> None:
        import mlflow

        config = context.model_config["ensemble"]
        self.weights = [float(w) for w in config["weights"]]
        self.batch_size = int(config["batch_size"])
        self.members = [mlflow.pyfunc.load_model(context.artifacts[key]) for key in config["member_keys"]]

    def predict(self, context, model_input, params=None) -> np.ndarray:
        if isinstance(model_input, dict):  # the signature names its one input "image"
            (model_input,) = model_input.values()
        images = np.asarray(model_input, dtype=np.uint8)
        return soft_vote([predict_in_batches(m.predict, images, self.batch_size) for m in self.members],
                         self.weights)


set_model(SoftVotingEnsemble())  # what MLflow loads when it runs this file as the ensemble's model code
