"""Issue 14's benchmark: ablations on the real CIFAR-10 sample, effects with intervals and verdicts, and their cost.

    .venv/bin/python benchmarks/bench_ablation.py [--ablations b5:leave-one-out,b5:path] [--seeds 3] [--epochs N]
        [--enhancements A,B] [--merge] [--max-seeds 12] [--results ablation]

Each ablation is `cifar-mlops ablate --exp EXP --design DESIGN --seeds SEEDS --data-dir SAMPLE --set
data.train_size=3336 --set data.val_size=834 [--set train.epochs=N] [--enhancements A,B]` in a fresh
subprocess (throwaway MLflow store), as a user runs it. Recorded: the command's variants and effects tables (its stdout), and the wall and
CPU minutes of the whole ablation (user + sys CPU of the subprocess and its children: both cores count), and, read
back from the store, every run's metrics (variant, seed, run id, test/val accuracy and macro-F1) and the whole
effects table as the parent run logged it, so that every printed figure can be recomputed from the JSON.
`--epochs` shortens every variant's training (the full ablations at their own epochs take about two CPU hours
here); a shortened run measures the machinery and the order of the effects, not the studies' final numbers.
`--seeds auto` (with `--max-seeds`) adds seeds in rounds where a comparison is still open (issue 31); the parent
run's verdicts table (`ablation_comparisons.csv`: verdict, seeds used, interval, minutes) is recorded too. Write
such a run under its own `--results NAME` (results/NAME.json), not over the fixed-seed ablations.
"""

from __future__ import annotations

import argparse
import json
import sys

import common


def logged_ablations(tracking_uri: str) -> dict[str, dict[str, list[dict]]]:
    """Every finished ablation in the MLflow store at `tracking_uri`: its name -> {"runs": one record per
    (variant, seed) with its metrics, "effects": its effects table's rows}, as its parent run logged them."""
    import mlflow

    from cifar_mlops.tracking import ablations, runs

    mlflow.set_tracking_uri(tracking_uri)
    found = {}
    for ablation in ablations.finished_ablations(runs.ABLATION_EXPERIMENT):
        frame = ablations.csv_artifact(ablation["run_id"], "ablation_runs.csv")
        found[ablation["name"]] = {
            "runs": [] if frame is None else json.loads(frame.to_json(orient="records")),
            "effects": json.loads(ablation["effects"].to_json(orient="records")),  # NaN, inf: null
            "comparisons": None if (table := ablations.csv_artifact(ablation["run_id"], "ablation_comparisons.csv"))
            is None else json.loads(table.to_json(orient="records"))}  # --seeds auto: each verdict, its seeds
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ablations", default="b5:leave-one-out,b5:path", help="EXP:DESIGN,...")
    parser.add_argument("--seeds", default="3")
    parser.add_argument("--epochs", type=int, default=0, help="0: each variant's own train.epochs")
    parser.add_argument("--data-dir", default=str(common.SAMPLE_DIR))
    parser.add_argument("--enhancements", default="", help="passed to every ablation (only these enhancements)")
    parser.add_argument("--merge", action="store_true",
                        help="keep the ablations of results/NAME.json that are not rerun (same seeds)")
    parser.add_argument("--max-seeds", type=int, default=0, help="with --seeds auto: the cap (0: the command's default)")
    parser.add_argument("--results", default="ablation", help="results/NAME.json to write")
    args = parser.parse_args()

    previous = common.RESULTS / f"{args.results}.json"
    kept = json.loads(previous.read_text()) if args.merge and previous.exists() else None
    if kept is not None and kept.get("seeds") != args.seeds:  # checked before hours of training, not after
        raise SystemExit(f"--merge: results/{args.results}.json has seeds {kept.get('seeds')}; rerun without --merge")
    before = common.load_snapshot()
    results = []
    with common.tempdir("ablation") as tmp:
        env = common.temp_env(tmp)
        for item in args.ablations.split(","):
            exp, design = item.split(":")
            sets = {**common.SAMPLE_SPLIT, **({"train.epochs": args.epochs} if args.epochs else {})}
            cmd = [common.CLI, "ablate", "--exp", exp, "--design", design, "--seeds", args.seeds,
                   "--data-dir", args.data_dir, *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")],
                   *(["--enhancements", args.enhancements] if args.enhancements else []),
                   *(["--max-seeds", str(args.max_seeds)] if args.max_seeds else [])]
            wall, cpu, proc = common.measured_run(cmd, env=env, cwd=tmp, what=f"{exp} {design}")
            found = common.printed_tables(proc.stdout)
            logged = [a for name, a in logged_ablations(env["MLFLOW_TRACKING_URI"]).items()
                      if name.startswith(f"{exp} {design}")]
            results.append({"exp": exp, "design": design, "enhancements": args.enhancements or "all",
                            "epochs_override": args.epochs or None,
                            "wall_min": round(wall / 60, 1), "cpu_min": round(cpu / 60, 1),
                            "variants_table": found[0] if found else [], "effects_table": found[1] if len(found) > 1 else [],
                            "runs": logged[-1]["runs"] if logged else [],
                            "effects": logged[-1]["effects"] if logged else [],
                            "comparisons": logged[-1]["comparisons"] if logged else None})
            print(f"{exp} {design}: {wall / 60:.1f} wall min, {cpu / 60:.1f} CPU min", file=sys.stderr)
            print("\n".join(results[-1]["variants_table"] + [""] + results[-1]["effects_table"]))
    if kept is not None:
        rerun = {(r["exp"], r["design"]) for r in results}
        # ablations written before each kept its own epochs took the file's
        results = [{"epochs_override": kept.get("epochs_override"), **r} for r in kept["ablations"]
                   if (r["exp"], r["design"]) not in rerun] + results
    common.write_result(args.results, {"data": f"CIFAR-10 sample {common.repo_relative(args.data_dir)}",
                                     "split": common.SAMPLE_SPLIT, "seeds": args.seeds,
                                     "ablations": results,
                                     "load_before": before, "load_after": common.load_snapshot()})


if __name__ == "__main__":
    main()
