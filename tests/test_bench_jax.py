"""The benchmark suite's jax contender (benchmarks/jax_steps.py) computes what torch.nn computes:
from the same weights and batch, the same inference outputs, and a training step with the same
loss and the same parameter updates, step after step. Skipped without JAX (CI has none)."""
import os
import sys

import numpy as np
import pytest
import torch

jax = pytest.importorskip("jax")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks import jax_steps, suite  # noqa: E402
from helpers import assert_close, raises  # noqa: E402
from pyengine.models import MLP, BinaryClassifier, LeNet  # noqa: E402

BATCH = 3
# Outputs and losses of these small networks, summed in another order: a few fp32 ulps apart.
FP32 = dict(rtol=1e-5, atol=1e-6)
# (model factory, input shape, target): the suite's networks (suite.NETWORKS), torch.nn layers
NETWORKS = {
    "lenet": (lambda: LeNet(backend="torch"), (1, 32, 32), torch.randn),
    "mlp": (lambda: MLP(backend="torch"), (1, 28, 28), torch.randn),
    "classifier": (lambda: BinaryClassifier(backend="torch"), (5,), torch.rand),
}


def to_torch(a) -> torch.Tensor:
    return torch.tensor(np.array(a))


def network(name):
    factory, in_shape, target = NETWORKS[name]
    model = factory()
    x = torch.randn(BATCH, *in_shape)
    y = target(BATCH, model(x).shape[1])
    return model, x, y


@pytest.mark.parametrize("name", list(NETWORKS))
def test_inference_matches_torch(name):
    model, x, _ = network(name)
    out = jax_steps.Inference(model, x)()
    assert out.dtype == np.float32 and out.devices() == {jax_steps.CPU}
    with torch.no_grad():
        assert_close(to_torch(out), model(x), **FP32)


@pytest.mark.parametrize("name", list(NETWORKS))
def test_train_steps_match_torch(name):
    model, x, y = network(name)
    step = jax_steps.TrainStep(model, x, y, suite.SGD_LR)
    start = {k: p.detach().clone() for k, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=suite.SGD_LR)
    for _ in range(2):  # the second step starts from the first one's parameters
        opt.zero_grad()
        loss = torch.nn.MSELoss()(model(x), y)
        loss.backward()
        opt.step()
        jax_loss = step()
        assert jax_loss.dtype == np.float32 and jax_loss.devices() == {jax_steps.CPU}
        assert_close(to_torch(jax_loss), loss.detach(), **FP32)
        assert step.params.keys() == start.keys()
        for k, p in model.named_parameters():
            ours = to_torch(step.params[k])
            assert ours.dtype == torch.float32
            # The change since the start, not the parameters themselves, which lr * grad barely
            # moves: a wrong gradient or update shows in it. Each side rounds its parameters to
            # fp32 on every step: a few ulps of the largest parameter are allowed for that.
            theirs = p.detach() - start[k]
            ulps = 4 * torch.finfo(torch.float32).eps * start[k].abs().max()
            assert_close(ours - start[k], theirs, rtol=1e-4,
                         atol=1e-4 * theirs.abs().max() + ulps, msg=lambda m, k=k: f"{k}: {m}")


def test_the_suite_times_the_same_step_for_jax_and_torch():
    """network_run's jax contender starts from the torch contender's weights and batch."""
    _, torch_step = suite.network_run("mlp 784-256-10", 2, "train_step", "torch", "cpu")
    _, jax_step = suite.network_run("mlp 784-256-10", 2, "train_step", "jax", "cpu")
    for _ in range(2):
        assert_close(to_torch(jax_step()), torch_step().detach(), **FP32)


def test_refuses_what_it_has_no_version_of():
    with raises(ValueError, "fp32", "x", "torch.float64"):
        jax_steps.Inference(LeNet(backend="torch"), torch.randn(1, 1, 32, 32, dtype=torch.float64))
    with raises(ValueError, "no JAX version", "mixed=False"):
        jax_steps.Inference(BinaryClassifier(mixed=True, backend="torch"), torch.randn(1, 5))
