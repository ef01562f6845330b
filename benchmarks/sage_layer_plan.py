"""`--sage-calibrate`'s plan for a model, measured once and written as JSON (issue 18).

    PYTHONPATH=. python benchmarks/sage_layer_plan.py --out sage_layer_plan.json \
        [--model smollm2-135m-instruct] [--kl-budget 2e-4]

The plan file is the one `--sage-calibration-file` reads: per-layer KLs, the KL with every
layer in 8 bits, the layers kept exact and the KL measured with them; the start-up log line
(layers, KL, cache bytes per token) and the time it took go to stderr.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch

from sageserve.attention.base import BackendOptions
from sageserve.attention.sage_attn.backend import SageAttentionBackend
from sageserve.attention.sage_attn.options import DEFAULT_KL_BUDGET, SageOptions
from sageserve.models.loader import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="default: SmolLM2-135M-Instruct")
    parser.add_argument("--kl-budget", type=float, default=DEFAULT_KL_BUDGET)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    logging.basicConfig(level="INFO", format="%(message)s")
    if args.out.exists():
        parser.error(f"{args.out} exists: the plan would be read, not measured")
    loaded = load_model(args.model, dtype="float32", device="cpu")
    sage = SageOptions(calibrate=True, kl_budget=args.kl_budget, calibration_file=str(args.out))
    options = BackendOptions("auto", loaded.dtype, torch.device("cpu"), sage)
    backend = SageAttentionBackend(loaded.config.attention_shape(), options)
    start = time.monotonic()
    backend.prepare(loaded.model, loaded.tokenizer)
    logging.info("measured in %.0f s", time.monotonic() - start)


if __name__ == "__main__":
    main()
