"""pyengine.conv2d / conv2d_backward against torch.nn.functional.conv2d: hand-picked shapes,
layouts, special values, the backward op's output_mask, determinism, bad input. Random
configurations against torch, gradcheck and opcheck: tests/test_samples.py and test_fuzz.py."""
import pytest
import torch
import torch.nn.functional as F

import helpers
from helpers import devices, dtypes
from helpers import SUPPORTED_DTYPES_TEXT

OPS = torch.ops.pyengine


def _pair(v):
    return [v, v] if isinstance(v, int) else list(v)


def ours(x, w, b=None, stride=1, padding=0, dilation=1, groups=1):
    return OPS.conv2d(x, w, b, _pair(stride), _pair(padding), _pair(dilation), groups)


def theirs(x, w, b=None, stride=1, padding=0, dilation=1, groups=1):
    return F.conv2d(x, w, b, stride, padding, dilation, groups)


def backward(g, x, w, stride=1, padding=0, dilation=1, groups=1, mask=(True, True, True)):
    return OPS.conv2d_backward(g, x, w, _pair(stride), _pair(padding), _pair(dilation), groups,
                               list(mask))


# ---- Hand-picked shapes against torch ---------------------------------------------------------


@devices
@dtypes
@pytest.mark.parametrize("shape", [
    # (N, C_in, C_out, H, W, k, stride, padding, dilation, groups)
    (64, 1, 6, 32, 32, 5, 1, 0, 1, 1),      # LeNet conv1
    (64, 6, 16, 14, 14, 5, 1, 0, 1, 1),     # LeNet conv2
    (2, 3, 5, 7, 13, 3, 1, 1, 1, 1),        # odd, prime sizes
    (1, 4, 4, 9, 11, 3, 2, 1, 2, 4),        # depthwise, strided, dilated
    (3, 6, 8, 10, 10, 1, 1, 0, 1, 2),       # 1x1 (pointwise path), grouped
    (2, 48, 140, 5, 7, 1, 1, 0, 1, 2),      # ... 70 outputs a group: grad_weight's 64-row blocks
    (2, 5, 3, 6, 5, 1, 2, 0, 1, 1),         # 1x1 strided
    (2, 2, 3, 4, 4, 4, 1, 0, 1, 1),         # kernel as large as the input: one output pixel
    (2, 3, 2, 2, 3, 3, 1, 1, 1, 1),         # input smaller than the kernel, padded
    (1, 2, 3, 40, 48, 3, 1, 1, 1, 1),       # columns span several strips
    (300, 2, 3, 5, 6, 3, 1, 1, 1, 1),       # batch-innermost path over several batch chunks
    (20, 4, 6, 9, 7, 3, 1, 2, 2, 2),        # ... with padding wider than the kernel's reach
    (2, 4, 6, 20, 19, 3, 1, 2, 1, 2),       # direct forward, padded, grouped, odd width
    (2, 16, 32, 9, 11, 3, 1, 1, 1, 1),      # implicit GEMM: forward, grad_input, grad_weight
    (2, 16, 16, 13, 12, 3, 2, 1, 2, 1),     # implicit, stride 2 (phase planes), dilated
    (2, 32, 32, 8, 8, 3, 1, 1, 1, 2),       # implicit, grouped
    (1, 16, 20, 6, 30, 5, 1, 0, 1, 1),      # implicit, wide rows, 20 = a vector + a tail
    # rows of 512 B multiples (128 floats, 64 doubles): the implicit GEMMs' operands get a spare
    # line per row (gemm.h's in_place_ld), grouped and strided too
    (2, 128, 128, 6, 7, 3, 1, 1, 1, 1),
    (2, 256, 128, 5, 6, 3, 1, 1, 1, 2),
    (1, 64, 128, 9, 8, 3, 2, 1, 1, 1),
    # stride 2 on rows of 16+ columns (the phase planes' vector split): odd width and padding,
    # even padding, each with a tail of columns; a tail of 19 (past one vector: both loads
    # masked) with an odd padding beyond 1
    (1, 16, 32, 5, 37, 3, 2, 1, 1, 1),
    (2, 16, 16, 4, 34, 3, 2, 2, 1, 1),
    (1, 16, 16, 4, 51, 3, 2, 3, 1, 1),
    # strided grad_input by stride phases: stride 3, grouped; padding wider than the kernel
    (2, 32, 12, 11, 10, 3, 3, 2, 1, 2),
    (1, 16, 8, 12, 9, 3, 2, 4, 1, 1),
    # Winograd F(2x2, 3x3), forward and grad_input (grad_input's padding is 2 - padding): odd
    # output sizes (tiles past the edge), paddings 0 and 2, channel counts off whole vectors,
    # 2x2 images, tile rows of several images in one block and blocks ending mid-image
    (2, 32, 32, 9, 11, 3, 1, 1, 1, 1),
    (3, 40, 33, 7, 6, 3, 1, 0, 1, 1),
    (1, 48, 64, 5, 13, 3, 1, 2, 1, 1),
    (4, 32, 48, 2, 2, 3, 1, 1, 1, 1),
    (5, 64, 32, 14, 14, 3, 1, 1, 1, 1),
    (1, 96, 80, 30, 17, 3, 1, 1, 1, 1),
    (3, 128, 160, 26, 26, 3, 1, 1, 1, 1),   # U over 1 MB: larger blocks, ending mid-image
    # ... and its grad_weight (128+ channels): odd sizes, paddings 0 and 2
    (3, 128, 160, 9, 7, 3, 1, 0, 1, 1),
    (2, 144, 128, 5, 4, 3, 1, 2, 1, 1),
])
def test_shapes(shape, dtype, device):
    n, cin, cout, h, w_, k, s, p, d, g = shape
    x = torch.randn(n, cin, h, w_, dtype=dtype, device=device, requires_grad=True)
    w = torch.randn(cout, cin // g, k, k, dtype=dtype, device=device, requires_grad=True)
    b = torch.randn(cout, dtype=dtype, device=device, requires_grad=True)
    kw = dict(stride=s, padding=p, dilation=d, groups=g)
    y = ours(x, w, b, **kw)
    gy = torch.randn_like(y)
    y.backward(gy)
    # Reference: torch in float64. In float32, grad_weight sums N * H_out * W_out terms (50176 for
    # LeNet conv1) and torch's own float32 result is off by ~4e-6 of the largest entry there
    # (pyengine's by ~2e-7), so float32 is held to 1e-5 of each result's largest entry.
    ref = [t.detach().double().requires_grad_() for t in (x, w, b)]
    yr = theirs(*ref, **kw)
    yr.backward(gy.double())
    for got, want in zip((y, x.grad, w.grad, b.grad), (yr, *(t.grad for t in ref))):
        tol = dict(rtol=1e-4, atol=1e-5 * max(1.0, want.abs().max().item())) \
            if dtype == torch.float32 else {}
        helpers.assert_close(got.double(), want.detach(), dtype, **tol)


# One shape per algorithm (conv2d.cpp's choice): im2col, batch-innermost, direct, implicit,
# implicit with stride 2, pointwise, Winograd (which hands non-finite results to the others).
ALGORITHM_SHAPES = [(2, 3, 5, 7, 13, 3, 1, 1, 1, 1), (20, 4, 6, 9, 7, 3, 1, 1, 1, 1),
                    (2, 2, 6, 20, 19, 3, 1, 1, 1, 1), (2, 16, 32, 9, 11, 3, 1, 1, 1, 1),
                    (2, 16, 16, 13, 12, 3, 2, 1, 1, 1), (2, 16, 24, 7, 7, 1, 1, 0, 1, 1),
                    (2, 32, 32, 9, 11, 3, 1, 1, 1, 1), (2, 128, 128, 6, 7, 3, 1, 1, 1, 1),
                    (3, 48, 140, 5, 7, 1, 1, 0, 1, 2)]


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape", ALGORITHM_SHAPES)
def test_nonfinite_values_reach_what_torch_reaches(shape, channels_last):
    """An Inf and a NaN in the input (and an Inf in the weight) spread through every algorithm
    to exactly the outputs and gradient entries they spread to in torch: none is summed where
    torch has no term (the implicit GEMM computes padding columns it then drops)."""
    n, cin, cout, h, w_, k, s, p, d, g = shape
    torch.manual_seed(0)
    x = torch.randn(n, cin, h, w_, dtype=torch.float64)
    x[0, 0, 0, w_ - 1] = float("inf")
    x[n - 1, cin - 1, h // 2, 0] = float("nan")
    w = torch.randn(cout, cin // g, k, k, dtype=torch.float64)
    w[cout - 1, 0, 0, 0] = float("inf")
    if channels_last:  # (Winograd hands its non-finite results to NCHW copies: conv2d.cpp)
        x = x.contiguous(memory_format=torch.channels_last)
    kw = dict(stride=s, padding=p, dilation=d, groups=g)
    results = []
    for fn in (ours, theirs):
        xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = fn(xs, ws, None, **kw)
        y.backward(torch.ones_like(y))
        results.append((y.detach(), xs.grad, ws.grad))
    for got, want in zip(*results):
        assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.isinf(), want.isinf())
        helpers.assert_close(got, want, torch.float64)


@pytest.mark.parametrize("pass_,dtype,channels", [
    ("forward", torch.float32, 40), ("forward", torch.float64, 36),
    ("grad_input", torch.float32, 40), ("grad_input", torch.float64, 36),
    ("grad_weight", torch.float32, 136), ("grad_weight", torch.float64, 132)])
def test_winograd_nonfinite_in_a_part_vector_of_channels(pass_, dtype, channels):
    """One Inf that reaches only the last channel of the result (the forward's output channels,
    grad_input's or grad_weight's input channels), past its last whole vector of channels, which
    the Winograd transforms check lane by lane: the non-finite entries are exactly torch's."""
    torch.manual_seed(0)
    if pass_ == "forward":
        x = torch.randn(2, 32, 9, 11, dtype=dtype)
        w = torch.randn(channels, 32, 3, 3, dtype=dtype)
        w[channels - 1, 5, 1, 1] = float("inf")
        got, want = ours(x, w, padding=1), theirs(x, w, padding=1)
    elif pass_ == "grad_input":
        dy = torch.randn(2, 32, 9, 11, dtype=dtype)
        w = torch.randn(32, channels, 3, 3, dtype=dtype)
        w[5, channels - 1, 1, 1] = float("inf")
        x = torch.zeros(2, channels, 9, 11, dtype=dtype)
        got = backward(dy, x, w, padding=1, mask=(True, False, False))[0]
        want = torch.nn.grad.conv2d_input(x.shape, w, dy, padding=1)
    else:  # grad_weight's Winograd path needs 128+ channels on both sides
        x = torch.randn(2, channels, 9, 11, dtype=dtype)
        x[1, channels - 1, 4, 5] = float("inf")
        w = torch.randn(128, channels, 3, 3, dtype=dtype)
        dy = torch.randn(2, 128, 9, 11, dtype=dtype)
        got = backward(dy, x, w, padding=1, mask=(False, True, False))[1]
        want = torch.nn.grad.conv2d_weight(x, w.shape, dy, padding=1)
    assert not torch.isfinite(want[:, -1]).all() and torch.isfinite(want[:, :-1]).all()
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.isinf(), want.isinf())
    helpers.assert_close(got, want, dtype)


def test_winograd_overflow_is_computed_again():
    """Values near float32's largest: the Winograd transforms' sums (x0 - x2 of a window)
    overflow where every product of the direct sum is finite. The result is torch's, finite
    (computed again on another path): forward, grad_input and grad_weight."""
    torch.manual_seed(0)
    x = torch.full((2, 128, 6, 7), 3e38)
    x[:, :, 2:4] = -3e38  # rows 1 and 3 of opposite signs: tile row 1's first difference
    assert torch.isinf(x[0, 0, 1] - x[0, 0, 3]).all()  # (B^T d's row d0 - d2) overflows
    w = torch.randn(128, 128, 3, 3) * 1e-5
    y = ours(x, w, padding=1)
    want = theirs(x.double(), w.double(), padding=1)
    assert torch.isfinite(y).all()
    helpers.assert_close(y.double(), want, torch.float32, rtol=1e-4,
                         atol=1e-5 * want.abs().max().item())
    g = x.flip(1).contiguous()
    dx = backward(g, x, w, padding=1, mask=(True, False, False))[0]
    want_dx = torch.nn.grad.conv2d_input(x.shape, w.double(), g.double(), padding=1)
    assert torch.isfinite(dx).all()
    helpers.assert_close(dx.double(), want_dx, torch.float32, rtol=1e-4,
                         atol=1e-5 * want_dx.abs().max().item())
    g = torch.randn_like(y) * 1e-6
    dw = backward(g, x, w, padding=1, mask=(False, True, False))[1]
    want_dw = torch.nn.grad.conv2d_weight(x.double(), w.shape, g.double(), padding=1)
    assert torch.isfinite(dw).all()
    helpers.assert_close(dw.double(), want_dw, torch.float32, rtol=1e-4,
                         atol=1e-5 * want_dw.abs().max().item())


@devices
def test_unbatched(device):
    x = torch.randn(3, 9, 7, dtype=torch.float64, device=device, requires_grad=True)
    w = torch.randn(4, 3, 3, 2, dtype=torch.float64, device=device, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, device=device, requires_grad=True)
    y = helpers.compare_with_torch(lambda x, w, b: ours(x, w, b, padding=1),
                                   lambda x, w, b: theirs(x, w, b, padding=1), [x, w, b])
    assert y.shape == (4, 9, 8)
    gi, gw, gb = backward(torch.ones(4, 9, 8, dtype=torch.float64, device=device), x.detach(),
                          w.detach(), padding=1)
    assert gi.shape == x.shape and gw.shape == w.shape and gb.shape == (4,)


@devices
@dtypes
def test_empty_batch(dtype, device):
    x = torch.randn(0, 3, 8, 8, dtype=dtype, device=device)
    w = torch.randn(5, 3, 3, 3, dtype=dtype, device=device)
    b = torch.randn(5, dtype=dtype, device=device)
    y = ours(x, w, b, padding=1)
    assert y.shape == (0, 5, 8, 8) and y.is_contiguous()
    gi, gw, gb = backward(torch.empty(0, 5, 8, 8, dtype=dtype, device=device), x, w, padding=1)
    assert gi.shape == (0, 3, 8, 8)
    assert torch.equal(gw, torch.zeros_like(w)) and torch.equal(gb, torch.zeros(5, dtype=dtype,
                                                                                device=device))
    # and through autograd
    x.requires_grad_()
    w.requires_grad_()
    b.requires_grad_()
    ours(x, w, b, padding=1).sum().backward()
    assert torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(b.grad, torch.zeros_like(b))


@devices
def test_zero_out_channels_and_batch_one(device):
    x = torch.randn(1, 2, 5, 5, dtype=torch.float64, device=device)
    w = torch.randn(0, 2, 3, 3, dtype=torch.float64, device=device)
    assert ours(x, w).shape == (1, 0, 3, 3)
    gi, gw, gb = backward(torch.empty(1, 0, 3, 3, dtype=torch.float64, device=device), x, w)
    assert torch.equal(gi, torch.zeros_like(x)) and gw.shape == w.shape and gb.shape == (0,)


# ---- Layouts ---------------------------------------------------------------------------------


@devices
@dtypes
def test_noncontiguous_inputs_and_transposed_weight(dtype, device):
    x = helpers.noncontiguous(torch.randn(2, 4, 9, 10, dtype=dtype, device=device))
    # (C_in, C_out, kH, kW) storage viewed as (C_out, C_in, kW, kH): every dim permuted
    w = torch.randn(4, 6, 3, 2, dtype=dtype, device=device).permute(1, 0, 3, 2)
    b = helpers.noncontiguous(torch.randn(6, dtype=dtype, device=device))
    assert not x.is_contiguous() and not w.is_contiguous() and not b.is_contiguous()
    for t in (x, w, b):
        t.requires_grad_()
    y = helpers.compare_with_torch(lambda x, w, b: ours(x, w, b, stride=(1, 2), padding=1),
                                   lambda x, w, b: theirs(x, w, b, stride=(1, 2), padding=1),
                                   [x, w, b], dtype)
    assert y.is_contiguous()
    # grad_output non-contiguous too, straight into the backward op
    g = helpers.noncontiguous(torch.randn(y.shape, dtype=dtype, device=device))
    got = backward(g, x.detach(), w.detach(), stride=(1, 2), padding=1)
    want = backward(g.contiguous(), x.detach().contiguous(), w.detach().contiguous(),
                    stride=(1, 2), padding=1)
    for a, e in zip(got, want):
        assert a.is_contiguous()
        torch.testing.assert_close(a, e, rtol=0, atol=0)


@devices
@dtypes
def test_channels_last(dtype, device):
    x = torch.randn(3, 5, 8, 9, dtype=dtype, device=device).to(memory_format=torch.channels_last)
    w = torch.randn(4, 5, 3, 3, dtype=dtype, device=device).to(memory_format=torch.channels_last)
    b = torch.randn(4, dtype=dtype, device=device)
    for t in (x, w, b):
        t.requires_grad_()
    y = helpers.compare_with_torch(lambda x, w, b: ours(x, w, b, padding=(2, 1)),
                                   lambda x, w, b: theirs(x, w, b, padding=(2, 1)), [x, w, b],
                                   dtype)
    assert y.is_contiguous(memory_format=torch.channels_last)  # as torch's (on the CPU: below)
    reference = helpers.conv_layout_reference(theirs, device, dtype)
    helpers.assert_same_strides(y, reference(x, w, b, padding=(2, 1)))


# Winograd's forward and grad_input and the implicit GEMM's grad_weight (with grad_bias) read and
# write channels_last images as they are; the algorithms around them take NCHW copies. Whatever
# the layouts, the results are the contiguous call's, bit for bit, in torch's layout; but a
# pointwise layer's, which are GEMMs over the whole batch's pixel rows (sums in another order:
# compared with torch in float64).
CHANNELS_LAST_SHAPES = [
    # (N, C_in, C_out, H, W, k, stride, padding, dilation, groups)
    (2, 32, 32, 9, 11, 3, 1, 1, 1, 1),      # Winograd forward / grad_input, implicit grad_weight
    (3, 40, 33, 7, 6, 3, 1, 0, 1, 1),       # ... padding 0 (grad_input's 2), odd sizes
    (1, 48, 64, 5, 13, 3, 1, 2, 1, 1),      # ... padding 2 (grad_input's 0)
    (4, 32, 48, 2, 2, 3, 1, 1, 1, 1),       # 2x2 images: several images in a block
    (1, 96, 80, 30, 17, 3, 1, 1, 1, 1),     # several blocks per image
    (3, 128, 160, 26, 26, 3, 1, 1, 1, 1),   # blocks ending mid-image; Winograd grad_weight
    (2, 128, 128, 6, 7, 3, 1, 1, 1, 1),     # 512-byte pixel rows: dY copied, not read in place
    (2, 16, 32, 9, 11, 3, 1, 1, 1, 1),      # implicit forward (copies), implicit grad_weight
    (2, 16, 16, 13, 12, 3, 2, 1, 2, 1),     # stride 2, dilated: phase planes, grad_input by phases
    (1, 16, 32, 5, 37, 3, 2, 1, 1, 1),      # ... odd width and padding, a tail of columns
    (2, 32, 12, 11, 10, 3, 3, 2, 1, 2),     # ... stride 3, grouped
    (1, 16, 8, 12, 9, 3, 2, 4, 1, 1),       # ... padding wider than the kernel
    (2, 64, 64, 9, 10, 3, 2, 1, 1, 1),      # ... 64 channels: pixel rows of x and dY, the GEMMs
    (1, 72, 72, 11, 9, 3, 2, 1, 1, 1),      #     store into y and dX (+ a tail of 8 channels)
    (2, 128, 128, 7, 9, 3, 2, 2, 1, 2),     #     ... grouped
    (2, 32, 32, 8, 8, 3, 1, 1, 1, 2),       # grouped: the implicit GEMM, forward and grad_input
    (2, 16, 24, 9, 30, 3, 1, 0, 1, 1),      # implicit, flattened rows (narrow output channels)
    (20, 4, 6, 9, 7, 3, 1, 1, 1, 1),        # batch-innermost (copies)
    (2, 16, 24, 7, 7, 1, 1, 0, 1, 1),       # pointwise: GEMMs over the pixel rows
    (3, 48, 140, 5, 7, 1, 1, 0, 1, 2),      # ... grouped
    (20, 8, 12, 5, 5, 1, 1, 0, 1, 1),       # ... where NCHW takes the batch-innermost kernel
    (1, 64, 32, 40, 45, 1, 1, 0, 1, 1),     # ... several blocks of rows, a partial last one
    (2, 16, 24, 7, 7, 1, 2, 0, 1, 1),       # 1x1, strided (copies)
]


@dtypes
@pytest.mark.parametrize("shape", CHANNELS_LAST_SHAPES)
@pytest.mark.parametrize("layouts", [
    # (x, weight, grad_output)
    ("channels_last", "contiguous", "channels_last"),
    ("channels_last", "channels_last", "channels_last"),
    ("contiguous", "channels_last", "channels_last"),
    ("channels_last", "contiguous", "contiguous"),
    ("contiguous", "channels_last", "strided"),
])
def test_channels_last_as_contiguous(shape, layouts, dtype):
    n, cin, cout, h, w_, k, s, p, d, g = shape
    torch.manual_seed(0)
    x = torch.randn(n, cin, h, w_, dtype=dtype)
    w = torch.randn(cout, cin // g, k, k, dtype=dtype)
    b = torch.randn(cout, dtype=dtype)
    kw = dict(stride=s, padding=p, dilation=d, groups=g)

    def laid_out(t, layout):
        return (t.contiguous(memory_format=torch.channels_last) if layout == "channels_last"
                else helpers.noncontiguous(t) if layout == "strided" else t)

    pointwise = k == 1 and s == 1 and p == 0
    def same(a, e):  # (float32 gradients sum up to 1800 terms here)
        tol = dict(rtol=1e-4, atol=1e-5 * max(1.0, e.abs().max().item())) if pointwise else \
            dict(rtol=0, atol=0)
        torch.testing.assert_close(a, e, **tol)
    xl, wl = laid_out(x, layouts[0]), laid_out(w, layouts[1])
    y = ours(xl, wl, b, **kw)
    want = ours(x, w, b, **kw)
    same(y, want)
    helpers.assert_same_strides(y, theirs(xl, wl, b, **kw), "output")
    helpers.assert_close(y.double(), theirs(x.double(), w.double(), b.double(), **kw), dtype,
                         rtol=1e-4, atol=1e-5 * want.abs().max().item())
    gy = torch.randn_like(want)
    gyl = laid_out(gy, layouts[2])
    ref = torch.ops.aten.convolution_backward(
        gy.double(), x.double(), w.double(), [cout], _pair(s), _pair(p), _pair(d), False, [0, 0],
        g, [True, True, True])
    torch_layout = torch.ops.aten.convolution_backward(
        gyl, xl, wl, [cout], _pair(s), _pair(p), _pair(d), False, [0, 0], g, [True, True, True])
    for mask in [(True, True, True), (True, False, False), (False, True, False),
                 (False, False, True), (False, True, True)]:
        got = backward(gyl, xl, wl, mask=mask, **kw)
        want = backward(gy, x, w, mask=mask, **kw)
        for i, (a, e) in enumerate(zip(got, want)):
            if not mask[i]:
                assert a is None
                continue
            same(a, e)
            if i == 1 and k == 1:  # a 1x1 kernel's strides of its size-1 dims say nothing (and
                # torch's differ between float32 and float64): the ones that place elements
                placed = [[st for st, n in zip(t.stride(), t.shape) if n > 1]
                          for t in (a, torch_layout[i])]
                assert placed[0] == placed[1], (a.stride(), torch_layout[i].stride())
            else:
                helpers.assert_same_strides(a, torch_layout[i], f"gradient {i}")
            helpers.assert_close(a.double(), ref[i], dtype, rtol=1e-4,
                                 atol=1e-5 * max(1.0, ref[i].abs().max().item()))


@pytest.mark.parametrize("cin,cout,k", [(3, 0, 1), (0, 4, 1), (0, 40, 3), (40, 0, 3), (16, 0, 3)])
def test_channels_last_without_channels(cin, cout, k):
    """No input or no output channels in channels_last: the contiguous call's (empty or zero)
    results, not a division by the channel count (a 1x1 layer's row blocks)."""
    x = torch.randn(2, cin, 6, 6).contiguous(memory_format=torch.channels_last)
    w = torch.randn(cout, cin, k, k).contiguous(memory_format=torch.channels_last)
    b = torch.randn(cout)
    pad = k // 2
    y = ours(x, w, b, padding=pad)
    assert torch.equal(y, ours(x.contiguous(), w.contiguous(), b, padding=pad))
    gy = torch.randn_like(y)
    for got, want in zip(backward(gy, x, w, padding=pad),
                         backward(gy.contiguous(), x.contiguous(), w.contiguous(), padding=pad)):
        assert torch.equal(got, want)


def test_channels_last_unbatched():
    """A (C, H, W) input with channels_last strides (1, W * C, C) on Winograd and the implicit
    GEMM's grad_weight: the batched call's results."""
    torch.manual_seed(0)
    x = torch.randn(1, 32, 9, 11).contiguous(memory_format=torch.channels_last)
    w = torch.randn(48, 32, 3, 3)
    b = torch.randn(48)
    y = ours(x[0], w, b, padding=1)
    assert x[0].stride() == (1, 11 * 32, 32)
    assert torch.equal(y, ours(x, w, b, padding=1)[0])
    helpers.assert_same_strides(y, theirs(x[0], w, b, padding=1))
    gy = torch.randn_like(y)
    got = backward(gy, x[0], w, padding=1)
    want = backward(gy[None], x, w, padding=1)
    assert torch.equal(got[0], want[0][0])
    assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])


