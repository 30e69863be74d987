"""Statistics of an ablation (issue 14, item 5): per-variant summaries and the paired effect of each change.

Every metric here is a fraction (0.73 = 73 % accuracy) unless a name says `pp` (percentage points, 100x).
The effect of a change is metric(with) - metric(without), paired by seed: seed k is the same split,
initialisation and shuffling for both variants, so the difference removes what the seed does to both.

Two sources of noise, two kinds of test:

- training randomness: the per-seed differences, a paired t-test across seeds (`t_p`), Holm-corrected
  across the comparisons of one metric (`holm_p`). The verdict comes from this test alone.
- test-set sampling: the same test images are scored by both variants, so the image-level tests are
  paired. Within one seed, McNemar's exact test on the right/wrong table (`mcnemar_p`, one p per seed).
  Across seeds, Cochran-Mantel-Haenszel stratified by seed (`cmh_p`), see `_cmh_p` for the table used.

Pure statistics (numpy, pandas, scipy, statsmodels, matplotlib for the plot): no tracking, no training.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import matplotlib
import numpy as np
import pandas as pd
from scipy import stats
from statsmodels.stats.contingency_tables import StratifiedTable, mcnemar
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.power import TTestPower

from cifar_mlops.errors import UserError

matplotlib.use("Agg")  # files only: no screen needed
from matplotlib import pyplot as plt
from matplotlib.figure import Figure

SUMMARY_METRICS = ("test_accuracy", "test_f1_macro", "val_accuracy", "val_f1_macro")
EFFECT_METRICS = ("test_accuracy", "test_f1_macro")
IMAGE_LEVEL_METRIC = "test_accuracy"  # the image-level tests exist for accuracy only: F1 is not a per-image score
CONFIDENCE = 0.95  # the t-interval's level, fixed by issue 14 whatever `alpha` the verdict uses
EFFECT_COLUMNS = ["effect", "with", "without", "metric", "n_seeds", "mean_diff", "ci_low", "ci_high", "t_p",
                  "holm_p", "mcnemar_p", "cmh_p", "mde_seeds", "mde_images", "verdict"]
HELPS, HURTS, NO_DETECTABLE_EFFECT = "helps", "hurts", "no detectable effect"


class AblationStatsError(UserError):
    """The runs or predictions given cannot support the paired statistics asked for; the message says why."""

    exit_code = 2  # the seeds and variants are the command's input


@dataclass(frozen=True)
class Comparison:
    """One change to measure: metric(with_) - metric(without), paired by seed.

    effect: what is compared, e.g. the enhancement name "adamw", or "b3 -> b4" for a path step.
    with_: id of the variant that has the change; without: id of the variant that lacks it.
    """

    effect: str
    with_: str
    without: str


def check_seeds(seeds: Sequence[int]) -> None:
    """Raise `AblationStatsError` unless there are at least 2 distinct seeds (a paired t-test needs 2)."""
    distinct = len(set(seeds))
    if distinct < 2:
        raise AblationStatsError(f"a paired t-test across seeds needs at least 2 seeds (got {distinct}); "
                                 "pass --seeds 2 or more")


def _check_runs(runs: pd.DataFrame, columns: Sequence[str]) -> None:
    missing = [c for c in columns if c not in runs.columns]
    if missing:
        raise AblationStatsError(f"the ablation's runs lack {', '.join(missing)}; rerun the ablation so that "
                                 "every run logs its metrics")
    duplicated = runs[runs.duplicated(["variant", "seed"], keep=False)]
    if not duplicated.empty:
        first = duplicated.iloc[0]
        raise AblationStatsError(f"variant {first['variant']} has more than one run for seed {first['seed']}; "
                                 "keep one run per (variant, seed)")


def variant_summary(runs: pd.DataFrame) -> pd.DataFrame:
    """Mean and sample std (ddof=1) of each metric across seeds, one row per variant, in first-seen order.

    runs: one row per (variant, seed) with columns variant, seed, test_accuracy, test_f1_macro, val_accuracy,
    val_f1_macro (fractions). Returns columns variant, n_seeds, then <metric>_mean, <metric>_std for the four
    metrics (fractions); a variant with one seed has std NaN (no spread can be estimated from one run).
    """
    _check_runs(runs, ["variant", "seed", *SUMMARY_METRICS])
    grouped = runs.groupby("variant", sort=False)
    summary = pd.DataFrame({"variant": list(grouped.groups), "n_seeds": grouped["seed"].nunique().to_numpy()})
    for metric in SUMMARY_METRICS:
        summary[f"{metric}_mean"] = grouped[metric].mean().to_numpy()
        summary[f"{metric}_std"] = grouped[metric].std(ddof=1).to_numpy()
    return summary


# ---------------------------------------------------------------------------
# Seed level: the paired t-test across seeds (training randomness)


def _paired_metric(runs: pd.DataFrame, comparison: Comparison, metric: str) -> pd.DataFrame:
    """Columns seed, with, without (the metric, fractions), one row per seed both variants ran, by seed."""
    sides = []
    for role, variant in (("with", comparison.with_), ("without", comparison.without)):
        rows = runs.loc[runs["variant"] == variant, ["seed", metric]]
        if rows.empty:
            raise AblationStatsError(f"no runs of variant {variant} (compared for {comparison.effect}); "
                                     "run the ablation's variants before computing its effects")
        if rows[metric].isna().any():
            seed = rows.loc[rows[metric].isna(), "seed"].iloc[0]
            raise AblationStatsError(f"variant {variant} seed {seed} has no {metric}; rerun that run")
        sides.append(rows.rename(columns={metric: role}))
    paired = sides[0].merge(sides[1], on="seed", how="inner").sort_values("seed", ignore_index=True)
    try:
        check_seeds(paired["seed"].tolist())
    except AblationStatsError as err:
        raise AblationStatsError(f"{comparison.effect} ({comparison.with_} vs {comparison.without}): {err}") from None
    return paired


def _t_test(with_values: np.ndarray, without_values: np.ndarray) -> tuple[float, float, float]:
    """(p, ci_low, ci_high): two-sided paired t-test and the CONFIDENCE t-interval of the mean difference."""
    diffs = with_values - without_values
    mean = float(np.mean(diffs))
    if np.all(diffs == diffs[0]):
        # Zero spread: t = mean / 0 is undefined (scipy returns NaN). Identical differences that are all 0
        # are no evidence of an effect (p = 1); the same non-zero difference in every seed is the limit of
        # ever smaller spread, where p -> 0.
        return (1.0 if mean == 0 else 0.0), mean, mean
    result = stats.ttest_rel(with_values, without_values)
    low, high = result.confidence_interval(CONFIDENCE)
    return float(result.pvalue), float(low), float(high)


def _mde_seeds(diffs: np.ndarray, alpha: float, power: float) -> float:
    """Smallest |mean difference| (fraction) a two-sided paired t-test with these seeds detects at `alpha`
    with `power`: Cohen's d solved by statsmodels, times the observed std of the differences (ddof=1)."""
    n, sd = len(diffs), float(np.std(diffs, ddof=1)) if len(diffs) > 1 else 0.0
    if n < 2 or sd == 0:
        return float("nan")  # no spread observed: the detectable size cannot be scaled
    d = TTestPower().solve_power(effect_size=None, nobs=n, alpha=alpha, power=power, alternative="two-sided")
    return float(d) * sd


