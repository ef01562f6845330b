"""A/B: a mixed step's host time with Triton kernels launched directly or through Triton.

`sageserve.kernel_launch.launch` (with `ENABLED`, off by default) launches the CompiledKernel
of a specialization Triton has already compiled, skipping Triton's per-launch binding. This
measures what that saves where it matters (issue 16's 32-client ITL p99): engine only, dummy
weights, `--batch` requests decoding at `--input-len` tokens, then a `--new-len` prompt
arriving, whose chunks make mixed steps; the steps run free (no synchronization, as the
server runs them) and each one's wall and device-wait time come from `Engine.last_step`. A
mixed step that waited ~0 for the device was paced by its host work. Direct launches on and
off alternate for `--rounds` prompts each.

    PYTHONPATH=. python lab/direct_launch_ab.py --backend sage_attn --out ab.json
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
from dataclasses import replace
from datetime import UTC, datetime

from lab.step_latency_probe import _prompt, decoding
from sageserve import kernel_launch
from sageserve.bench.run_record import device_info, software
from sageserve.config import EngineConfig
from sageserve.engine.engine import Engine
from sageserve.engine.sampling_params import SamplingParams
from sageserve.models.loader import load_model


def _arrival(engine: Engine, new_len: int, seed: int, direct: bool) -> list[dict]:
    """A prompt arrives; the steps until its prefill is done and two more, free-running."""
    kernel_launch.ENABLED = direct
    params = SamplingParams(temperature=0, max_new_tokens=4096, ignore_eos=True)
    engine.add_request(_prompt(engine, new_len, seed), params)
    rows: list[dict] = []
    while len(rows) < 2 or rows[-1]["kind"] != "decode" or rows[-2]["kind"] != "decode":
        engine.step()
        t = engine.last_step
        wait = 1e3 * t.device_wait_s
        rows.append({"kind": t.kind, "prefill_tokens": t.prefill_tokens,
                     "wall_ms": 1e3 * t.wall_s, "device_wait_ms": wait})  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-path", default="llama-3.1-8b")
    parser.add_argument("--backend", default="sage_attn")
    parser.add_argument("--batch", type=int, default=31)
    parser.add_argument("--input-len", type=int, default=1024)
    parser.add_argument("--new-len", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    config = replace(EngineConfig(model_path=args.model_path, load_format="dummy"),
                     attention_backend=args.backend)  # fmt: skip
    loaded = load_model(config.model_path, load_format="dummy", device=config.torch_device())
    result = {"command": shlex.join(["python", *sys.argv]), "date": datetime.now(UTC).isoformat(),
              "device": device_info(config.torch_device()), "software": software(),
              "backend": args.backend, "direct": [], "through_triton": []}  # fmt: skip
    with Engine(config, loaded) as engine:
        decoding(engine, args.batch, args.input_len)
        for r in range(args.rounds):
            for direct in (True, False):
                rows = _arrival(engine, args.new_len, 100 + 2 * r + direct, direct)
                result["direct" if direct else "through_triton"] += rows
    kernel_launch.ENABLED = False
    for name in ("direct", "through_triton"):
        mixed = [r["wall_ms"] for r in result[name] if r["kind"] == "mixed"]
        decode = [r["wall_ms"] for r in result[name] if r["kind"] == "decode"]
        print(f"{args.backend} {name}: mixed steps {len(mixed)}, median wall "
              f"{statistics.median(mixed):.2f} ms (min {min(mixed):.2f}), decode median "
              f"{statistics.median(decode):.2f} ms")  # fmt: skip
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
