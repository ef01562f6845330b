"""CPU tests of the page allocator and prefix cache."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from sageserve.engine.block_manager import NULL_PAGE, BlockManager, NoFreePagesError

PAGE = 4


def prefill(bm: BlockManager, tokens: list[int]) -> list[int]:
    """Runs a whole prompt through the manager the way the scheduler does; returns its pages."""
    pages = bm.match_prefix(tokens, len(tokens) - 1)
    pages += bm.allocate(bm.pages_needed(len(tokens)) - len(pages))
    bm.cache_full_pages(tokens, pages, len(tokens))
    bm.check_invariants()
    return pages


def test_constructor_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="num_pages"):
        BlockManager(1, PAGE)
    with pytest.raises(ValueError, match="page_size"):
        BlockManager(8, 0)


def test_accounting_and_null_page() -> None:
    bm = BlockManager(9, PAGE)
    assert bm.num_usable_pages == bm.num_free_pages == 8
    assert [bm.pages_needed(n) for n in (0, 1, 4, 5)] == [0, 1, 1, 2]
    a = bm.allocate(3)
    b = bm.allocate(5)
    assert NULL_PAGE not in a + b and len(set(a + b)) == 8
    assert bm.num_free_pages == 0
    bm.free(a)
    assert bm.num_free_pages == 3
    bm.free(b)
    assert bm.num_free_pages == bm.num_usable_pages
    bm.check_invariants()


def test_no_free_pages_allocates_nothing() -> None:
    bm = BlockManager(5, PAGE)
    held = bm.allocate(2)
    with pytest.raises(NoFreePagesError):
        bm.allocate(3)
    assert bm.num_free_pages == 2
    assert len(bm.allocate(2)) == 2
    bm.free(held)
    bm.check_invariants()


def test_double_free_and_null_page_free_assert() -> None:
    bm = BlockManager(5, PAGE)
    pages = bm.allocate(1)
    bm.free(pages)
    with pytest.raises(AssertionError):
        bm.free(pages)
    with pytest.raises(AssertionError):
        bm.free([NULL_PAGE])


def test_shared_prefix_reuses_only_full_pages() -> None:
    bm = BlockManager(16, PAGE)
    tokens = list(range(10))  # 2 full pages + a partial one
    first = prefill(bm, tokens)
    assert bm.num_cached_pages == 2
    second = prefill(bm, tokens)
    assert second[:2] == first[:2]
    assert second[2] != first[2]  # the partial last page is private
    assert bm.hit_tokens == 8 and bm.queried_tokens == 9 + 9


def test_match_respects_max_tokens_and_divergence() -> None:
    bm = BlockManager(16, PAGE)
    pages = prefill(bm, list(range(12)))
    assert bm.match_prefix(list(range(12)), 7) == pages[:1]
    assert bm.match_prefix([*range(5), 99, *range(6, 12)], 12) == pages[:1]
    assert bm.match_prefix([99, *range(1, 12)], 12) == []
    assert bm.match_prefix(list(range(12)), 100) == pages


def test_key_depends_on_everything_before() -> None:
    bm = BlockManager(16, PAGE)
    prefill(bm, [1, 2, 3, 4, 5, 6, 7, 8, 0])
    # Same second page after a different first page: no match at all.
    assert bm.match_prefix([9, 9, 9, 9, 5, 6, 7, 8], 8) == []


def test_cache_full_pages_is_incremental_and_idempotent() -> None:
    bm = BlockManager(16, PAGE)
    tokens = list(range(13))
    pages = bm.allocate(4)
    for computed in (3, 4, 4, 9, 13, 13):  # chunked prefill, repeated calls
        bm.cache_full_pages(tokens, pages, computed)
        assert bm.num_cached_pages == computed // PAGE
        bm.check_invariants()
    assert bm.match_prefix(tokens, 13) == pages[:3]


def test_freed_cached_pages_are_evictable_and_lru() -> None:
    bm = BlockManager(7, PAGE)  # 6 usable pages
    a = prefill(bm, list(range(100, 109)))  # pages a0 a1 (cached) + partial
    b = prefill(bm, list(range(200, 209)))
    bm.free(a)
    bm.free(b)
    assert bm.num_free_pages == 6 and bm.num_cached_pages == 4
    # Two free pages first, then the LRU order: a's tail, a's head, b's tail, b's head.
    taken = bm.allocate(3)
    assert set(taken) >= {a[2], b[2]} and a[1] in taken
    assert bm.match_prefix(list(range(100, 109)), 8) == a[:1]  # head survives the tail
    taken += bm.allocate(2)  # a[0] is in use again, so b goes
    assert set(taken) == {a[2], b[2], a[1], b[1], b[0]}
    assert bm.match_prefix(list(range(200, 209)), 8) == []
    bm.check_invariants()


def test_match_refreshes_lru() -> None:
    bm = BlockManager(3, PAGE)  # 2 usable pages
    a = prefill(bm, [1, 1, 1, 1])
    b = prefill(bm, [2, 2, 2, 2])
    bm.free(a)
    bm.free(b)
    bm.free(bm.match_prefix([1, 1, 1, 1], 4))  # a is now the most recently used
    assert bm.allocate(1) == b
    assert bm.match_prefix([1, 1, 1, 1], 4) == a


def test_evicting_a_parent_drops_its_children() -> None:
    bm = BlockManager(4, PAGE)  # 3 usable pages
    tokens = list(range(12))
    pages = prefill(bm, tokens)
    for page in pages:  # head first, unlike free(): the head becomes the LRU page
        bm.free([page])
    bm.allocate(1)
    assert bm.num_cached_pages == 0  # the children became unreachable and were dropped
    assert bm.num_free_pages == 2
    assert bm.match_prefix(tokens, 12) == []
    bm.check_invariants()


def test_duplicate_key_keeps_existing_entry() -> None:
    bm = BlockManager(16, PAGE)
    tokens = list(range(12))
    # Two requests prefill the same prompt concurrently: neither finds a match.
    a = bm.allocate(3)
    b = bm.allocate(3)
    bm.cache_full_pages(tokens, a, 8)
    bm.cache_full_pages(tokens, b, 12)  # b's first two pages are duplicates; its third is new
    assert bm.num_cached_pages == 3
    assert bm.match_prefix(tokens, 12) == [a[0], a[1], b[2]]
    bm.check_invariants()
    bm.free(b)  # duplicates go straight back to the free list
    assert bm.num_cached_pages == 3 and b[0] not in bm._evictable
    bm.check_invariants()


def test_duplicate_chain_child_dropped_with_foreign_parent() -> None:
    bm = BlockManager(8, PAGE)
    tokens = list(range(8))
    a = bm.allocate(1)
    b = bm.allocate(2)
    bm.cache_full_pages(tokens, a, 4)
    bm.cache_full_pages(tokens, b, 8)  # b[1] is cached under a[0], which b does not hold
    bm.free(a)
    bm.reset_prefix_cache()
    assert bm.num_cached_pages == 0  # b[1] became unreachable and lost its entry
    bm.cache_full_pages([*tokens, 8, 9, 10, 11], [*b, *bm.allocate(1)], 12)
    assert bm.num_cached_pages == 0  # nothing hangs under a dropped parent
    bm.free(b)
    bm.check_invariants()


def test_reset_prefix_cache_keeps_pages_in_use() -> None:
    bm = BlockManager(16, PAGE)
    a = prefill(bm, list(range(8)))
    b = prefill(bm, list(range(100, 108)))
    bm.free(a)
    bm.reset_prefix_cache()
    assert bm.match_prefix(list(range(8)), 8) == []
    assert bm.match_prefix(list(range(100, 108)), 8) == b
    assert bm.num_free_pages == bm.num_usable_pages - 2
    bm.check_invariants()


def test_prefix_cache_disabled() -> None:
    bm = BlockManager(16, PAGE, enable_prefix_cache=False)
    a = prefill(bm, list(range(12)))
    assert bm.num_cached_pages == 0
    assert bm.match_prefix(list(range(12)), 12) == []
    bm.free(a)
    assert bm.num_free_pages == bm.num_usable_pages
    assert bm.queried_tokens == bm.hit_tokens == 0


# ---------------------------------------------------------------------- randomized stress


@dataclass
class Seq:
    tokens: list[int]
    pages: list[int] = field(default_factory=list)
    computed: int = 0


class Simulator:
    """Drives a BlockManager like a scheduler, shadowing what each page physically holds.

    The shadow KV cache catches a page handed out while still in use or matched after it was
    reused: every matched page must hold exactly the tokens it is matched for.
    """

    def __init__(self, bm: BlockManager, rng: random.Random) -> None:
        self.bm, self.rng = bm, rng
        self.kv: dict[int, list[int | None]] = {}
        self.running: list[Seq] = []
        self.prefixes = [[rng.randrange(50) for _ in range(rng.randrange(30))] for _ in range(4)]

    def add(self) -> None:
        prefix = self.rng.choice(self.prefixes)
        tail = [self.rng.randrange(3) for _ in range(self.rng.randrange(1, 12))]
        seq = Seq(prefix[: self.rng.randrange(len(prefix) + 1)] + tail)
        seq.pages = self.bm.match_prefix(seq.tokens, len(seq.tokens) - 1)
        seq.computed = len(seq.pages) * self.bm.page_size
        size = self.bm.page_size
        for i, page in enumerate(seq.pages):
            assert self.kv[page] == seq.tokens[i * size : (i + 1) * size], "stale page matched"
        self.running.append(seq)

    def step(self, seq: Seq) -> bool:
        """Computes a chunk (or a decode token); returns False when out of pages."""
        if seq.computed == len(seq.tokens):
            seq.tokens.append(self.rng.randrange(3))  # decode
        end = min(len(seq.tokens), seq.computed + self.rng.randrange(1, 10))
        try:
            new = self.bm.allocate(self.bm.pages_needed(end) - len(seq.pages))
        except NoFreePagesError:
            return False
        for page in new:
            self.kv[page] = [None] * self.bm.page_size
        seq.pages += new
        for pos in range(seq.computed, end):
            page = seq.pages[pos // self.bm.page_size]
            assert self.bm._ref_counts[page] == 1, "writing into a shared page"
            self.kv[page][pos % self.bm.page_size] = seq.tokens[pos]
        seq.computed = end
        self.bm.cache_full_pages(seq.tokens, seq.pages, seq.computed)
        return True

    def finish(self, seq: Seq) -> None:
        self.running.remove(seq)
        self.bm.free(seq.pages)

    def random_op(self) -> None:
        roll = self.rng.random()
        if not self.running or roll < 0.25:
            self.add()
        elif roll < 0.35:
            self.finish(self.rng.choice(self.running))
        elif roll < 0.37:
            self.bm.reset_prefix_cache()
        else:
            seq = self.rng.choice(self.running)
            if not self.step(seq):
                self.finish(seq)  # preempt to make room

    def check(self) -> None:
        self.bm.check_invariants()
        in_use: dict[int, int] = {}
        for seq in self.running:
            for page in seq.pages:
                in_use[page] = in_use.get(page, 0) + 1
        for page in range(1, self.bm.num_pages):
            assert self.bm._ref_counts[page] == in_use.get(page, 0)


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("page_size", [1, 4])
def test_randomized_interleaved_sequences(seed: int, page_size: int) -> None:
    sim = Simulator(BlockManager(24, page_size), random.Random(seed))
    for _ in range(1500):
        sim.random_op()
        sim.check()
    assert sim.bm.hit_tokens > 0
    for seq in list(sim.running):
        sim.finish(seq)
    assert sim.bm.num_free_pages == sim.bm.num_usable_pages
    sim.bm.check_invariants()


class BlockManagerMachine(RuleBasedStateMachine):
    """Hypothesis drives the same simulator with shrinkable operation sequences."""

    def __init__(self) -> None:
        super().__init__()
        self.sim: Simulator | None = None

    @precondition(lambda self: self.sim is None)
    @rule(seed=st.integers(0, 2**16), num_pages=st.integers(2, 12), page_size=st.integers(1, 3))
    def start(self, seed: int, num_pages: int, page_size: int) -> None:
        self.sim = Simulator(BlockManager(num_pages, page_size), random.Random(seed))

    @precondition(lambda self: self.sim is not None)
    @rule(n=st.integers(1, 20))
    def ops(self, n: int) -> None:
        for _ in range(n):
            self.sim.random_op()
            self.sim.check()

    @precondition(lambda self: self.sim is not None)
    @rule()
    def drain(self) -> None:
        for seq in list(self.sim.running):
            self.sim.finish(seq)
        assert self.sim.bm.num_free_pages == self.sim.bm.num_usable_pages

    @invariant()
    def consistent(self) -> None:
        if self.sim is not None:
            self.sim.check()


TestBlockManagerMachine = BlockManagerMachine.TestCase
TestBlockManagerMachine.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)
