"""Statistics of an ablation (issues 14 and 31): per-variant summaries and the paired effect of each change.

Every metric here is a fraction (0.73 = 73 % accuracy) unless a name says `pp` (percentage points, 100x).
The effect of a change is metric(with) - metric(without), paired by seed: seed k is the same seed for both
variants (initialisation, shuffling and, unless the split is fixed, the split), so the difference removes
what the seed does to both. The unit of evidence is the seed (a training run).

- The verdicts: one family, the comparisons of one primary metric (test accuracy unless the user names
  another). Each comparison's paired t-interval across seeds is Bonferroni-adjusted to level 1 - alpha / m
  (m comparisons) and the verdict reads off that interval, so what is printed is what decided.
  Bonferroni rather than Holm: Holm's step-down has no simultaneous intervals of its own, Bonferroni's are
  simultaneous, so "excludes 0" and (issue 31, item 2) "inside +-min-effect" are decided at one level.
- Every seed's difference equal (no spread): the t-test is undefined; the exact sign test and its
  order-statistic interval for the median are used instead, said in the row's note. 2 seeds can never
  decide that way (p = 0.5), 7 seeds all on one side can (p = 2 / 2**7). Too few seeds for that interval: no
  interval is printed (never an infinite one) and the verdict is "inconclusive". The sequential design's looks
  do the same at each look's level; differences of 0 (within float noise) are never "helps" / "hurts".
- Other metrics are descriptive: their plain 95 % interval, no verdict, no adjustment.
- The detectable effect (`mde_seeds`) comes from the spread of the paired differences pooled across the
  ablation's comparisons of the primary metric, with a chi-square 95 % interval on that sd. The comparisons
  share a reference variant, so their differences are not independent: the pooled df overstates what it knows.
- Image-level tests (McNemar per seed, Cochran-Mantel-Haenszel across seeds) speak of test-set sampling
  only and ignore training variance: they are in their own table, never in the verdicts'.

Pure statistics (numpy, pandas, scipy, statsmodels, matplotlib for the plot): no tracking, no training.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import matplotlib
import numpy as np
import pandas as pd
from scipy import stats
from statsmodels.stats.contingency_tables import StratifiedTable, mcnemar
from statsmodels.stats.power import TTestPower

from cifar_mlops.errors import UserError

matplotlib.use("Agg")  # files only: no screen needed
from matplotlib import pyplot as plt
from matplotlib.figure import Figure

SUMMARY_METRICS = ("test_accuracy", "test_f1_macro", "val_accuracy", "val_f1_macro")
EFFECT_METRICS = ("test_accuracy", "test_f1_macro")  # the metrics every effects table shows
PRIMARY_METRIC = "test_accuracy"  # the verdicts' family unless `--metric` names another of SUMMARY_METRICS
IMAGE_LEVEL_METRIC = "test_accuracy"  # the image-level tests exist for accuracy only: F1 is not a per-image score
CONFIDENCE = 0.95  # the level of descriptive intervals and of the pooled sd's interval
IMAGE_LEVEL_LABEL = "test-set sampling only, ignores training variance"
EFFECT_COLUMNS = ["effect", "with", "without", "metric", "role", "n_seeds", "mean_diff", "sd_diff", "level",
                  "ci_low", "ci_high", "t_p", "adj_p", "mcnemar_p", "cmh_p", "mde_images", "mde_seeds",
                  "mde_seeds_low", "mde_seeds_high", "verdict", "vs_min_effect", "seeds_to_decide",
                  "seeds_to_decide_low", "seeds_to_decide_high", "note"]
VERDICT, DESCRIPTIVE = "verdict", "descriptive"  # a row's role: in the verdicts' family, or shown only
HELPS, HURTS, EQUIVALENT, INCONCLUSIVE = "helps", "hurts", "equivalent", "inconclusive"
DEFAULT_MIN_EFFECT = 0.01  # the smallest effect of interest (fraction: 1 percentage point), `--min-effect 1.0`
MAX_SEEDS_SEARCHED = 10_000  # seeds_to_decide beyond this is reported as this (never decided in practice)
ZERO_SPREAD = 1e-9  # sd of the differences (fractions) below which they are all equal: float noise, not spread


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


def paired_intervals(diffs: np.ndarray, level: float | np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(mean, low, high, p, degenerate) of paired differences along the last axis (seeds), vectorised.

    diffs: (..., n) with n >= 2; level: the two-sided confidence level, a scalar or broadcasting to diffs[..., 0].
    Where the differences spread: the one-sample t-test of mean 0 (two-sided p) and its t-interval at `level`
    (scipy's `ttest_1samp`, recomputed here without its per-call overhead so that the simulation benchmark runs
    the same code over millions of ablations). Where every difference is equal (`degenerate`, sd <= ZERO_SPREAD):
    the exact two-sided sign test (p = 1 if they are 0, else 2 / 2**n) and its order-statistic interval for the
    median, [d, d] when 2 / 2**n <= 1 - level and (-inf, inf) when the seeds are too few for that level
    (`sign_test_seeds`). Equal differences within ZERO_SPREAD of 0 are 0 (float noise): mean 0, p = 1, [0, 0].
    """
    diffs = np.asarray(diffs, dtype=float)
    n = diffs.shape[-1]
    level = np.broadcast_to(np.asarray(level, dtype=float), diffs.shape[:-1])
    mean = diffs.mean(axis=-1)
    sd = diffs.std(axis=-1, ddof=1)
    degenerate = sd <= ZERO_SPREAD
    zero = degenerate & (np.abs(mean) <= ZERO_SPREAD)  # never "helps" / "hurts" from float noise around 0
    mean = np.where(zero, 0.0, mean)
    se = np.where(degenerate, 1.0, sd) / np.sqrt(n)
    t = mean / se
    p = np.where(degenerate, np.where(zero, 1.0, min(1.0, 2 * 0.5**n)), 2 * stats.t.sf(np.abs(t), n - 1))
    half = stats.t.isf((1 - level) / 2, n - 1) * se
    sign_decides = 2 * 0.5**n <= 1 - level
    low = np.where(degenerate, np.where(sign_decides, mean, -np.inf), mean - half)
    high = np.where(degenerate, np.where(sign_decides, mean, np.inf), mean + half)
    return mean, low, high, p, degenerate


def sign_test_seeds(level: float) -> int:
    """Fewest seeds whose equal differences the sign test bounds at `level`: the smallest n >= 2 with
    2 / 2**n <= 1 - level (`paired_intervals`' rule)."""
    n = 2
    while 2 * 0.5**n > 1 - level and n < 1075:  # 0.5**1075 is 0.0 in float64: every level < 1 stops before
        n += 1
    return n


def degenerate_note(mean: float, n: int, level: float) -> str:
    """The note of a comparison whose `n` differences are all `mean` (`paired_intervals`' degenerate case, the
    interval at `level`): the t-test is undefined, the exact sign test's p, and when the seeds are too few for its
    interval at that level, that there is none (no verdict but "inconclusive" can come of it)."""
    p = 1.0 if mean == 0 else min(1.0, 2 * 0.5**n)
    note = f"every seed's difference is {100 * mean:+.2f} pp: the t-test is undefined, exact sign test (p = {p:.3g})"
    need = sign_test_seeds(level)
    if n < need:
        note += f", no interval at {100 * level:.4g}% below {need} seeds"
    return note


