"""pyengine's benchmark suite: per-op and per-network timings against torch eager and
torch.compile (and, on a GPU, both under CUDA graphs; on a CPU with JAX installed, the networks
also under jax.jit: benchmarks/jax_steps.py), with each case's FLOP and byte counts and
the share of the machine's measured peak each contender reached; written as one CSV schema plus a
markdown table and plots (benchmarks/report.py). How to read them: docs/benchmarks.md.

    python -m benchmarks [--device cpu|cuda] [--quick | --gpu-check] [--filter TEXT] [--out DIR]

The machine's peaks are measured first (benchmarks/peak.py). Every case is timed for every
contender in the same process, interleaved, after warm-up: median and p10/p90 of many runs (CUDA:
device events). Its work is counted once, from the operator calls of one pyengine run
(benchmarks/work.py). TF32 is off for torch, since pyengine's kernels compute in plain fp32.
"""
import argparse
import contextlib
import datetime
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch
import torch._functorch.config
import torch.nn.functional as TF

import pyengine.functional as PF
import pyengine.fused
from pyengine._fused import TORCH_EQUIVALENTS
from benchmarks import peak, report, work
from benchmarks.timing import Timing, time_fn
from pyengine.models import MLP, BinaryClassifier, LeNet, layers


@dataclass
class Case:
    kind: str              # "op" or "network"
    name: str              # e.g. "conv2d 1->6 5x5 @32" or "lenet"
    batch: int
    pass_: str             # "forward", "backward", "forward+backward", "inference", "train_step"
    # (contender, device) -> the timed call, or None where the contender has no version of the
    # case (JAX has the networks only)
    make: Callable[[str, str], Optional[Callable[[], object]]]


# ---- contenders ---------------------------------------------------------------------------

# Eager calls before a capture: the first runs allocate what the step keeps (gradients, the
# optimizer's buffers, cuDNN / cuBLAS workspaces and plans), which must exist before capture.
GRAPH_WARMUP = 3


def _graphed(fn: Callable[[], object], device: str,
             stream: Optional["torch.cuda.Stream"] = None) -> Callable[[], object]:
    """fn captured in a CUDA graph; returns the replay. fn runs GRAPH_WARMUP times first, then
    once under capture, both on `stream` (a new side stream by default): capture on the default
    stream is illegal, and autograd runs each backward op on its forward's stream, so a case whose
    forward ran before capture (the "backward" pass) must have run it on this same stream.
    Replays run on the current stream, where the timing events are recorded.

    The replay holds fn: the graph reads and writes the memory of the tensors fn's closure holds
    (inputs, parameters), and the CUDA graph itself keeps none of them alive. Without fn the
    caching allocator gave that memory to the next contender's tensors while the graph still
    used it (binary_cross_entropy's input then held another contender's gradients and its
    [0, 1] check failed on the H200)."""
    with torch.cuda.device(device):
        stream = stream or torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(GRAPH_WARMUP):
                fn()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            fn()
        torch.cuda.current_stream().wait_stream(stream)

    def replay():
        graph.replay()

    replay.captured = fn  # (see above: keeps the tensors the graph uses alive)
    return replay


def jax_contender(device: str, log=print) -> List[str]:
    """["jax"] where the run can time JAX (a CPU run, JAX importable), else [] with the reason
    logged: a missing JAX leaves its contender out, it stops nothing."""
    if device.split(":")[0] != "cpu":
        return []
    try:
        import jax
    except Exception as exc:  # not installed, or an install that does not load
        log(f"JAX does not import here ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:120]}): the suite runs without its jax contender "
            "(`make bench-all` installs JAX)")
        return []
    log(f"jax contender: JAX {jax.__version__}, jax.jit on the CPU, fp32 "
        "(benchmarks/jax_steps.py)")
    return ["jax"]


