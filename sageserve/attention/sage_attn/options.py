"""The `sage_attn` backend's registration, options and command-line flags."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Self

from sageserve.attention.flags import BackendFlags
from sageserve.attention.registry import register_backend

SAGE_PV_CHOICES = ("fp8", "fp16")
SAGE_IMPL_CHOICES = ("auto", "triton", "gluon", "reference")
SAGE_ROTATION_KERNEL_CHOICES = ("auto", "butterfly", "tensor_core", "prepass")
SAGE_Q_LEVELS_CHOICES = (1, 2)
# Mean KL per token on the calibration text. Prose elsewhere lands higher: SmolLM2's
# Britannica windows measured 1.3x the calibration text's KL, and at a budget of 2e-4 gave
# 2.7e-4 at 512 tokens, over issue 18's 2.5e-4 target (BENCHMARKS.md).
DEFAULT_KL_BUDGET = 1.5e-4


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not valid; choose one of: {', '.join(choices)}")


@register_backend(
    "sage_attn",
    "sageserve.attention.sage_attn.backend:SageAttentionBackend",
    help="8-bit attention and KV cache",
    attention_bits=8,
)
@dataclass(frozen=True)
class SageOptions(BackendFlags):
    """Options of the 8-bit `sage_attn` backend.

    pv: precision of the P·V product: "fp16" (P in FP16, V cached as INT8; the accurate
        default) or "fp8" (P and the cached V in FP8 e4m3; what FP8 tensor cores need).
    smooth_k: subtract the calibrated per-(layer, KV head) key mean before quantizing K.
    balance_qk: scale Q's channels up and K's down by a calibrated vector before quantizing
        (off by default: once Q and K are rotated it no longer lowers the error, measured).
    rotate_qk: rotate Q and K by a Hadamard matrix along head_dim before quantizing
        (`rotation.py`; q·k unchanged, outlier channels spread over all of head_dim).
    rotation_kernel: how the Triton kernels apply that rotation to the tiles they load
        (`kernels/rotate.py`): "butterfly" (the fp32 fast Walsh-Hadamard transform, the
        reference's bits), "tensor_core" (one 16-bit product with the ±1 matrix; fp16/bf16
        models, equal to the butterfly up to the order of fp32 additions) or "prepass" (the
        butterfly, but prefill queries rotated and quantized by one pass before the prefill
        kernel, `kernels/quantize_q.py`; the same bits as the butterfly), or "auto" (the
        default: prepass where the Triton prefill runs at head_dim >= 128, where it was
        4-13% faster than the in-kernel butterfly on an H100; the butterfly elsewhere, as
        at head_dim 64, where the pass was 0-2% slower; `backend.resolve_rotation_kernel`).
    q_levels: Q in one INT8 level (the default) or two: the second carries the first's
        rounding residual on a step of 1/128 of its scale, 7 more bits of Q for a second INT8
        product per key block; nothing changes in the cache (`reference.py`). The Triton
        kernels and the reference compute it; not the Gluon prefill or the query pass.
    skip_layers: layers kept in exact 16-bit attention over a 16-bit cache (logged).
    calibrate: at start-up, keep the fewest further layers exact that bring the KL against
        exact attention on the calibration text under kl_budget (`layer_precision.py`).
    kl_budget: that budget, in nats per token (mean KL(exact || served)).
    calibration_file: a JSON plan to read (when it exists) or to write, instead of
        measuring at every start-up; needs calibrate.
    impl: "triton" kernels, "gluon" (the Triton kernels, with prefill chunks through the
        warp-specialized Hopper kernel of `kernels/gluon`; sm_90 only), the torch
        "reference", or "auto" (the default: "gluon" where it serves the model, the device
        and the page size, "triton" on other CUDA devices, the reference elsewhere;
        `backend.resolve_impl`, logged at start-up). All compute the numerics of
        reference.py (the Gluon prefill up to rounding, `kernels/gluon`).
    """

    pv: str = "fp16"
    smooth_k: bool = True
    balance_qk: bool = False
    rotate_qk: bool = True
    rotation_kernel: str = "auto"
    q_levels: int = 1
    skip_layers: tuple[int, ...] = ()
    impl: str = "auto"
    calibrate: bool = False
    kl_budget: float = DEFAULT_KL_BUDGET
    calibration_file: str | None = None

    def __post_init__(self) -> None:
        _check_choice("sage_pv", self.pv, SAGE_PV_CHOICES)
        _check_choice("sage_impl", self.impl, SAGE_IMPL_CHOICES)
        _check_choice("sage_rotation_kernel", self.rotation_kernel, SAGE_ROTATION_KERNEL_CHOICES)
        if self.q_levels not in SAGE_Q_LEVELS_CHOICES:
            raise ValueError(f"sage_q_levels={self.q_levels!r} is not valid; choose one of: 1, 2")
        if any(layer < 0 for layer in self.skip_layers):
            raise ValueError(f"sage_skip_layers must be layer indices >= 0, got {self.skip_layers}")
        if not self.kl_budget > 0:
            raise ValueError(f"sage_kl_budget must be > 0, got {self.kl_budget}")
        if self.calibration_file and not self.calibrate:
            raise ValueError("sage_calibration_file needs --sage-calibrate")

    @classmethod
    def add_cli_flags(cls, group: argparse._ArgumentGroup) -> None:
        group.add_argument(
            "--sage-pv",
            default="fp16",
            choices=SAGE_PV_CHOICES,
            help="P·V precision: fp16 (V cached as INT8; accurate) or fp8 (P and the cached V "
            "in FP8 e4m3)",
        )
        group.add_argument(
            "--sage-disable-smooth-k",
            action="store_true",
            help="quantize keys without subtracting their calibrated mean",
        )
        group.add_argument(
            "--sage-qk-balance",
            action="store_true",
            help="scale Q's channels up and K's down by a calibrated vector before quantizing "
            "(no gain once Q and K are rotated)",
        )
        group.add_argument(
            "--sage-disable-qk-rotation",
            action="store_true",
            help="quantize Q and K without the Hadamard rotation along head_dim",
        )
        group.add_argument(
            "--sage-rotation-kernel",
            default="auto",
            choices=SAGE_ROTATION_KERNEL_CHOICES,
            help="how the Triton kernels rotate Q and K tiles: butterfly (fp32 fast "
            "Walsh-Hadamard transform), tensor_core (one fp16/bf16 product with the ±1 matrix) "
            "or prepass (the butterfly, with prefill queries rotated and quantized by one pass "
            "before the prefill kernel); auto: prepass for the Triton prefill at head_dim >= "
            "128, the butterfly otherwise",
        )
        group.add_argument(
            "--sage-q-levels",
            type=int,
            default=1,
            choices=SAGE_Q_LEVELS_CHOICES,
            help="Q in one INT8 level or two (7 more bits of Q for a second INT8 product per "
            "key block; the Triton kernels or the reference, not the Gluon prefill)",
        )
        group.add_argument(
            "--sage-calibrate",
            action="store_true",
            help="at start-up, keep the fewest layers in exact attention that bring the KL "
            "against exact attention on calibration text under --sage-kl-budget (logged)",
        )
        group.add_argument(
            "--sage-kl-budget",
            type=float,
            default=DEFAULT_KL_BUDGET,
            help=f"mean KL per token --sage-calibrate aims under (default {DEFAULT_KL_BUDGET})",
        )
        group.add_argument(
            "--sage-calibration-file",
            default=None,
            help="JSON plan of --sage-calibrate: read when it exists, else measured and written",
        )
        group.add_argument(
            "--sage-impl",
            default="auto",
            choices=SAGE_IMPL_CHOICES,
            help="gluon = the Triton kernels with the warp-specialized Hopper prefill (sm_90: "
            "H100/H200; page size 64, head_dim 64 or 128, bf16/fp16 models, no "
            "--sage-qk-balance); auto = gluon where it serves, else the Triton kernels on CUDA, "
            "the torch reference elsewhere (the choice is logged)",
        )
        group.add_argument(
            "--sage-skip-layers",
            type=_layer_list,
            default=(),
            help="comma-separated layers kept in exact attention, e.g. 0,1",
        )

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> Self:
        return cls(
            pv=args.sage_pv,
            smooth_k=not args.sage_disable_smooth_k,
            balance_qk=args.sage_qk_balance,
            rotate_qk=not args.sage_disable_qk_rotation,
            rotation_kernel=args.sage_rotation_kernel,
            q_levels=args.sage_q_levels,
            skip_layers=args.sage_skip_layers,
            impl=args.sage_impl,
            calibrate=args.sage_calibrate,
            kl_budget=args.sage_kl_budget,
            calibration_file=args.sage_calibration_file,
        )


def _layer_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated layer indices such as 0,1 -- got {text!r}"
        ) from None
