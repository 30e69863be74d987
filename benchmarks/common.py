"""Shared helpers for the benchmark scripts: paths, temp MLflow stores, load snapshots, results files.

Every script writes `benchmarks/results/<name>.json`; `report_results.py` renders RESULTS.md from them.
Benchmarks never write into the repository's working directory: MLflow points at a temporary SQLite
store (MLFLOW_TRACKING_URI) and subprocesses run in a temporary folder.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
RESULTS = BENCH / "results"
VENV_BIN = Path(sys.executable).parent
CLI = str(VENV_BIN / "cifar-mlops")
PYTHON = sys.executable
SAMPLE_DIR = Path(os.environ.get("CIFAR10_SAMPLE_DIR", ROOT.parent / "shared/data/cifar10-sample/cifar-10-batches-py"))
# The sample's data batches (4,170 images) split 80/20 into train/val; its test batch (1,000) is the test split.
SAMPLE_SPLIT = {"data.train_size": 3336, "data.val_size": 834}


def repo_relative(path: str | Path) -> str:
    """`path` relative to the repository (e.g. ../shared/data/...): results name no machine's folders."""
    return os.path.relpath(Path(path).expanduser().absolute(), ROOT)


# Absolute folders -> how results write them, most specific first ("" + "/x" would be "/x": the repository is "").
_SHORTER = [(str(ROOT), "."), (str(ROOT.parent), ".."), (str(Path.home()), "~")]


def portable(value):
    """`value` (JSON-like) with paths under the repository, the folder above it or $HOME written relative:
    /repo/benchmarks/x -> benchmarks/x, /repo -> ., /repo/../shared/y -> ../shared/y, $HOME/z -> ~/z."""
    if isinstance(value, dict):
        return {k: portable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [portable(v) for v in value]
    if not isinstance(value, str):
        return value
    for folder, short in _SHORTER:
        if folder == os.sep:
            continue
        start, end = r"(?<![\w./~-])", r"(?=[\s'\":,;)]|$)"  # whole path components only
        value = re.sub(start + re.escape(folder + "/"), "" if short == "." else short + "/", value)
        value = re.sub(start + re.escape(folder) + end, short, value)
    return value


def loadavg() -> tuple[float, float, float]:
    return os.getloadavg()


def other_processes(top: int = 5) -> list[str]:
    """The busiest processes right now that are not this benchmark (to describe the load honestly). ps's %cpu is
    the process's average over its life; a stopped process (state T: paused for a quiet measurement) uses none."""
    out = subprocess.run(["ps", "-eo", "pid,stat,pcpu,etime,args", "--sort=-pcpu"], capture_output=True, text=True).stdout
    mine = {os.getpid(), os.getppid()}
    rows = []
    for line in out.splitlines()[1:]:
        parts = line.split(None, 4)
        if len(parts) < 5 or int(parts[0]) in mine or float(parts[2]) < 5.0 or parts[4].startswith("ps ") \
                or parts[1].startswith("T") \
                or "<defunct>" in parts[4] or "benchmarks/" in parts[4] or "cifar-mlops-bench-" in parts[4]:
            continue
        rows.append(f"{parts[2]}% cpu: {parts[4][:90]}")
        if len(rows) >= top:
            break
    return rows


def load_snapshot() -> dict:
    return {"loadavg_1_5_15": [round(v, 2) for v in loadavg()], "busy_processes": other_processes()}


def temp_env(tmp: str | Path, **extra: str) -> dict[str, str]:
    """Environment for a subprocess: a throwaway SQLite MLflow store inside `tmp`, quiet TensorFlow."""
    env = dict(os.environ)
    env.update({
        "MLFLOW_TRACKING_URI": f"sqlite:///{Path(tmp) / 'mlflow.db'}",
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "PYTHONUNBUFFERED": "1",
    })
    env.update(extra)
    return env


def tempdir(prefix: str) -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix=f"cifar-mlops-bench-{prefix}-")


def timed_run(cmd: list[str], *, env: dict | None = None, cwd: str | Path | None = None,
              check: bool = True) -> tuple[float, subprocess.CompletedProcess]:
    started = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return elapsed, proc


