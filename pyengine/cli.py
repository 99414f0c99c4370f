"""pyengine's command line: `python -m pyengine <command> --help`.

  train       LeNet (or an MLP) on handwritten digits with pyengine's kernels, then the same
              training on torch.nn from the same seed, compared side by side (the main job)
  regression  a linear regression learning a known line
  classify    the 5-8-4-1 binary classifier on scikit-learn's make_classification data
  sharpen     a 3x3 sharpening filter applied to an image by pyengine's conv2d
"""
import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import List

import torch

from . import functional as PF
from .data import load_digits, load_mnist, normalize
from .models import MLP, BinaryClassifier, LeNet, LinearRegression, layers

BACKENDS = ("pyengine", "torch")
LABELS = {"pyengine": "pyengine", "torch": "torch.nn"}


# ---- train ------------------------------------------------------------------------------

@dataclass
class History:
    step_losses: List[float] = field(default_factory=list)
    epoch_losses: List[float] = field(default_factory=list)
    test_accuracy: List[float] = field(default_factory=list)
    epoch_seconds: List[float] = field(default_factory=list)


def _build_model(name: str, backend: str) -> torch.nn.Module:
    if name == "lenet":
        return LeNet(backend=backend)
    return MLP(backend=backend)


def _accuracy(model, images, labels, batch_size=512) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(labels), batch_size):
            logits = model(images[i:i + batch_size])
            correct += (logits.argmax(1) == labels[i:i + batch_size]).sum().item()
    model.train()
    return correct / max(1, len(labels))


def train_one(backend: str, splits, args, log=print) -> History:
    """Trains one backend's model; the seed fixes the initial weights and the batch order, so
    both backends see exactly the same run."""
    from tqdm import tqdm

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    model = _build_model(args.model, backend).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum)
    loss_fn = layers(backend).CrossEntropyLoss()
    x_train, y_train = splits.train_images.to(device), splits.train_labels.to(device)
    x_test, y_test = splits.test_images.to(device), splits.test_labels.to(device)
    order_rng = torch.Generator().manual_seed(args.seed)
    history = History()
    n = len(y_train)
    for epoch in range(1, args.epochs + 1):
        start = time.perf_counter()
        order = torch.randperm(n, generator=order_rng).to(device)
        total, batches = 0.0, range(0, n, args.batch_size)
        bar = tqdm(batches, desc=f"{LABELS[backend]:>8} epoch {epoch:>2}/{args.epochs}",
                   leave=False, disable=args.quiet, unit="batch", file=sys.stderr)
        for i in bar:
            idx = order[i:i + args.batch_size]
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(x_train[idx]), y_train[idx])
            loss.backward()
            optimizer.step()
            value = loss.item()
            history.step_losses.append(value)
            total += value * len(idx)
            bar.set_postfix(loss=f"{value:.4f}")
        if device.type == "cuda":
            torch.cuda.synchronize()
        history.epoch_seconds.append(time.perf_counter() - start)
        history.epoch_losses.append(total / n)
        history.test_accuracy.append(_accuracy(model, x_test, y_test))
        log(f"{LABELS[backend]:>8}  epoch {epoch:>2}/{args.epochs}  loss "
            f"{history.epoch_losses[-1]:.4f}  test accuracy {100 * history.test_accuracy[-1]:6.2f}%"
            f"  ({history.epoch_seconds[-1]:.2f} s)")
    return history