@devices
@dtypes
def test_nan_and_inf_propagate(dtype, device):
    x = torch.randn(2, 3, 8, 8, dtype=dtype, device=device)
    x[0, 1, 2, 3] = float("nan")
    x[1, 0, 5, 5] = float("inf")
    x[1, 2, 0, 7] = float("-inf")
    w = torch.randn(4, 3, 3, 3, dtype=dtype, device=device)
    b = torch.randn(4, dtype=dtype, device=device)
    y = ours(x, w, b, padding=1)
    helpers.assert_close(y, theirs(x, w, b, padding=1))  # equal_nan
    assert y.isnan().any() and y.isinf().any()
    g = torch.randn_like(y)
    gi, gw, gb = backward(g, x, w, padding=1)
    xr, wr, br = (t.clone().requires_grad_() for t in (x, w, b))
    theirs(xr, wr, br, padding=1).backward(g)
    helpers.assert_close(gi, xr.grad)
    helpers.assert_close(gw, wr.grad)
    helpers.assert_close(gb, br.grad)


# ---- The backward op directly --------------------------------------------------------------


@devices
@pytest.mark.parametrize("mask", [(a, b, c) for a in (0, 1) for b in (0, 1) for c in (0, 1)])
def test_output_mask(mask, device):
    mask = tuple(bool(m) for m in mask)
    x = torch.randn(3, 4, 9, 8, dtype=torch.float64, device=device, requires_grad=True)
    w = torch.randn(6, 2, 3, 3, dtype=torch.float64, device=device, requires_grad=True)
    b = torch.zeros(6, dtype=torch.float64, device=device, requires_grad=True)
    kw = dict(stride=(2, 1), padding=(1, 0), dilation=(1, 2), groups=2)
    y = theirs(x, w, b, **kw)
    g = torch.randn_like(y)
    want = torch.autograd.grad(y, (x, w, b), g)
    got = backward(g, x.detach(), w.detach(), mask=mask, **kw)
    for m, a, e in zip(mask, got, want):
        if m:
            assert a is not None and a.is_contiguous()
            helpers.assert_close(a, e)
        else:
            assert a is None


