"""Everything MLflow: the store, runs, params, metrics, artifacts and the registry.

No other module imports mlflow. A training run is a context manager: it ends
FINISHED when its block completes, FAILED (with the reason as a tag) when the
block raises, KILLED on Ctrl-C; a model version is registered only from inside
a run that got that far.
"""

from __future__ import annotations

import contextlib
import functools
import os
import subprocess
import time
import warnings
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
import numpy as np
from mlflow import MlflowClient
from mlflow.models import Model, ModelSignature
from mlflow.types import Schema, TensorSpec

from cifar_mlops.config import ExperimentConfig, to_yaml
from cifar_mlops.errors import StoreUnavailable, first_line, redact
from cifar_mlops.progress import log

if TYPE_CHECKING:  # pragma: no cover
    import keras
    from matplotlib.figure import Figure

    from cifar_mlops.config import DataConfig
    from cifar_mlops.data import Splits

ABLATION_EXPERIMENT = "cifar10-ablation"
MODEL_ARTIFACT = "model"
FAILURE_TAG = "failure_reason"
# What a logged model needs to be served; pinned from this environment so that
# logging never pays MLflow's pip-requirement inference (~9 s per model).
SERVING_PACKAGES = ("tensorflow-cpu", "tensorflow", "keras", "numpy", "mlflow")
SCHEMA_LOCK_KEY = 0x63696661726D6C  # a PostgreSQL advisory lock id ("cifarml"): one store creation at a time


def registered_model_name(family: str) -> str:
    return f"cifar10-{family}"


def configure_store() -> str:
    """Point MLflow at $MLFLOW_TRACKING_URI, else a SQLite file `mlflow.db` in the working directory."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"
    if uri.startswith(("http://", "https://")):
        _check_server(uri)
    elif uri.startswith(("postgresql", "mysql")):
        _check_database(uri)
    mlflow.set_tracking_uri(uri)
    open_store(uri)
    return uri


def open_store(uri: str) -> None:
    """Make MLflow create (or check) the store's tables and cache it for this process."""
    import sqlalchemy  # MLflow's SQL stores raise its errors

    try:
        if uri.startswith("sqlite:///") and "?" not in uri and ":memory:" not in uri:
            _open_sqlite_store(uri)
        elif uri.startswith("postgresql"):
            _open_postgresql_store(uri)
        else:
            MlflowClient(uri)
    except (mlflow.exceptions.MlflowException, sqlalchemy.exc.SQLAlchemyError, OSError) as err:
        raise StoreUnavailable(f"the MLflow tracking store {redact(uri)} cannot be opened ({first_line(err)}); fix "
                               "MLFLOW_TRACKING_URI, or unset it to use ./mlflow.db in a writable folder") from None


@functools.cache
def _open_sqlite_store(uri: str) -> None:
    """Create (or check) a SQLite store's tables while holding an exclusive lock on its file.

    Two processes opening a new store at once (two `train` commands in a fresh folder)
    would both run MLflow's schema migrations and both fail; with the lock the second
    finds the tables made. flock does not touch the POSIX locks SQLite itself uses.
    """
    import fcntl

    with open(uri.removeprefix("sqlite:///"), "ab") as db:  # creates an empty file: SQLite takes it as a new store
        fcntl.flock(db, fcntl.LOCK_EX)
        MlflowClient(uri)  # MLflow caches the store per URI: later clients reuse it


@functools.cache
def _open_postgresql_store(uri: str) -> None:
    """Create (or check) a PostgreSQL store's tables while holding a session-level advisory lock.

    As for SQLite: processes started together on an empty database would all run MLflow's
    migrations, and all but one fail ("duplicate key value violates unique constraint").
    """
    import sqlalchemy

    engine = sqlalchemy.create_engine(uri, connect_args={"connect_timeout": 10}, poolclass=sqlalchemy.pool.NullPool)
    try:
        with engine.connect() as lock:  # released when this connection closes, however we leave
            lock.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": SCHEMA_LOCK_KEY})
            MlflowClient(uri)
    finally:
        engine.dispose()


@functools.cache
def _check_server(uri: str) -> None:
    """Fail fast on a server that does not answer: MLflow itself retries for minutes before giving up."""
    import requests

    try:
        requests.get(f"{uri.rstrip('/')}/health", timeout=10)
    except requests.RequestException as err:
        reason = type(err).__name__
        raise StoreUnavailable(
            f"the MLflow tracking server {uri} does not answer ({reason}); start it, fix MLFLOW_TRACKING_URI, "
            "or unset it to use ./mlflow.db"
        ) from None


