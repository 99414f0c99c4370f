"""torch.ops.pyengine.{mse_loss, binary_cross_entropy, cross_entropy} and their backward ops
against torch.nn.functional: the backward ops directly, log clamps, binary_cross_entropy's target
gradient, ignored and unbatched targets, label smoothing, class-probability targets, special
values, float32 sums, layouts, determinism, bad input. Random shapes and
options against torch, gradcheck and opcheck: tests/test_samples.py and test_fuzz.py."""
import warnings

import pytest
import torch
import torch.nn.functional as F

import helpers
import pyengine.functional as PF
from helpers import devices, dtypes
from helpers import SUPPORTED_DTYPES_TEXT

P = torch.ops.pyengine
REDUCTIONS = helpers.REDUCTION_ENUM
reductions = pytest.mark.parametrize("reduction", list(REDUCTIONS))
weighted = pytest.mark.parametrize("weighted", [False, True], ids=["noweight", "weight"])


def quietly(fn):
    """torch warns about some legal calls (mean of an empty tensor); the comparison is the test."""
    def run(*args):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fn(*args)
    return run


# ---- mse_loss -------------------------------------------------------------------------------

def mse_pair(reduction):
    r = REDUCTIONS[reduction]
    ours = quietly(lambda x, t, w=None: P.mse_loss(x, t, w, r))
    theirs = quietly(lambda x, t, w=None: F.mse_loss(x, t, reduction=reduction, weight=w))
    return ours, theirs


# name: (torch's loss, pyengine's backward op as (g, input, target, weight, reduction) -> grad,
# which argument's gradient it gives)
BACKWARD_OPS = {
    "mse_loss input": (F.mse_loss, P.mse_loss_backward, 0),
    # (x - t)^2 is symmetric in x and t: d/d(target) is the same op with the two swapped
    "mse_loss target": (F.mse_loss, lambda g, x, t, w, r: P.mse_loss_backward(g, t, x, w, r), 1),
    "binary_cross_entropy input": (F.binary_cross_entropy, P.binary_cross_entropy_backward, 0),
    "binary_cross_entropy target": (F.binary_cross_entropy,
                                    P.binary_cross_entropy_target_backward, 1),
}


@devices
@dtypes
@reductions
@pytest.mark.parametrize("name", list(BACKWARD_OPS))
def test_pointwise_backward_ops_directly(device, dtype, reduction, name):
    loss, backward_op, wrt = BACKWARD_OPS[name]
    r = REDUCTIONS[reduction]
    x = torch.rand(4, 6, dtype=dtype, device=device)
    t = torch.rand(4, 6, dtype=dtype, device=device)
    w = torch.rand(4, 6, dtype=dtype, device=device)
    g = torch.randn((4, 6) if r == 0 else (), dtype=dtype, device=device)
    for weight in (None, w):
        leaves = [x.clone().requires_grad_(wrt == 0), t.clone().requires_grad_(wrt == 1)]
        loss(*leaves, weight=weight, reduction=reduction).backward(g)
        helpers.assert_close(backward_op(g, x, t, weight, r), leaves[wrt].grad)


# ---- binary_cross_entropy -------------------------------------------------------------------

def bce_pair(reduction):
    r = REDUCTIONS[reduction]
    ours = quietly(lambda p, y, w=None: P.binary_cross_entropy(p, y, w, r))
    theirs = quietly(lambda p, y, w=None: F.binary_cross_entropy(p, y, w, reduction=reduction))
    return ours, theirs


@devices
@dtypes
@reductions
@weighted
def test_binary_cross_entropy_at_zero_and_one(device, dtype, reduction, weighted):
    # log(0) is clamped at -100 and the input gradient's denominator bounded by 1e-12, as torch;
    # the target gradient, g * w * -logit(p), is not clamped, as torch's: +inf at p = 0, -inf at
    # p = 1, large but finite near them.
    ours, theirs = bce_pair(reduction)
    p = torch.tensor([0.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.5, 1e-30, 0.999], dtype=dtype,
                     device=device)
    y = torch.tensor([0.0, 1.0, 0.0, 1.0, 0.3, 0.7, 1.0, 0.2, 0.6], dtype=dtype, device=device)
    w = [torch.rand(9, dtype=dtype, device=device) + 0.1] if weighted else []
    for grads in ((True, False), (True, True), (False, True)):
        args = [p.clone().requires_grad_(grads[0]), y.clone().requires_grad_(grads[1])] + w
        out = helpers.compare_with_torch(ours, theirs, args, dtype)
    assert torch.isfinite(out).all()
    if reduction == "none" and not weighted:
        assert out[1].item() == pytest.approx(100.0) and out[2].item() == pytest.approx(100.0)
    yr = y.clone().requires_grad_()
    P.binary_cross_entropy(p, yr, None, 2).backward()
    assert yr.grad[0] == float("inf") and yr.grad[2] == -float("inf") and yr.grad[6] == 0


@devices
def test_binary_cross_entropy_grad_clamp_matches_torch_in_float64(device):
    # torch bounds the gradient's denominator by 1e-12 rounded to float32, also for float64.
    p = torch.tensor([0.0, 1.0], dtype=torch.float64, device=device)
    y = torch.tensor([1.0, 0.0], dtype=torch.float64, device=device)
    g = torch.ones(2, dtype=torch.float64, device=device)
    ours = P.binary_cross_entropy_backward(g, p, y, None, 0)
    theirs = torch.ops.aten.binary_cross_entropy_backward(g, p, y, None, 0)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=0)


# ---- operands expanded over leading dims (cpu/loss.cpp reads the repeated block in place) ----

