"""The commands as a user runs them: `cifar-mlops ...` and `mlflow run . -e train ...`."""

from __future__ import annotations

import importlib
import os
import pkgutil
import re
import shlex
import subprocess
import sys
from pathlib import Path

import click
import click.testing
import mlflow
import PIL.Image
import pytest
from click.testing import CliRunner
from mlflow import MlflowClient

import cifar_mlops
from cifar_mlops import cli, process
from cifar_mlops.config import ConfigError
from cifar_mlops.data import DataError
from cifar_mlops.errors import StoreUnavailable, UserError, first_line
from cifar_mlops.models import UnknownModel
from cifar_mlops.tracking import runs
from cifar_mlops.tracking.store import PermissionDenied
from cifar_mlops.tune import TuneError
from tests.conftest import BIN, REPO, assert_nothing_half_written, run_command


def test_help_and_experiments_do_not_import_tensorflow_or_mlflow() -> None:
    code = ("import sys; from click.testing import CliRunner; from cifar_mlops.cli import main; "
            "r = CliRunner().invoke(main, ['experiments']); assert r.exit_code == 0, r.output; "
            "heavy = [m for m in ('tensorflow', 'keras', 'mlflow', 'optuna') if m in sys.modules]; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_version() -> None:
    from importlib import metadata

    result = CliRunner().invoke(cli.main, ["--version"])
    assert result.exit_code == 0 and result.output == f"cifar-mlops, version {metadata.version('cifar-mlops')}\n"


def test_heavy_imports_are_frozen_out_of_the_collector_which_stays_on() -> None:
    # A fresh process: freezing pytest's own objects would outlive this test.
    code = ("import gc; from cifar_mlops import process\n"
            "with process.heavy_imports():\n    import tensorflow, mlflow\n"
            "assert gc.isenabled()\n"
            "frozen, tracked = gc.get_freeze_count(), len(gc.get_objects())\n"
            "assert frozen > 5 * tracked, (frozen, tracked)\n"
            "try:\n    with process.heavy_imports():\n        import no_such_module\n"
            "except ImportError:\n    pass\n"
            "assert gc.isenabled()\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_stderr_without_holds_back_only_the_noise_even_from_native_code(capfd) -> None:
    with process.stderr_without(("oneDNN custom operations are on",)):
        os.write(2, b"I0000 port.cc:153] oneDNN custom operations are on. You may see...\n")  # as C++ writes it
        os.write(2, b"a real warning\n")
    assert capfd.readouterr().err == "a real warning\n"
    os.write(2, b"after\n")  # file descriptor 2 is back
    assert capfd.readouterr().err == "after\n"


def test_experiments_prints_the_study_table_and_settings() -> None:
    result = CliRunner().invoke(cli.main, ["experiments"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    study_a = lines[:next(i for i, line in enumerate(lines) if line.startswith("Study B"))]
    rows = {cells[0]: cells[1:] for cells in map(_markdown_cells, study_a) if cells}  # label -> marks
    assert rows["Enhancement"] == ["1.0", "1.1", "2.0", "2.1", "2.2", "2.3", "2.4", "3.0", "3.1"]  # study A's header
    assert rows["AdamW"] == ["", "", "", "", "✔", "", "✔", "", ""]
    assert "✔" not in rows["Random rotation"]
    assert any(_markdown_cells(line)[:1] == ["Stratified split"] for line in lines)  # study B's table
    for exp_id in ("1.0", "3.1", "3.2", "b0", "b5", "smoke"):
        assert any(line.split()[:1] == [exp_id] for line in lines), exp_id
    settings = next(line for line in lines if line.startswith("3.1 "))
    assert "densenet121+imagenet" in settings and " 96 " in settings


def _markdown_cells(line: str) -> list[str]:
    """The cells of a markdown table row ("| a | b |"), [] for any other line (or the |---| rule)."""
    if not line.startswith("|") or set(line) <= set("|-: "):
        return []
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def test_experiments_lists_models() -> None:
    result = CliRunner().invoke(cli.main, ["experiments", "--models"])
    assert result.exit_code == 0
    assert {line.split()[0] for line in result.output.splitlines()} >= {"mobilenetv2", "densenet121", "cnn_b5"}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--exp", "nope"], "error: unknown experiment 'nope'; known experiments: 1.0"),
        (["--exp", "../../etc/passwd"], "is not an experiment id"),
        (["--exp", "smoke", "--set", "train.epochs=0"], "--set: train.epochs: Input should be greater than or equal to 1"),
        (["--exp", "smoke", "--set", "train.epochz=3"], "--set: train.epochz: unknown key"),
        (["--exp", "smoke", "--set", "epochs"], "expected section.key=value"),
        (["--exp", "smoke", "--overrides", "train.batch_size=many"], "train.batch_size: Input should be a valid integer"),
        (["--exp", "3.2"], "3.2 is an ensemble experiment; run `cifar-mlops ensemble --exp 3.2`"),
        (["--exp", "b0", "--data-dir", "/no/such/folder", "--set", "train.epochs=1"], "/no/such/folder"),
        (["--exp", "3.1", "--set", "model.blocks=[1,1,1,1]", "--set", "model.weights=/no/weights.h5",
          "--set", "train.epochs=4", "--set", "data.source=synthetic", "--set", "data.val_size=40"], "/no/weights.h5"),
    ],
)
def test_bad_input_is_one_line_nonzero_and_leaves_nothing_half_written(store, args, message) -> None:
    result = CliRunner().invoke(cli.main, ["train", *args])
    assert result.exit_code != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr
    assert "Traceback" not in result.stderr
    assert_nothing_half_written()


@pytest.mark.parametrize("command", [["train", "--exp", "smoke"], ["models"], ["report", "--log", "false"]])
def test_an_unreachable_tracking_server_is_one_line_not_minutes_of_retries(store, monkeypatch, command) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # nothing listens on port 9
    result = CliRunner().invoke(cli.main, command)
    assert result.exit_code == 1
    assert result.stderr.splitlines()[-1].startswith("error: the MLflow tracking server http://127.0.0.1:9 does not answer")
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("command", [["train", "--exp", "smoke"], ["models"]])
def test_an_unreachable_tracking_database_is_one_line_without_its_password(store, monkeypatch, command) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "postgresql://postgres:secret@127.0.0.1:1/test")  # port 1: refused
    result = CliRunner().invoke(cli.main, command)
    assert result.exit_code == 1
    last = result.stderr.splitlines()[-1]
    assert last.startswith("error: the MLflow tracking database postgresql://postgres:***@127.0.0.1:1/test "
                           "cannot be used (connection failed"), last
    assert "secret" not in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("command", [["train", "--exp", "smoke"], ["models"]])
def test_a_store_file_that_cannot_be_created_is_one_line_and_no_run(store, tmp_path, monkeypatch, command) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'no-such-folder' / 'mlflow.db'}")
    result = CliRunner().invoke(cli.main, command)
    assert result.exit_code == 1
    last = result.stderr.splitlines()[-1]
    assert last.startswith(f"error: the MLflow tracking store sqlite:///{tmp_path / 'no-such-folder' / 'mlflow.db'} "
                           "cannot be opened ([Errno 2] No such file or directory"), last
    assert "Traceback" not in result.stderr
    mlflow.set_tracking_uri(store)
    assert_nothing_half_written()


