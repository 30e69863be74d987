"""Serving: latency and throughput of registered models through `mlflow models serve`, next to in-process calls.

    .venv/bin/python benchmarks/bench_serving.py [--singles 200] [--batches 10] [--batch-size 256] [--out FILE]

Two registered models in a throwaway SQLite store: the study B CNN (experiment b5, catalogue architecture
and prediction batch size, trained --epochs on synthetic data so that weights exist: accuracy does not
matter here, the architecture does) and a soft-voting ensemble of two such CNNs (b5 with seeds 0 and 1,
`smoke-ensemble` with its members overridden). For each model, on the same random uint8 images:
  in-process pyfunc   mlflow.pyfunc.load_model(uri).predict(pixels)  (for a PNG: a one-column DataFrame of
                      the base64 string, what the server hands the model for a `dataframe_split` request)
  in-process parsing  mlflow.pyfunc.scoring_server._parse_json_data(body, ...)  the first step of that
                      handler alone: JSON decoding and MLflow's casting of it to the input schema
  in-process handler  mlflow.pyfunc.scoring_server.invocations(body, ...)  the server's request handler
                      without HTTP: JSON parsing, schema checks, predict, JSON of the answer
  HTTP                a requests.Session posting the same body to a running
                      `mlflow models serve -m URI --env-manager local` (1 uvicorn worker) on 127.0.0.1;
                      the body is encoded once beforehand (client encoding is not timed, its cost is in
                      the JSON output), the answer is parsed with response.json() inside the timing
  HTTP GET /ping      the same session against the server's health check: HTTP + uvicorn's floor
and, for the CNN, the pitfall: its raw Keras model `model.predict(x)` against `predict_on_batch(x)` and the
member's MLflow Keras pyfunc `.predict(x)` (which calls `model.predict`), one image each.
Requests: one 32x32 image as `{"inputs": pixels}`, one as a base64 PNG `{"dataframe_split": ...}`, and
batches of --batch-size images as `{"inputs": pixels}`. Every arm is warmed up (--warmup single calls, 2
batches) and the served answers are checked against the in-process ones before timing; then the arms of a
model run interleaved in --rounds rounds (a1 a2 ... a1 a2 ...). Single images: p50/p99 over --singles calls;
batches: images/s = images / total seconds over --batches calls. The server and this client share the
machine's cores (the server is idle while in-process arms run).
Targets: one image over HTTP in at most 2x the in-process pyfunc time; the CNN's HTTP p50 at most 30 ms.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

import common
import numpy as np

TARGET_RATIO, TARGET_P50_MS = 2.0, 30.0
JSON_TYPE = {"Content-Type": "application/json"}


def synthetic_overrides(seed: int, epochs: int) -> dict:
    """b5 as catalogued (architecture, batch size) on a small synthetic pool: weights in seconds."""
    return {"data.source": "synthetic", "data.data_dir": None, "data.train_size": None, "data.val_size": 40,
            "data.synthetic_train_pool": 256, "data.synthetic_test_pool": 40, "data.seed": seed,
            "train.epochs": epochs, "train.seed": seed}


def newest_version(name: str) -> str:
    from mlflow import MlflowClient

    versions = MlflowClient().search_model_versions(f"name = '{name}'")
    return f"models:/{name}/{max(int(v.version) for v in versions)}"


def register_models(epochs: int) -> dict[str, str]:
    """Train b5 twice (seeds 0, 1), register the ensemble of both; {label: model URI}."""
    from cifar_mlops import config as cfg
    from cifar_mlops import ensemble
    from cifar_mlops.tracking import registry
    from cifar_mlops.train import train

    cnn_uris = []
    for seed in (0, 1):
        config = cfg.resolve("b5", synthetic_overrides(seed, epochs))
        train(config)
        cnn_uris.append(newest_version(registry.registered_model_name(config.family)))
    members = [{"registered_model": uri.split("/")[1], "version": int(uri.split("/")[2])} for uri in cnn_uris]
    data_overrides = {k: v for k, v in synthetic_overrides(0, epochs).items() if k.startswith("data.")}
    config = cfg.resolve("smoke-ensemble", {**data_overrides, "members": members, "fit_weights": False,
                                            "batch_size": cfg.resolve("b5").train.batch_size})
    ensemble.build(config)
    return {"b5 CNN": cnn_uris[0], "ensemble of 2 b5 CNNs": newest_version(registry.registered_model_name("ensemble"))}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def serving(model_uri: str, log: Path) -> Iterator[tuple[str, float]]:
    """`mlflow models serve -m model_uri --env-manager local` on a free port of 127.0.0.1: (URL, seconds to ready)."""
    import requests

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(MLFLOW_TRACKING_URI=os.environ["MLFLOW_TRACKING_URI"], TF_CPP_MIN_LOG_LEVEL="2",
               PATH=f"{common.VENV_BIN}{os.pathsep}{env.get('PATH', '')}")  # it execs uvicorn
    started = time.perf_counter()
    with open(log, "w") as output:
        server = subprocess.Popen([str(common.VENV_BIN / "mlflow"), "models", "serve", "-m", model_uri,
                                   "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
                                  env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"mlflow models serve exited {server.returncode}:\n{log.read_text()[-3000:]}")
            if time.perf_counter() - started > 300:
                raise RuntimeError(f"mlflow models serve did not answer in 300 s:\n{log.read_text()[-3000:]}")
            try:
                if requests.get(f"{url}/ping", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(0.25)
        yield url, time.perf_counter() - started
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def png_base64(image: np.ndarray) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def same_answers(served: list[dict], expected) -> None:
    """The served table (JSON records) is the in-process one: same labels, probabilities within 1e-5."""
    import pandas as pd

    table = pd.DataFrame(served)
    if list(table.columns) != list(expected.columns) or list(table["label"]) != list(expected["label"]):
        raise RuntimeError(f"served answers differ from in-process ones:\n{table.head()}\n{expected.head()}")
    numbers = [c for c in expected.columns if c != "label"]
    np.testing.assert_allclose(table[numbers].to_numpy(np.float64), expected[numbers].to_numpy(np.float64),
                               rtol=0, atol=1e-5)


class Arm:
    """One way of answering one request, timed call by call (seconds)."""

    def __init__(self, path: str, request: str, call: Callable[[], object], images: int,
                 baseline: str | None = None, key: str | None = None) -> None:
        """`key`: this arm is the in-process reference of that name; `baseline`: the reference it is compared to."""
        self.path, self.request, self.call, self.images = path, request, call, images
        self.baseline, self.key = baseline, key
        self.seconds: list[float] = []

    def run(self, n: int, timed: bool = True) -> None:
        for _ in range(n):
            started = time.perf_counter()
            self.call()
            if timed:
                self.seconds.append(time.perf_counter() - started)

    def summary(self) -> dict:
        ms = np.asarray(self.seconds) * 1e3
        return {"path": self.path, "request": self.request, "images_per_call": self.images, "calls": len(ms),
                "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
                "mean_ms": float(ms.mean()), "min_ms": float(ms.min()), "max_ms": float(ms.max()),
                "images_per_s": float(self.images * len(ms) / (ms.sum() / 1e3))}


def run_interleaved(arms: list[Arm], calls: int, warmup: int, rounds: int) -> None:
    for arm in arms:
        arm.run(warmup, timed=False)
    per_round = [calls // rounds + (1 if r < calls % rounds else 0) for r in range(rounds)]
    for n in per_round:
        for arm in arms:
            arm.run(n)


def measure(label: str, uri: str, args: argparse.Namespace, tmp: Path, pitfall: bool) -> dict:
    import mlflow
    import pandas as pd
    import requests
    from mlflow.pyfunc import scoring_server

    loaded = mlflow.pyfunc.load_model(uri)
    schema = loaded.metadata.get_input_schema()
    rng = np.random.default_rng(0)
    one = rng.integers(0, 256, (1, 32, 32, 3), dtype=np.uint8)
    batch = rng.integers(0, 256, (args.batch_size, 32, 32, 3), dtype=np.uint8)
    png = png_base64(one[0])
    png_frame = pd.DataFrame({"image": [png]})

    encode_started = time.perf_counter()
    one_body = json.dumps({"inputs": one.tolist()}).encode()
    encode_one_ms = (time.perf_counter() - encode_started) * 1e3
    encode_started = time.perf_counter()
    batch_body = json.dumps({"inputs": batch.tolist()}).encode()
    encode_batch_ms = (time.perf_counter() - encode_started) * 1e3
    png_body = json.dumps({"dataframe_split": {"columns": ["image"], "data": [[png]]}}).encode()

    def parse(body: bytes) -> Callable[[], object]:
        return lambda: scoring_server._parse_json_data(body, loaded.metadata, schema)  # what `invocations` runs first

    def handler(body: bytes) -> Callable[[], object]:
        def call():
            result = scoring_server.invocations(body, "application/json", loaded, schema)
            if result.status != 200:
                raise RuntimeError(f"scoring handler answered {result.status}: {str(result.response)[:500]}")
            return json.loads(result.response)
        return call

    log = tmp / f"serve-{'-'.join(label.split()[:2])}.log"
    with serving(uri, log) as (url, ready_s):
        session = requests.Session()

        def post(body: bytes) -> Callable[[], list[dict]]:
            def call():
                response = session.post(f"{url}/invocations", data=body, headers=JSON_TYPE, timeout=120)
                if response.status_code != 200:
                    raise RuntimeError(f"server answered {response.status_code}: {response.text[:500]}")
                return response.json()["predictions"]
            return call

        def ping():
            session.get(f"{url}/ping", timeout=30).raise_for_status()

        same_answers(post(one_body)(), loaded.predict(one))
        same_answers(post(png_body)(), loaded.predict(png_frame))
        same_answers(post(batch_body)(), loaded.predict(batch))
        same_answers(handler(batch_body)()["predictions"], loaded.predict(batch))

        singles = [Arm("in-process pyfunc `predict(pixels)`", "1 image, uint8 pixels", lambda: loaded.predict(one), 1,
                       key="pixels"),
                   Arm("in-process MLflow JSON parsing only", "1 image, JSON `inputs`", parse(one_body), 1),
                   Arm("in-process scoring handler", "1 image, JSON `inputs`", handler(one_body), 1, "pixels"),
                   Arm("HTTP `mlflow models serve`", "1 image, JSON `inputs`", post(one_body), 1, "pixels"),
                   Arm("in-process pyfunc `predict(DataFrame)`", "1 image, base64 PNG",
                       lambda: loaded.predict(png_frame), 1, key="png"),
                   Arm("HTTP `mlflow models serve`", "1 image, base64 PNG `dataframe_split`", post(png_body), 1,
                       "png"),
                   Arm("HTTP `GET /ping`", "no model call", ping, 0)]
        if pitfall:
            member = loaded.unwrap_python_model().member_models[0]
            keras_model = member.get_raw_model()
            singles += [Arm("raw Keras `model.predict(x)`", "1 image, uint8 pixels",
                            lambda: keras_model.predict(one, verbose=0), 1),
                        Arm("raw Keras `model.predict_on_batch(x)`", "1 image, uint8 pixels",
                            lambda: keras_model.predict_on_batch(one), 1),
                        Arm("member's MLflow Keras pyfunc `predict(x)`", "1 image, uint8 pixels",
                            lambda: member.predict(one), 1)]
        batches = [Arm("in-process pyfunc `predict(pixels)`", f"batch of {args.batch_size}, uint8 pixels",
                       lambda: loaded.predict(batch), args.batch_size, key="batch"),
                   Arm("in-process MLflow JSON parsing only", f"batch of {args.batch_size}, JSON `inputs`",
                       parse(batch_body), args.batch_size),
                   Arm("in-process scoring handler", f"batch of {args.batch_size}, JSON `inputs`",
                       handler(batch_body), args.batch_size, "batch"),
                   Arm("HTTP `mlflow models serve`", f"batch of {args.batch_size}, JSON `inputs`", post(batch_body),
                       args.batch_size, "batch")]
        print(f"{label}: server ready in {ready_s:.1f} s; timing {len(singles)} single-image arms x {args.singles} "
              f"and {len(batches)} batch arms x {args.batches}", file=sys.stderr)
        # Keras's progress bars (`model.predict` draws one per call) to stderr, at the same cost: stdout is the table.
        with contextlib.redirect_stdout(sys.stderr):
            run_interleaved(singles, args.singles, args.warmup, args.rounds)
            run_interleaved(batches, args.batches, 2, min(args.rounds, args.batches))
        session.close()

    arms = singles + batches
    rows = [{"model": label, **arm.summary()} for arm in arms]
    base = {arm.key: row for arm, row in zip(arms, rows) if arm.key}
    for arm, row in zip(arms, rows):  # time relative to the in-process pyfunc on the same images
        ref = base.get(arm.baseline)
        row["vs_in_process"] = (row["p50_ms"] / ref["p50_ms"] if row["images_per_call"] == 1
                                else ref["images_per_s"] / row["images_per_s"]) if ref else None
    return {"model": label, "uri": uri, "server_ready_s": round(ready_s, 1), "body_bytes":
            {"1 image inputs": len(one_body), "1 image png": len(png_body), "batch inputs": len(batch_body)},
            "client_json_encode_ms": {"1 image": round(encode_one_ms, 2), "batch": round(encode_batch_ms, 1)},
            "rows": rows}


def verdicts(results: list[dict]) -> dict:
    out = {}
    for result in results:
        rows = result["rows"]
        http = next(r for r in rows if r["path"].startswith("HTTP `mlflow") and r["request"].endswith("`inputs`")
                    and r["images_per_call"] == 1)
        out[result["model"]] = {"http_p50_ms": http["p50_ms"], "ratio_to_in_process": http["vs_in_process"],
                                "ratio_met": http["vs_in_process"] <= TARGET_RATIO}
    cnn = out[results[0]["model"]]
    cnn["p50_met"] = cnn["http_p50_ms"] <= TARGET_P50_MS
    return out


def markdown_table(results: list[dict]) -> str:
    import pandas as pd

    def ms(v: float) -> str:
        return f"{v:.1f}" if v < 100 else f"{v:.0f}"

    table = []
    for result in results:
        for r in result["rows"]:
            single = r["images_per_call"] <= 1
            table.append({"model": r["model"], "path": r["path"], "request": r["request"], "calls": r["calls"],
                          "p50 ms": ms(r["p50_ms"]), "p99 ms": ms(r["p99_ms"]) if single else "",
                          "images/s": "" if single else f"{r['images_per_s']:.0f}",
                          "x in-process": f"{r['vs_in_process']:.2f}" if r["vs_in_process"] else ""})
    return pd.DataFrame(table).to_markdown(index=False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--singles", type=int, default=200, help="timed single-image calls per arm")
    parser.add_argument("--batches", type=int, default=10, help="timed batch calls per arm")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=20, help="untimed single-image calls per arm first")
    parser.add_argument("--rounds", type=int, default=4, help="interleaving rounds of the arms")
    parser.add_argument("--epochs", type=int, default=1, help="training epochs of each b5 (weights only)")
    parser.add_argument("--out", type=Path, help="also write the results as JSON here (always: benchmarks/results/serving.json)")
    args = parser.parse_args()
    out = args.out.resolve() if args.out else None  # before the chdir below

    started = time.perf_counter()
    before = common.load_snapshot()
    with common.tempdir("serving") as tmp:
        for name in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME", "CIFAR10_DIR"):
            os.environ.pop(name, None)
        os.environ.update(common.temp_env(tmp))
        os.chdir(tmp)  # MLflow's artifacts beside the store, never in the repository
        import mlflow

        mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
        train_started = time.perf_counter()
        uris = register_models(args.epochs)
        train_s = time.perf_counter() - train_started
        print(f"trained and registered {uris} in {train_s:.0f} s", file=sys.stderr)
        try:
            results = [measure(label, uri, args, Path(tmp), pitfall=i == 0)
                       for i, (label, uri) in enumerate(uris.items())]
        finally:
            os.chdir(common.ROOT)
    after = common.load_snapshot()

    targets = verdicts(results)
    print(markdown_table(results))
    for model, v in targets.items():
        print(f"{model}: HTTP p50 {v['http_p50_ms']:.1f} ms = {v['ratio_to_in_process']:.2f}x in-process "
              f"(target <= {TARGET_RATIO:g}x: {'met' if v['ratio_met'] else 'missed'})"
              + (f"; p50 target <= {TARGET_P50_MS:g} ms: {'met' if v['p50_met'] else 'missed'}" if "p50_met" in v
                 else ""))
    versions = {}
    for package in ("tensorflow-cpu", "tensorflow", "keras", "mlflow", "numpy", "pandas", "requests", "uvicorn"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    payload = {
        "machine": {"nproc": os.cpu_count(), "cpu": next((line.split(":", 1)[1].strip() for line in
                                                          lscpu.splitlines() if line.startswith("Model name")), ""),
                    "python": platform.python_version()},
        "versions": versions, "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "train_and_register_s": round(train_s, 1), "total_s": round(time.perf_counter() - started, 1),
        "results": results, "targets": {"ratio": TARGET_RATIO, "cnn_p50_ms": TARGET_P50_MS, **targets},
        "table_markdown": markdown_table(results), "load_before": before, "load_after": after}
    written = common.write_result("serving", payload)
    if out:
        out.write_text(written.read_text())
        print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
