"""ForwardBatch: everything one engine step feeds the model, as a flat token dimension."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SequenceSlice:
    """One sequence's share of a step.

    ```
    keys of the sequence:  | prefix (already cached) | query (computed this step) |
                           0                      prefix_len                     kv_len
    ```
    A prefill chunk has query_len >= 1 (after a cached prefix when prefix_len > 0); a
    decode step is query_len == 1. Query token i sits at absolute position prefix_len + i
    and sees keys 0 .. prefix_len + i (causal mask aligned bottom-right).
    """

    page_table: tuple[int, ...]
    prefix_len: int
    query_len: int

    @property
    def kv_len(self) -> int:
        return self.prefix_len + self.query_len


@dataclass
class ForwardBatch:
    """One step: the scheduled sequences' new tokens, concatenated.

    input_ids, positions, slot_mapping: [num_tokens] int64 on the model's device.
    slot_mapping[t] = page * page_size + offset: where token t's K and V are stored.
    logits_indices: [num_logits] int64 -- the tokens whose hidden states reach the LM head.
    """

    seqs: list[SequenceSlice]
    page_size: int
    input_ids: torch.Tensor
    positions: torch.Tensor
    slot_mapping: torch.Tensor
    logits_indices: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_seqs(self) -> int:
        return len(self.seqs)

    @property
    def is_decode_only(self) -> bool:
        return all(s.query_len == 1 for s in self.seqs)


def build_forward_batch(
    seqs: list[SequenceSlice],
    token_ids: list[list[int]],
    logits_indices: list[int],
    page_size: int,
    device: torch.device,
) -> ForwardBatch:
    """Assemble a ForwardBatch on `device` from host-side slices.

    token_ids[i]: the query_len new token ids of seqs[i].
    """
    positions: list[int] = []
    slots: list[int] = []
    for seq in seqs:
        for pos in range(seq.prefix_len, seq.kv_len):
            positions.append(pos)
            slots.append(seq.page_table[pos // page_size] * page_size + pos % page_size)
    flat_ids = [t for ids in token_ids for t in ids]
    assert len(flat_ids) == len(positions), "token ids do not match the query lengths"

    def as_tensor(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int64).to(device, non_blocking=True)

    return ForwardBatch(
        seqs=seqs,
        page_size=page_size,
        input_ids=as_tensor(flat_ids),
        positions=as_tensor(positions),
        slot_mapping=as_tensor(slots),
        logits_indices=as_tensor(logits_indices),
    )
