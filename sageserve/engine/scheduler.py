"""Continuous batching: which requests compute how many tokens in the next step.

Every request is treated alike: it has `num_tokens` token ids of which
`num_computed_tokens` already have K/V in the cache; a step computes the next chunk of the
rest. A prefill chunk and a decode token differ only in chunk length, so one step mixes
both under one token budget (`chunked_prefill_size`). While some request decodes, the
prefill chunks of a step are held to `max_prefill_tokens_while_decoding` in all (0 or None
here: no cap; the engine resolves the config's default with `prefill_cap_while_decoding`):
a decode step that also prefills takes about as long as its prefill tokens, and every
decoding request waits for it (its inter-token latency).

Order: running requests first, in admission order; then waiting requests, first come
first served. When pages run out, the most recently admitted running request is preempted
(its pages released, recomputed later) -- never a crash.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from sageserve.config import SchedulerConfig
from sageserve.engine.block_manager import BlockManager
from sageserve.engine.request import Request, RequestStatus


def prefill_cap_while_decoding(
    asked: int | None, largest_piecewise_tokens: int | None, largest_decode_batch: int
) -> int:
    """The prefill tokens a step that decodes may hold (0: no cap), from the config's value:
    asked when given (0 included); by default, when piecewise graphs run steps of up to
    largest_piecewise_tokens, what leaves room for largest_decode_batch decodes beside it
    (the step stays one replay), else no cap."""
    if asked is not None:
        return asked
    if largest_piecewise_tokens is None:
        return 0
    return max(largest_piecewise_tokens - largest_decode_batch, largest_piecewise_tokens // 2)


@dataclass(frozen=True)
class ScheduledChunk:
    """request computes tokens [num_computed_tokens, num_computed_tokens + num_new_tokens)."""

    request: Request
    num_new_tokens: int

    @property
    def completes_sequence(self) -> bool:
        """True when this chunk reaches the last token: the step then samples one."""
        req = self.request
        return req.num_computed_tokens + self.num_new_tokens == req.num_tokens


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk]
    preempted: list[Request]
    unservable: list[Request]

    @property
    def num_tokens(self) -> int:
        return sum(c.num_new_tokens for c in self.chunks)


def _is_decoding(req: Request) -> bool:
    """True for a request past its prompt with one token to compute: a decode."""
    return req.num_output_tokens > 0 and req.num_uncomputed_tokens == 1


class _StepBudget:
    """Tokens a step may still compute: `total` (decodes and prefills), `prefill` (prefill
    chunks only; below total while some request decodes)."""

    def __init__(self, total: int) -> None:
        self.total = self.prefill = total

    @property
    def prefill_left(self) -> int:
        return min(self.total, self.prefill)

    def grant(self, req: Request) -> int:
        """Tokens req may compute now: one for a decode, else a prefill chunk (maybe 0)."""
        if _is_decoding(req):
            return 1
        return min(req.num_uncomputed_tokens, self.prefill_left)

    def spend(self, req: Request, n: int) -> None:
        self.total -= n
        if not _is_decoding(req):
            self.prefill = max(self.prefill - n, 0)


class Scheduler:
    """Owns the waiting queue, the running set and every page they hold."""

    def __init__(self, config: SchedulerConfig, block_manager: BlockManager) -> None:
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def add_request(self, req: Request) -> None:
        self.waiting.append(req)

    def schedule(self) -> SchedulerOutput:
        """Pick this step's chunks (see module docstring)."""
        out = SchedulerOutput([], [], [])
        budget = _StepBudget(self.config.chunked_prefill_size)
        cap = self.config.max_prefill_tokens_while_decoding
        if cap and any(_is_decoding(req) for req in self.running):
            budget.prefill = min(budget.total, cap)
        self._schedule_running(out, budget)
        if not out.preempted:
            self._schedule_waiting(out, budget)
        return out

    def _schedule_running(self, out: SchedulerOutput, budget: _StepBudget) -> None:
        i = 0
        while i < len(self.running) and budget.total > 0:
            req = self.running[i]
            n = 0 if req.awaits_last_token else budget.grant(req)
            if n == 0:  # nothing to compute, or a prefill and the step's prefill is spent
                i += 1
                continue
            if self._make_room(req, req.num_computed_tokens + n, out):
                out.chunks.append(ScheduledChunk(req, n))
                budget.spend(req, n)
                i += 1

    def _make_room(self, req: Request, num_tokens: int, out: SchedulerOutput) -> bool:
        """Grow req's page table to hold num_tokens, preempting from the tail if needed.

        Returns False when req itself had to go (it was the tail, or can never fit).
        """
        while not self._grow(req, num_tokens):
            victim = self.running.pop()
            if victim is req and self._can_never_fit(num_tokens):
                self._release(req)
                out.unservable.append(req)
                return False
            self._preempt(victim)
            out.preempted.append(victim)
            if victim is req:
                return False
        return True

    def _schedule_waiting(self, out: SchedulerOutput, budget: _StepBudget) -> None:
        while (
            self.waiting
            and budget.prefill_left > 0
            and len(self.running) < self.config.max_running_requests
        ):
            req = self.waiting[0]
            if not req.page_table:
                self._match_prefix(req)
            n = budget.grant(req)
            num_tokens = req.num_computed_tokens + n
            if not self._grow(req, num_tokens):
                self._release(req)
                if not self.running and not out.chunks and self._can_never_fit(num_tokens):
                    self.waiting.popleft()
                    out.unservable.append(req)
                    continue
                return
            self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            out.chunks.append(ScheduledChunk(req, n))
            budget.spend(req, n)

    def _match_prefix(self, req: Request) -> None:
        pages = self.block_manager.match_prefix(req.token_ids, req.max_cacheable_prefix)
        req.page_table = pages
        req.num_computed_tokens = len(pages) * self.block_manager.page_size
        if req.num_preemptions == 0:
            req.num_cached_tokens = req.num_computed_tokens

    def _grow(self, req: Request, num_tokens: int) -> bool:
        need = self.block_manager.pages_needed(num_tokens) - len(req.page_table)
        if need <= 0:
            return True
        if need > self.block_manager.num_free_pages:
            return False
        req.page_table.extend(self.block_manager.allocate(need))
        return True

    def _can_never_fit(self, num_tokens: int) -> bool:
        return self.block_manager.pages_needed(num_tokens) > self.block_manager.num_usable_pages

    def _preempt(self, req: Request) -> None:
        self._release(req)
        req.status = RequestStatus.WAITING
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def _release(self, req: Request) -> None:
        self.block_manager.free(req.page_table)
        req.page_table = []
        req.num_computed_tokens = 0

    def on_chunk_computed(self, chunk: ScheduledChunk) -> None:
        """Account a computed (or queued) chunk and offer its full pages to the prefix
        cache."""
        req = chunk.request
        req.num_computed_tokens += chunk.num_new_tokens
        self.cache_known_pages(req)

    def cache_known_pages(self, req: Request) -> None:
        """Offer req's full computed pages to the prefix cache, as far as the values of
        their tokens are known (a page holding a pending token waits for its read-back)."""
        known = min(req.num_computed_tokens, len(req.token_ids))
        self.block_manager.cache_full_pages(req.token_ids, req.page_table, known)

    def finish(self, req: Request) -> None:
        """Remove a finished or aborted request and free its pages."""
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self._release(req)
        req.status = RequestStatus.FINISHED

    def find(self, request_id: str) -> Request | None:
        for req in (*self.running, *self.waiting):
            if req.request_id == request_id:
                return req
        return None
