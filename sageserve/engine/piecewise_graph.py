"""Piecewise CUDA graphs: steps with prefill replayed layer by layer, attention run eagerly.

A step that mixes a prefill chunk into the decodes cannot replay a decode graph: its
attention depends on every sequence's query and key lengths. Run eagerly, its few hundred
launches from Python take ~25 ms on an H100/H200 with an 8B model, whatever the chunk's
size, and every decoding request waits that long for its next token. Here the step is cut
at its attention calls, as vLLM's piecewise graphs are: everything between two attention
calls (o_proj, norms, MLP, the next layer's QKV projection and rotary, and the layer's K/V
store) is captured per padded token count (`graph_sizes.padded_token_count`), and only
attention (the prefill and decode kernels) launches eagerly between the replays, with the
metadata the backend builds for the step as in an eager step.

The K/V store sits inside the pieces when the backend has a piece store
(`AttentionBackend.piece_store`: static tables of where each row goes, every row past the
step's tokens padding, rewritten on the device before each step by `write_piece_store`):
one eager launch a layer less, whose host time (~50 µs a Triton launch on an H100 machine)
paces a mixed step whose chunk is short. A backend without one (the torch reference, the
8-bit reference path) stores with its attention, eagerly.

Capture (start-up, CUDA only): for each token count, largest first, into one memory pool,
the model runs over static input ids and positions [2, size] with an attention context
(`_Boundary`) that stores the layer's k, v through the piece store (or copies them into
static buffers), copies q into a static buffer (shared by every layer and size), ends the
graph being captured, begins the next one and returns a static output buffer. A model of
L layers gives L + 1 graphs; the last ends with the final norm.

Replay: ids and positions go into the first n rows, the step's slots into the piece store;
then for each layer: replay its graph, run the backend's attention over the first n rows
of the static q straight into the static output; then the last graph. Logits are computed
eagerly from the hidden rows the step asked for. Padded rows keep the ids and positions an
earlier step left: they compute values nobody reads, store where nothing is read, and no
row's result depends on another row's.

Cost of the cut: per layer one copy of q into its static buffer (in the graph; k and v too
without a piece store); attention writes its output where the next piece reads it.

`capture=False` runs the same static-buffer path eagerly: how it is tested on CPU.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from sageserve.attention.base import AttentionBackend, StepAttention
from sageserve.attention.batch import ForwardBatch
from sageserve.attention.graph_sizes import padded_token_count, piecewise_token_counts
from sageserve.models.llama import LlamaForCausalLM

logger = logging.getLogger(__name__)

# Eager runs before each capture, as for the decode graphs (cuda_graph.WARMUP_RUNS).
WARMUP_RUNS = 2


@dataclass
class StaticQKV:
    """q [size, Hq, D], k and v [size, Hkv, D] in the model dtype: where every layer's
    piece leaves its projections for the eager attention (the first `size` rows are used)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    out: torch.Tensor  # [size, Hq, D]: attention's output, the next piece's input


@dataclass
class PiecewiseStep:
    """One token count: static inputs [2, size] int64 (ids, positions), the layer ids in
    the order the model attends, the L + 1 graphs and the final hidden [size, hidden]."""

    size: int
    inputs: torch.Tensor
    layer_ids: list[int] = field(default_factory=list)
    graphs: list[torch.cuda.CUDAGraph] = field(default_factory=list)
    hidden: torch.Tensor | None = None


StoreLayer = Callable[[int, torch.Tensor, torch.Tensor], None]


