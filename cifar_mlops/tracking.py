"""Everything MLflow: the store, runs, params, metrics, artifacts and the registry.

No other module imports mlflow. A training run is a context manager: it ends
FINISHED when its block completes, FAILED (with the reason as a tag) when the
block raises, KILLED on Ctrl-C; a model version is registered only from inside
a run that got that far.
"""

from __future__ import annotations

import functools
import os
import subprocess
import warnings
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
import numpy as np
from mlflow import MlflowClient
from mlflow.entities import RunStatus
from mlflow.models import Model, ModelSignature
from mlflow.types import Schema, TensorSpec

from cifar_mlops.config import ExperimentConfig, to_yaml

if TYPE_CHECKING:  # pragma: no cover
    import keras
    from matplotlib.figure import Figure

    from cifar_mlops.data import Splits

ABLATION_EXPERIMENT = "cifar10-ablation"
MODEL_ARTIFACT = "model"
FAILURE_TAG = "failure_reason"
# What a logged model needs to be served; pinned from this environment so that
# logging never pays MLflow's pip-requirement inference (~9 s per model).
SERVING_PACKAGES = ("tensorflow-cpu", "tensorflow", "keras", "numpy", "mlflow")


def registered_model_name(family: str) -> str:
    return f"cifar10-{family}"


def configure_store() -> str:
    """Point MLflow at $MLFLOW_TRACKING_URI, else a SQLite file `mlflow.db` in the working directory."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    return uri


def adopted_run_id() -> str | None:
    """The run `mlflow run` created for this process, if any (it passes it in MLFLOW_RUN_ID)."""
    return os.environ.get("MLFLOW_RUN_ID") or None


def fail_adopted_run(reason: str) -> None:
    """End the run `mlflow run` created for us as FAILED when we fail before adopting it."""
    run_id = adopted_run_id()
    if run_id is None:
        return
    client = MlflowClient()
    if client.get_run(run_id).info.status == "RUNNING":
        client.set_tag(run_id, FAILURE_TAG, reason[:5000])
        client.set_terminated(run_id, "FAILED")


@functools.cache
def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


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
        inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, 32, 32, 3), "image")]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, num_classes), "probabilities")]),
    )


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
        mlflow.keras.save_model(path=path, **kwargs)


class TrainingRun:
    """One MLflow run for one training of one experiment config."""

    def __init__(self, config: ExperimentConfig, *, experiment: str = ABLATION_EXPERIMENT,
                 parent_run_id: str | None = None) -> None:
        self.config = config
        self.experiment = experiment
        self.parent_run_id = parent_run_id
        self.run_id: str = ""
        self.data_source = "unknown"  # set by log_data

    # -- lifecycle ---------------------------------------------------------
    def __enter__(self) -> "TrainingRun":
        configure_store()
        adopted = adopted_run_id() if self.parent_run_id is None else None
        if adopted:
            run = mlflow.start_run(run_id=adopted)  # `mlflow run` made it and chose its experiment
        else:
            mlflow.set_experiment(self.experiment)
            run = mlflow.start_run(run_name=self.config.exp_id, parent_run_id=self.parent_run_id,
                                   nested=self.parent_run_id is not None)
        self.run_id = run.info.run_id
        mlflow.set_tags({
            "mlflow.runName": self.config.exp_id,
            "exp_id": self.config.exp_id,
            "family": self.config.family,
            "study": self.config.study,
            "enhancements": ",".join(self.config.enhancements) or "none",
            "parent": self.config.parent or "none",
            "git_commit": git_commit(),
        })
        mlflow.log_params(self.config.flat_params())
        mlflow.log_text(to_yaml(self.config), "config.yaml")
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            mlflow.end_run("FINISHED")
        elif issubclass(exc_type, KeyboardInterrupt):
            mlflow.set_tag(FAILURE_TAG, "interrupted (Ctrl-C)")
            mlflow.end_run("KILLED")
        else:
            mlflow.set_tag(FAILURE_TAG, f"{exc_type.__name__}: {exc}"[:5000])
            mlflow.end_run("FAILED")
        return False

    @property
    def url_hint(self) -> str:
        return f"run {self.run_id} in experiment {self.experiment!r} of {mlflow.get_tracking_uri()}"

    # -- data ----------------------------------------------------------------
    def log_data(self, splits: "Splits") -> None:
        self.data_source = splits.source
        mlflow.set_tags({
            "data_source": splits.source,
            "data_location": splits.location,
            "data_fingerprint": splits.fingerprint,
        })
        mlflow.log_params({"data.source_checksum": splits.source_checksum,
                           "data.num_train": len(splits.y_train), "data.num_val": len(splits.y_val),
                           "data.num_test": len(splits.y_test)})
        for context, (x, y) in {"train": (splits.x_train, splits.y_train), "validation": (splits.x_val, splits.y_val),
                                "test": (splits.x_test, splits.y_test)}.items():
            with warnings.catch_warnings():  # a plain path is "ambiguous" to MLflow; it picks the right source
                warnings.simplefilter("ignore", UserWarning)
                dataset = mlflow.data.from_numpy(x, targets=y, source=splits.location,
                                                 name=f"{splits.source}-{context}")
            mlflow.log_input(dataset, context=context)

    # -- training --------------------------------------------------------------
    def epoch_callback(self) -> "keras.callbacks.Callback":
        """Keras callback logging `epoch_{train,val}_{loss,accuracy}` with step = epoch (1-based)."""
        import keras

        class EpochLogger(keras.callbacks.Callback):
            def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
                metrics = {}
                for key, value in (logs or {}).items():
                    if key == "learning_rate":
                        metrics["epoch_learning_rate"] = float(value)
                    elif key.startswith("val_"):
                        metrics[f"epoch_val_{key[4:]}"] = float(value)
                    else:
                        metrics[f"epoch_train_{key}"] = float(value)
                mlflow.log_metrics(metrics, step=epoch + 1)

        return EpochLogger()

    # -- results -----------------------------------------------------------------
    def log_results(self, metrics: dict[str, float], report: str, figures: dict[str, "Figure"]) -> None:
        mlflow.log_metrics(metrics)
        mlflow.log_text(report, "classification_report.txt")
        for name, figure in figures.items():
            mlflow.log_figure(figure, f"{name}.png")

    def log_model(self, model: "keras.Model", num_classes: int, example: np.ndarray) -> str:
        """Log the Keras model (flavour `mlflow.keras`, signature, input example); return its URI."""
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
                )
        finally:
            keras.utils.enable_interactive_logging()
        return info.model_uri

    def register(self, model_uri: str, metrics: dict[str, float]) -> int:
        """Register `model_uri` as a new version of `cifar10-<family>`; return the version number."""
        version = mlflow.register_model(
            model_uri, registered_model_name(self.config.family),
            tags={"exp_id": self.config.exp_id, "run_id": self.run_id,
                  "test_accuracy": f"{metrics['test_accuracy']:.4f}",
                  "data_source": self.data_source},
        )
        mlflow.set_tag("registered_version", f"{version.name}/{version.version}")
        return int(version.version)


def quiet_mlflow() -> None:
    """Keep MLflow's info lines (registry chatter, emoji links) off the user's terminal."""
    import logging

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
