"""sage_attn's Triton kernels on one GPU: prefill variants against torch SDPA (flash, cuDNN),
the store kernel alone, and the split-KV decode kernel against the prefill kernel's decode.

Prefill: batch × seq = 16k tokens, 32 heads, bf16 inputs (K with a per-channel bias, as real
keys have), page 16. Every variant is first checked against `sage_reference` (first and last
128 query rows of the first sequence, 4 heads) and against fp32 SDPA (cosine, relative L1),
its output buffer NaN-poisoned; then all variants are timed in rounds (A B C .. A B C ..,
CUDA events through `triton.testing.do_bench`, median). TOPS = 4·B·H·N²·D (halved when
causal) over the attention time; "with store" adds the store kernel's time (quantizing
and writing K and V, as a prefill step does). Q is quantized inside the attention kernel.

Decode: Hq 32, Hkv 8, D 128 (Llama-3.1-8B), page 16, random 8-bit cache; each path
captured in a CUDA graph (`do_bench_cudagraph`); GB/s counts K/V codes and scales read.

    python benchmarks/sage_kernels_bench.py --out results.json [--v2 .bench/sage_attention_v2.py]
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from statistics import median

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from sageserve.attention.sage_attn.kernels.decode import (
    DecodeConfig,
    DecodeWorkspace,
    plan_splits,
    sage_decode_paged,
)
from sageserve.attention.sage_attn.kernels.prefill import (
    PrefillConfig,
    padded_page_table,
    sage_attention_paged,
)
from sageserve.attention.sage_attn.kernels.store import store_kv
from sageserve.attention.sage_attn.reference import (
    FP8_DTYPE,
    causal_mask,
    dequantize,
    quantized_scores,
    sage_attention,
)

TOKENS, HEADS, PAGE = 16384, 32, 16
DEVICE = torch.device("cuda")  # (a CPU smoke run of this script swaps it, with TOKENS)
CHECK_HEADS = [0, 1, 2, HEADS - 1]

V3_ROUND1 = PrefillConfig(128, 64, 8, 3, maxnreg=None, fast_v_cvt=False)
VARIANTS = {
    # Rounds 1-2 (sage_kernels_v3-round{1,2}-h100-2026-11-28.json) tried BM 128 / 64, BN 32 /
    # 64 / 128, 4 / 8 warps, stages 1-3, register prefetch, maxnreg 128 / 168, the split
    # mask, the I2F-free V conversion ("fc"). Kept: the default (the winner) and the
    # runners-up and reference points below.
    "default": PrefillConfig(),
    "v3-r1": V3_ROUND1,
    "bm64-r168-i2f": PrefillConfig(fast_v_cvt=False),
    "bn128-s2-fc": PrefillConfig(128, 128, 8, 2, maxnreg=None),
    "pre-fc": PrefillConfig(128, 64, 8, 1, prefetch=True, maxnreg=None),
}


# ---------------------------------------------------------------------------- prefill


def _inputs(seq: int, dim: int, gen: torch.Generator):
    shape = (TOKENS // seq * seq, HEADS, dim)
    q = torch.randn(shape, generator=gen).to(DEVICE).bfloat16()
    bias = 2 * torch.randn(1, HEADS, dim, generator=gen)  # keys carry a channel bias
    k = (torch.randn(shape, generator=gen) + bias).to(DEVICE).bfloat16()
    v = torch.randn(shape, generator=gen).to(DEVICE).bfloat16()
    return q, k, v


class PagedPrefill:
    """One prefill step's 8-bit cache (pages shuffled) and kernel metadata."""

    def __init__(self, q, k, v, seq: int, pv: str, gen: torch.Generator) -> None:
        batch, dim = q.shape[0] // seq, q.shape[2]
        pages_per_seq = seq // PAGE
        num_pages = batch * pages_per_seq + 1
        order = (torch.randperm(num_pages - 1, generator=gen) + 1).view(batch, pages_per_seq)
        self.table = padded_page_table([tuple(r) for r in order.tolist()], [seq] * batch, PAGE,
                                       DEVICE)  # fmt: skip
        positions = torch.arange(seq)
        self.pages = order[:, positions // PAGE].flatten().to(DEVICE)
        self.offsets = (positions % PAGE).repeat(batch).to(DEVICE)
        v_dtype = FP8_DTYPE if pv == "fp8" else torch.int8
        dev = DEVICE
        self.k_cache = torch.empty(num_pages, HEADS, PAGE, dim, dtype=torch.int8, device=dev)
        self.k_scale = torch.empty(num_pages, HEADS, PAGE, dtype=torch.float16, device=dev)
        self.v_cache = torch.empty(num_pages, HEADS, dim, PAGE, dtype=v_dtype, device=dev)
        self.v_scale = torch.empty(num_pages, HEADS, PAGE, dtype=torch.float16, device=dev)
        self.k_mean = k[:seq].float().mean(0)
        self.balance = torch.ones(HEADS, dim, device=dev)
        self.starts = (torch.arange(batch) * seq).int().to(DEVICE)
        self.lens = torch.full((batch,), seq, dtype=torch.int32, device=dev)
        self.q, self.k, self.v, self.seq = q, k, v, seq

    def store(self) -> None:
        store_kv(self.k, self.v, self.k_mean, self.balance, self.pages, self.offsets,
                 self.k_cache, self.k_scale, self.v_cache, self.v_scale)  # fmt: skip

    def attention(self, config: PrefillConfig, out: torch.Tensor, causal: bool = True) -> None:
        sage_attention_paged(self.q, self.balance, self.k_cache, self.k_scale, self.v_cache,
                             self.v_scale, self.table, self.starts, self.lens, self.lens,
                             self.seq, config=config, out=out, causal=causal)  # fmt: skip

    def attention_v2(self, module, out: torch.Tensor) -> None:
        out.copy_(module.sage_attention_paged(
            self.q, self.balance, self.k_cache, self.k_scale, self.v_cache, self.v_scale,
            self.table, self.starts, self.lens, self.lens, self.seq, block_m=128, block_n=64,
        ))  # fmt: skip

    def reference(self, n: int, last: bool, pv: str) -> tuple[torch.Tensor, torch.Tensor]:
        """sage_reference on the first sequence, and the same without rounding P (P·V in
        fp64 over dequantized V): each [n, len(CHECK_HEADS), D]."""
        kv = self.seq if last else n
        pos = torch.arange(kv, device=DEVICE)
        pages = self.table[0].long()[pos // PAGE]
        offs = pos % PAGE
        h = CHECK_HEADS
        k_codes = self.k_cache[pages, :, offs][:, h]
        k_scale = self.k_scale[pages, :, offs][:, h].float()
        v_codes = self.v_cache[pages, :, :, offs][:, h]
        v_scale = self.v_scale[pages, :, offs][:, h].float()
        q = self.q[kv - n : kv, h]
        ref = sage_attention(q, k_codes, k_scale, v_codes, v_scale, pv,
                             channel_scale=self.balance[h])  # fmt: skip
        scores = quantized_scores(q, k_codes, k_scale, q.shape[-1] ** -0.5, self.balance[h])
        scores = scores.masked_fill(~causal_mask(n, kv, scores.device), float("-inf"))
        p = scores.double().softmax(dim=-1)
        exact = torch.einsum("hqk,khd->qhd", p, dequantize(v_codes, v_scale).double())
        return ref, exact


def _check_reference(paged: PagedPrefill, out: torch.Tensor, pv: str, causal: bool) -> dict:
    """Against sage_reference on the first and last 128 rows (causal), or the last row
    (non-causal: the only row whose keys are the same as causal's).

    FP16 P·V: max error / max |ref| and cosine (bf16 output rounding, 2^-9 relative, plus
    rounding-level softmax differences). FP8 P·V: the kernel rounds P to e4m3 against a
    running maximum, the reference against the final one, so their roundings differ by up
    to e4m3's 6%; the kernel must be as close as the reference to the unrounded product.
    """
    assert torch.isfinite(out).all(), "unwritten (NaN-poisoned) output"
    seq, h = paged.seq, CHECK_HEADS
    parts = [(*paged.reference(128, False, pv), out[:128, h])] if causal else []
    n = 128 if causal else 1
    parts.append((*paged.reference(n, True, pv), out[seq - n : seq, h]))
    ref = torch.cat([r.flatten() for r, _, _ in parts]).double()
    exact = torch.cat([e.flatten() for _, e, _ in parts]).double()
    got = torch.cat([o.float().flatten() for _, _, o in parts]).double()
    err = ((got - ref).abs().max() / ref.abs().max()).item()
    cos = F.cosine_similarity(got, ref, dim=0).item()
    kernel_l2 = ((got - exact).norm() / exact.norm()).item()
    ref_l2 = ((ref - exact).norm() / exact.norm()).item()
    ok = kernel_l2 <= 1.25 * ref_l2 + 1e-3 if pv == "fp8" else cos >= 0.99999 and err <= 8e-3
    return {"ref_max_err": err, "ref_cosine": cos, "kernel_vs_unrounded_l2": kernel_l2,
            "ref_vs_unrounded_l2": ref_l2, "ref_ok": ok}  # fmt: skip


def _accuracy(out: torch.Tensor, q, k, v, seq: int, causal: bool) -> dict:
    """Against fp32 SDPA on the first sequence, every head."""
    q4, k4, v4 = (x[:seq].float().transpose(0, 1)[None] for x in (q, k, v))
    ref = F.scaled_dot_product_attention(q4, k4, v4, is_causal=causal)[0].transpose(0, 1)
    o, r = out[:seq].float().flatten(), ref.flatten()
    cos = F.cosine_similarity(o, r, dim=0).item()
    return {"cosine": cos, "rel_l1": ((o - r).abs().sum() / r.abs().sum()).item()}


def _sdpa_fn(q, k, v, seq: int, backend, causal: bool) -> Callable[[torch.Tensor], None]:
    batch = q.shape[0] // seq

    def to4(x):
        return x.view(batch, seq, HEADS, -1).transpose(1, 2)

    q4, k4, v4 = to4(q), to4(k), to4(v)

    def run(out: torch.Tensor) -> None:
        with sdpa_kernel([backend]):
            o = F.scaled_dot_product_attention(q4, k4, v4, is_causal=causal)
        out.copy_(o.transpose(1, 2).reshape(q.shape))

    return run


def _time(fn: Callable[[], None]) -> float:
    """Median ms over CUDA events."""
    return triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median")


def _time_graph(fn: Callable[[], None]) -> float:
    """Median ms of fn replayed from a CUDA graph (as decode runs in the server)."""
    return triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median")


def _sync() -> None:
    torch.cuda.synchronize()


def bench_prefill(args, v2, gen: torch.Generator) -> list[dict]:
    rows = []
    for seq in map(int, args.seqs.split(",")):
        for causal in (True, False):
            if not causal and seq not in map(int, args.noncausal_seqs.split(",")):
                continue
            rows += _bench_one_length(args, v2, seq, causal, gen)
    return rows


def _bench_one_length(args, v2, seq: int, causal: bool, gen) -> list[dict]:
    dim = 128
    q, k, v = _inputs(seq, dim, gen)
    batch = q.shape[0] // seq
    flops = 4 * batch * HEADS * seq * seq * dim / (2 if causal else 1)
    cands: dict[str, tuple[Callable, dict]] = {}
    cands["sdpa_flash"] = (_sdpa_fn(q, k, v, seq, SDPBackend.FLASH_ATTENTION, causal), {})
    cands["sdpa_cudnn"] = (_sdpa_fn(q, k, v, seq, SDPBackend.CUDNN_ATTENTION, causal), {})
    stores = {}
    for pv in args.pv.split(","):
        paged = PagedPrefill(q, k, v, seq, pv, gen)
        paged.store()
        stores[pv] = paged
        names = args.variants.split(",") if causal else args.noncausal_variants.split(",")
        if pv == "fp8":
            # block_n 64 only; the V conversion is an FP16 P·V matter ("-i2f": a duplicate).
            names = [n for n in names if n == "v2" or VARIANTS[n].block_n == 64]
            names = [n for n in names if not n.endswith("-i2f")]
        for name in names:
            if name == "v2":
                if v2 is None or not causal:
                    continue
                fn = lambda out, p=paged: p.attention_v2(v2, out)  # noqa: E731
            else:
                fn = lambda out, p=paged, c=VARIANTS[name]: p.attention(c, out, causal)  # noqa: E731
            cands[f"sage_{pv}pv_{name}"] = (fn, {"pv": pv, "paged": paged})
    rows, outs = {}, {}
    for name, (fn, info) in cands.items():
        out = torch.full_like(q, float("nan"))
        try:
            fn(out)
            _sync()
        except Exception as exc:  # a variant that fails to compile is reported, not fatal
            print(f"{name}: FAILED {type(exc).__name__}: {exc}"[:400], flush=True)
            rows[name] = {"kernel": name, "error": f"{type(exc).__name__}: {exc}"[:2000]}
            continue
        row = {"kernel": name, "seq": seq, "causal": causal, "head_dim": dim, "batch": batch}
        row |= _accuracy(out, q, k, v, seq, causal)
        if "paged" in info:
            row |= _check_reference(info["paged"], out, info["pv"], causal)
        rows[name], outs[name] = row, out
    timed = [n for n in cands if "error" not in rows[n]]
    samples: dict[str, list[float]] = {n: [] for n in timed}
    for _ in range(args.rounds):  # A B C .. A B C ..: drift hits every variant alike
        for name in timed:
            samples[name].append(_time(lambda f=cands[name][0], o=outs[name]: f(o)))
    store_ms = {pv: _time(p.store) for pv, p in stores.items()}
    for name in timed:
        ms = median(samples[name])
        row = rows[name] | {"ms": ms, "ms_rounds": samples[name], "tops": flops / ms / 1e9}
        pv = cands[name][1].get("pv")
        if pv is not None:
            total = ms + store_ms[pv]
            row |= {"store_ms": store_ms[pv], "tops_with_store": flops / total / 1e9}
        rows[name] = row
        print(f"{name:24s} seq {seq:6d} {'causal' if causal else 'full  '} {ms:8.3f} ms "
              f"{row['tops']:6.1f} TOPS  with store {row.get('tops_with_store', 0):6.1f}  "
              f"ref ok {row.get('ref_ok', '-')} err {row.get('ref_max_err', 0):.1e}  "
              f"cos {row['cosine']:.6f}", flush=True)  # fmt: skip
    return list(rows.values())


# ---------------------------------------------------------------------------- decode


def bench_decode(args, v2, gen: torch.Generator) -> list[dict]:
    rows = []
    for spec in args.decode.split(","):
        batch, ctx = map(int, spec.split("x"))
        for pv in args.pv.split(","):
            rows += _bench_decode_one(v2, batch, ctx, pv, gen)
    return rows


def _decode_case(batch: int, ctx: int, pv: str, gen: torch.Generator):
    hq, hkv, dim = 32, 8, 128
    per_seq = -(-ctx // PAGE)
    num_pages = batch * per_seq + 1
    dev = DEVICE
    k_cache = torch.randint(-127, 128, (num_pages, hkv, PAGE, dim), dtype=torch.int8,
                            generator=gen).to(dev)  # fmt: skip
    v_codes = torch.randint(-127, 128, (num_pages, hkv, dim, PAGE), dtype=torch.int8,
                            generator=gen).to(dev)  # fmt: skip
    v_cache = (v_codes.float() * 3).to(FP8_DTYPE) if pv == "fp8" else v_codes
    scales = (torch.rand(2, num_pages, hkv, PAGE, generator=gen) * 0.02 + 0.005).half().to(dev)
    order = (torch.randperm(num_pages - 1, generator=gen) + 1).view(batch, per_seq)
    table = padded_page_table([tuple(r) for r in order.tolist()], [ctx] * batch, PAGE, dev)
    q = torch.randn(batch, hq, dim, generator=gen).to(dev).bfloat16()
    balance = (torch.rand(hkv, dim, generator=gen) + 0.5).to(dev)
    return q, balance, k_cache, scales[0], v_cache, scales[1], table


def _bench_decode_one(v2, batch: int, ctx: int, pv: str, gen) -> list[dict]:
    q, balance, k_cache, k_scale, v_cache, v_scale, table = _decode_case(batch, ctx, pv, gen)
    dev = q.device
    rows_idx = torch.arange(batch, dtype=torch.int32, device=dev)
    kv_len = torch.full((batch,), ctx, dtype=torch.int32, device=dev)
    hkv, dim = k_cache.shape[1], k_cache.shape[3]
    width = table.shape[1] * PAGE
    ws = DecodeWorkspace.allocate(batch, q.shape[1], hkv, dim, width, dev)
    splits4, _ = plan_splits(batch, hkv, width, dev, programs_per_sm=4)
    ws4 = DecodeWorkspace.allocate(batch, q.shape[1], hkv, dim, width, dev, splits4)
    splits2, _ = plan_splits(batch, hkv, width, dev, programs_per_sm=2)
    ws2 = DecodeWorkspace.allocate(batch, q.shape[1], hkv, dim, width, dev, splits2)
    caches = (k_cache, k_scale, v_cache, v_scale)
    ones = torch.ones_like(kv_len)
    names = ("split_kv", "split_kv_i2f", "split_kv_pps2", "split_kv_pps4", "v3_prefill", "v2")
    outs = {name: torch.full_like(q, float("nan")) for name in names}

    def split_kv() -> None:
        sage_decode_paged(q, balance, *caches, table, rows_idx, kv_len, outs["split_kv"], ws)

    def split_kv_pps4() -> None:  # 4 programs per SM instead of 2 (more, shorter splits)
        sage_decode_paged(q, balance, *caches, table, rows_idx, kv_len, outs["split_kv_pps4"],
                          ws4)  # fmt: skip

    def split_kv_i2f() -> None:  # INT8 V converted by I2F (round 2's decode kernel)
        sage_decode_paged(q, balance, *caches, table, rows_idx, kv_len, outs["split_kv_i2f"], ws,
                          config=DecodeConfig(fast_v_cvt=False))  # fmt: skip

    def split_kv_pps2() -> None:  # always 2 programs per SM
        sage_decode_paged(q, balance, *caches, table, rows_idx, kv_len, outs["split_kv_pps2"],
                          ws2)  # fmt: skip

    def v3_prefill() -> None:  # the prefill kernel with one query row per sequence
        config = PrefillConfig()
        sage_attention_paged(q, balance, *caches, table, rows_idx, ones, kv_len, 1,
                             config=config, out=outs["v3_prefill"])  # fmt: skip

    def v2_prefill() -> None:  # what sage.py ran for decodes before: v2, block_m 64
        outs["v2"].copy_(v2.sage_attention_paged(q, balance, *caches, table, rows_idx, ones,
                                                 kv_len, 1, block_m=64, block_n=64))  # fmt: skip

    fns = {"split_kv": split_kv, "split_kv_i2f": split_kv_i2f, "split_kv_pps2": split_kv_pps2,
           "split_kv_pps4": split_kv_pps4, "v3_prefill": v3_prefill}  # fmt: skip
    if v2 is not None:
        fns["v2"] = v2_prefill
    for fn in fns.values():
        fn()
    _sync()
    # The reference for sequence 0.
    pos = torch.arange(ctx, device=dev)
    pages, offs = table[0].long()[pos // PAGE], pos % PAGE
    ref = sage_attention(q[:1], k_cache[pages, :, offs], k_scale[pages, :, offs].float(),
                         v_cache[pages, :, :, offs], v_scale[pages, :, offs].float(), pv,
                         channel_scale=balance)[0].double()  # fmt: skip
    bytes_read = batch * ctx * hkv * (2 * dim + 4)
    rows = []
    for name, fn in fns.items():
        got = outs[name][0].double()
        err = ((got - ref).abs().max() / ref.abs().max()).item()
        ms = _time_graph(fn)
        finite = bool(torch.isfinite(outs[name]).all())
        splits = {"split_kv_pps4": ws4, "split_kv_pps2": ws2}.get(name, ws).num_splits
        rows.append({"kernel": f"decode_{name}", "pv": pv, "batch": batch, "context": ctx,
                     "splits": splits, "ms": ms, "gb_per_s": bytes_read / ms / 1e6,
                     "finite": finite, "ref_max_err": err})  # fmt: skip
        print(f"decode {name:10s} {pv} B {batch:4d} ctx {ctx:6d}: {ms * 1e3:8.1f} us "
              f"{bytes_read / ms / 1e6:7.1f} GB/s  err {err:.1e}  splits {splits}",
              flush=True)  # fmt: skip
    return rows


# ---------------------------------------------------------------------------- main


def _load_v2(path: str | None):
    if not path:
        return None
    spec = importlib.util.spec_from_file_location("sage_attention_v2", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqs", default="1024,4096,16384")
    parser.add_argument("--noncausal-seqs", default="8192,16384")
    parser.add_argument("--variants", default="v2," + ",".join(VARIANTS))
    parser.add_argument("--noncausal-variants", default="default,bn128-s2-fc")
    parser.add_argument("--pv", default="fp16,fp8")
    parser.add_argument("--decode", default="1x32768,1x4096,8x8192,32x4096,128x2048")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--v2", default=None, help="a copy of the v2 kernel module (baseline)")
    parser.add_argument("--skip-prefill", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    v2 = _load_v2(args.v2)
    result = {
        "benchmark": "sage_kernels",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python", *sys.argv]),
        "card": torch.cuda.get_device_name(),
        "software": {"torch": torch.__version__, "triton": triton.__version__},
        "shape": {"tokens": TOKENS, "heads": HEADS, "page_size": PAGE, "dtype": "bfloat16"},
        "variants": {name: dataclasses.asdict(c) for name, c in VARIANTS.items()},
        "rows": [],
    }
    if not args.skip_prefill:
        result["rows"] += bench_prefill(args, v2, gen)
    if args.decode:
        result["decode"] = bench_decode(args, v2, gen)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
