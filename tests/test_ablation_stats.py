"""`ablation_stats` on a constructed ablation (no training): every number recomputed here with scipy/statsmodels."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from matplotlib import pyplot as plt
from matplotlib.figure import Figure
from scipy import stats
from statsmodels.stats.contingency_tables import StratifiedTable
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
def test_t_interval_t_test_and_bonferroni_match_scipy(ablation, table, metric):
    """The verdict rows (test accuracy): scipy's paired t-test and its interval at 1 - 0.05 / 5; F1 is
    descriptive: the plain 95 % interval, no adjusted p."""
    runs, _, _ = ablation
    primary = metric == "test_accuracy"
    level = 1 - 0.05 / len(COMPARISONS) if primary else 0.95
    for comparison in COMPARISONS:
        with_values, without_values = _paired(runs, comparison, metric)
        row = _row(table, comparison.effect, metric)
        diffs = with_values - without_values
        assert row["mean_diff"] == pytest.approx(np.mean(diffs), abs=1e-12)
        assert row["level"] == pytest.approx(level) and row["role"] == ("verdict" if primary else "descriptive")
        if np.all(diffs == 0):  # the identical variant: the t-test is undefined, the sign test says p = 1
            assert row["t_p"] == 1.0 and (row["ci_low"], row["ci_high"]) == (-np.inf, np.inf)
            continue
        result = stats.ttest_rel(with_values, without_values)
        interval = result.confidence_interval(confidence_level=level)
        assert row["t_p"] == pytest.approx(result.pvalue, rel=1e-9)
        assert (row["ci_low"], row["ci_high"]) == pytest.approx((interval.low, interval.high), rel=1e-9)
        if primary:
            assert row["adj_p"] == pytest.approx(min(1, len(COMPARISONS) * result.pvalue), rel=1e-9)
        else:
            assert np.isnan(row["adj_p"]) and row["verdict"] == ""


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
    row = _row(table, "lr_x1000")
    assert row["verdict"] == "hurts" and row["mean_diff"] < -0.3 and row["ci_high"] < 0
    row = _row(table, "lr_x1000", "test_f1_macro")
    assert row["verdict"] == "" and row["mean_diff"] < -0.3 and row["ci_high"] < 0  # descriptive: shown, no verdict
    row = _row(table, "lr_x1000")
    assert 0 < row["cmh_p"] < 1e-12 and all(float(p) < 1e-12 for p in row["mcnemar_p"].split(";"))


def test_the_helpful_change_helps(table):
    row = _row(table, "adamw")
    assert row["verdict"] == "helps" and row["mean_diff"] > 0.02 and row["ci_low"] > 0


def test_an_identical_variant_with_3_seeds_is_inconclusive_with_p_1(table):
    """All 3 differences 0: the sign test's interval needs 2 / 2**n <= 0.01 to be bounded, 3 seeds cannot say
    'equivalent'; it says how many seeds would (at the pooled spread)."""
    for metric in ("test_accuracy", "test_f1_macro"):
        row = _row(table, "noop", metric)
        assert row["mean_diff"] == 0 and row["t_p"] == 1.0 and "sign test" in row["note"]
    row = _row(table, "noop")
    assert row["verdict"] == "inconclusive" and row["adj_p"] == 1.0 and row["seeds_to_decide"] > 3
    assert row["mde_seeds"] == _row(table, "adamw")["mde_seeds"] > 0  # the pooled spread scales it all the same
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
    assert len(lines) == 2 + len(table) + 2 and lines[-1].startswith("pooled sd of the paired differences")
    assert all(name in lines[0] for name in ("effect", "metric", "level", "t_p", "adj_p", "mde_seeds", "verdict"))
    harmful = next(line for line in lines if "lr_x1000" in line and "test_accuracy" in line)
    row = _row(table, "lr_x1000")
    assert f"{100 * row['mean_diff']:+.2f} [{100 * row['ci_low']:+.2f}, {100 * row['ci_high']:+.2f}]" in harmful
    assert "hurts" in harmful and "99%" in harmful  # 1 - 0.05 / 5


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


# ---------------------------------------------------------------------------
# Issue 31, item 1: what is printed beside the verdict


def _frame(diffs_by_effect: dict[str, list[float]], base: float = 0.8) -> tuple[pd.DataFrame, list[ab.Comparison]]:
    """Runs of a reference variant `ref` and one variant per effect whose test_accuracy is ref's + the diff."""
    rows, comparisons = [], []
    n = len(next(iter(diffs_by_effect.values())))
    for seed in range(n):
        reference = base + 0.01 * seed
        rows.append({"variant": "ref", "seed": seed, "test_accuracy": reference, "test_f1_macro": reference - 0.02,
                     "val_accuracy": reference, "val_f1_macro": reference})
        for effect, diffs in diffs_by_effect.items():
            value = reference + diffs[seed]
            rows.append({"variant": effect, "seed": seed, "test_accuracy": value, "test_f1_macro": value - 0.03,
                         "val_accuracy": value, "val_f1_macro": value})
    comparisons = [ab.Comparison(effect, with_=effect, without="ref") for effect in diffs_by_effect]
    return pd.DataFrame(rows), comparisons


def _effects(runs: pd.DataFrame, comparisons: list[ab.Comparison], **kwargs) -> pd.DataFrame:
    return ab.effects(runs, comparisons, None, None, **kwargs)


