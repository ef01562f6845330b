"""CUDA-graph decode: batch sizes, the backends' static metadata, the graph runner.

On CPU the static-buffer path runs eagerly (`DecodeGraphRunner(capture=False)`) through
Triton's interpreter: attention through the static metadata must equal the eager step's
bitwise (outputs and cache; padded rows give zeros and store nothing), and the model's
logits must equal eager ones up to the linear layers' batch-shape rounding. The `gpu` tests
capture and replay real graphs (bitwise against eager) and compare an engine with graphs
against one with `--disable-cuda-graph`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re

import pytest
import torch
from cache_snapshots import assert_same_pool, assert_written_only, restore, snapshot
from int8_flips import assert_logprob_rows_close, assert_outputs_match
from tiny_models import tiny_llama_config

from sageserve.attention.base import BackendOptions
from sageserve.attention.batch import ForwardBatch, SequenceSlice, build_forward_batch
from sageserve.attention.graph_sizes import graph_batch_sizes, padded_batch_size
from sageserve.attention.page_tables import padded_page_table
from sageserve.attention.registry import get_backend_class
from sageserve.attention.sage_attn.kernels.decode import DecodeWorkspace, sage_decode_paged
from sageserve.attention.sage_attn.options import SageOptions
from sageserve.config import CacheConfig, CudaGraphConfig, EngineConfig
from sageserve.engine.cuda_graph import DecodeGraphRunner
from sageserve.engine.engine import Engine
from sageserve.engine.llm import LLM
from sageserve.engine.sampler import SamplingRow
from sageserve.engine.sampling_params import SamplingParams
from sageserve.engine.static_sampler import SampleMode
from sageserve.engine_args import add_engine_args, engine_config_from_args
from sageserve.models.config import ModelConfig
from sageserve.models.loader import LoadedModel, build_model, init_dummy_weights

CPU = torch.device("cpu")
PAGE = 16
# Backends whose decode can be captured, as (name, sage options): sage_attn also with a
# layer kept exact (through the triton backend's kernels and graph metadata).
GRAPH_BACKENDS = [
    ("triton", SageOptions()),
    ("sage_attn", SageOptions(impl="triton")),
    ("sage_attn", SageOptions(impl="triton", skip_layers=(1,))),
]
GRAPH_IDS = ["triton", "sage_attn", "sage_attn-exact-layer-1"]
# Kernels on CPU tensors run only in Triton's interpreter (conftest sets it without a GPU).
interpreted = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1",
    reason="CPU tensors need Triton's interpreter; the gpu tests cover this on a GPU machine",
)


def _tiny_config() -> ModelConfig:
    return tiny_llama_config(vocab_size=512)


def _tiny_model(dtype: torch.dtype, device: torch.device) -> LoadedModel:
    config = _tiny_config()
    model = build_model(config, dtype, device)
    init_dummy_weights(model, seed=0)
    return LoadedModel(model.eval(), config, None, dtype, "tiny dummy model")


def _engine_config(backend: str, sage: SageOptions, device: str, **graph) -> EngineConfig:
    dtype = "float32" if device == "cpu" else "float16"
    return EngineConfig(
        dtype=dtype, device=device, attention_backend=backend,
        attention_options=(sage,),
        cache=CacheConfig(page_size=PAGE, max_total_tokens=2048),
        cuda_graph=CudaGraphConfig(**graph),
    )  # fmt: skip


# ----------------------------------------------------------------- batch sizes


def test_graph_batch_sizes_and_padding() -> None:
    assert graph_batch_sizes(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    assert graph_batch_sizes(50)[-1] == 48 and graph_batch_sizes(1) == [1]
    assert graph_batch_sizes(300)[-3:] == [240, 256, 288]  # past 256: steps of 32
    assert [padded_batch_size(n) for n in (1, 2, 3, 5, 8, 9, 17, 63, 65, 250)] == [
        1, 2, 4, 8, 8, 16, 24, 64, 80, 256,
    ]  # fmt: skip
    for n in range(1, 300):  # every padded size is a graph size, and the smallest one >= n
        padded = padded_batch_size(n)
        assert padded >= n and padded in graph_batch_sizes(padded)
        assert all(s < n for s in graph_batch_sizes(padded)[:-1])


# ------------------------------------------------------- decode of an empty context


@interpreted
@pytest.mark.parametrize("pv", ["fp16", "fp8"])
def test_8bit_decode_of_an_empty_context_is_zero(pv: str) -> None:
    """A padded graph row (kv_len 0) writes zeros, never NaN (0/0). (The 16-bit decode's
    case is test_kernels_triton_attention.py::test_decode_of_an_empty_context_is_zero.)"""
    gen = torch.Generator().manual_seed(1)
    pages, heads, dim = 6, 2, 64
    k = torch.randint(-127, 128, (pages, heads, PAGE, dim), dtype=torch.int8, generator=gen)
    v = torch.randint(-127, 128, (pages, heads, dim, PAGE), dtype=torch.int8, generator=gen)
    if pv == "fp8":
        v = (v.float() * 3).to(torch.float8_e4m3fn)
    k_scale = (torch.rand(pages, heads, PAGE, generator=gen) / 100).half()
    v_scale = (torch.rand(pages, heads, PAGE, generator=gen) / 100).half()
    q = torch.randn(3, 4, dim, generator=gen)
    kv_lens = [0, 37, 0]
    table = padded_page_table([(), (4, 2, 5), ()], kv_lens, PAGE, CPU)
    rows, lens = torch.arange(3, dtype=torch.int32), torch.tensor(kv_lens, dtype=torch.int32)
    workspace = DecodeWorkspace.allocate(3, 4, heads, dim, table.shape[1] * PAGE, CPU)
    out = torch.full_like(q, float("nan"))
    sage_decode_paged(q, None, k, k_scale, v, v_scale, table, rows, lens, out, workspace)
    assert torch.equal(out[0], torch.zeros(4, dim)) and torch.equal(out[2], torch.zeros(4, dim))
    assert torch.isfinite(out[1]).all()


# ----------------------------------------------------------- who supports graphs


def _backend(name: str, sage: SageOptions | None = None):
    options = BackendOptions("auto", torch.float32, CPU, sage if name == "sage_attn" else None)
    return get_backend_class(name)(_tiny_config().attention_shape(), options)


@interpreted
@pytest.mark.parametrize(
    ("name", "sage", "reason"),
    [
        ("torch", SageOptions(), "exact reference, not a speed path"),
        ("sage_attn", SageOptions(impl="reference"), "torch reference"),
        ("sage_attn", SageOptions(impl="triton", skip_layers=(1,)), None),
        ("triton", SageOptions(), None),
        ("sage_attn", SageOptions(impl="triton"), None),
    ],
)
def test_cuda_graph_support(name: str, sage: SageOptions, reason: str | None) -> None:
    got = _backend(name, sage).cuda_graph_unsupported_reason()
    if reason is None:
        assert got is None
    else:
        assert got is not None and re.search(reason, got), got


@interpreted
def test_exact_layers_go_through_triton_where_it_serves() -> None:
    """sage_attn's exact layers run on the triton backend beside its own kernels (graphs
    stay on); where triton cannot serve the dtype (bf16 in the interpreter, fp32 on CUDA),
    on the torch backend, and the graph refusal names both reasons."""
    exact_one = SageOptions(impl="triton", skip_layers=(1,))
    assert _backend("sage_attn", exact_one).exact.name == "triton"
    assert _backend("sage_attn", SageOptions(skip_layers=(1,))).exact.name == "torch"
    options = BackendOptions("auto", torch.bfloat16, CPU, exact_one)
    bf16 = get_backend_class("sage_attn")(_tiny_config().attention_shape(), options)
    assert bf16.exact.name == "torch"
    reason = bf16.cuda_graph_unsupported_reason()
    assert "layers [1] exact through the torch backend" in reason
    assert "bfloat16" in reason and "not a speed path" in reason


@interpreted
def test_graph_runner_refuses_what_it_cannot_do() -> None:
    loaded = _tiny_model(torch.float32, CPU)
    torch_backend = _backend("torch")
    with pytest.raises(ValueError, match="exact reference"):
        DecodeGraphRunner(loaded.model, torch_backend, None, [1], 64, capture=False)
    triton = _backend("triton")
    cache = triton.allocate(8, PAGE)
    with pytest.raises(ValueError, match="must be graph sizes"):
        DecodeGraphRunner(loaded.model, triton, cache, [1, 3], 64, capture=False)
    with pytest.raises(ValueError, match="needs CUDA"):
        DecodeGraphRunner(loaded.model, triton, cache, [1], 64, capture=True)
    with pytest.raises(ValueError, match="exceeds"):
        DecodeGraphRunner(loaded.model, triton, cache, [1], 9 * PAGE, capture=False)


@interpreted
def test_flags_and_cpu_engine_without_graphs() -> None:
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    config = engine_config_from_args(
        parser.parse_args(["--disable-cuda-graph", "--cuda-graph-max-bs", "16"])
    )
    assert config.cuda_graph == CudaGraphConfig(disable=True, max_bs=16)
    assert engine_config_from_args(parser.parse_args([])).cuda_graph == CudaGraphConfig()
    no_sampling = parser.parse_args(["--disable-cuda-graph-sampling"])
    assert engine_config_from_args(no_sampling).cuda_graph.disable_sampling
    with pytest.raises(ValueError, match="cuda_graph_max_bs must be >= 1"):
        CudaGraphConfig(max_bs=0)
    # On CPU graphs are never captured, asked for or not, and that is no error.
    engine = Engine(_engine_config("triton", SageOptions(), "cpu"), _tiny_model(torch.float32, CPU))
    assert engine._runner.graph_runner is None


# ------------------------------------------------- the static path, eagerly, on CPU


def _new_slots(batch: ForwardBatch) -> list[int]:
    return batch.slot_mapping.tolist()


def _decode_batch(tables, lengths, rows, gen, device) -> ForwardBatch:
    seqs = [SequenceSlice(tables[i], lengths[i], 1) for i in rows]
    ids = [[int(torch.randint(0, 512, (1,), generator=gen))] for _ in rows]
    return build_forward_batch(seqs, ids, list(range(len(rows))), PAGE, device)


# Contexts of assorted lengths (all but one not a multiple of the page size; the last long
# enough that another split count or split length would cut it elsewhere), and decode steps
# of 6, 5, 3 and 1 of them: padded to 8, 8 (reusing rows the first step filled), 4, 1.
LENGTHS = [5, 16, 17, 40, 63, 300]
# The model-level checks need no long context (and the interpreter's store is slow).
SHORT_LENGTHS = [5, 16, 17, 40, 63, 33]
STEPS = ([0, 1, 2, 3, 4, 5], [5, 0, 2, 3, 1], [1, 3, 4], [2])
GRAPH_CONTEXT = 512


def _tables(lengths: list[int], num_pages: int, gen: torch.Generator) -> list[tuple[int, ...]]:
    """Shuffled pages for every sequence and its decode steps."""
    order = (torch.randperm(num_pages - 1, generator=gen) + 1).tolist()
    tables = []
    for n in lengths:
        count = -(-(n + len(STEPS)) // PAGE)
        tables.append(tuple(order[:count]))
        order = order[count:]
    return tables


def _backend_step(backend, cache, meta, q, k, v) -> list[torch.Tensor]:
    return [backend.forward(layer, q, k, v, cache, meta) for layer in range(2)]


@interpreted
@pytest.mark.parametrize(("name", "sage"), GRAPH_BACKENDS, ids=GRAPH_IDS)
def test_backend_static_decode_equals_eager(name: str, sage: SageOptions) -> None:
    """Attention alone, bitwise: a decode step through the static metadata (padded rows
    carrying garbage q, k, v) gives the eager step's outputs and cache; padded rows give
    zeros and store nothing in the pool."""
    gen = torch.Generator().manual_seed(3)
    backend = _backend(name, sage)
    cache = backend.allocate(64, PAGE)
    if name == "sage_attn":
        backend.set_calibration(torch.randn(2, 2, 64, generator=gen), torch.rand(2, 2, 64) + 0.5)
    tables, lengths = _tables(LENGTHS, 64, gen), list(LENGTHS)
    seqs = [SequenceSlice(t, 0, n) for t, n in zip(tables, lengths, strict=True)]
    prefill = build_forward_batch(seqs, [[0] * n for n in lengths], [], PAGE, CPU)
    tokens = sum(lengths)
    _backend_step(backend, cache, backend.build_metadata(prefill),
                  *(torch.randn(tokens, h, 64, generator=gen) for h in (4, 2, 2)))  # fmt: skip
    graph_metas = {bs: backend.graph_metadata(cache, bs, GRAPH_CONTEXT) for bs in (1, 4, 8)}
    for rows in STEPS:
        batch = _decode_batch(tables, lengths, rows, gen, CPU)
        n, bs = len(rows), padded_batch_size(len(rows))
        q, k, v = (torch.randn(bs, h, 64, generator=gen) for h in (4, 2, 2))
        before = snapshot(cache)
        eager = _backend_step(backend, cache, backend.build_metadata(batch), q[:n], k[:n], v[:n])
        after_eager = snapshot(cache)
        restore(cache, before)
        backend.graph_update(graph_metas[bs], batch)
        static = _backend_step(backend, cache, graph_metas[bs].meta, q, k, v)
        for out_static, out_eager in zip(static, eager, strict=True):
            assert torch.equal(out_static[:n], out_eager), rows
            assert torch.equal(out_static[n:], torch.zeros_like(out_static[n:])), rows
        assert_same_pool(cache, after_eager)
        for i in rows:
            lengths[i] += 1


def _check_static_path(runner, graphs, device, exact: bool, eight_bit: bool = False) -> None:
    """The model through the static path vs eagerly over the same decode steps: the same
    logits (bitwise when `exact`; else to the linear layers' rounding, which on the 8-bit
    path may flip a code: int8_flips.py) and no cache write but the real rows' new tokens."""
    gen = torch.Generator().manual_seed(5)
    lengths = list(SHORT_LENGTHS)
    tables = _tables(lengths, runner.num_pages, gen)
    seqs = [SequenceSlice(t, 0, n) for t, n in zip(tables, lengths, strict=True)]
    ids = [torch.randint(0, 512, (n,), generator=gen).tolist() for n in lengths]
    runner.forward_eager(build_forward_batch(seqs, ids, [], PAGE, device))
    for rows in STEPS:
        batch = _decode_batch(tables, lengths, rows, gen, device)
        before = snapshot(runner.kv_cache)
        eager = runner.forward_eager(batch)
        after_eager = snapshot(runner.kv_cache)
        restore(runner.kv_cache, before)
        static = graphs.run(batch)
        assert torch.isfinite(static).all()
        assert_written_only(runner.kv_cache, before, _new_slots(batch))
        if exact:
            assert torch.equal(static, eager), (rows, (static - eager).abs().max())
            assert_same_pool(runner.kv_cache, after_eager)
        else:
            assert_logprob_rows_close(static, eager, exact_atol=None if eight_bit else 1e-5)
        for i in rows:
            lengths[i] += 1


