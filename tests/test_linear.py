"""pyengine.linear / linear_backward against torch.nn.functional.linear: hand-picked shapes,
layouts, special values, the backward op's output_mask, determinism, bad input. Random
configurations against torch, gradcheck and opcheck: tests/test_samples.py and test_fuzz.py."""
import pytest
import torch
import torch.nn.functional as F

import helpers
from helpers import devices, dtypes
from helpers import SUPPORTED_DTYPES_TEXT

OPS = torch.ops.pyengine


def ours(x, w, b=None):
    return OPS.linear(x, w, b)


# ---- Hand-picked shapes against torch ---------------------------------------------------------


@devices
@dtypes
@pytest.mark.parametrize("rows,inf,outf", [
    (256, 400, 120),  # LeNet fc1
    (64, 120, 84),    # LeNet fc2
    (1, 84, 10),      # LeNet fc3, batch 1
    (2, 300, 50),     # the dot kernel's 2-row tile
    (97, 13, 7),      # primes
    (3, 1000, 3),     # long reduction, tiny output
    (513, 17, 257),   # many tiles, ragged edges
    (37, 9, 4100),    # the GEMM's blocks: dx sums over > 4096 = NC columns, forward/dW cross KC
    (70, 600, 33),    # two k-blocks (of 300) with packed, strided panels and partial tiles
    (2500, 700, 70),  # row blocks of A (each half of L2) sharing B's packed panels, transposed
    (37, 3001, 91),   # the dot kernel's column blocks (half of L2 each: 1.1 MB of W) and edges
    (4096, 5, 8),     # narrow layers (the 5-8-4-1 classifier): vector per row, 8 row chunks
    (1100, 8, 1),     # ... one output, a partial last chunk
    (3, 16, 8),       # ... as wide as the narrow path goes (float)
])
def test_shapes(rows, inf, outf, dtype, device):
    x = torch.randn(rows, inf, dtype=dtype, device=device, requires_grad=True)
    w = torch.randn(outf, inf, dtype=dtype, device=device, requires_grad=True)
    b = torch.randn(outf, dtype=dtype, device=device, requires_grad=True)
    y = ours(x, w, b)
    gy = torch.randn_like(y)
    y.backward(gy)
    # Reference: torch in float64; float32 results are held to 1e-5 of their largest entry
    # (sums of up to 4100 terms).
    ref = [t.detach().double().requires_grad_() for t in (x, w, b)]
    yr = F.linear(*ref)
    yr.backward(gy.double())
    for got, want in zip((y, x.grad, w.grad, b.grad), (yr, *(t.grad for t in ref))):
        tol = dict(rtol=1e-4, atol=1e-5 * max(1.0, want.abs().max().item())) \
            if dtype == torch.float32 else {}
        helpers.assert_close(got.double(), want.detach(), dtype, **tol)


@devices
@dtypes
def test_one_dim_input(dtype, device):
    x = torch.randn(7, dtype=dtype, device=device, requires_grad=True)
    w = torch.randn(5, 7, dtype=dtype, device=device, requires_grad=True)
    b = torch.randn(5, dtype=dtype, device=device, requires_grad=True)
    y = helpers.compare_with_torch(ours, F.linear, [x, w, b], dtype)
    assert y.shape == (5,)
    gi, gw, gb = OPS.linear_backward(torch.ones(5, dtype=dtype, device=device), x.detach(),
                                     w.detach(), [True, True, True])
    assert gi.shape == (7,) and gw.shape == (5, 7) and gb.shape == (5,)


@devices
@dtypes
def test_zero_rows(dtype, device):
    x = torch.randn(0, 6, dtype=dtype, device=device)
    w = torch.randn(4, 6, dtype=dtype, device=device)
    b = torch.randn(4, dtype=dtype, device=device)
    y = ours(x, w, b)
    assert y.shape == (0, 4)
    assert ours(torch.randn(3, 0, 6, dtype=dtype, device=device), w).shape == (3, 0, 4)
    gi, gw, gb = OPS.linear_backward(torch.empty(0, 4, dtype=dtype, device=device), x, w,
                                     [True, True, True])
    assert gi.shape == (0, 6)
    assert torch.equal(gw, torch.zeros_like(w)) and torch.equal(gb, torch.zeros_like(b))


@devices
@dtypes
def test_zero_features(dtype, device):
    x = torch.randn(3, 0, dtype=dtype, device=device, requires_grad=True)
    w = torch.randn(4, 0, dtype=dtype, device=device, requires_grad=True)
    b = torch.randn(4, dtype=dtype, device=device, requires_grad=True)
    helpers.compare_with_torch(ours, F.linear, [x, w, b], dtype)
    assert torch.equal(ours(x, w).detach(), torch.zeros(3, 4, dtype=dtype, device=device))
    assert ours(x, torch.randn(0, 0, dtype=dtype, device=device)).shape == (3, 0)


