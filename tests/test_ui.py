"""What a user sees in MLflow's UI: the links `train` prints open the run (and the registered version) in the
UI's training view, on a local store (`mlflow ui`) and on a server; training runs carry system metrics; a parent
run's description (tag `mlflow.note.content`, markdown) shows on its page as rendered markdown."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest
from mlflow import MlflowClient

from cifar_mlops.tracking import results, runs
from cifar_mlops.tracking import store as tracking
from cifar_mlops.train import train
from tests.conftest import BIN, free_port, run_command, server_process, tiny, tiny_overrides

# One worker runs this module: its module fixtures are made once, not once per worker.
pytestmark = pytest.mark.xdist_group("ui")

CHROMIUM = Path("/usr/bin/chromium")
needs_chromium = pytest.mark.requires_service(  # skips on a laptop without it, fails in CI
    available=CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium (apt-get install chromium)")
# What the UI's side bar lists in each view (MLflow 3.17.2): the training view links the model registry,
# the GenAI view lists its judges and prompts instead.
TRAINING_VIEW, GENAI_VIEW = 'href="#/models"', "Judges"
SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no job runner beside the UI's one worker


def train_through_cli(folder: Path, **env: str) -> str:
    """`cifar-mlops train --exp smoke` (tiny, system metrics every 0.5 s) as a user runs it; its log."""
    pairs = [arg for key, value in tiny_overrides("smoke").items() if value is not None
             for arg in ("--set", f"{key}={value}")]
    result = run_command([str(BIN / "cifar-mlops"), "train", "--exp", "smoke", *pairs,
                          "--set", "track.system_metrics_interval=0.5"], folder, **env)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stderr


def printed(log: str, pattern: str) -> re.Match:
    found = re.search(pattern, log)
    assert found, log[-3000:]
    return found


def page_text(url: str, profile: Path) -> str:
    """The DOM of `url` once headless Chromium has run its scripts (the UI is a single-page app)."""
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", "--virtual-time-budget=30000"]
    dom = subprocess.run([str(CHROMIUM), *flags, "--dump-dom", url], capture_output=True, text=True, timeout=180)
    assert dom.returncode == 0, dom.stderr[-2000:]
    return dom.stdout


def ui_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    return {**env, **SERVER_ENV, "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}"}


@needs_chromium
@pytest.mark.slow
def test_printed_links_open_the_run_and_the_version_in_the_training_view_of_mlflow_ui(tmp_path) -> None:
    log = train_through_cli(tmp_path)
    command, run_url = printed(log, r"tracking run \w+ in experiment 'cifar10-ablation'; run `([^`]+)`, then open (\S+)").groups()
    version_url = printed(log, r"registered cifar10-cnn version 1: (\S+)").group(1)
    run_id = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").search_runs(["1"])[0].info.run_id
    assert run_url == f"http://127.0.0.1:5000/#/experiments/1/runs/{run_id}?workflowType=machine_learning"
    assert version_url == "http://127.0.0.1:5000/#/models/cifar10-cnn/versions/1?workflowType=machine_learning"
    assert command == f"mlflow ui --backend-store-uri sqlite:///{tmp_path / 'mlflow.db'} --workers 1"
    # a parent run with a markdown description: `cifar-mlops report` logs one (no training) on the same store
    report = run_command([str(BIN / "cifar-mlops"), "report"], tmp_path)
    assert report.returncode == 0, report.stderr[-3000:]
    report_id = printed(report.stderr, rf"report run (\w+) in MLflow experiment '{results.REPORT_EXPERIMENT}'").group(1)
    reports = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_experiment_by_name(results.REPORT_EXPERIMENT)
    report_url = tracking.ui_link(f"sqlite:///{tmp_path / 'mlflow.db'}",
                                  tracking.run_page(reports.experiment_id, report_id))

    port = free_port()  # the printed command as printed, on a free port instead of 5000
    with server_process([str(BIN / "mlflow"), *shlex.split(command)[1:], "--port", str(port)], ui_env(),
                        tmp_path / "ui.log", f"http://127.0.0.1:{port}/health"):
        local = f"http://127.0.0.1:{port}"
        run_page = page_text(run_url.replace("http://127.0.0.1:5000", local), tmp_path / "profile")
        assert f"Run {run_id} - MLflow" in run_page and ">smoke<" in run_page  # the run, by its name
        assert TRAINING_VIEW in run_page and GENAI_VIEW not in run_page
        assert "system/cpu_utilization_percentage" in run_page
        # the same page without the parameter opens in the GenAI view: the parameter is what makes the difference
        plain = page_text(run_url.replace("http://127.0.0.1:5000", local).split("?")[0], tmp_path / "profile-2")
        assert GENAI_VIEW in plain and TRAINING_VIEW not in plain

        version_page = page_text(version_url.replace("http://127.0.0.1:5000", local), tmp_path / "profile")
        assert "cifar10-cnn v1 - MLflow" in version_page and TRAINING_VIEW in version_page
        assert "Experiment <strong>smoke</strong>" in version_page  # its description, rendered
        assert "test accuracy" in version_page and f"runs/{run_id}?workflowType=machine_learning" in version_page

        # the report run's description, rendered as markdown (MLflow 3.17.2: the run page's "Description" section,
        # collapsed behind "Show more" but whole in the DOM): its tables are HTML tables, not `| a | b |` text
        report_page = page_text(report_url.replace("http://127.0.0.1:5000", local), tmp_path / "profile")
        assert f"Run {report_id} - MLflow" in report_page and TRAINING_VIEW in report_page
        _, found, described = report_page.partition('data-testid="note-editor-preview-content">')
        assert found, "no description on the report run's page"
        assert described.startswith("<h1>CIFAR-10 ablation report</h1>")
        table = described[described.index("<table>"):described.index("</table>")]  # the catalogue's check marks
        assert "<th>Enhancement</th>" in table and re.search(r"<td>Increased epochs</td>\s*<td>✔</td>", table)
        assert "| Enhancement" not in report_page and "|:---" not in report_page


@needs_chromium
@pytest.mark.slow
def test_on_a_server_the_printed_link_is_the_servers_own(tmp_path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with server_process([str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
                         "--artifacts-destination", str(tmp_path / "artifacts"), "--port", str(port),
                         "--workers", "1"], ui_env(), tmp_path / "server.log", f"{url}/health"):
        log = train_through_cli(tmp_path, MLFLOW_TRACKING_URI=url)
        run_url = printed(log, r"tracking run \w+ in experiment 'cifar10-ablation'; open (\S+)").group(1)
        assert run_url.startswith(f"{url}/#/experiments/") and run_url.endswith("?workflowType=machine_learning")
        assert "mlflow ui" not in log
        page = page_text(run_url, tmp_path / "profile")
        assert ">smoke<" in page and TRAINING_VIEW in page and GENAI_VIEW not in page


def test_links_name_the_server_without_credentials_and_ask_for_the_training_view() -> None:
    link = tracking.ui_link("https://alice:s3cret@mlflow.example.org:8443/team/", tracking.version_page("cifar10 cnn", 3))
    assert link == "https://mlflow.example.org:8443/team/#/models/cifar10%20cnn/versions/3?workflowType=machine_learning"
    assert tracking.where_to_look("sqlite:////tmp/a b/mlflow.db") == (
        "run `mlflow ui --backend-store-uri 'sqlite:////tmp/a b/mlflow.db' --workers 1`, then open "
        "http://127.0.0.1:5000/#/experiments?workflowType=machine_learning")


def test_experiments_the_project_creates_open_in_the_training_view(store) -> None:
    client = MlflowClient()
    runs.experiment_id(client, "cifar10-tuning")
    train(tiny("smoke", track__system_metrics_interval=0), register=False)
    for name in (runs.ABLATION_EXPERIMENT, "cifar10-tuning"):
        assert client.get_experiment_by_name(name).tags["mlflow.experimentKind"] == "custom_model_development"
