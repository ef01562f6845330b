"""The attention backend contract.

A backend owns its KV cache layout (dtype, page shape, any scale tensors) because the 8-bit
backend stores different things than the 16-bit ones. Per step the engine asks it for
metadata once (`build_metadata`), then every layer calls `forward` with that metadata.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from sageserve.engine.batch import ForwardBatch
from sageserve.models.config import ModelConfig

KV_DTYPES: dict[str, torch.dtype] = {
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
    "fp32": torch.float32,
}


@dataclass(frozen=True)
class KVCacheSpec:
    """What one token costs in the cache, over all layers, K and V, scales included."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype_name: str
    bytes_per_token: int

    def describe(self) -> str:
        return (
            f"{self.dtype_name}, {self.bytes_per_token} bytes/token over {self.num_layers} layers"
        )


@dataclass(frozen=True)
class BackendOptions:
    """Launch-time choices a backend may read (resolved, no "auto")."""

    kv_cache_dtype: str
    model_dtype: torch.dtype
    device: torch.device
    extra: tuple[tuple[str, Any], ...] = ()


class AttentionBackend(ABC):
    """One attention implementation over its own paged KV cache."""

    name: ClassVar[str]

    def __init__(self, model_config: ModelConfig, options: BackendOptions) -> None:
        reasons = self.unsupported_reasons(model_config, options)
        if reasons:
            raise ValueError(
                f"attention backend {self.name!r} cannot run this model: " + "; ".join(reasons)
            )
        self.model_config = model_config
        self.options = options

    @classmethod
    def unsupported_reasons(cls, model_config: ModelConfig, options: BackendOptions) -> list[str]:
        """Why this backend cannot serve this configuration; empty when it can."""
        return []

    def prepare(self, model: torch.nn.Module, tokenizer: Any | None) -> None:  # noqa: B027
        """Run once after the weights are loaded, before the first step (e.g. calibration).

        Optional: the default does nothing.
        """

    @abstractmethod
    def kv_cache_spec(self) -> KVCacheSpec:
        """Bytes per token and dtype of this backend's cache for the model."""

    def preferred_page_size(self) -> int:
        """Tokens per page when the user names none (`--page-size`): what this backend's
        kernels run fastest with. Any page size >= 1 must still work."""
        return 16

    @abstractmethod
    def allocate(self, num_pages: int, page_size: int) -> Any:
        """Allocate the whole KV pool: num_pages pages of page_size tokens, every layer."""

    @abstractmethod
    def build_metadata(self, batch: ForwardBatch) -> Any:
        """Everything `forward` needs about the step, computed once per step."""

    @abstractmethod
    def forward(
        self,
        layer_id: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: Any,
        meta: Any,
    ) -> torch.Tensor:
        """Store this step's k, v in the cache, then attend over each sequence's keys.

        q: [num_tokens, num_q_heads, head_dim]; k, v: [num_tokens, num_kv_heads, head_dim].
        Returns [num_tokens, num_q_heads, head_dim] in q's dtype.
        """


class StepAttention:
    """The `AttentionContext` a model sees for one step: backend + cache + metadata."""

    def __init__(self, backend: AttentionBackend, kv_cache: Any, meta: Any) -> None:
        self.backend = backend
        self.kv_cache = kv_cache
        self.meta = meta

    def attend(
        self, layer_id: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        """q: [T, Hq, D]; k, v: [T, Hkv, D] -> [T, Hq, D]."""
        return self.backend.forward(layer_id, q, k, v, self.kv_cache, self.meta)
