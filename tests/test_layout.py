"""Memory layouts: every operator returns the strides torch's own operator returns for the same
inputs (channels_last stays channels_last, a transposed activation stays transposed), forward and
backward, with torch's values and gradients; the Meta kernels (torch.compile, opcheck) give the
same strides as the real ones. torch's rules, per op: csrc/common/layout.h."""
import pytest
import torch
import torch.nn.functional as F

import helpers
import pyengine.functional as PF
import pyengine.nn as pnn
from helpers import devices

P = torch.ops.pyengine
CL = torch.channels_last


# ---- layouts of one set of values -----------------------------------------------------------

def contiguous(t):
    return t.contiguous()


def channels_last(t):
    return t.to(memory_format=CL) if t.dim() == 4 else t.contiguous()


def transposed(t):
    """The last two dims swapped in memory."""
    return t.transpose(-1, -2).contiguous().transpose(-1, -2) if t.dim() >= 2 else t


def reversed_dims(t):
    """Every dim reversed in memory (an unbatched (C, H, W) image becomes (H, W, C)-ordered)."""
    order = list(range(t.dim() - 1, -1, -1))
    return t.permute(order).contiguous().permute(order)


def strided_transposed(t):
    """Not dense (every other element of a wider buffer) and transposed: torch's output is dense,
    in the input's dim order."""
    if t.dim() < 2:
        return t
    wide = torch.empty(*t.shape[:-2], t.shape[-1], 2 * t.shape[-2], dtype=t.dtype,
                       device=t.device)
    out = wide.transpose(-1, -2)[..., ::2, :]
    out.copy_(t)
    return out


LAYOUTS = {"contiguous": contiguous, "channels_last": channels_last, "transposed": transposed,
           "reversed": reversed_dims, "strided_transposed": strided_transposed}


def check(ours, theirs, inputs, grad_layout=contiguous, differentiable=None, dtype=None,
          torch_grad_strides=True):
    """ours(*inputs) against theirs(*inputs): output strides equal to torch's on the same
    layouts, values equal to torch's on contiguous copies; then gradients (grad_output in
    grad_layout) the same way (or, with torch_grad_strides=False, merely dense). torch.autograd.grad hands back the tensors the backward ops made,
    so their strides are the backward ops' own. Returns our output."""
    dtype = dtype or inputs[0].dtype
    if differentiable is None:
        differentiable = [isinstance(t, torch.Tensor) and t.is_floating_point() for t in inputs]
    # leaves sharing the inputs' storage, so their strides (dense or not) are kept
    a_in = [t.detach().requires_grad_(d) if isinstance(t, torch.Tensor) else t
            for t, d in zip(inputs, differentiable)]
    b_in = [t.detach().requires_grad_(d) if isinstance(t, torch.Tensor) else t
            for t, d in zip(inputs, differentiable)]
    # Reference values from contiguous copies: torch 2.13's own float64 CPU conv2d returns a
    # wrong grad_weight for an unbatched channels_last-like input with a channels_last weight
    # (measured: off by ~30 against its contiguous result), so values are not taken from it.
    c_in = [t.detach().contiguous().requires_grad_(d) if isinstance(t, torch.Tensor) else t
            for t, d in zip(inputs, differentiable)]
    a, b, c = ours(*a_in), theirs(*b_in), theirs(*c_in)
    helpers.assert_same_strides(a, b, "output")
    helpers.assert_close(a, c, dtype)
    wrt = [i for i, d in enumerate(differentiable) if d]
    if not wrt:
        return a
    g = grad_layout(torch.randn(b.shape, dtype=b.dtype, device=b.device))
    ga = torch.autograd.grad(a, [a_in[i] for i in wrt], g)
    gb = torch.autograd.grad(b, [b_in[i] for i in wrt], g)
    gc = torch.autograd.grad(c, [c_in[i] for i in wrt], g.contiguous())
    for i, x, y, z in zip(wrt, ga, gb, gc):
        if torch_grad_strides:
            helpers.assert_same_strides(x, y, f"gradient of argument {i}")
        else:
            helpers.assert_dense(x, f"gradient of argument {i}")
        helpers.assert_close(x, z, dtype)
    return a


# ---- conv2d ---------------------------------------------------------------------------------

