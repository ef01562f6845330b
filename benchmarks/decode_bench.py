"""Time the 8-bit split-KV decode (`sage_decode_paged`, v2) against v1 and the 16-bit decode.

GPU run (torch, triton, numpy; about 2 minutes on an H100):

    PYTHONPATH=. python benchmarks/decode_bench.py --out /tmp/decode_bench.json

No GPU needed: `--ptx` compiles every 8-bit variant's split kernel for sm_90 and prints its
loads (cp.async widths), registers, spills, shared memory and the key loop's SASS length.

Llama-3.1-8B attention shapes (32 query heads, 8 KV heads, head_dim 128), page 16, batch 1,
16, 64 x context 1k-32k (every sequence `context` cached tokens), pages shuffled. Variants:
"v1" is the kernel committed before v2 (copied below, with its own split rule, so it stays
the baseline whatever the library becomes); "v2" is the library's default; "v2_*" change one
knob (DecodeConfig or the split rule's programs per SM); "triton16" is the 16-bit
`paged_decode` with the split count the triton backend plans (max_context 131072). One
layer's decode attention per call, timed as CUDA-graph replays of calls that cycle through
several copies of the batch ("sets", >= 4x the L2 in all) so K/V come from HBM, all
variants alternated within each shape (sageserve.bench.kernels_timing). GB/s counts the
K/V bytes of the used pages (8-bit: codes + fp16 scales, 2080 B per token over 8 KV heads;
16-bit: 4096 B); "of copy" is that over a measured device copy (read + write).

Checks before timing: outputs poisoned with NaN must come back finite; each 8-bit variant
must be close to v1 of the same P·V precision (FP16: cosine >= 0.99999 and max error <=
5e-3 of the largest value; FP8: cosine >= 0.999, e4m3 rounding against different running
maxima); v2 must repeat bit for bit.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import triton
import triton.language as tl
from sageserve.attention.kernels import paged_decode as p16
from sageserve.attention.kernels import sage_decode as sd

from sageserve.attention.sage_attn.kernels.decode import DecodeConfig

Q_HEADS, KV_HEADS, HEAD_DIM, PAGE = 32, 8, 128, 16
BATCHES, CONTEXTS = (1, 16, 64), (1024, 4096, 8192, 16384, 32768)
# triton16's split count is planned for the model's positions, as the triton backend does
# when the pool holds more (Llama-3.1-8B: 131072).
MAX_POSITIONS = 131072
BYTES_PER_TOKEN = {"8bit": KV_HEADS * (2 * HEAD_DIM + 2 * 2), "16bit": 2 * KV_HEADS * HEAD_DIM * 2}
L2_FACTOR, MAX_SETS = 4, 64
DTYPE16 = torch.bfloat16  # the model's dtype: queries, outputs and the 16-bit cache
COPY_BYTES = 1 << 30
GRAPH_CALLS = 16  # at least this many calls per captured graph (launch gaps included)
TIME_LIMIT_S = 170  # no new shape starts past this (the run's budget is ~3 minutes)


@dataclass(frozen=True)
class Variant:
    """One timed kernel: kind "v1" / "v2" / "triton16"; pv "fp16" (INT8 V) or "fp8"."""

    name: str
    kind: str
    pv: str = "fp16"
    config: DecodeConfig | None = None
    programs_per_sm: int | None = None  # v2's split rule (None: sage_decode.PROGRAMS_PER_SM)
    note: str = ""


VARIANTS = [
    Variant("v1", "v1", note="committed kernel before v2: BLOCK_N 64, 3 stages, 2 kernels"),
    Variant("v2", "v2", config=DecodeConfig(), note="library default"),
    Variant("v2_unfused", "v2", config=DecodeConfig(fused_combine=False),
            note="separate combine kernel"),
    Variant("v2_s3", "v2", config=DecodeConfig(num_stages=3),
            note="3 stages: one buffer, copies not overlapped with the math"),
    Variant("v2_bn128", "v2", config=DecodeConfig(block_n=128, sub_n=128, num_stages=3),
            note="128 keys per iteration and per softmax step, one buffer"),
    Variant("v2_bn128_s5_pps2", "v2", programs_per_sm=2,
            config=DecodeConfig(block_n=128, sub_n=64, num_stages=5),
            note="128 keys per iteration in 2 steps, 2 buffers (71 KiB: 3 programs/SM)"),
    Variant("v2_w8_bn128_pps2", "v2", programs_per_sm=2,
            config=DecodeConfig(block_n=128, sub_n=64, num_stages=5, num_warps=8),
            note="8 warps, 128 keys per iteration, 2 buffers"),
    Variant("v2_pps2", "v2", config=DecodeConfig(), programs_per_sm=2,
            note="fewer, longer splits"),
    Variant("v2_pps8", "v2", config=DecodeConfig(), programs_per_sm=8,
            note="more, shorter splits"),
    Variant("v1_fp8", "v1", pv="fp8", note="v1, FP8 P·V"),
    Variant("v2_fp8", "v2", pv="fp8", config=DecodeConfig(), note="v2 default, FP8 P·V"),
    Variant("triton16", "triton16", note="16-bit paged_decode (split + merge kernels)"),
]  # fmt: skip


# ---------------------------------------------------------------- v1 (the committed kernel)
# Verbatim copies (helpers included) of sage_decode.py and sage_attention.py as committed
# before v2, so that "v1" does not follow later library changes.

V1_KEY_ALIGN = 128
V1_SPLIT_ALIGN = tl.constexpr(128)
V1_MIN_SCALE = tl.constexpr(2.0**-24)
V1_LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _v1_quantize_q(q, max_code: tl.constexpr):
    """q: [M, D] fp32 -> (int8 codes [M, D], fp32 scales [M]), per row."""
    scale = tl.maximum(tl.max(tl.abs(q), axis=1) / max_code, V1_MIN_SCALE)
    y = tl.div_rn(q, tl.zeros_like(q) + scale[:, None])
    y = tl.where(y >= 0, y + 0.5, y - 0.5)
    y = tl.minimum(tl.maximum(y, -max_code), max_code)
    return y.to(tl.int8), scale


@triton.jit
def _v1_int8_to_fp16(v):
    """INT8 codes -> fp16 exactly, without I2F (v1's `_int8_to_fp16`)."""
    return tl.inline_asm_elementwise(
        asm="""{
        .reg .b32 t, e, c;
        xor.b32 t, $2, 0x80808080;
        mov.b32 e, 0x64646464;
        mov.b32 c, 0x64806480;
        prmt.b32 $0, t, e, 0x5140;
        prmt.b32 $1, t, e, 0x5342;
        sub.f16x2 $0, $0, c;
        sub.f16x2 $1, $1, c;
        }""",
        constraints="=r,=r,r",
        args=[v],
        dtype=tl.float16,
        is_pure=True,
        pack=4,
    )


@triton.jit(do_not_specialize=["stride_table", "split_tokens", "num_splits"])
def _v1_split_kernel(
    q_ptr, balance_ptr, k_cache_ptr, k_scale_ptr, v_cache_ptr, v_scale_ptr,
    page_table_ptr, q_row_ptr, kv_len_ptr, part_acc_ptr, part_ml_ptr,
    stride_qt, stride_qh, stride_table, split_tokens, num_splits,
    sm_scale,
    num_kv_heads: tl.constexpr, group: tl.constexpr, page_size: tl.constexpr,
    head_dim: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
    KEY_RUN: tl.constexpr, HAS_BALANCE: tl.constexpr, PV_FP8: tl.constexpr,
    FAST_CVT: tl.constexpr,
):  # fmt: skip
    """v1: one (sequence, KV head, split): the group's query heads over split_tokens keys."""
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    kv_len = tl.load(kv_len_ptr + seq)
    start = tl.multiple_of(split * split_tokens, V1_SPLIT_ALIGN)
    if start >= kv_len:
        return
    end = tl.minimum(kv_len, start + split_tokens)
    h = tl.arange(0, BLOCK_H)
    h_ok = h < group
    heads = kv_head * group + h
    d = tl.arange(0, head_dim)
    q_row = tl.load(q_row_ptr + seq).to(tl.int64)
    q = tl.load(
        q_ptr + q_row * stride_qt + heads[:, None] * stride_qh + d[None, :],
        mask=h_ok[:, None], other=0.0,
    ).to(tl.float32)  # fmt: skip
    if HAS_BALANCE:
        q = q * tl.load(balance_ptr + kv_head * head_dim + d)[None, :]
    q_codes, q_scale = _v1_quantize_q(q, 127.0)
    row_scale = q_scale * (sm_scale * V1_LOG2E)
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, head_dim], tl.float32)
    table = page_table_ptr + seq.to(tl.int64) * stride_table
    for block_start in range(start, end, BLOCK_N):
        keys = block_start + tl.arange(0, BLOCK_N)
        key_ok = keys < end
        page = tl.load(table + keys // page_size).to(tl.int64)
        in_page = keys % page_size
        if KEY_RUN > 1:
            in_page = tl.max_contiguous(tl.multiple_of(in_page, KEY_RUN), KEY_RUN)
        page_base = (page * num_kv_heads + kv_head) * page_size
        slot = page_base + in_page
        k = tl.load(k_cache_ptr + tl.multiple_of(slot * head_dim, head_dim)[:, None] + d[None, :])
        k_scale = tl.load(k_scale_ptr + slot).to(tl.float32)
        s = tl.dot(q_codes, tl.trans(k)).to(tl.float32)
        s = s * row_scale[:, None] * k_scale[None, :]
        s = tl.where(key_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v_scale = tl.where(key_ok, tl.load(v_scale_ptr + slot).to(tl.float32), 0.0)
        v_rows = page_base * head_dim + in_page
        v = tl.load(v_cache_ptr + v_rows[:, None] + d[None, :] * page_size)
        if PV_FP8:
            block_max = tl.maximum(tl.max(v_scale, axis=0), V1_MIN_SCALE)
            p_codes = (p * (v_scale / block_max)[None, :] * 448.0).to(tl.float8e4nv)
            pv = tl.dot(p_codes, v) * (block_max / 448.0)
        else:
            v16 = _v1_int8_to_fp16(v) if FAST_CVT else v.to(tl.float16)
            pv = tl.dot((p * v_scale[None, :]).to(tl.float16), v16)
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    part = (seq * (num_kv_heads * group) + heads) * num_splits + split
    tl.store(part_acc_ptr + part[:, None] * head_dim + d[None, :], acc, mask=h_ok[:, None])
    tl.store(part_ml_ptr + part * 2, m_i, mask=h_ok)
    tl.store(part_ml_ptr + part * 2 + 1, l_i, mask=h_ok)


@triton.jit(do_not_specialize=["split_tokens", "num_splits"])
def _v1_combine_kernel(
    out_ptr, part_acc_ptr, part_ml_ptr, q_row_ptr, kv_len_ptr,
    stride_ot, stride_oh, split_tokens, num_splits,
    num_q_heads: tl.constexpr, head_dim: tl.constexpr, SPLITS: tl.constexpr,
):  # fmt: skip
    """v1: one (sequence, query head): merge its non-empty splits and normalize."""
    seq = tl.program_id(0)
    head = tl.program_id(1)
    kv_len = tl.load(kv_len_ptr + seq)
    s = tl.arange(0, SPLITS)
    used = s < tl.cdiv(kv_len, split_tokens)
    part = (seq * num_q_heads + head) * num_splits + s
    m = tl.load(part_ml_ptr + part * 2, mask=used, other=float("-inf"))
    l = tl.load(part_ml_ptr + part * 2 + 1, mask=used, other=0.0)  # noqa: E741
    weight = tl.where(used, tl.exp2(m - tl.max(m, axis=0)), 0.0)
    d = tl.arange(0, head_dim)
    acc = tl.load(part_acc_ptr + part[:, None] * head_dim + d[None, :], mask=used[:, None],
                  other=0.0)  # fmt: skip
    num = tl.sum(acc * weight[:, None], axis=0)
    den = tl.sum(l * weight, axis=0)
    out = tl.where(den > 0, num / den, 0.0)
    row = tl.load(q_row_ptr + seq).to(tl.int64)
    tl.store(out_ptr + row * stride_ot + head * stride_oh + d, out.to(out_ptr.dtype.element_ty))


@dataclass
class V1Workspace:
    """v1's partials: acc [B, Hq, S, D], ml [B, Hq, S, 2] fp32; split_tokens keys a split."""

    acc: torch.Tensor
    ml: torch.Tensor
    split_tokens: int


def v1_plan_splits(batch: int, kv_heads: int, max_tokens: int, sms: int) -> tuple[int, int]:
    """v1's rule: 4 programs per SM while batch x KV heads < SMs, else 2; >= 128 keys a
    split; <= 64 splits; not a power of two."""
    pairs = max(batch * kv_heads, 1)
    wanted = triton.cdiv((4 if pairs < sms else 2) * sms, pairs)
    splits = min(wanted, triton.cdiv(max_tokens, V1_KEY_ALIGN), 64)
    split_tokens = triton.cdiv(triton.cdiv(max_tokens, splits), V1_KEY_ALIGN) * V1_KEY_ALIGN
    return triton.cdiv(max_tokens, split_tokens), split_tokens


def v1_decode(q, balance, k_cache, k_scale, v_cache, v_scale, table, q_rows, kv_len, out,
              ws: V1Workspace) -> None:  # fmt: skip
    """v1's `sage_decode_paged` (same arguments; checks left out)."""
    batch, (_, q_heads, dim) = table.shape[0], q.shape
    kv_heads, page_size = k_cache.shape[1], k_cache.shape[2]
    group, splits = q_heads // kv_heads, ws.acc.shape[2]
    _v1_split_kernel[(batch, kv_heads, splits)](
        q, balance, k_cache, k_scale, v_cache, v_scale, table, q_rows, kv_len, ws.acc, ws.ml,
        q.stride(0), q.stride(1), table.stride(0), ws.split_tokens, splits, dim**-0.5,
        num_kv_heads=kv_heads, group=group, page_size=page_size, head_dim=dim,
        BLOCK_H=max(16, triton.next_power_of_2(group)), BLOCK_N=64,
        KEY_RUN=min(page_size, 64) if page_size & (page_size - 1) == 0 else 1,
        HAS_BALANCE=True, PV_FP8=v_cache.dtype == torch.float8_e4m3fn, FAST_CVT=q.is_cuda,
        num_warps=4, num_stages=3,
    )  # fmt: skip
    _v1_combine_kernel[(batch, q_heads)](
        out, ws.acc, ws.ml, q_rows, kv_len, out.stride(0), out.stride(1), ws.split_tokens,
        splits, num_q_heads=q_heads, head_dim=dim, SPLITS=triton.next_power_of_2(splits),
        num_warps=4,
    )  # fmt: skip


# ---------------------------------------------------------------- data


@dataclass
class Pools:
    """One shape's caches (every set's pages) and per-set page tables.

    k8 [P, Hkv, page, D] int8, v8 [P, Hkv, D, page] int8, v8fp8 the same in e4m3 (or None),
    k_scale / v_scale [P, Hkv, page] fp16; k16 / v16 [P * page, Hkv, D] DTYPE16 (or None);
    tables [sets, B, W] int32 (W = context / page; page 0 is the null page, never used).
    """

    k8: torch.Tensor
    v8: torch.Tensor
    v8fp8: torch.Tensor | None
    k_scale: torch.Tensor
    v_scale: torch.Tensor
    k16: torch.Tensor | None
    v16: torch.Tensor | None
    tables: torch.Tensor
    q: torch.Tensor  # [B, Hq, D] DTYPE16
    balance: torch.Tensor  # [Hkv, D] fp32
    q_rows: torch.Tensor  # [B] int32
    kv_len: torch.Tensor  # [B] int32


def rotation_sets(batch: int, context: int, device: torch.device) -> int:
    """Copies of the batch so that consecutive calls read K/V that is not in L2."""
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20)
    smallest = batch * context * BYTES_PER_TOKEN["8bit"]
    return max(1, min(MAX_SETS, math.ceil(L2_FACTOR * l2 / smallest)))


def pool_bytes(batch: int, context: int, sets: int, variants: list[Variant]) -> int:
    """Bytes of every cache this shape allocates."""
    tokens = sets * batch * context
    per_token = BYTES_PER_TOKEN["8bit"]
    if any(v.pv == "fp8" for v in variants):
        per_token += KV_HEADS * HEAD_DIM
    if any(v.kind == "triton16" for v in variants):
        per_token += BYTES_PER_TOKEN["16bit"]
    return tokens * per_token


def make_pools(batch: int, context: int, sets: int, variants, device, seed: int) -> Pools:
    """Random codes (K scales sized for scores of a few units), shuffled page tables."""
    gen = torch.Generator(device=device).manual_seed(seed)
    per_seq = context // PAGE
    pages = sets * batch * per_seq + 1
    shape = (pages, KV_HEADS, PAGE, HEAD_DIM)

    def codes(size) -> torch.Tensor:
        return torch.randint(-127, 128, size, generator=gen, device=device, dtype=torch.int8)

    def scales(low: float, high: float) -> torch.Tensor:
        u = torch.rand((pages, KV_HEADS, PAGE), generator=gen, device=device)
        return (u * (high - low) + low).half()

    k8, v8 = codes(shape), codes((pages, KV_HEADS, HEAD_DIM, PAGE))
    v8fp8 = None
    if any(v.pv == "fp8" for v in variants):
        v8fp8 = (v8.half() * 3.0).to(torch.float8_e4m3fn)
    k16 = v16 = None
    if any(v.kind == "triton16" for v in variants):
        k16 = torch.randn((pages * PAGE, KV_HEADS, HEAD_DIM), generator=gen, device=device,
                          dtype=DTYPE16)  # fmt: skip
        v16 = torch.randn_like(k16)
    order = torch.randperm(pages - 1, generator=torch.Generator().manual_seed(seed)) + 1
    tables = order.view(sets, batch, per_seq).to(device, torch.int32)
    q = torch.randn((batch, Q_HEADS, HEAD_DIM), generator=gen, device=device).to(DTYPE16)
    balance = torch.rand((KV_HEADS, HEAD_DIM), generator=gen, device=device) + 0.5
    return Pools(
        k8=k8, v8=v8, v8fp8=v8fp8, k_scale=scales(0.01, 0.03), v_scale=scales(0.005, 0.025),
        k16=k16, v16=v16, tables=tables, q=q, balance=balance,
        q_rows=torch.arange(batch, dtype=torch.int32, device=device),
        kv_len=torch.full((batch,), context, dtype=torch.int32, device=device),
    )  # fmt: skip


# ---------------------------------------------------------------- calls


def calls_for(variant: Variant, pools: Pools, out: torch.Tensor) -> tuple[list[Callable], int]:
    """One call per set (each reads its own pages) writing `out`, and the split count."""
    batch, width = pools.tables.shape[1], pools.tables.shape[2] * PAGE
    device = pools.q.device
    if variant.kind == "triton16":
        splits = p16.num_decode_splits(batch, KV_HEADS, MAX_POSITIONS, device)
        plans = [_plan16(table, pools, splits) for table in pools.tables]
        q = pools.q
        return [lambda p=plan: p16.paged_decode(q, pools.k16, pools.v16, p, out)
                for plan in plans], splits  # fmt: skip
    v = pools.v8fp8 if variant.pv == "fp8" else pools.v8
    caches = (pools.k8, pools.k_scale, v, pools.v_scale)
    args = (pools.q, pools.balance, *caches)
    if variant.kind == "v1":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        splits, span = v1_plan_splits(batch, KV_HEADS, width, sms)
        ws1 = V1Workspace(
            torch.empty(batch, Q_HEADS, splits, HEAD_DIM, device=device),
            torch.empty(batch, Q_HEADS, splits, 2, device=device), span,
        )  # fmt: skip
        return [lambda t=table: v1_decode(*args, t, pools.q_rows, pools.kv_len, out, ws1)
                for table in pools.tables], splits  # fmt: skip
    splits, _ = sd.plan_splits(batch, KV_HEADS, width, device,
                               programs_per_sm=variant.programs_per_sm)  # fmt: skip
    ws = sd.DecodeWorkspace.allocate(batch, Q_HEADS, KV_HEADS, HEAD_DIM, width, device, splits)
    config = variant.config or DecodeConfig()
    return [lambda t=table: sd.sage_decode_paged(*args, t, pools.q_rows, pools.kv_len, out, ws,
                                                 config=config)
            for table in pools.tables], splits  # fmt: skip


def _plan16(table: torch.Tensor, pools: Pools, splits: int) -> p16.DecodePlan:
    """The 16-bit plan of one set (what plan_decode builds, from device tables directly)."""
    batch, device = table.shape[0], table.device
    work = (batch, Q_HEADS, splits)
    return p16.DecodePlan(
        page_table=table.contiguous(), q_row=pools.q_rows, kv_len=pools.kv_len,
        acc=torch.empty(*work, HEAD_DIM, device=device),
        ml=torch.empty(*work, 2, device=device), page_size=PAGE,
    )  # fmt: skip


# ---------------------------------------------------------------- one shape


def check_outputs(outs: dict[str, torch.Tensor], variants: list[Variant]) -> dict[str, dict]:
    """Finite outputs; each 8-bit variant close to v1 of its precision."""
    checks: dict[str, dict] = {}
    for v in variants:
        got = outs[v.name].float()
        entry: dict[str, Any] = {"finite": bool(torch.isfinite(got).all())}
        base = "v1" if v.pv == "fp16" else "v1_fp8"
        if v.kind != "triton16" and v.name != base and base in outs:
            ref = outs[base].float()
            cosine = torch.nn.functional.cosine_similarity(got.flatten(), ref.flatten(), dim=0)
            err = ((got - ref).abs().max() / ref.abs().max()).item()
            close = cosine.item() >= 0.999
            if v.pv == "fp16":
                close = cosine.item() >= 0.99999 and err <= 5e-3
            entry |= {"vs": base, "cosine": cosine.item(), "max_err": err, "close": close}
        checks[v.name] = entry
    return checks


def bench_shape(batch: int, context: int, variants: list[Variant], timer, cap: int,
                seed: int) -> list[dict[str, Any]]:  # fmt: skip
    """Every variant at one (batch, context): a row each ("ok", "skipped" or "error")."""
    sets = rotation_sets(batch, context, timer.device)
    base = {"batch": batch, "context": context, "page_size": PAGE, "sets": sets}
    rows = {v.name: base | {"variant": v.name} for v in variants}
    reason = _skip_reason(pool_bytes(batch, context, sets, variants), cap, timer.device)
    if reason:
        return [row | {"status": "skipped", "reason": reason} for row in rows.values()]
    pools = make_pools(batch, context, sets, variants, timer.device, seed)
    outs, entries = {}, {}
    for v in variants:
        try:
            entries[v.name], outs[v.name], fields = _prepare(v, pools, timer)
            rows[v.name] |= fields
        except Exception as err:  # recorded in the row; the other variants go on
            rows[v.name] |= {"status": "error", "error": f"{type(err).__name__}: {err}"[:2000]}
    if "v2" in outs:  # v2 must repeat bit for bit (the fused merge's fixed split order)
        again = torch.full_like(pools.q, float("nan"))
        calls_for(Variant("v2", "v2"), pools, again)[0][0]()
        timer.sync()
        rows["v2"]["repeats_bitwise"] = torch.equal(again, outs["v2"])
    checks = check_outputs(outs, [v for v in variants if v.name in outs])
    errors = timer.round_robin(entries)
    kv_bytes = {v.name: batch * context * BYTES_PER_TOKEN[_cache_kind(v)] for v in variants}
    for name, timed in entries.items():
        if name in errors:
            rows[name] |= {"status": "error", "error": errors[name]}
            continue
        us = timed.median_ms * 1e3
        rows[name] |= {"status": "ok", "us": us, "gb_per_s": kv_bytes[name] / us / 1e3,
                       "kv_bytes_read": kv_bytes[name], "check": checks[name],
                       "samples_us": [x * 1e3 for x in timed.samples_ms]}  # fmt: skip
    del pools, outs, entries
    torch.cuda.empty_cache()
    return list(rows.values())


def _cache_kind(variant: Variant) -> str:
    return "16bit" if variant.kind == "triton16" else "8bit"


def _skip_reason(need: int, cap: int, device: torch.device) -> str | None:
    free = torch.cuda.mem_get_info(device)[0]
    if need <= cap and need <= 0.8 * free:
        return None
    gib = 2**30
    return f"needs {need / gib:.1f} GiB of cache (cap {cap / gib:g}, free {free / gib:.1f})"


def _prepare(variant: Variant, pools: Pools, timer):
    """Calls, first (checked) output, warm-up, and a CUDA graph of them.

    Returns (Timed of the graph's replay, the first call's output, row fields).
    """
    from sageserve.bench.kernels_timing import Timed, capture_graph

    out = torch.full_like(pools.q, float("nan"))
    calls, splits = calls_for(variant, pools, out)
    calls[0]()  # compiles; its output is the one checked
    timer.sync()
    first = out.clone()
    for call in calls[1:]:
        call()
    n = max(len(calls), GRAPH_CALLS)
    graph = capture_graph([calls[i % len(calls)] for i in range(n)], timer.device)
    timed = Timed(graph.replay, per_call=n)
    timer.plan(timed)
    return timed, first, {"splits": splits, "calls_per_graph": n}


def finish_rows(rows: list[dict[str, Any]], copy_gb_per_s: float) -> None:
    """Fraction of the copy bandwidth; speedups over triton16 and over v1."""
    by_key = {(r["batch"], r["context"], r["variant"]): r for r in rows if r.get("status") == "ok"}
    for row in by_key.values():
        row["copy_fraction"] = row["gb_per_s"] / copy_gb_per_s
        for base in ("triton16", "v1"):
            other = by_key.get((row["batch"], row["context"], base))
            if other is not None and row["variant"] != base:
                row[f"speedup_vs_{base}"] = other["us"] / row["us"]


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The targets: v2 >= 1.8x triton16 at context >= 8k, and >= 75% of copy bandwidth."""
    long = [r for r in rows if r.get("status") == "ok" and r["variant"] == "v2"
            and r["context"] >= 8192]  # fmt: skip
    if not long:
        return {}
    return {
        "v2_min_speedup_vs_triton16_ctx_ge_8k": min(r.get("speedup_vs_triton16", 0) for r in long),
        "v2_min_copy_fraction_ctx_ge_8k": min(r["copy_fraction"] for r in long),
        "v2_min_copy_fraction_ctx_ge_8k_batch_ge_16": min(
            (r["copy_fraction"] for r in long if r["batch"] >= 16), default=None
        ),
    }


def markdown(rows: list[dict[str, Any]], variants: list[Variant]) -> str:
    """µs / % of copy per variant and shape, and v2's speedup over triton16."""
    names = [v.name for v in variants]
    lines = ["| batch × ctx | " + " | ".join(names) + " | v2 vs triton16 |",
             "|---" * (len(names) + 2) + "|"]  # fmt: skip
    shapes = sorted({(r["batch"], r["context"]) for r in rows})
    by_key = {(r["batch"], r["context"], r["variant"]): r for r in rows}
    for b, c in shapes:
        cells = []
        for name in names:
            r = by_key.get((b, c, name), {})
            cells.append(f"{r['us']:.1f} µs {100 * r['copy_fraction']:.0f}%"
                         if r.get("status") == "ok" else r.get("status", "-"))  # fmt: skip
        sp = by_key.get((b, c, "v2"), {}).get("speedup_vs_triton16")
        ctx = f"{c // 1024}k" if c % 1024 == 0 else str(c)
        lines.append(f"| {b} × {ctx} | " + " | ".join(cells)
                     + f" | {f'{sp:.2f}×' if sp else '-'} |")  # fmt: skip
    return "\n".join(lines)


# ---------------------------------------------------------------- run


def environment(device: torch.device) -> dict[str, Any]:
    props = torch.cuda.get_device_properties(device)
    return {
        "card": {"name": props.name, "capability": f"{props.major}.{props.minor}",
                 "sm_count": props.multi_processor_count, "memory_bytes": props.total_memory,
                 "l2_bytes": getattr(props, "L2_cache_size", None)},
        "software": {"python": platform.python_version(), "torch": torch.__version__,
                     "triton": triton.__version__, "cuda": torch.version.cuda},
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": "PYTHONPATH=. python " + shlex.join(sys.argv),
    }  # fmt: skip


def run(args: argparse.Namespace) -> int:
    from sageserve.bench.kernels_timing import Timer, copy_bandwidth

    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device (or --ptx, which compiles without one)")
    started, device = time.monotonic(), torch.device("cuda")
    variants = [v for v in VARIANTS if not args.variants or v.name in args.variants]
    timer = Timer(device, args.warmup, args.repeats, args.sample_ms)
    result: dict[str, Any] = environment(device) | {
        "shape": {"q_heads": Q_HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM, "page": PAGE},
        "variants": {v.name: asdict(v) | {"config": asdict(v.config) if v.config else None}
                     for v in variants},
        "method": __doc__, "rows": [], "complete": False,
    }  # fmt: skip
    result["copy_bandwidth"] = copy_bandwidth(timer, COPY_BYTES)
    copy_gbs = result["copy_bandwidth"]["gb_per_s"]
    print(f"copy bandwidth {copy_gbs:.0f} GB/s", flush=True)
    for batch in args.batches:
        for context in args.contexts:
            if time.monotonic() - started > args.time_limit_s:
                result["stopped_early"] = f"time limit {args.time_limit_s} s"
                break
            rows = bench_shape(batch, context, variants, timer, int(args.mem_cap_gib * 2**30),
                               args.seed + batch * 100003 + context)  # fmt: skip
            finish_rows(rows, copy_gbs)
            result["rows"] += rows
            print(_progress(batch, context, rows), flush=True)
            _write(result, args.out)
    result["summary"] = summary(result["rows"])
    result["markdown"] = markdown(result["rows"], variants)
    result["complete"], result["wall_s"] = True, time.monotonic() - started
    _write(result, args.out)
    print(result["markdown"], "\n", json.dumps(result["summary"], indent=1), sep="")
    bad = [r for r in result["rows"] if _problem(r)]
    print(f"wrote {args.out} in {result['wall_s']:.0f} s; problems: {len(bad)}")
    return 1 if bad else 0


def _problem(row: dict[str, Any]) -> bool:
    """An error, an output far from v1's, or a v2 output that did not repeat bit for bit."""
    not_close = not row.get("check", {}).get("close", True)
    return row.get("status") == "error" or not_close or row.get("repeats_bitwise") is False


def _progress(batch: int, context: int, rows: list[dict[str, Any]]) -> str:
    parts = []
    for r in rows:
        if r.get("status") == "ok":
            close = r["check"].get("close")
            flag = "" if close in (None, True) else " NOT CLOSE"
            parts.append(f"{r['variant']} {r['us']:.1f}us {100 * r['copy_fraction']:.0f}%{flag}")
        else:
            parts.append(f"{r['variant']} {r.get('status')}: {r.get('error', r.get('reason'))}")
    return f"{batch} x {context}: " + "; ".join(parts)


def _write(result: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1, default=str))
    tmp.replace(out)


