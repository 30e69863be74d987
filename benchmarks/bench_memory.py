"""Item 3, memory: peak RSS of a 224x224 bicubic experiment over 50,000 images through the project's pipeline.

    .venv/bin/python benchmarks/bench_memory.py [--images 50000] [--fit-steps 20] [--batch-size 64]

Each measurement runs in a fresh subprocess and reports resource.getrusage(RUSAGE_SELF).ru_maxrss:
  baseline  import tensorflow + cifar_mlops, hold the 50,000 uint8 images, build the model; no batches.
  pipeline  one full epoch (ceil(50,000 / batch) batches) of pipeline.Batches(training=True) fed through
            the resize layer of the model create_model builds for 224x224 bicubic (the in-model upscale:
            every batch becomes float32 (B, 224, 224, 3)), reduced to a sum so nothing is kept.
  fit       the same dataset and the full MobileNetV2 of experiment 1.1 (bicubic) at image_size=224,
            compiled by train.compile_model and fitted for --fit-steps training steps, once per
            --fit-batch-sizes (a full epoch at 224 px takes hours on 2 CPU cores; the peak is reached in
            the first steps, once activations and gradients exist).
The model and data are experiment 1.1 (MobileNetV2, bicubic) with model.image_size=224.
The images are synthetic uint8 of the real shape (uniform random pixels: memory does not depend on content).
The notebook alternative, upscaling every image in RAM before training, is computed, not run.
Target: <= 2 GB peak RSS.
"""

from __future__ import annotations

import argparse
import json
import sys

import common

GB = 1e9


def child(mode: str, images: int, batch_size: int, fit_steps: int) -> None:
    import resource
    import time

    import numpy as np
    import tensorflow as tf

    from cifar_mlops import train
    from cifar_mlops.config import resolve
    from cifar_mlops.models import create_model
    from cifar_mlops.pipeline import Batches

    config = resolve("1.1", {"model.image_size": 224, "model.interpolation": "bicubic",
                             "train.batch_size": batch_size, "data.source": "synthetic"})
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(images, 32, 32, 3), dtype=np.uint8)
    y = rng.integers(0, 10, size=images)
    ds = Batches(x, y, batch_size=batch_size, num_classes=10, training=True, augment=config.augment, seed=0)
    model = create_model(config.model.name, **config.model.settings())
    batches = 0
    started = time.perf_counter()
    if mode == "pipeline":
        resize = model.get_layer("resize")
        total = 0.0

        @tf.function
        def step(img):
            up = resize(img)  # float32 (B, 224, 224, 3), bicubic
            return tf.reduce_sum(up), tf.shape(up)

        shape = None
        for img, _ in (ds[i] for i in range(len(ds))):
            s, batch_shape = step(img)
            total += float(s)
            batches += 1
            shape = shape or [int(v) for v in batch_shape]
    elif mode == "fit":
        train.compile_model(model, config.train, config.train.learning_rate, fit_steps)
        model.fit(ds, epochs=1, steps_per_epoch=fit_steps, verbose=0)
        batches = fit_steps
        shape = [batch_size, 224, 224, 3]
    else:
        shape = None
    elapsed = time.perf_counter() - started
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # file-backed pages (TensorFlow's shared libraries, ~0.4 GB): shared between processes, reclaimable
    status = dict(line.split(":", 1) for line in open("/proc/self/status"))
    file_kb = int(status["RssFile"].split()[0])
    print(json.dumps({"mode": mode, "peak_rss_bytes": peak_kb * 1024, "rss_file_bytes_at_end": file_kb * 1024,
                      "batches": batches, "batch_shape": shape,
                      "seconds": round(elapsed, 1), "batch_size": batch_size, "params": model.count_params(), "model": config.model.name,
                      "interpolation": config.model.interpolation, "image_size": config.model.image_size}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=50_000)
    parser.add_argument("--batch-size", type=int, default=64, help="catalogue MobileNetV2 base uses 64")
    parser.add_argument("--fit-steps", type=int, default=3)
    parser.add_argument("--modes", default="baseline,pipeline,fit")
    parser.add_argument("--fit-batch-sizes", default="64,16,8", help="fit mode is run once per batch size")
    parser.add_argument("--child", default="")
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.images, args.batch_size, args.fit_steps)

    before = common.load_snapshot()
    runs = []
    with common.tempdir("memory") as tmp:
        env = common.temp_env(tmp)
        for mode in args.modes.split(","):
            sizes = [int(b) for b in args.fit_batch_sizes.split(",")] if mode == "fit" else [args.batch_size]
            for batch_size in sizes:
                _, proc = common.timed_run([common.PYTHON, __file__, "--child", mode, "--images", str(args.images),
                                            "--batch-size", str(batch_size), "--fit-steps", str(args.fit_steps)],
                                           env=env, cwd=tmp)
                runs.append(common.last_json_line(proc.stdout))
    after = common.load_snapshot()

    n = args.images
    in_ram = {"float32_224": n * 224 * 224 * 3 * 4, "uint8_224": n * 224 * 224 * 3, "uint8_32": n * 32 * 32 * 3}
    rows = []
    for r in runs:
        gb = r["peak_rss_bytes"] / GB
        rows.append([f'{r["mode"]} (batch {r["batch_size"]})', f"{gb:.2f}", r["batches"], "x".join(map(str, r["batch_shape"] or [])) or "-",
                     r["seconds"], "met" if gb <= 2 else f"MISSED by {gb - 2:.2f} GB"])
    common.print_table(["measurement", "peak RSS GB", "batches", "batch after resize", "seconds", "target <= 2 GB"], rows)
    print(f"in-RAM upscale of {n:,} images to 224x224x3 (computed): float32 {in_ram['float32_224'] / GB:.1f} GB, "
          f"uint8 {in_ram['uint8_224'] / GB:.1f} GB; the 32x32 uint8 originals: {in_ram['uint8_32'] / GB:.3f} GB")
    common.write_result("memory", {"images": n, "batch_size": args.batch_size, "fit_steps": args.fit_steps,
                                   "runs": runs, "in_ram_bytes": in_ram, "target_bytes": 2 * GB,
                                   "load_before": before, "load_after": after})


if __name__ == "__main__":
    sys.exit(main())