def contenders(device: str, with_compile: bool, log=print) -> List[str]:
    names = ["pyengine", "torch"]
    if with_compile:
        names.append("torch.compile")
    names += jax_contender(device, log)
    if device.startswith("cuda"):
        names += ["pyengine+graph", "torch+graph"]
    else:
        # The networks' training steps as pyengine.capture_step replays: one C++ call per step
        # (a CPU step's counterpart of the CUDA graphs above).
        names.append("pyengine+capture")
    return names


# ---- per-op cases -------------------------------------------------------------------------

# The autocast dtype of the mixed-precision cases ("... bf16 autocast"): every contender's
# forward runs under torch.autocast in it (the backward follows the forward's dtypes).
AMP_DTYPE = torch.bfloat16
AMP_LABEL = " bf16 autocast"


def _autocast(device: str, amp: bool, graphed: bool = False):
    """torch.autocast in AMP_DTYPE on the device's type, or nothing. A CUDA graph replays the
    casts it captured, so its capture must not use autocast's cache of cast parameters."""
    if not amp:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=AMP_DTYPE, cache_enabled=not graphed)


def _op_case(name, batch, pass_, build, amp=False):
    """build(functional_module, device) -> (forward fn taking no args, tensors needing grads).
    The forward/backward/both variants are derived from it; amp: the forward under
    torch.autocast in AMP_DTYPE (the case's name says so)."""

    def make(contender, device):
        base = contender.split("+")[0]
        if base == "jax" or contender.endswith("+capture"):
            return None  # whole training steps only, not single ops
        if base == "torch.compile":
            fwd_builder = lambda: build(TF, device)  # noqa: E731
        else:
            fwd_builder = lambda: build(PF if base == "pyengine" else TF, device)  # noqa: E731
        forward, leaves = fwd_builder()
        graphed = contender.endswith("+graph")
        if amp:
            plain_forward = forward

            def forward():
                with _autocast(device, True, graphed):
                    return plain_forward()
        if base == "torch.compile":
            forward = torch.compile(forward, dynamic=False)
        stream = torch.cuda.Stream(device) if graphed else None  # the capture's (see _graphed)
        if pass_ == "forward":
            fn = lambda: forward()  # noqa: E731
            with torch.no_grad():
                fn()
            run = _no_grad(fn)
        elif pass_ == "backward":
            # The forward runs once, here; a graph captures the backward ops, which autograd runs
            # on the forward's stream: so a graphed case runs its forward on the capture stream.
            with _on(stream):
                out = forward()
                grad = torch.randn_like(out)
            run = lambda: torch.autograd.grad(out, leaves, grad, retain_graph=True)  # noqa: E731
        else:
            def run():
                out = forward()
                return torch.autograd.grad(out, leaves, torch.ones_like(out))
        return _graphed(run, device, stream) if graphed else run

    return Case("op", name + (AMP_LABEL if amp else ""), batch, pass_, make)


def _on(stream: Optional["torch.cuda.Stream"]):
    """A context running on `stream` after the work queued so far (nothing, for None)."""
    if stream is None:
        return contextlib.nullcontext()
    stream.wait_stream(torch.cuda.current_stream(stream.device))
    return torch.cuda.stream(stream)


def _no_grad(fn):
    def run():
        with torch.no_grad():
            return fn()
    return run


def _rand(*shape, device, grad=False):
    return torch.randn(*shape, device=device, requires_grad=grad)


def _fused(F, name):
    """The fused op `name` for the functional module a case's build() gets: pyengine.fused's
    function for pyengine.functional, the torch calls it replaces for torch.nn.functional."""
    return getattr(pyengine.fused, name) if F is PF else TORCH_EQUIVALENTS[name]


# The convolutions that also run under bf16 autocast (forward+backward): LeNet's and two of a
# ResNet's.
AMP_CONV_CASES = ("conv2d 1->6 5x5 @32", "conv2d 6->16 5x5 @14", "conv2d 64->64 3x3 @56",
                  "conv2d 64->128 3x3 stride 2 @56")


