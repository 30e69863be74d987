"""A team on one server: `cifar-mlops server` (MLflow on PostgreSQL, proxied artifacts, basic-auth), users
with roles, refusals that name the user and the permission and leave the store unchanged, and a
maintainer's promotion that copies a candidate into the served model."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow
import numpy as np
import pytest
import requests
from click.testing import CliRunner
from mlflow import MlflowClient

from cifar_mlops import cli
from tests.conftest import PG_URL, _postgres, free_port, server_process, serving, skip_or_fail

# One worker runs this module: its module fixtures are made once, not once per worker.
pytestmark = pytest.mark.xdist_group("team")

BIN = Path(sys.executable).parent
ADMIN_PASSWORD = f"admin-{uuid.uuid4().hex[:12]}"
PASSWORDS = {role: f"{role}-{uuid.uuid4().hex[:12]}" for role in ("reader", "trainer", "maintainer")}
TUNE_TINY = ["--set", "data.synthetic_train_pool=168", "--set", "data.val_size=40", "--set",
             "data.synthetic_test_pool=40", "--set", "search.epochs.high=1", "--set", "search.batch_size=[32]"]
ENSEMBLE_TINY = ["--set", "data.synthetic_train_pool=168", "--set", "data.val_size=40", "--set",
                 "data.synthetic_test_pool=40", "--set", "batch_size=16", "--set", "fit_weights=false"]
TINY = ["--set", "data.source=synthetic", "--set", "data.val_size=40", "--set", "data.synthetic_train_pool=168",
        "--set", "data.synthetic_test_pool=40", "--set", "train.epochs=1", "--set", "model.width=0.25"]


@pytest.fixture(scope="module")
def team_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """`cifar-mlops server` on a fresh PostgreSQL database (created by the server), artifacts in a temp folder."""
    import sqlalchemy

    try:
        _postgres("SELECT 1")
    except sqlalchemy.exc.OperationalError as err:
        skip_or_fail(f"no PostgreSQL server answers at {PG_URL}: {str(err).splitlines()[0]}")
    folder = tmp_path_factory.mktemp("team")
    database = f"cifar_mlops_team_{uuid.uuid4().hex[:8]}"
    backend = sqlalchemy.engine.make_url(PG_URL).set(database=database).render_as_string(hide_password=False)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["MLFLOW_AUTH_ADMIN_PASSWORD"] = ADMIN_PASSWORD
    log = folder / "server.log"
    url = f"http://127.0.0.1:{port}"
    try:
        with server_process([str(BIN / "cifar-mlops"), "server", "--backend-store-uri", backend,
                             "--artifacts-destination", str(folder / "artifacts"), "--port", str(port), "--workers", "1"],
                            env, log, f"{url}/health"):
            yield {"url": url, "database": database, "log": log, "folder": folder}
    finally:
        for name in (database, f"{database}_auth", f"{database}_optuna"):
            _postgres(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def as_user(team_server: dict, monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """Point this process at the team server as a given user; returns a function taking the role."""
    monkeypatch.chdir(tmp_path)
    for name in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME", "CIFAR_MLOPS_REGISTER_INTO"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", team_server["url"])
    mlflow.set_tracking_uri(team_server["url"])

    def become(user: str, candidates: bool = False) -> None:
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", user)
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", ADMIN_PASSWORD if user == "admin" else PASSWORDS[user])
        if candidates:
            monkeypatch.setenv("CIFAR_MLOPS_REGISTER_INTO", "candidates")
        else:
            monkeypatch.delenv("CIFAR_MLOPS_REGISTER_INTO", raising=False)
    return become


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli.main, list(args))
    return result.exit_code, result.stdout + result.stderr


def state(client: MlflowClient) -> tuple:
    """What a refused action must leave as it was: runs, versions, aliases, version tags."""
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = sorted((r.info.run_id, r.info.status) for r in client.search_runs(experiments)) if experiments else []
    models = sorted((m.name, tuple(sorted((m.aliases or {}).items()))) for m in client.search_registered_models())
    versions = sorted((v.name, v.version, tuple(sorted(v.tags.items()))) for v in client.search_model_versions())
    return runs, models, versions


@pytest.fixture(scope="module")
def users(team_server: dict) -> dict:
    """reader, trainer and maintainer, added by the admin with `cifar-mlops team add-user`."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", team_server["url"])
        patch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
        patch.setenv("MLFLOW_TRACKING_PASSWORD", ADMIN_PASSWORD)
        for role, password in PASSWORDS.items():
            patch.setenv("CIFAR_MLOPS_USER_PASSWORD", password)
            code, output = invoke("team", "add-user", role, "--role", role)
            assert code == 0 and f"added {role} as {role}" in output, output
    return PASSWORDS


