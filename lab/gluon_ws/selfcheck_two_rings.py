"""A planned protocol, checked before it is built: 128-key blocks for fp16 P·V at head_dim 128.

There, a stage of the served ring (INT8 K and V, V widened to fp16, scales) is 65.5 KB, so 4
stages do not fit (lab/KERNEL_NOTES.md, "v3, round 5"). The plan splits the widened V into
a ring of its own with fewer slots:

- the K/V ring (S stages: INT8 K, INT8 V, the block's scales) is filled by the producer;
  its "empty" barrier counts 3 releases: each consumer's, once it made the block's P codes
  (the last read of its K and scales: the QKᵀ retired a turn earlier), and the widener's,
  once it widened the block's V;
- the fp16 V ring (W slots) is filled by the widener, which waits for the block to land and
  for its slot's previous block to be released by both consumers (after their P·V retired);
- the consumers' turns are unchanged: a turn issues the next block's QKᵀ (waiting for the
  K/V ring) and this block's P·V (waiting for the fp16 ring).

`two_rings_selfcheck` runs that protocol under random interleavings, as `selfcheck` does
for the served one: no deadlock, no block read from a stale stage or slot, no stage or
slot overwritten before every release. At S = 4, W = 2 it holds; W = 1 deadlocks (the next
block's P·V needs the slot the current one still reads).
"""

from __future__ import annotations

import random

from lab.gluon_ws.protocol import interleave, random_items


def _two_rings_run(items: list[tuple[int, int, int]], stages: int, slots: int, rng) -> None:
    """One random interleaving of the two-ring protocol on the items' (n0, n1, loaded)."""
    bars = {("ready", s): [0, 0, 3] for s in range(stages)}  # expect, TMA bytes, scales
    bars |= {("kv_empty", s): [0, 0, 3] for s in range(stages)}  # 2 consumers + widener
    bars |= {("v16_ready", w): [0, 0, 1] for w in range(slots)}
    bars |= {("v16_empty", w): [0, 0, 2] for w in range(slots)}
    bars |= {("turn", c): [0, 0, 1] for c in (0, 1)}
    kv_holds: dict[int, int] = {}  # stage -> block
    v16_holds: dict[int, int] = {}  # slot -> block
    releases: dict[tuple[str, int], int] = {}

    def producer():
        for g in range(sum(loaded for _, _, loaded in items)):
            s = g % stages
            yield ("wait", ("kv_empty", s), ((g // stages) & 1) ^ 1)
            old = kv_holds.get(s)
            assert old is None or releases.get(("kv", old)) == 3, f"stage {s} overwritten"
            kv_holds[s] = g
            yield ("arrive", ("ready", s))
            yield ("tma", ("ready", s))
            yield ("arrive", ("ready", s))

    def widener():
        for g in range(sum(loaded for _, _, loaded in items)):
            s, w = g % stages, g % slots
            yield ("wait", ("ready", s), (g // stages) & 1)
            yield ("wait", ("v16_empty", w), ((g // slots) & 1) ^ 1)
            old = v16_holds.get(w)
            assert old is None or releases.get(("v16", old)) == 2, f"slot {w} overwritten"
            assert kv_holds.get(s) == g, f"block {g} widened from a stale stage"
            v16_holds[w] = g
            yield ("release", ("kv_empty", s), ("kv", g))
            yield ("arrive", ("v16_ready", w))

    agents = [producer(), _consumer(0, items, stages, slots, kv_holds, v16_holds),
              _consumer(1, items, stages, slots, kv_holds, v16_holds), widener()]  # fmt: skip
    interleave(agents, bars, releases, rng)


def _consumer(wg: int, items, stages: int, slots: int, kv_holds: dict, v16_holds: dict):
    """One consumer's ops: its turns as the served kernel takes them, over the two rings."""

    def turn_wait(k):
        return ("wait", ("turn", wg), (k + 1 - wg) & 1)

    def kv(g):  # wait for block g's K and scales, and check the stage holds it
        yield ("wait", ("ready", g % stages), (g // stages) & 1)
        assert kv_holds.get(g % stages) == g, f"block {g}: stale K"

    def v16(g):
        yield ("wait", ("v16_ready", g % slots), (g // slots) & 1)
        assert v16_holds.get(g % slots) == g, f"block {g}: stale fp16 V"

    def release_kv(g):
        return ("release", ("kv_empty", g % stages), ("kv", g))

    def release_v16(g):
        return ("release", ("v16_empty", g % slots), ("v16", g))

    def idle(start, stop):
        for g in range(start, stop):
            yield turn_wait(g)
            yield ("arrive", ("turn", 1 - wg))
            yield from kv(g)
            yield release_kv(g)
            yield from v16(g)
            yield release_v16(g)

    base = 0
    for item in items:
        n, loaded = item[wg], item[2]
        if n == 0:
            yield from idle(base, base + loaded)
            base += loaded
            continue
        yield from kv(base)  # block 0's QKᵀ and softmax, outside the turns
        yield turn_wait(base)
        for g in range(base, base + n):
            assert kv_holds.get(g % stages) == g, f"block {g}: stale scales"
            yield release_kv(g)  # P's codes made: block g's K and scales are read
            last = g == base + n - 1
            if not last:
                yield from kv(g + 1)  # the next block's QKᵀ
            yield from v16(g)  # this block's P·V
            yield ("arrive", ("turn", 1 - wg))
            if last:
                yield from idle(g + 1, base + loaded)
            else:
                yield turn_wait(g + 1)
            assert v16_holds.get(g % slots) == g, f"block {g}: fp16 V overwritten under P·V"
            yield release_v16(g)  # wait(0): block g's P·V retired
        base += loaded


def two_rings_selfcheck(seeds: int = 200) -> int:
    """No GPU: the two-ring protocol under random interleavings at S = 4, W = 2 (must hold)
    and W = 1 (must deadlock); prints the outcome."""
    runs = 0
    for s in range(seeds):
        prng = random.Random(7000 + s)
        _two_rings_run(random_items(prng), 4, 2, prng)
        runs += 1
    deadlocks = 0
    for s in range(20):
        prng = random.Random(9000 + s)
        try:
            _two_rings_run([(6, 7, 7), (4, 4, 4)], 4, 1, prng)
        except AssertionError as err:
            deadlocks += str(err) == "deadlock"
    assert deadlocks == 20, f"one fp16 slot should deadlock, did in {deadlocks} of 20 runs"
    print(f"two-ring protocol (4 K/V stages, 2 fp16 V slots): {runs} random interleavings, "
          "no deadlock, no stale stage or slot; with 1 slot it deadlocks, as it must")  # fmt: skip
    return 0