def op_cases(quick: bool) -> List[Case]:
    cases = []
    passes = ["forward", "backward", "forward+backward"]
    # (label, C_in, C_out, kernel, image size, batch, stride): LeNet's and a small CNN's layers,
    # then the ones a ResNet-style network converted to pyengine would hit (3x3 at 56 / 28 / 14,
    # a strided 3x3, a 1x1 expansion). 3x3 kernels pad 1 (same size at stride 1).
    conv_shapes = [("conv2d 1->6 5x5 @32", 1, 6, 5, 32, 64, 1),
                   ("conv2d 6->16 5x5 @14", 6, 16, 5, 14, 64, 1),
                   ("conv2d 3->64 3x3 @32", 3, 64, 3, 32, 64, 1),
                   ("conv2d 64->64 3x3 @32", 64, 64, 3, 32, 16, 1),
                   ("conv2d 64->64 3x3 @56", 64, 64, 3, 56, 8, 1),
                   ("conv2d 128->128 3x3 @28", 128, 128, 3, 28, 8, 1),
                   ("conv2d 256->256 3x3 @14", 256, 256, 3, 14, 8, 1),
                   ("conv2d 64->128 3x3 stride 2 @56", 64, 128, 3, 56, 8, 2),
                   ("conv2d 64->256 1x1 @56", 64, 256, 1, 56, 8, 1)]
    for label, cin, cout, k, size, batch, stride in conv_shapes:
        def build(F, device, cin=cin, cout=cout, k=k, size=size, batch=batch, stride=stride):
            x = _rand(batch, cin, size, size, device=device, grad=True)
            w = _rand(cout, cin, k, k, device=device, grad=True)
            b = _rand(cout, device=device, grad=True)
            pad = 1 if k == 3 else 0
            return (lambda: F.conv2d(x, w, b, stride, pad)), [x, w, b]

        cases += [_op_case(label, batch, p, build) for p in passes]
        if label in AMP_CONV_CASES:
            cases.append(_op_case(label, batch, "forward+backward", build, amp=True))

    # A network converted to channels_last (input and weight; torch computes in that layout):
    # a ResNet's 3x3, strided 3x3 and 1x1 layers, which pyengine's CPU kernels read and write in
    # that layout (csrc/cpu/conv2d.cpp).
    for label, cin, cout, k, stride in (("conv2d 64->64 3x3 @56 channels_last", 64, 64, 3, 1),
                                        ("conv2d 64->128 3x3 stride 2 @56 channels_last", 64,
                                         128, 3, 2),
                                        ("conv2d 64->256 1x1 @56 channels_last", 64, 256, 1, 1)):
        def channels_last_build(F, device, cin=cin, cout=cout, k=k, stride=stride):
            cl = torch.channels_last
            x = _rand(8, cin, 56, 56, device=device).to(memory_format=cl).requires_grad_()
            w = _rand(cout, cin, k, k, device=device).to(memory_format=cl).requires_grad_()
            b = _rand(cout, device=device, grad=True)
            return (lambda: F.conv2d(x, w, b, stride, 1 if k == 3 else 0)), [x, w, b]

        cases += [_op_case(label, 8, p, channels_last_build) for p in passes]
        if k == 3:  # the mixed-precision recipe of CPU training: channels_last under autocast
            cases.append(_op_case(label, 8, "forward+backward", channels_last_build, amp=True))

    def pool_build(F, device):
        x = _rand(64, 6, 28, 28, device=device, grad=True)
        return (lambda: F.max_pool2d(x, 2)), [x]

    cases += [_op_case("max_pool2d 6x28x28 k2", 64, p, pool_build) for p in passes]

    # LeNet's conv -> relu -> pool blocks as one fused operator, against torch's three calls
    for label, cin, cout, size in (("conv2d_relu_max_pool2d 1->6 5x5 @32", 1, 6, 32),
                                   ("conv2d_relu_max_pool2d 6->16 5x5 @14", 6, 16, 14)):
        def build(F, device, cin=cin, cout=cout, size=size):
            x = _rand(64, cin, size, size, device=device, grad=True)
            w = _rand(cout, cin, 5, 5, device=device, grad=True)
            b = _rand(cout, device=device, grad=True)
            fn = _fused(F, "conv2d_relu_max_pool2d")
            return (lambda: fn(x, w, b, pool_kernel_size=2)), [x, w, b]

        cases += [_op_case(label, 64, p, build) for p in passes]
        cases.append(_op_case(label, 64, "forward+backward", build, amp=True))

    for label, fin, fout, batch in (("linear 400->120", 400, 120, 256),
                                    ("linear 784->256", 784, 256, 256),
                                    ("linear 4096->4096", 4096, 4096, 256)):
        def build(F, device, fin=fin, fout=fout, batch=batch):
            x = _rand(batch, fin, device=device, grad=True)
            w = _rand(fout, fin, device=device, grad=True)
            b = _rand(fout, device=device, grad=True)
            return (lambda: F.linear(x, w, b)), [x, w, b]

        cases += [_op_case(label, batch, p, build) for p in passes]
        cases.append(_op_case(label, batch, "forward+backward", build, amp=True))

    # A transposed weight (an (in, out) parameter used as w.t(), as tied or hand-written layers
    # have it): torch's mm reads it in place.
    def transposed_weight_build(F, device):
        x = _rand(256, 4096, device=device, grad=True)
        w = _rand(4096, 4096, device=device).t().detach().requires_grad_()
        return (lambda: F.linear(x, w)), [x, w]

    cases += [_op_case("linear 4096->4096 transposed weight", 256, p, transposed_weight_build)
              for p in ("forward", "forward+backward")]

    # LeNet's first activation (64 x 6 x 28 x 28, ~300k: cache-resident) and 30M elements
    # (120 MB per float32 tensor: DRAM-bound, where an elementwise kernel must run at bandwidth).
    for n in (64 * 6 * 28 * 28, 30_000_000):
        for act in ("relu", "leaky_relu", "sigmoid", "tanh"):
            def build(F, device, act=act, n=n):
                x = _rand(n, device=device, grad=True)
                fn = getattr(F, act)
                return (lambda: fn(x)), [x]

            cases += [_op_case(f"{act} {n}", 1, p, build) for p in passes]
    for act in ("softmax", "log_softmax"):
        def build(F, device, act=act):
            x = _rand(256, 1000, device=device, grad=True)
            fn = getattr(F, act)
            return (lambda: fn(x, dim=1)), [x]

        cases += [_op_case(f"{act} 256x1000", 256, p, build) for p in passes]

    def mse_build(F, device):
        x, t = _rand(256, 10, device=device, grad=True), _rand(256, 10, device=device)
        return (lambda: F.mse_loss(x, t)), [x]

    def bce_build(F, device):
        p = torch.rand(256, 10, device=device).clamp(0.01, 0.99).requires_grad_()
        t = torch.rand(256, 10, device=device)
        return (lambda: F.binary_cross_entropy(p, t)), [p]

    def ce_build(F, device):
        x = _rand(256, 10, device=device, grad=True)
        t = torch.randint(0, 10, (256,), device=device)
        return (lambda: F.cross_entropy(x, t)), [x]

    # Per-pixel classes (semantic segmentation): logits (N, C, H, W), targets (N, H, W).
    def ce_spatial_build(F, device):
        x = _rand(8, 21, 64, 64, device=device, grad=True)
        t = torch.randint(0, 21, (8, 64, 64), device=device)
        return (lambda: F.cross_entropy(x, t)), [x]

    for label, build in (("mse_loss 256x10", mse_build), ("binary_cross_entropy 256x10", bce_build),
                         ("cross_entropy 256x10", ce_build)):
        cases += [_op_case(label, 256, p, build) for p in passes]
    cases += [_op_case("cross_entropy 8x21x64x64", 8, p, ce_spatial_build) for p in passes]

    # Host cost: on one element the time is the call's own (Python, dispatch, the autograd graph
    # for forward+backward): what every operator of a small batch pays.
    def host_cost_build(F, device):
        x = _rand(1, device=device, grad=True)
        return (lambda: F.relu(x)), [x]

    cases += [_op_case("relu 1 (host cost)", 1, p, host_cost_build)
              for p in ("forward", "forward+backward")]
    if quick:
        cases = [c for c in cases if c.pass_ == "forward+backward"]
    return cases