@devices
@pytest.mark.parametrize("x_layout", ["contiguous", "channels_last", "reversed"])
@pytest.mark.parametrize("w_layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("batched", [True, False], ids=["batched", "unbatched"])
def test_conv2d(device, x_layout, w_layout, batched):
    """torch convolves in channels_last when the input or the weight is channels_last (an
    unbatched input judged as a batch of one), and so do grad_input and grad_weight. (float64:
    torch's float32 channels_last convolutions take ~0.1 s a call here; float32 goes through
    test_channels_last_model.)"""
    dtype = torch.float64
    shape = (3, 4, 9, 8) if batched else (4, 9, 8)
    x = LAYOUTS[x_layout](torch.randn(shape, dtype=dtype, device=device))
    w = LAYOUTS[w_layout](torch.randn(6, 2, 3, 3, dtype=dtype, device=device))
    b = torch.randn(6, dtype=dtype, device=device)
    kw = dict(stride=(1, 2), padding=1, groups=2)
    theirs = helpers.conv_layout_reference(lambda x, w, b: F.conv2d(x, w, b, **kw), device, dtype)
    for grad_layout in (contiguous, channels_last):
        y = check(lambda x, w, b: PF.conv2d(x, w, b, **kw), theirs, [x, w, b], grad_layout)
    if batched and "channels_last" in (x_layout, w_layout):
        assert y.is_contiguous(memory_format=CL)
    # the backward op directly, against torch's convolution_backward (batched only: torch's
    # unbatched convolution is the batched one, tested above through autograd)
    if batched:
        g = torch.randn(y.shape, dtype=dtype, device=device)
        ours = P.conv2d_backward(g, x, w, [1, 2], [1, 1], [1, 1], 2, [True, True, True])
        theirs = helpers.conv_layout_reference(torch.ops.aten.convolution_backward, device,
                                               dtype)(g, x, w, [6], [1, 2], [1, 1], [1, 1], False,
                                                      [0, 0], 2, [True, True, True])
        for a, e in zip(ours, theirs):
            helpers.assert_same_strides(a, e)
            helpers.assert_close(a, e, dtype)


# ---- max pooling ----------------------------------------------------------------------------

POOL = dict(kernel_size=3, stride=2, padding=1, dilation=1, ceil_mode=True)


@devices
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "transposed", "reversed"])
@pytest.mark.parametrize("batched", [True, False], ids=["batched", "unbatched"])
def test_max_pool2d(device, dtype, layout, batched):
    """Output, indices and grad_input are channels_last when the (4-D) input is."""
    shape = (2, 3, 9, 10) if batched else (3, 9, 10)
    x = LAYOUTS[layout](torch.randn(shape, dtype=dtype, device=device))
    for grad_layout in (contiguous, channels_last):
        check(lambda x: PF.max_pool2d(x, **POOL), lambda x: F.max_pool2d(x, **POOL), [x],
              grad_layout)
    out, idx = PF.max_pool2d(x, **POOL, return_indices=True)
    ref, ref_idx = F.max_pool2d(x, **POOL, return_indices=True)
    helpers.assert_same_strides(idx, ref_idx, "indices")
    assert torch.equal(idx, ref_idx)
    args = [POOL["kernel_size"]] * 2, [POOL["stride"]] * 2, [1, 1], [1, 1], True
    for g in (torch.randn_like(ref).contiguous(), channels_last(torch.randn_like(ref))):
        gi = P.max_pool2d_backward(g, x, idx, *args)
        want = torch.ops.aten.max_pool2d_with_indices_backward(g, x, *args, ref_idx)
        helpers.assert_same_strides(gi, want, "grad_input")
        helpers.assert_close(gi, want, dtype)


# ---- activations ----------------------------------------------------------------------------

