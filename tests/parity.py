"""pyengine's CUDA kernels against its CPU kernels: the comparison both CUDA lanes make.

A Target is where the CUDA kernels run: the GPU (tests/test_cuda.py), or the emulator on the host
(tests/test_emulated_cuda.py: the same glue and kernels, compiled against tests/cuda_emu, called
as torch.ops.pyengine_emu.* on CPU tensors). parity() runs one operator call on the CPU kernels
and on the target, with the arguments in the same layouts on both, and compares: shapes, dtypes,
strides, and values (bitwise where no rounding happens, else within a few ulps of the largest
magnitude, since the summation orders differ).
"""
import torch

import helpers

# No rounding at all (a comparison, a product by the slope, a max): CUDA must match bitwise.
EXACT = {"relu", "relu_backward", "leaky_relu", "leaky_relu_backward", "max_pool2d",
         "max_pool2d_with_indices"}


def same_layout(value, device=None, dtype=None):
    """value (a tensor, or a list / tuple of them) on `device`, floating tensors in `dtype`, with
    value's very strides and storage offset, also for the layouts .to() would make dense
    (every other element, a stride-0 dim, an offset): the whole storage moves."""
    if isinstance(value, (list, tuple)):
        return type(value)(same_layout(v, device, dtype) for v in value)
    if not isinstance(value, torch.Tensor):
        return value
    t = value.detach()
    storage = t.as_strided((t.untyped_storage().nbytes() // t.element_size(),), (1,), 0)
    moved = storage.to(device=device or t.device,
                       dtype=dtype if dtype is not None and t.is_floating_point() else t.dtype)
    if moved.data_ptr() == storage.data_ptr():
        moved = moved.clone()  # a copy even where nothing moves: the target gets its own inputs
    return moved.as_strided(t.shape, t.stride(), t.storage_offset())


def _flat(result):
    return list(result) if isinstance(result, (list, tuple)) else [result]


def assert_same(actual, expected, dtype, exact=False, what=""):
    """The target's result `actual` (on the CPU) against the CPU kernel's `expected`."""
    if expected is None or actual is None:
        assert actual is None and expected is None, what
        return
    if isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), what
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_same(a, e, dtype, exact, f"{what}[{i}]")
        return
    actual = same_layout(actual, "cpu")
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, what
    # The same strides as the CPU kernel's (torch's layout rules: csrc/common/layout.h).
    assert actual.stride() == expected.stride(), (what, actual.stride(), expected.stride())
    if exact or not expected.is_floating_point():
        assert_bitwise_equal(actual, expected, what)
        return
    # Summation orders differ (CPU SIMD lanes and blocking against GPU tiles and trees), so
    # results agree to a few ulps of the largest accumulated magnitude, not bitwise.
    finite = expected[expected.isfinite()]
    scale = max(1.0, float(finite.abs().max())) if finite.numel() else 1.0
    if dtype in (torch.bfloat16, torch.float16):
        # Both compute in float32 (common/low_precision.h) and round once: float32's agreement,
        # plus one ulp of the 16-bit dtype where the two float32 values round apart.
        tol = dict(rtol=torch.finfo(dtype).eps, atol=2e-5 * scale)
    elif dtype == torch.float32:
        tol = dict(rtol=1e-4, atol=2e-5 * scale)
    else:
        tol = dict(rtol=1e-9, atol=1e-11 * scale)
    torch.testing.assert_close(actual, expected, equal_nan=True, msg=lambda m: f"{what}: {m}",
                               **tol)


def assert_bitwise_equal(a, b, what=""):
    """Same values bit for bit (NaN where the other has NaN; -0.0 and 0.0 told apart)."""
    for x, y in zip(_flat(a), _flat(b)):
        if x is None or y is None:
            assert x is None and y is None, what
            continue
        assert x.shape == y.shape and x.dtype == y.dtype, what
        if x.is_floating_point():
            bits = {torch.float32: torch.int32, torch.float64: torch.int64,
                    torch.bfloat16: torch.int16, torch.float16: torch.int16}[x.dtype]
            same = x.contiguous().view(bits) == y.contiguous().view(bits)
            same |= x.isnan() & y.isnan()  # NaN payloads may differ
            assert bool(same.all()), f"{what}: {int((~same).sum())} of {x.numel()} differ"
        else:
            assert torch.equal(x, y), what


class Target:
    """Where the CUDA kernels run. op(name) is the operator, to(value) moves arguments there
    (layouts kept), synchronize() waits for its work and raises a device-side error it left."""

    name = "?"

    def op(self, name):
        raise NotImplementedError

    def to(self, value):
        raise NotImplementedError

    def synchronize(self):
        raise NotImplementedError


class GpuTarget(Target):
    name = "cuda"

    def op(self, name):
        return getattr(torch.ops.pyengine, name)

    def to(self, value):
        return same_layout(value, "cuda")

    def synchronize(self):
        torch.cuda.synchronize()


def as_on_cuda(name, args, result):
    """The CPU operator's result as the CUDA operator gives it, where torch's own kernels differ
    between the two devices (helpers.cross_entropy_differs_on_cuda)."""
    if name in ("cross_entropy", "cross_entropy_with_log_sum_exp"):
        x, t, _, reduction, ignore_index, smoothing = args
        if helpers.cross_entropy_differs_on_cuda(x, t, reduction == 1, ignore_index, smoothing):
            if name == "cross_entropy":
                return torch.zeros_like(result)
            return torch.zeros_like(result[0]), result[1]   # (the log-sum-exps do not differ)
    return result


def parity(target, name, *args, exact=False, dtype=torch.float64, what=""):
    """Runs torch.ops.pyengine.<name> on the CPU and on `target` (arguments moved, layouts kept),
    compares, returns (the CPU result, as_on_cuda, and the target's result on the CPU)."""
    expected = as_on_cuda(name, args, getattr(torch.ops.pyengine, name)(*args))
    actual = target.op(name)(*target.to(args))
    target.synchronize()
    actual = same_layout(actual, "cpu") if not isinstance(actual, (list, tuple)) else \
        type(actual)(same_layout(a, "cpu") if a is not None else None for a in actual)
    assert_same(actual, expected, dtype, exact or name in EXACT, what or name)
    return expected, actual


# ---- the checks both lanes run --------------------------------------------------------------

def check_sample(target, sample, dtype):
    """Each operator call the sample makes (tests/samples.py), its floating tensors in `dtype`, on
    the target against the CPU kernel (under no_grad: each op's own kernel, max_pool2d's too)."""
    import samples

    calls = samples.op_calls(sample.case)
    assert calls, sample
    for c in calls:
        args = samples.with_own_log_sum_exp(c.name, same_layout(c.args, dtype=dtype))
        with torch.no_grad():
            parity(target, c.name, *args, dtype=dtype, what=f"{c.name} of {sample}")


# name: (forward args after the input, backward args after (grad, saved), the backward takes the
# input rather than the result)
ACTIVATIONS = {"relu": ((), (), False), "leaky_relu": ((0.3,), (0.3,), True),
               "sigmoid": ((), (), False), "tanh": ((), (), False)}


def check_layouts(target, dtype):
    """channels_last and transposed arguments: the target's ops return the CPU ops' strides
    (which tests/test_layout.py holds to torch's)."""
    cl = torch.channels_last
    x = torch.randn(2, 4, 9, 9, dtype=dtype).to(memory_format=cl)
    w = torch.randn(6, 4, 3, 3, dtype=dtype)
    win = ([1, 1], [1, 1], [1, 1], 1)
    for ww in (w, w.to(memory_format=cl)):
        y, _ = parity(target, "conv2d", x, ww, None, *win, dtype=dtype)
        parity(target, "conv2d", x[0], ww, None, *win, dtype=dtype, what="conv2d unbatched")
        parity(target, "conv2d_backward", torch.randn(y.shape, dtype=dtype), x, ww, *win,
               [True, True, True], dtype=dtype)
    pool = ([3, 3], [2, 2], [1, 1], [1, 1], True)
    (out, idx), _ = parity(target, "max_pool2d_with_indices", x, *pool, dtype=dtype)
    parity(target, "max_pool2d_backward", torch.randn(out.shape, dtype=dtype), x, idx, *pool,
           dtype=dtype)
    xt = torch.randn(7, 5, dtype=dtype).t()
    for name, (fwd_args, bwd_args, from_input) in ACTIVATIONS.items():
        for inp, g in ((x, torch.randn(x.shape, dtype=dtype)),
                       (xt, torch.randn(xt.shape, dtype=dtype)),
                       (xt, torch.randn(xt.shape, dtype=dtype).t().contiguous().t())):
            y, _ = parity(target, name, inp, *fwd_args, dtype=dtype)
            parity(target, name + "_backward", g, inp if from_input else y, *bwd_args,
                   dtype=dtype)
    wt = torch.randn(7, 6, dtype=dtype).t()  # a (6, 7) weight, column-major like xt
    parity(target, "linear_backward", torch.randn(5, 6, dtype=dtype), xt, wt, [True, True, True],
           dtype=dtype, what="linear_backward, column-major operands")
    t = torch.rand(x.shape, dtype=dtype)
    p = torch.rand(x.shape, dtype=dtype).to(memory_format=cl)
    for loss in ("mse_loss", "binary_cross_entropy"):
        out, _ = parity(target, loss, p, t, None, 0, dtype=dtype)
        parity(target, loss + "_backward", torch.randn(out.shape, dtype=dtype), p, t, None, 0,
               dtype=dtype)


def reduction_calls(dtype, scale=1):
    """(name, args) of every backward op and reduction at sizes that take split-K, multi-chunk
    reductions and overlapping pooling windows on a GPU (scale < 1 shrinks them for the
    emulator, whose small launch caps take those paths at small sizes). CPU tensors."""
    s = lambda n: max(2, int(n * scale))
    r = lambda *shape: torch.randn(*shape, dtype=dtype)
    calls = []
    x, w = r(s(64), 3, 32, 32), r(8, 3, 5, 5)
    calls.append(("conv2d_backward", (r(x.shape[0], 8, 28, 28), x, w, [1, 1], [0, 0], [1, 1], 1,
                                      [True, True, True])))
    x, w = r(s(5000), 64), r(32, 64)
    calls.append(("linear_backward", (r(x.shape[0], 32), x, w, [True, True, True])))
    x = r(s(8), 4, 33, 33)
    out, idx = torch.ops.pyengine.max_pool2d_with_indices(x, [3, 3], [1, 1], [1, 1], [1, 1],
                                                          False)
    calls.append(("max_pool2d_backward", (torch.randn_like(out), x, idx, [3, 3], [1, 1], [1, 1],
                                          [1, 1], False)))
    for dim in (0, 1):
        y = torch.ops.pyengine.softmax(r(s(300), 1000), dim)
        calls.append(("softmax_backward", (torch.randn_like(y), y, dim)))
        calls.append(("log_softmax_backward", (torch.randn_like(y), y.log(), dim)))
    n = s(100_003)
    x, t, w = (torch.rand(n, dtype=dtype) for _ in range(3))
    one = torch.tensor(1.0, dtype=dtype)
    for reduction in (1, 2):
        calls += [("mse_loss", (x, t, w, reduction)),
                  ("binary_cross_entropy", (x, t, w, reduction)),
                  ("mse_loss_backward", (one, x, t, w, reduction)),
                  ("binary_cross_entropy_backward", (one, x, t, w, reduction)),
                  ("binary_cross_entropy_target_backward", (one, x, t, w, reduction))]
    rows = s(10_000)
    x, t, cw = r(rows, 10), torch.randint(0, 10, (rows,)), torch.rand(10, dtype=dtype)
    probs = torch.rand(rows, 10, dtype=dtype)
    for reduction in (1, 2):
        # class indices, with label smoothing, class probabilities (smoothed)
        for target, smoothing in ((t, 0.0), (t, 0.1), (probs, 0.1)):
            calls += [("cross_entropy", (x, target, cw, reduction, -100, smoothing)),
                      ("cross_entropy_backward", (one, x, target, cw, reduction, -100,
                                                  smoothing))]
    return calls


# A device-side assert, per case: Python that makes the bad call with `P` (the operators) and
# `dev` (the device) in scope, and the message the kernel must print.
DEVICE_ASSERT_CASES = {
    "bce_input": ("p = torch.rand(100, device=dev); p[42] = 1.5\n"
                  "P.binary_cross_entropy(p, torch.rand(100, device=dev), None, 1)",
                  "pyengine.binary_cross_entropy: all elements of input should be between 0 and 1"
                  ", but got input element 1.5 at flat index 42"),
    "bce_target": ("t = torch.rand(100, device=dev); t[7] = -0.5\n"
                   "P.binary_cross_entropy(torch.rand(100, device=dev), t, None, 0)",
                   "all elements of target should be between 0 and 1"),
    "cross_entropy_target": ("P.cross_entropy(torch.randn(4, 3, device=dev), "
                             "torch.tensor([0, 1, 5, 2], device=dev), None, 1, -100)",
                             "pyengine.cross_entropy: target 5 is out of bounds: expected target "
                             "values in [0, 3) or ignore_index=-100, but got target[2] = 5"),
    "max_pool2d_backward_index": (
        "x = torch.randn(1, 2, 4, 4, device=dev)\n"
        "out, idx = P.max_pool2d_with_indices(x, [2, 2], [2, 2], [0, 0], [1, 1], False)\n"
        "idx[0, 1, 1, 0] = 16\n"
        "P.max_pool2d_backward(torch.ones_like(out), x, idx, [2, 2], [2, 2], [0, 0], [1, 1], "
        "False)",
        "pyengine.max_pool2d_backward: the index of output [1, 0] of plane 1 (n * C + c) is 16, "
        "outside the 4x4 input plane"),
    "cross_entropy_backward_target": (
        "P.cross_entropy_backward(torch.tensor(1.0, device=dev), torch.randn(4, 3, "
        "device=dev), torch.tensor([0, -1, 1, 2], device=dev), None, 1, -100)",
        "pyengine.cross_entropy_backward: target -1 is out of bounds"),
}
