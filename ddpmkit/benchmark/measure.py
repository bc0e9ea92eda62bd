"""Timing, FLOP counting, the matrix-multiply peak and peak memory, for side-by-side measurements."""

from __future__ import annotations

import resource
import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

#: A matrix product this long is long enough to time the peak (see matmul_peak).
MATMUL_SECONDS = 0.05


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], object], device: torch.device, *, warmup: int, repeats: int) -> float:
    """The median wall time of ``fn()`` over ``repeats`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_peak(device: torch.device, dtype: torch.dtype, size: int | None = None, repeats: int = 5) -> float:
    """FLOP/s of a square matrix product in ``dtype`` on ``device``: the achievable peak. The product grows
    from 256 until one takes MATMUL_SECONDS or reaches ``size`` (2048 on a CPU; 8192 on a GPU, where a smaller
    product finishes too fast to fill the chip), so that an emulated dtype (bf16 on a CPU without native
    bf16: ~0.3 GFLOP/s) is measured in a second, not in minutes."""
    largest = size or (8192 if device.type == "cuda" else 2048)
    n = min(256, largest)
    while True:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        seconds = median_seconds(
            lambda: a @ b,  # noqa: B023 (called at once)
            device,
            warmup=1,
            repeats=1,
        )
        if n >= largest or seconds >= MATMUL_SECONDS:
            break
        n = min(largest, n * 2)
    seconds = median_seconds(lambda: a @ b, device, warmup=1, repeats=repeats)
    return 2 * n**3 / seconds


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of the matrix products and convolutions ``fn()`` runs (torch.utils.flop_counter)."""
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return int(counter.get_total_flops())


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_bytes(device: torch.device) -> tuple[int, str]:
    """(bytes, what they are): the CUDA allocator's peak since the last reset, or on other devices the
    process's peak resident set so far (which only grows, so read it as an upper bound per mode)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "CUDA allocator peak"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024), "process peak RSS"