@devices
def test_autograd_asks_only_for_needed_grads(device):
    # input without grad (LeNet's first layer), bias frozen: only the weight's grad comes back
    x = torch.randn(2, 1, 12, 12, dtype=torch.float64, device=device)
    w = torch.randn(3, 1, 5, 5, dtype=torch.float64, device=device, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, device=device)
    y = ours(x, w, b)
    y.sum().backward()
    wr = w.detach().clone().requires_grad_()
    theirs(x, wr, b).sum().backward()
    helpers.assert_close(w.grad, wr.grad)


# ---- Determinism ---------------------------------------------------------------------------


@devices
def test_backward_is_deterministic(device):
    x = torch.randn(64, 6, 14, 14, device=device)
    w = torch.randn(16, 6, 5, 5, device=device)
    g = torch.randn(64, 16, 10, 10, device=device)
    first = backward(g, x, w)
    for _ in range(2):
        again = backward(g, x, w)
        for a, e in zip(again, first):
            assert torch.equal(a, e)


@pytest.mark.parametrize("shape", [(37, 3, 8, 17, 15, 3, 1, 0, 1, 1),
                                   (4, 16, 96, 20, 20, 3, 1, 1, 1, 1),
                                   # implicit grad_weight's batch in two slices of 2 and 1
                                   # images (one thread walks them one after the other)
                                   (3, 16, 96, 20, 20, 3, 2, 1, 1, 1)] + ALGORITHM_SHAPES)
