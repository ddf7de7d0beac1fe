"""What every benchmark shares: wall time of a call (queued CUDA work included), the median of
alternating runs, the description of the machine a number was measured on, and the JSON report.

Machines here are shared and noisy: peers are timed in turn within each repeat, so that load from
other processes falls on all of them alike, and the median counts.
"""

import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable, Mapping

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def elapsed_ms(fn: Callable[[], object], device: torch.device) -> float:
    """Wall time of one call of ``fn`` in milliseconds, queued CUDA work included."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return (time.perf_counter() - start) * 1e3


def median_ms_side_by_side(
    calls: Mapping[str, Callable[[], object]], device: torch.device, repeats: int
) -> dict[str, float]:
    """Median milliseconds of each call, run in turn within every repeat after one warm-up each."""
    for call in calls.values():
        call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            times[name].append(elapsed_ms(call, device))
    return {name: statistics.median(ms) for name, ms in times.items()}


def machine_info(device: torch.device | str = "cpu") -> dict:
    """Where a measurement was made: the CPU, its cores, torch's threads, the GPU if used."""
    device = torch.device(device)
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
    }


def write_report(path: str | Path, report: dict) -> None:
    """Write a benchmark's report as indented JSON and say where."""
    Path(path).write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    print(f"wrote {path}")
