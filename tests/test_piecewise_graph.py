"""Piecewise CUDA graphs: token counts, the runner's static path, the engine with it.

On CPU the static path runs eagerly (`PiecewiseGraphRunner(capture=False)`): the model over
padded static inputs, each layer's K/V stored through the backend's piece store over every
padded row (or, without one, copied with q into the static buffers), attention over the
real rows. Against the eager step it must give the same logits (to the linear layers'
rounding at another row count; on the 8-bit path up to a code flip, int8_flips.py) and
write the cache at the step's new slots only (padding rows nowhere a sequence reads). The
`gpu` tests capture and replay.
"""

from __future__ import annotations

import argparse
import dataclasses

import pytest
import torch
from cache_snapshots import assert_written_only, restore, snapshot
from int8_flips import assert_logprob_rows_close, assert_outputs_match
from tiny_models import tiny_llama_config

from sageserve.attention.base import PieceStore
from sageserve.attention.batch import SequenceSlice, build_forward_batch
from sageserve.attention.graph_sizes import padded_token_count, piecewise_token_counts
from sageserve.attention.sage_attn.options import SageOptions
from sageserve.config import CacheConfig, CudaGraphConfig, EngineConfig
from sageserve.engine.engine import Engine
from sageserve.engine.llm import LLM
from sageserve.engine.piecewise_graph import PiecewiseGraphRunner
from sageserve.engine.sampling_params import SamplingParams
from sageserve.engine_args import add_engine_args, engine_config_from_args
from sageserve.models.loader import LoadedModel, build_model, init_dummy_weights

CPU = torch.device("cpu")
PAGE = 16
VOCAB = 512
BACKENDS = [
    ("torch", SageOptions()),
    ("triton", SageOptions()),
    ("sage_attn", SageOptions(impl="triton")),
    ("sage_attn", SageOptions(impl="triton", skip_layers=(1,))),
    # Prefill queries rotated and quantized by a pass before the prefill kernel.
    ("sage_attn", SageOptions(impl="triton", rotation_kernel="prepass")),
]
BACKEND_IDS = ["torch", "triton", "sage_attn", "sage_attn-exact-layer-1", "sage_attn-prepass"]
TOKEN_COUNTS = [16, 32, 64, 128, 192, 256, 320, 384]


def _tiny_model(dtype: torch.dtype, device: torch.device) -> LoadedModel:
    config = tiny_llama_config(vocab_size=VOCAB)
    model = build_model(config, dtype, device)
    init_dummy_weights(model, seed=0)
    return LoadedModel(model.eval(), config, None, dtype, "tiny dummy model")


def _engine_config(backend: str, sage: SageOptions, device: str, **graph) -> EngineConfig:
    return EngineConfig(
        dtype="float32" if device == "cpu" else "float16", device=device,
        attention_backend=backend, attention_options=(sage,),
        cache=CacheConfig(page_size=PAGE, max_total_tokens=4096),
        cuda_graph=CudaGraphConfig(**graph),
    )  # fmt: skip


# ----------------------------------------------------------------- token counts


def test_token_counts_and_padding() -> None:
    assert piecewise_token_counts(512) == [16, 32, 64, 128, 192, 256, 320, 384, 448, 512]
    assert piecewise_token_counts(15) == [] and piecewise_token_counts(500)[-1] == 448
    assert [padded_token_count(n) for n in (1, 16, 17, 33, 64, 65, 200, 333)] == [
        16, 16, 32, 64, 64, 128, 256, 384,
    ]  # fmt: skip
    for n in range(1, 700):  # the smallest count >= n; past 256, at most a fifth padding
        padded = padded_token_count(n)
        assert padded >= n and padded in piecewise_token_counts(padded)
        assert all(c < n for c in piecewise_token_counts(padded)[:-1])
        assert n <= 256 or (padded - n) / padded <= 0.2
    with pytest.raises(ValueError, match="num_tokens must be >= 1"):
        padded_token_count(0)


