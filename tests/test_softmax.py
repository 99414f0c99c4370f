"""softmax, log_softmax and their backward ops against torch.

Shapes and dims are drawn at random from the seed conftest sets; references are computed on CPU
(torch.softmax / torch.log_softmax and aten's backward formulas), so NaN and inf behaviour is
pinned to torch's.
"""
import random

import pytest
import torch

import helpers

ops = torch.ops.pyengine

OPS = {
    "softmax": (ops.softmax, ops.softmax_backward, torch.softmax,
                torch.ops.aten._softmax_backward_data),
    "log_softmax": (ops.log_softmax, ops.log_softmax_backward, torch.log_softmax,
                    torch.ops.aten._log_softmax_backward_data),
}
names = pytest.mark.parametrize("name", list(OPS))


def draw_shape(rng, max_numel=20000):
    while True:
        ndim = rng.randint(0, 4)
        shape = []
        for _ in range(ndim):
            r = rng.random()
            shape.append(0 if r < 0.04 else rng.randint(1, 3) if r < 0.4 else rng.randint(4, 40))
        if ndim and rng.random() < 0.15:  # one long dim: vector bodies and tails
            shape[rng.randrange(ndim)] = rng.randint(100, 700)
        numel = 1
        for n in shape:
            numel *= n
        if numel <= max_numel:
            return shape


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
def test_random_shapes_match_torch(device, dtype, name):
    rng = random.Random(torch.initial_seed())
    for _ in range(80):
        shape = draw_shape(rng)
        nd = max(len(shape), 1)
        dim = rng.randint(-nd, nd - 1)
        scale = rng.choice([1.0, 10.0, 300.0])  # large logits: exp overflows without the max
        x = (torch.randn(shape, dtype=dtype) * scale).to(device)
        check(name, x, dim)


@names
@helpers.devices
@helpers.dtypes
def test_autograd_matches_torch(device, dtype, name):
    fwd, _, ref_fwd, _ = OPS[name]
    for shape, dim in [((5, 7), 1), ((3, 4, 6), 1), ((2, 3, 4, 5), 0), ((9,), -1), ((), 0)]:
        x = torch.randn(shape, dtype=dtype, device=device, requires_grad=True)
        helpers.compare_with_torch(lambda t: fwd(t, dim), lambda t: ref_fwd(t, dim), [x])


@names
@helpers.devices
def test_gradcheck(device, name):
    fwd = OPS[name][0]
    for shape, dim in [((3, 5), 1), ((2, 4, 3), 1), ((4, 3), 0), ((6,), 0), ((2, 3, 2, 2), -3)]:
        x = torch.randn(shape, dtype=torch.float64, device=device, requires_grad=True)
        assert torch.autograd.gradcheck(lambda t: fwd(t, dim), (x,))


@names
@helpers.devices
def test_opcheck(device, name):
    fwd, bwd = OPS[name][:2]
    x = torch.randn(3, 5, 4, device=device, requires_grad=True)
    helpers.opcheck(fwd.default, (x, 1))
    y = fwd(x.detach(), -1)
    helpers.opcheck(bwd.default, (torch.randn_like(y), y, -1))


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


@helpers.devices
@helpers.dtypes
def test_stable_and_normalized(device, dtype):
    """Huge logits do not overflow; long rows still sum to 1."""
    x = torch.tensor([[1000.0, 999.0, -1000.0]], dtype=dtype, device=device)
    y = ops.softmax(x, 1)
    assert torch.isfinite(y).all()
    helpers.assert_close(y.cpu(), torch.softmax(x.cpu(), 1))
    x = torch.randn(3, 100000, dtype=dtype, device=device) * 5
    # Row sums taken in float64, so the check adds no rounding of its own. In float32 the
    # rounding of 100000 outputs moves a row's sum up to ~1.2e-5 away from 1 (torch's too), so
    # float32 sums are held to torch's own sums; float64 ones to 1 itself.
    ref = torch.ones(3, dtype=torch.float64) if dtype == torch.float64 else \
        torch.softmax(x.cpu(), 1).double().sum(1)
    tol = dict(rtol=1e-12 if dtype == torch.float64 else 1e-6, atol=0)
    helpers.assert_close(ops.softmax(x, 1).double().sum(1).cpu(), ref, **tol)
    helpers.assert_close(ops.log_softmax(x, 1).double().exp().sum(1).cpu(), ref, **tol)


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
                        f"pyengine.{name}: expected input to be a float32 or float64 tensor",
                        "dtype Long"):
        fwd(x.long(), 1)
    with helpers.raises(NotImplementedError, "float32 or float64", "dtype Int"):
        fwd(x.int(), 0)
    with helpers.raises(NotImplementedError, "float32 or float64", "dtype Half"):
        fwd(x.half(), 0)
    y = fwd(x, 1)
    with helpers.raises(RuntimeError, f"pyengine.{name}_backward: expected result to have the same "
                        "shape as grad_output [2, 3]", "result of shape [3]"):
        bwd(torch.randn_like(y), y[0], 0)
    with helpers.raises(RuntimeError, "expected result to have the same dtype as grad_output"):
        bwd(torch.randn_like(y), y.double(), 1)
    with helpers.raises(NotImplementedError,
                        "expected grad_output to be a float32 or float64 tensor"):
        bwd(torch.ones_like(y, dtype=torch.long), y, 1)
    with helpers.raises(IndexError, f"pyengine.{name}_backward: dim out of range"):
        bwd(torch.randn_like(y), y, 5)
