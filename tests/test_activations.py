"""torch.ops.pyengine.{relu, leaky_relu, sigmoid, tanh} and their backward ops against torch's:
layouts, special values, the backward ops against torch's backward kernels, bad input. Random
shapes against torch, gradcheck and opcheck: tests/test_samples.py and test_fuzz.py."""
import random

import pytest
import torch
import torch.nn.functional as F

import pyengine.functional

import helpers
from fuzz_configs import SLOPES, draw_shape
from helpers import devices, dtypes
from helpers import SUPPORTED_DTYPES_TEXT

P = torch.ops.pyengine


def activation(name, slope=0.01):
    """(ours, theirs, backward op, saved tensor for the backward op, extra args) of one op."""
    if name == "relu":
        return P.relu, torch.relu, P.relu_backward, "result", ()
    if name == "leaky_relu":
        return (lambda x: P.leaky_relu(x, slope), lambda x: F.leaky_relu(x, slope),
                P.leaky_relu_backward, "input", (slope,))
    if name == "sigmoid":
        return P.sigmoid, torch.sigmoid, P.sigmoid_backward, "result", ()
    return P.tanh, torch.tanh, P.tanh_backward, "result", ()


# every op, leaky_relu once per slope
CASES = [("relu", None), ("sigmoid", None), ("tanh", None)] + [("leaky_relu", s) for s in SLOPES]
cases = pytest.mark.parametrize("name,slope", CASES,
                                ids=[n if s is None else f"{n}{s}" for n, s in CASES])


def shapes(count=8):
    """A 0-d, an empty and a single-element shape, then random ones (fuzz_configs' shapes, from
    the test's seed)."""
    rng = random.Random(torch.initial_seed())
    return [(), (0,), (3, 0, 2), (1,)] + [draw_shape(rng) for _ in range(count - 4)]


@devices
@dtypes
@cases
def test_noncontiguous(device, dtype, name, slope):
    ours, theirs, *_ = activation(name, slope)
    x = torch.randn(6, 7, dtype=dtype, device=device)
    for strided in (helpers.noncontiguous(x), x.t().contiguous().t(), x[:, 1::3]):
        assert not strided.is_contiguous()
        out = ours(strided)
        helpers.assert_same_strides(out, theirs(strided))  # transposed in, transposed out
        helpers.assert_close(out, ours(strided.contiguous()), rtol=0, atol=0)
        helpers.compare_with_torch(ours, theirs, [strided.clone().requires_grad_()], dtype)


def special_values(dtype, device):
    big = 1e300 if dtype == torch.float64 else 1e30
    vals = [float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e-30, -1e-30, 20.0, -20.0,
            100.0, -100.0, 1e4, -1e4, big, -big]
    return torch.tensor(vals, dtype=dtype, device=device)


@devices
@dtypes
@cases
def test_special_values(device, dtype, name, slope):
    ours, theirs, *_ = activation(name, slope)
    x = special_values(dtype, device)
    # (compare_with_torch checks NaN positions too: leaky_relu(-inf) with slope 0 is NaN there)
    out = helpers.compare_with_torch(ours, theirs, [x.requires_grad_()], dtype)
    assert torch.isnan(out[torch.isnan(x.detach())]).all()  # NaN propagates


@devices
@dtypes
def test_sigmoid_large_magnitudes_do_not_overflow(device, dtype):
    x = torch.tensor([100.0, -100.0, 1e4, -1e4, 88.8, -88.8, 710.0, -710.0], dtype=dtype,
                     device=device, requires_grad=True)
    y = P.sigmoid(x)
    assert torch.isfinite(y).all() and (y >= 0).all() and (y <= 1).all()
    assert y[0] == 1 and y[2] == 1 and y[3] == 0 and 0 <= y[1] < 1e-40
    (g,) = torch.autograd.grad(y.sum(), x)
    assert torch.isfinite(g).all()
    helpers.assert_close(y, torch.sigmoid(x))


