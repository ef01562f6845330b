"""CUDA-graph decode: the model's decode step captured once per padded batch size, replayed.

Eager decode is host-bound: a step launches a few hundred kernels (tens per layer), each
from Python, and the GPU waits for them. A CUDA graph launches the whole step at once.

Capture (start-up, CUDA only): for every size of `graph_sizes.graph_batch_sizes(limit)`,
the forward pass -- embedding, every layer, final norm, LM head over every row -- is
captured over static buffers: input ids and positions [bs] int64, and the attention
backend's static metadata (`AttentionBackend.graph_metadata`). The graphs share one memory
pool and are captured largest first, so the smaller ones reuse its memory.

Replay: a decode-only step of n sequences, n padded to a captured size and every context
within max_context, copies its ids and positions into the first n rows, has the backend
write its tables (`graph_update`: padded rows attend to nothing and store nothing),
replays, and returns the logits rows the step asked for. Padded rows keep the ids and
positions an earlier step left (valid values): they compute logits nobody reads, and no
row's result depends on another row. Every other step runs eagerly.

The backends plan a decode's splits for the padded batch size in eager steps too, so a
step's attention is the same replayed or eager (sageserve/attention/graph_sizes.py).

`capture=False` runs the same static-buffer path eagerly, without a graph: that is how it is
tested on CPU (Triton's interpreter), where graphs do not exist.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import torch

from sageserve.attention.base import AttentionBackend, GraphMetadata, StepAttention
from sageserve.attention.batch import ForwardBatch
from sageserve.attention.graph_sizes import graph_batch_sizes, padded_batch_size
from sageserve.config import CudaGraphConfig
from sageserve.models.llama import LlamaForCausalLM

logger = logging.getLogger(__name__)

# Eager runs before each capture: the first compiles the Triton kernels and sets up cuBLAS
# (neither may happen inside a capture), the second runs warm, as torch's recipe does.
WARMUP_RUNS = 2


@dataclass
class StaticStep:
    """One padded batch size: its static inputs, the backend's metadata, its graph.

    inputs: [2, batch_size] int64 (input ids, positions). logits: [batch_size, vocab] fp32,
    the captured graph's output (None until captured, or when not capturing).
    """

    batch_size: int
    inputs: torch.Tensor
    graph_meta: GraphMetadata
    graph: torch.cuda.CUDAGraph | None = None
    logits: torch.Tensor | None = None


class DecodeGraphRunner:
    """Decode steps over static buffers: replayed from CUDA graphs, or (capture=False) run
    eagerly over the same buffers."""

    def __init__(
        self,
        model: LlamaForCausalLM,
        backend: AttentionBackend,
        kv_cache: Any,
        batch_sizes: list[int],
        max_context: int,
        capture: bool = True,
    ) -> None:
        """batch_sizes: graph sizes (see graph_sizes); max_context: the longest context
        (kv_len) a replayed step may have. capture needs the model on a CUDA device."""
        reason = backend.cuda_graph_unsupported_reason()
        if reason is not None:
            raise ValueError(f"CUDA-graph decode is not possible: {reason}")
        bad = [bs for bs in batch_sizes if bs != padded_batch_size(bs)]
        if bad or not batch_sizes:
            raise ValueError(f"batch sizes {batch_sizes} must be graph sizes (graph_sizes.py)")
        self.device = next(model.parameters()).device
        if capture and self.device.type != "cuda":
            raise ValueError("capturing CUDA graphs needs CUDA (capture=False runs eagerly)")
        self.model, self.backend, self.kv_cache = model, backend, kv_cache
        self.max_context = max_context
        self.batch_sizes = sorted(batch_sizes)
        self.num_runs = 0  # steps run through the static path (replays when captured)
        self.capture_seconds = 0.0
        start = time.perf_counter()
        with torch.inference_mode():
            self.steps = {bs: self._static_step(bs) for bs in self.batch_sizes}
            if capture:
                self._capture_all()
                self.capture_seconds = time.perf_counter() - start

    def _static_step(self, batch_size: int) -> StaticStep:
        inputs = torch.zeros(2, batch_size, dtype=torch.int64, device=self.device)
        graph_meta = self.backend.graph_metadata(self.kv_cache, batch_size, self.max_context)
        return StaticStep(batch_size, inputs, graph_meta)

    def can_run(self, batch: ForwardBatch) -> bool:
        """True for a decode-only step whose padded size was captured and whose contexts
        fit the static tables."""
        return (
            batch.num_seqs > 0
            and batch.is_decode_only
            and padded_batch_size(batch.num_seqs) in self.steps
            and max(seq.kv_len for seq in batch.seqs) <= self.max_context
        )

    @torch.inference_mode()
    def run(self, batch: ForwardBatch) -> torch.Tensor:
        """Logits of the tokens in batch.logits_indices: [num_logits, vocab] float32, as
        ModelRunner.forward. ValueError for a step `can_run` refuses."""
        if not self.can_run(batch):
            raise ValueError("this step is not a decode step the CUDA graphs cover")
        n = batch.num_seqs
        step = self.steps[padded_batch_size(n)]
        step.inputs[0, :n].copy_(batch.input_ids)
        step.inputs[1, :n].copy_(batch.positions)
        self.backend.graph_update(step.graph_meta, batch)
        self.num_runs += 1
        if step.graph is None:
            logits = self._forward(step)
        else:
            step.graph.replay()
            logits = step.logits
        # A gather: a new tensor, so the next replay cannot overwrite what the step returns.
        return logits[batch.logits_indices]

    def _forward(self, step: StaticStep) -> torch.Tensor:
        """The model over the step's static buffers: logits of every row [bs, vocab] fp32."""
        attn = StepAttention(self.backend, self.kv_cache, step.graph_meta.meta)
        ids, positions = step.inputs
        return self.model.compute_logits(self.model(ids, positions, attn))

    def _capture_all(self) -> None:
        """Capture every size, largest first, into one memory pool. The static metadata
        starts as all padding, so warm-up and capture touch no cache page."""
        pool = None
        for bs in reversed(self.batch_sizes):
            step = self.steps[bs]
            self._warm_up(step)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                step.logits = self._forward(step)
            step.graph, pool = graph, graph.pool()
        torch.cuda.synchronize(self.device)

    def _warm_up(self, step: StaticStep) -> None:
        # On a side stream, as torch's capture recipe does, so that the capture stream
        # starts from a clean state.
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(WARMUP_RUNS):
                self._forward(step)
        torch.cuda.current_stream(self.device).wait_stream(stream)


