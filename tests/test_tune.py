"""`cifar-mlops tune`: Optuna studies on `smoke` at tiny sizes, nested MLflow runs, pruning, workers."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import optuna
import pytest
from click.testing import CliRunner
from mlflow import MlflowClient
from optuna.trial import TrialState

from cifar_mlops import cli, tune
from cifar_mlops.execution import queue
from cifar_mlops.tracking import runs, studies
from tests.helpers import TINY, TINY_SET

BIN = Path(sys.executable).parent
# smoke shrunk: a trial takes ~1-3 s once TensorFlow is loaded


def journal_study(name: str, path: Path | None = None) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=queue.open_storage(str(path) if path else None))


def tuning_runs() -> list:
    client = MlflowClient()
    experiment = client.get_experiment_by_name(studies.TUNING_EXPERIMENT)
    return client.search_runs([experiment.experiment_id]) if experiment else []


def split_runs(runs: list) -> tuple[list, list]:
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return parents, children


def assert_no_running_runs() -> None:
    client = MlflowClient()
    ids = [e.experiment_id for e in client.search_experiments()]
    assert client.search_runs(ids, filter_string="attributes.status = 'RUNNING'") == []


def test_four_trial_study_with_default_storage(store: str, tmp_path: Path, capsys) -> None:
    result = tune.tune("smoke", 4, overrides={**TINY, "search.epochs.high": 2}, seed=0, pruner="none")

    study = journal_study("cifar10-smoke")
    assert (tmp_path / queue.DEFAULT_JOURNAL).is_file()
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 4
    parents, children = split_runs(tuning_runs())
    [parent] = parents
    assert parent.info.run_id == result.parent_run_id and parent.info.status == "FINISHED"
    assert len(children) == 4
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parent.info.run_id}
    assert sorted(int(r.data.tags["trial_number"]) for r in children) == [0, 1, 2, 3]
    assert {r.data.tags["state"] for r in children} == {"COMPLETE"}
    assert {r.info.status for r in children} == {"FINISHED"}
    for run in children:  # the trial's values are the run's training settings; curves per epoch
        trial = study.trials[int(run.data.tags["trial_number"])]
        assert float(run.data.params["train.learning_rate"]) == pytest.approx(trial.params["learning_rate"])
        assert int(run.data.params["train.epochs"]) == trial.params["epochs"]
        assert run.data.metrics["val_accuracy"] == pytest.approx(trial.value)
        assert len(MlflowClient().get_metric_history(run.info.run_id, "epoch_val_accuracy")) == trial.params["epochs"]

    best = study.best_trial
    tags = parent.data.tags
    assert tags["best_trial"] == str(best.number) and tags["optuna_study"] == "cifar10-smoke"
    assert float(tags["best.train.learning_rate"]) == pytest.approx(best.params["learning_rate"])
    assert tags["best.train.epochs"] == str(best.params["epochs"])
    assert parent.data.metrics["best_val_accuracy"] == pytest.approx(best.value)
    artifacts = {a.path for a in MlflowClient().list_artifacts(parent.info.run_id)}
    assert {"optimization_history.png", "param_importances.png", "parallel_coordinate.png",
            "best_params.json"} <= artifacts
    assert MlflowClient().search_model_versions() == []  # trials do not register
    assert_no_running_runs()

    # The run's page in the UI: its description (markdown) is the result table, every run id a link to its run
    note = tags[runs.DESCRIPTION_TAG]
    assert note.startswith("**Optuna study `cifar10-smoke`**") and "4 trials (4 COMPLETE, 0 PRUNED, 0 FAIL)" in note
    header, rule, *rows = [line for line in note.splitlines() if line.startswith("|")]
    assert [c.strip() for c in header.strip("|").split("|")] == [
        "trial", "val_accuracy", "test_accuracy", "batch_size", "epochs", "learning_rate", "run_id"]
    ranked = sorted(study.trials, key=lambda t: (-t.value, t.number))
    assert [int(row.split("|")[1]) for row in rows] == [t.number for t in ranked]
    best_run = best.user_attrs["mlflow_run_id"]
    assert f"[{best_run[:8]}](#/experiments/{parent.info.experiment_id}/runs/{best_run}?workflowType=machine_learning)" in rows[0]
    assert f"`optuna-dashboard {tmp_path / queue.DEFAULT_JOURNAL}`" in note
    # the trials' runs group in the UI by the searched values (params) and by outcome (tags)
    for run in children:
        assert {"train.learning_rate", "train.batch_size", "train.epochs"} <= set(run.data.params)
        assert {"optuna_study", "state", "trial_number"} <= set(run.data.tags)
    # one line per finished trial on stderr (not a terminal here): the bar
    lines = re.findall(r"^\[cifar-mlops tune\] (\d)/4 trials done \| elapsed \d\d:\d\d, left ~\S+ \| trial (\d) COMPLETE",
                       capsys.readouterr().err, re.MULTILINE)
    assert lines == [(str(n + 1), str(n)) for n in range(4)]


def test_the_run_note_tag_is_one_constant_for_studies_ablations_and_selections() -> None:
    """`mlflow.note.content` (a run's description) is named once, in `tracking.runs`, and set through its
    `description_tag` by ablations, selections and reports (tune sets `runs.DESCRIPTION_TAG` itself)."""
    from cifar_mlops.tracking import ablations, results, selections

    package = Path(tune.__file__).parent
    named = [p.relative_to(package).as_posix() for p in sorted(package.rglob("*.py"))
             if '"mlflow.note.content"' in p.read_text()]
    assert named == ["tracking/runs.py"] and runs.DESCRIPTION_TAG == "mlflow.note.content"
    assert ablations.description_tag is selections.description_tag is results.description_tag is runs.description_tag
    assert runs.description_tag("# a table", "x.md") == {runs.DESCRIPTION_TAG: "# a table"}
    cut = runs.description_tag("\n".join(f"| row {i} |" for i in range(2000)), "ablation.md")[runs.DESCRIPTION_TAG]
    assert len(cut) <= runs.TAG_LIMIT and cut.endswith("\n\n(cut to fit the description: the whole is ablation.md)")
    assert cut.split("\n\n(cut")[0].endswith("|")  # cut at the end of a line
    assert not hasattr(studies, "NOTE_TAG")


@pytest.mark.core
def test_rerun_adds_trials_to_the_same_study(store: str) -> None:
    first = tune.tune("smoke", 1, overrides=TINY, study_name="resume-me", pruner="none")
    second = tune.tune("smoke", 1, overrides=TINY, study_name="resume-me", pruner="none")

    assert len(journal_study("resume-me").trials) == 2
    assert second.parent_run_id == first.parent_run_id  # one parent run per study
    parents, children = split_runs(tuning_runs())
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert sorted(int(r.data.tags["trial_number"]) for r in children) == [0, 1]
    assert parents[0].data.metrics["trials_complete"] == 2


@pytest.mark.parametrize("pruner", ["median", "percentile", "successive-halving"])
def test_a_plateauing_trial_is_pruned_and_its_run_says_so(store: str, pruner: str) -> None:
    prune = {"search.epochs.low": 3, "search.epochs.high": 3, "search.batch_size": [32],
             "search.pruning_startup_trials": 1, "search.pruning_warmup_epochs": 1,
             "data.synthetic_train_pool": 400, "data.val_size": 100, "data.synthetic_test_pool": 40}
    learns = {"search.learning_rate.low": 0.01, "search.learning_rate.high": 0.01}
    plateaus = {"search.learning_rate.low": 1e-7, "search.learning_rate.high": 1e-7}  # stays at chance
    tune.tune("smoke", 1, overrides={**prune, **learns}, study_name="prune-me", pruner=pruner)
    result = tune.tune("smoke", 1, overrides={**prune, **plateaus}, study_name="prune-me", pruner=pruner)

    states = [t.state for t in journal_study("prune-me").trials]
    assert states == [TrialState.COMPLETE, TrialState.PRUNED]
    assert result.counts["PRUNED"] == 1
    _, children = split_runs(tuning_runs())
    pruned = next(r for r in children if r.data.tags["trial_number"] == "1")
    assert pruned.data.tags["state"] == "PRUNED" and pruned.info.status == "KILLED"
    assert runs.FAILURE_TAG not in pruned.data.tags
    epochs_ran = len(MlflowClient().get_metric_history(pruned.info.run_id, "epoch_val_accuracy"))
    assert epochs_ran == int(pruned.data.tags["pruned_at_epoch"]) < 3  # it cost only the epochs it ran

    # The same plateau over 2 epochs, the first checked one being its last: stopping saves nothing, it completes
    two_epochs = {"search.epochs.low": 2, "search.epochs.high": 2}
    tune.tune("smoke", 1, overrides={**prune, **plateaus, **two_epochs}, study_name="prune-me", pruner=pruner)
    last = journal_study("prune-me").trials[-1]
    assert last.state == TrialState.COMPLETE and sorted(last.intermediate_values) == [0, 1]
    assert_no_running_runs()


def test_replayed_pruning_sees_only_the_epochs_so_far_and_never_prunes_a_last_epoch() -> None:
    from cifar_mlops import config as cfg

    config = cfg.resolve("smoke", {"search.pruning_startup_trials": 1, "search.pruning_warmup_epochs": 0})
    curves = [tune.Curve((0.5, 0.6, 0.7), 0.7),
              tune.Curve((0.2, 0.9, 0.9), 0.9),  # below the median after epoch 1: what comes later is unseen
              tune.Curve((0.1,), 0.1),  # its one epoch is its last: never pruned
              tune.Curve((0.6, 0.65, 0.8), 0.8)]
    median = tune.replay_pruning(curves, "median", config)
    assert median.epochs == (3, 1, 1, 3) and median.pruned == (False, True, False, False)
    assert median.best_value == 0.8  # the 0.9 trial was cut
    unpruned = tune.replay_pruning(curves, "none", config)
    assert unpruned.epochs == (3, 3, 1, 3) and unpruned.best_value == 0.9


def test_a_replay_on_an_unpruned_study_is_what_the_pruned_study_does(store: str) -> None:
    """The seeded random sampler proposes the same trials with and without pruning, so a pruner replayed on
    the unpruned study's curves must cut exactly where the real pruned study does."""
    from cifar_mlops import config as cfg

    settings = {**TINY, "search.epochs.low": 2, "search.epochs.high": 3, "data.synthetic_train_pool": 400,
                "data.val_size": 100, "search.learning_rate.low": 1e-6, "search.learning_rate.high": 0.05,
                "search.pruning_startup_trials": 1, "search.pruning_warmup_epochs": 0}
    tune.tune("smoke", 4, overrides=settings, study_name="unpruned", pruner="none", seed=4, sampler="random")
    tune.tune("smoke", 4, overrides=settings, study_name="pruned", pruner="median", seed=4, sampler="random")

    unpruned, pruned = journal_study("unpruned").trials, journal_study("pruned").trials
    assert [t.params for t in unpruned] == [t.params for t in pruned]
    curves = [tune.Curve(tuple(t.intermediate_values[s] for s in sorted(t.intermediate_values)), t.value)
              for t in unpruned]
    replayed = tune.replay_pruning(curves, "median", cfg.resolve("smoke", settings))
    assert replayed.epochs == tuple(len(t.intermediate_values) for t in pruned)
    assert replayed.pruned == tuple(t.state == TrialState.PRUNED for t in pruned)
    assert any(replayed.pruned)  # the learning rates span chance to learning: something is cut


@pytest.mark.slow
def test_two_worker_processes_share_one_postgresql_study(store: str, postgres_url: str,
                                                         capfd: pytest.CaptureFixture) -> None:
    study_name = f"pg-{uuid.uuid4().hex[:8]}"
    result = tune.tune("smoke", 4, overrides=TINY, study_name=study_name, storage=postgres_url, workers=2,
                       pruner="none", seed=3)
    storage = queue.open_storage(postgres_url)
    trials = optuna.load_study(study_name=study_name, storage=storage).trials
    workers = {t.user_attrs["worker_pid"] for t in trials}
    storage.remove_session()
    storage.engine.dispose()

    errors = capfd.readouterr().err
    assert result.worker_failures == [], errors[-4000:]
    assert "Traceback" not in errors and "OperationalError" not in errors and "error:" not in errors, errors[-4000:]
    assert sorted(t.number for t in trials) == [0, 1, 2, 3]
    assert {t.state for t in trials} == {TrialState.COMPLETE}
    assert len(workers) == 2  # both processes ran trials
    parents, children = split_runs(tuning_runs())
    assert len(parents) == 1 and parents[0].data.tags["optuna_storage"].startswith("postgresql://")
    assert sorted(int(r.data.tags["trial_number"]) for r in children) == [0, 1, 2, 3]
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {result.parent_run_id}
    assert_no_running_runs()


def test_processes_opening_an_empty_postgresql_database_at_once_all_get_the_storage(postgres_url: str) -> None:
    # Four connections at once (threads here, processes or machines in use), each creating Optuna's
    # tables; without the retry the losers fail on "duplicate key value" every time.
    import threading

    start = threading.Barrier(4)
    errors: list[str] = []

    def open_storage() -> None:
        start.wait()
        try:
            queue.open_storage(postgres_url).engine.dispose()
        except queue.QueueError as err:
            errors.append(str(err))

    threads = [threading.Thread(target=open_storage) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == [] and not any(thread.is_alive() for thread in threads)


@pytest.mark.slow
def test_two_commands_started_together_on_an_empty_postgresql_database_share_one_study(
        tmp_path: Path, postgres_url: str) -> None:
    # Two shells, same command, same moment: both find no Optuna tables and create them.
    study_name = f"pg-{uuid.uuid4().hex[:8]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}  # the default ./mlflow.db
    command = [str(BIN / "cifar-mlops"), "tune", "--exp", "smoke", "--trials", "2", "--storage", postgres_url,
               "--study", study_name, "--pruner", "none", *TINY_SET]
    shells = [subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True) for _ in range(2)]
    outputs = [shell.communicate(timeout=300) for shell in shells]
    storage = queue.open_storage(postgres_url)
    trials = optuna.load_study(study_name=study_name, storage=storage).trials
    storage.remove_session()
    storage.engine.dispose()

    for shell, (_, err) in zip(shells, outputs):
        assert shell.returncode == 0 and "Traceback" not in err, err[-3000:]
    assert sorted(t.number for t in trials) == [0, 1, 2, 3]
    assert {t.state for t in trials} == {TrialState.COMPLETE}
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name(studies.TUNING_EXPERIMENT).experiment_id])
    parents, children = split_runs(runs)
    assert len(parents) == 1 and len(children) == 4
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parents[0].info.run_id}


