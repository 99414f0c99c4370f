"""Timing helpers shared by the benchmarks: warm-up, then the median (and spread) of many timed
runs; on CUDA, device events around each run so asynchronous work is counted."""
import statistics
import time
from dataclasses import dataclass
from typing import Callable, List, Optional

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
            min_time_s: float = 0.0, budget_s: Optional[float] = None,
            clock: Callable[[], float] = time.perf_counter) -> Timing:
    """Median of `runs` timed calls of fn (more, up to 10x, while under min_time_s).

    budget_s bounds the time of the calls after the first one (a torch.compile contender compiles
    in that one), warm-up included: no call starts that, taking as long as the one before it,
    would end past the budget, except the first timed run. It is there for contenders that are
    pathologically slow on some machine: torch's bfloat16 matmul on a CPU without AVX512_BF16
    took ~36 s for one 4096 x 4096 linear forward+backward (0.4 s in float32), where the suite's
    25 calls a round would have taken ~45 minutes for that one case. Timing.runs says how many
    timed runs it got."""
    start = last = 0.0  # the budget's start; seconds the previous call took

    def over() -> bool:  # the next call, as long as the last one, would end past the budget
        return budget_s is not None and clock() - start + last > budget_s

    for i in range(warmup):
        if i > 0 and over():
            break
        t0 = clock()
        fn()
        last = clock() - t0
        if i == 0:
            start = clock()
    samples: List[float] = []
    timed_start = clock()
    while not samples or (
            not over() and (len(samples) < runs or (clock() - timed_start < min_time_s
                                                    and len(samples) < 10 * runs))):
        if device.startswith("cuda"):
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(begin.elapsed_time(end))
        else:
            t0 = clock()
            fn()
            samples.append((clock() - t0) * 1e3)
        last = samples[-1] / 1e3
    return Timing.of(samples)