@devices
def test_relu_gradient_at_nan_matches_torch(device):
    # torch's threshold_backward (result <= 0 ? 0 : grad) passes the gradient through at NaN.
    x = torch.tensor([float("nan"), 1.0, -1.0], device=device, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    P.relu(x).sum().backward()
    torch.relu(x2).sum().backward()
    helpers.assert_close(x.grad, x2.grad)


def backward_sample(name, slope, dtype, device, shape=(4, 5)):
    """(backward op, its arguments) for a random forward input."""
    ours, _, bwd, saved, extra = activation(name, slope)
    x = torch.randn(shape, dtype=dtype, device=device)
    g = torch.randn(shape, dtype=dtype, device=device)
    return bwd, [g, x if saved == "input" else ours(x), *extra]


def torch_backward(name, g, saved, slope):
    """torch's own backward kernels, called directly."""
    if name == "relu":
        return torch.ops.aten.threshold_backward(g, saved, 0)
    if name == "leaky_relu":
        return torch.ops.aten.leaky_relu_backward(g, saved, slope, False)
    if name == "sigmoid":
        return torch.ops.aten.sigmoid_backward(g, saved)
    return torch.ops.aten.tanh_backward(g, saved)


@devices
@dtypes
@cases
def test_backward_ops_directly(device, dtype, name, slope):
    for shape in shapes(5):
        bwd, (g, saved, *extra) = backward_sample(name, slope, dtype, device, shape)
        expected = torch_backward(name, g, saved, slope)
        out = bwd(g, saved, *extra)
        assert out.shape == g.shape and out.is_contiguous()
        helpers.assert_close(out, expected)
        if g.dim() >= 1 and g.numel() > 1:  # strided arguments
            helpers.assert_close(
                bwd(helpers.noncontiguous(g), helpers.noncontiguous(saved), *extra), expected)


# ---- Bad input ------------------------------------------------------------------------------

@devices
@cases
@pytest.mark.parametrize("int_dtype", [torch.int64, torch.int32, torch.bool])
def test_integer_input(device, name, slope, int_dtype):
    ours, *_ = activation(name, slope)
    x = torch.ones(3, 4, dtype=int_dtype, device=device)
    dtype_name = {torch.int64: "Long", torch.int32: "Int", torch.bool: "Bool"}[int_dtype]
    with helpers.raises(NotImplementedError, f"pyengine.{name}", "input", SUPPORTED_DTYPES_TEXT,
                        f"dtype {dtype_name}"):
        ours(x)


@devices
@cases
def test_backward_bad_arguments(device, name, slope):
    bwd, (g, saved, *extra) = backward_sample(name, slope, torch.float32, device)
    saved_arg = "input" if name == "leaky_relu" else "result"
    op = f"{name}_backward"
    with helpers.raises(RuntimeError, op, saved_arg, "same shape", "[4, 5]", "[5, 4]"):
        bwd(g, saved.t().contiguous(), *extra)
    with helpers.raises(RuntimeError, op, saved_arg, "same shape", "[4, 5]", "[20]"):
        bwd(g, saved.reshape(20), *extra)
    with helpers.raises(RuntimeError, op, saved_arg, "same dtype", "Double"):
        bwd(g, saved.double(), *extra)
    with helpers.raises(NotImplementedError, op, "grad_output", SUPPORTED_DTYPES_TEXT):
        bwd(g.long(), saved, *extra)


def test_tanh_float32_within_two_ulps_everywhere():
    """float32 tanh (cpu: AVX-512 intrinsics, a table of polynomials, or the compiled loop with a
    division on other levels) against float64 tanh over every float32 value a bfloat16 can hold
    (every interval of the table, denormals, infinities, NaNs) plus random ones of all
    magnitudes: within two units of 2^-23 |tanh x| (the AVX-512 kernel measured 0.92 over every
    float, the compiled loop's division 1.6), NaN where the input is NaN."""
    x = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).float()
    gen = torch.Generator().manual_seed(5)
    x = torch.cat([x, torch.randn(100_000, generator=gen) * 10 ** torch.empty(100_000).uniform_(
        -6, 1.5, generator=gen)])
    ours = pyengine.functional.tanh(x).double()
    ref = torch.tanh(x.double())
    assert torch.equal(ours.isnan(), ref.isnan())
    ok = ~ref.isnan()
    ulp = torch.finfo(torch.float32).eps * ref[ok].abs().clamp_min(torch.finfo(torch.float32).tiny)
    err = (ours[ok] - ref[ok]).abs()
    assert (err <= 2 * ulp).all(), f"max error {(err / ulp).max().item():.2f} ulp"