@pytest.mark.slow
def test_quickstart_command_trains_tracks_and_registers_smoke(tmp_path) -> None:
    result = run_command(["cifar-mlops", "train", "--exp", "smoke"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "registered cifar10-cnn version 1" in result.stderr
    assert "Epoch 3/3" in result.stdout + result.stderr  # progress while training
    assert "oneDNN" not in result.stderr and "absl::InitializeLog" not in result.stderr  # TensorFlow's import chatter

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")  # the default store: the working directory
    client = MlflowClient()
    [run] = client.search_runs([client.get_experiment_by_name(runs.ABLATION_EXPERIMENT).experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "smoke"
    [version] = client.search_model_versions("name='cifar10-cnn'")
    assert version.tags["exp_id"] == "smoke"


@pytest.mark.slow
def test_mlflow_run_entry_point_adopts_its_run(tmp_path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = run_command(
        ["mlflow", "run", str(REPO), "-e", "train", "-P", "exp=smoke", "-P", "overrides=train.epochs=2",
         "--env-manager", "local", "--experiment-name", runs.ABLATION_EXPERIMENT],
        cwd=tmp_path, MLFLOW_TRACKING_URI=uri)
    assert result.returncode == 0, result.stderr[-3000:]

    mlflow.set_tracking_uri(uri)
    client = MlflowClient()
    [run] = client.search_runs([client.get_experiment_by_name(runs.ABLATION_EXPERIMENT).experiment_id])
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "smoke" and run.data.tags["exp_id"] == "smoke"
    assert run.data.params["train.epochs"] == "2"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "epoch_val_accuracy")] == [1, 2]
    assert {"test_accuracy", "val_f1_macro", "train_accuracy"} <= set(run.data.metrics)
    [version] = client.search_model_versions("name='cifar10-cnn'")
    assert version.run_id == run.info.run_id  # (a version loaded in a fresh process: tests/test_backends.py)


def mlflow_run_in_this_process(entry_point: str, parameters: dict[str, str], experiment_id: str,
                               storage_dir: Path) -> tuple[str, click.testing.Result]:
    """What `mlflow run . -e ENTRY_POINT -P ... --env-manager local` does, with its command run in this process.

    MLflow's own code (private modules of `mlflow.projects`, the code `mlflow run` calls) creates the run, with the
    project tags and the entry point's parameters as params, and computes the command from MLproject; the command
    then runs through click with the environment `mlflow run` gives its subprocess. A real `mlflow run` process
    runs `report` below and `train` in the tests around (and tests/test_resume.py); the subprocess adds nothing
    that differs between entry points, and each one costs a TensorFlow import."""
    from mlflow.projects import _project_spec
    from mlflow.projects.utils import _create_run

    run_id = _create_run(str(REPO), experiment_id, str(REPO), None, entry_point, parameters).info.run_id
    command = _project_spec.load_project(str(REPO)).get_entry_point(entry_point).compute_command(
        parameters, str(storage_dir))
    program, *args = shlex.split(command)
    assert program == "cifar-mlops", command
    result = CliRunner().invoke(cli.main, args, env={"MLFLOW_RUN_ID": run_id, "MLFLOW_EXPERIMENT_ID": experiment_id})
    assert result.exit_code == 0, (result.output, result.exception)
    if MlflowClient().get_run(run_id).info.status == "RUNNING":  # as `mlflow run` ends it once its command exits 0
        MlflowClient().set_terminated(run_id, "FINISHED")
    return run_id, result


@pytest.mark.slow
def test_every_other_entry_point_runs_through_mlflow_run_in_the_run_it_is_given(trained_registry, tmp_path,
                                                                                 monkeypatch) -> None:
    # As the issues check them: `mlflow run . -e X ... --env-manager local`, no --experiment-name. The store
    # holds smoke (versions 1, 2) and smoke-wide (3) of cifar10-cnn, trained on `tiny` data, none promoted.
    tiny_data = "data.synthetic_train_pool=168 data.val_size=40 data.synthetic_test_pool=40"
    client = MlflowClient()
    default = client.get_experiment_by_name("Default").experiment_id  # where `mlflow run` puts its runs
    monkeypatch.chdir(tmp_path)  # tune's default journal goes here

    def mlflow_run(entry_point: str, **parameters: str):
        run_id, result = mlflow_run_in_this_process(entry_point, parameters, default, tmp_path)
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED" and run.info.experiment_id == default, run.data.tags
        return run, result

    run, _ = mlflow_run("ensemble", exp="smoke-ensemble", overrides=f"{tiny_data} batch_size=16")
    assert run.info.run_name == "smoke-ensemble" and "ensemble_gain_test_accuracy" in run.data.metrics
    [version] = client.search_model_versions("name = 'cifar10-ensemble'")
    assert version.run_id == run.info.run_id

    run, result = mlflow_run("promote", model="cifar10-cnn", version="2", alpha="0.5")
    assert "decision: promoted" in result.stdout
    assert run.data.tags["promotion_decision"] == "promoted"
    assert client.get_registered_model("cifar10-cnn").aliases == {"champion": 2}

    run, result = mlflow_run("tune", exp="smoke", trials="2", seed="0",
                             overrides=f"{tiny_data} search.epochs.high=1 search.batch_size=[32]")
    trials = client.search_runs([default], filter_string=f"tags.`mlflow.parentRunId` = '{run.info.run_id}'")
    assert sorted(t.data.tags["trial_number"] for t in trials) == ["0", "1"]
    assert run.data.tags["best_trial"] in {"0", "1"} and "best_val_accuracy" in run.data.metrics
    assert "add --experiment-name cifar10-tuning to `mlflow run`" in result.stderr

    photos = tmp_path / "photos"
    photos.mkdir()
    for name, size in (("a.png", (40, 30)), ("b.jpg", (64, 64))):
        PIL.Image.new("RGB", size, (200, 30, 30)).save(photos / name)
    run, _ = mlflow_run("predict", model="models:/cifar10-cnn@champion", paths=str(photos), top_k="2",
                        out=str(tmp_path / "predictions.csv"))
    assert run.data.tags["kind"] == "prediction" and run.data.params["model"] == "models:/cifar10-cnn@champion"
    logged = mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/predictions.csv")
    assert logged == (tmp_path / "predictions.csv").read_text() and len(logged.splitlines()) == 3

    # The one real `mlflow run` process of this test (report imports no TensorFlow: the cheapest).
    result = run_command(["mlflow", "run", str(REPO), "-e", "report", "--env-manager", "local",
                          "-P", "format=html", "-P", f"out={tmp_path / 'report.html'}"],
                         cwd=tmp_path, MLFLOW_TRACKING_URI=trained_registry)
    assert result.returncode == 0, result.stderr[-3000:]
    run = client.get_run(re.search(r"=== Run \(ID '(\w+)'\) succeeded ===", result.stderr).group(1))
    assert run.info.status == "FINISHED" and run.info.experiment_id == default, run.data.tags
    assert run.data.tags["kind"] == "report" and (tmp_path / "report.html").is_file()
    assert {"report.md", "report.html", "report.csv"} <= {a.path for a in client.list_artifacts(run.info.run_id)}


@pytest.mark.slow
def test_mlflow_run_with_bad_input_fails_its_run_with_the_reason(tmp_path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = run_command(
        ["mlflow", "run", str(REPO), "-e", "train", "-P", "exp=smoke", "-P", "overrides=train.epochs=-1",
         "--env-manager", "local"],  # no --experiment-name: MLflow creates the run in `Default`
        cwd=tmp_path, MLFLOW_TRACKING_URI=uri)
    assert result.returncode != 0
    assert "error: --set: train.epochs: Input should be greater than or equal to 1" in result.stderr
    mlflow.set_tracking_uri(uri)
    client = MlflowClient()
    [run] = client.search_runs([client.get_experiment_by_name("Default").experiment_id])
    assert run.info.status == "FAILED"
    assert "train.epochs" in run.data.tags[runs.FAILURE_TAG]
    assert client.search_model_versions() == []


@pytest.mark.slow
@pytest.mark.parametrize("store_kind", ["sqlite", "postgresql"])
def test_two_trainings_started_together_on_a_new_store_share_it(tmp_path, request, store_kind) -> None:
    # Both processes find no tables and create them at the same moment: two `train` commands in a
    # fresh folder (./mlflow.db), or two team members' first runs against an empty PostgreSQL database.
    command = ["cifar-mlops", "train", "--exp", "smoke", "--set", "train.epochs=1"]
    environment = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    environment["PATH"] = f"{BIN}{os.pathsep}{environment.get('PATH', '')}"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    if store_kind == "postgresql":
        uri = environment["MLFLOW_TRACKING_URI"] = request.getfixturevalue("postgres_url")
    processes = [subprocess.Popen(command, cwd=tmp_path, env=environment, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=600) for p in processes]
    for child, (_, stderr) in zip(processes, outputs):
        assert child.returncode == 0, stderr[-3000:]
        assert "Traceback" not in stderr

    client = MlflowClient(uri)
    finished = client.search_runs([client.get_experiment_by_name(runs.ABLATION_EXPERIMENT).experiment_id])
    assert sorted(r.info.status for r in finished) == ["FINISHED", "FINISHED"]
    assert sorted(int(v.version) for v in client.search_model_versions("name='cifar10-cnn'")) == [1, 2]


def _boundary_raising(error: BaseException) -> click.Group:
    """A command group with the CLI's error boundary whose one command raises `error`."""
    @click.group(cls=cli._Commands)
    def group() -> None:
        pass

    @group.command()
    def go() -> None:
        raise error

    return group


def _noted(error: BaseException, note: str) -> BaseException:
    error.add_note(note)
    return error


@pytest.mark.parametrize(("error", "code", "line"), [
    (ConfigError("smoke.yaml: train.epochz: unknown key"), 2, "error: smoke.yaml: train.epochz: unknown key"),
    (_noted(DataError("test_batch is truncated"), "run abc of b0 is marked FAILED; nothing was registered"), 1,
     "error: test_batch is truncated (run abc of b0 is marked FAILED; nothing was registered)"),
    (_noted(KeyboardInterrupt(), "run abc of b0 is marked KILLED"), 130, "error: interrupted (run abc of b0 is marked KILLED)"),
])
def test_the_error_boundary_turns_user_errors_and_ctrl_c_into_one_line(error, code, line) -> None:
    result = CliRunner().invoke(_boundary_raising(error), ["go"])
    assert result.exit_code == code
    assert result.stderr.splitlines() == [line]


def test_the_error_boundary_lets_a_bug_keep_its_traceback() -> None:
    result = CliRunner().invoke(_boundary_raising(ValueError("a genuine bug")), ["go"])
    assert isinstance(result.exception, ValueError) and result.exc_info[2] is not None  # not turned into a line
    assert "error:" not in result.stderr


def test_first_line_is_one_line_and_never_empty() -> None:
    assert first_line(ValueError("bad value\nmore detail")) == "bad value"
    assert first_line(ValueError("")) == first_line(ValueError(" \n ")) == "ValueError"  # no IndexError
    assert first_line(KeyError("x"), typed=True) == "KeyError: 'x'" and first_line(OSError(), typed=True) == "OSError"
    assert first_line(ValueError("x" * 500)) == "x" * 300 and first_line(ValueError("x" * 500), limit=20) == "x" * 20


def user_errors(base: type[UserError] = UserError) -> list[type[UserError]]:
    """Every subclass of `base` defined in the package (each module imported first), however deep."""
    for module in pkgutil.walk_packages(cifar_mlops.__path__, "cifar_mlops."):
        importlib.import_module(module.name)

    def below(cls: type[UserError]) -> list[type[UserError]]:
        return [c for sub in cls.__subclasses__() for c in (sub, *below(sub))]

    return sorted(set(below(base)), key=lambda c: f"{c.__module__}.{c.__qualname__}")


def test_every_user_error_leaves_the_boundary_as_one_line_and_its_own_exit_code() -> None:
    # exit codes: 1 the work failed, 2 bad input caught before any work, 3 refused by the team server
    found = user_errors()
    assert {ConfigError, DataError, StoreUnavailable, PermissionDenied, TuneError, UnknownModel} <= set(found)
    assert PermissionDenied.exit_code == 3  # the one a hand-kept list missed
    for error in found:
        assert error.exit_code in (1, 2, 3), error
        raised = error.__new__(error)  # whatever its constructor takes, a message is all the boundary reads
        Exception.__init__(raised, f"{error.__name__} happened")
        result = CliRunner().invoke(_boundary_raising(raised), ["go"])
        assert (result.exit_code, result.stderr.splitlines()) == (error.exit_code, [f"error: {error.__name__} happened"])


@pytest.mark.parametrize(("name", "extra"), [("tensorflow", "cpu"), ("jax", "jax"), ("torch", "torch")])
def test_a_missing_backend_is_one_line_naming_the_install_extra(tmp_path, name, extra) -> None:
    # an install without the backend's extra: its library cannot be imported
    (tmp_path / name).mkdir()
    (tmp_path / name / "__init__.py").write_text(f"raise ModuleNotFoundError(name={name!r})\n")
    result = run_command([sys.executable, "-m", "cifar_mlops.cli", "--backend", name, "train", "--exp", "smoke"],
                         cwd=tmp_path, PYTHONPATH=str(tmp_path), MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert result.returncode == 1
    gpu = ' (or `".[gpu]"` on a machine with an NVIDIA GPU)' if name == "tensorflow" else ""
    assert result.stderr.splitlines()[-1] == (f"error: the Keras backend {name} needs {name}, which is not installed; "
                                              f'install the project with `pip install -e ".[{extra}]"`{gpu}, '
                                              "or choose another with --backend")
    assert "Traceback" not in result.stderr


def test_train_seeds_trains_once_per_seed(store) -> None:
    tiny = ["--set", "data.synthetic_train_pool=168", "--set", "data.val_size=40", "--set",
            "data.synthetic_test_pool=40", "--set", "train.epochs=1"]
    result = CliRunner().invoke(cli.main, ["train", "--exp", "smoke", "--seeds", "0,5", "--no-register", *tiny])
    assert result.exit_code == 0, result.output
    # (Keras's per-epoch lines go to stdout too)
    assert [line.split(":")[0] for line in result.stdout.splitlines() if line.startswith("seed")] == ["seed 0", "seed 5"]
    client = MlflowClient()
    finished = client.search_runs([client.get_experiment_by_name(runs.ABLATION_EXPERIMENT).experiment_id])
    assert sorted(r.data.params["train.seed"] for r in finished) == ["0", "5"]
    assert {r.info.status for r in finished} == {"FINISHED"}
