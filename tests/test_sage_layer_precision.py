"""`--sage-calibrate`: which layers stay exact (`layer_precision.py`), on CPU."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_llama_config

from sageserve.attention.base import BackendOptions
from sageserve.attention.sage_attn.backend import SageAttentionBackend
from sageserve.attention.sage_attn.layer_precision import _choose_exact
from sageserve.attention.sage_attn.options import SageOptions
from sageserve.models.config import ModelConfig
from sageserve.models.loader import build_model

CPU = torch.device("cpu")
BROKEN_LAYER = 2


def _config() -> ModelConfig:
    return tiny_llama_config(num_layers=4)


@pytest.fixture(scope="module")
def broken_model() -> torch.nn.Module:
    """A tiny random Llama with K outliers in one layer: in each KV head, 4 rotary channel
    pairs of the keys scaled up 1000x, token by token (so the key mean cannot take them
    out), while every query is 0 on those pairs. Exact attention is unchanged (the outliers
    meet zeros, and rotary turns a pair only within itself), but INT8 keys spend their range
    on the outliers, even after the Hadamard rotation, which spreads them over every
    channel: the one layer 8 bits break."""
    config = _config()
    model = build_model(config, torch.float32, CPU).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.copy_(0.05 * torch.randn(param.shape, generator=gen))
        qkv = model.model.layers[BROKEN_LAYER].self_attn.qkv_proj.weight
        dim, half = config.head_dim, config.head_dim // 2
        k_rows = config.num_q_heads * dim  # K follows Q in the fused weight
        for first in (0, half):  # both halves of the rotary pairs (c, c + D/2)
            for head in range(config.num_kv_heads):
                qkv[k_rows + head * dim + first : k_rows + head * dim + first + 4] *= 1000.0
            for head in range(config.num_q_heads):
                qkv[head * dim + first : head * dim + first + 4] = 0.0
    return model


def _backend(sage: SageOptions) -> SageAttentionBackend:
    shape = _config().attention_shape()
    return SageAttentionBackend(shape, BackendOptions("auto", torch.float32, CPU, sage))


def test_calibrate_keeps_the_broken_layer_exact_and_meets_the_budget(broken_model, caplog) -> None:
    probe = _backend(SageOptions(calibrate=True, kl_budget=1.0))  # 1 nat: nothing kept
    probe.prepare(broken_model, None)
    per_layer = probe.layer_plan.kl_per_layer
    assert probe.layer_plan.exact_layers == ()
    others = [kl for layer, kl in per_layer.items() if layer != BROKEN_LAYER]
    assert per_layer[BROKEN_LAYER] > 5 * max(others), per_layer
    budget = 0.5 * probe.layer_plan.kl_all_8bit
    backend = _backend(SageOptions(calibrate=True, kl_budget=budget))
    with caplog.at_level(logging.INFO):
        backend.prepare(broken_model, None)
    plan = backend.layer_plan
    assert plan.exact_layers == (BROKEN_LAYER,)
    assert plan.kl_planned <= budget < plan.kl_all_8bit
    assert backend.skipped == {BROKEN_LAYER} and BROKEN_LAYER not in backend.sage_layers
    assert "exact in float32" in backend.kv_cache_spec().dtype_name
    assert "layers [2] kept exact (1 of 4)" in caplog.text


def test_a_saved_plan_is_read_back_and_refused_for_other_settings(
    broken_model, tmp_path: Path
) -> None:
    path = tmp_path / "plan.json"
    first = _backend(SageOptions(calibrate=True, kl_budget=1e-3, calibration_file=str(path)))
    first.prepare(broken_model, None)
    saved = json.loads(path.read_text())
    assert saved["exact_layers"] == list(first.layer_plan.exact_layers)
    # A planted choice proves the second start reads the file instead of measuring.
    saved["exact_layers"] = [0, 3]
    path.write_text(json.dumps(saved))
    second = _backend(SageOptions(calibrate=True, kl_budget=1e-3, calibration_file=str(path)))
    second.prepare(broken_model, None)
    assert second.skipped == {0, 3}
    other = _backend(SageOptions(calibrate=True, kl_budget=2e-3, calibration_file=str(path)))
    with pytest.raises(ValueError, match="delete it or give another --sage-calibration-file"):
        other.prepare(broken_model, None)


class _Scorer:
    """KLs that are not additive: layers 1 and 3 in 8 bits together cost `overlap` less than
    apart, so taking away both one-layer KLs predicts too little."""

    def __init__(self, per_layer: dict[int, float], overlap: float) -> None:
        self.per_layer, self.overlap, self.calls = per_layer, overlap, 0

    def kl(self, eight_bit: list[int]) -> float:
        self.calls += 1
        both = {1, 3} <= set(eight_bit)
        return sum(self.per_layer[i] for i in eight_bit) - (self.overlap if both else 0.0)


def test_choice_measures_again_when_the_prediction_is_optimistic() -> None:
    per_layer = {0: 1.0, 1: 5.0, 2: 0.5, 3: 3.0}
    scorer = _Scorer(per_layer, overlap=2.0)
    total = scorer.kl(list(per_layer))  # 7.5
    exact, kl = _choose_exact(per_layer, total, 3.0, scorer, list(per_layer))
    # Keeping layer 1 predicts 2.5 <= 3 but measures 4.5; keeping 3 as well predicts 1.5
    # and measures 1.5: done, layers 0 and 2 stay 8-bit. Two measurements after the total.
    assert exact == (1, 3) and kl == 1.5 and scorer.calls == 3
    scorer = _Scorer(per_layer, overlap=2.0)
    exact, kl = _choose_exact(per_layer, total, 0.1, scorer, list(per_layer))
    # Never under the budget while an 8-bit layer is left: all exact, measured as 0.
    assert exact == (0, 1, 2, 3) and kl == 0.0


def test_calibration_options_are_checked() -> None:
    with pytest.raises(ValueError, match="sage_kl_budget"):
        SageOptions(calibrate=True, kl_budget=0.0)
    with pytest.raises(ValueError, match="needs --sage-calibrate"):
        SageOptions(calibration_file="plan.json")
