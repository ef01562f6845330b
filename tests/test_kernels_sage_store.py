"""The 8-bit KV store kernel against `sage_reference.quantize_kv`, bit for bit.

Every test writes into a poisoned cache and compares the *whole* cache with the poison plus
the reference's codes at the tokens' slots, so a write to a wrong slot, a masked-off tail
token or a neighbouring head fails as surely as a wrong code.

Under the interpreter two of its operations do not match the GPU: `fma` rounds twice and
fp32 -> fp8 casts are wrong for ~13% of values (../shared/notes/triton-on-cpu.md). The
`gpu_semantics` fixture replaces both with exact emulations (a once-rounded FMA, torch's
saturating round-to-nearest-even e4m3 cast), so the FMA division and the FP8 path run
here too; without it the kernel's default under the interpreter is `div_rn` everywhere.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import triton

from sageserve.attention.sage_attn.kernels.store import StoreConfig, default_config, store_kv
from sageserve.attention.sage_attn.reference import quantize_kv
from sageserve.attention.triton_common import interpreting

LAYOUTS = ("prefill", "decode")


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def fma32(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """a * b + c for float32 arrays, rounded once to float32 (what the GPU's FFMA does).

    The product is exact in float64; TwoSum gives the float64 sum's error, which decides
    the one case where rounding the float64 sum to float32 is not the exact rounding: a
    float64 sum that lands exactly halfway between two float32 numbers.
    """
    a, b, c = (np.asarray(x, dtype=np.float32) for x in (a, b, c))
    p = a.astype(np.float64) * b.astype(np.float64)
    c64 = c.astype(np.float64)
    s = p + c64
    bb = s - p
    err = (p - (s - bb)) + (c64 - bb)
    r = s.astype(np.float32)
    r64 = r.astype(np.float64)
    with np.errstate(invalid="ignore"):
        neighbour = np.nextafter(r, np.where(s > r64, np.inf, -np.inf).astype(np.float32))
        halfway = (s != r64) & (s == (r64 + neighbour.astype(np.float64)) / 2) & (err != 0)
    up, down = np.maximum(r, neighbour), np.minimum(r, neighbour)
    return np.where(halfway, np.where(err > 0, up, down), r).astype(np.float32)


def markstein_divide(x: np.ndarray, d: np.ndarray) -> np.ndarray:
    """The kernel's FAST_DIV division: q = x·RN(1/d), then q + (x - q·d)·RN(1/d) by FMAs."""
    r = (np.float32(1) / d).astype(np.float32)
    q = (x * r).astype(np.float32)
    return fma32(fma32(q, -d, x), r, q)


@pytest.fixture
def gpu_semantics(monkeypatch: pytest.MonkeyPatch) -> None:
    """Interpreter with a once-rounded `fma` and exact fp32 -> e4m3 casts (module doc)."""
    if not interpreting():
        return
    from triton.runtime import interpreter

    def create_fma(self, x, y, z):
        return interpreter.TensorHandle(fma32(x.data, y.data, z.data), z.dtype.scalar)

    original_cast = interpreter.InterpreterBuilder.create_fp_to_fp

    def create_fp_to_fp(self, src, dst_type, rounding_mode):
        import triton.language as tl

        if dst_type.scalar != tl.float8e4nv or src.dtype.scalar != tl.float32:
            return original_cast(self, src, dst_type, rounding_mode)
        codes = torch.from_numpy(np.ascontiguousarray(src.data)).to(torch.float8_e4m3fn)
        return interpreter.TensorHandle(codes.view(torch.uint8).numpy(), dst_type.scalar)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_fma", create_fma)
    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_fp_to_fp", create_fp_to_fp)


def _slots(
    tokens: int, page_size: int, layout: str, gen: torch.Generator
) -> tuple[int, torch.Tensor]:
    """(number of pages, [T] slots = page * page_size + offset), page 0 never used.

    prefill: sequences of 1-150 consecutive tokens, each in its own shuffled pages, starting
    at a page boundary or mid-page (a cached prefix / earlier chunk). decode: distinct random
    slots, one token per sequence.
    """
    if layout == "decode":
        num_pages = -(-tokens // page_size) + 3
        picked = torch.randperm((num_pages - 1) * page_size, generator=gen)[:tokens]
        return num_pages, picked + page_size
    lengths, left = [], tokens
    while left:
        lengths.append(min(left, int(torch.randint(1, 151, (1,), generator=gen))))
        left -= lengths[-1]
    starts = [0 if i % 2 == 0 else int(torch.randint(0, page_size, (1,), generator=gen))
              for i in range(len(lengths))]  # fmt: skip
    pages_of = [-(-(s + n) // page_size) for s, n in zip(starts, lengths, strict=True)]
    num_pages = sum(pages_of) + 2
    order = torch.randperm(num_pages - 1, generator=gen) + 1
    slots, used = [], 0
    for start, n, count in zip(starts, lengths, pages_of, strict=True):
        logical = torch.arange(start, start + n)
        physical = order[used : used + count][logical // page_size]
        slots.append(physical * page_size + logical % page_size)
        used += count
    return num_pages, torch.cat(slots)


def _run(
    tokens: int,
    heads: int,
    dim: int,
    page_size: int,
    pv: str,
    smooth: bool,
    layout: str = "decode",
    config: StoreConfig | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    values: torch.Tensor | None = None,
) -> None:
    """Store fresh random K/V (strided views of a fused QKV, 2 query heads per KV head) into a
    poisoned cache; assert the whole cache equals poison + the reference at the slots.
    values: [T, Hkv, D], used for both K and V instead of random ones."""
    dev = _device()
    gen = torch.Generator().manual_seed(seed * 1000 + tokens * 7 + dim + page_size)
    q_heads = 2 * heads
    qkv = torch.randn(tokens, q_heads + 2 * heads, dim, generator=gen)
    qkv[:, q_heads : q_heads + heads] = qkv[:, q_heads : q_heads + heads] * 3 + 2
    if values is not None:
        qkv[:, q_heads:] = torch.cat([values, values], dim=1)
    qkv = qkv.to(dtype).to(dev)
    k, v = qkv[:, q_heads : q_heads + heads], qkv[:, q_heads + heads :]
    mean = torch.randn(heads, dim, generator=gen).to(dev) if smooth else None
    balance = (torch.rand(heads, dim, generator=gen) + 0.5).to(dev) if smooth else None
    num_pages, slots = _slots(tokens, page_size, layout, gen)
    pages, offsets = (slots // page_size).to(dev), (slots % page_size).to(dev)
    v_dtype = torch.float8_e4m3fn if pv == "fp8" else torch.int8
    k_cache = torch.randint(-128, 128, (num_pages, heads, page_size, dim), dtype=torch.int8,
                            generator=gen).to(dev)  # fmt: skip
    v_cache = torch.randint(-128, 128, (num_pages, heads, dim, page_size), dtype=torch.int8,
                            generator=gen).to(dev)  # fmt: skip
    v_cache = v_cache.view(v_dtype) if pv == "fp8" else v_cache
    k_scale = torch.full((num_pages, heads, page_size), float("nan"), dtype=torch.float16,
                         device=dev)  # fmt: skip
    v_scale = torch.full_like(k_scale, -7.0)
    expected = [t.clone() for t in (k_cache, k_scale, v_cache, v_scale)]
    k_codes, k_s, v_codes, v_s = quantize_kv(k, v, mean, pv, balance)
    expected[0][pages, :, offsets] = k_codes
    expected[1][pages, :, offsets] = k_s.half()
    expected[2][pages, :, :, offsets] = v_codes
    expected[3][pages, :, offsets] = v_s.half()

    store_kv(k, v, mean, balance, pages, offsets, k_cache, k_scale, v_cache, v_scale, config)

    names = ("k_cache", "k_scale", "v_cache", "v_scale")
    for name, got, want in zip(names, (k_cache, k_scale, v_cache, v_scale), expected, strict=True):
        got, want = got.cpu(), want.cpu()
        if got.dtype in (torch.int8, torch.float8_e4m3fn):
            got, want = got.view(torch.uint8), want.view(torch.uint8)
        else:
            got, want = got.view(torch.int16), want.view(torch.int16)  # NaN poison compares
        assert torch.equal(got, want), f"{name}: {(got != want).sum().item()} bytes differ"


@pytest.mark.parametrize("tokens", [1, 7, 200])
@pytest.mark.parametrize(("heads", "dim", "page_size"), [(2, 64, 16), (1, 128, 7), (3, 64, 1)])
@pytest.mark.parametrize("smooth", [True, False])
def test_store_int8_matches_reference_bitwise(tokens, heads, dim, page_size, smooth) -> None:
    _run(tokens, heads, dim, page_size, "fp16", smooth)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("tokens", [1, 7, 200, 333])
@pytest.mark.parametrize(("heads", "dim", "page_size"), [(2, 128, 64), (1, 64, 16), (2, 64, 7)])
def test_store_layouts_and_tails(layout, tokens, heads, dim, page_size) -> None:
    # prefill runs take the run path (page 16/64) beside the scattered one; 7 never runs.
    _run(tokens, heads, dim, page_size, "fp16", True, layout)


@pytest.mark.parametrize(
    "config",
    [
        StoreConfig(block_t=16, tiles_per_program=1),
        StoreConfig(block_t=16, tiles_per_program=3),
        StoreConfig(block_t=32, tiles_per_program=2),
        StoreConfig(block_t=64, tiles_per_program=1),
        StoreConfig(block_t=8, tiles_per_program=5),
        StoreConfig(block_t=1, tiles_per_program=7, num_warps=1),
        StoreConfig(block_t=4, tiles_per_program=2, num_warps=2),
    ],
    ids=lambda c: f"bt{c.block_t}x{c.tiles_per_program}",
)
@pytest.mark.parametrize("page_size", [16, 64])
def test_store_configs(config: StoreConfig, page_size: int) -> None:
    # Tiles larger than the page (32/64 on page 16) only scatter; the loop's last program
    # gets fewer tiles than the others (333 tokens).
    _run(333, 2, 64, page_size, "fp16", True, "prefill", config, seed=1)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(("tokens", "page_size"), [(1, 64), (7, 16), (200, 64), (333, 16)])
@pytest.mark.parametrize("pv", ["fp16", "fp8"])
def test_store_fast_division_and_fp8(gpu_semantics, layout, tokens, page_size, pv) -> None:
    # The GPU's default path (FMA division), under the interpreter through `gpu_semantics`.
    _run(tokens, 2, 128, page_size, pv, True, layout, StoreConfig(fast_div=True), seed=2)


def _rounding_boundaries(tokens: int, heads: int, dim: int, seed: int) -> np.ndarray:
    """[T, H, D] fp32 rows whose codes a division without the FMA correction gets wrong.

    Each row's element 0 is 127·s (so its scale is exactly the fp16 number s); the others
    lie within 2 ulps of (k + 0.5)·s, where x·RN(1/s) and RN(x/s) round to different codes
    for about 3% of elements.
    """
    rng = np.random.default_rng(seed)
    shape = (tokens, heads, 1)
    mantissa = rng.integers(1024, 2048, shape) / 1024
    s = np.ldexp(mantissa, rng.integers(-10, 5, shape)).astype(np.float32)
    x = ((rng.integers(-127, 127, (tokens, heads, dim)) + 0.5) * s).astype(np.float32)
    for _ in range(2):
        step = rng.integers(-1, 2, x.shape)
        toward = np.where(step > 0, np.inf, -np.inf).astype(np.float32)
        x = np.where(step != 0, np.nextafter(x, toward), x).astype(np.float32)
    x[..., 0] = 127 * s[..., 0]
    return x


def _codes(y: np.ndarray) -> np.ndarray:
    """The reference's INT8 rounding of fp32 quotients y."""
    return np.clip(np.trunc(y + np.where(y >= 0, 0.5, -0.5).astype(np.float32)), -127, 127)


@pytest.mark.parametrize("page_size", [16, 7])
def test_store_fast_division_on_rounding_boundaries(gpu_semantics, page_size: int) -> None:
    values = _rounding_boundaries(64, 2, 64, seed=page_size)
    scale = values[..., :1] / np.float32(127)
    naive = _codes((values * (np.float32(1) / scale)).astype(np.float32))
    assert (naive != _codes((values / scale).astype(np.float32))).sum() > 50  # sensitive
    _run(64, 2, 64, page_size, "fp16", False, "prefill", StoreConfig(fast_div=True),
         values=torch.from_numpy(values))  # fmt: skip


@pytest.mark.parametrize("fast_div", [True, False])
def test_store_bf16_inputs(gpu_semantics, fast_div: bool) -> None:
    if interpreting():
        pytest.skip("bf16 arithmetic is wrong in the interpreter (the kernel upcasts first)")
    _run(333, 2, 128, 64, "fp16", True, "prefill", StoreConfig(fast_div=fast_div),
         dtype=torch.bfloat16)  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 7, 333])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_store_fp8_matches_reference_bitwise(tokens: int, layout: str) -> None:
    _run(tokens, 2, 128, 16, "fp8", True, layout)


@pytest.mark.gpu
@pytest.mark.parametrize("page_size", [16, 64])
def test_store_large_prefill_matches_reference_bitwise(page_size: int) -> None:
    _run(4096, 8, 128, page_size, "fp16", True, "prefill", dtype=torch.bfloat16)
    _run(4096, 8, 128, page_size, "fp8", True, "prefill", dtype=torch.bfloat16)


def test_markstein_division_equals_ieee_division() -> None:
    """The FAST_DIV algorithm against numpy's IEEE division, with an exact FMA.

    Quotients by fp16 scales (all-ones mantissas included, x near half-integer multiples of
    the scale) must be equal everywhere; quotients by arbitrary fp32 divisors (the balance)
    may differ only where the residual underflows, |x| or |x/d| < 1e-30, which is below any
    value whose code or scale could change (a nonzero code needs |x/scale| >= 2^-25 with
    scale >= 2^-24).
    """
    rng = np.random.default_rng(0)
    n = 200_000
    amax = np.exp(rng.uniform(-30, 12, n)).astype(np.float32)
    scale = np.maximum(amax / np.float32(127), np.float32(2**-24)).astype(np.float16)
    scale = scale.astype(np.float32)
    ones = np.ldexp(np.float32(2047 / 1024), rng.integers(-24, 10, n)).astype(np.float16)
    ones = ones.astype(np.float32)
    half_integers = (rng.integers(-127, 128, n) + 0.5) * scale.astype(np.float64)
    cases = [
        ((rng.uniform(-1, 1, n) * amax).astype(np.float32), scale),
        (half_integers.astype(np.float32), scale),
        (np.nextafter(half_integers.astype(np.float32), np.float32(np.inf)), scale),
        ((rng.uniform(-127.5, 127.5, n) * ones).astype(np.float32), ones),
    ]
    for x, d in cases:
        np.testing.assert_array_equal(markstein_divide(x, d), (x / d).astype(np.float32))
    bits = rng.integers(0, 0x71000000, n).astype(np.uint32).view(np.float32)  # |x| < 6e29
    x = np.where(rng.random(n) < 0.5, -bits, bits).astype(np.float32)
    d = np.exp(rng.uniform(-3, 3, n)).astype(np.float32)
    got, want = markstein_divide(x, d), (x / d).astype(np.float32)
    differ = got != want
    assert differ.any(), "the arbitrary-divisor case should reach underflowing residuals"
    assert np.all(np.minimum(np.abs(want[differ]), np.abs(x[differ])) < 1e-30)


def test_default_config_runs_whole_pages() -> None:
    for page_size in (16, 32, 64, 128):
        assert page_size % default_config(page_size).block_t == 0
    assert default_config(7).block_t == 16


@pytest.mark.parametrize(
    ("rows", "sms", "min_block_t", "block_t"),
    [(64 * 8, 132, 1, 4), (8, 132, 1, 1), (64 * 8, 132, 16, 16), (300 * 8, 132, 1, 32),
     (32 * 132, 132, 1, 32), (32 * 132 - 1, 132, 1, 32), (4 * 132 + 1, 132, 1, 8)],
)  # fmt: skip
def test_default_config_spreads_small_launches(rows, sms, min_block_t, block_t) -> None:
    # Decode-sized launches: tiles just large enough to give every SM rows.
    config = default_config(64, rows, sms, min_block_t)
    assert config.block_t == block_t
    assert (config == default_config(64)) == (block_t == 32)  # full tiles: one config
    if block_t < 32:
        assert triton.cdiv(rows, block_t) <= sms or block_t == min_block_t


def test_no_tokens_is_a_no_op() -> None:
    k = torch.randn(0, 2, 64)
    cache = torch.zeros(2, 2, 16, 64, dtype=torch.int8)
    scales = torch.zeros(2, 2, 16, dtype=torch.float16)
    empty = torch.zeros(0, dtype=torch.int64)
    store_kv(k, k, None, None, empty, empty, cache, scales,
             cache.transpose(2, 3).contiguous(), scales)  # fmt: skip
    assert not cache.any()


def test_bad_arguments_are_rejected() -> None:
    k = torch.randn(4, 2, 48)
    cache = torch.zeros(2, 2, 16, 48, dtype=torch.int8)
    scales = torch.zeros(2, 2, 16, dtype=torch.float16)
    with pytest.raises(ValueError, match=r"power of two|cache shapes"):
        store_kv(k, k, None, None, torch.zeros(4, dtype=torch.int64), torch.arange(4),
                 cache, scales, cache.transpose(2, 3).contiguous(), scales)  # fmt: skip
    k = torch.randn(4, 2, 64)
    cache = torch.zeros(2, 2, 16, 64, dtype=torch.int8)
    with pytest.raises(ValueError, match="pages and offsets"):
        store_kv(k, k, None, None, torch.zeros(3, dtype=torch.int64), torch.arange(4),
                 cache, scales, cache.transpose(2, 3).contiguous(), scales)  # fmt: skip
    with pytest.raises(ValueError, match="block_t"):
        store_kv(k, k, None, None, torch.zeros(4, dtype=torch.int64), torch.arange(4),
                 cache, scales, cache.transpose(2, 3).contiguous(), scales,
                 StoreConfig(block_t=24))  # fmt: skip