# (input shape, the repeated block's shape): periods that divide the 4096-element chunks and
# periods that do not, a block of one element, two expanded leading dims
EXPANDED = [((4096 + 17, 3), (3,)), ((37, 300), (300,)), ((9, 1024), (1024,)), ((5000, 1), (1,)),
            ((3, 7, 129), (129,)), ((4, 3, 2, 5), (2, 5))]


@pytest.mark.parametrize("shapes", EXPANDED, ids=lambda s: f"{list(s[0])}<-{list(s[1])}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@reductions
def test_losses_with_expanded_operands(shapes, dtype, reduction):
    """A target or weight that repeats a row over the batch (torch.expand; the weight
    pyengine.functional.binary_cross_entropy expands) gives bitwise the results of its contiguous
    copy, forward and every backward op, and matches torch."""
    shape, block = shapes
    r = REDUCTIONS[reduction]
    x = torch.rand(shape, dtype=dtype) * 0.98 + 0.01
    t = (torch.rand(block, dtype=dtype) * 0.98 + 0.01).expand(shape)
    w = (torch.rand(block, dtype=dtype) + 0.5).expand(shape)
    g = torch.randn(shape if r == 0 else (), dtype=dtype)
    calls = [
        lambda t, w: P.mse_loss(x, t, w, r), lambda t, w: P.mse_loss(x, t, None, r),
        lambda t, w: P.mse_loss_backward(g, x, t, w, r),
        lambda t, w: P.binary_cross_entropy(x, t, w, r),
        lambda t, w: P.binary_cross_entropy_backward(g, x, t, w, r),
        lambda t, w: P.binary_cross_entropy_target_backward(g, x, t, w, r),
    ]
    for call in calls:
        expanded, dense = call(t, w), call(t.contiguous(), w.contiguous())
        assert expanded.stride() == dense.stride()
        assert torch.equal(expanded, dense)
    helpers.assert_close(P.mse_loss(x, t, w, r),
                         F.mse_loss(x, t, weight=w, reduction=reduction))
    helpers.assert_close(P.binary_cross_entropy(x, t, w, r),
                         F.binary_cross_entropy(x, t, w, reduction=reduction))


# ---- cross_entropy --------------------------------------------------------------------------

def ce_pair(reduction, ignore_index=-100, label_smoothing=0.0):
    r = REDUCTIONS[reduction]
    ours = quietly(lambda x, t, w=None: P.cross_entropy(x, t, w, r, ignore_index,
                                                        label_smoothing))
    theirs = quietly(lambda x, t, w=None: F.cross_entropy(
        x, t, w, reduction=reduction, ignore_index=ignore_index,
        label_smoothing=label_smoothing))
    return ours, theirs


def ce_sample(n, c, dtype, device, ignore_index=-100, ignore_fraction=0.2, batched=True):
    x = (torch.randn(n, c, dtype=dtype, device=device) * 3).requires_grad_()
    t = torch.randint(0, c, (n,), device=device)
    t[torch.rand(n, device=device) < ignore_fraction] = ignore_index
    if not batched:
        x = x.detach()[0].requires_grad_()
        t = t[0]
    return x, t


@devices
@dtypes
@reductions
@weighted
def test_cross_entropy_unbatched(device, dtype, reduction, weighted):
    ours, theirs = ce_pair(reduction)
    for c in (1, 2, 7, 30):
        x, t = ce_sample(1, c, dtype, device, ignore_fraction=0.0, batched=False)
        assert x.shape == (c,) and t.shape == ()
        args = [x, t] + ([torch.rand(c, dtype=dtype, device=device) + 0.1] if weighted else [])
        out = helpers.compare_with_torch(ours, theirs, args, dtype)
        assert out.shape == ()
    # an ignored unbatched target contributes 0 ('none', 'sum') or NaN ('mean': 0 / 0)
    x = torch.randn(5, dtype=dtype, device=device, requires_grad=True)
    helpers.compare_with_torch(ours, theirs, [x, torch.tensor(-100, device=device)], dtype)


@devices
@dtypes
@reductions
@weighted
def test_cross_entropy_all_ignored(device, dtype, reduction, weighted):
    # 'mean' is 0 / 0 = NaN as torch; the gradient is all zeros.
    ours, theirs = ce_pair(reduction)
    x = torch.randn(4, 5, dtype=dtype, device=device, requires_grad=True)
    t = torch.full((4,), -100, device=device)
    args = [x, t] + ([torch.rand(5, dtype=dtype, device=device)] if weighted else [])
    helpers.compare_with_torch(ours, theirs, args, dtype)
    out = ours(*args)
    assert torch.isnan(out).all() if reduction == "mean" else (out == 0).all()


@devices
@dtypes
def test_cross_entropy_large_logits_stable(device, dtype):
    # log-softmax subtracts the row max: logits of +-1e4 stay finite, as torch.
    x = torch.tensor([[1e4, 0.0, -1e4], [-1e4, -1e4 + 1, -1e4 + 2]], dtype=dtype, device=device)
    t = torch.tensor([1, 0], device=device)
    out = helpers.compare_with_torch(*ce_pair("none"), [x.requires_grad_(), t], dtype)
    assert torch.isfinite(out).all()


@devices
@dtypes
@pytest.mark.parametrize("position", [0, 5, 8, 12, 17, 35], ids=lambda p: f"col{p}")
@pytest.mark.parametrize("special", ["nan", "inf", "-inf"])
def test_cross_entropy_special_logit_in_wide_rows(device, dtype, position, special):
    # Rows of 37 classes: rows go through two 16-lane blocks (8-lane for float64) and a scalar
    # tail; a special value in each of them must give what torch gives, for the target and another
    # class.
    x = torch.randn(2, 37, dtype=dtype, device=device)
    x[:, position] = float(special)
    t = torch.tensor([position, (position + 3) % 37], device=device)
    for reduction in ("none", "sum"):
        helpers.compare_with_torch(*ce_pair(reduction), [x.clone().requires_grad_(), t], dtype)


SMOOTHING = pytest.mark.parametrize("smoothing", [0.0, 0.3, 1.0])


@devices
@dtypes
@reductions
@SMOOTHING
def test_cross_entropy_label_smoothing_rows(device, dtype, reduction, smoothing):
    # Each kind of row alone and all together, with and without weights (a zero weight among
    # them), as torch: ignored rows count in neither term, an all-ignored 'mean' is NaN, a -inf
    # logit makes the smoothing term infinite (NaN where its weight is 0: 0 * -inf), an inf or
    # NaN logit the row NaN.
    nan, inf = float("nan"), float("inf")
    x = torch.tensor([[0.5, -1.0, 2.0, 0.0], [1.0, 1.0, 1.0, 1.0], [3.0, -inf, 0.0, 1.0],
                      [0.0, 1.0, inf, 2.0], [nan, 0.0, 1.0, 2.0], [2.0, 0.0, -1.0, 1.0]],
                     dtype=dtype, device=device)
    t = torch.tensor([2, 0, 3, 1, 2, -100], device=device)
    w = torch.tensor([0.5, 0.0, 2.0, 1.0], dtype=dtype, device=device)
    ours, theirs = ce_pair(reduction, label_smoothing=smoothing)
    for rows in ([0, 1, 5], [0], [2], [3], [4], [5], list(range(6))):
        for weight in (None, w):
            helpers.compare_with_torch(ours, theirs,
                                       [x[rows].clone().requires_grad_(), t[rows], weight], dtype)


@devices
@dtypes
@reductions
@SMOOTHING
def test_cross_entropy_probability_targets(device, dtype, reduction, smoothing):
    # Probability targets are whatever floats they are (rows need not sum to 1, may be negative
    # or zero): loss and both gradients as torch, unbatched too; a -inf logit under a zero target
    # is NaN (0 * -inf), under a positive one an infinite loss.
    ours, theirs = ce_pair(reduction, label_smoothing=smoothing)
    inf = float("inf")
    x = torch.randn(5, 4, dtype=dtype, device=device) * 3
    x[3, 1] = -inf
    p = torch.rand(5, 4, dtype=dtype, device=device)
    p[0] = torch.tensor([1.0, 0.0, 0.0, 0.0])
    p[1] = torch.tensor([-0.5, 2.0, 0.0, 0.25])
    p[2] = 0.0
    w = torch.rand(4, dtype=dtype, device=device) + 0.1
    for rows in ([0, 1, 2, 4], [3], list(range(5))):
        for weight in (None, w):
            for input_grad, target_grad in ((True, False), (True, True), (False, True)):
                args = [x[rows].clone().requires_grad_(input_grad),
                        p[rows].clone().requires_grad_(target_grad), weight]
                helpers.compare_with_torch(ours, theirs, args, dtype)
    helpers.compare_with_torch(ours, theirs, [x[0].clone().requires_grad_(),
                                              p[1].clone().requires_grad_(), w], dtype)


@devices
@dtypes
@reductions
def test_cross_entropy_probability_targets_without_rows_or_classes(device, dtype, reduction):
    # (0, C) and (N, 0): 'none' gives N zeros, 'sum' 0, 'mean' NaN (torch's mean over no
    # element), and empty gradients.
    ours, theirs = ce_pair(reduction, label_smoothing=0.1)
    for shape in ((0, 4), (3, 0)):
        x = torch.randn(shape, dtype=dtype, device=device, requires_grad=True)
        p = torch.rand(shape, dtype=dtype, device=device, requires_grad=True)
        out = helpers.compare_with_torch(ours, theirs, [x, p], dtype)
        if reduction == "mean":
            assert torch.isnan(out)


@devices
@dtypes
@reductions
@pytest.mark.parametrize("kind", ["smoothed", "probabilities"])
def test_cross_entropy_backward_op_directly(device, dtype, reduction, kind):
    r = REDUCTIONS[reduction]
    x = torch.randn(6, 5, dtype=dtype, device=device)
    if kind == "smoothed":
        t = torch.tensor([0, 4, -100, 2, 2, 1], device=device)
    else:
        t = torch.rand(6, 5, dtype=dtype, device=device)
    w = torch.rand(5, dtype=dtype, device=device)
    g = torch.randn(6 if r == 0 else (), dtype=dtype, device=device)
    for weight in (None, w):
        xr = x.clone().requires_grad_()
        F.cross_entropy(xr, t, weight, reduction=reduction, label_smoothing=0.2).backward(g)
        helpers.assert_close(P.cross_entropy_backward(g, x, t, weight, r, -100, 0.2), xr.grad)


@devices
@pytest.mark.parametrize("scale", [1.0, 10.0, 40.0])
@pytest.mark.parametrize("kind", ["smoothed", "probabilities"])
def test_cross_entropy_smoothed_float32_accuracy(device, scale, kind):
    # The smoothed forms' float32 sums against float64 torch (logits spanning the float32 exp
    # range, so the smoothing term's sum of u_j (x_j - m) spans many magnitudes too).
    x = torch.randn(300, 37, device=device) * scale
    t = (torch.randint(0, 37, (300,), device=device) if kind == "smoothed"
         else torch.rand(300, 37, device=device))
    out = P.cross_entropy(x, t, None, 0, -100, 0.1)
    ref = F.cross_entropy(x.double(), t.double() if kind != "smoothed" else t, reduction="none",
                          label_smoothing=0.1)
    torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=3e-7 * scale)
    g = torch.randn(300, device=device)
    grad = P.cross_entropy_backward(g, x, t, None, 0, -100, 0.1)
    xr = x.double().requires_grad_()
    F.cross_entropy(xr, t.double() if kind != "smoothed" else t, reduction="none",
                    label_smoothing=0.1).backward(g.double())
    torch.testing.assert_close(grad.double(), xr.grad, rtol=1e-6, atol=3e-7)