def test_results_independent_of_thread_count(shape):
    """Bitwise the same results on 1, 2 and 3 threads, on every algorithm."""
    n, cin, cout, h, w_, k, s, p, d, g = shape
    x = torch.randn(n, cin, h, w_)
    w = torch.randn(cout, cin // g, k, k)
    kw = dict(stride=s, padding=p, dilation=d, groups=g)
    y = ours(x, w, **kw)
    gy = torch.randn_like(y)
    results = []
    for threads in (1, 2, 3):
        with helpers.set_num_threads(threads):
            out = ours(x, w, **kw)
            grads = torch.ops.pyengine.conv2d_backward(
                gy, x, w, [s, s], [p, p], [d, d], g, [True, True, True])
            results.append((out, *grads))
    for other in results[1:]:
        for a, e in zip(other, results[0]):
            assert torch.equal(a, e)


# ---- Every compiled instruction set ----------------------------------------------------------

_ISA_SCRIPT = r"""
import pyengine, differential, samples
for sample in samples.samples("conv2d"):  # (every option; the batch-innermost path too)
    for case in samples.in_both_dtypes(sample):
        differential.check(case)
print("ok")
"""


@pytest.mark.parametrize("isa", ["avx2", "default"])
def test_lower_instruction_sets(isa):
    """The GEMM and the conv loops are compiled for AVX-512, AVX2 and baseline x86-64; this
    machine picks the best, so force the others (PYENGINE_CPU_ISA, read at load) in a fresh
    process, on conv2d's samples (tests/samples.py) in both dtypes."""
    helpers.run_with_cpu_isa(isa, _ISA_SCRIPT)


# ---- Bad input -----------------------------------------------------------------------------


@devices
def test_bad_input(device):
    x = torch.randn(2, 4, 8, 8, device=device)
    w = torch.randn(6, 4, 3, 3, device=device)
    b = torch.randn(6, device=device)
    with helpers.raises(RuntimeError, "expected input to be 3-D (C, H, W) or 4-D", "[8, 8]"):
        ours(x[0, 0], w)
    with helpers.raises(RuntimeError, "expected input to be 3-D (C, H, W) or 4-D"):
        ours(x[None], w)
    with helpers.raises(RuntimeError, "expected weight to be 4-D", "[6, 4, 3]"):
        ours(x, w[..., 0])
    with helpers.raises(RuntimeError, "to have 4 channels", "but got 3 channels"):
        ours(x[:, :3], w)
    with helpers.raises(RuntimeError, "to have 8 channels", "groups=2", "but got 4 channels"):
        ours(x, w, groups=2)  # weight's C_in/groups = 4 means 8 input channels
    with helpers.raises(RuntimeError, "out_channels (6) to be divisible by groups=4"):
        ours(x, torch.randn(6, 1, 3, 3, device=device), groups=4)
    with helpers.raises(RuntimeError, "expected groups to be positive"):
        ours(x, w, groups=0)
    with helpers.raises(RuntimeError, "(dilated) kernel to fit in the padded input", "9x9", "8x8"):
        ours(x, torch.randn(6, 4, 9, 9, device=device))
    with helpers.raises(RuntimeError, "(dilated) kernel to fit", "9x9"):
        ours(x, w, dilation=4)
    with helpers.raises(RuntimeError, "expected stride to be positive", "stride=[0, 1]"):
        ours(x, w, stride=(0, 1))
    with helpers.raises(RuntimeError, "expected stride to be positive", "stride=[1, -2]"):
        ours(x, w, stride=(1, -2))
    with helpers.raises(RuntimeError, "expected padding to be non-negative"):
        ours(x, w, padding=-1)
    with helpers.raises(RuntimeError, "expected dilation to be positive"):
        ours(x, w, dilation=0)
    with helpers.raises(RuntimeError, "expected stride to have 2 values"):
        OPS.conv2d(x, w, b, [1, 1, 1], [0, 0], [1, 1], 1)
    with helpers.raises(RuntimeError, "expected weight to have the same dtype as input", "Double"):
        ours(x, w.double())
    with helpers.raises(RuntimeError, "expected bias to have the same dtype as input"):
        ours(x, w, b.double())
    with helpers.raises(NotImplementedError,
                        f"expected input to be a {SUPPORTED_DTYPES_TEXT} tensor", "Int"):
        ours(x.int(), w.int())
    with helpers.raises(NotImplementedError, SUPPORTED_DTYPES_TEXT,
                        "Float8_e4m3fn"):
        ours(x.to(torch.float8_e4m3fn), w.to(torch.float8_e4m3fn))
    with helpers.raises(RuntimeError, "expected bias of shape [6]", "but got bias of shape [5]"):
        ours(x, w, b[:5])
    with helpers.raises(RuntimeError, "expected bias of shape [6]", "[1, 6]"):
        ours(x, w, b[None])
    # the backward op re-checks everything, and grad_output's shape
    g = torch.randn(2, 6, 6, 6, device=device)
    with helpers.raises(RuntimeError, "expected grad_output of shape [2, 6, 6, 6]", "[2, 6, 6, 5]"):
        backward(g[..., :5], x, w)
    with helpers.raises(RuntimeError, "expected grad_output to have the same dtype as input"):
        backward(g.double(), x, w)
    with helpers.raises(RuntimeError, "to have 4 channels"):
        backward(g, x[:, :3], w)
