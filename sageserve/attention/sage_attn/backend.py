"""`sage_attn`: SageAttention-style 8-bit attention over an 8-bit paged KV cache.

Every phase is 8-bit: prefill, prefill after a cached prefix and decode all read the same
8-bit cache and run the numerics of `reference.py` (INT8 Q·Kᵀ with per-token scales and
K smoothing, FP16 or FP8 P·V), on queries and keys rotated by a Hadamard matrix first
(`rotation.py`; `--sage-disable-qk-rotation` turns it off). With `--sage-impl reference`
(the default off CUDA) attention runs through the reference itself, so the engine, server
and validation all see 8-bit numerics on any machine.

Cache layout per 8-bit layer (page 0 is the null page):
    k        [num_pages, Hkv, page_size, D] int8           (rotated, smoothed keys; K-major)
    k_scale  [num_pages, Hkv, page_size]    fp16
    v        [num_pages, Hkv, D, page_size] int8 or fp8    (transposed: P·V reduces over tokens)
    v_scale  [num_pages, Hkv, page_size]    fp16
plus one scratch page past the pool (index num_pages, never in a page table) where the
padded rows of a CUDA-graph decode store their K/V (the quantizing store has no skip).
Layers named in `--sage-skip-layers` (or chosen by `--sage-calibrate`) keep exact attention
over a cache in the model dtype: through the 16-bit `triton` backend where the Triton kernels
run and it serves the dtype (so graphs stay on), else through the `torch` backend (logged).

CUDA graphs (Triton kernels; exact layers, if any, through triton): decode is captured per
padded batch size over static metadata (`graph_metadata`), filled per step in one
host-to-device copy (`graph_update`); padded rows have kv_len 0 (output 0) and store into
the scratch page. The decode splits are planned from static quantities in eager steps too
(the padded batch size, `max_context`), so both paths cut the keys into the same splits.
The piecewise graphs of steps with prefill capture the quantizing store (`piece_store`:
page and offset tables padded with the scratch page) and launch only the attention
kernels between the pieces (`attend_stored`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from sageserve.attention.base import (
    AttentionBackend,
    AttentionShape,
    BackendOptions,
    KVCacheSpec,
    PieceStore,
)
from sageserve.attention.batch import ForwardBatch
from sageserve.attention.graph_sizes import padded_batch_size
from sageserve.attention.paged_cache import PagedKVCache
from sageserve.attention.sage_attn.calibration import calibrate_qk, calibration_token_ids
from sageserve.attention.sage_attn.kernels.gluon.config import KEYS
from sageserve.attention.sage_attn.kernels.rotate import HadamardKernel, check_rotation
from sageserve.attention.sage_attn.layer_precision import (
    LayerPrecisionPlan,
    plan_layer_precision,
)
from sageserve.attention.sage_attn.metadata import (
    DecodeRows,
    KernelMetadata,
    SageGraphMetadata,
    SageMetadata,
    SageSeq,
    kernel_metadata,
    reference_seqs,
    write_padding,
)
from sageserve.attention.sage_attn.options import SageOptions
from sageserve.attention.sage_attn.reference import FP8_DTYPE, quantize_kv, sage_attention
from sageserve.attention.sage_attn.rotation import hadamard_rotate, rotated_sm_scale
from sageserve.attention.sage_attn.ws_prefill import (
    check_gluon_page_size,
    gluon_unsupported_reasons,
)
from sageserve.attention.static_metadata import (
    PATCHES_PER_ROW,
    StaticBuffers,
    table_width,
    write_decode_rows,
)
from sageserve.attention.torch_native.backend import TorchNativeBackend
from sageserve.attention.triton_attn.backend import TritonBackend
from sageserve.startup_phases import startup_phase

if TYPE_CHECKING:  # the kernel modules load where used (the reference path needs none of them)
    from sageserve.attention.sage_attn.kernels.decode import DecodeWorkspace

logger = logging.getLogger(__name__)

SAGE_KV_DTYPES = ("auto", "int8")


@dataclass
class SageKVCache:
    """The 8-bit layers' tensors (see module docstring) plus the exact layers' cache.

    The 8-bit tensors hold scratch_page + 1 pages: the pool's, then the scratch page.
    """

    k: torch.Tensor
    k_scale: torch.Tensor
    v: torch.Tensor
    v_scale: torch.Tensor
    exact: PagedKVCache | None
    page_size: int
    scratch_page: int
    # The prefill's TMA descriptors of these tensors, built once (kernels/prefill.py).
    descriptor_memo: dict = field(default_factory=dict, repr=False, compare=False)
    _layer_views: dict = field(default_factory=dict, repr=False, compare=False)

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(k, k_scale, v, v_scale) of 8-bit slot i, views made once: a step indexes every
        layer's four tensors, ~1.5 µs of host time each (`lab/host_wrapper_probe.py`)."""
        views = self._layer_views.get(i)
        if views is None:
            views = self._layer_views[i] = (self.k[i], self.k_scale[i], self.v[i], self.v_scale[i])
        return views


