"""Issue 31's calibration and cost of the ablation verdicts, by simulation through the project's own statistics.

    .venv/bin/python benchmarks/bench_verdicts.py [--sims 10000] [--cost-sims 20000] [--seed 31]

No training: numpy only. Each simulated ablation compares one change (a family of m = 1; with m comparisons every
rate below is per comparison at alpha / m). Per seed, the paired difference of test accuracy is
effect + N(0, spread), rounded to the 1 / images grid that accuracies on that many test images live on (equal
differences across seeds, the degenerate case, happen as on real runs). `spread` is the seed-to-seed sd of the
paired difference, everything included (training and test-set sampling). The verdicts are those of
`cifar_mlops.ablation_stats`: a fixed design of n seeds is `paired_intervals` at 1 - alpha then `verdicts`
(what `ablate --seeds n` does for one comparison); the sequential design is `sequential_decisions` with
`SequentialDesign(max_seeds)` (looks at 3, 4, ..., max seeds; what `sequential_step` decides round by round, which
`--check` replays through `sequential_step` itself on a subsample).

Grid: spread 0.35, 0.8, 1.5, 2.4 pp; 1,000 and 10,000 test images; true effect 0, +-min-effect (1 pp), 2 x spread;
fixed 2, 3, 5, 8, 12 seeds and sequential up to 12. `--designs`: the cost alone, at 1.5 pp, for caps 12, 16, 24,
first looks at 2 and 3 seeds and spending exponents rho 1 (Pocock-like) to 3 (O'Brien-Fleming-like). Targets (alpha = 0.05): a wrong-direction decision ("helps"
when the effect is <= 0, "hurts" when >= 0) at most alpha / 2 per side; "equivalent" at a true effect of
+-min-effect at most alpha; at a true effect equal to the spread, the sequential design's expected seeds at most 70 %
of what a fixed design with the same power needs (the fixed design's power curve simulated the same way, n = 2..80).
A rate "meets" its target unless its Clopper-Pearson interval lies wholly above it; the intervals are
Bonferroni-adjusted over every rate judged (level 1 - 0.05 / K, K rates), so that a table of hundreds of rates at
their targets does not read "missed" by chance. Each design's rates pooled over the 8 (spread, images) settings
are reported beside the worst setting.
"""

from __future__ import annotations

import argparse
import sys
import time

import common
import numpy as np
import pandas as pd
from scipy import stats

from cifar_mlops import ablation_stats as ab

ALPHA = 0.05
MIN_EFFECT = 0.01  # 1 pp, the default --min-effect
SPREADS_PP = (0.35, 0.8, 1.5, 2.4)
IMAGES = (1000, 10_000)
FIXED_SEEDS = (2, 3, 5, 8, 12)
MAX_SEEDS = 12
COST_CAPS = (12, 24)  # the sequential design's cap in the cost table (12: the default --max-seeds)
FIXED_CURVE = range(2, 81)
SWEEP_CAPS, SWEEP_FIRST, SWEEP_RHO = (12, 16, 24), (2, 3), (1.0, 1.5, 2.0, 3.0)  # --designs


def differences(rng: np.random.Generator, effect: float, spread: float, images: int, sims: int, seeds: int
                ) -> np.ndarray:
    """(sims, seeds) paired differences of accuracy: effect + N(0, spread), on the 1 / images grid."""
    return np.round((effect + spread * rng.standard_normal((sims, seeds))) * images) / images


