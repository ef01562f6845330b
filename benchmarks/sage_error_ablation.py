"""Where the 8-bit path's error comes from: per source and per layer (issue 18, item 1).

Every variant is teacher-forced through the engine on the same windows (of validate's
Britannica text, or with `--text pydoc` of Python's documentation topics) and
compared with exact attention (the torch backend): mean KL(exact || variant) per token and
top-1 agreement, at each window length (default 512 and 8192 tokens, SmolLM2's context).

Variants:
- `sage_attn` as served (Hadamard rotation of Q and K, K smoothing; reference numerics),
  and with one or two of its choices changed: FP8 P·V, no K smoothing, with the Q/K channel
  balance, no rotation, no rotation but the balance (the default before the rotation); and
  with `--sage-calibrate` at its default budget (its plan kept in --plan-file).
- Fake quantization (a backend registered here): exact attention over Q, K and V passed
  through sage's own quantize/dequantize (reference.py: per-token INT8, fp16 K/V scales, the
  calibrated key mean and channel balance), for one source at a time (q, k, v) and all three;
  then all three in one layer at a time (`layer_<i>`). What it leaves out is the rounding of
  P to fp16 before P·V, which the served `sage_attn` row includes: the two "all sources"
  rows agree when that rounding is negligible. Candidates for a smaller error, in the same
  emulation: no channel balance; an orthonormal Hadamard rotation of Q and K along head_dim
  before INT8 (q·k unchanged, outlier channels spread over all), with and without balance;
  the rotation with SageAttention-2's Q smoothing (each 64-row block's mean taken out of Q
  before INT8, its product with the keys added back exactly); the rotation with each
  sequence's first token (the attention sink) kept unquantized in K and V ("exact sink");
  the rotation with Q in two INT8 levels ("two-level q": the codes of Q, then the codes of
  their rounding residual at 1/128 of Q's scale, which two INT8 products per block and one
  shift of the first's INT32 scores by 7 bits would compute exactly; 7 more bits for Q).
- FP8 P·V split by operand (reference numerics with one operand kept accurate, swapped into
  `reference.py` for the variant's run): P through FP8 e4m3 in its blocks as served, over
  INT8 V ("fp8 P only"); and FP8 V under P left in fp64 ("fp8 V only").
- INT8 P·V: P rounded to unsigned 8-bit codes (0..255, V scales folded in per block as for
  FP8) over the INT8 V cache, the operands of an INT8 × INT8 tensor-core product.

    PYTHONPATH=. python benchmarks/sage_error_ablation.py --lengths 512,8192 --windows 4,1 \
        --out benchmarks/results/sage_error_ablation-cpu-<date>.json

One JSON (device, versions, date, command, per-variant figures); progress on stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import sys
import time
from datetime import UTC, datetime

import torch

from sageserve.attention.registry import register_backend
from sageserve.attention.sage_attn import reference
from sageserve.attention.sage_attn.calibration import calibrate_qk, calibration_token_ids
from sageserve.attention.sage_attn.options import SageOptions
from sageserve.attention.sage_attn.reference import (
    Q_LEVEL_SHIFT,
    balance_q,
    dequantize,
    quantize_int8,
    quantize_q_two_levels,
)
from sageserve.attention.sage_attn.rotation import hadamard_matrix
from sageserve.attention.torch_native.backend import TorchNativeBackend
from sageserve.attention.torch_native.options import TorchOptions
from sageserve.bench.run_record import device_info, software
from sageserve.config import CacheConfig, EngineConfig, SchedulerConfig
from sageserve.engine.engine import Engine
from sageserve.models.loader import LoadedModel, load_model
from sageserve.validate.data import britannica_text
from sageserve.validate.metrics import (
    kl_divergence,
    perplexity,
    ppl_delta_ci,
    target_logprobs,
    top1_matches,
)

SOURCES = ("q", "k", "v")
TEXTS = {
    "britannica": "Britannica (validate's)",
    "pydoc": "pydoc_data.topics (Python's documentation topics, sorted by key)",
}
# Where the --sage-calibrate variant keeps its plan (read back when it exists; --plan-file).
PLAN_FILE = {"path": "sage_layer_plan.json"}
# What the fake-quantizing backend quantizes, set before each engine is built.
FAKE_QUANT: dict[str, object] = {
    "sources": frozenset(SOURCES), "layers": frozenset(), "rotate": False, "balance": True,
    "q_smooth": False, "exact_sink": False, "q_levels": 1,
}  # fmt: skip
# Query rows per block of the Q smoothing candidate (the prefill kernels' query block).
Q_SMOOTH_ROWS = 64
_CALIBRATED: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}


class FakeQuantBackend(TorchNativeBackend):
    """Exact attention over fake-quantized Q, K, V in the layers and sources of FAKE_QUANT."""

    name = "sage_fakequant"

    def __init__(self, shape, options) -> None:
        super().__init__(shape, options)
        self.sources = FAKE_QUANT["sources"]
        self.layers = FAKE_QUANT["layers"]
        self.rotation = _hadamard(shape.head_dim) if FAKE_QUANT["rotate"] else None
        self.balance = FAKE_QUANT["balance"]
        self.q_smooth = FAKE_QUANT["q_smooth"]
        self.exact_sink = FAKE_QUANT["exact_sink"]
        self.q_levels = FAKE_QUANT["q_levels"]
        self.k_mean = self.channel_scale = None

    def prepare(self, model: torch.nn.Module, tokenizer: object | None) -> None:
        """The key mean and channel balance, calibrated as sage_attn calibrates them (once
        per model: every fake-quantizing engine of the run shares them)."""
        if id(model) not in _CALIBRATED:
            ids = calibration_token_ids(tokenizer, self.shape.vocab_size)
            stats = calibrate_qk(model, ids)
            _CALIBRATED[id(model)] = (stats.k_mean, stats.channel_scale(smoothed=True))
        self.k_mean, self.channel_scale = _CALIBRATED[id(model)]

    def forward(self, layer_id, q, k, v, kv_cache, meta):
        """q: [T, Hq, D]; k, v: [T, Hkv, D] -> [T, Hq, D]; quantization error, exact math."""
        if layer_id in self.layers:
            k_exact, v_exact = k, v
            c, mean = self.channel_scale[layer_id], self.k_mean[layer_id]
            if not self.balance:
                c = torch.ones_like(c)
            if "q" in self.sources and self.q_smooth:
                q = _smoothed_fake_q(q, c, self.rotation)
            elif "q" in self.sources:
                q = _fake_q(q, c, self.rotation, self.q_levels)
            if "k" in self.sources:
                k = _fake_k(k, mean, c, self.rotation)
            if "v" in self.sources:
                v = dequantize(*quantize_int8(v, torch.float16)).to(v.dtype)
            if self.exact_sink:
                k, v = _exact_first_token(k, v, k_exact, v_exact, meta)
        return super().forward(layer_id, q, k, v, kv_cache, meta)


def _exact_first_token(k, v, k_exact, v_exact, meta):
    """k, v with the key and value of each sequence's position 0 (the attention sink) put
    back unquantized: the row q_start of every prefill chunk that is its sequence's first."""
    k, v = k.clone(), v.clone()
    for seq in meta.prefills:
        if seq.kv_slots.numel() == seq.q_end - seq.q_start:
            k[seq.q_start], v[seq.q_start] = k_exact[seq.q_start], v_exact[seq.q_start]
    return k, v