@interpreted
@pytest.mark.parametrize(("backend", "sage"), GRAPH_BACKENDS, ids=GRAPH_IDS)
def test_static_path_equals_eager_on_cpu(backend: str, sage: SageOptions) -> None:
    """On CPU the linear layers round differently at another row count (MKL: 6 rows vs the
    8 of the padded batch differ by ~1e-6), so logits agree to 1e-5 here; attention alone
    is bitwise (test_backend_static_decode_equals_eager)."""
    engine = Engine(_engine_config(backend, sage, "cpu"), _tiny_model(torch.float32, CPU))
    runner = engine._runner
    graphs = DecodeGraphRunner(
        runner.model, runner.backend, runner.kv_cache, [1, 4, 8], GRAPH_CONTEXT, capture=False
    )
    _check_static_path(runner, graphs, CPU, exact=False, eight_bit=backend == "sage_attn")
    assert graphs.num_runs == len(STEPS)


@interpreted
def test_static_path_refuses_other_steps() -> None:
    engine = Engine(_engine_config("triton", SageOptions(), "cpu"), _tiny_model(torch.float32, CPU))
    runner = engine._runner
    graphs = DecodeGraphRunner(runner.model, runner.backend, runner.kv_cache, [1, 4], 64, False)
    table = tuple(range(1, 9))
    prefill = build_forward_batch([SequenceSlice(table, 0, 2)], [[1, 2]], [1], PAGE, CPU)
    long = build_forward_batch([SequenceSlice(table, 64, 1)], [[1]], [0], PAGE, CPU)
    seqs = [SequenceSlice(table, 3, 1)] * 5
    too_many = build_forward_batch(seqs, [[1]] * 5, [0], PAGE, CPU)
    two = build_forward_batch(seqs[:2], [[1]] * 2, [0], PAGE, CPU)  # pads to 2: not captured
    for batch in (prefill, long, too_many, two):
        assert not graphs.can_run(batch)
        with pytest.raises(ValueError, match="not a decode step the CUDA graphs cover"):
            graphs.run(batch)
    one = build_forward_batch(seqs[:1], [[1]], [0], PAGE, CPU)
    assert graphs.can_run(one)
    greedy = [SamplingRow(SamplingParams(temperature=0), torch.Generator(), [], [])]
    assert graphs.sample_mode_for(one, greedy) is SampleMode.GREEDY
    assert graphs.sample_mode_for(one, greedy * 2) is None  # not one row per sequence
    assert graphs.sample_mode_for(long, greedy) is None  # a step the graphs do not cover
    with pytest.raises(ValueError, match="exactly one row per sequence"):
        graphs.run_and_sample(one, [], SampleMode.GREEDY)


