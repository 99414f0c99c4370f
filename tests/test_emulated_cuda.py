"""pyengine's CUDA kernels run on the CPU, by the CUDA emulator of tests/cuda_emu, against the CPU
kernels: the lane that proves the CUDA code on every commit, with or without a GPU.

The real glue (csrc/cuda/*_glue.cpp: checks, allocation, layouts, workspaces) and the real kernels
(csrc/cuda/*.cu), compiled against the emulator (tests/cuda_emu/lane.py), are the operators
torch.ops.pyengine_emu.*; they take CPU tensors standing for CUDA ones. Every call here runs:

* under several schedules (threads resuming between barriers in order, reversed and shuffled;
  blocks likewise): results must be bitwise equal across them, or a kernel has a race (this is
  also the determinism check of every backward op and reduction);
* with poisoned memory: outputs and workspaces start as NaN / INT64_MAX (torch's
  deterministic fill of empty tensors), shared memory as 0xFF bytes, so an element never written
  shows;
* against the CPU operator on the same arguments, layouts kept (tests/parity.py, the check the
  GPU lane tests/test_cuda.py makes too).

Drives: every sample of every operator (tests/samples.py), float32 and float64, and the small
ones in bfloat16 and float16 (the kernels' own 16-bit code: __half / __nv_bfloat16 memory,
float32 arithmetic); channels_last and transposed layouts; the reductions at sizes with many
chunks and splits, in all four dtypes; random geometries per op (tests/fuzz_configs.py). The "small caps" runs shrink csrc/cuda's launch caps (PE_LAUNCH_CAP) so
that small tensors take the grid-stride, tile-loop, gridDim.z-batching, many-split and many-chunk
paths only huge tensors take on a GPU. Device-side asserts must fire with torch's message and
leave the sticky error a GPU leaves. What the emulator catches, proven on planted bugs:
tests/test_cuda_emu.py.
"""
import contextlib
import os
import random
import sys

import pytest
import torch

import fuzz_configs
import samples
from parity import (DEVICE_ASSERT_CASES, Target, assert_bitwise_equal, check_layouts,
                    check_sample, parity, reduction_calls, same_layout)

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "cuda_emu"))
import lane  # noqa: E402
import rewrite  # noqa: E402  (tests/cuda_emu/rewrite.py)

_unavailable = lane.available()
pytestmark = [pytest.mark.skipif(bool(_unavailable), reason=_unavailable)]

dtypes = pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
all_dtypes = pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)

# (order, seed): every emulated call runs under each; results must be bitwise equal.
SCHEDULES = [("in_order", 0), ("reversed", 0), ("shuffled", 1)]

# Launch caps small enough that the sample sizes cross them (the CUDA build's values:
# csrc/cuda, PE_LAUNCH_CAP). kChunk is not a multiple of the block size on purpose.
SMALL_CAPS = {
    "kMaxBlocks": 2,           # grid-stride loops make several passes
    "kTargetBlocks": 6,        # GEMMs split K ...
    "kMinKPerSplit": 16,       # ... from K = 32 on ...
    "kMaxSplits": 3,           # ... into at most 3 chunks, with a ragged last one
    "kMaxTileBlocks": 2,       # GEMM blocks loop over tiles
    "kMaxGridZ": 2,            # batched GEMMs launch in gridDim.z batches
    "kItemsPerChunk": 40,      # bias gradients reduce in many chunks ...
    "kTargetChunkBlocks": 5,
    "kMaxChunks": 3,           # ... capped, so chunks grow instead
    "kChunk": 300,             # loss sums: many partial blocks, ragged
}


@pytest.fixture(scope="module")
def emu():
    module = lane.load()
    yield module
    module.reset_caps()
    module.set_schedule("in_order", 0)


@contextlib.contextmanager
def poisoned_allocations():
    """torch.empty fills (NaN for floats, the largest value for integers) while on: every output
    and workspace the glue allocates starts poisoned."""
    was = torch.are_deterministic_algorithms_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was)
        torch.utils.deterministic.fill_uninitialized_memory = fill


@contextlib.contextmanager
def caps(emu, values):
    try:
        for name, value in (values or {}).items():
            emu.set_cap(name, value)
        yield
    finally:
        emu.reset_caps()


class Emulated(Target):
    """The emulated CUDA kernels: each call runs under every schedule, with fresh copies of its
    arguments and poisoned allocations; a difference between schedules fails as a race."""

    def __init__(self, emu, small_caps=False, schedules=SCHEDULES):
        self.emu, self.small_caps, self.schedules = emu, small_caps, schedules
        self.name = "emulated" + (" (small caps)" if small_caps else "")

    def op(self, name):
        fn = getattr(torch.ops.pyengine_emu, name)

        def run(*args):
            results = []
            with caps(self.emu, SMALL_CAPS if self.small_caps else None), \
                    poisoned_allocations():
                for order, seed in self.schedules:
                    self.emu.set_schedule(order, seed)
                    results.append(fn(*same_layout(args)))
                    self.synchronize()
            for (order, seed), result in zip(self.schedules[1:], results[1:]):
                assert_bitwise_equal(result, results[0], f"{self.name} {name}: schedule "
                                     f"{order}/{seed} differs from {self.schedules[0][0]}: a race")
            return results[0]
        return run

    def to(self, value):
        return same_layout(value)

    def synchronize(self):
        if self.emu.sticky_error():
            message = self.emu.last_error_message()
            self.emu.reset_device()
            raise RuntimeError(f"emulated CUDA error: {message}")


