"""Does a host-to-device upload wait for the work already queued on the stream?

The overlap schedule builds step N+1's inputs (ids, positions, page tables, sampling
parameters) while the device still runs step N. If an upload waited for the queue to drain,
the host would stall there and nothing would overlap. This queues ~200 ms of device work
(`torch.cuda._sleep`), then times on the host: a pageable upload with non_blocking=True (what
the engine does), a pinned one, a blocking one, and an event query; then the same with the
queue empty. Prints one JSON object.

    PYTHONPATH=. python lab/host_upload_probe.py
"""

from __future__ import annotations

import json
import time

import torch

SLEEP_CYCLES = 400_000_000  # ~200 ms at ~2 GHz


def _host_ms(fn, busy: bool) -> float:
    torch.cuda.synchronize()
    if busy:
        torch.cuda._sleep(SLEEP_CYCLES)
    start = time.perf_counter()
    fn()
    elapsed = (time.perf_counter() - start) * 1e3
    torch.cuda.synchronize()
    return elapsed


def main() -> None:
    device = torch.device("cuda")
    values = list(range(4096))
    pinned = torch.tensor(values, dtype=torch.int64).pin_memory()
    cases = {
        "pageable_non_blocking": lambda: torch.tensor(values).to(device, non_blocking=True),
        "pinned_non_blocking": lambda: pinned.to(device, non_blocking=True),
        "pageable_blocking": lambda: torch.tensor(values).to(device),
        "event_record_query": lambda: torch.cuda.Event().record() or None,
    }
    for fn in cases.values():  # first calls allocate and initialize
        _host_ms(fn, busy=False)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    for name, fn in cases.items():
        result[name] = {
            "host_ms_queue_busy": _host_ms(fn, busy=True),
            "host_ms_queue_empty": _host_ms(fn, busy=False),
        }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
