"""Issue 31's targets on real images: an identical copy of an experiment and a 1000x lower learning rate, planted.

    .venv/bin/python benchmarks/bench_verdicts_real.py [--exp b1] [--epochs N] [--max-seeds 12] [--data-dir SAMPLE]

What it runs, as a user would, in a fresh subprocess with a throwaway MLflow store (the temp folder is its working
directory):

1. A copy of the catalogue with the two planted enhancements of `common.planted_catalogue` (the same as
   `bench_select.py`'s), named by `$CIFAR_MLOPS_EXPERIMENTS`: `planted_too_low_lr`, the start's learning rate / 1000,
   and `planted_noop`, `train.momentum: 0.9`. For b0 the copy is identical in effect: b0 trains with Adam, which
   has no momentum (`train.build_optimizer` passes it to SGD only), and 0.9 is already the default; the resolved
   config differs from b0's only in the enhancement's name (recorded below: `noop_config_diff`).
2. The exact command (add-one adds to `--exp`'s parent: `--exp b0 --design add-one` is refused, "b0 has no parent",
   so the default `--exp b1` compares b0, b0 +planted_noop and b0 +planted_too_low_lr):

       cifar-mlops ablate --exp b1 --design add-one --enhancements planted_noop,planted_too_low_lr --seeds auto
           --max-seeds 12 --data-dir SAMPLE --set data.train_size=3336 --set data.val_size=834 [--set train.epochs=N]

   SAMPLE is `common.SAMPLE_DIR` (4,170 training images split 3,336 / 834 by the seed, the 1,000-image test batch).
   The product's defaults otherwise: alpha 0.05, min-effect 1 pp, test_accuracy, seeded split, one worker.

Recorded (results/verdicts_real.json): its wall and CPU minutes (user + sys of the subprocess and its children: both
cores count), its stdout (the printed tables, the verdict table among them) and the round lines it logs; read back
from the store: every (variant, seed) run's metrics and the parameters that differ between variants, the parent
run's per-comparison tags and metrics (verdict, interval, seeds, fit minutes) and its `ablation_comparisons.csv`;
per seed, whether b0 and its planted copy predicted every test image alike; each comparison's interval recomputed
with scipy from the child runs (the paired t-interval at the logged level, on the seeds the verdict used).
The targets are printed and recorded, never asserted: `planted_noop` ends `equivalent` or `inconclusive`;
`planted_too_low_lr` ends `hurts` at the first look (the design's first seed count).

Shortened: `--epochs N` trains every variant N epochs (b0's own is 20) and `--max-seeds` caps the seeds; RESULTS.md
says so when either is used. The full run trains up to 3 x 12 b0 runs of about 40 CPU-seconds each here.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shlex
import sys
from pathlib import Path

import common
import numpy as np

METRIC = "test_accuracy"
NOOP, LOW_LR = "planted_noop", "planted_too_low_lr"
PARAMS = ("train.optimizer", "train.learning_rate", "train.momentum", "train.epochs", "train.seed", "data.seed")


def noop_config_diff(start: str) -> list[str]:
    """The lines in which the resolved config of `start` +planted_noop differs from `start`'s (seed 0)."""
    import difflib

    from cifar_mlops import ablate as ablation
    from cifar_mlops import config as cfg

    base = ablation.Variant(start, start).config({}, 0)
    copy = ablation.Variant(f"{start} +{NOOP}", start, (*base.enhancements, NOOP)).config({}, 0)
    return [line for line in difflib.unified_diff(cfg.to_yaml(base).splitlines(), cfg.to_yaml(copy).splitlines(),
                                                  lineterm="", n=0) if line[:1] in "+-" and line[:3] not in ("+++", "---")]


