"""One entry of validate's --backends: an attention backend, optionally in its own dtype.

`torch@float32,torch,sage_attn --dtype bfloat16` compares both bf16 backends with exact
attention in fp32: the bf16 torch row is bf16's own error (its floor), the sage_attn row
that error plus the 8-bit attention's. Measured on an H100 (SmolLM2, BENCHMARKS.md "8-bit
accuracy on the GPU"): bf16 alone costs a mean KL of 1.1-1.4e-3 against fp32, so a bf16
run judged against a bf16 reference mostly measures bf16's rounding twice.
"""

from __future__ import annotations

from dataclasses import dataclass

from sageserve.attention.registry import backend_names
from sageserve.config import DTYPE_CHOICES

SEPARATOR = "@"


@dataclass(frozen=True)
class BackendSpec:
    """backend: a registered attention backend; dtype: the model's dtype for this entry
    (None: the run's --dtype)."""

    backend: str
    dtype: str | None = None

    def model_dtype(self, run_dtype: str) -> str:
        """The dtype this entry's model is loaded in."""
        return self.dtype or run_dtype


def parse_backend_spec(spec: str) -> BackendSpec:
    """ "name" or "name@dtype"; ValueError naming the valid backends and dtypes."""
    name, sep, dtype = spec.partition(SEPARATOR)
    valid = backend_names()
    if name not in valid:
        raise ValueError(f"unknown attention backend {name!r} in {spec!r}; valid backends: "
                         f"{', '.join(valid)}")  # fmt: skip
    dtypes = [d for d in DTYPE_CHOICES if d != "auto"]
    if sep and dtype not in dtypes:
        raise ValueError(f"{spec!r}: the dtype after {SEPARATOR!r} must be one of "
                         f"{', '.join(dtypes)}")  # fmt: skip
    return BackendSpec(name, dtype or None)


def check_backend_specs(specs: tuple[str, ...]) -> None:
    """ValueError (naming the valid choices) for the first entry that does not parse."""
    for spec in specs:
        parse_backend_spec(spec)
