"""The offline API, in the manner of vLLM's `LLM` and SGLang's `Engine`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from sageserve.attention.registry import backend_entry
from sageserve.config import (
    CacheConfig,
    CudaGraphConfig,
    EngineConfig,
    SchedulerConfig,
)
from sageserve.engine.engine import Engine
from sageserve.engine.request import RequestOutput
from sageserve.engine.sampling_params import SamplingParams
from sageserve.models.loader import LoadedModel

Prompt = str | Sequence[int]
Message = dict[str, Any]


class LLM:
    """Generate from many prompts at once with continuous batching.

    >>> llm = LLM("smollm2-135m-instruct", attention_backend="torch", dtype="float32")
    >>> llm.generate(["The capital of France is"], SamplingParams(temperature=0))[0].text

    attention_options: the backend's own options by field name, e.g. {"pv": "fp8"} for
    sage_attn (`SageOptions`); an unknown name is a ValueError listing the valid ones.
    """

    def __init__(
        self,
        model: str | None = None,
        *,
        attention_backend: str = "torch",
        dtype: str = "auto",
        device: str = "auto",
        load_format: str = "auto",
        context_length: int | None = None,
        seed: int = 0,
        kv_cache_dtype: str = "auto",
        page_size: int | None = None,
        max_total_tokens: int | None = None,
        mem_fraction_static: float = 0.85,
        enable_prefix_cache: bool = True,
        chunked_prefill_size: int = 2048,
        max_prefill_tokens_while_decoding: int | None = None,
        max_running_requests: int = 256,
        attention_options: dict[str, Any] | None = None,
        disable_cuda_graph: bool = False,
        cuda_graph_max_bs: int = 64,
        piecewise_cuda_graph_max_tokens: int = 512,
        disable_fused_layers: bool = False,
        disable_fused_gemv: bool = False,
        skip_warmup: bool = False,
        disable_overlap_schedule: bool = False,
    ) -> None:
        config = EngineConfig(
            model_path=model,
            load_format=load_format,
            dtype=dtype,
            device=device,
            attention_backend=attention_backend,
            context_length=context_length,
            seed=seed,
            cache=CacheConfig(
                page_size=page_size,
                kv_cache_dtype=kv_cache_dtype,
                mem_fraction_static=mem_fraction_static,
                max_total_tokens=max_total_tokens,
                enable_prefix_cache=enable_prefix_cache,
            ),
            scheduler=SchedulerConfig(
                max_running_requests=max_running_requests,
                chunked_prefill_size=chunked_prefill_size,
                max_prefill_tokens_while_decoding=max_prefill_tokens_while_decoding,
            ),
            attention_options=(
                backend_entry(attention_backend).flags_class.from_kwargs(attention_options or {}),
            ),
            cuda_graph=CudaGraphConfig(
                disable=disable_cuda_graph,
                max_bs=cuda_graph_max_bs,
                piecewise_max_tokens=piecewise_cuda_graph_max_tokens,
            ),
            fused_layers=not disable_fused_layers,
            fused_gemv=not disable_fused_gemv,
            warmup=not skip_warmup,
            overlap_schedule=not disable_overlap_schedule,
        )
        self.engine = Engine(config)

    @classmethod
    def from_engine_config(cls, config: EngineConfig, loaded: LoadedModel | None = None) -> LLM:
        """An LLM over an EngineConfig (what the CLI parses), optionally reusing weights."""
        llm = cls.__new__(cls)
        llm.engine = Engine(config, loaded)
        return llm

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """One finished output per prompt, in the order given.

        prompts: a text, a list of texts, or a list of token-id lists.
        sampling_params: one for all prompts, or one per prompt.
        """
        prompt_list = _as_prompt_list(prompts)
        params_list = _as_params_list(sampling_params, len(prompt_list))
        ids = [
            self.engine.add_request(p, sp, stream=False)
            for p, sp in zip(prompt_list, params_list, strict=True)
        ]
        return self._run(ids, use_tqdm)

    def chat(
        self,
        messages: Sequence[Message] | Sequence[Sequence[Message]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Like `generate`, for one conversation or a list of them (chat template applied)."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.apply_chat_template(conv) for conv in conversations]
        return self.generate(prompts, sampling_params, use_tqdm)

    def apply_chat_template(self, messages: Sequence[Message]) -> list[int]:
        """Token ids of a conversation with the generation prompt appended."""
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("this model has no chat template; use generate() with plain text")
        text = self.tokenizer.apply_chat_template(
            list(messages), add_generation_prompt=True, tokenize=False
        )
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        finished: dict[str, RequestOutput] = {}
        wanted = set(request_ids)
        with tqdm(total=len(request_ids), disable=not use_tqdm, desc="generate") as bar:
            while not wanted.issubset(finished):
                if not self.engine.has_unfinished_requests():
                    raise RuntimeError("engine went idle before every request finished")
                for out in self.engine.step():
                    if out.finished and out.request_id in wanted:
                        finished[out.request_id] = out
                        bar.update(1)
        return [finished[i] for i in request_ids]


def _as_prompt_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if prompts and isinstance(prompts[0], int):
        return [prompts]
    return prompts


def _as_params_list(
    params: SamplingParams | Sequence[SamplingParams] | None, n: int
) -> list[SamplingParams]:
    if params is None or isinstance(params, SamplingParams):
        return [params or SamplingParams()] * n
    params = list(params)
    if len(params) != n:
        raise ValueError(f"got {len(params)} sampling params for {n} prompts; give 1 or {n}")
    return params
