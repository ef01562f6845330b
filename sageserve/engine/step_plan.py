"""Which logits a step needs: one row per sampled token, one per prompt logprob position."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from sageserve.attention.batch import ForwardBatch, SequenceSlice, build_forward_batch
from sageserve.engine.scheduler import ScheduledChunk


@dataclass
class ChunkPlan:
    """Where one chunk's logits land in the step's logits matrix.

    prompt_positions[i] is a prompt position j whose logits row prompt_rows[i] scores
    token j + 1 (teacher-forced prompt logprobs). sample_row is the row the next token is
    sampled from, or None when the chunk does not reach the end of the sequence (or the
    request generates nothing). reaches_end is fixed when planned: the chunk's request
    moves on once the step is accounted. pending_input is the index, in the step's flat
    token dimension, of an input whose value is still on the device (the request's last
    token, sampled by the step queued before; the engine fills it in on the device), or
    None.
    """

    chunk: ScheduledChunk
    reaches_end: bool
    prompt_positions: list[int] = field(default_factory=list)
    prompt_rows: list[int] = field(default_factory=list)
    sample_row: int | None = None
    pending_input: int | None = None


def _prompt_logprob_positions(chunk: ScheduledChunk) -> range:
    req = chunk.request
    if req.prompt_logprobs is None or req.num_output_tokens > 0:
        return range(0)
    start = req.num_computed_tokens
    first = max(start, req.prompt_logprob_start - 1)
    return range(first, min(start + chunk.num_new_tokens, req.num_prompt_tokens - 1))


def _known_inputs(chunk: ScheduledChunk, plan: ChunkPlan, token_offset: int) -> list[int]:
    """The chunk's input ids, 0 in place of a pending token (whose index goes to plan)."""
    req, start, n = chunk.request, chunk.request.num_computed_tokens, chunk.num_new_tokens
    known = req.token_ids[start : start + n]
    missing = n - len(known)
    if missing:
        # Only the last token of a sequence can be pending, and only one.
        assert missing == 1 and req.num_pending_tokens == 1, (missing, req.num_pending_tokens)
        plan.pending_input = token_offset + n - 1
        known.append(0)
    return known


def plan_step(
    chunks: list[ScheduledChunk], page_size: int, device: torch.device
) -> tuple[ForwardBatch, list[ChunkPlan]]:
    """Build the step's ForwardBatch and, per chunk, the logits rows it reads."""
    seqs: list[SequenceSlice] = []
    token_ids: list[list[int]] = []
    logits_indices: list[int] = []
    plans: list[ChunkPlan] = []
    token_offset = 0
    for chunk in chunks:
        req, start, n = chunk.request, chunk.request.num_computed_tokens, chunk.num_new_tokens
        seqs.append(SequenceSlice(tuple(req.page_table), start, n))
        plan = ChunkPlan(chunk, reaches_end=chunk.completes_sequence)
        token_ids.append(_known_inputs(chunk, plan, token_offset))
        for pos in _prompt_logprob_positions(chunk):
            plan.prompt_positions.append(pos)
            plan.prompt_rows.append(len(logits_indices))
            logits_indices.append(token_offset + pos - start)
        if plan.reaches_end and req.params.max_new_tokens > 0:
            plan.sample_row = len(logits_indices)
            logits_indices.append(token_offset + n - 1)
        plans.append(plan)
        token_offset += n
    batch = build_forward_batch(seqs, token_ids, logits_indices, page_size, device)
    return batch, plans
