"""What every `sageserve bench` result file records besides its figures: the device, the
software versions, the command that repeats the run; and how the file is written."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import re
import shlex
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from sageserve.output_dir import DEFAULT_OUT_ROOT


def device_info(device: torch.device) -> dict[str, Any]:
    """Name, capability, SMs, memory and L2 of a CUDA device; processor and cores on CPU."""
    if device.type != "cuda":
        return {"name": "cpu", "processor": platform.processor() or platform.machine(),
                "cpu_count": os.cpu_count()}  # fmt: skip
    props = torch.cuda.get_device_properties(device)
    return {
        "name": props.name, "capability": f"{props.major}.{props.minor}",
        "sm_count": props.multi_processor_count, "memory_bytes": props.total_memory,
        "l2_bytes": getattr(props, "L2_cache_size", None),
    }  # fmt: skip


def software() -> dict[str, Any]:
    """Versions of python, torch, triton, CUDA, cuDNN and SageAttention (if installed)."""
    import triton

    try:
        sage = importlib.metadata.version("sageattention")
    except importlib.metadata.PackageNotFoundError:
        sage = "not installed"
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {"python": platform.python_version(), "torch": torch.__version__,
            "triton": triton.__version__, "cuda": torch.version.cuda, "cudnn": cudnn,
            "sageattention": sage}  # fmt: skip


def settings_command(words: list[str], settings: Any, out: Path) -> str:
    """`words` + one flag per field of the settings dataclass (bools as switches, tuples
    comma-joined) + --out: the command that repeats a run, every setting explicit."""
    words = list(words)
    for name, value in asdict(settings).items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            words += [flag] if value else []
        elif isinstance(value, tuple):
            words += [flag, ",".join(map(str, value))]
        elif value is not None:
            words += [flag, str(value)]
    return shlex.join([*words, "--out", str(out)])


def default_out(kind: str, device: dict[str, Any], stamp: str) -> Path:
    """Untracked, one file per run (results to keep are written with --out)."""
    slug = re.sub(r"[^a-z0-9]+", "-", device["name"].lower()).strip("-")
    return Path(DEFAULT_OUT_ROOT) / f"{kind}-{slug}-{stamp}.json"


def write_json(result: dict[str, Any], out: Path) -> None:
    """Write atomically: a reader (or a run cut short) never sees half a file."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(out)
