"""Paged KV-cache page allocator with a prefix cache (pure Python, CPU-testable).

The KV cache is ``num_pages`` pages of ``page_size`` tokens. Page 0 is the null page: it is
never handed out, so kernels can pad page tables with it.

Every page is in exactly one of three states::

    free       refcount 0, no cache entry         -> in the free list
    evictable  refcount 0, owns a cache entry     -> in the LRU ``_evictable`` dict
    in use     refcount > 0 (cached or private)

Prefix cache. A full page is identified by its tokens *and everything before it*. Each cache
entry is a node with a small integer id; the key of a page is ``(parent_node, tokens)``, where
``parent_node`` is the node of the previous page of the sequence (``ROOT_NODE`` for the first
page) and ``tokens`` the exact tuple of its token ids: no lossy hash, so a collision can never
alias two different prefixes. Node ids are never reused, so a key naming a dropped node can
never match again.

Pages are cached in a tree (``_children``): dropping a node drops its whole subtree, because a
child is only reachable through its parent. Without this, an evicted head would leave its tail
pages holding cache entries that ``match_prefix`` can never reach.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict, deque
from collections.abc import Sequence

NULL_PAGE = 0
ROOT_NODE = 0

_Key = tuple[int, tuple[int, ...]]


class NoFreePagesError(RuntimeError):
    """Raised by ``BlockManager.allocate`` when fewer pages are free than requested."""


class BlockManager:
    """Allocates KV-cache pages by reference count and shares full pages by prefix.

    Statistics for metrics: ``queried_tokens`` and ``hit_tokens`` are the cumulative number of
    tokens looked up by ``match_prefix`` (capped at its ``max_tokens``) and found in the cache.
    """

    def __init__(self, num_pages: int, page_size: int, enable_prefix_cache: bool = True) -> None:
        if num_pages < 2:
            raise ValueError(f"num_pages must be >= 2 (page 0 is reserved), got {num_pages}")
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        self.num_pages = num_pages
        self.page_size = page_size
        self.enable_prefix_cache = enable_prefix_cache
        self.hit_tokens = 0
        self.queried_tokens = 0
        self._init_pages()
        self._init_prefix_cache()

    def _init_pages(self) -> None:
        self._ref_counts = [0] * self.num_pages
        self._free: deque[int] = deque(range(1, self.num_pages))
        # LRU order: first = least recently used. Values are unused (an ordered set).
        self._evictable: OrderedDict[int, None] = OrderedDict()

    def _init_prefix_cache(self) -> None:
        self._next_node = itertools.count(ROOT_NODE + 1)
        self._index: dict[_Key, int] = {}  # key -> live node
        self._node_key: dict[int, _Key] = {}  # live node -> its key
        self._node_page: dict[int, int] = {}  # live node -> the page owning its entry
        self._children: dict[int, set[int]] = {}  # live node -> live child nodes
        # NOTE: page -> node of the content it holds, for every full page that went through
        # cache_full_pages and is not free. A page owns that node only if _node_page agrees;
        # otherwise it is a private duplicate or its node was dropped (then the node is dead).
        self._page_node: dict[int, int] = {}

    # ------------------------------------------------------------------ accounting

    @property
    def num_usable_pages(self) -> int:
        """Pages that can ever be handed out (all but the null page)."""
        return self.num_pages - 1

    @property
    def num_free_pages(self) -> int:
        """Pages ``allocate`` can return now: the free list plus evictable cached pages."""
        return len(self._free) + len(self._evictable)

    @property
    def num_cached_pages(self) -> int:
        """Pages holding a prefix-cache entry, in use or evictable."""
        return len(self._node_page)

    def pages_needed(self, num_tokens: int) -> int:
        """Number of pages that hold ``num_tokens`` tokens."""
        assert num_tokens >= 0, num_tokens
        return -(-num_tokens // self.page_size)

    # ------------------------------------------------------------------ allocation

    def allocate(self, n: int) -> list[int]:
        """Returns ``n`` pages with refcount 1, evicting LRU cached pages if the free list is short.

        Raises ``NoFreePagesError`` (allocating nothing) when ``n > num_free_pages``.
        """
        assert n >= 0, n
        if n > self.num_free_pages:
            raise NoFreePagesError(f"requested {n} pages, only {self.num_free_pages} free")
        while len(self._free) < n:
            self._evict_lru()
        pages = [self._free.popleft() for _ in range(n)]
        for page in pages:
            self._ref_counts[page] = 1
        return pages

    def free(self, page_table: Sequence[int]) -> None:
        """Drops one reference on every page of ``page_table``.

        Pages are released tail first. Released cached pages join the LRU list in that order,
        so a sequence's tail is evicted before its head: evicting the head first would make
        the whole tail unreachable (and drop it with the head), losing more of the cache
        than the one page evicted.
        """
        for page in reversed(page_table):
            assert page != NULL_PAGE, "freeing the null page"
            assert self._ref_counts[page] > 0, f"double free of page {page}"
            self._ref_counts[page] -= 1
            if self._ref_counts[page] == 0:
                self._release(page)

    def _release(self, page: int) -> None:
        """Moves a page whose refcount just reached 0 to the evictable LRU or the free list."""
        node = self._page_node.get(page)
        if node is not None and self._node_page.get(node) == page:
            self._evictable[page] = None  # most recently used end
        else:
            self._page_node.pop(page, None)
            self._free.append(page)

    def _evict_lru(self) -> None:
        """Drops the least recently used evictable page's entry (and subtree) to the free list."""
        page = next(iter(self._evictable))
        self._drop_subtree(self._page_node[page])

    # ------------------------------------------------------------------ prefix cache

    def match_prefix(self, token_ids: Sequence[int], max_tokens: int) -> list[int]:
        """Returns the pages of the longest cached chain of full pages starting ``token_ids``.

        At most ``max_tokens`` tokens are matched (a caller that needs to compute at least
        one token passes ``len(token_ids) - 1``). Takes a reference on every returned page.
        Returns ``[]`` when prefix caching is off.
        """
        if not self.enable_prefix_cache:
            return []
        num_tokens = max(0, min(len(token_ids), max_tokens))
        pages = self._lookup(token_ids, num_tokens // self.page_size)
        for page in pages:
            if self._ref_counts[page] == 0:
                del self._evictable[page]
            self._ref_counts[page] += 1
        self.queried_tokens += num_tokens
        self.hit_tokens += len(pages) * self.page_size
        return pages

    def _lookup(self, token_ids: Sequence[int], max_pages: int) -> list[int]:
        """Pages of the cached chain matching the first ``max_pages`` pages of ``token_ids``."""
        pages: list[int] = []
        parent = ROOT_NODE
        for i in range(max_pages):
            node = self._index.get((parent, self._page_tokens(token_ids, i)))
            if node is None:
                break
            pages.append(self._node_page[node])
            parent = node
        return pages

    def cache_full_pages(
        self, token_ids: Sequence[int], page_table: Sequence[int], num_computed_tokens: int
    ) -> None:
        """Registers the full pages among the first ``num_computed_tokens`` tokens.

        ``token_ids[i]`` lives in ``page_table[i // page_size]``. Idempotent and O(new pages)
        per call without any per-request state: full pages are registered in order, so the
        already-registered pages of a table form a prefix of it, found by scanning back from
        the last full page. A page whose key is already cached by another page stays private
        (the existing entry wins); a page whose parent entry was dropped is not registered,
        since it could never be reached. No-op when prefix caching is off.
        """
        if not self.enable_prefix_cache:
            return
        num_full = num_computed_tokens // self.page_size
        assert num_computed_tokens <= len(token_ids), (num_computed_tokens, len(token_ids))
        assert num_full <= len(page_table), (num_full, len(page_table))
        start = num_full
        while start > 0 and page_table[start - 1] not in self._page_node:
            start -= 1
        parent = ROOT_NODE if start == 0 else self._page_node[page_table[start - 1]]
        for i in range(start, num_full):
            parent = self._register(page_table[i], parent, self._page_tokens(token_ids, i))

    def _register(self, page: int, parent: int, tokens: tuple[int, ...]) -> int:
        """Records ``page`` as holding ``tokens`` after ``parent``; returns the page's node."""
        assert page != NULL_PAGE and self._ref_counts[page] > 0, f"page {page} is not in use"
        key = (parent, tokens)
        node = self._index.get(key)
        if node is None:
            node = next(self._next_node)
            if parent == ROOT_NODE or parent in self._node_page:
                self._add_node(node, key, page)
            # else: orphan, a dead node id that only keeps the page's descendants unregistered
        self._page_node[page] = node
        return node

    def _add_node(self, node: int, key: _Key, page: int) -> None:
        self._index[key] = node
        self._node_key[node] = key
        self._node_page[node] = page
        self._children.setdefault(key[0], set()).add(node)

    def _drop_subtree(self, node: int) -> None:
        """Drops the entry of ``node`` and of all its descendants.

        Unreferenced pages among them go to the free list; pages in use stay with their
        requests, uncached, and go to the free list when freed.
        """
        stack = [node]
        while stack:
            node = stack.pop()
            stack.extend(self._children.pop(node, ()))
            key = self._node_key.pop(node)
            del self._index[key]
            parent = key[0]
            siblings = self._children.get(parent)
            if siblings is not None:
                siblings.discard(node)
                if not siblings:
                    del self._children[parent]
            page = self._node_page.pop(node)
            if self._ref_counts[page] == 0:
                del self._evictable[page]
                del self._page_node[page]
                self._free.append(page)

    def reset_prefix_cache(self) -> None:
        """Drops every evictable entry (and its subtree); pages in use keep working."""
        while self._evictable:
            self._evict_lru()

    def _page_tokens(self, token_ids: Sequence[int], i: int) -> tuple[int, ...]:
        return tuple(token_ids[i * self.page_size : (i + 1) * self.page_size])

    # ------------------------------------------------------------------ debugging

    def check_invariants(self) -> None:
        """Asserts the internal invariants (for tests and debugging; O(num_pages))."""
        refs = self._ref_counts
        free, evictable = set(self._free), set(self._evictable)
        assert refs[NULL_PAGE] == 0 and NULL_PAGE not in free | evictable | set(self._page_node)
        assert len(free) == len(self._free) and not free & evictable, "page listed twice"
        assert all(r >= 0 for r in refs), "negative refcount"
        in_use = {p for p in range(1, self.num_pages) if refs[p] > 0}
        assert not in_use & (free | evictable), "page both in use and free"
        assert len(in_use) + len(free) + len(evictable) == self.num_usable_pages, "lost pages"
        owners = set(self._node_page.values())
        assert len(owners) == len(self._node_page), "page owns two entries"
        assert evictable <= owners and not free & set(self._page_node)
        assert len(self._index) == len(self._node_key) == len(self._node_page)
        for node, page in self._node_page.items():
            key = self._node_key[node]
            parent = key[0]
            assert self._index[key] == node and self._page_node[page] == node
            assert parent == ROOT_NODE or parent in self._node_page, "orphan entry"
            assert node in self._children[parent]