@pytest.mark.slow
def test_a_killed_worker_fails_its_trial_and_the_study_goes_on(store: str, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(MLFLOW_TRACKING_URI=store, PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}")
    slower = [*TINY_SET, "--set", "search.epochs.low=3", "--set", "search.epochs.high=3",
              "--set", "data.synthetic_train_pool=400"]
    per_worker = 2  # so that the survivor has a trial to start after the other worker died
    command = [str(BIN / "cifar-mlops"), "tune", "--exp", "smoke", "--trials", str(2 * per_worker), "--workers", "2",
               "--study", "killed", "--pruner", "none", *slower]
    coordinator = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True)
    victim = None
    deadline = time.monotonic() + 120
    while victim is None and time.monotonic() < deadline and coordinator.poll() is None:
        time.sleep(0.3)
        if not (tmp_path / queue.DEFAULT_JOURNAL).is_file():
            continue
        try:
            running = journal_study("killed").get_trials(states=(TrialState.RUNNING,))
        except KeyError:  # the study is not created yet
            continue
        started = next((t for t in running if "mlflow_run_id" in t.user_attrs), None)
        # training has started once its run is tagged (a kill between the trial's attribute and the run's tags
        # leaves a run that names no trial: a narrower race, not the one this test is about)
        if started and "trial_number" in MlflowClient().get_run(started.user_attrs["mlflow_run_id"]).data.tags:
            victim = started
    assert victim is not None, "no trial started training in time"
    victim_pid = victim.user_attrs["worker_pid"]
    os.kill(victim_pid, signal.SIGKILL)
    _, err = coordinator.communicate(timeout=180)

    assert coordinator.returncode == 1
    error_lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and "killed by signal 9" in error_lines[0], err[-3000:]
    assert "worker 0" not in error_lines[0] or "worker 1" not in error_lines[0], err[-3000:]  # the other lived
    assert f"trials {victim.number} marked FAIL" in error_lines[0]
    trials = journal_study("killed").trials
    states = [(t.number, t.state, t.user_attrs, t.system_attrs) for t in trials]
    assert trials[victim.number].state == TrialState.FAIL
    assert [t.state for t in trials if t.number != victim.number] == [TrialState.COMPLETE] * (len(trials) - 1), \
        (err[-3000:], states)
    # the survivor ran all of its share to the end, though the other worker died in mid-trial
    survivor = [t for t in trials if t.user_attrs.get("worker_pid") != victim_pid]
    killed_worker = [t for t in trials if t.user_attrs.get("worker_pid") == victim_pid]
    assert len({t.user_attrs.get("worker_pid") for t in survivor}) == 1, states
    assert len(survivor) == per_worker and {t.state for t in survivor} <= {TrialState.COMPLETE, TrialState.PRUNED}, \
        (err[-3000:], states)
    assert killed_worker[-1].number == victim.number and len(killed_worker) <= per_worker, states
    # ... and so say the MLflow runs: one nested run per trial, the survivor's ended as their trials did
    _, children = split_runs(tuning_runs())
    by_trial = {int(r.data.tags["trial_number"]): r for r in children}
    assert sorted(by_trial) == [t.number for t in trials]
    assert all(by_trial[t.number].data.tags["state"] in ("COMPLETE", "PRUNED") for t in survivor)
    assert all(by_trial[t.number].info.status in ("FINISHED", "KILLED") for t in survivor)
    killed_run = MlflowClient().get_run(victim.user_attrs["mlflow_run_id"])
    assert killed_run.info.run_id == by_trial[victim.number].info.run_id
    assert killed_run.info.status == "FAILED" and killed_run.data.tags["state"] == "FAIL"
    assert_no_running_runs()

    # the same command again resumes the study, in the study's one parent run
    resumed = tune.tune("smoke", 1, overrides=TINY, study_name="killed", pruner="none")
    trials = journal_study("killed").trials
    assert [t.state for t in trials][len(by_trial):] == [TrialState.COMPLETE]
    parents, _ = split_runs(tuning_runs())
    assert [p.info.run_id for p in parents] == [resumed.parent_run_id] and parents[0].info.status == "FINISHED"
    assert parents[0].data.metrics["trials_complete"] == sum(t.state == TrialState.COMPLETE for t in trials)
    assert_no_running_runs()