ACTIVATIONS = {  # name: (ours, torch's, our backward op, torch's backward op, saves the input)
    "relu": (PF.relu, F.relu, P.relu_backward,
             lambda g, s: torch.ops.aten.threshold_backward(g, s, 0), False),
    "leaky_relu": (lambda x: PF.leaky_relu(x, 0.2), lambda x: F.leaky_relu(x, 0.2),
                   lambda g, s: P.leaky_relu_backward(g, s, 0.2),
                   lambda g, s: torch.ops.aten.leaky_relu_backward(g, s, 0.2, False), True),
    "sigmoid": (PF.sigmoid, torch.sigmoid, P.sigmoid_backward, torch.ops.aten.sigmoid_backward,
                False),
    "tanh": (PF.tanh, torch.tanh, P.tanh_backward, torch.ops.aten.tanh_backward, False),
}
SHAPES = [(2, 3, 5, 4), (6, 7), (3, 4, 5), (3, 1, 1, 5), (1, 4, 1, 1)]


@devices
@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_activations(device, name):
    """Dense inputs keep their strides (no copy); strided ones come out dense in their dim order;
    size-1 dims follow torch's tie-breaking. Forward, and backward through autograd."""
    ours, theirs, *_ = ACTIVATIONS[name]
    for shape in SHAPES:
        base = torch.randn(shape, dtype=torch.float64, device=device)
        for layout in LAYOUTS.values():
            check(ours, theirs, [layout(base)], grad_layout=layout)
            check(ours, theirs, [layout(base)], grad_layout=contiguous)


@devices
@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_activation_backward_ops_mixed_layouts(device, name):
    """grad_output and the saved tensor in different layouts: torch's kernels let one of them
    lead (the saved tensor for relu and leaky_relu, grad_output for sigmoid and tanh)."""
    ours, theirs, our_bwd, torch_bwd, saves_input = ACTIVATIONS[name]
    for shape in SHAPES:
        x = torch.randn(shape, dtype=torch.float64, device=device)
        saved = x if saves_input else theirs(x)
        g = torch.randn(shape, dtype=torch.float64, device=device)
        for g_layout in LAYOUTS.values():
            for s_layout in LAYOUTS.values():
                got = our_bwd(g_layout(g), s_layout(saved))
                want = torch_bwd(g_layout(g), s_layout(saved))
                helpers.assert_same_strides(got, want, f"{g_layout.__name__} grad_output, "
                                                       f"{s_layout.__name__} saved")
                helpers.assert_close(got, want)


def test_elementwise_runs_in_place_of_a_copy():
    """A dense non-contiguous input is read where it lies: the output shares its strides, and a
    result equals the op on a contiguous copy bit for bit."""
    x = channels_last(torch.randn(4, 8, 6, 5))
    y = PF.sigmoid(x)
    assert y.stride() == x.stride()
    assert torch.equal(y, PF.sigmoid(x.contiguous()))


# ---- softmax, log_softmax -------------------------------------------------------------------

@devices
@pytest.mark.parametrize("fn", ["softmax", "log_softmax"])
def test_softmax_is_contiguous_like_torch(device, fn):
    """torch's softmax and log_softmax (and their backward ops) return contiguous tensors
    whatever the input's layout."""
    ours, theirs = getattr(PF, fn), getattr(torch, fn)
    base = torch.randn(2, 3, 4, 5, dtype=torch.float64, device=device)
    for layout in LAYOUTS.values():
        for dim in range(4):
            y = check(lambda x: ours(x, dim), lambda x: theirs(x, dim), [layout(base)],
                      grad_layout=layout)
            assert y.is_contiguous()


# ---- linear ---------------------------------------------------------------------------------

LINEAR_INPUTS = {  # torch's mm backward returns column-major gradients for column-major operands
    "2-D transposed": (lambda: torch.randn(5, 7).t(), lambda: torch.randn(4, 5)),
    "3-D, rows folding to a column-major matrix": (
        lambda: torch.randn(5, 2, 3).permute(1, 2, 0), lambda: torch.randn(4, 5)),
    "3-D, rows not folding": (lambda: torch.randn(2, 5, 3).transpose(1, 2),
                              lambda: torch.randn(4, 5)),
    "transposed weight": (lambda: torch.randn(3, 5), lambda: torch.randn(5, 4).t()),
    "both transposed": (lambda: torch.randn(5, 3).t(), lambda: torch.randn(5, 4).t()),
    "strided weight": (lambda: torch.randn(3, 5), lambda: torch.randn(4, 10)[:, ::2]),
    "1-D": (lambda: torch.randn(5), lambda: torch.randn(4, 5)),
    "one row": (lambda: torch.randn(5, 1).t(), lambda: torch.randn(4, 5)),
    # a size-1 leading dim with an odd stride: torch 2.13 folds it to a column-major matrix only
    # when the weight needs a gradient, torch 2.14 always
    "size-1 dim, odd stride": (lambda: torch.randn(1, 3, 5).as_strided((1, 3, 5), (999, 1, 3)),
                               lambda: torch.randn(4, 5)),
    "4-D, leading dims not chained": (lambda: torch.randn(3, 2, 5, 4).permute(1, 3, 0, 2),
                                      lambda: torch.randn(4, 5)),
}