# ---------------------------------------------------------------------------
# Image level: the same test images, scored by both variants of one seed


def _right(predictions: dict[tuple[str, int], np.ndarray], variant: str, seed: int, y_test: np.ndarray) -> np.ndarray:
    """Boolean per test image: did this run predict its label?"""
    try:
        predicted = np.asarray(predictions[(variant, seed)])
    except KeyError:
        raise AblationStatsError(f"no test predictions for variant {variant} seed {seed}; rerun that run so it "
                                 "logs them") from None
    if predicted.shape != y_test.shape:
        raise AblationStatsError(f"variant {variant} seed {seed} has {predicted.size} test predictions for "
                                 f"{y_test.size} test images; rerun it on the ablation's test set")
    return predicted == y_test


def mcnemar_table(a_right: np.ndarray, b_right: np.ndarray) -> np.ndarray:
    """McNemar's table of two models' right/wrong on the same images (image counts):
    [[both right, only a right], [only b right, both wrong]]. Shared with `promote`."""
    a_right, b_right = np.asarray(a_right, dtype=bool), np.asarray(b_right, dtype=bool)
    return np.array([[np.sum(a_right & b_right), np.sum(a_right & ~b_right)],
                     [np.sum(~a_right & b_right), np.sum(~a_right & ~b_right)]])


