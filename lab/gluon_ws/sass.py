"""The offline sm_90 compile of both kernels (no GPU) and its report (`--sass`): wgmma
waits and kinds, setmaxnreg, shared memory, ptxas's verdict, the SASS loops."""

from __future__ import annotations

import re
import subprocess
import tempfile
from pathlib import Path

import torch
import triton
from triton.experimental.gluon import language as gl

from lab.gluon_prefill_probe import HEAD_DIM, KEYS, _descriptor
from lab.gluon_ws.config import DEFAULT_STAGES, MAXNREG, _launch_options
from lab.gluon_ws.equal import _gluon_ws_prefill_kernel
from sageserve.attention.sage_attn.kernels.gluon.offline import (
    Build,
    compile_sm90,
    ptxas_verdict,
)

# ----------------------------------------------------------------------------- offline report


def _compile_sm90(causal: bool, stages: int, maxnreg: int, persistent: bool = False):
    """The kernel compiled for sm_90 without a GPU (Triton's CompiledKernel). persistent only
    changes the causal kernel's order of work items (the grid is the launcher's)."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import mangle_type

    def desc(shape, box, dtype, torch_dtype):
        return mangle_type(_descriptor(torch.zeros(shape, dtype=torch_dtype), shape, box, dtype))

    signature = {
        "q_ptr": "*bf16",
        "k_desc": desc([4096, HEAD_DIM], [KEYS, HEAD_DIM], gl.int8, torch.int8),
        "v_desc": desc([8192, KEYS], [HEAD_DIM, KEYS], gl.float8e4nv, torch.float8_e4m3fn),
        "k_scale_ptr": "*fp16", "v_scale_ptr": "*fp16", "page_table_ptr": "*i32",
        "out_ptr": "*bf16", "seq_len": "i32", "batch": "i32", "stride_qt": "i32",
        "stride_qh": "i32", "stride_table": "i32", "stride_ot": "i32", "stride_oh": "i32",
        "sm_scale": "fp32",
    }  # fmt: skip
    options = _launch_options(stages, maxnreg, causal and persistent)
    constexprs = {"num_q_heads": 32, "num_kv_heads": 32, "CAUSAL": causal}
    for name in ("STAGES", "CONSUMER_REGS", "PRODUCER_REGS", "TILE_MAJOR"):
        constexprs[name] = options.pop(name)
    signature |= dict.fromkeys(constexprs, "constexpr")
    # What the launcher's specialization sees on the GPU: 16-byte aligned tensors, and these
    # integers multiples of 16 (page table strides are left out: they vary).
    aligned = ("q_ptr", "k_scale_ptr", "v_scale_ptr", "page_table_ptr", "out_ptr", "seq_len",
               "stride_qt", "stride_qh", "stride_ot", "stride_oh")  # fmt: skip
    names = _gluon_ws_prefill_kernel.arg_names
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    src = GluonASTSource(_gluon_ws_prefill_kernel, signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)


def _sass(cubin: bytes) -> list[str]:
    """The kernel's SASS, one instruction or label per line (nvdisasm)."""
    nvdisasm = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        res = subprocess.run([str(nvdisasm), "-c", str(path)], capture_output=True, text=True,
                             check=True)  # fmt: skip
    return res.stdout.splitlines()


def _instructions(sass: list[str]) -> tuple[list[str], dict[str, int]]:
    """(SASS instructions in order, label -> index of the instruction it precedes)."""
    labels, body = {}, []
    for line in sass:
        if m := re.match(r"^\s*\.(L_x_\d+):", line):
            labels[m.group(1)] = len(body)
        elif m := re.search(r"/\*[0-9a-f]{4,}\*/\s+(.*?)\s*;", line):
            body.append(m.group(1))
    return body, labels


def _digest(body: list[str]) -> str:
    """A loop body as runs of the instructions that show the overlap: GMMAs, their waits,
    MUFU (exp2), FMUL, mbarrier waits and arrives."""
    kinds = (("GMMA", None), ("WARPGROUP.DEPBAR", "wait"), ("MUFU", "MUFU"), ("FMUL", "FMUL"),
             ("SYNCS.PHASECHK", "mbar.wait"), ("SYNCS.ARRIVE", "mbar.arrive"))  # fmt: skip
    runs: list[list] = []
    for ins in body:
        op = ins.split()[1] if ins.startswith("@") else ins.split()[0]
        for prefix, name in kinds:
            if op.startswith(prefix) or (prefix == "GMMA" and "GMMA" in op):
                key = op.split(".")[0] if name is None else name
                key += f"({ins.split()[-1]})" if name == "wait" else ""
                if runs and runs[-1][0] == key:
                    runs[-1][1] += 1
                else:
                    runs.append([key, 1])
                break
    return " ".join(k if n == 1 else f"{k}x{n}" for k, n in runs)


