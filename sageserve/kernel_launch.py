"""Launching a Triton kernel without Triton's per-launch binding, once it has compiled.

`kernel[grid](*args)` binds and specializes every argument, builds a cache key string, checks
the kernel's globals and prepares launch metadata at every launch: ~25 µs of the ~41 µs a
launch of the store's argument list costs on an H100 machine's host, against ~16 µs for the
`CompiledKernel` launched directly (`lab/launch_path_probe.py`, BENCHMARKS.md 2026-12-06
night). A step that runs attention eagerly (a mixed step inside piecewise CUDA graphs, a long
prefill) launches four kernels per layer, and its host time can pace the step: under 32
streaming clients sage_attn's mixed steps took ~20 ms and waited ~0 for the device, where the
engine alone runs them in ~12 (BENCHMARKS.md, 2026-12-07 evening).

`launch(kernel, grid, *args, **kwargs)` does what `kernel[grid](*args, **kwargs)` does. With
`ENABLED` (off by default, see there), the first launch of each specialization goes through
Triton (which compiles or finds the kernel) and later ones with the same key launch the
`CompiledKernel` it returned. The key holds what
Triton specializes a kernel on, never less: each tensor's dtype and 16-byte alignment; each
int's value 1, divisibility by 16 and width; the type of floats, bools and None; the value
of every constexpr; Triton's own specialization of any other argument (tensor descriptors);
and the launch options. A finer key only costs a cache entry. Under the interpreter (whose
kernels are not JITFunctions), with a launch hook set (profilers), or while `ENABLED` is
False, every launch goes through Triton.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from triton import knobs
from triton._C.libtriton import native_specialize_impl
from triton.runtime.jit import JITFunction

# Off until an engine-level A/B shows it pays: on an H100 (2026-12-07 evening,
# `lab/direct_launch_ab.py`, sage_attn, 9 mixed steps each way) the mixed steps' wall time
# was the same within the run's spread (median 11.9 ms direct, 13.2 ms through Triton, one
# round of the latter at 22 ms), and the engine's bitwise test with it on
# (`test_direct_launches_change_no_output_on_gpu`) has not passed on a GPU yet (its one run
# failed on the test's own `< 0.0` comparison, since fixed). Through HTTP, one pair of
# servers (32 clients, engine process, H100, 2026-12-08): mixed steps 14.8 ms on, 15.2 off.
# Turned on by `lab/direct_launch_ab.py` and `lab/serve_variant.py --direct-launch on`.
ENABLED = False
_INT32 = (-(2**31), 2**31)
_UINT64_LOW = 2**63


def launch(kernel: Any, grid: Sequence[int], *args: Any, **kwargs: Any) -> None:
    """`kernel[grid](*args, **kwargs)` (kernel: a @triton.jit or @gluon.jit function;
    grid: 1 to 3 program counts), launched directly once this specialization has compiled."""
    if not (ENABLED and isinstance(kernel, JITFunction)):  # off, or the interpreter's kernel
        kernel[grid](*args, **kwargs)
        return
    launcher = kernel.__dict__.get("_sageserve_direct")
    if launcher is None:
        launcher = kernel.__dict__["_sageserve_direct"] = DirectLauncher(kernel)
    launcher(grid, args, kwargs)


class DirectLauncher:
    """One kernel's compiled specializations, by `specialization_key`."""

    def __init__(self, kernel: Any) -> None:
        self.kernel = kernel
        self.names: list[str] = list(kernel.arg_names)
        self.defaults = {p.name: p.default for p in kernel.params if p.has_default}
        self.constexpr = [p.is_constexpr for p in kernel.params]
        self.flags = [(p.is_const, not p.do_not_specialize, not p.do_not_specialize_on_alignment)
                      for p in kernel.params]  # fmt: skip
        self.compiled: dict[tuple, Any] = {}

    def __call__(self, grid: Sequence[int], args: tuple, kwargs: dict) -> None:
        if _hooked():  # a profiler wants Triton's launch metadata
            self.kernel[grid](*args, **kwargs)
            return
        values, options = self.bind(args, kwargs)
        key = self.specialization_key(values, options)
        compiled = self.compiled.get(key)
        if compiled is None:
            compiled = self.kernel[grid](*args, **kwargs)
            compiled._init_handles()
            self.compiled[key] = compiled
            return
        g0, g1, g2 = (*grid, 1, 1)[:3]
        stream = torch.cuda.current_stream().cuda_stream
        compiled.run(g0, g1, g2, stream, compiled.function, compiled.packed_metadata, None,
                     None, None, *values)  # fmt: skip

    def bind(self, args: tuple, kwargs: dict) -> tuple[list, dict]:
        """(every parameter's value in the kernel's order, the launch options)."""
        values = list(args)
        for name in self.names[len(args) :]:
            values.append(kwargs[name] if name in kwargs else self.defaults[name])
        options = {k: v for k, v in kwargs.items() if k not in self.names}
        return values, options

    def specialization_key(self, values: list, options: dict) -> tuple:
        """A key at least as fine as Triton's specialization of these values and options."""
        key = [tuple(sorted(options.items()))]
        for value, constexpr, flags in zip(values, self.constexpr, self.flags, strict=True):
            # A constexpr's type too: True == 1 == 1.0 in Python, not in Triton's key.
            key.append((type(value), value) if constexpr else self._arg_key(value, flags))
        return tuple(key)

    def _arg_key(self, value: Any, flags: tuple[bool, bool, bool]) -> Any:
        if isinstance(value, torch.Tensor):
            return (value.dtype, value.data_ptr() % 16 == 0)
        if isinstance(value, bool) or value is None or isinstance(value, float):
            return type(value)
        if isinstance(value, int):
            return (value == 1, value % 16 == 0, _int_width(value))
        return native_specialize_impl(self._backend(), value, *flags)

    def _backend(self) -> Any:
        device = torch.cuda.current_device()
        return self.kernel.device_caches[device][3]


def _int_width(value: int) -> str:
    if _INT32[0] <= value < _INT32[1]:
        return "i32"
    return "u64" if value >= _UINT64_LOW else "i64"


def _hooked() -> bool:
    """Whether a launch hook is registered (Triton 3.6 keeps an empty HookChain otherwise)."""
    hook = knobs.runtime.launch_enter_hook
    return hook is not None and bool(getattr(hook, "calls", True))