def _variant_by_outcome_table(with_right: np.ndarray, without_right: np.ndarray) -> np.ndarray:
    """[[with right, with wrong], [without right, without wrong]] (image counts): rows are the variants."""
    return np.array([[np.sum(with_right), np.sum(~with_right)], [np.sum(without_right), np.sum(~without_right)]])


def _cmh_p(tables: list[np.ndarray]) -> float:
    """Cochran-Mantel-Haenszel p (two-sided, continuity-corrected) over per-seed variant x outcome tables.

    Why not the McNemar tables: CMH tests that each stratum's odds ratio between its row and column
    variable is 1. On a McNemar table (with right? x without right?) that is "are the two models' right
    answers unrelated", which is false for any two models of one image set (easy images are easy for both)
    and says nothing about which is more accurate: two variants with the same accuracy get p ~ 0. On a
    variant x outcome table (rows with / without, columns right / wrong) the odds ratio is 1 exactly when
    the two accuracies are equal, so the stratified null is "equal accuracy in every seed", with each seed
    its own stratum (images are never pooled across seeds into one table). It ignores the pairing of
    images inside a seed (that is McNemar's job, per seed), which makes it conservative: two models of one
    data set agree far more than chance, so the unpaired variance overstates the paired one (simulated at
    85 % accuracy and 10 % discordant images, its size at alpha 0.05 is about 0.002; see `_mde_images`).
    """
    table = StratifiedTable(tables)
    deviation = sum(t[0, 0] - t[0].sum() * t[:, 0].sum() / t.sum() for t in tables)  # sum of (a - E[a])
    variance = sum(t[0].sum() * t[1].sum() * t[:, 0].sum() * t[:, 1].sum() / (t.sum() ** 2 * (t.sum() - 1))
                   for t in tables)
    # correction=True: the counts are discrete and the chi-square continuous; without the half-count
    # correction the test is anticonservative when few images differ, as in a seed whose variants differ on
    # a handful of images or where a cell is 0 (a variant right, or wrong, on every image). But the
    # correction shrinks |sum(a - E)| by 0.5 and statsmodels squares the result even when it went below 0
    # (p < 1 for identical variants), and a seed where both variants are right (or wrong) on every image has
    # no variance: 0/0, which statsmodels reports as p = 0. Both mean no evidence of a difference: p = 1.
    if variance == 0 or abs(deviation) <= 0.5:
        return 1.0
    # statsmodels' p is 1 - chi2.cdf, which is 0 below about 1e-16; the upper tail of its statistic keeps
    # the small p-values of a clearly harmful change apart
    return float(stats.chi2.sf(table.test_null_odds(correction=True).statistic, df=1))


