"""Forward selection (`cifar-mlops select`): planted enhancements on a smoke-sized experiment, real tiny trainings.

The start experiment `sel-start` trains at a learning rate of 3e-7, so it stays at chance; the planted candidates
are a working learning rate (1e-2: a large, steady gain), the same learning rate 1000x too low (1e-5: harmful
once the working one is in) and an augmentation that the test catalogue's rules for the smoke study forbid. One
selection is started in a subprocess and killed mid-way, then rerun as a user would: the tests read that rerun,
its store and the file it wrote. (A change that changes nothing is planted in benchmarks/bench_select.py.)"""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import time

import mlflow
import optuna
import pandas as pd
import pytest
import yaml
from click.testing import CliRunner
from mlflow import MlflowClient

from cifar_mlops import ablate, cli
from cifar_mlops import config as cfg
from cifar_mlops import select as forward
from cifar_mlops.execution import queue
from cifar_mlops.tracking import runs
from tests.conftest import BIN, REPO, use_store
from tests.helpers import KERAS_EPOCH, bar_lines, compute_measure

# One worker runs this module: its module fixtures are made once, not once per worker.
pytestmark = pytest.mark.xdist_group("select")

PLANTED = {
    "planted_working_lr": {"label": "Planted: a learning rate that trains", "studies": ["smoke"], "kind": "training",
                           "description": "Helpful on purpose (the start stays at chance).",
                           "set": {"train.learning_rate": 1.0e-2}},
    "planted_too_low_lr": {"label": "Planted: learning rate 1000x too low", "studies": ["smoke"], "kind": "training",
                           "description": "Harmful on purpose.", "set": {"train.learning_rate": 1.0e-5}},
    "planted_flip": {"label": "Planted: an augmentation", "studies": ["smoke"], "kind": "augmentation",
                     "description": "Forbidden by the test's rules for the smoke study.", "set": {"augment.flip": True}},
    # in no study's rows, so only `--candidates` proposes it (the two-worker test)
    "planted_noop": {"label": "Planted: changes nothing", "studies": [], "kind": "training",
                     "description": "SGD's momentum at its default: Adam ignores it.", "set": {"train.momentum": 0.9}},
}
SMOKE_RULES = {"text": "A tiny CNN on synthetic images, with no data augmentation.",
               "forbids": {"augmentation": "no data augmentation"}}
EXPERIMENTS = {  # sel-start adds nothing of its own, so the planted enhancements win over sel-base's learning rate
    "sel-base": {"description": "smoke at a learning rate that stays at chance", "study": "smoke", "extends": "smoke",
                 "parent": "smoke", "train": {"learning_rate": 3.0e-7}},
    "sel-start": {"description": "where the selection starts", "study": "smoke", "extends": "sel-base",
                  "parent": "sel-base"},
}
# 300 training images, 6 epochs: the working learning rate reaches 88-98% on 100 test images, the others 10%
TINY = ("data.synthetic_train_pool=400 data.val_size=100 data.synthetic_test_pool=100 train.epochs=6 "
        "train.batch_size=32 train.checkpoint_every=0")
ARGS = ["select", "--exp", "sel-start", "--max-seeds", "3", "--overrides", TINY]
# where no verdict is read, only that every run trains once: one epoch on 128 training images
TINY_RUNS = ("data.synthetic_train_pool=168 data.val_size=40 data.synthetic_test_pool=40 train.epochs=1 "
             "train.batch_size=32 train.checkpoint_every=0")
# Study B's constraint as the project quotes the source study (../shared/DESIGN.md, docs/catalogue.md)
STUDY_B_TEXT = ("a small CNN from scratch under a constraint: no known architecture (no VGG/ResNet/DenseNet blocks), "
                "no data augmentation, 5,000 training and 5,000 validation images drawn from randomly shuffled "
                "indices (not stratified: uneven classes on purpose), the test set untouched.")


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory: pytest.TempPathFactory):
    """The project's catalogue plus the planted enhancements, rules for the smoke study and sel-base, sel-start;
    generated iterations go to a folder of their own (CIFAR_MLOPS_GENERATED)."""
    root = tmp_path_factory.mktemp("select-catalogue")
    folder = root / "experiments"
    shutil.copytree(cfg.experiments_dir(), folder, ignore=shutil.ignore_patterns(cfg.GENERATED_DIR))
    enhancements = yaml.safe_load((folder / "enhancements.yaml").read_text())
    rules = enhancements.pop(cfg.RULES_KEY)
    (folder / "enhancements.yaml").write_text(yaml.safe_dump(
        {**enhancements, **PLANTED, cfg.RULES_KEY: {**rules, "smoke": SMOKE_RULES}}, sort_keys=False))
    for exp_id, document in EXPERIMENTS.items():
        (folder / f"{exp_id}.yaml").write_text(yaml.safe_dump(document, sort_keys=False))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CIFAR_MLOPS_EXPERIMENTS", str(folder))
        patch.setenv("CIFAR_MLOPS_GENERATED", str(root / "generated"))
        yield folder


