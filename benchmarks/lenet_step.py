"""LeNet training step (forward, MSE loss, backward, SGD), pyengine layers against torch.nn,
in one process, fp32. Prints a table of medians; optional CSV.

    python -m benchmarks.lenet_step [--device cpu] [--batches 1 64 256] [--csv out.csv]
"""
import argparse
import csv
import platform
import sys

import torch

from benchmarks.timing import time_fn
from pyengine.models import LeNet, layers


def make_step(backend: str, batch: int, device: str):
    torch.manual_seed(0)
    model = LeNet(backend=backend).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(batch, 1, 32, 32, device=device)
    y = torch.randn(batch, 10, device=device)
    loss_fn = layers(backend).MSELoss()

    def step():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        return loss

    return step


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 64, 256])
    p.add_argument("--runs", type=int, default=50)
    p.add_argument("--csv", help="also write the results to this CSV file")
    args = p.parse_args(argv)
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = False  # pyengine's kernels are plain fp32
        torch.backends.cudnn.allow_tf32 = False

    rows = []
    for batch in args.batches:
        steps = {b: make_step(b, batch, args.device) for b in ("pyengine", "torch")}
        # Alternate the contenders so drifts in machine load hit both alike.
        times = {b: [] for b in steps}
        for _ in range(3):
            for b, step in steps.items():
                times[b].append(time_fn(step, args.device, runs=max(5, args.runs // 3)))
        med = {b: sorted(t.median_ms for t in ts)[1] for b, ts in times.items()}
        rows.append((batch, med["pyengine"], med["torch"], med["pyengine"] / med["torch"]))

    print(f"LeNet training step, {args.device}, fp32, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print(f"{'batch':>6} {'pyengine ms':>12} {'torch ms':>10} {'ratio':>7}")
    for batch, ours, theirs, ratio in rows:
        print(f"{batch:>6} {ours:>12.3f} {theirs:>10.3f} {ratio:>7.2f}")
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["device", "torch", "batch", "pyengine_ms", "torch_ms", "ratio"])
            for r in rows:
                w.writerow([args.device, torch.__version__, *r])
    return 0


if __name__ == "__main__":
    sys.exit(main())
