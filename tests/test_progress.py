"""One progress bar per long command: `ablate`, `tune`, `train --seeds` (and `select`, through `progress.runs_bar`).

The commands run as a user runs them, stderr to a pipe (a log file, not a terminal): one line per finished run
with runs done / total, elapsed time and the time left, and no Keras per-epoch line unless --verbose.
"""

from __future__ import annotations

import io
import os
import pty
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cifar_mlops import progress
from tests.conftest import BIN, run_command
from tests.helpers import KERAS_EPOCH, bar_lines

TINY_SET = ["--set", "data.synthetic_train_pool=168", "--set", "data.val_size=40", "--set",
            "data.synthetic_test_pool=40", "--set", "train.epochs=1"]


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_in_a_log_a_bar_is_one_line_per_finished_run_and_its_estimate_leaves_out_reused_runs() -> None:
    log = io.StringIO()
    bar = progress.open_bar("ablate", 0, stream=log)
    bar.add_total(4)
    bar.reused(2)  # found done: no line, and no part of the rate
    bar.start("b seed 0")
    assert log.getvalue() == ""
    time.sleep(0.2)
    bar.finished("b seed 0", "test_accuracy=0.5000")
    left = bar.remaining()
    assert left is not None and 0.15 < left < 2  # one run left at the one run's time, not a third of it
    bar.set_done(4, [])  # what a queue reports: the last one finished elsewhere
    bar.close()
    lines = bar_lines(log.getvalue(), "ablate")
    assert [(m[1], m[2], m[5]) for m in lines] == [("3", "4", "b seed 0: test_accuracy=0.5000"),
                                                   ("4", "4", "1 more finished")]
    assert lines[0][4] != "?" and lines[1][4] == "00:00"


def test_on_a_terminal_the_bar_is_one_updating_line_that_names_the_current_run() -> None:
    screen = Terminal()
    with progress.runs_bar("tune", 3, unit="trials", stream=screen) as bar:
        bar.start("trial 0")
        bar.write("[cifar-mlops] a log line")  # above the bar, not inside it
        bar.finished("trial 0")
        bar.start("trial 1")
    shown = screen.getvalue()
    assert "\n" not in shown.split("[cifar-mlops] a log line\n")[-1].rstrip("\n")  # after the log line: \r only
    redraws = shown.split("\r")
    assert any("now: trial 0" in r and "0/3 trials" in r for r in redraws)
    assert any("now: trial 1" in r and "1/3 trials" in r and " left]" in r for r in redraws)


def test_in_a_real_terminal_without_a_size_the_bar_still_draws_one_line(tmp_path: Path) -> None:
    """stderr on a pseudo-terminal that reports 0 x 0 (as under `script` or some CI runners): tqdm alone draws
    nothing there."""
    script = ("import time\nfrom cifar_mlops import progress\n"
              "with progress.runs_bar('ablate', 2) as bar:\n"
              "    bar.start('smoke seed 0'); time.sleep(0.3); bar.finished('smoke seed 0')\n")
    leader, follower = pty.openpty()
    child = subprocess.Popen([sys.executable, "-c", script], stderr=follower, stdout=subprocess.DEVNULL)
    os.close(follower)
    shown = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        shown += chunk
    assert child.wait(timeout=60) == 0
    os.close(leader)
    screen = shown.decode()
    assert "now: smoke seed 0" in screen and "1/2 runs [" in screen
    assert screen.count("\n") == 1  # redrawn in place (\r), one newline when the bar closes


def test_the_runs_under_a_bar_are_quiet_and_verbose_brings_them_back(monkeypatch, capsys) -> None:
    monkeypatch.setenv(progress.RUN_OUTPUT, "")  # undone after the test, set_verbose included
    with progress.runs_bar("train", 1, stream=io.StringIO()):
        assert progress.keras_verbosity() == 0
        progress.detail("evaluating on train, val and test")
    assert progress.keras_verbosity() == 2  # pytest's stderr is no terminal: one line per epoch, as before
    progress.set_verbose(True)
    with progress.runs_bar("train", 1, stream=io.StringIO()):
        assert progress.keras_verbosity() == 2
        progress.detail("model cnn_tiny")
    assert capsys.readouterr().err == "[cifar-mlops] model cnn_tiny\n"