def test_equal_differences_are_a_degenerate_case_not_p_0():
    """Every seed 0.5 pp better, as accuracies on a 1,000-image grid give (with float rounding): the t-test is
    undefined; the exact sign test says what 2 seeds can, p = 0.5, and its interval for the median is unbounded."""
    runs = pd.DataFrame([{"variant": v, "seed": s, "test_accuracy": a, "test_f1_macro": a, "val_accuracy": a,
                          "val_f1_macro": a}
                         for v, s, a in [("a", 0, 0.812), ("b", 0, 0.807), ("a", 1, 0.723), ("b", 1, 0.718)]])
    row = _effects(runs, [ab.Comparison("x", "a", "b")]).iloc[0]
    assert row["mean_diff"] == pytest.approx(0.005)
    assert row["t_p"] == pytest.approx(stats.binomtest(2, 2, 0.5).pvalue) == pytest.approx(0.5)
    assert (row["ci_low"], row["ci_high"]) == (-np.inf, np.inf)
    assert row["verdict"] not in ("helps", "hurts") and "sign test" in row["note"]
    # with enough seeds the sign test can decide: 7 seeds all +0.5 pp, p = 2 / 2**7 < 0.05
    runs7, comparisons = _frame({"x": [0.005] * 7})
    row = _effects(runs7, comparisons).iloc[0]
    assert row["t_p"] == pytest.approx(stats.binomtest(7, 7, 0.5).pvalue)
    assert row["ci_low"] == pytest.approx(0.005) and row["verdict"] == "helps"


def test_intervals_are_at_the_level_the_verdict_uses():
    """b5 leave-one-out's adamw on main: -3.20 ± 2.03 pp at 95 % beside 'no detectable effect'. The verdict's
    interval is the Bonferroni-adjusted one (level 1 - alpha / m), and it decides: helps/hurts iff it excludes 0."""
    diffs = {"adamw": [-0.024, -0.031, -0.041], "cosine": [0.02, 0.25, 0.06], "smoothing": [-0.001, -0.014, -0.009]}
    runs, comparisons = _frame(diffs)
    table = _effects(runs, comparisons, alpha=0.05)
    primary = table[table["metric"] == "test_accuracy"]
    m = len(comparisons)
    for (_, row), effect in zip(primary.iterrows(), diffs):
        d = np.array(diffs[effect])
        result = stats.ttest_1samp(d, 0)
        low, high = result.confidence_interval(1 - 0.05 / m)
        assert row["level"] == pytest.approx(1 - 0.05 / m)
        assert (row["ci_low"], row["ci_high"]) == pytest.approx((low, high), rel=1e-9)
        assert row["adj_p"] == pytest.approx(min(1.0, m * result.pvalue), rel=1e-9)
        assert (row["verdict"] in ("helps", "hurts")) == (row["ci_low"] > 0 or row["ci_high"] < 0)
        assert (row["adj_p"] < 0.05) == (row["ci_low"] > 0 or row["ci_high"] < 0)
    adamw = primary.iloc[0]
    assert stats.ttest_1samp(diffs["adamw"], 0).confidence_interval(0.95).high < 0  # 95 % would exclude 0
    assert adamw["ci_high"] > 0 and adamw["verdict"] not in ("helps", "hurts")


def test_the_primary_metric_is_the_one_verdict_family():
    runs, comparisons = _frame({"a": [0.03, 0.035, 0.04], "b": [0.0, 0.01, -0.01]})
    table = _effects(runs, comparisons)
    assert list(table["metric"].unique()) == ["test_accuracy", "test_f1_macro"]
    f1 = table[table["metric"] == "test_f1_macro"]
    assert (f1["role"] == "descriptive").all() and (f1["verdict"] == "").all() and f1["adj_p"].isna().all()
    assert (f1["level"] == 0.95).all()  # descriptive: the plain 95 % interval, said as such
    accuracy = table[table["metric"] == "test_accuracy"]
    assert (accuracy["role"] == "verdict").all() and (accuracy["level"] == 1 - 0.05 / 2).all()
    named = _effects(runs, comparisons, metric="val_f1_macro")
    assert list(named["metric"].unique()) == ["val_f1_macro", "test_accuracy", "test_f1_macro"]
    assert set(named.loc[named["role"] == "verdict", "metric"]) == {"val_f1_macro"}
    with pytest.raises(ab.AblationStatsError, match=r"unknown --metric 'top5'; choose one of test_accuracy"):
        _effects(runs, comparisons, metric="top5")
    assert issubclass(ab.AblationStatsError, UserError)


def test_the_detectable_effect_comes_from_the_pooled_spread_with_its_uncertainty():
    diffs = {"a": [0.03, 0.035, 0.04], "b": [0.0, 0.01, -0.01], "c": [0.02, -0.02, 0.0, ]}
    runs, comparisons = _frame(diffs)
    table = _effects(runs, comparisons, alpha=0.05, power=0.8)
    variances = [np.var(d, ddof=1) for d in diffs.values()]
    df = sum(len(d) - 1 for d in diffs.values())
    pooled = np.sqrt(sum((len(d) - 1) * v for d, v in zip(diffs.values(), variances)) / df)
    spread = ab.pooled_spread(table)
    assert (spread.sd, spread.df) == (pytest.approx(pooled, rel=1e-9), df)
    assert spread.sd_low == pytest.approx(pooled * np.sqrt(df / stats.chi2.ppf(0.975, df)), rel=1e-9)
    assert spread.sd_high == pytest.approx(pooled * np.sqrt(df / stats.chi2.ppf(0.025, df)), rel=1e-9)
    d = TTestPower().solve_power(nobs=3, alpha=0.05 / 3, power=0.8, alternative="two-sided")
    primary = table[table["role"] == "verdict"]
    assert primary["mde_seeds"].to_numpy() == pytest.approx([d * pooled] * 3, rel=1e-6)
    assert primary["mde_seeds_low"].to_numpy() == pytest.approx([d * spread.sd_low] * 3, rel=1e-6)
    assert primary["mde_seeds_high"].to_numpy() == pytest.approx([d * spread.sd_high] * 3, rel=1e-6)
    assert table.loc[table["role"] == "descriptive", "mde_seeds"].isna().all()
    assert "pooled" in ab.spread_text(spread) and f"{100 * spread.sd_high:.2f}" in ab.spread_text(spread)


