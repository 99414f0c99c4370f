"""max_pool2d, max_pool2d_with_indices and max_pool2d_backward against torch.

The reference is torch's CPU kernel (values, the index of the element it picks, gradients), so the
semantics are pinned even where devices differ: ties keep the first maximum, a NaN wins, padding
never wins. Random geometries against torch: tests/test_samples.py and tests/test_fuzz.py (with
padding up to half the dilated kernel, which torch refuses, against an input padded by hand);
this file holds the hand-picked shapes, layouts, special values and the index rules.
"""
import random

import pytest
import torch
import torch.nn.functional as F

import fuzz_configs
import helpers
from differential import pool_geometry
from helpers import SUPPORTED_DTYPES_TEXT

ops = torch.ops.pyengine


def args(cfg):
    return (cfg["kernel_size"], cfg["stride"], cfg["padding"], cfg["dilation"], cfg["ceil_mode"])


def torch_pool(x, cfg):
    return F.max_pool2d(x.cpu(), **cfg, return_indices=True)


def check_forward(x, cfg):
    out, idx = ops.max_pool2d_with_indices(x, *args(cfg))
    ref, ref_idx = torch_pool(x, cfg)
    helpers.assert_same_strides(out, ref)  # channels_last stays channels_last, as in torch
    helpers.assert_same_strides(idx, ref_idx)
    assert out.dtype == x.dtype and idx.dtype == torch.int64 and out.device == x.device
    assert torch.equal(idx.cpu(), ref_idx), cfg
    helpers.assert_close(out.cpu(), ref, rtol=0, atol=0)
    plain = ops.max_pool2d(x, *args(cfg))
    helpers.assert_same_strides(plain, ref)
    helpers.assert_close(plain.cpu(), ref, rtol=0, atol=0)
    return out, idx


def torch_grad(x, cfg, g):
    xr = x.detach().cpu().clone().requires_grad_()
    F.max_pool2d(xr, **cfg).backward(g.cpu())
    return xr.grad


K2 = dict(kernel_size=[2, 2], stride=[2, 2], padding=[0, 0], dilation=[1, 1], ceil_mode=False)
K3 = dict(kernel_size=[3, 3], stride=[2, 2], padding=[1, 1], dilation=[1, 1], ceil_mode=True)
K3S1 = dict(kernel_size=[3, 3], stride=[1, 1], padding=[1, 1], dilation=[1, 1], ceil_mode=False)


@pytest.mark.parametrize(
    "shape",
    [(1, 1, 2, 2), (1, 6, 28, 28), (3, 16, 10, 10), (2, 3, 13, 17), (1, 2, 31, 29), (2, 1, 1, 37),
     (3, 7, 11), (2, 70, 150), (1, 1, 97, 3)],
    ids=str,
)
@pytest.mark.parametrize("cfg", [K2, K3, K3S1], ids=["k2s2", "k3s2p1ceil", "k3s1p1"])
@helpers.devices
@helpers.dtypes
def test_shapes(device, dtype, shape, cfg):
    """Batch 1, unbatched, odd and prime sizes, rows wider than a vector and a prefetch span."""
    if shape[-2] + 2 * cfg["padding"][0] < cfg["kernel_size"][0]:
        pytest.skip("the kernel does not fit this height")
    x = torch.randn(shape, dtype=dtype, device=device)
    out, idx = check_forward(x, cfg)
    g = torch.randn(out.shape, dtype=dtype, device=device)
    helpers.assert_close(ops.max_pool2d_backward(g, x, idx, *args(cfg)).cpu(),
                         torch_grad(x, cfg, g))


@helpers.devices
@helpers.dtypes
def test_empty_batch(device, dtype):
    x = torch.randn(0, 3, 8, 8, dtype=dtype, device=device, requires_grad=True)
    out, idx = ops.max_pool2d_with_indices(x, *args(K3))
    assert out.shape == (0, 3, 5, 5) and idx.shape == (0, 3, 5, 5)
    assert ops.max_pool2d(x, *args(K3)).shape == (0, 3, 5, 5)
    out.sum().backward()
    assert x.grad.shape == x.shape
    gi = ops.max_pool2d_backward(torch.empty_like(out), x.detach(), idx, *args(K3))
    assert gi.shape == x.shape