def _plot(histories, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for backend, h in histories.items():
        style = "-" if backend == "pyengine" else "--"
        ax_loss.plot(h.step_losses, style, label=LABELS[backend], linewidth=1)
        ax_acc.plot(range(1, len(h.test_accuracy) + 1), [100 * a for a in h.test_accuracy],
                    style, marker="o", label=LABELS[backend])
    ax_loss.set(xlabel="training step", ylabel="cross-entropy loss", yscale="log",
                title="training loss")
    ax_acc.set(xlabel="epoch", ylabel="test accuracy (%)", title="held-out accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def cmd_train(args) -> int:
    if args.epochs < 1 or args.batch_size < 1 or args.lr <= 0:
        raise SystemExit("train: --epochs and --batch-size must be positive and --lr > 0")
    torch.set_num_threads(args.threads) if args.threads else None
    size = 32 if args.model == "lenet" else 28
    splits = load_mnist(args.data, size) if args.data else load_digits(size)
    normalize(splits)
    print(f"data: {splits.source}: {len(splits.train_labels)} training and "
          f"{len(splits.test_labels)} held-out test images; model {args.model}, device "
          f"{args.device}, {args.epochs} epochs, batch {args.batch_size}, SGD lr {args.lr} "
          f"momentum {args.momentum}, seed {args.seed}")
    histories = {}
    for backend in BACKENDS if args.compare else ("pyengine",):
        histories[backend] = train_one(backend, splits, args)

    os.makedirs(args.out, exist_ok=True)
    plot_path = os.path.join(args.out, "loss_curves.png")
    _plot(histories, plot_path, f"{args.model} on {splits.source}")
    summary = {b: {"test_accuracy": h.test_accuracy[-1],
                   "seconds_per_epoch": sum(h.epoch_seconds) / len(h.epoch_seconds),
                   "final_epoch_loss": h.epoch_losses[-1],
                   "epoch_losses": h.epoch_losses, "test_accuracy_per_epoch": h.test_accuracy}
               for b, h in histories.items()}
    print()
    print(f"{'':24}" + "".join(f"{LABELS[b]:>12}" for b in histories))
    print(f"{'test accuracy':24}" + "".join(f"{100 * s['test_accuracy']:>11.2f}%"
                                             for s in summary.values()))
    print(f"{'seconds per epoch':24}" + "".join(f"{s['seconds_per_epoch']:>12.3f}"
                                                 for s in summary.values()))
    print(f"{'final epoch loss':24}" + "".join(f"{s['final_epoch_loss']:>12.5f}"
                                                for s in summary.values()))
    if len(histories) == 2:
        a, b = histories["pyengine"].step_losses, histories["torch"].step_losses
        largest = max(abs(x - y) for x, y in zip(a, b))
        summary["largest_step_loss_difference"] = largest
        print(f"largest difference between the two runs' per-step losses: {largest:.3g}")
    with open(os.path.join(args.out, "metrics.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(f"loss curves: {plot_path}; metrics: {os.path.join(args.out, 'metrics.json')}")
    return 0


# ---- regression -------------------------------------------------------------------------

def cmd_regression(args) -> int:
    """Learns y = slope * x + intercept from noisy samples with full-batch SGD."""
    gen = torch.Generator().manual_seed(args.seed)
    x = torch.rand(100, 1, generator=gen) * 10
    y = args.slope * x + args.intercept + 0.1 * torch.randn(100, 1, generator=gen)
    x_mean, x_std = x.mean(), x.std()
    xs = (x - x_mean) / x_std  # standardised input keeps lr 0.01 stable
    print(f"target line: y = {args.slope} x + {args.intercept}; {args.epochs} epochs, SGD lr "
          f"{args.lr}")
    for backend in BACKENDS:
        torch.manual_seed(args.seed)
        model = LinearRegression(backend)
        opt = torch.optim.SGD(model.parameters(), lr=args.lr)
        loss_fn = layers(backend).MSELoss()
        for _ in range(args.epochs):
            opt.zero_grad()
            loss = loss_fn(model(xs), y)
            loss.backward()
            opt.step()
        w = model.linear.weight.item() / x_std.item()
        b = model.linear.bias.item() - w * x_mean.item()
        print(f"{LABELS[backend]:>8}: learned y = {w:.4f} x + {b:.4f}  (final MSE {loss.item():.5f})")
    return 0


# ---- classify ---------------------------------------------------------------------------

def quartic_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The tutorial's custom regression loss: mean of (prediction - target)^4."""
    return ((prediction - target) ** 4).mean()


def cmd_classify(args) -> int:
    from sklearn.datasets import make_classification

    x, y = make_classification(n_samples=args.samples, n_features=5, n_informative=3,
                               random_state=args.seed)
    x = torch.tensor(x, dtype=torch.float32)
    y = torch.tensor(y, dtype=torch.float32).unsqueeze(1)
    n_train = int(0.8 * len(y))
    print(f"make_classification: {n_train} training, {len(y) - n_train} test samples, 5 "
          f"features; {'mixed relu+tanh' if args.mixed else 'relu'} classifier, {args.loss} "
          f"loss, SGD lr {args.lr}, {args.epochs} epochs")
    for backend in BACKENDS:
        torch.manual_seed(args.seed)
        model = BinaryClassifier(mixed=args.mixed, backend=backend)
        opt = torch.optim.SGD(model.parameters(), lr=args.lr)
        loss_fn = layers(backend).BCELoss() if args.loss == "bce" else quartic_loss
        for _ in range(args.epochs):
            for i in range(0, n_train, args.batch_size):
                opt.zero_grad()
                loss = loss_fn(model(x[i:min(i + args.batch_size, n_train)]),
                               y[i:min(i + args.batch_size, n_train)])
                loss.backward()
                opt.step()
        with torch.no_grad():
            accuracy = ((model(x[n_train:]) > 0.5).float() == y[n_train:]).float().mean().item()
        print(f"{LABELS[backend]:>8}: test accuracy {100 * accuracy:.2f}%  (last batch loss "
              f"{loss.item():.4f})")
    return 0


# ---- sharpen ----------------------------------------------------------------------------

def sharpen_kernel(channels: int) -> torch.Tensor:
    """The tutorial's 3x3 sharpening kernel (centre 1, the others -1/9), one per channel."""
    k = torch.full((3, 3), -1.0 / 9.0)
    k[1, 1] = 1.0
    return k.expand(channels, 1, 3, 3).contiguous()


def sharpen(image: torch.Tensor) -> torch.Tensor:
    """image (C, H, W) in [0, 1] -> the filtered image, clipped to [0, 1]."""
    c = image.shape[0]
    out = PF.conv2d(image.unsqueeze(0), sharpen_kernel(c).to(image), padding=1, groups=c)
    return out.squeeze(0).clamp(0.0, 1.0)


def cmd_sharpen(args) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.image as mpimg
    import numpy as np

    array = mpimg.imread(args.input)
    if array.dtype == np.uint8:
        array = array.astype(np.float32) / 255.0
    array = np.atleast_3d(array)[..., :3]  # drop alpha; grey stays one channel
    image = torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1))).float()
    result = sharpen(image).numpy().transpose(1, 2, 0)
    if result.shape[2] == 1:
        mpimg.imsave(args.output, result[..., 0], cmap="gray", vmin=0.0, vmax=1.0)
    else:
        mpimg.imsave(args.output, result)
    print(f"sharpened {args.input} ({array.shape[1]}x{array.shape[0]}, {array.shape[2]} "
          f"channel(s)) -> {args.output}")
    return 0


# ---- argument parsing -------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pyengine", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train on handwritten digits, pyengine vs torch.nn",
                       description="Train LeNet (or the 784-256-10 MLP) on handwritten digits "
                       "with pyengine's kernels, then the same network on torch.nn from the "
                       "same seed, and compare accuracy, time per epoch and losses.")
    t.add_argument("--model", choices=("lenet", "mlp"), default="lenet",
                   help="lenet: LeNet-5 on 32x32 images; mlp: 784-256-10 on 28x28 (default "
                        "lenet)")
    t.add_argument("--data", metavar="DIR", help="read MNIST's IDX files from DIR instead of "
                   "scikit-learn's bundled digits")
    t.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    t.add_argument("--epochs", type=int, default=15, help="passes over the training set "
                   "(default 15)")
    t.add_argument("--batch-size", type=int, default=32, help="default 32")
    t.add_argument("--lr", type=float, default=0.01, help="SGD learning rate (default 0.01)")
    t.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default 0.9)")
    t.add_argument("--seed", type=int, default=0, help="weights and batch order (default 0)")
    t.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's)")
    t.add_argument("--out", default="runs/train", help="folder for the loss plot and "
                   "metrics.json (default runs/train)")
    t.add_argument("--no-compare", dest="compare", action="store_false",
                   help="train with pyengine only, skipping the torch.nn run")
    t.add_argument("--quiet", action="store_true", help="no progress bars")
    t.set_defaults(func=cmd_train)

    r = sub.add_parser("regression", help="linear regression learning a known line")
    r.add_argument("--slope", type=float, default=2.0)
    r.add_argument("--intercept", type=float, default=1.0)
    r.add_argument("--epochs", type=int, default=1000)
    r.add_argument("--lr", type=float, default=0.01)
    r.add_argument("--seed", type=int, default=0)
    r.set_defaults(func=cmd_regression)

    c = sub.add_parser("classify", help="5-8-4-1 binary classifier on make_classification")
    c.add_argument("--mixed", action="store_true", help="relu and tanh branches added")
    c.add_argument("--loss", choices=("bce", "quartic"), default="bce",
                   help="bce, or the custom fourth-power regression loss")
    c.add_argument("--samples", type=int, default=1000)
    c.add_argument("--epochs", type=int, default=50)
    c.add_argument("--batch-size", type=int, default=32)
    c.add_argument("--lr", type=float, default=0.1)
    c.add_argument("--seed", type=int, default=0)
    c.set_defaults(func=cmd_classify)

    s = sub.add_parser("sharpen", help="sharpen an image with pyengine's conv2d")
    s.add_argument("input", help="image file (PNG)")
    s.add_argument("output", help="where to write the sharpened PNG")
    s.set_defaults(func=cmd_sharpen)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)
