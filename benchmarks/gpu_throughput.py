"""Training images/s of every registered model factory at its catalogue resolution, on the current
Keras backend (KERAS_BACKEND), as a share of the device's peak. Part of benchmarks/gpu_check.sh.

    KERAS_BACKEND=jax python3 benchmarks/gpu_throughput.py [--batch-sizes 128,256,512] [--budget 90]
        [--min-time 1] [--max-steps 100] [--precision auto] [--models a,b] [--rows ROWS.tsv] [--json OUT.json]

Cases come from the catalogue: every (model, image_size) some experiment trains, with that experiment's
model settings (weights always random: the machine is offline, and speed does not depend on them).
Each case is built with `models.create_model`, compiled as a bare `model.compile(optimizer="adam",
loss="categorical_crossentropy")` and fitted on synthetic uint8 images for each batch size of the
sweep: a 2-step fit compiles for that shape (JAX; reported apart), a second 2-step fit times a step,
and a fit of about --min-time seconds (at most --max-steps batches) is the measurement. The best
batch size's images/s is the case's result.

Precision: mixed_bfloat16 on a GPU (Hopper's tensor cores), float32 on a CPU (--precision overrides).
FLOPs per training image = 3 x the forward FLOPs counted from the layers' shapes (bench_throughput's
count_forward_flops: Conv2D, DepthwiseConv2D and Dense multiply-adds x2). The shares are of NVIDIA's
H200 SXM datasheet figures, dense: 989 TFLOP/s bf16 and 67 TFLOP/s fp32 (set GPU_PEAK_BF16_TFLOPS,
GPU_PEAK_FP32_TFLOPS for another GPU); a plain bf16 matmul measured ~790 TFLOP/s on this H200.
On a CPU the fp32 share is of common.peak_fp32_gflops() instead and the bf16 column is left out.

--budget bounds the whole run. Order of work: every factory once (at its largest catalogue resolution,
the middle batch size; cheapest first), then the other resolutions, then the rest of each sweep; what
would not end in the time left (judged by what the case's first measurement cost) is skipped and
reported so. --rows and --json are rewritten after every measurement, so a kill loses nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

# The backend is chosen by KERAS_BACKEND before keras is imported (as `cifar-mlops --backend` does).
import keras
import numpy as np
from bench_throughput import count_forward_flops

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # the repo, if not installed
from cifar_mlops import config as cfg
from cifar_mlops import models

FAMILY_COST = {"cnn": 0, "mobilenetv2": 1, "densenet121": 2}  # cheap first, so a short budget cuts the dearest


def catalogue_cases() -> list[dict]:
    """One case per (model, image_size) the catalogue trains, with the first such experiment's settings;
    a registered model that no experiment uses is measured at its defaults (32 px)."""
    cases: dict[tuple[str, int], dict] = {}
    for exp_id in cfg.list_experiments():
        config = cfg.resolve(exp_id)
        if config.kind != "train":
            continue
        # random initialisation (None, every factory's default); the image size is passed on its own
        settings = {k: v for k, v in config.model.settings().items() if k not in ("weights", "image_size")}
        cases.setdefault((config.model.name, config.model.image_size),
                         {"model": config.model.name, "image_size": config.model.image_size, "exp": exp_id,
                          "settings": settings})
    for name in models.list_models():
        if not any(model == name for model, _ in cases):
            cases[(name, 32)] = {"model": name, "image_size": 32, "exp": "-", "settings": {}}
    return sorted(cases.values(), key=lambda c: (c["image_size"], FAMILY_COST.get(models.get_model_entry(
        c["model"]).family, 1), c["model"]))


def device() -> tuple[bool, str]:
    """(a GPU is what Keras trains on, its name) for the current backend."""
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        d = jax.devices()[0]
        return d.platform == "gpu", d.device_kind
    if backend == "torch":
        import torch

        return (True, torch.cuda.get_device_name(0)) if torch.cuda.is_available() else (False, "cpu")
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    return bool(gpus), gpus[0].name if gpus else "cpu"


def peaks(gpu: bool) -> dict:
    if gpu:
        return {"bf16_tflops": float(os.environ.get("GPU_PEAK_BF16_TFLOPS", 989.4)),
                "fp32_tflops": float(os.environ.get("GPU_PEAK_FP32_TFLOPS", 66.9)),
                "source": "H200 SXM datasheet (dense)"}
    import common

    peak = common.peak_fp32_gflops()
    return {"bf16_tflops": None, "fp32_tflops": peak["gflops"] / 1000, "source": peak["formula"]}


def fit_seconds(model, x, y, batch: int, steps: int) -> float:
    """Wall seconds of one epoch of `steps` batches. `fit` returns the epoch's logs as Python floats,
    so the device has finished when it returns (JAX and CUDA dispatch asynchronously)."""
    start = time.perf_counter()
    model.fit(x[:batch * steps], y[:batch * steps], batch_size=batch, epochs=1, shuffle=False, verbose=0)
    return time.perf_counter() - start


class Case:
    """One (model, image_size): its model, built and compiled once, and its sweep so far."""

    def __init__(self, spec: dict, pool: int):
        self.spec, self.pool, self.model, self.sweep, self.cost = spec, pool, None, {}, None
        self.label = f"throughput {spec['model']} {spec['image_size']}px"
        self.seconds, self.error = 0.0, None

    def build(self) -> None:
        self.model = models.create_model(self.spec["model"], image_size=self.spec["image_size"],
                                         **self.spec["settings"])
        self.model.compile(optimizer="adam", loss="categorical_crossentropy")
        self.flops = count_forward_flops(self.model)
        rng = np.random.default_rng(0)
        self.x = rng.integers(0, 256, (self.pool, 32, 32, 3), dtype=np.uint8)
        self.y = np.eye(10, dtype="float32")[rng.integers(0, 10, self.pool)]

    def run(self, batch: int, min_time: float, max_steps: int, deadline: float) -> None:
        """Time one batch size: a 2-step fit compiles for this shape (JAX), a second 2-step fit times a step,
        and a fit of about `min_time` seconds (within the deadline) is the measurement, unless the
        second fit already took that long."""
        began = time.monotonic()
        try:
            if self.model is None:
                self.build()
            compile_s = fit_seconds(self.model, self.x, self.y, batch, 2)
            steps, seconds = 2, fit_seconds(self.model, self.x, self.y, batch, 2)
            per_step = seconds / steps
            more = int(min(max_steps, self.pool // batch, min_time / per_step, (deadline - time.monotonic()) / per_step))
            if seconds < min_time and more > steps:
                steps, seconds = more, fit_seconds(self.model, self.x, self.y, batch, more)
            self.sweep[batch] = {"images_per_s": batch * steps / seconds, "steps": steps, "compile_s": compile_s}
        except Exception as err:  # noqa: BLE001 - e.g. out of memory at this batch: reported, the rest goes on
            self.sweep[batch] = f"failed: {type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}"
            self.error = self.error or self.sweep[batch]
        self.cost = time.monotonic() - began if self.cost is None else self.cost  # the first includes building
        self.seconds += time.monotonic() - began

    def summary(self, peak: dict) -> dict:
        timed = {b: r for b, r in self.sweep.items() if isinstance(r, dict)}
        row = {**self.spec, "sweep": self.sweep, "seconds": self.seconds,
               "forward_flops_per_image": getattr(self, "flops", None)}
        if not timed:
            return {**row, "status": "failed" if self.error else "skipped (time budget)", "best": None}
        batch = max(timed, key=lambda b: timed[b]["images_per_s"])
        ips = timed[batch]["images_per_s"]
        tflops = 3 * self.flops * ips / 1e12
        shares = {f"share_{k}": tflops / peak[f"{k}_tflops"] if peak[f"{k}_tflops"] else None for k in ("bf16", "fp32")}
        return {**row, "status": "ok", "best": {"batch": batch, "images_per_s": ips, "tflops": tflops, **shares}}


def describe(row: dict, batch_sizes: list[int]) -> str:
    """One line for the check's table: best images/s, FLOP/s and shares, then the sweep."""
    sweep = ", ".join(f"{b}: {row['sweep'][b]['images_per_s']:,.0f}" if isinstance(row["sweep"].get(b), dict)
                      else f"{b}: {row['sweep'].get(b, 'skipped (time budget)')}" for b in batch_sizes)
    best = row["best"]
    if best is None:
        return f"sweep {sweep}"
    shares = " / ".join(f"{100 * best[f'share_{k}']:.2f}% of {k} peak" for k in ("bf16", "fp32")
                        if best[f"share_{k}"] is not None)
    first = min(r["compile_s"] for r in row["sweep"].values() if isinstance(r, dict))
    return (f"{best['images_per_s']:,.0f} img/s at batch {best['batch']} "
            f"({3 * row['forward_flops_per_image'] / 1e6:,.0f} MFLOP/img trained, {best['tflops']:.2f} TFLOP/s = "
            f"{shares}); img/s by batch {sweep}; first 2-step fit (compiles on JAX) {first:.1f} s")