@devices
@pytest.mark.parametrize("case", list(LINEAR_INPUTS))
@pytest.mark.parametrize("weight_grad", [True, False], ids=["weight_grad", "no_weight_grad"])
def test_linear(device, case, weight_grad):
    """Output contiguous; grad_input and grad_weight laid out as torch's mm backward gives them,
    where torch's choice is stable across versions; dense in the size-1-dim case, where torch
    2.13 and 2.14 differ (the layout of a gradient is torch's implementation detail there)."""
    make_x, make_w = LINEAR_INPUTS[case]
    x, w = make_x().double().to(device), make_w().double().to(device)
    b = torch.randn(w.shape[0], dtype=torch.float64, device=device)
    y = check(PF.linear, F.linear, [x, w, b], differentiable=[True, weight_grad, True],
              torch_grad_strides=case != "size-1 dim, odd stride")
    assert y.is_contiguous()


# ---- losses ---------------------------------------------------------------------------------

@devices
@pytest.mark.parametrize("layouts", [("channels_last", "channels_last"),
                                     ("channels_last", "contiguous"),
                                     ("contiguous", "channels_last"),
                                     ("transposed", "strided_transposed")])
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_pointwise_losses(device, layouts, reduction):
    """'none' results as torch's: mse_loss iterates (input, target), binary_cross_entropy takes
    empty_like(input). Gradients: mse_loss's contiguous, binary_cross_entropy's like input (its
    target's: like torch's -logit(input)); with a weight, mse_loss follows torch's composite
    (x - t)^2 * w."""
    p = LAYOUTS[layouts[0]](torch.rand(2, 3, 4, 5, dtype=torch.float64, device=device))
    t = LAYOUTS[layouts[1]](torch.rand(2, 3, 4, 5, dtype=torch.float64, device=device))
    w = channels_last(torch.rand(2, 3, 4, 5, dtype=torch.float64, device=device))
    for grad_layout in (contiguous, channels_last):
        kw = dict(reduction=reduction)
        check(lambda p, t: PF.mse_loss(p, t, **kw), lambda p, t: F.mse_loss(p, t, **kw), [p, t],
              grad_layout)
        check(lambda p, t: PF.mse_loss(p, t, weight=w, **kw),
              lambda p, t: F.mse_loss(p, t, weight=w, **kw), [p, t], grad_layout)
        for differentiable in ([True, False], [True, True], [False, True]):
            check(lambda p, t: PF.binary_cross_entropy(p, t, **kw),
                  lambda p, t: F.binary_cross_entropy(p, t, **kw), [p, t], grad_layout,
                  differentiable=differentiable)


@devices
def test_cross_entropy_2d(device):
    """Logits in any layout: loss and gradient contiguous, as torch's."""
    x = transposed(torch.randn(7, 5, dtype=torch.float64, device=device))
    target = torch.randint(0, 5, (7,), device=device)
    for reduction in ("none", "sum"):
        check(lambda x: PF.cross_entropy(x, target, reduction=reduction),
              lambda x: F.cross_entropy(x, target, reduction=reduction), [x])


@devices
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_cross_entropy_spatial(device, layout):
    """(N, C, H, W) logits, read in place where contiguous: 'none' loss (N, H, W) and the
    gradients (input's, and a probability target's) contiguous, as torch's."""
    x = LAYOUTS[layout](torch.randn(2, 5, 6, 7, dtype=torch.float64, device=device))
    indices = torch.randint(0, 5, (2, 6, 7), device=device)
    probabilities = LAYOUTS[layout](torch.rand(2, 5, 6, 7, dtype=torch.float64, device=device))
    for reduction in ("none", "mean"):
        kw = dict(reduction=reduction, label_smoothing=0.1)
        check(lambda x: PF.cross_entropy(x, indices, **kw),
              lambda x: F.cross_entropy(x, indices, **kw), [x])
        check(lambda x, p: PF.cross_entropy(x, p, **kw),
              lambda x, p: F.cross_entropy(x, p, **kw), [x, probabilities])


