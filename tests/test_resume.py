"""Resumable training: checkpoints on the run, `train --resume RUN_ID`, `mlflow run --run-id RUN_ID`,
and what is refused (changing nothing)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import keras
import pytest
from click.testing import CliRunner
from mlflow import MlflowClient

from cifar_mlops import cli
from cifar_mlops import config as cfg
from cifar_mlops.tracking import runs
from cifar_mlops.train import RunContext, TrainingFailed, train
from tests import conftest
from tests.conftest import BIN, REPO, assert_nothing_half_written, run_command


def tiny(exp_id: str, **extra):
    """conftest's tiny config with checkpoints on (every epoch, the default), as a user trains."""
    return conftest.tiny(exp_id, **{"train__checkpoint_every": 1, **extra})

EPOCH_METRICS = ("epoch_train_loss", "epoch_train_accuracy", "epoch_val_loss", "epoch_val_accuracy")
FINAL = ("train_accuracy", "train_loss", "val_accuracy", "val_loss", "test_accuracy", "test_f1_macro", "test_loss")
# An epoch of a few seconds here (5,800 synthetic images through the smoke CNN): time to see its checkpoint
# and kill the training before the next one. Augmentation and dropout: their randomness is resumed too.
KILLED = ["train.epochs=4", "data.synthetic_train_pool=6000", "data.val_size=200", "data.synthetic_test_pool=200",
          "augment.flip=true", "augment.translation=0.1", "model.dropout=0.3"]


class FailAtEpochEnd(keras.callbacks.Callback):
    """Fails the training at the end of epoch `epoch` (1-based), after its metrics, before its checkpoint."""

    def __init__(self, epoch: int) -> None:
        super().__init__()
        self.epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 == self.epoch:
            raise TrainingFailed("the machine caught fire")


def the_run() -> str:
    client = MlflowClient()
    [run] = client.search_runs([client.get_experiment_by_name(runs.ABLATION_EXPERIMENT).experiment_id])
    return run.info.run_id


def steps(run_id: str) -> dict[str, list[int]]:
    client = MlflowClient()
    return {key: [m.step for m in client.get_metric_history(run_id, key)] for key in EPOCH_METRICS}


def snapshot(run_id: str) -> tuple:
    """Everything a resume could change about a run and the registry."""
    client = MlflowClient()
    run = client.get_run(run_id)

    def artifacts(path: str | None = None) -> list[tuple]:
        found = []
        for a in client.list_artifacts(run_id, path):
            found += artifacts(a.path) if a.is_dir else [(a.path, a.file_size)]
        return found

    metrics = {key: [(m.step, m.value, m.timestamp) for m in client.get_metric_history(run_id, key)]
               for key in run.data.metrics}
    versions = sorted((v.name, v.version, v.run_id) for v in client.search_model_versions())
    return (run.info.status, run.info.end_time, run.data.tags, run.data.params, metrics, artifacts(), versions)


def failed_run(**settings) -> str:
    """A smoke training that failed at the end of its second epoch: checkpoint after epoch 1, metrics of 1-2."""
    with pytest.raises(TrainingFailed):
        train(tiny("smoke", **{"train__epochs": 3, **settings}), callbacks=[FailAtEpochEnd(2)])
    return the_run()


def cli_train(*args: str):
    return CliRunner().invoke(cli.main, ["train", *args])


def error_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def training_in_background(store: str, cwd: Path, log: Path, *extra: str) -> subprocess.Popen:
    """`cifar-mlops train --exp smoke` with the KILLED settings (and `extra`) started as a user's shell would,
    on `store`, its output in `log`."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    environment.update(PATH=f"{BIN}{os.pathsep}{environment['PATH']}", MLFLOW_TRACKING_URI=store)
    with open(log, "w") as output:
        return subprocess.Popen(["cifar-mlops", "train", "--exp", "smoke", *extra, *(f"--set={p}" for p in KILLED)],
                                cwd=cwd, env=environment, stdout=output, stderr=subprocess.STDOUT)


def checkpoint_when(client: MlflowClient, child: subprocess.Popen, ready: Callable[[str], bool]) -> str:
    """The training run's checkpoint tag once `ready(tag)`, or as it is when `child` ends (300 s at most)."""
    deadline, checkpoint = time.monotonic() + 300, ""
    while not ready(checkpoint) and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
        experiment = client.get_experiment_by_name(runs.ABLATION_EXPERIMENT)
        found = client.search_runs([experiment.experiment_id]) if experiment else []
        checkpoint = found[0].data.tags.get(runs.CHECKPOINT_TAG, "") if found else ""
    return checkpoint