def _mde_images(tables: list[np.ndarray], discordant: int, alpha: float, power: float) -> float:
    """Smallest accuracy difference (fraction) the seed-stratified CMH test detects at `alpha` with `power`.

    With N images per seed, S seeds, Delta the mean accuracy difference, every table has rows of N, so
    sum(a - E[a]) = (right with - right without) / 2 = N S Delta / 2 exactly. The test rejects when
    |sum(a - E[a])| - 1/2 > z(1 - alpha/2) sqrt(V), V the summed hypergeometric variances of the observed
    tables (the CMH denominator, about N S p (1 - p) / 2 at pooled accuracy p). Under the alternative the
    paired truth sets the spread: each image adds +-1/2 when the variants disagree, so
    sd(sum(a - E[a])) = sqrt(D) / 2 at D discordant images (all seeds; this drops the -Delta^2 term, so the
    estimate errs large). Solving N S Delta / 2 - 1/2 - z(1 - alpha/2) sqrt(V) = z(power) sqrt(D) / 2:

        Delta = (2 z(1 - alpha/2) sqrt(V) + 1 + z(power) sqrt(D)) / (N S)
              ~ (z(1 - alpha/2) sqrt(2 p (1 - p)) + z(power) sqrt(D / (N S))) / sqrt(N S) + 1 / (N S)

    Like the test it describes, it counts the S seeds' images as S N independent images; the same N images
    recur, so this is a lower bound on what the image level can resolve.
    """
    n_images = int(tables[0].sum() // 2)
    total = n_images * len(tables)
    variance = sum(t[0].sum() * t[1].sum() * t[:, 0].sum() * t[:, 1].sum() / (t.sum() ** 2 * (t.sum() - 1))
                   for t in tables)
    if variance == 0:
        return float("nan")  # every image right (or wrong) for both variants: the test cannot reject
    z_alpha, z_power = stats.norm.ppf(1 - alpha / 2), stats.norm.ppf(power)
    return float((2 * z_alpha * np.sqrt(variance) + 1 + z_power * np.sqrt(discordant)) / total)


def _image_level(comparison: Comparison, seeds: Sequence[int], predictions: dict[tuple[str, int], np.ndarray],
                 y_test: np.ndarray, alpha: float, power: float) -> tuple[str, float, float]:
    """(McNemar exact p per seed as "p;p;...", CMH p across seeds, mde_images) for test accuracy."""
    mcnemar_ps, tables, discordant = [], [], 0
    for seed in seeds:
        with_right = _right(predictions, comparison.with_, seed, y_test)
        without_right = _right(predictions, comparison.without, seed, y_test)
        paired = mcnemar_table(with_right, without_right)
        # exact binomial on the discordant pairs; no discordant pair at all gives p = 1, as it should
        mcnemar_ps.append(float(mcnemar(paired, exact=True).pvalue))
        discordant += int(paired[0, 1] + paired[1, 0])
        tables.append(_variant_by_outcome_table(with_right, without_right))
    text = ";".join(f"{p:.6g}" for p in mcnemar_ps)
    return text, _cmh_p(tables), _mde_images(tables, discordant, alpha, power)


# ---------------------------------------------------------------------------
# The effects table


def _verdict(holm_p: float, mean_diff: float, alpha: float) -> str:
    if holm_p < alpha and mean_diff > 0:
        return HELPS
    if holm_p < alpha and mean_diff < 0:
        return HURTS
    return NO_DETECTABLE_EFFECT


def effects(runs: pd.DataFrame, comparisons: list[Comparison], predictions: dict[tuple[str, int], np.ndarray],
            y_test: np.ndarray, alpha: float = 0.05, power: float = 0.8) -> pd.DataFrame:
    """One row per (comparison, metric) for metric in (test_accuracy, test_f1_macro), comparisons in order.

    runs: as for `variant_summary` (metrics as fractions). predictions[(variant, seed)]: predicted label per
    test image, aligned with `y_test` (the same images for every run). Columns (differences are fractions):
    effect, with, without, metric, n_seeds (seeds both variants ran), mean_diff (mean over seeds of
    with - without), ci_low, ci_high (95 % t-interval of mean_diff), t_p (two-sided paired t-test across
    seeds), holm_p (t_p, Holm-corrected across the comparisons of one metric), mcnemar_p (exact McNemar p
    per seed in seed order, as text "0.031;0.12"), cmh_p (CMH across seeds), mde_seeds (smallest |mean_diff|
    the t-test detects at `alpha` with `power`, NaN without spread), mde_images (the same for the CMH test),
    verdict ("helps" / "hurts" when holm_p < alpha, else "no detectable effect", from the seed-level test).
    mcnemar_p, cmh_p and mde_images are for test_accuracy only (NaN for F1, which has no per-image score).
    """
    _check_runs(runs, ["variant", "seed", *EFFECT_METRICS])
    y_test = np.asarray(y_test)
    rows = []
    for comparison in comparisons:
        for metric in EFFECT_METRICS:
            paired = _paired_metric(runs, comparison, metric)
            with_values, without_values = paired["with"].to_numpy(float), paired["without"].to_numpy(float)
            diffs = with_values - without_values
            t_p, ci_low, ci_high = _t_test(with_values, without_values)
            mcnemar_text, cmh_p, mde_images = (
                _image_level(comparison, paired["seed"].tolist(), predictions, y_test, alpha, power)
                if metric == IMAGE_LEVEL_METRIC else (np.nan, np.nan, np.nan))
            rows.append({"effect": comparison.effect, "with": comparison.with_, "without": comparison.without,
                         "metric": metric, "n_seeds": len(paired), "mean_diff": float(np.mean(diffs)),
                         "ci_low": ci_low, "ci_high": ci_high, "t_p": t_p, "mcnemar_p": mcnemar_text,
                         "cmh_p": cmh_p, "mde_seeds": _mde_seeds(diffs, alpha, power), "mde_images": mde_images})
    table = pd.DataFrame(rows, columns=[c for c in EFFECT_COLUMNS if c not in ("holm_p", "verdict")])
    table["holm_p"] = np.nan
    for _, of_metric in table.groupby("metric", sort=False):
        table.loc[of_metric.index, "holm_p"] = multipletests(of_metric["t_p"].to_numpy(), alpha=alpha,
                                                             method="holm")[1]
    table["verdict"] = [_verdict(p, d, alpha) for p, d in zip(table["holm_p"], table["mean_diff"])]
    return table[EFFECT_COLUMNS]


# ---------------------------------------------------------------------------
# Presentation


def _p_text(p: float) -> str:
    return "" if pd.isna(p) else f"{p:.3g}"


def effects_text(table: pd.DataFrame) -> pd.DataFrame:
    """The effects table as text cells: effect, metric, mean difference ± the 95 % CI half-width and
    mde_seeds in percentage points, t_p, holm_p, cmh_p (blank for F1), verdict."""
    half_width = (table["ci_high"] - table["ci_low"]) / 2  # the t-interval is symmetric about the mean
    compact = pd.DataFrame({
        "effect": table["effect"],
        "metric": table["metric"],
        "difference, pp (95% CI)": [f"{100 * d:+.2f} ± {100 * h:.2f}" for d, h in zip(table["mean_diff"], half_width)],
        "t_p": table["t_p"].map(_p_text),
        "holm_p": table["holm_p"].map(_p_text),
        "cmh_p": table["cmh_p"].map(_p_text),
        "mde_seeds, pp": table["mde_seeds"].map(lambda m: "" if pd.isna(m) else f"{100 * m:.2f}"),
        "verdict": table["verdict"],
    })
    return compact


def effects_markdown(table: pd.DataFrame) -> str:
    """`effects_text` as a markdown table."""
    # disable_numparse: tabulate would otherwise reformat the already formatted numbers
    return effects_text(table).to_markdown(index=False, disable_numparse=True)


def forest_plot(table: pd.DataFrame, metric: str = "test_accuracy") -> Figure:
    """Each effect's mean difference on `metric` (percentage points) as a point, its 95 % t-interval as a line,
    a vertical line at 0; the first effect on top, its verdict in its label. The caller saves and closes it
    (`plt.close(figure)`)."""
    rows = table[table["metric"] == metric].reset_index(drop=True)
    y = np.arange(len(rows))[::-1]  # first effect at the top
    figure, axes = plt.subplots(figsize=(7.5, 1.2 + 0.45 * max(len(rows), 1)))
    axes.axvline(0, color="grey", linewidth=1, linestyle="--")
    axes.hlines(y, 100 * rows["ci_low"], 100 * rows["ci_high"], color="tab:blue", linewidth=2)
    axes.plot(100 * rows["mean_diff"], y, "o", color="tab:blue", linestyle="none")
    axes.set_yticks(y, [f"{e} ({v})" for e, v in zip(rows["effect"], rows["verdict"])])
    axes.set_ylim(-0.7, len(rows) - 0.3)
    axes.set_xlabel(f"effect on {metric.replace('_', ' ')} (percentage points, with - without, 95% CI)")
    figure.tight_layout()
    return figure