class _Boundary:
    """The attention context of the static path: stores each layer's k, v through the
    backend's piece store (or copies them into the static buffers when it has none), copies
    q, calls `at_attention(layer_id)` and returns the static output.

    at_attention ends one graph and begins the next while capturing, runs the step's
    attention over the first n rows when not capturing (capture=False), or is None while
    warming up for a capture (no attention: the pieces never contain it). store_layer:
    `(layer_id, k, v)` stores the layer's size rows, inside the piece; None: the backend
    stores with its attention, eagerly."""

    def __init__(
        self,
        buffers: StaticQKV,
        size: int,
        at_attention: Callable[[int], None] | None = None,
        store_layer: StoreLayer | None = None,
    ) -> None:
        self.buffers, self.size = buffers, size
        self.at_attention, self.store_layer = at_attention, store_layer

    def attend(
        self, layer_id: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        """q: [size, Hq, D]; k, v: [size, Hkv, D] -> the static output [size, Hq, D]."""
        b, size = self.buffers, self.size
        b.q[:size].copy_(q)
        if self.store_layer is not None:
            self.store_layer(layer_id, k, v)
        else:
            b.k[:size].copy_(k)
            b.v[:size].copy_(v)
        if self.at_attention is not None:
            self.at_attention(layer_id)
        return b.out[:size]


class PiecewiseGraphRunner:
    """Steps of up to max(token_counts) tokens, replayed in pieces around eager attention
    (see the module docstring), or (capture=False) run eagerly over the same buffers."""

    def __init__(
        self,
        model: LlamaForCausalLM,
        backend: AttentionBackend,
        kv_cache: Any,
        token_counts: list[int],
        capture: bool = True,
    ) -> None:
        """token_counts: sizes from `graph_sizes.piecewise_token_counts`. capture needs the
        model on a CUDA device."""
        bad = [n for n in token_counts if n != padded_token_count(n)]
        if bad or not token_counts:
            raise ValueError(f"token counts {token_counts} must be piecewise graph sizes")
        self.device = next(model.parameters()).device
        if capture and self.device.type != "cuda":
            raise ValueError("capturing CUDA graphs needs CUDA (capture=False runs eagerly)")
        self.model, self.backend, self.kv_cache = model, backend, kv_cache
        self.token_counts = sorted(token_counts)
        self.buffers = _static_qkv(model, self.token_counts[-1], self.device)
        self.piece_store = backend.piece_store(kv_cache, self.token_counts[-1])
        self.num_runs = 0
        self.capture_seconds = 0.0
        start = time.perf_counter()
        with torch.inference_mode():
            self.steps = {n: self._static_step(n) for n in self.token_counts}
            if capture:
                self._capture_all()
                self.capture_seconds = time.perf_counter() - start

    def _static_step(self, size: int) -> PiecewiseStep:
        return PiecewiseStep(size, torch.zeros(2, size, dtype=torch.int64, device=self.device))

    def can_run(self, batch: ForwardBatch) -> bool:
        """True for a step of at least one and at most max(token_counts) tokens."""
        return 0 < batch.num_tokens <= self.token_counts[-1]

    @torch.inference_mode()
    def run(self, batch: ForwardBatch) -> torch.Tensor:
        """Logits of the tokens in batch.logits_indices: [num_logits, vocab] float32, as
        ModelRunner.forward. ValueError for a step `can_run` refuses."""
        if not self.can_run(batch):
            raise ValueError(f"a step of {batch.num_tokens} tokens has no piecewise graph")
        n = batch.num_tokens
        step = self.steps[padded_token_count(n)]
        step.inputs[0, :n].copy_(batch.input_ids)
        step.inputs[1, :n].copy_(batch.positions)
        if self.piece_store is not None:
            self.backend.write_piece_store(self.piece_store, batch, step.size)
        attn = StepAttention(self.backend, self.kv_cache, self.backend.build_metadata(batch))
        self.num_runs += 1
        if step.graphs:
            hidden = self._replay(step, attn, n)
        else:
            at_attention = functools.partial(self._attend, attn, n=n)
            store_layer = self._store_layer(step.size)
            boundary = _Boundary(self.buffers, step.size, at_attention, store_layer)
            hidden = self.model(step.inputs[0], step.inputs[1], boundary)
        return self.model.compute_logits(hidden[batch.logits_indices])

    def _attend(self, attn: StepAttention, layer_id: int, n: int) -> None:
        """Layer layer_id's attention over the first n rows of the static q (and k, v when
        the backend stores with its attention), into the static output."""
        b = self.buffers
        if self.piece_store is not None:
            attn.attend_stored(layer_id, b.q[:n], b.out[:n])
        else:
            attn.attend(layer_id, b.q[:n], b.k[:n], b.v[:n], out=b.out[:n])

    def _store_layer(self, size: int) -> StoreLayer | None:
        """How the pieces of `size` tokens store a layer's k, v: through the backend's piece
        store, or None when it has none (its attention stores them, eagerly)."""
        store = self.piece_store
        if store is None:
            return None
        backend, cache = self.backend, self.kv_cache
        return lambda layer_id, k, v: backend.store(layer_id, k, v, cache, store, size)

    def _replay(self, step: PiecewiseStep, attn: StepAttention, n: int) -> torch.Tensor:
        """The pieces in capture order, each layer's attention between: hidden [size, H]."""
        for graph, layer_id in zip(step.graphs, step.layer_ids, strict=False):
            graph.replay()
            self._attend(attn, layer_id, n)
        step.graphs[-1].replay()
        return step.hidden

    def _capture_all(self) -> None:
        """Capture every token count, largest first, into one memory pool, all on one side
        stream (cuBLAS keeps a workspace per stream), then replay every graph once: a
        graph's first launch uploads it, which a user's step should not wait for."""
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.device)
        for size in reversed(self.token_counts):
            step = self.steps[size]
            self._warm_up(step, stream)
            self._capture(step, pool, stream)
        for step in self.steps.values():
            for graph in step.graphs:
                graph.replay()
        torch.cuda.synchronize(self.device)

    def _capture(self, step: PiecewiseStep, pool: Any, stream: torch.cuda.Stream) -> None:
        """One graph per piece: `_Boundary` ends the current capture at every attention call."""

        def begin() -> None:
            step.graphs.append(torch.cuda.CUDAGraph())
            step.graphs[-1].capture_begin(pool=pool)

        def cut(layer_id: int) -> None:
            step.graphs[-1].capture_end()
            step.layer_ids.append(layer_id)
            begin()

        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            begin()
            try:
                ids, positions = step.inputs
                boundary = _Boundary(self.buffers, step.size, cut, self._store_layer(step.size))
                step.hidden = self.model(ids, positions, boundary)
            finally:
                step.graphs[-1].capture_end()
        torch.cuda.current_stream(self.device).wait_stream(stream)

    def _warm_up(self, step: PiecewiseStep, stream: torch.cuda.Stream) -> None:
        # On the side stream, as torch's capture recipe does: compiles the pieces' Triton
        # kernels and sets up cuBLAS for this row count, none of which may happen in a capture.
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            boundary = _Boundary(self.buffers, step.size, None, self._store_layer(step.size))
            for _ in range(WARMUP_RUNS):  # the store's padding rows go where nothing is read
                self.model(step.inputs[0], step.inputs[1], boundary)
        torch.cuda.current_stream(self.device).wait_stream(stream)


