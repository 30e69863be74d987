"""Child of bench_tracking.py: run `cifar-mlops train ARGS...` in-process, timing where tracking spends.

The command is the real CLI (cifar_mlops.cli.main); the only change is timers wrapped around the tracking
calls (TrainingRun methods, figure building, batched logging) and around train.fit. Prints one JSON line.
"""

from __future__ import annotations

import json
import sys
import time

STARTED = time.perf_counter()
TIMES: dict[str, float] = {}


def timed(name, fn):
    def wrapper(*args, **kwargs):
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            TIMES[name] = TIMES.get(name, 0.0) + time.perf_counter() - t
    return wrapper


def main() -> None:
    from cifar_mlops import cli, process

    with process.heavy_imports():  # as `cli.train` imports them
        t = time.perf_counter()
        import tensorflow  # noqa: F401  (the bare script pays this too; timed apart from mlflow)
        TIMES["import tensorflow"] = time.perf_counter() - t
        t = time.perf_counter()
        from cifar_mlops import evaluation, train
        from cifar_mlops.tracking import runs
        TIMES["import mlflow (cifar_mlops.tracking)"] = time.perf_counter() - t

    run = runs.TrainingRun
    run.__enter__ = timed("start run (open the store, tags, params, config.yaml)", run.__enter__)
    run.__exit__ = timed("end run", run.__exit__)
    run.log_data = timed("log datasets (mlflow.data)", run.log_data)
    run.log_results = timed("log metrics, report, figures", run.log_results)
    run.log_trained_model = timed("log model", run.log_trained_model)
    run.register = timed("register model version", run.register)
    evaluation.confusion_matrix_figure = timed("build figures", evaluation.confusion_matrix_figure)
    evaluation.learning_curves_figure = timed("build figures", evaluation.learning_curves_figure)
    runs.log_batch = timed("log_batch (params, tags, per-epoch and final metrics)", runs.log_batch)
    train.fit = timed("fit", train.fit)
    train.predict_in_batches = timed("predict train/val/test", train.predict_in_batches)
    try:
        cli.main(sys.argv[1:], standalone_mode=False)
    finally:
        TIMES["total in process"] = time.perf_counter() - STARTED
        print(json.dumps({k: round(v, 3) for k, v in TIMES.items()}))


if __name__ == "__main__":
    main()
