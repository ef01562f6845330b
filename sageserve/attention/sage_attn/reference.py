"""The 8-bit attention numerics of `sage_attn`, in plain torch: the oracle for the kernels.

Quantization (every scale is per token and per head, the finest granularity that keeps a
token's cache entry independent of every other token, so a prefix-cache hit stores and
reads exactly the bytes a miss would):

- Q: INT8, scale = max|q| / 127 in fp32 (not stored). With q_levels=2, a second level of
  INT8 codes carries the first level's rounding residual on a step of 1/128 of the scale:
  c2 = round((q / s - c1) * 128), |c2| <= 64, so q ~ s (c1 + c2 / 128) with 7 more bits.
  The product stays exact in integers: 128 (c1 . k) + c2 . k, |.| < 2^28 at head_dim 128,
  rounded once to fp32 (as the kernels' INT32 -> fp32 conversion does).
- K: smoothed first (k - mean), then INT8 with scale = max|k| / 127 rounded to fp16
  (stored as fp16 beside the INT8 values).
- Channel balance (optional, SmoothQuant-style): before quantizing, Q is multiplied and the
  smoothed K divided by a fixed per-(layer, KV head) channel vector c, which leaves Q·Kᵀ
  unchanged but moves outlier channels' range from Q (whose channels are spikier) to K.
  The mean and c are calibrated once per model (`calibration.py`).
- V: with `pv="fp16"` (the default), INT8 like K (no smoothing); with `pv="fp8"`, FP8 e4m3
  with scale = max|v| / 448 rounded to fp16. The FP8 tensor-core product needs FP8 V, but
  e4m3's 3 mantissa bits cost about 2% relative error on V alone, against 0.6% for INT8
  (random data, see BENCHMARKS.md), so the accurate mode keeps INT8 V.

Rounding to INT8 is half away from zero after a true division by the scale, clamped to
[-127, 127]; kernels reproduce it exactly. Q·Kᵀ is exact (INT8 products summed in int32,
here as an fp32 matmul of integer values, exact for head_dim <= 1024), then scaled.

P·V: the softmax uses the row maximum over all keys (a kernel's online softmax reaches
the same values up to rounding). With `pv="fp16"`, each column of P is multiplied by its
key's V scale and rounded to fp16, then multiplied by the INT8 V codes (exact in fp16).
With `pv="fp8"`, keys are taken in blocks of PV_BLOCK (aligned to absolute key
positions); within a block the V scales are folded into P relative to the block's largest
V scale, and 448·P·(s_v / s_max) is rounded to FP8 e4m3, so that P uses FP8's whole range
and no V scale needs to be shared by different tokens. Products are summed in fp64 here
(fp32 in the kernels), which makes each output row independent of what else is computed.
"""

from __future__ import annotations

import torch

from sageserve.attention.sage_attn.kernels import PV_BLOCK

INT8_MAX = 127.0
# The second Q level's step is 2^-Q_LEVEL_SHIFT of the first level's scale.
Q_LEVEL_SHIFT = 7
Q_LEVELS_CHOICES = (1, 2)
FP8_MAX = 448.0
FP8_DTYPE = torch.float8_e4m3fn
# Smallest scale kept: fp16's smallest subnormal, so a stored scale is never 0.
MIN_SCALE = 2.0**-24
PV_CHOICES = ("fp8", "fp16")


def round_half_away(x: torch.Tensor) -> torch.Tensor:
    """Round to the nearest integer, halves away from zero (what `trunc(x ± 0.5)` gives)."""
    return torch.trunc(x + torch.where(x >= 0, 0.5, -0.5))


def _scales(x: torch.Tensor, max_code: float, scale_dtype: torch.dtype) -> torch.Tensor:
    """[..., D] -> [...] fp32 scales, representable in scale_dtype and never 0."""
    amax = x.float().abs().amax(dim=-1)
    return (amax / max_code).clamp_min(MIN_SCALE).to(scale_dtype).float()