@dataclass(frozen=True)
class Spread:
    """The sd of the paired differences pooled across comparisons (fractions), its df and 95 % interval."""

    sd: float
    df: int
    sd_low: float
    sd_high: float


def pool_spread(n_seeds: Sequence[int], sds: Sequence[float]) -> Spread:
    """Pooled sd of comparisons with `n_seeds` seeds and these sds of their differences (ddof=1):
    sqrt(sum (n_i - 1) s_i^2 / sum (n_i - 1)), df = sum (n_i - 1), and its chi-square CONFIDENCE interval
    sd sqrt(df / chi2(1 - a/2, df)) .. sd sqrt(df / chi2(a/2, df))."""
    weights = np.asarray(n_seeds, dtype=float) - 1
    df = int(weights.sum())
    if df < 1:
        return Spread(float("nan"), 0, float("nan"), float("nan"))
    sd = float(np.sqrt(np.sum(weights * np.square(np.asarray(sds, dtype=float))) / df))
    tail = (1 - CONFIDENCE) / 2
    return Spread(sd, df, sd * float(np.sqrt(df / stats.chi2.isf(tail, df))),
                  sd * float(np.sqrt(df / stats.chi2.ppf(tail, df))))


def pooled_spread(table: pd.DataFrame) -> Spread:
    """`pool_spread` of the verdict rows of an effects table."""
    rows = table[table["role"] == VERDICT]
    return pool_spread(rows["n_seeds"].to_numpy(), rows["sd_diff"].to_numpy())


def spread_text(spread: Spread) -> str:
    """One line: the pooled sd in pp with its interval and df."""
    if not spread.df:
        return "pooled sd of the paired differences: not estimable (fewer than 2 seeds)"
    return (f"pooled sd of the paired differences (primary metric, all comparisons): {100 * spread.sd:.2f} pp "
            f"({CONFIDENCE:.0%} interval {100 * spread.sd_low:.2f}-{100 * spread.sd_high:.2f} pp, {spread.df} df; "
            "the comparisons share a reference variant, so the df overstate what it knows)")


def detectable_effect(n_seeds: int, alpha: float, power: float) -> float:
    """Smallest |mean difference| in units of the sd of the differences (Cohen's d) that a two-sided paired
    t-test with `n_seeds` detects at `alpha` with `power` (statsmodels' `TTestPower`)."""
    if n_seeds < 2:
        return float("nan")
    return float(TTestPower().solve_power(effect_size=None, nobs=n_seeds, alpha=alpha, power=power,
                                          alternative="two-sided"))


# ---------------------------------------------------------------------------
# Image level: the same test images, scored by both variants of one seed