@dataclass(frozen=True)
class LayerConstants:
    """What one 8-bit layer's kernels take besides q, k, v and the cache.

    k_mean, balance: [Hkv, D] fp32 or None (off); sm_scale: the softmax scale for the
    (rotated, when the rotation is on) queries and keys.
    """

    k_mean: torch.Tensor | None
    balance: torch.Tensor | None
    sm_scale: float


def _uses_kernels(sage: SageOptions, device: torch.device) -> bool:
    if sage.impl == "auto":
        return device.type == "cuda"
    return sage.impl in ("triton", "gluon")


PREPASS_MIN_HEAD_DIM = 128  # auto picks the pass from here up (measured, options.py)


def resolve_impl(sage: SageOptions, shape: AttentionShape, options: BackendOptions) -> SageOptions:
    """sage with --sage-impl auto made concrete: the torch reference off CUDA; on CUDA the
    Gluon prefill where it serves this model and device (sm_90, head_dim 64 or 128, a 16-bit
    model, no channel balance: `gluon_unsupported_reasons`; not with --sage-rotation-kernel
    prepass, which feeds the Triton prefill, nor with two Q levels, which the Triton kernels
    compute); the Triton kernels on other CUDA devices. On an
    H100 the Gluon prefill was 1.01-1.27× the Triton one causal and at head_dim 64, 0.91×
    non-causal at head_dim 128 from 8k, with a lower rotation price (BENCHMARKS.md,
    2026-12-06, night). Any other choice is returned as given."""
    if sage.impl != "auto":
        return sage
    if options.device.type != "cuda":
        impl = "reference"
    elif (
        sage.rotation_kernel == "prepass"
        or sage.q_levels != 1
        or gluon_unsupported_reasons(sage.balance_qk, shape, options)
    ):
        impl = "triton"
    else:
        impl = "gluon"
    return dataclasses.replace(sage, impl=impl)


def resolve_rotation_kernel(sage: SageOptions, device: torch.device, dim: int) -> SageOptions:
    """sage with --sage-rotation-kernel auto made concrete: prepass where the Triton prefill
    runs (Triton kernels, not the Gluon prefill) with the rotation on at head_dim >= 128 and
    one Q level (the pass writes one), the butterfly otherwise. Any other choice is returned
    as given."""
    if sage.rotation_kernel != "auto":
        return sage
    triton_prefill = _uses_kernels(sage, device) and sage.impl != "gluon"
    prepass = (sage.rotate_qk and triton_prefill and dim >= PREPASS_MIN_HEAD_DIM
               and sage.q_levels == 1)  # fmt: skip
    return dataclasses.replace(sage, rotation_kernel="prepass" if prepass else "butterfly")


def _rotation(sage: SageOptions) -> HadamardKernel:
    """How the kernels rotate Q and K tiles, from --sage-rotation-kernel (prepass: the
    store and the decode rotate by the butterfly; prefill queries come rotated)."""
    if not sage.rotate_qk:
        return HadamardKernel.OFF
    kind = "butterfly" if sage.rotation_kernel == "prepass" else sage.rotation_kernel
    return HadamardKernel[kind.upper()]


def _rotation_kernel_reasons(sage: SageOptions, options: BackendOptions, dim: int) -> list[str]:
    """Why --sage-rotation-kernel tensor_core or prepass cannot serve these options (none
    for butterfly)."""
    kind = sage.rotation_kernel
    if kind == "butterfly":
        return []
    if not sage.rotate_qk or not _uses_kernels(sage, options.device):
        return [f"--sage-rotation-kernel {kind} needs the rotation on and the Triton "
                "kernels (--sage-impl triton, or auto on CUDA)"]  # fmt: skip
    if kind == "prepass":
        if sage.impl == "gluon":
            return ["--sage-rotation-kernel prepass feeds the Triton prefill; the Gluon "
                    "prefill rotates its own tiles (--sage-rotation-kernel butterfly)"]  # fmt: skip
        if sage.q_levels != 1:
            return ["--sage-rotation-kernel prepass writes one level of Q codes; "
                    "--sage-q-levels 2 needs butterfly or tensor_core"]  # fmt: skip
        return []
    try:
        check_rotation(HadamardKernel.TENSOR_CORE, options.model_dtype, dim)
    except ValueError as err:
        return [f"--sage-rotation-kernel tensor_core: {err} (--sage-rotation-kernel butterfly)"]
    return []


