"""What the fused Hadamard rotation adds to the sm_90 code of the 8-bit kernels, offline.

Compiles the prefill (as served: TMA key blocks, the default PrefillConfig), the store
(the default StoreConfig for 64-token pages) and the decode split kernel (DecodeConfig)
for GPUTarget("cuda", 90) with ROTATE off, the butterfly and the tensor-core product
(`HadamardKernel`), no GPU needed, and prints per variant: layout conversions in the TTGIR
(and how many sit inside a loop), shared memory, registers and spills (ptxas -v, the ptxas
Triton ships).

    TRITON_INTERPRET=0 python lab/rotation_compile_probe.py [--head-dim 128] [--xor]
        [--q-levels 2]

`--xor` compiles the butterfly as in-place stages whose partners come through `tl.gather`
(`lab/quantize_q_probe.py`'s `_hadamard_rows_xor`, bit-identical results) instead of the
reshape / split / join / permute stages, in every kernel.

Findings (2026-12-05, Triton 3.6) are in BENCHMARKS.md, "The rotation's kernel cost".
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import mangle_type

from sageserve.attention.sage_attn.kernels.decode import DecodeConfig, _sage_decode_split_kernel
from sageserve.attention.sage_attn.kernels.prefill import (
    PrefillConfig,
    _sage_attention_kernel,
    cache_descriptors,
    key_run,
)
from sageserve.attention.sage_attn.kernels.rotate import HadamardKernel, hadamard_tile
from sageserve.attention.sage_attn.kernels.store import _store_kv_kernel, default_config

TARGET = GPUTarget("cuda", 90, 32)
PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/ptxas")
PAGE = 64


def launch_attrs(kernel, signature: dict) -> dict:
    """What a real launch tells the compiler about alignment: every pointer (a torch
    allocation) and every stride argument (multiples of 16 at these shapes) divisible by 16,
    except the arguments the kernel does not specialize on."""
    skip = set(kernel.do_not_specialize or ())
    aligned = [
        name for name, kind in signature.items()
        if name not in skip and (kind.startswith("*") or name.startswith("stride"))
    ]  # fmt: skip
    return {(kernel.arg_names.index(name),): [["tt.divisibility", 16]] for name in aligned}


def prefill_source(dim: int, rotate: HadamardKernel, q_levels: int = 1) -> tuple[ASTSource, dict]:
    """The served prefill launch (bf16 q, FP16 P·V, no balance) as an ASTSource."""
    config = PrefillConfig()
    k = torch.empty(4, 8, PAGE, dim, dtype=torch.int8)
    scales = torch.empty(4, 8, PAGE, dtype=torch.float16)
    v = torch.empty(4, 8, dim, PAGE, dtype=torch.int8)
    descs = [mangle_type(d) for d in cache_descriptors(k, scales, v, scales, config.block_n)]
    pointers = {"q_ptr": "*bf16", "q_scale_ptr": "*fp16", "balance_ptr": "*fp16",
                "out_ptr": "*bf16"}  # fmt: skip
    caches = dict(
        zip(("k_cache_ptr", "k_scale_ptr", "v_cache_ptr", "v_scale_ptr"), descs, strict=True)
    )
    ints = {n: "*i32" for n in ("page_table_ptr", "q_start_ptr", "q_len_ptr", "kv_len_ptr")}
    strides = {n: "i32" for n in ("stride_qt", "stride_qh", "stride_st", "stride_ot",
                                  "stride_oh", "stride_table")}  # fmt: skip
    constants = dict(
        num_kv_heads=8, group=4, page_size=PAGE, head_dim=dim, BLOCK_M=config.block_m,
        BLOCK_N=config.block_n, KEY_RUN=key_run(PAGE, config.block_n),
        SPLIT_MASK=config.split_mask, PREFETCH=False, WIDE=False, CAUSAL=True,
        HAS_BALANCE=False, PV_FP8=False, FAST_CVT=True, TMA=True, ROTATE=int(rotate),
        STAGES=dim.bit_length() - 1, Q_LEVELS=q_levels,
    )  # fmt: skip
    signature = pointers | caches | ints | strides | {"sm_scale": "fp32"}
    signature |= {name: "constexpr" for name in constants}
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages,
               "maxnreg": config.maxnreg}  # fmt: skip
    attrs = launch_attrs(_sage_attention_kernel, signature)
    return ASTSource(_sage_attention_kernel, signature, constexprs=constants, attrs=attrs), options


def store_source(dim: int, rotate: HadamardKernel) -> tuple[ASTSource, dict]:
    """The served store launch (bf16 k and v, INT8 V, a key mean) as an ASTSource."""
    config = default_config(PAGE)
    signature = {"k_ptr": "*bf16", "v_ptr": "*bf16", "mean_ptr": "*fp32", "balance_ptr": "*fp16",
                 "pages_ptr": "*i64", "offsets_ptr": "*i64", "k_cache_ptr": "*i8",
                 "k_scale_ptr": "*fp16", "v_cache_ptr": "*i8", "v_scale_ptr": "*fp16",
                 "num_tokens": "i32", "tiles_per_program": "i32", "stride_kt": "i32",
                 "stride_kh": "i32", "stride_vt": "i32", "stride_vh": "i32"}  # fmt: skip
    constants = dict(num_kv_heads=8, page_size=PAGE, head_dim=dim, BLOCK_T=config.block_t,
                     HAS_MEAN=True, HAS_BALANCE=False, V_FP8=False, RUNS=True, FAST_DIV=True,
                     ROTATE=int(rotate), STAGES=dim.bit_length() - 1)  # fmt: skip
    signature |= {name: "constexpr" for name in constants}
    options = {"num_warps": config.num_warps, "maxnreg": config.maxnreg,
               "enable_fp_fusion": False}  # fmt: skip
    attrs = launch_attrs(_store_kv_kernel, signature)
    return ASTSource(_store_kv_kernel, signature, constexprs=constants, attrs=attrs), options


def decode_source(dim: int, rotate: HadamardKernel, q_levels: int = 1) -> tuple[ASTSource, dict]:
    """The served decode split kernel (bf16 q, FP16 P·V, GQA group 4, no balance)."""
    config = DecodeConfig()
    signature = {"q_ptr": "*bf16", "balance_ptr": "*fp16", "k_cache_ptr": "*i8",
                 "k_scale_ptr": "*fp16", "v_cache_ptr": "*i8", "v_scale_ptr": "*fp16",
                 "page_table_ptr": "*i32", "q_row_ptr": "*i32", "kv_len_ptr": "*i32",
                 "part_acc_ptr": "*fp32", "part_ml_ptr": "*fp32", "counter_ptr": "*i32",
                 "out_ptr": "*bf16", "stride_qt": "i32", "stride_qh": "i32", "stride_ot": "i32",
                 "stride_oh": "i32", "stride_table": "i32", "num_splits": "i32",
                 "sm_scale": "fp32"}  # fmt: skip
    constants = dict(num_kv_heads=8, group=4, page_size=PAGE, head_dim=dim, BLOCK_H=16,
                     BLOCK_N=config.block_n, SUB_N=config.sub_n,
                     RUN=key_run(PAGE, config.sub_n), WIDE=False, PACKED=True,
                     HAS_BALANCE=False, PV_FP8=False, FAST_CVT=True,
                     FUSED=config.fused_combine, GROUP_P2=4, MERGE_S=8, ROTATE=int(rotate),
                     STAGES=dim.bit_length() - 1, Q_LEVELS=q_levels)  # fmt: skip
    signature |= {name: "constexpr" for name in constants}
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    attrs = launch_attrs(_sage_decode_split_kernel, signature)
    source = ASTSource(_sage_decode_split_kernel, signature, constexprs=constants, attrs=attrs)
    return source, options


def conversions(ttgir: str) -> tuple[int, int]:
    """(layout conversions, of which inside an scf.for body), counted by indentation."""
    total = inside = 0
    loops: list[int] = []  # indentation of the open scf.for ops
    for line in ttgir.splitlines():
        indent = len(line) - len(line.lstrip())
        while loops and indent <= loops[-1] and line.strip().startswith("}"):
            loops.pop()
        if "scf.for" in line:
            loops.append(indent)
        if "ttg.convert_layout" in line:
            total += 1
            inside += bool(loops)
    return total, inside


def ptxas_stats(ptx: str) -> str:
    """ptxas -v's registers and spill lines for the kernel."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        done = subprocess.run([PTXAS, "-v", "--gpu-name", "sm_90a", path, "-o", path + ".cubin"],
                              capture_output=True, text=True, check=True)  # fmt: skip
    found = re.findall(r"(\d+) bytes spill stores|Used (\d+) registers", done.stderr)
    spills = next((s for s, _ in found if s), "0")
    registers = next((r for _, r in found if r), "?")
    return f"{registers} registers, {spills} bytes spilled"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--xor", action="store_true", help="the gather-based butterfly")
    parser.add_argument("--q-levels", type=int, default=1, choices=(1, 2),
                        help="Q's INT8 levels in the prefill and decode")  # fmt: skip
    args = parser.parse_args()
    dim = args.head_dim
    if args.xor:
        from lab.quantize_q_probe import _hadamard_rows_xor

        # hadamard_tile resolves hadamard_rows from its module's globals when compiled.
        hadamard_tile.__globals__["hadamard_rows"] = _hadamard_rows_xor
    kernels = (("prefill", prefill_source), ("store", store_source), ("decode", decode_source))
    for name, make in kernels:
        for rotate in HadamardKernel:
            levels = {"q_levels": args.q_levels} if name != "store" else {}
            source, options = make(dim, rotate, **levels)
            compiled = triton.compile(source, target=TARGET, options=options)
            total, inside = conversions(compiled.asm["ttgir"])
            print(f"{name:8} head_dim {dim} {rotate.name:11}: {total} layout conversions "
                  f"({inside} in loops), {compiled.metadata.shared} B shared, "
                  f"{ptxas_stats(compiled.asm['ptx'])}")  # fmt: skip


if __name__ == "__main__":
    main()
