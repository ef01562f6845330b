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

Sampling (`run_and_sample`): each size also has one small graph per `SampleMode`
(sageserve/engine/static_sampler.py), captured on the same pool, that samples the forward
graph's logits with per-row parameters held in static buffers. A step whose rows the
static sampler covers replays the forward graph, then its mode's sampling graph; the engine
samples the others with the eager `Sampler`. Both pick the same tokens.

The backends plan a decode's splits for the padded batch size in eager steps too, so a
step's attention is the same replayed or eager (sageserve/attention/graph_sizes.py).

`capture=False` runs the same static-buffer path eagerly, without a graph: that is how it is
tested on CPU (Triton's interpreter), where graphs do not exist.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from sageserve.attention.base import AttentionBackend, GraphMetadata, StepAttention
from sageserve.attention.batch import ForwardBatch
from sageserve.attention.graph_sizes import graph_batch_sizes, padded_batch_size
from sageserve.config import CudaGraphConfig
from sageserve.engine.sampler import SamplingRow
from sageserve.engine.static_sampler import (
    SampleMode,
    StaticRowParams,
    sample_mode,
    sample_static,
)
from sageserve.models.llama import LlamaForCausalLM

logger = logging.getLogger(__name__)

# Eager runs before each capture: the first compiles the Triton kernels and sets up cuBLAS
# (neither may happen inside a capture), the second runs warm, as torch's recipe does.
WARMUP_RUNS = 2


@dataclass
class StaticStep:
    """One padded batch size: its static inputs, the backend's metadata, its graph.

    inputs: [2, batch_size] int64 (input ids, positions). logits: [batch_size, vocab] fp32,
    the captured graph's output (None until captured, or when not capturing). row_params:
    the rows' sampling parameters; sample_graphs / sampled: per mode, the sampling graph and
    its output tokens [batch_size] int64 (empty until captured).
    """

    batch_size: int
    inputs: torch.Tensor
    graph_meta: GraphMetadata
    row_params: StaticRowParams
    graph: torch.cuda.CUDAGraph | None = None
    logits: torch.Tensor | None = None
    sample_graphs: dict[SampleMode, torch.cuda.CUDAGraph] = field(default_factory=dict)
    sampled: dict[SampleMode, torch.Tensor] = field(default_factory=dict)


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
        sample_in_graph: bool = True,
    ) -> None:
        """batch_sizes: graph sizes (see graph_sizes); max_context: the longest context
        (kv_len) a replayed step may have. capture needs the model on a CUDA device.
        sample_in_graph: capture the sampling graphs too (`run_and_sample`)."""
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
        self.sample_in_graph = sample_in_graph
        self.batch_sizes = sorted(batch_sizes)
        self.num_runs = 0  # steps run through the static path (replays when captured)
        self.num_sampled = 0  # of those, steps sampled by the static sampler
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
        row_params = StaticRowParams.allocate(batch_size, self.device)
        return StaticStep(batch_size, inputs, graph_meta, row_params)

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
        _, logits = self._run_forward(batch)
        # A gather: a new tensor, so the next replay cannot overwrite what the step returns.
        return logits[batch.logits_indices]

    def sample_mode_for(self, batch: ForwardBatch, rows: list[SamplingRow]) -> SampleMode | None:
        """The mode whose sampling graph takes this step, or None when the step is not one
        `run_and_sample` covers: sampling graphs off, a step `can_run` refuses, other than
        one logits row per sequence, or rows the static sampler leaves to `Sampler`."""
        one_row_each = len(rows) == batch.num_seqs == batch.logits_indices.numel()
        if not (self.sample_in_graph and one_row_each and self.can_run(batch)):
            return None
        return sample_mode(rows)

    @torch.inference_mode()
    def run_and_sample(
        self, batch: ForwardBatch, rows: list[SamplingRow], mode: SampleMode
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`run`, then one token per sequence sampled on the device by the static sampler.

        rows: one per sequence, in the batch's order; mode: `sample_mode_for(batch, rows)`.
        Returns the logits [num_seqs, vocab] float32 and the tokens [num_seqs] int64.
        """
        if len(rows) != batch.num_seqs or batch.logits_indices.numel() != batch.num_seqs:
            raise ValueError("the static sampler samples exactly one row per sequence")
        step, logits = self._run_forward(batch)
        if mode is not SampleMode.GREEDY:  # the argmax reads no parameter
            step.row_params.fill(rows, logits.shape[1])
        self.num_sampled += 1
        if mode in step.sample_graphs:
            step.sample_graphs[mode].replay()
            tokens = step.sampled[mode]
        else:
            tokens = sample_static(logits, step.row_params, mode)
        # Copies, so that the next replay cannot overwrite what the step returns.
        return logits[batch.logits_indices], tokens[: batch.num_seqs].clone()

    def _run_forward(self, batch: ForwardBatch) -> tuple[StaticStep, torch.Tensor]:
        """The forward pass over the step's padded size: the step and the logits of every
        row [bs, vocab] (the graph's output buffer when replayed)."""
        if not self.can_run(batch):
            raise ValueError("this step is not a decode step the CUDA graphs cover")
        n = batch.num_seqs
        step = self.steps[padded_batch_size(n)]
        step.inputs[0, :n].copy_(batch.input_ids)
        step.inputs[1, :n].copy_(batch.positions)
        self.backend.graph_update(step.graph_meta, batch)
        self.num_runs += 1
        if step.graph is None:
            return step, self._forward(step)
        step.graph.replay()
        assert step.logits is not None
        return step, step.logits

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
            self._warm_up(functools.partial(self._forward, step))
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                step.logits = self._forward(step)
            step.graph, pool = graph, graph.pool()
            for mode in SampleMode if self.sample_in_graph else ():
                self._capture_sampling(step, mode, pool)
        torch.cuda.synchronize(self.device)

    def _capture_sampling(self, step: StaticStep, mode: SampleMode, pool: Any) -> None:
        """The mode's sampling graph over the captured logits and the step's row params."""
        logits = step.logits
        assert logits is not None
        self._warm_up(lambda: sample_static(logits, step.row_params, mode))
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            step.sampled[mode] = sample_static(logits, step.row_params, mode)
        step.sample_graphs[mode] = graph

    def _warm_up(self, work: Callable[[], object]) -> None:
        # On a side stream, as torch's capture recipe does, so that the capture stream
        # starts from a clean state.
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(WARMUP_RUNS):
                work()
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
    runner = DecodeGraphRunner(
        model, backend, kv_cache, sizes, max_context, sample_in_graph=not config.disable_sampling
    )
    logger.info(
        "CUDA graphs: decode captured for batch sizes %s (contexts up to %d tokens) in %.1f s, "
        "%.0f MiB, sampling %s; larger decode batches and steps with prefill run eagerly",
        sizes,
        max_context,
        runner.capture_seconds,
        (torch.cuda.memory_reserved(device) - reserved) / 2**20,
        "in the graphs" if runner.sample_in_graph else "eager (--disable-cuda-graph-sampling)",
    )
    return runner
