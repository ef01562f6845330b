"""The CPU self-check (`--selfcheck`): the served kernel's barrier protocol under random
interleavings (tests/test_gluon_prefill.py checks its block ranges and work plan)."""

from __future__ import annotations

from lab.gluon_ws.protocol import interleave, random_items
from lab.gluon_ws.selfcheck_two_rings import two_rings_selfcheck

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
                yield ("release", ("empty", g % stages), g)

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
                yield ("release", ("empty", g % stages), g)
            g = base + n - 1
            read(g)
            issues.append(wg)
            yield ("arrive", ("turn", 1 - wg))
            yield from idle(g + 1, base + loaded)
            yield ("release", ("empty", g % stages), g)
            base += loaded

    agents = [producer(), consumer(0), consumer(1)] + ([widener()] if widen else [])
    interleave(agents, bars, releases, rng)
    assert len(issues) == sum(n0 + n1 for n0, n1, _ in items)


def selfcheck(seeds: int = 200) -> int:
    """No GPU: the barrier protocol under random interleavings (3 and 4 stages, key blocks
    of one page or two, random item lists with uneven and idle consumers, with and without
    the fp16 P·V widener), then the planned two-ring protocol (`selfcheck_two_rings`). The
    block ranges and the work plan are checked by tests/test_gluon_prefill.py."""
    import random

    runs = 0
    for stages in (3, 4):
        for s in range(seeds):
            prng = random.Random(1000 * stages + s)
            _protocol_run(random_items(prng), stages, prng, widen=s % 2 == 1)
            runs += 1
    print(f"barrier protocol: {runs} random interleavings (half with the fp16 P·V widener), "
          "no deadlock, no stale stage")  # fmt: skip
    return two_rings_selfcheck(seeds)
