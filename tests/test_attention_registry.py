"""The backend registry: names, options and flags come from the backend packages, and
every mistake about them is an error before any weight is loaded."""

from __future__ import annotations

import argparse

import pytest
import torch

from sageserve.attention.base import AttentionShape, BackendOptions
from sageserve.attention.registry import backend_names, get_backend_class, register_backend
from sageserve.attention.sage_attn.options import SageOptions
from sageserve.attention.triton_attn.options import TritonOptions
from sageserve.config import EngineConfig
from sageserve.engine.llm import LLM
from sageserve.engine_args import add_engine_args, engine_config_from_args


def test_cli_backend_choices_come_from_the_registry() -> None:
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    action = next(a for a in parser._actions if a.dest == "attention_backend")
    assert list(action.choices) == backend_names() == ["sage_attn", "torch", "triton"]
    assert {"sage_pv", "sage_skip_layers"} <= set(vars(parser.parse_args([])))


def test_backend_errors_come_before_any_weight_is_loaded(monkeypatch) -> None:
    def no_loading(*args, **kwargs):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr("sageserve.engine.engine.load_model", no_loading)
    with pytest.raises(ValueError, match="valid backends: sage_attn, torch, triton"):
        LLM("smollm2-135m-instruct", attention_backend="nope", device="cpu")
    with pytest.raises(ValueError, match=r"unknown options \['pv'\].*valid options: none"):
        LLM("smollm2-135m-instruct", attention_backend="torch", attention_options={"pv": "fp8"})
    with pytest.raises(ValueError, match="sage_pv='int4' is not valid; choose one of: fp8, fp16"):
        LLM(
            "smollm2-135m-instruct", attention_backend="sage_attn", attention_options={"pv": "int4"}
        )
    with pytest.raises(ValueError, match="attention_options: object is not one of SageOptions"):
        EngineConfig(attention_options=(object(),))
    with pytest.raises(ValueError, match="two options objects of one backend"):
        EngineConfig(attention_options=(SageOptions(), SageOptions(pv="fp8")))


def test_flags_of_another_backend_are_an_error() -> None:
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    args = parser.parse_args(["--attention-backend", "torch", "--sage-pv", "fp8"])
    with pytest.raises(ValueError, match="options of --attention-backend sage_attn were given"):
        engine_config_from_args(args)
    args = parser.parse_args(["--attention-backend", "sage_attn", "--sage-pv", "fp8"])
    assert engine_config_from_args(args).attention_flags() == SageOptions(pv="fp8")
    assert EngineConfig(attention_backend="triton").attention_flags() == TritonOptions()


def test_a_backend_refuses_options_of_another() -> None:
    options = BackendOptions("auto", torch.float32, torch.device("cpu"), SageOptions())
    shape = AttentionShape(1, 4, 2, 16, 64, 32)
    with pytest.raises(ValueError, match="takes TorchOptions, got SageOptions"):
        get_backend_class("torch")(shape, options)


def test_registering_a_name_twice_with_another_class_is_an_error() -> None:
    backend_names()  # the built-in backends are registered on first use
    with pytest.raises(ValueError, match="'torch' is already registered"):
        register_backend("torch", "somewhere:Else")(TritonOptions)
