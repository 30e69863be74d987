"""Worker processes on this machine: `cifar-mlops worker --spec JSON`, one GPU each when there are GPUs.

A spec is a dataclass of a `cifar_mlops` module with a `run()` method (`tune.WorkerSpec`,
`ablate.AblationSpec`): `worker_args(spec)` writes it as JSON with its class's name, `from_json` makes it again
in the worker, which calls `spec.run()`.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import shutil
import subprocess
import sys
from typing import Any, Protocol

from cifar_mlops import progress


class WorkerSpec(Protocol):
    """What a worker process is given: a dataclass whose `run()` does the work."""

    def run(self) -> Any: ...


def worker_args(spec: WorkerSpec) -> list[str]:
    """The `cifar-mlops` arguments of a worker process that runs `spec.run()`."""
    kind = type(spec)
    return ["worker", "--spec", json.dumps({"spec": f"{kind.__module__}:{kind.__qualname__}",
                                            "fields": dataclasses.asdict(spec)})]


def from_json(text: str) -> WorkerSpec:
    """The spec `worker_args` wrote: its dataclass (of a `cifar_mlops` module only) with its fields."""
    given = json.loads(text)
    module, _, name = given["spec"].partition(":")
    if not module.startswith("cifar_mlops."):
        raise ValueError(f"a worker spec is a cifar_mlops class, not {given['spec']!r}")
    kind = getattr(importlib.import_module(module), name)
    if not dataclasses.is_dataclass(kind):
        raise ValueError(f"{given['spec']} is not a worker spec")
    return kind(**given["fields"])


def gpu_ids() -> list[str]:
    """The GPUs workers are spread over: $CUDA_VISIBLE_DEVICES if set, else what nvidia-smi lists."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [g for g in visible.split(",") if g.strip() and g.strip() != "-1"]
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [str(i) for i, line in enumerate(out.stdout.splitlines()) if line.startswith("GPU ")]


def run_worker_processes(workers: list[tuple[str, list[str]]], tracking_uri: str) -> list[str]:
    """Start one `cifar-mlops ARGS` process per (what it does, ARGS), each on its own GPU if there are any;
    wait for all; return what went wrong with them."""
    gpus = gpu_ids()
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_RUN_ID"}
    env["MLFLOW_TRACKING_URI"] = tracking_uri
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    processes = []
    for index, (what, args) in enumerate(workers):
        worker_env = dict(env)
        if gpus:
            worker_env["CUDA_VISIBLE_DEVICES"] = gpus[index % len(gpus)]
        processes.append(subprocess.Popen([sys.executable, "-m", "cifar_mlops.cli", *args], env=worker_env))
        where = f" on GPU {worker_env['CUDA_VISIBLE_DEVICES']}" if gpus else ""
        progress.log(f"worker {index}: pid {processes[-1].pid}, {what}{where}")
    failures = []
    try:
        for index, process in enumerate(processes):
            code = process.wait()
            if code != 0:
                how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
                failures.append(f"worker {index} (pid {process.pid}) {how}")
    except KeyboardInterrupt:  # Ctrl-C reached the workers too: let them end their runs
        for process in processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        raise
    return failures
