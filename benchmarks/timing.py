"""Timing helpers shared by the benchmarks: warm-up, then the median (and spread) of many timed
runs; on CUDA, device events around each run so asynchronous work is counted."""
import statistics
import time
from dataclasses import dataclass
from typing import Callable, List

import torch


@dataclass
class Timing:
    median_ms: float
    p10_ms: float
    p90_ms: float
    runs: int
    best_ms: float  # the fastest run: what a peak measurement wants, not what a case reports

    @classmethod
    def of(cls, samples_ms: List[float]) -> "Timing":
        s = sorted(samples_ms)
        pick = lambda q: s[min(len(s) - 1, int(q * len(s)))]  # noqa: E731
        return cls(statistics.median(s), pick(0.1), pick(0.9), len(s), s[0])


def time_fn(fn: Callable[[], object], device: str = "cpu", warmup: int = 10, runs: int = 50,
            min_time_s: float = 0.0) -> Timing:
    """Median of `runs` timed calls of fn (more, up to 10x, while under min_time_s)."""
    for _ in range(warmup):
        fn()
    samples: List[float] = []
    start = time.perf_counter()
    while len(samples) < runs or (time.perf_counter() - start < min_time_s
                                  and len(samples) < 10 * runs):
        if device.startswith("cuda"):
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(begin.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    return Timing.of(samples)
