"""Higher-order and transformed autograd through pyengine's operators, against torch.nn.

The per-operator proofs are in tests/test_samples.py (float64 gradcheck with forward mode, and
gradgradcheck backward-over-backward and forward-over-backward on every sample). Here: what
people build from them, on LeNet with pyengine's layers beside the same LeNet with torch.nn's
(same weights, same data): a WGAN-GP style gradient penalty, a Hessian-vector product, and the
torch.func transforms (grad, vjp, jacrev, jacfwd, hessian, per-sample gradients with
vmap(grad)), plus the clear error for what is not supported.
"""
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, hessian, jacfwd, jacrev, vjp, vmap

import pyengine.functional as PF
from pyengine.models import LeNet

TOL = dict(rtol=1e-7, atol=1e-9)  # float64 throughout, summed in different orders


def twin_lenets(seed=None):
    """(pyengine LeNet, torch.nn LeNet) with the same float64 weights."""
    ours = LeNet(backend="pyengine").double()
    theirs = LeNet(backend="torch").double()
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def digits(batch):
    return torch.randn(batch, 1, 32, 32, dtype=torch.float64)


def assert_all_close(ours, theirs):
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("batch", [1, 4])
def test_gradient_penalty(batch):
    """WGAN-GP: the critic's loss includes (|d critic / d x| - 1)^2 at points between real and
    fake samples; its gradient with respect to the weights is a double backward through every
    layer."""
    ours, theirs = twin_lenets()
    real, fake = digits(batch), digits(batch)
    alpha = torch.rand(batch, 1, 1, 1, dtype=torch.float64)
    mixed = (alpha * real + (1 - alpha) * fake)

    def penalty_grads(model):
        x = mixed.clone().requires_grad_()
        score = model(x)[:, 0].sum()
        (dx,) = torch.autograd.grad(score, x, create_graph=True)
        penalty = ((dx.flatten(1).norm(dim=1) - 1) ** 2).mean()
        loss = model(fake)[:, 0].mean() - model(real)[:, 0].mean() + 10 * penalty
        return torch.autograd.grad(loss, list(model.parameters()))

    assert_all_close(penalty_grads(ours), penalty_grads(theirs))


def test_hessian_vector_product():
    """H v of the MSE training loss with respect to all parameters (double backward), and the
    same through forward-over-reverse (torch.func.jvp of torch.func.grad)."""
    ours, theirs = twin_lenets()
    x, y = digits(3), torch.randn(3, 10, dtype=torch.float64)
    params = {k: v.detach() for k, v in ours.named_parameters()}
    v = {k: torch.randn_like(p) for k, p in params.items()}

    def loss(model, mse):
        return lambda p: mse(functional_call(model, p, (x,)), y)

    def hvp_reverse(model, mse):
        p = {k: t.clone().requires_grad_() for k, t in params.items()}
        g = torch.autograd.grad(loss(model, mse)(p), list(p.values()), create_graph=True)
        dot = sum((a * v[k]).sum() for a, k in zip(g, p))
        return torch.autograd.grad(dot, list(p.values()))

    def hvp_forward(model, mse):
        _, tangent = torch.func.jvp(grad(loss(model, mse)), (params,), (v,))
        return list(tangent.values())

    expected = hvp_reverse(theirs, F.mse_loss)
    assert_all_close(hvp_reverse(ours, PF.mse_loss), expected)
    assert_all_close(hvp_forward(ours, PF.mse_loss), expected)


def test_per_sample_gradients_match_a_loop():
    """vmap(grad(...)): the gradient of each sample's loss, for every parameter, equals a loop of
    single-sample backward passes through the torch.nn twin."""
    ours, theirs = twin_lenets()
    x, y = digits(5), torch.randint(0, 10, (5,))
    params = {k: v.detach() for k, v in ours.named_parameters()}

    def sample_loss(p, xi, yi):
        return PF.cross_entropy(functional_call(ours, p, (xi[None],)), yi[None])

    per_sample = vmap(grad(sample_loss), in_dims=(None, 0, 0))(params, x, y)
    for i in range(len(x)):
        theirs.zero_grad()
        F.cross_entropy(theirs(x[i:i + 1]), y[i:i + 1]).backward()
        for name, p in theirs.named_parameters():
            torch.testing.assert_close(per_sample[name][i], p.grad, **TOL)