def test_flag_and_config() -> None:
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    config = engine_config_from_args(parser.parse_args(["--piecewise-cuda-graph-max-tokens", "0"]))
    assert config.cuda_graph == CudaGraphConfig(piecewise_max_tokens=0)
    assert engine_config_from_args(parser.parse_args([])).cuda_graph.piecewise_max_tokens == 512
    with pytest.raises(ValueError, match="piecewise_cuda_graph_max_tokens must be >= 0"):
        CudaGraphConfig(piecewise_max_tokens=-1)
    engine = Engine(_engine_config("torch", SageOptions(), "cpu"), _tiny_model(torch.float32, CPU))
    assert engine._runner.piecewise_runner is None  # CPU: nothing is captured


def test_runner_refuses_what_it_cannot_do() -> None:
    engine = Engine(_engine_config("torch", SageOptions(), "cpu"), _tiny_model(torch.float32, CPU))
    runner = engine._runner
    args = (runner.model, runner.backend, runner.kv_cache)
    with pytest.raises(ValueError, match="must be piecewise graph sizes"):
        PiecewiseGraphRunner(*args, [16, 48], capture=False)
    with pytest.raises(ValueError, match="needs CUDA"):
        PiecewiseGraphRunner(*args, [16], capture=True)
    pieces = PiecewiseGraphRunner(*args, [16, 32], capture=False)
    table = tuple(range(1, 5))
    long = build_forward_batch([SequenceSlice(table, 0, 33)], [[1] * 33], [32], PAGE, CPU)
    assert not pieces.can_run(long)
    with pytest.raises(ValueError, match="a step of 33 tokens has no piecewise graph"):
        pieces.run(long)


# ------------------------------------------------- the static path, eagerly, on CPU


