"""Issue 17: `train`'s images per second per Keras backend, against the TensorFlow pipeline it replaced,
and on two logical CPU devices against one.

    .venv/bin/python benchmarks/bench_backends.py [--images 1536] [--cases b5,1.0] [--rounds 3] [--before REV]

Each row is `cifar_mlops.train.fit(model, config, splits)` (what `train` runs: the input pipeline with the
experiment's own augmentation, compile, callbacks, validation on 64 images) of the case's catalogue model,
resolution and batch size, on synthetic uint8 images of the real shape; images/s is measured on the second
epoch (the first includes tracing). Variants, each in a fresh process, interleaved --rounds times
(v1 v2 ... v1 v2 ...); a row is the median:
  before   TensorFlow, the code of --before (default: the last commit with the tf.data pipeline), checked
           out into a temporary git worktree
  <b>      the working tree on backend b (tensorflow, jax, torch)
  <b> x2   the same on two logical CPU devices (train.devices=2: TensorFlow splits the CPU, JAX gets
           XLA_FLAGS=--xla_force_host_platform_device_count=2); b5 only
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import common

BEFORE = "080fc85"  # main before the backends: tf.data pipeline and augmentation
BACKENDS = ("tensorflow", "jax", "torch")


def child(case: str, images: int, devices: int) -> None:
    import keras
    import numpy as np

    from cifar_mlops import train
    from cifar_mlops.config import resolve
    from cifar_mlops.models import create_model

    try:
        from cifar_mlops import backend

        backend.keep_tensorflow_out()
        scope = backend.data_parallel(devices, resolve(case).train.batch_size)
    except ImportError:  # the code before the backends: TensorFlow, one device
        import contextlib

        scope = contextlib.nullcontext(1)
    config = resolve(case, {"train.epochs": 2, "data.source": "synthetic", "train.checkpoint_every": 0})
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(images + 64, 32, 32, 3), dtype=np.uint8)
    y = np.arange(images + 64) % 10
    keras.utils.set_random_seed(0)
    timer = common.epoch_timer()

    with scope as count:
        with train.building_with_policy("float32"):
            model = create_model(config.model.name, **config.model.settings())
        train.fit(model, config, common.synthetic_splits(x[:images], y[:images], x[images:], y[images:]),
                  callbacks=[timer])
    print(json.dumps({"case": case, "backend": keras.backend.backend(), "devices": count,
                      "batch_size": config.train.batch_size, "augment": config.augment.model_dump(),
                      "images_per_s": round(images / timer.seconds[-1], 1),
                      "epoch_s": [round(t, 2) for t in timer.seconds],
                      "tensorflow_imported": "tensorflow" in sys.modules}))


def run_child(variant: str, case: str, images: int, code: Path, env: dict, cwd: str) -> dict:
    name, _, times = variant.partition(" x")
    devices = int(times or 1)
    child_env = {**env, "KERAS_BACKEND": "tensorflow" if name == "before" else name, "PYTHONPATH": str(code)}
    if devices > 1:
        child_env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    _, proc = common.timed_run([common.PYTHON, str(code / "benchmarks" / "bench_backends.py"), "--images",
                                str(images), "--child", case, str(devices)], env=child_env, cwd=cwd, check=False)
    if proc.returncode != 0:
        row = {"error": (proc.stderr.strip().splitlines() or ["?"])[-1][:300]}
    else:
        row = {**common.last_json_line(proc.stdout), "loadavg": common.loadavg()[0]}
    row.update(case=case, variant=variant)
    print(json.dumps(row), file=sys.stderr)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1536)
    parser.add_argument("--cases", default="b5,1.0", help="b5: study B's CNN, no augmentation; "
                        "1.0: MobileNetV2 with the Gaussian blur")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--before", default=BEFORE, help="the revision `before` rows run")
    parser.add_argument("--child", nargs=2, metavar=("CASE", "DEVICES"))
    args = parser.parse_args()
    if args.child:
        return child(args.child[0], args.images, int(args.child[1]))

    before = common.load_snapshot()
    rows: list[dict] = []
    with common.tempdir("backends") as tmp:
        old = Path(tmp) / "before"
        subprocess.run(["git", "-C", str(common.ROOT), "worktree", "add", "--detach", str(old), args.before],
                       check=True, capture_output=True)
        # the old tree gets this script and its helpers (they run the old code's train.fit)
        for script in ("bench_backends.py", "common.py"):
            (old / "benchmarks" / script).write_text((common.BENCH / script).read_text())
        try:
            env = common.temp_env(tmp)
            for case in args.cases.split(","):
                variants = ["before", *BACKENDS] + (["tensorflow x2", "jax x2"] if case == "b5" else [])
                for _ in range(args.rounds):
                    for variant in variants:
                        code = old if variant == "before" else common.ROOT
                        rows.append(run_child(variant, case, args.images, code, env, tmp))
        finally:
            subprocess.run(["git", "-C", str(common.ROOT), "worktree", "remove", "--force", str(old)], check=False)
    after = common.load_snapshot()
    summary = summarise(rows)
    common.print_table(["exp", "variant", "runs", "img/s (range)", "vs before", "vs 1 device", "TF imported"],
                       [[s["case"], s["variant"], s["runs"], s["range"], s["vs_before"], s["vs_one_device"],
                         s["tensorflow_imported"]] for s in summary])
    common.write_result("backends", {"machine": machine(), "images": args.images, "rounds": args.rounds,
                                     "before": args.before,
                                     "summary": summary, "rows": rows, "load_before": before, "load_after": after})


def machine() -> dict:
    from importlib import metadata

    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    cpu = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name")), "?")
    versions = {}
    for package in ("tensorflow-cpu", "keras", "jax", "jaxlib", "torch"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return {"cpu": cpu, "nproc": os.cpu_count(), "python": sys.version.split()[0], "versions": versions}


def summarise(rows: list[dict]) -> list[dict]:
    out = []
    keys = list(dict.fromkeys((r["case"], r["variant"]) for r in rows))
    median = {}
    for case, variant in keys:
        ok = [r for r in rows if (r["case"], r["variant"]) == (case, variant) and "error" not in r]
        ips = [r["images_per_s"] for r in ok]
        median[case, variant] = common.median(ips) if ips else None
        out.append({"case": case, "variant": variant, "runs": len(ok),
                    "images_per_s": median[case, variant], "rounds": ips,
                    "range": f"{median[case, variant]:.0f} ({min(ips):.0f}-{max(ips):.0f})" if ips else "FAILED",
                    "tensorflow_imported": "yes" if ok and ok[0]["tensorflow_imported"] else "no",
                    "errors": [r["error"] for r in rows if (r["case"], r["variant"]) == (case, variant)
                               and "error" in r]})
    for row in out:
        base = median.get((row["case"], "before"))
        one = median.get((row["case"], row["variant"].partition(" x")[0]))
        mine = row["images_per_s"]
        row["vs_before"] = f"{mine / base:.2f}x" if mine and base and row["variant"] != "before" else ""
        row["vs_one_device"] = f"{mine / one:.2f}x" if mine and one and " x" in row["variant"] else ""
    return out


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.exit(main())
