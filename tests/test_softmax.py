"""softmax, log_softmax and their backward ops against torch: odd shapes, layouts, NaN and inf,
long rows, determinism, bad input. References are computed on CPU (torch.softmax /
torch.log_softmax and aten's backward formulas), so NaN and inf behaviour is pinned to torch's.
Random shapes and dims against torch, gradcheck and opcheck: tests/test_samples.py and
test_fuzz.py.
"""
import numpy as np
import pytest
import torch

import helpers
from helpers import SUPPORTED_DTYPES_TEXT

ops = torch.ops.pyengine

OPS = {
    "softmax": (ops.softmax, ops.softmax_backward, torch.softmax,
                torch.ops.aten._softmax_backward_data),
    "log_softmax": (ops.log_softmax, ops.log_softmax_backward, torch.log_softmax,
                    torch.ops.aten._log_softmax_backward_data),
}
names = pytest.mark.parametrize("name", list(OPS))


def check(name, x, dim, g=None):
    """Forward and backward op against torch, on x's device; the reference runs on CPU."""
    fwd, bwd, ref_fwd, ref_bwd = OPS[name]
    y = fwd(x, dim)
    ref = ref_fwd(x.cpu(), dim)
    assert y.is_contiguous() and y.shape == x.shape and y.dtype == x.dtype
    helpers.assert_close(y.cpu(), ref)
    if g is None:
        g = torch.randn(x.shape, dtype=x.dtype, device=x.device)
    gx = bwd(g, y, dim)
    assert gx.is_contiguous() and gx.shape == x.shape
    helpers.assert_close(gx.cpu(), ref_bwd(g.cpu(), ref, dim, x.dtype))
    return y, gx


@names
@helpers.devices
@helpers.dtypes
def test_odd_shapes(device, dtype, name):
    cases = [((), 0), ((), -1), ((1,), 0), ((0,), 0), ((3, 0), 0), ((3, 0), 1), ((0, 4), 1),
             ((1, 1, 1), 1), ((64, 10), 1), ((7, 1000), 1), ((1000, 7), 0), ((2, 513, 3), 1),
             ((3, 2, 300), 1), ((2, 3, 17, 19), 1), ((5, 31), -2), ((4, 3, 1), 2)]
    for shape, dim in cases:
        check(name, torch.randn(shape, dtype=dtype, device=device), dim)


@names
@helpers.devices
@helpers.dtypes
def test_strided_inputs(device, dtype, name):
    x = torch.randn(4, 6, 5, 7, dtype=dtype, device=device)
    for xs in (helpers.noncontiguous(x), x.to(memory_format=torch.channels_last),
               x.transpose(1, 3)):
        for dim in range(-4, 4):
            g = helpers.noncontiguous(torch.randn(xs.shape, dtype=dtype, device=device))
            y, gx = check(name, xs, dim, g=g)
            # the backward op with strided grad_output and result
            fwd, bwd, ref_fwd, ref_bwd = OPS[name]
            yt = y.transpose(0, 1).contiguous().transpose(0, 1)
            gt = torch.randn_like(y).transpose(0, 1).contiguous().transpose(0, 1)
            helpers.assert_close(bwd(gt, yt, dim).cpu(),
                                 ref_bwd(gt.cpu(), y.cpu(), dim, dtype))


@names
@helpers.devices
@helpers.dtypes
def test_nan_and_inf(device, dtype, name):
    nan, inf = float("nan"), float("inf")
    rows = [
        [inf, 1.0, 2.0, 0.0],       # inf - inf: NaN row
        [-inf, -inf, -inf, -inf],   # -inf - -inf: NaN row
        [nan, 1.0, 2.0, 3.0],       # NaN row
        [-inf, 0.0, 1.0, -inf],     # -inf is a zero probability
        [1e30, -1e30, 0.0, 5.0],
        [inf, inf, 0.0, 0.0],
        [-inf, 3.0, -inf, -inf],
    ]
    x = torch.tensor(rows, dtype=dtype, device=device)
    check(name, x, 1)
    check(name, x.t().contiguous(), 0)  # the same rows through the blocked (inner) path
    # long rows: vector bodies and tails both see the special values
    x = torch.randn(6, 300, 5, dtype=dtype)
    x[0, 17, :] = inf
    x[1, :, :] = -inf
    x[2, 299, 1] = nan
    x[3, 5:200, :] = -inf
    x[4, 100, 3] = inf
    x = x.to(device)
    check(name, x, 1)
    check(name, x.transpose(1, 2).contiguous(), 2)
    # backward with non-finite grad_output and result
    y = OPS[name][0](x, 1)
    g = torch.randn_like(y)
    g[0, 3, 0] = nan
    g[5, 7, 2] = inf
    helpers.assert_close(OPS[name][1](g, y, 1).cpu(),
                         OPS[name][3](g.cpu(), y.cpu(), 1, dtype))