def test_image_level_tests_are_out_of_the_verdict_table_and_labelled(table):
    verdicts = ab.effects_markdown(table)
    assert "cmh" not in verdicts.lower() and "mcnemar" not in verdicts.lower()
    images = ab.image_level_markdown(table)
    assert "test-set sampling only, ignores training variance" in images
    assert "cmh_p" in images and "mcnemar_p" in images and "lr_x1000" in images


def test_an_effects_table_logged_before_issue_31_still_renders():
    legacy = pd.DataFrame([{"effect": "adamw", "with": "2.4", "without": "2.4 -adamw", "metric": "test_accuracy",
                            "n_seeds": 3, "mean_diff": -0.032, "ci_low": -0.052, "ci_high": -0.012, "t_p": 0.0211,
                            "holm_p": 0.0634, "mcnemar_p": "0.1;0.2;0.3", "cmh_p": 0.0142, "mde_seeds": 0.0267,
                            "mde_images": 0.01, "verdict": "no detectable effect"}])
    text = ab.effects_text(legacy)
    assert list(text.iloc[0][["effect", "holm_p", "verdict"]]) == ["adamw", "0.0634", "no detectable effect"]


# ---------------------------------------------------------------------------
# Issue 31, item 2: four verdicts against the smallest effect of interest


FOUR = {"clear_gain": [0.030, 0.032, 0.031, 0.033], "small_gain": [0.003, 0.004, 0.0035, 0.0045],
        "loss": [-0.020, -0.025, -0.022, -0.021], "same": [0.001, -0.001, 0.0005, -0.0005],
        "noisy": [0.03, -0.02, 0.05, -0.01]}


def test_four_verdicts_against_min_effect():
    runs, comparisons = _frame(FOUR)
    table = _effects(runs, comparisons, alpha=0.05, min_effect=0.01)
    rows = table[table["role"] == "verdict"].set_index("effect")
    for effect, diffs in FOUR.items():  # the interval recomputed: 1 - 0.05 / 5, scipy's t
        low, high = stats.ttest_1samp(diffs, 0).confidence_interval(1 - 0.05 / 5)
        assert (rows.loc[effect, "ci_low"], rows.loc[effect, "ci_high"]) == pytest.approx((low, high), rel=1e-9)
    assert rows.loc["clear_gain", "verdict"] == "helps" and rows.loc["clear_gain", "vs_min_effect"] == "clears"
    assert rows.loc["clear_gain", "ci_low"] > 0.01
    assert rows.loc["small_gain", "verdict"] == "helps" and rows.loc["small_gain", "vs_min_effect"] == "below"
    assert rows.loc["loss", "verdict"] == "hurts" and rows.loc["loss", "vs_min_effect"] == "clears"
    assert rows.loc["same", "verdict"] == "equivalent"  # TOST: the adjusted interval inside +-1 pp
    assert -0.01 < rows.loc["same", "ci_low"] < 0 < rows.loc["same", "ci_high"] < 0.01
    assert rows.loc["noisy", "verdict"] == "inconclusive" and rows.loc["noisy", "vs_min_effect"] == ""
    assert table.loc[table["role"] == "descriptive", "verdict"].eq("").all()
    # its interval lies inside +-5 pp as well as above 0: "helps" wins, said to be below the smallest effect
    loose = _effects(runs, comparisons, min_effect=0.05).set_index(["effect", "metric"])
    assert loose.loc[("small_gain", "test_accuracy"), ["verdict", "vs_min_effect"]].tolist() == ["helps", "below"]


def test_inconclusive_says_how_many_seeds_would_decide_it():
    runs, comparisons = _frame(FOUR)
    table = _effects(runs, comparisons, alpha=0.05, min_effect=0.01)
    spread = ab.pooled_spread(table)
    row = table[(table["effect"] == "noisy") & (table["role"] == "verdict")].iloc[0]
    target = max(abs(row["mean_diff"]), 0.01 - abs(row["mean_diff"]))

    def half_width(n, sd):  # the verdict's interval half-width with n seeds at that sd
        return stats.t.isf(0.05 / 5 / 2, n - 1) * sd / np.sqrt(n)

    for column, sd in (("seeds_to_decide", spread.sd), ("seeds_to_decide_low", spread.sd_low),
                       ("seeds_to_decide_high", spread.sd_high)):
        n = int(row[column])
        assert half_width(n, sd) < target <= half_width(n - 1, sd), column
    assert row["seeds_to_decide_low"] <= row["seeds_to_decide"] <= row["seeds_to_decide_high"]
    decided = table[(table["role"] == "verdict") & (table["verdict"] != "inconclusive")]
    assert decided["seeds_to_decide"].isna().all()
    assert "noisy" in ab.effects_markdown(table) and "seeds to decide" in ab.effects_markdown(table)


@pytest.mark.parametrize("min_effect", [0, -1.0, float("nan")])
def test_min_effect_must_be_positive(min_effect):
    with pytest.raises(ab.AblationStatsError, match=r"^--min-effect must be a positive number of percentage points"):
        ab.check_min_effect(min_effect)
    runs, comparisons = _frame(FOUR)
    with pytest.raises(ab.AblationStatsError, match="--min-effect"):
        _effects(runs, comparisons, min_effect=min_effect / 100)


def test_forest_plot_draws_the_min_effect_band(table):
    figure = ab.forest_plot(table, min_effect=0.01)
    try:
        (axes,) = figure.axes
        spans = [p for p in axes.patches if p.get_x() == pytest.approx(-1.0) and p.get_width() == pytest.approx(2.0)]
        assert len(spans) == 1
    finally:
        plt.close(figure)


# ---------------------------------------------------------------------------
# Issue 31, item 3: sequential seeds, intervals valid under repeated looks


