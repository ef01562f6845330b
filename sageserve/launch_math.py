"""Integer helpers for kernel launches on the host: grid sizes and block widths.

`triton.cdiv` and `triton.next_power_of_2` are constexpr functions in Triton 3.6: called from
host code, each goes through `ConstexprFunction.__call__`, which unwraps every argument and
keyword first (2-4 µs a call on the 2-core CI machine). The attention and layer wrappers
make ~10 such calls per layer per step, all on plain ints, so they use these instead
(`lab/host_wrapper_probe.py` measures the wrappers' host time).
"""

from __future__ import annotations


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for ints, b > 0."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n, for n >= 1 (0 for 0, as Triton's)."""
    return 0 if n <= 0 else 1 << (int(n) - 1).bit_length()
