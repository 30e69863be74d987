"""Issue 30 item 8, the suite's time: the TensorFlow pass of the README's test command, timed as CI runs it.

    .venv/bin/python benchmarks/bench_suite.py [--workers 2] [--results suite]

Runs `python -m pytest` (the first of the three passes `.ci/run` makes, with CI=true) once, with a JUnit XML
report, and records its wall time, the CPU time of pytest and every process under it, and each test's own
time (setup + call + teardown, on whichever worker ran it), so the per-module sums can be recomputed.
Target: <= 8 minutes wall on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import sys
import xml.etree.ElementTree as ET

import common

TARGET_S = 8 * 60
GROUP = re.compile(r"@[\w-]+$")  # xdist's loadgroup suffix on a grouped test's name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=None, help="pytest-xdist workers (default: pyproject's -n)")
    parser.add_argument("--results", default="suite",
                        help="results/NAME.json (suite-<machine>: another machine's run, shown beside suite.json's)")
    args = parser.parse_args()

    with common.tempdir("suite") as tmp:
        report = os.path.join(tmp, "junit.xml")
        command = [common.PYTHON, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}"]
        if args.workers:
            command += ["-n", str(args.workers)]
        before = common.load_snapshot()
        cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
        elapsed, proc = common.timed_run(command, env={**os.environ, "CI": "true"}, cwd=common.ROOT, check=False)
        cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
        after = common.load_snapshot()
        cases = ET.parse(report).getroot().iter("testcase")
        tests = [{"test": c.get("classname").replace(".", "/") + ".py::" + GROUP.sub("", c.get("name")),
                  "seconds": float(c.get("time")),
                  "outcome": next((child.tag for child in c if child.tag in ("failure", "error", "skipped")), "passed")}
                 for c in cases]
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    workers = args.workers or int(re.search(r"-n (\d+)", common.ROOT.joinpath("pyproject.toml").read_text())[1])
    result = {"workers": workers, "exit_code": proc.returncode, "summary": summary,
              "wall_s": round(elapsed, 1), "cpu_user_s": round(cpu.ru_utime - cpu_before.ru_utime, 1),
              "cpu_system_s": round(cpu.ru_stime - cpu_before.ru_stime, 1), "target_s": TARGET_S,
              "target_met": proc.returncode == 0 and elapsed <= TARGET_S, "cores": os.cpu_count(),
              "tests": sorted(tests, key=lambda t: -t["seconds"])}
    common.print_table(["tests", "exit", "wall s", "CPU user s", "CPU system s", f"target <= {TARGET_S} s"],
                       [[len(tests), proc.returncode, result["wall_s"], result["cpu_user_s"], result["cpu_system_s"],
                         "met" if result["target_met"] else "MISSED"]])
    common.write_result(args.results, {**result, "load_before": before, "load_after": after})
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
