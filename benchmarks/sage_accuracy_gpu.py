"""The served kernels' accuracy on the GPU against exact fp32 attention (issue 18's GPU targets).

One reference: the torch backend in float32 on the GPU. Every variant (a backend, its
kernel and the model dtype) is teacher-forced through the engine on the same windows of
two prose texts and compared with it: mean KL(exact fp32 || variant) per token, top-1
agreement and the perplexity change with its paired-bootstrap 95% interval (the ablation's
`compare_windows`). The torch backend in bf16 is the noise floor of bf16 itself: an 8-bit
variant in bf16 cannot land below it, and its excess over it is what the 8-bit attention
adds.

    PYTHONPATH=. python benchmarks/sage_accuracy_gpu.py --model-path SmolLM2.gguf \
        --out benchmarks/results/sage_accuracy-<card>-<date>.json

One JSON (device, versions, date, command, per-variant figures per text); progress on stderr.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

from sageserve.attention.sage_attn.options import SageOptions
from sageserve.attention.torch_native.options import TorchOptions
from sageserve.bench.run_record import device_info, software
from sageserve.config import CacheConfig, EngineConfig, SchedulerConfig
from sageserve.engine.engine import Engine
from sageserve.models.loader import LoadedModel, load_model

sys.path.insert(0, str(Path(__file__).parent))
from sage_error_ablation import TEXTS, compare_windows, token_windows

# name -> (backend, options, dtype); the names are --variants' choices.
VARIANTS = {
    "torch bf16": ("torch", TorchOptions(), "bfloat16"),
    "triton bf16": ("triton", None, "bfloat16"),
    "sage_attn fp32": ("sage_attn", SageOptions(impl="triton"), "float32"),
    "sage_attn bf16": ("sage_attn", SageOptions(impl="triton"), "bfloat16"),
    "sage_attn pv=fp8 bf16": ("sage_attn", SageOptions(impl="triton", pv="fp8"), "bfloat16"),
    "sage_attn gluon bf16": ("sage_attn", SageOptions(impl="gluon"), "bfloat16"),
    "sage_attn q-levels 2 fp32": ("sage_attn", SageOptions(impl="triton", q_levels=2), "float32"),
    "sage_attn q-levels 2 bf16": ("sage_attn", SageOptions(impl="triton", q_levels=2), "bfloat16"),
}


def _engine(loaded: LoadedModel, backend: str, options, dtype: str, chunk: int) -> Engine:
    config = EngineConfig(
        device="cuda", dtype=dtype, attention_backend=backend,
        attention_options=() if options is None else (options,),
        cache=CacheConfig(max_total_tokens=8192 + 64),
        scheduler=SchedulerConfig(chunked_prefill_size=chunk),
    )  # fmt: skip
    return Engine(config, loaded)


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-path", default=None, help="default: SmolLM2-135M (PyPI)")
    parser.add_argument("--lengths", default="512,2048,8192")
    parser.add_argument("--windows", default="16,8,2", help="windows per length")
    parser.add_argument("--texts", default="britannica,pydoc", help=f"of {sorted(TEXTS)}")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"of {list(VARIANTS)}")
    parser.add_argument("--chunk", type=int, default=2048, help="--chunked-prefill-size")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    unknown += [t for t in args.texts.split(",") if t not in TEXTS]
    if unknown:
        parser.error(f"unknown {unknown}; variants: {list(VARIANTS)}; texts: {sorted(TEXTS)}")
    return args


def main() -> None:
    args = _parse_args()
    torch.manual_seed(0)
    models = {dt: load_model(args.model_path, dtype=dt, device="cuda")
              for dt in ("float32", "bfloat16")}  # fmt: skip
    lengths, counts = [int(x) for x in args.lengths.split(",")], args.windows.split(",")
    texts = args.texts.split(",")
    windows = {t: token_windows(models["float32"], t, lengths, [int(c) for c in counts])
               for t in texts}  # fmt: skip
    result = {
        "benchmark": "sage_attn accuracy on the GPU against exact fp32 attention (issue 18)",
        "command": shlex.join(["python", *sys.argv]),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "device": device_info(torch.device("cuda")), "software": software(),
        "model": models["float32"].source, "reference": "torch backend, float32, cuda",
        "texts": {t: TEXTS[t] for t in texts}, "lengths": lengths,
        "windows": {str(n): int(c) for n, c in zip(lengths, counts, strict=True)},
        "variants": {},
    }  # fmt: skip
    ref_engine = _engine(models["float32"], "torch", TorchOptions(), "float32", args.chunk)
    with ref_engine:
        for name in args.variants.split(","):
            backend, options, dtype = VARIANTS[name]
            start = time.monotonic()
            with _engine(models[dtype], backend, options, dtype, args.chunk) as engine:
                scores = {t: compare_windows(ref_engine, engine, windows[t]) for t in texts}
            result["variants"][name] = scores
            print(f"{name}: {scores} ({time.monotonic() - start:.0f} s)", file=sys.stderr,
                  flush=True)  # fmt: skip
            Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