# Request groups, each run as one batch, so that every decode step has one sampling mode:
# greedy, temperature / min-p, top-p beside other rows, and one the eager sampler must take
# (a penalty). Each request asks for logprobs.
SAMPLING_GROUPS = {
    SampleMode.GREEDY: [dict(temperature=0), dict(temperature=0, top_p=0.5)],
    SampleMode.RANDOM: [dict(temperature=0.9, seed=5), dict(temperature=0.7, min_p=0.05, seed=6),
                        dict(temperature=0)],
    SampleMode.TOP_P: [dict(temperature=1.1, top_p=0.8, seed=7),
                       dict(temperature=1.0, top_k=20, seed=8), dict(temperature=1.3, seed=9)],
    None: [dict(temperature=0.8, seed=10, repetition_penalty=1.3), dict(temperature=0)],
}  # fmt: skip


def _sample_groups(engine: Engine, prompts: list[list[int]]) -> tuple[list, list[int]]:
    """Each SAMPLING_GROUPS group run as one batch: the outputs, and per group how many
    decode steps the static sampler took."""
    graphs = engine._runner.graph_runner
    assert graphs is not None
    outputs, sampled = [], []
    for group in SAMPLING_GROUPS.values():
        params = [SamplingParams(**p, max_new_tokens=7, ignore_eos=True, logprobs=2)
                  for p in group]  # fmt: skip
        before = graphs.num_sampled
        outputs += _generate_all(engine, prompts[: len(params)], params)
        sampled.append(graphs.num_sampled - before)
    return outputs, sampled


