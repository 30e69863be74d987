"""Ablations: variants from the catalogue, paired seeds, nested runs, resumption, and effects that are
scipy's and statsmodels' own numbers recomputed from what the runs logged."""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import mlflow
import numpy as np
import optuna
import pandas as pd
import pytest
import yaml
from click.testing import CliRunner
from mlflow import MlflowClient
from scipy import stats
from statsmodels.stats.contingency_tables import mcnemar

from cifar_mlops import ablate, cli
from cifar_mlops import config as cfg
from cifar_mlops.tracking import runs
from tests.conftest import use_store
from tests.helpers import compute_measure

# One worker runs this module: its module fixtures are made once, not once per worker.
pytestmark = pytest.mark.xdist_group("ablate")

# Two planted enhancements on a smoke-sized experiment: one that ruins training (a learning rate 1000x
# too low: the model stays near chance), one that changes nothing (SGD's momentum, which Adam ignores).
PLANTED = {
    "planted_too_low_lr": {"label": "Planted: learning rate 1000x too low", "studies": ["smoke"],
                           "description": "Harmful on purpose.", "set": {"train.learning_rate": 3.0e-6}},
    "planted_noop": {"label": "Planted: changes nothing", "studies": ["smoke"],
                     "description": "A no-op on purpose.", "set": {"train.momentum": 0.9}},
    "planted_bad_split": {"label": "Planted: a split that does not fit", "studies": ["smoke"],
                          "description": "Fails when the data loads.", "set": {"data.test_size": 100000}},
}
PLANTED_EXPERIMENT = {"description": "smoke with two planted enhancements", "study": "smoke", "extends": "smoke",
                      "parent": "smoke", "enhancements": ["planted_noop", "planted_too_low_lr"]}
TINY = ("data.synthetic_train_pool=800 data.val_size=200 data.synthetic_test_pool=100 "
        "train.epochs=4 train.batch_size=32")  # 256 images and 3 epochs leave the too-low rate's harm inconclusive
# where no verdict is read, only that every run trains (or fails) as it should
TINY_RUNS = ("data.synthetic_train_pool=168 data.val_size=40 data.synthetic_test_pool=40 "
             "train.epochs=1 train.batch_size=32")
SEEDS = [0, 1, 2]


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory: pytest.TempPathFactory):
    """The project's catalogue plus the planted enhancements and an experiment `planted` using both."""
    folder = tmp_path_factory.mktemp("catalogue") / "experiments"
    shutil.copytree(cfg.experiments_dir(), folder)
    enhancements = yaml.safe_load((folder / "enhancements.yaml").read_text())
    (folder / "enhancements.yaml").write_text(yaml.safe_dump({**enhancements, **PLANTED}, sort_keys=False))
    (folder / "planted.yaml").write_text(yaml.safe_dump(PLANTED_EXPERIMENT, sort_keys=False))
    broken = {**PLANTED_EXPERIMENT, "enhancements": ["planted_noop", "planted_bad_split"]}
    (folder / "broken.yaml").write_text(yaml.safe_dump(broken, sort_keys=False))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CIFAR_MLOPS_EXPERIMENTS", str(folder))
        yield folder


@pytest.fixture(scope="module")
def ablation(catalogue, tmp_path_factory: pytest.TempPathFactory):
    """`cifar-mlops ablate --exp planted --seeds 3` as a user runs it; (CLI result, store URI)."""
    with pytest.MonkeyPatch.context() as patch:
        uri = use_store(tmp_path_factory.mktemp("ablation-store"), patch)
        result = CliRunner().invoke(cli.main, ["ablate", "--exp", "planted", "--seeds", "3", "--overrides", TINY])
        yield result, uri
        while mlflow.active_run():
            mlflow.end_run()