# ---- per-network cases --------------------------------------------------------------------

NETWORKS = {
    "lenet": (lambda backend: LeNet(backend=backend), (1, 32, 32), 10),
    "mlp 784-256-10": (lambda backend: MLP(backend=backend), (1, 28, 28), 10),
    "classifier 5-8-4-1": (lambda backend: BinaryClassifier(backend=backend), (5,), 1),
}


# The networks' optimizer: plain SGD (no momentum) at this learning rate, for every contender.
SGD_LR = 0.01


def network_run(name: str, batch: int, pass_: str, contender: str, device: str,
                amp: bool = False):
    """(state, run): the network `name` built for `contender` (seeded: every contender starts
    from the same weights, on the same batch) and one step on that fixed batch. state is the
    torch model, or for "jax" the benchmarks.jax_steps object holding the JAX parameters. A
    "+graph" contender's step is the one to capture (network_case captures it). amp: the forward
    and loss under torch.autocast in AMP_DTYPE (JAX and pyengine.capture_step have no such
    variant: (None, None))."""
    factory, in_shape, n_out = NETWORKS[name]
    base = contender.split("+")[0]
    backend = "pyengine" if base == "pyengine" else "torch"
    torch.manual_seed(0)
    model = factory(backend).to(device)
    x = torch.randn(batch, *in_shape, device=device)
    if name.startswith("classifier"):
        y = torch.rand(batch, n_out, device=device)
    else:
        y = torch.randn(batch, n_out, device=device)
    if amp and (base == "jax" or contender.endswith("+capture")):
        return None, None
    if base == "jax":
        from benchmarks import jax_steps

        # Its first call compiles: a warm-up call (timing.time_fn), never a timed one.
        step = (jax_steps.Inference(model, x) if pass_ == "inference"
                else jax_steps.TrainStep(model, x, y, SGD_LR))
        return step, step
    loss_fn = layers(backend).MSELoss()
    forward = torch.compile(model) if base == "torch.compile" else model
    if pass_ == "inference":
        if contender.endswith("+capture"):
            return model, None  # capture_step is for training steps
        model.eval()

        def infer():
            with _autocast(device, amp, graphed=contender.endswith("+graph")):
                return forward(x)
        return model, _no_grad(infer)
    # Plain SGD (no momentum) is pure tensor arithmetic on the parameters and their gradients:
    # capturable as it is (the optimizers that keep a step count need capturable=True).
    opt = torch.optim.SGD(model.parameters(), lr=SGD_LR)
    graphed = contender.endswith("+graph")

    def run():
        opt.zero_grad(set_to_none=not graphed)  # a graph replays into fixed gradient buffers
        with _autocast(device, amp, graphed):
            loss = loss_fn(forward(x), y)
        loss.backward()
        opt.step()
        return loss

    if contender.endswith("+capture"):
        import pyengine

        step = pyengine.capture_step(lambda xb, yb: run(), x, y)  # (run reads x, y itself)
        return model, lambda: step(x, y)
    return model, run