@helpers.devices
@helpers.dtypes
def test_strided_inputs(device, dtype):
    """Non-contiguous and channels_last inputs, non-contiguous grad_output and indices."""
    x = torch.randn(2, 5, 12, 14, dtype=dtype, device=device)
    for xs in (helpers.noncontiguous(x), x.to(memory_format=torch.channels_last),
               x.transpose(2, 3).contiguous().transpose(2, 3)):
        for cfg in (K2, K3, K3S1):
            out, idx = check_forward(xs, cfg)
            g = torch.randn(out.shape, dtype=dtype, device=device)
            ref = torch_grad(xs, cfg, g)
            gi = ops.max_pool2d_backward(helpers.noncontiguous(g), xs, helpers.noncontiguous(idx),
                                         *args(cfg))
            # torch's grad_input follows the input's memory format, whatever grad_output's
            helpers.assert_same_strides(gi.cpu(), torch.ops.aten.max_pool2d_with_indices_backward(
                g.cpu(), xs.cpu(), *args(cfg), torch_pool(xs, cfg)[1]))
            helpers.assert_close(gi.cpu(), ref)
            gi = ops.max_pool2d_backward(g.to(memory_format=torch.channels_last), xs,
                                         idx.to(memory_format=torch.channels_last), *args(cfg))
            helpers.assert_close(gi.cpu(), ref)


@helpers.devices
@helpers.dtypes
def test_nan_inf_and_ties(device, dtype):
    nan, inf = float("nan"), float("inf")
    rows = [
        [nan, 1.0, nan, 2.0],     # the last NaN of the window
        [1.0, 2.0, nan, 3.0],
        [-inf, -inf, -inf, -inf],  # nothing beats -inf: the first element
        [5.0, 5.0, 5.0, 5.0],     # ties: the first
        [1.0, inf, inf, 0.0],
        [inf, nan, -inf, inf],
    ]
    x = torch.tensor(rows, dtype=dtype, device=device).reshape(1, len(rows), 1, 4)
    for cfg in (dict(kernel_size=[1, 4], stride=[1, 4], padding=[0, 0], dilation=[1, 1],
                     ceil_mode=False),
                dict(kernel_size=[1, 3], stride=[1, 1], padding=[0, 1], dilation=[1, 1],
                     ceil_mode=False),
                dict(kernel_size=[1, 2], stride=[1, 1], padding=[0, 1], dilation=[1, 2],
                     ceil_mode=True)):
        check_forward(x, cfg)
    # vector-wide rows with NaN, inf and ties everywhere
    for cfg in (K2, K3, K3S1):
        x = torch.randint(-1, 2, (2, 3, 9, 70)).to(dtype)
        x[x == 1] = float("nan")
        x[x == -1] = -inf
        check_forward(x.to(device), cfg)


@helpers.devices
@helpers.dtypes
def test_window_with_no_input_element(device, dtype):
    """Dilation can put every tap of a window in the padding: -inf and torch's index (which points
    outside the window, here outside the plane); the backward adds nothing for it."""
    cfg = dict(kernel_size=[1, 2], stride=[1, 1], padding=[0, 1], dilation=[1, 3], ceil_mode=False)
    x = torch.tensor([[[[1.0, 2.0]]]], dtype=dtype, device=device)
    out, idx = check_forward(x, cfg)
    assert out.item() == float("-inf") and idx.item() == 2
    gi = ops.max_pool2d_backward(torch.ones_like(out), x, idx, *args(cfg))
    assert torch.equal(gi.cpu(), torch.zeros(1, 1, 1, 2, dtype=dtype))