# ---- Layouts and special values -----------------------------------------------------------


@devices
@dtypes
def test_noncontiguous_and_transposed_weight(dtype, device):
    x = helpers.noncontiguous(torch.randn(4, 6, 33, dtype=dtype, device=device))
    w = torch.randn(33, 21, dtype=dtype, device=device).t()  # (out, in) view of (in, out) storage
    b = helpers.noncontiguous(torch.randn(21, dtype=dtype, device=device))
    assert not x.is_contiguous() and not w.is_contiguous() and not b.is_contiguous()
    for t in (x, w, b):
        t.requires_grad_()
    y = helpers.compare_with_torch(ours, F.linear, [x, w, b], dtype)
    assert y.is_contiguous()
    x2 = torch.randn(5, 40, dtype=dtype, device=device).t()  # a transposed input
    helpers.assert_close(ours(x2, w[:, :5].contiguous()), F.linear(x2, w[:, :5]))
    g = helpers.noncontiguous(torch.randn(4, 6, 21, dtype=dtype, device=device))
    got = OPS.linear_backward(g, x.detach(), w.detach(), [True, True, True])
    want = OPS.linear_backward(g.contiguous(), x.detach().contiguous(), w.detach().contiguous(),
                               [True, True, True])
    # torch's own gradients for these arguments: grad_weight of a transposed weight comes back
    # column-major (torch's mm backward), the others contiguous.
    torch_grads = torch.autograd.grad(F.linear(x, w, b), (x, w, b), g)
    assert torch_grads[1].t().is_contiguous()
    for a, e, t in zip(got, want, torch_grads):
        helpers.assert_same_strides(a, t)
        torch.testing.assert_close(a, e, rtol=0, atol=0)


@dtypes
@pytest.mark.parametrize("rows,inf,outf", [(3, 300, 50), (70, 600, 33), (300, 130, 70)])
@pytest.mark.parametrize("x_layout", ["padded", "transposed"])
def test_operands_read_where_they_lie(rows, inf, outf, x_layout, dtype):
    """A transposed weight (w.t() of an (in, out) matrix) and a 2-D input whose rows are padded
    apart (x[:, :in] of a wider one) or transposed are read in place by the GEMMs (a copy of a
    transposed 4096 x 4096 weight took longer than its product): forward and every gradient as
    torch's, on the dot kernel's few rows and the packed outer products' many."""
    x = (torch.randn(rows, inf + 5, dtype=dtype)[:, :inf] if x_layout == "padded"
         else torch.randn(inf, rows, dtype=dtype).t())
    w = torch.randn(inf, outf, dtype=dtype).t()
    b = torch.randn(outf, dtype=dtype)
    assert not x.is_contiguous() and not w.is_contiguous()
    ref = [t.double().requires_grad_() for t in (x, w, b)]
    want = F.linear(*ref)
    g = torch.randn_like(want)
    want_grads = torch.autograd.grad(want, ref, g)
    got = ours(x, w, b)
    got_grads = OPS.linear_backward(g.to(dtype), x, w, [True, True, True])
    for a, e in zip((got, *got_grads), (want, *want_grads)):
        tol = dict(rtol=1e-4, atol=1e-5 * max(1.0, e.abs().max().item())) \
            if dtype == torch.float32 else {}
        helpers.assert_close(a.double(), e.detach(), dtype, **tol)


@pytest.mark.parametrize("x_layout", ["padded", "transposed"])
def test_operands_read_where_they_lie_bfloat16(x_layout):
    """The same layouts in bfloat16 (cpu/gemm_bf16.cpp packs from any strides where the CPU has
    AVX512_BF16; float32 copies of the same strides elsewhere): the contiguous call's results
    (its very bits where gemm_bf16 runs, each element summed in one order whatever the layout;
    within bfloat16's rounding on the float32 GEMM, whose plan the strides may change)."""
    rows, inf, outf = 70, 600, 33
    x = (torch.randn(rows, inf + 5)[:, :inf] if x_layout == "padded"
         else torch.randn(inf, rows).t()).bfloat16()
    w = torch.randn(inf, outf).bfloat16().t()
    b = torch.randn(outf).bfloat16()
    g = torch.randn(rows, outf).bfloat16()
    got = [ours(x, w, b), *OPS.linear_backward(g, x, w, [True, True, True])]
    want = [ours(x.contiguous(), w.contiguous(), b),
            *OPS.linear_backward(g, x.contiguous(), w.contiguous(), [True, True, True])]
    for a, e in zip(got, want):
        helpers.assert_close(a, e, torch.bfloat16)