def last_json_line(text: str) -> dict:
    """The last line of `text` that parses as a JSON object (child scripts print their result that way)."""
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    raise ValueError(f"no JSON result line in output:\n{text[-2000:]}")


def median(values) -> float:
    return float(statistics.median(values))


def mean_std(values) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation of the values that are not None; (None, None) for none."""
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def machine_facts() -> dict:
    """The machine a result is measured on (RESULTS.md names it per section, not the machine that renders it)."""
    peak = peak_fp32_gflops()
    memory = next(line for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal"))
    return {"cpu": peak["cpu"], "cores": peak["cores"], "memory_gib": round(int(memory.split()[1]) / 2**20, 1),
            "gpu": bool(shutil.which("nvidia-smi")) and subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode == 0}


def write_result(name: str, payload: dict, quiet: bool = False) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {"name": name, "finished": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
               "command": f".venv/bin/python benchmarks/{Path(sys.argv[0]).name} {' '.join(sys.argv[1:])}".strip(),
               "machine": machine_facts(), **payload}
    payload = portable(payload)  # --data-dir arguments, other processes' command lines: no absolute paths
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    if not quiet:
        print(f"wrote {path.relative_to(ROOT)}", file=sys.stderr)
    return path


def print_table(headers: list[str], rows: list[list]) -> None:
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) if rows else len(str(h)) for i, h in enumerate(headers)]
    print("  ".join(str(h).ljust(w) for h, w in zip(headers, widths)))
    for r in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))


def peak_fp32_gflops() -> dict:
    """Theoretical FP32 peak from lscpu: cores x FMA units x SIMD fp32 lanes x 2 flops x GHz (assumptions stated)."""
    flags, ghz, model = "", None, ""
    for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
        key, _, value = line.partition(":")
        value = value.strip()
        if key == "Flags":
            flags = value
        elif key == "Model name":
            model = value
        elif key == "CPU max MHz" and value:
            ghz = float(value) / 1000
        elif key == "BogoMIPS" and ghz is None and value:
            ghz_bogo = float(value) / 2000  # on x86, BogoMIPS = 2 x TSC MHz
    if ghz is None:
        ghz = ghz_bogo
    lanes = 16 if "avx512f" in flags.split() else 8 if "avx2" in flags.split() else 4
    fma_units = 2  # assumption: server cores with AVX-512 have 2 FMA ports (not visible in lscpu)
    cores = os.cpu_count() or 1
    return {"cpu": model, "cores": cores, "ghz": round(ghz, 2), "fp32_lanes": lanes, "fma_units": fma_units,
            "gflops": round(cores * fma_units * lanes * 2 * ghz, 1),
            "formula": f"{cores} cores x {fma_units} FMA units x {lanes} fp32 lanes x 2 flops x {ghz:.2f} GHz"}


def epoch_timer():
    """A Keras callback that keeps each epoch's wall seconds in its list `seconds`."""
    import keras

    class EpochTimer(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.seconds: list[float] = []

        def on_epoch_begin(self, epoch, logs=None):
            self.started = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.seconds.append(time.perf_counter() - self.started)

    return EpochTimer()


def synthetic_splits(x_train, y_train, x_val, y_val):
    """A data.Splits holding the given arrays (val doubles as test; fields filled generically, whatever the
    dataclass holds)."""
    import dataclasses

    from cifar_mlops import data

    values = {f.name: {"x_train": x_train, "y_train": y_train, "x_val": x_val, "y_val": y_val, "x_test": x_val,
                       "y_test": y_val, "num_classes": 10, "class_names": tuple(str(i) for i in range(10))
                       }.get(f.name, "synthetic") for f in dataclasses.fields(data.Splits)}
    return data.Splits(**values)


def cpu_seconds_of_children() -> float:
    """User + system CPU seconds of this process's finished children and theirs (both cores count)."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measured_run(cmd: list[str], *, env: dict, cwd: str | Path, what: str
                 ) -> tuple[float, float, subprocess.CompletedProcess]:
    """A command run as a user would: its wall and CPU seconds (`cpu_seconds_of_children`) and the finished process
    (its stdout echoed to stderr); a failure ends the benchmark with its stderr's tail, naming `what`."""
    cpu0 = cpu_seconds_of_children()
    wall, proc = timed_run(cmd, env=env, cwd=cwd, check=False)
    cpu = cpu_seconds_of_children() - cpu0
    print(proc.stdout, file=sys.stderr)
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"{what} failed (exit {proc.returncode})")
    return wall, cpu, proc