def decode_graph_runner(
    model: LlamaForCausalLM,
    backend: AttentionBackend,
    kv_cache: Any,
    config: CudaGraphConfig,
    max_running_requests: int,
    max_context: int,
) -> DecodeGraphRunner | None:
    """The engine's graph runner, or None when decode runs eagerly: on CPU (graphs do not
    exist there), with --disable-cuda-graph, or with a backend that cannot be captured (each
    logged, never an error). Captures on CUDA and logs the sizes, time and memory."""
    device = next(model.parameters()).device
    if device.type != "cuda":
        return None
    if config.disable:
        logger.info("CUDA graphs disabled (--disable-cuda-graph): decode runs eagerly")
        return None
    reason = backend.cuda_graph_unsupported_reason()
    if reason is not None:
        logger.info("CUDA graphs not used: %s; decode runs eagerly", reason)
        return None
    sizes = graph_batch_sizes(min(config.max_bs, padded_batch_size(max_running_requests)))
    reserved = torch.cuda.memory_reserved(device)
    logger.info("CUDA graphs: capturing decode for batch sizes %s ...", sizes)
    runner = DecodeGraphRunner(model, backend, kv_cache, sizes, max_context)
    logger.info(
        "CUDA graphs: decode captured for batch sizes %s (contexts up to %d tokens) in %.1f s, "
        "%.0f MiB; larger decode batches and steps with prefill run eagerly",
        sizes,
        max_context,
        runner.capture_seconds,
        (torch.cuda.memory_reserved(device) - reserved) / 2**20,
    )
    return runner