BAD_INPUT = [
    (["--exp", "nope"], "error: unknown experiment 'nope'"),
    (["--exp", "3.2"], "3.2 is an ensemble experiment"),
    (["--exp", "smoke", "--set", "search.learning_rate=null", "--set", "search.batch_size=null",
      "--set", "search.epochs=null"], "experiment smoke has an empty search space"),
    (["--exp", "smoke", "--set", "search.epochs.low=0"], "search.epochs = 0 does not resolve"),
    (["--exp", "smoke", "--set", "search.learning_rate.low=0.5", "--set", "search.learning_rate.high=0.1"],
     "search.learning_rate: low (0.5) must not exceed high (0.1)"),
    (["--exp", "smoke", "--storage", "postgresql:/no-slashes"], "malformed storage URL 'postgresql:/no-slashes'"),
    (["--exp", "smoke", "--storage", "nodialect://host/db"], "cannot open Optuna storage nodialect://host/db"),
    (["--exp", "smoke", "--storage", "postgresql://someone:secret@127.0.0.1:1/test"],
     "cannot open Optuna storage postgresql://someone:***@127.0.0.1:1/test"),
    (["--exp", "smoke", "--storage", "/no/such/folder/optuna.journal"], "folder /no/such/folder does not exist"),
    (["--exp", "smoke", "--seed", "abc"], "--seed must be an integer"),
]


def test_bad_input_is_one_line_and_leaves_no_runs(store: str) -> None:
    # one store for all cases: a fresh MLflow database costs seconds to create
    for args, message in BAD_INPUT:
        result = CliRunner().invoke(cli.main, ["tune", "--trials", "1", *args])
        assert result.exit_code != 0, args
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (args, result.stderr)
        assert "secret" not in result.stderr
        assert result.exception is None or isinstance(result.exception, SystemExit), (args, result.exception)
        assert_no_running_runs()
        assert tuning_runs() == [], args


def test_a_study_belongs_to_one_experiment(store: str) -> None:
    optuna.create_study(study_name="mine", storage=queue.open_storage(None)).set_user_attr("exp_id", "smoke")
    with pytest.raises(tune.TuneError, match="study 'mine' tunes experiment smoke, not b0"):
        tune.tune("b0", 1, study_name="mine")
