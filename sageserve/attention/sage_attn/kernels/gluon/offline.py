"""The warp-specialized prefill compiled for sm_90 without a GPU, and ptxas's verdict on it.

For the CPU tests (every served build compiles, without spills) and lab's compile reports
(`lab/gluon_ws_prefill_probe.py --sass`). The signature carries what the launcher's
specialization sees on a GPU: 16-byte aligned tensors (`int32_on_device` aligns the int32
arrays), q/out strides multiples of 16; the item count and the table stride vary.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import triton
from triton.experimental.gluon import language as gl

from sageserve.attention.sage_attn.kernels.gluon.config import (
    DEFAULT_STAGES,
    KEYS,
    MAXNREG,
    launch_options,
    resolve_lazy_rescale,
    v16_slots,
)
from sageserve.attention.sage_attn.kernels.gluon.prefill import (
    _rotate_constexpr,
    _sage_ws_prefill_kernel,
    cache_descriptor,
)

_ALIGNED = ("q_ptr", "q_scale_ptr", "k_scale_ptr", "v_scale_ptr", "page_table_ptr", "out_ptr",
            "plan_ptr", "q_start_ptr", "q_len_ptr", "kv_len_ptr", "stride_qt", "stride_qh",
            "stride_ot", "stride_oh")  # fmt: skip
_CONSTEXPRS = ("STAGES", "CONSUMER_REGS", "PRODUCER_REGS", "ROTATE", "WIDENER_WARPS",
               "WIDENER_REGS", "BLOCK_KEYS", "V16_SLOTS", "LAZY_RESCALE")  # fmt: skip


@dataclass(frozen=True)
class Build:
    """One build of the kernel: P·V in "fp8" or "fp16", head_dim, Q rotated, causal, keys
    per block."""

    pv: str = "fp16"
    head_dim: int = 128
    rotate: bool = True
    causal: bool = True
    stages: int = DEFAULT_STAGES
    maxnreg: int = MAXNREG
    block_keys: int = 64
    prequantize: bool = False  # Q codes from `quantize_q` (rotated there), not quantized here
    rotate_in_registers: bool = False  # the ±1 matrix made in registers (mma.sync), not smem
    # fp16 P·V: the accumulator rescaled only when a max grows; None: as served
    # (`default_lazy_rescale`).
    lazy_rescale: bool | None = None


def compile_sm90(build: Build, num_q_heads: int = 32, num_kv_heads: int = 8):
    """The kernel compiled for sm_90 (Triton's CompiledKernel: asm["ptx"], asm["cubin"],
    metadata.shared), bf16 queries."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import mangle_type

    def desc(shape, box, dtype, torch_dtype):
        return mangle_type(cache_descriptor(torch.zeros(shape, dtype=torch_dtype), box, dtype))

    dim = build.head_dim
    v_types = (gl.float8e4nv, torch.float8_e4m3fn) if build.pv == "fp8" else (gl.int8, torch.int8)
    signature = {
        "q_ptr": "*i8" if build.prequantize else "*bf16",
        "q_scale_ptr": "*fp32" if build.prequantize else "*bf16",
        "k_desc": desc([4096, dim], [KEYS, dim], gl.int8, torch.int8),
        "v_desc": desc([64 * dim, KEYS], [dim, KEYS], *v_types),
        "k_scale_ptr": "*fp16", "v_scale_ptr": "*fp16", "page_table_ptr": "*i32",
        "out_ptr": "*bf16", "plan_ptr": "*i32", "q_start_ptr": "*i32", "q_len_ptr": "*i32",
        "kv_len_ptr": "*i32", "n_items": "i32", "stride_qt": "i32", "stride_qh": "i32",
        "stride_st": "i32", "stride_table": "i32", "stride_ot": "i32", "stride_oh": "i32",
        "sm_scale": "fp32",
    }  # fmt: skip
    rotate_here = _rotate_constexpr(build.rotate and not build.prequantize,
                                    build.rotate_in_registers)  # fmt: skip
    slots = v16_slots(build.pv == "fp8", build.head_dim, build.block_keys)
    lazy = resolve_lazy_rescale(build.lazy_rescale, build.pv == "fp8", build.head_dim)
    options = launch_options(build.stages, build.maxnreg, rotate_here, build.block_keys, slots,
                             lazy)  # fmt: skip
    constexprs = {"num_q_heads": num_q_heads, "num_kv_heads": num_kv_heads, "CAUSAL": build.causal}
    constexprs |= {name: options.pop(name) for name in _CONSTEXPRS}
    signature |= dict.fromkeys(constexprs, "constexpr")
    names = _sage_ws_prefill_kernel.arg_names
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in _ALIGNED}
    src = GluonASTSource(_sage_ws_prefill_kernel, signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)


@dataclass(frozen=True)
class PtxasVerdict:
    registers: int
    spill_bytes: int  # stores + loads
    warnings: list[str]  # ptxas warnings, such as C7512 (wgmma serialized)
    messages: list[str]  # every ptxas -v line


def ptxas_verdict(ptx: str) -> PtxasVerdict:
    """ptxas -v on the PTX for sm_90a: registers, spill bytes, warnings."""
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.ptx"
        path.write_text(ptx)
        res = subprocess.run([str(ptxas), "-arch=sm_90a", "-v", str(path), "-o", os.devnull],
                             capture_output=True, text=True, check=True)  # fmt: skip
    lines = [ln.split("info    : ")[-1].strip() for ln in res.stderr.splitlines() if ln.strip()]
    text = " ".join(lines)
    registers = max(int(r) for r in re.findall(r"Used (\d+) registers", text))
    spills = sum(int(b) for b in re.findall(r"(\d+) bytes spill (?:stores|loads)", text))
    return PtxasVerdict(registers, spills, [ln for ln in lines if "arning" in ln], lines)


def build_report(build: Build) -> dict:
    """What a CPU test checks of one build: shared memory (bytes), ptxas's registers, spill
    bytes and warnings, the wgmma shapes and types in the PTX, and how many accumulator
    rescales a branch can skip (`consumer_steps._rescale_where_grown`) and how many of its
    products square a register instead. Needs TRITON_INTERPRET unset
    or 0 when this package was imported (under the interpreter, jitted functions cannot be
    compiled)."""
    kernel = compile_sm90(build)
    ptx = kernel.asm["ptx"]
    verdict = ptxas_verdict(ptx)
    wgmma = sorted(set(re.findall(r"wgmma\.mma_async\.sync\.aligned\.(\S+)", ptx)))
    return {"shared": kernel.metadata.shared, "registers": verdict.registers,
            "spill_bytes": verdict.spill_bytes, "warnings": verdict.warnings,
            "wgmma": wgmma, "rescale_branches": ptx.count("bra DONE"),
            # x * x of one register: a rescale that reads the accumulator as its factor
            "rescale_squares": len(re.findall(r"mul\.f32 (%r\d+), \1, \1;", ptx))}  # fmt: skip
