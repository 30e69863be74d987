"""Item 2, training throughput: images/s of the project's fit per model factory, versus bare model.fit.

    .venv/bin/python benchmarks/bench_throughput.py [--images 2048] [--cases b5,1.0,1.1,3.0] [--knobs] [--rounds 3]

For each case (an experiment id; its catalogue model, resolution and batch size) on synthetic uint8
images of the real shape:
  project  cifar_mlops.train.fit(model, config, splits)  (what `train` runs: pipeline.Batches, compile_model,
           callbacks, validation on a 64-image split)
  bare     model.compile(Adam, categorical cross-entropy) + model.fit on the same batches, no
           callbacks, no validation
Images/s is measured on the second epoch (the first includes tracing). Each case's variants run
--rounds times, interleaved (v1 v2 ... v1 v2 ...), each in a fresh process; a row is the median.
FLOPs are counted by hand from the built model's layers: Conv2D 2*Ho*Wo*k*k*Cin*Cout/groups,
DepthwiseConv2D 2*Ho*Wo*k*k*C, Dense 2*in*out (batchnorm, activations, pooling, resize ignored: a few % at most); a training step is taken as
3x the forward FLOPs (forward + two backward matmuls). Share of peak = achieved FLOP/s / the FP32 peak
computed from lscpu (see common.peak_fp32_gflops, assumptions stated there).
--knobs adds bare-fit variants: steps_per_execution=8, jit_compile=True, batch size x2; and project-fit
variants with train.precision mixed_bfloat16 and mixed_float16 (the CPU's bf16/fp16 paths; on a GPU,
`train.precision: auto` picks mixed_float16).
"""

from __future__ import annotations

import argparse
import json
import sys

import common


def count_forward_flops(model) -> int:
    from keras import layers

    total = 0

    def walk(layer):
        nonlocal total
        if hasattr(layer, "layers") and layer.layers and not isinstance(layer, (layers.Conv2D, layers.Dense)):
            for sub in layer.layers:
                walk(sub)
            return
        try:
            out = layer.output.shape
        except Exception:  # noqa: BLE001 - layers without a single symbolic output carry no FLOPs we count
            return
        if isinstance(layer, layers.DepthwiseConv2D):
            k = layer.kernel.shape
            total += 2 * out[1] * out[2] * k[0] * k[1] * k[2] * k[3]
        elif isinstance(layer, layers.Conv2D):
            k = layer.kernel.shape
            total += 2 * out[1] * out[2] * k[0] * k[1] * k[2] * k[3]
        elif isinstance(layer, layers.Dense):
            k = layer.kernel.shape
            total += 2 * k[0] * k[1]

    walk(model)
    return int(total)


def child(case: str, mode: str, images: int, batch_size: int | None, spe: int, jit: bool, precision: str) -> None:
    import keras
    import numpy as np

    from cifar_mlops import train
    from cifar_mlops.config import resolve
    from cifar_mlops.models import create_model

    overrides = {"train.epochs": 2, "data.source": "synthetic", "augment.blur_sigma": 0.0, "augment.rotation": 0.0}
    if batch_size:
        overrides["train.batch_size"] = batch_size
    if spe > 1:
        overrides["train.steps_per_execution"] = spe
    overrides["train.precision"] = precision
    config = resolve(case, overrides)
    policy = train.dtype_policy(config.train)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(images + 64, 32, 32, 3), dtype=np.uint8)
    y = np.arange(images + 64) % 10
    keras.utils.set_random_seed(0)
    with train.building_with_policy(policy):
        model = create_model(config.model.name, **config.model.settings())
    flops = count_forward_flops(model)
    timer = common.epoch_timer()

    bs = config.train.batch_size
    if mode == "project":
        splits = common.synthetic_splits(x[:images], y[:images], x[images:], y[images:])
        train.fit(model, config, splits, callbacks=[timer])
    else:
        from cifar_mlops.pipeline import Batches

        ds = Batches(x[:images], y[:images], batch_size=bs, num_classes=10, training=True, seed=0)
        model.compile(optimizer=keras.optimizers.Adam(config.train.learning_rate), loss="categorical_crossentropy",
                      metrics=["accuracy"], steps_per_execution=spe, jit_compile=jit)
        model.fit(ds, epochs=2, verbose=0, callbacks=[timer])
    # the project's epoch also validates 64 images; negligible next to `images` training images
    ips = images / timer.seconds[-1]
    print(json.dumps({"case": case, "mode": mode, "model": config.model.name, "image_size": config.model.image_size,
                      "interpolation": config.model.interpolation, "batch_size": bs, "steps_per_execution": spe,
                      "jit_compile": jit, "precision": policy, "params": model.count_params(), "forward_flops_per_image": flops,
                      "images_per_s": round(ips, 1), "epoch_s": [round(t, 2) for t in timer.seconds]}))


