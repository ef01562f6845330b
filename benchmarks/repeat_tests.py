"""Run test files many times under varied CPU conditions: the evidence that they cannot flake.

Conditions, cycled run by run: OMP_NUM_THREADS=1, =2, unset, and unset with a second pytest
loading the CPU (it loops over `--load-files` until the run ends). Every run is
`pytest -n 2 -q -p no:cacheprovider FILES`; the JSON lists each run's condition, exit code,
duration and pytest's summary line.

    python benchmarks/repeat_tests.py --runs 20 --out repeat.json \
        tests/test_engine.py tests/test_sage.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

CONDITIONS = ("OMP_NUM_THREADS=1", "OMP_NUM_THREADS=2", "OMP_NUM_THREADS unset", "loaded")
PYTEST = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]


def environment(condition: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    if condition.startswith("OMP_NUM_THREADS="):
        env["OMP_NUM_THREADS"] = condition.split("=")[1]
    return env


@contextmanager
def cpu_load(active: bool, files: list[str]):
    """A second pytest looping over `files` while the block runs (when active)."""
    if not active:
        yield
        return
    loop = f"while true; do {' '.join(PYTEST)} {' '.join(files)} >/dev/null 2>&1; done"
    load = subprocess.Popen(["bash", "-c", loop], start_new_session=True)
    try:
        yield
    finally:
        os.killpg(load.pid, 15)
        load.wait()


def one_run(index: int, files: list[str], load_files: list[str]) -> dict:
    condition = CONDITIONS[index % len(CONDITIONS)]
    start = time.monotonic()
    with cpu_load(condition == "loaded", load_files):
        done = subprocess.run(
            [*PYTEST, "-n", "2", *files], env=environment(condition), capture_output=True, text=True
        )
    lines = done.stdout.strip().splitlines()
    return {
        "run": index + 1,
        "condition": condition,
        "exit_code": done.returncode,
        "seconds": round(time.monotonic() - start, 1),
        "summary": lines[-1] if lines else "",
        "failures": [line for line in lines if line.startswith("FAILED")],
    }


def git_commit() -> str:
    done = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True)
    return done.stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--load-files", default="tests/test_kernels_sage_store.py")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    result = {
        "benchmark": "repeat_tests",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "commit": git_commit(),
        "machine": {"cpu": platform.machine(), "cores": len(os.sched_getaffinity(0))},
        "python": platform.python_version(),
        "files": args.files,
        "runs": [],
    }
    for i in range(args.runs):
        result["runs"].append(one_run(i, args.files, args.load_files.split(",")))
        result["passed"] = sum(r["exit_code"] == 0 for r in result["runs"])
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result["runs"][-1]), flush=True)


if __name__ == "__main__":
    main()
