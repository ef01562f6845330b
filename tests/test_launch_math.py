"""The host-side launch helpers equal Triton's constexpr functions (launch_math.py)."""

from __future__ import annotations

import triton

from sageserve.launch_math import cdiv, next_power_of_2


def test_cdiv_and_next_power_of_2_equal_tritons() -> None:
    values = [0, 1, 2, 3, 7, 16, 17, 200, 333, 1023, 1024, 1025, 131072, 2**31 + 5]
    for a in values:
        assert next_power_of_2(a) == triton.next_power_of_2(a), a
        for b in (1, 2, 7, 64, 128, 132, 1000):
            assert cdiv(a, b) == triton.cdiv(a, b), (a, b)
