"""System metrics' cost: training throughput with MLflow's system metrics sampled and without.

    .venv/bin/python benchmarks/bench_system_metrics.py [--rounds 7] [--epochs 4] [--exp b5] [--interval 10]
        [--sampler-only]

Two arms, interleaved A B A B ... in fresh `cifar-mlops train` processes against one throwaway SQLite
store, after one unmeasured warm-up of each: A samples MLflow's system metrics every --interval seconds
(`track.system_metrics_interval`, default 10 as in the config), B has them off (0). Both train the same
experiment (b5, the study B final CNN) on the real CIFAR-10 sample (data.train_size 3336 / data.val_size
834 from its 4,170 data-batch images), same seed, epochs, batch size and float32, without registering.
Throughput = training images x epochs / `fit_seconds` (the run's own metric: the fit alone; the imports
and the evaluation are the same work in both arms). A's runs must hold system metrics and B's none (the
samples logged are counted: an arm that sampled nothing voids the comparison). Figures: medians over the rounds,
the ratio of median throughputs (A / B) and the ratio in each round.
Target: A's throughput >= 0.99 of B's (a cost below 1%).

The sampler's own cost, measured directly (also alone with --sampler-only, which keeps the A/B runs of
results/system_metrics.json): this process idles 30 s on a run of a throwaway store with MLflow's system-metrics
sampler every 0.5 s, and 30 s without it; the CPU time (all threads) the sampler added, per sample taken and
logged, and that as a share of one CPU core at --interval. On a VM whose training times vary by more than the
1% the A/B rounds are meant to see, this bounds the cost where the rounds cannot.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import common

ON, OFF = "system metrics on", "system metrics off"
TARGET = 0.99


def fit_of_last_run(uri: str) -> dict:
    """fit_seconds, images trained and system-metric samples of the newest run in the store."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("cifar10-ablation")
    run = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"], max_results=1)[0]
    epochs = int(run.data.metrics["epochs_run"])
    images = int(run.data.params["data.num_train"]) * epochs
    samples = len(client.get_metric_history(run.info.run_id, "system/cpu_utilization_percentage"))
    fit = run.data.metrics["fit_seconds"]
    return {"run_id": run.info.run_id, "fit_s": round(fit, 3), "images": images,
            "images_per_s": round(images / fit, 2), "system_metric_samples": samples}