def quantize_int8(
    x: torch.Tensor, scale_dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token, per-head INT8. x: [T, H, D] -> (int8 [T, H, D], fp32 scales [T, H])."""
    scale = _scales(x, INT8_MAX, scale_dtype)
    codes = round_half_away(x.float() / scale[..., None]).clamp(-INT8_MAX, INT8_MAX)
    return codes.to(torch.int8), scale


def quantize_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token, per-head FP8 e4m3. x: [T, H, D] -> (fp8 [T, H, D], fp32 scales [T, H]).

    Scales are fp16-representable (they are stored as fp16).
    """
    scale = _scales(x, FP8_MAX, torch.float16)
    codes = (x.float() / scale[..., None]).clamp(-FP8_MAX, FP8_MAX)
    return codes.to(FP8_DTYPE), scale


def quantize_q_two_levels(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q in two INT8 levels (module doc). x: [T, H, D] -> (first codes int8 [T, H, D],
    second codes int8 [T, H, D], fp32 scales [T, H]); x ~ scale (c1 + c2 / 2^7)."""
    scale = _scales(x, INT8_MAX, torch.float32)
    y = x.float() / scale[..., None]
    first = round_half_away(y).clamp(-INT8_MAX, INT8_MAX)
    second = round_half_away((y - first) * 2.0**Q_LEVEL_SHIFT).clamp(-INT8_MAX, INT8_MAX)
    return first.to(torch.int8), second.to(torch.int8), scale


def dequantize(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """codes [T, H, D] (int8 or fp8), scale [T, H] -> fp32 [T, H, D]."""
    return codes.float() * scale[..., None]


def _expand_heads(x: torch.Tensor, group: int) -> torch.Tensor:
    """[kv, Hkv, ...] -> [kv, Hkv * group, ...] (each KV head serves `group` query heads)."""
    return x.repeat_interleave(group, dim=1)


def balance_q(q: torch.Tensor, channel_scale: torch.Tensor | None) -> torch.Tensor:
    """q [n, Hq, D] * c [Hkv, D] (each KV head's vector serves its query heads) -> fp32."""
    if channel_scale is None:
        return q.float()
    group = q.shape[1] // channel_scale.shape[0]
    return q.float() * channel_scale.repeat_interleave(group, dim=0)


def quantized_scores(
    q: torch.Tensor,
    k_codes: torch.Tensor,
    k_scale: torch.Tensor,
    sm_scale: float,
    channel_scale: torch.Tensor | None = None,
    q_levels: int = 1,
) -> torch.Tensor:
    """S = (Q_int8 · K_int8ᵀ) · s_q · s_k · sm_scale, Q balanced by channel_scale first and
    quantized in q_levels INT8 levels (module doc).

    q: [n, Hq, D] float; k_codes: [kv, Hkv, D] int8; k_scale: [kv, Hkv];
    channel_scale: [Hkv, D] or None. Returns [Hq, n, kv].
    """
    _check_q_levels(q_levels)
    group = q.shape[1] // k_codes.shape[1]
    q = balance_q(q, channel_scale)
    k_codes, k_scale = _expand_heads(k_codes, group), _expand_heads(k_scale, group)
    if q_levels == 1:
        q_codes, q_scale = quantize_int8(q)
        dots = torch.einsum("qhd,khd->hqk", q_codes.float(), k_codes.float())
    else:
        first, second, q_scale = quantize_q_two_levels(q)
        codes = first.double() * 2.0**Q_LEVEL_SHIFT + second.double()
        # Exact in fp64, then one rounding to fp32, as the kernels' INT32 sum converts.
        dots = torch.einsum("qhd,khd->hqk", codes, k_codes.double()).float()
        q_scale = q_scale * 2.0**-Q_LEVEL_SHIFT
    return dots * (q_scale.T[:, :, None] * sm_scale) * k_scale.T[:, None, :]


def _check_q_levels(q_levels: int) -> None:
    if q_levels not in Q_LEVELS_CHOICES:
        raise ValueError(f"q_levels={q_levels!r} is not valid; choose one of: 1, 2")


def causal_mask(n: int, kv_len: int, device: torch.device) -> torch.Tensor:
    """[n, kv_len] bool, True where query i (at position kv_len - n + i) may see key j."""
    q_pos = torch.arange(kv_len - n, kv_len, device=device)
    return torch.arange(kv_len, device=device)[None, :] <= q_pos[:, None]


def _pv_fp16(p: torch.Tensor, v_codes: torch.Tensor, v_scale: torch.Tensor) -> torch.Tensor:
    """p: [H, n, kv]; v: [kv, H, D] INT8 codes -> [H, n, D] fp64 (P·s_v rounded to fp16)."""
    p_scaled = (p * v_scale.T[:, None, :]).half().double()
    return torch.einsum("hqk,khd->hqd", p_scaled, v_codes.double())


def fold_v_scales(
    p: torch.Tensor, v_codes: torch.Tensor, v_scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """P and V in blocks of PV_BLOCK keys (aligned to key 0, zero-padded), each key's V scale
    folded into P relative to its block's largest (module doc).

    p: [H, n, kv]; v_codes: [kv, H, D]; v_scale: [kv, H]. Returns (P · s_v / block max
    [H, n, blocks, PV_BLOCK] in p's dtype, V codes [blocks, PV_BLOCK, H, D] fp32, the
    blocks' largest V scales [blocks, H]).
    """
    heads, n, kv = p.shape
    blocks = -(-kv // PV_BLOCK)
    pad = blocks * PV_BLOCK - kv
    p = torch.nn.functional.pad(p, (0, pad)).view(heads, n, blocks, PV_BLOCK)
    v_scale = torch.nn.functional.pad(v_scale, (0, 0, 0, pad)).view(blocks, PV_BLOCK, heads)
    v_codes = torch.nn.functional.pad(v_codes.float(), (0, 0, 0, 0, 0, pad))
    v_codes = v_codes.view(blocks, PV_BLOCK, heads, -1)
    block_max = v_scale.amax(dim=1)  # [blocks, H]
    ratio = (v_scale / block_max[:, None, :]).permute(2, 0, 1)  # [H, blocks, PV_BLOCK]
    return p * ratio[:, None], v_codes, block_max


def _pv_fp8(p: torch.Tensor, v_codes: torch.Tensor, v_scale: torch.Tensor) -> torch.Tensor:
    """p: [H, n, kv]; v: [kv, H, D] -> [H, n, D] fp64, P in FP8 per block (module doc)."""
    folded, v_blocks, block_max = fold_v_scales(p, v_codes, v_scale)
    p_codes = (folded * FP8_MAX).to(FP8_DTYPE)
    partial = torch.einsum("hnbk,bkhd->hnbd", p_codes.double(), v_blocks.double())
    weight = (block_max.T.double() / FP8_MAX)[:, None, :, None]  # [H, 1, blocks, 1]
    return (partial * weight).sum(dim=2)


def sage_attention(
    q: torch.Tensor,
    k_codes: torch.Tensor,
    k_scale: torch.Tensor,
    v_codes: torch.Tensor,
    v_scale: torch.Tensor,
    pv: str = "fp16",
    sm_scale: float | None = None,
    channel_scale: torch.Tensor | None = None,
    q_levels: int = 1,
) -> torch.Tensor:
    """8-bit attention of one sequence's query chunk over all its keys.

    q: [n, Hq, D] float (the last n of the kv_len positions; causal mask bottom-right).
    k_codes: [kv_len, Hkv, D] int8 (smoothed keys); k_scale: [kv_len, Hkv] fp32.
    v_codes: [kv_len, Hkv, D] int8 (pv="fp16") or fp8 e4m3 (pv="fp8"); v_scale: [kv_len, Hkv].
    channel_scale: [Hkv, D], the balance the keys were stored with (None: none).
    q_levels: Q in one INT8 level or two (module doc).
    Returns [n, Hq, D] fp32.
    """
    if pv not in PV_CHOICES:
        raise ValueError(f"pv={pv!r} is not valid; choose one of: {', '.join(PV_CHOICES)}")
    n, kv_len = q.shape[0], k_codes.shape[0]
    sm_scale = q.shape[-1] ** -0.5 if sm_scale is None else sm_scale
    scores = quantized_scores(q, k_codes, k_scale, sm_scale, channel_scale, q_levels)
    scores = scores.masked_fill(~causal_mask(n, kv_len, q.device), float("-inf"))
    p = torch.exp(scores - scores.amax(dim=-1, keepdim=True))  # [H, n, kv], fp32
    denom = p.sum(dim=-1, keepdim=True).double()
    group = q.shape[1] // k_codes.shape[1]
    v_codes, v_scale = _expand_heads(v_codes, group), _expand_heads(v_scale, group)
    pv_fn = _pv_fp8 if pv == "fp8" else _pv_fp16
    out = pv_fn(p, v_codes, v_scale) / denom
    return out.transpose(0, 1).float()


def quantize_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_mean: torch.Tensor | None,
    pv: str,
    channel_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """What the 8-bit cache stores for new tokens.

    k, v: [T, Hkv, D]; k_mean, channel_scale: [Hkv, D] or None (no smoothing / balance);
    the stored key is (k - k_mean) / channel_scale.
    Returns (k int8 [T, Hkv, D], k scale [T, Hkv], v codes [T, Hkv, D], v scale [T, Hkv]);
    v codes are INT8 for pv="fp16" and FP8 e4m3 for pv="fp8".
    """
    k = k.float() if k_mean is None else k.float() - k_mean
    if channel_scale is not None:
        k = k / channel_scale
    k_codes, k_scale = quantize_int8(k, torch.float16)
    v_codes, v_scale = quantize_fp8(v) if pv == "fp8" else quantize_int8(v, torch.float16)
    return k_codes, k_scale, v_codes, v_scale