# ---------------------------------------------------------------- --ptx (no GPU)


def _ast_source(fn, args: dict[str, Any]):
    """args: name -> "*i8"-style pointer (16-byte aligned, as the launcher marks it), ("i32",
    value) (divisible by 16 when the value is), "fp32", or a constexpr value."""
    from triton.compiler import ASTSource

    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        value = args[name]
        if isinstance(value, str) and value.startswith("*"):
            signature[name], attrs[(i,)] = value, [["tt.divisibility", 16]]
        elif isinstance(value, tuple):
            signature[name] = value[0]
            if value[1] % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif value == "fp32":
            signature[name] = "fp32"
        else:
            signature[name], constexprs[name] = "constexpr", value
    return ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)


def _ptx_args(variant: Variant) -> tuple[Any, dict[str, Any], int, int]:
    """(kernel, arguments, warps, stages) of a variant's split kernel at the bench's shape."""
    fp8 = variant.pv == "fp8"
    group = Q_HEADS // KV_HEADS
    pointers = {
        "q_ptr": "*bf16", "balance_ptr": "*fp32", "k_cache_ptr": "*i8", "k_scale_ptr": "*fp16",
        "v_cache_ptr": "*fp8e4nv" if fp8 else "*i8", "v_scale_ptr": "*fp16",
        "page_table_ptr": "*i32", "q_row_ptr": "*i32", "kv_len_ptr": "*i32",
        "part_acc_ptr": "*fp32", "part_ml_ptr": "*fp32",
    }  # fmt: skip
    common = {
        **pointers, "stride_qt": ("i32", Q_HEADS * HEAD_DIM), "stride_qh": ("i32", HEAD_DIM),
        "stride_table": ("i32", 1), "num_splits": ("i32", 1), "sm_scale": "fp32",
        "num_kv_heads": KV_HEADS, "group": group, "page_size": PAGE, "head_dim": HEAD_DIM,
        "BLOCK_H": 16, "HAS_BALANCE": True, "PV_FP8": fp8, "FAST_CVT": True,
    }  # fmt: skip
    if variant.kind == "v1":
        args = {**common, "split_tokens": ("i32", 1), "BLOCK_N": 64, "KEY_RUN": PAGE}
        return _v1_split_kernel, args, 4, 3
    cfg = variant.config or DecodeConfig()
    sub = 64 if fp8 else min(cfg.sub_n, cfg.block_n)
    run = min(PAGE, sub)
    args = {
        **common, "counter_ptr": "*i32", "out_ptr": "*bf16",
        "stride_ot": ("i32", Q_HEADS * HEAD_DIM), "stride_oh": ("i32", HEAD_DIM),
        "BLOCK_N": cfg.block_n, "SUB_N": sub, "RUN": run, "WIDE": False,
        "PACKED": cfg.packed_scales and run % 2 == 0, "FUSED": cfg.fused_combine,
        "GROUP_P2": group, "MERGE_S": max(1, sd.MERGE_ELEMENTS // (group * HEAD_DIM)),
    }  # fmt: skip
    return sd._sage_decode_split_kernel, args, cfg.num_warps, cfg.num_stages


def _bin(name: str) -> str:
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def _ptxas(ptx: str) -> str:
    """ptxas -v: registers, spills, and any wgmma serialization warning."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.ptx"
        path.write_text(ptx)
        res = subprocess.run([_bin("ptxas"), "-arch=sm_90a", "-v", str(path), "-o", os.devnull],
                             capture_output=True, text=True, check=True)  # fmt: skip
    lines = [ln.split("info    : ")[-1] for ln in res.stderr.splitlines()]
    keep = ("Used", "spill", "Performance Loss")
    return " | ".join(ln for ln in lines if any(k in ln for k in keep))


def _loop_sass(cubin: bytes) -> list[int]:
    """Instruction counts of the kernel's loops (backward branches) in SASS, largest first."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([_bin("nvdisasm"), "-c", f.name], capture_output=True, text=True,
                              check=True).stdout  # fmt: skip
    labels, loops, pending = {}, [], None
    for line in text.splitlines():
        label = re.match(r"\s*\.(L_x_\d+):", line)
        if label:
            pending = label.group(1)
            continue
        addr = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
        if not addr:
            continue
        at = int(addr.group(1), 16)
        if pending:
            labels[pending], pending = at, None
        target = re.search(r"BRA\s.*?\.(L_x_\d+)", addr.group(2))
        if target and labels.get(target.group(1), at + 1) < at:
            loops.append((at - labels[target.group(1)]) // 16 + 1)
    return sorted(loops, reverse=True)


def ptx_report(variants: list[Variant]) -> int:
    """Compile each 8-bit variant's split kernel for sm_90 (no GPU) and summarize it."""
    from triton.backends.compiler import GPUTarget

    target = GPUTarget("cuda", 90, 32)
    for v in variants:
        if v.kind == "triton16":
            continue
        fn, args, warps, stages = _ptx_args(v)
        kernel = triton.compile(_ast_source(fn, args), target=target,
                                options={"num_warps": warps, "num_stages": stages})  # fmt: skip
        ptx = kernel.asm["ptx"]
        copies = Counter(re.findall(r"cp\.async\.c[ag]\.shared\.global \[[^\]]*\], \[[^\]]*\], "
                                    r"(0x\w+)", ptx))  # fmt: skip
        sync_small = len(re.findall(r"ld\.global(?:\.\w+)*\.(?:b8|b16|u8|u16)\b", ptx))
        waits = re.findall(r"cp\.async\.wait_group\s+(\d+)", ptx)
        loops = _loop_sass(kernel.asm["cubin"])
        print(f"{v.name}: cp.async bytes x count {dict(sorted(copies.items()))}, "
              f"1-2 byte ld.global {sync_small}, wait_group {waits}, "
              f"shared {kernel.metadata.shared} B, loops (SASS instructions) {loops}")  # fmt: skip
        print(f"    {_ptxas(ptx)}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("decode_bench.json"))
    parser.add_argument("--ptx", action="store_true", help="compile for sm_90 only (no GPU)")
    parser.add_argument("--variants", type=lambda s: s.split(","), default=None,
                        help=f"subset of {','.join(v.name for v in VARIANTS)}")  # fmt: skip
    parser.add_argument("--batches", type=_ints, default=BATCHES)
    parser.add_argument("--contexts", type=_ints, default=CONTEXTS)
    parser.add_argument("--mem-cap-gib", type=float, default=40.0)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sample-ms", type=float, default=10.0)
    parser.add_argument("--time-limit-s", type=float, default=TIME_LIMIT_S)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("unset TRITON_INTERPRET: this compiles the kernels for the GPU")
    if args.ptx:
        return ptx_report([v for v in VARIANTS if not args.variants or v.name in args.variants])
    for context in args.contexts:
        if context % 128:
            raise SystemExit(f"contexts must be multiples of 128, got {context}")
    return run(args)


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(","))


if __name__ == "__main__":
    sys.exit(main())
