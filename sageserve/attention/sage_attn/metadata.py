"""What the 8-bit backend's `forward` reads about a step, built once per step on the host:
the store slots, each sequence's query rows and pages (the reference path), and the Triton
kernels' tables (prefill chunks and decodes apart), or their static CUDA-graph form."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from sageserve.attention.base import GraphMetadata
from sageserve.attention.batch import ForwardBatch
from sageserve.attention.page_tables import padded_page_table

if TYPE_CHECKING:  # the kernels import triton, which the reference path does not need
    from sageserve.attention.sage_attn.kernels.decode import DecodeWorkspace


@dataclass
class SageSeq:
    """One sequence of the step: its query rows and the pages holding its keys."""

    q_start: int
    q_end: int
    kv_len: int
    pages: torch.Tensor  # [ceil(kv_len / page_size)] int64


@dataclass
class PrefillRows:
    """Sequences with more than one query row, for the prefill kernel (int32 on the device)."""

    page_table: torch.Tensor  # [B, max_pages], padded with the null page
    q_start: torch.Tensor  # [B]
    q_len: torch.Tensor  # [B]
    kv_len: torch.Tensor  # [B]
    max_q_len: int
    plan: torch.Tensor | None = None  # [items, 3] the Gluon prefill's work plan, when it runs


@dataclass
class DecodeRows:
    """Sequences with one query row (decodes), for the split-KV decode kernel."""

    page_table: torch.Tensor  # [B, max_pages] int32, padded with the null page
    q_rows: torch.Tensor  # [B] int32: the row of each sequence's query in the step
    kv_len: torch.Tensor  # [B] int32
    workspace: DecodeWorkspace  # per-split partials, shared by every layer of the step


@dataclass
class KernelMetadata:
    """What the Triton kernels read, built once per step; either part may be empty."""

    prefill: PrefillRows | None
    decode: DecodeRows | None


@dataclass
class SageMetadata:
    store_pages: torch.Tensor  # [num_tokens] page of each new token
    store_offsets: torch.Tensor  # [num_tokens] offset inside that page
    seqs: list[SageSeq]  # the reference path's; empty when the kernels run
    exact: object | None  # the exact layers' backend's metadata, when some layers are exact
    kernel: KernelMetadata | None  # set when the Triton kernels run


@dataclass
class SageGraphMetadata(GraphMetadata):
    """GraphMetadata plus the cache's scratch page, where padded rows store their K/V, and
    the exact layers' backend's own static metadata (None without exact layers)."""

    scratch_page: int
    exact: GraphMetadata | None = None


def reference_seqs(batch: ForwardBatch) -> list[SageSeq]:
    """Each sequence's query rows and the int64 pages holding its keys."""
    device, page_size = batch.input_ids.device, batch.page_size
    seqs, q_start = [], 0
    for seq in batch.seqs:
        num_pages = -(-seq.kv_len // page_size)
        pages = torch.tensor(seq.page_table[:num_pages], dtype=torch.int64, device=device)
        seqs.append(SageSeq(q_start, q_start + seq.query_len, seq.kv_len, pages))
        q_start += seq.query_len
    return seqs


def write_padding(graph_meta: SageGraphMetadata, first_row: int) -> None:
    """Rows first_row.. of the host tables: no pages, kv_len 0, store to the scratch page."""
    host = graph_meta.buffers.host
    host["page_table"][first_row:] = 0
    host["kv_len"][first_row:] = 0
    host["store_pages"][first_row:] = graph_meta.scratch_page
    host["store_offsets"][first_row:] = 0


def kernel_metadata(
    batch: ForwardBatch,
    workspace_for: Callable[[int], DecodeWorkspace],
    plan_heads: int | None = None,
) -> KernelMetadata:
    """Split the step's sequences into prefill chunks and decodes (one query row: a decode,
    or a one-token chunk, which is the same computation) and build each kernel's inputs.
    workspace_for(rows): the decode workspace for that many decodes. plan_heads: the query
    heads of the Gluon prefill's work plan (`kernels/gluon/plan.py`), None when it does
    not run."""
    device = batch.input_ids.device
    starts, start = [], 0
    for s in batch.seqs:
        starts.append(start)
        start += s.query_len
    decodes = [i for i, s in enumerate(batch.seqs) if s.query_len == 1]
    prefills = [i for i, s in enumerate(batch.seqs) if s.query_len > 1]

    def i32(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int32).to(device, non_blocking=True)

    def table(rows: list[int]) -> torch.Tensor:
        seqs = [batch.seqs[i] for i in rows]
        return padded_page_table(
            [s.page_table for s in seqs], [s.kv_len for s in seqs], batch.page_size, device
        )

    prefill = decode = None
    if prefills:
        seqs = [batch.seqs[i] for i in prefills]
        q_lens, kv_lens = [s.query_len for s in seqs], [s.kv_len for s in seqs]
        prefill = PrefillRows(
            page_table=table(prefills),
            q_start=i32([starts[i] for i in prefills]),
            q_len=i32(q_lens),
            kv_len=i32(kv_lens),
            max_q_len=max(q_lens),
            plan=None if plan_heads is None else _gluon_plan(q_lens, kv_lens, plan_heads, device),
        )
    if decodes:
        decode = DecodeRows(
            page_table=table(decodes),
            q_rows=i32([starts[i] for i in decodes]),
            kv_len=i32([batch.seqs[i].kv_len for i in decodes]),
            workspace=workspace_for(len(decodes)),
        )
    return KernelMetadata(prefill, decode)


def _gluon_plan(
    q_lens: list[int], kv_lens: list[int], heads: int, device: torch.device
) -> torch.Tensor:
    """[items, 3] int32 on the device: the Gluon prefill's causal work plan for the chunks."""
    from sageserve.attention.sage_attn.kernels.gluon.plan import work_plan

    plan = work_plan(q_lens, kv_lens, heads, causal=True)
    return torch.from_numpy(plan).to(device, non_blocking=True)
