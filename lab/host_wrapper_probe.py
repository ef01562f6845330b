"""Probe: the host time of each backend's attention call outside its Triton launches (CPU).

Issue 16's 32-client ITL p99 is 3.5x p50 on sage_attn and 2.2x on triton (H100,
2026-12-06), and an H200 probe found sage_attn's mixed steps (31 decodes + a prompt) leaving
the GPU idle ~20 ms where triton's did not. Inside piecewise CUDA graphs the attention runs
eagerly between the graphed pieces, so its host time per layer paces a mixed step once it
exceeds the GPU's time per layer. This measures the part of that host time that is ours:
every Triton kernel launch is replaced by a no-op (`JITFunction.run` / the interpreter's
`__getitem__`), and `backend.forward` of one layer is timed on a mixed batch shaped like
Llama-3.1-8B's (32 query heads, 8 KV heads, head_dim 128): 31 decodes at 1024 tokens and
one 256-token chunk over 768 cached ones. What is left is Python: argument checks, launch
configurations, descriptors, allocations and views. Triton's own launch cost (its argument
specialization, ~50-100 µs a launch under cProfile on an H200) is not in it.

    PYTHONPATH=. python lab/host_wrapper_probe.py [--repeats 2000]
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported

import torch
import triton

from sageserve.bench.kernels_common import make_backend, model_config

Q_HEADS, KV_HEADS, HEAD_DIM, PAGE = 32, 8, 128, 64
VARIANTS = ("triton16", "sage_fp16pv", "sage_fp16pv_bfly")


def _no_launches() -> None:
    """Every `kernel[grid](...)` call returns at once (interpreter and compiled kinds)."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    JITFunction.run = lambda self, *args, **kwargs: None
    InterpretedFunction.run = lambda self, *args, **kwargs: None


def _mixed_batch(device: torch.device):
    """31 decodes at 1024 tokens, then a 256-token chunk over 768 cached tokens."""
    from sageserve.attention.batch import SequenceSlice, build_forward_batch

    pages = 1024 // PAGE
    tables = [tuple(range(1 + i * pages, 1 + (i + 1) * pages)) for i in range(32)]
    slices = [SequenceSlice(t, 1023, 1) for t in tables[:31]]
    slices.append(SequenceSlice(tables[31], 768, 256))
    ids = [[0] * s.query_len for s in slices]
    return build_forward_batch(slices, ids, [], PAGE, device), 32 * pages + 1


def _time(variant: str, repeats: int) -> dict[str, float]:
    device = torch.device("cpu")
    cfg = model_config(Q_HEADS, KV_HEADS, HEAD_DIM)
    backend = make_backend(variant, cfg, torch.float16, device)
    batch, num_pages = _mixed_batch(device)
    cache = backend.allocate(num_pages, PAGE)
    tokens = 31 + 256
    q = torch.randn(tokens, Q_HEADS, HEAD_DIM, dtype=torch.float16)
    k = torch.randn(tokens, KV_HEADS, HEAD_DIM, dtype=torch.float16)
    v = torch.randn_like(k)
    meta = backend.build_metadata(batch)
    for _ in range(20):
        backend.forward(0, q, k, v, cache, meta)
    start = time.perf_counter()
    for _ in range(repeats):
        backend.forward(0, q, k, v, cache, meta)
    per_layer = (time.perf_counter() - start) / repeats
    return {"us_per_layer": per_layer * 1e6, "us_per_step_32_layers": per_layer * 32e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2000)
    args = parser.parse_args()
    _no_launches()
    torch.set_num_threads(1)
    rows = {variant: _time(variant, args.repeats) for variant in VARIANTS}
    print(json.dumps({"triton": triton.__version__, "torch": torch.__version__, **rows}, indent=1))


if __name__ == "__main__":
    main()