@pytest.mark.slow
def test_a_training_killed_after_its_second_of_four_epochs_resumes_to_the_uninterrupted_result(store, tmp_path):
    client = MlflowClient()
    child = training_in_background(store, tmp_path, tmp_path / "killed.log")
    try:
        checkpoint = checkpoint_when(client, child, lambda tag: tag.startswith("2 "))
        os.kill(child.pid, signal.SIGKILL)  # the machine is lost: nothing ends the run
    finally:
        child.kill()
        child.wait()
    assert checkpoint.startswith("2 "), (tmp_path / "killed.log").read_text()[-3000:]
    run_id = the_run()
    killed = client.get_run(run_id)
    assert killed.info.status == "RUNNING"  # as the server sees a lost training
    assert killed.data.tags[runs.TRAINER_TAG].startswith(f"{socket.gethostname()} {child.pid} ")
    assert steps(run_id)["epoch_val_loss"] == [1, 2]
    assert client.search_model_versions() == []

    result = cli_train("--resume", run_id)
    assert result.exit_code == 0, result.output
    assert "resuming after epoch 2 of 4" in result.stderr

    [run] = client.search_runs([client.get_experiment_by_name(runs.ABLATION_EXPERIMENT).experiment_id])
    assert run.info.run_id == run_id and run.info.status == "FINISHED"
    assert steps(run_id) == {key: [1, 2, 3, 4] for key in EPOCH_METRICS}  # each epoch logged once
    assert run.data.tags[runs.RESUMED_TAG] == "2" and run.data.tags[runs.CHECKPOINT_TAG].startswith("4 ")
    assert run.data.metrics["epochs_run"] == 4
    [version] = client.search_model_versions()
    assert version.run_id == run_id and version.name == "cifar10-cnn"

    uninterrupted = train(cfg.resolve("smoke", cfg.parse_overrides(KILLED)), RunContext(experiment="uninterrupted"),
                          register=False)
    for name in FINAL:
        assert run.data.metrics[name] == pytest.approx(uninterrupted[name], abs=2e-3), name
    [other] = client.search_runs([client.get_experiment_by_name("uninterrupted").experiment_id])
    for key in EPOCH_METRICS:
        resumed = [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]
        straight = [m.value for m in sorted(client.get_metric_history(other.info.run_id, key), key=lambda m: m.step)]
        assert resumed == pytest.approx(straight, abs=2e-3), key


def test_a_finished_run_is_not_resumed_and_nothing_changes(store):
    train(tiny("smoke"))
    run_id = the_run()
    before = snapshot(run_id)
    result = cli_train("--resume", run_id)
    assert result.exit_code == 1
    [line] = error_lines(result)
    assert f"run {run_id} (smoke) ended FINISHED: a finished training is not resumed" in line
    assert "Traceback" not in result.stderr
    assert snapshot(run_id) == before


def test_a_failed_run_is_resumed_only_with_force(store):
    run_id = failed_run()
    assert steps(run_id)["epoch_val_loss"] == [1, 2]
    assert MlflowClient().get_run(run_id).data.tags[runs.CHECKPOINT_TAG].startswith("1 ")
    before = snapshot(run_id)

    result = cli_train("--resume", run_id)
    assert result.exit_code == 1
    [line] = error_lines(result)
    assert line.endswith("ended FAILED (TrainingFailed: the machine caught fire); resume it anyway with --force")
    assert snapshot(run_id) == before

    # --exp and --set may repeat the run's own config
    result = cli_train("--resume", run_id, "--force", "--exp", "smoke", "--set", "train.epochs=3")
    assert result.exit_code == 0, result.output
    run = MlflowClient().get_run(run_id)
    assert run.info.status == "FINISHED" and runs.FAILURE_TAG not in run.data.tags
    # epoch 2 is trained again from the checkpoint after epoch 1; the values its first training logged stay
    assert steps(run_id) == {key: [1, 2, 3] for key in EPOCH_METRICS}
    assert run.data.tags[runs.RESUMED_TAG] == "1" and run.data.metrics["epochs_run"] == 3
    [version] = MlflowClient().search_model_versions()
    assert version.run_id == run_id