@names
@helpers.devices
@helpers.dtypes
def test_backward_of_any_result(device, dtype, name):
    # The backward ops take any `result`, not only the forward's: log_softmax's kernel takes a
    # cheaper exp for rows whose results are all <= 0 (as log-probabilities are) or at least
    # below exp's overflow; rows with larger, inf or NaN values must give torch's answer too,
    # from the vector body (column 5) and from the tail (column 35).
    nan, inf = float("nan"), float("inf")
    y = -torch.rand(8, 37, dtype=torch.float64) * 30
    y[1, 5] = 50.0      # exp finite
    y[2, 5] = 100.0     # above float's overflow of exp (88.7), below double's
    y[3, 35] = 100.0
    y[4, 5] = 800.0     # above double's too
    y[5, 35] = inf
    y[6, 5] = nan
    y[7, :] = 0.5
    y = y.to(dtype=dtype, device=device)
    g = torch.randn(y.shape, dtype=dtype, device=device)
    bwd, ref_bwd = OPS[name][1], OPS[name][3]
    for dim, (gd, yd) in ((1, (g, y)), (0, (g.t().contiguous(), y.t().contiguous()))):
        helpers.assert_close(bwd(gd, yd, dim).cpu(), ref_bwd(gd.cpu(), yd.cpu(), dim, dtype))


@helpers.devices
@helpers.dtypes
def test_stable_and_normalized(device, dtype):
    """Huge logits do not overflow; long rows still sum to 1."""
    x = torch.tensor([[1000.0, 999.0, -1000.0]], dtype=dtype, device=device)
    y = ops.softmax(x, 1)
    assert torch.isfinite(y).all()
    helpers.assert_close(y.cpu(), torch.softmax(x.cpu(), 1))
    x = torch.randn(3, 100000, dtype=dtype, device=device) * 5
    # Row sums taken in float64, so the check adds no rounding of its own. float32 rows sum to 1
    # within 2e-6 (measured over 40 seeds: at most 5.8e-7; torch's own rows are off by up to
    # 1.2e-5, from its float32 sum of exp), float64 ones within 1e-12.
    ones = torch.ones(3, dtype=torch.float64)
    tol = dict(rtol=1e-12 if dtype == torch.float64 else 2e-6, atol=0)
    helpers.assert_close(ops.softmax(x, 1).double().sum(1).cpu(), ones, **tol)
    helpers.assert_close(ops.log_softmax(x, 1).double().exp().sum(1).cpu(), ones, **tol)


# ---- Long rows: sums that stay right (the kernels carry float partial sums into double) --------

@names
@helpers.devices
@helpers.dtypes
@pytest.mark.parametrize("shape,dim", [((3, 10000), 1), ((2, 5000, 3), 1), ((1000, 7), 0)],
                         ids=["long_rows", "long_dim_inner3", "long_dim0"])
def test_long_rows_and_dims_match_torch(device, dtype, name, shape, dim):
    """Rows past kLongRow (4096 floats, 2048 doubles) and dims past 256 take the carrying
    kernels, forward and backward."""
    check(name, torch.randn(shape, dtype=dtype, device=device) * 3, dim)