@functools.cache
def _check_database(uri: str) -> None:
    """Fail fast on a database that does not answer: MLflow itself retries for minutes before giving up."""
    import sqlalchemy

    engine = sqlalchemy.create_engine(uri, connect_args={"connect_timeout": 10}, poolclass=sqlalchemy.pool.NullPool)
    try:
        with engine.connect():
            pass
    except sqlalchemy.exc.SQLAlchemyError as err:
        raise StoreUnavailable(
            f"the MLflow tracking database {redact(uri)} cannot be used ({first_line(err)}); start it, "
            "fix MLFLOW_TRACKING_URI, or unset it to use ./mlflow.db"
        ) from None
    finally:
        engine.dispose()


def adopted_run_id() -> str | None:
    """The run `mlflow run` created for this process, if any (it passes it in MLFLOW_RUN_ID)."""
    return os.environ.get("MLFLOW_RUN_ID") or None


def _adopted_experiment(experiment_id: str, usual: str) -> str:
    """The name of the experiment `mlflow run` chose for our run; a note when it is not the usual one."""
    chosen = _client().get_experiment(experiment_id).name
    if chosen != usual:
        log(f"note: `mlflow run` put this run in experiment {chosen!r}, not {usual!r} where `cifar-mlops` "
            f"keeps these runs; add --experiment-name {usual} to `mlflow run` to keep them together")
    return chosen


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


def _log_input(dataset, context: str, attempts: int = 3) -> None:
    """`mlflow.log_input`, retried when another process logs the same dataset at the same moment.

    MLflow's store checks for the dataset row, then inserts it: two tuning workers starting
    their first trials together both insert, and the second fails on the unique constraint.
    On retry the row exists and MLflow links to it.
    """
    for attempt in range(1, attempts + 1):
        try:
            mlflow.log_input(dataset, context=context)
            return
        except mlflow.exceptions.MlflowException as err:
            if attempt == attempts or not any(s in str(err) for s in ("IntegrityError", "UniqueViolation")):
                raise
            time.sleep(0.2 * attempt)


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
        if adopted:  # `mlflow run` made it and chose its experiment; MLflow refuses it under any other
            experiment_id = MlflowClient().get_run(adopted).info.experiment_id
            mlflow.set_experiment(experiment_id=experiment_id)
            run = mlflow.start_run(run_id=adopted)
            self.experiment = _adopted_experiment(experiment_id, usual=self.experiment)
        else:
            mlflow.set_experiment(self.experiment)
            run = mlflow.start_run(run_name=self.config.exp_id, parent_run_id=self.parent_run_id,
                                   nested=self.parent_run_id is not None)
        self.run_id = run.info.run_id
        try:
            self._describe_run()
        except BaseException as err:  # a run that started must not stay RUNNING
            self.__exit__(type(err), err, err.__traceback__)
            raise
        return self

    def _describe_run(self) -> None:
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
        for hook in list(_run_start_hooks):  # e.g. tuning tags the trial's run and remembers its id
            hook(self.run_id)

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
    def load_data(self, data_config: "DataConfig", splits: "Splits | None" = None) -> "Splits":
        """Load the splits this run uses (unless a caller that runs many times passes them) and log them."""
        from cifar_mlops import data
        from cifar_mlops.progress import log

        if splits is None:
            log("loading data")
            splits = data.load_splits(data_config)
        log(f"data: {splits.source} from {splits.location}: "
            f"{len(splits.y_train)} train / {len(splits.y_val)} val / {len(splits.y_test)} test images")
        self.log_data(splits)
        return splits

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
            _log_input(dataset, context)

    # -- training --------------------------------------------------------------
    def log_precision(self, policy: str) -> None:
        """The dtype policy `train.precision` resolved to on this machine (auto depends on the device)."""
        mlflow.log_param("train.dtype_policy", policy)

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
                    # MLflow would reload the saved model and predict the example through a JSON
                    # round trip (~80% of logging time); the tests reload logged models instead.
                    validate_serving_input=False,
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


# ---------------------------------------------------------------------------
# The registry: finding versions, checking their contract, ensembles, aliases

RAW_IMAGE_SHAPE = (-1, 32, 32, 3)


class RegistryError(ValueError):
    """A user-facing, one-line registry error: unknown model, version or alias, or a broken contract."""