class SageAttentionBackend(AttentionBackend):
    """8-bit attention in every phase (see module docstring)."""

    name = "sage_attn"
    flags_class = SageOptions

    @classmethod
    def unsupported_reasons(cls, shape: AttentionShape, options: BackendOptions) -> list[str]:
        reasons = []
        if options.kv_cache_dtype not in SAGE_KV_DTYPES:
            reasons.append(
                f"kv_cache_dtype={options.kv_cache_dtype!r}: sage_attn keeps its cache in 8 bits "
                f"(choose one of: {', '.join(SAGE_KV_DTYPES)}); a 16-bit cache is served by "
                "--attention-backend torch"
            )
        dim = shape.head_dim
        sage = resolve_impl(cls.flags_of(options), shape, options)
        sage = resolve_rotation_kernel(sage, options.device, dim)
        if _uses_kernels(sage, options.device) and (dim & (dim - 1) or dim < 16):
            reasons.append(
                f"head_dim {dim}: the Triton kernels need a power of two >= 16 "
                "(--sage-impl reference runs any head_dim, slowly)"
            )
        if sage.rotate_qk and (dim & (dim - 1) or dim < 2):
            reasons.append(
                f"head_dim {dim}: the Hadamard rotation of Q and K needs a power of two "
                "(--sage-disable-qk-rotation turns it off)"
            )
        reasons += _rotation_kernel_reasons(sage, options, dim)
        if sage.impl == "gluon":
            reasons += gluon_unsupported_reasons(sage.balance_qk, shape, options)
            if sage.q_levels != 1:
                reasons.append("--sage-q-levels 2: the Gluon prefill computes one Q level "
                               "(--sage-impl triton computes two)")  # fmt: skip
        bad = [i for i in sage.skip_layers if i >= shape.num_layers]
        if bad:
            reasons.append(
                f"sage_skip_layers {bad} do not exist: the model has layers "
                f"0..{shape.num_layers - 1}"
            )
        return reasons

    def __init__(self, shape: AttentionShape, options: BackendOptions) -> None:
        super().__init__(shape, options)
        self._resolve(resolve_impl(self.flags, shape, options))
        self._set_exact_layers(self.sage.skip_layers)
        self.rotation = _rotation(self.sage)  # how the kernels rotate the tiles they load
        # The longest context served: decode splits are planned for it (static, so eager
        # steps and CUDA-graph replays split alike); lowered to the pool's size in allocate.
        self.max_context = options.max_context or shape.max_position_embeddings
        self.k_mean: torch.Tensor | None = None
        self.channel_scale: torch.Tensor | None = None
        self.layer_plan: LayerPrecisionPlan | None = None  # set by --sage-calibrate
        self.sm_scale = shape.head_dim**-0.5
        if self.sage.rotate_qk:
            self.sm_scale = rotated_sm_scale(self.sm_scale, shape.head_dim)
        logger.info(
            "sage_attn: INT8 QK (per-token scales, Q in %d INT8 level(s), Hadamard rotation %s, "
            "K smoothing %s, channel balance %s), %s PV, 8-bit KV cache, %s; layers kept exact: "
            "%s",
            self.sage.q_levels,
            self._rotation_label(),
            "on" if self.sage.smooth_k else "off",
            "on" if self.sage.balance_qk else "off",
            self.sage.pv.upper(),
            self._impl_label(),
            self._exact_label(),
        )

    def _resolve(self, sage: SageOptions) -> None:
        """Take sage (its --sage-impl concrete) with its rotation kernel resolved."""
        self.sage = resolve_rotation_kernel(sage, self.options.device, self.shape.head_dim)
        self.use_kernels = _uses_kernels(self.sage, self.options.device)
        self.gluon_prefill = self.sage.impl == "gluon"  # prefill chunks: kernels/gluon

    def kernels(self) -> str:
        return f"{self._impl_label()}; Q/K rotation {self._rotation_label()}"

    def _impl_label(self) -> str:
        if self.gluon_prefill:
            return "Triton kernels, prefill by the warp-specialized Gluon kernel (sm_90)"
        return "Triton kernels" if self.use_kernels else "torch reference"

    def _rotation_label(self) -> str:
        if not self.sage.rotate_qk:
            return "off"
        return f"on, {self.sage.rotation_kernel} kernel" if self.use_kernels else "on"

    def _set_exact_layers(self, layers: Iterable[int]) -> None:
        """Keep `layers` in exact attention over a model-dtype cache, the rest in 8 bits."""
        exact = sorted(set(layers))
        self.sage_layers = [i for i in range(self.shape.num_layers) if i not in exact]
        self.slot_of = {layer: i for i, layer in enumerate(self.sage_layers)}
        self.slot_of |= {layer: i for i, layer in enumerate(exact)}
        self.skipped = set(exact)
        self.exact = self._exact_backend(len(exact))

    def _exact_backend(self, num_layers: int) -> AttentionBackend | None:
        """The backend of the layers kept exact: the 16-bit triton kernels beside ours
        (CUDA-graph safe) where they serve this shape and dtype, else the torch backend."""
        if num_layers == 0:
            return None
        args = self._exact_args(num_layers)
        if self.use_kernels and not TritonBackend.unsupported_reasons(*args):
            return TritonBackend(*args)
        return TorchNativeBackend(*args)

    def _exact_args(self, num_layers: int) -> tuple[AttentionShape, BackendOptions]:
        """The exact layers' backend's shape and options: a model-dtype cache."""
        config = dataclasses.replace(self.shape, num_layers=num_layers)
        return config, dataclasses.replace(self.options, kv_cache_dtype="auto", flags=None)

    def _exact_label(self) -> str:
        if self.exact is None:
            return "none"
        return f"{sorted(self.skipped)} (through the {self.exact.name} backend)"

    def prepare(self, model: torch.nn.Module, tokenizer: object | None) -> None:
        """Calibrate the key mean and channel balance (calibration.py), then, with
        --sage-calibrate, choose the layers kept exact (layer_precision.py)."""
        ids = calibration_token_ids(tokenizer, self.shape.vocab_size)
        if self.sage.smooth_k or self.sage.balance_qk:
            with startup_phase(
                "calibrate", f"sage_attn key mean and Q/K balance over {len(ids)} tokens"
            ):
                stats = calibrate_qk(model, ids, hadamard=self.sage.rotate_qk)
            self.set_calibration(
                stats.k_mean if self.sage.smooth_k else None,
                stats.channel_scale(self.sage.smooth_k) if self.sage.balance_qk else None,
            )
        if self.sage.calibrate:
            with startup_phase("calibrate", "sage_attn layers kept exact (--sage-calibrate)"):
                plan = self._layer_precision_plan(model, ids)
            self._apply_plan(plan)

    def _layer_precision_plan(self, model: torch.nn.Module, ids: list[int]) -> LayerPrecisionPlan:
        """Read from --sage-calibration-file when it exists, else measured (and written)."""
        path = Path(self.sage.calibration_file) if self.sage.calibration_file else None
        key = self._plan_key(len(ids))
        if path is not None and path.exists():
            logger.info("sage_attn: layer precision plan read from %s", path)
            return LayerPrecisionPlan.load(path, key)
        candidates = [i for i in range(self.shape.num_layers) if i not in self.sage.skip_layers]
        plan = plan_layer_precision(
            model, ids, self.attend_sequence_8bit, candidates, self.sage.kl_budget, key
        )
        if path is not None:
            plan.save(path)
            logger.info("sage_attn: layer precision plan written to %s", path)
        return plan

    def _plan_key(self, tokens: int) -> dict:
        """What a saved plan must have been made for: model shape, numerics, budget."""
        sage, shape = self.sage, self.shape
        numerics = ("pv", "smooth_k", "balance_qk", "rotate_qk", "q_levels", "skip_layers",
                    "kl_budget")  # fmt: skip
        options = {name: getattr(sage, name) for name in numerics}
        options["skip_layers"] = sorted(sage.skip_layers)
        return {"shape": dataclasses.asdict(shape), "sage": options, "tokens": tokens}

    def _apply_plan(self, plan: LayerPrecisionPlan) -> None:
        before = self.kv_cache_spec().bytes_per_token
        self._set_exact_layers(set(self.sage.skip_layers) | set(plan.exact_layers))
        after = self.kv_cache_spec().bytes_per_token
        logger.info(
            "sage_attn --sage-calibrate: layers %s kept exact (%d of %d); KL on the "
            "calibration text %.2e with every layer in 8 bits, %.2e now (budget %.1e); "
            "KV cache %d -> %d bytes per token (%+.0f%%); all exact layers: %s",
            list(plan.exact_layers) or "none", len(plan.exact_layers), len(plan.kl_per_layer),
            plan.kl_all_8bit, plan.kl_planned, plan.budget, before, after,
            100 * (after / before - 1), self._exact_label(),
        )  # fmt: skip
        self.layer_plan = plan

    def attend_sequence_8bit(
        self, layer_id: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        """The 8-bit numerics (reference.py) of one whole sequence, without a cache.

        q: [T, Hq, D]; k, v: [T, Hkv, D] (post-rotary) -> [T, Hq, D] fp32, causal."""
        q, k = self.rotate(q), self.rotate(k)
        return self._reference_attention(layer_id, q, *self._quantize(layer_id, k, v))

    def _quantize(
        self, layer_id: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """k, v: [T, Hkv, D] (k rotated when the rotation is on) -> the reference's codes
        and scales: k codes [T, Hkv, D] int8, k scale [T, Hkv] fp32, v likewise."""
        c = self.layer_constants(layer_id)
        return quantize_kv(k, v, c.k_mean, self.sage.pv, c.balance)

    def _reference_attention(
        self, layer_id: int, q: torch.Tensor, *codes_and_scales: torch.Tensor
    ) -> torch.Tensor:
        """q: [n, Hq, D] (rotated when the rotation is on) over `_quantize`'s four tensors
        for the keys 0..N-1 -> [n, Hq, D] fp32, causal bottom-right."""
        c = self.layer_constants(layer_id)
        return sage_attention(q, *codes_and_scales, self.sage.pv, sm_scale=c.sm_scale,
                              channel_scale=c.balance, q_levels=self.sage.q_levels)  # fmt: skip

    def set_calibration(self, k_mean: torch.Tensor | None, channel_scale: torch.Tensor | None):
        """Each [num_layers, num_kv_heads, head_dim] or None (off).

        Stored keys are (k - k_mean) / channel_scale; queries are multiplied by channel_scale
        (k and q rotated first when the rotation is on: both are of the rotated basis then).
        """
        cfg = self.shape
        expected = (cfg.num_layers, cfg.num_kv_heads, cfg.head_dim)
        for name, tensor in (("k_mean", k_mean), ("channel_scale", channel_scale)):
            if tensor is not None and tuple(tensor.shape) != expected:
                raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected {expected}")
        device = self.options.device
        self.k_mean = None if k_mean is None else k_mean.float().to(device)
        self.channel_scale = None if channel_scale is None else channel_scale.float().to(device)

    def preferred_page_size(self) -> int:
        """64 for the Triton kernels: the prefill kernel's 64-key blocks are then whole pages,
        read by TMA (one bulk copy per block instead of per-key gathers): 1.3-1.4x faster on
        an H100. The reference path keeps the base size."""
        return 64 if self.use_kernels else super().preferred_page_size()

    def kv_cache_spec(self) -> KVCacheSpec:
        cfg = self.shape
        per_layer_8bit = 2 * cfg.num_kv_heads * (cfg.head_dim + 2)  # codes + fp16 scale, K and V
        total = len(self.sage_layers) * per_layer_8bit
        if self.exact is not None:
            total += self.exact.kv_cache_spec().bytes_per_token
        name = "int8 K + " + ("fp8" if self.sage.pv == "fp8" else "int8") + " V, fp16 scales"
        if self.skipped:
            dtype = str(self.options.model_dtype).removeprefix("torch.")
            name += f"; layers {sorted(self.skipped)} exact in {dtype}"
        return KVCacheSpec(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, name, total)

    def allocate(self, num_pages: int, page_size: int) -> SageKVCache:
        """The pool's num_pages pages (page 0 the null page) plus the scratch page."""
        cfg, device = self.shape, self.options.device
        layers, heads, dim = len(self.sage_layers), cfg.num_kv_heads, cfg.head_dim
        limit = self.options.max_context or cfg.max_position_embeddings
        self.max_context = min(limit, num_pages * page_size)
        if self.gluon_prefill:
            self._check_gluon_pages(page_size)
        v_dtype = FP8_DTYPE if self.sage.pv == "fp8" else torch.int8
        pages = num_pages + 1
        scale_shape = (layers, pages, heads, page_size)
        return SageKVCache(
            k=torch.zeros(layers, pages, heads, page_size, dim, dtype=torch.int8, device=device),
            k_scale=torch.zeros(scale_shape, dtype=torch.float16, device=device),
            v=torch.zeros(layers, pages, heads, dim, page_size, dtype=v_dtype, device=device),
            v_scale=torch.zeros(scale_shape, dtype=torch.float16, device=device),
            exact=self.exact.allocate(num_pages, page_size) if self.exact else None,
            page_size=page_size,
            scratch_page=num_pages,
        )

    def _check_gluon_pages(self, page_size: int) -> None:
        """The Gluon prefill reads whole 64-token pages: refused for other page sizes when
        asked for by name; with --sage-impl auto, the Triton prefill serves them instead."""
        if self.flags.impl != "auto":
            check_gluon_page_size(page_size)
        elif page_size != KEYS:
            as_asked = self.flags.rotation_kernel
            self._resolve(dataclasses.replace(self.sage, impl="triton", rotation_kernel=as_asked))
            logger.info(
                "sage_attn: --sage-impl auto: pages of %d tokens, so the Triton prefill "
                "serves (the Gluon one reads pages of %d)", page_size, KEYS,
            )  # fmt: skip

    def build_metadata(self, batch: ForwardBatch) -> SageMetadata:
        page_size = batch.page_size
        exact = self.exact.build_metadata(batch) if self.exact else None
        kernel = None
        if self.use_kernels:
            kernel = kernel_metadata(
                batch,
                lambda rows: self._decode_workspace(rows, page_size),
                plan_heads=self.shape.num_q_heads if self.gluon_prefill else None,
            )
        slots = batch.slot_mapping
        # Only the reference path reads the per-sequence pages: building them costs one
        # host-to-device copy per sequence per step.
        seqs = reference_seqs(batch) if kernel is None else []
        return SageMetadata(slots // page_size, slots % page_size, seqs, exact, kernel)

    def forward(
        self,
        layer_id: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: SageKVCache,
        meta: SageMetadata,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """q: [T, Hq, D]; k, v: [T, Hkv, D] -> [T, Hq, D] (q's dtype; into out when given)
        with 8-bit numerics."""
        i = self.slot_of[layer_id]
        if layer_id in self.skipped:
            return self.exact.forward(i, q, k, v, kv_cache.exact, meta.exact, out)
        out = torch.empty_like(q) if out is None else out
        if meta.kernel is not None:  # the kernels rotate q and k as they load them
            self._store_kernels(layer_id, k, v, kv_cache, meta.store_pages, meta.store_offsets)
            return self._attend_kernels(layer_id, q, kv_cache, meta, out)
        q, k = self.rotate(q), self.rotate(k)
        self._store(i, k, v, kv_cache, meta, layer_id)
        for seq in meta.seqs:
            out[seq.q_start : seq.q_end] = self._attend(
                layer_id, q[seq.q_start : seq.q_end], seq, kv_cache
            )
        return out

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, H, D] queries or keys -> x H in fp32 with the rotation on, else x itself.

        The torch path's transform; the Triton kernels apply the same one (the same bits,
        `kernels/rotate.py`) to the tiles they load."""
        return hadamard_rotate(x) if self.sage.rotate_qk else x

    def layer_constants(self, layer_id: int) -> LayerConstants:
        """The key mean, channel balance and softmax scale of 8-bit layer `layer_id`."""
        return LayerConstants(
            self.k_mean[layer_id] if self.k_mean is not None else None,
            self.channel_scale[layer_id] if self.channel_scale is not None else None,
            self.sm_scale,
        )

    def _store(
        self,
        i: int,
        k: torch.Tensor,
        v: torch.Tensor,
        cache: SageKVCache,
        meta: SageMetadata,
        layer_id: int,
    ) -> None:
        k_codes, k_scale, v_codes, v_scale = self._quantize(layer_id, k, v)
        pages, offsets = meta.store_pages, meta.store_offsets
        cache.k[i][pages, :, offsets] = k_codes
        cache.k_scale[i][pages, :, offsets] = k_scale.half()
        cache.v[i][pages, :, :, offsets] = v_codes
        cache.v_scale[i][pages, :, offsets] = v_scale.half()

    def _attend(
        self, layer_id: int, q: torch.Tensor, seq: SageSeq, cache: SageKVCache
    ) -> torch.Tensor:
        """q: [n, Hq, D] (rotated when the rotation is on) -> [n, Hq, D] fp32 over the
        sequence's first kv_len cached keys."""
        i = self.slot_of[layer_id]
        heads, dim, n = self.shape.num_kv_heads, self.shape.head_dim, seq.kv_len
        k_codes = cache.k[i][seq.pages].transpose(1, 2).reshape(-1, heads, dim)[:n]
        k_scale = cache.k_scale[i][seq.pages].transpose(1, 2).reshape(-1, heads)[:n]
        v_codes = cache.v[i][seq.pages].permute(0, 3, 1, 2).reshape(-1, heads, dim)[:n]
        v_scale = cache.v_scale[i][seq.pages].transpose(1, 2).reshape(-1, heads)[:n]
        return self._reference_attention(layer_id, q, k_codes, k_scale.float(), v_codes,
                                         v_scale.float())  # fmt: skip

    def _store_kernels(
        self,
        layer_id: int,
        k: torch.Tensor,
        v: torch.Tensor,
        cache: SageKVCache,
        pages: torch.Tensor,
        offsets: torch.Tensor,
    ) -> None:
        """The fused quantize-and-store of 8-bit layer layer_id: k, v [T, Hkv, D]
        (unrotated: the kernel rotates k as it loads it) to pages, offsets [T] int64."""
        from sageserve.attention.sage_attn.kernels.store import store_kv

        c = self.layer_constants(layer_id)
        store_kv(k, v, c.k_mean, c.balance, pages, offsets, *cache.layer(self.slot_of[layer_id]),
                 rotation=self.rotation)  # fmt: skip

    def _attend_kernels(
        self,
        layer_id: int,
        q: torch.Tensor,
        cache: SageKVCache,
        meta: SageMetadata,
        out: torch.Tensor,
    ) -> torch.Tensor:
        """Paged 8-bit attention of 8-bit layer layer_id over keys already stored, into out.

        q, out: [T, Hq, D] (q unrotated: with the rotation on, the kernels rotate q as they
        load it). Prefill chunks go through the prefill kernel (the Gluon one with
        --sage-impl gluon), single-row sequences (decodes) through the split-KV decode
        kernel; each writes its own rows of out.
        """
        from sageserve.attention.sage_attn.kernels.decode import sage_decode_paged
        from sageserve.attention.sage_attn.kernels.prefill import sage_attention_paged
        from sageserve.attention.sage_attn.kernels.quantize_q import quantize_q

        c, rotation = self.layer_constants(layer_id), self.rotation
        caches = cache.layer(self.slot_of[layer_id])
        pre, dec = meta.kernel.prefill, meta.kernel.decode
        if pre is not None and pre.plan is not None:
            from sageserve.attention.sage_attn.kernels.gluon.prefill import sage_attention_ws

            sage_attention_ws(q, *caches, pre.page_table, pre.q_start, pre.q_len, pre.kv_len,
                              pre.plan, out, c.sm_scale, rotate=self.sage.rotate_qk,
                              descriptor_memo=cache.descriptor_memo)  # fmt: skip
        elif pre is not None and self.sage.rotation_kernel == "prepass" and self.sage.rotate_qk:
            codes, scales = quantize_q(q, c.sm_scale, rotation, c.balance)
            sage_attention_paged(codes, None, *caches, pre.page_table, pre.q_start, pre.q_len,
                                 pre.kv_len, pre.max_q_len, out=out, q_scale=scales,
                                 descriptor_memo=cache.descriptor_memo)  # fmt: skip
        elif pre is not None:
            sage_attention_paged(q, c.balance, *caches, pre.page_table, pre.q_start,
                                 pre.q_len, pre.kv_len, pre.max_q_len, sm_scale=c.sm_scale,
                                 out=out, rotation=rotation, descriptor_memo=cache.descriptor_memo,
                                 q_levels=self.sage.q_levels)  # fmt: skip
        if dec is not None:
            sage_decode_paged(q, c.balance, *caches, dec.page_table, dec.q_rows, dec.kv_len,
                              out, dec.workspace, sm_scale=c.sm_scale, rotation=rotation,
                              q_levels=self.sage.q_levels)  # fmt: skip
        return out

    # ------------------------------------------------- K/V stores inside piecewise graphs

    def piece_store(self, kv_cache: SageKVCache, rows: int) -> PieceStore | None:
        """pages, offsets [rows] int64, padding the scratch page at offset 0, and the exact
        layers' store; None on the reference path (it stores eagerly) or when the exact
        layers' backend has no piece store."""
        if not self.use_kernels:
            return None
        exact = None
        if self.exact is not None:
            exact = self.exact.piece_store(kv_cache.exact, rows)
            if exact is None:
                return None
        padding = {"pages": kv_cache.scratch_page, "offsets": 0}
        return PieceStore.allocate(rows, padding, self.options.device, exact)

    def write_piece_store(self, store: PieceStore, batch: ForwardBatch, size: int) -> None:
        """Four launches on the device (page and offset of each new slot, then padding),
        and the exact layers' store."""
        if store.exact is not None:
            self.exact.write_piece_store(store.exact, batch, size)
        n, rows = batch.num_tokens, store.first(size)
        torch.floor_divide(batch.slot_mapping, batch.page_size, out=rows["pages"][:n])
        torch.remainder(batch.slot_mapping, batch.page_size, out=rows["offsets"][:n])
        store.pad(n, size)

    def store(
        self,
        layer_id: int,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: SageKVCache,
        store: PieceStore,
        size: int,
    ) -> None:
        """k, v: [size, Hkv, D] of layer layer_id (unrotated) where the first `size` rows of
        store say; an exact layer's through the exact backend's store."""
        if layer_id in self.skipped:
            i = self.slot_of[layer_id]
            self.exact.store(i, k, v, kv_cache.exact, store.exact, size)
            return
        rows = store.first(size)
        self._store_kernels(layer_id, k, v, kv_cache, rows["pages"], rows["offsets"])

    def attend_stored(
        self,
        layer_id: int,
        q: torch.Tensor,
        kv_cache: SageKVCache,
        meta: SageMetadata,
        out: torch.Tensor,
    ) -> torch.Tensor:
        """q, out: [T, Hq, D]: `forward` over K/V that `store` already wrote."""
        if layer_id in self.skipped:
            i = self.slot_of[layer_id]
            return self.exact.attend_stored(i, q, kv_cache.exact, meta.exact, out)
        return self._attend_kernels(layer_id, q, kv_cache, meta, out)

    def _decode_workspace(self, rows: int, page_size: int) -> DecodeWorkspace:
        """The split workspace for `rows` decodes, planned from static quantities only: the
        CUDA-graph batch size they pad to, and the page-table width of `max_context` (not
        the step's own width). Eager steps and graph replays thus cut a context into the
        same splits (the split length follows the planned width), bitwise the same output."""
        from sageserve.attention.sage_attn.kernels.decode import DecodeWorkspace, plan_splits
        from sageserve.attention.sage_attn.kernels.prefill import KEY_ALIGN

        cfg, device = self.shape, self.options.device
        tokens = table_width(self.max_context, page_size, KEY_ALIGN) * page_size
        splits, _ = plan_splits(padded_batch_size(rows), cfg.num_kv_heads, tokens, device)
        return DecodeWorkspace.allocate(
            rows, cfg.num_q_heads, cfg.num_kv_heads, cfg.head_dim, tokens, device, num_splits=splits
        )

    # ------------------------------------------------------------ CUDA graphs

    def cuda_graph_unsupported_reason(self) -> str | None:
        if not self.use_kernels:
            return (
                "sage_attn runs its torch reference here (--sage-impl reference, or no CUDA), "
                "which is not CUDA-graph safe"
            )
        reason = self.exact.cuda_graph_unsupported_reason() if self.exact else None
        if reason is not None:
            return (
                f"sage_attn keeps layers {sorted(self.skipped)} exact through the "
                f"{self.exact.name} backend (the triton kernels do not serve this model: "
                f"{'; '.join(TritonBackend.unsupported_reasons(*self._exact_args(1)))}), and "
                f"it is not CUDA-graph safe: {reason}"
            )
        return None

    def graph_metadata(
        self, kv_cache: SageKVCache, batch_size: int, max_context: int
    ) -> SageGraphMetadata:
        """Static tables (int32 page_table [bs, W], q_rows [bs] = 0..bs-1, kv_len [bs]; int64
        store_pages, store_offsets [bs]) and the decode workspace for bs rows, plus the exact
        layers' backend's own. Every row starts as padding (its new token stored into
        kv_cache's scratch page)."""
        from sageserve.attention.sage_attn.kernels.prefill import KEY_ALIGN

        if max_context > self.max_context:
            raise ValueError(f"max_context {max_context} exceeds this pool's {self.max_context}")
        bs, i32, i64, page_size = batch_size, torch.int32, torch.int64, kv_cache.page_size
        width = table_width(max_context, page_size, KEY_ALIGN)
        buffers = StaticBuffers(
            {"page_table": ((bs, width), i32), "q_rows": ((bs,), i32), "kv_len": ((bs,), i32),
             "store_pages": ((bs,), i64), "store_offsets": ((bs,), i64)}, self.options.device,
            patched="page_table", patch_capacity=PATCHES_PER_ROW * bs,
        )  # fmt: skip
        buffers.host["q_rows"][:] = np.arange(bs)
        view = buffers.device
        decode = DecodeRows(view["page_table"], view["q_rows"], view["kv_len"],
                            self._decode_workspace(bs, page_size))  # fmt: skip
        exact = None
        if self.exact is not None:
            exact = self.exact.graph_metadata(kv_cache.exact, bs, max_context)
        meta = SageMetadata(view["store_pages"], view["store_offsets"], [],
                            exact.meta if exact else None,
                            KernelMetadata(prefill=None, decode=decode))  # fmt: skip
        graph_meta = SageGraphMetadata(
            bs, max_context, page_size, meta, buffers, kv_cache.scratch_page, exact
        )
        write_padding(graph_meta, 0)
        buffers.upload()
        return graph_meta

    def graph_update(self, graph_meta: SageGraphMetadata, batch: ForwardBatch) -> None:
        """Tables of the step's rows; padding after them (null pages, kv_len 0, new token
        stored into the scratch page, which nothing reads)."""
        host = graph_meta.buffers.host
        slots = write_decode_rows(batch, host["page_table"], host["kv_len"])
        n = len(slots)
        host["store_pages"][:n], host["store_offsets"][:n] = np.divmod(slots, batch.page_size)
        write_padding(graph_meta, n)
        graph_meta.buffers.upload()
        if graph_meta.exact is not None:
            self.exact.graph_update(graph_meta.exact, batch)
