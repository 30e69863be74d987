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

# One worker runs this module: its fixtures train once per backend, not once per worker.
pytestmark = pytest.mark.xdist_group("backends")
INSTALLED = [b for b in backend.BACKENDS if importlib.util.find_spec(b) is not None]
TWO_CPU_DEVICES = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}  # JAX; TensorFlow splits the CPU itself
# A CLI run that says, as it exits, which TensorFlow modules it imported.
CLI_REPORTING_TENSORFLOW = (
    "import atexit, json, os, sys\n"
    "atexit.register(lambda: open(os.environ['IMPORTED_TF'], 'w').write(json.dumps(\n"
    "    [m for m in sys.modules if m.partition('.')[0] == 'tensorflow'])))\n"
    "from cifar_mlops.cli import main\n"
    "sys.argv[0] = 'cifar-mlops'\n"
    "main()\n"
)
# Loads every version of cifar10-cnn as a server would (the pyfunc) and writes its probabilities for fixed
# random images, and whether TensorFlow was imported.
PREDICT_EVERY_VERSION = (
    "import json, sys, mlflow, numpy as np\n"
    "from mlflow import MlflowClient\n"
    "images = np.random.default_rng(0).integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)\n"
    "out = {}\n"
    "for version in MlflowClient().search_model_versions(\"name = 'cifar10-cnn'\"):\n"
    "    model = mlflow.pyfunc.load_model(f'models:/cifar10-cnn/{version.version}')\n"
    "    out[version.tags['backend']] = model.unwrap_python_model().probabilities(images).tolist()\n"
    "import keras\n"
    "json.dump({'backend': keras.backend.backend(), 'probabilities': out,\n"
    "           'tensorflow': any(m.partition('.')[0] == 'tensorflow' for m in sys.modules)}, open(sys.argv[1], 'w'))\n"
)


def backend_env(store_uri: str, name: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    return {**env, "MLFLOW_TRACKING_URI": store_uri, "KERAS_BACKEND": name, "PYTHONPATH": str(REPO), **extra}


def train_command(name: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "cifar_mlops.cli", "--backend", name, "train", "--exp", "smoke",
            *tiny_cli("smoke"), *extra]


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
            [sys.executable, "-c", CLI_REPORTING_TENSORFLOW, *train_command(name)[3:]],
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
        assert answer["tensorflow"] == (name == "tensorflow"), "loading a version imported TensorFlow on " + name
        out[name] = {k: np.asarray(v, np.float32) for k, v in answer["probabilities"].items()}
    return out


def training_run(uri: str, name: str, devices: str):
    """The one finished run of the store that trained on backend `name` with `devices`."""
    mlflow.set_tracking_uri(uri)
    [run] = [r for r in mlflow.search_runs(search_all_experiments=True, output_format="list")
             if r.data.params.get("train.backend") == name and r.data.params["train.devices"] == devices]
    assert run.info.status == "FINISHED"
    return run


@pytest.mark.parametrize("name", backend.BACKENDS)
def test_each_backend_trains_logs_and_registers_and_only_tensorflow_imports_tensorflow(trained, name) -> None:
    run = training_run(trained["uri"], name, devices="1")
    client = MlflowClient()
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




@pytest.mark.parametrize("name", ["tensorflow", "jax"])
def test_two_devices_train_to_the_metrics_of_one(trained, name) -> None:
    # the same global batch split between two CPU devices: the same steps, up to float rounding
    result = subprocess.run(train_command(name, "--set", "train.devices=2", "--no-register"), cwd=trained["folder"],
                            env=backend_env(trained["uri"], name, **TWO_CPU_DEVICES),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"on {name}, 2 devices" in result.stderr
    one, two = (training_run(trained["uri"], name, devices).data.metrics for devices in ("1", "2"))
    for key in ("val_loss", "test_loss", "train_loss"):
        assert two[key] == pytest.approx(one[key], abs=1e-3), key
    for key in ("val_accuracy", "test_accuracy"):
        assert two[key] == pytest.approx(one[key], abs=0.03), key


@pytest.mark.parametrize(("name", "devices", "message"), [
    ("torch", "2", "train.devices=2 needs the tensorflow or jax backend: Keras 3.15 trains on one device with "
                   "PyTorch; set train.devices=1 or choose --backend jax"),
    ("jax", "3", "train.devices=3 but JAX sees 2 CPU devices (set XLA_FLAGS=--xla_force_host_platform_device_count=3 "
                 "for more); lower train.devices"),
])
def test_devices_a_backend_cannot_have_are_one_line_and_start_no_run(tmp_path, name, devices, message) -> None:
    if name not in INSTALLED:
        skip_or_fail(f"the {name} backend is not installed (the `test` extra installs it)")
    copy_empty_store(tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = subprocess.run(train_command(name, "--set", f"train.devices={devices}"), cwd=tmp_path,
                            env=backend_env(uri, name, **TWO_CPU_DEVICES), capture_output=True, text=True, timeout=600)
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == f"error: {message}"
    assert "Traceback" not in result.stderr
    mlflow.set_tracking_uri(uri)
    assert mlflow.search_runs(search_all_experiments=True, output_format="list") == []


def test_extras_install_one_tensorflow_each_and_every_backend_pinned() -> None:
    import tomllib

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for name in ("cpu", "gpu"):
        assert len([r for r in extras[name] if r.startswith("tensorflow")]) == 1, name
    for name in ("jax", "torch"):
        assert extras[name] and all("==" in r and not r.startswith("tensorflow") for r in extras[name]), name
    assert {"cpu", "jax", "torch"} <= set(extras["test"][0].partition("[")[2].rstrip("]").split(","))


@pytest.mark.parametrize("flags, has", [("fpu avx2 avx512f avx512_bf16 fma", True), ("fpu avx2 amx_bf16 amx_tile", True),
                                        ("fpu avx2 avx512f fma", False)])
def test_bfloat16_is_read_off_the_cpu_flags(tmp_path, flags, has) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: a CPU with avx512_bf16 in its name\nflags\t\t: {flags}\n\n"
                       f"processor\t: 1\nflags\t\t: {flags}\n")
    assert backend.cpu_has_bfloat16(str(cpuinfo)) is has
    assert backend.cpu_has_bfloat16(str(tmp_path / "absent")) is False  # not Linux: no bfloat16 assumed
