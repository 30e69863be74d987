"""Issue 32's benchmark: `cifar-mlops select --exp b5` on the real CIFAR-10 sample, with two planted enhancements.

    .venv/bin/python benchmarks/bench_select.py [--exp b5] [--epochs N] [--max-seeds 12] [--budget MINUTES]
        [--seeds 0,1,2] [--compare b8] [--path b0,b1,b2,b3,b4,b5,b8] [--data-dir SAMPLE] [--results select]

NOT RUN YET: on two shared CPU cores it takes hours (a b5 training is about 4.6 CPU-minutes on the sample, and a
selection from b5 trains 5 variants per step, at least 3 seeds each, up to --max-seeds where a comparison is open).
Run it where there is time or a GPU, then render RESULTS.md (`benchmarks/report_results.py`, section
"Forward selection on real images", reads results/select.json). The script itself was checked end to end with
`--epochs 1 --max-seeds 2 --seeds 0 --path b0,b5 --results select_smoke` (5.4 CPU-minutes on 2 cores: b5's
candidates under study B's rules are patch_whitening, stage_dropout and the two planted ones; at 1 epoch and 2
seeds nothing is decided, as expected).

What it does, as a user would, each command in a fresh subprocess with a throwaway MLflow store:

1. A copy of the catalogue with two planted enhancements of study B (`kind: training`, so the study's rules allow
   them): `planted_too_low_lr`, the start's learning rate 1000x lower (harmful), and `planted_noop`, SGD's momentum
   set to its default (b5 trains with AdamW, which ignores it: a change that changes nothing). The catalogue copy
   is `$CIFAR_MLOPS_EXPERIMENTS`, the generated iteration goes to `$CIFAR_MLOPS_GENERATED`, both in the temp folder.
2. `cifar-mlops select --exp b5 --data-dir SAMPLE --set data.train_size=3336 --set data.val_size=834
   [--set train.epochs=N] [--max-seeds M] [--budget B]`: its wall and CPU minutes (user + sys of the process and
   its children: both cores count), its output, and read back from the store: the candidates it proposed, each
   step's table and kept enhancement, every (variant, seed) run's metrics and fit seconds.
3. Checks (recorded, printed, never asserted): patch_whitening kept; planted_too_low_lr and planted_noop never
   kept; no augmentation ever proposed or trained (horizontal_flip, random_translation, test_time_flip,
   stratified_split are ruled out by study B's rules); each step's verdicts recomputed from its child runs with
   `ablation_stats.sequential_step` (same design, alpha, min-effect) agree with what the step logged.
4. The generated iteration trained with `cifar-mlops train --exp b5-select-<n>` at --seeds, beside --compare (b8)
   at the same seeds and settings: test accuracy on the sample's 1,000 test images, mean and sd over seeds, and
   whether the generated mean lies within b8's mean +- 2 sd.
5. The hand-written path's cost, for comparison: one run of each iteration of --path (b0 -> ... -> b5 -> b8, as
   the study was written: one change at a time, one run each) at seed 0 with the same settings, CPU minutes summed.

`--epochs` shortens every training the same way (every variant of every step, the generated iteration, b8 and
the path); RESULTS.md must say so when it is used. Writes results/select.json.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
from pathlib import Path

import common

FORBIDDEN = ("horizontal_flip", "random_translation", "test_time_flip", "stratified_split")


def read_selection(tracking_uri: str, exp: str) -> dict:
    """The selection's parent run, its steps (tables, kept, runs with fit seconds) and every variant trained."""
    import mlflow
    import pandas as pd
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name("cifar10-ablation").experiment_id
    [parent] = client.search_runs([experiment], filter_string=f"tags.kind = 'selection' and tags.start = '{exp}'")
    steps_csv = mlflow.artifacts.load_text(f"runs:/{parent.info.run_id}/selection_steps.csv")
    steps = pd.read_csv(io.StringIO(steps_csv))
    children = client.search_runs([experiment], filter_string=(
        f"tags.mlflow.parentRunId = '{parent.info.run_id}' and tags.kind = 'ablation'"))
    step_runs = {}
    for child in children:
        frame = pd.read_csv(io.StringIO(mlflow.artifacts.load_text(f"runs:/{child.info.run_id}/ablation_runs.csv")))
        frame["fit_seconds"] = [client.get_run(r).data.metrics.get("fit_seconds") for r in frame["run_id"]]
        step_runs[int(child.data.tags["selection_step"])] = json.loads(frame.to_json(orient="records"))
    variants = sorted({r.data.tags["variant"] for r in client.search_runs(
        [experiment], filter_string="tags.config_sha256 IS NOT NULL", max_results=5000)})
    return {"run_id": parent.info.run_id, "tags": dict(parent.data.tags),
            "steps": json.loads(steps.to_json(orient="records")), "step_runs": step_runs, "variants": variants}


