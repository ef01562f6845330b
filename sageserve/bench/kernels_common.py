"""Pieces shared by the prefill, decode and store parts of `sageserve bench kernels`.

Our kernels are reached through the attention backends (`SageAttentionBackend`,
`TritonBackend`) built for a one-layer model of the benchmark's shape: their caches come
from `allocate`, their plans and page tables from `build_metadata` (outside the timed
region, as a serving step builds them once for every layer).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from sageserve.attention.base import AttentionBackend, AttentionShape, BackendOptions
from sageserve.attention.batch import ForwardBatch, SequenceSlice, build_forward_batch
from sageserve.attention.sage_attn.options import SageOptions

# Our kernels' variants: backend name, sage P·V precision, how sage rotates Q and K
# (`--sage-rotation-kernel`, or "off") and `--sage-impl`. The plain `sage_*` variants are
# the Triton kernels with the default rotation kernel (`auto`: the prefill's queries rotated
# by a pass at head_dim >= 128, in the kernel below); on sm_90 the server's default prefill
# is the `_gluon` variants' kernel (`--sage-impl auto`). The `_norot` variants price the
# Hadamard rotation against the same kernels without it; the `_bfly` ones rotate by the
# fp32 butterfly inside every kernel; the `_tcrot` ones by a tensor-core product; the
# `_prerot` ones rotate and quantize the prefill's queries in one pass before its kernel at
# every head_dim; the `_gluon` ones run the prefill through the warp-specialized Hopper
# kernel (sm_90; Q rotated by one wgmma there; `_gluon_norot` prices that rotation).
OUR_VARIANTS: dict[str, tuple[str, str | None, str, str]] = {
    "sage_fp16pv": ("sage_attn", "fp16", "auto", "triton"),
    "sage_fp8pv": ("sage_attn", "fp8", "auto", "triton"),
    "sage_fp16pv_bfly": ("sage_attn", "fp16", "butterfly", "triton"),
    "sage_fp8pv_bfly": ("sage_attn", "fp8", "butterfly", "triton"),
    "sage_fp16pv_norot": ("sage_attn", "fp16", "off", "triton"),
    "sage_fp8pv_norot": ("sage_attn", "fp8", "off", "triton"),
    "sage_fp16pv_tcrot": ("sage_attn", "fp16", "tensor_core", "triton"),
    "sage_fp8pv_tcrot": ("sage_attn", "fp8", "tensor_core", "triton"),
    "sage_fp16pv_prerot": ("sage_attn", "fp16", "prepass", "triton"),
    "sage_fp8pv_prerot": ("sage_attn", "fp8", "prepass", "triton"),
    "sage_fp16pv_gluon": ("sage_attn", "fp16", "butterfly", "gluon"),
    "sage_fp8pv_gluon": ("sage_attn", "fp8", "butterfly", "gluon"),
    "sage_fp16pv_gluon_norot": ("sage_attn", "fp16", "off", "gluon"),
    "sage_fp8pv_gluon_norot": ("sage_attn", "fp8", "off", "gluon"),
    "triton16": ("triton", None, "off", "triton"),
}
# Model positions of the benchmark's model (Llama-3.1-8B): caps the triton16 decode splits
# as in a server whose pool holds more tokens than that.
MAX_POSITIONS = 131072
# The fp64 reference attends over query rows in chunks of about this many score bytes.
REFERENCE_CHUNK_BYTES = 1 << 30
# Sanity bar for every variant (8-bit variants included) against the fp64 reference.
MIN_COSINE = 0.99


@dataclass(frozen=True, kw_only=True)
class MeasuredShape:
    """What every measured shape names besides its sizes: page size, input dtype, seed."""

    page_size: int
    dtype: torch.dtype
    seed: int


def model_config(q_heads: int, kv_heads: int, head_dim: int) -> AttentionShape:
    """A one-layer model: the backends' only inputs about the model."""
    return AttentionShape(
        num_layers=1, num_q_heads=q_heads, num_kv_heads=kv_heads, head_dim=head_dim,
        max_position_embeddings=MAX_POSITIONS, vocab_size=128,
    )  # fmt: skip


def make_backend(
    variant: str, cfg: AttentionShape, dtype: torch.dtype, device: torch.device
) -> AttentionBackend:
    """The backend serving `variant` (the Triton kernels forced on for sage, any device)."""
    from sageserve.attention.registry import get_backend_class

    name = OUR_VARIANTS[variant][0]
    return get_backend_class(name)(cfg, BackendOptions("auto", dtype, device, _flags(variant)))


def backend_reasons(
    variant: str, cfg: AttentionShape, dtype: torch.dtype, device: torch.device
) -> list[str]:
    """Why the backend of `variant` cannot run this shape and dtype here (empty: it can)."""
    from sageserve.attention.registry import get_backend_class

    options = BackendOptions("auto", dtype, device, _flags(variant))
    return get_backend_class(OUR_VARIANTS[variant][0]).unsupported_reasons(cfg, options)


def _flags(variant: str) -> SageOptions | None:
    """The sage options of `variant` (the kernels forced on); None for triton16."""
    _, pv, rotation, impl = OUR_VARIANTS[variant]
    if pv is None:
        return None
    if rotation == "off":
        return SageOptions(pv=pv, impl=impl, rotate_qk=False)
    return SageOptions(pv=pv, impl=impl, rotation_kernel=rotation)