def backward_reference(g, idx, x, cfg):
    """The gradient by the definition (csrc/ops.cpp), plane by plane, in float64, on every device:
    each window with an input element adds its gradient wherever in the plane its index points
    (torch's CPU scatter), a tap of the window or not; windows with no input element add
    nothing."""
    h, w = x.shape[-2:]
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = (cfg[a] for a in ("kernel_size", "stride", "padding",
                                                              "dilation"))
    oh_n, ow_n = g.shape[-2:]
    gp, ip = g.cpu().reshape(-1, oh_n, ow_n).double(), idx.cpu().reshape(-1, oh_n, ow_n)
    out = torch.zeros(gp.shape[0], h * w, dtype=torch.float64)
    for oh in range(oh_n):
        rows = [oh * sh - ph + i * dh for i in range(kh)]
        for ow in range(ow_n):
            cols = [ow * sw - pw + j * dw for j in range(kw)]
            if not any(0 <= r < h and 0 <= c < w for r in rows for c in cols):
                continue
            for p in range(gp.shape[0]):
                i = int(ip[p, oh, ow])
                if 0 <= i < h * w:
                    out[p, i] += gp[p, oh, ow]
    return out.reshape(x.shape).to(device=g.device, dtype=g.dtype)


WIDE = (2, 3, 6, 32)  # 2x2 / stride 2 windows over rows wide enough for the vector gather


@pytest.mark.parametrize("shape", [WIDE, (1, 2, 4, 4), (3, 6, 9)], ids=str)
@pytest.mark.parametrize("bad", [-1, "plane", 2**62, -(2**63), 2**63 - 1])
def test_backward_rejects_indices_outside_the_plane(shape, bad):
    """CPU: an index outside the H*W plane raises, naming where it is (CUDA: a device-side
    assert, tests/test_cuda.py). Also when the plane would take the vector gather."""
    x = torch.randn(shape)
    out, idx = ops.max_pool2d_with_indices(x, *args(K2))
    h, w = shape[-2:]
    bad = h * w if bad == "plane" else bad
    where = (0, 1, 0, 1) if len(shape) == 4 else (1, 0, 1)
    idx[where] = bad
    later = tuple(n - 1 for n in idx.shape)  # a second bad index after the first: not reported
    idx[later] = -5
    g = torch.randn_like(out)
    for threads in (1, torch.get_num_threads()):
        with helpers.set_num_threads(threads):
            with helpers.raises(RuntimeError, f"pyengine.max_pool2d_backward: indices{list(where)} "
                                f"= {bad} lies outside the {h}x{w} input plane"):
                ops.max_pool2d_backward(g, x, idx, *args(K2))


@helpers.devices
@helpers.dtypes
@pytest.mark.parametrize("cfg, shape", [(K2, WIDE), (K2, (2, 3, 5, 7)), (K3, (2, 3, 9, 11)),
                                        (K3S1, (3, 8, 40))], ids=["k2wide", "k2", "k3", "k3s1"])
def test_backward_in_plane_indices_that_are_not_taps(device, dtype, cfg, shape):
    """Hand-made indices inside the plane, taps of their window or not, inside its span or far
    from it: each window's gradient goes wherever its index points, as torch's CPU backward does,
    on every device (CUDA gathers, with a second pass for indices outside their window's span)."""
    x = torch.randn(shape, dtype=dtype, device=device)
    out, idx = ops.max_pool2d_with_indices(x, *args(cfg))
    h, w = shape[-2:]
    g = torch.randn(out.shape, dtype=dtype, device=device)
    rnd = torch.randint(0, h * w, idx.shape, device=device)
    keep = torch.rand(idx.shape, device=device) < 0.5
    mixed = torch.where(keep, idx, rnd)  # some planes all taps, most not
    mixed[0] = idx[0]
    gi = ops.max_pool2d_backward(g, x, mixed, *args(cfg))
    helpers.assert_close(gi, backward_reference(g, mixed, x, cfg))
    if device == "cpu":
        ref = torch.ops.aten.max_pool2d_with_indices_backward(g, x, *args(cfg), mixed)
        helpers.assert_close(gi, ref)


