"""conv2d_relu_max_pool2d's backward when no grad_input is wanted (a network's first layer, as
LeNet's conv1): where grad_weight comes from the direct kernel, the CPU makes each image's
convolution gradient where that kernel reads it instead of a batch-sized gradient image. The
gradients must be bit for bit those of the general path (grad_input wanted too) and torch's
within float tolerance; a bad index still raises, naming it. (The samples, the fuzz lane and
the models' tests cover the operator at large.)

Its forward pools inside the convolution where it can: in the transposed layout of a
batch-innermost convolution (LeNet's conv2: stride 1, output rows of at most 16, 16+ images;
2x2 / stride-2 pooling), image by image after a direct one (LeNet's conv1). Either way it must
give the bits and indices of conv2d, then max_pool2d_with_indices, then relu.

In float32 with AVX-512 the backward sums the gradients over the pool's windows instead (each
window's gradient times the patch under its index's pixel): torch's gradients within float
tolerance, the same bits at any thread count, the dense kernels' NaNs where x or w is not finite
(last section)."""
import pytest
import torch
import torch.nn.functional as F

import helpers
import pyengine  # noqa: F401  (registers the operators)

P = torch.ops.pyengine


def _geometry(pool_kernel, pool_stride):
    return ([1, 1], [0, 0], [1, 1], 1, [pool_kernel] * 2, [pool_stride] * 2, [0, 0], [1, 1],
            False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [
    # (batch, C_in, C_out, size, kernel, pool kernel, pool stride)
    (256, 1, 6, 32, 5, 2, 2),   # LeNet's conv1 at a training batch
    (3, 1, 6, 32, 5, 2, 2),     # fewer images than threads' chunks
    (3, 2, 5, 30, 3, 3, 2),     # overlapping windows: gradients add up
    (2, 1, 4, 33, 5, 2, 1),     # stride-1 pooling, odd size
    (2, 1, 6, 31, 4, 2, 2),     # an odd plane: its last row and column get no gradient
])
def test_backward_without_grad_input(shape, dtype):
    n, cin, cout, size, k, pk, ps = shape
    torch.manual_seed(sum(shape))
    x = torch.randn(n, cin, size, size, dtype=dtype)
    w = torch.randn(cout, cin, k, k, dtype=dtype) * 0.3
    b = torch.randn(cout, dtype=dtype) * 0.1
    geometry = _geometry(pk, ps)
    out, idx = P.conv2d_relu_max_pool2d(x, w, b, *geometry)
    g = torch.randn_like(out)
    _, gw, gb = P.conv2d_relu_max_pool2d_backward(g, out, idx, x, w, *geometry,
                                                  [False, True, True])
    _, gw_all, gb_all = P.conv2d_relu_max_pool2d_backward(g, out, idx, x, w, *geometry,
                                                          [True, True, True])
    assert torch.equal(gw, gw_all) and torch.equal(gb, gb_all)
    _, gw_only, gb_none = P.conv2d_relu_max_pool2d_backward(g, out, idx, x, w, *geometry,
                                                            [False, True, False])
    assert torch.equal(gw_only, gw) and gb_none is None
    # torch, in float64, through the same windows
    wr, br = w.double().requires_grad_(), b.double().requires_grad_()
    ref = F.max_pool2d(F.relu(F.conv2d(x.double(), wr, br)), pk, ps)
    ref.backward(g.double())
    tol = dict(rtol=1e-4, atol=1e-5 * max(1.0, wr.grad.abs().max().item())) \
        if dtype == torch.float32 else {}
    helpers.assert_close(gw.double(), wr.grad, dtype, **tol)
    helpers.assert_close(gb.double(), br.grad, dtype, **tol)


