"""`kernel_launch.launch`: its specialization key is never coarser than Triton's (CPU, against
Triton's own `native_specialize_impl`), and on a GPU the direct launches compute what Triton's
launches compute, for each specialization."""

from __future__ import annotations

import itertools

import pytest
import torch
import triton
import triton.language as tl
from triton._C.libtriton import native_specialize_impl
from triton.backends.compiler import BaseBackend
from triton.runtime.jit import JITFunction

from sageserve import kernel_launch
from sageserve.kernel_launch import DirectLauncher, launch


def _axpy(x_ptr, y_ptr, out_ptr, n, alpha, stride, BLOCK: tl.constexpr, FLIP: tl.constexpr):
    """out[i * stride] = alpha * x[i * stride] + y[i * stride] (- when FLIP), i < n."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = i < n
    x = tl.load(x_ptr + i * stride, mask=mask)
    y = tl.load(y_ptr + i * stride, mask=mask)
    result = alpha * x - y if FLIP else alpha * x + y
    tl.store(out_ptr + i * stride, result, mask=mask)


# A JITFunction whatever TRITON_INTERPRET says (the key is computed without compiling).
AXPY = JITFunction(_axpy)
axpy = triton.jit(_axpy)  # the interpreter's kernel on CPU, a compiled one on a GPU

INTS = (0, 1, 2, 15, 16, 17, 32, -16, 2**31 - 1, 2**31, -(2**31), -(2**31) - 1, 2**40,
        2**63, 2**64 - 1)  # fmt: skip


def _tensors() -> list[torch.Tensor]:
    """Tensors of several dtypes, 16-byte aligned or not."""
    out = []
    for dtype in (torch.float16, torch.float32, torch.int8, torch.bfloat16):
        base = torch.empty(64, dtype=dtype)
        out += [base, base[1:], base[16:], base[3:]]
    return out


@pytest.mark.parametrize("param", ["x_ptr", "n", "alpha"])
def test_key_is_never_coarser_than_triton_specialization(param: str) -> None:
    """Two values with one key always specialize the same way in Triton."""
    launcher = DirectLauncher(AXPY)
    index = launcher.names.index(param)
    flags = launcher.flags[index]
    values = {"x_ptr": _tensors(), "n": list(INTS), "alpha": [0.5, 1.0, 2.0, *INTS[:3], None]}
    seen: dict = {}
    for value in values[param]:
        key = launcher._arg_key(value, flags)
        spec = native_specialize_impl(BaseBackend, value, *flags)
        assert seen.setdefault(key, spec) == spec, (value, key, spec, seen[key])
    assert len(seen) > 1


def test_key_holds_constexprs_and_options() -> None:
    launcher = DirectLauncher(AXPY)
    x = torch.empty(8)
    args = (x, x, x, 8, 1.0, 1)
    keys = set()
    for block, flip, warps in itertools.product((16, 32), (False, True), (1, 4)):
        values, options = launcher.bind(args, {"BLOCK": block, "FLIP": flip, "num_warps": warps})
        assert values[6:] == [block, flip] and options == {"num_warps": warps}
        keys.add(launcher.specialization_key(values, options))
    assert len(keys) == 8
    as_int, _ = launcher.bind(args, {"BLOCK": 16, "FLIP": 1})
    as_bool, _ = launcher.bind(args, {"BLOCK": 16, "FLIP": True})
    assert launcher.specialization_key(as_int, {}) != launcher.specialization_key(as_bool, {})


def test_the_interpreter_kernel_goes_through_triton() -> None:
    """On CPU (the interpreter's kernel) `launch` is `kernel[grid](...)`."""
    if torch.cuda.is_available():
        pytest.skip("the kernel is compiled here")
    x, y = torch.randn(200), torch.randn(200)
    out = torch.full_like(x, float("nan"))
    launch(axpy, (cdiv(200, 64),), x, y, out, 200, 2.0, 1, BLOCK=64, FLIP=True)
    torch.testing.assert_close(out, 2.0 * x - y)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@pytest.mark.gpu
@pytest.mark.parametrize("enabled", [True, False])
def test_direct_launches_match_triton_launches(enabled: bool, monkeypatch) -> None:
    """Across specializations (aligned and not, n = 1, 16, 333, strides 1 and 2, both
    constexpr values), every launch through `launch` writes what the formula gives, and the
    launcher holds one compiled kernel per specialization it met."""
    monkeypatch.setattr(kernel_launch, "ENABLED", enabled)
    gen = torch.Generator(device="cuda").manual_seed(7)
    for offset, n, stride, flip in itertools.product((0, 1), (1, 16, 333), (1, 2), (False, True)):
        size = offset + n * stride
        x = torch.randn(size, device="cuda", generator=gen)[offset:]
        y = torch.randn(size, device="cuda", generator=gen)[offset:]
        out = torch.full_like(x, float("nan"))
        for _ in range(3):  # the first compiles or finds the kernel, the next launch directly
            launch(axpy, (cdiv(n, 64),), x, y, out, n, 1.5, stride, BLOCK=64, FLIP=flip)
        want = 1.5 * x[::stride][:n] + (-1 if flip else 1) * y[::stride][:n]
        torch.testing.assert_close(out[::stride][:n], want)
    cached = axpy.__dict__.get("_sageserve_direct")
    if enabled:
        assert cached is not None and len(cached.compiled) >= 8


def test_only_a_registered_launch_hook_sends_launches_through_triton() -> None:
    """Triton 3.6 keeps an empty HookChain as its launch hook: that is no profiler."""
    from triton import knobs

    assert not kernel_launch._hooked()
    hook = knobs.runtime.launch_enter_hook
    calls: list = []
    hook.add(calls.append)
    try:
        assert kernel_launch._hooked()
    finally:
        hook.remove(calls.append)
    assert not kernel_launch._hooked()
