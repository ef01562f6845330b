"""The run loop the lab's launch-setting sweeps share: one JSON record (probe, command, date,
device, software, the copy bandwidth measured in the run), one entry per shape, the file
rewritten after each shape so that a run cut short keeps what it measured."""

from __future__ import annotations

import json
import shlex
import sys
from collections.abc import Callable
from datetime import UTC, datetime

from sageserve.bench.kernels_timing import Timer, copy_bandwidth
from sageserve.bench.run_record import device_info, software


def run_sweep(
    probe: str,
    shapes: str,
    out: str,
    timer: Timer,
    measure: Callable[[int, int], dict],
    show: Callable[[dict, float], None],
) -> dict:
    """shapes: "AxB,..." pairs, each measured by measure(A, B) and printed by show(entry,
    copy GB/s); returns the record written to `out`."""
    copy = copy_bandwidth(timer, 2 << 30 if timer.cuda else 1 << 20)
    result = {"probe": probe, "command": shlex.join(sys.argv),
              "date": datetime.now(UTC).isoformat(timespec="seconds"),
              "device": device_info(timer.device), "software": software(), "copy": copy,
              "shapes": []}  # fmt: skip
    for text in shapes.split(","):
        first, second = (int(x) for x in text.split("x"))
        result["shapes"].append(measure(first, second))
        show(result["shapes"][-1], copy["gb_per_s"])
        with open(out, "w") as f:
            json.dump(result, f, indent=1)
    return result