@pytest.mark.parametrize("cin,cout,size,plane,mask", [
    (1, 6, 32, 28, [False, True, True]),   # LeNet's conv1: no grad_input
    (6, 16, 14, 10, [False, True, True]),  # LeNet's conv2: the window sums' lists...
    (6, 16, 14, 10, [True, False, False]),  # ... for grad_input alone too
])
def test_backward_names_a_bad_index(cin, cout, size, plane, mask):
    x, w, b = torch.randn(4, cin, size, size), torch.randn(cout, cin, 5, 5), torch.randn(cout)
    geometry = _geometry(2, 2)
    out, idx = P.conv2d_relu_max_pool2d(x, w, b, *geometry)
    for bad in (-1, plane * plane):
        idx_bad = idx.clone()
        idx_bad[2, 3, 4, 1] = bad
        with helpers.raises(RuntimeError, f"indices[2, 3, 4, 1] = {bad} lies outside the "
                            f"{plane}x{plane} convolution output plane"):
            P.conv2d_relu_max_pool2d_backward(torch.ones_like(out), out, idx_bad, x, w,
                                              *geometry, mask)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch,cin,cout,size,k,bias,channels_last", [
    # batch-innermost convolutions, pooled in that layout:
    (16, 3, 8, 14, 3, True, False),   # LeNet conv2's shape class: 12x12 output, 6x6 pooled
    (300, 3, 8, 12, 3, False, False),  # two batch chunks (256 + 44), no bias
    (33, 3, 8, 13, 3, True, True),    # odd output (11x11): its last row and column in no window
    (20, 3, 8, 6, 3, True, False),    # a 4x4 output
    # direct convolutions, pooled image by image:
    (5, 1, 6, 32, 5, True, False),    # LeNet's conv1
    (3, 2, 4, 21, 3, False, True),    # odd output (19x19), two input channels
])
def test_forward_pooled_inside_the_convolution_is_the_unfused_chain_bitwise(
        batch, cin, cout, size, k, bias, channels_last, dtype):
    # Small integers: the convolution is exact, so windows hold ties (the earlier tap wins),
    # negative maxima (relu gives +0) and, from the NaN and Inf planted in x, NaN and Inf ones.
    gen = torch.Generator().manual_seed(batch + size)
    x = torch.randint(-2, 3, (batch, cin, size, size), generator=gen).to(dtype)
    x[0, 0, 0, 0] = float("nan")
    x[1, cin - 1, 4, 5] = float("inf")
    w = torch.randint(-1, 2, (cout, cin, k, k), generator=gen).to(dtype)
    b = torch.randint(-2, 3, (cout,), generator=gen).to(dtype) if bias else None
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    geometry = _geometry(2, 2)
    out, idx = P.conv2d_relu_max_pool2d(x, w, b, *geometry)

    y = P.conv2d(x, w, b, [1, 1], [0, 0], [1, 1], 1)
    pooled, ref_idx = P.max_pool2d_with_indices(y, [2, 2], [2, 2], [0, 0], [1, 1], False)
    ref = P.relu(pooled)
    bits = torch.int32 if dtype == torch.float32 else torch.int64
    assert torch.equal(out.contiguous().view(bits), ref.contiguous().view(bits))
    assert torch.equal(idx, ref_idx)
    assert out.stride() == ref.stride() and idx.stride() == ref_idx.stride()
    assert ref.isnan().any() and (ref == float("inf")).any() and (ref == 0).any()
    # torch's indices too (its convolution is exact on these values as well).
    _, torch_idx = F.max_pool2d(F.conv2d(x, w, b), 2, return_indices=True)
    assert torch.equal(idx, torch_idx)


