"""ModelRunner: owns the model, the attention backend and the KV pool; runs one step."""

from __future__ import annotations

import logging

import torch

from sageserve.attention.base import AttentionBackend, StepAttention
from sageserve.attention.batch import ForwardBatch
from sageserve.config import DEFAULT_CPU_KV_TOKENS, CacheConfig, CudaGraphConfig
from sageserve.engine.cuda_graph import DecodeGraphRunner, decode_graph_runner
from sageserve.engine.piecewise_graph import PiecewiseGraphRunner, piecewise_graph_runner
from sageserve.engine.sampler import SamplingRow
from sageserve.models.llama import LlamaForCausalLM
from sageserve.startup_phases import startup_phase

logger = logging.getLogger(__name__)


def pool_num_pages(
    cache: CacheConfig, page_size: int, bytes_per_token: int, device: torch.device
) -> int:
    """How many pages of page_size tokens the KV pool gets (page 0, the null page, included).

    CUDA: what `mem_fraction_static` of the card leaves after the weights (already
    allocated when this runs), capped by `max_total_tokens` if given. CPU: a token budget,
    `max_total_tokens` or DEFAULT_CPU_KV_TOKENS.
    """
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        budget = int(total * cache.mem_fraction_static) - torch.cuda.memory_allocated(device)
        tokens = budget // bytes_per_token
        if cache.max_total_tokens is not None:
            tokens = min(tokens, cache.max_total_tokens)
    else:
        tokens = cache.max_total_tokens or DEFAULT_CPU_KV_TOKENS
    pages = tokens // page_size
    if pages < 1:
        raise ValueError(
            f"the KV pool would hold {max(tokens, 0)} tokens, less than one page of "
            f"{page_size}; raise --mem-fraction-static or --max-total-tokens"
        )
    return pages + 1


class ModelRunner:
    """Runs a ForwardBatch through the model and returns the logits it asked for.

    Once `setup_cuda_graphs` captured them (CUDA): decode-only steps replay a whole-step
    graph, other steps of up to `piecewise_max_tokens` tokens replay piecewise graphs
    around eager attention; every other step runs eagerly.
    """

    def __init__(
        self,
        model: LlamaForCausalLM,
        backend: AttentionBackend,
        cache: CacheConfig,
        device: torch.device,
        tokenizer: object | None = None,
    ) -> None:
        self.model = model
        self.backend = backend
        backend.prepare(model, tokenizer)
        self.device = device
        self.kv_spec = backend.kv_cache_spec()
        self.page_size = cache.page_size or backend.preferred_page_size()
        self.num_pages = pool_num_pages(cache, self.page_size, self.kv_spec.bytes_per_token, device)
        with startup_phase("allocate", "KV cache pool"):
            self.kv_cache = backend.allocate(self.num_pages, self.page_size)
        self.graph_runner: DecodeGraphRunner | None = None
        self.piecewise_runner: PiecewiseGraphRunner | None = None
        self._log_pool()

    @property
    def pool_capacity_tokens(self) -> int:
        """Tokens the pool can hold (the null page excluded)."""
        return (self.num_pages - 1) * self.page_size

    def _log_pool(self) -> None:
        gib = self.num_pages * self.page_size * self.kv_spec.bytes_per_token / 2**30
        logger.info(
            "KV cache: backend=%s, %s; %d pages x %d tokens = %d tokens (%.2f GiB)",
            self.backend.name,
            self.kv_spec.describe(),
            self.num_pages - 1,
            self.page_size,
            self.pool_capacity_tokens,
            gib,
        )

    def setup_cuda_graphs(
        self, config: CudaGraphConfig, max_running_requests: int, max_context: int
    ) -> None:
        """Capture decode graphs for contexts up to max_context tokens (capped by the pool),
        unless on CPU, disabled or unsupported by the backend (logged); then the piecewise
        graphs of other steps, unless on CPU or disabled."""
        max_context = min(max_context, self.pool_capacity_tokens)
        self.graph_runner = decode_graph_runner(
            self.model, self.backend, self.kv_cache, config, max_running_requests, max_context
        )
        if self.device.type == "cuda" and not config.disable:
            self.piecewise_runner = piecewise_graph_runner(
                self.model, self.backend, self.kv_cache, config.piecewise_max_tokens
            )

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        """Logits of the tokens in batch.logits_indices: [num_logits, vocab] float32."""
        if self.graph_runner is not None and self.graph_runner.can_run(batch):
            return self.graph_runner.run(batch)
        if self.piecewise_runner is not None and self.piecewise_runner.can_run(batch):
            return self.piecewise_runner.run(batch)
        return self.forward_eager(batch)

    @torch.inference_mode()
    def forward_and_sample(
        self, batch: ForwardBatch, rows: list[SamplingRow] | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`forward`, and the step's tokens [num_seqs] int64 sampled on the device when the
        decode graphs' sampling graphs take the step (`DecodeGraphRunner.sample_mode_for`);
        else None, and the caller samples the logits.

        rows: one per sequence, in the batch's order, or None when the step samples
        other rows than one per sequence.
        """
        graphs = self.graph_runner
        covered = graphs is not None and rows is not None
        mode = graphs.sample_mode_for(batch, rows) if covered else None
        if mode is None:
            return self.forward(batch), None
        assert graphs is not None and rows is not None
        return graphs.run_and_sample(batch, rows, mode)

    @torch.inference_mode()
    def forward_eager(self, batch: ForwardBatch) -> torch.Tensor:
        """`forward` without CUDA graphs: metadata built for this step, every kernel launched."""
        meta = self.backend.build_metadata(batch)
        attn = StepAttention(self.backend, self.kv_cache, meta)
        hidden = self.model(batch.input_ids, batch.positions, attn)
        return self.model.compute_logits(hidden[batch.logits_indices])
