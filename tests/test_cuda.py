"""pyengine's CUDA kernels against its CPU kernels (skipped without a GPU).

* parity: every operator call of every sample (tests/samples.py: the forward op, and the backward
  ops autograd calls), float32 and float64, CUDA against CPU, the arguments in the same layouts on
  both (strided, transposed, channels_last, expanded, offset), output strides included;
  channels_last and transposed arguments once more by hand;
* determinism: every backward op (and every reduction) gives bitwise equal results twice, at sizes
  that exercise split-K, multi-chunk reductions and overlapping pooling windows;
* a LeNet training step captured in a CUDA graph replays bitwise equal to eager (capture would
  also fail on any host synchronisation inside an op), and so does every operator's forward and
  backward pass, each captured on its own (torch.cuda.CUDAGraph) and replayed on new values;
* tensors past 2^31 elements through relu and max_pool2d (slow; ~9-26 GB of GPU memory);
* bad calls raise the CPU kernels' errors on CUDA too; data-dependent errors (binary cross
  entropy's domain, cross_entropy's targets) are device-side asserts naming the argument.

The sample-driven tests (tests/test_samples.py: against torch, gradcheck) and the per-op test
files run on every device, CUDA included; this file does not repeat them.
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fuzz_configs
import pyengine.functional as PF
import samples
from differential import call
from fuzz_configs import materialize
from helpers import FLOAT_DTYPES, SUPPORTED_DTYPES_TEXT
from parity import (DEVICE_ASSERT_CASES, GpuTarget, assert_bitwise_equal, check_layouts,
                    check_sample, parity, reduction_calls)

P = torch.ops.pyengine
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _built_with_cuda():
    import pyengine

    return bool(getattr(pyengine._C, "built_with_cuda", False))


pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(torch.cuda.is_available() and not _built_with_cuda(),
                       reason="pyengine was built without its CUDA kernels (no nvcc at build "
                       "time)"),
]

dtypes = pytest.mark.parametrize("dtype", FLOAT_DTYPES)


GPU = GpuTarget()


# ---- every operator on its samples, layouts, determinism (tests/parity.py: the emulation lane
# runs the same checks) --------------------------------------------------------------------------

@dtypes
@pytest.mark.parametrize("sample", [s for s in samples.all_samples() if not s.case.expect_error],
                         ids=lambda s: s.id)
def test_parity(sample, dtype):
    check_sample(GPU, sample, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("sample", [s for s in samples.all_samples(large=False)
                                    if not s.case.expect_error], ids=lambda s: s.id)
def test_parity_in_16_bit(sample, dtype):
    """bfloat16 / float16 on the GPU (the kernels' own 16-bit code: __half / __nv_bfloat16
    memory, float32 arithmetic, one rounding per result) against the CPU."""
    check_sample(GPU, sample, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("op", sorted(fuzz_configs.OPS))
def test_autocast_policy_on_cuda(op, dtype):
    """Under torch.autocast("cuda") each operator's result has its torch twin's dtype
    (csrc/autocast.cpp's CUDA column: softmax / log_softmax and the losses in float32, conv2d and
    linear in the autocast dtype), with values that agree to that dtype; binary_cross_entropy is
    refused with torch's advice, as torch's is."""
    case = next(s.case for s in samples.samples(op) if not s.large and not s.case.expect_error
                and not samples.has_special_values(s)
                and all(fuzz_configs.numel(t.shape) > 0 for _, t in s.case.tensors()))
    args, kwargs = materialize(case, device="cuda")
    ours_fn, torch_fn = fuzz_configs.pyengine_function(op), fuzz_configs.torch_function(op)
    with torch.autocast("cuda", dtype=dtype):
        if op == "binary_cross_entropy":
            for fn in (ours_fn, torch_fn):
                with pytest.raises(RuntimeError, match="unsafe to autocast"):
                    call(fn, args, kwargs)
            return
        ours, theirs = call(ours_fn, args, kwargs), call(torch_fn, args, kwargs)
    ours = (ours[0] if isinstance(ours, tuple) else ours).detach()
    theirs = (theirs[0] if isinstance(theirs, tuple) else theirs).detach()
    assert ours.dtype == theirs.dtype, (op, ours.dtype, theirs.dtype)
    eps = torch.finfo(theirs.dtype).eps
    torch.testing.assert_close(ours.double(), theirs.double(), rtol=8 * eps,
                               atol=8 * eps * max(1.0, float(theirs.abs().max())),
                               equal_nan=True)


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
def test_layout_parity(dtype):
    check_layouts(GPU, dtype)


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
def test_backward_ops_and_reductions_are_deterministic(dtype):
    """Bitwise equal results twice, at sizes that take split-K, multi-chunk reductions and
    overlapping pooling windows; and the CPU kernels' results."""
    for name, args in reduction_calls(dtype):
        op = getattr(P, name)
        first, second = op(*GPU.to(args)), op(*GPU.to(args))
        torch.cuda.synchronize()
        assert_bitwise_equal(first, second, f"{name} gave different results on two runs")
        parity(GPU, name, *args, dtype=dtype)