def long_tail_logits(n, last_dim, device):
    """float32 logits over n elements along the softmax dim, whose mass is mostly a long tail: 16
    logits of 0 first, then exp(-18.5 .. -17.5) = 0.9e-8 .. 2.5e-8 each, under half an ulp of 1
    (6e-8). A float partial sum that has taken one of the large terms drops every tail term after
    it; at 2^24 elements the tail holds 1.7% of the mass. Shape (1, n) with dim -1 (contiguous
    rows), or (n / 2, 2) with dim 0 (the inner != 1 kernels)."""
    x = torch.rand(n, dtype=torch.float32).sub_(18.5)
    x[:16] = 0.0
    x = x.view(1, n) if last_dim else x.view(n // 2, 2)
    return x.to(device), (-1 if last_dim else 0)


def logsumexp_reference(x, dim):
    """log(sum(exp(x))) along dim, the sum in float64 (of float32 exps: ~1e-7 relative)."""
    m = x.amax(dim, keepdim=True)
    total = sum(torch.exp(c - m).sum(dim, dtype=torch.float64) for c in x.split(1 << 23, dim))
    return m.squeeze(dim).double() + total.log()


def check_long_sums(x, dim):
    """softmax sums to 1 (summed in float64), and x - log_softmax(x) equals logsumexp(x), within
    1e-4. (x - log_softmax(x) is taken in float32: its rounding, ~1e-7, is far below the
    tolerance.)"""
    y = ops.softmax(x, dim)
    assert float(y.sum(dim, dtype=torch.float64).sub(1).abs().max()) <= 1e-4
    del y
    lse = logsumexp_reference(x, dim)
    lo, hi = (x - ops.log_softmax(x, dim)).aminmax(dim=dim)
    worst = max(float((lo.double() - lse).abs().max()), float((hi.double() - lse).abs().max()))
    assert worst <= 1e-4, worst


@helpers.devices
@pytest.mark.parametrize("last_dim", [True, False], ids=["dim_last", "dim_0"])
def test_long_tail_row_of_2_24_sums_to_one(device, last_dim):
    """2^24 float32 elements along the softmax dim sum right. The same check fails for a plain
    float32 sum: computed here as the kernels would without the carry (16 lanes, each summing
    every 16th term in order, or one running sum per column for dim 0), it is off by ~1.7% (torch
    2.13's own softmax by 1.8% on this input, measured)."""
    x, dim = long_tail_logits(1 << 24, last_dim, device)
    check_long_sums(x, dim)
    e = torch.exp(x.cpu() - x.cpu().amax(dim, keepdim=True)).numpy()
    exact = e.astype(np.float64).sum(axis=dim)
    if last_dim:
        lanes = np.cumsum(e.reshape(-1, 16), axis=0, dtype=np.float32)[-1]
        naive = lanes.astype(np.float64).sum()
    else:
        naive = np.cumsum(e, axis=0, dtype=np.float32)[-1].astype(np.float64)
    assert np.abs(naive / exact - 1).max() > 1e-3  # 10x the tolerance above


@pytest.mark.slow
@helpers.devices
@pytest.mark.parametrize("last_dim", [True, False], ids=["dim_last", "dim_0"])
def test_long_tail_row_of_2_28_sums_to_one(device, last_dim):
    """2^28 float32 elements (1 GiB) along the softmax dim: still within 1e-4 (measured ~3e-6;
    torch 2.13's softmax is off by 28% along the last dim, 14% along dim 0)."""
    x, dim = long_tail_logits(1 << 28, last_dim, device)
    check_long_sums(x, dim)


@helpers.devices
@helpers.dtypes
def test_deterministic(device, dtype):
    x = torch.randn(40, 3000, dtype=dtype, device=device)
    xi = torch.randn(8, 300, 700, dtype=dtype, device=device)
    threads = torch.get_num_threads()
    runs = []
    try:
        for n in (threads, 1, threads):
            torch.set_num_threads(n)
            r = []
            for name, (fwd, bwd, _, _) in OPS.items():
                for t, dim in ((x, 1), (xi, 1)):
                    y = fwd(t, dim)
                    r += [y, bwd(t, y, dim)]
            runs.append(r)
    finally:
        torch.set_num_threads(threads)
    for r in runs[1:]:
        for a, b in zip(runs[0], r):
            assert torch.equal(a, b)


@names
@helpers.devices
def test_bad_input(device, name):
    fwd, bwd = OPS[name][:2]
    x = torch.randn(2, 3, device=device)
    with helpers.raises(IndexError, f"pyengine.{name}: dim out of range",
                        "expected to be in range of [-2, 1], but got 2"):
        fwd(x, 2)
    with helpers.raises(IndexError, "range of [-2, 1], but got -3"):
        fwd(x, -3)
    with helpers.raises(IndexError, "range of [-1, 0], but got 1"):
        fwd(torch.tensor(1.0, device=device), 1)
    with helpers.raises(NotImplementedError,
                        f"pyengine.{name}: expected input to be a {SUPPORTED_DTYPES_TEXT} tensor",
                        "dtype Long"):
        fwd(x.long(), 1)
    with helpers.raises(NotImplementedError, SUPPORTED_DTYPES_TEXT, "dtype Int"):
        fwd(x.int(), 0)
    with helpers.raises(NotImplementedError, SUPPORTED_DTYPES_TEXT,
                        "dtype Float8_e4m3fn"):
        fwd(x.to(torch.float8_e4m3fn), 0)
    y = fwd(x, 1)
    with helpers.raises(RuntimeError, f"pyengine.{name}_backward: expected result to have the same "
                        "shape as grad_output [2, 3]", "result of shape [3]"):
        bwd(torch.randn_like(y), y[0], 0)
    with helpers.raises(RuntimeError, "expected result to have the same dtype as grad_output"):
        bwd(torch.randn_like(y), y.double(), 1)
    with helpers.raises(NotImplementedError,
                        f"expected grad_output to be a {SUPPORTED_DTYPES_TEXT} tensor"):
        bwd(torch.ones_like(y, dtype=torch.long), y, 1)
    with helpers.raises(IndexError, f"pyengine.{name}_backward: dim out of range"):
        bwd(torch.randn_like(y), y, 5)