@devices
@pytest.mark.parametrize("scale", [1.0, 10.0, 40.0])
def test_cross_entropy_float32_accuracy(device, scale):
    # float32 exps are ours (cpu/vec_math.h's polynomial): check them against float64 torch on
    # logits whose differences span the whole float32 exp range, down to where it underflows.
    x = torch.randn(300, 37, device=device) * scale
    t = torch.randint(0, 37, (300,), device=device)
    out = P.cross_entropy(x, t, None, 0, -100)
    ref = F.cross_entropy(x.double(), t, reduction="none")
    torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=3e-7)
    g = torch.randn(300, device=device)
    grad = P.cross_entropy_backward(g, x, t, None, 0, -100)
    xr = x.double().requires_grad_()
    F.cross_entropy(xr, t, reduction="none").backward(g.double())
    torch.testing.assert_close(grad.double(), xr.grad, rtol=1e-6, atol=3e-7)


# ---- cross_entropy_with_log_sum_exp and the backward that reads it ----------------------------

# (input shape, class dim): rows (the row kernels: a long row, narrow ones), unbatched, and
# (N, C, d1, d2) with 65 pixels an image (the column kernels: two whole blocks, a narrower one).
LSE_SHAPES = [((9, 1003), 1), ((40, 10), 1), ((7,), 0), ((3, 21, 5, 13), 1)]