def _hadamard(n: int) -> torch.Tensor:
    """[n, n] orthonormal Hadamard matrix (Sylvester; n a power of two): H Hᵀ = I."""
    return (hadamard_matrix(n) / n**0.5).float()


def _rotated_int8(
    x: torch.Tensor, rotation, scale_dtype: torch.dtype, levels: int = 1
) -> torch.Tensor:
    """x [T, H, D] through INT8 (per token and head), in the rotated basis when given:
    (quant(x R)) Rᵀ, so that q·k is unchanged by the rotation itself. levels 2: plus the
    INT8 codes of the first level's residual, as served (`reference.quantize_q_two_levels`,
    fp32 scales)."""
    rotated = x if rotation is None else x @ rotation
    if levels == 2:
        first, second, scale = quantize_q_two_levels(rotated)
        fake = dequantize(first, scale) + dequantize(second, scale * 2.0**-Q_LEVEL_SHIFT)
    else:
        fake = dequantize(*quantize_int8(rotated, scale_dtype))
    return fake if rotation is None else fake @ rotation.T


def _fake_q(q: torch.Tensor, c: torch.Tensor, rotation, levels: int = 1) -> torch.Tensor:
    """Q balanced (and rotated), INT8 per token and head (fp32 scale) in `levels` levels,
    undone again."""
    group = q.shape[1] // c.shape[0]
    fake = _rotated_int8(balance_q(q, c), rotation, torch.float32, levels)
    return (fake / c.repeat_interleave(group, dim=0)).to(q.dtype)