def test_t_boundaries_spend_alpha_as_designed():
    """The first boundary is scipy's t quantile for the alpha spent at the first look; on null paths simulated
    apart from the ones the boundaries were read from, each look exits with the spending function's share."""
    looks, alpha = (3, 6, 12), 0.05
    bounds = ab.t_boundaries(looks, 12, alpha, 1.0)
    assert bounds[0] == pytest.approx(stats.t.isf(alpha * 3 / 12 / 2, 2), rel=0.03)
    x = np.random.default_rng(2024).standard_normal((200_000, 12))
    inside, exits = np.ones(len(x), dtype=bool), []
    for n, bound in zip(looks, bounds):
        t = np.abs(stats.ttest_1samp(x[:, :n], 0, axis=1).statistic)
        exits.append(np.mean(inside & (t >= bound)))
        inside &= t < bound
    expected = np.diff([0.0, *(alpha * np.array(looks) / 12)])
    assert exits == pytest.approx(expected, rel=0.1)  # 200,000 paths: about 3 % Monte Carlo error each
    assert sum(exits) == pytest.approx(alpha, rel=0.05)


def test_the_design_checks_its_cap_and_looks():
    with pytest.raises(ab.AblationStatsError, match=r"^--max-seeds must be at least 2"):
        ab.SequentialDesign(max_seeds=1)
    assert ab.SequentialDesign(max_seeds=12).looks == tuple(range(3, 13))
    assert ab.SequentialDesign(max_seeds=8, first=3, step=2).looks == (3, 5, 7, 8)
    assert ab.SequentialDesign(max_seeds=2).looks == (2,)
    levels = ab.SequentialDesign().levels(2)  # each look's level, for 2 comparisons at alpha 0.05
    assert levels[0] == pytest.approx(1 - 0.025 * (3 / 12) ** 2, abs=2e-4)  # the first look spends (3/12)**2
    assert np.all(levels > 1 - 0.025) and np.all(levels < 1)


SEQUENTIAL = {"ruin": [-0.6, -0.62, -0.58, -0.61], "noisy": [0.03, -0.02, 0.05, -0.01],
              "same": [0.0002, -0.0002, 0.0001, -0.0001]}


def test_sequential_step_decides_what_it_can_and_asks_seeds_for_the_rest():
    runs, comparisons = _frame({k: v[:3] for k, v in SEQUENTIAL.items()})
    design = ab.SequentialDesign(max_seeds=6)
    state = ab.sequential_step(runs, comparisons, design, min_effect=0.01)
    rows = state.table.set_index("effect")
    level = design.levels(3)[0]
    for effect in ("ruin", "noisy", "same"):  # the first look: scipy's t-interval of 3 seeds at its level
        low, high = stats.ttest_1samp(SEQUENTIAL[effect][:3], 0).confidence_interval(level)
        assert (rows.loc[effect, "ci_low"], rows.loc[effect, "ci_high"]) == pytest.approx((low, high), rel=1e-9)
        assert rows.loc[effect, "look"] == 1 and rows.loc[effect, "level"] == pytest.approx(level)
    assert rows.loc["ruin", ["verdict", "status", "n_seeds"]].tolist() == ["hurts", "decided", 3]
    assert rows.loc["noisy", ["verdict", "status"]].tolist() == ["inconclusive", "open"]
    assert rows.loc["same", ["verdict", "status"]].tolist() == ["equivalent", "decided"]
    assert state.needs_seeds == ["noisy", "ref"] and state.next_seeds == 4 and not state.done
    # the next round: 4 seeds for the open comparison's variants only; the decided ones keep their first look
    more, _ = _frame({k: v for k, v in SEQUENTIAL.items()})
    more = more[(more["seed"] < 3) | more["variant"].isin(state.needs_seeds)]
    again = ab.sequential_step(more, comparisons, design, min_effect=0.01).table.set_index("effect")
    assert again.loc["ruin", "n_seeds"] == 3 and again.loc["noisy", "n_seeds"] == 4
    low, high = stats.ttest_1samp(SEQUENTIAL["noisy"], 0).confidence_interval(design.levels(3)[1])
    assert (again.loc["noisy", "ci_low"], again.loc["noisy", "ci_high"]) == pytest.approx((low, high), rel=1e-9)


def test_an_open_comparison_ends_inconclusive_at_the_cap():
    runs, comparisons = _frame({"noisy": SEQUENTIAL["noisy"]})
    state = ab.sequential_step(runs, comparisons, ab.SequentialDesign(max_seeds=4), min_effect=0.01)
    assert state.table.iloc[0][["verdict", "status", "n_seeds"]].tolist() == ["inconclusive", "at the cap", 4]
    assert state.done and state.needs_seeds == [] and state.next_seeds == 0


def test_sequential_error_rates_with_small_counts():
    """No effect, 4,000 simulated comparisons: 'helps' and 'hurts' each at most alpha / 2 (binomial margin);
    a true effect of +min-effect: 'equivalent' at most alpha. The benchmark runs the full grid."""
    rng = np.random.default_rng(31)
    design = ab.SequentialDesign(max_seeds=12)
    null = np.round(rng.normal(0, 0.01, (4000, 12)) * 1000) / 1000  # on a 1,000-image grid
    verdict, used, *_ = ab.sequential_decisions(null, design, 1, 0.01)
    margin = 2 * np.sqrt(0.025 * 0.975 / 4000)
    assert np.mean(verdict == "helps") <= 0.025 + margin and np.mean(verdict == "hurts") <= 0.025 + margin
    assert 3 <= used.min() and used.max() == 12
    edge = rng.normal(0.01, 0.01, (4000, 12))
    verdict, *_ = ab.sequential_decisions(edge, design, 1, 0.01)
    assert np.mean(verdict == "equivalent") <= 0.05 + 2 * np.sqrt(0.05 * 0.95 / 4000)