def fixed(diffs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The fixed design on all of `diffs`' seeds: (verdict, degenerate) per simulated ablation."""
    _, low, high, _, degenerate = ab.paired_intervals(diffs, 1 - ALPHA)
    return ab.verdicts(low, high, MIN_EFFECT), degenerate


def sequential(diffs: np.ndarray, cap: int, **design) -> tuple[np.ndarray, np.ndarray]:
    """The sequential design up to `cap` seeds (`design`: SequentialDesign's first, step, rho; default the tool's)."""
    verdict, used, *_ = ab.sequential_decisions(diffs, ab.SequentialDesign(max_seeds=cap, alpha=ALPHA, **design), 1,
                                                MIN_EFFECT)
    return verdict, used


def clopper_pearson(count: int, total: int, level: float = 0.95) -> tuple[float, float]:
    interval = stats.binomtest(count, total).proportion_ci(level, method="exact")
    return float(interval.low), float(interval.high)


def correct(verdict: np.ndarray, effect: float) -> np.ndarray:
    """The decisions that are right about `effect`: its direction, or equivalence when it is inside the band."""
    right = verdict == (ab.HELPS if effect > 0 else ab.HURTS) if effect != 0 else np.zeros(verdict.shape, bool)
    return right | ((verdict == ab.EQUIVALENT) & (abs(effect) < MIN_EFFECT))


def calibration(rng: np.random.Generator, sims: int) -> list[dict]:
    rows = []
    for spread_pp in SPREADS_PP:
        spread = spread_pp / 100
        for images in IMAGES:
            for label, effect in (("0", 0.0), ("+min-effect", MIN_EFFECT), ("-min-effect", -MIN_EFFECT),
                                  ("2 x spread", 2 * spread)):
                diffs = differences(rng, effect, spread, images, sims, MAX_SEEDS)
                designs = [(f"fixed {n}", *fixed(diffs[:, :n]), np.full(sims, n)) for n in FIXED_SEEDS]
                verdict, used = sequential(diffs, MAX_SEEDS)
                designs.append((f"sequential <= {MAX_SEEDS}", verdict, np.zeros(sims, bool), used))
                for design, verdict, degenerate, used in designs:
                    counts = {v: int(np.sum(verdict == v)) for v in (ab.HELPS, ab.HURTS, ab.EQUIVALENT, ab.INCONCLUSIVE)}
                    row = {"spread_pp": spread_pp, "images": images, "effect": label, "effect_pp": 100 * effect,
                           "design": design, "sims": sims, **{f"p_{v}": c / sims for v, c in counts.items()},
                           "mean_seeds": float(np.mean(used)), "degenerate": float(np.mean(degenerate))}
                    sides = ([ab.HELPS, ab.HURTS] if effect == 0 else [ab.HURTS] if effect > 0 else [ab.HELPS])
                    for side in sides:
                        row[f"wrong_{side}"] = counts[side] / sims
                    if abs(effect) == MIN_EFFECT:
                        row["equivalent"] = counts[ab.EQUIVALENT] / sims
                    rows.append(row)
    judged = [(row, key, ALPHA if key == "equivalent" else ALPHA / 2) for row in rows
              for key in ("wrong_helps", "wrong_hurts", "equivalent") if key in row]
    level = 1 - 0.05 / len(judged)
    for row, key, target in judged:
        row[f"{key}_ci"] = clopper_pearson(round(row[key] * row["sims"]), row["sims"], level)
        row[f"{key}_met"] = row[f"{key}_ci"][0] <= target
        row["ci_level"] = level
    return rows


def pooled(rows: list[dict]) -> dict[str, dict]:
    """Per design, each judged rate pooled over the (spread, images) settings: rate, 95 % interval, met."""
    found: dict[str, dict] = {}
    for design in dict.fromkeys(r["design"] for r in rows):
        mine = [r for r in rows if r["design"] == design]
        out = {}
        for name, keys, target in (("helps, no effect", [("0", "wrong_helps")], ALPHA / 2),
                                   ("hurts, no effect", [("0", "wrong_hurts")], ALPHA / 2),
                                   ("wrong direction, effect != 0", [(e, k) for e in ("+min-effect", "-min-effect",
                                                                                       "2 x spread")
                                                                     for k in ("wrong_helps", "wrong_hurts")], ALPHA / 2),
                                   ("equivalent, effect +-min-effect", [("+min-effect", "equivalent"),
                                                                        ("-min-effect", "equivalent")], ALPHA)):
            hits = [(round(r[k] * r["sims"]), r["sims"]) for r in mine for e, k in keys if r["effect"] == e and k in r]
            count, total = sum(h for h, _ in hits), sum(n for _, n in hits)
            interval = clopper_pearson(count, total)
            out[name] = {"rate": count / total, "ci": interval, "target": target, "met": interval[0] <= target,
                         "sims": total}
        found[design] = out
    return found


def seeds_for_power(curve: dict[int, float], power: float) -> float:
    """Seeds a fixed design needs for `power`, linear between the simulated n on either side (inf past the curve)."""
    ns = sorted(curve)
    for lower, upper in zip(ns, ns[1:]):
        if curve[upper] >= power:
            if curve[lower] >= power:
                return float(lower)
            return lower + (power - curve[lower]) / (curve[upper] - curve[lower]) * (upper - lower)
    return float("inf")


def fixed_power_curve(rng: np.random.Generator, effect: float, spread: float, images: int, sims: int
                      ) -> dict[int, float]:
    """The fixed design's power (share of correct decisions) at each n of FIXED_CURVE."""
    return {n: float(np.mean(correct(fixed(differences(rng, effect, spread, images, sims, n))[0], effect)))
            for n in FIXED_CURVE}


def sequential_cost(rng: np.random.Generator, effect: float, spread: float, images: int, sims: int,
                    curve: dict[int, float], cap: int, **design) -> dict:
    """The sequential design's power and mean seeds at `effect`, beside the fixed design's seeds for that power."""
    verdict, used = sequential(differences(rng, effect, spread, images, sims, cap), cap, **design)
    power, mean_seeds = float(np.mean(correct(verdict, effect))), float(np.mean(used))
    same = seeds_for_power(curve, power)
    return {"max_seeds": cap, "sims": sims, "power": power, "mean_seeds": mean_seeds, "fixed_seeds_same_power": same,
            "ratio": mean_seeds / same, "met": mean_seeds / same <= 0.7, "fixed_seeds_80": seeds_for_power(curve, 0.8),
            "fixed_power_at_cap": curve[cap]}


def cost(rng: np.random.Generator, sims: int) -> list[dict]:
    rows = []
    for spread_pp in SPREADS_PP:
        spread = spread_pp / 100
        for images in IMAGES:
            curve = fixed_power_curve(rng, spread, spread, images, sims)
            for cap in COST_CAPS:
                rows.append({"spread_pp": spread_pp, "images": images, "effect_pp": spread_pp,
                             **sequential_cost(rng, spread, spread, images, sims, curve, cap)})
    return rows


def design_sweep(rng: np.random.Generator, sims: int, spread_pp: float = 1.5, images: int = 1000) -> list[dict]:
    """The cost target against the design's free choices, at one setting (true effect = spread = `spread_pp`):
    every cap of SWEEP_CAPS, first look of SWEEP_FIRST and spending exponent of SWEEP_RHO."""
    spread = spread_pp / 100
    curve = fixed_power_curve(rng, spread, spread, images, sims)
    return [{"spread_pp": spread_pp, "images": images, "effect_pp": spread_pp, "first": first, "rho": rho,
             **sequential_cost(rng, spread, spread, images, sims, curve, cap, first=first, rho=rho)}
            for cap in SWEEP_CAPS for first in SWEEP_FIRST for rho in SWEEP_RHO]


def check_against_sequential_step(rng: np.random.Generator, sims: int) -> dict:
    """Replay `sims` sequential ablations round by round through `sequential_step` on per-(variant, seed) runs, as
    `ablate --seeds auto` would: same verdicts and seeds as `sequential_decisions`?"""
    design = ab.SequentialDesign(max_seeds=MAX_SEEDS, alpha=ALPHA)
    comparison = ab.Comparison("change", "with", "without")
    agree = 0
    spread = 0.015
    for _ in range(sims):
        diffs = differences(rng, spread, spread, 1000, 1, MAX_SEEDS)[0]
        base = 0.8 + 0.01 * rng.standard_normal(MAX_SEEDS)
        seeds = design.looks[0]
        while True:
            runs = pd.DataFrame([{"variant": v, "seed": s, "test_accuracy": base[s] + (diffs[s] if v == "with" else 0)}
                                 for s in range(seeds) for v in ("with", "without")])
            state = ab.sequential_step(runs, [comparison], design, min_effect=MIN_EFFECT)
            if state.done:
                break
            seeds = state.next_seeds
        verdict, used = sequential(diffs[None, :], MAX_SEEDS)
        row = state.table.iloc[0]
        agree += bool(row["verdict"] == verdict[0] and row["n_seeds"] == used[0])
    return {"sims": sims, "agree": agree, "spread_pp": 1.5, "effect_pp": 1.5, "images": 1000}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sims", type=int, default=20_000, help="simulated ablations per calibration setting")
    parser.add_argument("--cost-sims", type=int, default=20_000, help="per cost setting and fixed-curve point")
    parser.add_argument("--check", type=int, default=200, help="ablations replayed through sequential_step")
    parser.add_argument("--seed", type=int, default=31)
    parser.add_argument("--designs", action="store_true",
                        help="only the cost of other designs (cap, first look, spending): results/verdicts_designs.json")
    args = parser.parse_args()
    before = common.load_snapshot()
    rng = np.random.default_rng(args.seed)
    if args.designs:
        started = time.perf_counter()
        rows = design_sweep(rng, args.cost_sims)
        common.print_table(["cap", "first look", "rho", "power", "mean seeds", "fixed seeds, same power", "ratio"],
                           [[r["max_seeds"], r["first"], f"{r['rho']:g}", f"{r['power']:.3f}", f"{r['mean_seeds']:.2f}",
                             f"{r['fixed_seeds_same_power']:.2f}", f"{r['ratio']:.2f}"] for r in rows])
        common.write_result("verdicts_designs", {
            "alpha": ALPHA, "min_effect_pp": 100 * MIN_EFFECT, "tool_design": {"first": ab.SequentialDesign().first, "rho": ab.SPENDING_RHO},
            "designs": rows, "total_s": round(time.perf_counter() - started, 1), "load_before": before,
            "load_after": common.load_snapshot()})
        return
    started = time.perf_counter()
    boundaries = {cap: ab.t_boundaries(ab.SequentialDesign(max_seeds=cap).looks, cap, ALPHA).tolist()
                  for cap in COST_CAPS}
    rows = calibration(rng, args.sims)
    calibration_s = time.perf_counter() - started
    costs = cost(rng, args.cost_sims)
    check = check_against_sequential_step(rng, args.check)
    total_s = time.perf_counter() - started
    for r in rows:
        if r["design"].startswith("sequential") or r["design"] == "fixed 5":
            wrong = ", ".join(f"{k[6:]} {r[k]:.4f}" for k in r if k.startswith("wrong_") and not k.endswith(("ci", "met")))
            print(f"{r['spread_pp']} pp {r['images']} img effect {r['effect']:>12} {r['design']:>16}: "
                  f"wrong {wrong or '-'}; equivalent {r['p_equivalent']:.4f}; seeds {r['mean_seeds']:.2f}")
    for c in costs:
        print(f"cost {c['spread_pp']} pp {c['images']} img cap {c['max_seeds']}: power {c['power']:.3f}, "
              f"E[seeds] {c['mean_seeds']:.2f}, fixed same power {c['fixed_seeds_same_power']:.1f}, "
              f"ratio {c['ratio']:.2f}")
    print(f"sequential_step replay: {check['agree']}/{check['sims']} agree; {total_s:.0f} s", file=sys.stderr)
    common.write_result("verdicts", {
        "alpha": ALPHA, "min_effect_pp": 100 * MIN_EFFECT, "max_seeds": MAX_SEEDS, "spreads_pp": list(SPREADS_PP),
        "images": list(IMAGES), "fixed_seeds": list(FIXED_SEEDS), "cost_caps": list(COST_CAPS),
        "spending": f"Lan-DeMets, alpha * t**{ab.SPENDING_RHO:g}, looks at 3..max seeds",
        "t_boundaries": boundaries, "calibration": rows, "pooled": pooled(rows), "cost": costs,
        "sequential_step_check": check,
        "calibration_s": round(calibration_s, 1), "total_s": round(total_s, 1),
        "load_before": before, "load_after": common.load_snapshot()})


if __name__ == "__main__":
    main()
