"""`sageserve bench offline`: its bound arithmetic on a known case, the weight bytes it
counts, and a whole run on CPU (tiny grid, default model)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from sageserve.bench.offline import OfflineBenchConfig, engine_name
from sageserve.bench.offline_measure import GridPoint, decode_bound, decode_rate
from sageserve.cli import main
from sageserve.config import EngineConfig
from sageserve.engine.info import MemoryUsage
from sageserve.engine.memory_usage import step_weight_bytes
from sageserve.models.config import ModelConfig
from sageserve.models.llama import LlamaForCausalLM


def llama8b_memory(kv_bytes_per_token: int) -> MemoryUsage:
    weights = 16_060_522_496  # Llama-3.1-8B in bf16, embedding table included
    return MemoryUsage(
        weights_bytes=weights,
        step_weight_bytes=weights - 128256 * 4096 * 2,  # the untied input embedding
        kv_bytes_per_token=kv_bytes_per_token,
        kv_dtype="bfloat16",
        pool_capacity_tokens=1 << 20,
        pool_bytes=0,
        tokens_per_gib=0,
    )


def test_decode_bound_of_llama8b_at_64_by_8k() -> None:
    # 32 layers x 8 KV heads x 128 dims x (K, V) x 2 bytes = 131072 bytes per token.
    memory = llama8b_memory(131072)
    bound = decode_bound(GridPoint(64, 8192, 128), memory, copy_gb_per_s=4250.0)
    # By hand: weights 16_060_522_496 - 1_050_673_152 = 15_009_849_344 bytes; KV at the mean
    # context 8192 + 64 = 8256 tokens: 64 * 8256 * 131072 = 69_256_347_648 bytes.
    assert bound["weight_bytes"] == 15_009_849_344
    assert bound["kv_bytes"] == 69_256_347_648
    assert bound["step_bytes"] == 84_266_196_992
    assert bound["min_step_ms"] == pytest.approx(84_266_196_992 / 4250e9 * 1e3)
    assert bound["bound_tok_s"] == pytest.approx(64 / (84_266_196_992 / 4250e9))
    assert 3227 < bound["bound_tok_s"] < 3228


def test_decode_bound_of_one_stream_is_the_weight_read() -> None:
    bound = decode_bound(GridPoint(1, 1, 2), llama8b_memory(131072), copy_gb_per_s=4250.0)
    # 2 tokens of KV next to 15 GB of weights: 283.15 tok/s
    assert bound["bound_tok_s"] == pytest.approx(4250e9 / (15_009_849_344 + 2 * 131072))


def tiny_config(tied: bool) -> ModelConfig:
    return ModelConfig.from_hf_config({
        "architectures": ["LlamaForCausalLM"], "vocab_size": 100, "hidden_size": 32,
        "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 64, "rms_norm_eps": 1e-5,
        "tie_word_embeddings": tied,
    })  # fmt: skip


@pytest.mark.parametrize("tied", [True, False])
def test_step_weight_bytes_leave_out_only_an_untied_embedding(tied: bool) -> None:
    model = LlamaForCausalLM(tiny_config(tied))
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    table = 100 * 32 * 4
    assert step_weight_bytes(model) == (total if tied else total - table)


def test_config_names_the_valid_backends() -> None:
    with pytest.raises(ValueError, match="choose from"):
        OfflineBenchConfig(("flash",), (True,), (True,), (1,), (8,), (4,), 1, 0)
    with pytest.raises(ValueError, match="output-lens"):
        OfflineBenchConfig(("torch",), (True,), (True,), (1,), (8,), (1,), 1, 0)


def test_engines_cover_every_switch() -> None:
    cfg = OfflineBenchConfig(("torch",), (True, False), (True, False), (1,), (8,), (4,), 1, 0,
                             prefill_cap=(True, False))  # fmt: skip
    engines = cfg.engines()
    assert engines == [("torch", f, o, c, True, f) for f in (True, False)
                       for o in (True, False) for c in (True, False)]  # fmt: skip
    configs = [engine.config(EngineConfig()) for engine in engines]
    assert [engine_name(c) for c in configs] == [
        "torch", "torch+no-cap", "torch+no-overlap", "torch+no-overlap+no-cap",
        "torch+unfused", "torch+unfused+no-cap", "torch+unfused+no-overlap",
        "torch+unfused+no-overlap+no-cap",
    ]  # fmt: skip
    with pytest.raises(ValueError, match="--overlap takes"):
        OfflineBenchConfig(("torch",), (True,), (True, True), (1,), (8,), (4,), 1, 0)
    with pytest.raises(ValueError, match="--prefill-cap takes"):
        OfflineBenchConfig(("torch",), (True,), (True,), (1,), (8,), (4,), 1, 0, prefill_cap=())
    with pytest.raises(ValueError, match="--graph-sampling takes"):
        OfflineBenchConfig(("torch",), (True,), (True,), (1,), (8,), (4,), 1, 0,
                           graph_sampling=(False, False))  # fmt: skip
    with pytest.raises(ValueError, match="choose from greedy, top-p"):
        OfflineBenchConfig(("torch",), (True,), (True,), (1,), (8,), (4,), 1, 0, sampling="beam")


def test_fused_gemv_switch_names_the_cublas_engine() -> None:
    """--fused-gemv on,off builds the default engine and one with cuBLAS products, named
    "+cublas"; with the fused layers off there is no GEMV: one engine, "+unfused"."""
    cfg = OfflineBenchConfig(("triton",), (True, False), (True,), (1,), (8,), (4,), 1, 0,
                             fused_gemv=(True, False))  # fmt: skip
    names = [engine_name(engine.config(EngineConfig())) for engine in cfg.engines()]
    assert names == ["triton", "triton+cublas", "triton+unfused"]
    with pytest.raises(ValueError, match="--fused-gemv takes"):
        OfflineBenchConfig(("torch",), (True,), (True,), (1,), (8,), (4,), 1, 0,
                           fused_gemv=(True, True))  # fmt: skip


def test_top_p_sampling_and_graph_sampling_switch(tmp_path: Path) -> None:
    """--sampling top-p runs; --graph-sampling on,off builds an engine with the eager
    sampler beside the default one (on CPU both sample eagerly: no graphs)."""
    out = tmp_path / "offline.json"
    argv = ["bench", "offline", "--device", "cpu", "--backends", "torch", "--batch-sizes", "2",
            "--input-lens", "9", "--output-lens", "3", "--rounds", "1", "--sampling", "top-p",
            "--graph-sampling", "on,off", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    result = json.loads(out.read_text())
    assert set(result["rows"]) == {"torch/b2-in9-out3", "torch+eager-sampling/b2-in9-out3"}
    assert result["settings"]["sampling"] == "top-p"
    assert all(row["runs"][0]["decode_tok_s"] > 0 for row in result["rows"].values())


def test_whole_batch_pass_with_and_without_the_cap(tmp_path: Path) -> None:
    """--whole-batch times each point as LLM.generate runs it, for each --prefill-cap engine
    (here a cap of 8 tokens, so the late prompts prefill beside the first ones' decodes)."""
    out = tmp_path / "offline.json"
    argv = ["bench", "offline", "--device", "cpu", "--backends", "torch", "--batch-sizes", "3",
            "--input-lens", "20", "--output-lens", "4", "--rounds", "1", "--whole-batch",
            "--prefill-cap", "on,off", "--max-prefill-tokens-while-decoding", "8",
            "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    result = json.loads(out.read_text())
    assert set(result["rows"]) == {"torch/b3-in20-out4", "torch+no-cap/b3-in20-out4"}
    caps = {name: e["info"]["max_prefill_tokens_while_decoding"]
            for name, e in result["engines"].items()}  # fmt: skip
    assert caps == {"torch": 8, "torch+no-cap": None}
    for row in result["rows"].values():
        run = row["runs"][0]
        assert run["generate_tok_s"] == pytest.approx(3 * 4 / run["generate_s"])
        assert run["generate_s"] > 0 and run["decode_tok_s"] > 0
    assert "| torch+no-cap | 3 | 20 | 4 |" in out.with_suffix(".md").read_text()


def test_prefill_cap_on_needs_a_cap(capsys) -> None:
    argv = ["bench", "offline", "--device", "cpu", "--backends", "torch",
            "--max-prefill-tokens-while-decoding", "0"]  # fmt: skip
    assert main(argv) == 2
    assert "--prefill-cap on" in capsys.readouterr().err


def test_bad_flag_exits_2(capsys) -> None:
    assert main(["bench", "offline", "--backends", "nope", "--device", "cpu"]) == 2
    assert "choose from" in capsys.readouterr().err


def test_offline_run_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "offline.json"
    argv = ["bench", "offline", "--device", "cpu", "--backends", "torch", "--batch-sizes",
            "1,3", "--input-lens", "7", "--output-lens", "4", "--rounds", "2", "--out",
            str(out)]  # fmt: skip
    assert main(argv) == 0
    result = json.loads(out.read_text())
    assert result["complete"] and not result["problems"]
    assert set(result["rows"]) == {"torch/b1-in7-out4", "torch/b3-in7-out4"}
    row = result["rows"]["torch/b3-in7-out4"]
    assert len(row["runs"]) == 2 and row["summary"]["rounds"] == 2
    run = row["runs"][0]
    assert 0 < run["ttft_s"] <= run["prefill_s"]
    assert run["decode_step_ms"] == pytest.approx(3 / run["decode_tok_s"] * 1e3)
    # the decode pass found the prompts' whole pages (16 tokens on CPU) in the prefix cache
    assert run["decode_cached_tokens"] == 0  # 7 tokens: no whole page
    assert (
        0
        < row["fraction_of_bound"]
        == pytest.approx(row["summary"]["decode_tok_s"]["median"] / row["bound"]["bound_tok_s"])
    )
    assert result["copy_bandwidth"]["gb_per_s"] > 0
    assert "| torch | 3 | 7 | 4 |" in out.with_suffix(".md").read_text()


def test_offline_decode_pass_hits_the_prefix_cache(tmp_path: Path) -> None:
    out = tmp_path / "offline.json"
    argv = ["bench", "offline", "--device", "cpu", "--backends", "torch", "--batch-sizes", "2",
            "--input-lens", "37", "--output-lens", "3", "--rounds", "1", "--page-size", "16",
            "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    run = json.loads(out.read_text())["rows"]["torch/b2-in37-out3"]["runs"][0]
    assert run["decode_cached_tokens"] == 32


def test_offline_needs_the_prefix_cache() -> None:
    argv = ["bench", "offline", "--device", "cpu", "--backends", "torch", "--batch-sizes", "1",
            "--input-lens", "5", "--output-lens", "2", "--disable-prefix-cache"]  # fmt: skip
    assert main(argv) == 2


def test_offline_point_that_does_not_fit_is_a_problem(tmp_path: Path) -> None:
    out = tmp_path / "offline.json"
    argv = ["bench", "offline", "--device", "cpu", "--backends", "torch", "--batch-sizes", "2",
            "--input-lens", "5,40", "--output-lens", "3", "--rounds", "1",
            "--max-total-tokens", "64", "--page-size", "16", "--out", str(out)]  # fmt: skip
    assert main(argv) == 1
    result = json.loads(out.read_text())
    assert set(result["rows"]) == {"torch/b2-in5-out3"}
    assert result["problems"] == [
        "torch/b2-in40-out3 skipped: needs 86 KV tokens, the pool holds 64"
    ]


def _finished(first: float, finish: float) -> SimpleNamespace:
    return SimpleNamespace(metrics=SimpleNamespace(first_token_time=first, finished_time=finish))


def test_decode_rate_is_the_batch_span_not_a_sum_of_request_rates() -> None:
    """Together (first tokens in one step): the span gives each request's rate times B.
    Staggered by one 0.1 s step with one decode token each: 2 tokens over 0.2 s, where
    summing the requests' own rates would claim both decoded at once (20 tok/s)."""
    together = [_finished(1.0, 1.4), _finished(1.0, 1.4)]
    assert decode_rate(together, output_len=5) == pytest.approx(2 * 4 / 0.4)
    staggered = [_finished(1.0, 1.1), _finished(1.1, 1.2)]
    assert decode_rate(staggered, output_len=2) == pytest.approx(10.0)
