"""Shared fixtures: a throw-away MLflow store per test and configs shrunk to tiny sizes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

import pytest

from cifar_mlops import config as cfg
from cifar_mlops.errors import first_line, redact

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent  # this environment's commands: cifar-mlops, mlflow
# The real CIFAR-10 sample sits beside the project on developer machines and in CI; a fresh clone
# elsewhere does not have it, and tests that need it skip, everywhere, CI included: it is data, not a
# service that CI could start. The session header says whether it was found (and `-ra` lists the skips).
SAMPLE_DIR = Path(os.environ.get("CIFAR10_SAMPLE_DIR", REPO.parent / "shared/data/cifar10-sample/cifar-10-batches-py"))
needs_sample = pytest.mark.skipif(not SAMPLE_DIR.is_dir(), reason=f"real CIFAR-10 sample not found at {SAMPLE_DIR}")

# PostgreSQL runs on every developer and CI machine; a user's laptop may have none, and those tests skip
# there. In CI they fail instead (see `skip_or_fail`).
PG_URL = os.environ.get("CIFAR_MLOPS_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")


def in_ci() -> bool:
    """CI runs .ci/run with CI=true (most CI systems set CI=true or CI=1)."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1")


def skip_or_fail(reason: str) -> NoReturn:
    """For a test that needs a service (PostgreSQL, headless Chromium): skip where it is missing, on a
    laptop, but fail in CI, which provides every service (.ci/run): a skip there would hide that the
    test proved nothing."""
    if in_ci():
        pytest.fail(f"{reason} (CI=true: CI must provide it, see .ci/run)", pytrace=False)
    pytest.skip(reason)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """`@pytest.mark.requires_service(available=..., reason=...)`: skipped unless available, outside CI."""
    for item in items:
        for mark in item.iter_markers("requires_service"):
            if not mark.kwargs["available"] and not in_ci():
                item.add_marker(pytest.mark.skip(reason=mark.kwargs["reason"]))


def pytest_runtest_setup(item: pytest.Item) -> None:
    """... and failed in CI, before any fixture is set up.

    With `--dist loadgroup` xdist marks a grouped test by adding `@group` to its id; where it cannot (pytest
    9.2, pytest-dev/pytest-xdist#1386) the groups are silently ignored and each worker builds the module
    fixtures again: such a test fails instead."""
    if getattr(item.config.option, "loadgroup", False) and any(item.iter_markers("xdist_group")) \
            and "@" not in item.nodeid:
        pytest.fail("--dist loadgroup ignored this test's xdist_group: install the pytest and pytest-xdist "
                    "versions pinned in pyproject.toml", pytrace=False)
    for mark in item.iter_markers("requires_service"):
        if not mark.kwargs["available"]:
            skip_or_fail(mark.kwargs["reason"])


def pytest_configure(config: pytest.Config) -> None:
    """On JAX and PyTorch the suite, like the CLI, keeps Keras from importing TensorFlow."""
    if os.environ.get("KERAS_BACKEND", "tensorflow") != "tensorflow":
        from cifar_mlops import backend

        backend.keep_tensorflow_out()


def pytest_report_header(config: pytest.Config) -> list[str]:
    found = "found" if SAMPLE_DIR.is_dir() else "NOT FOUND: the tests that need it skip"
    return [f"real CIFAR-10 sample ({'$CIFAR10_SAMPLE_DIR' if 'CIFAR10_SAMPLE_DIR' in os.environ else 'default'}): "
            f"{SAMPLE_DIR}: {found}", f"CI: {'yes: a missing service fails its tests' if in_ci() else 'no'}",
            f"Keras backend: {os.environ.get('KERAS_BACKEND', 'tensorflow (default)')}"]


TRAINABLE = [e for e in cfg.list_experiments() if cfg.resolve(e).kind == "train"]