def network_case(name: str, batch: int, pass_: str, amp: bool = False) -> Case:
    def make(contender, device):
        _, run = network_run(name, batch, pass_, contender, device, amp)
        if run is None:
            return None
        if contender.endswith("+graph"):
            return _graphed(run, device)
        return run

    return Case("network", name + (AMP_LABEL if amp else ""), batch, pass_, make)


# The LeNet training step of `make gpu-check`: a batch that a step's fixed costs dominate, and
# one large enough to fill a GPU.
GPU_CHECK_LENET_BATCHES = (256, 8192)


def gpu_check_cases(lenet_batches=GPU_CHECK_LENET_BATCHES) -> List[Case]:
    """`make gpu-check`'s set (tools/gpu_check.sh): the LeNet training step at lenet_batches,
    in float32 and under bf16 autocast, first (the headline ratios, timed before any time limit
    can cut the run short), then the quick per-op cases (forward+backward of every op)."""
    return ([network_case("lenet", b, "train_step", amp=amp) for amp in (False, True)
             for b in lenet_batches]
            + op_cases(quick=True))


def network_cases(quick: bool, device: str) -> List[Case]:
    batches = [1, 64, 256] if quick else [1, 16, 64, 256, 1024, 4096]
    if device.startswith("cuda") and not quick:
        batches.append(8192)
    # Mixed precision: the LeNet and MLP training steps under bf16 autocast.
    amp_batches = [64, 256] if quick else [1, 64, 256, 1024]
    return ([network_case(name, b, p) for name in NETWORKS for b in batches
             for p in ("inference", "train_step")]
            + [network_case(name, b, "train_step", amp=True) for name in ("lenet", "mlp 784-256-10")
               for b in amp_batches])


