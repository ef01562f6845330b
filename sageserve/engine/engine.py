"""Engine: add requests, step, abort. The loop every front end (offline API, server) drives."""

from __future__ import annotations

import dataclasses
import gc
import logging
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from sageserve.attention.base import BackendOptions
from sageserve.attention.batch import ForwardBatch
from sageserve.attention.registry import get_backend_class
from sageserve.config import EngineConfig, SchedulerConfig
from sageserve.engine.admission import check_param_token_ids, check_prompt, encode_prompt
from sageserve.engine.block_manager import BlockManager
from sageserve.engine.detokenizer import IncrementalDetokenizer
from sageserve.engine.info import EngineInfo, EngineStats
from sageserve.engine.launched_step import LaunchedStep, StepValues
from sageserve.engine.logprobs import TokenLogprobs, compute_logprobs, to_dicts
from sageserve.engine.memory_usage import static_memory
from sageserve.engine.model_runner import ModelRunner
from sageserve.engine.request import Request, RequestOutput
from sageserve.engine.sampler import SampledTokens, Sampler, SamplingRow, logprobs_for_rows
from sageserve.engine.sampling_params import SamplingParams
from sageserve.engine.scheduler import ScheduledChunk, Scheduler, prefill_cap_while_decoding
from sageserve.engine.step_plan import ChunkPlan, plan_step
from sageserve.engine.step_timing import StepTiming, step_composition
from sageserve.engine.stop import StopChecker
from sageserve.engine.teacher_forced import borrowed_pages, check_scorable, forward_chunks
from sageserve.engine.warmup import warm_up
from sageserve.layers.fused.pdl import pdl_supported
from sageserve.models.default_model import DEFAULT_MODEL
from sageserve.models.loader import LoadedModel, load_model
from sageserve.startup_phases import startup_phase

logger = logging.getLogger(__name__)

# Sees a logits matrix [rows, vocab] the model computed (see Engine.logits_hook).
LogitsHook = Callable[[torch.Tensor], None]


def _upload(values: Sequence[int], device: torch.device) -> torch.Tensor:
    """[len(values)] int64 on device, copied without waiting for the device's queue."""
    return torch.tensor(values, dtype=torch.int64).to(device, non_blocking=True)


def _prompt_targets(plan: ChunkPlan) -> list[int]:
    """The prompt tokens that plan's prompt logprob rows score (position j scores j + 1)."""
    token_ids = plan.chunk.request.token_ids
    return [token_ids[j + 1] for j in plan.prompt_positions]