def test_an_unknown_run_id_is_one_line(store):
    result = cli_train("--resume", "0123456789abcdef0123456789abcdef")
    assert result.exit_code == 1
    [line] = error_lines(result)
    assert "there is no run '0123456789abcdef0123456789abcdef'" in line and "Traceback" not in result.stderr
    assert_nothing_half_written()


def test_what_a_resume_cannot_change_is_refused_in_one_line(store):
    run_id = failed_run()
    before = snapshot(run_id)
    for args, message in [
        (["--set", "train.epochs=5"], "--set train.epochs=5: run " + run_id + " trains with train.epochs=3"),
        (["--exp", "b5"], f"run {run_id} is a training of smoke, not b5"),
        (["--seeds", "2"], "--resume goes on with one run; it does not combine with --seeds"),
        (["--set", "train.epochz=1"], "--set: train.epochz: unknown key; known keys here: epochs,"),
    ]:
        result = cli_train("--resume", run_id, "--force", *args)
        assert result.exit_code != 0, args
        assert [message in line for line in error_lines(result)] == [True], (args, result.stderr)
    assert snapshot(run_id) == before
    result = cli_train("--exp", "smoke", "--force")
    assert result.exit_code == 2 and error_lines(result) == ["error: --force goes with --resume RUN_ID"]


def test_mlflow_run_resumes_through_run_id_not_the_resume_parameter(store, monkeypatch):
    run_id = failed_run()
    before = snapshot(run_id)
    client = MlflowClient()
    made = client.create_run(client.get_experiment_by_name("Default").experiment_id).info.run_id
    monkeypatch.setenv("MLFLOW_RUN_ID", made)  # what `mlflow run . -e train -P resume=RUN_ID` passes
    result = cli_train("--resume", run_id, "--force")
    assert result.exit_code == 1
    [line] = error_lines(result)
    assert f"pass --run-id {run_id} to `mlflow run` instead" in line
    assert client.get_run(made).info.status == "FAILED"  # the run `mlflow run` made for nothing
    assert snapshot(run_id) == before


def test_a_running_run_is_resumed_only_once_its_process_is_gone(store):
    run_id = failed_run()
    client = MlflowClient()
    client.update_run(run_id, "RUNNING")  # as if its machine had been lost mid-training
    now_ms = int(time.time() * 1000)

    def refusal(**tags) -> str | None:
        runs.log_batch(run_id, tags=tags)
        try:
            runs.resume_point(run_id).close()
        except runs.ResumeRefused as err:
            return str(err)
        return None

    assert "s ago (host elsewhere, process 42)" in refusal(  # heard from 5 s ago, and the time asking takes
        trainer="elsewhere 42", heartbeat=now_ms - 5_000)
    with pytest.raises(runs.ResumeRefused, match="--force does not skip this"):
        runs.resume_point(run_id, force=True)
    assert refusal(heartbeat=now_ms - 1000 * (runs.SILENT_SECONDS + 1)) is None  # silent long enough
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert "still training on this machine as process" in refusal(trainer=f"{socket.gethostname()} {sleeper.pid}")
        with pytest.raises(runs.ResumeRefused, match="still training on this machine"):  # --force too
            runs.resume_point(run_id, force=True)
    finally:
        sleeper.kill()
        sleeper.wait()
    assert refusal() is None  # that process is gone
    [(_, _, path)] = runs.checkpoints(run_id, client.get_run(run_id).data.tags)
    cut_short(artifact_file(run_id, path))
    assert "the checkpoint of run " + run_id + " after epoch 1 is incomplete" in refusal()
    assert client.get_run(run_id).info.status == "RUNNING"  # asking changed nothing


def test_runs_that_are_not_resumed(store):
    run_id = failed_run(train__early_stopping_patience=2)
    assert runs.CHECKPOINT_TAG not in MlflowClient().get_run(run_id).data.tags  # no checkpoints are written
    result = cli_train("--resume", run_id, "--force")
    assert "trains with early stopping (train.early_stopping_patience), which is not resumed" in result.stderr