# ---- running and reporting ----------------------------------------------------------------

def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine_name(device: str) -> str:
    """The results folder's name: gpu-<device name> (e.g. gpu-NVIDIA-H200) or
    cpu-<cores>core-<arch>."""
    if device.startswith("cuda"):
        return "gpu-" + re.sub(r"[^A-Za-z0-9._-]+", "-", torch.cuda.get_device_name(device))
    return f"cpu-{os.cpu_count()}core-{platform.machine()}"


def count_work(case: Case, device: str, log=print) -> Optional[work.Work]:
    """The case's FLOP and byte counts, from one run of its pyengine variant (None, reported,
    if that run fails: the rows then have empty work columns)."""
    try:
        counted = work.count(case.make("pyengine", device))
    except Exception as exc:
        log(f"  {case.name} {case.pass_} batch {case.batch}: work not counted "
            f"({type(exc).__name__}: {str(exc).splitlines()[0][:120]})")
        return None
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return counted


# Seconds one contender's round of one case may take (after its first call; warm-up included)
# before it stops early: see timing.time_fn. Over three times the slowest normal round on the
# reference machine (LeNet's step at batch 4096 under torch.compile: 29 calls of 0.61 s), so that
# slower machines keep their full rounds and only a pathological contender is cut short.
ROUND_BUDGET_S = 60.0

# Rounds per case: the contenders take turns, a few calls each, so that the machine's slow
# phases hit all of them alike. Three rounds of runs / 3 calls were too coarse on a shared
# 2-core VM whose speed drifted 30-50% over seconds: one contender's round fell in a slow phase
# and its median with it (a backward slower than the same op's forward+backward in one run).
# The first round warms up with 5 calls, the others with 2 (the caches the other contenders
# evicted, the thread pool's wake-up).
ROUNDS = 5

# A round's timed calls go on for at least this long (up to 10x its runs): a median of the 3
# calls a round of `--runs 15` gives was too coarse for the ops of tens of microseconds, whose
# calls after another contender's round vary by more than the gaps measured. leaky_relu's
# backward over 300k floats read 0.96x and 1.19x torch's time in two such runs (the two ops
# alternating in a loop: 0.90-0.93x); with rounds of at least 50 ms, 0.94x and 0.97x. Cases of
# more than ~17 ms a call keep their runs (the whole suite at --runs 15: 4.7 minutes here).
# CPU only: CUDA cases are timed by device events, and gpu-check's four contenders would take
# at least 1 s a case (5 rounds of 50 ms) of its 45 s budget.
ROUND_MIN_S = 0.05