# ---- the launch caps -------------------------------------------------------------------------

def test_every_launch_cap_has_a_small_value(emu):
    """A new PE_LAUNCH_CAP in csrc/cuda must get a small value here, or its path goes untested."""
    assert set(emu.caps()) == set(SMALL_CAPS), sorted(emu.caps())


def test_small_caps_change_the_launches(emu):
    """The caps reach the kernels: a grid-stride kernel runs fewer blocks, a loss sum more."""
    x = torch.randn(5000, dtype=torch.float64)
    blocks = {}
    for small in (False, True):
        with caps(emu, SMALL_CAPS if small else None):
            emu.reset_stats()
            torch.ops.pyengine_emu.relu(x)
            blocks[small] = emu.stats()["blocks"]
    assert blocks == {False: 20, True: 2}, blocks


# ---- every operator on its samples -----------------------------------------------------------

NON_ERROR_SAMPLES = [s for s in samples.all_samples() if not s.case.expect_error]


@dtypes
@pytest.mark.parametrize("sample", NON_ERROR_SAMPLES, ids=lambda s: s.id)
def test_samples(emu, sample, dtype):
    check_sample(Emulated(emu), sample, dtype)


SMALL_SAMPLES = [s for s in NON_ERROR_SAMPLES if not s.large]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("sample", SMALL_SAMPLES, ids=lambda s: s.id)
def test_samples_in_16_bit(emu, sample, dtype):
    """bfloat16 and float16 on the kernels' own 16-bit code (16-bit loads and stores, float32
    arithmetic, one rounding per result), under every schedule, against the CPU operator in the
    same dtype (which computes in float32 and rounds once)."""
    check_sample(Emulated(emu), sample, dtype)


@pytest.mark.parametrize("sample", NON_ERROR_SAMPLES, ids=lambda s: s.id)
def test_samples_small_caps(emu, sample):
    check_sample(Emulated(emu, small_caps=True, schedules=SCHEDULES[::2]), sample,
                 torch.float64)


@pytest.mark.parametrize("sample", SMALL_SAMPLES, ids=lambda s: s.id)
def test_samples_small_caps_in_16_bit(emu, sample):
    """The 16-bit kernels on the paths past the launch caps (grid-stride passes, tile loops,
    split-K partials in float32, many-chunk sums): bfloat16 and float16 by turns."""
    dtype = (torch.bfloat16, torch.float16)[SMALL_SAMPLES.index(sample) % 2]
    check_sample(Emulated(emu, small_caps=True, schedules=SCHEDULES[::2]), sample, dtype)


@all_dtypes
def test_layouts(emu, dtype):
    check_layouts(Emulated(emu), dtype)


@all_dtypes
def test_reductions_with_many_chunks_and_splits(emu, dtype):
    """Every backward op and reduction, bitwise equal across schedules (deterministic), and the
    CPU kernels' results, with small caps (many chunks, splits, passes) and without."""
    for small in (False, True):
        target = Emulated(emu, small_caps=small, schedules=SCHEDULES[:2])
        for name, args in reduction_calls(dtype, scale=0.02):
            parity(target, name, *args, dtype=dtype, what=f"{target.name} {name}")


def test_every_launch_site_runs(emu):
    """Every kernel launch written in csrc/cuda runs on the samples and the reductions, with the
    CUDA build's caps or small ones: no launcher, kernel variant or path is left untried."""
    written = set()
    for name in sorted(os.listdir(lane.CUDA_SRC)):
        if name.endswith((".cu", ".cuh")):
            with open(os.path.join(lane.CUDA_SRC, name)) as f:
                written |= {f"{name}:{kernel}" for kernel in rewrite.launch_sites(f.read())}
    assert len(written) > 20, written
    emu.reset_stats()
    for small in (False, True):
        target = Emulated(emu, small_caps=small, schedules=SCHEDULES[:1])
        for sample in NON_ERROR_SAMPLES:
            check_sample(target, sample, torch.float64)
        for name, args in reduction_calls(torch.float64, scale=0.02):
            parity(target, name, *args)
    ran = set(emu.launch_sites())
    assert ran <= written, sorted(ran - written)
    assert not written - ran, f"never launched: {sorted(written - ran)}"


# ---- random geometries --------------------------------------------------------------------------

RANDOM_CASES = 6  # per op and run; the seed comes from the test id (tests/conftest.py)


def _small(case):
    return not case.expect_error and sum(
        fuzz_configs.numel(spec.shape) for _, spec in case.tensors()) <= 20_000