def _lse_case(shape, dim, dtype, device, offset=0.0, scale=3.0):
    x = torch.randn(shape, dtype=dtype, device=device) * scale + offset
    t = torch.randint(0, shape[dim], shape[:dim] + shape[dim + 1:], device=device)
    if t.dim():
        t.view(-1)[::4] = -100
    return x, t


@devices
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16],
                         ids=str)
@pytest.mark.parametrize("offset", [0.0, 1e4], ids=["centred", "offset1e4"])
@pytest.mark.parametrize("shape,dim", LSE_SHAPES, ids=lambda v: str(v))
def test_cross_entropy_with_log_sum_exp_outputs(device, dtype, offset, shape, dim):
    # The loss is cross_entropy's; the pair per row is (hi, lo): hi the log-sum-exp rounded to
    # the dtype, lo the remainder rounded, so hi + lo is the log-sum-exp to about twice the
    # dtype's precision (float16 cannot hold 1e4 + log-sum-exp to its ulp: centred only).
    if dtype == torch.float16 and offset:
        pytest.skip("float16 logits near 1e4 are integers apart: covered centred")
    x, t = _lse_case(shape, dim, dtype, device, offset)
    w = torch.rand(shape[dim], dtype=dtype, device=device)
    for reduction in (0, 1, 2):
        loss, lse = P.cross_entropy_with_log_sum_exp(x, t, w, reduction, -100, 0.0)
        helpers.assert_close(loss, P.cross_entropy(x, t, w, reduction, -100, 0.0), dtype)
        assert lse.shape == t.shape + (2,) and lse.dtype == dtype
        # the log-sum-exp less the offset, exactly as float64 holds it (x - offset is exact):
        # the log-sum-exp itself, rounded to float64, is 2^-39 off at 1e4
        want = torch.logsumexp(x.double() - offset, dim)
        hi, lo = lse[..., 0], lse[..., 1]
        # hi is the log-sum-exp rounded to the dtype, lo what rounding left: at most half of hi's
        # ulp (lo's own rounding may reach exactly half, a tie, so hi + lo need not round back to
        # hi: seed 12345 drew one in bfloat16)
        hd, ld = hi.double(), lo.double()
        ulp = torch.exp2(torch.floor(torch.log2(hd.abs()))) * torch.finfo(dtype).eps
        assert (ld.abs() <= ulp / 2).all(), (ld.abs() - ulp / 2).max()
        # hi + lo holds the log-sum-exp to the pair's precision (eps^2 relative), computed to
        # that of the arithmetic (float32's for 16-bit dtypes): a few of its ulps of log s (the
        # max, m, is exact), whatever the offset
        eps = torch.finfo(dtype).eps
        arithmetic = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
        err = ((hd - offset) + ld - want).abs()
        bound = 16 * arithmetic * (want.abs() + 1) + eps * eps * hd.abs()
        assert (err <= bound).all(), (err - bound).max()


@devices
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("offset", [0.0, 1e4], ids=["centred", "offset1e4"])
@pytest.mark.parametrize("shape,dim", LSE_SHAPES, ids=lambda v: str(v))
def test_cross_entropy_backward_from_log_sum_exp(device, dtype, offset, shape, dim):
    # Given the forward's log-sum-exps, the backward reads each logit once (CPU: class indices,
    # no smoothing); its gradient is torch's in float64 to the dtype's precision, also for logits
    # far from zero (a single float32 log-sum-exp is 2^-10 off at 1e4, which this fails), with
    # weights, ignored rows and every reduction; and the smoothed forms, which recompute, ignore it.
    x, t = _lse_case(shape, dim, dtype, device, offset)
    w = torch.rand(shape[dim], dtype=dtype, device=device)
    tol = dict(rtol=1e-6, atol=3e-7) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-14)
    for reduction, name in enumerate(["none", "mean", "sum"]):
        for weight, eps in ((None, 0.0), (w, 0.0), (w, 0.2)):
            _, lse = P.cross_entropy_with_log_sum_exp(x, t, weight, reduction, -100, eps)
            g = torch.randn(t.shape if reduction == 0 else (), dtype=dtype, device=device)
            ours = P.cross_entropy_backward(g, x, t, weight, reduction, -100, eps, lse)
            xr = x.detach().double().clone().requires_grad_()
            F.cross_entropy(xr, t, None if weight is None else weight.double(),
                            reduction=name, label_smoothing=eps).backward(g.double())
            torch.testing.assert_close(ours.double(), xr.grad, **tol)
            recomputed = P.cross_entropy_backward(g, x, t, weight, reduction, -100, eps)
            torch.testing.assert_close(ours, recomputed, **tol)