def _smoothed_fake_q(q: torch.Tensor, c: torch.Tensor, rotation) -> torch.Tensor:
    """SageAttention-2's Q smoothing: each block of Q_SMOOTH_ROWS consecutive rows of a
    head loses its mean before INT8 (`_fake_q`), and the mean's product with the keys comes
    back exactly (here: the mean added back to the fake-quantized rows; a kernel adds
    mean · Kᵀ to each block's scores). q: [T, Hq, D]; the step's rows are one sequence's
    chunk in the ablation's teacher-forced windows."""
    rows = q.shape[0]
    pad = -rows % Q_SMOOTH_ROWS
    blocks = torch.nn.functional.pad(q.float(), (0, 0, 0, 0, 0, pad))
    blocks = blocks.view(-1, Q_SMOOTH_ROWS, *q.shape[1:])
    counts = torch.full((blocks.shape[0], 1, 1, 1), float(Q_SMOOTH_ROWS))
    counts[-1] = Q_SMOOTH_ROWS - pad
    mean = (blocks.sum(dim=1, keepdim=True) / counts).expand_as(blocks).reshape(-1, *q.shape[1:])
    mean = mean[:rows]
    return (_fake_q((q.float() - mean).to(q.dtype), c, rotation).float() + mean).to(q.dtype)


def _fake_k(k: torch.Tensor, mean: torch.Tensor, c: torch.Tensor, rotation) -> torch.Tensor:
    """K smoothed and balanced (and rotated), INT8 with fp16 scales, then back (the mean's
    q·mean term is the same for every key, so softmax does not see it)."""
    stored = (k.float() - mean) / c
    return (_rotated_int8(stored, rotation, torch.float16) * c + mean).to(k.dtype)


def _pv_blocks(p, v_codes, v_scale, code_max: float, to_codes) -> torch.Tensor:
    """reference._pv_fp8 with P's codes made by `to_codes` from P in [0, code_max] (the V
    scales folded in per block: reference.fold_v_scales): p [H, n, kv]; v codes [kv, H, D]
    (INT8 or FP8) with scales [kv, H] -> [H, n, D] fp64."""
    folded, v_blocks, block_max = reference.fold_v_scales(p, v_codes, v_scale)
    p_codes = to_codes(folded.double() * code_max)
    partial = torch.einsum("hnbk,bkhd->hnbd", p_codes, v_blocks.double())
    return (partial * (block_max.T.double() / code_max)[:, None, :, None]).sum(dim=2)


def _exact(x: torch.Tensor) -> torch.Tensor:
    return x


# The FP8 P·V split: (cache's pv, reference function swapped, its replacement).
PV_SPLITS = {
    "p_fp8": ("fp16", "_pv_fp16", reference._pv_fp8),  # over the INT8 V cache
    "v_fp8": ("fp8", "_pv_fp8", lambda p, v, s: _pv_blocks(p, v, s, reference.FP8_MAX, _exact)),
    "p_u8": ("fp16", "_pv_fp16", lambda p, v, s: _pv_blocks(p, v, s, 255.0, torch.round)),
}


@contextlib.contextmanager
def _pv_split(name: str | None):
    """reference.py's P·V function replaced for one variant's run (nothing when None)."""
    if name is None:
        yield
        return
    _, attr, replacement = PV_SPLITS[name]
    saved = getattr(reference, attr)
    setattr(reference, attr, replacement)
    try:
        yield
    finally:
        setattr(reference, attr, saved)