def test_a_bar_opened_inside_another_command_counts_on_its_bar_and_the_lines_name_the_section(monkeypatch) -> None:
    """`select` runs one `ablate` per step: the steps' bars are the selection's one bar, whose total grows as the
    steps plan their runs and whose lines name the step."""
    monkeypatch.setenv(progress.RUN_OUTPUT, "")
    log = io.StringIO()
    with progress.runs_bar("select", 0, stream=log) as outer:
        outer.set_section("step 1")
        inner = progress.open_bar("ablate", 0)  # as `ablate` opens its own
        assert isinstance(inner, progress.Nested)
        inner.add_total(3)
        inner.reused(1)  # a killed selection's run
        inner.start("a seed 0")
        inner.finished("a seed 0", "test_accuracy=0.5000")
        inner.set_done(inner.done + 1, [])  # one a worker process trained
        inner.close()
        assert (inner.done, inner.total) == (3, 3) and progress.keras_verbosity() == 0  # still under the outer bar
        outer.set_section("step 2")
        with progress.runs_bar("ablate", 2) as inner:
            inner.reused(1)  # the base's run, the step before's
            inner.start("a +b seed 0")
            inner.finished("a +b seed 0")
    assert "ablate" not in log.getvalue()
    lines = bar_lines(log.getvalue(), "select")
    assert [(m[1], m[2], m[5]) for m in lines] == [("2", "3", "step 1: a seed 0: test_accuracy=0.5000"),
                                                   ("3", "3", "step 1: 1 more finished"),
                                                   ("5", "5", "step 2: a +b seed 0")]
    assert lines[-1][4] == "00:00"
    assert progress.keras_verbosity() == 2  # both closed: the runs print as before
    alone = progress.open_bar("ablate", 1, stream=io.StringIO())  # with no bar open: a bar of its own again
    assert type(alone) is progress.RunsBar
    alone.close()


def test_on_a_terminal_a_command_inside_another_draws_no_second_bar() -> None:
    screen = Terminal()
    with progress.runs_bar("select", 0, stream=screen) as outer:
        outer.set_section("step 1")
        with progress.runs_bar("ablate", 2) as inner:
            inner.start("a seed 0")
            progress.log("a log line")  # above the one bar
            inner.finished("a seed 0")
    shown = screen.getvalue()
    assert "cifar-mlops ablate" not in shown and "[cifar-mlops] a log line\n" in shown
    redraws = shown.split("\r")
    assert any("[cifar-mlops select]" in r and "0/2 runs" in r and "now: step 1: a seed 0" in r for r in redraws)
    assert any("1/2 runs" in r for r in redraws)


@pytest.mark.slow
def test_ablate_in_a_log_file_prints_one_line_per_run_and_no_keras_epochs(tmp_path: Path) -> None:
    done = run_command([str(BIN / "cifar-mlops"), "ablate", "--exp", "smoke", "--design", "variants",
                        "--variants", "smoke-wide", "--seeds", "2", *TINY_SET], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = bar_lines(done.stderr, "ablate")
    assert [(int(m[1]), int(m[2])) for m in lines] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert {re.sub(r": test_accuracy=0\.\d{4}$", "", m[5]) for m in lines} == {
        "smoke seed 0", "smoke seed 1", "smoke-wide seed 0", "smoke-wide seed 1"}
    assert lines[0][4] != "?" and lines[-1][4] == "00:00"
    assert not KERAS_EPOCH.search(done.stdout + done.stderr)
    assert "evaluating on train, val and test" not in done.stderr  # each run's own steps: quiet under the bar
    # the last line links to the ablation's parent run itself (its tables and plots), in the training view
    parent = re.search(r"^parent run (\w+) in MLflow experiment 'cifar10-ablation'.*then open (\S+)$", done.stdout,
                       re.MULTILINE)
    assert parent and parent[2] == f"http://127.0.0.1:5000/#/experiments/1/runs/{parent[1]}?workflowType=machine_learning"


@pytest.mark.slow
def test_train_seeds_verbose_keeps_the_bar_and_brings_back_keras_epoch_lines(tmp_path: Path) -> None:
    done = run_command([str(BIN / "cifar-mlops"), "train", "--exp", "smoke", "--seeds", "2", "--no-register",
                        "--verbose", *TINY_SET], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = bar_lines(done.stderr, "train")
    assert [(m[1], m[2]) for m in lines] == [("1", "2"), ("2", "2")]
    assert [m[5].split(":")[0] for m in lines] == ["smoke seed 0", "smoke seed 1"]
    assert len(KERAS_EPOCH.findall(done.stdout + done.stderr)) >= 2  # Keras's lines, one per epoch (1 epoch, 2 seeds)
    assert "evaluating on train, val and test" in done.stderr
    assert re.findall(r"^seed (\d): val_accuracy=", done.stdout, re.MULTILINE) == ["0", "1"]  # results on stdout