def test_the_effects_table_of_a_sequential_ablation_carries_its_sequential_verdicts():
    runs, comparisons = _frame({k: v[:3] for k, v in SEQUENTIAL.items()})
    design = ab.SequentialDesign(max_seeds=6)
    state = ab.sequential_step(runs, comparisons, design, min_effect=0.01)
    plain = _effects(runs, comparisons, min_effect=0.01)
    table = ab.with_sequential_verdicts(plain, state, design)
    verdict_rows = table[table["role"] == "verdict"].set_index("effect")
    decided = state.table.set_index("effect")
    for column in ("n_seeds", "level", "mean_diff", "ci_low", "ci_high", "verdict", "vs_min_effect"):
        assert verdict_rows[column].tolist() == decided[column].tolist(), column
    assert verdict_rows["t_p"].isna().all() and verdict_rows["adj_p"].isna().all()
    assert verdict_rows.loc["ruin", "note"] == "sequential: decided at look 1 of 4 (3 seeds), repeated interval"
    assert "stopped by the budget" in verdict_rows.loc["noisy", "note"]
    assert verdict_rows["sequential_status"].tolist() == decided["status"].tolist()  # what select reads
    assert verdict_rows.loc["noisy", "sequential_status"] == ab.OPEN
    descriptive = table["role"] == "descriptive"
    assert table.loc[descriptive, "sequential_status"].isna().all()
    pd.testing.assert_frame_equal(table[descriptive].drop(columns="sequential_status"), plain[descriptive])


def _sign_test_look(design: ab.SequentialDesign, m: int) -> int:
    """The first look (seeds) at which the exact sign test of equal differences is at most the look's alpha."""
    return next(n for n, level in zip(design.looks, design.levels(m)) if 2 * 0.5**n <= 1 - level)


def test_equal_differences_in_a_sequential_ablation_are_the_degenerate_case_of_the_fixed_design():
    """Issue 31, item 1, point 1, in the sequential path: a change that changes nothing (every difference 0) and one
    0.5 pp better at every seed. No spread: the repeated t-interval would be [d, d] (p = 0); the exact sign test at
    the look's level decides instead, as in the fixed design, said in the note; no infinite interval is printed."""
    design = ab.SequentialDesign(max_seeds=12)
    diffs = {"noop": [0.0] * 12, "plus": [0.005] * 12, "noisy": [0.03, -0.02, 0.05, -0.01] * 3}
    runs, comparisons = _frame({k: v[:3] for k, v in diffs.items()})
    state = ab.sequential_step(runs, comparisons, design, min_effect=0.01)
    rows = state.table.set_index("effect")
    for effect in ("noop", "plus"):  # 3 seeds: the sign test's p (1, 0.25) is far above the look's alpha
        assert rows.loc[effect, ["verdict", "status"]].tolist() == ["inconclusive", "open"]
        assert "exact sign test" in rows.loc[effect, "note"] and "no interval" in rows.loc[effect, "note"]
    assert rows.loc["noisy", "note"] == ""
    table = ab.with_sequential_verdicts(_effects(runs, comparisons, min_effect=0.01), state, design)
    text = ab.effects_text(table)
    assert not text.apply(lambda column: column.str.contains("inf")).any().any()
    verdict_rows = text[text["role"] == "verdict"].set_index("effect")
    for effect, mean in (("noop", "+0.00"), ("plus", "+0.50")):
        assert verdict_rows.loc[effect, "difference, pp [interval]"] == f"{mean} [{ab.UNBOUNDED}]"
        assert "exact sign test" in verdict_rows.loc[effect, "note"] and "sequential:" in verdict_rows.loc[effect, "note"]
    compared = ab.comparison_text(ab.comparison_summary(table, None, pd.DataFrame(
        {"variant": runs["variant"], "seed": runs["seed"], "fit_seconds": 60.0})))
    assert not compared["difference, pp [interval]"].str.contains("inf").any()
    # all 12 seeds: the sign test decides at the first look whose alpha admits 2 / 2**n; 0 everywhere is equivalent
    runs, comparisons = _frame(diffs)
    rows = ab.sequential_step(runs, comparisons, design, min_effect=0.01).table.set_index("effect")
    n = _sign_test_look(design, 3)
    assert rows.loc["noop", ["verdict", "status", "n_seeds", "ci_low", "ci_high"]].tolist() == [
        "equivalent", "decided", n, 0.0, 0.0]
    assert rows.loc["plus", ["verdict", "status", "n_seeds"]].tolist() == ["helps", "decided", n]
    assert rows.loc["plus", "ci_low"] == pytest.approx(0.005) and "p = 0.00195" in rows.loc["plus", "note"]


@pytest.mark.parametrize("max_seeds", [3, 6, 12])
@pytest.mark.parametrize("m", [1, 2, 5])
def test_zero_spread_alone_never_decides_below_the_sign_test_and_zero_never_helps_or_hurts(max_seeds, m):
    """Equal differences at every seed, any design: "helps" / "hurts" only from the look whose alpha admits the
    sign test's 2 / 2**n, never before; differences of 0 (also within float noise of it: accuracies added in
    another order) never "helps" / "hurts" at any look."""
    design = ab.SequentialDesign(max_seeds=max_seeds)
    cases = np.array([[0.0] * max_seeds, [1e-13] * max_seeds, [-3e-17] * max_seeds, [0.004] * max_seeds,
                      [-0.25] * max_seeds])
    verdict, used, mean, low, high = ab.sequential_decisions(cases, design, m, 0.01)
    zero = np.arange(len(cases)) < 3
    assert not np.isin(verdict[zero], ["helps", "hurts"]).any() and np.all(mean[zero] == 0)
    first = next((n for n, level in zip(design.looks, design.levels(m)) if 2 * 0.5**n <= 1 - level), None)
    if first is None:  # no look's alpha admits the sign test: inconclusive at the cap
        assert np.all(verdict == "inconclusive") and np.all(used == max_seeds) and np.all(np.isinf(low))
    else:
        assert verdict[~zero].tolist() == ["helps", "hurts"] and np.all(used == first)
        assert verdict[zero].tolist() == ["equivalent"] * 3 and np.all(low[zero] == 0) and np.all(high[zero] == 0)