def sampler_cost(interval_s: float, seconds: float = 30.0, every_s: float = 0.5) -> dict:
    """CPU seconds MLflow's system-metrics sampler spends per sample (taken and logged to a SQLite store), from
    `seconds` of idling with it sampling every `every_s` against as long without; its share of one core when it
    samples every `interval_s`."""
    import mlflow
    from mlflow import MlflowClient

    def cpu_while_idle() -> float:
        started = time.process_time()  # this process, all its threads: the sampler's thread included
        time.sleep(seconds)
        return time.process_time() - started

    with common.tempdir("sampler") as tmp:
        mlflow.set_tracking_uri(f"sqlite:///{tmp}/mlflow.db")
        mlflow.set_system_metrics_sampling_interval(every_s)
        without = cpu_while_idle()
        with mlflow.start_run(log_system_metrics=True) as run:  # the sampler starts and ends outside the window
            with_sampler = cpu_while_idle()
        samples = len(MlflowClient().get_metric_history(run.info.run_id, "system/cpu_utilization_percentage"))
    per_sample = (with_sampler - without) / samples
    return {"seconds": seconds, "every_s": every_s, "cpu_s_without": round(without, 4),
            "cpu_s_with": round(with_sampler, 4), "samples": samples, "cpu_s_per_sample": round(per_sample, 5),
            "interval_s": interval_s, "share_of_one_core": per_sample / interval_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7, help="rounds of A B")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--exp", default="b5")
    parser.add_argument("--interval", type=float, default=10.0, help="seconds between samples in arm A")
    parser.add_argument("--data-dir", default=str(common.SAMPLE_DIR))
    parser.add_argument("--sampler-only", action="store_true",
                        help="measure only the sampler's own cost; keep the A/B runs of results/system_metrics.json")
    args = parser.parse_args()
    if args.sampler_only:
        sampler = sampler_cost(args.interval)
        print(f"sampler: {sampler['cpu_s_per_sample'] * 1000:.2f} ms CPU per sample; every {args.interval:g} s: "
              f"{100 * sampler['share_of_one_core']:.3f}% of one core")
        previous = json.loads((common.RESULTS / "system_metrics.json").read_text())
        kept = {k: v for k, v in previous.items() if k not in ("name", "finished", "command")}
        common.write_result("system_metrics", {**kept, "sampler": sampler, "ab_finished": previous.get("ab_finished", previous["finished"]),
                                               "ab_command": previous.get("ab_command", previous["command"])})
        return

    sets = [f"{k}={v}" for k, v in common.SAMPLE_SPLIT.items()] + [
        f"train.epochs={args.epochs}", "train.precision=float32", "train.checkpoint_every=0"]
    base = [common.CLI, "train", "--exp", args.exp, "--data-dir", args.data_dir, "--no-register",
            *(a for s in sets for a in ("--set", s))]
    arms = ((ON, [*base, "--set", f"track.system_metrics_interval={args.interval}"]),
            (OFF, [*base, "--set", "track.system_metrics_interval=0"]))

    before = common.load_snapshot()
    runs: dict[str, list[dict]] = {name: [] for name, _ in arms}
    with common.tempdir("system-metrics") as tmp:
        env = common.temp_env(tmp)
        for name, cmd in arms:
            wall, _ = common.timed_run(cmd, env=env, cwd=tmp)
            print(f"warm-up {name}: {wall:.1f} s wall (not counted)", file=sys.stderr)
        for i in range(args.rounds):
            for name, cmd in arms:
                wall, _ = common.timed_run(cmd, env=env, cwd=tmp)
                result = {"wall_s": round(wall, 3), **fit_of_last_run(env["MLFLOW_TRACKING_URI"]),
                          "loadavg": common.loadavg()[0]}
                runs[name].append(result)
                print(f"round {i + 1} {name}: fit {result['fit_s']:.1f} s, {result['images_per_s']:.1f} images/s, "
                      f"{result['system_metric_samples']} samples", file=sys.stderr)
    after = common.load_snapshot()
    sampler = sampler_cost(args.interval)

    if not all(r["system_metric_samples"] for r in runs[ON]) or any(r["system_metric_samples"] for r in runs[OFF]):
        raise SystemExit("arm A must log system metrics in every run and arm B in none: the comparison is void")
    med = {name: {key: common.median([r[key] for r in rs])
                  for key in ("wall_s", "fit_s", "images_per_s", "system_metric_samples")} for name, rs in runs.items()}
    ratio = med[ON]["images_per_s"] / med[OFF]["images_per_s"]
    round_ratios = [a["images_per_s"] / b["images_per_s"] for a, b in zip(runs[ON], runs[OFF])]
    common.print_table([f"median of {args.rounds} runs", "images/s", "fit s", "wall s", "samples"],
                       [[name, f"{m['images_per_s']:.1f}", f"{m['fit_s']:.1f}", f"{m['wall_s']:.1f}",
                         f"{m['system_metric_samples']:.0f}"] for name, m in med.items()])
    print(f"throughput with / without: {ratio:.4f} (per round: {', '.join(f'{r:.3f}' for r in round_ratios)}); "
          f"target >= {TARGET}")
    print(f"sampler: {sampler['cpu_s_per_sample'] * 1000:.2f} ms CPU per sample; every {args.interval:g} s: "
          f"{100 * sampler['share_of_one_core']:.3f}% of one core")
    common.write_result("system_metrics", {
        "exp": args.exp, "epochs": args.epochs, "rounds": args.rounds, "interval_s": args.interval,
        "data": f"CIFAR-10 sample {common.repo_relative(args.data_dir)}", "split": common.SAMPLE_SPLIT,
        "runs": runs, "medians": med, "ratio_throughput": ratio, "round_ratios": round_ratios,
        "round_ratio_stdev": statistics.stdev(round_ratios) if len(round_ratios) > 1 else 0.0,
        "target_ratio": TARGET, "sampler": sampler, "load_before": before, "load_after": after})


if __name__ == "__main__":
    sys.exit(main())
