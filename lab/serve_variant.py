"""The server with a lab variant of its host path: the engine on a thread of the server's
process instead of its own process, another GIL switch interval, Triton kernels launched
directly (`sageserve.kernel_launch`), or K/V stored eagerly with attention in the piecewise
graphs' steps as before they moved into the pieces (`--piece-store off`); with the engine in
its own process, the spawn target sets the last two there
(`lab/engine_profile.run_with_switches`). (Issue 16: are the host-bound mixed steps under
32 streaming clients the interpreter lock's, or the launches'?)

Under 32 streaming clients the server's mixed steps (decodes plus a prefill chunk) took
17.8 ms (triton) and 21.0 ms (sage_attn) and waited ~0 for the device (`bench serving`'s
server steps, BENCHMARKS.md, 2026-12-07 evening), where the same step's GPU work is ~15 ms.
Each eager launch and torch op of such a step lets go of the lock and takes it back; when
the event loop's thread runs Python meanwhile, each take waits up to the switch interval
(`engine_loop.GIL_SWITCH_INTERVAL_S`, 0.5 ms). And each Triton launch binds its arguments
(~25 µs of host time a launch on an H100 machine), which a direct launch skips.

    PYTHONPATH=. python lab/serve_variant.py [--engine process|thread] \
        [--gil-switch-interval S] [--direct-launch on|off] [--piece-store on|off] \
        [--engine-profile OUT] \
        -- --model-path ... --port 30123

--engine-profile OUT: the engine process's steps under cProfile, by kind
(`lab/engine_profile.py`; OUT.txt when the server stops).
"""

from __future__ import annotations

import argparse
import os
import sys

from sageserve import kernel_launch, launch_server
from sageserve.server import engine_loop, engine_process

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gil-switch-interval", type=float, default=None)
    parser.add_argument("--direct-launch", choices=["on", "off"], default=None)
    parser.add_argument("--piece-store", choices=["on", "off"], default=None)
    parser.add_argument("--engine", choices=["process", "thread"], default="process")
    parser.add_argument("--engine-profile", default=None, metavar="OUT")
    variant, server_args = parser.parse_known_args()
    if variant.engine_profile is not None:
        if variant.engine == "thread":
            parser.error("--engine-profile needs --engine process")
        from lab import engine_profile

        os.environ[engine_profile.ENV] = os.path.abspath(variant.engine_profile)
        engine_process.run_engine_process = engine_profile.run_profiled  # the spawn target
    if variant.gil_switch_interval is not None:
        engine_loop.GIL_SWITCH_INTERVAL_S = variant.gil_switch_interval
    if variant.direct_launch is not None:
        kernel_launch.ENABLED = variant.direct_launch == "on"
    if variant.piece_store == "off":
        from lab import engine_profile

        engine_profile.disable_piece_stores()
    switched = variant.direct_launch is not None or variant.piece_store is not None
    if switched and variant.engine == "process":  # the spawned engine imports them afresh
        if variant.engine_profile is not None:
            parser.error("--direct-launch / --piece-store with --engine process exclude "
                         "--engine-profile")  # fmt: skip
        from lab import engine_profile

        for env, value in ((engine_profile.DIRECT_LAUNCH_ENV, variant.direct_launch),
                           (engine_profile.PIECE_STORE_ENV, variant.piece_store)):  # fmt: skip
            if value is not None:
                os.environ[env] = value
        engine_process.run_engine_process = engine_profile.run_with_switches
    print(f"engine on a {variant.engine}, GIL switch interval "
          f"{engine_loop.GIL_SWITCH_INTERVAL_S} s, direct launches "
          f"{'on' if kernel_launch.ENABLED else 'off'}, piece stores "
          f"{variant.piece_store or 'on'}", flush=True)  # fmt: skip
    args = [a for a in server_args if a != "--"]
    sys.exit(launch_server.main(args, engine_host=variant.engine))