def _check_sampled_groups(outputs: dict[bool, list], sampled: dict[bool, list[int]]) -> None:
    for a, b in zip(outputs[True], outputs[False], strict=True):
        assert_outputs_match(a, b, exact=True, top_n=2, exact_tol=1e-6)
    # 6 decode steps per group (the first token comes from the prefill step).
    assert sampled[True] == [6, 6, 6, 0] and sampled[False] == [0, 0, 0, 0]
    # The noise mattered: the random request on prompt 0 left the greedy one's path.
    assert outputs[True][2].token_ids != outputs[True][0].token_ids


def _prompts(seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 512, (n,), generator=gen).tolist() for n in (9, 20, 3)]


@interpreted
def test_engine_samples_in_the_static_path_as_the_eager_sampler_does() -> None:
    """Decode steps sampled by the static sampler (`run_and_sample`, what the sampling
    graphs capture) against the same static forward sampled by the eager `Sampler`: the same
    tokens and logprobs in every mode, and steps of the penalised group left to `Sampler`."""
    loaded, prompts = _tiny_model(torch.float32, CPU), _prompts(11)
    outputs, sampled = {}, {}
    for in_graph in (True, False):
        engine = Engine(_engine_config("triton", SageOptions(), "cpu"), loaded)
        runner = engine._runner
        runner.graph_runner = DecodeGraphRunner(
            runner.model, runner.backend, runner.kv_cache, [1, 2, 4], GRAPH_CONTEXT,
            capture=False, sample_in_graph=in_graph,
        )  # fmt: skip
        outputs[in_graph], sampled[in_graph] = _sample_groups(engine, prompts)
        engine.close()
    _check_sampled_groups(outputs, sampled)


