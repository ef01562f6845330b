"""validate's throughput section says when the machine was busy while it was timed."""

from __future__ import annotations

from sageserve.validate.machine_load import LoadSampler
from sageserve.validate.markdown import _throughput

RUN = {"median": 10.0, "min": 9.0, "max": 11.0}
SUMMARY = {"ttft_s": RUN, "decode_tok_s_per_request": RUN, "output_tok_s": RUN}
SUMMARY |= {"total_tok_s": RUN, "rounds": 2}


def _section(load: dict) -> str:
    results = {
        "backends": {"torch": {"in16-out4-c1": SUMMARY}},
        "speedup_vs_reference": {},
        "machine_load": load,
    }
    return _throughput(results)


def test_busy_only_from_a_whole_extra_thread_above_the_cores() -> None:
    sampler = LoadSampler(cores=2, samples=[1.2, 2.0, 2.9])  # 2.1 is this run alone, measured
    assert not sampler.busy and "Warning" not in _section(sampler.to_dict())
    assert LoadSampler(cores=2, samples=[3.0]).busy
    real = LoadSampler(cores=2)
    real.sample()  # a real reading must not break anything (kept apart: its value varies)
    assert all(value >= 0 for value in real.samples)
    sampler.samples.append(3.9)
    load = sampler.to_dict()
    assert load["busy"] and load["max_load_1min"] == 3.9 and load["cores"] == 2
    text = _section(load)
    assert text.startswith("**Warning:** the machine was busy") and "3.9 on 2 cores" in text


def test_no_samples_is_not_busy() -> None:
    assert not LoadSampler(cores=2).busy
    assert "Warning" not in _section({})
