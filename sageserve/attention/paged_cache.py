"""The 16-bit paged KV cache, one layout shared by the `torch` and `triton` backends (and
the exact layers of `sage_attn`), so every 16-bit backend reads the same bytes."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sageserve.attention.base import KV_DTYPES


@dataclass
class PagedKVCache:
    """K and V of every layer: [num_layers, num_pages * page_size, num_kv_heads, head_dim].

    Token slot s = page * page_size + offset; page 0 is the null page.
    """

    k: torch.Tensor
    v: torch.Tensor
    page_size: int

    @property
    def num_pages(self) -> int:
        return self.k.shape[1] // self.page_size


def resolve_kv_dtype(kv_cache_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    """ "auto" stores K and V in the model's dtype; 8-bit choices belong to sage_attn."""
    if kv_cache_dtype == "auto":
        return model_dtype
    if kv_cache_dtype not in KV_DTYPES:
        raise ValueError(
            f"kv_cache_dtype={kv_cache_dtype!r} is not supported by this backend; "
            f"choose one of: auto, {', '.join(KV_DTYPES)} "
            "(int8 needs --attention-backend sage_attn)"
        )
    return KV_DTYPES[kv_cache_dtype]