@pytest.mark.parametrize("op", sorted(fuzz_configs.OPS))
def test_random_geometries(emu, op, request):
    """Fresh draws of every option of each op (tests/fuzz_configs.py, seeded from the test id:
    tests/conftest.py), small caps on."""
    rng = random.Random(request.node.pyengine_seed)
    target = Emulated(emu, small_caps=True, schedules=SCHEDULES[::2])
    for i in range(RANDOM_CASES):
        case = fuzz_configs.build(op, fuzz_configs.draw(op, rng, accept=_small), rng.randrange(2**31))
        for c in samples.op_calls(case):
            with torch.no_grad():
                parity(target, c.name, *c.args, dtype=case.dtype, what=f"{c.name} of {case}")


# ---- pooling windows without an input element ----------------------------------------------------

@dtypes
def test_max_pool2d_windows_without_an_input_element(emu, dtype):
    """Padding and dilation can make a window that holds no in-bounds element (its output is
    -inf). Its gradient goes nowhere, on CUDA as on the CPU and in torch, for the indices the
    forward gives and for user-supplied ones."""
    target = Emulated(emu)
    # kernel 2, dilation 3, padding 1, stride 3 on a 4-wide input: windows start at -1, 2, 5:
    # the last one's taps are 5 and 8, both outside the input (ceil_mode keeps it).
    x = torch.randn(2, 3, 4, 4, dtype=dtype)
    pool = ([2, 2], [3, 3], [1, 1], [3, 3], True)
    (out, idx), _ = parity(target, "max_pool2d_with_indices", x, *pool, dtype=dtype)
    assert out.shape[-1] == 2 or bool(torch.isinf(out).any()), out
    g = torch.randn(out.shape, dtype=dtype)
    expected, _ = parity(target, "max_pool2d_backward", g, x, idx, *pool, dtype=dtype)
    reference = torch.nn.functional.max_pool2d(x.requires_grad_(), *pool[:4], ceil_mode=True)
    torch.testing.assert_close(out, reference.detach())
    # User-supplied indices: every in-plane element for every window.
    for flat in range(16):
        user = torch.full_like(idx, flat)
        parity(target, "max_pool2d_backward", g, x.detach(), user, *pool, dtype=dtype,
               what=f"max_pool2d_backward with every index {flat}")


# ---- where torch's CUDA loss differs from its CPU loss -----------------------------------------

@dtypes
def test_cross_entropy_of_an_unbatched_ignored_target(emu, dtype):
    """torch's CUDA cross_entropy of an unbatched input whose target is ignore_index is 0 ('mean',
    no smoothing; its 1-d kernel), where its CPU loss, every batch and a smoothed loss are 0 / 0 =
    NaN: pyengine's CUDA kernels give what torch's CUDA kernels give. The gradient is 0."""
    target = Emulated(emu)
    ce, ce_backward = target.op("cross_entropy"), target.op("cross_entropy_backward")
    x, w = torch.randn(5, dtype=dtype), torch.rand(5, dtype=dtype) + 0.1
    ignored = torch.tensor(-100)
    for weight in (None, w):
        assert ce(x, ignored, weight, 1, -100, 0.0).item() == 0
        assert torch.ops.pyengine.cross_entropy(x, ignored, weight, 1, -100, 0.0).isnan()
        assert ce(x, ignored, weight, 1, -100, 0.1).isnan()            # smoothed
        assert ce(x[None], ignored[None], weight, 1, -100, 0.0).isnan()  # a batch of one
        assert ce(x, ignored, weight, 2, -100, 0.0).item() == 0          # 'sum'
        grad = ce_backward(torch.tensor(1.0, dtype=dtype), x, ignored, weight, 1, -100, 0.0)
        assert torch.equal(grad, torch.zeros_like(x))
        # a target that is not ignored: the CPU's value
        parity(target, "cross_entropy", x, torch.tensor(2), weight, 1, -100, 0.0, dtype=dtype)


# ---- device-side asserts -------------------------------------------------------------------------

@pytest.mark.parametrize("case", list(DEVICE_ASSERT_CASES))
def test_device_assert_names_the_bad_argument(emu, case, capfd):
    """The kernel prints torch's message and fails; the error is sticky (later launches fail
    too) until the device is reset, as a CUDA context is after a device-side assert."""
    code, message = DEVICE_ASSERT_CASES[case]
    emu.reset_device()
    with pytest.raises(RuntimeError, match="device-side assert") as info:
        exec(code, dict(torch=torch, P=torch.ops.pyengine_emu, dev="cpu"))
        # The launch may have returned before the error was seen (it is asynchronous on a GPU):
        # the next launch reports it.
        torch.ops.pyengine_emu.relu(torch.randn(3))
    printed = capfd.readouterr()
    assert message in printed.out + printed.err + str(info.value)
    assert emu.sticky_error() != 0
    with pytest.raises(RuntimeError, match="device-side assert"):
        torch.ops.pyengine_emu.relu(torch.randn(3))  # sticky: every later launch fails too
    emu.reset_device()
    torch.ops.pyengine_emu.relu(torch.randn(3))