def children(parent_run_id: str) -> list:
    client = MlflowClient()
    experiment = client.get_experiment_by_name(runs.ABLATION_EXPERIMENT).experiment_id
    return client.search_runs([experiment], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'")


def parent_run():
    client = MlflowClient()
    experiment = client.get_experiment_by_name(runs.ABLATION_EXPERIMENT).experiment_id
    [parent] = client.search_runs([experiment], filter_string="tags.kind = 'ablation'")
    return parent


def logged_effects(parent) -> pd.DataFrame:
    text = mlflow.artifacts.load_text(f"runs:/{parent.info.run_id}/ablation_effects.csv")
    return pd.read_csv(io.StringIO(text)).set_index(["effect", "metric"])


def test_every_variant_and_seed_runs_once_nested_and_tagged(ablation) -> None:
    result, _ = ablation
    assert result.exit_code == 0, result.output
    parent = parent_run()
    assert parent.info.status == "FINISHED" and parent.data.tags["ablation"] == "planted leave-one-out"
    nested = children(parent.info.run_id)
    seen = sorted((r.data.tags["variant"], int(r.data.tags["seed"])) for r in nested)
    variants = ["planted", "planted -planted_noop", "planted -planted_too_low_lr"]
    assert seen == sorted((v, s) for v in variants for s in SEEDS)  # each exactly once
    for run in nested:
        assert run.info.status == "FINISHED" and run.data.tags["ablation"] == "planted leave-one-out"
        assert run.data.params["train.seed"] == run.data.tags["seed"]  # seed k is train.seed k in every variant
        assert run.data.params["data.seed"] == run.data.tags["seed"]  # and draws the split (no --fixed-split)
        removed = run.data.tags.get("removed")
        assert removed == (run.data.tags["variant"].split(" -")[1] if " -" in run.data.tags["variant"] else None)
    assert MlflowClient().search_model_versions() == []  # not registered without --register
    artifacts = {a.path for a in MlflowClient().list_artifacts(parent.info.run_id)}
    assert {"ablation.md", "ablation_effects.csv", "ablation_variants.csv", "forest_plot.png"} <= artifacts
    assert "planted_too_low_lr" in result.stdout and "hurts" in result.stdout
    assert "Each seed changes the weights' initialisation" in result.stdout and "(data.seed = seed)" in result.stdout
    assert "test-set sampling only, ignores training variance" in result.stdout


def test_the_ui_groups_the_runs_by_variant_into_each_variants_mean_over_seeds(ablation) -> None:
    """MLflow's UI "Group by" (3.17: tags and params, not `mlflow.*` tags; Average by default) on the tags
    `ablation` and `variant` of the nested runs gives each variant's mean over its seeds, as the parent logged it."""
    parent = parent_run()
    finished = [r for r in children(parent.info.run_id) if r.info.status == "FINISHED"]  # a rerun below kills one
    table = pd.DataFrame([{"ablation": r.data.tags["ablation"], "variant": r.data.tags["variant"],
                           "seed": int(r.data.tags["seed"]), "test_accuracy": r.data.metrics["test_accuracy"]}
                          for r in finished])
    assert set(table["ablation"]) == {parent.data.tags["ablation"]}  # one ablation's runs, told apart from others'
    grouped = table.groupby(["ablation", "variant"]).agg(seeds=("seed", "nunique"), mean=("test_accuracy", "mean"))
    logged = pd.read_csv(io.StringIO(mlflow.artifacts.load_text(f"runs:/{parent.info.run_id}/ablation_variants.csv")))
    assert len(grouped) == len(logged) == 3
    for row in logged.itertuples():
        group = grouped.loc[(parent.data.tags["ablation"], row.variant)]
        assert group["seeds"] == row.n_seeds == len(SEEDS)
        assert group["mean"] == pytest.approx(row.test_accuracy_mean)


def test_the_planted_harm_hurts_and_the_no_op_never_helps(ablation) -> None:
    effects = logged_effects(parent_run())
    assert effects.loc[("planted_too_low_lr", "test_accuracy"), "verdict"] == "hurts"
    assert effects.loc[("planted_too_low_lr", "test_accuracy"), "mean_diff"] < -0.3
    assert effects.loc[("planted_noop", "test_accuracy"), "verdict"] != "helps"
    assert effects.loc[("planted_noop", "test_f1_macro"), "verdict"] != "helps"


def test_reported_statistics_are_scipys_and_statsmodels_on_the_logged_runs(ablation) -> None:
    parent = parent_run()
    effects = logged_effects(parent)
    by_key = {(r.data.tags["variant"], int(r.data.tags["seed"])): r for r in children(parent.info.run_id)}

    def predictions(variant: str, seed: int) -> pd.DataFrame:
        run_id = by_key[(variant, seed)].info.run_id
        return pd.read_csv(io.StringIO(mlflow.artifacts.load_text(f"runs:/{run_id}/test_predictions.csv")))

    for removed in ("planted_noop", "planted_too_low_lr"):
        with_it = [by_key[("planted", s)].data.metrics["test_accuracy"] for s in SEEDS]
        without = [by_key[(f"planted -{removed}", s)].data.metrics["test_accuracy"] for s in SEEDS]
        diffs = np.subtract(with_it, without)
        row = effects.loc[(removed, "test_accuracy")]
        assert row["mean_diff"] == pytest.approx(diffs.mean())
        if diffs.std() > 0:  # the verdict's interval: Bonferroni over the 2 changes
            low, high = stats.t.interval(1 - 0.05 / 2, len(diffs) - 1, loc=diffs.mean(), scale=stats.sem(diffs))
            assert (row["ci_low"], row["ci_high"]) == pytest.approx((low, high))
            assert row["t_p"] == pytest.approx(stats.ttest_rel(with_it, without).pvalue)
        per_seed = []
        for seed in SEEDS:
            a, b = predictions("planted", seed), predictions(f"planted -{removed}", seed)
            assert (a["test_index"] == b["test_index"]).all()  # paired on the same images
            right_a, right_b = a["predicted"] == a["label"], b["predicted"] == b["label"]
            table = [[int((right_a & right_b).sum()), int((right_a & ~right_b).sum())],
                     [int((~right_a & right_b).sum()), int((~right_a & ~right_b).sum())]]
            per_seed.append(mcnemar(table, exact=True).pvalue)
        logged = [float(p) for p in str(row["mcnemar_p"]).split(";")]
        assert logged == pytest.approx(per_seed)


def test_the_parent_run_shows_each_verdict_its_minutes_and_where_its_noise_comes_from(ablation) -> None:
    """Per comparison on the parent run, where the UI shows them: the verdict, seeds, interval, the CPU-minutes
    (the children's fit_cpu_seconds, not their wall-clock fit_seconds) and the noise split, recomputed here from
    the children's predictions (synthetic images, drawn anew by each seed: each seed's McNemar-style variance of
    the paired difference); the description is the verdicts' table."""
    result, _ = ablation
    measured, unit = compute_measure()  # fit_cpu_seconds, CPU-minutes on a CPU
    parent = parent_run()
    tags, metrics = parent.data.tags, parent.data.metrics
    verdicts = logged_effects(parent).xs("test_accuracy", level="metric")
    noise = pd.read_csv(io.StringIO(mlflow.artifacts.load_text(f"runs:/{parent.info.run_id}/ablation_noise.csv")))
    finished = {(r.data.tags["variant"], int(r.data.tags["seed"])): r for r in children(parent.info.run_id)
                if r.info.status == "FINISHED"}

    def right(variant: str, seed: int) -> np.ndarray:
        run_id = finished[(variant, seed)].info.run_id
        table = pd.read_csv(io.StringIO(mlflow.artifacts.load_text(f"runs:/{run_id}/test_predictions.csv")))
        return (table.sort_values("test_index")["predicted"] == table.sort_values("test_index")["label"]).to_numpy()

    for effect in ("planted_noop", "planted_too_low_lr"):
        row, without = verdicts.loc[effect], f"planted -{effect}"
        assert tags[f"{effect}/verdict"].split(" (")[0] == row["verdict"] and metrics[f"{effect}/seeds"] == 3
        assert metrics[f"{effect}/difference_pp"] == pytest.approx(100 * row["mean_diff"])
        assert f"{100 * row['mean_diff']:+.2f} pp" in tags[f"{effect}/interval"]
        seconds = [finished[(v, s)].data.metrics[measured] for v in ("planted", without) for s in SEEDS]
        assert metrics[f"{effect}/fit_minutes"] == pytest.approx(sum(seconds) / 60)
        diffs = [right("planted", s).astype(int) - right(without, s).astype(int) for s in SEEDS]
        split = noise.set_index("effect").loc[effect]
        assert not split["same_images"]  # data.seed = seed draws new synthetic images
        assert split["var_diff"] == pytest.approx(row["sd_diff"] ** 2, abs=1e-12)
        assert split["var_diff"] == pytest.approx(np.var([d.mean() for d in diffs], ddof=1), abs=1e-12)
        assert split["var_test"] == pytest.approx(np.mean([np.var(d, ddof=1) / d.size for d in diffs]))
        assert split["var_train"] == pytest.approx(max(0.0, split["var_diff"] - split["var_test"]), abs=1e-15)
        assert tags[f"{effect}/noise"].startswith(f"{effect}: ") and split["advice"] in tags[f"{effect}/noise"]
    assert metrics["fit_minutes"] == pytest.approx(sum(r.data.metrics[measured] for r in finished.values()) / 60)
    assert tags["fit_minutes_measure"].startswith(f"{unit}, summed over the ablation's runs: ")
    description = tags["mlflow.note.content"]
    assert description.startswith("# Ablation planted leave-one-out") and "| planted_too_low_lr | hurts (" in description
    assert "Where the noise comes from" in description and "- planted_noop: " in description
    assert "Where the noise comes from" in result.stdout and f"| {unit} " in result.stdout
    assert "Minutes: CPU-minutes are the CPU time the training process spent in its fit" in result.stdout


def test_a_rerun_trains_nothing_and_a_killed_run_is_rerun_alone(ablation) -> None:
    overrides = cfg.parse_overrides(TINY.split())
    again = ablate.ablate("planted", "leave-one-out", SEEDS, overrides=overrides)
    assert (again.trained, again.reused) == (0, 9)
    parent = parent_run()
    victim = next(r for r in children(parent.info.run_id) if r.data.tags["variant"] == "planted -planted_noop")
    MlflowClient().set_terminated(victim.info.run_id, "KILLED")  # as a Ctrl-C mid-run leaves it
    resumed = ablate.ablate("planted", "leave-one-out", SEEDS, overrides=overrides)
    assert (resumed.trained, resumed.reused) == (1, 8)
    rerun = [r for r in children(parent.info.run_id)
             if (r.data.tags["variant"], r.data.tags["seed"]) == ("planted -planted_noop", victim.data.tags["seed"])]
    assert sorted(r.info.status for r in rerun) == ["FINISHED", "KILLED"]


def test_the_report_shows_each_ablation_but_never_its_runs_as_results(ablation) -> None:
    from cifar_mlops import report
    from cifar_mlops.tracking import results

    assert results.finished_result_runs(runs.ABLATION_EXPERIMENT).empty  # a variant is not its iteration
    document = report.build(runs.ABLATION_EXPERIMENT)
    [section] = [s for s in document.sections if s.title.startswith("Ablations")]
    effects = next(b for b in section.blocks if isinstance(b, report.Table) and b.title.endswith("effects"))
    verdicts = dict(zip(effects.frame["effect"] + " " + effects.frame["metric"], effects.frame["verdict"]))
    assert verdicts["planted_too_low_lr test_accuracy"] == "hurts"
    unit = compute_measure()[1]
    compared = next(b for b in section.blocks if isinstance(b, report.Table) and b.title.endswith(f"seeds and {unit}"))
    assert list(compared.frame["effect"]) == ["planted_noop", "planted_too_low_lr"] and unit in compared.frame
    assert compared.note.startswith("Minutes: CPU-minutes are the CPU time")
    assert compared.frame.set_index("effect").loc["planted_too_low_lr", "verdict"].startswith("hurts")
    assert sum(isinstance(b, str) and b.startswith("Where the noise comes from: planted_") for b in section.blocks) == 2
    assert any(isinstance(b, report.Figure) and b.png.startswith(b"\x89PNG") for b in section.blocks)
    markdown = report.render(document, "markdown")
    assert "## Ablations" in markdown and "planted leave-one-out: effects" in markdown


def test_the_split_follows_the_seed_unless_fixed(catalogue) -> None:
    variant = ablate.Variant("planted", "planted")
    overrides = cfg.parse_overrides(["data.seed=11"])  # the experiment's own split seed, as --set gives it
    assert [variant.config(overrides, seed).data.seed for seed in (0, 3)] == [0, 3]
    assert [variant.config(overrides, seed, fixed_split=True).data.seed for seed in (0, 3)] == [11, 11]
    assert [variant.config(overrides, seed, fixed_split=True).train.seed for seed in (0, 3)] == [0, 3]
    seeded = ablate.seed_sources(variant.config({}, 0), fixed_split=False)
    assert "train.seed = seed" in seeded and "data.seed = seed" in seeded and "generated images" in seeded
    fixed = ablate.seed_sources(variant.config({}, 0, fixed_split=True), fixed_split=True)
    assert "data.seed = 0, --fixed-split" in fixed and "one training subset" in fixed


def test_the_benchmark_keeps_every_runs_metrics(ablation) -> None:
    """bench_ablation.py stores each run's metrics and the whole effects table, so its tables can be recomputed."""
    import importlib.util
    import sys

    folder = Path(__file__).resolve().parents[1] / "benchmarks"
    sys.path.insert(0, str(folder))  # the benchmark imports its `common`
    try:
        found = importlib.util.spec_from_file_location("bench_ablation", folder / "bench_ablation.py")
        bench = importlib.util.module_from_spec(found)
        found.loader.exec_module(bench)
    finally:
        sys.path.remove(str(folder))
    _, uri = ablation
    logged = bench.logged_ablations(uri)["planted leave-one-out"]
    by_key = {(r.data.tags["variant"], int(r.data.tags["seed"])): r for r in children(parent_run().info.run_id)
              if r.info.status == "FINISHED"}  # a rerun's: test_a_rerun... kills one and reruns it
    assert sorted((r["variant"], r["seed"]) for r in logged["runs"]) == sorted(by_key)
    for row in logged["runs"]:
        child = by_key[(row["variant"], row["seed"])]
        assert row["run_id"] == child.info.run_id
        for metric in ("test_accuracy", "test_f1_macro", "val_accuracy", "val_f1_macro"):
            assert row[metric] == pytest.approx(child.data.metrics[metric])
    assert {(e["effect"], e["metric"]) for e in logged["effects"]} == set(logged_effects(parent_run()).index)


def test_designs_are_generated_from_the_catalogue(catalogue) -> None:
    loo = ablate.build_design("2.4", "leave-one-out")
    assert [v.id for v in loo.variants] == ["2.4", "2.4 -increased_epochs", "2.4 -increased_batch_size", "2.4 -adamw"]
    assert [(c.effect, c.with_, c.without) for c in loo.comparisons][-1] == ("adamw", "2.4", "2.4 -adamw")
    assert cfg.resolve("2.4").train.optimizer == "adamw"
    assert loo.variants[-1].config({}, 0).train.optimizer == "adam"  # the enhancement is really gone

    add = ablate.build_design("2.4", "add-one", enhancements=["adamw"])
    assert [v.id for v in add.variants] == ["2.3", "2.3 +adamw"]
    assert add.comparisons[0].with_ == "2.3 +adamw" and add.comparisons[0].without == "2.3"

    path = ablate.build_design("b5", "path")
    assert [v.id for v in path.variants] == ["b0", "b1", "b2", "b3", "b4", "b5"]
    assert path.comparisons[0].effect == "b0 -> b1"  # model refinements take part

    explicit = ablate.build_design("b5", "variants", variants=["b6", "b7"])
    assert [c.effect for c in explicit.comparisons] == ["b6 vs b5", "b7 vs b5"]
    assert explicit.name == "b5 variants b6,b7" and add.name == "2.4 add-one adamw"  # another list, another ablation


BAD_INPUT = [
    (["--exp", "planted", "--enhancements", "nope"], "unknown enhancement 'nope'"),
    (["--exp", "smoke"], "the leave-one-out design of smoke has no variants to compare"),
    (["--exp", "planted", "--seeds", "1"], "needs at least 2 seeds"),
    (["--exp", "3.2"], "3.2 is an ensemble experiment"),
    (["--exp", "planted", "--seeds", "0,x"], "--seeds takes a count (3) or a list (0,3,7)"),
    (["--exp", "smoke", "--design", "add-one", "--enhancements", "planted_noop", "--seeds", "2"],
     "smoke has no parent"),
    (["--exp", "b5", "--design", "variants"], "--design variants compares --exp with the experiments of --variants"),
    (["--exp", "planted", "--metric", "top5"], "unknown --metric 'top5'; choose one of test_accuracy"),
    (["--exp", "planted", "--min-effect", "0"], "--min-effect must be a positive number of percentage points"),
    (["--exp", "planted", "--min-effect", "-1"], "--min-effect must be a positive number of percentage points"),
    (["--exp", "planted", "--seeds", "auto", "--max-seeds", "1"], "--max-seeds must be at least 2"),
    (["--exp", "planted", "--budget", "5"], "--budget goes with --seeds auto"),
    (["--exp", "planted", "--seeds", "auto", "--budget", "-1"], "--budget must be a number of minutes >= 0"),
]


def test_bad_input_is_one_line_and_tracks_nothing(catalogue, store) -> None:
    for args, message in BAD_INPUT:
        result = CliRunner().invoke(cli.main, ["ablate", *args])
        assert result.exit_code == 2, (args, result.output)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (args, result.stderr)
        experiment = MlflowClient().get_experiment_by_name(runs.ABLATION_EXPERIMENT)
        assert experiment is None or MlflowClient().search_runs([experiment.experiment_id]) == [], args


def test_a_run_that_fails_ends_the_ablation_failed_with_one_line_saying_how_to_resume(catalogue, store) -> None:
    result = CliRunner().invoke(cli.main, ["ablate", "--exp", "broken", "--seeds", "2", "--overrides", TINY_RUNS])
    assert result.exit_code == 1, result.output
    [line] = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert "data.test_size (100000)" in line and "rerun the same command to resume it" in line, line
    client = MlflowClient()
    experiment = client.get_experiment_by_name(runs.ABLATION_EXPERIMENT).experiment_id
    statuses = {r.data.tags.get("kind", "variant"): r.info.status for r in client.search_runs([experiment])}
    assert statuses == {"ablation": "FAILED", "variant": "FAILED"}  # nothing left RUNNING


def test_statistics_that_fail_end_the_ablation_failed_with_one_line(catalogue, store) -> None:
    """The runs all FINISHED, then seed 1's test_predictions.csv were rewritten with other labels (as if scored on
    other images): a rerun reuses every run, its statistics fail, and the parent run ends FAILED, not RUNNING."""
    args = ["ablate", "--exp", "planted", "--enhancements", "planted_noop", "--seeds", "2", "--fixed-split",
            "--overrides", TINY_RUNS]
    first = CliRunner().invoke(cli.main, args)
    assert first.exit_code == 0, first.output
    client = MlflowClient()
    for child in children(parent_run().info.run_id):
        if child.data.tags["seed"] == "1":  # both variants alike: each seed still pairs, the seeds no longer match
            path = f"runs:/{child.info.run_id}/test_predictions.csv"
            table = pd.read_csv(io.StringIO(mlflow.artifacts.load_text(path)))
            table["label"] = (table["label"] + 1) % 10
            client.log_text(child.info.run_id, table.to_csv(index=False), "test_predictions.csv")
    result = CliRunner().invoke(cli.main, args)
    assert result.exit_code == 2, result.output
    [line] = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert "different test images" in line and "Traceback" not in result.stderr, result.stderr
    parent = parent_run()
    assert parent.info.status == "FAILED" and "different test images" in parent.data.tags[runs.FAILURE_TAG]
    assert {r.info.status for r in children(parent.info.run_id)} == {"FINISHED"}  # reused, untouched


def test_seeds_auto_adds_seeds_only_where_the_answer_is_open_and_a_rerun_trains_nothing(catalogue, store) -> None:
    result = CliRunner().invoke(cli.main, ["ablate", "--exp", "planted", "--seeds", "auto", "--max-seeds", "4",
                                           "--overrides", TINY])
    assert result.exit_code == 0, result.output
    parent = parent_run()
    assert parent.info.status == "FINISHED" and parent.data.tags["seeds"] == "auto (at most 4)"
    rounds = [line for line in result.stderr.splitlines() if "] round at " in line]  # what --budget is checked on
    assert rounds and all(line.endswith(f" {compute_measure()[1]}") for line in rounds), rounds
    verdicts = logged_effects(parent).xs("test_accuracy", level="metric")
    assert verdicts.loc["planted_too_low_lr", "verdict"] == "hurts"
    assert verdicts.loc["planted_noop", "verdict"] != "helps"
    assert verdicts["note"].str.contains("sequential: ").all() and verdicts["t_p"].isna().all()
    seeds = {}
    for run in children(parent.info.run_id):
        seeds.setdefault(run.data.tags["variant"], set()).add(int(run.data.tags["seed"]))
    comparisons = {"planted_noop": "planted -planted_noop", "planted_too_low_lr": "planted -planted_too_low_lr"}
    for effect, without in comparisons.items():  # a comparison used the seeds of its look, 3 or 4
        used = int(verdicts.loc[effect, "n_seeds"])
        assert used in (3, 4) and seeds[without] == set(range(used))
        assert f"at look {used - 2} of 2 ({used} seeds)" in verdicts.loc[effect, "note"]
    assert seeds["planted"] == set(range(int(verdicts["n_seeds"].max())))  # the shared variant: as far as needed
    overrides = cfg.parse_overrides(TINY.split())
    again = ablate.ablate("planted", "leave-one-out", None, overrides=overrides, max_seeds=4)
    assert again.trained == 0 and again.reused == sum(len(s) for s in seeds.values())


def test_two_worker_processes_share_one_ablation_on_postgresql(catalogue, store, postgres_url) -> None:
    result = CliRunner().invoke(cli.main, ["ablate", "--exp", "planted", "--seeds", "2", "--workers", "2",
                                           "--storage", postgres_url, "--overrides", TINY_RUNS])
    assert result.exit_code == 0, result.output
    parent = parent_run()
    nested = children(parent.info.run_id)
    seen = sorted((r.data.tags["variant"], int(r.data.tags["seed"])) for r in nested)
    variants = ["planted", "planted -planted_noop", "planted -planted_too_low_lr"]
    assert seen == sorted((v, s) for v in variants for s in (0, 1))  # every (variant, seed) exactly once
    assert {r.info.status for r in nested} == {"FINISHED"}
    assert parent.info.status == "FINISHED" and parent.data.tags["runs_trained"] == "6"
    queue = optuna.load_study(study_name="ablation planted leave-one-out", storage=postgres_url)
    complete = [t for t in queue.trials if t.state == optuna.trial.TrialState.COMPLETE and "task" in t.user_attrs]
    assert sorted(t.user_attrs["task"] for t in complete) == sorted(f"{v}|{s}" for v in variants for s in (0, 1))
    assert os.getpid() not in {t.user_attrs["worker_pid"] for t in complete}  # the worker processes ran them