# -------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize(("backend", "sage"), GRAPH_BACKENDS, ids=GRAPH_IDS)
def test_graph_replay_equals_eager_on_gpu(backend: str, sage: SageOptions) -> None:
    """Replayed graphs give the eager path's logits and cache, bitwise."""
    cuda = torch.device("cuda")
    config = _engine_config(backend, dataclasses.replace(sage, impl="auto"), "cuda")
    engine = Engine(config, _tiny_model(torch.float16, cuda))
    runner = engine._runner
    assert runner.graph_runner is not None and runner.graph_runner.batch_sizes[-1] == 64
    graphs = DecodeGraphRunner(
        runner.model, runner.backend, runner.kv_cache, [1, 4, 8], GRAPH_CONTEXT
    )
    _check_static_path(runner, graphs, cuda, exact=True)
    assert graphs.num_runs == len(STEPS)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "sage_attn"])
def test_engine_with_graphs_equals_eager_on_gpu(backend: str) -> None:
    """A mixed workload (chunked prefills beside decodes, decode batches from 10 down to 1:
    eager above the largest graph, padded to 8, 4, 2 and exact at 1): greedy tokens
    identical and logprobs equal with and without decode graphs (steps with prefill run
    eagerly on both sides here: test_piecewise_graph.py covers their graphs)."""
    cuda = torch.device("cuda")
    loaded = _tiny_model(torch.float16, cuda)
    lengths = [3, 17, 64, 100, 129, 250, 31, 7, 80, 45]
    gen = torch.Generator().manual_seed(9)
    prompts = [torch.randint(0, 512, (n,), generator=gen).tolist() for n in lengths]
    params = [
        SamplingParams(temperature=0, max_new_tokens=n, ignore_eos=True, logprobs=3)
        for n in (20, 5, 12, 30, 7, 16, 25, 9, 14, 3)
    ]
    outputs = {}
    for disable in (False, True):
        config = dataclasses.replace(
            _engine_config(
                backend, SageOptions(), "cuda", disable=disable, max_bs=8, piecewise_max_tokens=0
            ),
            scheduler=dataclasses.replace(EngineConfig().scheduler, chunked_prefill_size=96),
        )
        llm = LLM.from_engine_config(config, loaded)
        graphs = llm.engine._runner.graph_runner
        assert (graphs is None) == disable
        outputs[disable] = llm.generate(prompts, params)
        if graphs is not None:
            assert graphs.batch_sizes == [1, 2, 4, 8] and graphs.num_runs > 0
        llm.engine.close()
    for with_graphs, eager in zip(outputs[False], outputs[True], strict=True):
        exact = backend == "triton"
        assert_outputs_match(with_graphs, eager, exact=exact, top_n=3, exact_tol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "sage_attn"])
