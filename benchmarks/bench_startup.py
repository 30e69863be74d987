"""Item 4, start-up: wall time of `cifar-mlops --help` and `cifar-mlops experiments`, and which heavy modules they import.

    .venv/bin/python benchmarks/bench_startup.py [--runs 10]

The two commands are run interleaved (help, experiments, help, ...) after one warm-up each, so both see
the same machine load. The import check runs each command under `python -X importtime` and lists every
top-level package it imported that is one of tensorflow, keras, mlflow, optuna, sklearn, matplotlib, pandas.
Target: <= 1 s each, and none of those imports.
"""

from __future__ import annotations

import argparse
import sys

import common

HEAVY = ("tensorflow", "keras", "mlflow", "optuna", "sklearn", "matplotlib", "pandas", "scipy")
COMMANDS = {"cifar-mlops --help": ["--help"], "cifar-mlops experiments": ["experiments"]}


def heavy_imports(args: list[str], env: dict) -> tuple[list[str], float]:
    _, proc = common.timed_run([common.PYTHON, "-X", "importtime", common.CLI, *args], env=env)
    top, total_us = set(), 0
    for line in proc.stderr.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        _, cumulative, name = [p.strip() for p in line[len("import time:"):].split("|")]
        if not cumulative.isdigit():
            continue
        root = name.split(".")[0]
        if root in HEAVY:
            top.add(root)
    # total self-reported import time: sum of top-level (unindented) cumulative times
    for line in proc.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            fields = line[len("import time:"):].split("|")
            if fields[1].strip().isdigit() and not fields[2].startswith("  "):
                total_us += int(fields[1])
    return sorted(top), total_us / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()

    with common.tempdir("startup") as tmp:
        env = common.temp_env(tmp)
        before = common.load_snapshot()
        times: dict[str, list[float]] = {name: [] for name in COMMANDS}
        for argv in COMMANDS.values():  # warm-up: page cache, .pyc files
            common.timed_run([common.CLI, *argv], env=env, cwd=tmp)
        for _ in range(args.runs):
            for name, argv in COMMANDS.items():
                elapsed, _ = common.timed_run([common.CLI, *argv], env=env, cwd=tmp)
                times[name].append(elapsed)
        imports = {name: heavy_imports(argv, env) for name, argv in COMMANDS.items()}
        after = common.load_snapshot()

    rows, out = [], []
    for name in COMMANDS:
        med = common.median(times[name])
        heavy, import_s = imports[name]
        ok = med <= 1.0 and not heavy
        rows.append([name, f"{med:.3f}", f"{min(times[name]):.3f}", f"{max(times[name]):.3f}", f"{import_s:.2f}",
                     ", ".join(heavy) or "none", "met" if ok else "MISSED"])
        out.append({"command": name, "runs": len(times[name]), "median_s": round(med, 3),
                    "min_s": round(min(times[name]), 3), "max_s": round(max(times[name]), 3),
                    "times_s": [round(t, 3) for t in times[name]], "import_time_s": round(import_s, 3),
                    "heavy_imports": heavy, "target_s": 1.0, "target_met": ok})
    common.print_table(["command", "median s", "min s", "max s", "imports s (-X importtime)", "heavy imports", "target <= 1 s"], rows)
    common.write_result("startup", {"results": out, "load_before": before, "load_after": after})


if __name__ == "__main__":
    sys.exit(main())
