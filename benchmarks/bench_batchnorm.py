"""Issue 29, BatchNorm statistics on real images: precise BN (the default) against a momentum derived from the
number of steps and against Keras's own moving averages (what main did), one experiment and seed each.

    .venv/bin/python benchmarks/bench_batchnorm.py [--exp 2.4] [--seeds 0] [--methods precise,momentum,none]
        [--results batchnorm]

- precise:  train.bn_recompute_images at its default: `batchnorm.recompute` before each epoch's validation;
- momentum: train.bn_recompute_images=0 and, before the first step, every training BatchNorm's momentum set to
            clip(0.01 ** (1 / steps per epoch), 0.9, 0.99): one epoch's steps keep 1% of what came before;
- none:     train.bn_recompute_images=0 and Keras's momentum (MobileNetV2 0.999, DenseNet-121 0.99).
Each run is `train()` in a child process of this script (`--child`) on the sample's 3,336 / 834 split and its
1,000 test images, throwaway store; CPU s = user + sys of the child (both cores count). For precise, the child
also times `batchnorm.recompute` itself: its share of the fit time is the cost of the method.

    .venv/bin/python benchmarks/bench_batchnorm.py --cost [--rounds 3]

The cost alone, in one process (results/batchnorm_cost.json): an epoch of 2.4's MobileNetV2 (batch 256) on 3,336
random images, then `recompute` of 512 and 1,024 images, eager and compiled (`batchnorm.compiled_forward`),
interleaved for `--rounds` rounds; CPU seconds of the process (time.process_time).

    .venv/bin/python benchmarks/bench_batchnorm.py --images 512,1024,2048,4096 [--exp 2.4] [--seeds 0,1]

Does the number of images matter (results/batchnorm_images.json)? Per seed, one precise `train()` as above;
then, on its final weights, `recompute` over each number of training images in turn and the sample's train and
test images evaluated after each.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import common

METHODS = ("precise", "momentum", "none")


def child(method: str, exp: str, seed: int, data_dir: str, counts: list[int]) -> None:
    import keras

    from cifar_mlops import batchnorm, config, train

    spent = [0.0]
    recompute = batchnorm.recompute
    seen = {}  # the model and the batches of the last recomputation (--images)

    def timed_recompute(model, batches, *args, **kwargs):
        started = time.perf_counter()
        seen.update(model=model, batches=batches)
        try:
            return recompute(model, batches, *args, **kwargs)
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
                 **({} if method == "precise" else {"train.bn_recompute_images": 0})}
    resolved = config.resolve(exp, overrides)
    metrics = train.train(resolved, callbacks=[Watch()], register=False)
    last["recompute_s"] = round(spent[0], 2)  # the training's own, not --images' below
    if counts:
        last["by_images"] = evaluate_by_images(resolved, seen["model"], seen["batches"], counts)
    print(json.dumps({**metrics, **last, "bn_recompute_images": resolved.train.bn_recompute_images}))


def evaluate_by_images(resolved, model, batches, counts: list[int]) -> list[dict]:
    """`model`'s train and test accuracy after `recompute` over each of `counts` training images (from `batches`,
    the training's own recomputation batches)."""
    from cifar_mlops import batchnorm, data
    from cifar_mlops.pipeline import Batches

    splits = data.load_splits(resolved.data)
    forward = batchnorm.compiled_forward(model)
    rows = []
    for count in counts:
        used = batchnorm.recompute(model, batches, count, forward)
        row = {"images": used}
        for name, x, y in (("train", splits.x_train, splits.y_train), ("test", splits.x_test, splits.y_test)):
            images = Batches(x, y, batch_size=256, num_classes=splits.num_classes, training=False)
            row[f"{name}_accuracy"] = model.evaluate(images, verbose=0, return_dict=True)["accuracy"]
        print(json.dumps(row), file=sys.stderr)
        rows.append(row)
    return rows


