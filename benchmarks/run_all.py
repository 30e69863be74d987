"""Run every benchmark (or the ones named) one after the other, then render RESULTS.md.

    .venv/bin/python benchmarks/run_all.py                     # all: several CPU hours on 2 cores
    .venv/bin/python benchmarks/run_all.py startup memory tracking

Names: startup, memory, tracking, system_metrics, throughput, study_b, tuning, ablation, suite. Each script's own options are its defaults.
"""

from __future__ import annotations

import subprocess
import sys

import common

ORDER = ("startup", "memory", "tracking", "system_metrics", "throughput", "study_b", "tuning", "ablation", "suite")


def main() -> int:
    names = sys.argv[1:] or list(ORDER)
    unknown = [n for n in names if n not in ORDER]
    if unknown:
        print(f"unknown benchmark(s) {unknown}; choose from {', '.join(ORDER)}", file=sys.stderr)
        return 2
    for name in names:
        print(f"== {name}", flush=True)
        code = subprocess.call([common.PYTHON, str(common.BENCH / f"bench_{name}.py")])
        if code:
            print(f"{name} failed (exit {code})", file=sys.stderr)
            return code
    return subprocess.call([common.PYTHON, str(common.BENCH / "report_results.py")])


if __name__ == "__main__":
    sys.exit(main())