@devices
def test_cross_entropy_saves_log_sum_exp_for_its_backward(device):
    # With a gradient to compute, cross_entropy runs cross_entropy_with_log_sum_exp and hands its
    # pairs to the backward op (what makes the backward one pass); the pairs are not
    # differentiable (a saved statistic), the loss is.
    import samples
    x = torch.randn(4, 5, 6, device=device, requires_grad=True)
    t = torch.randint(0, 5, (4, 6), device=device)
    with samples._RecordOps() as forward:
        loss = PF.cross_entropy(x, t)
    assert [c.name for c in forward.calls] == ["cross_entropy_with_log_sum_exp"]
    with samples._RecordOps() as backward:
        loss.backward()
    (call,) = backward.calls
    assert call.name == "cross_entropy_backward" and call.args[7] is not None
    assert call.args[7].shape == (4, 6, 2)
    xr = x.detach().double().requires_grad_()
    F.cross_entropy(xr, t).backward()
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=1e-6, atol=1e-8)
    with samples._RecordOps() as inference, torch.no_grad():
        PF.cross_entropy(x, t)
    assert [c.name for c in inference.calls] == ["cross_entropy"]
    loss, lse = P.cross_entropy_with_log_sum_exp(x, t, None, 1, -100, 0.0)
    assert loss.requires_grad and not lse.requires_grad


@devices
def test_cross_entropy_backward_bad_log_sum_exp(device):
    x = torch.randn(4, 5, device=device)
    t = torch.randint(0, 5, (4,), device=device)
    g = torch.ones((), device=device)
    with pytest.raises(RuntimeError, match=r"expected log_sum_exp of shape \[4, 2\].*"
                                           r"but got log_sum_exp of shape \[4\]"):
        P.cross_entropy_backward(g, x, t, None, 1, -100, 0.0, torch.zeros(4, device=device))
    with pytest.raises(RuntimeError, match=r"expected log_sum_exp to have the same dtype as "
                                           r"input \(Float\), but got log_sum_exp of dtype Double"):
        P.cross_entropy_backward(g, x, t, None, 1, -100, 0.0,
                                 torch.zeros(4, 2, dtype=torch.float64, device=device))
    # a 16-bit input's backward recomputes, but checks the pairs all the same
    with pytest.raises(RuntimeError, match=r"expected log_sum_exp of shape \[4, 2\]"):
        P.cross_entropy_backward(g.bfloat16(), x.bfloat16(), t, None, 1, -100, 0.0,
                                 torch.zeros(4, 3, dtype=torch.bfloat16, device=device))