def _static_qkv(model: LlamaForCausalLM, rows: int, device: torch.device) -> StaticQKV:
    """Zeroed buffers for `rows` tokens in the model's dtype (see StaticQKV)."""
    cfg = model.config
    dtype = next(model.parameters()).dtype

    def buffer(heads: int) -> torch.Tensor:
        return torch.zeros(rows, heads, cfg.head_dim, dtype=dtype, device=device)

    q_heads, kv_heads = cfg.num_q_heads, cfg.num_kv_heads
    return StaticQKV(buffer(q_heads), buffer(kv_heads), buffer(kv_heads), buffer(q_heads))


def piecewise_graph_runner(
    model: LlamaForCausalLM, backend: AttentionBackend, kv_cache: Any, max_tokens: int
) -> PiecewiseGraphRunner | None:
    """The engine's piecewise runner for steps of up to max_tokens tokens (rounded down to
    a graph size), or None when there is none to capture (max_tokens below the smallest
    size; the caller checks CUDA and --disable-cuda-graph). Logs the sizes, time, memory."""
    counts = piecewise_token_counts(max_tokens)
    if not counts:
        logger.info("piecewise CUDA graphs off: steps with prefill run eagerly")
        return None
    device = next(model.parameters()).device
    reserved = torch.cuda.memory_reserved(device)
    logger.info("CUDA graphs: capturing steps with prefill for token counts %s ...", counts)
    runner = PiecewiseGraphRunner(model, backend, kv_cache, counts)
    logger.info(
        "CUDA graphs: %d pieces per step captured for token counts up to %d in %.1f s, "
        "%.0f MiB, K/V stored %s; longer steps with prefill run eagerly",
        len(runner.steps[counts[-1]].graphs),
        counts[-1],
        runner.capture_seconds,
        (torch.cuda.memory_reserved(device) - reserved) / 2**20,
        "inside the pieces" if runner.piece_store is not None else "eagerly with attention",
    )
    return runner