def _steps(num_pages: int, gen: torch.Generator) -> list[tuple[list[SequenceSlice], list[int]]]:
    """Steps of a workload, as (slices, their query lengths): prefills of 7 and 200 tokens;
    both decoding beside a first chunk of 100 of a 130-token prompt; its last 30 tokens
    (over its cached prefix) beside them; a 1-token prompt alone; 333 tokens of a fourth."""
    order = (torch.randperm(num_pages - 1, generator=gen) + 1).tolist()
    tables = []
    for n in (7 + 4, 200 + 4, 130 + 4, 1 + 1, 333 + 1):
        count = -(-n // PAGE)
        tables.append(tuple(order[:count]))
        order = order[count:]
    a, b, c, d, e = tables
    return [
        [SequenceSlice(a, 0, 7), SequenceSlice(b, 0, 200)],
        [SequenceSlice(a, 7, 1), SequenceSlice(c, 0, 100), SequenceSlice(b, 200, 1)],
        [SequenceSlice(c, 100, 30), SequenceSlice(a, 8, 1), SequenceSlice(b, 201, 1)],
        [SequenceSlice(d, 0, 1)],
        [SequenceSlice(e, 0, 333)],
    ]


def _batch(seqs: list[SequenceSlice], gen: torch.Generator, device: torch.device):
    ids = [torch.randint(0, VOCAB, (s.query_len,), generator=gen).tolist() for s in seqs]
    last, ends = 0, []
    for s in seqs:
        last += s.query_len
        ends.append(last - 1)
    return build_forward_batch(seqs, ids, ends, PAGE, device)


def _check_static_path(runner, pieces, device, *, atol: float | None) -> None:
    """Each step through the piecewise path against eagerly: logits close (atol None: the
    8-bit margins) and the cache written at the step's new slots only; the steps build
    on each other's cache (the eager step's writes are kept)."""
    gen = torch.Generator().manual_seed(7)
    for seqs in _steps(runner.num_pages, gen):
        batch = _batch(seqs, gen, device)
        before = snapshot(runner.kv_cache)
        static = pieces.run(batch)
        assert torch.isfinite(static).all()
        assert_written_only(runner.kv_cache, before, batch.slot_mapping.tolist())
        restore(runner.kv_cache, before)
        eager = runner.forward_eager(batch)
        assert static.shape == eager.shape == (batch.num_seqs, VOCAB)
        assert_logprob_rows_close(static, eager, exact_atol=atol)


@pytest.mark.parametrize(("backend", "sage"), BACKENDS, ids=BACKEND_IDS)
def test_static_path_equals_eager_on_cpu(backend: str, sage: SageOptions) -> None:
    """fp32 on CPU: the linear layers round differently at another row count (~1e-6), so
    logits agree to 1e-5 on the exact backends; sage_attn within the 8-bit margins."""
    engine = Engine(_engine_config(backend, sage, "cpu"), _tiny_model(torch.float32, CPU))
    runner = engine._runner
    pieces = PiecewiseGraphRunner(
        runner.model, runner.backend, runner.kv_cache, TOKEN_COUNTS, capture=False
    )
    eight_bit = backend == "sage_attn"
    _check_static_path(runner, pieces, CPU, atol=None if eight_bit else 1e-5)
    assert pieces.num_runs == 5


PIECE_STORES = [
    ("torch", SageOptions(), False),
    ("triton", SageOptions(), True),
    ("sage_attn", SageOptions(impl="triton"), True),
    ("sage_attn", SageOptions(impl="triton", skip_layers=(1,)), True),
    ("sage_attn", SageOptions(impl="reference"), False),
]


@pytest.mark.parametrize(("backend", "sage", "in_pieces"), PIECE_STORES)
def test_kv_stored_inside_the_pieces_where_the_backend_can(
    backend: str, sage: SageOptions, in_pieces: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A backend with a piece store stores K/V inside the pieces (captured) and launches
    only `attend_stored` between them; one without stores with its attention, eagerly."""
    engine = Engine(_engine_config(backend, sage, "cpu"), _tiny_model(torch.float32, CPU))
    runner = engine._runner
    pieces = PiecewiseGraphRunner(
        runner.model, runner.backend, runner.kv_cache, [16, 32], capture=False
    )
    assert (pieces.piece_store is not None) == in_pieces
    calls: list[str] = []
    for name in ("forward", "attend_stored", "store"):
        original = getattr(runner.backend, name)

        def spy(*args, _name=name, _original=original, **kwargs):
            calls.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(runner.backend, name, spy)
    gen = torch.Generator().manual_seed(3)
    table = tuple((torch.randperm(runner.num_pages - 1, generator=gen)[:2] + 1).tolist())
    pieces.run(_batch([SequenceSlice(table, 0, 20)], gen, CPU))
    layers = runner.model.config.num_layers
    expected = ["store", "attend_stored"] if in_pieces else ["forward"]
    assert calls == expected * layers


def test_piece_store_tables() -> None:
    """Every row starts as padding; `first` views the tables' own memory; `pad` resets the
    rows past a step's tokens up to its size and leaves the rest alone."""
    store = PieceStore.allocate(8, {"slot": -1, "page": 9}, CPU)
    assert store.tables["slot"].tolist() == [-1] * 8 and store.tables["page"].tolist() == [9] * 8
    rows = store.first(6)
    assert rows["slot"].data_ptr() == store.tables["slot"].data_ptr() and len(rows["slot"]) == 6
    store.tables["slot"].copy_(torch.arange(8))
    store.pad(2, 6)
    assert store.tables["slot"].tolist() == [0, 1, -1, -1, -1, -1, 6, 7]
    for size in (0, 9):
        with pytest.raises(ValueError, match=f"has no first {size}"):
            store.first(size)


def _prompts_and_params(seed: int) -> tuple[list[list[int]], list[SamplingParams]]:
    lengths = [3, 17, 64, 100, 129, 250, 31, 7, 80, 45]
    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in lengths]
    params = [
        SamplingParams(temperature=0, max_new_tokens=n, ignore_eos=True, logprobs=3)
        for n in (20, 5, 12, 30, 7, 16, 25, 9, 14, 3)
    ]
    return prompts, params


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_engine_steps_through_the_pieces_on_cpu(backend: str) -> None:
    """The engine (overlap schedule on, chunks of 96 beside decodes) with the piecewise
    path installed: every step runs through it, and greedy outputs match the eager
    engine's (fp32; tokens equal up to a near-tie, logprobs to 1e-5). triton stores K/V
    inside the pieces (its piece store), torch with its attention."""
    loaded = _tiny_model(torch.float32, CPU)
    config = dataclasses.replace(
        _engine_config(backend, SageOptions(), "cpu"),
        scheduler=dataclasses.replace(EngineConfig().scheduler, chunked_prefill_size=96),
    )
    prompts, params = _prompts_and_params(11)
    outputs = []
    for piecewise in (True, False):
        llm = LLM.from_engine_config(config, loaded)
        runner = llm.engine._runner
        if piecewise:
            runner.piecewise_runner = PiecewiseGraphRunner(
                runner.model, runner.backend, runner.kv_cache, [16, 32, 64, 128], capture=False
            )
        outputs.append(llm.generate(prompts, params))
        if piecewise:
            assert runner.piecewise_runner.num_runs == llm.engine.stats().num_steps
        llm.engine.close()
    for a, b in zip(*outputs, strict=True):
        assert_outputs_match(a, b, exact=True, top_n=3, exact_tol=1e-5)


# -------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize(("backend", "sage"), BACKENDS[1:], ids=BACKEND_IDS[1:])
def test_piecewise_replay_equals_eager_on_gpu(backend: str, sage: SageOptions) -> None:
    """Captured and replayed: L + 1 graphs a token count, layers in order; each step's
    logits against the eager step's (fp16; cuBLAS may pick another kernel at the padded
    row count, so to 2e-2 on the 16-bit backends, the 8-bit margins on sage_attn)."""
    cuda = torch.device("cuda")
    config = _engine_config(backend, dataclasses.replace(sage, impl="auto"), "cuda")
    engine = Engine(config, _tiny_model(torch.float16, cuda))
    runner = engine._runner
    assert runner.piecewise_runner is not None
    assert runner.piecewise_runner.token_counts == piecewise_token_counts(512)
    pieces = PiecewiseGraphRunner(runner.model, runner.backend, runner.kv_cache, TOKEN_COUNTS)
    layers = runner.model.config.num_layers
    for step in pieces.steps.values():
        assert len(step.graphs) == layers + 1 and step.layer_ids == list(range(layers))
    eight_bit = backend == "sage_attn"
    _check_static_path(runner, pieces, cuda, atol=None if eight_bit else 2e-2)
    assert pieces.num_runs == 5


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "sage_attn"])
def test_engine_with_piecewise_graphs_equals_eager_on_gpu(backend: str) -> None:
    """Chunked prefills beside decodes: greedy outputs with piecewise graphs (and the
    decode graphs) against every step eager, up to a near-tie; the pieces ran."""
    loaded = _tiny_model(torch.float16, torch.device("cuda"))
    prompts, params = _prompts_and_params(12)
    outputs = {}
    for disable in (False, True):
        config = dataclasses.replace(
            _engine_config(backend, SageOptions(), "cuda", disable=disable, max_bs=8),
            scheduler=dataclasses.replace(EngineConfig().scheduler, chunked_prefill_size=96),
        )
        llm = LLM.from_engine_config(config, loaded)
        outputs[disable] = llm.generate(prompts, params)
        pieces = llm.engine._runner.piecewise_runner
        assert (pieces is None) == disable
        assert disable or pieces.num_runs > 0
        llm.engine.close()
    for a, b in zip(outputs[False], outputs[True], strict=True):
        assert_outputs_match(a, b, exact=False, top_n=3)
