"""Item 5, accuracy on real images: study B's iterations on the real CIFAR-10 sample, several seeds each.

    .venv/bin/python benchmarks/bench_study_b.py [--exps b0,b1,b2,b3,b4,b5,b6,b7] [--seeds 0,1,2] [--epochs N]

Each run is `cifar-mlops train --exp bX --data-dir SAMPLE --set data.train_size=3336 --set data.val_size=834
--set data.seed=S --set train.seed=S --no-register` in a fresh subprocess (throwaway MLflow store). The sample
is 4,170 real CIFAR-10 training images (data batches; 3,336 train / 834 validation, drawn as the iteration
says: random for b0-b5, stratified for b6-b7) and a 1,000-image test batch drawn from the real training
set: NOT the official test set, and smaller than the study's 5,000 / 5,000 split, so the numbers are not
directly comparable with the published 53.36% -> 66.7% (validation accuracy on 5,000 images).
CPU minutes per run = user + sys CPU time of the subprocess (both cores count), wall minutes beside it.
"""

from __future__ import annotations

import argparse
import json
import sys

import common

PUBLISHED = {"b0": 0.5336, "b5": 0.667}  # the study's validation accuracy, first and final iteration


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--exps", default="b0,b1,b2,b3,b4,b5,b6,b7,b8,b9")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", type=int, default=0, help="0: each iteration's own train.epochs")
    parser.add_argument("--data-dir", default=str(common.SAMPLE_DIR))
    parser.add_argument("--merge", action="store_true",
                        help="keep results/study_b.json runs (exp, seed) not rerun (build the table in several goes)")
    args = parser.parse_args()

    before = common.load_snapshot()
    runs = []
    for exp in args.exps.split(","):
        for seed in [int(s) for s in args.seeds.split(",")]:
            run = common.train_on_sample(exp, seed, {"train.epochs": args.epochs} if args.epochs else None,
                                         data_dir=args.data_dir)
            runs.append(run)
            print(f"{exp} seed {seed}: test {run['test_accuracy']:.4f}, val {run['val_accuracy']:.4f}, "
                  f"{run['cpu_s'] / 60:.1f} CPU min, {run['wall_s'] / 60:.1f} wall min", file=sys.stderr)
    after = common.load_snapshot()
    exps = args.exps.split(",")
    previous = common.RESULTS / "study_b.json"
    if args.merge and previous.exists():
        old = json.loads(previous.read_text())
        if old.get("epochs_override") == (args.epochs or None):
            done = {(r["exp"], r["seed"]) for r in runs}
            runs = [r for r in old["runs"] if (r["exp"], r["seed"]) not in done] + runs
            order = ["b0", "b1", "b2", "b3", "b4", "b5", "b6", "b7", "b8", "b9"]
            exps = sorted({r["exp"] for r in runs}, key=lambda e: (order.index(e) if e in order else 99, e))

    summary, rows = [], []
    for exp in exps:
        rs = [r for r in runs if r["exp"] == exp]
        row = {"exp": exp, "seeds": len(rs)}
        for key in ("train_accuracy", "val_accuracy", "test_accuracy", "cpu_s", "wall_s"):
            row[key] = common.mean_std([r.get(key) for r in rs])
        row["published_val"] = PUBLISHED.get(exp)
        summary.append(row)
        def pct(ms):
            return f"{100 * ms[0]:.1f} ± {100 * ms[1]:.1f}" if ms[0] is not None else "-"
        rows.append([exp, len(rs), pct(row["train_accuracy"]), pct(row["val_accuracy"]), pct(row["test_accuracy"]),
                     f"{row['cpu_s'][0] / 60:.1f}", f"{row['wall_s'][0] / 60:.1f}",
                     f"{100 * PUBLISHED[exp]:.2f}" if exp in PUBLISHED else ""])
    common.print_table(["exp", "seeds", "train acc %", "val acc %", "test acc % (sample)", "CPU min/run",
                        "wall min/run", "published val %"], rows)
    common.write_result("study_b", {"data": f"CIFAR-10 sample {common.repo_relative(args.data_dir)}",
                                    "split": common.SAMPLE_SPLIT,
                                    "epochs_override": args.epochs or None, "runs": runs, "summary": summary,
                                    "load_before": before, "load_after": after})


if __name__ == "__main__":
    sys.exit(main())