def run_child(images: int, env: dict, cwd, case: str, mode: str, batch: int, spe: int, jit: int,
              precision: str) -> dict:
    """One variant in a fresh process: its JSON row, or a row with `error` (e.g. XLA cannot compile a layer)."""
    _, proc = common.timed_run([common.PYTHON, __file__, "--images", str(images), "--child", case, mode, str(batch),
                                str(spe), str(jit), precision], env=env, cwd=cwd, check=False)
    if proc.returncode != 0:
        errors = [line for line in proc.stderr.splitlines() if "Error" in line or "failed" in line]
        r = {"case": case, "mode": mode, "batch_size": batch or None, "steps_per_execution": spe,
             "jit_compile": bool(jit), "precision": precision,
             "error": (errors[-1] if errors else proc.stderr.strip().splitlines()[-1])[:300]}
    else:
        r = {**common.last_json_line(proc.stdout), "loadavg": common.loadavg()[0]}
    print(json.dumps(r), file=sys.stderr)
    return r


def summarise(rounds: list[dict], peak: dict) -> dict:
    """One row per variant: the median images/s over its rounds, every round's figure kept."""
    ok = [r for r in rounds if "error" not in r]
    if not ok:
        return rounds[-1]
    row = dict(ok[0])
    row["images_per_s_rounds"] = [r["images_per_s"] for r in ok]
    row["images_per_s"] = round(common.median(row["images_per_s_rounds"]), 1)
    row["loadavg"] = max(r["loadavg"] for r in ok)
    row["gflops_per_s"] = round(3 * row["forward_flops_per_image"] * row["images_per_s"] / 1e9, 1)
    row["share_of_peak"] = row["gflops_per_s"] / peak["gflops"]
    if len(ok) < len(rounds):
        row["failed_rounds"] = len(rounds) - len(ok)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--cases", default="b5,1.0,1.1,3.0", help="experiment ids: b5 cnn 32px, 1.0 MobileNetV2 32px, "
                        "1.1 MobileNetV2 96px bicubic, 3.0 DenseNet-121 32px")
    parser.add_argument("--knobs", action="store_true")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved repeats of each variant (median kept)")
    parser.add_argument("--merge", action="store_true",
                        help="keep results/throughput.json rows of cases not rerun (run cases in several goes)")
    parser.add_argument("--child", nargs=6, metavar=("CASE", "MODE", "BATCH", "SPE", "JIT", "PRECISION"))
    args = parser.parse_args()
    if args.child:
        case, mode, batch, spe, jit, precision = args.child
        return child(case, mode, args.images, int(batch) or None, int(spe), jit == "1", precision)

    peak = common.peak_fp32_gflops()
    before = common.load_snapshot()
    results = []
    with common.tempdir("throughput") as tmp:
        env = common.temp_env(tmp)
        for case in args.cases.split(","):
            variants = [("project", 0, 1, 0, "auto"), ("bare", 0, 1, 0, "auto")]
            if args.knobs:
                variants += [("bare", 0, 8, 0, "auto"), ("bare", 0, 1, 1, "auto"), ("bare", -2, 1, 0, "auto"),
                             ("project", 0, 1, 0, "mixed_bfloat16"), ("project", 0, 1, 0, "mixed_float16")]
            base_batch = None
            runs: dict[tuple, list[dict]] = {}
            for _ in range(args.rounds):
                for mode, batch, spe, jit, precision in variants:
                    if batch == -2:
                        if base_batch is None:
                            continue  # the catalogue batch is not known yet (the first variants failed)
                        batch = 2 * base_batch
                    r = run_child(args.images, env, tmp, case, mode, batch, spe, jit, precision)
                    base_batch = base_batch or r.get("batch_size")
                    runs.setdefault((mode, batch, spe, jit, precision), []).append(r)
            results += [summarise(rs, peak) for rs in runs.values()]
    after = common.load_snapshot()
    previous = common.RESULTS / "throughput.json"
    if args.merge and previous.exists():
        rerun = set(args.cases.split(","))
        results = [r for r in json.loads(previous.read_text())["results"] if r["case"] not in rerun] + results
    results = [r for r in results if "error" not in r] + [r for r in results if "error" in r]
    ok = [r for r in results if "error" not in r]
    rows = [[r["case"], r["model"], f'{r["image_size"]} {r["interpolation"]}', r["mode"], r["batch_size"],
             r["steps_per_execution"], "yes" if r["jit_compile"] else "no", r.get("precision", "float32"),
             f'{r["forward_flops_per_image"] / 1e6:.1f}',
             r["images_per_s"], r["gflops_per_s"], f'{100 * r["share_of_peak"]:.1f}%'] for r in ok]
    common.print_table(["exp", "model", "input", "fit", "batch", "spe", "jit", "precision", "MFLOP/img fwd", "img/s",
                        "GFLOP/s", "% of peak"], rows)
    for r in results:
        if "error" in r:
            print(f"{r['case']} {r['mode']} jit={r['jit_compile']} spe={r['steps_per_execution']}: FAILED: {r['error']}")
    print(f"FP32 peak assumed: {peak['gflops']} GFLOP/s = {peak['formula']}")
    common.write_result("throughput", {"images": args.images, "rounds": args.rounds, "results": results, "peak": peak,
                                       "load_before": before, "load_after": after})


if __name__ == "__main__":
    sys.exit(main())