@helpers.devices
@helpers.dtypes
def test_backward_windows_with_no_input_element(device, dtype):
    """Dilation with padding can leave windows with no input element: -inf, and torch's index
    from the window's first tap, which may name an element outside the window or outside the
    plane (torch's CPU backward then writes there). Such windows pass no gradient and raise
    nothing; the others pass theirs."""
    rng = random.Random(torch.initial_seed())
    seen_outside = seen_inside = 0
    # W = 2, taps 3 apart, padding 1: the window's taps are columns -1 and 2, both outside; its
    # index ih0 * 2 + 2 names the first element of the next row (in the plane but not the window)
    cases = [(dict(kernel_size=[1, 2], stride=[1, 1], padding=[0, 1], dilation=[1, 3],
                   ceil_mode=False), (2, 5, 2))]

    def has_empty_window(case):
        p = case.params
        return not fuzz_configs.windows_with_input(pool_geometry(p), p["height"],
                                                   p["width"]).all()

    while len(cases) < 30:  # fuzz_configs' geometries, padding up to half the dilated kernel too
        # (about 1 draw in 100 has a window without input)
        p = fuzz_configs.draw("max_pool2d", rng, accept=has_empty_window, tries=50_000)
        cases.append((pool_geometry(p), (p["channels"], p["height"], p["width"])))
    for cfg, shape in cases:
        x = torch.randn(shape, dtype=dtype, device=device)
        out, idx = ops.max_pool2d_with_indices(x, *args(cfg))
        if all(cfg["padding"][i] * 2 <= cfg["kernel_size"][i] for i in (0, 1)):
            # inside torch's own limits: the forward (values and indices) is torch's
            ref, ref_idx = torch_pool(x, cfg)
            helpers.assert_close(out.cpu(), ref, rtol=0, atol=0)
            assert torch.equal(idx.cpu(), ref_idx)
        empty = out == float("-inf")
        h, w = shape[-2:]
        seen_outside += int(((idx < 0) | (idx >= h * w))[empty].sum())
        seen_inside += int(((idx >= 0) & (idx < h * w))[empty].sum())
        g = torch.randn(out.shape, dtype=dtype, device=device)
        gi = ops.max_pool2d_backward(g, x, idx, *args(cfg))
        helpers.assert_close(gi, backward_reference(g, idx, x, cfg))
        xg = x.detach().clone().requires_grad_()
        ops.max_pool2d(xg, *args(cfg)).backward(g)
        helpers.assert_close(xg.grad, gi, rtol=0, atol=0)
    assert seen_outside > 0 and seen_inside > 0  # both kinds of stray index were exercised


@helpers.devices
@helpers.dtypes
def test_deterministic(device, dtype):
    """Bitwise equal across runs and thread counts, overlapping windows included."""
    x = torch.randint(-3, 4, (4, 8, 33, 47)).to(dtype).to(device)  # ties: many shared winners
    cfg = dict(kernel_size=[3, 4], stride=[1, 2], padding=[1, 2], dilation=[1, 1], ceil_mode=True)
    runs = []
    threads = torch.get_num_threads()
    try:
        for n in (threads, 1, threads):
            torch.set_num_threads(n)
            out, idx = ops.max_pool2d_with_indices(x, *args(cfg))
            g = torch.randn(out.shape, dtype=dtype, generator=torch.Generator().manual_seed(0))
            gi = ops.max_pool2d_backward(g.to(device), x, idx, *args(cfg))
            runs.append((out, idx, gi, ops.max_pool2d(x, *args(cfg))))
    finally:
        torch.set_num_threads(threads)
    for r in runs[1:]:
        for a, b in zip(runs[0], r):
            assert torch.equal(a, b)


def call(x, k=(2, 2), s=(2, 2), p=(0, 0), d=(1, 1), ceil=False):
    return ops.max_pool2d_with_indices(x, list(k), list(s), list(p), list(d), ceil)


