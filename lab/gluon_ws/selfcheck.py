"""The CPU self-check (`--selfcheck`): the served kernel's barrier protocol under random
interleavings (tests/test_gluon_prefill.py checks its block ranges and work plan)."""

from __future__ import annotations

from sageserve.attention.sage_attn.kernels.gluon.config import KEYS, ROWS, TILE
from sageserve.attention.sage_attn.kernels.gluon.plan import consumer_blocks

# ----------------------------------------------------------------------------- selfcheck


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


def selfcheck(seeds: int = 200) -> int:
    """No GPU: the barrier protocol under random interleavings (3 and 4 stages, key blocks
    of one page or two, random item lists with uneven and idle consumers, with and without
    the fp16 P·V widener). The block ranges and the work plan are checked by
    tests/test_gluon_prefill.py."""
    import random

    special_q = [1, 7, 63, 64, 65, 127, 128, 129, 191, 192, 200, 255, 256, 333, 1000]
    runs = 0
    for stages in (3, 4):
        for s in range(seeds):
            prng = random.Random(1000 * stages + s)
            causal = prng.random() < 0.7
            block_n = prng.choice([KEYS, 2 * KEYS])
            items = []
            for _ in range(prng.randint(1, 6)):
                q_len = prng.choice(special_q)
                prefix = prng.choice([0, 1, 64, 100, 200])
                row = prng.choice(range(0, q_len, TILE))
                n0, _ = consumer_blocks(q_len, prefix + q_len, row, 0, causal, ROWS, block_n)
                n1, _ = consumer_blocks(q_len, prefix + q_len, row, 1, causal, ROWS, block_n)
                items.append((n0, n1, max(n0, n1)))
            _protocol_run(items, stages, prng, widen=s % 2 == 1)
            runs += 1
    print(f"barrier protocol: {runs} random interleavings (half with the fp16 P·V widener), "
          "no deadlock, no stale stage")  # fmt: skip
    return 0