class RegisteredVersion:
    """One registered model version, as the rest of the package sees it."""

    def __init__(self, mv: Any) -> None:
        self.name: str = mv.name
        self.version = int(mv.version)
        self.run_id: str = mv.run_id or ""
        self.tags: dict[str, str] = dict(mv.tags or {})
        self.aliases: tuple[str, ...] = tuple(getattr(mv, "aliases", None) or ())
        self.created_ms = int(mv.creation_timestamp or 0)

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"

    @property
    def exp_id(self) -> str:
        return self.tags.get("exp_id", "?")

    def __str__(self) -> str:
        return f"{self.name}/{self.version}"

    def __repr__(self) -> str:
        return f"RegisteredVersion({self})"


def _client() -> MlflowClient:
    configure_store()
    return MlflowClient()


def _versions_of(client: MlflowClient, name: str) -> list[RegisteredVersion]:
    if not name or "'" in name:
        raise RegistryError(f"{name!r} is not a registered model name")
    try:
        model = client.get_registered_model(name)
    except mlflow.exceptions.MlflowException:
        known = ", ".join(sorted(m.name for m in client.search_registered_models())) or "none yet"
        raise RegistryError(f"unknown registered model {name!r} (registered: {known})") from None
    versions = sorted((RegisteredVersion(mv) for mv in client.search_model_versions(f"name = '{name}'")),
                      key=lambda v: v.version)
    # search results carry no aliases: take them from the registered model (alias -> version)
    for v in versions:
        v.aliases = tuple(sorted(a for a, number in (model.aliases or {}).items() if int(number) == v.version))
    return versions


def find_version(name: str, *, exp_id: str | None = None, alias: str | None = None,
                 version: int | None = None) -> RegisteredVersion:
    """The version of `name` holding `alias`, or numbered `version`, or the newest tagged `exp_id`."""
    client = _client()
    try:
        versions = _versions_of(client, name)
    except RegistryError as err:
        if exp_id is not None:  # say how to make it exist
            raise RegistryError(f"{err}; train experiment {exp_id} with `cifar-mlops train --exp {exp_id}`") from None
        raise
    if exp_id is not None:
        tagged = [v for v in versions if v.tags.get("exp_id") == exp_id]
        if not tagged:
            raise RegistryError(f"{name} has no version of experiment {exp_id}; "
                                f"train one with `cifar-mlops train --exp {exp_id}`")
        return tagged[-1]
    if alias is not None:
        holder = next((v for v in versions if alias in v.aliases), None)
        if holder is None:
            raise RegistryError(f"{name} has no version with alias @{alias}; "
                                f"set one with `cifar-mlops promote {name} --version N --alias {alias}`")
        return holder
    chosen = next((v for v in versions if v.version == version), None)
    if chosen is None:
        have = ", ".join(str(v.version) for v in versions) or "none"
        raise RegistryError(f"{name} has no version {version} (versions: {have})")
    return chosen


def alias_holder(name: str, alias: str) -> RegisteredVersion | None:
    """The version of `name` holding `alias`, or None (the model itself must exist)."""
    versions = _versions_of(_client(), name)
    return next((v for v in versions if alias in v.aliases), None)


def list_registered() -> list[tuple[str, list[RegisteredVersion]]]:
    """Every registered model with its versions (oldest first), models by name."""
    client = _client()
    names = sorted(m.name for m in client.search_registered_models())
    return [(name, _versions_of(client, name)) for name in names]


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
        got = ", ".join(f"{getattr(s, 'type', '?')} {tuple(getattr(s, 'shape', None) or ())}" for s in inputs)
        raise RegistryError(f"{version} takes {got}, not raw {expected} images: it cannot join this ensemble")
    out = outputs[0] if len(outputs) == 1 else None
    if not (isinstance(out, TensorSpec) and len(out.shape) == 2 and out.shape[-1] and out.shape[-1] > 0):
        got = ", ".join(f"{getattr(s, 'type', '?')} {tuple(getattr(s, 'shape', None) or ())}" for s in outputs) or "nothing"
        raise RegistryError(f"{version} outputs {got}, not (-1, classes) probabilities: it cannot join this ensemble")
    return int(out.shape[-1])


def load_model(uri: str) -> Any:
    """A registered (or any) model as a pyfunc: `.predict(uint8 images) -> probabilities`."""
    configure_store()
    return mlflow.pyfunc.load_model(uri)


