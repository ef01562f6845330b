"""Re-run issue 13's large-input probes against a real server with default limits.

Measures, on one launch_server process (SmolLM2, CPU, --api-key):
- a 10 MB text prompt: its status and time, and the slowest /health answered meanwhile;
- a 300 MB body sent without the API key: time to the 401, and the server's RSS growth;
- 100,000 stop strings on a streamed request: its status and time.

    python benchmarks/server_abuse.py --out benchmarks/results/server_abuse-cpu-DATE.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from server_process import launched

KEY = "abuse-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
FLAGS = ["--device", "cpu", "--dtype", "float32", "--api-key", KEY]


def rss_mib(pid: int) -> float:
    fields = Path(f"/proc/{pid}/status").read_text().split("VmRSS:")[1].split()
    return int(fields[0]) / 1024


def health_while(url: str, work: Any) -> tuple[Any, float, float]:
    """Run `work()` on a thread; poll /health until it ends. (result, seconds, worst /health)."""
    result: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: result.update(value=work()))
    start = time.monotonic()
    thread.start()
    worst = 0.0
    while thread.is_alive():
        t0 = time.monotonic()
        httpx.get(f"{url}/health", timeout=60)
        worst = max(worst, time.monotonic() - t0)
    return result["value"], time.monotonic() - start, worst


def big_prompt(url: str) -> dict[str, Any]:
    body = {"text": "word " * 2_000_000, "sampling_params": {"max_new_tokens": 1}}
    got, took, worst = health_while(
        url, lambda: httpx.post(f"{url}/generate", json=body, headers=AUTH, timeout=120)
    )
    return {"status": got.status_code, "seconds": took, "slowest_health_s": worst}


def chunks(total: int, size: int = 2**20) -> Iterator[bytes]:
    for _ in range(total // size):
        yield b"x" * size


def keyless_body(url: str, pid: int) -> dict[str, Any]:
    before = rss_mib(pid)
    start = time.monotonic()
    try:
        got = httpx.post(f"{url}/generate", content=chunks(300 * 2**20), timeout=120)
        status: int | str = got.status_code
    except httpx.HTTPError as err:  # the server may close before the body is all sent
        status = type(err).__name__
    return {
        "status": status,
        "seconds": time.monotonic() - start,
        "rss_growth_mib": rss_mib(pid) - before,
    }


def many_stop_strings(url: str) -> dict[str, Any]:
    params = {"max_new_tokens": 8, "stop": [f"s{i}" for i in range(100_000)]}
    body = {"text": "Hello", "stream": True, "sampling_params": params}
    start = time.monotonic()
    got = httpx.post(f"{url}/generate", json=body, headers=AUTH, timeout=120)
    return {"status": got.status_code, "seconds": time.monotonic() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    with launched("smollm2-135m-instruct", FLAGS) as proc:
        url, pid = proc.url, proc.process.pid
        probes = {
            "prompt_10mb": big_prompt(url),
            "keyless_300mb_body": keyless_body(url, pid),
            "stop_strings_100k": many_stop_strings(url),
        }
    result = {
        "benchmark": "server_abuse",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "machine": {"cpu": platform.machine(), "cores": len(os.sched_getaffinity(0))},
        "load_average_1min_at_end": os.getloadavg()[0],
        "probes": probes,
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
