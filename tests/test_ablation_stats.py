"""`ablation_stats` on a constructed ablation (no training): every number recomputed here with scipy/statsmodels."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from matplotlib import pyplot as plt
from matplotlib.figure import Figure
from scipy import stats
from statsmodels.stats.contingency_tables import StratifiedTable
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.power import TTestPower

from cifar_mlops import ablation_stats as ab
from cifar_mlops.errors import UserError

# One worker runs this module: its module fixtures are made once, not once per worker.
pytestmark = pytest.mark.xdist_group("ablation_stats")

N_IMAGES = 600
SEEDS = [0, 3, 7]  # not 0..n-1 on purpose: seeds are labels, paired by value
COMPARISONS = [
    ab.Comparison("adamw", with_="full", without="no_adamw"),  # helps by about 3 pp, with spread
    ab.Comparison("mixup", with_="full", without="no_mixup"),  # changes which images are right, little else
    ab.Comparison("noop", with_="full_copy", without="full"),  # an identical variant
    ab.Comparison("lr_x1000", with_="high_lr", without="full"),  # right on half as many images: clearly harmful
    ab.Comparison("swap", with_="swapped", without="full"),  # other images right, the same number of them
]


def _flip(right: np.ndarray, off: int, on: int, rng: np.random.Generator) -> np.ndarray:
    """`right` with `off` of its right images made wrong and `on` of its wrong ones made right."""
    changed = right.copy()
    changed[rng.choice(np.flatnonzero(right), off, replace=False)] = False
    changed[rng.choice(np.flatnonzero(~right), on, replace=False)] = True
    return changed


@pytest.fixture(scope="module")
def ablation():
    """(runs, predictions, y_test): five variants x three seeds, accuracy computed from the predictions."""
    rng = np.random.default_rng(14)
    y_test = rng.integers(0, 10, N_IMAGES)
    rights: dict[tuple[str, int], np.ndarray] = {}
    for seed in SEEDS:
        full = rng.random(N_IMAGES) < 0.8
        rights[("no_adamw", seed)] = _flip(full, off=int(rng.integers(22, 34)), on=int(rng.integers(2, 8)), rng=rng)
        rights[("full", seed)] = full
        rights[("no_mixup", seed)] = _flip(full, off=int(rng.integers(10, 20)), on=int(rng.integers(10, 20)), rng=rng)
        rights[("full_copy", seed)] = full.copy()
        half = np.zeros(N_IMAGES, dtype=bool)
        half[rng.choice(np.flatnonzero(full), full.sum() // 2, replace=False)] = True
        rights[("high_lr", seed)] = half
        rights[("swapped", seed)] = _flip(full, off=40, on=40, rng=rng)
    # a wrong prediction is the next class: any label but the true one
    predictions = {key: np.where(right, y_test, (y_test + 1) % 10) for key, right in rights.items()}
    rows = []
    for (variant, seed), right in rights.items():
        accuracy = float(right.mean())
        same_as = "full" if variant == "full_copy" else variant  # the copy's metrics are the original's
        noise = np.random.default_rng([seed, *same_as.encode()]).normal(0, 0.002, 3)
        rows.append({"variant": variant, "seed": seed, "test_accuracy": accuracy,
                     "test_f1_macro": accuracy - 0.02 + noise[0],
                     "val_accuracy": accuracy + 0.01 + noise[1], "val_f1_macro": accuracy - 0.01 + noise[2]})
    return pd.DataFrame(rows), predictions, y_test


@pytest.fixture(scope="module")
def table(ablation):
    runs, predictions, y_test = ablation
    return ab.effects(runs, COMPARISONS, predictions, y_test)


def _row(table: pd.DataFrame, effect: str, metric: str = "test_accuracy") -> pd.Series:
    matched = table[(table["effect"] == effect) & (table["metric"] == metric)]
    assert len(matched) == 1
    return matched.iloc[0]


def _paired(runs: pd.DataFrame, comparison: ab.Comparison, metric: str) -> tuple[np.ndarray, np.ndarray]:
    by_seed = runs.pivot(index="seed", columns="variant", values=metric).loc[SEEDS]
    return by_seed[comparison.with_].to_numpy(), by_seed[comparison.without].to_numpy()


def test_shape_and_order(table):
    assert list(table.columns) == ab.EFFECT_COLUMNS
    assert list(zip(table["effect"], table["metric"])) == [
        (c.effect, m) for c in COMPARISONS for m in ("test_accuracy", "test_f1_macro")]
    assert (table["n_seeds"] == len(SEEDS)).all()
    f1 = table[table["metric"] == "test_f1_macro"]
    assert f1["mcnemar_p"].isna().all() and f1["cmh_p"].isna().all() and f1["mde_images"].isna().all()


@pytest.mark.parametrize("metric", ["test_accuracy", "test_f1_macro"])
def test_t_interval_t_test_and_holm_match_scipy_statsmodels(ablation, table, metric):
    runs, _, _ = ablation
    expected_p = []
    for comparison in COMPARISONS:
        with_values, without_values = _paired(runs, comparison, metric)
        row = _row(table, comparison.effect, metric)
        diffs = with_values - without_values
        assert row["mean_diff"] == pytest.approx(np.mean(diffs), abs=1e-12)
        if np.all(diffs == 0):  # the identical variant: the t-test is undefined, the module says p = 1
            expected_p.append(1.0)
            assert (row["ci_low"], row["ci_high"]) == (0.0, 0.0)
            continue
        result = stats.ttest_rel(with_values, without_values)
        interval = result.confidence_interval(confidence_level=0.95)
        expected_p.append(result.pvalue)
        assert row["t_p"] == pytest.approx(result.pvalue, rel=1e-9)
        assert (row["ci_low"], row["ci_high"]) == pytest.approx((interval.low, interval.high), rel=1e-9)
        sd = np.std(diffs, ddof=1)  # the mde is the size this t-test finds with power 0.8
        assert TTestPower().power(effect_size=row["mde_seeds"] / sd, nobs=len(SEEDS), alpha=0.05) == (
            pytest.approx(0.8, abs=1e-4))
    holm = multipletests(expected_p, alpha=0.05, method="holm")[1]
    assert table.loc[table["metric"] == metric, "holm_p"].to_numpy() == pytest.approx(holm, rel=1e-9)


def test_mcnemar_per_seed_matches_exact_binomial(ablation, table):
    _, predictions, y_test = ablation
    for comparison in COMPARISONS:
        reported = [float(p) for p in _row(table, comparison.effect)["mcnemar_p"].split(";")]
        expected = []
        for seed in SEEDS:
            with_right = predictions[(comparison.with_, seed)] == y_test
            without_right = predictions[(comparison.without, seed)] == y_test
            only_with, only_without = int(np.sum(with_right & ~without_right)), int(np.sum(~with_right & without_right))
            n = only_with + only_without
            expected.append(1.0 if n == 0 else stats.binomtest(only_with, n, 0.5).pvalue)
        assert reported == pytest.approx(expected, rel=5e-3)  # reported to 3 significant digits


def _variant_outcome_tables(predictions, y_test, comparison) -> list[np.ndarray]:
    tables = []
    for seed in SEEDS:
        with_right = predictions[(comparison.with_, seed)] == y_test
        without_right = predictions[(comparison.without, seed)] == y_test
        tables.append(np.array([[with_right.sum(), (~with_right).sum()], [without_right.sum(), (~without_right).sum()]]))
    return tables


def test_cmh_and_mde_images_match_statsmodels_and_the_formula(ablation, table):
    _, predictions, y_test = ablation
    z_alpha, z_power = stats.norm.ppf(0.975), stats.norm.ppf(0.8)
    for comparison in COMPARISONS:
        row = _row(table, comparison.effect)
        tables = _variant_outcome_tables(predictions, y_test, comparison)
        # a ~ hypergeometric: of the 2N scored images, the right ones, N of them drawn for the with row
        nulls = [stats.hypergeom(M=t.sum(), n=t[:, 0].sum(), N=t[0].sum()) for t in tables]
        deviation = sum(t[0, 0] - null.mean() for t, null in zip(tables, nulls))
        variance = sum(null.var() for null in nulls)
        if abs(deviation) <= 0.5:  # the continuity correction takes the whole deviation: no evidence
            assert row["cmh_p"] == 1.0
        else:
            by_hand = stats.chi2.sf((abs(deviation) - 0.5) ** 2 / variance, df=1)
            assert row["cmh_p"] == pytest.approx(by_hand, rel=1e-6)
            statistic = StratifiedTable(tables).test_null_odds(correction=True).statistic
            assert row["cmh_p"] == pytest.approx(stats.chi2.sf(statistic, df=1), rel=1e-9)
        discordant = sum(int(np.sum((predictions[(comparison.with_, s)] == y_test)
                                    != (predictions[(comparison.without, s)] == y_test))) for s in SEEDS)
        expected_mde = (2 * z_alpha * np.sqrt(variance) + 1 + z_power * np.sqrt(discordant)) / (N_IMAGES * len(SEEDS))
        assert row["mde_images"] == pytest.approx(expected_mde, rel=1e-9)


def test_same_accuracy_on_other_images_is_no_effect_for_cmh_unlike_cmh_on_mcnemar_tables(ablation, table):
    """Why the CMH runs on variant x outcome tables: on the McNemar tables it tests that the two variants'
    right answers are unrelated, which is false for any two models and not the question."""
    _, predictions, y_test = ablation
    row = _row(table, "swap")
    assert row["mean_diff"] == 0 and row["cmh_p"] == 1.0
    mcnemar_tables = []
    for seed in SEEDS:
        with_right, without_right = predictions[("swapped", seed)] == y_test, predictions[("full", seed)] == y_test
        mcnemar_tables.append(np.array([[np.sum(with_right & without_right), np.sum(with_right & ~without_right)],
                                        [np.sum(~with_right & without_right), np.sum(~with_right & ~without_right)]]))
    assert StratifiedTable(mcnemar_tables).test_null_odds(correction=True).pvalue < 1e-6


def test_a_clearly_harmful_change_hurts(table):
    for metric in ("test_accuracy", "test_f1_macro"):
        row = _row(table, "lr_x1000", metric)
        assert row["verdict"] == "hurts" and row["mean_diff"] < -0.3 and row["ci_high"] < 0
    row = _row(table, "lr_x1000")
    assert 0 < row["cmh_p"] < 1e-12 and all(float(p) < 1e-12 for p in row["mcnemar_p"].split(";"))


def test_the_helpful_change_helps(table):
    row = _row(table, "adamw")
    assert row["verdict"] == "helps" and row["mean_diff"] > 0.02 and row["ci_low"] > 0


def test_an_identical_variant_has_no_detectable_effect_with_p_1(table):
    for metric in ("test_accuracy", "test_f1_macro"):
        row = _row(table, "noop", metric)
        assert row["verdict"] == "no detectable effect"
        assert row["mean_diff"] == 0 and row["t_p"] == 1.0 and row["holm_p"] == 1.0
        assert np.isnan(row["mde_seeds"])  # no spread to scale a detectable size by
    row = _row(table, "noop")
    assert row["cmh_p"] == 1.0 and row["mcnemar_p"] == "1;1;1"


def test_variant_summary_matches_numpy(ablation):
    runs, _, _ = ablation
    lonely = {"variant": "lonely", "seed": 0, "test_accuracy": 0.5, "test_f1_macro": 0.4, "val_accuracy": 0.6,
              "val_f1_macro": 0.45}
    runs = pd.concat([runs.iloc[::-1], pd.DataFrame([lonely])], ignore_index=True)  # swapped first, lonely last
    summary = ab.variant_summary(runs)
    assert list(summary["variant"]) == list(dict.fromkeys(runs["variant"]))
    assert list(summary.columns) == ["variant", "n_seeds"] + [f"{m}_{s}" for m in ab.SUMMARY_METRICS
                                                               for s in ("mean", "std")]
    for _, row in summary.iterrows():
        of_variant = runs[runs["variant"] == row["variant"]]
        assert row["n_seeds"] == len(of_variant)
        for metric in ab.SUMMARY_METRICS:
            values = of_variant[metric].to_numpy()
            assert row[f"{metric}_mean"] == pytest.approx(np.mean(values), rel=1e-12)
            if len(values) == 1:
                assert np.isnan(row[f"{metric}_std"])
            else:
                assert row[f"{metric}_std"] == pytest.approx(np.std(values, ddof=1), rel=1e-12)


def test_check_seeds_needs_two_distinct_seeds():
    for seeds in ([0], [3, 3]):
        with pytest.raises(ab.AblationStatsError, match=r"needs at least 2 seeds \(got 1\); pass --seeds 2 or more"):
            ab.check_seeds(seeds)
    assert issubclass(ab.AblationStatsError, UserError)
    ab.check_seeds([0, 1])


def test_effects_refuse_one_common_seed_and_missing_predictions(ablation):
    runs, predictions, y_test = ablation
    one_seed = runs[(runs["variant"] != "no_adamw") | (runs["seed"] == 0)]
    with pytest.raises(ab.AblationStatsError, match="adamw .*at least 2 seeds"):
        ab.effects(one_seed, COMPARISONS[:1], predictions, y_test)
    without_one = {k: v for k, v in predictions.items() if k != ("full", 3)}
    with pytest.raises(ab.AblationStatsError, match="no test predictions for variant full seed 3"):
        ab.effects(runs, COMPARISONS[:1], without_one, y_test)


def test_effects_markdown(table):
    text = ab.effects_markdown(table)
    lines = text.splitlines()
    assert len(lines) == 2 + len(table)
    assert all(name in lines[0] for name in ("effect", "metric", "t_p", "holm_p", "cmh_p", "mde_seeds", "verdict"))
    harmful = next(line for line in lines if "lr_x1000" in line and "test_accuracy" in line)
    row = _row(table, "lr_x1000")
    assert f"{100 * row['mean_diff']:+.2f} ± {100 * (row['ci_high'] - row['ci_low']) / 2:.2f}" in harmful
    assert "hurts" in harmful


def test_forest_plot_has_one_marker_per_effect(table):
    figure = ab.forest_plot(table)
    try:
        assert isinstance(figure, Figure)
        (axes,) = figure.axes
        markers = [line for line in axes.get_lines() if line.get_marker() == "o"]
        assert len(markers) == 1
        rows = table[table["metric"] == "test_accuracy"]
        assert sorted(markers[0].get_xdata()) == pytest.approx(sorted(100 * rows["mean_diff"]))
        labels = [t.get_text() for t in axes.get_yticklabels()]
        assert sorted(labels) == sorted(f"{e} ({v})" for e, v in zip(rows["effect"], rows["verdict"]))
        assert any(line.get_xdata()[0] == 0 for line in axes.get_lines() if line.get_linestyle() == "--")
    finally:
        plt.close(figure)