def _right(predictions: dict[tuple[str, int], np.ndarray], variant: str, seed: int,
           y_test: np.ndarray | dict[int, np.ndarray]) -> np.ndarray:
    """Boolean per test image: did this run predict its label?"""
    y_test = _labels_of(y_test, seed)
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
    total = int(sum(t.sum() // 2 for t in tables))  # N S: images per seed (rows of N), over the seeds
    variance = sum(t[0].sum() * t[1].sum() * t[:, 0].sum() * t[:, 1].sum() / (t.sum() ** 2 * (t.sum() - 1))
                   for t in tables)
    if variance == 0:
        return float("nan")  # every image right (or wrong) for both variants: the test cannot reject
    z_alpha, z_power = stats.norm.ppf(1 - alpha / 2), stats.norm.ppf(power)
    return float((2 * z_alpha * np.sqrt(variance) + 1 + z_power * np.sqrt(discordant)) / total)


def _image_level(comparison: Comparison, seeds: Sequence[int], predictions: dict[tuple[str, int], np.ndarray],
                 y_test: np.ndarray | dict[int, np.ndarray], alpha: float, power: float) -> tuple[str, float, float]:
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


def verdicts(low: np.ndarray, high: np.ndarray, min_effect: float) -> np.ndarray:
    """The verdict of each adjusted interval [low, high] (vectorised): "helps" when it lies above 0, "hurts" below
    0, "equivalent" when it lies inside (-min_effect, +min_effect) (two one-sided tests, each at the interval's
    level), else "inconclusive". An interval above 0 and inside the band is "helps" (see `versus_min_effect`)."""
    low, high = np.asarray(low, dtype=float), np.asarray(high, dtype=float)
    return np.select([low > 0, high < 0, (low > -min_effect) & (high < min_effect)], [HELPS, HURTS, EQUIVALENT],
                     INCONCLUSIVE)


def versus_min_effect(verdict: str, low: float, high: float, min_effect: float) -> str:
    """For "helps" / "hurts": "clears" when the whole interval is at least min_effect away from 0, "below" when all
    of it is closer than that, else "not known"; "" for the other verdicts."""
    if verdict not in (HELPS, HURTS):
        return ""
    near, far = (low, high) if verdict == HELPS else (-high, -low)  # distances from 0, nearer end first
    return "clears" if near >= min_effect else "below" if far < min_effect else "not known"


def seeds_to_decide(mean: float, sd: float, min_effect: float, alpha: float) -> float:
    """Seeds with which a t-interval at level 1 - alpha around `mean`, with differences of sd `sd`, would be
    decided: the smallest n whose half-width t(1 - alpha/2, n-1) sd / sqrt(n) is below max(|mean|,
    min_effect - |mean|) (then it excludes 0, or lies inside +-min_effect). NaN without a spread; at most
    MAX_SEEDS_SEARCHED."""
    if not np.isfinite(sd) or sd <= 0:
        return float("nan")
    target = max(abs(mean), min_effect - abs(mean))
    n = np.arange(2, MAX_SEEDS_SEARCHED + 1)
    narrow = np.flatnonzero(stats.t.isf(alpha / 2, n - 1) * sd / np.sqrt(n) < target)
    return float(n[narrow[0]]) if narrow.size else float(MAX_SEEDS_SEARCHED)


def check_min_effect(min_effect_pp: float) -> None:
    """Raise `AblationStatsError` unless the smallest effect of interest (percentage points) is positive."""
    if not min_effect_pp > 0 or not np.isfinite(min_effect_pp):
        raise AblationStatsError(f"--min-effect must be a positive number of percentage points of the primary "
                                 f"metric (got {min_effect_pp:g}), e.g. --min-effect 1.0")


def check_metric(metric: str) -> None:
    """Raise `AblationStatsError` unless `metric` is one the runs log (SUMMARY_METRICS)."""
    if metric not in SUMMARY_METRICS:
        raise AblationStatsError(f"unknown --metric {metric!r}; choose one of {', '.join(SUMMARY_METRICS)}")


def _labels_of(y_test: np.ndarray | dict[int, np.ndarray], seed: int) -> np.ndarray:
    """The test labels of `seed`: one array for every seed, or one per seed when the split follows the seed."""
    if isinstance(y_test, dict):
        try:
            return np.asarray(y_test[seed])
        except KeyError:
            raise AblationStatsError(f"no test labels for seed {seed}") from None
    return np.asarray(y_test)


def effects(runs: pd.DataFrame, comparisons: list[Comparison],
            predictions: dict[tuple[str, int], np.ndarray] | None, y_test: np.ndarray | dict[int, np.ndarray] | None,
            alpha: float = 0.05, power: float = 0.8, metric: str = PRIMARY_METRIC,
            min_effect: float = DEFAULT_MIN_EFFECT) -> pd.DataFrame:
    """One row per (comparison, metric), comparisons in order, `metric` first then the other EFFECT_METRICS.

    runs: as for `variant_summary` (metrics as fractions). predictions[(variant, seed)]: predicted label per
    test image, aligned with `y_test` (one array of labels, or one per seed when the split follows the seed);
    both None: no image-level tests. Columns (differences are fractions):
    effect, with, without, metric, role ("verdict" for `metric`, the verdicts' one family; "descriptive" for the
    others), n_seeds (seeds both variants ran), mean_diff (mean over seeds of with - without), sd_diff (their sd,
    ddof=1), level (of the interval: 1 - alpha / m for verdict rows, m = len(comparisons), Bonferroni; 0.95 for
    descriptive rows), ci_low, ci_high (paired t-interval at `level`; see `paired_intervals` for equal
    differences), t_p (two-sided paired t-test, or the sign test when every difference is equal), adj_p
    (min(1, m t_p), verdict rows only: adj_p < alpha exactly when the interval excludes 0), mcnemar_p (exact
    McNemar p per seed, as text "0.031;0.12"), cmh_p (CMH across seeds), mde_images (the CMH's detectable
    effect; these three for test_accuracy only, test-set sampling only), mde_seeds (smallest |mean_diff| the
    verdict's test with these seeds detects with `power`, at the spread pooled over the verdict rows) and
    mde_seeds_low / _high (the same at the ends of the pooled sd's 95 % interval), verdict (`verdicts` of the
    interval against `min_effect`, a fraction of the primary metric: helps, hurts, equivalent, inconclusive; "" for
    descriptive rows), vs_min_effect (`versus_min_effect`), seeds_to_decide (inconclusive rows: `seeds_to_decide`
    at the pooled sd) with _low / _high at the ends of its interval, note (a degenerate case).
    """
    check_metric(metric)
    check_min_effect(100 * min_effect)
    metrics = [metric, *[m for m in EFFECT_METRICS if m != metric]]
    _check_runs(runs, ["variant", "seed", *metrics])
    m = len(comparisons)
    rows = []
    for comparison in comparisons:
        for name in metrics:
            primary = name == metric
            paired = _paired_metric(runs, comparison, name)
            diffs = paired["with"].to_numpy(float) - paired["without"].to_numpy(float)
            level = 1 - alpha / m if primary else CONFIDENCE
            mean, low, high, p, degenerate = (float(x) for x in paired_intervals(diffs, level))
            mcnemar_text, cmh_p, mde_images = (
                _image_level(comparison, paired["seed"].tolist(), predictions, y_test, alpha, power)
                if name == IMAGE_LEVEL_METRIC and predictions is not None else (np.nan, np.nan, np.nan))
            note = degenerate_note(mean, len(diffs), level) if degenerate else ""
            rows.append({"effect": comparison.effect, "with": comparison.with_, "without": comparison.without,
                         "metric": name, "role": VERDICT if primary else DESCRIPTIVE, "n_seeds": len(paired),
                         "mean_diff": mean, "sd_diff": float(np.std(diffs, ddof=1)), "level": level,
                         "ci_low": low, "ci_high": high, "t_p": p, "adj_p": min(1.0, m * p) if primary else np.nan,
                         "mcnemar_p": mcnemar_text, "cmh_p": cmh_p, "mde_images": mde_images,
                         "verdict": str(verdicts(low, high, min_effect)) if primary else "", "note": note})
    table = pd.DataFrame(rows, columns=[c for c in EFFECT_COLUMNS if not c.startswith(("mde_seeds", "seeds_to"))])
    table["vs_min_effect"] = [versus_min_effect(v, lo, hi, min_effect)
                              for v, lo, hi in zip(table["verdict"], table["ci_low"], table["ci_high"])]
    spread = pooled_spread(table)
    primary = table["role"] == VERDICT
    d = table.loc[primary, "n_seeds"].map(lambda n: detectable_effect(int(n), alpha / m, power))
    open_ = table["verdict"] == INCONCLUSIVE
    for suffix, sd in (("", spread.sd), ("_low", spread.sd_low), ("_high", spread.sd_high)):
        table[f"mde_seeds{suffix}"] = np.nan
        table.loc[primary, f"mde_seeds{suffix}"] = d * sd
        table[f"seeds_to_decide{suffix}"] = [seeds_to_decide(mean, sd, min_effect, alpha / m) if undecided else np.nan
                                             for mean, undecided in zip(table["mean_diff"], open_)]
    return table[EFFECT_COLUMNS]


# ---------------------------------------------------------------------------
# Presentation


def _p_text(p: float) -> str:
    return "" if pd.isna(p) else f"{p:.3g}"


def _pp(value: float) -> str:
    return f"{100 * value:+.2f}"


UNBOUNDED = "no interval: every seed equal, too few seeds"  # the sign test's, `paired_intervals`


def interval_text(mean: float, low: float, high: float, unit: str = "") -> str:
    """'+1.20 [-0.35, +2.75]' in percentage points (`unit` after the mean, e.g. " pp"). An unbounded interval
    (every seed's difference equal, too few seeds for the sign test's: `paired_intervals`) is no interval:
    '+0.00 [no interval: ...]', never an infinite one; no mean (no look yet): ""."""
    if pd.isna(mean):
        return ""
    if not (np.isfinite(low) and np.isfinite(high)):
        return f"{_pp(mean)}{unit} [{UNBOUNDED}]"
    return f"{_pp(mean)}{unit} [{_pp(low)}, {_pp(high)}]"


def effects_text(table: pd.DataFrame) -> pd.DataFrame:
    """The verdicts' table as text cells, one row per (comparison, metric): effect, metric, role, seeds, the mean
    difference and its interval in percentage points, the interval's level, t_p, adj_p, mde_seeds in pp with its
    range from the pooled sd's interval, verdict (blank for descriptive rows), note. No image-level test: those
    are `image_level_text`'s."""
    def mde(row: pd.Series) -> str:
        if pd.isna(row["mde_seeds"]):
            return ""
        return f"{100 * row['mde_seeds']:.2f} ({100 * row['mde_seeds_low']:.2f}-{100 * row['mde_seeds_high']:.2f})"

    def to_decide(row: pd.Series) -> str:
        if pd.isna(row["seeds_to_decide"]):
            return ""
        low, mid, high = (int(row[f"seeds_to_decide{s}"]) for s in ("_low", "", "_high"))
        return f"{mid} ({low}-{high}{'+' if high >= MAX_SEEDS_SEARCHED else ''})"

    if "role" not in table.columns:  # logged before issue 31 (95 % intervals, Holm p): shown as it was logged
        return table.drop(columns=["with", "without"], errors="ignore").astype(str)
    table = table.fillna({"verdict": "", "vs_min_effect": "", "note": ""})  # blanks read back from a CSV are NaN
    return pd.DataFrame({
        "effect": table["effect"],
        "metric": table["metric"],
        "role": table["role"],
        "seeds": table["n_seeds"].astype(str),
        "difference, pp [interval]": [interval_text(*r) for r in zip(table["mean_diff"], table["ci_low"],
                                                                     table["ci_high"])],
        "level": table["level"].map(lambda level: f"{100 * level:.4g}%"),
        "t_p": table["t_p"].map(_p_text),
        "adj_p": table["adj_p"].map(_p_text),
        "mde_seeds, pp (range)": [mde(row) for _, row in table.iterrows()],
        "verdict": table["verdict"],
        "vs min-effect": table["vs_min_effect"],
        "seeds to decide (range)": [to_decide(row) for _, row in table.iterrows()],
        "note": table["note"],
    })


def effects_markdown(table: pd.DataFrame) -> str:
    """`effects_text` as a markdown table, with the pooled spread's line under it."""
    # disable_numparse: tabulate would otherwise reformat the already formatted numbers
    text = effects_text(table).to_markdown(index=False, disable_numparse=True)
    return f"{text}\n\n{spread_text(pooled_spread(table))}"


def image_level_text(table: pd.DataFrame) -> pd.DataFrame:
    """The image-level tests of test accuracy, as text cells: effect, McNemar's exact p per seed, the CMH p
    across seeds and the CMH's detectable effect in pp. They treat the test images as the only noise."""
    rows = table[(table["metric"] == IMAGE_LEVEL_METRIC) & table["cmh_p"].notna()]
    return pd.DataFrame({"effect": rows["effect"], "mcnemar_p (per seed)": rows["mcnemar_p"].astype(str),
                         "cmh_p": rows["cmh_p"].map(_p_text),
                         "mde_images, pp": rows["mde_images"].map(lambda m: "" if pd.isna(m) else f"{100 * m:.2f}")})


def image_level_markdown(table: pd.DataFrame) -> str:
    """`image_level_text` under its label: never a verdict."""
    frame = image_level_text(table)
    if frame.empty:
        return ""
    return (f"Image-level tests of {IMAGE_LEVEL_METRIC} ({IMAGE_LEVEL_LABEL}; never a verdict):\n\n"
            + frame.to_markdown(index=False, disable_numparse=True))


def forest_plot(table: pd.DataFrame, min_effect: float | None = None) -> Figure:
    """Each verdict row's mean difference (percentage points) as a point, its adjusted interval (the verdict's) as
    a line (an unbounded end drawn to the axis' edge), a vertical line at 0, a grey band at +-min_effect (a
    fraction) when given; the first effect on top, its verdict in its label. The caller saves and closes it
    (`plt.close(figure)`)."""
    rows = table[table["role"] == VERDICT].reset_index(drop=True)
    metric = rows["metric"].iloc[0] if len(rows) else PRIMARY_METRIC
    y = np.arange(len(rows))[::-1]  # first effect at the top
    finite = np.abs(100 * rows[["mean_diff", "ci_low", "ci_high"]].to_numpy(float))
    edge = 1.1 * max(float(np.max(finite[np.isfinite(finite)], initial=0.0)), 100 * (min_effect or 0.0), 1.0)
    figure, axes = plt.subplots(figsize=(7.5, 1.2 + 0.45 * max(len(rows), 1)))
    if min_effect:
        axes.axvspan(-100 * min_effect, 100 * min_effect, color="grey", alpha=0.15, linewidth=0,
                     label=f"+-{100 * min_effect:g} pp (min-effect)")
    axes.axvline(0, color="grey", linewidth=1, linestyle="--")
    axes.hlines(y, np.clip(100 * rows["ci_low"], -edge, edge), np.clip(100 * rows["ci_high"], -edge, edge),
                color="tab:blue", linewidth=2)
    axes.plot(100 * rows["mean_diff"], y, "o", color="tab:blue", linestyle="none")
    axes.set_yticks(y, [f"{e} ({v})" for e, v in zip(rows["effect"], rows["verdict"])])
    axes.set_ylim(-0.7, len(rows) - 0.3)
    axes.set_xlim(-edge, edge)
    levels = sorted(set(rows["level"]))
    level = f"{100 * levels[0]:.4g}% Bonferroni-adjusted" if len(levels) == 1 else "adjusted"
    axes.set_xlabel(f"effect on {metric.replace('_', ' ')} (percentage points, with - without, {level} interval)")
    figure.tight_layout()
    return figure


# ---------------------------------------------------------------------------
# Sequential seeds (issue 31, item 3): retest after every round, with intervals valid under repeated looks
#
# Design: a group-sequential t-test with Lan-DeMets alpha spending, read as repeated confidence intervals.
# - Lan, K.K.G. & DeMets, D.L. (1983), "Discrete sequential boundaries for clinical trials", Biometrika 70(3),
#   659-663: the error alpha is spent over the looks as a function of the information fraction t = n / max_seeds;
#   here the power family alpha * t**rho of Kim, K. & DeMets, D.L. (1987), "Design and analysis of group
#   sequential tests based on the type I error spending rate function", Biometrika 74(1), 149-154, rho = 2:
#   between Pocock-like (rho = 1: much spent early, where 3 seeds have little power, so less power at the cap)
#   and O'Brien-Fleming-like (rho = 3: the first look's boundary so high, t > 49 at 3 seeds for 2 comparisons,
#   that even a change that ruins training is not decided there). With rho = 2 a first look at 3 seeds needs
#   t > 25 for 2 comparisons (a learning rate 1000x too low gives t in the hundreds), and the cap keeps most
#   of a fixed design's power.
# - The boundaries are on the t scale: c_k such that, with no effect, P(|T_j| < c_j for j < k, |T_k| >= c_k)
#   is the alpha spent at look k, T_k the one-sample t statistic of the first n_k differences. The usual
#   normal-theory boundaries (Armitage, McPherson & Rowe 1969 recursion) used at their nominal level on the
#   t-tests (the "significance level approach", Jennison, C. & Turnbull, B.W. (2000), Group Sequential Methods
#   with Applications to Clinical Trials, Chapman & Hall/CRC, ch. 11) are approximate when the df are small:
#   measured here at 3-12 seeds they give "helps" 3.0 % of the time with no effect, against 2.5 %. The joint
#   law of (T_1, ..., T_K) under no effect is free of the unknown sd (Gaussian differences), so it is simulated
#   once, with a fixed seed (`_BOUNDARY_PATHS` paths), and each c_k read off as the quantile of |T_k| among the
#   paths still inside that spends exactly alpha(t_k) - alpha(t_{k-1}) (Monte Carlo error about 1 % of alpha).
# - Every look's interval is the repeated confidence interval mean +- c_k sd / sqrt(n_k) (Jennison, C. &
#   Turnbull, B.W. (1989), "Interim analyses: the repeated confidence interval approach", JRSS B 51(3),
#   305-361): the intervals of all looks cover the effect at once with probability 1 - alpha (the boundaries
#   spend alpha in total whatever the effect, T_k being centred on it), so a decision read off any of them
#   (helps, hurts, equivalent: `verdicts`) keeps its error rate however many looks are taken.
# - Across the m comparisons of an ablation, each comparison spends alpha / m (Bonferroni, as the fixed design).


DEFAULT_MAX_SEEDS = 12
SPENDING_RHO = 2.0  # alpha * t**rho (Kim & DeMets 1987)
_BOUNDARY_PATHS = 400_000  # simulated null paths the t boundaries are read from
_BOUNDARY_SEED = 31  # fixed: the boundaries are a function of the design alone


@dataclass(frozen=True)
class SequentialDesign:
    """Looks after `first` seeds, then every `step` seeds, up to `max_seeds` (always a look); error `alpha` per
    comparison family, spent alpha * (n / max_seeds)**rho."""

    max_seeds: int = DEFAULT_MAX_SEEDS
    alpha: float = 0.05
    first: int = 3
    step: int = 1
    rho: float = SPENDING_RHO

    def __post_init__(self) -> None:
        if self.max_seeds < 2:
            raise AblationStatsError(f"--max-seeds must be at least 2 (a paired t-test needs 2 seeds), got "
                                     f"{self.max_seeds}")
        if not 0 < self.alpha < 1:
            raise AblationStatsError(f"--alpha must be in (0, 1), got {self.alpha}")

    @property
    def looks(self) -> tuple[int, ...]:
        first = max(2, min(self.first, self.max_seeds))
        return tuple(sorted({*range(first, self.max_seeds, max(1, self.step)), self.max_seeds}))

    def levels(self, n_comparisons: int) -> np.ndarray:
        """Two-sided confidence level of the repeated interval at each look, for a family of `n_comparisons`:
        1 - 2 P(T > c_k) for a t with n_k - 1 df, so that `paired_intervals` at that level is mean +- c_k se."""
        bounds = t_boundaries(self.looks, self.max_seeds, self.alpha / max(1, n_comparisons), self.rho)
        return 1 - 2 * stats.t.sf(bounds, np.asarray(self.looks) - 1)


def spent(fraction: float, alpha: float, rho: float = SPENDING_RHO) -> float:
    """Error spent by information fraction `fraction`: alpha * min(fraction, 1)**rho."""
    return alpha * min(fraction, 1.0) ** rho


@functools.lru_cache(maxsize=64)
def t_boundaries(looks: tuple[int, ...], max_seeds: int, alpha: float, rho: float = SPENDING_RHO) -> np.ndarray:
    """The t-scale boundaries c_k of the Lan-DeMets design at `looks` (seed counts, ascending, >= 2): see the
    section's comment. Each c_k is the r_k-th largest |T_k| among the simulated null paths still inside, r_k the
    paths' count times the alpha spent at look k (inf when it spends nothing)."""
    rng = np.random.default_rng(_BOUNDARY_SEED)
    total, squares = np.zeros(_BOUNDARY_PATHS), np.zeros(_BOUNDARY_PATHS)
    inside = np.ones(_BOUNDARY_PATHS, dtype=bool)
    bounds, seen, previous = [], 0, 0.0
    for n in looks:
        for _ in range(n - seen):  # one seed at a time: memory stays one value per path
            x = rng.standard_normal(_BOUNDARY_PATHS)
            total += x
            squares += x * x
        seen = n
        mean = total / n
        sd = np.sqrt(np.maximum(squares - n * mean * mean, 0.0) / (n - 1))
        t = np.abs(mean) / (sd / np.sqrt(n))
        step = spent(n / max_seeds, alpha, rho) - previous
        previous += step
        exits = int(round(step * _BOUNDARY_PATHS))
        candidates = t[inside]
        if exits <= 0 or candidates.size == 0:
            bounds.append(np.inf)
            continue
        exits = min(exits, candidates.size)
        bound = float(np.partition(candidates, candidates.size - exits)[candidates.size - exits])
        bounds.append(bound)
        inside &= t < bound
    return np.array(bounds)


def sequential_decisions(diffs: np.ndarray, design: SequentialDesign, n_comparisons: int, min_effect: float
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The sequential procedure on paired differences in seed order (vectorised over leading axes).

    diffs: (..., n) with n seeds run so far (n may be below max_seeds). At each look n_k <= n, the repeated
    interval of the first n_k differences at that look's level (`SequentialDesign.levels`); a comparison stops at
    the first look whose `verdicts` is not "inconclusive". Returns (verdict, seeds used, mean, low, high) per
    comparison: the decision and the look it came at, or "inconclusive" with the last look's numbers (seeds used
    = that look; below max_seeds the comparison is still open)."""
    diffs = np.asarray(diffs, dtype=float)
    shape = diffs.shape[:-1]
    verdict = np.full(shape, INCONCLUSIVE, dtype=object)
    used = np.zeros(shape, dtype=int)
    mean, low, high = (np.full(shape, np.nan) for _ in range(3))
    open_ = np.ones(shape, dtype=bool)
    for n, level in zip(design.looks, design.levels(n_comparisons)):
        if n > diffs.shape[-1] or not open_.any():
            break
        m_k, low_k, high_k, _, _ = paired_intervals(diffs[..., :n], level)
        said = verdicts(low_k, high_k, min_effect)
        for out, value in ((verdict, said), (used, n), (mean, m_k), (low, low_k), (high, high_k)):
            out[open_] = np.broadcast_to(value, shape)[open_]
        open_ &= said == INCONCLUSIVE
    return verdict.astype(str), used, mean, low, high


SEQUENTIAL_COLUMNS = ["effect", "with", "without", "metric", "n_seeds", "look", "level", "mean_diff", "ci_low",
                      "ci_high", "verdict", "vs_min_effect", "status", "note"]
DECIDED, OPEN, AT_CAP = "decided", "open", "at the cap"


@dataclass
class SequentialState:
    """Where a sequential ablation stands: one row per comparison (SEQUENTIAL_COLUMNS; status decided / open /
    at the cap; note: `degenerate_note` when the look's differences are all equal, else ""), the variants that
    need more seeds, and how many seeds each of them should have after the next round (0 when nothing is open)."""

    table: pd.DataFrame
    needs_seeds: list[str]
    next_seeds: int

    @property
    def done(self) -> bool:
        return not self.needs_seeds


def sequential_step(runs: pd.DataFrame, comparisons: list[Comparison], design: SequentialDesign, *,
                    metric: str = PRIMARY_METRIC, min_effect: float = DEFAULT_MIN_EFFECT) -> SequentialState:
    """Given the per-(variant, seed) metrics so far (as for `effects`), which comparisons are decided and which
    variants need more seeds. Each comparison uses its paired seeds in ascending seed order (the order they are
    run in: seeds 0, 1, 2, ...) and `sequential_decisions`; one still open below `design.max_seeds` asks for the
    next look's seeds for both its variants, one open at the cap ends "inconclusive" there. Every difference of
    the look equal: the exact sign test at the look's level decides as in the fixed design (`paired_intervals`;
    the look's alpha, 1 - level, is P(|T_k| >= c_k) with no effect: at most the alpha spent by then, up to the
    boundaries' Monte Carlo error), said in the note."""
    check_metric(metric)
    check_min_effect(100 * min_effect)
    _check_runs(runs, ["variant", "seed", metric])
    m = len(comparisons)
    levels = dict(zip(design.looks, design.levels(m)))
    rows, needs, next_seeds = [], [], 0
    for comparison in comparisons:
        paired = _paired_metric(runs, comparison, metric)
        diffs = (paired["with"] - paired["without"]).to_numpy(float)[:design.max_seeds]
        verdict, used, mean, low, high = (np.asarray(x).item() for x in
                                          sequential_decisions(diffs, design, m, min_effect))
        if verdict != INCONCLUSIVE:
            status = DECIDED
        elif len(diffs) >= design.max_seeds:
            status = AT_CAP
        else:
            status = OPEN
            following = min(n for n in design.looks if n > len(diffs))
            next_seeds = max(next_seeds, following)
            needs += [v for v in (comparison.with_, comparison.without) if v not in needs]
        seen = diffs[:used]
        note = (degenerate_note(mean, int(used), levels[used])
                if used and np.std(seen, ddof=1) <= ZERO_SPREAD else "")
        rows.append({"effect": comparison.effect, "with": comparison.with_, "without": comparison.without,
                     "metric": metric, "n_seeds": int(used), "look": design.looks.index(used) + 1 if used else 0,
                     "level": levels.get(used, np.nan), "mean_diff": mean, "ci_low": low, "ci_high": high,
                     "verdict": verdict, "vs_min_effect": versus_min_effect(verdict, low, high, min_effect),
                     "status": status, "note": note})
    return SequentialState(pd.DataFrame(rows, columns=SEQUENTIAL_COLUMNS), needs, next_seeds)


def with_sequential_verdicts(table: pd.DataFrame, state: SequentialState, design: SequentialDesign) -> pd.DataFrame:
    """An `effects` table whose verdict rows say what the sequential procedure decided (`ablate --seeds auto`):
    seeds used, the look's level, its repeated interval and mean, verdict and vs_min_effect from `state`; t_p and
    adj_p blank (the repeated interval, not a fixed-design p, decides); sequential_status is the state's status
    (decided, open: stopped by the budget, at the cap); the note says at which look it ended, after
    the look's own note (equal differences at that look) in place of the fixed design's. Descriptive rows, the image-level tests and the pooled spread's columns stay those of all the seeds run."""
    table = table.copy()
    decided = state.table.set_index("effect")
    looks = len(design.looks)
    for index in table.index[table["role"] == VERDICT]:
        row = decided.loc[table.at[index, "effect"]]
        table.loc[index, ["n_seeds", "level", "mean_diff", "ci_low", "ci_high", "verdict", "vs_min_effect"]] = [
            row["n_seeds"], row["level"], row["mean_diff"], row["ci_low"], row["ci_high"], row["verdict"],
            row["vs_min_effect"]]
        table.loc[index, ["t_p", "adj_p"]] = np.nan
        table.loc[index, "sequential_status"] = row["status"]  # what a caller reads (select), not the note's words
        ended = {DECIDED: "decided", OPEN: "stopped by the budget", AT_CAP: "at --max-seeds"}[row["status"]]
        note = f"sequential: {ended} at look {row['look']} of {looks} ({row['n_seeds']} seeds), repeated interval"
        table.loc[index, "note"] = "; ".join(n for n in (row.get("note", ""), note) if isinstance(n, str) and n)
        if row["verdict"] != INCONCLUSIVE:
            table.loc[index, ["seeds_to_decide", "seeds_to_decide_low", "seeds_to_decide_high"]] = np.nan
    return table


# ---------------------------------------------------------------------------
# Where the noise comes from (issue 31, item 4)
#
# The interval of a comparison rests on V, the variance across seeds of the per-seed difference D_s = mean over the
# test images i of d_si = right(with) - right(without) (in {-1, 0, 1}; test accuracy, the one metric with a score
# per image). Model: d_si = delta + t_s + e_si, t_s what the seed's training does to every image at once (a run that
# is better overall), e_si what is left per image (which images were drawn, and which of them a training happens to
# get right), independent across images. Then V = var(t) + var(e) / N: more test images shrink only the second
# part, more seeds shrink both (and the t quantile).
# - Test images drawn anew by each seed (data.seed = seed with data.test_size, or synthetic images): var(e) / N is,
#   per seed, the variance of the mean of a paired proportion difference (McNemar's, (b + c)/N - ((b - c)/N)^2 over
#   N, here with ddof = 1), averaged over the seeds.
# - The same test images for every seed (the whole test set, or --fixed-split): what is fixed per image (an image
#   one variant always gets right) is the same in every seed, so it is not in V at all: the verdict is about these
#   images, and the choice of them is error the interval leaves out (`var_image_choice`, from the spread of the
#   images' mean differences). The per-image part inside V is the image x seed interaction of a two-way layout,
#   its residual mean square / N. McNemar's per-seed variance would count both and leave too little to training.
# training = V - test-set part, floored at 0 (V is itself an estimate with n_seeds - 1 df).

NOISE_COLUMNS = ["effect", "with", "without", "metric", "n_seeds", "n_images", "same_images", "level", "var_diff",
                 "var_test", "var_train", "var_image_choice", "test_share", "width_more_images", "width_more_seeds",
                 "advice"]
MORE_SEEDS, MORE_IMAGES = "more seeds", "more test images"


@dataclass(frozen=True)
class NoiseSplit:
    """The variance across seeds of a comparison's difference (fractions squared), split by where it comes from."""

    var_diff: float  # V: sample variance (ddof=1) across seeds of the per-seed difference, what the interval uses
    var_test: float  # its test-set part: shrinks as 1 / (test images per seed)
    var_train: float  # the rest, what only more seeds shrink: V - var_test, floored at 0
    var_image_choice: float  # same images in every seed: the choice of them, not in V (NaN when each seed draws its own)
    n_images: float  # test images per seed (mean over seeds)


def split_noise(diffs: Sequence[np.ndarray], same_images: bool) -> NoiseSplit:
    """Split the across-seed variance of the mean of `diffs[s]` (per test image of seed s: right(with) -
    right(without), in {-1, 0, 1}; at least 2 seeds) into test-set sampling and training (see the section's comment).
    same_images: every seed scores the same images in the same order (else each seed's images are its own draw)."""
    diffs = [np.asarray(d, dtype=float) for d in diffs]
    if len(diffs) < 2:
        raise AblationStatsError(f"splitting the variance across seeds needs at least 2 seeds (got {len(diffs)})")
    sizes = np.array([d.size for d in diffs])
    if np.any(sizes < 2):
        raise AblationStatsError("splitting the variance needs at least 2 test images per seed")
    means = np.array([d.mean() for d in diffs])
    var_diff = float(np.var(means, ddof=1))
    if same_images:
        if np.any(sizes != sizes[0]):
            raise AblationStatsError("the seeds were scored on different numbers of test images, not the same images")
        matrix = np.vstack(diffs)  # seeds x images
        s, n = matrix.shape
        image_means = matrix.mean(axis=0)
        residual = matrix - means[:, None] - image_means[None, :] + matrix.mean()
        interaction = float(np.sum(residual**2) / ((s - 1) * (n - 1)))  # sigma_e^2 of the per-image part in V
        var_test = interaction / n
        var_image_choice = max(0.0, float(np.var(image_means, ddof=1)) - interaction / s) / n
    else:
        var_test = float(np.mean([np.var(d, ddof=1) / d.size for d in diffs]))
        var_image_choice = float("nan")
    return NoiseSplit(var_diff, var_test, max(0.0, var_diff - var_test), var_image_choice, float(sizes.mean()))


def narrowing(split: NoiseSplit, n_seeds: int, level: float) -> tuple[float, float, str]:
    """(width with unlimited test images, width with twice the seeds, advice), widths as fractions of the interval's
    now. Unlimited test images (as many per seed as wanted, the same seeds, no training: the logged models only
    predict them) leave the training part: sqrt(var_train / V). Twice the seeds halve V and lower the t quantile:
    t(level, 2n - 1) / t(level, n - 1) / sqrt(2). The advice is the one that narrows more: doubling both never
    favours images (V / 2 <= var_train + var_test / 2), so images are weighed at their limit, which costs no training.
    No spread across seeds (V = 0): only more seeds can decide (the sign test), NaN widths."""
    tail = (1 - level) / 2
    seeds = float(stats.t.isf(tail, 2 * n_seeds - 1) / stats.t.isf(tail, n_seeds - 1) / np.sqrt(2))
    if not split.var_diff > ZERO_SPREAD**2:
        return float("nan"), seeds, MORE_SEEDS
    images = float(np.sqrt(split.var_train / split.var_diff))
    return images, seeds, MORE_IMAGES if images < seeds else MORE_SEEDS


def noise_table(runs: pd.DataFrame, comparisons: list[Comparison], predictions: dict[tuple[str, int], np.ndarray],
                y_test: np.ndarray | dict[int, np.ndarray], *, same_images: bool, alpha: float = 0.05) -> pd.DataFrame:
    """One row per comparison (NOISE_COLUMNS): the variance of its test-accuracy difference across the seeds both
    variants ran, split by `split_noise`, and `narrowing` at the verdicts' level 1 - alpha / m (the fixed design's).
    runs, predictions, y_test: as for `effects`. same_images: every seed scored the same test images (checked against
    the labels). Variances are fractions squared; var_diff equals the square of the effects table's sd_diff for test
    accuracy, the runs' test accuracy being the fraction of their test images right."""
    _check_runs(runs, ["variant", "seed", IMAGE_LEVEL_METRIC])
    if same_images and isinstance(y_test, dict):
        first = next(iter(y_test.values()))
        if any(not np.array_equal(first, labels) for labels in y_test.values()):
            raise AblationStatsError("the seeds were scored on different test images; they are not the same images")
    level = 1 - alpha / max(1, len(comparisons))
    rows = []
    for comparison in comparisons:
        seeds = _paired_metric(runs, comparison, IMAGE_LEVEL_METRIC)["seed"].tolist()
        diffs = [_right(predictions, comparison.with_, seed, y_test).astype(int)
                 - _right(predictions, comparison.without, seed, y_test).astype(int) for seed in seeds]
        split = split_noise(diffs, same_images)
        images, more_seeds, advice = narrowing(split, len(seeds), level)
        rows.append({"effect": comparison.effect, "with": comparison.with_, "without": comparison.without,
                     "metric": IMAGE_LEVEL_METRIC, "n_seeds": len(seeds), "n_images": split.n_images,
                     "same_images": same_images, "level": level, "var_diff": split.var_diff,
                     "var_test": split.var_test, "var_train": split.var_train,
                     "var_image_choice": split.var_image_choice,
                     "test_share": min(1.0, split.var_test / split.var_diff) if split.var_diff > ZERO_SPREAD**2
                     else float("nan"),
                     "width_more_images": images, "width_more_seeds": more_seeds, "advice": advice})
    return pd.DataFrame(rows, columns=NOISE_COLUMNS)


def _sd_pp(variance: float) -> str:
    return f"{100 * np.sqrt(variance):.2f} pp"


def noise_line(row: pd.Series | dict) -> str:
    """One line of a `noise_table` row: the split (shares of the variance, sds in pp) and what narrows more."""
    images = f"{row['n_images']:,.0f} test images {'shared by every seed' if row['same_images'] else 'per seed'}"
    head = (f"{row['effect']}: the test-accuracy difference varies across {row['n_seeds']} seeds with sd "
            f"{_sd_pp(row['var_diff'])} ({row['n_seeds'] - 1} df)")
    if pd.isna(row["test_share"]):
        return (f"{row['effect']}: every seed's test-accuracy difference is the same, no spread to split (test-set "
                f"sampling alone would give sd {_sd_pp(row['var_test'])} at {images}); {row['advice']}: only seeds "
                "decide it")
    share = float(row["test_share"])
    if share >= 1:
        split = (f"test-set sampling ({images}) alone gives sd {_sd_pp(row['var_test'])}, as much or more: no "
                 "training variance is measurable")
    else:
        split = (f"test-set sampling ({images}) is {share:.0%} of that variance (sd {_sd_pp(row['var_test'])}), "
                 f"training {1 - share:.0%} (sd {_sd_pp(row['var_train'])})")
    text = (f"{head}; {split}: {row['advice']} would narrow the interval more (unlimited test images: "
            f"{row['width_more_images']:.2f}x its width, no training; twice the seeds: {row['width_more_seeds']:.2f}x)")
    if row["same_images"] and pd.notna(row["var_image_choice"]):
        text += (f"; the choice of these images, the same in every seed, is not in the interval: another draw of as "
                 f"many would move the effect by about sd {_sd_pp(row['var_image_choice'])}")
    return text


def noise_markdown(noise: pd.DataFrame) -> str:
    """Every `noise_line` under a heading line, as markdown list items; "" when there is none."""
    if noise is None or noise.empty:
        return ""
    return ("Where the noise comes from (variance of each test-accuracy difference across seeds, split into test-set "
            "sampling and training):\n\n" + "\n".join(f"- {noise_line(row)}" for _, row in noise.iterrows()))


# ---------------------------------------------------------------------------
# What a run's training consumed (issue 31: `--budget` and the minutes are CPU- or GPU-minutes as the run measures
# them): the one place that decides which of a run's fit times counts

# the fit times `train` logs, in the order `compute_seconds` prefers them
FIT_METRICS = ("fit_gpu_seconds", "fit_cpu_seconds", "fit_seconds")
_KINDS = {"fit_gpu_seconds": "GPU", "fit_cpu_seconds": "CPU", "fit_seconds": "wall-clock"}
COMPUTE_TIME = ("CPU-minutes are the CPU time the training process spent in its fit (user + system, every thread), "
                "GPU-minutes the fit's wall time x the GPUs it trained on; a run logged before these were measured "
                "counts its wall-clock fit time")


def _measured(runs: pd.DataFrame) -> tuple[pd.Series, pd.Series]:
    """(seconds, the FIT_METRICS column each came from) per row of `runs`; NaN / None where none is logged."""
    seconds, source = np.full(len(runs), np.nan), np.full(len(runs), None, dtype=object)
    for column in reversed(FIT_METRICS):  # the preferred last: it overwrites
        if column in runs:
            values = pd.to_numeric(runs[column], errors="coerce").to_numpy(dtype=float)
            logged = ~np.isnan(values)
            seconds[logged], source[logged] = values[logged], column
    return pd.Series(seconds, index=runs.index), pd.Series(source, index=runs.index)


def compute_seconds(runs: pd.DataFrame) -> pd.Series:
    """Per run (row of `runs`), the seconds its training consumed: `fit_gpu_seconds` (the fit's wall time x the
    GPUs it trained on) where it logged that, else `fit_cpu_seconds` (its process's CPU time in the fit, user +
    system, every thread), else `fit_seconds` (the fit's wall-clock time: a run logged before the others were
    measured, reused from the store); NaN where it logged none. A missing column counts as not logged."""
    return _measured(runs)[0]


def compute_unit(runs: pd.DataFrame) -> str:
    """What `compute_seconds(runs)` sums, as a unit of minutes: "CPU-minutes", "GPU-minutes", "CPU- and
    GPU-minutes"; with "wall-clock minutes" where some runs count their wall-clock fit time (all of them: only
    that); "minutes" for no run."""
    kinds = {_KINDS[column] for column in _measured(runs)[1].dropna()}
    measured = [kind for kind in ("CPU", "GPU") if kind in kinds]
    unit = "CPU- and GPU-minutes" if len(measured) == 2 else "".join(f"{kind}-minutes" for kind in measured)
    if "wall-clock" in kinds:
        return f"{unit} and wall-clock minutes" if unit else "wall-clock minutes"
    return unit or "minutes"


def compute_minutes(runs: pd.DataFrame) -> float:
    """`compute_seconds` summed over `runs` (runs that logged none count 0), in minutes."""
    return float(np.nansum(compute_seconds(runs))) / 60


def compute_measure(runs: pd.DataFrame, over: str) -> str:
    """What `compute_minutes(runs)` is, in words: its unit, what it sums over (`over`) and what the units mean."""
    return f"{compute_unit(runs)}, summed over {over}: {COMPUTE_TIME}"


# ---------------------------------------------------------------------------
# Per comparison, what the ablation's parent run shows (issue 31, item 5)

COMPARISON_COLUMNS = ["effect", "metric", "verdict", "vs_min_effect", "n_seeds", "level", "mean_diff", "ci_low",
                      "ci_high", "fit_minutes", "fit_unit", "advice", "noise"]
MINUTES_MEANING = (f"{COMPUTE_TIME}; summed over the runs of the comparison's two variants at the seeds its verdict "
                   "used; a variant shared by several comparisons counts in each")
# an ablation logged before its runs' CPU and GPU time counted (its comparisons CSV has no fit_unit)
WALL_MINUTES_MEANING = ("training minutes: the fit time each run logs (wall-clock, on the CPU or GPU it trained on), "
                        "summed over the runs of the comparison's two variants at the seeds its verdict used; a "
                        "variant shared by several comparisons counts in each")


def minutes_meaning(summary: pd.DataFrame) -> str:
    """What the minutes of a `comparison_summary` (this one's, or one an ablation logged earlier) are."""
    return MINUTES_MEANING if "fit_unit" in summary else WALL_MINUTES_MEANING


def comparison_summary(effects: pd.DataFrame, noise: pd.DataFrame | None, fit: pd.DataFrame) -> pd.DataFrame:
    """One row per verdict row of `effects` (COMPARISON_COLUMNS): its verdict, seeds, interval and level, the training
    minutes its verdict cost (`compute_seconds` of its runs, in `fit_unit`) and the noise split's advice and line
    (blank without a `noise_table`).
    fit: one row per (variant, seed) run with columns variant, seed and the FIT_METRICS it logged (at least one of
    them). The seeds a verdict used are the
    first n_seeds of those both variants ran, in ascending order (all of them in a fixed design, the look's in a
    sequential one)."""
    lines = {} if noise is None or noise.empty else {row["effect"]: row for _, row in noise.iterrows()}
    rows = []
    for _, row in effects[effects["role"] == VERDICT].iterrows():
        sides = [fit[fit["variant"] == variant] for variant in (row["with"], row["without"])]
        seeds = sorted(set(sides[0]["seed"]) & set(sides[1]["seed"]))[:int(row["n_seeds"])]
        used = pd.concat([side[side["seed"].isin(seeds)] for side in sides])
        found = lines.get(row["effect"])
        rows.append({**{key: row[key] for key in ("effect", "metric", "verdict", "vs_min_effect", "level",
                                                  "mean_diff", "ci_low", "ci_high")},
                     "n_seeds": int(row["n_seeds"]), "fit_minutes": compute_minutes(used),
                     "fit_unit": compute_unit(used),
                     "advice": "" if found is None else found["advice"],
                     "noise": "" if found is None else noise_line(found)})
    return pd.DataFrame(rows, columns=COMPARISON_COLUMNS)


_VERSUS = {"clears": "clears min-effect", "below": "below min-effect", "not known": "min-effect not known"}


MIXED_UNITS = "CPU/GPU-minutes"  # the minutes column's header where comparisons differ in unit


def minutes_header(summary: pd.DataFrame) -> str:
    """The minutes column's header: the unit every comparison's minutes share ("CPU-minutes", ...), else
    "CPU/GPU-minutes" (each cell names its own); "training minutes (wall-clock)" for an ablation logged before."""
    if "fit_unit" not in summary:
        return "training minutes (wall-clock)"
    units = summary["fit_unit"].dropna().unique()
    return str(units[0]) if len(units) == 1 else MIXED_UNITS


def comparison_text(summary: pd.DataFrame) -> pd.DataFrame:
    """`comparison_summary` as text cells: effect, verdict (with vs min-effect), seeds, the difference and its
    interval in pp with the interval's level, the CPU- or GPU-minutes its verdict cost (`minutes_header`), and
    what narrows the interval more."""
    header = minutes_header(summary)
    minutes = summary["fit_minutes"].map(lambda m: f"{m:.1f}")
    if header == MIXED_UNITS:
        minutes = minutes + " " + summary["fit_unit"].astype(str)
    return pd.DataFrame({
        "effect": summary["effect"],
        "verdict": [f"{v} ({_VERSUS[m]})" if m in _VERSUS else str(v)
                    for v, m in zip(summary["verdict"], summary["vs_min_effect"].fillna(""))],
        "seeds": summary["n_seeds"].astype(str),
        "difference, pp [interval]": [f"{interval_text(*r)} at {100 * lv:.4g}%" for *r, lv in
                                      zip(summary["mean_diff"], summary["ci_low"], summary["ci_high"], summary["level"])],
        header: minutes,
        "narrows more": summary["advice"].fillna("")})


def comparison_markdown(summary: pd.DataFrame) -> str:
    """`comparison_text` as a markdown table, with what the minutes are under it."""
    return (comparison_text(summary).to_markdown(index=False, disable_numparse=True)
            + f"\n\nMinutes: {minutes_meaning(summary)}.")
