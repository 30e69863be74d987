"""optuna-dashboard on the project's studies: started as `tune` prints it, it serves the study's trials.

A real `optuna-dashboard` process on a free 127.0.0.1 port, on the storage a tiny real `tune` filled (a journal
file, SQLite, PostgreSQL); the trials are read through its HTTP API (`/api/studies`, `/api/studies/<id>`).
"""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import optuna
import pytest
import requests

from cifar_mlops import tune
from cifar_mlops.execution import queue
from tests.conftest import BIN, free_port, run_command, server_process
from tests.helpers import KERAS_EPOCH, TINY, TINY_SET, bar_lines

PRINTED = r"every trial in optuna-dashboard \(pip install 'cifar-mlops\[dashboard\]'\): run `([^`]+)`, then open (\S+)"


def dashboard_trials(command: str, page: str, study: optuna.Study, log: Path) -> tuple[list[dict], dict[str, dict]]:
    """Start `command` (as printed, on a free port instead of 8080), check that `page` is the study's, and return
    the trials its API serves, and every study it lists (by name: their user attrs)."""
    port = free_port()
    argv = [str(BIN / "optuna-dashboard"), *shlex.split(command)[1:], "--host", "127.0.0.1", "--port", str(port)]
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    api = f"http://127.0.0.1:{port}/api/studies"
    with server_process(argv, env, log, api):
        studies = {s["study_name"]: s for s in requests.get(api, timeout=30).json()["study_summaries"]}
        study_id = studies[study.study_name]["study_id"]
        assert page == f"{tune.DASHBOARD_URL}/dashboard/studies/{study_id}"
        assert requests.get(page.replace(tune.DASHBOARD_URL, f"http://127.0.0.1:{port}"), timeout=30).ok
        detail = requests.get(f"{api}/{study_id}", timeout=30).json()
    assert detail["name"] == study.study_name and detail["directions"] == ["maximize"]
    return detail["trials"], {name: {a["key"]: a["value"] for a in s["user_attrs"]} for name, s in studies.items()}


def assert_same_trials(served: list[dict], study: optuna.Study) -> None:
    assert [(t["number"], t["state"], t["values"]) for t in served] == [
        (t.number, t.state.name.capitalize(), [t.value]) for t in study.trials]
    for trial, original in zip(served, study.trials):
        assert {p["name"]: p["param_external_value"] for p in trial["params"]} == {
            k: str(v) for k, v in original.params.items()}
        attrs = {a["key"]: a["value"] for a in trial["user_attrs"]}
        assert attrs["mlflow_run_id"] == original.user_attrs["mlflow_run_id"]  # the trial's MLflow run


@pytest.mark.slow
def test_tune_prints_the_dashboard_command_of_its_journal_and_the_dashboard_serves_the_trials(tmp_path: Path) -> None:
    """Two worker processes: the bar counts what the study reports finished."""
    done = run_command([str(BIN / "cifar-mlops"), "tune", "--exp", "smoke", "--trials", "2", "--workers", "2",
                        "--pruner", "none", "--seed", "0", *TINY_SET], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    command, page = re.search(PRINTED, done.stdout).groups()
    assert command == f"optuna-dashboard {shlex.quote(str(tmp_path / queue.DEFAULT_JOURNAL))}"
    lines = bar_lines(done.stderr, "tune", "trials")
    assert lines and lines[-1][1] == lines[-1][2] == "2"
    assert not KERAS_EPOCH.search(done.stdout + done.stderr)

    study = optuna.load_study(study_name="cifar10-smoke", storage=queue.open_storage(str(tmp_path / "optuna.journal")))
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 2
    assert_same_trials(dashboard_trials(command, page, study, tmp_path / "dashboard.log")[0], study)


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_on_a_database_the_printed_command_opens_the_same_study(kind: str, store: str, tmp_path: Path,
                                                                 request: pytest.FixtureRequest) -> None:
    storage = "sqlite:///studies.db" if kind == "sqlite" else request.getfixturevalue("postgres_url")
    result = tune.tune("smoke", 1, overrides=TINY, storage=storage, pruner="none", seed=0)

    command, page = re.fullmatch(r"`([^`]+)`, then open (\S+)", result.dashboard).groups()
    if kind == "sqlite":  # relative to where `tune` ran: made absolute, to open from anywhere
        assert shlex.split(command) == ["optuna-dashboard", f"sqlite:///{tmp_path / 'studies.db'}"]
    else:
        assert shlex.split(command) == ["optuna-dashboard", storage]
    study = optuna.load_study(study_name="cifar10-smoke", storage=queue.open_storage(storage))
    queue.open_queue("ablation smoke variants smoke-wide", storage)  # an ablation's run queue in the same storage
    served, listed = dashboard_trials(command, page, study, tmp_path / "dashboard.log")
    assert len(served) == 1
    assert_same_trials(served, study)
    # told apart in the dashboard's list by name, and on their pages by what they say they are
    assert listed["cifar10-smoke"][queue.KIND] == "tuning study of experiment smoke"
    assert listed["ablation smoke variants smoke-wide"][queue.KIND] == queue.QUEUE_KIND


def test_the_printed_command_leaves_the_password_out_and_quotes_for_the_shell() -> None:
    assert tune.dashboard_command("postgresql://alice:s3cret@db:5432/optuna", 3) == (
        "`optuna-dashboard postgresql://alice@db:5432/optuna`, then open http://127.0.0.1:8080/dashboard/studies/3")
    assert tune.dashboard_command("journal:/data/my studies/optuna.journal") == (
        "`optuna-dashboard '/data/my studies/optuna.journal'`, then open http://127.0.0.1:8080/dashboard")