def plan(cases: list[Case], batch_sizes: list[int]) -> list[tuple[Case, int]]:
    """The order of work, most wanted first: every factory once (the middle batch size, at its largest
    catalogue resolution), then its other resolutions, then the rest of each sweep."""
    middle = batch_sizes[len(batch_sizes) // 2]
    largest = {c.spec["model"]: c for c in cases}  # cases are sorted by image size: the last one wins
    first = [c for c in cases if largest[c.spec["model"]] is c]
    work = [(c, middle) for c in first] + [(c, middle) for c in cases if c not in first]
    return work + [(c, b) for c in cases for b in batch_sizes if b != middle]


def report(cases: list[Case], peak: dict, batch_sizes: list[int], args, backend: str, name: str,
           policy: str) -> list[dict]:
    """Rewrite --rows (one tab-separated row per case, for gpu_check.sh's table) and --json."""
    rows = []
    for case in cases:
        row = case.summary(peak)
        row["label"] = case.label
        row["text"] = describe(row, batch_sizes) if row["best"] else (case.error or "not run: the time budget was spent")
        rows.append(row)
    if args.rows:
        with open(args.rows, "w") as out:
            out.writelines("\t".join([r["label"], f"{backend} {policy}", r["status"], f"{r['seconds']:.0f}",
                                      r["text"].replace("\t", " ")]) + "\n" for r in rows)
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"backend": backend, "device": name, "policy": policy, "peak": peak, "rows": rows}, out, indent=1)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", default="128,256,512")
    parser.add_argument("--budget", type=float, default=90, help="seconds for all cases together")
    parser.add_argument("--min-time", type=float, default=1.0, help="seconds each timed fit aims at")
    parser.add_argument("--max-steps", type=int, default=100, help="most batches in a timed fit")
    parser.add_argument("--precision", default="auto", choices=["auto", "float32", "mixed_bfloat16", "mixed_float16"])
    parser.add_argument("--models", default="", help="comma-separated model names (default: all)")
    parser.add_argument("--rows", help="write one tab-separated row per case here (gpu_check.sh's table)")
    parser.add_argument("--json", help="write every measurement here")
    args = parser.parse_args()

    began = time.monotonic()
    deadline = began + args.budget
    backend = keras.backend.backend()
    gpu, name = device()
    policy = args.precision if args.precision != "auto" else "mixed_bfloat16" if gpu else "float32"
    keras.config.set_dtype_policy(policy)
    peak = peaks(gpu)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    wanted = set(filter(None, args.models.split(",")))
    specs = [c for c in catalogue_cases() if not wanted or c["model"] in wanted]
    print(f"[gpu_throughput] {backend} on {name}, policy {policy}, batch sizes {batch_sizes}, "
          f"{len(specs)} cases, budget {args.budget:.0f} s", flush=True)

    cases = [Case(spec, max(batch_sizes) * args.max_steps) for spec in specs]
    for case, batch in plan(cases, batch_sizes):
        # Skip what would not end in time: a case not started yet costs an unknown compile (tried while
        # a tenth of the budget is left), another batch size of a started one about what its first cost.
        if case.error and case.model is None:
            continue  # it could not even be built
        if deadline - time.monotonic() < (case.cost if case.cost is not None else 0.1 * args.budget):
            continue
        case.run(batch, args.min_time, args.max_steps, deadline)
        result = case.sweep[batch]
        said = result if isinstance(result, str) else f"{result['images_per_s']:,.0f} img/s"
        print(f"[gpu_throughput] {case.label} batch {batch}: {said}", flush=True)
        report(cases, peak, batch_sizes, args, backend, name, policy)  # kept current: a kill loses nothing
    for row in report(cases, peak, batch_sizes, args, backend, name, policy):
        print(f"[gpu_throughput] {row['label']}: {row['status']}: {row['text']}", flush=True)
    measured = sum(1 for case in cases if any(isinstance(r, dict) for r in case.sweep.values()))
    print(f"[gpu_throughput] done in {time.monotonic() - began:.0f} s: {measured} of {len(cases)} cases measured "
          f"({policy} on {name})", flush=True)


if __name__ == "__main__":
    main()
