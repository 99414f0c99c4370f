"""pyengine.patch(): an unmodified tutorial script runs on pyengine's kernels (the profiler sees
pyengine's operators and not ATen's), and leaving the context restores torch's functions."""
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.optim as optim

import pyengine
from helpers import assert_close


class TutorialNet(nn.Module):
    """The "Neural Networks" tutorial's LeNet, written against torch.nn and F as it is there."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 5)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), (2, 2))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


def _train_steps(net, steps=3):
    criterion = nn.MSELoss()
    optimizer = optim.SGD(net.parameters(), lr=0.01)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, target = torch.randn(4, 1, 32, 32, generator=gen), torch.randn(4, 10, generator=gen)
        optimizer.zero_grad()
        loss = criterion(net(x), target)
        loss.backward()
        optimizer.step()
    return loss


def _profiled(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        result = fn()
    return result, {e.name for e in prof.events()}


def test_patched_tutorial_runs_on_pyengine_kernels():
    torch.manual_seed(0)
    net = TutorialNet()
    reference = TutorialNet()
    reference.load_state_dict(net.state_dict())
    with pyengine.patch():
        loss, ops = _profiled(lambda: _train_steps(net))
    ref_loss, ref_ops = _profiled(lambda: _train_steps(reference))
    for op in ("conv2d", "conv2d_backward", "max_pool2d_with_indices", "max_pool2d_backward",
               "linear", "linear_backward", "relu", "relu_backward", "mse_loss",
               "mse_loss_backward"):
        assert f"pyengine::{op}" in ops, op
    assert not {"aten::convolution", "aten::addmm", "aten::max_pool2d_with_indices",
                "aten::mse_loss"} & ops
    assert "aten::convolution" in ref_ops and not any(o.startswith("pyengine::") for o in ref_ops)
    assert_close(loss, ref_loss, rtol=1e-4, atol=1e-6)
    for p, q in zip(net.parameters(), reference.parameters()):
        assert_close(p, q, rtol=1e-4, atol=1e-6)


def test_patch_restores_and_nests():
    originals = (F.conv2d, F.relu, F.max_pool2d, F.cross_entropy, torch.sigmoid, torch.tanh,
                 torch.relu)
    with pyengine.patch():
        assert pyengine.is_enabled() and F.relu is not originals[1]
        with pyengine.patch():
            assert torch.tanh is not originals[5]
        assert pyengine.is_enabled() and torch.tanh is not originals[5]
    assert not pyengine.is_enabled()
    assert (F.conv2d, F.relu, F.max_pool2d, F.cross_entropy, torch.sigmoid, torch.tanh,
            torch.relu) == originals
    pyengine.enable()
    try:
        _, ops = _profiled(lambda: torch.sigmoid(torch.randn(3)) + torch.relu(torch.randn(3)))
        assert {"pyengine::sigmoid", "pyengine::relu"} <= ops
    finally:
        pyengine.disable()
    assert torch.sigmoid is originals[4]


def test_patch_exits_cleanly_on_error_and_as_decorator():
    try:
        with pyengine.patch():
            raise KeyError("boom")
    except KeyError:
        pass
    assert not pyengine.is_enabled()

    @pyengine.patch()
    def inside():
        return pyengine.is_enabled()

    assert inside() and not pyengine.is_enabled()


def test_patch_leaves_what_pyengine_lacks_to_torch():
    """What pyengine does not implement (other dtypes, out=, a configuration pyengine.functional
    declines) runs torch's own function: the profiler sees torch's operator and no pyengine one.
    The same calls on what pyengine implements run pyengine's operator instead."""
    x, t = torch.randn(4, 3), torch.randint(0, 3, (4,))
    probs = torch.softmax(torch.randn(4, 3), 1)
    ints, out = torch.tensor([-2, 3]), torch.empty(4, 3)
    cplx = torch.zeros(2, dtype=torch.complex64)
    # (patched call, torch's operator it must run, the same call on what pyengine implements,
    #  pyengine's operator that must run then)
    cases = {
        "integer dtype": (lambda: torch.relu(ints), "aten::relu",
                          lambda: torch.relu(ints.float()), "pyengine::relu"),
        "complex64": (lambda: torch.tanh(cplx), "aten::tanh",
                      lambda: torch.tanh(cplx.real), "pyengine::tanh"),
        "out=": (lambda: torch.tanh(x, out=out), "aten::tanh",
                 lambda: torch.tanh(x), "pyengine::tanh"),
        # torch promotes a float64 probability target of a float32 input; pyengine declines
        "mixed-dtype probabilities": (lambda: F.cross_entropy(x, probs.double()),
                                      "aten::cross_entropy_loss",
                                      lambda: F.cross_entropy(x, probs, label_smoothing=0.1),
                                      "pyengine::cross_entropy"),
    }
    expected = {name: fallback() for name, (fallback, *_) in cases.items()}  # torch, unpatched
    with pyengine.patch():
        for name, (fallback, torch_op, supported, pyengine_op) in cases.items():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # (mixed dtypes: reported once)
                result, ops = _profiled(fallback)
            assert torch_op in ops and not any(o.startswith("pyengine::") for o in ops), (name, ops)
            assert_close(result, expected[name], rtol=0, atol=0)
            _, ops = _profiled(supported)
            assert pyengine_op in ops and torch_op not in ops, (name, ops)
    assert torch.equal(out, torch.tanh(x))  # out= was written


def test_disable_without_enable_raises():
    import pytest

    with pytest.raises(RuntimeError, match="not active"):
        pyengine.disable()
