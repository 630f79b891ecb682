"""Benchmark helpers: the machine's name (every quoted number names it) and a timer."""

from __future__ import annotations

import os
import platform
import statistics
import time
from pathlib import Path

import torch


def cpu_name() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return model


def device_name(device: torch.device | str = "cpu") -> str:
    """The GPU's name, or the CPU model with its core and torch-thread counts."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"


def time_it(fn, device: torch.device | str = "cpu", min_reps: int = 3, budget_s: float = 2.0) -> float:
    """Median milliseconds of ``fn()`` after one warm-up call (CUDA synchronised)."""
    cuda = torch.device(device).type == "cuda"
    fn()
    times = []
    start = time.perf_counter()
    while len(times) < min_reps or (time.perf_counter() - start < budget_s and len(times) < 50):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)
