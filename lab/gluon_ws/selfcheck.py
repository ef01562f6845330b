"""The CPU self-check (`--selfcheck`): the varlen block ranges against brute force, the
work plan, the barrier protocol under random interleavings."""

from __future__ import annotations

import numpy as np

from lab.gluon_prefill_probe import KEYS, ROWS
from lab.gluon_ws.config import TILE
from lab.gluon_ws.plan import _consumer_blocks, _last_key_model, tile_work, work_plan

# ----------------------------------------------------------------------------- selfcheck


def _check_blocks(q_len: int, prefix: int, first_row: int, causal: bool) -> list[int]:
    """Brute force of one work item's block ranges against `_consumer_blocks` (the kernel's
    formula) and `_last_key_model`; returns each consumer's masked block count (-1: none of
    its rows is real). Raises AssertionError on a mismatch."""
    kv_len = prefix + q_len
    ns, masked = [], []
    for wg in (0, 1):
        n, full = _consumer_blocks(q_len, kv_len, first_row, wg, causal, ROWS, KEYS)
        lo = first_row + wg * ROWS
        limits = [_last_key_model(r, q_len, kv_len, causal) for r in range(lo, lo + ROWS)]
        real = [last for r, last in zip(range(lo, lo + ROWS), limits, strict=True) if r < q_len]
        case = f"q_len {q_len} prefix {prefix} row {first_row} wg {wg} causal {causal}"
        ns.append(n)
        if not real:
            assert (n, full) == (0, 0), case
            masked.append(-1)
            continue
        # The [rows, keys] visibility matrix (brute force over the keys, not the formula).
        rows = np.arange(lo, min(lo + ROWS, q_len))[:, None]
        sees = (np.arange(kv_len)[None, :] <= prefix + rows) | (not causal)
        assert sees.sum(1).tolist() == [lim + 1 for lim in real], case  # per-row limit
        last = int(np.nonzero(sees.any(0))[0].max()) // KEYS
        whole = int(np.argmin(np.append(sees.all(0), False))) // KEYS  # blocks seen by all
        assert n == max(last + 1, 2) and full == whole, (case, n, full, last, whole)
        # Every row (padding too) sees key 0; blocks past the last are fully masked for all
        # 64 rows, and only they can lie past the sequence's last page (clamped there).
        assert all(lim >= 0 for lim in limits), case
        for block in range(last + 1, n):
            assert all(lim < block * KEYS for lim in limits), case
        assert last <= (kv_len - 1) // KEYS, case
        masked.append(n - full)
    if ns[1]:
        assert ns[1] >= ns[0] and ns[1] - ns[0] <= 1, (q_len, prefix, first_row, ns)
    return masked