# ---- Meta kernels, modules, torch.compile ---------------------------------------------------

def opcheck_samples(device):
    d = dict(dtype=torch.float64, device=device)
    x = channels_last(torch.randn(2, 4, 6, 6, **d)).requires_grad_()
    w = torch.randn(6, 4, 3, 3, **d).requires_grad_()
    g = torch.randn(2, 6, 6, 6, **d)
    pool = ([2, 2], [2, 2], [0, 0], [1, 1], False)
    _, idx = P.max_pool2d_with_indices(x.detach(), *pool)
    xt = transposed(torch.randn(3, 5, **d)).requires_grad_()
    wt = transposed(torch.randn(4, 5, **d)).requires_grad_()
    target = channels_last(torch.rand(2, 4, 6, 6, **d))
    return {
        "conv2d": (P.conv2d.default, (x, w, None, [1, 1], [1, 1], [1, 1], 1)),
        "conv2d unbatched, channels_last weight": (
            P.conv2d.default, (x[0].detach(), channels_last(w.detach()), None, [1, 1], [0, 0],
                               [1, 1], 1)),
        "conv2d_backward": (P.conv2d_backward.default, (g, x.detach(), w.detach(), [1, 1],
                                                        [1, 1], [1, 1], 1, [True, True, True])),
        "max_pool2d_with_indices": (P.max_pool2d_with_indices.default, (x, *pool)),
        "max_pool2d_backward": (P.max_pool2d_backward.default,
                                (torch.randn(2, 4, 3, 3, **d), x.detach(), idx, *pool)),
        "relu": (P.relu.default, (x,)),
        "tanh transposed": (P.tanh.default, (xt,)),
        "relu_backward": (P.relu_backward.default, (g, channels_last(torch.rand(2, 6, 6, 6, **d)))),
        "sigmoid_backward": (P.sigmoid_backward.default,
                             (channels_last(g), torch.rand(2, 6, 6, 6, **d))),
        "linear": (P.linear.default, (xt, wt, None)),
        "linear_backward": (P.linear_backward.default,
                            (torch.randn(3, 4, **d), xt.detach(), wt.detach(), [True, True, True])),
        "mse_loss": (P.mse_loss.default, (x, target, None, 0)),
        "mse_loss weighted": (P.mse_loss.default, (x, target, torch.rand(2, 4, 6, 6, **d), 0)),
        "mse_loss_backward weighted": (P.mse_loss_backward.default,
                                       (torch.tensor(1.0, **d), x.detach(), target, target, 1)),
        "binary_cross_entropy": (P.binary_cross_entropy.default,
                                 (torch.sigmoid(x).detach().requires_grad_(), target, None, 0)),
        "binary_cross_entropy_target_backward": (
            P.binary_cross_entropy_target_backward.default,
            (torch.randn(2, 4, 6, 6, **d), torch.sigmoid(x).detach(), target.contiguous(), None,
             0)),
    }


@devices
@pytest.mark.parametrize("name", list(opcheck_samples("cpu")))
def test_opcheck_channels_last_and_transposed(device, name):
    """The fake (Meta) kernels give the real kernels' strides, dynamic shapes included."""
    op, args = opcheck_samples(device)[name]
    helpers.opcheck(op, args)


@devices
@helpers.dtypes
def test_channels_last_model(device, dtype):
    """A model of pyengine.nn layers converted to channels_last computes in it like torch's
    twin: same output strides and values, parameter gradients in channels_last too."""
    def model(nn):
        torch.manual_seed(0)
        return torch.nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                   nn.Conv2d(8, 4, 3), nn.Sigmoid()).to(device, dtype)
    ours = model(pnn).to(memory_format=CL)
    theirs = model(torch.nn).to(memory_format=CL)
    assert ours[0].weight.is_contiguous(memory_format=CL)
    x = channels_last(torch.randn(2, 3, 12, 12, dtype=dtype, device=device))
    # the twin's layouts as pyengine follows them (float64 on CUDA: the CPU's, see the helper)
    ref_device = helpers.conv_layout_device(device, dtype)
    theirs = theirs.to(ref_device)
    y, ref = ours(x), theirs(x.to(ref_device))
    helpers.assert_same_strides(y, ref)
    assert y.is_contiguous(memory_format=CL)
    helpers.assert_close(y, ref.to(device), dtype)
    g = torch.randn_like(y)
    y.backward(g)
    ref.backward(g.to(ref_device))
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters()):
        helpers.assert_same_strides(a.grad, b.grad, name)
        helpers.assert_close(a.grad, b.grad.to(device), dtype)


