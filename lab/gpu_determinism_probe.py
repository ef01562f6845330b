"""Find where two identical engine steps on CUDA stop being bitwise equal.

Runs the same prefill batch and the same decode batch twice through the model runner
(dummy weights of a real architecture) and, if the logits differ, the suspects alone.

    python lab/gpu_determinism_probe.py
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sageserve.attention.batch import SequenceSlice, build_forward_batch
from sageserve.config import CacheConfig, EngineConfig
from sageserve.engine.llm import LLM


def _twice(fn) -> float:
    a, b = fn(), fn()
    return (a.float() - b.float()).abs().max().item()


def main() -> None:
    config = EngineConfig(
        model_path="llama-3.1-8b",
        load_format="dummy",
        dtype="bfloat16",
        device="cuda",
        context_length=8192,
        cache=CacheConfig(max_total_tokens=65536),
    )
    # The runner itself, on hand-built batches: this probe studies the engine's internals.
    runner = LLM.from_engine_config(config).engine._runner
    gen = torch.Generator().manual_seed(0)
    ids = [torch.randint(0, 128000, (512,), generator=gen).tolist() for _ in range(4)]
    seqs = [SequenceSlice(tuple(range(1 + 33 * i, 34 + 33 * i)), 0, 512) for i in range(4)]
    dev = torch.device("cuda")
    prefill = build_forward_batch(seqs, ids, [511, 1023, 1535, 2047], 16, dev)
    print("prefill logits max|diff|:", _twice(lambda: runner.forward(prefill)))
    dec = [SequenceSlice(s.page_table, 512, 1) for s in seqs]
    decode = build_forward_batch(dec, [[7], [8], [9], [10]], [0, 1, 2, 3], 16, dev)
    print("decode logits max|diff|:", _twice(lambda: runner.forward(decode)))
    x = torch.randn(2048, 4096, device=dev, dtype=torch.bfloat16)
    w = torch.randn(14336, 4096, device=dev, dtype=torch.bfloat16)
    print("linear 2048 rows:", _twice(lambda: F.linear(x, w)))
    print("linear 4 rows:", _twice(lambda: F.linear(x[:4], w)))
    q = torch.randn(1, 32, 512, 128, device=dev, dtype=torch.bfloat16)
    k = torch.randn(1, 8, 512, 128, device=dev, dtype=torch.bfloat16)
    mask = torch.ones(512, 512, dtype=torch.bool, device=dev).tril()
    sdpa = lambda: F.scaled_dot_product_attention(q, k, k, attn_mask=mask, enable_gqa=True)  # noqa: E731
    print("sdpa masked gqa:", _twice(sdpa))
    from torch.nn.attention import SDPBackend, sdpa_kernel

    qd = torch.randn(4, 32, 1, 128, device=dev, dtype=torch.bfloat16)
    kd = torch.randn(4, 8, 513, 128, device=dev, dtype=torch.bfloat16)
    kmask = torch.rand(4, 1, 1, 513, device=dev) < 0.9

    def decode_sdpa():
        return F.scaled_dot_product_attention(qd, kd, kd, attn_mask=kmask, enable_gqa=True)

    print("decode-shaped sdpa, default:", _twice(decode_sdpa))
    for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH):
        try:
            with sdpa_kernel([backend]):
                print(f"decode-shaped sdpa, {backend.name}:", _twice(decode_sdpa))
        except RuntimeError as err:
            print(f"decode-shaped sdpa, {backend.name}: unavailable ({str(err)[:60]})")
    logits = runner.forward(decode)
    top2 = logits.topk(2, dim=-1).values
    print("decode top-1 minus top-2 logit gap:", (top2[:, 0] - top2[:, 1]).tolist())


if __name__ == "__main__":
    main()