def test_a_sequential_verdict_by_the_sign_test_says_so_even_when_later_seeds_spread():
    """'plus' is decided by the sign test at a look of equal differences; seeds run later for the open 'noisy' (the
    same reference variant) spread, so the fixed design over every seed has no degenerate note: the verdict's note
    is the look's."""
    design = ab.SequentialDesign(max_seeds=12)
    n = _sign_test_look(design, 2)
    assert n < 12
    diffs = {"plus": ([0.005] * n + [0.03, -0.02, 0.04])[:12], "noisy": [0.03, -0.02, 0.05, -0.01] * 3}
    runs, comparisons = _frame(diffs)
    state = ab.sequential_step(runs, comparisons, design, min_effect=0.01)
    plain = _effects(runs, comparisons, min_effect=0.01)
    assert plain.loc[(plain["effect"] == "plus") & (plain["role"] == "verdict"), "note"].item() == ""
    row = ab.with_sequential_verdicts(plain, state, design).set_index("effect").loc["plus"].iloc[0]
    assert row["verdict"] == "helps" and row["n_seeds"] == n
    assert row["note"].startswith("every seed's difference is +0.50 pp: the t-test is undefined, exact sign test")
    assert f"decided at look {design.looks.index(n) + 1}" in row["note"]


def test_the_parent_runs_interval_tag_and_the_select_step_table_print_no_infinite_interval():
    from cifar_mlops import select
    from cifar_mlops.tracking import ablations

    runs, comparisons = _frame({"noop": [0.0] * 3, "adamw": [0.03, 0.02, 0.035]})
    design = ab.SequentialDesign(max_seeds=12)
    table = ab.with_sequential_verdicts(_effects(runs, comparisons, min_effect=0.01),
                                        ab.sequential_step(runs, comparisons, design, min_effect=0.01), design)
    summary = ab.comparison_summary(table, None, runs.assign(fit_seconds=60.0))
    tags, metrics = ablations.comparison_record(summary, "description", 1.0, "minutes")
    assert tags["noop/interval"].startswith(f"+0.00 pp [{ab.UNBOUNDED}] at ") and "inf" not in tags["noop/interval"]
    assert "noop/ci_low_pp" not in metrics and "inf" not in tags["adamw/interval"]
    step = select.Step(1, (), None, select.step_table(table, "test_accuracy"), None, [], runs)
    assert "inf" not in select.step_markdown(step, 1.0) and ab.UNBOUNDED in select.step_markdown(step, 1.0)


# ---------------------------------------------------------------------------
# Issue 31, item 4: where the noise comes from, by simulation


def _redrawn_images(rng: np.random.Generator, n: int, shift: float = 0.0) -> np.ndarray:
    """right(with) - right(without) on n freshly drawn test images, each variant right on 80 % of them
    independently, the `with` variant `shift` more (what its training did to every image at once)."""
    return (rng.random(n) < 0.8 + shift).astype(int) - (rng.random(n) < 0.8).astype(int)


def test_when_only_test_set_sampling_varies_the_training_part_is_about_0():
    """No training effect: each seed scores its own 400 freshly drawn images. The test-set part is the variance of
    the mean paired difference (2 x 0.16 / 400), the training part what the seeds' spread leaves over: ~0."""
    rng = np.random.default_rng(4)
    truth = 2 * 0.8 * 0.2 / 400
    split = ab.split_noise([_redrawn_images(rng, 400) for _ in range(200)], same_images=False)
    assert split.var_test == pytest.approx(truth, rel=0.05) and split.var_diff == pytest.approx(truth, rel=0.3)
    assert split.var_train <= 0.25 * split.var_diff and split.n_images == 400
    images, seeds, advice = ab.narrowing(split, 200, 0.95)
    assert advice == ab.MORE_IMAGES
    assert images < seeds
    # unbiased before the floor at 0: over many small ablations the training part averages ~0 of the variance
    splits = [ab.split_noise([_redrawn_images(rng, 1000) for _ in range(5)], same_images=False) for _ in range(300)]
    total = np.mean([s.var_diff for s in splits])
    assert abs(np.mean([s.var_diff - s.var_test for s in splits])) < 0.15 * total


def test_when_training_dominates_it_says_more_seeds():
    """Each seed's training moves the `with` variant's accuracy on every image by N(0, 2 pp); 10,000 images per
    seed leave test-set sampling at sd 0.57 pp. The split finds the training variance; with 5 seeds at the level
    of 2 comparisons, more seeds narrow the interval more."""
    rng = np.random.default_rng(8)
    train_sd, n = 0.02, 10_000

    def seeds(count: int) -> list[np.ndarray]:
        return [_redrawn_images(rng, n, rng.normal(0, train_sd)) for _ in range(count)]

    many = ab.split_noise(seeds(60), same_images=False)
    assert many.var_train == pytest.approx(train_sd**2, rel=0.45)
    assert many.var_test == pytest.approx(2 * 0.8 * 0.2 / n, rel=0.1)
    five = ab.split_noise(seeds(5), same_images=False)
    images, more_seeds, advice = ab.narrowing(five, 5, 1 - 0.05 / 2)
    assert advice == ab.MORE_SEEDS and more_seeds < images
    assert more_seeds == pytest.approx(stats.t.isf(0.0125, 9) / stats.t.isf(0.0125, 4) / np.sqrt(2))


