"""Shared fixtures: a throw-away MLflow store per test and configs shrunk to tiny sizes."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import pytest

from cifar_mlops import config as cfg
from cifar_mlops.errors import first_line, redact

REPO = Path(__file__).resolve().parent.parent
# The real CIFAR-10 sample sits beside the project on developer machines; a
# fresh clone elsewhere does not have it, and tests that need it skip.
SAMPLE_DIR = Path(os.environ.get("CIFAR10_SAMPLE_DIR", REPO.parent / "shared/data/cifar10-sample/cifar-10-batches-py"))
needs_sample = pytest.mark.skipif(not SAMPLE_DIR.is_dir(), reason=f"real CIFAR-10 sample not found at {SAMPLE_DIR}")

# PostgreSQL runs on every developer and CI machine; a user's laptop may have none, and those tests skip.
PG_URL = os.environ.get("CIFAR_MLOPS_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")

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
        picked = [next(iter(experiments))]
        missing -= experiments[picked[0]]
        while missing:
            best = max(experiments, key=lambda e: len(experiments[e] & missing))
            picked.append(best)
            missing -= experiments[best]
        chosen += picked
    return sorted(set(chosen), key=TRAINABLE.index)


def use_store(folder: Path, patch: pytest.MonkeyPatch) -> str:
    """Make `folder` the working directory and an empty SQLite file in it the MLflow store."""
    import mlflow

    patch.chdir(folder)
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
        "data.synthetic_train_pool": 160, "data.synthetic_test_pool": 40,
        "train.epochs": 1, "train.batch_size": 32, "train.warmup_epochs": 0, "model.weights": None,
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
    try:
        _postgres(f"CREATE SCHEMA {schema}")
    except sqlalchemy.exc.OperationalError as err:
        pytest.skip(f"no PostgreSQL server answers at {redact(PG_URL)}: {first_line(err)}")
    yield f"{PG_URL}?options=-csearch_path%3D{schema}"
    _postgres(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