def _protocol_run(items: list[tuple[int, int, int]], stages: int, rng,
                  widen: bool = False) -> None:  # fmt: skip
    """Random interleaving of the varlen kernel's barrier protocol for one program: the
    producer, the TMA completions, both consumers and (widen: fp16 P·V) the widener, op for
    op as the kernel issues them, on the items' (n0, n1, loaded). Asserts no deadlock, no
    stage read before it landed (and was widened) or overwritten before both releases, and
    wgmma issues alternating by turn."""
    bars = {("ready", s): [0, 0, 3] for s in range(stages)}  # expect, TMA bytes, scales
    bars |= {("widened", s): [0, 0, 1] for s in range(stages)}
    bars |= {("empty", s): [0, 0, 2] for s in range(stages)}
    bars |= {("turn", w): [0, 0, 1] for w in (0, 1)}
    stage_holds: dict[int, int] = {}
    widened_holds: dict[int, int] = {}  # stage -> the block whose fp16 V it holds
    releases: dict[int, int] = {}
    issues: list[int] = []
    landed = "widened" if widen else "ready"  # what the consumers wait on

    def widener():
        g = 0
        for _, _, loaded in items:
            for _ in range(loaded):
                s = g % stages
                yield ("wait", ("ready", s), (g // stages) & 1)
                assert stage_holds.get(s) == g, f"block {g} widened from a stale stage"
                old = widened_holds.get(s)
                assert old is None or releases.get(old) == 2, f"fp16 stage {s} overwritten"
                widened_holds[s] = g
                yield ("arrive", ("widened", s))
                g += 1

    def producer():
        g = 0
        for _, _, loaded in items:
            for _ in range(loaded):
                s = g % stages
                yield ("wait", ("empty", s), ((g // stages) & 1) ^ 1)
                old = stage_holds.get(s)
                assert old is None or releases.get(old) == 2, f"stage {s} overwritten"
                stage_holds[s] = g
                yield ("arrive", ("ready", s))
                yield ("tma", ("ready", s))
                yield ("arrive", ("ready", s))
                g += 1

    def consumer(wg):
        base = 0

        def turn_wait(k):
            return ("wait", ("turn", wg), (k + 1 - wg) & 1)

        def read(g):
            assert stage_holds.get(g % stages) == g, f"block {g} read from a stale stage"
            if widen:
                assert widened_holds.get(g % stages) == g, f"block {g}: stale fp16 V"

        def idle(start, stop):
            for g in range(start, stop):
                yield turn_wait(g)
                yield ("arrive", ("turn", 1 - wg))
                yield ("wait", (landed, g % stages), (g // stages) & 1)
                yield ("release", g)

        for item in items:
            n, loaded = item[wg], item[2]
            if n == 0:
                yield from idle(base, base + loaded)
                base += loaded
                continue
            yield ("wait", (landed, base % stages), (base // stages) & 1)
            read(base)
            yield turn_wait(base)
            for j in range(n - 1):
                g = base + j
                yield ("wait", (landed, (g + 1) % stages), ((g + 1) // stages) & 1)
                read(g + 1)
                read(g)
                issues.append(wg)
                yield ("arrive", ("turn", 1 - wg))
                yield turn_wait(g + 1)
                read(g)
                yield ("release", g)
            g = base + n - 1
            read(g)
            issues.append(wg)
            yield ("arrive", ("turn", 1 - wg))
            yield from idle(g + 1, base + loaded)
            yield ("release", g)
            base += loaded

    def arrive(key):
        bar = bars[key]
        bar[1] += 1
        if bar[1] == bar[2]:
            bar[0], bar[1] = bar[0] + 1, 0

    agents = [producer(), consumer(0), consumer(1)] + ([widener()] if widen else [])
    pending = [next(a, None) for a in agents]
    tma: list = []
    holding = [False, False]  # which consumer holds the turn: never both
    while any(op is not None for op in pending) or tma:
        ready = [
            i
            for i, op in enumerate(pending)
            if op is not None and (op[0] != "wait" or bars[op[1]][0] & 1 != op[2])
        ]
        choices = ready + (["tma"] if tma else [])
        assert choices, "deadlock"
        pick = choices[rng.randrange(len(choices))]
        if pick == "tma":
            arrive(tma.pop(rng.randrange(len(tma))))
            continue
        op = pending[pick]
        if op[0] == "wait" and op[1][0] == "turn":  # consumer pick - 1 takes a turn
            assert not holding[2 - pick], "both consumers hold a turn"
            holding[pick - 1] = True
        elif op[0] == "arrive" and op[1][0] == "turn":
            holding[pick - 1] = False
        if op[0] == "arrive":
            arrive(op[1])
        elif op[0] == "tma":
            tma.append(op[1])
        elif op[0] == "release":
            releases[op[1]] = releases.get(op[1], 0) + 1
            arrive(("empty", op[1] % stages))
        pending[pick] = next(agents[pick], None)
    assert not any(holding), "a turn left held"
    assert len(issues) == sum(n0 + n1 for n0, n1, _ in items)


def selfcheck(cases: int = 3000, seeds: int = 200, seed: int = 0) -> int:
    """No GPU: the block-range formulas against brute force over random (q_len, prefix,
    tile) cases, the work plan's coverage and order, and the barrier protocol under random
    interleavings (3 and 4 stages, random item lists with uneven and idle consumers, with
    and without the fp16 P·V widener)."""
    import random

    rng = random.Random(seed)
    special_q = [1, 7, 63, 64, 65, 127, 128, 129, 191, 192, 200, 255, 256, 333, 1000]
    special_p = [0, 1, 63, 64, 65, 100, 127, 128, 511, 3000]
    worst = {True: 0, False: 0}
    checked = 0
    for _ in range(cases):
        q_len = rng.choice(special_q) if rng.random() < 0.5 else rng.randint(1, 1200)
        prefix = rng.choice(special_p) if rng.random() < 0.5 else rng.randint(0, 3000)
        causal = rng.random() < 0.7
        for first_row in range(0, q_len, TILE):
            masked = _check_blocks(q_len, prefix, first_row, causal)
            worst[causal] = max(worst[causal], *masked)
            checked += 1
    print(f"block ranges: {checked} tiles match brute force; most masked blocks per "
          f"consumer: causal {worst[True]}, non-causal {worst[False]}")  # fmt: skip

    q_lens, kv_lens = [1, 7, 200, 333, 128, 1000], [1, 71, 300, 844, 3128, 1511]
    for causal in (True, False):
        plan = work_plan(q_lens, kv_lens, 4, causal).tolist()
        tiles = {(s, r) for s, r, _ in plan}
        assert len(plan) == len(set(map(tuple, plan))) == 4 * len(tiles)
        assert tiles == {(s, r) for s, q in enumerate(q_lens) for r in range(0, q, TILE)}
        work = [tile_work(q_lens[s], kv_lens[s], r, causal) for s, r, _ in plan]
        assert work == sorted(work, reverse=True)
    print("work plan: every (tile, head) once, longest work first")

    runs = 0
    for stages in (3, 4):
        for s in range(seeds):
            prng = random.Random(1000 * stages + s)
            causal = prng.random() < 0.7
            items = []
            for _ in range(prng.randint(1, 6)):
                q_len = prng.choice(special_q)
                prefix = prng.choice([0, 1, 64, 100, 200])
                row = prng.choice(range(0, q_len, TILE))
                n0, _ = _consumer_blocks(q_len, prefix + q_len, row, 0, causal, ROWS, KEYS)
                n1, _ = _consumer_blocks(q_len, prefix + q_len, row, 1, causal, ROWS, KEYS)
                items.append((n0, n1, max(n0, n1)))
            _protocol_run(items, stages, prng, widen=s % 2 == 1)
            runs += 1
    print(f"barrier protocol: {runs} random interleavings (half with the fp16 P·V widener), "
          "no deadlock, no stale stage")  # fmt: skip
    return 0