def covering_experiments() -> list[str]:
    """The fewest trainable experiments (greedy) that train every registered model the catalogue uses
    with every enhancement used on it. Tracing a tiny MobileNetV2 costs ~20 s per training, so
    iterations that only recombine enhancements already covered are checked by building, not training."""
    by_model: dict[str, dict[str, set[str]]] = {}
    for exp_id in TRAINABLE:
        config = cfg.resolve(exp_id)
        by_model.setdefault(config.model.name, {})[exp_id] = set(config.enhancements)
    chosen = []
    for experiments in by_model.values():
        missing = set().union(*experiments.values())
        picked: list[str] = []
        while missing or not picked:  # at least one per model; each pick the one adding most (ties: catalogue order)
            best = max(experiments, key=lambda e: len(experiments[e] & missing))
            picked.append(best)
            missing -= experiments[best]
        chosen += picked
    return sorted(set(chosen), key=TRAINABLE.index)


_EMPTY_STORE: list[Path] = []  # the session's template, made on first use


def _empty_store_template() -> Path:
    """An MLflow SQLite file with every table created and nothing in it, made once per session: MLflow's
    migrations cost ~1 s per new store, a copy of the file ~10 ms. The copy is what a first connection
    would have made, except for the `Default` experiment's artifact folder, which `copy_empty_store` moves."""
    if not _EMPTY_STORE:
        import atexit
        import shutil
        import tempfile

        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

        folder = Path(tempfile.mkdtemp(prefix="cifar-mlops-empty-store-"))
        atexit.register(shutil.rmtree, folder, True)
        SqlAlchemyStore(f"sqlite:///{folder / 'mlflow.db'}", str(folder / "mlruns")).engine.dispose()
        _EMPTY_STORE.append(folder / "mlflow.db")
    return _EMPTY_STORE[0]


def copy_empty_store(db: Path) -> None:
    """Put an empty, migrated MLflow store at `db` (an SQLite file path), its artifacts beside it in mlruns/."""
    import sqlite3

    template = _empty_store_template()
    source, target = sqlite3.connect(template), sqlite3.connect(db)
    try:
        source.backup(target)
        with target:
            target.execute("UPDATE experiments SET artifact_location = replace(artifact_location, ?, ?)",
                           (str(template.parent), str(db.parent)))
    finally:
        source.close()
        target.close()


def use_store(folder: Path, patch: pytest.MonkeyPatch) -> str:
    """Make `folder` the working directory and an empty SQLite file in it the MLflow store."""
    import mlflow

    patch.chdir(folder)
    if not (folder / "mlflow.db").exists():
        copy_empty_store(folder / "mlflow.db")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    patch.setenv("MLFLOW_TRACKING_URI", uri)
    for name in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME", "CIFAR10_DIR"):
        patch.delenv(name, raising=False)
    mlflow.set_tracking_uri(uri)
    return uri


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """An empty SQLite MLflow store in `tmp_path`, which is also the working directory."""
    import mlflow

    yield use_store(tmp_path, monkeypatch)
    while mlflow.active_run():
        mlflow.end_run()


def tiny_overrides(exp_id: str) -> dict[str, Any]:
    """Overrides that keep an experiment's structure but make it train in seconds on synthetic data."""
    resolved = cfg.resolve(exp_id)
    overrides: dict[str, Any] = {
        "data.source": "synthetic", "data.data_dir": None, "data.train_size": None, "data.val_size": 40,
        "data.synthetic_train_pool": 168, "data.synthetic_test_pool": 40,  # 128 training images: 4 whole batches
        # (a last, smaller batch would make TensorFlow trace the training step again: ~4 s for MobileNetV2)
        "train.epochs": 1, "train.batch_size": 32, "train.warmup_epochs": 0, "model.weights": None,
        "train.checkpoint_every": 0,  # checkpoints cost an upload per epoch; tests/test_resume.py turns them on
    }
    family = resolved.model.family
    if family == "densenet121":
        overrides["model.blocks"] = [1, 1, 1, 1]
    else:
        overrides["model.width"] = 0.25
    return overrides


