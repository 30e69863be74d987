"""Running many trainings (`cifar_mlops.execution`): liveness, the queue of fixed tasks, dead workers, and two
commands on one ablation at the same moment."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient
from optuna.trial import TrialState

from cifar_mlops.execution import liveness, queue
from cifar_mlops.tracking import runs
from tests.conftest import copy_empty_store

BIN = Path(sys.executable).parent
# smoke against smoke-wide, 2 seeds: 4 tiny trainings of a few seconds each once TensorFlow is loaded
ABLATION = ["ablate", "--exp", "smoke", "--design", "variants", "--variants", "smoke-wide", "--seeds", "2",
            "--overrides", "data.synthetic_train_pool=300 data.val_size=60 data.synthetic_test_pool=60 "
                           "train.epochs=1 train.batch_size=32"]


@pytest.mark.slow
def test_two_ablations_started_together_on_one_store_make_one_parent_and_train_each_run_once(tmp_path: Path) -> None:
    # Two shells, the same command, the same moment, one SQLite store: both look for the ablation's parent run,
    # find none, and go on to train every (variant, seed).
    copy_empty_store(tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(MLFLOW_TRACKING_URI=uri, PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}")
    shells = [subprocess.Popen([str(BIN / "cifar-mlops"), *ABLATION], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [shell.communicate(timeout=540) for shell in shells]
    for shell, (_, err) in zip(shells, outputs):
        assert shell.returncode == 0 and "Traceback" not in err, err[-3000:]
        # each command's bar ends at every run done, the other command's included
        assert re.findall(r"^\[cifar-mlops ablate\] (\d)/4 runs done", err, re.MULTILINE)[-1] == "4", err[-3000:]

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(runs.ABLATION_EXPERIMENT).experiment_id
    found = client.search_runs([experiment])  # active runs: a parent made and given up is deleted
    parents = [r for r in found if r.data.tags.get("kind") == "ablation"]
    assert len(parents) == 1, [(p.info.run_id, p.info.status) for p in parents]
    [parent] = parents
    assert parent.info.status == "FINISHED"
    children = [r for r in found if "mlflow.parentRunId" in r.data.tags]
    trained = Counter((r.data.tags["variant"], int(r.data.tags["seed"])) for r in children)
    assert trained == {(variant, seed): 1 for variant in ("smoke", "smoke-wide") for seed in (0, 1)}, trained
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parent.info.run_id}
    assert {r.info.status for r in children} == {"FINISHED"}


def test_a_process_is_alive_until_it_ends_and_a_later_process_with_its_pid_is_another() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        started = liveness.process_started(child.pid)
        assert liveness.process_alive(child.pid) and liveness.process_alive(child.pid, started)
        assert not liveness.process_alive(child.pid, started - 5)  # another process that had this pid before
        child.kill()
        for _ in range(50):  # killed, not yet waited for: a zombie, which is no longer alive
            if not liveness.process_alive(child.pid, started):
                break
            time.sleep(0.1)
        assert not liveness.process_alive(child.pid, started)
    finally:
        child.kill()
        child.wait()
    assert not liveness.process_alive(child.pid)


def test_a_queue_runs_each_task_once_and_picks_up_a_dead_workers_task(tmp_path: Path) -> None:
    storage = str(tmp_path / "queue.journal")
    study = queue.open_queue("q", storage)
    gone = subprocess.Popen(["true"])  # a worker process that has ended
    gone.wait()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        for task, worker, started in (("b", gone, 0.0), ("c", alive, liveness.process_started(alive.pid))):
            study.enqueue_trial({}, user_attrs={queue.TASK: task})
            taken = study.ask()  # the worker took the task
            for key, value in {"worker_host": socket.gethostname(), "worker_pid": worker.pid,
                               "worker_start": started}.items():
                taken.set_user_attr(key, value)
        study.enqueue_trial({}, user_attrs={queue.TASK: "c"})  # and a second command queued c again meanwhile
        ran: list[str] = []

        def work(task: str) -> None:
            if task not in ran:  # as an ablation's work skips a run another process finished
                ran.append(task)

        assert queue.drain(study, work) == 0 and ran == []  # the live worker holds c: its second trial is not run
        [duplicate] = [t for t in study.trials if t.state == TrialState.PRUNED]
        assert duplicate.user_attrs[queue.OUTCOME] == queue.DUPLICATE
    finally:
        alive.kill()
        alive.wait()
    failures = queue.run_queue("q", storage, ["a", "b", "c"], work, lambda task: task in ran)
    assert failures == [] and ran == ["a", "b", "c"]  # b and c, lost with their workers, picked up again
    trials = optuna.load_study(study_name="q", storage=queue.open_storage(storage)).trials
    assert [t.state for t in trials[:2]] == [TrialState.FAIL, TrialState.FAIL]


def test_processes_agree_on_the_first_valid_proposal(tmp_path: Path) -> None:
    study = queue.open_queue("q", str(tmp_path / "queue.journal"))
    assert queue.elect(study, "parent") is None
    assert queue.elect(study, "parent", "run-a") == "run-a"
    assert queue.elect(study, "parent", "run-b") == "run-a"  # a later proposal loses
    assert queue.elect(study, "other", "run-c") == "run-c"  # another key, another election
    assert queue.elect(study, "parent", "run-d", valid=lambda run: run != "run-a") == "run-b"  # run-a was deleted
