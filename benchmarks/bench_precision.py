"""bfloat16 on this CPU: test accuracy and training speed in float32 and mixed_bfloat16, several seeds each.

    .venv/bin/python benchmarks/bench_precision.py [--exps b8,1.0] [--seeds 0,1,2] [--merge]

Each run is `cifar-mlops train --exp EXP --set train.precision=P` on the real CIFAR-10 sample (as
bench_study_b.py: 3,336 train / 834 validation images, its 1,000-image test batch, data.seed = train.seed =
S), in a fresh subprocess; the runs are interleaved (seed by seed, each experiment in both precisions in
turn), so a slow spell of the machine falls on both. Images per second = training images x epochs /
the run's `fit_seconds` (the fit alone, no evaluation).
results/precision.json is rewritten after every run, so a stopped benchmark keeps what it measured;
`--merge` keeps its runs of the (experiment, seed) pairs not run again.
The rule `train.precision: auto` follows on CPUs with bfloat16 instructions: bfloat16 where its mean test
accuracy is no lower than float32's mean minus one standard deviation of float32's AND it trains faster.
"""

from __future__ import annotations

import argparse
import json
import sys

import common

PRECISIONS = ("float32", "mixed_bfloat16")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--exps", default="b8,1.0")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--data-dir", default=str(common.SAMPLE_DIR))
    parser.add_argument("--merge", action="store_true", help="keep results/precision.json runs not run again")
    args = parser.parse_args()
    exps, seeds = args.exps.split(","), [int(s) for s in args.seeds.split(",")]

    before = common.load_snapshot()
    previous = common.RESULTS / "precision.json"
    kept = []
    if args.merge and previous.exists():
        kept = [r for r in json.loads(previous.read_text())["runs"] if (r["exp"], r["seed"]) not in
                {(e, s) for e in exps for s in seeds}]
    runs = []
    for seed in seeds:
        for exp in exps:
            for precision in PRECISIONS:
                run = common.train_on_sample(exp, seed, {"train.precision": precision}, data_dir=args.data_dir)
                run["precision"] = precision
                run["images_per_s"] = common.SAMPLE_SPLIT["data.train_size"] * run["epochs_run"] / run["fit_seconds"]
                runs.append(run)
                print(f"{exp} {precision} seed {seed}: test {run['test_accuracy']:.4f}, "
                      f"{run['images_per_s']:.0f} images/s, {run['cpu_s'] / 60:.1f} CPU min", file=sys.stderr)
                write(args, kept + runs, before, quiet=True)
    write(args, kept + runs, before)


def write(args: argparse.Namespace, runs: list[dict], before: dict, quiet: bool = False) -> None:
    """The table of `runs` (printed unless `quiet`) and results/precision.json."""
    rows, summary = [], []
    exps = list(dict.fromkeys(r["exp"] for r in runs))
    for exp in exps:
        cells = {}
        for precision in PRECISIONS:
            rs = [r for r in runs if r["exp"] == exp and r["precision"] == precision]
            if not rs:
                continue
            speeds = [r["images_per_s"] for r in rs]
            cells[precision] = {"seeds": len(rs), "test_accuracy": common.mean_std([r["test_accuracy"] for r in rs]),
                                "val_accuracy": common.mean_std([r["val_accuracy"] for r in rs]),
                                "images_per_s": common.median(speeds), "range": (min(speeds), max(speeds)),
                                "cpu_s": common.mean_std([r["cpu_s"] for r in rs])[0]}
        if len(cells) < len(PRECISIONS):
            continue
        fp32, bf16 = cells["float32"], cells["mixed_bfloat16"]
        speedup = bf16["images_per_s"] / fp32["images_per_s"]
        as_accurate = bf16["test_accuracy"][0] >= fp32["test_accuracy"][0] - fp32["test_accuracy"][1]
        picks = "mixed_bfloat16" if as_accurate and speedup > 1 else "float32"
        summary.append({"exp": exp, **cells, "speedup": speedup, "as_accurate": as_accurate, "auto_picks": picks})
        for precision, cell in cells.items():
            (acc, acc_sd), (val, val_sd) = cell["test_accuracy"], cell["val_accuracy"]
            rows.append([exp, precision, cell["seeds"], f"{100 * acc:.1f} ± {100 * acc_sd:.1f}",
                         f"{100 * val:.1f} ± {100 * val_sd:.1f}",
                         f"{cell['images_per_s']:.0f} ({cell['range'][0]:.0f}-{cell['range'][1]:.0f})",
                         f"{cell['cpu_s'] / 60:.1f}",
                         f"{speedup:.2f}x, {'as accurate' if as_accurate else 'less accurate'}: {picks}"
                         if precision == "mixed_bfloat16" else ""])
    if not quiet:
        common.print_table(["exp", "precision", "seeds", "test acc %", "val acc %", "images/s (range)",
                            "CPU min/run", "bfloat16 against float32: auto picks"], rows)
    common.write_result("precision", {"data": f"CIFAR-10 sample {common.repo_relative(args.data_dir)}",
                                      "split": common.SAMPLE_SPLIT, "runs": runs, "summary": summary,
                                      "load_before": before, "load_after": common.load_snapshot()}, quiet=quiet)


if __name__ == "__main__":
    sys.exit(main())
