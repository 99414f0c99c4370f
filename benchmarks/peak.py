"""The machine's measured peaks, taken by the suite at start so that every case can say what
share of the machine it used (docs/benchmarks.md explains how to read them).

- Compute: a register-only loop of independent fp32 fused multiply-adds, no memory traffic.
  CPU: the widest vector ISA the CPU has, on torch.get_num_threads() threads (peak.cpp).
  GPU: a kernel of fmaf chains filling every SM (peak_cuda.cu).
- Memory: a copy of 256 MiB into another 256 MiB (torch's copy_; on a GPU device-to-device),
  counted as bytes read + bytes written, as the cases' byte counts are (benchmarks/work.py).

Both are the best of a few runs: a peak is a ceiling, and on a busy machine the best run is the
closest to it. The native code is compiled on first use with torch.utils.cpp_extension.load and
cached by torch (TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions), so only the first run
pays the compile. It is not part of pyengine's extension.
"""
import os
import sys
import time
from dataclasses import dataclass

import torch

from benchmarks.timing import time_fn

HERE = os.path.dirname(os.path.abspath(__file__))
COPY_MIB = 256
REPEATS = 5
FMA_TARGET_S = 0.2  # each timed FMA run lasts about this long


@dataclass(frozen=True)
class Peaks:
    gflops: float       # fp32 FMA peak, GFLOP/s
    gbps: float         # copy bandwidth, GB/s (read + write)
    flops_method: str   # how gflops was measured, for the report's header
    bytes_method: str

    @property
    def balance(self) -> float:
        """FLOP per byte where the two roofs meet: a case of higher arithmetic intensity is
        compute-bound on this machine, one of lower intensity memory-bound."""
        return self.gflops / self.gbps


def _native(cuda: bool):
    from torch.utils.cpp_extension import load

    sources = [os.path.join(HERE, "peak.cpp")]
    if cuda:
        sources.append(os.path.join(HERE, "peak_cuda.cu"))
    # The shared C++ runtime, for the reason setup.py gives (a toolchain that links libstdc++
    # statically otherwise).
    ldflags = ["-l:libstdc++.so.6"] if sys.platform.startswith("linux") else []
    return load(name="pyengine_bench_peak" + ("_cuda" if cuda else ""), sources=sources,
                extra_cflags=["-O3"] + (["-DPEAK_WITH_CUDA"] if cuda else []),
                extra_cuda_cflags=["-O3"], extra_ldflags=ldflags, verbose=False)


def cpu_fma_gflops(threads: int) -> tuple:
    """(GFLOP/s, ISA name) of the register-only FMA loop on `threads` threads."""
    native = _native(cuda=False)
    per_iter = native.cpu_flops_per_iter()
    iters = 1 << 14
    while True:  # calibrate: grow the loop until one run takes a measurable while
        seconds = native.cpu_fma_seconds(threads, iters)
        if seconds > 0.02:
            break
        iters *= 4
    iters = max(1, int(iters * FMA_TARGET_S / seconds))
    best = min(native.cpu_fma_seconds(threads, iters) for _ in range(REPEATS))
    return threads * iters * per_iter / best / 1e9, native.cpu_isa()


def gpu_fma_gflops(device: torch.device) -> float:
    native = _native(cuda=True)
    index = device.index if device.index is not None else torch.cuda.current_device()
    iters = 1 << 10
    while True:
        ms, flops = native.gpu_fma(index, iters)
        if ms > 5:
            break
        iters *= 4
    iters = max(1, int(iters * FMA_TARGET_S * 1e3 / ms / 4))  # ~50 ms per launch
    best = max(flops / (ms * 1e-3) for ms, flops in (native.gpu_fma(index, iters)
                                                     for _ in range(REPEATS)))
    return best / 1e9


def copy_gbps(device: str) -> float:
    """Bytes read + written per second by a copy of COPY_MIB MiB of float32 (best of REPEATS)."""
    src = torch.ones(COPY_MIB * 2**20 // 4, device=device)
    dst = torch.empty_like(src)
    timing = time_fn(lambda: dst.copy_(src), device, warmup=2, runs=REPEATS)
    return 2 * src.nbytes / (timing.best_ms * 1e-3) / 1e9


def measure(device: str, log=print) -> Peaks:
    """The compute and copy peaks of `device` ('cpu', 'cuda', 'cuda:N')."""
    start = time.perf_counter()
    dev = torch.device(device)
    if dev.type == "cuda":
        gflops = gpu_fma_gflops(dev)
        flops_method = ("fp32 fmaf chains in registers on every SM of "
                        f"{torch.cuda.get_device_name(dev)}")
        bytes_method = f"device-to-device copy of {COPY_MIB} MiB, read + write"
    else:
        threads = torch.get_num_threads()
        gflops, isa = cpu_fma_gflops(threads)
        flops_method = f"fp32 FMA loop in registers, {isa}, {threads} threads"
        bytes_method = f"copy of {COPY_MIB} MiB (torch copy_, {threads} threads), read + write"
    peaks = Peaks(gflops, copy_gbps(device), flops_method, bytes_method)
    log(f"peaks: {peaks.gflops:.1f} GFLOP/s ({flops_method}); {peaks.gbps:.1f} GB/s "
        f"({bytes_method}); balance {peaks.balance:.1f} FLOP/byte "
        f"[{time.perf_counter() - start:.1f} s]")
    return peaks


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(prog="python -m benchmarks.peak",
                                     description="Measure and print the machine's peaks.")
    parser.add_argument("--device", default="cpu")
    measure(parser.parse_args().device)