@pytest.mark.parametrize("batch", [64, 200])
def test_forward_batch_innermost_same_bits_at_any_thread_count(batch):
    # From 64 images a thread the forward splits the batch between the threads by images (below
    # that, as at 64, by bands of output rows): 200 images are one chunk on one thread, slices
    # of 112 + 88 on two, 80 + 64 + 56 on three. Random values, so that a lane summed in
    # another order shows: the cost model picks other GEMM tiles (and k blocks) for 80 or 88
    # lanes than for 200, which this caught.
    gen = torch.Generator().manual_seed(batch)
    x = torch.randn(batch, 6, 14, 14, generator=gen)
    w = torch.randn(16, 6, 5, 5, generator=gen) * 0.2
    b = torch.randn(16, generator=gen)
    geometry = _geometry(2, 2)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append((*P.conv2d_relu_max_pool2d(x, w, b, *geometry),
                            P.conv2d(x, w, b, [1, 1], [0, 0], [1, 1], 1)))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        assert all(torch.equal(a, e) for a, e in zip(other, results[0]))
    helpers.assert_close(results[0][2], F.conv2d(x, w, b), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch,size,moved_index", [
    (16, 14, False),   # LeNet conv2's block: unpooled straight into the batch-innermost layout
    (300, 14, False),  # two batch chunks
    (20, 15, False),   # an 11x11 output: its last row and column are in no window (gradient 0)
    (20, 14, True),    # a hand-made index outside its window (in its plane): the general path
])
def test_backward_unpooled_batch_innermost_is_the_unfused_chain(batch, size,
                                                                        moved_index, dtype):
    gen = torch.Generator().manual_seed(batch * size)
    x = torch.randn(batch, 6, size, size, generator=gen, dtype=dtype)
    w = torch.randn(16, 6, 5, 5, generator=gen, dtype=dtype) * 0.3
    b = torch.randn(16, generator=gen, dtype=dtype)
    geometry = _geometry(2, 2)
    out, idx = P.conv2d_relu_max_pool2d(x, w, b, *geometry)
    if moved_index:
        idx = idx.clone()
        idx[3, 2, 1, 1] = 0  # window (1, 1) covers pixels 22, 23, 32, 33 of the 10x10 plane
    g = torch.randn(out.shape, generator=gen, dtype=dtype)
    ours = P.conv2d_relu_max_pool2d_backward(g, out, idx, x, w, *geometry, [True, True, True])
    # The chain: relu's step on the pooled result, max_pool2d_backward's scatter, conv2d_backward.
    conv_out = P.conv2d(x, w, b, [1, 1], [0, 0], [1, 1], 1)
    masked = torch.where(out > 0, g, torch.zeros_like(g))
    dy = P.max_pool2d_backward(masked, conv_out, idx, [2, 2], [2, 2], [0, 0], [1, 1], False)
    ref = P.conv2d_backward(dy, x, w, [1, 1], [0, 0], [1, 1], 1, [True, True, True])
    # float32's gradients may be summed over the windows instead (AVX-512: see
    # test_grads_summed_over_windows): the same terms, in another order.
    for name, a, r in zip(("grad_input", "grad_weight", "grad_bias"), ours, ref):
        if dtype == torch.float64:
            assert torch.equal(a, r), name
        else:
            helpers.assert_close(a, r, dtype, rtol=1e-5, atol=1e-5 * r.abs().max().item())


# ---- The gradients summed over the pool's windows (cpu/conv2d_pooled_grad.cpp) -----------------
# float32 with AVX-512: each window adds its gradient times the patch under its index's pixel to
# grad_weight, and times the weights to grad_input's patch.
# Geometries: LeNet's two blocks (conv2's patch rows padded to whole vectors), padding, stride,
# groups, overlapping and ceil_mode pools, patches of 1 to 13 vectors, a 1x1 kernel, batches over
# several blocks of images (70: 9 blocks of 8; 600: 60 of 10).
WINDOW_SUM_CASES = [
    # (batch, C_in, C_out, size, kernel, stride, padding, groups, pool kernel, stride, padding,
    #  ceil_mode)
    (64, 1, 6, 32, 5, 1, 0, 1, 2, 2, 0, False),
    (70, 6, 16, 14, 5, 1, 0, 1, 2, 2, 0, False),
    (600, 2, 3, 9, 3, 1, 1, 1, 2, 2, 0, False),
    (5, 4, 6, 17, 3, 2, 1, 2, 3, 2, 1, True),
    (3, 3, 5, 20, 8, 1, 0, 1, 2, 2, 0, False),
    (3, 2, 4, 21, 7, 1, 3, 1, 3, 1, 1, False),
    (4, 5, 7, 11, 1, 1, 0, 1, 2, 2, 0, True),
    (1, 1, 2, 6, 2, 1, 0, 1, 2, 2, 0, False),
    (6, 8, 5, 12, 5, 1, 2, 1, 2, 2, 0, False),  # 200 taps: 13 vectors, in two passes (12 + 1)
    (4, 3, 6, 15, 3, 2, 1, 3, 2, 2, 0, False),  # one input channel a group: grad_weight alone
                                                # from the image's kernel rows
    (2, 20, 4, 19, 3, 1, 1, 1, 2, 2, 0, False),  # 20 channels, 21 padded columns: the
                                                 # channels-last copies in blocks of 16 x 16
]