def read_ablation(tracking_uri: str) -> dict:
    """The parent run (tags, metrics, comparisons table) and every (variant, seed) run with its metrics."""
    import mlflow
    import pandas as pd
    from mlflow import MlflowClient

    from cifar_mlops.evaluation import TEST_PREDICTIONS

    mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name("cifar10-ablation").experiment_id
    [parent] = client.search_runs([experiment], filter_string="tags.kind = 'ablation'")
    comparisons = pd.read_csv(io.StringIO(mlflow.artifacts.load_text(
        f"runs:/{parent.info.run_id}/ablation_comparisons.csv")))
    children = client.search_runs([experiment], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
                                  max_results=5000)
    runs, predictions = [], {}
    for child in children:
        tags, params = child.data.tags, child.data.params
        runs.append({"variant": tags.get("variant"), "seed": int(tags.get("seed", -1)), "run_id": child.info.run_id,
                     "status": child.info.status,
                     **{k: v for k, v in sorted(child.data.metrics.items()) if not k.startswith("epoch_")},
                     "params": {k: params.get(k) for k in PARAMS}})
        table = pd.read_csv(io.StringIO(mlflow.artifacts.load_text(f"runs:/{child.info.run_id}/{TEST_PREDICTIONS}")))
        predictions[(tags.get("variant"), int(tags.get("seed", -1)))] = table.sort_values("test_index")["predicted"
                                                                                                           ].to_numpy()
    runs.sort(key=lambda r: (r["seed"], r["variant"]))
    ours = ("verdict", "interval", "noise", "difference_pp", "ci_low_pp", "ci_high_pp", "seeds", "fit_minutes")
    return {"run_id": parent.info.run_id, "status": parent.info.status,
            "tags": {k: v for k, v in sorted(parent.data.tags.items()) if not k.startswith("mlflow.")},
            "metrics": dict(sorted(parent.data.metrics.items())),
            "per_comparison": {effect: {key: parent.data.tags.get(f"{effect}/{key}",
                                                                  parent.data.metrics.get(f"{effect}/{key}"))
                                        for key in ours} for effect in comparisons["effect"]},
            "comparisons": json.loads(comparisons.to_json(orient="records")),  # an unbounded end: null
            "runs": runs}, predictions