@devices
def test_compile_fullgraph_channels_last(device):
    """conv2d -> relu -> max_pool2d on a channels_last input under torch.compile (fullgraph):
    the traced strides (Meta kernels) agree with the real ones, and output, gradients and their
    strides match eager torch."""
    torch._dynamo.reset()
    w = torch.randn(6, 3, 3, 3, dtype=torch.float64, device=device)
    b = torch.randn(6, dtype=torch.float64, device=device)

    def net(functional):
        def f(x, w, b):
            return functional.max_pool2d(functional.relu(functional.conv2d(x, w, b, padding=1)), 2)
        return f

    compiled = torch.compile(net(PF), fullgraph=True, backend="aot_eager")
    theirs = helpers.conv_layout_reference(net(F), device, torch.float64)
    for batch in (2, 3):
        x = channels_last(torch.randn(batch, 3, 8, 8, dtype=torch.float64, device=device))
        check(compiled, theirs, [x, w, b])
        check(compiled, theirs, [x, channels_last(w), b], grad_layout=channels_last)

@pytest.mark.parametrize("shape", [(3, 20, 9, 13), (1, 64, 17, 16), (20, 5, 7), (2, 1, 5, 5),
                                   (2, 16, 1, 1)])
def test_channels_last_float32_copies(shape):
    """float32 channels_last images reach the CPU kernels as NCHW and leave them as channels_last
    through pyengine's own register transposes (cpu/image_layout.cpp: partial 16 x 16 blocks,
    one channel, 1x1 planes, unbatched): the same bits as the NCHW call, in torch's strides, for
    conv2d, max_pool2d, their fusion and every gradient."""
    x = torch.randn(shape)
    # an unbatched (C, H, W) image in the batch of one's channels_last order: strides (1, W*C, C)
    xcl = x.to(memory_format=CL) if x.dim() == 4 else x.permute(1, 2, 0).contiguous().permute(
        2, 0, 1)
    w = torch.randn(8, shape[-3], 3, 3)
    pools = shape[-1] >= 2
    ops = {  # ours, torch's
        "conv2d": (lambda x, w: PF.conv2d(x, w, padding=1), lambda x, w: F.conv2d(x, w, padding=1)),
        "max_pool2d": (lambda x, w: PF.max_pool2d(PF.relu(PF.conv2d(x, w, padding=1)), 2),
                       lambda x, w: F.max_pool2d(F.relu(F.conv2d(x, w, padding=1)), 2)),
        "fused": (lambda x, w: P.conv2d_relu_max_pool2d(x, w, None, [1, 1], [1, 1], [1, 1], 1,
                                                        [2, 2], [2, 2], [0, 0], [1, 1],
                                                        False)[0],
                  lambda x, w: F.max_pool2d(F.relu(F.conv2d(x, w, padding=1)), 2)),
    }
    for name, (ours, theirs) in ops.items():
        if name != "conv2d" and not pools:
            continue
        for a, b in ((xcl, w), (x, w.to(memory_format=CL))):
            a, b = a.clone().requires_grad_(), b.clone().requires_grad_()
            ref = [x.clone().requires_grad_(), w.clone().requires_grad_()]
            y, want = ours(a, b), ours(*ref)
            assert torch.equal(y, want), name
            helpers.assert_same_strides(y, theirs(a.detach(), b.detach()), name)
            g = torch.randn_like(want)
            y.backward(g.to(memory_format=CL) if g.dim() == 4 else g)
            want.backward(g)
            assert torch.equal(a.grad, ref[0].grad) and torch.equal(b.grad, ref[1].grad), name