def cost(rounds: int) -> None:
    import numpy as np

    from cifar_mlops import batchnorm, config
    from cifar_mlops.models import create_model
    from cifar_mlops.pipeline import Batches
    from cifar_mlops.train import compile_model

    settings = config.resolve("2.4")
    model = create_model("mobilenetv2", dropout=settings.model.dropout)
    compile_model(model, settings.train, settings.train.learning_rate, 100)
    rng = np.random.default_rng(0)
    batches = Batches(rng.integers(0, 256, (3336, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, 3336),
                      batch_size=settings.train.batch_size, num_classes=10, training=True)
    compiled = batchnorm.compiled_forward(model)
    model.fit(batches, epochs=1, verbose=0)  # traced once, as a training does before its first validation
    batchnorm.recompute(model, batches, 512, compiled)

    def cpu(work) -> float:
        started = time.process_time()
        work()
        return time.process_time() - started

    rows = []
    for round_ in range(rounds):
        row = {"round": round_, "epoch_s": cpu(lambda: model.fit(batches, epochs=1, verbose=0))}
        for images in (512, 1024):
            row[f"eager_{images}_s"] = cpu(lambda n=images: batchnorm.recompute(model, batches, n))
            row[f"compiled_{images}_s"] = cpu(lambda n=images: batchnorm.recompute(model, batches, n, compiled))
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
    epoch = common.median([r["epoch_s"] for r in rows])
    table = [[key, f"{common.median([r[key] for r in rows]):.2f}",
              f"{100 * common.median([r[key] for r in rows]) / epoch:.1f}"]
             for key in ("eager_512_s", "compiled_512_s", "eager_1024_s", "compiled_1024_s")]
    common.print_table(["recompute", "CPU s (median)", "% of an epoch"], [["epoch", f"{epoch:.2f}", "100"], *table])
    common.write_result("batchnorm_cost", {"model": "2.4 (mobilenetv2, batch 256)", "train_images": 3336,
                                           "rounds": rows, "load_before": common.load_snapshot()})


def run_child(method: str, exp: str, seed: int, data_dir: str, images: str = "") -> dict:
    """`child` in a subprocess with a throwaway store: its JSON line, with CPU and wall seconds."""
    with common.tempdir(f"bn-{method}") as tmp:
        cpu0 = common.cpu_seconds_of_children()
        wall, proc = common.timed_run([common.PYTHON, __file__, "--child", method, "--exp", exp, "--seed", str(seed),
                                       "--data-dir", data_dir, *(["--images", images] if images else [])],
                                      env=common.temp_env(tmp), cwd=tmp)
        cpu = common.cpu_seconds_of_children() - cpu0
    return {"method": method, "exp": exp, "seed": seed, "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
            **common.last_json_line(proc.stdout)}


def by_images(exp: str, seeds: list[int], data_dir: str, images: str) -> None:
    before = common.load_snapshot()
    results = [run_child("precise", exp, seed, data_dir, images) for seed in seeds]
    rows = [[r["seed"], f"{row['images']:,}", f"{100 * row['train_accuracy']:.1f}", f"{100 * row['test_accuracy']:.1f}"]
            for r in results for row in r["by_images"]]
    common.print_table(["seed", "images recomputed over", "evaluated train acc %", "test acc %"], rows)
    common.write_result("batchnorm_images", {"exp": exp,
                                             "data": f"CIFAR-10 sample {common.repo_relative(data_dir)}",
                                             "split": common.SAMPLE_SPLIT, "runs": results, "load_before": before,
                                             "load_after": common.load_snapshot()})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--exp", default="2.4")
    parser.add_argument("--seeds", default="0", help="one training per seed (and method)")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--data-dir", default=str(common.SAMPLE_DIR))
    parser.add_argument("--cost", action="store_true", help="measure the cost of the recomputation alone")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--images", default="", help="e.g. 512,1024,2048,4096: does the number matter?")
    parser.add_argument("--results", default="batchnorm", help="results/NAME.json of the methods' runs")
    parser.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)  # the child's
    args = parser.parse_args()
    counts = [int(n) for n in args.images.split(",") if n]
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.cost:
        return cost(args.rounds)
    if args.child:
        return child(args.child, args.exp, args.seed, args.data_dir, counts)
    if counts:
        return by_images(args.exp, seeds, args.data_dir, args.images)

    before, results = common.load_snapshot(), []
    for seed, method in ((seed, method) for seed in seeds for method in args.methods.split(",")):
        run = run_child(method, args.exp, seed, args.data_dir)
        results.append(run)
        print(f"{method}, seed {seed}: test {run['test_accuracy']:.4f}, evaluated train {run['train_accuracy']:.4f} against "
              f"{run['last_epoch_train_accuracy']:.4f} in the last epoch, {run['cpu_s'] / 60:.1f} CPU min",
              file=sys.stderr)
    rows = [[r["method"], r["seed"], f"{100 * r['last_epoch_train_accuracy']:.1f}", f"{100 * r['train_accuracy']:.1f}",
             f"{100 * r['val_accuracy']:.1f}", f"{100 * r['test_accuracy']:.1f}",
             f"{100 * r['recompute_s'] / r['fit_seconds']:.1f}" if r["method"] == "precise" else "",
             f"{r['cpu_s'] / 60:.1f}"] for r in results]
    common.print_table(["method", "seed", "last epoch train acc % (Keras)", "evaluated train acc %", "val acc %",
                        "test acc %", "recompute % of fit", "CPU min"], rows)
    common.write_result(args.results, {"data": f"CIFAR-10 sample {common.repo_relative(args.data_dir)}",
                                      "split": common.SAMPLE_SPLIT, "runs": results, "load_before": before,
                                      "load_after": common.load_snapshot()})


if __name__ == "__main__":
    sys.exit(main())