def runs_per_round(runs: int) -> int:
    return max(3, runs // ROUNDS)


def run_cases(cases: List[Case], names: List[str], device: str, runs: int, peaks: peak.Peaks,
              log=print, time_limit_s: Optional[float] = None) -> List[dict]:
    """Times every case for every contender; past time_limit_s seconds (if given) no further
    case starts, and the ones left are named in the log."""
    start = time.perf_counter()
    meta = dict(machine=machine_name(device), device=device, torch=torch.__version__,
                commit=_commit(), date=datetime.date.today().isoformat(),
                threads=torch.get_num_threads(), peak_gflops=report.round_sig(peaks.gflops),
                peak_gbps=report.round_sig(peaks.gbps))
    rows = []
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    round_min_s = 0.0 if device.startswith("cuda") else ROUND_MIN_S
    uncounted_seen = set()
    for i, case in enumerate(cases, 1):
        if time_limit_s is not None and time.perf_counter() - start > time_limit_s:
            left = cases[i - 1:]
            log(f"time limit of {time_limit_s:g} s reached: {len(left)} of {len(cases)} cases not "
                "run: " + "; ".join(f"{c.name} {c.pass_} batch {c.batch}" for c in left))
            break
        counted = count_work(case, device, log)
        if counted is not None and set(counted.uncounted) - uncounted_seen:
            uncounted_seen |= set(counted.uncounted)
            log(f"  operators not counted (benchmarks/work.py has no formula for them): "
                f"{', '.join(sorted(counted.uncounted))}")
        fns: Dict[str, Callable] = {}
        for contender in names:
            try:
                fn = case.make(contender, device)
                if fn is not None:
                    fns[contender] = fn
            except Exception as exc:  # e.g. a graph capture torch refuses: reported, not hidden
                log(f"  {case.name} {case.pass_} batch {case.batch}: {contender} skipped "
                    f"({type(exc).__name__}: {str(exc).splitlines()[0][:120]})")
        # Interleave the contenders in ROUNDS rounds; keep each contender's middle round median.
        per_round: Dict[str, List[Timing]] = {c: [] for c in fns}
        for r in range(ROUNDS):
            for contender, fn in list(fns.items()):
                sync()
                try:
                    per_round[contender].append(time_fn(fn, device,
                                                        warmup=5 if r == 0 else 2,
                                                        runs=runs_per_round(runs),
                                                        min_time_s=round_min_s,
                                                        budget_s=ROUND_BUDGET_S))
                except Exception as exc:  # reported and dropped, never silently
                    log(f"  {case.name} {case.pass_} batch {case.batch}: {contender} failed "
                        f"({type(exc).__name__}: {str(exc).splitlines()[0][:120]})")
                    del fns[contender]
                    per_round.pop(contender)
        case_rows = {}
        for contender, timings in per_round.items():
            timed = sum(t.runs for t in timings)
            if timed < ROUNDS * runs_per_round(runs):
                log(f"  {case.name} {case.pass_} batch {case.batch}: {contender} took "
                    f"{timings[-1].median_ms / 1e3:.3g} s a call: {timed} timed runs, not "
                    f"{ROUNDS * runs_per_round(runs)} (a round's time budget is "
                    f"{ROUND_BUDGET_S:g} s)")
            t = sorted(timings, key=lambda t: t.median_ms)[len(timings) // 2]
            case_rows[contender] = dict(
                meta, kind=case.kind, case=case.name, batch=case.batch, **{"pass": case.pass_},
                contender=contender, median_ms=round(t.median_ms, 5), p10_ms=round(t.p10_ms, 5),
                p90_ms=round(t.p90_ms, 5), runs=timed,
                **report.rates(counted.flops if counted else None,
                               counted.bytes if counted else None,
                               t.median_ms, peaks.gflops, peaks.gbps))
        rows += case_rows.values()
        mine, ref = case_rows.get("pyengine"), case_rows.get("torch")
        ratio = f"{mine['median_ms'] / ref['median_ms']:.2f}" if mine and ref else "-"
        jax_row, captured = case_rows.get("jax"), case_rows.get("pyengine+capture")
        jax_ratio = f", pyengine/jax {mine['median_ms'] / jax_row['median_ms']:.2f}" \
            if mine and jax_row else ""
        if captured and ref:
            jax_ratio += f", captured/torch {captured['median_ms'] / ref['median_ms']:.2f}"
        if captured and jax_row:
            jax_ratio += f", captured/jax {captured['median_ms'] / jax_row['median_ms']:.2f}"
        share = f", pyengine at {mine['pct_of_bound']:.1f}% of peak" \
            if mine and mine["pct_of_bound"] != "" else ""
        log(f"[{i}/{len(cases)}] {case.kind:7} {case.name:28} {case.pass_:16} batch "
            f"{case.batch:>5}: pyengine/torch {ratio}{jax_ratio}{share}")
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="fewer cases and batch sizes")
    p.add_argument("--gpu-check", action="store_true",
                   help="make gpu-check's set: the LeNet training step at --lenet-batches, then "
                   "the forward+backward op cases; no torch.compile")
    p.add_argument("--lenet-batches", type=int, nargs="+", metavar="N",
                   default=list(GPU_CHECK_LENET_BATCHES),
                   help="--gpu-check's LeNet batch sizes (default: %(default)s)")
    p.add_argument("--time-limit", type=float, metavar="SECONDS",
                   help="start no case after this many seconds (the rest are named in the log; "
                   "the results so far are written)")
    p.add_argument("--only", choices=("ops", "networks"), help="run one half of the suite")
    p.add_argument("--filter", metavar="TEXT",
                   help="only the cases whose name contains TEXT (e.g. conv2d, lenet)")
    p.add_argument("--no-compile", dest="compile", action="store_false",
                   help="skip the torch.compile contender (its compiles take minutes on CPU)")
    p.add_argument("--runs", type=int, default=60, help="timed runs per contender and case")
    p.add_argument("--out", help="output folder (default benchmarks/results/<machine>)")
    args = p.parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    # The "backward" cases time a backward pass repeated over one retained graph, which compiled
    # graphs refuse while they donate their buffers to the backward pass.
    torch._functorch.config.donated_buffer = False
    device = args.device
    cases = []
    if args.gpu_check:
        if args.quick or args.only:
            p.error("--gpu-check picks its own cases: leave out --quick and --only")
        cases = gpu_check_cases(args.lenet_batches)
        args.compile = False  # its compiles take minutes: not in a check's time budget
    if args.only in (None, "ops") and not args.gpu_check:
        cases += op_cases(args.quick)
    if args.only in (None, "networks") and not args.gpu_check:
        cases += network_cases(args.quick, device)
    if args.filter:
        cases = [c for c in cases if args.filter in c.name]
    if not cases:
        p.error(f"no case matches --filter {args.filter!r}")
    out_dir = args.out or os.path.join(os.path.dirname(__file__), "results", machine_name(device))
    os.makedirs(out_dir, exist_ok=True)
    peaks = peak.measure(device)
    rows = run_cases(cases, contenders(device, args.compile), device, args.runs, peaks,
                     time_limit_s=args.time_limit)
    if not rows:
        print("no case was timed", file=sys.stderr)
        return 1
    plots = report.write_all(rows, out_dir, peaks.flops_method, peaks.bytes_method)
    print(report.times_table(rows))
    print(report.rates_table(rows))
    print(f"wrote {out_dir}/results.csv, results.md, " + ", ".join(os.path.basename(p)
                                                                 for p in plots))
    return 0


if __name__ == "__main__":
    sys.exit(main())