def _placement(body: list[str]) -> str:
    """Where a loop body's wgmma waits fall among its softmax: the consumer (from the named
    barrier its warpgroup syncs on: 0 for the default partition, consumer 0), the
    instruction index of each wait, the MUFU.EX2 between wait(1) and wait(0) (overlapped
    with the P·V) and after wait(0), FMUL and I2F counts."""
    waits = [(i, ins.split()[-1]) for i, ins in enumerate(body) if "WARPGROUP.DEPBAR" in ins]
    named = (re.search(r"BAR\.SYNC\S* (0x[0-9a-f]+), 0x80", ins) for ins in body)
    bars = {m.group(1) for m in named if m}
    last = max((i for i, n in waits if n == "0x0"), default=len(body))
    first = min((i for i, n in waits if n == "0x1"), default=0)
    ex2 = [i for i, ins in enumerate(body) if "MUFU.EX2" in ins]
    under = sum(first < i < last for i in ex2)
    consumer = {"0x0": "consumer 0", "0x2": "consumer 1"}.get(",".join(sorted(bars)), str(bars))
    fmul = sum(" FMUL " in f" {ins} " for ins in body)
    i2f = sum("I2FP" in ins for ins in body)
    return (
        f"{consumer}: waits {waits}; EX2 under the P·V {under}, after wait(0) "
        f"{len(ex2) - under}; FMUL {fmul}, I2F {i2f}"
    )


def _loops(sass: list[str]) -> list[tuple[int, str, str]]:
    """The innermost loops that issue wgmma: (SASS instructions per iteration, digest,
    wait placement). (Backward branches of the out-of-line mbarrier retry blocks, after the
    kernel's EXIT, are left out.)"""
    body, labels = _instructions(sass)
    spans = []
    for i, ins in enumerate(body):
        target = re.search(r"`\(\.(L_x_\d+)\)", ins)
        if "BRA" in ins and target and labels.get(target.group(1), i + 1) <= i:
            start = labels[target.group(1)]
            loop = body[start : i + 1]
            if any("GMMA" in b for b in loop) and not any(b.startswith("EXIT") for b in loop):
                spans.append((start, i))
    inner = [a for a in spans if not any(b != a and a[0] <= b[0] and b[1] <= a[1] for b in spans)]
    return [(end - start + 1, _digest(body[start : end + 1]), _placement(body[start : end + 1]))
            for start, end in inner]  # fmt: skip


def sass_report(causal: bool = False, stages: int = DEFAULT_STAGES, maxnreg: int = MAXNREG,
                persistent: bool = False, varlen: bool = False, pv: str = "fp8",
                head_dim: int = HEAD_DIM, rotate: bool = False,
                block_keys: int = 64) -> int:  # fmt: skip
    """Compile for sm_90 without a GPU; print the wgmma waits and kinds, the register plan
    (setmaxnreg per partition), shared memory, ptxas's verdict and the SASS loops.
    varlen: the varlen kernel (its loops: unmasked then masked, per consumer), with P·V in
    `pv`, head_dim, the Q rotation and keys per block as given (the equal-length kernel
    has none of these)."""
    if varlen:
        kernel = compile_sm90(Build(pv, head_dim, rotate, causal, stages, maxnreg, block_keys))
    else:
        kernel = _compile_sm90(causal, stages, maxnreg, persistent)
    ptx = kernel.asm["ptx"]
    print("wgmma.wait_group:", re.findall(r"wgmma\.wait_group\.sync\.aligned\s+(\d+)", ptx))
    print("wgmma kinds:", sorted(set(re.findall(r"wgmma\.mma_async\.sync\.aligned\.(\S+)", ptx))))
    print("setmaxnreg:", re.findall(r"setmaxnreg\.(\w+)\.sync\.aligned\.u32\s+(\d+)", ptx))
    print(f"warps {kernel.metadata.num_warps}; shared memory {kernel.metadata.shared} B")
    messages = ptxas_verdict(ptx).messages
    keep = ("Used", "spill", "arning", "Performance Loss", "stack")
    print("ptxas:", " | ".join(ln for ln in messages if any(k in ln for k in keep)))
    for size, digest, placement in _loops(_sass(kernel.asm["cubin"])):
        print(f"SASS loop, {size} instructions per key block: {digest}")
        print(f"  {placement}")
    return 0
