"""Run `sageserve validate` in a test process on one torch thread.

pytest -n 2 runs two workers on the CI's 2 cores: two torch threads each oversubscribe the
CPU and slow a validate run many times over.
"""

from __future__ import annotations

import torch

from sageserve.cli import main


def validate_on_one_thread(argv: list[str]) -> int:
    """main(["validate", ...]) with torch on one thread, restored afterwards; its exit code."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return main(argv)
    finally:
        torch.set_num_threads(threads)
