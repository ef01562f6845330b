"""Probe: does TMA (tensor descriptors) and Triton's Hopper warp specialization speed up the
8-bit prefill kernel? An experiment, not a backend (lab/KERNEL_NOTES.md, "TMA probe").

The kernel below reads K, V and their scales through host tensor descriptors, one page per
key block (page size == BLOCK_N, so a block is one contiguous TMA box), and INT8 Q through a
descriptor too (quantized beforehand: Triton 3.6's Hopper warp-specialization pass rejects a
loop whose dot takes an operand loaded by pointers; it also rejects two loops, FP8 P·V and
128-row blocks, so the warp-specialized variant is FP16 P·V, one masked loop, 64 rows).

Compared in one process, alternating, on the same page-64 8-bit cache: our default prefill
kernel (cp.async gathers), the TMA kernel without and with warp specialization, and torch
SDPA (flash, cuDNN). Attention time only (Q quantization and the store are not counted for
any variant; the default kernel quantizes Q inside). Outputs checked against the default
kernel's.

    python lab/tma_ws_probe.py --out results.json
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.tools.tensor_descriptor import TensorDescriptor

from sageserve.attention.sage_attn.kernels.prefill import (
    PrefillConfig,
    padded_page_table,
    sage_attention_paged,
)
from sageserve.attention.sage_attn.kernels.store import store_kv
from sageserve.attention.sage_attn.reference import FP8_DTYPE, quantize_int8

TOKENS, HEADS, DIM, PAGE = 16384, 32, 128, 64
MIN_SCALE = tl.constexpr(2.0**-24)
LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _key_blocks(
    acc, l_i, m_i, q_codes, row_scale, rows, prefix, lo, hi, end, kv_head, table,
    k_desc, v_desc, ks_desc, vs_desc,
    num_kv_heads: tl.constexpr, head_dim: tl.constexpr, BLOCK_N: tl.constexpr,
    MASK: tl.constexpr, PV_FP8: tl.constexpr, WS: tl.constexpr,
):  # fmt: skip
    for start in tl.range(lo, hi, BLOCK_N, warp_specialize=WS):
        page = tl.load(table + start // BLOCK_N)
        base = page * num_kv_heads + kv_head
        k = k_desc.load([base * BLOCK_N, 0])  # [BLOCK_N, D] int8
        v = v_desc.load([base * head_dim, 0])  # [D, BLOCK_N]: V pages are transposed
        ks = tl.reshape(ks_desc.load([base, 0]), [BLOCK_N]).to(tl.float32)
        vs = tl.reshape(vs_desc.load([base, 0]), [BLOCK_N]).to(tl.float32)
        s = tl.dot(q_codes, tl.trans(k)).to(tl.float32) * ks[None, :]
        if MASK:
            keys = start + tl.arange(0, BLOCK_N)
            key_ok = keys < end
            allowed = (keys[None, :] <= prefix + rows[:, None]) & key_ok[None, :]
            s = tl.where(allowed, s, float("-inf"))
            vs = tl.where(key_ok, vs, 0.0)
        m_new = tl.maximum(m_i, tl.max(s, axis=1) * row_scale)
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s * row_scale[:, None] - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if PV_FP8:
            block_max = tl.maximum(tl.max(vs, axis=0), MIN_SCALE)
            p_codes = (p * (vs / block_max)[None, :] * 448.0).to(tl.float8e4nv)
            pv = tl.dot(p_codes, tl.trans(v)) * (block_max / 448.0)
        else:
            pv = tl.dot((p * vs[None, :]).to(tl.float16), tl.trans(v).to(tl.float16))
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _tma_prefill_kernel(
    q_desc, q_scale_ptr, out_ptr, k_desc, v_desc, ks_desc, vs_desc,
    page_table_ptr, q_start_ptr, q_len_ptr, kv_len_ptr,
    stride_ot, stride_oh, stride_table, sm_scale,
    num_kv_heads: tl.constexpr, group: tl.constexpr, head_dim: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PV_FP8: tl.constexpr, WS: tl.constexpr,
    SPLIT: tl.constexpr,
):  # fmt: skip
    """Grid (query block, head, sequence), causal bottom-right; q_scale [T, Hq] fp32."""
    seq = tl.program_id(2)
    head = tl.program_id(1)
    q_len = tl.load(q_len_ptr + seq)
    # No early return: the warp-specialization pass rejects the branch it makes.
    block = tl.maximum(tl.cdiv(q_len, BLOCK_M) - 1 - tl.program_id(0), 0)
    kv_len = tl.load(kv_len_ptr + seq)
    prefix = kv_len - q_len
    kv_head = head // group
    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < q_len
    q_start = tl.load(q_start_ptr + seq)
    q_codes = q_desc.load([q_start + block * BLOCK_M, head * head_dim])
    q_rows = (q_start + rows).to(tl.int64)
    q_scale = tl.load(q_scale_ptr + q_rows * (num_kv_heads * group) + head, mask=row_ok, other=1.0)
    row_scale = q_scale * (sm_scale * LOG2E)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, head_dim], tl.float32)
    table = page_table_ptr + seq.to(tl.int64) * stride_table
    end = tl.minimum(kv_len, prefix + (block + 1) * BLOCK_M)
    full = 0
    if SPLIT:
        full = (prefix + block * BLOCK_M + 1) // BLOCK_N * BLOCK_N
    if SPLIT:  # (one loop only for the warp-specialized variant: the pass rejects two)
        acc, l_i, m_i = _key_blocks(acc, l_i, m_i, q_codes, row_scale, rows, prefix, 0, full,
                                    end, kv_head, table, k_desc, v_desc, ks_desc, vs_desc,
                                    num_kv_heads, head_dim, BLOCK_N, False, PV_FP8, WS)  # fmt: skip
    acc, l_i, m_i = _key_blocks(acc, l_i, m_i, q_codes, row_scale, rows, prefix, full, end, end,
                                kv_head, table, k_desc, v_desc, ks_desc, vs_desc, num_kv_heads,
                                head_dim, BLOCK_N, True, PV_FP8, WS)  # fmt: skip
    out = acc / l_i[:, None]
    d = tl.arange(0, head_dim)
    tl.store(out_ptr + q_rows[:, None] * stride_ot + head * stride_oh + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])  # fmt: skip


VARIANTS = {  # name: (BLOCK_M, warps, stages, WS, SPLIT)
    "tma-bm64-w4-s3": (64, 4, 3, False, True),
    "tma-bm128-w8-s2": (128, 8, 2, False, True),
    "tma-ws-bm64-w4-s2": (64, 4, 2, True, False),
    "tma-ws-bm64-w4-s3": (64, 4, 3, True, False),
}


class Case:
    """One causal prefill step over a shuffled page-64 8-bit cache (FP16 or FP8 P·V)."""

    def __init__(self, seq: int, pv: str, gen: torch.Generator) -> None:
        batch = TOKENS // seq
        dev = torch.device("cuda")
        shape = (batch * seq, HEADS, DIM)
        self.q = torch.randn(shape, generator=gen).to(dev).bfloat16()
        bias = 2 * torch.randn(1, HEADS, DIM, generator=gen)
        self.k = (torch.randn(shape, generator=gen) + bias).to(dev).bfloat16()
        self.v = torch.randn(shape, generator=gen).to(dev).bfloat16()
        per_seq = seq // PAGE
        num_pages = batch * per_seq + 1
        order = (torch.randperm(num_pages - 1, generator=gen) + 1).view(batch, per_seq)
        self.table = padded_page_table([tuple(r) for r in order.tolist()], [seq] * batch, PAGE, dev)
        pos = torch.arange(seq)
        pages = order[:, pos // PAGE].flatten().to(dev)
        offsets = (pos % PAGE).repeat(batch).to(dev)
        v_dtype = FP8_DTYPE if pv == "fp8" else torch.int8
        self.k_cache = torch.empty(num_pages, HEADS, PAGE, DIM, dtype=torch.int8, device=dev)
        self.k_scale = torch.empty(num_pages, HEADS, PAGE, dtype=torch.float16, device=dev)
        self.v_cache = torch.empty(num_pages, HEADS, DIM, PAGE, dtype=v_dtype, device=dev)
        self.v_scale = torch.empty(num_pages, HEADS, PAGE, dtype=torch.float16, device=dev)
        self.k_scale.zero_(), self.v_scale.zero_(), self.k_cache.zero_(), self.v_cache.zero_()
        k_mean = self.k[:seq].float().mean(0)
        store_kv(self.k, self.v, k_mean, None, pages, offsets, self.k_cache, self.k_scale,
                 self.v_cache, self.v_scale)  # fmt: skip
        self.q_codes, self.q_scale = quantize_int8(self.q)
        self.starts = (torch.arange(batch) * seq).int().to(dev)
        self.lens = torch.full((batch,), seq, dtype=torch.int32, device=dev)
        self.seq, self.pv = seq, pv

    def default(self, out: torch.Tensor) -> None:
        sage_attention_paged(self.q, None, self.k_cache, self.k_scale, self.v_cache,
                             self.v_scale, self.table, self.starts, self.lens, self.lens,
                             self.seq, config=PrefillConfig(), out=out)  # fmt: skip

    def tma(self, variant: tuple, out: torch.Tensor) -> None:
        block_m, warps, stages, ws, split = variant
        t = self.q_codes.shape[0]
        q_desc = TensorDescriptor(self.q_codes.view(t, HEADS * DIM), [t, HEADS * DIM],
                                  [HEADS * DIM, 1], [block_m, DIM])  # fmt: skip
        rows = self.k_cache.shape[0] * HEADS
        k_desc = TensorDescriptor.from_tensor(self.k_cache.view(rows * PAGE, DIM), [PAGE, DIM])
        v_desc = TensorDescriptor.from_tensor(self.v_cache.view(rows * DIM, PAGE), [DIM, PAGE])
        ks_desc = TensorDescriptor.from_tensor(self.k_scale.view(rows, PAGE), [1, PAGE])
        vs_desc = TensorDescriptor.from_tensor(self.v_scale.view(rows, PAGE), [1, PAGE])
        grid = (triton.cdiv(self.seq, block_m), HEADS, self.lens.shape[0])
        _tma_prefill_kernel[grid](
            q_desc, self.q_scale, out, k_desc, v_desc, ks_desc, vs_desc,
            self.table, self.starts, self.lens, self.lens,
            out.stride(0), out.stride(1), self.table.stride(0), DIM**-0.5,
            num_kv_heads=HEADS, group=1, head_dim=DIM, BLOCK_M=block_m, BLOCK_N=PAGE,
            PV_FP8=self.pv == "fp8", WS=ws, SPLIT=split, num_warps=warps, num_stages=stages,
        )  # fmt: skip

    def sdpa(self, backend, out: torch.Tensor) -> None:
        batch = self.lens.shape[0]

        def to4(x):
            return x.view(batch, self.seq, HEADS, DIM).transpose(1, 2)

        with sdpa_kernel(backend):
            o = F.scaled_dot_product_attention(to4(self.q), to4(self.k), to4(self.v),
                                               is_causal=True)  # fmt: skip
        out.copy_(o.transpose(1, 2).reshape(self.q.shape))


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.float().flatten(), b.float().flatten(), dim=0).item()


def _runners(case: Case) -> dict:
    runners = {"default": case.default}
    for name, variant in VARIANTS.items():
        runners[name] = lambda out, v=variant: case.tma(v, out)
    runners["sdpa-flash"] = lambda out: case.sdpa(SDPBackend.FLASH_ATTENTION, out)
    runners["sdpa-cudnn"] = lambda out: case.sdpa(SDPBackend.CUDNN_ATTENTION, out)
    return runners


def _bench_case(seq: int, pv: str, rounds: int, gen: torch.Generator) -> list[dict]:
    case = Case(seq, pv, gen)
    ref = torch.empty_like(case.q)
    case.default(ref)
    usable, rows = {}, []
    for name, fn in _runners(case).items():
        out = torch.full_like(case.q, float("nan"))
        try:
            fn(out)
            torch.cuda.synchronize()
        except Exception as err:  # a compile failure is a result of the probe
            rows.append({"seq": seq, "pv": pv, "variant": name, "error": str(err)[-400:]})
            continue
        usable[name] = (fn, out, _cos(out, ref))
    times: dict[str, list[float]] = {name: [] for name in usable}
    for _ in range(rounds):
        for name, (fn, out, _) in usable.items():
            times[name].append(triton.testing.do_bench(lambda f=fn, o=out: f(o), warmup=5, rep=40))
    flops = 4 * TOKENS * seq * HEADS * DIM / 2
    for name, (_, _, cos) in usable.items():
        ms = sorted(times[name])[len(times[name]) // 2]
        rows.append({"seq": seq, "pv": pv, "variant": name, "ms": ms,
                     "tops": flops / ms / 1e9, "cos_vs_default": cos})  # fmt: skip
        print(f"{seq:>6} {pv} {name:<22} {ms:8.3f} ms {flops / ms / 1e9:7.1f} TOPS cos {cos:.5f}")
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
        for pv in ("fp16", "fp8"):
            rows += _bench_case(seq, pv, args.rounds, gen)
    result = {
        "what": "TMA / warp-specialization probe, causal prefill, attention only",
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__, "triton": triton.__version__,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join([sys.executable, *sys.argv]),
        "shape": {"tokens": TOKENS, "heads": HEADS, "head_dim": DIM, "page": PAGE},
        "rows": rows,
    }  # fmt: skip
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