@pytest.mark.parametrize("op", ["relu", "leaky_relu", "sigmoid", "tanh", "softmax",
                                "log_softmax"])
def test_func_transforms_on_activations(op):
    """grad, vjp, jacrev, jacfwd and hessian of each activation equal torch's."""
    ours = getattr(PF, op)
    theirs = getattr(F, op)
    extra = {"softmax": dict(dim=-1), "log_softmax": dict(dim=0)}.get(op, {})
    x = torch.randn(3, 4, dtype=torch.float64)
    w = torch.randn(3, 4, dtype=torch.float64)

    def scalar(fn):
        return lambda t: (fn(t, **extra) * w).sum()

    for transform in (grad, jacrev, jacfwd, hessian):
        f = scalar if transform in (grad, hessian) else (lambda fn: lambda t: fn(t, **extra))
        torch.testing.assert_close(transform(f(ours))(x), transform(f(theirs))(x), **TOL)
    out, pullback = vjp(lambda t: ours(t, **extra), x)
    torch.testing.assert_close(pullback(w)[0], vjp(lambda t: theirs(t, **extra), x)[1](w)[0],
                               **TOL)


def test_hessian_of_layers_and_losses():
    """torch.func.hessian (forward over reverse) through conv2d, max_pool2d, linear and each loss
    equals torch's."""
    x = torch.randn(2, 2, 6, 6, dtype=torch.float64)
    w = torch.randn(3, 2, 3, 3, dtype=torch.float64)
    lw = torch.randn(4, 12, dtype=torch.float64)
    t = torch.randn(2, 4, dtype=torch.float64)
    p = torch.rand(2, 4, dtype=torch.float64) * 0.8 + 0.1
    labels = torch.tensor([1, 3])

    def net(fn, conv, pool, linear, loss):
        def f(w_, lw_):
            h = pool(torch.tanh(conv(x, w_)), 2).flatten(1)
            return loss(linear(h, lw_))
        return f

    losses = {
        "mse": (lambda z: PF.mse_loss(z, t), lambda z: F.mse_loss(z, t)),
        "bce": (lambda z: PF.binary_cross_entropy(PF.sigmoid(z), p),
                lambda z: F.binary_cross_entropy(torch.sigmoid(z), p)),
        "ce": (lambda z: PF.cross_entropy(z, labels), lambda z: F.cross_entropy(z, labels)),
    }
    for name, (ours_loss, theirs_loss) in losses.items():
        ours = net(PF, PF.conv2d, PF.max_pool2d, PF.linear, ours_loss)
        theirs = net(F, F.conv2d, F.max_pool2d, F.linear, theirs_loss)
        h_ours = hessian(ours, argnums=(0, 1))(w, lw)
        h_theirs = hessian(theirs, argnums=(0, 1))(w, lw)
        for row_ours, row_theirs in zip(h_ours, h_theirs):
            assert_all_close(row_ours, row_theirs)


def test_forward_ad_reaches_every_output():
    """A tangent is never dropped silently: forward-mode AD through a whole LeNet step (forward
    ops) equals torch.nn's."""
    ours, theirs = twin_lenets()
    x, dx = digits(2), digits(2)
    out_ours = torch.func.jvp(ours, (x,), (dx,))
    out_theirs = torch.func.jvp(theirs, (x,), (dx,))
    assert_all_close(out_ours, out_theirs)


def test_unsupported_gradients_raise():
    """What pyengine does not differentiate raises, naming the argument (never a silent zero)."""
    x = torch.randn(4, 5, dtype=torch.float64)
    t = torch.randn(4, 5, dtype=torch.float64)
    weight = torch.rand(4, 5, dtype=torch.float64, requires_grad=True)
    with pytest.raises(RuntimeError, match="gradient with respect to weight is not supported"):
        PF.mse_loss(x, t, weight=weight)
    with pytest.raises(RuntimeError, match="forward-mode AD with respect to weight"):
        torch.func.jvp(lambda w: PF.mse_loss(x, t, weight=w), (weight.detach(),),
                       (torch.ones_like(weight),))
