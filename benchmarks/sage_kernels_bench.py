"""Causal prefill: sage_attn's Triton kernels vs torch SDPA (flash, cuDNN) on one GPU.

Our time includes quantizing and storing K and V into the 8-bit paged cache (the fused
store kernel) and quantizing Q (inside the attention kernel). TOPS = 4·B·H·N²·D / 2 / time.
Accuracy: cosine and relative L1 of each output against fp32 SDPA on the first sequence.

    python benchmarks/sage_kernels_bench.py --out results.json
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from sageserve.attention.kernels.sage_attention import sage_attention_paged
from sageserve.attention.kernels.sage_store import store_kv

TOKENS, HEADS, PAGE = 16384, 32, 16


def _inputs(seq: int, dim: int, gen: torch.Generator):
    batch = TOKENS // seq
    shape = (batch * seq, HEADS, dim)
    q = torch.randn(shape, generator=gen).cuda().bfloat16()
    bias = 2 * torch.randn(1, HEADS, dim, generator=gen)  # keys carry a channel bias
    k = (torch.randn(shape, generator=gen) + bias).cuda().bfloat16()
    v = torch.randn(shape, generator=gen).cuda().bfloat16()
    return batch, q, k, v


def _paged(batch: int, seq: int, dim: int, gen: torch.Generator, v_dtype: torch.dtype):
    pages_per_seq = seq // PAGE
    num_pages = batch * pages_per_seq + 1
    order = torch.randperm(num_pages - 1, generator=gen) + 1
    table = order.view(batch, pages_per_seq).int().cuda()
    positions = torch.arange(seq)
    pages = table.long()[:, positions // PAGE].flatten()
    offsets = (positions % PAGE).repeat(batch).cuda()
    cache = dict(
        k=torch.empty(num_pages, HEADS, PAGE, dim, dtype=torch.int8, device="cuda"),
        k_scale=torch.empty(num_pages, HEADS, PAGE, dtype=torch.float16, device="cuda"),
        v=torch.empty(num_pages, HEADS, dim, PAGE, dtype=v_dtype, device="cuda"),
        v_scale=torch.empty(num_pages, HEADS, PAGE, dtype=torch.float16, device="cuda"),
    )
    starts = (torch.arange(batch) * seq).int().cuda()
    lens = torch.full((batch,), seq, dtype=torch.int32, device="cuda")
    return table, pages, offsets, cache, starts, lens


def _sage_fn(q, k, v, seq, dim, pv, gen):
    batch = q.shape[0] // seq
    v_dtype = torch.float8_e4m3fn if pv == "fp8" else torch.int8
    table, pages, offsets, c, starts, lens = _paged(batch, seq, dim, gen, v_dtype)
    mean = k[:seq].float().mean(0)
    balance = torch.ones(HEADS, dim, device="cuda")

    def run():
        store_kv(k, v, mean, balance, pages, offsets, c["k"], c["k_scale"], c["v"], c["v_scale"])
        return sage_attention_paged(
            q, balance, c["k"], c["k_scale"], c["v"], c["v_scale"],
            table, starts, lens, lens, seq, block_m=128, block_n=64,
        )  # fmt: skip

    return run


def _sdpa_fn(q, k, v, seq, backend):
    batch = q.shape[0] // seq

    def to4(x):
        return x.view(batch, seq, HEADS, -1).transpose(1, 2)

    q4, k4, v4 = to4(q), to4(k), to4(v)

    def run():
        with sdpa_kernel([backend]):
            out = F.scaled_dot_product_attention(q4, k4, v4, is_causal=True)
        return out.transpose(1, 2).reshape(q.shape)

    return run


def _accuracy(out: torch.Tensor, q, k, v, seq: int) -> dict:
    q4, k4, v4 = (x[:seq].float().transpose(0, 1)[None] for x in (q, k, v))
    ref = F.scaled_dot_product_attention(q4, k4, v4, is_causal=True)[0].transpose(0, 1)
    o, r = out[:seq].float().flatten(), ref.flatten()
    cos = F.cosine_similarity(o, r, dim=0).item()
    return {"cosine": cos, "rel_l1": ((o - r).abs().sum() / r.abs().sum()).item()}


def bench(seq: int, dim: int, gen: torch.Generator) -> list[dict]:
    batch, q, k, v = _inputs(seq, dim, gen)
    flops = 4 * batch * HEADS * seq * seq * dim / 2
    fns = {
        "sdpa_flash": _sdpa_fn(q, k, v, seq, SDPBackend.FLASH_ATTENTION),
        "sdpa_cudnn": _sdpa_fn(q, k, v, seq, SDPBackend.CUDNN_ATTENTION),
        "sage_fp16pv": _sage_fn(q, k, v, seq, dim, "fp16", gen),
        "sage_fp8pv": _sage_fn(q, k, v, seq, dim, "fp8", gen),
    }
    rows = []
    for name, fn in fns.items():
        acc = _accuracy(fn(), q, k, v, seq)
        ms = triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")
        rows.append({"kernel": name, "seq": seq, "head_dim": dim, "batch": batch, "ms": ms,
                     "tops": flops / ms / 1e9, **acc})  # fmt: skip
        print(f"{name:12s} seq {seq:6d} D {dim}: {ms:8.3f} ms {flops / ms / 1e9:7.1f} TOPS "
              f"cos {acc['cosine']:.6f} relL1 {acc['rel_l1']:.4f}", flush=True)  # fmt: skip
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqs", default="1024,4096,16384")
    parser.add_argument("--head-dims", default="128,64")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    rows = []
    for dim in map(int, args.head_dims.split(",")):
        for seq in map(int, args.seqs.split(",")):
            rows.extend(bench(seq, dim, gen))
    result = {
        "benchmark": "sage_kernels_prefill_causal",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python", *sys.argv]),
        "card": torch.cuda.get_device_name(),
        "software": {"torch": torch.__version__, "triton": triton.__version__},
        "shape": {"tokens": TOKENS, "heads": HEADS, "page_size": PAGE, "dtype": "bfloat16"},
        "rows": rows,
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
