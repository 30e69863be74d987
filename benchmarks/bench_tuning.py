"""Item 6, tuning efficiency: the same 20-trial search with and without pruning.

    .venv/bin/python benchmarks/bench_tuning.py [--exp b3] [--trials 20] [--seeds 0,1,2] [--sampler random]
        [--pruners none,median,successive-halving] [--set KEY=VALUE ...] [--merge]

Runs `cifar-mlops tune --exp EXP --trials N --seed S --sampler SAMPLER --pruner P` once per sampler seed
and pruner (fresh Optuna SQLite storage and MLflow store each), then reads the studies back: total epochs
run (sum over trials of the epochs each reported), best validation accuracy, trials pruned, and each
trial's learning curve (its val_accuracy after every epoch: `bench_pruning.py` replays pruner settings on
the unpruned studies' curves); each pruned study is compared with the unpruned study of the same seed.
"The same search" is meant literally by default: the seeded random sampler proposes the same 20
configurations whatever the pruner does, so the studies differ only in what pruning cut. With
`--sampler tpe` every pruned curve changes what TPE proposes next, and the studies drift apart.
Default: b3 (study B's batch-normalised CNN: ~3 s per epoch here, a third of b5's) on the real CIFAR-10
sample (3,336 / 834 split) with search.epochs narrowed to 5-15, so the three studies of one seed take
about 17 minutes here; `--exp smoke` runs in minutes on synthetic data. Each trial's state, epochs and value go to the JSON.
Target: pruned best within 1 percentage point of the unpruned best, at <= 40% of its epochs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import common


def run_study(args: argparse.Namespace, optuna, seed: int, pruner: str, sets: list[str]) -> dict:
    """One `cifar-mlops tune` study in a fresh store, read back from its Optuna storage."""
    with common.tempdir(f"tuning-{pruner}") as tmp:
        env = common.temp_env(tmp)
        storage = f"sqlite:///{Path(tmp) / 'optuna.db'}"
        study_name = f"bench-{args.exp}-{pruner}"
        cmd = [common.CLI, "tune", "--exp", args.exp, "--trials", str(args.trials), "--seed", str(seed),
               "--sampler", args.sampler, "--pruner", pruner, "--study", study_name, "--storage", storage,
               *[a for s in sets for a in ("--set", s)]]
        if args.exp.startswith("b"):
            cmd += ["--data-dir", args.data_dir]
        wall, _ = common.timed_run(cmd, env=env, cwd=tmp)
        study = optuna.load_study(study_name=study_name, storage=storage)
        trials, best = study.trials, study.best_trial  # read before the storage's folder goes
    states = [t.state.name for t in trials]
    return {"seed": seed, "pruner": pruner, "wall_s": round(wall, 1), "trials": len(trials),
            "pruned": states.count("PRUNED"), "complete": states.count("COMPLETE"), "failed": states.count("FAIL"),
            "epochs_run": sum(len(t.intermediate_values) for t in trials),
            "best_val_accuracy": best.value, "best_params": best.params, "best_trial": best.number,
            "per_trial": [{"number": t.number, "state": t.state.name, "epochs": len(t.intermediate_values),
                           "value": t.value if t.value is not None else
                           (max(t.intermediate_values.values()) if t.intermediate_values else None),
                           "params": t.params,
                           # val_accuracy after each epoch, in order: what bench_pruning.py replays pruners on
                           "curve": [t.intermediate_values[step] for step in sorted(t.intermediate_values)]}
                          for t in trials],
            "loadavg": common.loadavg()[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--exp", default="b3")
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--seeds", default="0,1,2", help="sampler seeds: one search (and its pruned twins) per seed")
    parser.add_argument("--sampler", default="random", choices=["random", "tpe"])
    parser.add_argument("--pruners", default="none,median,successive-halving")
    parser.add_argument("--merge", action="store_true",
                        help="keep results/tuning.json studies (seed, pruner) not rerun (same exp, trials, sampler)")
    parser.add_argument("--set", action="append", default=None,
                        help="overrides; default for study B: the sample split and search.epochs 5-15")
    parser.add_argument("--data-dir", default=str(common.SAMPLE_DIR))
    args = parser.parse_args()
    sets = args.set
    if sets is None:
        sets = ([f"{k}={v}" for k, v in common.SAMPLE_SPLIT.items()] + ["search.epochs.low=5", "search.epochs.high=15"]
                if args.exp.startswith("b") else [])

    import optuna

    before = common.load_snapshot()
    results = []
    for seed in [int(x) for x in args.seeds.split(",")]:
        for pruner in args.pruners.split(","):
            results.append(run_study(args, optuna, seed, pruner, sets))
            print(results[-1], file=sys.stderr)
    after = common.load_snapshot()
    setting = {"exp": args.exp, "trials": args.trials, "sampler": args.sampler, "overrides": sets}
    previous = common.RESULTS / "tuning.json"
    if args.merge and previous.exists():
        old = json.loads(previous.read_text())
        if all(old.get(k) == v for k, v in setting.items()):
            rerun = {(r["seed"], r["pruner"]) for r in results}
            kept = [{**r, "seed": r.get("seed", old.get("seed"))} for r in old["results"]]
            results = [r for r in kept if (r["seed"], r["pruner"]) not in rerun] + results
        else:
            print("--merge: results/tuning.json has another setting; not merged", file=sys.stderr)
    results.sort(key=lambda r: r["seed"])
    rows = []
    for r in results:
        base = next((b for b in results if b["pruner"] == "none" and b["seed"] == r["seed"]), None)
        share = r["epochs_run"] / base["epochs_run"] if base else None
        gap = 100 * (base["best_val_accuracy"] - r["best_val_accuracy"]) if base else None
        r["epochs_share_of_unpruned"], r["best_gap_pp"] = share, gap
        r["target_met"] = None if r is base or base is None else (gap <= 1.0 and share <= 0.40)
        rows.append([r["seed"], r["pruner"], r["trials"], r["pruned"], r["epochs_run"],
                     f"{100 * share:.0f}%" if share else "-", f"{100 * r['best_val_accuracy']:.2f}",
                     f"{gap:+.2f}" if gap is not None else "-", f"{r['wall_s'] / 60:.1f}"])
    common.print_table(["seed", "pruner", "trials", "pruned", "epochs run", "of unpruned", "best val acc %",
                        "gap to unpruned (pp)", "wall min"], rows)
    setting["seeds"] = sorted({r["seed"] for r in results})
    common.write_result("tuning", {**setting, "results": results, "load_before": before, "load_after": after})


if __name__ == "__main__":
    sys.exit(main())
