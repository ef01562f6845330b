"""Token sources and request driving shared by the local sections.

Prompts are cut from the Britannica text (`data.britannica_text`), so every section measures
real prose, and a run is reproducible from the report's token offsets.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace

from sageserve.config import EngineConfig
from sageserve.engine.engine import Engine
from sageserve.engine.request import RequestOutput
from sageserve.engine.sampling_params import SamplingParams
from sageserve.models.loader import LoadedModel


class TextSource:
    """Hands out spans of a token sequence: distinct ones (`take`) or reusable ones (`cycled`).

    `take` never returns a token twice, so windows of different sections never overlap;
    `cycled` wraps around the text for workloads that only need realistic tokens (speed).
    """

    def __init__(self, token_ids: Sequence[int]) -> None:
        self.token_ids = list(token_ids)
        self.next_offset = 0

    def take(self, n: int) -> tuple[int, list[int]]:
        """(offset, the next n unused tokens); ValueError when the text runs out."""
        start, end = self.next_offset, self.next_offset + n
        if end > len(self.token_ids):
            raise ValueError(
                f"the text has {len(self.token_ids)} tokens; the sizes asked for need more "
                f"(at least {end}): lower the window counts or lengths"
            )
        self.next_offset = end
        return start, self.token_ids[start:end]

    def cycled(self, offset: int, n: int) -> list[int]:
        """n tokens starting at `offset` (modulo the text length), wrapping around."""
        total = len(self.token_ids)
        return [self.token_ids[(offset + i) % total] for i in range(n)]


@contextmanager
def built_engine(
    base: EngineConfig, backend: str, loaded: LoadedModel, prefix_cache: bool | None = None
) -> Iterator[Engine]:
    """An Engine for `backend` over the shared weights, freed (pool and all) on exit, even
    while the caller's `as` name still refers to it: the next engine's pool is sized from the
    memory left on the card.

    prefix_cache: override the base config's setting (None keeps it).
    """
    config = replace(base, attention_backend=backend)
    if prefix_cache is not None:
        config = replace(config, cache=replace(config.cache, enable_prefix_cache=prefix_cache))
    with Engine(config, loaded) as engine:
        yield engine


def generate(
    engine: Engine,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams | Sequence[SamplingParams],
) -> list[RequestOutput]:
    """Every prompt's finished output, in order, all queued at once (one continuous batch)."""
    params_list = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
    pairs = zip(prompts, params_list, strict=True)
    ids = [engine.add_request(list(p), sp, stream=False) for p, sp in pairs]
    return drain(engine, ids)


def drain(engine: Engine, request_ids: list[str]) -> list[RequestOutput]:
    """Step the engine until every request in `request_ids` has finished; outputs in order."""
    finished: dict[str, RequestOutput] = {}
    wanted = set(request_ids)
    while not wanted.issubset(finished):
        if not engine.has_unfinished_requests():
            raise RuntimeError("the engine went idle before every request finished")
        for out in engine.step():
            if out.finished and out.request_id in wanted:
                finished[out.request_id] = out
    return [finished[i] for i in request_ids]
