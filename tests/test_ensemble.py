"""Ensembles from the registry: soft voting, fitted weights, the registered pyfunc, bad members."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import mlflow
import numpy as np
import pytest
from click.testing import CliRunner
from mlflow import MlflowClient
from mlflow.models import ModelSignature
from mlflow.types import Schema, TensorSpec

from cifar_mlops import cli, data, ensemble
from cifar_mlops import config as cfg
from cifar_mlops.tracking import runs, served
from tests.conftest import REPO, tiny_data_overrides, tiny_ensemble

# One worker runs this module: its module fixtures are made once, not once per worker.
pytestmark = pytest.mark.xdist_group("ensemble")



@pytest.fixture(scope="module")
def registry(trained_registry: str) -> str:
    """The shared trained registry (conftest.TRAINED_REGISTRY): the newest cifar10-cnn version of `smoke` (2)
    and of `smoke-wide` (3) are the members, apart enough for voting and weighting to matter."""
    return trained_registry


def cli_tiny_data() -> list[str]:
    return [arg for key, value in tiny_data_overrides().items() if value is not None
            for arg in ("--set", f"{key}={value}")]


def ensemble_versions() -> list:
    return MlflowClient().search_model_versions("name = 'cifar10-ensemble'")


def ablation_runs() -> list:
    client = MlflowClient()
    experiment = client.get_experiment_by_name(runs.ABLATION_EXPERIMENT)
    return client.search_runs([experiment.experiment_id]) if experiment else []


def test_soft_vote_is_the_weighted_mean() -> None:
    rng = np.random.default_rng(0)
    members = [rng.dirichlet(np.ones(10), size=5).astype(np.float32) for _ in range(3)]
    np.testing.assert_allclose(ensemble.soft_vote(members, [1, 1, 1]), np.mean(members, axis=0), rtol=1e-6)
    np.testing.assert_allclose(ensemble.soft_vote(members, [2, 1, 1]),
                               (2 * members[0] + members[1] + members[2]) / 4, rtol=1e-6)


@pytest.mark.core
def test_registered_ensemble_is_the_mean_of_its_members_and_tracked_like_a_run(registry) -> None:
    metrics = ensemble.build(tiny_ensemble(fit_weights=False))

    [version] = ensemble_versions()
    splits = data.load_splits(tiny_ensemble().data)
    batch = splits.x_test[:12]
    member_uris = version.tags["members"].split(",")
    assert len(member_uris) == 2
    members = [served.load_probabilities(f"models:/{uri}", 16)(batch) for uri in member_uris]
    table = served.load_model(f"models:/cifar10-ensemble/{version.version}").predict(batch)
    voted = table[list(splits.class_names)].to_numpy()
    assert voted.shape == (12, 10) and voted.dtype == np.float32
    np.testing.assert_allclose(voted, np.mean(members, axis=0), atol=1e-6)
    assert list(table["label"]) == [splits.class_names[i] for i in voted.argmax(axis=1)]

    run = MlflowClient().get_run(version.tags["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "smoke-ensemble"
    assert run.data.tags["family"] == "ensemble" and run.data.tags["exp_id"] == "smoke-ensemble"
    assert run.data.tags["data_source"] == "synthetic" and run.data.tags["members"] == version.tags["members"]
    for key in [f"{s}_{m}" for s in ("train", "val", "test") for m in ("accuracy", "f1_macro", "loss")] + [
            "member_0_test_accuracy", "member_1_test_accuracy", "ensemble_gain_test_accuracy", "weight_0"]:
        assert key in run.data.metrics, key
    best = max(metrics["member_0_test_accuracy"], metrics["member_1_test_accuracy"])
    assert metrics["ensemble_gain_test_accuracy"] == pytest.approx(metrics["test_accuracy"] - best)
    assert run.data.params["member_0"].startswith("cifar10-cnn/")
    artifacts = {a.path for a in MlflowClient().list_artifacts(run.info.run_id)}
    assert {"classification_report.txt", "confusion_matrix.png", "config.yaml"} <= artifacts
    info = mlflow.models.get_model_info(f"models:/cifar10-ensemble/{version.version}")
    assert info.signature == served.image_signature(splits.class_names)
    assert info.metadata["member_uris"] == [f"models:/{uri}" for uri in member_uris]


def test_fitted_weights_never_score_worse_on_validation(registry) -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 10, size=200)
    good = np.full((200, 10), 0.02)
    good[np.arange(200), y] = 0.82
    noise = rng.dirichlet(np.ones(10), size=200)
    weights, fitted = ensemble.fit_weights([noise, good], y)
    assert fitted and weights[1] > 0.9
    for members in ([noise, good], [good, good], [noise, rng.dirichlet(np.ones(10), size=200)]):
        weights, _ = ensemble.fit_weights(members, y)
        for metric in ("loss", "accuracy"):
            fitted_score = ensemble.evaluation.split_metrics("val", y, ensemble.soft_vote(members, weights))
            equal_score = ensemble.evaluation.split_metrics("val", y, ensemble.soft_vote(members, [1, 1]))
            if metric == "loss":  # scored as the run logs it: no tolerance needed beyond rounding
                assert fitted_score["val_loss"] <= equal_score["val_loss"] + 1e-12
            else:
                assert fitted_score["val_accuracy"] >= equal_score["val_accuracy"]
    weights, _ = ensemble.fit_weights([noise, good], y % 9)  # class 9 absent from val: still scored over 10 classes
    assert weights.sum() == pytest.approx(1.0)

    equal = ensemble.build(tiny_ensemble(fit_weights=False), register=False)
    fitted = ensemble.build(tiny_ensemble(fit_weights=True), register=False)
    assert fitted["val_loss"] <= equal["val_loss"] + 1e-12
    assert fitted["val_accuracy"] >= equal["val_accuracy"]
    assert fitted["weight_0"] + fitted["weight_1"] == pytest.approx(1.0)


def test_the_served_ensemble_predicts_exactly_what_was_evaluated(registry) -> None:
    # One soft-voting code path: the registered pyfunc, reloaded in a new process, reproduces the
    # probabilities behind the run's metrics bit for bit (so the metrics themselves, exactly),
    # with configured and with fitted weights. Fitting starts far from the best weights, so it is kept.
    members = "[{registered_model: cifar10-cnn, exp_id: smoke, weight: 1}, " \
              "{registered_model: cifar10-cnn, exp_id: smoke-wide, weight: 19}]"
    members = cfg.parse_overrides([f"x.members={members}"])["x.members"]
    logged = {}
    for fit_weights in (False, True):
        config = tiny_ensemble(fit_weights=fit_weights, members=members)
        metrics = ensemble.build(config)
        assert metrics["weights_fitted"] == float(fit_weights)
        logged[max(int(v.version) for v in ensemble_versions())] = metrics
    code = ("import json, sys; import mlflow; from cifar_mlops import config, data, evaluation\n"
            "splits = data.load_splits(config.DataConfig.model_validate_json(sys.argv[1]))\n"
            "scores = {}\n"
            "for version in sys.argv[2:]:\n"
            "    model = mlflow.pyfunc.load_model(f'models:/cifar10-ensemble/{version}')\n"
            "    for split in ('val', 'test'):\n"
            "        x, y = splits.by_split()[split]\n"
            "        p = model.predict(x)[list(splits.class_names)].to_numpy()\n"
            "        scores.setdefault(version, {}).update(evaluation.split_metrics(split, y, p))\n"
            "print(json.dumps(scores))\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(MLFLOW_TRACKING_URI=registry, TF_CPP_MIN_LOG_LEVEL="2")
    done = subprocess.run([sys.executable, "-c", code, config.data.model_dump_json(), *map(str, logged)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    served = json.loads(done.stdout.strip().splitlines()[-1])
    for version, metrics in logged.items():
        assert served[str(version)] == {key: metrics[key] for key in served[str(version)]}, version


@pytest.mark.parametrize(
    ("members", "message"),
    [
        ("[{registered_model: cifar10-mobilenetv2, exp_id: '2.4'}, {registered_model: cifar10-cnn, exp_id: smoke}]",
         "unknown registered model 'cifar10-mobilenetv2' (registered: cifar10-cnn"),
        ("[{registered_model: cifar10-cnn, exp_id: smoke}, {registered_model: cifar10-cnn, exp_id: b5}]",
         "cifar10-cnn has no version of experiment b5; train one with `cifar-mlops train --exp b5`"),
        ("[{registered_model: cifar10-cnn, exp_id: smoke}, {registered_model: cifar10-cnn, version: 99}]",
         "cifar10-cnn has no version 99 (versions: 1, 2"),
        ("[{registered_model: cifar10-cnn, exp_id: smoke}, {registered_model: cifar10-cnn, alias: champion}]",
         "cifar10-cnn has no version with alias @champion"),
        ("[{registered_model: cifar10-cnn, exp_id: smoke}, {registered_model: cifar10-odd, version: 1}]",
         "cifar10-odd/1 takes float32 (-1, 64), not raw uint8 (-1, 32, 32, 3) images"),
        ("[{registered_model: cifar10-cnn, exp_id: smoke}, {registered_model: cifar10-five, version: 1}]",
         "members disagree on the number of classes (cifar10-cnn/2 outputs 10, cifar10-five/1 outputs 5)"),
    ],
)
def test_bad_members_are_one_line_errors_and_register_nothing(registry, members: str, message: str) -> None:
    _register_foreign_models()
    runs_before = len(ablation_runs())
    versions_before = len(ensemble_versions())
    result = CliRunner().invoke(cli.main, ["ensemble", "--exp", "smoke-ensemble", "--set", f"members={members}",
                                           *cli_tiny_data()])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr
    assert "Traceback" not in result.stderr
    assert len(ablation_runs()) == runs_before and len(ensemble_versions()) == versions_before


def test_a_training_experiment_is_not_an_ensemble(registry) -> None:
    result = CliRunner().invoke(cli.main, ["ensemble", "--exp", "smoke"])
    assert result.exit_code == 2
    assert "smoke is a training experiment; run `cifar-mlops train --exp smoke`" in result.stderr


class _Constant(mlflow.pyfunc.PythonModel):
    _skip_type_hint_validation = True  # no "add type hints" warning

    def predict(self, context, model_input, params=None):
        return np.zeros((len(model_input), 10), np.float32)


def _register_foreign_models() -> None:
    """cifar10-odd: a model on feature vectors; cifar10-five: raw images in, but 5 classes out."""
    client = MlflowClient()
    existing = {m.name for m in client.search_registered_models()}
    contracts = {
        "cifar10-odd": ModelSignature(Schema([TensorSpec(np.dtype(np.float32), (-1, 64))]),
                                      Schema([TensorSpec(np.dtype(np.float32), (-1, 10))])),
        "cifar10-five": served.pixel_signature(5),
    }
    for name, signature in contracts.items():
        if name in existing:
            continue
        with mlflow.start_run(run_name=f"foreign {name}"), warnings.catch_warnings():
            # MLflow's colour-coded nudge to add an input example; these stand-ins need none
            warnings.filterwarnings("ignore", message=".*An input example was not provided")
            info = mlflow.pyfunc.log_model(name="model", python_model=_Constant(), signature=signature,
                                           pip_requirements=["numpy"])
        mlflow.register_model(info.model_uri, name)


def test_models_lists_versions_aliases_and_test_accuracy(registry) -> None:
    result = CliRunner().invoke(cli.main, ["models", "cifar10-cnn"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split()[:5] == ["model", "version", "aliases", "exp_id", "test_accuracy"]
    rows = {tuple(line.split()[:2]): line.split() for line in lines[1:]}
    for version in MlflowClient().search_model_versions("name = 'cifar10-cnn'"):
        row = rows[("cifar10-cnn", str(version.version))]
        assert row[3] == version.tags["exp_id"] and row[4] == version.tags["test_accuracy"]
    missing = CliRunner().invoke(cli.main, ["models", "cifar10-nope"])
    assert missing.exit_code == 1 and "unknown registered model 'cifar10-nope'" in missing.stderr


def test_ensemble_command_then_reload_in_a_fresh_process_without_its_members(registry) -> None:
    result = CliRunner().invoke(cli.main, ["ensemble", "--exp", "smoke-ensemble", *cli_tiny_data(),
                                           "--set", "batch_size=16"])
    assert result.exit_code == 0, result.stderr
    assert "test_accuracy=" in result.stdout and "ensemble_gain_test_accuracy=" in result.stdout
    newest = max(int(v.version) for v in ensemble_versions())

    # The ensemble carries copies of its members: it loads after they are gone from the registry.
    client = MlflowClient()
    for version in client.search_model_versions("name = 'cifar10-cnn'"):
        client.delete_model_version("cifar10-cnn", version.version)
    code = ("import mlflow, numpy as np; "
            f"m = mlflow.pyfunc.load_model('models:/cifar10-ensemble/{newest}'); "
            "x = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8); "
            "p = m.predict(x).iloc[:, 2:].to_numpy(); print(p.shape, p.dtype, round(float(p.sum()), 3))")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(MLFLOW_TRACKING_URI=registry, TF_CPP_MIN_LOG_LEVEL="2")
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(REPO).parent, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "(5, 10) float32 5.0"