@pytest.fixture(scope="module")
def store_dir(catalogue, tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("select-store")
    with pytest.MonkeyPatch.context() as patch:
        use_store(folder, patch)
        yield folder
        while mlflow.active_run():
            mlflow.end_run()


def ablation_runs() -> list:
    """Every (variant, seed) run of every ablation in the store."""
    client = MlflowClient()
    experiment = client.get_experiment_by_name(runs.ABLATION_EXPERIMENT)
    return [] if experiment is None else client.search_runs(
        [experiment.experiment_id], filter_string="tags.config_sha256 IS NOT NULL", max_results=5000)


def finished_digests() -> list[str]:
    return [r.data.tags["config_sha256"] for r in ablation_runs() if r.info.status == "FINISHED"]


@pytest.fixture(scope="module")
def killed(catalogue, store_dir) -> int:
    """`cifar-mlops select` in a process of its own, killed (SIGKILL) once 4 runs of its first step finished;
    returns how many runs had FINISHED when it died."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(MLFLOW_TRACKING_URI=f"sqlite:///{store_dir / 'mlflow.db'}", PATH=f"{BIN}{os.pathsep}{env['PATH']}")
    with open(store_dir / "killed.log", "w") as output:
        process = subprocess.Popen([str(BIN / "cifar-mlops"), *ARGS], cwd=store_dir, env=env, stdout=output,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while len(finished_digests()) < 4:
            assert process.poll() is None, (store_dir / "killed.log").read_text()[-3000:]
            assert time.monotonic() < deadline, (store_dir / "killed.log").read_text()[-3000:]
            time.sleep(0.5)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    return len(finished_digests())


@pytest.fixture(scope="module")
def selection(killed, store_dir):
    """The killed selection rerun as a user reruns it: (its CLI result, the digests FINISHED before it)."""
    before = finished_digests()
    result = CliRunner().invoke(cli.main, ARGS)
    return result, before


def selection_run():
    client = MlflowClient()
    experiment = client.get_experiment_by_name(runs.ABLATION_EXPERIMENT).experiment_id
    [found] = client.search_runs([experiment], filter_string="tags.kind = 'selection' and "
                                                             "tags.selection = 'sel-start select'")
    return found


def step_runs(selection_run_id: str) -> list:
    client = MlflowClient()
    experiment = client.get_experiment_by_name(runs.ABLATION_EXPERIMENT).experiment_id
    steps = client.search_runs([experiment], filter_string=f"tags.mlflow.parentRunId = '{selection_run_id}' and "
                                                           "tags.kind = 'ablation'")
    return sorted(steps, key=lambda r: int(r.data.tags["selection_step"]))


def logged_effects(run_id: str) -> pd.DataFrame:
    text = mlflow.artifacts.load_text(f"runs:/{run_id}/ablation_effects.csv")
    table = pd.read_csv(io.StringIO(text))
    return table[table["role"] == "verdict"].set_index("effect")


def test_the_helpful_plant_is_kept_and_the_harmful_one_never(selection) -> None:
    result, _ = selection
    assert result.exit_code == 0, result.output
    parent = selection_run()
    assert parent.info.status == "FINISHED" and parent.data.tags["kept"] == "planted_working_lr"
    first, second = step_runs(parent.info.run_id)
    step1, step2 = logged_effects(first.info.run_id), logged_effects(second.info.run_id)
    assert step1.loc["planted_working_lr", "verdict"] == "helps"
    assert step1.loc["planted_working_lr", "vs_min_effect"] == "clears"
    assert step2.loc["planted_too_low_lr", "verdict"] == "hurts"  # with a working learning rate it ruins training
    assert (step1["verdict"].drop("planted_working_lr") != "helps").all() and (step2["verdict"] != "helps").all()
    assert list(step2.index) == ["planted_too_low_lr"]  # the kept one is the next step's base
    variants = {r.data.tags["variant"] for r in ablation_runs()}
    assert variants >= {"sel-start", "sel-start +planted_working_lr",
                        "sel-start +planted_working_lr +planted_too_low_lr"}
    assert not any("planted_flip" in v for v in variants)  # the rules' forbidden candidate is never trained
    lines = result.stdout.strip().splitlines()
    assert lines[-1].startswith("What this shows:") and "greedy" in lines[-1] and "together" in lines[-1]
    assert "Stopped: no candidate helps by at least 1 pp." in result.stdout
    assert "Left out by study smoke's rules: planted_flip is augmentation: the study says 'no data augmentation'" \
        in result.stdout
    assert "| candidate" in result.stdout
    # the total: each distinct run the steps used counts its CPU seconds (GPU seconds on a GPU), not its wall-clock
    measured, unit = compute_measure()
    used = {run_id for step in (first, second) for run_id in pd.read_csv(io.StringIO(mlflow.artifacts.load_text(
        f"runs:/{step.info.run_id}/ablation_runs.csv")))["run_id"]}
    minutes = sum(MlflowClient().get_run(run_id).data.metrics[measured] for run_id in used) / 60
    assert float(parent.data.tags["fit_minutes"]) == pytest.approx(minutes, abs=0.006)
    assert parent.data.tags["fit_minutes_measure"] == unit and parent.data.tags["runs_used"] == str(len(used))
    assert f"Training time: {minutes:.1f} {unit}, summed over the {len(used)} distinct runs" in result.stdout


def test_every_configuration_and_seed_trains_once_across_steps_and_the_killed_run(selection, killed) -> None:
    result, before = selection
    assert result.exit_code == 0, result.output
    digests = finished_digests()
    assert len(digests) == len(set(digests))  # never trained twice, killed select and step 2's base included
    assert set(before) <= set(digests) and len(before) == killed >= 4
    # 3 variants x 3 seeds in step 1, then step 2's one new variant x 3 seeds; its base is step 1's winner
    assert len(digests) == 9 + 3
    parent = selection_run()
    assert parent.data.tags["runs_used"] == "12"
    assert int(parent.data.tags["runs_trained"]) == 12 - killed  # the rerun trained only what the kill left
    first, second = step_runs(parent.info.run_id)
    assert second.data.tags["runs_reused"] == "3" and second.data.tags["runs_trained"] == "3"
    assert int(first.data.tags["runs_reused"]) == killed
    assert f"{12 - killed} of them trained by this command" in result.stdout


def test_one_bar_over_the_whole_selection_one_line_per_run_naming_its_step(selection, killed, store_dir) -> None:
    """In a log (the rerun's stderr, the killed process's log file): the selection's one bar, not a bar per step;
    its total grows as the steps plan their runs (step 2's base, step 1's runs, counts again, as found done)."""
    result, _ = selection
    assert result.exit_code == 0, result.output
    assert "[cifar-mlops ablate]" not in result.stderr and not KERAS_EPOCH.search(result.output)
    lines = bar_lines(result.stderr, "select")
    assert len(lines) == 12 - killed  # one per run this command trained
    done, totals = [int(m[1]) for m in lines], [int(m[2]) for m in lines]
    steps = [m[5].partition(": ")[0] for m in lines]
    assert steps == ["step 1"] * (len(lines) - 3) + ["step 2"] * 3
    # step 1: its runs the killed process left, up to 9 of 9; step 2: its base's 3 runs found done, then 3 trained
    assert done == [*range(killed + 1, 10), 13, 14, 15] and totals[:-3] == [9] * (len(lines) - 3)
    assert totals[-3:] == [15] * 3
    assert all(m[4] != "?" for m in lines) and lines[-1][4] == "00:00"
    assert {m[5].partition(": ")[2].rpartition(": ")[0] for m in lines[-3:]} == {
        f"sel-start +planted_working_lr +planted_too_low_lr seed {seed}" for seed in range(3)}
    killed_log = (store_dir / "killed.log").read_text()
    before_kill = bar_lines(killed_log, "select")
    assert "[cifar-mlops ablate]" not in killed_log and killed - 1 <= len(before_kill) <= killed
    assert all(m[5].startswith("step 1: ") for m in before_kill)


def test_a_rerun_trains_nothing_and_decides_the_same(selection) -> None:
    rerun = forward.select("sel-start", overrides=cfg.parse_overrides(TINY.split()), max_seeds=3)
    assert rerun.trained == 0 and rerun.runs == 12
    assert rerun.kept == ["planted_working_lr"] and [s.ablation.trained for s in rerun.steps] == [0, 0]
    assert rerun.run_id == selection_run().info.run_id  # the same parent run, continued


def test_a_second_selection_from_the_same_start_never_overwrites_the_first(selection) -> None:
    # Another selection from sel-start (only one candidate: a selection of its own, every run reused) keeps the
    # same first enhancement: its iteration is written beside the first selection's, which stays as it was.
    first = cfg.generated_dir() / "sel-start-select-1.yaml"
    before = first.read_text()
    other = forward.select("sel-start", candidates_named=["planted_working_lr"],
                           overrides=cfg.parse_overrides(TINY.split()), max_seeds=3)
    assert other.trained == 0 and other.run_id != selection_run().info.run_id and other.kept == ["planted_working_lr"]
    assert first.read_text() == before
    [written] = other.files
    assert written.stem == f"sel-start-select-1-{other.run_id[:8]}"
    assert cfg.selected_block(written.stem).run_id == other.run_id
    assert cfg.resolve(written.stem).enhancements == cfg.resolve("sel-start-select-1").enhancements
    again = forward.select("sel-start", candidates_named=["planted_working_lr"],
                           overrides=cfg.parse_overrides(TINY.split()), max_seeds=3)
    assert again.run_id == other.run_id and again.files == [written]  # its rerun writes its own file again


def test_the_parent_run_holds_the_path_its_steps_and_a_plot(selection) -> None:
    parent = selection_run()
    note = parent.data.tags["mlflow.note.content"]
    assert "| step " in note and "planted_working_lr" in note and "What this shows" in note
    artifacts = {a.path for a in MlflowClient().list_artifacts(parent.info.run_id)}
    assert {"selection.md", "selection_steps.csv", "selection_path.png"} <= artifacts
    steps = pd.read_csv(io.StringIO(mlflow.artifacts.load_text(f"runs:/{parent.info.run_id}/selection_steps.csv")))
    assert steps.loc[steps["kept"], "candidate"].tolist() == ["planted_working_lr"]
    for number, step in enumerate(step_runs(parent.info.run_id), start=1):  # each step an ablation parent, nested
        assert step.data.tags["selection_step"] == str(number) and step.info.status == "FINISHED"
        assert step.data.tags["mlflow.parentRunId"] == parent.info.run_id


def test_the_generated_iteration_says_why_and_trains_with_train(selection, store_dir) -> None:
    path = cfg.generated_dir() / "sel-start-select-1.yaml"
    assert path.is_file() and not (cfg.generated_dir() / "sel-start-select-2.yaml").exists()
    raw = yaml.safe_load(path.read_text())
    assert (raw["extends"], raw["parent"], raw["enhancements"]) == ("sel-start", "sel-start", ["planted_working_lr"])
    config = cfg.resolve("sel-start-select-1")
    assert config.train.learning_rate == 1.0e-2 and config.enhancements == ("planted_working_lr",)
    selected = cfg.selected_block("sel-start-select-1")
    parent = selection_run()
    assert selected.run_id == parent.info.run_id and selected.overrides == cfg.parse_overrides(TINY.split())
    [step] = selected.steps
    first = step_runs(parent.info.run_id)[0]
    row = logged_effects(first.info.run_id).loc["planted_working_lr"]
    assert step.ablation_run_id == first.info.run_id and step.seeds == row["n_seeds"]
    assert step.effect_pp == pytest.approx(100 * row["mean_diff"], abs=1e-3)
    assert step.interval_pp == pytest.approx((100 * row["ci_low"], 100 * row["ci_high"]), abs=1e-3)

    result = CliRunner().invoke(cli.main, ["train", "--exp", "sel-start-select-1", "--overrides", TINY,
                                           "--no-register"])
    assert result.exit_code == 0, result.output
    client = MlflowClient()
    experiment = client.get_experiment_by_name(runs.ABLATION_EXPERIMENT).experiment_id
    [trained] = client.search_runs([experiment], filter_string="tags.exp_id = 'sel-start-select-1'")
    assert trained.info.status == "FINISHED" and trained.data.metrics["test_accuracy"] > 0.3


def test_a_budget_stops_the_selection_and_register_registers_the_final_iteration(selection) -> None:
    """The candidates in another order: another selection and another step ablation, the same runs (reused);
    the budget is spent after the first step, and --register trains the iteration it kept once and registers it."""
    order = "planted_too_low_lr,planted_working_lr"
    result = CliRunner().invoke(cli.main, [*ARGS, "--candidates", order, "--budget", "0.001", "--register"])
    assert result.exit_code == 0, result.output
    assert "left undecided: planted_too_low_lr" in result.stdout
    assert "0 of them trained by this command" in result.stdout  # every run found in the store by its digest
    [version] = MlflowClient().search_model_versions()
    client = MlflowClient()
    trained = client.get_run(version.run_id)
    [parent] = client.search_runs([trained.info.experiment_id], filter_string=(
        f"tags.selection = 'sel-start select {order}' and tags.kind = 'selection'"))
    # its iteration is written beside the first selection's sel-start-select-1, never over it
    final = f"sel-start-select-1-{parent.info.run_id[:8]}"
    assert version.tags["exp_id"] == final and trained.data.tags["selection_model"] == final
    assert trained.data.tags["mlflow.parentRunId"] == parent.info.run_id


def test_two_worker_processes_share_a_selection_and_it_decides_as_one_process(catalogue, store) -> None:
    """`select --workers 2`: each step's ablation queue (in the journal file beside the store) is drained by two
    worker processes. The cheapest selection: one candidate that changes nothing, 2 seeds, one epoch."""
    args = ["select", "--exp", "sel-start", "--candidates", "planted_noop", "--max-seeds", "2", "--workers", "2",
            "--overrides", TINY_RUNS]
    result = CliRunner().invoke(cli.main, args)
    assert result.exit_code == 0, result.output
    trained = ablation_runs()
    seen = sorted((r.data.tags["variant"], int(r.data.tags["seed"])) for r in trained)
    assert seen == [(v, s) for v in ("sel-start", "sel-start +planted_noop") for s in (0, 1)]  # each exactly once
    assert {r.info.status for r in trained} == {"FINISHED"} and len(set(finished_digests())) == 4
    step = optuna.load_study(study_name="ablation sel-start add-one from sel-start planted_noop",
                             storage=queue.open_storage(None))
    complete = [t for t in step.trials if t.state == optuna.trial.TrialState.COMPLETE and "task" in t.user_attrs]
    assert sorted(t.user_attrs["task"] for t in complete) == sorted(f"{v}|{s}" for v, s in seen)
    assert os.getpid() not in {t.user_attrs["worker_pid"] for t in complete}  # the worker processes ran them
    # a change that changes nothing never helps: nothing kept, the start stays the best iteration
    assert "Stopped: no candidate helps by at least 1 pp." in result.stdout and "Path: nothing kept" in result.stdout
    lines = bar_lines(result.stderr, "select")  # the one bar counts what the queue reports done
    assert lines and (lines[-1][1], lines[-1][2]) == ("4", "4") and all(m[5].startswith("step 1: ") for m in lines)
    again = forward.select("sel-start", candidates_named=["planted_noop"], max_seeds=2,
                           overrides=cfg.parse_overrides(TINY_RUNS.split()))
    assert again.trained == 0 and again.kept == [] and again.stopped == "no candidate helps by at least 1 pp"
    assert [s.table["candidate"].tolist() for s in again.steps] == [["planted_noop"]]
    assert "helps" not in again.steps[0].table["verdict"].tolist()


def test_the_rules_are_data_that_quote_the_study() -> None:
    rules = cfg.load_study_rules()["B"]
    assert " ".join(rules.text.split()) == STUDY_B_TEXT
    design = (REPO.parent / "shared" / "DESIGN.md")
    if design.is_file():  # the project's design notes quote the study the same way
        assert STUDY_B_TEXT in " ".join(design.read_text().split())
    for phrase, kind in [("no data augmentation", "augmentation"), ("no known architecture", "known_architecture"),
                         ("from scratch", "pretrained_weights"), ("not stratified", "split")]:
        assert phrase in rules.text and phrase in rules.forbids[kind], kind
    # every enhancement's kind agrees with what it sets, so a forbidden change cannot hide under another kind
    implied = {"augment.": "augmentation", "model.test_time_flip": "test_time_augmentation",
               "model.weights": "pretrained_weights", "data.split": "split"}
    for name, entry in cfg.load_enhancements().items():
        kinds = {kind for key in entry["set"] for prefix, kind in implied.items() if key.startswith(prefix)}
        assert kinds <= {entry["kind"]}, name
        assert entry["kind"] is not None, name
    chosen, left_out = forward.candidates(cfg.resolve("b5"))
    assert chosen == ["patch_whitening", "stage_dropout"]
    assert [line.split(" ")[0] for line in left_out] == ["stratified_split", "horizontal_flip", "random_translation",
                                                         "test_time_flip"]
    assert all(cfg.load_enhancements()[name]["kind"] in rules.forbids for name in
               ("horizontal_flip", "random_translation", "test_time_flip", "random_rotation", "gaussian_blur"))


def test_rules_that_do_not_quote_the_study_or_unknown_keys_fail_naming_the_key(tmp_path, monkeypatch) -> None:
    folder = tmp_path / "experiments"
    shutil.copytree(cfg.experiments_dir(), folder, ignore=shutil.ignore_patterns(cfg.GENERATED_DIR))
    monkeypatch.setenv("CIFAR_MLOPS_EXPERIMENTS", str(folder))
    catalogue = yaml.safe_load((folder / "enhancements.yaml").read_text())
    catalogue["rules"]["B"]["forbids"]["augmentation"] = "augmentation is fine"
    (folder / "enhancements.yaml").write_text(yaml.safe_dump(catalogue))
    with pytest.raises(cfg.ConfigError, match="rules.B: forbids.augmentation: 'augmentation is fine' is not a quote"):
        cfg.load_study_rules()
    catalogue = yaml.safe_load((REPO / "experiments" / "enhancements.yaml").read_text())
    catalogue["stage_dropout"]["allowed"] = True
    (folder / "enhancements.yaml").write_text(yaml.safe_dump(catalogue))
    with pytest.raises(cfg.ConfigError, match="stage_dropout: allowed: unknown key; known keys here: label"):
        cfg.resolve("b8")


BAD_INPUT = [
    (["--exp", "3.2"], "3.2 is an ensemble experiment"),
    (["--exp", "nope"], "unknown experiment 'nope'"),
    (["--exp", "b5", "--candidates", "horizontal_flip"],
     "study B's rules forbid candidate horizontal_flip is augmentation: the study says 'no data augmentation'"),
    (["--exp", "b5", "--candidates", "patch_whitening,adamw_weight_decay"], "b5 already has adamw_weight_decay"),
    (["--exp", "b5", "--candidates", "nope"], "unknown enhancement 'nope' in --candidates"),
    (["--exp", "b5", "--budget", "0"], "--budget must be a positive number of minutes"),
    (["--exp", "b5", "--budget", "-2"], "--budget must be a positive number of minutes"),
    (["--exp", "b5", "--max-seeds", "1"], "--max-seeds must be at least 2"),
    (["--exp", "b5", "--min-effect", "0"], "--min-effect must be a positive number of percentage points"),
    (["--exp", "sel-start", "--candidates", "planted_flip"], "study smoke's rules forbid candidate planted_flip"),
]


def test_bad_input_is_one_line_and_trains_nothing(catalogue, store) -> None:
    written = sorted(cfg.generated_dir().glob("*")) if cfg.generated_dir().exists() else []
    for args, message in BAD_INPUT:
        result = CliRunner().invoke(cli.main, ["select", *args])
        assert result.exit_code == 2, (args, result.output)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (args, result.stderr)
        experiment = MlflowClient().get_experiment_by_name(runs.ABLATION_EXPERIMENT)
        assert experiment is None or MlflowClient().search_runs([experiment.experiment_id]) == [], args
    assert (sorted(cfg.generated_dir().glob("*")) if cfg.generated_dir().exists() else []) == written


def test_a_step_is_an_add_one_ablation_from_the_current_best(catalogue) -> None:
    plan = ablate.build_design("b5", "add-one", enhancements=["stage_dropout"],
                               base=[*cfg.resolve("b5").enhancements, "patch_whitening"])
    assert [v.id for v in plan.variants] == ["b5 +patch_whitening", "b5 +patch_whitening +stage_dropout"]
    assert plan.name == "b5 add-one from b5 +patch_whitening stage_dropout"
    assert plan.variants[1].config({}, 0).model.stage_dropout == 0.1 and plan.variants[0].config({}, 0).model.whiten
    # the variant of b5 with patch whitening is the same configuration in every design that builds it
    b6_add_one = ablate.build_design("b6", "add-one", enhancements=["patch_whitening"])
    same = [ablate.config_digest(v.config({}, 0)) for v in (plan.variants[0], b6_add_one.variants[1])]
    assert same[0] == same[1]


def test_the_mlproject_entry_point_mirrors_the_command() -> None:
    entry = yaml.safe_load((REPO / "MLproject").read_text())["entry_points"]["select"]
    assert entry["command"].startswith("cifar-mlops select --exp {exp} ")