def test_operands_read_where_they_lie_gradcheck():
    x = torch.randn(6, 11, dtype=torch.float64)[:, :9].requires_grad_()
    w = torch.randn(9, 7, dtype=torch.float64).t().detach().requires_grad_()
    b = torch.randn(7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(ours, (x, w, b))
    assert torch.autograd.gradgradcheck(ours, (x, w, b))


@devices
@dtypes
def test_nan_and_inf_propagate(dtype, device):
    x = torch.randn(6, 20, dtype=dtype, device=device)
    x[1, 3] = float("nan")
    x[4, 0] = float("inf")
    x[5, 7] = float("-inf")
    w = torch.randn(9, 20, dtype=dtype, device=device)
    b = torch.randn(9, dtype=dtype, device=device)
    y = ours(x, w, b)
    helpers.assert_close(y, F.linear(x, w, b))
    assert y[1].isnan().all() and y[4].isinf().all()
    g = torch.randn(6, 9, dtype=dtype, device=device)
    g[2, 2] = float("nan")
    got = OPS.linear_backward(g, x, w, [True, True, True])
    xr, wr, br = (t.clone().requires_grad_() for t in (x, w, b))
    F.linear(xr, wr, br).backward(g)
    for a, e in zip(got, (xr.grad, wr.grad, br.grad)):
        helpers.assert_close(a, e)


# ---- The backward op directly --------------------------------------------------------------


@devices
@pytest.mark.parametrize("mask", [(a, b, c) for a in (0, 1) for b in (0, 1) for c in (0, 1)])
def test_output_mask(mask, device):
    mask = tuple(bool(m) for m in mask)
    x = torch.randn(3, 5, 11, dtype=torch.float64, device=device, requires_grad=True)
    w = torch.randn(7, 11, dtype=torch.float64, device=device, requires_grad=True)
    b = torch.zeros(7, dtype=torch.float64, device=device, requires_grad=True)
    y = F.linear(x, w, b)
    g = torch.randn_like(y)
    want = torch.autograd.grad(y, (x, w, b), g)
    got = OPS.linear_backward(g, x.detach(), w.detach(), list(mask))
    for m, a, e in zip(mask, got, want):
        if m:
            assert a is not None and a.is_contiguous()
            helpers.assert_close(a, e)
        else:
            assert a is None


# ---- Determinism ---------------------------------------------------------------------------


@devices
def test_backward_is_deterministic(device):
    x = torch.randn(256, 400, device=device)
    w = torch.randn(120, 400, device=device)
    g = torch.randn(256, 120, device=device)
    first = OPS.linear_backward(g, x, w, [True, True, True])
    for _ in range(2):
        for a, e in zip(OPS.linear_backward(g, x, w, [True, True, True]), first):
            assert torch.equal(a, e)


def test_few_rows_bitwise_as_within_a_full_tile():
    """y = x W^T of 1 or 2 rows (the dot kernel's own 1- and 2-row tiles) gives the bits those
    rows get inside a product of 7 (a 6-row tile and a 1-row edge): each element is the same sum
    whatever the tile."""
    x = torch.randn(7, 300)
    w = torch.randn(50, 300)
    full = ours(x, w)
    assert torch.equal(ours(x[:1], w), full[:1])
    assert torch.equal(ours(x[:2], w), full[:2])
    assert torch.equal(ours(x[6:], w), full[6:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_grad_weight_of_one_row_as_the_tiles(dtype):
    """grad_weight at batch 1 is a product of one k (the GEMM's rank-one pass, no tiles): the
    bits the tiles give when a zero row is added (the same product, then + 0 * x), signed zeros
    included, with grad_output read as it lies or transposed."""
    x = torch.randn(1, 300, dtype=dtype)
    x[0, ::7] = 0.0
    x[0, 3::7] = -0.0
    w = torch.randn(70, 300, dtype=dtype)
    g = torch.randn(1, 70, dtype=dtype)
    g[0, ::5] = -g[0, ::5]
    want = OPS.linear_backward(torch.cat([g, torch.zeros_like(g)]), torch.cat([x, x]), w,
                               [False, True, False])[1]
    got = OPS.linear_backward(g, x, w, [False, True, False])[1]
    assert torch.equal(got, want) and torch.equal(got.signbit(), want.signbit())
    assert torch.equal(got, g.t() * x)  # (one product each)
    got_t = OPS.linear_backward(g.t().contiguous().t(), x, w, [False, True, False])[1]
    assert torch.equal(got_t, got) and torch.equal(got_t.signbit(), got.signbit())


# GEMM (one and several row blocks per task, two k blocks); narrow path
@pytest.mark.parametrize("rows,inf,outf", [(300, 130, 70), (2500, 700, 70), (1100, 5, 8)])
def test_independent_of_thread_count(rows, inf, outf):
    x = torch.randn(rows, inf)
    w = torch.randn(outf, inf)
    b = torch.randn(outf)
    g = torch.randn(rows, outf)
    before = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append((ours(x, w, b), *OPS.linear_backward(g, x, w, [True, True, True])))
    finally:
        torch.set_num_threads(before)
    for r in results[1:]:
        for a, e in zip(r, results[0]):
            assert torch.equal(a, e)


def test_output_past_the_caches():
    """A C written once and larger than 16 MB is stored past the caches (gemm.cpp's
    stream_c): the same results, bias included, as the reference; a channels_last 1x1
    convolution's forward (25.7 MB) takes the same path."""
    x = torch.randn(20480, 64)
    w = torch.randn(512, 64)
    b = torch.randn(512)
    y = ours(x, w, b)
    for r in range(0, x.shape[0], 4096):  # float64 reference, a block of rows at a time
        want = F.linear(x[r:r + 4096].double(), w.double(), b.double())
        torch.testing.assert_close(y[r:r + 4096].double(), want, rtol=1e-4, atol=1e-4)
    xc = torch.randn(8, 64, 56, 56).to(memory_format=torch.channels_last)
    wc = torch.randn(256, 64, 1, 1).to(memory_format=torch.channels_last)
    bc = torch.randn(256)
    yc = OPS.conv2d(xc, wc, bc, [1, 1], [0, 0], [1, 1], 1)
    assert yc.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(yc, F.conv2d(xc, wc, bc), rtol=1e-4, atol=1e-4)


# ---- Every compiled instruction set ----------------------------------------------------------

_ISA_SCRIPT = r"""
import pyengine, differential, samples
for sample in samples.samples("linear"):
    for case in samples.in_both_dtypes(sample):
        differential.check(case)
print("ok")
"""


@pytest.mark.parametrize("isa", ["avx2", "default"])
def test_lower_instruction_sets(isa):
    """The GEMM is compiled for AVX-512, AVX2 and baseline x86-64; force the ones this machine
    would not pick (PYENGINE_CPU_ISA, read at load) in a fresh process, on linear's samples
    (tests/samples.py) in both dtypes."""
    helpers.run_with_cpu_isa(isa, _ISA_SCRIPT)


# ---- Bad input -----------------------------------------------------------------------------


@devices
def test_bad_input(device):
    x = torch.randn(4, 10, device=device)
    w = torch.randn(6, 10, device=device)
    b = torch.randn(6, device=device)
    with helpers.raises(RuntimeError, "expected input to have at least 1 dim", "0-d"):
        ours(torch.tensor(1.0, device=device), w)
    with helpers.raises(RuntimeError, "expected weight to be 2-D (out_features, in_features)",
                        "[6, 10, 1]"):
        ours(x, w[..., None])
    with helpers.raises(RuntimeError, "expected weight to be 2-D", "[10]"):
        ours(x, w[0])
    with helpers.raises(RuntimeError, "input's last dim to equal weight's in_features (10)",
                        "[4, 9]"):
        ours(x[:, :9], w)
    with helpers.raises(RuntimeError, "expected weight to have the same dtype as input", "Double"):
        ours(x, w.double())
    with helpers.raises(RuntimeError, "expected bias to have the same dtype as input"):
        ours(x, w, b.double())
    with helpers.raises(NotImplementedError,
                        f"expected input to be a {SUPPORTED_DTYPES_TEXT} tensor", "Long"):
        ours(x.long(), w.long())
    with helpers.raises(RuntimeError, "expected bias of shape [6]", "[5]"):
        ours(x, w, b[:5])
    with helpers.raises(RuntimeError, "expected bias of shape [6]", "[6, 1]"):
        ours(x, w, b[:, None])
    g = torch.randn(4, 6, device=device)
    with helpers.raises(RuntimeError, "expected grad_output of shape [4, 6]", "[4, 5]"):
        OPS.linear_backward(g[:, :5], x, w, [True, True, True])
    with helpers.raises(RuntimeError, "expected grad_output to have the same dtype as input"):
        OPS.linear_backward(g.double(), x, w, [True, True, True])
    with helpers.raises(RuntimeError, "in_features"):
        OPS.linear_backward(g, x[:, :9], w, [True, True, True])
