"""DP-SGD on handwritten digits with pyengine's LeNet: per-sample gradients from
torch.func.vmap(torch.func.grad(...)) through pyengine's operators (one batched call per
operator, not a loop over samples), each clipped to an L2 norm of at most `clip`, summed, plus
Gaussian noise of standard deviation `noise * clip`, averaged over the batch: the step of
Abadi et al., "Deep Learning with Differential Privacy" (2016). No privacy accounting here: this
shows the mechanics, not a privacy guarantee.

    python examples/dp_sgd.py [--epochs 3] [--clip 1.0] [--noise 1.0] [--lr 0.5]
"""
import argparse
from typing import Dict

import torch
from torch.func import functional_call, grad, vmap

import pyengine.functional as PF
from pyengine.data import load_digits, normalize
from pyengine.models import LeNet


def per_sample_gradients(model: torch.nn.Module, params: Dict[str, torch.Tensor],
                         images: torch.Tensor, labels: torch.Tensor) -> Dict[str, torch.Tensor]:
    """{name: (batch, *param.shape)}: the gradient of each sample's cross-entropy loss."""
    def sample_loss(p, image, label):
        return PF.cross_entropy(functional_call(model, p, (image[None],)), label[None])
    return vmap(grad(sample_loss), in_dims=(None, 0, 0))(params, images, labels)


def clipped_noisy_mean(grads: Dict[str, torch.Tensor], clip: float, noise: float,
                       generator: torch.Generator = None) -> Dict[str, torch.Tensor]:
    """Each sample's whole gradient (all parameters together) scaled to L2 norm <= clip, then
    summed over the batch, plus N(0, (noise * clip)^2) per coordinate, divided by the batch."""
    batch = next(iter(grads.values())).shape[0]
    norms = torch.stack([g.flatten(1).norm(dim=1) for g in grads.values()]).norm(dim=0)
    scale = (clip / (norms + 1e-12)).clamp(max=1.0)
    out = {}
    for name, g in grads.items():
        total = (g * scale.view(-1, *[1] * (g.dim() - 1))).sum(0)
        if noise > 0:
            total = total + noise * clip * torch.randn(total.shape, generator=generator,
                                                        dtype=total.dtype)
        out[name] = total / batch
    return out


def dp_sgd_step(model: torch.nn.Module, images, labels, lr: float, clip: float, noise: float,
                generator: torch.Generator = None) -> None:
    params = {k: v.detach() for k, v in model.named_parameters()}
    update = clipped_noisy_mean(per_sample_gradients(model, params, images, labels), clip, noise,
                                generator)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p -= lr * update[name]


def accuracy(model, images, labels) -> float:
    with torch.no_grad():
        return (model(images).argmax(1) == labels).float().mean().item()


def train(argv=None) -> float:
    """Trains with the command line's settings; returns the final test accuracy."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.5)
    parser.add_argument("--clip", type=float, default=1.0)
    parser.add_argument("--noise", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    data = load_digits()
    normalize(data)
    model = LeNet(backend="pyengine")
    n = len(data.train_labels)
    for epoch in range(1, args.epochs + 1):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, args.batch_size):
            idx = order[start:start + args.batch_size]
            dp_sgd_step(model, data.train_images[idx], data.train_labels[idx], args.lr,
                        args.clip, args.noise, generator)
        final = accuracy(model, data.test_images, data.test_labels)
        print(f"epoch {epoch}: test accuracy {final:.3f}")
    return final


def main(argv=None) -> int:
    train(argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