def calibrate(backend: AttentionBackend, q: torch.Tensor, k: torch.Tensor) -> None:
    """Set the sage backend's key mean and Q/K channel balance from these tokens (of the
    rotated q and k when its rotation is on), the way sageserve calibrates on 512 tokens
    (`attention/calibration.py`); other backends: no-op.

    q: [T, Hq, D]; k: [T, Hkv, D] (the first tokens of the benchmark's data).
    """
    if not hasattr(backend, "set_calibration"):
        return
    from sageserve.attention.sage_attn.calibration import QKCalibration
    from sageserve.attention.sage_attn.rotation import hadamard_rotate

    if backend.sage.rotate_qk:  # statistics of what the quantizers see
        q, k = hadamard_rotate(q), hadamard_rotate(k)
    k32, kv_heads = k.float(), k.shape[1]
    k_mean = k32.double().mean(dim=0).float()
    grouped = q.float().abs().view(q.shape[0], kv_heads, -1, q.shape[-1])
    stats = QKCalibration(
        k_mean=k_mean[None],
        k_absmax=(k32 - k_mean).abs().amax(dim=0)[None],
        k_absmax_raw=k32.abs().amax(dim=0)[None],
        q_absmax=grouped.amax(dim=(0, 2))[None],
    )
    balance = stats.channel_scale(smoothed=True) if backend.sage.balance_qk else None
    backend.set_calibration(stats.k_mean, balance)


def shuffled_tables(
    count: int, kv_len: int, page_size: int, gen: torch.Generator
) -> tuple[list[tuple[int, ...]], int]:
    """`count` page tables of kv_len tokens over a shuffled pool; (tables, pool pages)."""
    per_seq = math.ceil(kv_len / page_size)
    num_pages = count * per_seq + 1  # page 0 is the null page
    order = (torch.randperm(num_pages - 1, generator=gen) + 1).view(count, per_seq)
    return [tuple(row) for row in order.tolist()], num_pages


def forward_batch(
    tables: list[tuple[int, ...]],
    prefix_len: int,
    query_len: int,
    page_size: int,
    device: torch.device,
) -> ForwardBatch:
    """A step of len(tables) sequences, each query_len new tokens after prefix_len cached."""
    slices = [SequenceSlice(table, prefix_len, query_len) for table in tables]
    ids = [[0] * query_len for _ in tables]
    return build_forward_batch(slices, ids, [], page_size, device)


def reference_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool
) -> torch.Tensor:
    """Exact attention in fp64: q [Nq, Hq, D], k, v [Nk, Hkv, D] -> [Nq, Hq, D].

    Causal aligned bottom-right (query i sees keys 0 .. Nk - Nq + i). Query rows run in
    chunks so that the scores stay near REFERENCE_CHUNK_BYTES; K/V are not expanded
    over the GQA group (the group's query heads share a batched product instead).
    """
    n_q, q_heads, dim = q.shape
    n_k, kv_heads = k.shape[0], k.shape[1]
    group = q_heads // kv_heads
    qg = q.double().view(n_q, kv_heads, group, dim).permute(1, 2, 0, 3)  # [Hkv, G, Nq, D]
    kh = k.double().permute(1, 2, 0)  # [Hkv, D, Nk]
    vh = v.double().permute(1, 0, 2)  # [Hkv, Nk, D]
    out = torch.empty_like(qg)
    rows = max(1, REFERENCE_CHUNK_BYTES // (q_heads * n_k * 8))
    keys = torch.arange(n_k, device=q.device)
    for r0 in range(0, n_q, rows):
        r1 = min(n_q, r0 + rows)
        s = torch.matmul(qg[:, :, r0:r1].reshape(kv_heads, -1, dim), kh) * dim**-0.5
        s = s.view(kv_heads, group, r1 - r0, n_k)
        if causal:
            last = torch.arange(r0, r1, device=q.device) + (n_k - n_q)  # last key each row sees
            s = s.masked_fill(keys[None, :] > last[:, None], float("-inf"))
        p = torch.softmax(s, dim=-1).view(kv_heads, -1, n_k)
        out[:, :, r0:r1] = torch.matmul(p, vh).view(kv_heads, group, r1 - r0, dim)
    return out.permute(2, 0, 1, 3).reshape(n_q, q_heads, dim)


def accuracy(got: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """Cosine similarity, relative L1 (sum|o - ref| / sum|ref|) and max error / max|ref|."""
    o, r = got.double().flatten(), ref.double().flatten()
    diff = (o - r).abs()
    return {
        "cosine": torch.nn.functional.cosine_similarity(o, r, dim=0).item(),
        "rel_l1": (diff.sum() / r.abs().sum()).item(),
        "max_err_rel": (diff.max() / r.abs().max()).item(),
    }


def keys_with_bias(
    shape: tuple[int, ...], bias: torch.Tensor, gen: torch.Generator, device: torch.device
) -> torch.Tensor:
    """Normal fp32 values plus a per-(head, channel) bias shared by every token, as real
    keys carry (the reason for K smoothing). shape: [T, H, D]; bias: [H, D]."""
    return torch.randn(shape, generator=gen, device=device) + bias


def shape_seed(base: int, *parts: int) -> int:
    """A fresh, reproducible seed per shape."""
    seed = base
    for part in parts:
        seed = (seed * 1_000_003 + part) % (2**62)
    return seed