def recomputed_verdicts(selection: dict, exp: str) -> list[dict]:
    """Each step's verdicts recomputed from its child runs (`sequential_step`), beside the logged ones."""
    import pandas as pd

    from cifar_mlops import ablation_stats
    from cifar_mlops.ablation_stats import Comparison

    tags = selection["tags"]
    design = ablation_stats.SequentialDesign(max_seeds=int(tags["max_seeds"]), alpha=float(tags["alpha"]))
    rows = []
    for number, step_rows in selection["step_runs"].items():
        table = [s for s in selection["steps"] if s["step"] == number]
        base = table[0]["base"]
        comparisons = [Comparison(s["candidate"], f"{base} +{s['candidate']}", base) for s in table]
        state = ablation_stats.sequential_step(pd.DataFrame(step_rows), comparisons, design, metric=tags["metric"],
                                               min_effect=float(tags["min_effect_pp"]) / 100)
        again = state.table.set_index("effect")
        for s in table:
            rows.append({"step": number, "candidate": s["candidate"], "logged": s["verdict"],
                         "recomputed": again.loc[s["candidate"], "verdict"],
                         "agree": s["verdict"] == again.loc[s["candidate"], "verdict"]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--exp", default="b5")
    parser.add_argument("--epochs", type=int, default=0, help="0: each iteration's own train.epochs")
    parser.add_argument("--max-seeds", type=int, default=12)
    parser.add_argument("--budget", default="", help="select --budget MINUTES; empty: none")
    parser.add_argument("--seeds", default="0,1,2", help="seeds of the generated iteration and --compare")
    parser.add_argument("--compare", default="b8", help="the hand-written iteration it is compared with")
    parser.add_argument("--path", default="b0,b1,b2,b3,b4,b5,b8", help="the hand-written path, one run each")
    parser.add_argument("--data-dir", default=str(common.SAMPLE_DIR))
    parser.add_argument("--results", default="select",
                        help="results/NAME.json to write (another name, e.g. for a smoke run, keeps select.json)")
    args = parser.parse_args()

    sets = {**common.SAMPLE_SPLIT, **({"train.epochs": args.epochs} if args.epochs else {})}
    before = common.load_snapshot()
    with common.tempdir("select") as tmp:
        folder = common.planted_catalogue(Path(tmp), args.exp)
        catalogue_env = {"CIFAR_MLOPS_EXPERIMENTS": str(folder), "CIFAR_MLOPS_GENERATED": str(Path(tmp) / "generated")}
        env = common.temp_env(tmp, **catalogue_env)
        cmd = [common.CLI, "select", "--exp", args.exp, "--data-dir", args.data_dir, "--max-seeds", str(args.max_seeds),
               *(["--budget", args.budget] if args.budget else []),
               *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")]]
        wall, cpu, proc = common.measured_run(cmd, env=env, cwd=tmp, what=f"select --exp {args.exp}")
        selection = read_selection(env["MLFLOW_TRACKING_URI"], args.exp)
        kept = [k for k in selection["tags"].get("kept", "").split(",") if k and k != "none"]
        proposed = selection["tags"].get("candidates", "").split(",")
        checks = {
            "patch_whitening_kept": "patch_whitening" in kept,
            "harmful_never_kept": "planted_too_low_lr" not in kept,
            "empty_never_kept": "planted_noop" not in kept,
            "no_augmentation_proposed": not any(name in proposed for name in FORBIDDEN),
            "no_augmentation_trained": not any(name in v for v in selection["variants"] for name in FORBIDDEN),
        }
        verdicts = recomputed_verdicts(selection, args.exp)
        checks["verdicts_recomputed_agree"] = all(row["agree"] for row in verdicts)
        generated = selection["tags"].get("selected_iteration", args.exp)
        generated_files = sorted(p.name for p in (Path(tmp) / "generated").glob("*.yaml"))
        generated_text = {name: (Path(tmp) / "generated" / name).read_text() for name in generated_files}

        os.environ.update(catalogue_env)  # `train --exp b5-select-<n>` finds the generated file
        seeds = [int(s) for s in args.seeds.split(",")]
        trained = [common.train_on_sample(exp, seed, {k: v for k, v in sets.items()
                                                      if k not in common.SAMPLE_SPLIT} or None, args.data_dir)
                   for seed in seeds for exp in dict.fromkeys([generated, args.compare])]
        path_runs = [common.train_on_sample(exp, 0, {k: v for k, v in sets.items() if k not in common.SAMPLE_SPLIT}
                                            or None, args.data_dir) for exp in args.path.split(",")]

    def spread(exp: str) -> tuple[float | None, float | None]:
        return common.mean_std([r["test_accuracy"] for r in trained if r["exp"] == exp])

    gen_mean, _ = spread(generated)
    cmp_mean, cmp_sd = spread(args.compare)
    checks["within_compare_spread"] = (gen_mean is not None and cmp_mean is not None
                                       and abs(gen_mean - cmp_mean) <= 2 * (cmp_sd or 0.0))
    path_cpu = sum(r["cpu_s"] for r in path_runs) / 60
    print(f"select --exp {args.exp}: kept {', '.join(kept) or 'nothing'}; {wall / 60:.1f} wall min, {cpu / 60:.1f} "
          f"CPU min (hand-written path {args.path}: {path_cpu:.1f} CPU min, one run each)", file=sys.stderr)
    for name, ok in checks.items():
        print(f"{'ok  ' if ok else 'FAIL'} {name}", file=sys.stderr)
    print(f"{generated}: test {100 * (gen_mean or 0):.1f}%; {args.compare}: {100 * (cmp_mean or 0):.1f} +- "
          f"{100 * (cmp_sd or 0):.1f}% over seeds {args.seeds}", file=sys.stderr)
    common.write_result(args.results, {
        "data": f"CIFAR-10 sample {common.repo_relative(args.data_dir)}", "split": common.SAMPLE_SPLIT,
        "exp": args.exp, "epochs_override": args.epochs or None, "max_seeds": args.max_seeds,
        "budget": args.budget or None, "command_output": proc.stdout, "wall_min": round(wall / 60, 1),
        "cpu_min": round(cpu / 60, 1), "kept": kept, "proposed": proposed, "selection": selection,
        "verdicts_recomputed": verdicts, "generated": generated, "generated_files": generated_text,
        "trained": trained, "compare": args.compare, "path": args.path.split(","), "path_runs": path_runs,
        "path_cpu_min": round(path_cpu, 1), "checks": checks,
        "load_before": before, "load_after": common.load_snapshot()})


if __name__ == "__main__":
    main()
