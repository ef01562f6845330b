"""The random-interleaving executor of the barrier-protocol self-checks, and their random
work items (`selfcheck`: the served protocol; `selfcheck_two_rings`: a planned one)."""

from __future__ import annotations

from sageserve.attention.sage_attn.kernels.gluon.config import KEYS, ROWS, TILE
from sageserve.attention.sage_attn.kernels.gluon.plan import consumer_blocks

SPECIAL_Q = [1, 7, 63, 64, 65, 127, 128, 129, 191, 192, 200, 255, 256, 333, 1000]


def interleave(agents: list, bars: dict, releases: dict, rng) -> None:
    """Run the agents' ops (generators of ("wait", bar, phase), ("arrive", bar), ("tma", bar),
    ("release", bar, what)) in a random order that respects the waits; a TMA completes at a
    random later point; ("release", bar, what) counts a release of `what` and arrives on
    bar. Agents 1 and 2 are the consumers: their turn waits and passes must alternate.
    Asserts no deadlock and no turn left held. bars: key -> [phase, arrivals, count]."""

    def arrive(key):
        bar = bars[key]
        bar[1] += 1
        if bar[1] == bar[2]:
            bar[0], bar[1] = bar[0] + 1, 0

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
            releases[op[2]] = releases.get(op[2], 0) + 1
            arrive(op[1])
        pending[pick] = next(agents[pick], None)
    assert not any(holding), "a turn left held"


def random_items(prng) -> list[tuple[int, int, int]]:
    """1-6 work items of random chunks (lengths around the block sizes, small prefixes,
    causal or not, key blocks of one page or two): (n0, n1, loaded) each."""
    causal = prng.random() < 0.7
    block_n = prng.choice([KEYS, 2 * KEYS])
    items = []
    for _ in range(prng.randint(1, 6)):
        q_len = prng.choice(SPECIAL_Q)
        prefix = prng.choice([0, 1, 64, 100, 200])
        row = prng.choice(range(0, q_len, TILE))
        n0, _ = consumer_blocks(q_len, prefix + q_len, row, 0, causal, ROWS, block_n)
        n1, _ = consumer_blocks(q_len, prefix + q_len, row, 1, causal, ROWS, block_n)
        items.append((n0, n1, max(n0, n1)))
    return items