def run_text_artifact(run_id: str, path: str) -> str | None:
    """A text artifact of a run (e.g. its `config.yaml`), or None when it is missing."""
    configure_store()
    try:
        return mlflow.artifacts.load_text(f"runs:/{run_id}/{path}")
    except Exception:  # noqa: BLE001 - missing run, missing file, unreachable store: all "not there"
        return None


def set_version_tags(name: str, version: int, tags: dict[str, Any]) -> None:
    client = _client()
    for key, value in tags.items():
        client.set_model_version_tag(name, str(version), key, str(value))


def set_alias(version: RegisteredVersion, alias: str) -> None:
    """Point `alias` of the version's model at it (taking it from whichever version held it)."""
    _client().set_registered_model_alias(version.name, alias, str(version.version))


def annotate_adopted_run(tags: dict[str, Any], metrics: dict[str, float]) -> None:
    """Record tags/metrics on the run `mlflow run` created for this process, if any."""
    run_id = adopted_run_id()
    if run_id is None:
        return
    client = _client()
    for key, value in tags.items():
        client.set_tag(run_id, key, str(value))
    for key, value in metrics.items():
        client.log_metric(run_id, key, float(value))


def log_members(members: list[RegisteredVersion], weights: list[float]) -> None:
    """Record an ensemble's resolved members on the active run (params + one tag)."""
    mlflow.log_params({f"member_{i}": f"{m} (exp_id {m.exp_id})" for i, m in enumerate(members)})
    mlflow.log_params({f"member_{i}_weight": f"{w:g}" for i, w in enumerate(weights)})
    mlflow.set_tag("members", ",".join(str(m) for m in members))


# The ensemble's pyfunc, logged as code ("models from code"): it needs only
# mlflow and numpy where it is loaded, and the members' model files, which are
# copied into the ensemble's own artifacts, so deleting a member version later
# does not break a registered ensemble.
ENSEMBLE_MODEL_CODE = '''\
"""Soft-voting ensemble of registered CIFAR-10 models (logged by cifar-mlops).

Members are the pyfunc models copied into this model's artifacts; weights,
member names and batch size are in the model config. Raw uint8 (N, 32, 32, 3)
images in, weighted mean class probabilities (N, classes) float32 out.
"""
import warnings

import keras
import mlflow
import numpy as np
from mlflow.models import set_model
from mlflow.pyfunc import PythonModel



class SoftVotingEnsemble(PythonModel):
    # The signature is logged explicitly; no type-hint validation (and no warning asking for type hints).
    _skip_type_hint_validation = True

    def load_context(self, context):
        config = context.model_config["ensemble"]
        weights = np.asarray(config["weights"], dtype=np.float64)
        self.weights = weights / weights.sum()
        self.batch_size = int(config["batch_size"])
        self.num_classes = int(config["num_classes"])
        self.members = [mlflow.pyfunc.load_model(context.artifacts[key]) for key in config["member_keys"]]

    def predict(self, context, model_input, params=None):
        if isinstance(model_input, dict):  # the signature names its one input "image"
            (model_input,) = model_input.values()
        images = np.asarray(model_input, dtype=np.uint8)
        total = np.zeros((len(images), self.num_classes), dtype=np.float64)
        keras.utils.disable_interactive_logging()  # no progress bar per batch
        with warnings.catch_warnings():  # Keras: "The structure of `inputs` doesn't match" (harmless)
            warnings.simplefilter("ignore", UserWarning)
            for weight, member in zip(self.weights, self.members):
                for start in range(0, len(images), self.batch_size):
                    batch = images[start:start + self.batch_size]
                    total[start:start + len(batch)] += weight * np.asarray(member.predict(batch), dtype=np.float64)
        keras.utils.enable_interactive_logging()
        return total.astype(np.float32)


set_model(SoftVotingEnsemble())
'''


def log_ensemble_model(members: list[RegisteredVersion], weights: list[float], num_classes: int,
                       batch_size: int) -> str:
    """Log the soft-voting pyfunc (members' files copied in) on the active run; return its URI."""
    import tempfile

    keys = [f"member_{i}" for i in range(len(members))]
    model_config = {"member_keys": keys, "weights": [float(w) for w in weights], "batch_size": int(batch_size),
                    "num_classes": int(num_classes), "members": [str(m) for m in members],
                    "member_exp_ids": [m.exp_id for m in members]}
    with tempfile.TemporaryDirectory() as folder:
        code = Path(folder) / "soft_voting_ensemble.py"
        code.write_text(ENSEMBLE_MODEL_CODE)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            info = mlflow.pyfunc.log_model(
                name=MODEL_ARTIFACT, python_model=str(code),
                artifacts={key: m.uri for key, m in zip(keys, members)},
                model_config={"ensemble": model_config}, signature=image_signature(num_classes),
                pip_requirements=list(serving_requirements()),
                metadata={"members": [str(m) for m in members], "member_uris": [m.uri for m in members],
                          "weights": [float(w) for w in weights]},
            )
    return info.model_uri