def recompute(runs: list[dict], comparison: dict, start: str) -> dict:
    """The comparison's paired t-interval at its logged level, with scipy, on the first n_seeds seeds both variants
    ran (as `comparison_summary` counts them)."""
    from scipy import stats

    effect = comparison["effect"]
    by = {(r["variant"], r["seed"]): r[METRIC] for r in runs if r["status"] == "FINISHED"}
    seeds = sorted({s for v, s in by if v == start} & {s for v, s in by if v == f"{start} +{effect}"})
    seeds = seeds[:int(comparison["n_seeds"])]
    diffs = np.array([by[(f"{start} +{effect}", s)] - by[(start, s)] for s in seeds])
    mean, sd = float(diffs.mean()), float(diffs.std(ddof=1)) if len(diffs) > 1 else float("nan")
    out = {"effect": effect, "seeds": seeds, "differences_pp": [round(100 * d, 4) for d in diffs],
           "mean_pp": 100 * mean, "sd_pp": 100 * sd}
    if sd > 1e-12:
        low, high = stats.t.interval(float(comparison["level"]), len(diffs) - 1, loc=mean, scale=sd / np.sqrt(len(diffs)))
        out.update(ci_low_pp=100 * low, ci_high_pp=100 * high,
                   agrees=bool(comparison["ci_low"] is not None and comparison["ci_high"] is not None
                               and np.isclose(low, comparison["ci_low"], atol=1e-9)
                               and np.isclose(high, comparison["ci_high"], atol=1e-9)
                               and np.isclose(mean, comparison["mean_diff"], atol=1e-12)))
    else:  # every difference equal: no t-interval (the product's degenerate case)
        out.update(ci_low_pp=None, ci_high_pp=None, agrees=bool(np.isclose(mean, comparison["mean_diff"], atol=1e-12)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--exp", default="b1", help="add-one adds to this experiment's parent (b1 -> b0)")
    parser.add_argument("--epochs", type=int, default=0, help="0: the experiment's own train.epochs")
    parser.add_argument("--max-seeds", type=int, default=12)
    parser.add_argument("--data-dir", default=str(common.SAMPLE_DIR))
    args = parser.parse_args()

    from cifar_mlops import ablation_stats
    from cifar_mlops import config as cfg

    start = cfg.resolve(args.exp).parent or args.exp
    first_look = ablation_stats.SequentialDesign(max_seeds=args.max_seeds).looks[0]
    sets = {**common.SAMPLE_SPLIT, **({"train.epochs": args.epochs} if args.epochs else {})}
    before = common.load_snapshot()
    with common.tempdir("verdicts-real") as tmp:
        folder = common.planted_catalogue(Path(tmp), start)
        env = common.temp_env(tmp, CIFAR_MLOPS_EXPERIMENTS=str(folder))
        cmd = [common.CLI, "ablate", "--exp", args.exp, "--design", "add-one", "--enhancements", f"{NOOP},{LOW_LR}",
               "--seeds", "auto", "--max-seeds", str(args.max_seeds), "--data-dir", args.data_dir,
               *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")]]
        wall, cpu, proc = common.measured_run(cmd, env=env, cwd=tmp, what=f"ablate --exp {args.exp}")
        os.environ["CIFAR_MLOPS_EXPERIMENTS"] = str(folder)  # resolve the planted enhancement here too
        os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
        diff = noop_config_diff(start)
        ablation, predictions = read_ablation(env["MLFLOW_TRACKING_URI"])

    rounds = [line.strip() for line in proc.stderr.splitlines() if re.search(r"\bround at \d+ seeds:", line)]
    found = {c["effect"]: c for c in ablation["comparisons"]}
    noop, low = found.get(NOOP, {}), found.get(LOW_LR, {})
    seeds = sorted({s for v, s in predictions if v == start})
    identical = {s: bool(np.array_equal(predictions[(start, s)], predictions[(f"{start} +{NOOP}", s)]))
                 for s in seeds if (f"{start} +{NOOP}", s) in predictions}
    recomputed = [recompute(ablation["runs"], c, start) for c in ablation["comparisons"]]
    targets = {
        "identical_copy_equivalent_or_inconclusive": noop.get("verdict") in ("equivalent", "inconclusive"),
        "too_low_lr_hurts_at_first_look": low.get("verdict") == "hurts" and int(low.get("n_seeds", 0)) == first_look,
    }
    print(f"ablate --exp {args.exp} --design add-one ({start} + each planted): {wall / 60:.1f} wall min, "
          f"{cpu / 60:.1f} CPU min, {len(ablation['runs'])} runs", file=sys.stderr)
    for c in ablation["comparisons"]:
        versus = f" ({c['vs_min_effect']})" if c.get("vs_min_effect") else ""
        ends = ", ".join("unbounded" if x is None else f"{100 * x:.2f}" for x in (c["ci_low"], c["ci_high"]))
        print(f"  {c['effect']}: {c['verdict']}{versus}, {c['n_seeds']} seeds, {100 * c['mean_diff']:+.2f} pp "
              f"[{ends}] at {100 * c['level']:.4g}%", file=sys.stderr)
    print(f"  {start} and its planted copy predicted every test image alike in {sum(identical.values())} of "
          f"{len(identical)} seeds; config diff {diff}", file=sys.stderr)
    for name, ok in targets.items():
        print(f"{'ok  ' if ok else 'FAIL'} {name}", file=sys.stderr)
    print(f"recomputed intervals agree: {all(r['agrees'] for r in recomputed)}", file=sys.stderr)
    common.write_result("verdicts_real", {
        "data": f"CIFAR-10 sample {common.repo_relative(args.data_dir)}", "split": common.SAMPLE_SPLIT,
        "exp": args.exp, "start": start, "epochs_override": args.epochs or None, "max_seeds": args.max_seeds,
        "first_look": first_look, "ablate_command": shlex.join(["cifar-mlops", *cmd[1:]]),
        "wall_min": round(wall / 60, 2), "cpu_min": round(cpu / 60, 2), "command_output": proc.stdout,
        "verdict_table": next((t for t in common.printed_tables(proc.stdout) if "narrows more" in t[0]), []),
        "effects_table": next((t for t in common.printed_tables(proc.stdout) if "adj_p" in t[0]), []),
        "rounds": rounds, "noop_config_diff": diff, "noop_identical_predictions": identical,
        "ablation": ablation, "recomputed": recomputed, "targets": targets,
        "load_before": before, "load_after": common.load_snapshot()})


if __name__ == "__main__":
    main()
