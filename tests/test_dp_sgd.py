"""examples/dp_sgd.py: DP-SGD's clipped per-sample gradients through vmap(grad(...)) over
pyengine's LeNet equal the same step done the slow way (one backward pass per sample through
torch.nn's LeNet), and a few noisy steps on the digits learn."""
import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
import dp_sgd  # noqa: E402

from pyengine.models import LeNet  # noqa: E402


def test_clipped_mean_matches_a_loop_of_backward_passes():
    torch.manual_seed(0)
    ours = LeNet(backend="pyengine").double()
    theirs = LeNet(backend="torch").double()
    theirs.load_state_dict(ours.state_dict())
    images = torch.randn(6, 1, 32, 32, dtype=torch.float64)
    labels = torch.randint(0, 10, (6,))
    clip = 0.05  # small enough that every sample is clipped here

    params = {k: v.detach() for k, v in ours.named_parameters()}
    grads = dp_sgd.per_sample_gradients(ours, params, images, labels)
    update = dp_sgd.clipped_noisy_mean(grads, clip=clip, noise=0.0)

    expected = {k: torch.zeros_like(v) for k, v in params.items()}
    for i in range(len(labels)):
        theirs.zero_grad()
        F.cross_entropy(theirs(images[i:i + 1]), labels[i:i + 1]).backward()
        sample = {k: p.grad.clone() for k, p in theirs.named_parameters()}
        norm = torch.stack([g.norm() for g in sample.values()]).norm()
        assert norm > clip
        for k, g in sample.items():
            expected[k] += g * (clip / norm) / len(labels)
    for k in params:
        torch.testing.assert_close(update[k], expected[k], rtol=1e-7, atol=1e-10)


def test_noise_has_the_requested_scale():
    grads = {"w": torch.zeros(4, 1000, dtype=torch.float64)}
    update = dp_sgd.clipped_noisy_mean(grads, clip=2.0, noise=1.5,
                                       generator=torch.Generator().manual_seed(0))
    # sum of 4 zero gradients + N(0, 3^2), divided by 4: std 0.75 (1000 draws: within 10%)
    assert abs(update["w"].std().item() - 0.75) < 0.075


def test_a_few_noisy_steps_learn_the_digits():
    pytest.importorskip("sklearn")
    # chance is 0.1; this fixed run reaches ~0.6 (noise and clipping slow it, they do not stop it)
    assert dp_sgd.train(["--epochs", "1", "--noise", "0.5"]) > 0.3