@pytest.mark.slow
def test_mlflow_run_with_run_id_resumes_the_train_entry_point(store, tmp_path):
    run_id = failed_run()
    result = run_command(["mlflow", "run", str(REPO), "-e", "train", "--run-id", run_id, "-P", "force=true",
                          "--env-manager", "local"], cwd=tmp_path, MLFLOW_TRACKING_URI=store)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming after epoch 1 of 3" in result.stderr
    client = MlflowClient()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and runs.FAILURE_TAG not in run.data.tags
    assert steps(run_id) == {key: [1, 2, 3] for key in EPOCH_METRICS}
    [version] = client.search_model_versions()
    assert version.run_id == run_id
    assert len(client.search_runs([e.experiment_id for e in client.search_experiments()])) == 1


def test_checkpoints_follow_train_checkpoint_every_and_the_last_two_are_kept(store):
    train(tiny("smoke", train__epochs=3, train__checkpoint_every=2), register=False)
    tags = MlflowClient().get_run(the_run()).data.tags
    assert tags[runs.CHECKPOINT_TAG].startswith("2 ")
    [(epoch, sha, path)] = runs.checkpoints(the_run(), tags)
    assert (epoch, path) == (2, runs.checkpoint_path(2, sha)) and tags[runs.CHECKPOINT_TAG] == f"2 {sha}"
    MlflowClient().delete_run(the_run())
    train(tiny("smoke", train__epochs=4, train__checkpoint_every=1), register=False)
    assert [epoch for epoch, _, _ in runs.checkpoints(the_run(), {})] == [4, 3]


def test_transfer_learning_resumes_inside_its_warm_up_and_fine_tunes_as_uninterrupted(store, tmp_path):
    from cifar_mlops.models import create_model

    base = tiny("3.1", model__image_size=32)
    weights_file = tmp_path / "densenet_notop.weights.h5"  # stands in for the ImageNet download
    create_model(base.model.name, **base.model.settings()).get_layer("backbone").save_weights(weights_file)
    settings = {"model__image_size": 32, "model__weights": str(weights_file), "train__epochs": 3,
                "train__warmup_epochs": 2}
    with pytest.raises(TrainingFailed):  # checkpoint after epoch 1, inside the warm-up
        train(tiny("3.1", **settings), callbacks=[FailAtEpochEnd(2)], register=False)
    run_id = the_run()
    result = cli_train("--resume", run_id, "--force", "--no-register")
    assert result.exit_code == 0, result.output
    assert "epochs 3-3: backbone fine-tuned" in result.stderr
    uninterrupted = train(tiny("3.1", **settings), RunContext(experiment="uninterrupted"), register=False)
    resumed = MlflowClient().get_run(run_id).data.metrics
    for name in FINAL:
        assert resumed[name] == pytest.approx(uninterrupted[name], abs=2e-3), name


def artifact_file(run_id: str, path: str) -> Path:
    """Where an artifact of a run of the test's store (a local folder) is."""
    return Path(MlflowClient().get_run(run_id).info.artifact_uri.removeprefix("file://"), path)


def cut_short(file: Path) -> None:
    """Leave `file` half written, as an upload cut off by a lost machine leaves it."""
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


def test_an_interrupted_checkpoint_upload_leaves_the_checkpoint_before_it_usable(store):
    # Checkpoints after epochs 1 and 2, then the training fails at the end of epoch 3 (before its checkpoint).
    with pytest.raises(TrainingFailed):
        train(tiny("smoke", train__epochs=4), callbacks=[FailAtEpochEnd(3)])
    run_id = the_run()
    client = MlflowClient()
    assert client.get_run(run_id).data.tags[runs.CHECKPOINT_TAG].startswith("2 ")
    # The newest checkpoint file is left half written, as an upload cut off by a lost machine leaves it.
    folder = Path(client.get_run(run_id).info.artifact_uri.removeprefix("file://"), "checkpoint")
    cut_short(max(folder.iterdir(), key=lambda path: path.stat().st_mtime_ns))
    # ... and so is the upload of a third one, whose tag was never set
    third = folder.parent / runs.checkpoint_path(3, "f" * 64)
    third.write_bytes(b"PK\x03\x04 cut off")

    result = cli_train("--resume", run_id, "--force")
    assert result.exit_code == 0, result.output
    assert "resuming after epoch 1 of 4" in result.stderr, result.stderr
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags[runs.RESUMED_TAG] == "1"
    assert steps(run_id) == {key: [1, 2, 3, 4] for key in EPOCH_METRICS}  # each epoch logged once
    assert run.data.metrics["epochs_run"] == 4
    assert [epoch for epoch, _, _ in runs.checkpoints(run_id, run.data.tags)] == [4, 3]  # the cut-off files are gone


