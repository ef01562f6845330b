"""The 8-bit paged attention kernel against the reference backend on the same cache."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl
from tiny_models import tiny_llama_config

from sageserve.attention.base import BackendOptions
from sageserve.attention.batch import SequenceSlice, build_forward_batch
from sageserve.attention.page_tables import padded_page_table
from sageserve.attention.sage_attn.backend import SageAttentionBackend
from sageserve.attention.sage_attn.kernels.prefill import (
    PrefillConfig,
    _int8_to_fp16,
    sage_attention_paged,
)
from sageserve.attention.sage_attn.options import SageOptions
from sageserve.models.config import ModelConfig

# (prefix_len, query_len): fresh prefills, a chunk after a cached prefix, decodes.
STEP = [(0, 1), (0, 7), (0, 200), (120, 80), (332, 1), (16, 17), (0, 33)]


def _config(heads: int, kv_heads: int, dim: int) -> ModelConfig:
    return tiny_llama_config(heads, kv_heads, dim, vocab_size=64, intermediate_size=64,
                             num_layers=1, max_position_embeddings=4096)  # fmt: skip


def _step_tensors(slices, page_size, device):
    """page table [B, pages] int32, q_start, q_len, kv_len [B] int32, max_q_len."""
    kv_lens = [s.kv_len for s in slices]
    table = padded_page_table([s.page_table for s in slices], kv_lens, page_size, device)
    starts, start = [], 0
    for s in slices:
        starts.append(start)
        start += s.query_len

    def i32(values):
        return torch.tensor(values, dtype=torch.int32, device=device)

    return (table, i32(starts), i32([s.query_len for s in slices]), i32(kv_lens),
            max(s.query_len for s in slices))  # fmt: skip


def _close(out: torch.Tensor, ref: torch.Tensor) -> None:
    out, ref = out.double().cpu(), ref.double().cpu()
    assert torch.isfinite(out).all()
    cosine = torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0).item()
    err = (out - ref).abs().max().item() / ref.abs().max().item()
    # The kernel's online softmax rounds P (to fp16 / fp8) against a running maximum, the
    # reference against the final one: rounding-level differences only.
    assert cosine >= 0.99999 and err <= 5e-3, (cosine, err)


def run_case(heads, kv_heads, dim, page_size, pv, device, launch, seed=0, q_levels=1):
    gen = torch.Generator().manual_seed(seed)
    config = _config(heads, kv_heads, dim)
    options = BackendOptions("auto", torch.float32, device, SageOptions(pv=pv, q_levels=q_levels))
    backend = SageAttentionBackend(config.attention_shape(), options)
    balance = torch.rand(1, kv_heads, dim, generator=gen) + 0.5
    backend.set_calibration(torch.randn(1, kv_heads, dim, generator=gen), balance)
    num_pages = sum(-(-(p + n) // page_size) for p, n in STEP) + 1
    cache = backend.allocate(num_pages, page_size)
    order = (torch.randperm(num_pages - 1, generator=gen) + 1).tolist()
    slices = []
    for p, n in STEP:
        count = -(-(p + n) // page_size)
        slices.append(SequenceSlice(tuple(order[:count]), p, n))
        order = order[count:]
    # Fill each sequence's cached prefix, then run the mixed step through the reference.
    prefixes = [SequenceSlice(s.page_table, 0, s.prefix_len) for s in slices if s.prefix_len]
    bias = 3 * torch.randn(1, kv_heads, dim, generator=gen)
    for step in (prefixes, slices):
        tokens = sum(s.query_len for s in step)
        batch = build_forward_batch(step, [[1] * s.query_len for s in step], [], page_size,
                                    device)  # fmt: skip
        meta = backend.build_metadata(batch)
        q = torch.randn(tokens, heads, dim, generator=gen).to(device)
        k = (torch.randn(tokens, kv_heads, dim, generator=gen) + bias).to(device)
        v = torch.randn(tokens, kv_heads, dim, generator=gen).to(device)
        ref = backend.forward(0, q, k, v, cache, meta)
    out = torch.full_like(q, float("nan"))  # every row must be written
    c = backend.layer_constants(0)  # the queries rotated in the kernel, as served
    sage_attention_paged(
        q, c.balance, cache.k[0], cache.k_scale[0], cache.v[0], cache.v_scale[0],
        *_step_tensors(slices, page_size, device), sm_scale=c.sm_scale, config=launch,
        out=out, rotation=backend.rotation, q_levels=q_levels,
    )  # fmt: skip
    return out, ref


# Small tiles on CPU (the interpreter is slow), with and without the split causal loop.
CPU_CONFIGS = [
    PrefillConfig(32, 32, 4, 2, split_mask=True),
    PrefillConfig(32, 16, 4, 2, split_mask=False),
    PrefillConfig(32, 32, 4, 1, split_mask=True, prefetch=True),
]
# The default and the variants it was timed against (lab/KERNEL_NOTES.md, "sage_attention v3").
GPU_CONFIGS = [
    PrefillConfig(),  # the default
    PrefillConfig(fast_v_cvt=False),
    PrefillConfig(64, 32, 4, 3),
    PrefillConfig(128, 64, 8, 3, maxnreg=None),
    PrefillConfig(128, 64, 8, 1, prefetch=True, maxnreg=None),
    PrefillConfig(128, 128, 8, 2, maxnreg=None),
]


@pytest.mark.parametrize("config", CPU_CONFIGS, ids=str)
@pytest.mark.parametrize(("heads", "kv_heads", "dim", "page_size"),
                         [(4, 2, 64, 16), (2, 1, 128, 7), (3, 3, 32, 1)])  # fmt: skip
def test_fp16_pv_kernel_matches_reference(heads, kv_heads, dim, page_size, config) -> None:
    out, ref = run_case(heads, kv_heads, dim, page_size, "fp16", torch.device("cpu"), config)
    _close(out, ref)


# Pages that hold whole key blocks: the tensor-descriptor (TMA) loads.
@pytest.mark.parametrize("config", CPU_CONFIGS[:2], ids=str)
@pytest.mark.parametrize(("heads", "kv_heads", "dim", "page_size"),
                         [(4, 2, 64, 32), (2, 1, 32, 64)])  # fmt: skip
def test_tma_kernel_matches_reference(heads, kv_heads, dim, page_size, config) -> None:
    assert config.uses_tma(page_size)
    out, ref = run_case(heads, kv_heads, dim, page_size, "fp16", torch.device("cpu"), config)
    _close(out, ref)


def test_bad_block_n_raises() -> None:
    with pytest.raises(ValueError, match="block_n"):
        run_case(2, 1, 32, 16, "fp16", torch.device("cpu"), PrefillConfig(32, 48, 4, 2))


@pytest.mark.gpu
@pytest.mark.parametrize("pv", ["fp16", "fp8"])
@pytest.mark.parametrize(("heads", "kv_heads", "dim", "page_size"),
                         [(9, 3, 64, 16), (8, 2, 128, 1), (4, 2, 128, 7), (8, 2, 128, 64),
                          (9, 3, 64, 128)])  # fmt: skip
def test_kernel_matches_reference_on_gpu(heads, kv_heads, dim, page_size, pv) -> None:
    out, ref = run_case(heads, kv_heads, dim, page_size, pv, torch.device("cuda"),
                        PrefillConfig())  # fmt: skip
    _close(out, ref)


@pytest.mark.gpu
@pytest.mark.parametrize("pv", ["fp16", "fp8"])
@pytest.mark.parametrize("config", GPU_CONFIGS, ids=str)
@pytest.mark.parametrize("page_size", [16, 128])
def test_configs_match_reference_on_gpu(config, pv, page_size) -> None:
    if pv == "fp8" and config.block_n != 64:
        pytest.skip("FP8 P·V needs block_n 64")
    out, ref = run_case(32, 8, 128, page_size, pv, torch.device("cuda"), config)
    _close(out, ref)


@triton.jit
def _convert_kernel(src_ptr, dst_ptr, N: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(dst_ptr + offs, _int8_to_fp16(tl.load(src_ptr + offs)))


@pytest.mark.gpu
def test_int8_to_fp16_is_exact_for_every_code() -> None:
    codes = torch.arange(-128, 128, dtype=torch.int8, device="cuda").repeat(4)
    codes = codes[torch.randperm(codes.numel(), device="cuda")]  # every byte position
    out = torch.empty(codes.shape, dtype=torch.float16, device="cuda")
    _convert_kernel[(1,)](codes, out, N=codes.numel())
    assert torch.equal(out, codes.half())
