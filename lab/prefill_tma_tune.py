"""Launch settings of the two prefill kernels with TMA key blocks (page 64) on one GPU, against
the gather path (page 16) and torch SDPA (flash, cuDNN), alternating, in one process.

Attention time only (the stores are timed by `sageserve bench kernels`); causal and not;
16k tokens x 32 heads (Hkv 32), head_dim 128, bf16; each variant's output is checked against
the first variant of its kernel (cosine). Results: lab/KERNEL_NOTES.md ("TMA").

    python lab/prefill_tma_tune.py --out results.json [--seqs 1024,4096,16384]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from datetime import UTC, datetime

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from sageserve.attention.sage_attn.kernels import prefill as p8
from sageserve.attention.sage_attn.kernels.store import store_kv as store8
from sageserve.attention.sage_attn.reference import FP8_DTYPE
from sageserve.attention.triton_attn.kernels import prefill as p16
from sageserve.attention.triton_attn.kernels.store import store_kv as store16

TOKENS, HEADS, DIM = 16384, 32, 128
DEV = torch.device("cuda")

SAGE = {  # name: (page size, config)
    "gather-p16": (16, p8.PrefillConfig()),
    "tma": (64, p8.PrefillConfig()),
    "tma-noreg": (64, p8.PrefillConfig(maxnreg=None)),
    "tma-s2": (64, p8.PrefillConfig(num_stages=2)),
    "tma-s4": (64, p8.PrefillConfig(num_stages=4)),
    "tma-r128": (64, p8.PrefillConfig(maxnreg=128)),
    "tma-128x64-w8": (64, p8.PrefillConfig(128, 64, 8, 3, maxnreg=None)),
    "tma-128x64-w8-s2": (64, p8.PrefillConfig(128, 64, 8, 2, maxnreg=None)),
    "tma-128x128-w8-p128": (128, p8.PrefillConfig(128, 128, 8, 2, maxnreg=None)),
    "tma-64x128-w4-p128": (128, p8.PrefillConfig(64, 128, 4, 2)),
}
TRITON16 = {
    "gather-p16": (16, p16.PrefillConfig(128, 64, 8, 3)),
    "tma": (64, p16.PrefillConfig(128, 64, 8, 3)),
    "tma-s2": (64, p16.PrefillConfig(128, 64, 8, 2)),
    "tma-s4": (64, p16.PrefillConfig(128, 64, 8, 4)),
    "tma-64x64-w4": (64, p16.PrefillConfig(64, 64, 4, 3)),
    "tma-64x64-w4-r168": (64, p16.PrefillConfig(64, 64, 4, 3, maxnreg=168)),
    "tma-128x128-w8-p128": (128, p16.PrefillConfig(128, 128, 8, 2)),
    "tma-128x64-w8-p128": (128, p16.PrefillConfig(128, 64, 8, 3)),
}


def _tables(batch: int, seq: int, page: int, gen: torch.Generator):
    per_seq = seq // page
    order = (torch.randperm(batch * per_seq, generator=gen) + 1).view(batch, per_seq)
    pos = torch.arange(seq)
    pages = order[:, pos // page].flatten()
    offsets = (pos % page).repeat(batch)
    return [tuple(r) for r in order.tolist()], pages, offsets, batch * per_seq + 1


class Case:
    def __init__(self, seq: int, gen: torch.Generator) -> None:
        self.batch, self.seq = TOKENS // seq, seq
        shape = (TOKENS, HEADS, DIM)
        self.q = torch.randn(shape, generator=gen).to(DEV).bfloat16()
        bias = 2 * torch.randn(1, HEADS, DIM, generator=gen)
        self.k = (torch.randn(shape, generator=gen) + bias).to(DEV).bfloat16()
        self.v = torch.randn(shape, generator=gen).to(DEV).bfloat16()
        self.k_mean = self.k[:seq].float().mean(0)
        self.gen = gen
        self.lens = torch.full((self.batch,), seq, dtype=torch.int32, device=DEV)
        self.starts = (torch.arange(self.batch) * seq).int().to(DEV)

    def sage_caches(self, page: int, pv: str) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """(K codes, K scales, V codes, V scales) of this case's keys in shuffled pages, and
        the padded page table."""
        tables, pages, offsets, num_pages = _tables(self.batch, self.seq, page, self.gen)
        v_dtype = FP8_DTYPE if pv == "fp8" else torch.int8
        caches = (
            torch.zeros(num_pages, HEADS, page, DIM, dtype=torch.int8, device=DEV),
            torch.zeros(num_pages, HEADS, page, dtype=torch.float16, device=DEV),
            torch.zeros(num_pages, HEADS, DIM, page, dtype=v_dtype, device=DEV),
            torch.zeros(num_pages, HEADS, page, dtype=torch.float16, device=DEV),
        )
        store8(self.k, self.v, self.k_mean, None, pages.to(DEV), offsets.to(DEV), *caches)
        return caches, p8.padded_page_table(tables, [self.seq] * self.batch, page, DEV)

    def sage(self, page: int, config, pv: str, causal: bool) -> Callable:
        caches, table = self.sage_caches(page, pv)

        def run(out: torch.Tensor) -> None:
            p8.sage_attention_paged(self.q, None, *caches, table, self.starts, self.lens,
                                    self.lens, self.seq, config=config, out=out,
                                    causal=causal)  # fmt: skip

        return run

    def triton16(self, page: int, config) -> Callable:
        tables, pages, offsets, num_pages = _tables(self.batch, self.seq, page, self.gen)
        k_cache = torch.zeros(num_pages * page, HEADS, DIM, dtype=torch.bfloat16, device=DEV)
        v_cache = torch.zeros_like(k_cache)
        store16(self.k, self.v, (pages * page + offsets).to(DEV), k_cache, v_cache)
        starts = [i * self.seq for i in range(self.batch)]
        lens = [self.seq] * self.batch
        plan = p16.plan_prefill(tables, starts, lens, lens, page, DIM, DEV, config)
        return lambda out: p16.paged_prefill(self.q, k_cache, v_cache, plan, out)

    def sdpa(self, backend, causal: bool) -> Callable:
        def to4(x):
            return x.view(self.batch, self.seq, HEADS, DIM).transpose(1, 2)

        def run(out: torch.Tensor) -> None:
            with sdpa_kernel(backend):
                o = F.scaled_dot_product_attention(to4(self.q), to4(self.k), to4(self.v),
                                                   is_causal=causal)  # fmt: skip
            out.copy_(o.transpose(1, 2).reshape(self.q.shape))

        return run


def _runners(case: Case, causal: bool) -> dict[str, Callable]:
    runners = {}
    for pv in ("fp16", "fp8"):
        for name, (page, config) in SAGE.items():
            if pv == "fp8" and config.block_n != 64:
                continue
            runners[f"sage-{pv}/{name}"] = case.sage(page, config, pv, causal)
    if causal:  # (the 16-bit kernel is causal only)
        for name, (page, config) in TRITON16.items():
            runners[f"triton16/{name}"] = case.triton16(page, config)
    runners["sdpa-flash"] = case.sdpa(SDPBackend.FLASH_ATTENTION, causal)
    runners["sdpa-cudnn"] = case.sdpa(SDPBackend.CUDNN_ATTENTION, causal)
    return runners


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.float().flatten(), b.float().flatten(), dim=0).item()


def bench(seq: int, causal: bool, rounds: int, gen: torch.Generator) -> list[dict]:
    case = Case(seq, gen)
    runners, outs, rows, firsts = _runners(case, causal), {}, [], {}
    for name, fn in runners.items():
        out = torch.full_like(case.q, float("nan"))
        try:
            fn(out)
            torch.cuda.synchronize()
        except Exception as err:  # a variant that does not compile is a result
            rows.append({"seq": seq, "causal": causal, "variant": name, "error": str(err)[-300:]})
            continue
        outs[name] = out
        firsts.setdefault(name.split("/")[0], out)
    times: dict[str, list[float]] = {name: [] for name in outs}
    for _ in range(rounds):
        for name in outs:
            fn, out = runners[name], outs[name]
            times[name].append(triton.testing.do_bench(lambda f=fn, o=out: f(o), warmup=5, rep=40))
    flops = 4 * TOKENS * seq * HEADS * DIM / (2 if causal else 1)
    for name, out in outs.items():
        ms = sorted(times[name])[len(times[name]) // 2]
        cos = _cos(out, firsts[name.split("/")[0]])
        rows.append({"seq": seq, "causal": causal, "variant": name, "ms": ms,
                     "tops": flops / ms / 1e9, "cos_vs_first": cos})  # fmt: skip
        print(f"{seq:>6} {'causal' if causal else 'full':<6} {name:<34} {ms:7.3f} ms "
              f"{flops / ms / 1e9:6.1f} TOPS cos {cos:.5f}", flush=True)  # fmt: skip
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--seqs", default="1024,4096,16384")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    rows = []
    for seq in [int(s) for s in args.seqs.split(",")]:
        rows += bench(seq, True, args.rounds, gen)
    rows += bench(int(args.seqs.split(",")[-1]), False, args.rounds, gen)
    result = {
        "what": "prefill launch settings with TMA key blocks vs gathers vs SDPA, attention only",
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__, "triton": triton.__version__,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join([sys.executable, *sys.argv]),
        "shape": {"tokens": TOKENS, "heads": HEADS, "kv_heads": HEADS, "head_dim": DIM,
                  "dtype": "bfloat16"},
        "rows": rows,
    }  # fmt: skip
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