def _same_images(rng: np.random.Generator, seeds: int, n: int, fixed: float, train_sd: float) -> list[np.ndarray]:
    """Every seed scores the same n images: a fraction `fixed` of them is one variant's for good (half always
    right only with it, half only without it), on the rest each variant is right 80 % of the time, the `with`
    variant N(0, train_sd) more in each seed."""
    kind = rng.choice([1, -1, 0], size=n, p=[fixed / 2, fixed / 2, 1 - fixed])
    diffs = []
    for _ in range(seeds):
        rest = _redrawn_images(rng, n, rng.normal(0, train_sd))
        diffs.append(np.where(kind == 0, rest, kind))
    return diffs


def test_on_the_same_images_what_is_fixed_per_image_is_not_counted_as_test_set_sampling():
    """The whole test set in every seed: images that one variant always gets right are the same in every seed, so
    they are not in the spread across seeds. The two-way split finds the training variance (0.6^2 x 2 pp^2) and
    says how far the choice of these images could move the effect; McNemar's per-seed variance, as if each seed
    drew its images, would leave nothing to training."""
    rng = np.random.default_rng(12)
    n, fixed, train_sd = 2000, 0.4, 0.02
    diffs = _same_images(rng, 150, n, fixed, train_sd)
    split = ab.split_noise(diffs, same_images=True)
    assert split.var_train == pytest.approx((1 - fixed) ** 2 * train_sd**2, rel=0.5)
    assert split.var_test == pytest.approx((1 - fixed) * 2 * 0.8 * 0.2 / n, rel=0.1)
    assert split.var_image_choice == pytest.approx(fixed / n, rel=0.2)
    assert ab.split_noise(diffs, same_images=False).var_train == 0.0  # the one-way split gets it wrong

    flips_only = ab.split_noise(_same_images(rng, 150, n, fixed, 0.0), same_images=True)
    assert flips_only.var_train <= 0.3 * flips_only.var_diff
    assert ab.narrowing(flips_only, 150, 0.95)[2] == ab.MORE_IMAGES


def test_two_seeds_ask_for_seeds_unless_training_is_almost_nothing():
    """At 2 seeds the t quantile (1 df) dominates: twice the seeds narrow the interval to ~0.12x, more than removing
    a test-set part of 90 % of the variance (0.32x)."""
    split = ab.NoiseSplit(var_diff=1e-4, var_test=0.9e-4, var_train=0.1e-4, var_image_choice=np.nan, n_images=1000)
    images, seeds, advice = ab.narrowing(split, 2, 0.975)
    assert images == pytest.approx(np.sqrt(0.1)) and seeds == pytest.approx(0.116, abs=0.002)
    assert advice == ab.MORE_SEEDS
    flat = ab.NoiseSplit(var_diff=0.0, var_test=1e-4, var_train=0.0, var_image_choice=np.nan, n_images=1000)
    assert ab.narrowing(flat, 3, 0.95)[2] == ab.MORE_SEEDS and np.isnan(ab.narrowing(flat, 3, 0.95)[0])


def test_the_noise_table_splits_the_variance_the_verdicts_interval_uses(ablation, table):
    """From the stored predictions: var_diff is the square of the effects table's sd_diff of test accuracy, the
    test-set part each seed's McNemar-style variance averaged, training the rest; one line per comparison."""
    runs, predictions, y_test = ablation
    noise = ab.noise_table(runs, COMPARISONS, predictions, y_test, same_images=True)
    assert list(noise.columns) == ab.NOISE_COLUMNS and list(noise["effect"]) == [c.effect for c in COMPARISONS]
    for comparison, (_, row) in zip(COMPARISONS, noise.iterrows()):
        assert row["var_diff"] == pytest.approx(_row(table, comparison.effect)["sd_diff"] ** 2, abs=1e-15)
        assert row["var_train"] == pytest.approx(max(0.0, row["var_diff"] - row["var_test"]))
        assert row["level"] == pytest.approx(1 - 0.05 / len(COMPARISONS)) and row["n_images"] == N_IMAGES
    adamw = noise.set_index("effect").loc["adamw"]
    d = [(predictions[("full", s)] == y_test).astype(int) - (predictions[("no_adamw", s)] == y_test) for s in SEEDS]
    redrawn = ab.noise_table(runs, COMPARISONS, predictions, y_test, same_images=False).set_index("effect")
    discordant = [(np.sum(x != 0) / N_IMAGES - np.mean(x) ** 2) * N_IMAGES / (N_IMAGES - 1) / N_IMAGES for x in d]
    assert redrawn.loc["adamw", "var_test"] == pytest.approx(np.mean(discordant))  # McNemar's, ddof = 1
    x = np.vstack(d).astype(float)  # the same images: two-way ANOVA's interaction mean square, over N
    ss = lambda a: np.sum((a - x.mean()) ** 2)  # noqa: E731
    interaction = (ss(x) - N_IMAGES * ss(x.mean(axis=1)) - len(SEEDS) * ss(x.mean(axis=0))) / (2 * (N_IMAGES - 1))
    assert adamw["var_test"] == pytest.approx(interaction / N_IMAGES)
    noop = noise.set_index("effect").loc["noop"]  # identical variants: no spread, nothing to split
    assert noop["var_diff"] == 0 and np.isnan(noop["test_share"]) and noop["advice"] == ab.MORE_SEEDS
    lines = ab.noise_markdown(noise).splitlines()
    assert len([line for line in lines if line.startswith("- ")]) == len(COMPARISONS)
    line = ab.noise_line(noise.iloc[0])
    assert line.startswith("adamw: the test-accuracy difference varies across 3 seeds with sd ")
    assert f"{adamw['advice']} would narrow the interval more" in line and "shared by every seed" in line


