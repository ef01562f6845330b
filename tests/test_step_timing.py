"""Each engine step's kind and timing (`engine/step_timing.py`), the server's step histograms
and the bench's difference of two /metrics scrapes (`bench/server_steps.py`)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from sageserve.bench import server_steps
from sageserve.config import CacheConfig, EngineConfig, SchedulerConfig
from sageserve.engine.llm import LLM
from sageserve.engine.sampling_params import SamplingParams
from sageserve.engine.step_timing import StepTiming, step_composition
from sageserve.models.loader import LoadedModel, load_model
from sageserve.server.metrics import STEP_BUCKETS


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf) -> LoadedModel:
    return load_model(str(smollm2_gguf), dtype="float32", device="cpu")


def test_kind_names_what_the_step_launched() -> None:
    assert StepTiming(0, 5, 0.01, 0.008).kind == "decode"
    assert StepTiming(448, 31, 0.02, 0.0).kind == "mixed"
    assert StepTiming(7, 0, 0.01, 0.0).kind == "prefill"
    assert StepTiming(0, 0, 0.001, 0.001).kind == "none"
    assert StepTiming(7, 0, 0.010, 0.004).host_s == pytest.approx(0.006)


def test_composition_counts_decodes_and_prompt_tokens() -> None:
    def chunk(new: int, outputs: int) -> SimpleNamespace:
        request = SimpleNamespace(num_output_tokens=outputs)
        return SimpleNamespace(num_new_tokens=new, request=request)

    # a decode; a prompt chunk; the last prompt token of a new request; a preempted
    # request's recomputation (it has outputs, but many tokens): prompt tokens
    chunks = [chunk(1, 3), chunk(200, 0), chunk(1, 0), chunk(33, 5)]
    assert step_composition(chunks) == (234, 1)
    assert step_composition([]) == (0, 0)


@pytest.mark.parametrize("overlap", [True, False])
def test_engine_times_every_step(smollm2: LoadedModel, overlap: bool) -> None:
    """One request decodes while a second one's 40-token prompt goes in 16-token chunks:
    the steps are prefill, decode and mixed, every prompt token is counted once, and each
    step's device wait lies within its wall time."""
    config = EngineConfig(
        dtype="float32",
        device="cpu",
        cache=CacheConfig(page_size=16, max_total_tokens=4096),
        scheduler=SchedulerConfig(chunked_prefill_size=16),
        overlap_schedule=overlap,
    )
    engine = LLM.from_engine_config(config, smollm2).engine
    assert engine.last_step is None
    params = SamplingParams(temperature=0, max_new_tokens=8, ignore_eos=True)
    engine.add_request(list(range(1000, 1010)), params)
    timings = []
    while engine.has_unfinished_requests():
        engine.step()
        timings.append(engine.last_step)
        if len(timings) == 3:
            engine.add_request(list(range(2000, 2040)), params)
    kinds = [t.kind for t in timings]
    assert {"prefill", "decode", "mixed"} <= set(kinds), kinds
    assert sum(t.prefill_tokens for t in timings) == 10 + 40
    mixed = [t for t in timings if t.kind == "mixed"]
    assert all(t.decode_rows == 1 and 0 < t.prefill_tokens <= 16 for t in mixed)
    assert all(0 <= t.device_wait_s <= t.wall_s for t in timings)


def _exposition(observations: list[tuple[str, float, float]]) -> str:
    """/metrics text with the server's two step histograms after these (kind, wall, wait)."""
    registry = CollectorRegistry()
    names = (server_steps.DURATION, server_steps.DEVICE_WAIT)
    wall, wait = (Histogram(n, "doc", ["kind"], buckets=STEP_BUCKETS, registry=registry)
                  for n in names)  # fmt: skip
    for kind, w, d in observations:
        wall.labels(kind=kind).observe(w)
        wait.labels(kind=kind).observe(d)
    return generate_latest(registry).decode()


def test_step_summary_differences_two_scrapes() -> None:
    earlier = [("decode", 0.5, 0.4)] * 3  # before the run: must not count
    during = [("decode", 0.008, 0.006)] * 98 + [("decode", 0.019, 0.001)] * 2
    during += [("mixed", 0.015, 0.010), ("mixed", 0.021, 0.002)]
    before = server_steps.parse(_exposition(earlier))
    after = server_steps.parse(_exposition(earlier + during))
    summary = server_steps.step_summary(before, after)
    assert set(summary) == {"decode", "mixed"}
    decode = summary["decode"]
    assert decode["steps"] == 100
    assert decode["mean_s"] == pytest.approx((98 * 0.008 + 2 * 0.019) / 100)
    assert decode["device_wait_mean_s"] == pytest.approx((98 * 0.006 + 2 * 0.001) / 100)
    assert decode["p50_at_most_s"] == 0.01  # the bucket bounds around 8 and 19 ms
    assert decode["p99_at_most_s"] == 0.02
    assert summary["mixed"]["steps"] == 2 and summary["mixed"]["p99_at_most_s"] == 0.025
    line = server_steps.format_steps(summary)
    assert "decode 100 x 8.2 ms" in line and "mixed 2 x 18.0 ms" in line


def test_a_server_without_step_metrics_reports_none() -> None:
    assert server_steps.parse("# nothing here\nother_metric 1.0\n") is None
    no_step_yet = server_steps.parse(_exposition([]))
    assert no_step_yet == {}
    after = server_steps.parse(_exposition([("prefill", 0.03, 0.0)]))
    assert server_steps.step_summary(no_step_yet, after)["prefill"]["steps"] == 1
    assert server_steps.format_steps(None) == "server steps: not reported by the server"