# ---- CUDA graphs --------------------------------------------------------------------------------

def _captured(step, leaves):
    """step() captured in a CUDA graph after three warm-up runs off the capture stream, as
    torch's docs do, the gradients of `leaves` cleared before each run (so that the graph writes
    them); returns (the graph, what step returned while captured). The capture raises if any op
    synchronises with the host."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            for t in leaves:
                t.grad = None
            step()
    torch.cuda.current_stream().wait_stream(side)
    for t in leaves:
        t.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    return graph, out


def test_lenet_training_step_in_a_cuda_graph_replays_like_eager():
    from pyengine.models import LeNet  # the tutorial network (pyengine/models.py)

    model = LeNet().cuda()
    params = list(model.parameters())
    x = torch.randn(64, 1, 32, 32, device="cuda")
    y = torch.randint(0, 10, (64,), device="cuda")

    def step():
        loss = PF.cross_entropy(model(x), y)
        loss.backward()
        return loss

    graph, static_loss = _captured(step, params)
    static_grads = [p.grad for p in params]

    for _ in range(2):
        x.copy_(torch.randn_like(x))
        y.copy_(torch.randint_like(y, 10))
        graph.replay()
        for p in params:
            p.grad = None
        eager_loss = step()
        torch.cuda.synchronize()
        assert torch.equal(static_loss, eager_loss)
        for p, static in zip(params, static_grads):
            assert torch.equal(static, p.grad)


def _graphable_sample(op):
    """op's largest sample whose tensors can be a graph's static inputs, refilled in place before
    each replay (the large ones take the kernels' workspaces, split-K and multi-block
    reductions): no error expected, no NaN / inf, no stride-0 (expanded) tensor (copy_ cannot
    write one), none empty, and something to differentiate."""
    def usable(sample):
        specs = [spec for _, spec in sample.case.tensors()]
        return (not sample.case.expect_error and not samples.has_special_values(sample)
                and all(s.layout != "expanded" and fuzz_configs.numel(s.shape) > 0 for s in specs)
                and any(s.grad for s in specs))

    def size(sample):
        return sum(fuzz_configs.numel(spec.shape) for _, spec in sample.case.tensors())

    return max(filter(usable, samples.samples(op)), key=size)


def _tensors(args, kwargs):
    return [t for t in list(args) + list(kwargs.values()) if isinstance(t, torch.Tensor)]


def _outputs(out):
    return list(out) if isinstance(out, tuple) else [out]


@pytest.mark.parametrize("op", PF.__all__)
def test_each_op_forward_and_backward_in_a_cuda_graph_replays_like_eager(op):
    """pyengine.functional.<op> and the backward pass autograd runs for it, captured in one
    torch.cuda.CUDAGraph (capture raises on any host synchronisation, and every allocation
    must come from torch's caching allocator), then replayed twice on new inputs and a new
    grad_output: outputs and gradients bitwise equal to the same call run eagerly. In float32
    and float64 (where the sample allows both)."""
    fn = getattr(PF, op)
    for case in samples.in_both_dtypes(_graphable_sample(op)):
        static_args, static_kwargs = materialize(case, device="cuda")
        static_inputs = _tensors(static_args, static_kwargs)
        leaves = [t for t in static_inputs if t.requires_grad]
        with torch.no_grad():
            shape = _outputs(call(fn, static_args, static_kwargs))[0].shape
        static_grad_output = torch.randn(shape, dtype=case.dtype, device="cuda")

        def step():
            out = call(fn, static_args, static_kwargs)
            _outputs(out)[0].backward(static_grad_output)
            return out

        graph, static_out = _captured(step, leaves)
        static_out = _outputs(static_out)
        static_grads = [t.grad for t in leaves]

        for round in range(2):
            gen = torch.Generator().manual_seed(case.seed + 1 + round)
            args, kwargs = materialize(case, gen, "cuda")  # new values, same layouts
            grad_output = torch.randn(shape, generator=gen, dtype=case.dtype).cuda()
            with torch.no_grad():
                for static, new in zip(static_inputs, _tensors(args, kwargs)):
                    static.copy_(new)
                static_grad_output.copy_(grad_output)
            graph.replay()
            eager_out = _outputs(call(fn, args, kwargs))
            eager_out[0].backward(grad_output)
            torch.cuda.synchronize()
            what = f"{op} {case.dtype}, replay {round + 1}"
            for static, eager in zip(static_out, eager_out):
                assert_bitwise_equal(static, eager, f"{what}: output")
            eager_grads = [t.grad for t in _tensors(args, kwargs) if t.requires_grad]
            assert len(eager_grads) == len(static_grads) > 0
            for static, eager in zip(static_grads, eager_grads):
                assert_bitwise_equal(static, eager, f"{what}: gradient")


# ---- tensors past 2^31 elements -----------------------------------------------------------------

def _need_memory(gb):
    total = torch.cuda.get_device_properties(0).total_memory / 2**30
    if total < gb:
        pytest.skip(f"needs ~{gb} GiB of GPU memory, the device has {total:.0f}")


@pytest.mark.slow
def test_relu_past_2_pow_31_elements():
    _need_memory(24)
    n = 2**31 + 1000
    x = torch.full((n,), -1.0, device="cuda")
    picks = {5: 4.0, 2**31 - 1: 1.5, 2**31 + 7: 3.0, n - 1: 2.0}
    for i, v in picks.items():
        x[i] = v
    y = P.relu(x)
    for i, v in picks.items():
        assert float(y[i]) == v
    assert float(y[2**31]) == 0.0 and float(y[0]) == 0.0
    assert int(torch.count_nonzero(y)) == len(picks)
    del x, y
    torch.cuda.empty_cache()


@pytest.mark.slow
def test_max_pool2d_past_2_pow_31_elements():
    _need_memory(40)
    side = 46341  # one plane of 46341^2 = 2^31 + 4633 elements: flat indices pass 2^31 too
    x = torch.zeros(1, 1, side, side, device="cuda")
    x[0, 0, side - 1, side - 1] = 5.0
    x[0, 0, 0, 1] = 3.0
    x[0, 0, 30001, 20000] = 7.0
    out, idx = P.max_pool2d_with_indices(x, [2, 2], [2, 2], [0, 0], [1, 1], True)
    assert out.shape == (1, 1, 23171, 23171)
    expect = {(23170, 23170): (5.0, (side - 1) * side + side - 1),
              (0, 0): (3.0, 1),
              (15000, 10000): (7.0, 30001 * side + 20000),
              (100, 200): (0.0, 200 * side + 400)}  # all zeros: the window's first element wins
    for (oh, ow), (value, index) in expect.items():
        assert float(out[0, 0, oh, ow]) == value
        assert int(idx[0, 0, oh, ow]) == index
    assert int(torch.count_nonzero(out)) == 3
    grad = P.max_pool2d_backward(torch.ones_like(out), x, idx, [2, 2], [2, 2], [0, 0], [1, 1],
                                 True)
    del x
    for (r, c), v in {(side - 1, side - 1): 1.0, (30001, 20000): 1.0, (30000, 20000): 0.0,
                      (200, 400): 1.0, (200, 401): 0.0, (0, 1): 1.0, (0, 0): 0.0}.items():
        assert float(grad[0, 0, r, c]) == v
    assert int(torch.count_nonzero(grad)) == out.numel()
    del out, idx, grad
    torch.cuda.empty_cache()


# ---- errors -------------------------------------------------------------------------------------

def _bad_calls():
    f, d = torch.float32, torch.float64
    r = lambda *s, dtype=f: torch.randn(*s, dtype=dtype)
    conv = lambda x, w, b=None, groups=1: P.conv2d(x, w, b, [1, 1], [0, 0], [1, 1], groups)
    pool = lambda x, k=(2, 2), p=(0, 0): P.max_pool2d(x, list(k), [2, 2], list(p), [1, 1], False)
    return {
        "conv2d rank": (lambda: conv(r(3, 5), r(4, 3, 1, 1)), RuntimeError, "3-D (C, H, W)"),
        "conv2d channels": (lambda: conv(r(1, 3, 5, 5), r(4, 2, 1, 1)), RuntimeError, "channels"),
        "conv2d groups": (lambda: conv(r(1, 4, 5, 5), r(3, 2, 1, 1), groups=2), RuntimeError,
                          "divisible by groups"),
        "conv2d int input": (lambda: conv(torch.ones(1, 1, 3, 3, dtype=torch.long),
                                          r(1, 1, 1, 1)),
                             NotImplementedError, SUPPORTED_DTYPES_TEXT),
        "conv2d dtypes": (lambda: conv(r(1, 1, 3, 3), r(1, 1, 1, 1, dtype=d)), RuntimeError,
                          "same dtype"),
        "conv2d kernel": (lambda: conv(r(1, 1, 3, 3), r(1, 1, 5, 5)), RuntimeError, "fit"),
        "conv2d bias": (lambda: conv(r(1, 1, 3, 3), r(2, 1, 1, 1), r(3)), RuntimeError, "bias"),
        "conv2d_backward grad": (lambda: P.conv2d_backward(r(1, 2, 3, 4), r(1, 1, 3, 3),
                                                           r(2, 1, 1, 1), [1, 1], [0, 0], [1, 1],
                                                           1, [True, True, True]),
                                 RuntimeError, "grad_output"),
        "max_pool2d rank": (lambda: pool(r(4, 4)), RuntimeError, "3-D (C, H, W)"),
        "max_pool2d padding": (lambda: pool(r(1, 1, 4, 4), p=(2, 2)), RuntimeError, "padding"),
        "max_pool2d kernel": (lambda: pool(r(1, 1, 1, 1), k=(3, 3)), RuntimeError, "fit"),
        "max_pool2d int": (lambda: pool(torch.ones(1, 1, 4, 4, dtype=torch.int32)),
                           NotImplementedError,
                           SUPPORTED_DTYPES_TEXT),
        "max_pool2d_backward indices": (
            lambda: P.max_pool2d_backward(r(1, 1, 2, 2), r(1, 1, 4, 4),
                                          torch.zeros(1, 1, 2, 2, dtype=torch.int32), [2, 2],
                                          [2, 2], [0, 0], [1, 1], False),
            RuntimeError, "int64"),
        "linear features": (lambda: P.linear(r(2, 3), r(4, 5), None), RuntimeError, "in_features"),
        "linear bias": (lambda: P.linear(r(2, 3), r(4, 3), r(5)), RuntimeError, "bias"),
        "linear weight rank": (lambda: P.linear(r(2, 3), r(3), None), RuntimeError, "2-D"),
        "relu int": (lambda: P.relu(torch.arange(3)), NotImplementedError, SUPPORTED_DTYPES_TEXT),
        "relu_backward shape": (lambda: P.relu_backward(r(3), r(4)), RuntimeError, "same shape"),
        "softmax dim": (lambda: P.softmax(r(3), 2), IndexError, "dim out of range"),
        "log_softmax int": (lambda: P.log_softmax(torch.arange(3), 0), NotImplementedError,
                            SUPPORTED_DTYPES_TEXT),
        "mse_loss shape": (lambda: P.mse_loss(r(3), r(4), None, 1), RuntimeError, "same shape"),
        "mse_loss reduction": (lambda: P.mse_loss(r(3), r(3), None, 3), RuntimeError, "reduction"),
        "bce weight": (lambda: P.binary_cross_entropy(r(3).sigmoid(), r(3).sigmoid(), r(2), 1),
                       RuntimeError, "weight"),
        "cross_entropy target dtype": (lambda: P.cross_entropy(r(2, 3), r(2), None, 1, -100),
                                       RuntimeError, "int64"),
        "cross_entropy target shape": (
            lambda: P.cross_entropy(r(2, 3), torch.zeros(3, dtype=torch.long), None, 1, -100),
            ValueError, "target"),
        "cross_entropy rank": (
            lambda: P.cross_entropy(r(2, 3, 4), torch.zeros(2, dtype=torch.long), None, 1, -100),
            RuntimeError, "1-D (C) or 2-D (N, C)"),
        "cross_entropy weight": (
            lambda: P.cross_entropy(r(2, 3), torch.zeros(2, dtype=torch.long), r(4), 1, -100),
            RuntimeError, "weight"),
    }


def _on_cuda(fn):
    """fn with every tensor factory call landing on the GPU."""
    def run():
        with torch.device("cuda"):
            return fn()
    return run


@pytest.mark.parametrize("case", list(_bad_calls()))
def test_bad_calls_raise_the_cpu_errors_on_cuda(case):
    fn, exc_type, fragment = _bad_calls()[case]
    with pytest.raises(exc_type) as on_cpu:
        fn()
    with pytest.raises(exc_type) as on_cuda:
        _on_cuda(fn)()
    assert fragment in str(on_cuda.value)
    assert str(on_cuda.value) == str(on_cpu.value)


def test_mixed_devices_raise_clear_errors():
    c, g = torch.randn, lambda *s: torch.randn(*s, device="cuda")
    cases = [
        (lambda: P.conv2d(g(1, 1, 3, 3), c(1, 1, 1, 1), None, [1, 1], [0, 0], [1, 1], 1),
         "expected weight to be on the same device as input"),
        (lambda: P.conv2d(c(1, 1, 3, 3), g(1, 1, 1, 1), None, [1, 1], [0, 0], [1, 1], 1),
         "expected weight to be on the same device as input"),
        (lambda: P.linear(g(2, 3), g(4, 3), c(4)), "expected bias to be on the same device"),
        (lambda: P.cross_entropy(g(2, 3), torch.zeros(2, dtype=torch.long), None, 1, -100),
         "expected target to be on the same device as input"),
        (lambda: P.mse_loss(g(3), c(3), None, 1), "expected target to be on the same device"),
        (lambda: P.relu_backward(g(3), c(3)), "expected result to be on the same device"),
        (lambda: P.max_pool2d_backward(g(1, 1, 2, 2), g(1, 1, 4, 4),
                                       torch.zeros(1, 1, 2, 2, dtype=torch.long), [2, 2], [2, 2],
                                       [0, 0], [1, 1], False), "expected indices on cuda"),
    ]
    for fn, fragment in cases:
        with pytest.raises(RuntimeError, match=fragment):
            fn()


@pytest.mark.parametrize("case", list(DEVICE_ASSERT_CASES))
def test_device_assert_names_the_bad_argument(case):
    """A device-side assert poisons the CUDA context, so each case runs in a process of its own."""
    call, message = DEVICE_ASSERT_CASES[case]
    # (dedented before the call goes in: a call of several lines keeps its own indentation)
    code = textwrap.dedent("""
        import sys
        sys.path.insert(0, {root!r})
        import torch, pyengine
        P, dev = torch.ops.pyengine, "cuda"
        {call}
        torch.cuda.synchronize()
        print("NO ERROR")
    """).format(root=ROOT, call=call)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "NO ERROR" not in out, out[-3000:]
    assert "device-side assert" in out, out[-3000:]
    assert message in out, out[-3000:]
