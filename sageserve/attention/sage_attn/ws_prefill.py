"""`--sage-impl gluon`: when the warp-specialized Hopper prefill (`kernels/gluon`) can serve.

It serves prefill chunks only: the quantizing store and the decode stay on the Triton
kernels. Everything it does not cover is refused at start-up with the flag that does.
"""

from __future__ import annotations

import torch

from sageserve.attention.base import AttentionShape, BackendOptions
from sageserve.attention.sage_attn.kernels.gluon.config import HEAD_DIMS, KEYS

GLUON_DTYPES = (torch.bfloat16, torch.float16)


def gluon_unsupported_reasons(
    balance_qk: bool, shape: AttentionShape, options: BackendOptions
) -> list[str]:
    """Why `--sage-impl gluon` cannot serve this model on this device (empty: it can)."""
    reasons = []
    device = options.device
    if device.type != "cuda":
        reasons.append(f"--sage-impl gluon needs an sm_90 GPU (H100/H200); the device is "
                       f"{device} (--sage-impl triton or reference run elsewhere)")  # fmt: skip
    elif not torch.cuda.is_available():
        reasons.append("--sage-impl gluon needs an sm_90 GPU (H100/H200); no CUDA device is "
                       "available (--sage-impl reference runs on CPU)")  # fmt: skip
    elif (cap := torch.cuda.get_device_capability(device)) != (9, 0):
        reasons.append(
            f"--sage-impl gluon needs an sm_90 GPU (H100/H200); "
            f"{torch.cuda.get_device_name(device)} is sm_{cap[0]}{cap[1]} "
            "(--sage-impl triton runs on any CUDA GPU)"
        )
    if shape.head_dim not in HEAD_DIMS:
        reasons.append(f"--sage-impl gluon covers head_dim {HEAD_DIMS}, not "
                       f"{shape.head_dim} (--sage-impl triton)")  # fmt: skip
    if options.model_dtype not in GLUON_DTYPES:
        reasons.append(f"--sage-impl gluon needs a bf16 or fp16 model, not "
                       f"{options.model_dtype} (--dtype bfloat16, or --sage-impl "
                       "triton)")  # fmt: skip
    if balance_qk:
        reasons.append("--sage-qk-balance: the Gluon prefill has no channel balance (drop the "
                       "flag, or --sage-impl triton)")  # fmt: skip
    return reasons


def check_gluon_page_size(page_size: int) -> None:
    """ValueError unless the pool's pages are the Gluon prefill's key blocks."""
    if page_size != KEYS:
        raise ValueError(
            f"--sage-impl gluon reads keys in whole pages of {KEYS} tokens; the "
            f"pool has pages of {page_size} (--page-size {KEYS}, or --sage-impl "
            "triton)"
        )