# ---------------------------------------------------------------------------
# Tuning: one parent run per Optuna study, one nested run per trial

TUNING_EXPERIMENT = "cifar10-tuning"
_run_start_hooks: list = []  # called with each TrainingRun's run id right after it starts


@contextlib.contextmanager
def on_training_run_start(hook):
    """While inside this block, `hook(run_id)` runs as soon as any TrainingRun has started."""
    _run_start_hooks.append(hook)
    try:
        yield
    finally:
        _run_start_hooks.remove(hook)


def study_run(study_name: str, tags: dict[str, str], reuse_run_id: str | None = None) -> tuple[str, str]:
    """The study's parent run, RUNNING: `mlflow run`'s own run, else `reuse_run_id` if it still exists,
    else a new run in `cifar10-tuning`. Returns (run id, experiment name)."""
    client = _client()
    run_id = adopted_run_id()
    if run_id:
        os.environ.pop("MLFLOW_RUN_ID", None)  # trials must start their own nested runs, not reopen this one
        _adopted_experiment(client.get_run(run_id).info.experiment_id, usual=TUNING_EXPERIMENT)
    elif reuse_run_id:
        try:
            run = client.get_run(reuse_run_id)
            run_id = reuse_run_id if run.info.lifecycle_stage == "active" else None
        except mlflow.exceptions.MlflowException:
            run_id = None
    if run_id:
        if client.get_run(run_id).info.status != "RUNNING":
            client.update_run(run_id, status="RUNNING")
    else:
        experiment = client.get_experiment_by_name(TUNING_EXPERIMENT)
        experiment_id = experiment.experiment_id if experiment else _create_experiment(client, TUNING_EXPERIMENT)
        run_id = client.create_run(experiment_id, run_name=study_name).info.run_id
    client.set_tag(run_id, "mlflow.runName", study_name)
    for key, value in {**tags, "git_commit": git_commit()}.items():
        client.set_tag(run_id, key, str(value)[:5000])
    return run_id, client.get_experiment(client.get_run(run_id).info.experiment_id).name


def _create_experiment(client: MlflowClient, name: str) -> str:
    try:
        return client.create_experiment(name)
    except mlflow.exceptions.MlflowException:  # another process created it meanwhile
        return client.get_experiment_by_name(name).experiment_id


def delete_run(run_id: str) -> None:
    _client().delete_run(run_id)


def tag_run(run_id: str, tags: dict[str, Any], run_name: str | None = None) -> None:
    client = _client()
    for key, value in tags.items():
        client.set_tag(run_id, key, str(value)[:5000])
    if run_name:
        client.set_tag(run_id, "mlflow.runName", run_name)


def end_trial_run(run_id: str, state: str, reason: str | None = None) -> None:
    """Give a trial's nested run its final Optuna state: tag `state`, and a status that says the same.

    COMPLETE -> FINISHED; PRUNED -> KILLED (stopped early on purpose: no failure_reason,
    tag `pruned_at_epoch`); FAIL -> FAILED (with `failure_reason`)."""
    client = _client()
    try:
        run = client.get_run(run_id)
    except mlflow.exceptions.MlflowException:
        return
    client.set_tag(run_id, "state", state)
    status = {"COMPLETE": "FINISHED", "PRUNED": "KILLED"}.get(state, "FAILED")
    if state == "PRUNED":
        if FAILURE_TAG in run.data.tags:
            client.delete_tag(run_id, FAILURE_TAG)
        client.set_tag(run_id, "pruned_at_epoch", int(run.data.metrics.get("epochs_run", 0))
                       or len(client.get_metric_history(run_id, "epoch_val_accuracy")))
    elif state != "COMPLETE" and FAILURE_TAG not in run.data.tags:
        client.set_tag(run_id, FAILURE_TAG, (reason or f"trial ended {state}")[:5000])
    if run.info.status != status:
        client.set_terminated(run_id, status)


