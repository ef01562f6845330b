"""The scheduler's step budget: `chunked_prefill_size` for everything, and
`max_prefill_tokens_while_decoding` for the prefill chunks of a step in which some request
decodes."""

from __future__ import annotations

import random

import torch

from sageserve.config import SchedulerConfig
from sageserve.engine.block_manager import BlockManager
from sageserve.engine.request import Request, RequestStatus
from sageserve.engine.sampling_params import SamplingParams
from sageserve.engine.scheduler import Scheduler, prefill_cap_while_decoding

PAGE = 16


def scheduler(total: int, while_decoding: int) -> Scheduler:
    config = SchedulerConfig(
        chunked_prefill_size=total, max_prefill_tokens_while_decoding=while_decoding
    )
    return Scheduler(config, BlockManager(4096, PAGE, enable_prefix_cache=False))


def request(name: str, prompt_len: int) -> Request:
    ids = [random.randrange(1, 1000) for _ in range(prompt_len)]
    return Request(name, ids, SamplingParams(max_new_tokens=100), torch.Generator())


def decoding(sched: Scheduler, name: str, prompt_len: int) -> Request:
    """A running request past its prompt: one output token, one token to compute."""
    req = request(name, prompt_len)
    req.token_ids.append(7)
    req.num_computed_tokens = req.num_tokens - 1
    req.page_table = sched.block_manager.allocate(-(-req.num_tokens // PAGE))
    req.status = RequestStatus.RUNNING
    sched.running.append(req)
    return req


def prefilling(sched: Scheduler, name: str, prompt_len: int, computed: int) -> Request:
    """A running request part-way through its prompt."""
    req = request(name, prompt_len)
    req.num_computed_tokens = computed
    req.page_table = sched.block_manager.allocate(-(-computed // PAGE))
    req.status = RequestStatus.RUNNING
    sched.running.append(req)
    return req


def chunk_sizes(sched: Scheduler) -> dict[str, int]:
    out = sched.schedule()
    assert not out.preempted and not out.unservable
    return {c.request.request_id: c.num_new_tokens for c in out.chunks}


def test_without_decodes_a_prompt_gets_the_whole_step_budget() -> None:
    sched = scheduler(total=700, while_decoding=100)
    sched.add_request(request("new", 1000))
    assert chunk_sizes(sched) == {"new": 700}


def test_with_decodes_prefill_chunks_are_capped_in_all() -> None:
    sched = scheduler(total=700, while_decoding=100)
    decoding(sched, "d1", 33)
    decoding(sched, "d2", 5)
    sched.add_request(request("a", 70))
    sched.add_request(request("b", 333))
    sched.add_request(request("c", 7))
    # 70 + 30 = the cap; c waits for a step with prefill tokens left.
    assert chunk_sizes(sched) == {"d1": 1, "d2": 1, "a": 70, "b": 30}


def test_a_running_prefill_that_gets_no_tokens_does_not_block_later_decodes() -> None:
    sched = scheduler(total=700, while_decoding=100)
    prefilling(sched, "p1", 1000, computed=200)
    prefilling(sched, "p2", 1000, computed=200)
    decoding(sched, "d", 41)
    assert chunk_sizes(sched) == {"p1": 100, "d": 1}


def test_decodes_count_against_the_step_budget() -> None:
    sched = scheduler(total=3, while_decoding=100)
    for i in range(5):
        decoding(sched, f"d{i}", 17)
    sched.add_request(request("new", 50))
    assert chunk_sizes(sched) == {"d0": 1, "d1": 1, "d2": 1}


def test_a_cap_above_the_budget_changes_nothing() -> None:
    sched = scheduler(total=64, while_decoding=512)
    decoding(sched, "d", 9)
    sched.add_request(request("new", 200))
    assert chunk_sizes(sched) == {"d": 1, "new": 63}


def test_no_cap_by_default() -> None:
    sched = Scheduler(SchedulerConfig(chunked_prefill_size=700), BlockManager(4096, PAGE))
    assert sched.config.max_prefill_tokens_while_decoding is None
    decoding(sched, "d", 9)
    sched.add_request(request("new", 1000))
    assert chunk_sizes(sched) == {"d": 1, "new": 699}


def test_prefill_cap_while_decoding_resolves_the_default() -> None:
    """None: room beside the largest decode graph's batch in the largest piecewise graph (at
    least half of it), no cap without piecewise graphs; a value given is kept (0: none)."""
    assert prefill_cap_while_decoding(None, 512, 64) == 448
    assert prefill_cap_while_decoding(None, 64, 64) == 32
    assert prefill_cap_while_decoding(None, None, 64) == 0
    assert prefill_cap_while_decoding(0, 512, 64) == 0
    assert prefill_cap_while_decoding(100, None, 64) == 100


def test_a_zero_cap_is_no_cap() -> None:
    sched = scheduler(total=700, while_decoding=0)
    decoding(sched, "d", 20)
    sched.add_request(request("p", 1000))
    assert chunk_sizes(sched) == {"d": 1, "p": 699}