def test_sampling_graphs_pick_the_eager_sampler_tokens_on_gpu(backend: str) -> None:
    """Captured sampling graphs against `--disable-cuda-graph-sampling` (the same forward
    graphs, then the eager Sampler): identical tokens and logprobs in every mode."""
    loaded, prompts = _tiny_model(torch.float16, torch.device("cuda")), _prompts(12)
    outputs, sampled = {}, {}
    for in_graph in (True, False):
        config = _engine_config(
            backend, SageOptions(), "cuda", max_bs=4, disable_sampling=not in_graph
        )
        with LLM.from_engine_config(config, loaded).engine as engine:
            graphs = engine._runner.graph_runner
            assert graphs is not None and graphs.sample_in_graph == in_graph
            modes = [len(step.sample_graphs) for step in graphs.steps.values()]
            assert set(modes) == {len(SampleMode) if in_graph else 0}
            outputs[in_graph], sampled[in_graph] = _sample_groups(engine, prompts)
    _check_sampled_groups(outputs, sampled)


def _serving_and_plain(backend: str) -> dict[str, EngineConfig]:
    """The serving path (overlap, fused layers, graphs up to 8) and variants of it."""
    serving = dataclasses.replace(
        _engine_config(backend, SageOptions(), "cuda", max_bs=8),
        scheduler=dataclasses.replace(EngineConfig().scheduler, chunked_prefill_size=96),
    )
    no_overlap = dataclasses.replace(serving, overlap_schedule=False)
    plain = dataclasses.replace(
        no_overlap, fused_layers=False, cuda_graph=CudaGraphConfig(disable=True)
    )
    return {"serving": serving, "no_overlap": no_overlap, "plain": plain}


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "sage_attn"])
def test_overlap_and_fusion_follow_the_plain_eager_path_on_gpu(backend: str) -> None:
    """Greedy requests through the serving path (overlap schedule, fused layers, CUDA
    graphs) against each step read back at once: bitwise on triton when only the overlap
    differs (the same steps run in the same batches); against the plain path (torch layer
    ops, eager) up to a near-tie, since fused RMSNorm and SiLU-mul round within two last
    places of the torch ops. Stop tokens end requests at the same token."""
    loaded = _tiny_model(torch.float16, torch.device("cuda"))
    lengths = [3, 17, 64, 100, 129, 250, 31, 7, 80, 45]
    gen = torch.Generator().manual_seed(10)
    prompts = [torch.randint(0, 512, (n,), generator=gen).tolist() for n in lengths]
    counts = (20, 5, 12, 30, 7, 16, 25, 9, 14, 3)
    params = [SamplingParams(temperature=0, max_new_tokens=n, ignore_eos=True, logprobs=3)
              for n in counts]  # fmt: skip
    configs = _serving_and_plain(backend)
    outputs = {}
    for name, config in configs.items():
        with LLM.from_engine_config(config, loaded).engine as engine:
            outputs[name] = _generate_all(engine, prompts, params)
    exact = backend == "triton"
    for a, b in zip(outputs["serving"], outputs["no_overlap"], strict=True):
        assert_outputs_match(a, b, exact=exact, top_n=3, exact_tol=1e-5)
    for a, b in zip(outputs["serving"], outputs["plain"], strict=True):
        assert_outputs_match(a, b, exact=False, top_n=3)
    stops = [SamplingParams(temperature=0, max_new_tokens=30, stop_token_ids=[out.token_ids[2]])
             for out in outputs["serving"] if len(out.token_ids) > 2]  # fmt: skip
    stopped = {}
    for name in ("serving", "no_overlap"):
        with LLM.from_engine_config(configs[name], loaded).engine as engine:
            stopped[name] = _generate_all(engine, prompts[: len(stops)], stops)
    for a, b, p in zip(stopped["serving"], stopped["no_overlap"], stops, strict=True):
        assert a.finish_reason == "stop" and a.token_ids[-1] in p.stop_token_ids
        if exact:
            assert a.token_ids == b.token_ids and b.finish_reason == "stop"