def printed_tables(stdout: str) -> list[list[str]]:
    """The markdown tables a command printed, each as its lines."""
    found, current = [], []
    for line in stdout.splitlines():
        if line.startswith("|"):
            current.append(line)
        elif current:
            found.append(current)
            current = []
    return found + ([current] if current else [])


def train_on_sample(exp: str, seed: int, sets: dict | None = None, data_dir: str | Path = SAMPLE_DIR) -> dict:
    """`cifar-mlops train --exp EXP --no-register` on the real sample (SAMPLE_SPLIT, data.seed = train.seed = SEED,
    plus `sets`) in a fresh subprocess and throwaway store; the run's metrics and params read back from that store,
    with its CPU seconds (user + sys, both cores count) and wall seconds."""
    from mlflow import MlflowClient

    overrides = {**SAMPLE_SPLIT, "data.seed": seed, "train.seed": seed, **(sets or {})}
    cmd = [CLI, "train", "--exp", exp, "--data-dir", str(data_dir), "--no-register"]
    cmd += [a for k, v in overrides.items() for a in ("--set", f"{k}={v}")]
    with tempdir(f"train-{exp}") as tmp:
        env = temp_env(tmp)
        cpu0 = cpu_seconds_of_children()
        wall, _ = timed_run(cmd, env=env, cwd=tmp)
        cpu = cpu_seconds_of_children() - cpu0
        client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
        (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()], max_results=1)
    return {"exp": exp, "seed": seed, **({"sets": sets} if sets else {}), "wall_s": round(wall, 1),
            "cpu_s": round(cpu, 1), **{k: v for k, v in run.data.metrics.items() if not k.startswith("epoch_")},
            "last_epoch_train_accuracy": run.data.metrics.get("epoch_train_accuracy"),  # Keras's own, last epoch
            "dtype_policy": run.data.params.get("train.dtype_policy"), "loadavg": loadavg()[0]}


def sample_study(name: str, exps: list[str], seeds: list[int], epochs: int, data_dir: str, merge: bool,
                 published: dict[str, float], published_key: str, sets: dict[str, str] | None = None) -> None:
    """Train each of `exps` with each of `seeds` on the sample (`train_on_sample`; `epochs` > 0 overrides
    train.epochs), print the table (mean ± sd over seeds) and write results/<name>.json with every run's metrics.
    `merge`: keep the runs of results/<name>.json (same epochs) not rerun. `published`: the source study's figure
    per experiment, shown under `published_key` (e.g. published_val)."""
    before = load_snapshot()
    runs = []
    for exp in exps:
        for seed in seeds:
            more = {**({"train.epochs": epochs} if epochs else {}), **(sets or {})}
            run = train_on_sample(exp, seed, more or None, data_dir=data_dir)
            runs.append({**run, "machine": machine_facts()})
            print(f"{exp} seed {seed}: test {run['test_accuracy']:.4f}, val {run['val_accuracy']:.4f}, "
                  f"{run['cpu_s'] / 60:.1f} CPU min, {run['wall_s'] / 60:.1f} wall min", file=sys.stderr)
    after = load_snapshot()
    previous = RESULTS / f"{name}.json"
    if merge and previous.exists():
        old = json.loads(previous.read_text())
        if old.get("epochs_override") == (epochs or None):
            done = {(r["exp"], r["seed"]) for r in runs}
            runs = [r for r in old["runs"] if (r["exp"], r["seed"]) not in done] + runs
            first_seen = list(dict.fromkeys([*old.get("exps", []), *(r["exp"] for r in old["runs"]), *exps]))
            exps = [e for e in first_seen if any(r["exp"] == e for r in runs)]

    def pct(ms):
        return f"{100 * ms[0]:.1f} ± {100 * ms[1]:.1f}" if ms[0] is not None else "-"

    summary, rows = [], []
    for exp in exps:
        rs = [r for r in runs if r["exp"] == exp]
        row = {"exp": exp, "seeds": len(rs)}
        for key in ("train_accuracy", "last_epoch_train_accuracy", "val_accuracy", "test_accuracy", "cpu_s", "wall_s"):
            row[key] = mean_std([r.get(key) for r in rs])
        row[published_key] = published.get(exp)
        summary.append(row)
        rows.append([exp, len(rs), pct(row["train_accuracy"]), pct(row["val_accuracy"]), pct(row["test_accuracy"]),
                     f"{row['cpu_s'][0] / 60:.1f}", f"{row['wall_s'][0] / 60:.1f}",
                     f"{100 * published[exp]:.2f}" if exp in published else ""])
    print_table(["exp", "seeds", "train acc %", "val acc %", "test acc % (sample)", "CPU min/run", "wall min/run",
                 published_key.replace("_", " ") + " %"], rows)
    # runs merged from earlier goes may come from other machines: then each run names its own
    seen = {json.dumps(r.get("machine"), sort_keys=True) for r in runs}
    where = {"machine": json.loads(seen.pop())} if len(seen) == 1 else {"machine": {"several": True}}
    write_result(name, {**where, "data": f"CIFAR-10 sample {repo_relative(data_dir)}", "split": SAMPLE_SPLIT,
                        "epochs_override": epochs or None, "exps": exps, "runs": runs, "summary": summary,
                        "load_before": before, "load_after": after})