def _block(case, dtype=torch.float32, seed=0):
    n, cin, cout, size, k, s, p, groups, pk, ps, pp, cm = case
    gen = torch.Generator().manual_seed(seed + sum(case[:5]))
    x = torch.randn(n, cin, size, size, generator=gen, dtype=dtype)
    w = torch.randn(cout, cin // groups, k, k, generator=gen, dtype=dtype) * 0.3
    b = torch.randn(cout, generator=gen, dtype=dtype) * 0.1
    geometry = ([s, s], [p, p], [1, 1], groups, [pk, pk], [ps, ps], [pp, pp], [1, 1], cm)
    return x, w, b, geometry


def _torch_grads(x, w, b, geometry, g):
    s, p, _, groups, pk, ps, pp, _, cm = geometry
    xr, wr, br = (t.double().requires_grad_() for t in (x, w, b))
    ref = F.max_pool2d(F.relu(F.conv2d(xr, wr, br, s, p, 1, groups)), pk, ps, pp, ceil_mode=cm)
    ref.backward(g.double())
    return xr.grad, wr.grad, br.grad


@pytest.mark.parametrize("case", WINDOW_SUM_CASES)
def test_grads_summed_over_windows(case):
    x, w, b, geometry = _block(case)
    out, idx = P.conv2d_relu_max_pool2d(x, w, b, *geometry)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    g[0, 0].zero_()  # windows whose gradient is 0 are left out of the sums
    ours = P.conv2d_relu_max_pool2d_backward(g, out, idx, x, w, *geometry, [True, True, True])
    want = _torch_grads(x, w, b, geometry, g)
    for got, ref in zip(ours, want):
        helpers.assert_close(got.double(), ref, torch.float32, rtol=1e-4,
                             atol=1e-5 * max(1.0, ref.abs().max().item()))
    # Each without the others, and the same bits at one thread and at two (a fixed split of
    # the batch into blocks, added in order).
    for mask in ([False, True, True], [False, False, True], [True, False, False]):
        some = P.conv2d_relu_max_pool2d_backward(g, out, idx, x, w, *geometry, mask)
        for asked, got, full in zip(mask, some, ours):
            assert torch.equal(got, full) if asked else got is None, mask
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            again = P.conv2d_relu_max_pool2d_backward(g, out, idx, x, w, *geometry,
                                                      [True, True, True])
            assert all(torch.equal(a, o) for a, o in zip(again, ours)), n
    finally:
        torch.set_num_threads(threads)


def test_grads_summed_over_windows_non_finite():
    # An inf in x (in w): the dense sums give NaN where a window's 0 meets it (0 * inf) in
    # grad_weight (grad_input), which a sum over the kept windows would miss: such inputs take
    # the dense kernels, as torch. A NaN gradient in a kept window reaches every tap of its
    # channel and its patch of grad_input, as in torch.
    case = (8, 2, 4, 12, 3, 1, 0, 1, 2, 2, 0, False)
    x, w, b, geometry = _block(case)
    x[3, 1, 5, 6] = float("inf")
    w[2, 1, 0, 2] = float("inf")
    out, idx = P.conv2d_relu_max_pool2d(x, w, b, *geometry)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    kept = (out > 0).nonzero()[0].tolist()
    g[tuple(kept)] = float("nan")
    ours = P.conv2d_relu_max_pool2d_backward(g, out, idx, x, w, *geometry, [True, True, True])
    want = _torch_grads(x, w, b, geometry, g)
    for got, ref in zip(ours, want):
        assert torch.equal(got.isnan(), ref.isnan()) and got.isnan().any()
        helpers.assert_close(got.double(), ref, torch.float32, rtol=1e-4, atol=1e-4)