class Engine:
    """Owns the model runner, the scheduler and every request; not thread-safe.

    Drive it with `add_request` / `abort` / `step` from one thread. What it is: `info`;
    how it is doing: `stats()`; scoring without requests: `teacher_forced_logprobs`;
    every logits matrix it computes: `logits_hook`.
    """

    def __init__(
        self, config: EngineConfig, loaded: LoadedModel | None = None, warm_up_now: bool = True
    ) -> None:
        """warm_up_now: False leaves `warm_up` to the caller, to run on the thread that will
        drive the engine (the server's engine loop)."""
        self._config = config
        self._device = config.torch_device()
        self._loaded = loaded or self._load_model()
        self._model_config = self._loaded.config
        self._tokenizer = self._loaded.tokenizer
        self._max_model_len = self._resolve_context_length()
        self._init_runner()
        self._sampler = Sampler()
        self._seed_rng = torch.Generator().manual_seed(config.seed)
        self._requests: dict[str, Request] = {}
        self._num_steps = 0
        self._max_batch_seen = 0
        self._logits_hooks: list[LogitsHook] = []
        self._in_flight: LaunchedStep | None = None  # queued, not yet read back (overlap)
        self._last_step: StepTiming | None = None
        self._device_wait_s = 0.0  # of the step() call under way
        self._info = self._describe()
        if warm_up_now:
            self.warm_up()

    @property
    def warms_up(self) -> bool:
        """Whether `warm_up` does anything: on CUDA with `EngineConfig.warmup` on."""
        return self._config.warmup and self._device.type == "cuda"

    def warm_up(self) -> None:
        """On CUDA with the warm-up on (`EngineConfig.warmup`), run it on the calling thread:
        kernels compile, cuBLAS picks its GEMMs and libraries create their per-thread state
        (PyTorch's cuBLAS handle) before the first request. On CPU nothing compiles: no-op."""
        if self.warms_up:
            self._warm_up()

    def _warm_up(self) -> None:
        """Compile kernels and pick GEMMs before the first request (see warmup.py); on CPU
        nothing compiles, so it is skipped there."""
        with startup_phase("warm-up", "the step kinds of the first requests"):
            count = warm_up(self)
        logger.info("warm-up: %d requests run, prefix cache flushed", count)
        self._num_steps = 0
        self._max_batch_seen = 0

    def _load_model(self) -> LoadedModel:
        config = self._config
        with startup_phase("load", f"{config.model_path or DEFAULT_MODEL} on {self._device}"):
            return load_model(
                config.model_path,
                load_format=config.load_format,
                dtype=config.dtype,
                device=self._device,
                seed=config.seed,
            )

    def _resolve_context_length(self) -> int:
        limit = self._model_config.max_position_embeddings
        asked = self._config.context_length
        if asked is not None and asked > limit:
            raise ValueError(
                f"context_length={asked} exceeds the model's max_position_embeddings={limit}"
            )
        return asked or limit

    def _init_runner(self) -> None:
        config = self._config
        cache = config.cache
        self._loaded.model.use_triton_layers(self._fused_layers)
        self._loaded.model.use_triton_gemv(self._fused_gemv)
        options = BackendOptions(
            cache.kv_cache_dtype,
            self._loaded.dtype,
            self._device,
            config.attention_flags(),
            max_context=self._max_model_len,
        )
        backend_class = get_backend_class(config.attention_backend)
        backend = backend_class(self._model_config.attention_shape(), options)
        runner = ModelRunner(self._loaded.model, backend, cache, self._device, self._tokenizer)
        runner.setup_cuda_graphs(
            config.cuda_graph, config.scheduler.max_running_requests, self._max_model_len
        )
        self._runner = runner
        self._block_manager = BlockManager(
            runner.num_pages, runner.page_size, cache.enable_prefix_cache
        )
        self._scheduler = Scheduler(self._scheduler_config(runner), self._block_manager)
        logger.info(
            "engine ready: model=%s dtype=%s device=%s attention=%s context=%d fused_layers=%s "
            "fused_gemv=%s overlap_schedule=%s",
            self._loaded.source,
            str(self._loaded.dtype).removeprefix("torch."),
            self._device,
            backend.name,
            self._max_model_len,
            self._fused_layers,
            self._fused_gemv,
            config.overlap_schedule,
        )

    def _scheduler_config(self, runner: ModelRunner) -> SchedulerConfig:
        """The config's scheduler limits with the prefill cap while decoding resolved (0:
        none; see SchedulerConfig), logged."""
        config = self._config
        pieces = runner.piecewise_runner
        cap = prefill_cap_while_decoding(
            config.scheduler.max_prefill_tokens_while_decoding,
            pieces.token_counts[-1] if pieces is not None else None,
            config.cuda_graph.max_bs,
        )
        logger.info("prefill tokens of a step with decodes: %s", cap or "no cap")
        return dataclasses.replace(config.scheduler, max_prefill_tokens_while_decoding=cap)

    @property
    def _fused_layers(self) -> bool:
        """Fused Triton layer kernels: on CUDA unless disabled (the interpreter is too slow
        for whole models on CPU)."""
        return self._config.fused_layers and self._device.type == "cuda"

    @property
    def _fused_gemv(self) -> bool:
        """The small-batch GEMV with the fused layers, where programmatic dependent launch is
        (sm_90+): it was measured only there (BENCHMARKS.md, 2026-12-07)."""
        return self._config.fused_gemv and self._fused_layers and pdl_supported(self._device)

    def _describe(self) -> EngineInfo:
        runner, config = self._runner, self._config
        return EngineInfo(
            model_path=config.model_path or DEFAULT_MODEL,
            model_source=self._loaded.source,
            attention_backend=runner.backend.name,
            attention_kernels=runner.backend.kernels(),
            kv_cache_dtype=runner.kv_spec.dtype_name,
            dtype=str(self._loaded.dtype).removeprefix("torch."),
            device=str(self._device),
            page_size=runner.page_size,
            pool_capacity_tokens=runner.pool_capacity_tokens,
            context_length=self._max_model_len,
            vocab_size=self._model_config.vocab_size,
            max_running_requests=config.scheduler.max_running_requests,
            chunked_prefill_size=config.scheduler.chunked_prefill_size,
            max_prefill_tokens_while_decoding=(
                self._scheduler.config.max_prefill_tokens_while_decoding or None
            ),
            enable_prefix_cache=config.cache.enable_prefix_cache,
            fused_layers=self._fused_layers,
            fused_gemv=self._fused_gemv,
            overlap_schedule=config.overlap_schedule,
            memory=static_memory(runner),
        )

    # ------------------------------------------------------------------ the face

    @property
    def info(self) -> EngineInfo:
        """What does not change while the engine lives (model, backend, pool, memory)."""
        return self._info

    @property
    def tokenizer(self) -> Any:
        """The model's tokenizer (a Hugging Face one, or GGUF's); None when it has none."""
        return self._tokenizer

    def stats(self) -> EngineStats:
        """The counters now: requests running and waiting, pages free and cached, steps."""
        self._check_open()
        scheduler, blocks = self._scheduler, self._block_manager
        return EngineStats(
            num_steps=self._num_steps,
            num_running=len(scheduler.running),
            num_waiting=len(scheduler.waiting),
            max_batch_seen=self._max_batch_seen,
            num_free_pages=blocks.num_free_pages,
            num_usable_pages=blocks.num_usable_pages,
            num_cached_pages=blocks.num_cached_pages,
            num_preemptions=scheduler.num_preemptions,
        )

    def request_ids(self) -> list[str]:
        """Ids of the requests in flight (waiting or running), in the order they were added."""
        return list(self._requests)

    def flush_prefix_cache(self) -> None:
        """Drop every prefix-cache entry no request holds; pages in use keep working."""
        self._check_open()
        self._block_manager.reset_prefix_cache()

    @contextmanager
    def logits_hook(self, hook: LogitsHook) -> Iterator[None]:
        """Within the block, `hook(logits)` sees every logits matrix the model computes, in
        order: each step's ([rows the step asked for, vocab] float32: sampled positions and
        prompt-logprob positions) and each chunk of `teacher_forced_logprobs`. The hook must
        not change the tensor; an exception it raises ends the step or the scoring."""
        self._logits_hooks.append(hook)
        try:
            yield
        finally:
            self._logits_hooks.remove(hook)

    def teacher_forced_logprobs(self, token_ids: Sequence[int]) -> torch.Tensor:
        """log_softmax of the model's next-token logits at positions 0 .. n-2.

        token_ids: n >= 2 token ids. Returns [n - 1, vocab] float32 on the CPU; row i scores
        token i + 1 given tokens 0 .. i. Tokens are fed in chunks of `chunked_prefill_size`,
        each after the cached prefix of the earlier ones, through the serving path (runner,
        backend, paged KV cache), as the scheduler would. The engine must be idle
        (RuntimeError otherwise); pages are borrowed from the pool and given back (also on
        error), never entered in the prefix cache. ValueError for ids that cannot be scored.
        """
        self._check_open()
        if self.has_unfinished_requests():
            raise RuntimeError("teacher forcing needs an idle engine: requests are in flight")
        blocks = self._block_manager
        check_scorable(token_ids, self._max_model_len, self._model_config.vocab_size, blocks)
        inputs = [int(t) for t in token_ids[:-1]]  # the last token is only a target
        chunk_size = self._config.scheduler.chunked_prefill_size
        with borrowed_pages(blocks, len(inputs)) as pages:
            return forward_chunks(
                self._forward,
                inputs,
                pages,
                chunk_size,
                blocks,
                self._device,
                self._model_config.vocab_size,
            )

    def _forward(self, batch: ForwardBatch) -> torch.Tensor:
        """The runner's logits for `batch` ([rows asked for, vocab]), shown to every hook."""
        return self._show_hooks(self._runner.forward(batch))

    def _forward_and_sample(
        self, batch: ForwardBatch, rows: list[SamplingRow] | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`_forward`, plus the tokens [num_seqs] when the decode graphs sampled them on
        the device (`ModelRunner.forward_and_sample`)."""
        logits, tokens = self._runner.forward_and_sample(batch, rows)
        return self._show_hooks(logits), tokens

    def _show_hooks(self, logits: torch.Tensor) -> torch.Tensor:
        for hook in self._logits_hooks:
            hook(logits)
        return logits

    def _check_open(self) -> None:
        if self._runner is None:
            raise RuntimeError("this engine was closed")

    # ----------------------------------------------------------------- requests

    def tokenize(self, prompt: str | Sequence[int]) -> list[int]:
        """Token ids of a text prompt (special tokens such as BOS added), or the ids given."""
        if isinstance(prompt, str):
            if self._tokenizer is None:
                raise ValueError("this model has no tokenizer: pass token ids, not text")
            return encode_prompt(self._tokenizer, prompt)
        return [int(t) for t in prompt]

    def add_request(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        stream: bool = True,
    ) -> str:
        """Queue a request; returns its id. ValueError for prompts that cannot be served.

        stream: `step` returns the request's output at every step that advances it; False
        returns only its final output (the output of a long batch is then not rebuilt for
        each of its requests at every step).
        """
        params = params or SamplingParams()
        token_ids = self.tokenize(prompt)
        check_prompt(token_ids, self._model_config.vocab_size, self._max_model_len,
                     self._runner.pool_capacity_tokens)  # fmt: skip
        check_param_token_ids(params, self._model_config.vocab_size)
        request_id = request_id or uuid.uuid4().hex
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        req = self._make_request(request_id, prompt, token_ids, params)
        req.stream = stream
        self._requests[request_id] = req
        self._scheduler.add_request(req)
        return request_id

    def _make_request(
        self,
        request_id: str,
        prompt: str | Sequence[int],
        token_ids: list[int],
        params: SamplingParams,
    ) -> Request:
        seed = params.seed
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,), generator=self._seed_rng))
        detok = None
        if self._tokenizer is not None:
            detok = IncrementalDetokenizer(self._tokenizer, token_ids, params.skip_special_tokens)
        return Request(
            request_id=request_id,
            prompt_token_ids=token_ids,
            params=params,
            generator=torch.Generator().manual_seed(seed),
            prompt=prompt if isinstance(prompt, str) else None,
            detokenizer=detok,
            stop_checker=StopChecker(params.stop) if params.stop else None,
            token_limit=self._max_model_len,
        )

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request and free its pages; returns its final output, None if unknown."""
        req = self._requests.pop(request_id, None)
        if req is None:
            return None
        self._finish(req, "abort")
        return RequestOutput.from_request(req)

    def has_unfinished_requests(self) -> bool:
        return self._scheduler.num_unfinished > 0

    def close(self) -> None:
        """Free the KV pool, the CUDA graphs and the attention backend now, whoever still
        holds this Engine (the weights stay with their LoadedModel), and hand the memory back
        to the device, so that the next engine's pool is sized from it. Any later step,
        scoring or `stats()` raises; `info` stays readable."""
        self._runner = None
        self._in_flight = None
        self._block_manager = None
        self._scheduler = None
        self._requests.clear()
        gc.collect()  # graphs and backends can sit in reference cycles
        if self._device.type == "cuda":
            torch.cuda.empty_cache()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --------------------------------------------------------------------- step

    def step(self) -> list[RequestOutput]:
        """Run one scheduler step; returns an output for every request that progressed
        (only the final one for a request added with stream=False).

        With the overlap schedule (the default) the step is queued on the device, then the
        step queued by the previous call is read back: the host plans and launches step N+1
        while the device computes step N, and a sampled token reaches the outputs one call
        after its step. A request that ends on a token read back this way may be in the
        step just queued: its result there is dropped and no token is emitted for it.
        Without overlap each step is read back at once.
        """
        self._check_open()
        start, self._device_wait_s = time.perf_counter(), 0.0
        touched: list[Request] = []
        if self._in_flight is not None and self._in_flight.needs_values_before_next:
            touched += self._read_back_in_flight()
        sched = self._scheduler.schedule()
        composition = step_composition(sched.chunks)
        launched = self._launch(sched.chunks) if sched.chunks else None
        touched += self._read_back_in_flight()
        self._in_flight = launched
        if not self._config.overlap_schedule:
            touched += self._read_back_in_flight()
        # After the read-back: a token read there may have ended the request already.
        touched += [self._finish_out_of_pool(req) for req in sched.unservable]
        if not self.has_unfinished_requests():
            self._in_flight = None  # every request in it has finished
        outputs = self._outputs(touched)
        wall = time.perf_counter() - start
        self._last_step = StepTiming(*composition, wall, self._device_wait_s)
        return outputs

    @property
    def last_step(self) -> StepTiming | None:
        """What the latest `step()` call launched and where its time went (None before the
        first)."""
        return self._last_step

    def _outputs(self, touched: list[Request]) -> list[RequestOutput]:
        """Outputs of the touched requests that stream or finished (each once)."""
        unique = list({id(req): req for req in touched}.values())
        for req in unique:
            if req.is_finished:
                self._requests.pop(req.request_id, None)
        return [RequestOutput.from_request(r) for r in unique if r.stream or r.is_finished]

    def _launch(self, chunks: list[ScheduledChunk]) -> LaunchedStep:
        """Queue the step's forward pass, prompt logprobs and sampling on the device and
        account its chunks as computed; nothing waits for the device."""
        batch, plans = plan_step(chunks, self._runner.page_size, self._device)
        self._fill_pending_inputs(batch, plans)
        sampling = [p for p in plans if p.sample_row is not None]
        rows = [self._sampling_row(p.chunk.request) for p in sampling]
        one_per_seq = [p.sample_row for p in sampling] == list(range(batch.num_seqs))
        logits, tokens = self._forward_and_sample(batch, rows if one_per_seq else None)
        prompt_plans = [p for p in plans if p.prompt_rows]
        prompt_logprobs = [self._prompt_logprobs(p, logits) for p in prompt_plans]
        sampled = self._sample(sampling, rows, logits, tokens) if sampling else None
        for plan in plans:
            self._scheduler.on_chunk_computed(plan.chunk)
        for plan in sampling:
            plan.chunk.request.num_pending_tokens += 1
        self._num_steps += 1
        self._max_batch_seen = max(self._max_batch_seen, len(plans))
        requests = [p.chunk.request for p in sampling]
        return LaunchedStep(plans, requests, sampled, prompt_plans, prompt_logprobs)

    def _fill_pending_inputs(self, batch: ForwardBatch, plans: list[ChunkPlan]) -> None:
        """Copy, on the device, the tokens the step in flight sampled into the inputs that
        wait for them (see ChunkPlan.pending_input)."""
        pairs = [
            (plan.pending_input, self._in_flight.row_of(plan.chunk.request))
            for plan in plans
            if plan.pending_input is not None
        ]
        if not pairs:
            return
        slots, rows = zip(*pairs, strict=True)
        device = batch.input_ids.device
        batch.input_ids[_upload(slots, device)] = self._in_flight.token_ids[_upload(rows, device)]

    def _prompt_logprobs(self, plan: ChunkPlan, logits: torch.Tensor) -> TokenLogprobs:
        req = plan.chunk.request
        targets = _upload(_prompt_targets(plan), logits.device)
        rows = _upload(plan.prompt_rows, logits.device)
        return compute_logprobs(logits[rows], targets, req.params.prompt_logprobs or 0)

    def _sample(
        self,
        plans: list[ChunkPlan],
        rows: list[SamplingRow],
        logits: torch.Tensor,
        graph_tokens: torch.Tensor | None,
    ) -> SampledTokens:
        """The plans' tokens: those the decode graph sampled (its logits rows are the
        plans' rows, in order), else the eager sampler's over their logits rows."""
        if graph_tokens is not None:
            return SampledTokens(graph_tokens, logprobs_for_rows(logits, graph_tokens, rows))
        sample_rows = _upload([p.sample_row for p in plans], logits.device)
        return self._sampler.sample(logits[sample_rows], rows)

    def _read_back_in_flight(self) -> list[Request]:
        """Wait for the step in flight and apply its results; returns its requests that
        were still running when it was read back."""
        step, self._in_flight = self._in_flight, None
        if step is None:
            return []
        alive = [p.chunk.request for p in step.plans if not p.chunk.request.is_finished]
        waited = time.perf_counter()
        values = step.read_back()
        self._device_wait_s += time.perf_counter() - waited
        for plan, lp in zip(step.prompt_plans, values.prompt_logprobs, strict=True):
            self._record_prompt_logprobs(plan, lp)
        self._take_tokens(step.sampled, values)
        for plan in step.plans:
            req = plan.chunk.request
            if plan.reaches_end and req.params.max_new_tokens == 0 and not req.is_finished:
                self._finish(req, "length")
        return alive

    def _record_prompt_logprobs(self, plan: ChunkPlan, lp: TokenLogprobs) -> None:
        req = plan.chunk.request
        if req.is_finished:
            return
        targets = _prompt_targets(plan)
        top_n = req.params.prompt_logprobs or 0
        dicts = to_dicts(lp, targets, [top_n] * len(targets))
        for j, d in zip(plan.prompt_positions, dicts, strict=True):
            req.prompt_logprobs[j + 1] = d

    def _take_tokens(self, reqs: list[Request], values: StepValues) -> None:
        """Append each request's sampled token (with its logprobs), then check stops."""
        top_ns = [r.params.logprobs or 0 for r in reqs]
        lp = values.logprobs
        lp_dicts = to_dicts(lp, values.token_ids, top_ns) if lp is not None else None
        now = time.monotonic()
        for i, (req, token) in enumerate(zip(reqs, values.token_ids, strict=True)):
            req.num_pending_tokens -= 1
            if req.is_finished:  # aborted, or ended by its previous token: dropped
                continue
            if req.first_token_time is None:
                req.first_token_time = now
            if lp_dicts is not None and req.params.logprobs is not None:
                req.output_logprobs.append(lp_dicts[i])
            self._append_token(req, token)

    def _sampling_row(self, req: Request) -> SamplingRow:
        suppressed: list[int] = []
        if req.num_output_tokens < req.params.min_new_tokens:
            suppressed = [*req.params.stop_token_ids, *self._eos_ids(req)]
        return SamplingRow(
            params=req.params,
            generator=req.generator,
            prompt_token_ids=req.prompt_token_ids,
            output_token_ids=req.output_token_ids,
            suppressed_token_ids=suppressed,
        )

    def _eos_ids(self, req: Request) -> tuple[int, ...]:
        return () if req.params.ignore_eos else self._model_config.eos_token_ids

    # ------------------------------------------------------------ finishing

    def _append_token(self, req: Request, token: int) -> None:
        req.token_ids.append(token)
        if req.num_computed_tokens >= len(req.token_ids):
            # The step in flight already stored this token's K/V: its page may now be full.
            self._scheduler.cache_known_pages(req)
        delta = req.detokenizer.append(token) if req.detokenizer else ""
        req.text += delta
        reason = self._stop_reason(req, token, len(delta))
        if reason is None:
            return
        if req.detokenizer is not None and not isinstance(reason[1], str):
            # Text held back for an incomplete UTF-8 character is released at the end,
            # except after a stop-string cut, where the tail is dropped anyway.
            req.text += req.detokenizer.flush()
        self._finish(req, *reason)

    def _stop_reason(
        self, req: Request, token: int, delta_len: int
    ) -> tuple[str, str | int | None] | None:
        params = req.params
        # Counts of known tokens: a token of the step in flight may be pending already.
        if len(req.token_ids) - req.num_prompt_tokens >= params.min_new_tokens:
            if token in params.stop_token_ids or token in self._eos_ids(req):
                return "stop", token
            match = req.stop_checker.find(req.text, delta_len) if req.stop_checker else None
            if match is not None:
                cut, matched = match
                req.text = req.text[:cut]
                return "stop", matched
        if len(req.token_ids) >= req.token_limit:
            return "length", None
        return None

    def _finish_out_of_pool(self, req: Request) -> Request:
        """Alone on the KV pool, the request needs more room than the pool has: it ends
        with finish reason "length" (capacity cut it short, as the context length would)
        and a message naming the limit. Returns req (left alone if it already ended)."""
        if req.is_finished:
            return req
        pool = self._runner.pool_capacity_tokens
        req.finish_message = (
            f"the request reached {req.num_tokens} tokens and the KV cache pool holds "
            f"{pool}: it cannot grow further; raise --max-total-tokens or "
            "--mem-fraction-static, or lower --context-length"
        )
        logger.warning("request %s: %s", req.request_id, req.finish_message)
        self._finish(req, "length")
        return req

    def _finish(self, req: Request, reason: str, stop_reason: str | int | None = None) -> None:
        req.finish_reason = reason
        req.stop_reason = stop_reason
        req.finished_time = time.monotonic()
        self._scheduler.finish(req)
