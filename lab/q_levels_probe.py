"""What does Q in two INT8 levels cost the Triton prefill? (issue 18.)

The emulation (BENCHMARKS.md, 2026-12-07) says a second level of Q codes removes ~30% of
the 8-bit KL; `sage_attention_paged(q_levels=2)` computes it with a second INT8 product
per key block (lab/KERNEL_NOTES.md, "Q in two INT8 levels"). This times the Triton prefill
with one and two levels, Q rotated in the kernel (butterfly) and not rotated, and the
served Triton path at head_dim 128 (the query pass, then the kernel on its codes; one
level) for scale, at Llama-3.1-8B's heads (32 query, 8 KV, head_dim 128), causal, over a
paged cache of random codes (page 64, pages shuffled). Variants are sampled round-robin
per shape; every output is checked finite, and the two-level output against the one-level
one (the same attention up to Q's rounding: cosine > 0.999).

    PYTHONPATH=. python lab/q_levels_probe.py --out q-levels.json [--shapes 1024x32,...]
"""

from __future__ import annotations

import argparse

import torch

from lab.sweep_record import run_sweep
from sageserve.attention.page_tables import padded_page_table
from sageserve.attention.sage_attn.kernels.prefill import sage_attention_paged
from sageserve.attention.sage_attn.kernels.quantize_q import quantize_q
from sageserve.attention.sage_attn.kernels.rotate import HadamardKernel
from sageserve.bench.kernels_timing import Timed, Timer

HEADS, KV_HEADS, DIM, PAGE = 32, 8, 128, 64
# (label, rotation in the kernel, q_levels); "prepass": the query pass, then the kernel.
VARIANTS = [("butterfly_l1", HadamardKernel.BUTTERFLY, 1),
            ("butterfly_l2", HadamardKernel.BUTTERFLY, 2),
            ("off_l1", HadamardKernel.OFF, 1), ("off_l2", HadamardKernel.OFF, 2),
            ("prepass_l1", "prepass", 1)]  # fmt: skip


def paged_inputs(seq: int, batch: int, gen: torch.Generator) -> dict:
    """Random codes and scales in a shuffled paged cache; q bf16 [batch * seq, HEADS, DIM]."""
    pages_per_seq = -(-seq // PAGE)
    pages = batch * pages_per_seq + 1
    dev = "cuda"
    k = torch.randint(-127, 128, (pages, KV_HEADS, PAGE, DIM), generator=gen, device=dev)
    v = torch.randint(-127, 128, (pages, KV_HEADS, DIM, PAGE), generator=gen, device=dev)
    scales = [0.005 + 0.02 * torch.rand(pages, KV_HEADS, PAGE, generator=gen, device=dev)
              for _ in range(2)]  # fmt: skip
    order = (torch.randperm(pages - 1, generator=gen, device=dev) + 1).tolist()
    tables = [tuple(order[i * pages_per_seq : (i + 1) * pages_per_seq]) for i in range(batch)]
    i32 = dict(dtype=torch.int32, device=dev)
    lens = torch.full((batch,), seq, **i32)
    table = padded_page_table(list(tables), [seq] * batch, PAGE, torch.device(dev))
    return {
        "q": torch.randn(batch * seq, HEADS, DIM, generator=gen, device=dev).bfloat16(),
        "caches": (k.to(torch.int8), scales[0].half(), v.to(torch.int8), scales[1].half()),
        "steps": (table, torch.arange(batch, **i32) * seq, lens, lens, seq),
    }


def call_for(variant: tuple, data: dict, out: torch.Tensor, memo: dict):
    """The variant's prefill as a no-argument call writing into out."""
    _, rotation, levels = variant
    q, caches, steps, sm_scale = data["q"], data["caches"], data["steps"], DIM**-0.5
    if rotation == "prepass":

        def run() -> None:
            codes, scales = quantize_q(q, sm_scale, HadamardKernel.BUTTERFLY)
            sage_attention_paged(codes, None, *caches, *steps, out=out, q_scale=scales,
                                 descriptor_memo=memo)  # fmt: skip

        return run
    return lambda: sage_attention_paged(q, None, *caches, *steps, sm_scale=sm_scale, out=out,
                                        rotation=rotation, descriptor_memo=memo,
                                        q_levels=levels)  # fmt: skip


def measure(seq: int, batch: int, timer: Timer) -> dict:
    data = paged_inputs(seq, batch, torch.Generator(device="cuda").manual_seed(seq + batch))
    outs, entries, memo = {}, {}, {}
    for variant in VARIANTS:
        out = torch.full_like(data["q"], float("nan"))
        call = call_for(variant, data, out, memo)
        call()
        outs[variant[0]] = out
        entries[variant[0]] = Timed(call)
        timer.plan(entries[variant[0]])
    errors = timer.round_robin(entries)
    flops = 2 * 2 * batch * HEADS * seq * seq * DIM / 2  # causal: half the square
    return {"seq": seq, "batch": batch, "errors": errors, "checks": _checks(outs),
            "variants": {name: {"ms": t.median_ms, "tflops": flops / t.median_ms / 1e9}
                         for name, t in entries.items() if t.samples_ms}}  # fmt: skip


def _checks(outs: dict) -> dict:
    """Finite outputs; each two-level output against its one-level twin (cosine)."""

    def cosine(a, b):
        return torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(),
                                                     dim=0).item()  # fmt: skip

    checks = {f"{n}_finite": bool(torch.isfinite(o).all()) for n, o in outs.items()}
    for rot in ("butterfly", "off"):
        checks[f"{rot}_l2_vs_l1_cosine"] = cosine(outs[f"{rot}_l2"], outs[f"{rot}_l1"])
    checks["ok"] = all(v for k, v in checks.items() if k.endswith("finite")) and all(
        v > 0.999 for k, v in checks.items() if k.endswith("cosine")
    )
    return checks


def show(entry: dict, _copy: float) -> None:
    base = entry["variants"].get("butterfly_l1", {}).get("ms")
    for name, v in entry["variants"].items():
        ratio = f"{v['ms'] / base:.3f}x butterfly_l1" if base else ""
        print(f"{entry['seq']:6d} x {entry['batch']:3d} {name:13s} {v['ms']:8.3f} ms "
              f"{v['tflops']:7.1f} TFLOPS {ratio}", flush=True)  # fmt: skip
    print(f"checks: {entry['checks']}  errors: {entry['errors']}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--shapes", default="1024x32,8192x4,32768x1")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    timer = Timer(torch.device("cuda"), warmup=2, repeats=args.repeats, sample_ms=40.0)
    run_sweep(
        "q_levels_probe",
        args.shapes,
        args.out,
        timer,
        lambda seq, batch: measure(seq, batch, timer),
        show,
    )


if __name__ == "__main__":
    main()
