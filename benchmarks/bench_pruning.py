"""Pruner settings replayed on stored learning curves: which setting keeps the best at the fewest epochs.

    .venv/bin/python benchmarks/bench_pruning.py [--tuning benchmarks/results/tuning.json]

Reads the unpruned studies of `bench_tuning.py` (every trial's val_accuracy after every epoch) and replays
each pruner setting of the grid below on each of them with `cifar_mlops.tune.replay_pruning`: the trials
are told to a fresh Optuna study in their order, one epoch at a time, so the pruner sees only the values
up to each epoch, as in a one-worker `tune` with the same seeded random sampler. Nothing is retrained:
the whole grid takes seconds. Confirm the chosen setting with real pruned studies
(`bench_tuning.py --pruners ...`).
Target (per sampler seed): the pruned best within 1 percentage point of the unpruned best, at <= 40% of
the unpruned study's epochs. A setting is ranked by the seeds that meet it, then by its worst seed's loss
against the unpruned best, then by its worst seed's share of the epochs.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import common

GAP_PP, SHARE = 1.0, 0.40  # the target


def label(pruner: str, overrides: dict) -> str:
    short = {"search.pruning_startup_trials": "startup", "search.pruning_warmup_epochs": "warmup",
             "search.pruning_percentile": "keep%", "search.pruning_reduction_factor": "factor"}
    return pruner + " " + " ".join(f"{short[k]}={v}" for k, v in overrides.items())


# the settings `tune` used before this benchmark, always shown for comparison
FORMER_DEFAULTS = {label("median", {"search.pruning_startup_trials": 5, "search.pruning_warmup_epochs": 1}),
                label("successive-halving", {"search.pruning_warmup_epochs": 1, "search.pruning_reduction_factor": 3})}


def grid() -> list[tuple[str, dict]]:
    """(pruner, search.pruning_* overrides) for every setting tried."""
    settings: list[tuple[str, dict]] = []
    for startup, warmup in itertools.product((1, 2, 3, 5), (0, 1, 2, 3, 4)):
        base = {"search.pruning_startup_trials": startup, "search.pruning_warmup_epochs": warmup}
        settings.append(("median", base))
        settings += [("percentile", {**base, "search.pruning_percentile": p}) for p in (20, 25, 33, 40)]
    for warmup, factor in itertools.product((1, 2, 3, 4), (2, 3, 4)):
        base = {"search.pruning_warmup_epochs": warmup, "search.pruning_reduction_factor": factor}
        settings += [("successive-halving", base), ("hyperband", base)]
    return settings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tuning", default=str(common.RESULTS / "tuning.json"))
    parser.add_argument("--top", type=int, default=12, help="settings printed")
    args = parser.parse_args()

    from cifar_mlops import config as cfg
    from cifar_mlops import tune

    tuning = json.loads(Path(args.tuning).read_text())
    studies = [r for r in tuning["results"] if r["pruner"] == "none"]
    missing = [r["seed"] for r in studies if any("curve" not in t for t in r["per_trial"])]
    if missing or not studies:
        sys.exit(f"{args.tuning}: the unpruned studies of seeds {missing or 'any'} have no learning curves; "
                 "run bench_tuning.py --pruners none --merge first")
    base_overrides = cfg.parse_overrides(tuning["overrides"])
    curves = {r["seed"]: [tune.Curve(tuple(t["curve"]), t["value"]) for t in r["per_trial"]
                          if t["state"] == "COMPLETE"] for r in studies}

    rows = []
    for pruner, overrides in grid():
        config = cfg.resolve(tuning["exp"], {**base_overrides, **overrides})
        per_seed = []
        for seed, trials in sorted(curves.items()):
            replayed = tune.replay_pruning(trials, pruner, config)
            full = sum(len(c.values) for c in trials)
            best = max(c.value for c in trials)
            share, gap = sum(replayed.epochs) / full, 100 * (best - replayed.best_value)
            per_seed.append({"seed": seed, "epochs": sum(replayed.epochs), "of_unpruned": share,
                             "pruned": sum(replayed.pruned), "gap_pp": gap,
                             "met": gap <= GAP_PP and share <= SHARE})
        rows.append({"pruner": pruner, "overrides": overrides, "label": label(pruner, overrides),
                     "former_default": label(pruner, overrides) in FORMER_DEFAULTS,
                     "seeds_met": sum(s["met"] for s in per_seed),
                     "worst_share": max(s["of_unpruned"] for s in per_seed),
                     "worst_gap_pp": max(s["gap_pp"] for s in per_seed), "per_seed": per_seed})
    # keeping the best first: among settings meeting the target as often, the smallest worst-seed loss, then the
    # fewest epochs
    rows.sort(key=lambda r: (-r["seeds_met"], round(r["worst_gap_pp"], 2), r["worst_share"]))
    shown = rows[:args.top] + [r for r in rows[args.top:] if r["label"] in FORMER_DEFAULTS]
    seeds = sorted(curves)
    common.print_table(
        ["setting", "seeds met", *[f"seed {s}: epochs, gap pp" for s in seeds]],
        [[r["label"] + (" (former default)" if r["label"] in FORMER_DEFAULTS else ""), f"{r['seeds_met']} of {len(seeds)}",
          *[f"{100 * s['of_unpruned']:.0f}%, {s['gap_pp']:+.2f}" for s in r["per_seed"]]] for r in shown])
    common.write_result("pruning", {"tuning": common.repo_relative(args.tuning), "exp": tuning["exp"],
                                    "overrides": tuning["overrides"], "seeds": seeds,
                                    "target": {"gap_pp": GAP_PP, "epochs_share": SHARE}, "settings": rows})


if __name__ == "__main__":
    sys.exit(main())