def test_the_server_command_prints_what_to_export_and_no_password(team_server: dict, users: dict) -> None:
    log = team_server["log"].read_text()
    assert f"created database(s) {team_server['database']}, {team_server['database']}_auth" in log
    assert f"export MLFLOW_TRACKING_URI={team_server['url']}" in log
    assert "CIFAR_MLOPS_REGISTER_INTO=candidates" in log and f"{team_server['database']}_optuna" in log
    assert ADMIN_PASSWORD not in log and not any(p in log for p in PASSWORDS.values())
    anonymous = requests.get(f"{team_server['url']}/api/2.0/mlflow/experiments/search?max_results=1", timeout=10)
    assert anonymous.status_code == 401


def test_roles_are_enforced_by_the_server_and_a_maintainer_promotes(team_server: dict, users: dict, as_user,
                                                                     tmp_path: Path) -> None:
    import sqlalchemy

    admin = MlflowClient(team_server["url"])
    as_user("admin")
    before = state(admin)

    # A reader reads, but cannot start a run: one line, exit 3, no run left behind.
    as_user("reader")
    code, output = invoke("train", "--exp", "smoke", *TINY)
    assert code == 3, output
    assert ("error: the server refused user 'reader' to create a run in experiment 'cifar10-ablation': that needs "
            "EDIT on experiment cifar10-ablation") in output
    assert invoke("models")[0] == 0
    as_user("admin")
    assert state(admin) == before

    # A trainer trains into the candidates model; the artifacts go through the server.
    as_user("trainer", candidates=True)
    code, trained = invoke("train", "--exp", "smoke", *TINY)
    assert code == 0 and "registered cifar10-cnn-candidates version 1" in trained, trained
    [candidate] = admin.search_model_versions("name = 'cifar10-cnn-candidates'")
    run = admin.get_run(candidate.run_id)
    assert run.info.status == "FINISHED" and run.info.artifact_uri.startswith("mlflow-artifacts:")
    assert (team_server["folder"] / "artifacts").is_dir() and any((team_server["folder"] / "artifacts").rglob("MLmodel"))

    # ... tunes from another shell (its own environment, working and home folders), the study in the server's
    # Optuna database (several worker processes on one PostgreSQL study: tests/test_tune.py) ...
    studies = sqlalchemy.engine.make_url(PG_URL).set(database=f"{team_server['database']}_optuna")
    second = tmp_path / "second-shell"
    second.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "CIFAR_MLOPS_"))}
    env.update(HOME=str(second), MLFLOW_TRACKING_URI=team_server["url"], MLFLOW_TRACKING_USERNAME="trainer",
               MLFLOW_TRACKING_PASSWORD=PASSWORDS["trainer"], PATH=f"{BIN}{os.pathsep}{env['PATH']}")
    tuned = subprocess.run([str(BIN / "cifar-mlops"), "tune", "--exp", "smoke", "--trials", "2", "--study", "team",
                            "--pruner", "none", "--seed", "0", "--storage", studies.render_as_string(hide_password=False),
                            *TUNE_TINY], cwd=second, env=env, capture_output=True, text=True, timeout=300)
    assert tuned.returncode == 0, tuned.stderr[-3000:]
    import optuna

    study = optuna.load_study(study_name="team", storage=studies.render_as_string(hide_password=False))
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
    as_user("admin")
    tuning = admin.get_experiment_by_name("cifar10-tuning")
    assert len(admin.search_runs([tuning.experiment_id], "attributes.status = 'FINISHED'")) == 3  # parent + 2 trials

    # ... builds an ensemble of two candidates, registered as a candidate too ...
    as_user("trainer", candidates=True)
    code, output = invoke("train", "--exp", "smoke-wide", *TINY)
    assert code == 0, output
    members = json.dumps([{"registered_model": "cifar10-cnn-candidates", "exp_id": e} for e in ("smoke", "smoke-wide")])
    code, built = invoke("ensemble", "--exp", "smoke-ensemble", "--set", f"members={members}", *ENSEMBLE_TINY)
    assert code == 0 and "registered cifar10-ensemble-candidates version 1" in built, built

    # ... and logs a report.
    as_user("trainer")
    code, report = invoke("report", "--format", "markdown")
    assert code == 0 and "logged as artifacts of report run" in report, report

    # The trainer's promotion is refused by the server: one line, nothing copied, tagged or moved.
    as_user("admin")
    before = state(admin)
    as_user("trainer")
    code, output = invoke("promote", "cifar10-cnn-candidates", "--version", "1")
    assert code == 3, output
    assert ("error: the server refused user 'trainer' to copy cifar10-cnn-candidates/1 into cifar10-cnn: that needs "
            "EDIT on registered model cifar10-cnn") in output
    direct = requests.post(f"{team_server['url']}/api/2.0/mlflow/registered-models/alias", timeout=10,
                           json={"name": "cifar10-cnn-candidates", "alias": "champion", "version": "1"},
                           auth=("trainer", PASSWORDS["trainer"]))
    assert direct.status_code == 200  # its own candidates: yes
    as_user("admin")
    admin.delete_registered_model_alias("cifar10-cnn-candidates", "champion")
    assert state(admin) == before
    # ... and so is a trainer calling the served model's alias route itself.
    direct = requests.post(f"{team_server['url']}/api/2.0/mlflow/registered-models/alias", timeout=10,
                           json={"name": "cifar10-cnn", "alias": "champion", "version": "1"},
                           auth=("trainer", PASSWORDS["trainer"]))
    assert direct.status_code == 403

    # The maintainer's promotion copies the candidate into the served model and moves @champion there.
    as_user("maintainer")
    code, output = invoke("promote", "cifar10-cnn-candidates", "--version", "1")
    assert code == 0, output
    assert "cifar10-cnn/1 (a copy of cifar10-cnn-candidates/1) now holds @champion" in output
    served = admin.get_model_version_by_alias("cifar10-cnn", "champion")
    assert served.tags["copied_from"] == "cifar10-cnn-candidates/1" and served.tags["exp_id"] == "smoke"
    assert served.tags["promotion_decision"] == "promoted"
    code, output = invoke("promote", "cifar10-cnn-candidates", "--version", "1")
    assert code == 0 and "already holds @champion (as cifar10-cnn/1)" in output

    # No credential anywhere: params, tags, version tags, logged config, outputs.
    secrets = [ADMIN_PASSWORD, *PASSWORDS.values()]
    as_user("admin")
    experiments = [e.experiment_id for e in admin.search_experiments()]
    for found in admin.search_runs(experiments):
        text = repr(found.data.params) + repr(found.data.tags)
        assert not any(s in text for s in secrets)
        if any(a.path == "config.yaml" for a in admin.list_artifacts(found.info.run_id)):
            config = mlflow.artifacts.load_text(f"runs:/{found.info.run_id}/config.yaml")
            assert not any(s in config for s in secrets)
    for version in admin.search_model_versions():
        assert not any(s in repr(version.tags) for s in secrets)
    for text in (output, built, report, trained, tuned.stdout, tuned.stderr, team_server["log"].read_text()):
        assert not any(s in text for s in secrets)