def tiny(exp_id: str, **extra: Any) -> cfg.ExperimentConfig:
    """Experiment `exp_id` shrunk by `tiny_overrides`, then `extra` (dotted keys with `__` for `.`)."""
    overrides = {**tiny_overrides(exp_id), **{k.replace("__", "."): v for k, v in extra.items()}}
    return cfg.resolve(exp_id, overrides)


def tiny_data_overrides() -> dict[str, Any]:
    """The data section of `tiny("smoke")` as dotted overrides: the data the tiny members train on."""
    return {f"data.{key}": value for key, value in tiny("smoke").data.model_dump().items()}


def tiny_ensemble(**extra: Any) -> cfg.EnsembleConfig:
    """`smoke-ensemble` on the members' tiny data (dotted keys with `__` for `.`)."""
    overrides = {**tiny_data_overrides(), "batch_size": 16, **{k.replace("__", "."): v for k, v in extra.items()}}
    return cfg.resolve("smoke-ensemble", overrides)


def run_command(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    """A command as a user's shell runs it: this environment's commands first on PATH, no MLFLOW_* variable
    of the test run, `env` added."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    environment.update(env)
    environment["PATH"] = f"{BIN}{os.pathsep}{environment.get('PATH', '')}"
    return subprocess.run(args, cwd=cwd, env=environment, capture_output=True, text=True, timeout=600)


def assert_nothing_half_written() -> None:
    """No RUNNING run and no model version in the current store."""
    from mlflow import MlflowClient

    client = MlflowClient()
    running = client.search_runs(
        [e.experiment_id for e in client.search_experiments()], filter_string="attributes.status = 'RUNNING'")
    assert running == []
    assert client.search_model_versions() == []


def _postgres(sql: str) -> None:
    import sqlalchemy

    engine = sqlalchemy.create_engine(PG_URL, connect_args={"connect_timeout": 5}, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as connection:
            connection.execute(sqlalchemy.text(sql))
    finally:
        engine.dispose()


@pytest.fixture
def postgres_url() -> str:
    """The URL of a throw-away schema in PostgreSQL's `test` database, empty: what the code under test
    creates there stays away from anything else and is dropped afterwards. Close its connections first."""
    import sqlalchemy

    schema = f"cifar_mlops_test_{uuid.uuid4().hex[:10]}"
    unreachable = None
    try:
        _postgres(f"CREATE SCHEMA {schema}")
    except sqlalchemy.exc.OperationalError as err:
        unreachable = first_line(err)
    if unreachable is not None:  # outside the `except`: the message alone, not the driver's traceback
        skip_or_fail(f"no PostgreSQL server answers at {redact(PG_URL)}: {unreachable}")
    yield f"{PG_URL}?options=-csearch_path%3D{schema}"
    _postgres(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def server_process(argv: list[str], env: dict[str, str], log: Path, ready_url: str) -> Iterator[None]:
    """Start a server (`mlflow models serve`, `cifar-mlops server`) in its own process group, its output in
    `log`; wait until `ready_url` answers 200; stop the whole group at the end."""
    import requests

    with open(log, "w") as output:
        server = subprocess.Popen(argv, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, f"{argv[1]} exited: {log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"{argv[1]} did not answer: {log.read_text()[-3000:]}"
            try:
                if requests.get(ready_url, timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(0.5)
        yield
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


@contextmanager
def serving(model_uri: str, store_uri: str, log: Path, **extra_env: str) -> Iterator[str]:
    """`mlflow models serve -m model_uri --env-manager local` on a free port of 127.0.0.1; its URL."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(MLFLOW_TRACKING_URI=store_uri, PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",  # it execs uvicorn
               **extra_env)
    url = f"http://127.0.0.1:{port}"
    with server_process([str(BIN / "mlflow"), "models", "serve", "-m", model_uri, "--env-manager", "local",
                         "-h", "127.0.0.1", "-p", str(port)], env, log, f"{url}/ping"):
        yield url


