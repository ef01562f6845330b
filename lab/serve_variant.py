"""The server with another GIL switch interval: is a mixed step's host time the interpreter
lock's? (issue 16.)

Under 32 streaming clients the server's mixed steps (decodes plus a prefill chunk) took
17.8 ms (triton) and 21.0 ms (sage_attn) of host time and none waiting for the device
(`bench serving`'s server steps, BENCHMARKS.md, 2026-12-07 evening), where the same step's GPU
work is ~15 ms. Each eager launch and torch op of such a step lets go of the lock and takes it
back; when the event loop's thread runs Python meanwhile, each take waits up to the switch
interval (`engine_loop.GIL_SWITCH_INTERVAL_S`, 0.5 ms). This starts the server with the interval
given, so that runs with a shorter one show whether the steps shorten:

    PYTHONPATH=. python lab/serve_switch_interval.py 0.0001 --model-path ... --port 30123
"""

from __future__ import annotations

import sys

from sageserve import launch_server
from sageserve.server import engine_loop

if __name__ == "__main__":
    engine_loop.GIL_SWITCH_INTERVAL_S = float(sys.argv[1])
    print(f"GIL switch interval {engine_loop.GIL_SWITCH_INTERVAL_S} s", flush=True)
    sys.exit(launch_server.main(sys.argv[2:]))