def test_a_wrong_password_and_a_non_admin_are_one_line(team_server: dict, users: dict, as_user,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    as_user("reader")
    monkeypatch.setenv("CIFAR_MLOPS_USER_PASSWORD", "long-enough-password")
    code, output = invoke("team", "add-user", "mallory", "--role", "maintainer")
    assert code == 3, output
    assert "error: user 'reader' may not create user 'mallory': only the team server's admin may" in output
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "not-the-password")
    code, output = invoke("train", "--exp", "smoke", *TINY)
    assert code == 3, output
    assert "the server does not know user 'reader' with that password" in output
    assert "not-the-password" not in output
    as_user("admin")
    code, output = invoke("team", "add-user", "bob", "--role", "owner")
    assert code == 2 and "'owner' is not one of 'reader', 'trainer', 'maintainer'" in output
    monkeypatch.setenv("CIFAR_MLOPS_USER_PASSWORD", "short")
    code, output = invoke("team", "add-user", "bob", "--role", "reader")
    assert code == 2 and "the password for 'bob' is 5 characters; the server needs at least 12" in output


def test_server_bad_input_is_one_line(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    base = [str(BIN / "cifar-mlops"), "server", "--artifacts-destination", str(tmp_path / "a")]
    sqlite = subprocess.run([*base, "--backend-store-uri", "sqlite:///x.db"], env={**env, "MLFLOW_AUTH_ADMIN_PASSWORD":
                            ADMIN_PASSWORD}, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert sqlite.returncode == 2 and "keeps its runs in PostgreSQL" in sqlite.stderr
    no_admin = subprocess.run([*base, "--backend-store-uri", "postgresql://u:hunter2-secret@127.0.0.1:5432/x"],
                              env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert no_admin.returncode == 2 and "no admin password: set MLFLOW_AUTH_ADMIN_PASSWORD" in no_admin.stderr
    assert "hunter2" not in no_admin.stderr and "Traceback" not in no_admin.stderr


def test_the_password_rule_is_mlflows_and_team_reads_it_without_the_server_command() -> None:
    from mlflow.utils.validation import _validate_password

    from cifar_mlops.auth import MIN_PASSWORD_LENGTH

    _validate_password("x" * MIN_PASSWORD_LENGTH)
    with pytest.raises(mlflow.exceptions.MlflowException, match=f"at least {MIN_PASSWORD_LENGTH} characters"):
        _validate_password("x" * (MIN_PASSWORD_LENGTH - 1))
    code = "import sys, cifar_mlops.tracking.team; print('cifar_mlops.server' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"


def everything(admin: MlflowClient) -> tuple:
    """`state` and the experiments and registered models themselves, with their tags."""
    experiments = sorted((e.name, e.lifecycle_stage, tuple(sorted(e.tags.items()))) for e in admin.search_experiments())
    models = sorted((m.name, tuple(sorted(m.tags.items()))) for m in admin.search_registered_models())
    return state(admin), experiments, models


def rest(team_server: dict, user: str, method: str, route: str, body: dict | None = None) -> requests.Response:
    password = ADMIN_PASSWORD if user == "admin" else PASSWORDS[user]
    return requests.request(method, f"{team_server['url']}/api/2.0/mlflow/{route}", json=body, timeout=30,
                            auth=(user, password))


def test_a_reader_creates_and_logs_nothing_while_trainers_and_maintainers_keep_their_rights(
        team_server: dict, users: dict, as_user) -> None:
    from cifar_mlops.tracking import team, team_app

    assert team_app.ROLE_EXPERIMENTS == team.EXPERIMENTS
    as_user("admin")
    admin = MlflowClient(team_server["url"])
    ablation = admin.get_experiment_by_name("cifar10-ablation").experiment_id
    made = rest(team_server, "trainer", "POST", "runs/create", {"experiment_id": ablation, "run_name": "trainer's"})
    assert made.status_code == 200, made.text
    run_id = made.json()["run"]["info"]["run_id"]
    as_user("admin")
    before = everything(admin)

    # Directly through the REST API: every write is 403, and nothing changes.
    reader = "reader-made"
    refused = {
        "experiments/create": rest(team_server, "reader", "POST", "experiments/create", {"name": reader}),
        "registered-models/create": rest(team_server, "reader", "POST", "registered-models/create", {"name": reader}),
        "prompt": rest(team_server, "reader", "POST", "registered-models/create",
                       {"name": f"{reader}-prompt", "tags": [{"key": "mlflow.prompt.is_prompt", "value": "true"}]}),
        "runs/create": rest(team_server, "reader", "POST", "runs/create", {"experiment_id": ablation}),
        "runs/create (Default)": rest(team_server, "reader", "POST", "runs/create", {"experiment_id": "0"}),
        "runs/log-batch": rest(team_server, "reader", "POST", "runs/log-batch", {
            "run_id": run_id, "metrics": [{"key": "m", "value": 1.0, "timestamp": 0, "step": 0}],
            "params": [{"key": "p", "value": "1"}], "tags": [{"key": "t", "value": "1"}]}),
        "runs/log-metric": rest(team_server, "reader", "POST", "runs/log-metric",
                                {"run_id": run_id, "key": "m", "value": 1.0, "timestamp": 0, "step": 0}),
        "runs/set-tag": rest(team_server, "reader", "POST", "runs/set-tag", {"run_id": run_id, "key": "t", "value": "1"}),
        "runs/update": rest(team_server, "reader", "POST", "runs/update", {"run_id": run_id, "status": "KILLED"}),
        "model-versions/create": rest(team_server, "reader", "POST", "model-versions/create",
                                      {"name": "cifar10-cnn-candidates", "source": "mlflow-artifacts:/x", "run_id": run_id}),
        "experiments/set-experiment-tag": rest(team_server, "reader", "POST", "experiments/set-experiment-tag",
                                               {"experiment_id": ablation, "key": "t", "value": "1"}),
    }
    assert {route: r.status_code for route, r in refused.items()} == {route: 403 for route in refused}
    assert "user 'reader' may not create experiments or registered models" in refused["experiments/create"].json()["message"]
    assert rest(team_server, "reader", "GET", f"runs/get?run_id={run_id}").status_code == 200  # reads stay
    assert rest(team_server, "reader", "GET", "registered-models/search").status_code == 200
    assert everything(admin) == before

    # ... and through the CLI: one line, exit 3, naming who grants it; nothing written.
    as_user("reader")
    for command in (["report", "--format", "markdown"], ["train", "--exp", "smoke", *TINY]):
        code, output = invoke(*command)
        assert code == 3, output
        [line] = [line for line in output.splitlines() if line.startswith("error:")]
        assert "the server refused user 'reader'" in line and "cifar-mlops team set-role" in line, line
    import mlflow as client_library

    with pytest.raises(client_library.exceptions.MlflowException, match="may not create experiments"):
        MlflowClient(team_server["url"]).create_experiment(reader)
    as_user("admin")
    assert everything(admin) == before

    # A trainer and a maintainer still create experiments and registered models (theirs to manage).
    for role in ("trainer", "maintainer"):
        for route in ("experiments/create", "registered-models/create"):
            made = rest(team_server, role, "POST", route, {"name": f"{role}-made"})
            assert made.status_code == 200, (role, route, made.text)
    assert rest(team_server, "admin", "POST", "experiments/create", {"name": "admin-made"}).status_code == 200
    for name in ("trainer-made", "maintainer-made", "admin-made"):
        admin.delete_experiment(admin.get_experiment_by_name(name).experiment_id)
    for name in ("trainer-made", "maintainer-made"):
        admin.delete_registered_model(name)
    admin.delete_run(run_id)


def listed(output: str) -> dict[str, str]:
    """`team list`'s table as user -> role."""
    return dict(line.split() for line in output.splitlines()[1:] if line.strip())


def test_users_are_managed_whole_and_refusals_are_one_line(team_server: dict, users: dict, as_user, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    first, second = f"dana-{uuid.uuid4().hex[:12]}", f"dana-{uuid.uuid4().hex[:12]}"
    as_user("admin")
    monkeypatch.setenv("CIFAR_MLOPS_USER_PASSWORD", first)
    assert invoke("team", "add-user", "dana", "--role", "trainer")[0] == 0
    code, output = invoke("team", "list")
    assert code == 0, output
    assert listed(output) == {"admin": "admin", "dana": "trainer", "maintainer": "maintainer", "reader": "reader",
                              "trainer": "trainer"}
    assert not any(p in output for p in (ADMIN_PASSWORD, first, *PASSWORDS.values()))

    def answers(password: str) -> int:
        return requests.get(f"{team_server['url']}/api/2.0/mlflow/experiments/search?max_results=1", timeout=10,
                            auth=("dana", password)).status_code

    assert answers(first) == 200

    # A new password from a file (or $CIFAR_MLOPS_USER_PASSWORD), never an argument.
    monkeypatch.delenv("CIFAR_MLOPS_USER_PASSWORD")
    secret = tmp_path / "dana.password"
    secret.write_text(second + "\n")
    code, output = invoke("team", "set-password", "dana", "--password-file", str(secret))
    assert code == 0 and "new password set for dana" in output, output
    assert (answers(second), answers(first)) == (200, 401)
    code, output = invoke("team", "set-password", "dana", second)
    assert code == 2 and "Got unexpected extra argument" in output  # no password on a command line
    short = tmp_path / "short"
    short.write_text("short")
    code, output = invoke("team", "set-password", "dana", "--password-file", str(short))
    assert code == 2 and "the password for 'dana' is 5 characters; the server needs at least 12" in output
    code, output = invoke("team", "set-password", "nobody", "--password-file", str(secret))
    assert code == 2 and "no user 'nobody' on this server" in output
    assert answers(second) == 200

    # Refusals for anyone but the admin: one line, exit 3, who grants it; nothing changed.
    for role in ("reader", "trainer", "maintainer"):
        as_user(role)
        for command, action in ((["team", "set-password", "dana", "--password-file", str(secret)],
                                 "set the password of 'dana'"), (["team", "remove-user", "dana"], "remove user 'dana'"),
                                (["team", "list"], "list the users")):
            code, output = invoke(*command)
            assert code == 3, (role, command, output)
            [line] = output.strip().splitlines()
            assert line.startswith(f"error: user {role!r} may not {action}: only the team server's admin may"), line
    refused = requests.delete(f"{team_server['url']}/api/2.0/mlflow/users/delete", json={"username": "dana"},
                              auth=("trainer", PASSWORDS["trainer"]), timeout=10)
    assert refused.status_code == 403
    assert answers(second) == 200

    # Removing: the user and its grants go (added again, it holds only its new role's grants); the admin stays.
    as_user("admin")
    code, output = invoke("team", "remove-user", "dana")
    assert code == 0 and "removed dana" in output, output
    assert answers(second) == 401
    assert "dana" not in listed(invoke("team", "list")[1])
    code, output = invoke("team", "remove-user", "dana")
    assert code == 2 and "no user 'dana' on this server" in output
    code, output = invoke("team", "remove-user", "admin")
    assert code == 2 and "'admin' is the team server's admin, who is not removed" in output
    monkeypatch.setenv("CIFAR_MLOPS_USER_PASSWORD", first)
    assert invoke("team", "add-user", "dana", "--role", "reader")[0] == 0
    assert listed(invoke("team", "list")[1])["dana"] == "reader"
    assert invoke("team", "remove-user", "dana")[0] == 0
    assert ADMIN_PASSWORD not in team_server["log"].read_text() and first not in team_server["log"].read_text()
    assert second not in team_server["log"].read_text()


def test_a_trainer_who_may_not_register_there_learns_it_before_training(team_server: dict, users: dict,
                                                                          as_user) -> None:
    from cifar_mlops.tracking import registry

    as_user("admin")
    admin = MlflowClient(team_server["url"])
    before = everything(admin)
    as_user("trainer")  # without CIFAR_MLOPS_REGISTER_INTO=candidates
    code, output = invoke("train", "--exp", "smoke", *TINY)
    assert code == 3, output
    [line] = output.strip().splitlines()
    assert line == ("error: user 'trainer' may not register into cifar10-cnn (it holds READ there; registering needs "
                    "EDIT on registered model cifar10-cnn, which the team's admin grants: `cifar-mlops team set-role`); "
                    "trainers register into cifar10-cnn-candidates (export CIFAR_MLOPS_REGISTER_INTO=candidates); "
                    "nothing was trained")
    members = json.dumps([{"registered_model": "cifar10-cnn-candidates", "exp_id": e} for e in ("smoke", "smoke-wide")])
    code, output = invoke("ensemble", "--exp", "smoke-ensemble", "--set", f"members={members}", *ENSEMBLE_TINY)
    assert code == 3, output
    [line] = output.strip().splitlines()
    assert line.startswith("error: user 'trainer' may not register into cifar10-ensemble (it holds READ there"), line
    as_user("admin")
    assert everything(admin) == before  # no run started, none left RUNNING, nothing registered

    # What the check reads: the user's own permission, which the server tells that user and no other.
    asked = {"resource_type": "registered_model", "resource_id": "cifar10-cnn"}
    own = requests.get(f"{team_server['url']}{registry.USER_PERMISSION_ROUTE}", timeout=10,
                       params={"username": "trainer", **asked}, auth=("trainer", PASSWORDS["trainer"]))
    assert own.status_code == 200 and own.json()["permission"] == "READ"
    other = requests.get(f"{team_server['url']}{registry.USER_PERMISSION_ROUTE}", timeout=10,
                         params={"username": "maintainer", **asked}, auth=("trainer", PASSWORDS["trainer"]))
    assert other.status_code == 403
    # Those who may register pass the check: a trainer into candidates, a maintainer into the served model.
    as_user("trainer", candidates=True)
    registry.check_may_register("cnn")
    as_user("maintainer")
    registry.check_may_register("cnn")
    # A reader, who may not create the run either, is refused that first (by the server, before training).
    as_user("reader", candidates=True)
    registry.check_may_register("cnn", "cifar10-ablation")
    with pytest.raises(registry.store.PermissionDenied, match="may not register into cifar10-cnn-candidates "
                       r"\(it holds READ there; .*\); nothing was trained$"):  # no candidates hint: no use to it
        registry.check_may_register("cnn")


@contextmanager
def another_server(folder: Path, *args: str, env: dict[str, str] | None = None) -> Iterator[dict]:
    """One more `cifar-mlops server` on its own new database (dropped after), with `args` added."""
    import sqlalchemy

    try:
        _postgres("SELECT 1")
    except sqlalchemy.exc.OperationalError as err:
        skip_or_fail(f"no PostgreSQL server answers at {PG_URL}: {str(err).splitlines()[0]}")
    database = f"cifar_mlops_team_{uuid.uuid4().hex[:8]}"
    backend = sqlalchemy.engine.make_url(PG_URL).set(database=database).render_as_string(hide_password=False)
    port = free_port()
    environment = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    environment.update(MLFLOW_AUTH_ADMIN_PASSWORD=ADMIN_PASSWORD, **(env or {}))
    log = folder / f"server-{port}.log"
    argv = [str(BIN / "cifar-mlops"), "server", "--backend-store-uri", backend, "--port", str(port), "--workers", "1",
            *args]
    if "--artifacts-destination" not in args:
        argv += ["--artifacts-destination", str(folder / "artifacts")]
    try:
        with server_process(argv, environment, log, f"http://127.0.0.1:{port}/health"):
            yield {"url": f"http://127.0.0.1:{port}", "port": port, "log": log, "database": database}
    finally:
        for name in (database, f"{database}_auth", f"{database}_optuna"):
            _postgres(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_a_server_for_other_machines_answers_the_names_it_was_given_and_no_other(tmp_path: Path) -> None:
    with another_server(tmp_path, "--host", "0.0.0.0", "--allowed-hosts", "mlflow.team.test") as started:
        port = started["port"]

        def status(address: str, host: str) -> int:  # another machine's request: another address, its Host header
            return requests.get(f"http://{address}:{port}/api/2.0/mlflow/experiments/search?max_results=1",
                                headers={"Host": host}, auth=("admin", ADMIN_PASSWORD), timeout=10).status_code

        assert status("127.0.0.2", f"mlflow.team.test:{port}") == 200  # http://mlflow.team.test:PORT
        assert status("127.0.0.2", "mlflow.team.test") == 200  # behind a TLS proxy: https://mlflow.team.test
        assert status("127.0.0.1", f"127.0.0.1:{port}") == 200  # the server's own machine
        for host in (f"evil.test:{port}", "evil.test", f"127.0.0.2:{port}", f"mlflow.team.test.evil.test:{port}"):
            refused = requests.get(f"http://127.0.0.2:{port}/api/2.0/mlflow/experiments/search?max_results=1",
                                   headers={"Host": host}, auth=("admin", ADMIN_PASSWORD), timeout=10)
            assert refused.status_code == 403 and "Invalid Host header" in refused.text, (host, refused.text)
        log = started["log"].read_text()
        assert f"export MLFLOW_TRACKING_URI=http://mlflow.team.test:{port}" in log
        assert ADMIN_PASSWORD not in log


def test_the_tls_proxy_example_forwards_to_the_server_command_it_shows() -> None:
    import shlex

    from cifar_mlops import server
    from tests.conftest import REPO
    from tests.helpers import parse

    text = (REPO / "deploy" / "team-server" / "Caddyfile").read_text()
    [line] = [line.lstrip("# ") for line in text.splitlines() if "cifar-mlops server" in line]
    command, params = parse(shlex.split(line))
    assert command.name == "server"
    site = re.search(r"^(\S+) \{$", text, re.MULTILINE)[1]
    host, port = re.search(r"^\s*reverse_proxy (\S+):(\d+)$", text, re.MULTILINE).groups()
    assert (host, int(port)) == (params["host"], params["port"]) == ("127.0.0.1", 5000)  # the loopback only
    # Caddy forwards the client's Host header (the site name, no port on 443): the server must take it
    assert site in server.host_patterns(params["allowed_hosts"], params["port"]).split(",")
    docs = (REPO / "docs" / "team.md").read_text()
    for export in (f"export MLFLOW_TRACKING_URI=https://{site}", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        assert export in text and export in docs
    assert "caddy run --config deploy/team-server/Caddyfile" in docs


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """moto's standalone S3 server on a free port of 127.0.0.1, with a bucket; the server's AWS variables."""
    import boto3

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_"))}
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    url = f"http://127.0.0.1:{port}"
    credentials = {"AWS_ACCESS_KEY_ID": f"AKIA{uuid.uuid4().hex[:16].upper()}",
                   "AWS_SECRET_ACCESS_KEY": f"secret-{uuid.uuid4().hex}", "AWS_DEFAULT_REGION": "us-east-1"}
    with server_process([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], env, log, f"{url}/moto-api/"):
        bucket = boto3.client("s3", endpoint_url=url, region_name="us-east-1",
                              aws_access_key_id=credentials["AWS_ACCESS_KEY_ID"],
                              aws_secret_access_key=credentials["AWS_SECRET_ACCESS_KEY"])
        bucket.create_bucket(Bucket="team-artifacts")
        yield {"env": {**credentials, "MLFLOW_S3_ENDPOINT_URL": url}, "client": bucket, "log": log}


def test_artifacts_on_s3_train_register_ensemble_predict_and_serve_through_the_team_server(
        s3: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import Image


    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                 "AWS_SHARED_CREDENTIALS_FILE", "MLFLOW_S3_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)  # the clients hold no S3 credential: the server does
    monkeypatch.setenv("HOME", str(tmp_path))  # nor an ~/.aws of this machine
    with another_server(tmp_path, "--artifacts-destination", "s3://team-artifacts/cifar", env=s3["env"]) as started:
        url = started["url"]
        monkeypatch.chdir(tmp_path)
        for name in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        mlflow.set_tracking_uri(url)
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", ADMIN_PASSWORD)
        monkeypatch.setenv("CIFAR_MLOPS_USER_PASSWORD", PASSWORDS["trainer"])
        assert invoke("team", "add-user", "trainer", "--role", "trainer")[0] == 0

        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "trainer")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORDS["trainer"])
        monkeypatch.setenv("CIFAR_MLOPS_REGISTER_INTO", "candidates")
        outputs = []
        for exp_id in ("smoke", "smoke-wide"):
            code, output = invoke("train", "--exp", exp_id, *TINY)
            assert code == 0, output
            outputs.append(output)
        assert "registered cifar10-cnn-candidates version 2" in outputs[-1]
        members = json.dumps([{"registered_model": "cifar10-cnn-candidates", "exp_id": e} for e in ("smoke", "smoke-wide")])
        code, output = invoke("ensemble", "--exp", "smoke-ensemble", "--set", f"members={members}", *ENSEMBLE_TINY)
        assert code == 0 and "registered cifar10-ensemble-candidates version 1" in output, output
        outputs.append(output)

        # The artifacts are in the bucket, under its prefix, put there by the server: clients never see S3.
        keys = [o["Key"] for page in s3["client"].get_paginator("list_objects_v2").paginate(Bucket="team-artifacts")
                for o in page.get("Contents", [])]
        assert keys and all(key.startswith("cifar/") for key in keys)
        assert sum(key.endswith("/MLmodel") for key in keys) >= 3 and any("/checkpoint/" in key for key in keys)
        assert not (tmp_path / "artifacts").exists()
        client = MlflowClient(url)
        versions = client.search_model_versions()
        assert len(versions) == 3
        for version in versions:
            assert client.get_run(version.run_id).info.artifact_uri.startswith("mlflow-artifacts:")

        # predict and `mlflow models serve` read the models back through the server
        Image.new("RGB", (40, 30), (200, 30, 30)).save(tmp_path / "red.png")
        code, output = invoke("predict", "--model", "models:/cifar10-ensemble-candidates/1", str(tmp_path / "red.png"))
        assert code == 0 and "red.png" in output, output
        outputs.append(output)
        pixels = np.random.default_rng(3).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8).tolist()
        with serving("models:/cifar10-cnn-candidates/1", url, tmp_path / "serve.log", MLFLOW_TRACKING_USERNAME="trainer",
                     MLFLOW_TRACKING_PASSWORD=PASSWORDS["trainer"]) as served:
            answer = requests.post(f"{served}/invocations", json={"inputs": pixels}, timeout=120)
        assert answer.status_code == 200 and len(answer.json()["predictions"]) == 2, answer.text[:2000]

        # An S3 failure (the bucket gone) is one line for the client, without the credentials, and leaves no run
        # RUNNING.
        for key in keys:
            s3["client"].delete_object(Bucket="team-artifacts", Key=key)
        s3["client"].delete_bucket(Bucket="team-artifacts")
        # MLflow retries a 5xx 7 times with a growing back-off (about 4 minutes in all) before it gives up; with
        # one retry the line and the store after it are the same (the server answers 500 or resets the upload).
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        code, output = invoke("train", "--exp", "smoke", *TINY)
        assert code == 1, output
        [line] = [line for line in output.splitlines() if line.startswith("error:")]
        assert re.match(rf"error: the tracking server {url} (answered 500 to|broke off \(connection reset\) the "
                        r"request to) /api/2.0/mlflow-artifacts/artifacts/", line), line
        assert "its log says why" in line and "Traceback" not in output
        outputs.append(output)
        assert not client.search_runs(experiments := [e.experiment_id for e in client.search_experiments()],
                                      "attributes.status = 'RUNNING'")
        s3["client"].create_bucket(Bucket="team-artifacts")

        # No S3 credential anywhere: params, tags, version tags, logged configs, outputs, logs.
        secrets = [s3["env"]["AWS_SECRET_ACCESS_KEY"], s3["env"]["AWS_ACCESS_KEY_ID"]]
        for found in client.search_runs(experiments):
            text = repr(found.data.params) + repr(found.data.tags)
            assert not any(s in text for s in secrets)
            if any(a.path == "config.yaml" for a in client.list_artifacts(found.info.run_id)):
                assert not any(s in mlflow.artifacts.load_text(f"runs:/{found.info.run_id}/config.yaml") for s in secrets)
        for version in versions:
            assert not any(s in repr(version.tags) + (version.description or "") for s in secrets)
        for text in (*outputs, started["log"].read_text(), (tmp_path / "serve.log").read_text()):
            assert not any(s in text for s in secrets)
