"""GPU mode of the varlen kernel (`--varlen`): varlen batches with cached prefixes and
gap rows, checked against the Triton kernel and fp32, then timed; the JSON result."""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import torch
import triton

from lab.gluon_prefill_probe import HEAD_DIM, KEYS, _accuracy
from lab.gluon_ws.config import DEFAULT_STAGES, TILE
from lab.gluon_ws.equal import gluon_ws_prefill
from lab.gluon_ws.gpu import WS_VARIANTS, _time
from sageserve.attention.sage_attn.kernels.gluon.config import (
    block_keys_refusal,
    resolve_lazy_rescale,
)
from sageserve.attention.sage_attn.kernels.gluon.plan import work_plan
from sageserve.attention.sage_attn.kernels.gluon.prefill import sage_attention_ws

# ----------------------------------------------------------------------------- GPU mode: varlen


@dataclass(frozen=True)
class WsOptions:
    """A varlen variant's launch options, named as `sage_attention_ws` takes them: the
    persistent grid, keys per block, Q quantized beforehand by `quantize_q`, Q rotated by
    mma.sync over the ±1 matrix made in registers, the lazy accumulator rescale (None: as
    served, `default_lazy_rescale`)."""

    persistent: bool = True
    block_keys: int = 64
    prequantize: bool = False
    rotate_in_registers: bool = False
    lazy_rescale: bool | None = None


VARLEN_VARIANTS = {
    "gluon_ws_varlen": WsOptions(persistent=False),
    "gluon_ws_varlen_persistent": WsOptions(),
    "gluon_ws_varlen_persistent_k128": WsOptions(block_keys=128),
    "gluon_ws_varlen_persistent_pre": WsOptions(prequantize=True),
    "gluon_ws_varlen_persistent_k128_pre": WsOptions(block_keys=128, prequantize=True),
    "gluon_ws_varlen_persistent_hreg": WsOptions(rotate_in_registers=True),
    "gluon_ws_varlen_persistent_k128_hreg": WsOptions(block_keys=128, rotate_in_registers=True),
    "gluon_ws_varlen_persistent_lazy": WsOptions(lazy_rescale=True),
    "gluon_ws_varlen_persistent_eager": WsOptions(lazy_rescale=False),
    "gluon_ws_varlen_persistent_k128_lazy": WsOptions(block_keys=128, lazy_rescale=True),
}
ORACLE = "triton_sage"  # the served Triton kernel, with the same numerics


@dataclass(frozen=True)
class Numerics:
    """What the cache and kernels compute: P·V in "fp8" (FP8 V) or "fp16" (INT8 V), the head
    dim, and the Hadamard rotation of Q and K (the Triton oracle then rotates Q with its
    tensor-core product, the closest to the Gluon kernel's)."""

    pv: str = "fp8"
    head_dim: int = HEAD_DIM
    rotate: bool = False

    @property
    def label(self) -> str:
        return f"{self.pv}-d{self.head_dim}" + ("-rot" if self.rotate else "")

    def sm_scale(self) -> float:
        return self.head_dim**-0.5 / (self.head_dim if self.rotate else 1)

    def rotation(self):
        from sageserve.attention.sage_attn.kernels.rotate import HadamardKernel

        return HadamardKernel.TENSOR_CORE if self.rotate else HadamardKernel.OFF


CHECK_Q_LENS, CHECK_PREFIXES = (1, 7, 200, 333, 128, 1000), (0, 64, 100, 511, 3000)
VARLEN_HEADS, VARLEN_KV_HEADS = 32, 8  # GQA, as the served models
CUDNN_NOTE = (
    "cuDNN SDPA cannot take the cached prefix (bottom-right mask over paged keys): on a batch "
    "with prefixes it attends each sequence's new tokens only (q = k = v = the chunk, top-left "
    "causal), less work; on the 16k prompt (no prefix) it is exact"
)


@dataclass
class VarlenBatch:
    """A varlen batch. q: [T, Hq, D] bf16, sequence i at rows q_starts[i] .. + q_lens[i]
    (gap rows between them belong to none); k, v: [sum kv_lens, Hkv, D] bf16, sequence i's
    keys at kv_starts[i] .., its prefix first; caches: the 8-bit cache (INT8 K, FP8 V, page
    64, shuffled pages); table: [B, width] int32 padded; q_start, q_len, kv_len: [B] int32."""

    q_lens: list[int]
    kv_lens: list[int]
    q_starts: list[int]
    kv_starts: list[int]
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    caches: tuple
    table: torch.Tensor
    q_start: torch.Tensor
    q_len: torch.Tensor
    kv_len: torch.Tensor

    def covered(self) -> torch.Tensor:
        """[T] bool: the rows of q that belong to a sequence."""
        mask = torch.zeros(self.q.shape[0], dtype=torch.bool, device=self.q.device)
        for start, n in zip(self.q_starts, self.q_lens, strict=True):
            mask[start : start + n] = True
        return mask