@pytest.mark.slow
def test_a_forced_resume_of_a_live_training_is_refused_and_it_trains_on_alone(store, tmp_path):
    client = MlflowClient()
    child = training_in_background(store, tmp_path, tmp_path / "live.log", "--no-register")
    try:
        assert checkpoint_when(client, child, bool), (tmp_path / "live.log").read_text()[-3000:]
        result = cli_train("--resume", the_run(), "--force")  # while it trains on
        assert child.poll() is None, "the training ended before the forced resume was tried"
        assert result.exit_code == 1, result.output
        [line] = error_lines(result)
        assert f"is RUNNING and it is still training on this machine as process {child.pid}" in line, line
        assert child.wait(timeout=300) == 0, (tmp_path / "live.log").read_text()[-3000:]
    finally:
        child.kill()
        child.wait()
    run = client.get_run(the_run())
    assert run.info.status == "FINISHED" and runs.RESUMED_TAG not in run.data.tags
    assert steps(run.info.run_id) == {key: [1, 2, 3, 4] for key in EPOCH_METRICS}  # one writer: each epoch once


def test_a_training_stopped_after_some_final_metrics_resumes_without_logging_them_twice(store, monkeypatch):
    def lost_while_saving(self, *args, **kwargs):
        raise KeyboardInterrupt  # the final metrics are logged, the model is not: as a kill there leaves it

    with monkeypatch.context() as patch:
        patch.setattr(runs.TrainingRun, "log_trained_model", lost_while_saving)
        with pytest.raises(KeyboardInterrupt):
            train(tiny("smoke", train__epochs=2))
    run_id = the_run()
    client = MlflowClient()
    stopped = client.get_run(run_id)
    assert stopped.info.status == "KILLED" and stopped.data.tags[runs.CHECKPOINT_TAG].startswith("2 ")
    assert {"test_accuracy", "fit_seconds", "fit_cpu_seconds", "epochs_run"} <= set(stopped.data.metrics)

    result = cli_train("--resume", run_id)
    assert result.exit_code == 0, result.output
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    for name in (*FINAL, "fit_seconds", "fit_cpu_seconds", "epochs_run"):
        history = client.get_metric_history(run_id, name)
        assert [(m.step, m.value) for m in history] == [(0, stopped.data.metrics[name])], name
    assert steps(run_id) == {key: [1, 2] for key in EPOCH_METRICS}
    [version] = client.search_model_versions()
    assert version.run_id == run_id


@pytest.mark.parametrize("precision", ["mixed_bfloat16", "mixed_float16"])
def test_a_mixed_precision_training_resumes_in_its_precision(store, tmp_path, precision):
    run_id = failed_run(train__precision=precision)
    assert MlflowClient().get_run(run_id).data.params["train.dtype_policy"] == precision
    result = cli_train("--resume", run_id, "--force", "--no-register")
    assert result.exit_code == 0, result.output
    assert "resuming after epoch 1 of 3" in result.stderr
    run = MlflowClient().get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["train.dtype_policy"] == precision
    assert steps(run_id) == {key: [1, 2, 3] for key in EPOCH_METRICS}
    assert run.data.metrics["epochs_run"] == 3 and 0 <= run.data.metrics["test_accuracy"] <= 1
    # the checkpoint the resumed process wrote after epoch 3 holds a model in that precision
    import zipfile

    import mlflow

    [(epoch, _, path), *_] = runs.checkpoints(run_id, run.data.tags)
    assert epoch == 3
    with zipfile.ZipFile(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path,
                                                             dst_path=str(tmp_path))) as bundle:
        bundle.extractall(tmp_path / "checkpoint")
    resumed = keras.saving.load_model(tmp_path / "checkpoint" / "model.keras")
    assert precision in {layer.dtype_policy.name for layer in resumed.layers if layer.weights}