# The trained registry that the promotion, ensemble and serving tests share: trained once per test run (the
# xdist workers take turns through a file lock), each module gets its own copy to change as it likes.
# Versions, in order: 1 = `smoke` after 1 epoch ("weak"), 2 = `smoke` after 6 epochs at full width ("mid"),
# 3 = `smoke-wide` after 10 epochs at a higher learning rate ("strong"). The ensemble's members, `smoke` and
# `smoke-wide` (the newest version of each), are versions 2 and 3.
TRAINED_REGISTRY = {"weak": ("smoke", {"train__epochs": 1}),
                    "mid": ("smoke", {"train__epochs": 6, "model__width": 1.0}),
                    "strong": ("smoke-wide", {"train__epochs": 10, "model__width": 1.0, "train__learning_rate": 0.01})}


def _train_registry(folder: Path) -> None:
    import mlflow
    from mlflow import MlflowClient

    from cifar_mlops.train import train

    with pytest.MonkeyPatch.context() as patch:
        use_store(folder, patch)
        for exp_id, overrides in TRAINED_REGISTRY.values():
            train(tiny(exp_id, **overrides))
        accuracy = [float(v.tags["test_accuracy"]) for v in sorted(
            MlflowClient().search_model_versions("name = 'cifar10-cnn'"), key=lambda v: int(v.version))]
        assert accuracy == sorted(accuracy) and len(set(accuracy)) == 3, f"weak < mid < strong: {accuracy}"
        while mlflow.active_run():
            mlflow.end_run()


def copy_store(source: Path, target: Path) -> None:
    """Copy the SQLite store in folder `source` (mlflow.db, artifacts in mlruns/) to folder `target`,
    every path of `source` the database and the MLmodel files hold rewritten to `target`."""
    import shutil
    import sqlite3

    shutil.copytree(source / "mlruns", target / "mlruns")
    for mlmodel in (target / "mlruns").rglob("MLmodel"):  # its `artifact_path` says where the model was logged
        mlmodel.write_text(mlmodel.read_text().replace(str(source), str(target)))
    origin, copy = sqlite3.connect(source / "mlflow.db"), sqlite3.connect(target / "mlflow.db")
    try:
        origin.backup(copy)
        with copy:
            for (table,) in copy.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall():
                for column in copy.execute(f"PRAGMA table_info('{table}')").fetchall():
                    if column[2].upper().startswith(("VARCHAR", "TEXT")):
                        copy.execute(f'UPDATE "{table}" SET "{column[1]}" = replace("{column[1]}", ?, ?) '
                                     f'WHERE instr("{column[1]}", ?) > 0', (str(source), str(target), str(source)))
    finally:
        origin.close()
        copy.close()


@pytest.fixture(scope="session")
def trained_registry_template(tmp_path_factory: pytest.TempPathFactory, worker_id: str) -> Path:
    """The folder of the shared trained registry (see TRAINED_REGISTRY), made by the first worker to ask."""
    from filelock import FileLock

    shared = tmp_path_factory.getbasetemp() if worker_id == "master" else tmp_path_factory.getbasetemp().parent
    folder = shared / "trained-registry"
    with FileLock(str(shared / "trained-registry.lock")):
        if not (folder / "done").exists():
            folder.mkdir(exist_ok=True)
            _train_registry(folder)
            (folder / "done").touch()
    return folder


@pytest.fixture(scope="module")
def trained_registry(trained_registry_template: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """This module's own copy of the shared trained registry, as the current store (and working directory);
    its tracking URI. Versions of cifar10-cnn: 1 weak, 2 mid, 3 strong (TRAINED_REGISTRY)."""
    import mlflow

    folder = tmp_path_factory.mktemp("trained-registry")
    copy_store(trained_registry_template, folder)
    with pytest.MonkeyPatch.context() as patch:
        yield use_store(folder, patch)
        while mlflow.active_run():
            mlflow.end_run()
