"""Where does the first HTTP request's extra TTFT go: server or client? (issue 16)

Against a running server: sends streamed /generate requests (greedy; each its own prompt
ids, so no prefix-cache hit, unless --same-prompt) one after another and, after each, reads
the server's TTFT histogram from /metrics,
so that each request's TTFT is known on both sides: the client's (request sent to first
token received) and the server's (the engine's arrival to first token, the histogram sum's
increase). Requests alternate between one long-lived client and a new client each time, so
a connection's first use shows apart from the server's first request.

    python lab/first_request_probe.py --url http://127.0.0.1:30000 --out probe.json
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from datetime import UTC, datetime

import httpx

TTFT_SUM = re.compile(r"^sageserve_time_to_first_token_seconds_sum(?:\{[^}]*\})? (\S+)$", re.M)


def server_ttft_sum(client: httpx.Client) -> float:
    text = client.get("/metrics").text
    return sum(float(x) for x in TTFT_SUM.findall(text))


def client_ttft(client: httpx.Client, body: dict) -> float:
    start, ttft = time.perf_counter(), None
    with client.stream("POST", "/generate", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():  # read to the end: the request finishes
            if ttft is None and line.startswith("data: "):
                ttft = time.perf_counter() - start
    if ttft is None:
        raise RuntimeError("the stream sent no data")
    return ttft


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--input-len", type=int, default=1024)
    parser.add_argument("--output-len", type=int, default=16)
    parser.add_argument("--requests", type=int, default=6)
    parser.add_argument("--same-prompt", action="store_true", help="repeat one prompt")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    params = {"temperature": 0, "max_new_tokens": args.output_len, "ignore_eos": True}

    def body(index: int) -> dict:
        seed = 0 if args.same_prompt else index
        ids = [(i * 7919 + seed * 104729) % 30000 + 100 for i in range(args.input_len)]
        return {"input_ids": ids, "stream": True, "sampling_params": params}

    rows = []
    with httpx.Client(base_url=args.url, timeout=120) as steady:
        before = server_ttft_sum(steady)
        for i in range(args.requests):
            fresh = i % 2 == 1
            if fresh:
                with httpx.Client(base_url=args.url, timeout=120) as client:
                    seen = client_ttft(client, body(i))
            else:
                seen = client_ttft(steady, body(i))
            after = server_ttft_sum(steady)
            rows.append({"request": i, "new_client": fresh, "client_ttft_ms": seen * 1e3,
                         "server_ttft_ms": (after - before) * 1e3})  # fmt: skip
            before = after
            print(json.dumps(rows[-1]))
    with open(args.out, "w") as f:
        json.dump({"probe": "first request TTFT, client and server side (issue 16)",
                   "date": datetime.now(UTC).isoformat(timespec="seconds"),
                   "command": " ".join(sys.argv), "rows": rows}, f, indent=1)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