def sample_study_main(doc: str, name: str, exps: str, seeds: str, published: dict[str, float],
                      published_key: str) -> None:
    """The command line of a sample-study script (`bench_study_a.py`, `bench_study_b.py`): its defaults, then
    `sample_study`."""
    import argparse

    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--exps", default=exps)
    parser.add_argument("--seeds", default=seeds)
    parser.add_argument("--epochs", type=int, default=0, help="0: each iteration's own train.epochs")
    parser.add_argument("--data-dir", default=str(SAMPLE_DIR))
    parser.add_argument("--merge", action="store_true",
                        help=f"keep the runs (exp, seed) of results/{name}.json not rerun (build the table in several goes)")
    parser.add_argument("--results", default=name,
                        help=f"results/NAME.json to write (another name keeps {name}.json as it is)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a setting for every run (e.g. train.precision=float32); each run records its sets")
    args = parser.parse_args()
    sets = dict(pair.split("=", 1) for pair in args.set)
    sample_study(args.results, args.exps.split(","), [int(x) for x in args.seeds.split(",")], args.epochs,
                 args.data_dir, args.merge, published, published_key, sets)


def planted_catalogue(folder: Path, exp: str) -> Path:
    """The project's catalogue copied into `folder` (what `$CIFAR_MLOPS_EXPERIMENTS` then names), with two planted
    enhancements of study B (`kind: training`, so the study's rules allow them): `planted_too_low_lr`, `exp`'s
    learning rate / 1000 (harmful), and `planted_noop`, SGD's momentum at its default 0.9 (changes nothing for an
    Adam/AdamW experiment: its resolved config differs from the experiment's only in the enhancement's name).
    Returns the copy's folder."""

    import yaml

    from cifar_mlops import config as cfg

    target = folder / "experiments"
    shutil.copytree(cfg.experiments_dir(), target, ignore=shutil.ignore_patterns(cfg.GENERATED_DIR))
    start_lr = cfg.resolve(exp).train.learning_rate
    catalogue = yaml.safe_load((target / "enhancements.yaml").read_text())
    rules = catalogue.pop(cfg.RULES_KEY)
    planted = {
        "planted_too_low_lr": {"label": "Planted: learning rate 1000x lower", "studies": ["B"], "kind": "training",
                               "description": f"Harmful on purpose: {exp}'s learning rate {start_lr:g} / 1000.",
                               "set": {"train.learning_rate": start_lr / 1000}},
        "planted_noop": {"label": "Planted: changes nothing", "studies": ["B"], "kind": "training",
                         "description": "SGD's momentum at its default; Adam and AdamW ignore it.",
                         "set": {"train.momentum": 0.9}},
    }
    (target / "enhancements.yaml").write_text(yaml.safe_dump({**catalogue, **planted, cfg.RULES_KEY: rules},
                                                             sort_keys=False))
    return target