@helpers.devices
def test_bad_input(device):
    x = torch.randn(1, 2, 5, 5, device=device)
    with helpers.raises(RuntimeError, "max_pool2d", "expected input to be 3-D (C, H, W) or 4-D",
                        "input of shape [5, 5]"):
        call(x[0, 0])
    with helpers.raises(RuntimeError, "3-D (C, H, W) or 4-D", "[1, 1, 2, 5, 5]"):
        call(x[None])
    with helpers.raises(RuntimeError,
                        "expected the (dilated) kernel 7x2 to fit in the padded input 5x5"):
        call(x, k=(7, 2))
    with helpers.raises(RuntimeError, "kernel 5x9 to fit in the padded input 5x7"):
        call(x, k=(3, 3), p=(0, 1), d=(2, 4))
    with helpers.raises(RuntimeError, "expected stride to be positive", "stride=[0, 2]"):
        call(x, s=(0, 2))
    with helpers.raises(RuntimeError, "expected stride to be positive", "stride=[2, -1]"):
        call(x, s=(2, -1))
    with helpers.raises(RuntimeError, "expected kernel_size to be positive", "kernel_size=[0, 2]"):
        call(x, k=(0, 2))
    with helpers.raises(RuntimeError, "expected dilation to be positive"):
        call(x, d=(1, 0))
    with helpers.raises(RuntimeError, "expected padding to be non-negative", "padding=[-1, 0]"):
        call(x, p=(-1, 0))
    with helpers.raises(RuntimeError, "expected padding to be at most half of the effective kernel "
                        "size", "padding=[2, 0]", "kernel_size=[2, 2]"):
        call(x, p=(2, 0))
    with helpers.raises(RuntimeError, "expected kernel_size to have 2 values", "[2, 2, 2]"):
        call(x, k=(2, 2, 2))
    with helpers.raises(NotImplementedError,
                        f"expected input to be a {SUPPORTED_DTYPES_TEXT} tensor", "dtype Long"):
        call(x.long())
    with helpers.raises(NotImplementedError, SUPPORTED_DTYPES_TEXT, "dtype Int"):
        ops.max_pool2d(x.int(), [2, 2], [2, 2], [0, 0], [1, 1], False)
    with helpers.raises(RuntimeError, "non-zero channels, height and width", "[1, 2, 0, 5]"):
        call(torch.randn(1, 2, 0, 5, device=device), k=(1, 1), s=(1, 1))
    with helpers.raises(RuntimeError, "non-zero channels", "[1, 0, 5, 5]"):
        call(torch.randn(1, 0, 5, 5, device=device))


@helpers.devices
def test_backward_bad_input(device):
    x = torch.randn(1, 2, 5, 5, device=device)
    out, idx = call(x)
    g = torch.randn_like(out)
    a = ([2, 2], [2, 2], [0, 0], [1, 1], False)
    with helpers.raises(RuntimeError, "max_pool2d_backward", "expected grad_output of shape "
                        "[1, 2, 2, 2] (the forward output's)", "[1, 2, 3, 2]"):
        ops.max_pool2d_backward(torch.randn(1, 2, 3, 2, device=device), x, idx, *a)
    with helpers.raises(RuntimeError, "expected indices of dtype int64", "Int"):
        ops.max_pool2d_backward(g, x, idx.int(), *a)
    with helpers.raises(RuntimeError, "expected indices of shape [1, 2, 2, 2]", "[1, 2, 2, 1]"):
        ops.max_pool2d_backward(g, x, idx[..., :1], *a)
    with helpers.raises(RuntimeError, "expected grad_output to have the same dtype as input"):
        ops.max_pool2d_backward(g.double(), x, idx, *a)
    with helpers.raises(RuntimeError, "expected stride to be positive"):
        ops.max_pool2d_backward(g, x, idx, [2, 2], [0, 2], [0, 0], [1, 1], False)