def _engine(loaded: LoadedModel, backend: str, options, chunk: int) -> Engine:
    config = EngineConfig(
        device="cpu", dtype="float32", attention_backend=backend, attention_options=(options,),
        cache=CacheConfig(max_total_tokens=8192 + 64),
        scheduler=SchedulerConfig(chunked_prefill_size=chunk),
    )  # fmt: skip
    return Engine(config, loaded)


def prose_text(name: str) -> str:
    """validate's Britannica article, or Python's own documentation topics (technical
    English prose used nowhere else in the project; always installed)."""
    if name == "britannica":
        return britannica_text()
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def token_windows(
    loaded: LoadedModel, text: str, lengths: list[int], counts: list[int]
) -> dict[int, list]:
    """Distinct spans of the text: counts[i] windows of lengths[i] tokens."""
    ids = loaded.tokenizer.encode(prose_text(text), add_special_tokens=False)
    out, offset = {}, 0
    for length, count in zip(lengths, counts, strict=True):
        out[length] = []
        for _ in range(count):
            if offset + length > len(ids):
                raise ValueError(f"the text has {len(ids)} tokens: too few for these windows")
            out[length].append(ids[offset : offset + length])
            offset += length
    return out


def compare_windows(
    ref_engine: Engine, engine: Engine, windows: dict
) -> dict[str, dict[str, float]]:
    """Per length: mean KL, top-1 agreement, and the perplexity change with its paired
    bootstrap 95% interval (validate's `ppl_delta_ci`).

    One window at a time, the exact reference scored again beside each variant: only two
    windows' distributions are held ([tokens, vocab] fp32 each, 1.6 GB at 8192 tokens of
    SmolLM2), where keeping every window's reference ran a 2-core, 24 GiB machine out of
    memory at six 8k windows."""
    out = {}
    for n, ws in windows.items():
        kl, top1, ref_lp, test_lp = [], [], [], []
        for window in ws:
            ref, test = (
                ref_engine.teacher_forced_logprobs(window),
                engine.teacher_forced_logprobs(window),
            )
            target = torch.tensor(window[1:])
            kl.append(kl_divergence(ref, test))
            top1.append(top1_matches(ref, test))
            ref_lp.append(target_logprobs(ref, target))
            test_lp.append(target_logprobs(test, target))
            del ref, test
        kl, top1 = torch.cat(kl), torch.cat(top1)
        ref_lp, test_lp = torch.cat(ref_lp), torch.cat(test_lp)
        out[str(n)] = {"mean_kl": kl.mean().item(), "top1": top1.double().mean().item(),
                       "tokens": kl.numel(),
                       "ppl_delta_rel": perplexity(test_lp) / perplexity(ref_lp) - 1,
                       "ppl_delta_ci": list(ppl_delta_ci(ref_lp, test_lp))}  # fmt: skip
    return out


def _variants(num_layers: int, per_layer: bool) -> list[tuple[str, str, object]]:
    """(name, backend, options) of every variant, in run order."""
    out = [
        ("sage_attn", "sage_attn", SageOptions(impl="reference")),
        ("sage_attn pv=fp8", "sage_attn", SageOptions(impl="reference", pv="fp8")),
        ("sage_attn no smoothing", "sage_attn", SageOptions(impl="reference", smooth_k=False)),
        ("sage_attn with balance", "sage_attn", SageOptions(impl="reference", balance_qk=True)),
        ("sage_attn no rotation", "sage_attn", SageOptions(impl="reference", rotate_qk=False)),
        (
            "sage_attn no rotation + balance",
            "sage_attn",
            SageOptions(impl="reference", rotate_qk=False, balance_qk=True),
        ),
        (
            "sage_attn --sage-calibrate",
            "sage_attn",
            SageOptions(impl="reference", calibrate=True, calibration_file=PLAN_FILE["path"]),
        ),
        (
            "sage_attn --sage-q-levels 2",
            "sage_attn",
            SageOptions(impl="reference", q_levels=2),
        ),
        ("fake qkv", "sage_fakequant", frozenset(SOURCES)),
    ]
    out += [
        ("sage_attn fp8 P only", "sage_attn", "p_fp8"),
        ("sage_attn fp8 V only", "sage_attn", "v_fp8"),
        ("sage_attn int8 P·V (u8 P)", "sage_attn", "p_u8"),
    ]
    out += [(f"fake {s}", "sage_fakequant", frozenset(s)) for s in SOURCES]
    for candidate in ("no balance", "hadamard", "hadamard no balance",
                      "hadamard no balance q-smooth",
                      "hadamard no balance exact sink", "hadamard no balance two-level q",
                      "hadamard no balance two-level q exact sink"):  # fmt: skip
        out.append((f"fake qkv {candidate}", "sage_fakequant", candidate))
    if per_layer:
        out += [(f"layer_{i}", "sage_fakequant", i) for i in range(num_layers)]
    return out


