"""Issue 29, BatchNorm statistics on real images: precise BN (the default) against a momentum derived from the
number of steps and against Keras's own moving averages (what main did), one experiment and seed each.

    .venv/bin/python benchmarks/bench_batchnorm.py [--exp 2.4] [--seed 0] [--methods precise,momentum,none]

- precise:  train.bn_recompute_images=1024 (the default): `batchnorm.recompute` before each epoch's validation;
- momentum: train.bn_recompute_images=0 and, before the first step, every training BatchNorm's momentum set to
            clip(0.01 ** (1 / steps per epoch), 0.9, 0.99): one epoch's steps keep 1% of what came before;
- none:     train.bn_recompute_images=0 and Keras's momentum (MobileNetV2 0.999, DenseNet-121 0.99).
Each run is `train()` in a child process of this script (`--child`) on the sample's 3,336 / 834 split and its
1,000 test images, throwaway store; CPU s = user + sys of the child (both cores count). For precise, the child
also times `batchnorm.recompute` itself: its share of the fit time is the cost of the method.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import common

METHODS = ("precise", "momentum", "none")


def child(method: str, exp: str, seed: int, data_dir: str) -> None:
    import keras

    from cifar_mlops import batchnorm, config, train

    spent = [0.0]
    recompute = batchnorm.recompute

    def timed_recompute(*args, **kwargs):
        started = time.perf_counter()
        try:
            return recompute(*args, **kwargs)
        finally:
            spent[0] += time.perf_counter() - started

    batchnorm.recompute = timed_recompute
    last = {}

    class Watch(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            if method == "momentum":  # before the first step traces the training function, which reads it
                momentum = min(max(0.01 ** (1 / self.params["steps"]), 0.9), 0.99)
                for layer in batchnorm.trainable_batchnorms(self.model):
                    layer.momentum = momentum
                last["momentum"] = momentum

        def on_epoch_end(self, epoch, logs=None):
            last["last_epoch_train_accuracy"] = float(logs["accuracy"])

    overrides = {**common.SAMPLE_SPLIT, "data.data_dir": data_dir, "data.seed": seed, "train.seed": seed,
                 "train.bn_recompute_images": 1024 if method == "precise" else 0}
    metrics = train.train(config.resolve(exp, overrides), callbacks=[Watch()], register=False)
    print(json.dumps({**metrics, **last, "recompute_s": round(spent[0], 2)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--exp", default="2.4")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--data-dir", default=str(common.SAMPLE_DIR))
    parser.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.exp, args.seed, args.data_dir)

    before, results = common.load_snapshot(), []
    for method in args.methods.split(","):
        with common.tempdir(f"bn-{method}") as tmp:
            cpu0 = common.cpu_seconds_of_children()
            wall, proc = common.timed_run([common.PYTHON, __file__, "--child", method, "--exp", args.exp,
                                           "--seed", str(args.seed), "--data-dir", args.data_dir],
                                          env=common.temp_env(tmp), cwd=tmp)
            cpu = common.cpu_seconds_of_children() - cpu0
        run = common.last_json_line(proc.stdout)
        results.append({"method": method, "exp": args.exp, "seed": args.seed, "wall_s": round(wall, 1),
                        "cpu_s": round(cpu, 1), **run})
        print(f"{method}: test {run['test_accuracy']:.4f}, evaluated train {run['train_accuracy']:.4f} against "
              f"{run['last_epoch_train_accuracy']:.4f} in the last epoch, {cpu / 60:.1f} CPU min", file=sys.stderr)
    rows = [[r["method"], f"{100 * r['last_epoch_train_accuracy']:.1f}", f"{100 * r['train_accuracy']:.1f}",
             f"{100 * r['val_accuracy']:.1f}", f"{100 * r['test_accuracy']:.1f}",
             f"{100 * r['recompute_s'] / r['fit_seconds']:.1f}" if r["method"] == "precise" else "",
             f"{r['cpu_s'] / 60:.1f}"] for r in results]
    common.print_table(["method", "last epoch train acc % (Keras)", "evaluated train acc %", "val acc %",
                        "test acc %", "recompute % of fit", "CPU min"], rows)
    common.write_result("batchnorm", {"data": f"CIFAR-10 sample {common.repo_relative(args.data_dir)}",
                                      "split": common.SAMPLE_SPLIT, "runs": results, "load_before": before,
                                      "load_after": common.load_snapshot()})


if __name__ == "__main__":
    sys.exit(main())