def _varlen_batch(q_lens: list[int], prefixes: list[int], gen: torch.Generator,
                  gaps: bool, numerics: Numerics) -> VarlenBatch:  # fmt: skip
    """Random inputs (k with a per-(head, channel) bias), stored through `store_kv` (keys
    rotated there when numerics.rotate, V as FP8 or INT8 codes)."""
    from sageserve.attention.page_tables import int32_on_device, padded_page_table
    from sageserve.attention.sage_attn.kernels.store import store_kv
    from sageserve.attention.sage_attn.reference import FP8_DTYPE
    from sageserve.attention.sage_attn.rotation import hadamard_rotate

    dev, hq, hkv, dim = torch.device("cuda"), VARLEN_HEADS, VARLEN_KV_HEADS, numerics.head_dim
    kv_lens = [q + p for q, p in zip(q_lens, prefixes, strict=True)]
    q_starts, row = [], 0
    for n in q_lens:
        row += int(torch.randint(0, 4, (1,), generator=gen)) if gaps else 0
        q_starts.append(row)
        row += n
    tokens = row + (3 if gaps else 0)
    kv_starts = [sum(kv_lens[:i]) for i in range(len(kv_lens))]
    q = torch.randn(tokens, hq, dim, generator=gen).to(dev).bfloat16()
    bias = 2 * torch.randn(1, hkv, dim, generator=gen)
    k = (torch.randn(sum(kv_lens), hkv, dim, generator=gen) + bias).to(dev).bfloat16()
    v = torch.randn(sum(kv_lens), hkv, dim, generator=gen).to(dev).bfloat16()
    per_seq = [-(-kv // KEYS) for kv in kv_lens]
    order = (torch.randperm(sum(per_seq), generator=gen) + 1).tolist()  # page 0: the null page
    tables, pages, offsets = [], [], []
    for i, kv in enumerate(kv_lens):
        table = order[sum(per_seq[:i]) : sum(per_seq[: i + 1])]
        tables.append(tuple(table))
        pos = torch.arange(kv)
        pages.append(torch.tensor(table)[pos // KEYS])
        offsets.append(pos % KEYS)
    num_pages = sum(per_seq) + 1
    v_dtype = FP8_DTYPE if numerics.pv == "fp8" else torch.int8
    caches = (
        torch.zeros(num_pages, hkv, KEYS, dim, dtype=torch.int8, device=dev),
        torch.zeros(num_pages, hkv, KEYS, dtype=torch.float16, device=dev),
        torch.zeros(num_pages, hkv, dim, KEYS, dtype=v_dtype, device=dev),
        torch.zeros(num_pages, hkv, KEYS, dtype=torch.float16, device=dev),
    )
    k_mean = (hadamard_rotate(k) if numerics.rotate else k.float()).mean(0)
    store_kv(k, v, k_mean, None, torch.cat(pages).to(dev), torch.cat(offsets).to(dev), *caches,
             rotation=numerics.rotation())  # fmt: skip
    table = padded_page_table(tables, kv_lens, KEYS, dev)
    q_start, q_len, kv_len = int32_on_device([q_starts, q_lens, kv_lens], dev)
    return VarlenBatch(list(q_lens), kv_lens, q_starts, kv_starts, q, k, v, caches, table,
                       q_start, q_len, kv_len)  # fmt: skip


def _exact_varlen(b: VarlenBatch, causal: bool) -> torch.Tensor:
    """fp32 attention of every sequence (bottom-right causal mask): [T, Hq, D], NaN on the
    rows outside the sequences."""
    group = VARLEN_HEADS // VARLEN_KV_HEADS
    out = torch.full(b.q.shape, float("nan"), dtype=torch.float32, device=b.q.device)
    for qs, n, ks, kv in zip(b.q_starts, b.q_lens, b.kv_starts, b.kv_lens, strict=True):
        q = b.q[qs : qs + n].float().transpose(0, 1)
        k, v = (t[ks : ks + kv].float().repeat_interleave(group, 1).transpose(0, 1)
                for t in (b.k, b.v))  # fmt: skip
        mask = None
        if causal:
            rows = torch.arange(n, device=q.device)[:, None] + (kv - n)
            mask = torch.arange(kv, device=q.device)[None, :] <= rows
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out[qs : qs + n] = o.transpose(0, 1)
    return out


def _varlen_flops(q_lens: list[int], kv_lens: list[int], causal: bool, head_dim: int) -> float:
    """4 Hq D x the (row, key) pairs attended (causal: row r of a chunk sees prefix + r + 1)."""
    pairs = sum(n * (kv - n) + n * (n + 1) // 2 if causal else n * kv
                for n, kv in zip(q_lens, kv_lens, strict=True))  # fmt: skip
    return 4.0 * VARLEN_HEADS * head_dim * pairs


def _cudnn_runner(b: VarlenBatch, causal: bool) -> Callable:
    """cuDNN SDPA over each sequence's new tokens only (equal q_lens; K, V expanded to the
    query heads before timing): the prefix is left out (CUDNN_NOTE)."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    n, group = b.q_lens[0], VARLEN_HEADS // VARLEN_KV_HEADS
    q = torch.stack([b.q[s : s + n] for s in b.q_starts]).transpose(1, 2)
    spans = [(ks + kv - n, ks + kv) for ks, kv in zip(b.kv_starts, b.kv_lens, strict=True)]
    k, v = (
        torch.stack([t[lo:hi] for lo, hi in spans]).repeat_interleave(group, 2).transpose(1, 2)
        for t in (b.k, b.v)
    )

    def cudnn(out):
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            o = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        out.copy_(o.transpose(1, 2).reshape(out.shape))

    return cudnn


def _varlen_runners(b: VarlenBatch, causal: bool, stages: int, variants: list[str],
                    timing: bool, numerics: Numerics) -> dict[str, Callable]:  # fmt: skip
    """name -> fn(out): the varlen variants, the Triton kernel (the oracle); when timing,
    cuDNN (equal q_lens) and, on equal-length batches without prefix (multiples of 128),
    the equal-length kernel of this probe (both grids; FP8, D 128, no rotation only)."""
    from sageserve.attention.sage_attn.kernels import prefill as p8

    plan = torch.from_numpy(work_plan(b.q_lens, b.kv_lens, VARLEN_HEADS, causal)).to(b.q.device)

    def ws(options: WsOptions) -> Callable:
        def run_ws(out):
            sage_attention_ws(b.q, *b.caches, b.table, b.q_start, b.q_len, b.kv_len, plan, out,
                              numerics.sm_scale(), causal=causal, rotate=numerics.rotate,
                              stages=stages, **asdict(options))  # fmt: skip

        return run_ws

    def triton_sage(out):
        p8.sage_attention_paged(b.q, None, *b.caches, b.table, b.q_start, b.q_len, b.kv_len,
                                max(b.q_lens), sm_scale=numerics.sm_scale(), out=out,
                                causal=causal, rotation=numerics.rotation())  # fmt: skip

    runners = {name: ws(VARLEN_VARIANTS[name]) for name in variants}
    runners[ORACLE] = triton_sage
    if not timing:
        return runners
    n = b.q_lens[0]
    if all(q == n for q in b.q_lens):
        runners["sdpa_cudnn"] = _cudnn_runner(b, causal)
    if (
        numerics == Numerics()
        and all(q == n == kv for q, kv in zip(b.q_lens, b.kv_lens, strict=True))
        and n % TILE == 0
        and b.q.shape[0] == n * len(b.q_lens)
    ):
        for name, persistent in WS_VARIANTS.items():
            runners[name] = functools.partial(_equal_length, b, n, causal, stages, persistent)
    return runners


def _equal_length(b: VarlenBatch, seq: int, causal: bool, stages: int, persistent: bool,
                  out: torch.Tensor) -> None:  # fmt: skip
    """The equal-length kernel on a batch it covers (no prefix, equal multiples of 128)."""
    gluon_ws_prefill(b.q, *b.caches, b.table, seq, out, causal=causal,
                     stages=stages or DEFAULT_STAGES,
                     persistent=persistent)  # fmt: skip


def _max_abs(out: torch.Tensor, ref: torch.Tensor) -> float:
    return (out.double() - ref.double()).abs().max().item()


def _poisoned_varlen(fn: Callable, b: VarlenBatch, covered: torch.Tensor) -> torch.Tensor:
    """Run fn into a NaN-poisoned output: every row of a sequence written finite, every
    other row still NaN. Returns the covered rows [rows, Hq, D]."""
    out = torch.full_like(b.q, float("nan"))
    fn(out)
    torch.cuda.synchronize()
    mine = out[covered]
    if not bool(torch.isfinite(mine).all()):
        bad = (~torch.isfinite(mine)).nonzero()[:4].tolist()
        raise AssertionError(f"non-finite output, first at [covered row, head, dim] {bad}")
    if not bool(out[~covered].isnan().all()):
        raise AssertionError("rows outside every sequence were written")
    return mine


def _check_varlen(label: str, b: VarlenBatch, causal: bool, stages: int, variants: list[str],
                  exact: bool, numerics: Numerics) -> list[dict]:  # fmt: skip
    """Check the varlen variants against the Triton kernel (cosine >= 0.9999) and fp32
    attention, on poisoned outputs."""
    covered = b.covered()
    runners = _varlen_runners(b, causal, stages, variants, timing=False, numerics=numerics)
    outs = {name: _poisoned_varlen(fn, b, covered) for name, fn in runners.items()}
    ref = _exact_varlen(b, causal)[covered] if exact else None
    oracle = outs[ORACLE]
    rows = []
    for name, out in outs.items():
        vs_oracle = _accuracy(out, oracle) | {"max_abs": _max_abs(out, oracle)}
        row = {"check": label, "numerics": numerics.label, "causal": causal, "variant": name,
               "sequences": len(b.q_lens), "rows": int(covered.sum()),
               "vs_triton_sage": vs_oracle}  # fmt: skip
        if ref is not None:
            row["vs_fp32"] = _accuracy(out, ref) | {"max_abs": _max_abs(out, ref)}
        rows.append(row)
        print(json.dumps(row), flush=True)
        cos = row["vs_triton_sage"]["cosine"]
        if name in variants and cos < min_cosine(name, numerics):
            raise AssertionError(f"{name} disagrees with the Triton kernel ({label}, causal "
                                 f"{causal}, {numerics.label}): "
                                 f"{row['vs_triton_sage']}")  # fmt: skip
    if exact:
        _check_own_rounding(rows, variants, numerics)
    return rows


def min_cosine(name: str, numerics: Numerics) -> float:
    """The cosine a variant must reach against the Triton kernel. With FP8 P·V and 128-key
    blocks, P's e4m3 scale is the largest V scale of 128 keys, the Triton kernel's of 64:
    other roundings of P (cosine ~0.9996 between them, each ~0.9993 from fp32), so that
    variant is held to the Triton kernel's error against fp32 instead
    (`_check_own_rounding`)."""
    return 0.999 if numerics.pv == "fp8" and VARLEN_VARIANTS[name].block_keys == 128 else 0.9999


def _check_own_rounding(rows: list[dict], variants: list[str], numerics: Numerics) -> None:
    """Every variant within 2% (relative L1) and 1e-4 (cosine) of the Triton kernel's error
    against fp32."""
    oracle = next(r["vs_fp32"] for r in rows if r["variant"] == ORACLE)
    for row in rows:
        mine = row["vs_fp32"]
        worse = mine["rel_l1"] > 1.02 * oracle["rel_l1"] or mine["cosine"] < oracle["cosine"] - 1e-4
        if row["variant"] in variants and worse:
            raise AssertionError(f"{row['variant']} is further from fp32 than the Triton "
                                 f"kernel ({numerics.label}): {mine} against {oracle}")  # fmt: skip


def _time_varlen(label: str, b: VarlenBatch, causal: bool, stages: int, variants: list[str],
                 rounds: int, numerics: Numerics) -> list[dict]:  # fmt: skip
    """Check (poisoned outputs, vs the Triton kernel), then time alternated with the Triton
    kernel, cuDNN and, where it applies, the equal-length kernel."""
    covered = b.covered()
    runners = _varlen_runners(b, causal, stages, variants, timing=True, numerics=numerics)
    outs = {name: _poisoned_varlen(fn, b, covered) for name, fn in runners.items()}
    ms = _time(runners, b.q, rounds)
    flops = _varlen_flops(b.q_lens, b.kv_lens, causal, b.q.shape[2])
    cudnn_flops = _varlen_flops(b.q_lens, b.q_lens, causal, b.q.shape[2])  # the chunks only
    rows = []
    for name in runners:
        work = cudnn_flops if name == "sdpa_cudnn" else flops
        row = {"timing": label, "numerics": numerics.label, "causal": causal, "variant": name,
               "ms": ms[name], "tops": work / ms[name] / 1e9, "flops": work,
               "vs_triton_sage": _accuracy(outs[name], outs[ORACLE])}  # fmt: skip
        if name == "sdpa_cudnn":
            row["cudnn_prefix"] = "exact" if b.kv_lens == b.q_lens else "left out (CUDNN_NOTE)"
        rows.append(row)
        print(json.dumps(row), flush=True)
    for row in rows:
        name = row["variant"]
        if name in variants and row["vs_triton_sage"]["cosine"] < min_cosine(name, numerics):
            raise AssertionError(f"{name} disagrees with the Triton kernel: {row}")
    return rows


def run_varlen(rounds: int, stages: int, variants: list[str], masks: list[bool],
               timings: list[str], numerics: Numerics) -> list[dict]:  # fmt: skip
    """The varlen checks (every q_len x prefix of CHECK_*, shuffled, and a random batch;
    gaps between sequences), then the timed batches: "serving" (16 sequences of 1024 new
    tokens over 0..4096-token prefixes) and "prompt16k" (one 16k prompt)."""
    gen = torch.Generator().manual_seed(0)
    pairs = [(q, p) for q in CHECK_Q_LENS for p in CHECK_PREFIXES]
    pairs = [pairs[i] for i in torch.randperm(len(pairs), generator=gen).tolist()]
    randoms = [(int(torch.randint(1, 1500, (1,), generator=gen)),
                int(torch.randint(0, 4000, (1,), generator=gen))) for _ in range(12)]  # fmt: skip
    checks = {"grid": pairs, "random": randoms}
    rows = []
    for label, chosen in checks.items():
        b = _varlen_batch([q for q, _ in chosen], [p for _, p in chosen], gen, True, numerics)
        for causal in masks:
            rows += _check_varlen(label, b, causal, stages, variants, True, numerics)
        del b
    shapes = {
        "serving": ([1024] * 16, torch.randint(0, 4097, (16,), generator=gen).tolist()),
        "prompt16k": ([16384], [0]),
    }
    for label in timings:
        q_lens, prefixes = shapes[label]
        b = _varlen_batch(q_lens, prefixes, gen, False, numerics)
        for causal in masks:
            rows += _time_varlen(label, b, causal, stages, variants, rounds, numerics)
        del b
        torch.cuda.empty_cache()
    return rows


def variant_fields(name: str) -> dict:
    """A varlen variant's launch options, for the JSON result."""
    return asdict(VARLEN_VARIANTS[name])


def refused(numerics: Numerics, variant: str) -> str | None:
    """Why the kernel refuses these numerics with this variant's options (None: it runs
    them)."""
    options = VARLEN_VARIANTS[variant]
    try:
        resolve_lazy_rescale(options.lazy_rescale, numerics.pv == "fp8", numerics.head_dim)
    except ValueError as refusal:
        return str(refusal)
    return block_keys_refusal(numerics.pv == "fp8", numerics.head_dim, options.block_keys,
                              options.prequantize)  # fmt: skip


def numerics_grid(args: argparse.Namespace) -> list[Numerics]:
    """Every combination of --pv, --head-dim and --rotate (comma lists)."""
    rotations = {"off": False, "on": True}
    return [
        Numerics(pv, int(dim), rotations[rot])
        for pv in args.pv.split(",")
        for dim in args.head_dim.split(",")
        for rot in args.rotate.split(",")
    ]


def _main_varlen(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """GPU: the varlen checks, then the timed batches, for every numerics of the grid; JSON
    to --out."""
    variants = (args.variants or ",".join(VARLEN_VARIANTS)).split(",")
    if unknown := set(variants) - set(VARLEN_VARIANTS):
        parser.error(f"unknown variants {sorted(unknown)}")
    masks = [{"none": False, "causal": True}[m] for m in args.masks.split(",")]
    timings = [] if args.timings == "none" else args.timings.split(",")
    rows = []
    for numerics in numerics_grid(args):
        fits = [v for v in variants if not refused(numerics, v)]
        rows += run_varlen(args.rounds, args.stages, fits, masks, timings, numerics)
    result = {
        "what": "Gluon 8-bit prefill, warp-specialized, varlen batches with cached prefixes "
        "(host plan of 128-row tiles, longest first; bottom-right causal mask; FP8 P·V or "
        "fp16 P·V over INT8 V widened in shared memory, D 128 or 64, Q and K rotated or not "
        "(`numerics` per row), page 64, 32 query / 8 KV heads), checked against the Triton "
        "kernel with the same numerics and fp32 on NaN-poisoned outputs with gap rows, then "
        "timed against the Triton kernel, cuDNN and (16k prompt, FP8 D 128 unrotated) the "
        "equal-length kernel; TOPS count the attended (row, key) pairs",
        "cudnn": CUDNN_NOTE,
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__, "triton": triton.__version__,
        "cuda": torch.version.cuda, "stages": args.stages, "maxnreg": args.maxnreg,
        "variants": {name: variant_fields(name) for name in variants},
        "numerics": [n.label for n in numerics_grid(args)],
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join([sys.executable, *sys.argv]),
        "rows": rows,
    }  # fmt: skip
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0