def test_different_test_images_per_seed_are_not_the_same_images(ablation):
    runs, predictions, y_test = ablation
    labels = {seed: np.roll(y_test, seed) for seed in SEEDS}
    moved = {(v, s): np.roll(p, s) for (v, s), p in predictions.items()}
    with pytest.raises(ab.AblationStatsError, match="different test images"):
        ab.noise_table(runs, COMPARISONS, moved, labels, same_images=True)
    assert len(ab.noise_table(runs, COMPARISONS, moved, labels, same_images=False)) == len(COMPARISONS)


def test_each_comparison_says_its_verdict_seeds_interval_and_cpu_minutes(ablation, table):
    runs, predictions, y_test = ablation
    # the CPU seconds count, not the wall-clock (two cores busy: twice the wall time)
    fit = runs[["variant", "seed"]].assign(fit_seconds=[60.0 * (1 + i) for i in range(len(runs))],
                                            fit_cpu_seconds=[120.0 * (1 + i) for i in range(len(runs))])
    noise = ab.noise_table(runs, COMPARISONS, predictions, y_test, same_images=True)
    summary = ab.comparison_summary(table, noise, fit)
    assert list(summary.columns) == ab.COMPARISON_COLUMNS and list(summary["effect"]) == [c.effect for c in COMPARISONS]
    by_effect = summary.set_index("effect")
    assert (summary["fit_unit"] == "CPU-minutes").all()
    seconds = fit.set_index(["variant", "seed"])["fit_cpu_seconds"]
    expected = sum(seconds[(v, s)] for v in ("full", "no_adamw") for s in SEEDS) / 60
    assert by_effect.loc["adamw", "fit_minutes"] == pytest.approx(expected)
    verdicts = table[table["role"] == "verdict"].set_index("effect")
    for effect in by_effect.index:
        assert by_effect.loc[effect, ["verdict", "ci_low", "ci_high", "n_seeds"]].tolist() == \
            verdicts.loc[effect, ["verdict", "ci_low", "ci_high", "n_seeds"]].tolist()
        assert by_effect.loc[effect, "noise"].startswith(f"{effect}: ")
    # a sequential verdict that stopped at 2 of the 3 seeds costs the runs of those 2 seeds only
    early = table.copy()
    early.loc[(early["effect"] == "adamw") & (early["role"] == "verdict"), "n_seeds"] = 2
    cut = ab.comparison_summary(early, None, fit).set_index("effect")
    assert cut.loc["adamw", "fit_minutes"] == pytest.approx(
        sum(seconds[(v, s)] for v in ("full", "no_adamw") for s in sorted(SEEDS)[:2]) / 60)
    assert cut.loc["adamw", "noise"] == "" and cut.loc["adamw", "advice"] == ""
    text = ab.comparison_markdown(summary)
    lr = by_effect.loc["lr_x1000"]
    assert f"{lr['verdict']} (clears min-effect)" in text and "| CPU-minutes " in text
    assert ab.interval_text(lr["mean_diff"], lr["ci_low"], lr["ci_high"]) + " at 99%" in text
    assert "Minutes: CPU-minutes are the CPU time the training process spent in its fit" in text
    # an ablation logged before CPU time was counted (its comparisons CSV has no fit_unit): wall-clock, said so
    before = ab.comparison_text(summary.drop(columns="fit_unit"))
    assert "training minutes (wall-clock)" in before.columns and ab.minutes_meaning(summary.drop(columns="fit_unit")) \
        == ab.WALL_MINUTES_MEANING
    mixed = ab.comparison_text(summary.assign(fit_unit=["GPU-minutes"] + ["CPU-minutes"] * (len(summary) - 1)))
    cells = mixed[ab.MIXED_UNITS]  # comparisons in different units: each cell names its own
    assert cells.iloc[0].endswith(" GPU-minutes") and cells.iloc[1].endswith(" CPU-minutes")


def test_a_runs_compute_seconds_are_its_gpu_else_cpu_else_its_wall_clock_fit_seconds():
    """What --budget and the minutes count: GPU seconds where a run logged them, else CPU seconds, else (a run
    logged before either was measured) its wall-clock fit_seconds; the unit says which were summed."""
    runs = pd.DataFrame({"fit_seconds": [10.0, 10.0, 10.0, np.nan],
                         "fit_cpu_seconds": [35.0, 20.0, np.nan, np.nan],
                         "fit_gpu_seconds": [np.nan, 40.0, np.nan, np.nan]})
    assert ab.compute_seconds(runs).tolist()[:3] == [35.0, 40.0, 10.0] and np.isnan(ab.compute_seconds(runs).iloc[3])
    assert ab.compute_minutes(runs) == pytest.approx((35 + 40 + 10) / 60)
    assert ab.compute_unit(runs.iloc[[0]]) == "CPU-minutes" and ab.compute_unit(runs.iloc[[1]]) == "GPU-minutes"
    assert ab.compute_unit(runs.iloc[:2]) == "CPU- and GPU-minutes"
    assert ab.compute_unit(runs) == "CPU- and GPU-minutes and wall-clock minutes"
    old = pd.DataFrame({"fit_seconds": [30.0, 90.0]})  # no fit_cpu_seconds column at all: runs reused from the store
    assert ab.compute_seconds(old).tolist() == [30.0, 90.0] and ab.compute_minutes(old) == pytest.approx(2.0)
    assert ab.compute_unit(old) == "wall-clock minutes" and ab.compute_unit(old.iloc[:0]) == "minutes"
    assert ab.compute_measure(runs.iloc[[0]], "the ablation's runs").startswith(
        "CPU-minutes, summed over the ablation's runs: CPU-minutes are")


def test_blank_cells_read_back_from_the_logged_csv_stay_blank(table):
    """The report reads the effects table from the parent run's CSV, where blank text cells come back as NaN."""
    import io

    logged = pd.read_csv(io.StringIO(table.to_csv(index=False)))
    text = ab.effects_text(logged)
    assert not text.isin(["nan"]).any().any()
    assert text.equals(ab.effects_text(table))