def _run_variant(loaded, backend, spec, chunk, windows, ref_engine: Engine) -> dict:
    options, split = TorchOptions(), None
    if backend == "sage_attn" and isinstance(spec, str):
        split, options = spec, SageOptions(impl="reference", pv=PV_SPLITS[spec][0])
    elif backend == "sage_attn":
        options = spec
    else:
        every = range(loaded.config.num_layers)
        FAKE_QUANT["layers"] = frozenset([spec] if isinstance(spec, int) else every)
        FAKE_QUANT["sources"] = spec if isinstance(spec, frozenset) else frozenset(SOURCES)
        FAKE_QUANT["rotate"] = isinstance(spec, str) and "hadamard" in spec
        FAKE_QUANT["balance"] = not (isinstance(spec, str) and "no balance" in spec)
        FAKE_QUANT["q_smooth"] = isinstance(spec, str) and "q-smooth" in spec
        FAKE_QUANT["exact_sink"] = isinstance(spec, str) and "exact sink" in spec
        FAKE_QUANT["q_levels"] = 2 if isinstance(spec, str) and "two-level q" in spec else 1
    with _pv_split(split), _engine(loaded, backend, options, chunk) as engine:
        return compare_windows(ref_engine, engine, windows)


def _selected(name: str, only: str) -> bool:
    """Whether variant `name` is among --only's comma-separated names (all when empty)."""
    if not only:
        return True
    patterns = [p.strip() for p in only.split(",") if p.strip()]
    return any(name.startswith(p[:-1]) if p.endswith("*") else name == p for p in patterns)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", default="512,8192")
    parser.add_argument("--windows", default="4,1", help="windows per length")
    parser.add_argument("--chunk", type=int, default=2048, help="--chunked-prefill-size")
    parser.add_argument("--no-per-layer", action="store_true")
    parser.add_argument(
        "--only",
        default="",
        help="comma-separated variant names to run (a trailing * matches a prefix: layer_*; "
        "names hold no commas)",
    )
    parser.add_argument("--text", choices=sorted(TEXTS), default="britannica")
    parser.add_argument("--plan-file", default=PLAN_FILE["path"], help="--sage-calibrate's plan")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    PLAN_FILE["path"] = args.plan_file
    register_backend("sage_fakequant", f"{__name__}:FakeQuantBackend")(TorchOptions)
    torch.manual_seed(0)
    loaded = load_model(None, dtype="float32", device="cpu")
    lengths = [int(x) for x in args.lengths.split(",")]
    windows = token_windows(loaded, args.text, lengths, [int(x) for x in args.windows.split(",")])
    result = {
        "benchmark": "sage error ablation (issue 18)",
        "command": shlex.join(["python", *sys.argv]),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "device": device_info(torch.device("cpu")), "software": software(),
        "model": loaded.source, "text": f"{TEXTS[args.text]}, consecutive spans",
        "lengths": lengths, "windows": {str(n): len(ws) for n, ws in windows.items()},
        "variants": {},
    }  # fmt: skip
    variants = _variants(loaded.config.num_layers, not args.no_per_layer)
    with _engine(loaded, "torch", TorchOptions(), args.chunk) as ref_engine:
        for name, backend, spec in [v for v in variants if _selected(v[0], args.only)]:
            start = time.monotonic()
            scores = _run_variant(loaded, backend, spec, args.chunk, windows, ref_engine)
            result["variants"][name] = scores
            print(f"{name}: {scores} ({time.monotonic() - start:.0f} s)", file=sys.stderr,
                  flush=True)  # fmt: skip
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