@devices
@dtypes
@pytest.mark.parametrize("loss", ["mse", "bce", "ce"])
def test_float32_sums_accumulate_in_double(device, dtype, loss):
    # 300k terms: a float32 running sum would drift by ~1e-4 relative; ours stays within an ulp of
    # the float64 sum of the same per-element terms.
    n = 300_000
    if loss == "mse":
        x, t = torch.randn(n, dtype=dtype, device=device), torch.randn(n, dtype=dtype, device=device)
        out = P.mse_loss(x, t, None, 2)
        terms = (x - t) ** 2
    elif loss == "bce":
        x, t = torch.rand(n, dtype=dtype, device=device), torch.rand(n, dtype=dtype, device=device)
        out = P.binary_cross_entropy(x, t, None, 2)
        terms = P.binary_cross_entropy(x, t, None, 0)
    else:
        x = torch.randn(n // 10, 10, dtype=dtype, device=device)
        t = torch.randint(0, 10, (n // 10,), device=device)
        out = P.cross_entropy(x, t, None, 2, -100)
        terms = P.cross_entropy(x.double(), t, None, 0, -100)
    expected = terms.double().sum().to(dtype)
    torch.testing.assert_close(out, expected, rtol=3e-7 if dtype == torch.float32 else 1e-12,
                               atol=0)


# ---- All three: layouts, special values, determinism ----------------------------------------

def loss_cases(device, dtype=torch.float64):
    """(name, op, backward op, forward args builder) for every loss."""
    def mse(r, w):
        x = torch.randn(3, 4, dtype=dtype, device=device, requires_grad=True)
        t = torch.randn(3, 4, dtype=dtype, device=device, requires_grad=True)
        return [x, t, torch.rand(3, 4, dtype=dtype, device=device) if w else None, r]

    def bce(r, w):
        p = (torch.rand(3, 4, dtype=dtype, device=device) * 0.9 + 0.05).requires_grad_()
        y = torch.rand(3, 4, dtype=dtype, device=device)
        return [p, y, torch.rand(3, 4, dtype=dtype, device=device) if w else None, r]

    def ce(r, w, smoothing=0.0):
        x, t = ce_sample(5, 4, dtype, device)
        t[0] = 2  # at least one row counts
        return [x, t, torch.rand(4, dtype=dtype, device=device) + 0.1 if w else None, r, -100,
                smoothing]

    def ce_probabilities(r, w):
        x, _ = ce_sample(5, 4, dtype, device)
        p = torch.rand(5, 4, dtype=dtype, device=device)
        return [x, p, torch.rand(4, dtype=dtype, device=device) + 0.1 if w else None, r, -100,
                0.1]

    return [("mse_loss", P.mse_loss, P.mse_loss_backward, mse),
            ("binary_cross_entropy", P.binary_cross_entropy, P.binary_cross_entropy_backward, bce),
            ("binary_cross_entropy target", P.binary_cross_entropy,
             P.binary_cross_entropy_target_backward, bce),
            ("cross_entropy", P.cross_entropy, P.cross_entropy_backward, ce),
            ("cross_entropy smoothed", P.cross_entropy, P.cross_entropy_backward,
             lambda r, w: ce(r, w, 0.1)),
            ("cross_entropy probabilities", P.cross_entropy, P.cross_entropy_backward,
             ce_probabilities)]


LOSS_NAMES = ["mse_loss", "binary_cross_entropy", "binary_cross_entropy target", "cross_entropy",
              "cross_entropy smoothed", "cross_entropy probabilities"]


def case(device, name, dtype=torch.float64):
    return next(c for c in loss_cases(device, dtype) if c[0] == name)


@devices
@dtypes
@pytest.mark.parametrize("name", LOSS_NAMES)
@reductions
def test_noncontiguous_inputs(device, dtype, name, reduction):
    _, op, bwd, build = case(device, name, dtype)
    args = build(REDUCTIONS[reduction], True)
    dense = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
    strided = [helpers.noncontiguous(a) if isinstance(a, torch.Tensor) and a.dim() >= 1 else a
               for a in dense]
    if name.startswith("cross_entropy"):  # also transposed logits
        strided[0] = dense[0].t().contiguous().t()
        assert not strided[0].is_contiguous()
    out = op(*dense)
    out_strided = op(*strided)
    assert out_strided.is_contiguous()
    helpers.assert_close(out_strided, out, rtol=0, atol=0)
    g = torch.randn_like(out)
    g_strided = helpers.noncontiguous(g) if g.dim() >= 1 else g
    gi = bwd(g, *dense)
    gi_strided = bwd(g_strided, *strided)
    assert gi_strided.is_contiguous()
    helpers.assert_close(gi_strided, gi, rtol=0, atol=0)


@devices
@dtypes
@reductions
def test_special_values_propagate(device, dtype, reduction):
    nan, inf = float("nan"), float("inf")
    # mse: NaN and inf in input and target
    x = torch.tensor([nan, inf, -inf, 1.0, inf, 2.0], dtype=dtype, device=device)
    t = torch.tensor([0.0, 0.0, 1.0, nan, inf, 1.0], dtype=dtype, device=device)
    helpers.compare_with_torch(*mse_pair(reduction), [x.requires_grad_(), t], dtype)
    # cross_entropy rows: +inf logit, -inf target logit, all -inf, NaN, and a plain row
    x = torch.tensor([[inf, 0.0, 1.0], [-inf, 0.0, 1.0], [-inf, -inf, -inf], [nan, 0.0, 1.0],
                      [0.5, -0.5, 2.0]], dtype=dtype, device=device)
    t = torch.tensor([1, 0, 1, 1, 2], device=device)
    helpers.compare_with_torch(*ce_pair(reduction), [x.requires_grad_(), t], dtype)
    # each special row alone, so 'mean' and 'sum' do not just give NaN for all
    for i in range(4):
        helpers.compare_with_torch(*ce_pair(reduction),
                                   [x.detach()[i:i + 1].requires_grad_(), t[i:i + 1]], dtype)


@devices
@dtypes
@pytest.mark.parametrize("name", LOSS_NAMES)
def test_deterministic_across_runs_and_threads(device, dtype, name):
    # Big enough for many reduction chunks and several parallel tasks; terms spread over many
    # magnitudes, so any change in the order of the additions shows in the last bits.
    spread = lambda shape: torch.randn(shape, dtype=dtype, device=device) * torch.exp(  # noqa
        3 * torch.randn(shape, dtype=dtype, device=device))
    if name.startswith("cross_entropy"):
        n, c = 20_000, 30
        x = spread((n, c))
        t = (torch.rand(n, c, dtype=dtype, device=device) if name.endswith("probabilities")
             else torch.randint(0, c, (n,), device=device))
        eps = 0.0 if name == "cross_entropy" else 0.1
        w = torch.rand(c, dtype=dtype, device=device)
        fwd = lambda r: P.cross_entropy(x, t, w, r, -100, eps)  # noqa: E731
        bwd = lambda g, r: P.cross_entropy_backward(g, x, t, w, r, -100, eps)  # noqa: E731
    else:
        n = 400_000
        if name == "mse_loss":
            x, t, op, op_bwd = spread(n), spread(n), P.mse_loss, P.mse_loss_backward
        else:
            x = torch.rand(n, dtype=dtype, device=device) ** 8  # many near 0: terms up to 100
            t = torch.rand(n, dtype=dtype, device=device)
            op, op_bwd = P.binary_cross_entropy, P.binary_cross_entropy_backward
            if name.endswith("target"):
                op_bwd = P.binary_cross_entropy_target_backward
        w = torch.rand(n, dtype=dtype, device=device)
        fwd = lambda r: op(x, t, w, r)  # noqa: E731
        bwd = lambda g, r: op_bwd(g, x, t, w, r)  # noqa: E731
    g = torch.tensor(0.7, dtype=dtype, device=device)

    def run():
        return [fwd(1), fwd(2), bwd(g, 1), bwd(g, 2)]

    threads = torch.get_num_threads()
    try:
        results = []
        for n_threads in (2, 2, 1, 3):
            torch.set_num_threads(n_threads)
            results.append(run())
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


# ---- Bad input ------------------------------------------------------------------------------

@devices
def test_wrong_target_shape(device):
    x = torch.randn(3, 4, device=device)
    for op, name in [(P.mse_loss, "mse_loss"), (P.binary_cross_entropy, "binary_cross_entropy")]:
        with helpers.raises(RuntimeError, f"pyengine.{name}", "target", "[3, 4]", "[4, 3]"):
            op(x.sigmoid(), torch.rand(4, 3, device=device), None, 1)
    with helpers.raises(RuntimeError, "cross_entropy", "target of shape [3]", "[3, 1]"):
        P.cross_entropy(x, torch.zeros(3, 1, dtype=torch.long, device=device), None, 1, -100)
    with helpers.raises(ValueError, "cross_entropy", "0-d target", "[1]"):
        P.cross_entropy(x[0], torch.zeros(1, dtype=torch.long, device=device), None, 1, -100)
    with helpers.raises(RuntimeError, "cross_entropy", "input", "[2, 3, 4]"):
        P.cross_entropy(torch.randn(2, 3, 4, device=device),
                        torch.zeros(2, dtype=torch.long, device=device), None, 1, -100)


# A bad value inside a tensor is an exception on the CPU, and a device-side assert on CUDA: that
# poisons the process's CUDA context, so CUDA's are tested each in a process of its own
# (tests/test_cuda.py::test_device_assert_names_the_bad_argument), not here.
DATA_ERRORS_RAISE = pytest.mark.parametrize("device", ["cpu"])


@devices
@pytest.mark.parametrize("bad", [4, 7, -1, -99])
def test_cross_entropy_target_out_of_range(device, bad):
    x = torch.randn(3, 4, device=device)
    t = torch.tensor([0, bad, 1], device=device)
    for call in (lambda: P.cross_entropy(x, t, None, 1, -100),
                 lambda: P.cross_entropy_backward(torch.tensor(1.0, device=device), x, t, None, 1,
                                                  -100)):
        if device != "cpu":
            break  # a device-side assert (DATA_ERRORS_RAISE)
        with helpers.raises(IndexError, "target", str(bad), "[0, 4)"):
            call()
    # the same value is fine as ignore_index
    assert P.cross_entropy(x, t, None, 2, bad).isfinite()


@devices
def test_cross_entropy_bad_targets(device):
    x = torch.randn(3, 4, device=device)
    long = dict(dtype=torch.long, device=device)
    # a floating target holds class probabilities: input's shape and dtype
    with helpers.raises(RuntimeError, "cross_entropy", "floating target", "class probabilities",
                        "[3, 4]", "[3]", "int64"):
        P.cross_entropy(x, torch.rand(3, device=device), None, 1, -100)
    with helpers.raises(RuntimeError, "cross_entropy", "[3, 4]", "[4, 3]"):
        P.cross_entropy(x, torch.rand(4, 3, device=device), None, 1, -100)
    with helpers.raises(RuntimeError, "cross_entropy", "target", "same dtype", "Double"):
        P.cross_entropy(x, torch.rand(3, 4, dtype=torch.float64, device=device), None, 1, -100)
    with helpers.raises(NotImplementedError, "cross_entropy", "target", "float64"):
        PF.cross_entropy(x, torch.rand(3, 4, dtype=torch.float64, device=device))
    # an integer target of input's shape: probabilities must be floating (torch's reading too)
    with helpers.raises(RuntimeError, "cross_entropy", "target of input's shape",
                        "class probabilities", "Long"):
        P.cross_entropy(x, torch.zeros(3, 4, **long), None, 1, -100)
    with helpers.raises(RuntimeError, "cross_entropy", "class indices as int64", "Int"):
        P.cross_entropy(x, torch.zeros(3, dtype=torch.int32, device=device), None, 1, -100)
    # torch refuses ignore_index >= 0 with probabilities
    with helpers.raises(RuntimeError, "cross_entropy", "ignore_index", "class-probability", "2"):
        P.cross_entropy(x, torch.rand(3, 4, device=device), None, 1, 2)
    # (N, C, d...) through the functional layer: a target of neither shape
    x3 = torch.randn(2, 4, 5, device=device)
    for bad in (torch.rand(2, 5, 4, device=device), torch.zeros(2, 4, **long)):
        with helpers.raises(ValueError, "cross_entropy", "target", "[2, 5]", "[2, 4, 5]",
                            str(list(bad.shape))):
            PF.cross_entropy(x3, bad)
    with helpers.raises(RuntimeError, "cross_entropy", "[2, 4, 5] (floating class probabilities)",
                        "torch.int64"):
        PF.cross_entropy(x3, torch.zeros(2, 4, 5, **long))
    # the backward op checks the same
    with helpers.raises(RuntimeError, "cross_entropy", "floating target", "[3]"):
        P.cross_entropy_backward(torch.tensor(1.0, device=device), x, torch.rand(3, device=device),
                                 None, 1, -100, 0.0)


@devices
@pytest.mark.parametrize("value", [-0.1, 1.5, float("nan"), float("inf")])
def test_cross_entropy_label_smoothing_outside_unit_interval(device, value):
    # torch refuses values above 1 with this message; it ignores negative ones and NaN, which
    # pyengine refuses as well (they can only be mistakes).
    x = torch.randn(3, 4, device=device)
    for t in (torch.zeros(3, dtype=torch.long, device=device), torch.rand(3, 4, device=device)):
        for call in (lambda: P.cross_entropy(x, t, None, 1, -100, value),
                     lambda: P.cross_entropy_backward(torch.tensor(1.0, device=device), x, t,
                                                      None, 1, -100, value),
                     lambda: PF.cross_entropy(x, t, label_smoothing=value)):
            with helpers.raises(RuntimeError, "cross_entropy", "label_smoothing must be between "
                                "0.0 and 1.0", str(value)):
                call()


@devices
@pytest.mark.parametrize("int_dtype", [torch.int64, torch.int32])
def test_integer_inputs(device, int_dtype):
    x = torch.randint(0, 2, (3, 4), dtype=int_dtype, device=device)
    for op, name in [(P.mse_loss, "mse_loss"), (P.binary_cross_entropy, "binary_cross_entropy")]:
        with helpers.raises(NotImplementedError, f"pyengine.{name}", "input",
                            SUPPORTED_DTYPES_TEXT):
            op(x, x, None, 1)
    with helpers.raises(NotImplementedError, "pyengine.cross_entropy", "input",
                        SUPPORTED_DTYPES_TEXT):
        P.cross_entropy(x, torch.zeros(3, dtype=torch.long, device=device), None, 1, -100)


@devices
def test_mixed_dtypes(device):
    x = torch.rand(3, 4, device=device)
    for op, name in [(P.mse_loss, "mse_loss"), (P.binary_cross_entropy, "binary_cross_entropy")]:
        with helpers.raises(RuntimeError, name, "target", "same dtype", "Double"):
            op(x, x.double(), None, 1)
        with helpers.raises(RuntimeError, name, "weight", "same dtype", "Double"):
            op(x, x, x.double(), 1)
    t = torch.zeros(3, dtype=torch.long, device=device)
    with helpers.raises(RuntimeError, "cross_entropy", "weight", "same dtype", "Double"):
        P.cross_entropy(x, t, torch.ones(4, dtype=torch.float64, device=device), 1, -100)
    with helpers.raises(RuntimeError, "mse_loss_backward", "grad_output", "same dtype"):
        P.mse_loss_backward(torch.tensor(1.0, dtype=torch.float64, device=device), x, x, None, 1)


@devices
@pytest.mark.parametrize("reduction", [-1, 3])
def test_bad_reduction(device, reduction):
    x = torch.rand(3, 4, device=device)
    t = torch.zeros(3, dtype=torch.long, device=device)
    calls = [("mse_loss", lambda: P.mse_loss(x, x, None, reduction)),
             ("binary_cross_entropy", lambda: P.binary_cross_entropy(x, x, None, reduction)),
             ("cross_entropy", lambda: P.cross_entropy(x, t, None, reduction, -100))]
    for name, call in calls:
        with helpers.raises(RuntimeError, name, "reduction", f"but got {reduction}"):
            call()


@DATA_ERRORS_RAISE
@dtypes
@pytest.mark.parametrize("value", [1.5, -0.1, float("nan"), float("inf")])
def test_binary_cross_entropy_outside_unit_interval(device, dtype, value):
    p = torch.rand(2, 5, dtype=dtype, device=device)
    y = torch.rand(2, 5, dtype=dtype, device=device)
    bad = p.clone()
    bad[1, 3] = value
    for r in (0, 1, 2):
        with helpers.raises(RuntimeError, "binary_cross_entropy", "input",
                            "should be between 0 and 1", "index 8"):
            P.binary_cross_entropy(bad, y, None, r)
        with pytest.raises(RuntimeError, match="input should be between 0 and 1"):
            F.binary_cross_entropy(bad, y, reduction=["none", "mean", "sum"][r])
    # torch 2.13 checks the target on CPU too
    bad_y = y.clone()
    bad_y[0, 0] = value
    with helpers.raises(RuntimeError, "binary_cross_entropy", "target", "between 0 and 1"):
        P.binary_cross_entropy(p, bad_y, None, 1)


@devices
def test_wrong_weight_shape(device):
    x = torch.rand(3, 4, device=device)
    for op, name in [(P.mse_loss, "mse_loss"), (P.binary_cross_entropy, "binary_cross_entropy")]:
        with helpers.raises(RuntimeError, name, "weight", "same shape", "[4]"):
            op(x, x, torch.ones(4, device=device), 1)
    t = torch.zeros(3, dtype=torch.long, device=device)
    with helpers.raises(RuntimeError, "cross_entropy", "weight of shape [4]", "[3]"):
        P.cross_entropy(x, t, torch.ones(3, device=device), 1, -100)


@devices
def test_backward_wrong_grad_output_shape(device):
    x = torch.rand(3, 4, device=device)
    t = torch.zeros(3, dtype=torch.long, device=device)
    with helpers.raises(RuntimeError, "mse_loss_backward", "grad_output of shape [3, 4]"):
        P.mse_loss_backward(torch.tensor(1.0, device=device), x, x, None, 0)
    with helpers.raises(RuntimeError, "binary_cross_entropy_backward", "grad_output", "[3, 4]"):
        P.binary_cross_entropy_backward(torch.ones(3, 4, device=device), x, x, None, 1)
    with helpers.raises(RuntimeError, "cross_entropy_backward", "grad_output of shape [3]"):
        P.cross_entropy_backward(torch.ones(4, device=device), x, t, None, 0, -100)


@devices
def test_weight_gradient_refused(device):
    x = torch.rand(3, 4, device=device, requires_grad=True)
    w = torch.rand(3, 4, device=device, requires_grad=True)
    with helpers.raises(RuntimeError, "mse_loss", "weight", "not supported"):
        P.mse_loss(x, x.detach(), w, 1)
    with helpers.raises(RuntimeError, "binary_cross_entropy", "weight", "not supported"):
        P.binary_cross_entropy(x, x.detach(), w, 1)
    with helpers.raises(RuntimeError, "cross_entropy", "weight", "not supported"):
        P.cross_entropy(x, x.detach(), w[0], 1, -100)
