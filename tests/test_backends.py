"""Every Keras backend: `cifar-mlops --backend B train` trains, logs and registers on B without importing
TensorFlow elsewhere, and a version trained on one backend predicts the same probabilities on every other.

Each backend runs in its own process (Keras picks its backend once, at import); the suite itself runs
on whichever $KERAS_BACKEND says. In CI every backend must be installed (the `test` extra brings them).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient

from cifar_mlops import backend
from tests.conftest import REPO, copy_empty_store, skip_or_fail, tiny_overrides

INSTALLED = [b for b in backend.BACKENDS if importlib.util.find_spec(b) is not None]
# A CLI run that says, as it exits, which TensorFlow modules it imported.
CLI_REPORTING_TENSORFLOW = (
    "import atexit, json, os, sys\n"
    "atexit.register(lambda: open(os.environ['IMPORTED_TF'], 'w').write(json.dumps(\n"
    "    [m for m in sys.modules if m.partition('.')[0] == 'tensorflow'])))\n"
    "from cifar_mlops.cli import main\n"
    "sys.argv[0] = 'cifar-mlops'\n"
    "main()\n"
)
# Loads every version of cifar10-cnn and writes its probabilities for fixed random images.
PREDICT_EVERY_VERSION = (
    "import json, sys, mlflow, numpy as np\n"
    "from mlflow import MlflowClient\n"
    "images = np.random.default_rng(0).integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)\n"
    "out = {}\n"
    "for version in MlflowClient().search_model_versions(\"name = 'cifar10-cnn'\"):\n"
    "    model = mlflow.pyfunc.load_model(f'models:/cifar10-cnn/{version.version}')\n"
    "    out[version.tags['backend']] = model.unwrap_python_model().probabilities(images).tolist()\n"
    "import keras\n"
    "json.dump({'backend': keras.backend.backend(), 'probabilities': out}, open(sys.argv[1], 'w'))\n"
)


def backend_env(store_uri: str, name: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    return {**env, "MLFLOW_TRACKING_URI": store_uri, "KERAS_BACKEND": name, "PYTHONPATH": str(REPO), **extra}


def tiny_cli(exp_id: str) -> list[str]:
    return [arg for key, value in tiny_overrides(exp_id).items() if value is not None
            for arg in ("--set", f"{key}={value}")]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A store with one `smoke` version per installed backend, each trained through the CLI on it."""
    missing = sorted(set(backend.BACKENDS) - set(INSTALLED))
    if missing:
        skip_or_fail(f"Keras backends not installed: {', '.join(missing)} (the `test` extra installs them)")
    folder = tmp_path_factory.mktemp("backends")
    copy_empty_store(folder / "mlflow.db")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    imported = {}
    for name in INSTALLED:
        report = folder / f"imported-{name}.json"
        # --backend, not only $KERAS_BACKEND: the option is what a user types
        result = subprocess.run(
            [sys.executable, "-c", CLI_REPORTING_TENSORFLOW, "--backend", name, "train", "--exp", "smoke",
             *tiny_cli("smoke")],
            cwd=folder, env=backend_env(uri, "tensorflow", IMPORTED_TF=str(report)),
            capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        assert f"on {name}" in result.stderr  # the model line says where it trains
        imported[name] = json.loads(report.read_text())
    return {"folder": folder, "uri": uri, "imported_tensorflow": imported}


@pytest.fixture(scope="module")
def predicted(trained: dict) -> dict[str, dict[str, np.ndarray]]:
    """{loading backend: {training backend: probabilities}} for the same images."""
    out = {}
    for name in INSTALLED:
        path = trained["folder"] / f"predicted-on-{name}.json"
        result = subprocess.run([sys.executable, "-c", PREDICT_EVERY_VERSION, str(path)], cwd=trained["folder"],
                                env=backend_env(trained["uri"], name), capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        answer = json.loads(path.read_text())
        assert answer["backend"] == name
        out[name] = {k: np.asarray(v, np.float32) for k, v in answer["probabilities"].items()}
    return out


@pytest.mark.core
@pytest.mark.parametrize("name", backend.BACKENDS)
def test_each_backend_trains_logs_and_registers_and_only_tensorflow_imports_tensorflow(trained, name) -> None:
    mlflow.set_tracking_uri(trained["uri"])
    client = MlflowClient()
    [run] = [r for r in mlflow.search_runs(search_all_experiments=True, output_format="list")
             if r.data.params.get("train.backend") == name]
    assert run.info.status == "FINISHED"
    [version] = [v for v in client.search_model_versions("name = 'cifar10-cnn'") if v.run_id == run.info.run_id]
    assert version.tags["backend"] == name
    requirements = Path(mlflow.artifacts.download_artifacts(f"models:/cifar10-cnn/{version.version}/requirements.txt",
                                                            dst_path=str(trained["folder"] / f"req-{name}")))
    pinned = {line.split("==")[0] for line in requirements.read_text().split()}
    assert pinned & set(backend.PACKAGES[name]), f"the served model does not pin {name}: {sorted(pinned)}"
    if name == "tensorflow":
        assert trained["imported_tensorflow"][name]
    else:
        assert trained["imported_tensorflow"][name] == [], "TensorFlow was imported on " + name


@pytest.mark.parametrize("loaded_on", backend.BACKENDS)
@pytest.mark.parametrize("trained_on", backend.BACKENDS)
def test_a_version_trained_on_one_backend_predicts_the_same_on_another(predicted, trained_on, loaded_on) -> None:
    expected = predicted[trained_on][trained_on]
    assert expected.shape == (16, 10) and np.allclose(expected.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(predicted[loaded_on][trained_on], expected, atol=1e-4, rtol=0)