def running_child_runs(parent_run_id: str) -> list[tuple[str, dict[str, str]]]:
    """(run id, tags) of the parent's nested runs that are still RUNNING."""
    client = _client()
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    runs = client.search_runs([experiment_id], filter_string=(
        f"tags.mlflow.parentRunId = '{parent_run_id}' and attributes.status = 'RUNNING'"))
    return [(r.info.run_id, dict(r.data.tags)) for r in runs]


def finish_study_run(run_id: str, status: str, *, tags: dict[str, Any], metrics: dict[str, float],
                     figures: dict[str, "Figure"], texts: dict[str, str]) -> None:
    """Record the study's outcome on its parent run and end it with `status`."""
    client = _client()
    for key, value in tags.items():
        client.set_tag(run_id, key, str(value)[:5000])
    for key, value in metrics.items():
        client.log_metric(run_id, key, float(value))
    for name, figure in figures.items():
        client.log_figure(run_id, figure, f"{name}.png")
    for name, text in texts.items():
        client.log_text(run_id, text, name)
    client.set_terminated(run_id, status)


def quiet_mlflow() -> None:
    """Keep MLflow's info lines (registry chatter, emoji links) off the user's terminal."""
    import logging

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


# ---------------------------------------------------------------------------
# Reports: reading finished result runs, logging the report run

REPORT_EXPERIMENT = "cifar10-reports"
REPORT_KIND = "report"  # tag `kind` of a report run: never a result row


class ReportSourceError(ValueError):
    """A user-facing, one-line error about where a report reads its runs from."""


def finished_result_runs(experiment: str) -> list[dict[str, Any]]:
    """Every FINISHED, active run of `experiment` that has an `exp_id` tag and is not a report run,
    newest first, as plain dicts: run_id, experiment_id, start_time, end_time (ms), tags, params, metrics."""
    client = _client()
    found = client.get_experiment_by_name(experiment)
    if found is None:
        known = ", ".join(sorted(e.name for e in client.search_experiments())) or "none"
        raise ReportSourceError(f"no MLflow experiment {experiment!r} in {mlflow.get_tracking_uri()} "
                                f"(experiments: {known}); train one with `cifar-mlops train --exp smoke`")
    runs, token = [], None
    while True:
        page = client.search_runs([found.experiment_id], filter_string="attributes.status = 'FINISHED'",
                                  max_results=1000, order_by=["attributes.start_time DESC"], page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            break
    return [{"run_id": r.info.run_id, "experiment_id": r.info.experiment_id, "start_time": r.info.start_time or 0,
             "end_time": r.info.end_time or 0, "tags": dict(r.data.tags), "params": dict(r.data.params),
             "metrics": dict(r.data.metrics)}
            for r in runs if r.data.tags.get("exp_id") and r.data.tags.get("kind") != REPORT_KIND]


def metric_history(run_id: str, key: str) -> list[tuple[int, float]]:
    """(step, value) of a run's metric, by step (e.g. `epoch_val_accuracy`, step = epoch)."""
    return sorted((m.step, m.value) for m in _client().get_metric_history(run_id, key))


def log_report_run(folder: str | Path, tags: dict[str, Any], params: dict[str, Any]) -> tuple[str, str]:
    """Log every file in `folder` as artifacts of a FINISHED report run (tag kind=report): the run
    `mlflow run` created for us, else a new run in `cifar10-reports`. Returns (run id, experiment name)."""
    client = _client()
    run_id = adopted_run_id()
    if not run_id:
        experiment = client.get_experiment_by_name(REPORT_EXPERIMENT)
        experiment_id = experiment.experiment_id if experiment else _create_experiment(client, REPORT_EXPERIMENT)
        run_id = client.create_run(experiment_id, run_name="report").info.run_id
    try:
        client.set_tag(run_id, "kind", REPORT_KIND)  # first: a report run must never count as a result
        client.set_tag(run_id, "mlflow.runName", "report")
        for key, value in {**tags, "git_commit": git_commit()}.items():
            client.set_tag(run_id, key, str(value)[:5000])
        for key, value in params.items():
            client.log_param(run_id, key, str(value)[:6000])
        client.log_artifacts(run_id, str(folder))
    except BaseException as err:
        client.set_tag(run_id, FAILURE_TAG, f"{type(err).__name__}: {err}"[:5000])
        client.set_terminated(run_id, "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    return run_id, client.get_experiment(client.get_run(run_id).info.experiment_id).name