def _generate_all(engine: Engine, prompts: list[list[int]], params: list[SamplingParams]) -> list:
    ids = [engine.add_request(p, sp) for p, sp in zip(prompts, params, strict=True)]
    done = {}
    while engine.has_unfinished_requests():
        done |= {out.request_id: out for out in engine.step() if out.finished}
    stats = engine.stats()
    assert stats.num_free_pages == stats.num_usable_pages
    return [done[i] for i in ids]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "sage_attn"])
def test_direct_launches_change_no_output_on_gpu(backend: str, monkeypatch) -> None:
    """The serving path with Triton kernels launched directly (`kernel_launch`) and through
    Triton's launch path: the same kernels on the same inputs, so the same bits."""
    from sageserve import kernel_launch

    loaded = _tiny_model(torch.float16, torch.device("cuda"))
    gen = torch.Generator().manual_seed(11)
    lengths = [5, 70, 130, 33, 200, 9]
    prompts = [torch.randint(0, 512, (n,), generator=gen).tolist() for n in lengths]
    params = [SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True, logprobs=3)
              for _ in lengths]  # fmt: skip
    outputs = {}
    for direct in (True, False):
        monkeypatch.setattr(kernel_launch, "ENABLED", direct)
        config = _serving_and_plain(backend)["serving"]
        with LLM.from_engine_config(config, loaded).engine as engine:
            outputs[direct] = _generate_all(engine, prompts, params)
    for a, b in zip(outputs[True], outputs[False], strict=True):
        assert_outputs_match(a, b, exact=True, top_n=3, exact_tol=0.0)
