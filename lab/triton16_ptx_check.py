"""Compile the 16-bit `triton` backend's kernels for sm_90 without a GPU and summarize the PTX.

Run with TRITON_INTERPRET unset: `python lab/triton16_ptx_check.py [--dump DIR]`.
Per kernel it counts what decides speed on Hopper: wgmma / mma.sync for the dots, cp.async
(pipelined, vectorized global-to-shared copies), vector loads, 1-2-byte scalar loads (a
sign that K/V rows did not vectorize), `.local` (spills), and ptxas's registers and spill
bytes. Arguments are marked 16-byte aligned / divisible by 16 the way the launcher does for
the shapes noted (Llama-3.1-8B: 32 heads, 8 KV heads, head_dim 128, fp16).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile
from pathlib import Path

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    raise SystemExit("unset TRITON_INTERPRET: this compiles the kernels for the GPU")

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from sageserve.attention.triton_attn.kernels import decode as paged_decode
from sageserve.attention.triton_attn.kernels import prefill as paged_prefill
from sageserve.attention.triton_attn.kernels import store as paged_store

TARGET = GPUTarget("cuda", 90, 32)
PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"


def _source(fn, args: dict[str, object]) -> ASTSource:
    """args: name -> "*fp16"-style pointer type, ("i32", value), "fp32" or a constexpr."""
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        value = args[name]
        if isinstance(value, str) and value.startswith("*"):
            signature[name] = value
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, tuple):
            signature[name] = value[0]
            if value[1] % 16 == 0:  # the launcher specializes such ints
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif value == "fp32":
            signature[name] = "fp32"
        else:
            signature[name] = "constexpr"
            constexprs[name] = value
    return ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)


def _kernels(dtype: str) -> dict[str, tuple]:
    p, q_stride = f"*{dtype}", ("i32", 48 * 128)  # q/k/v as views of a fused QKV output
    geometry = {"num_kv_heads": 8, "group": 4, "page_size": 16, "head_dim": 128}
    prefill = {
        **dict.fromkeys(["q_ptr", "out_ptr", "k_ptr", "v_ptr"], p),
        **dict.fromkeys(["table_ptr", "q_start_ptr", "q_len_ptr", "kv_len_ptr"], "*i32"),
        **dict.fromkeys(["block_seq_ptr", "block_row_ptr"], "*i32"),
        "stride_qt": q_stride, "stride_qh": ("i32", 128), "stride_ot": ("i32", 32 * 128),
        "stride_oh": ("i32", 128), "stride_table": ("i32", 520), "qk_scale": "fp32",
        **geometry, "BLOCK_M": 128, "BLOCK_N": 64, "TMA": False,  # the gather path (page 16)
    }  # fmt: skip
    split = {
        **dict.fromkeys(["q_ptr", "k_ptr", "v_ptr"], p),
        **dict.fromkeys(["table_ptr", "q_row_ptr", "kv_len_ptr"], "*i32"),
        "acc_ptr": "*fp32", "ml_ptr": "*fp32",
        "stride_qt": q_stride, "stride_qh": ("i32", 128), "stride_table": ("i32", 520),
        "qk_scale": "fp32", **geometry, "BLOCK_H": 16, "BLOCK_N": 64, "NUM_SPLITS": 16,
    }  # fmt: skip
    merge = {
        "out_ptr": p, "acc_ptr": "*fp32", "ml_ptr": "*fp32", "q_row_ptr": "*i32",
        "stride_ot": ("i32", 32 * 128), "stride_oh": ("i32", 128),
        "num_q_heads": 32, "head_dim": 128, "NUM_SPLITS": 16,
    }  # fmt: skip
    store = {
        "k_ptr": p, "v_ptr": p, "slot_ptr": "*i64", "k_cache_ptr": p, "v_cache_ptr": p,
        "num_tokens": ("i32", 1), "stride_kt": q_stride, "stride_kh": ("i32", 128),
        "stride_vt": q_stride, "stride_vh": ("i32", 128),
        "num_kv_heads": 8, "head_dim": 128, "BLOCK_T": 16,
    }  # fmt: skip
    return {
        "prefill": (paged_prefill._paged_prefill_kernel, prefill, 8, 3),
        "decode_split": (paged_decode._decode_split_kernel, split, 4, 3),
        "decode_merge": (paged_decode._decode_merge_kernel, merge, 4, 3),
        "store": (paged_store._store_kv_kernel, store, 4, 3),
    }


def _ptxas_usage(ptx: str) -> str:
    """ptxas -v summary: registers, stack, spill stores/loads."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.ptx"
        path.write_text(ptx)
        cmd = [str(PTXAS), "-arch=sm_90a", "-v", str(path), "-o", os.devnull]
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    lines = [ln.split("info    : ")[-1] for ln in res.stderr.splitlines()]
    return " | ".join(ln for ln in lines if "Used" in ln or "spill" in ln)


def _summary(ptx: str) -> dict[str, int]:
    count = lambda pattern: len(re.findall(pattern, ptx))  # noqa: E731
    return {
        "wgmma": count(r"wgmma\.mma_async"),
        "mma.sync": count(r"\bmma\.sync"),
        "cp.async": count(r"cp\.async\.(?:ca|cg)"),
        "ld.global.v4": count(r"ld\.global(?:\.\w+)*\.v4"),
        "ld.global.b8/b16/u16": count(r"ld\.global(?:\.\w+)*\.(?:b8|b16|u16|u8)\b"),
        "st.global.v4": count(r"st\.global(?:\.\w+)*\.v4"),
        ".local": count(r"\.local"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dump", type=Path, help="write each kernel's PTX here")
    parser.add_argument("--dtype", default="fp16", choices=["fp16", "bf16"])
    args = parser.parse_args()
    for name, (fn, fn_args, warps, stages) in _kernels(args.dtype).items():
        options = {"num_warps": warps, "num_stages": stages}
        ptx = triton.compile(_source(fn, fn_args), target=TARGET, options=options).asm["ptx"]
        if args.dump:
            args.dump.mkdir(parents=True, exist_ok=True)
            (args.dump / f"{name}.ptx").write_text(ptx)
        print(f"{name:13s}", _summary(ptx))
        print(f"{'':13s}", _ptxas_usage(ptx))


if __name__ == "__main__":
    main()
