"""pyengine's command line: `python -m pyengine <command> --help`.

  train       LeNet (or an MLP) on handwritten digits with pyengine's kernels and the same
              training on torch.nn from the same seed, compared side by side (the main job)
  regression  a linear regression learning a known line
  classify    the 5-8-4-1 binary classifier on scikit-learn's make_classification data
  sharpen     a 3x3 sharpening filter applied to an image by pyengine's conv2d
  info        versions, the build, the CPU and GPU code it runs, what each operator supports,
              and the command that rebuilds pyengine (pyengine.info())

A mistake in the arguments or the files they name is reported as one line on stderr and exit
status 2; a run that fails (a diverging loss, a missing optional package) as one line and status 1.
"""
import argparse
import contextlib
import json
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np
import torch

from . import __version__
from . import _C
from . import functional as PF
from ._info import format_info, info
from ._loader import REBUILD
from ._optional import MissingDependency, require
from .data import DataError, load_digits, load_mnist, normalize
from .models import MLP, BinaryClassifier, LeNet, LinearRegression, layers

PROG = "python -m pyengine"
BACKENDS = ("pyengine", "torch")
LABELS = {"pyengine": "pyengine", "torch": "torch.nn"}
USAGE_ERROR, RUN_FAILED = 2, 1


class CliError(Exception):
    """A problem to report as one line, `python -m pyengine <command>: error: <message>`, with
    exit status 2 (arguments or the files they name) or 1 (the run failed). main() is the one
    place that turns it into that line; any other exception is a bug and keeps its traceback."""

    def __init__(self, message: str, exit_code: int = USAGE_ERROR):
        super().__init__(message)
        self.exit_code = exit_code


# ---- argument types: each names what it expected and what it got --------------------------

def _bounded(convert, expected: str, low=None, high=None, low_inclusive=True):
    """An argparse type: convert(text), which must be finite and within [low, high] (or above low
    when not low_inclusive); argparse prefixes the message with the option's name."""
    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, but got {text!r}") from None
        too_low = low is not None and (value < low or (value == low and not low_inclusive))
        too_high = high is not None and value > high
        if not math.isfinite(value) or too_low or too_high:
            raise argparse.ArgumentTypeError(f"expected {expected}, but got {text}")
        return value
    return parse


def _usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


positive_int = _bounded(int, "a positive integer", low=1)
positive_float = _bounded(float, "a positive number", low=0, low_inclusive=False)
non_negative_float = _bounded(float, "a number >= 0", low=0)
finite_float = _bounded(float, "a finite number")
seed_int = _bounded(int, "an integer from 0 to 4294967295", low=0, high=2**32 - 1)
# 80/20 split: int(0.8 * n) training samples, the rest for testing; n = 2 gives one of each.
samples_int = _bounded(int, "an integer >= 2 (the 80/20 split needs at least one training and "
                       "one test sample)", low=2)


def threads_int(text: str) -> int:
    cpus = _usable_cpus()
    return _bounded(int, f"0 (torch's default) to {cpus} (the CPU cores this process may use)",
                    low=0, high=cpus)(text)


def device_arg(text: str) -> torch.device:
    """cpu, cuda or cuda:N, checked against this machine and this build of pyengine (at parse
    time, so before any data is loaded)."""
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(
            f"expected cpu, cuda or cuda:N, but got {text!r}") from None
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type != "cuda":
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, but got {text!r} "
                                         "(pyengine has CPU and CUDA kernels only)")
    if not torch.cuda.is_available():
        why = ("this torch was built without CUDA" if torch.version.cuda is None
               else "torch finds no usable GPU on this machine")
        raise argparse.ArgumentTypeError(f"{text}: CUDA is not available ({why}); use --device "
                                         "cpu")
    if not _C.built_with_cuda:
        raise argparse.ArgumentTypeError(
            f"{text}: pyengine was built without its CUDA kernels (no nvcc at build time); "
            f"rebuild it with a CUDA toolkit present, {' '.join(REBUILD.split())}, or use "
            "--device cpu")
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise argparse.ArgumentTypeError(
            f"{text}: no such device; this machine has {count} CUDA device(s), cuda:0 to "
            f"cuda:{count - 1}")
    return device


# ---- divergence -------------------------------------------------------------------------

class Diverged(Exception):
    """A training loss stopped being finite: where, and its value."""

    def __init__(self, backend: str, where: str, value: float):
        super().__init__(f"{LABELS[backend]} at {where} (loss {value})")
        self.backend = backend


def _check_finite(value: float, backend: str, where: str) -> None:
    if not math.isfinite(value):
        raise Diverged(backend, where, value)


def _divergence_error(diverged: List[Diverged], finished: List[str], lr: float,
                      momentum: float = 0.0, aftermath: str = "") -> CliError:
    """One line for runs whose loss blew up: where, the likely cause, and `aftermath`."""
    cause = f"--lr {lr:g} is too large for this model: try a smaller one, e.g. --lr {lr / 10:g}"
    if momentum >= 1:
        cause += f", and --momentum below 1 (it is {momentum:g})"
    if finished:  # the same start and batches, yet only one blew up
        cause = (f"{' and '.join(LABELS[b] for b in finished)} stayed finite, which an --lr at "
                 f"the edge of stability can cause as the runs' rounding drifts apart; "
                 f"{cause}; if only pyengine still diverges, please report it")
    return CliError(f"training diverged, the loss is no longer finite: "
                    f"{'; '.join(str(d) for d in diverged)}. {cause}.{aftermath}", RUN_FAILED)


# ---- train ------------------------------------------------------------------------------

@dataclass
class Run:
    """One backend's training: its model and optimizer, and what it recorded."""
    backend: str
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    loss_fn: torch.nn.Module
    order_rng: torch.Generator
    step_losses: List[float] = field(default_factory=list)
    epoch_losses: List[float] = field(default_factory=list)  # mean training loss per epoch
    test_accuracy: List[float] = field(default_factory=list)  # after each epoch
    epoch_seconds: List[float] = field(default_factory=list)  # training steps only
    first_step_gradients: Optional[List[torch.Tensor]] = None
    diverged: Optional[Diverged] = None
    scaler: Optional["torch.amp.GradScaler"] = None  # float16 autocast only


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")


def _build_model(name: str, backend: str) -> torch.nn.Module:
    if name == "lenet":
        return LeNet(backend=backend)
    return MLP(backend=backend)


def _start_run(backend: str, args) -> Run:
    """The seed fixes the initial weights and the batch order, so both backends start from the
    same weights and see the same batches."""
    torch.manual_seed(args.seed)
    model = _build_model(args.model, backend).to(args.device)
    # float16's range needs loss scaling (bfloat16's is float32's)
    scaler = (torch.amp.GradScaler(args.device.type) if args.amp_dtype == torch.float16
              else None)
    return Run(backend, model,
               torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum),
               layers(backend).CrossEntropyLoss(), torch.Generator().manual_seed(args.seed),
               scaler=scaler)


def _autocast(args):
    """torch.autocast in --amp's dtype on the run's device; a no-op without --amp."""
    if args.amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(args.device.type, dtype=args.amp_dtype)


def _accuracy(model, images, labels, args, batch_size=512) -> float:
    model.eval()
    correct = 0
    with torch.no_grad(), _autocast(args):
        for i in range(0, len(labels), batch_size):
            logits = model(images[i:i + batch_size])
            correct += (logits.argmax(1) == labels[i:i + batch_size]).sum().item()
    model.train()
    return correct / len(labels)


def _train_epoch(run: Run, epoch: int, data, args, progress_bar) -> None:
    """One pass over the training set in the run's own batch order. Records the epoch, or, at a
    non-finite loss, stops and records where in run.diverged."""
    x_train, y_train, x_test, y_test = data
    n = len(y_train)
    start = time.perf_counter()
    order = torch.randperm(n, generator=run.order_rng).to(args.device)
    total = 0.0
    batches = range(0, n, args.batch_size)
    steps = len(batches)
    if progress_bar:
        batches = progress_bar(batches, desc=f"{LABELS[run.backend]:>8} epoch {epoch:>2}/"
                               f"{args.epochs}", leave=False, unit="batch", file=sys.stderr)
    try:
        for step, i in enumerate(batches, 1):
            idx = order[i:i + args.batch_size]
            run.optimizer.zero_grad(set_to_none=True)
            with _autocast(args):
                loss = run.loss_fn(run.model(x_train[idx]), y_train[idx])
            value = loss.item()
            _check_finite(value, run.backend, f"epoch {epoch}, step {step} of {steps}")
            if run.scaler:
                run.scaler.scale(loss).backward()
                run.scaler.unscale_(run.optimizer)  # the gradients recorded below are true ones
            else:
                loss.backward()
            if run.first_step_gradients is None:
                run.first_step_gradients = [p.grad.detach().clone()
                                            for p in run.model.parameters()]
            if run.scaler:
                run.scaler.step(run.optimizer)  # skipped when a gradient overflowed
                run.scaler.update()
            else:
                run.optimizer.step()
            run.step_losses.append(value)
            total += value * len(idx)
            if progress_bar:
                batches.set_postfix(loss=f"{value:.4f}", refresh=False)
    except Diverged as exc:
        run.diverged = exc
        return
    finally:
        if progress_bar:
            batches.close()
    if args.device.type == "cuda":
        torch.cuda.synchronize(args.device)
    run.epoch_seconds.append(time.perf_counter() - start)
    run.epoch_losses.append(total / n)
    run.test_accuracy.append(_accuracy(run.model, x_test, y_test, args))
    print(f"{LABELS[run.backend]:>8}  epoch {epoch:>2}/{args.epochs}  loss "
          f"{run.epoch_losses[-1]:.4f}  test accuracy {100 * run.test_accuracy[-1]:6.2f}%  "
          f"({run.epoch_seconds[-1]:.2f} s)", flush=True)


def _progress_bar_factory(args):
    """tqdm, for a person watching: not with --quiet, nor when stderr goes to a pipe or a log
    (per-update lines would flood it); tqdm is then not even imported."""
    if args.quiet or not sys.stderr.isatty():
        return None
    return require("tqdm", "tqdm", "the progress bars (or pass --quiet)").tqdm


@contextlib.contextmanager
def _torch_settings(args):
    """The thread count asked for, and full float32 on CUDA (no TF32 in torch's convolutions and
    matmuls, as pyengine's kernels do), restored afterwards for callers in the same process."""
    saved = (torch.get_num_threads(), torch.backends.cudnn.allow_tf32,
             torch.backends.cuda.matmul.allow_tf32)
    try:
        if args.threads:
            torch.set_num_threads(args.threads)
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        yield
    finally:
        if args.threads:
            torch.set_num_threads(saved[0])
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved[1:]


# Epoch-time spread (90th / 10th percentile of epochs 2..N) above which the machine was busy.
BUSY_SPREAD = 1.3
# Step-1 relative differences above this are not float32 rounding but a disagreement.
AGREEMENT_BOUND = 1e-3


def agreement_bound(amp_dtype: Optional[torch.dtype]) -> float:
    """AGREEMENT_BOUND, or under --amp 64 units of the autocast dtype's rounding (0.5 for
    bfloat16, 0.06 for float16): the backends round at different places (pyengine pools the
    float32 convolution, torch its rounded output, where ties are common), and a pooling window
    decided the other way sends its gradient elsewhere. Measured at step 1 (LeNet, seed 0, batch
    32): conv1's weight gradients 0.11 apart in bfloat16 (torch's 0.12 from the float64 answer,
    pyengine's 0.045), 0.026 in float16."""
    return AGREEMENT_BOUND if amp_dtype is None else 64 * torch.finfo(amp_dtype).eps


EXPLANATION = (
    "Both runs start from the same weights and see the same batches. "
    "first_step_loss_difference: |pyengine - torch.nn| of the first step's loss (same weights, "
    "same batch: forward agreement). first_step_gradient_difference: the largest |difference| "
    "of any parameter's first-step gradient, relative to that parameter's largest |gradient| "
    "(backward agreement). Both are float32 rounding, ~1e-6, when the kernels agree; above "
    f"{AGREEMENT_BOUND:g} they would point to a bug (with --amp: the autocast dtype's rounding, "
    "~1e-2 for bfloat16; agreement_bound says the bound used). "
    "largest_step_loss_difference_first_epoch and largest_step_loss_difference (all epochs): the "
    "largest per-step loss difference. Rounding differs between the two (torch's summation order "
    "even depends on its thread count) and SGD amplifies tiny differences step by step, so these "
    "grow over the run: expected, not a bug. final_test_accuracy_difference: pyengine minus "
    "torch.nn, as a fraction. median_epoch_seconds_ratio: pyengine's median seconds per epoch "
    "(epochs 2..N, the first epoch's warm-up apart) over torch.nn's; epoch_seconds_spread is "
    f"the 90th over the 10th percentile of those epochs, and above {BUSY_SPREAD} "
    "machine_busy_warning says the machine was busy and the ratio unreliable.")


def _timing(seconds: List[float]) -> dict:
    later = seconds[1:]
    return {"first_epoch_seconds": seconds[0],
            "median_epoch_seconds": float(np.median(later)) if later else None,
            "epoch_seconds_spread": (float(np.percentile(later, 90) / np.percentile(later, 10))
                                     if len(later) >= 2 else None)}


def _comparison(ours: Run, theirs: Run, steps_per_epoch: int, bound: float) -> dict:
    differences = [abs(a - b) for a, b in zip(ours.step_losses, theirs.step_losses)]
    gradient_difference = max(
        ((a - b).abs().max() / b.abs().max().clamp_min(torch.finfo(b.dtype).tiny)).item()
        for a, b in zip(ours.first_step_gradients, theirs.first_step_gradients))
    ours_t, theirs_t = _timing(ours.epoch_seconds), _timing(theirs.epoch_seconds)
    ratio = (ours_t["median_epoch_seconds"] / theirs_t["median_epoch_seconds"]
             if ours_t["median_epoch_seconds"] else None)
    spreads = [t["epoch_seconds_spread"] for t in (ours_t, theirs_t)
               if t["epoch_seconds_spread"] is not None]
    return {
        "first_step_loss_difference": differences[0],
        "first_step_gradient_difference": gradient_difference,
        "agreement_bound": bound,
        "largest_step_loss_difference_first_epoch": max(differences[:steps_per_epoch]),
        "largest_step_loss_difference": max(differences),
        "final_test_accuracy_difference": ours.test_accuracy[-1] - theirs.test_accuracy[-1],
        "median_epoch_seconds_ratio": ratio,
        "machine_busy_warning": bool(spreads) and max(spreads) > BUSY_SPREAD,
        "explanation": EXPLANATION,
    }


def _print_report(runs: Dict[str, Run], comparison: Optional[dict], epochs: int) -> None:
    timings = {b: _timing(r.epoch_seconds) for b, r in runs.items()}
    both = comparison is not None

    def row(label, values, ratio=None):
        line = f"{label:26}" + "".join(f"{v:>12}" for v in values)
        print(line + (f"{ratio:>16}" if ratio else ""))

    print()
    row("", [LABELS[b] for b in runs], "pyengine/torch" if both else None)
    row("test accuracy", [f"{100 * r.test_accuracy[-1]:.2f}%" for r in runs.values()])
    row("final epoch loss", [f"{r.epoch_losses[-1]:.5f}" for r in runs.values()])
    first = [t["first_epoch_seconds"] for t in timings.values()]
    row("first epoch (s)", [f"{s:.3f}" for s in first],
        f"{first[0] / first[1]:.2f}" if both else None)
    if epochs >= 2:
        label = f"median epoch 2-{epochs} (s)" if epochs > 2 else "epoch 2 (s)"
        medians = [t["median_epoch_seconds"] for t in timings.values()]
        row(label, [f"{s:.3f}" for s in medians],
            f"{comparison['median_epoch_seconds_ratio']:.2f}" if both else None)
    if epochs >= 3:
        row("spread (p90/p10 epochs)", [f"{t['epoch_seconds_spread']:.2f}x"
                                        for t in timings.values()])
    if epochs < 3:
        print("(the first epoch includes warm-up; a median and a spread check over epochs 2..N "
              "need --epochs 3 or more)")
    elif max(t["epoch_seconds_spread"] for t in timings.values()) > BUSY_SPREAD:
        print(f"warning: epoch times varied by more than {BUSY_SPREAD}x (p90/p10): the machine "
              "was busy, so the time ratio is unreliable; rerun on an idle machine or with more "
              "--epochs")
    if not both:
        return
    agree = max(comparison["first_step_loss_difference"],
                comparison["first_step_gradient_difference"]) <= comparison["agreement_bound"]
    print(f"step 1 (same weights, same batch): losses differ by "
          f"{comparison['first_step_loss_difference']:.2g}, gradients by "
          f"{comparison['first_step_gradient_difference']:.2g} (relative): "
          + (f"the kernels agree (within {comparison['agreement_bound']:g}: float32 rounding is "
             "~1e-6, an autocast dtype's ~1e-3 to 1e-2)" if agree else
             f"DISAGREEMENT above {comparison['agreement_bound']:g}, which points to a bug in "
             "pyengine"))
    print(f"largest per-step loss difference: "
          f"{comparison['largest_step_loss_difference_first_epoch']:.2g} in epoch 1, "
          f"{comparison['largest_step_loss_difference']:.2g} over all epochs; final "
          f"test accuracy differs by {100 * comparison['final_test_accuracy_difference']:+.2f} "
          "points")
    print("(the runs drift apart as training goes on: float rounding differs, torch's even with "
          "its thread count, and SGD amplifies tiny differences; expected, not a bug)")


def _plot(runs: Dict[str, Run], path: str, title: str, steps_per_epoch: int) -> None:
    """Per-step training loss (pyengine raw, torch.nn as a moving average, so both show), their
    difference per step, and test accuracy per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    both = len(runs) == 2
    fig, axes = plt.subplots(1, 3 if both else 2, figsize=(16 if both else 11, 4))
    ax_loss, ax_acc = axes[0], axes[-1]
    ours = np.array(runs["pyengine"].step_losses)
    theirs = np.array(runs["torch"].step_losses) if both else ours
    window = max(1, min(steps_per_epoch, len(theirs) // 30))
    # A geometric mean runs through the middle of the raw curve on the log axis.
    smoothed = np.exp(np.convolve(np.log(np.maximum(theirs, 1e-12)), np.ones(window) / window,
                                  mode="valid"))
    ax_loss.plot(ours, color="tab:blue", linewidth=0.6, alpha=0.6, label="pyengine, each step")
    smoothed_label = LABELS["torch"] if both else "pyengine"
    ax_loss.plot(np.arange(window - 1, len(theirs)), smoothed, color="tab:orange", linewidth=2,
                 label=f"{smoothed_label}, geometric mean of {window} steps")
    ax_loss.set(xlabel="training step", ylabel="cross-entropy loss", yscale="log",
                title="training loss")
    if both:
        ax_diff = axes[1]
        difference = np.abs(ours - theirs)
        ax_diff.plot(np.where(difference > 0, difference, np.nan), ".", color="tab:green",
                     markersize=2, label="one step (exact zeros not shown)")
        ax_diff.axvline(steps_per_epoch - 0.5, color="grey", linestyle=":",
                        label="end of epoch 1")
        ax_diff.set(xlabel="training step", ylabel="|pyengine - torch.nn| loss", yscale="log",
                    title="per-step difference (float rounding, amplified by SGD)")
        ax_diff.legend()
        ax_diff.grid(alpha=0.3)
    for (backend, run), style in zip(runs.items(), ("o-", "x--")):
        ax_acc.plot(range(1, len(run.test_accuracy) + 1), [100 * a for a in run.test_accuracy],
                    style, label=LABELS[backend])
    ax_acc.set(xlabel="epoch", ylabel="test accuracy (%)", title="held-out accuracy")
    ax_acc.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _source_commit():
    """(commit, has uncommitted changes) of the git checkout pyengine runs from, or (None, None)
    when it runs from elsewhere (an installed copy) or git is unavailable."""
    package_dir = os.path.dirname(os.path.abspath(__file__))

    def git(*command):
        return subprocess.run(["git", "--no-optional-locks", "-C", package_dir, *command],
                               capture_output=True, text=True, timeout=5,
                               check=True).stdout.strip()
    try:
        top = git("rev-parse", "--show-toplevel")
        if not os.path.samefile(os.path.join(top, "pyengine"), package_dir):
            return None, None
        return git("rev-parse", "HEAD"), bool(git("status", "--porcelain",
                                                  "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None, None


def _prepare_out_folder(path: str) -> None:
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise CliError(f"--out {path}: cannot create the output folder ({exc.strerror})") from None


# --amp's default dtype per device type: bfloat16 on the CPU (float16 is slow there and needs
# loss scaling), float16 on a GPU (tensor cores everywhere; bfloat16 from Ampere on: --amp
# bfloat16).
AMP_DEFAULT = {"cpu": torch.bfloat16, "cuda": torch.float16}


def cmd_train(args) -> int:
    args.amp_dtype = (None if args.amp is None else AMP_DEFAULT[args.device.type]
                      if args.amp == "auto" else getattr(torch, args.amp))
    progress_bar = _progress_bar_factory(args)
    require("matplotlib", "matplotlib", "the loss plot")
    size = 32 if args.model == "lenet" else 28
    try:
        splits = load_mnist(args.data, size) if args.data else load_digits(size)
        normalize(splits)
    except (OSError, DataError) as exc:
        raise CliError(str(exc)) from None
    _prepare_out_folder(args.out)  # before training, so a bad --out costs no training time
    backends = BACKENDS if args.compare else ("pyengine",)
    with _torch_settings(args):
        settings = {"model": args.model, "data": splits.source,
                    "train_images": len(splits.train_labels),
                    "test_images": len(splits.test_labels), "epochs": args.epochs,
                    "batch_size": args.batch_size, "lr": args.lr, "momentum": args.momentum,
                    "seed": args.seed, "device": str(args.device),
                    "threads": torch.get_num_threads(),
                    "amp": str(args.amp_dtype).replace("torch.", "") if args.amp_dtype
                    else None}
        print(f"data: {splits.source}: {settings['train_images']} training and "
              f"{settings['test_images']} held-out test images; model {args.model}, device "
              f"{args.device}, {settings['threads']} CPU threads, "
              f"{_plural(args.epochs, 'epoch')}, batch {args.batch_size}, SGD lr {args.lr:g} "
              f"momentum {args.momentum:g}, seed {args.seed}, "
              + (f"autocast {settings['amp']}"
                 + (" with GradScaler" if args.amp_dtype == torch.float16 else "")
                 if args.amp_dtype else "float32"), flush=True)
        data = tuple(t.to(args.device) for t in (splits.train_images, splits.train_labels,
                                                   splits.test_images, splits.test_labels))
        runs = {b: _start_run(b, args) for b in backends}
        # Epochs alternate between the backends, so a busy spell on a shared machine slows both.
        for epoch in range(1, args.epochs + 1):
            for run in runs.values():
                if not run.diverged:
                    _train_epoch(run, epoch, data, args, progress_bar)
    diverged = [r.diverged for r in runs.values() if r.diverged]
    if diverged:
        raise _divergence_error(diverged, [b for b, r in runs.items() if not r.diverged],
                                args.lr, args.momentum, f" Nothing was written to {args.out}.")

    steps_per_epoch = len(range(0, settings["train_images"], args.batch_size))
    comparison = (_comparison(runs["pyengine"], runs["torch"], steps_per_epoch,
                              agreement_bound(args.amp_dtype)) if args.compare else None)
    _print_report(runs, comparison, args.epochs)
    plot_path = os.path.join(args.out, "loss_curves.png")
    _plot(runs, plot_path, f"{args.model} on {splits.source}", steps_per_epoch)
    commit, modified = _source_commit()
    metrics = {
        "settings": settings,
        "versions": {"pyengine": __version__, "torch": torch.__version__,
                     "python": platform.python_version(), "commit": commit,
                     "uncommitted_changes": modified},
        **{b: {"test_accuracy": r.test_accuracy[-1], "final_epoch_loss": r.epoch_losses[-1],
               **_timing(r.epoch_seconds), "epoch_seconds": r.epoch_seconds,
               "epoch_losses": r.epoch_losses, "test_accuracy_per_epoch": r.test_accuracy}
           for b, r in runs.items()},
    }
    if comparison:
        metrics["comparison"] = comparison
    metrics_path = os.path.join(args.out, "metrics.json")
    with open(metrics_path, "w") as f:
        json.dump(metrics, f, indent=2)
    print(f"loss curves: {plot_path}; metrics: {metrics_path}")
    return 0


# ---- regression -------------------------------------------------------------------------

def cmd_regression(args) -> int:
    """Learns y = slope * x + intercept from noisy samples with full-batch SGD."""
    gen = torch.Generator().manual_seed(args.seed)
    x = torch.rand(100, 1, generator=gen) * 10
    y = args.slope * x + args.intercept + 0.1 * torch.randn(100, 1, generator=gen)
    x_mean, x_std = x.mean(), x.std()
    xs = (x - x_mean) / x_std  # standardised input keeps lr 0.01 stable
    print(f"target line: y = {args.slope:g} x + {args.intercept:g}; {args.epochs} epochs, SGD lr "
          f"{args.lr:g}")
    diverged, finished = [], []
    for backend in BACKENDS:
        torch.manual_seed(args.seed)
        model = LinearRegression(backend)
        opt = torch.optim.SGD(model.parameters(), lr=args.lr)
        loss_fn = layers(backend).MSELoss()
        try:
            for epoch in range(1, args.epochs + 1):
                opt.zero_grad()
                loss = loss_fn(model(xs), y)
                loss.backward()
                opt.step()
                _check_finite(loss.item(), backend, f"epoch {epoch}")
        except Diverged as exc:
            diverged.append(exc)
            continue
        finished.append(backend)
        w = model.linear.weight.item() / x_std.item()
        b = model.linear.bias.item() - w * x_mean.item()
        print(f"{LABELS[backend]:>8}: learned y = {w:.4f} x + {b:.4f}  (final MSE "
              f"{loss.item():.5f})")
    if diverged:
        raise _divergence_error(diverged, finished, args.lr)
    return 0


# ---- classify ---------------------------------------------------------------------------

def quartic_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The tutorial's custom regression loss: mean of (prediction - target)^4."""
    return ((prediction - target) ** 4).mean()


def cmd_classify(args) -> int:
    datasets = require("sklearn.datasets", "scikit-learn", "make_classification's data")
    x, y = datasets.make_classification(n_samples=args.samples, n_features=5, n_informative=3,
                                        random_state=args.seed)
    x = torch.tensor(x, dtype=torch.float32)
    y = torch.tensor(y, dtype=torch.float32).unsqueeze(1)
    n_train = int(0.8 * len(y))
    print(f"make_classification: {n_train} training, {len(y) - n_train} test samples, 5 "
          f"features; {'mixed relu+tanh' if args.mixed else 'relu'} classifier, {args.loss} "
          f"loss, SGD lr {args.lr:g}, {args.epochs} epochs")
    diverged, finished = [], []
    for backend in BACKENDS:
        torch.manual_seed(args.seed)
        model = BinaryClassifier(mixed=args.mixed, backend=backend)
        opt = torch.optim.SGD(model.parameters(), lr=args.lr)
        loss_fn = layers(backend).BCELoss() if args.loss == "bce" else quartic_loss
        try:
            for epoch in range(1, args.epochs + 1):
                for step, i in enumerate(range(0, n_train, args.batch_size), 1):
                    end = min(i + args.batch_size, n_train)
                    opt.zero_grad()
                    loss = loss_fn(model(x[i:end]), y[i:end])
                    loss.backward()
                    opt.step()
                    _check_finite(loss.item(), backend, f"epoch {epoch}, step {step}")
        except Diverged as exc:
            diverged.append(exc)
            continue
        finished.append(backend)
        with torch.no_grad():
            accuracy = ((model(x[n_train:]) > 0.5).float() == y[n_train:]).float().mean().item()
        print(f"{LABELS[backend]:>8}: test accuracy {100 * accuracy:.2f}%  (last batch loss "
              f"{loss.item():.4f})")
    if diverged:
        raise _divergence_error(diverged, finished, args.lr)
    return 0


# ---- sharpen ----------------------------------------------------------------------------

SHARPEN_KERNEL_TEXT = ("centre 17/9, the eight neighbours -1/9: the image plus (the image minus "
                       "its 3x3 mean); the weights sum to 1, so flat areas keep their brightness")


def sharpen_kernel(channels: int) -> torch.Tensor:
    """The 3x3 unsharp-mask kernel, one per channel: identity + (identity - 3x3 box blur), i.e.
    centre 17/9 and the others -1/9. Its weights sum to 1, so brightness is kept (the tutorial's
    kernel, centre 1 and the others -1/9, sums to 1/9 and turns a photo nearly black)."""
    k = torch.full((3, 3), -1.0 / 9.0)
    k[1, 1] = 2.0 - 1.0 / 9.0
    return k.expand(channels, 1, 3, 3).contiguous()


def sharpen(image: torch.Tensor) -> torch.Tensor:
    """image (C, H, W) in [0, 1] -> sharpened by pyengine's conv2d, each channel on its own,
    clipped to [0, 1]. Borders are replicated outwards (no dark frame from zero padding)."""
    c = image.shape[0]
    padded = torch.nn.functional.pad(image.unsqueeze(0), (1, 1, 1, 1), mode="replicate")
    return PF.conv2d(padded, sharpen_kernel(c).to(image), groups=c).squeeze(0).clamp(0.0, 1.0)


@dataclass
class Picture:
    """An image split for filtering: colour (C, H, W) float in [0, 1] with C = 1 (grey) or 3,
    the untouched alpha channel (H, W) if any, and the bit depth to write back."""
    colour: torch.Tensor
    alpha: Optional[np.ndarray]
    max_value: int  # 255 or 65535


def _read_image(path: str) -> Picture:
    Image = require("PIL.Image", "Pillow", "reading and writing images")
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in ("I", "I;16", "I;16L", "I;16B"):  # 16-bit grey
                array, max_value = np.asarray(img).astype(np.int64), 65535
                if array.min() < 0 or array.max() > max_value:
                    raise CliError(f"{path}: grey values from {array.min()} to {array.max()} "
                                   "do not fit 16 bits; only 8- and 16-bit images are supported")
            else:
                if img.mode not in ("L", "LA", "RGB", "RGBA"):  # palette, 1-bit, CMYK, ...
                    has_alpha = img.mode in ("PA", "La", "RGBa") or "transparency" in img.info
                    img = img.convert("RGBA" if has_alpha else "RGB")
                array, max_value = np.asarray(img), 255
    except (OSError, Image.DecompressionBombError) as exc:
        raise CliError(f"cannot read {path} as an image: {exc}") from None
    if array.ndim == 2:
        array = array[..., None]
    alpha = array[..., -1] if array.shape[-1] in (2, 4) else None
    colour = array[..., :-1] if alpha is not None else array
    colour = torch.from_numpy(np.ascontiguousarray(colour.transpose(2, 0, 1)).astype(np.float32))
    return Picture(colour / max_value, alpha, max_value)


def _write_image(picture: Picture, path: str) -> None:
    Image = require("PIL.Image", "Pillow", "reading and writing images")
    dtype = np.uint8 if picture.max_value == 255 else np.uint16
    levels = np.rint(picture.colour.numpy().transpose(1, 2, 0) * picture.max_value).astype(dtype)
    if picture.alpha is not None:
        levels = np.concatenate([levels, picture.alpha[..., None].astype(dtype)], axis=2)
    if levels.shape[2] == 1:
        levels = levels[..., 0]  # grey stays grey: Pillow writes a one-channel image
    try:
        Image.fromarray(levels).save(path)
    except (OSError, ValueError) as exc:
        raise CliError(f"cannot write {path}: {exc}") from None


def cmd_sharpen(args) -> int:
    if not os.path.isfile(args.input):
        state = "is a folder" if os.path.isdir(args.input) else "does not exist"
        raise CliError(f"input {args.input} {state}; expected an image file")
    folder = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(folder):
        raise CliError(f"output {args.output}: the folder {folder} does not exist")
    picture = _read_image(args.input)
    picture.colour = sharpen(picture.colour)
    _write_image(picture, args.output)
    c, h, w = picture.colour.shape
    kind = "grey" if c == 1 else "colour"
    print(f"sharpened {args.input} ({w}x{h}, {kind}"
          f"{', alpha kept as it was' if picture.alpha is not None else ''}) -> {args.output}\n"
          f"kernel: {SHARPEN_KERNEL_TEXT}; borders replicated")
    return 0


# ---- info -------------------------------------------------------------------------------

def cmd_info(args) -> int:
    report = info()
    print(json.dumps(report, indent=2) if args.json else format_info(report))
    return 0


# ---- argument parsing -------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    """argparse's parser with its errors as one line, `<prog>: error: <message>`, exit status 2
    (the subcommands' parsers are of this class too)."""

    def error(self, message):
        self.exit(USAGE_ERROR, f"{self.prog}: error: {message}\n")


def _version() -> str:
    kernels = "CPU and CUDA kernels" if _C.built_with_cuda else "CPU kernels only"
    return f"pyengine {__version__} ({kernels}), torch {torch.__version__}"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description=__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train on handwritten digits, pyengine vs torch.nn",
                       description="Train LeNet (or the 784-256-10 MLP) on handwritten digits "
                       "with pyengine's kernels and the same network on torch.nn from the same "
                       "seed (epochs alternate between the two), and compare accuracy, seconds "
                       "per epoch (median of epochs 2..N) and losses. Writes loss_curves.png and "
                       "metrics.json (settings, versions, per-epoch numbers) to --out.")
    t.add_argument("--model", choices=("lenet", "mlp"), default="lenet",
                   help="lenet: LeNet-5 on 32x32 images; mlp: 784-256-10 on 28x28 (default "
                        "lenet)")
    t.add_argument("--data", metavar="DIR", help="read MNIST's IDX files from DIR instead of "
                   "scikit-learn's bundled digits")
    t.add_argument("--device", type=device_arg, default="cpu",
                   help="cpu, cuda or cuda:N (default cpu)")
    t.add_argument("--epochs", type=positive_int, default=15,
                   help="passes over the training set (default 15; 3 or more for a median time)")
    t.add_argument("--batch-size", type=positive_int, default=32, help="default 32")
    t.add_argument("--lr", type=positive_float, default=0.01,
                   help="SGD learning rate (default 0.01)")
    t.add_argument("--momentum", type=non_negative_float, default=0.9,
                   help="SGD momentum (default 0.9)")
    t.add_argument("--seed", type=seed_int, default=0,
                   help="initial weights and batch order (default 0)")
    t.add_argument("--threads", type=threads_int, default=0,
                   help="CPU threads for both runs (default 0: torch's choice)")
    t.add_argument("--amp", nargs="?", const="auto", choices=("auto", "bfloat16", "float16"),
                   help="train both runs under torch.autocast: --amp alone is bfloat16 on the "
                   "CPU and float16 (with GradScaler) on a GPU; or name the dtype")
    t.add_argument("--out", default="runs/train", help="folder for loss_curves.png and "
                   "metrics.json (default runs/train)")
    t.add_argument("--no-compare", dest="compare", action="store_false",
                   help="train with pyengine only, skipping the torch.nn run")
    t.add_argument("--quiet", action="store_true", help="no progress bars (they are off anyway "
                   "when stderr is not a terminal)")
    t.set_defaults(func=cmd_train)

    r = sub.add_parser("regression", help="linear regression learning a known line")
    r.add_argument("--slope", type=finite_float, default=2.0, help="default 2")
    r.add_argument("--intercept", type=finite_float, default=1.0, help="default 1")
    r.add_argument("--epochs", type=positive_int, default=1000,
                   help="full-batch SGD steps (default 1000)")
    r.add_argument("--lr", type=positive_float, default=0.01, help="default 0.01")
    r.add_argument("--seed", type=seed_int, default=0, help="default 0")
    r.set_defaults(func=cmd_regression)

    c = sub.add_parser("classify", help="5-8-4-1 binary classifier on make_classification")
    c.add_argument("--mixed", action="store_true", help="relu and tanh branches added")
    c.add_argument("--loss", choices=("bce", "quartic"), default="bce",
                   help="bce, or the custom fourth-power regression loss")
    c.add_argument("--samples", type=samples_int, default=1000,
                   help="samples, split 80/20 into training and test (default 1000)")
    c.add_argument("--epochs", type=positive_int, default=50, help="default 50")
    c.add_argument("--batch-size", type=positive_int, default=32, help="default 32")
    c.add_argument("--lr", type=positive_float, default=0.1, help="default 0.1")
    c.add_argument("--seed", type=seed_int, default=0, help="default 0")
    c.set_defaults(func=cmd_classify)

    s = sub.add_parser("sharpen", help="sharpen an image with pyengine's conv2d",
                       description=f"Sharpen an image with a 3x3 kernel, {SHARPEN_KERNEL_TEXT}, "
                       "through pyengine's conv2d; borders are replicated, grey images stay "
                       "grey and an alpha channel is kept as it was.")
    s.add_argument("input", help="image file (PNG, JPEG, ...; 8-bit, or 16-bit grey)")
    s.add_argument("output", help="where to write the sharpened image (PNG keeps everything)")
    s.set_defaults(func=cmd_sharpen)

    i = sub.add_parser("info", help="versions, the build and what each operator supports",
                       description="What this installation of pyengine is and can do: pyengine "
                       "and torch versions; the build (CPU only or with CUDA kernels, the torch "
                       "it was compiled against, the GPU architectures it holds code for); the "
                       "instruction set each CPU kernel family runs with; each visible GPU and "
                       "which code it runs; each operator's dtypes, devices, arguments and "
                       "limits; problems found, with their fix; the command that rebuilds "
                       "pyengine. The same as pyengine.info().")
    i.add_argument("--json", action="store_true", help="print it as JSON")
    i.set_defaults(func=cmd_info)
    return parser


def main(argv=None) -> int:
    """Runs one command; a problem to report (CliError, a missing optional package, Ctrl-C)
    ends in SystemExit with one line on stderr."""
    parser = build_parser()
    args = parser.parse_args(argv)
    prog = f"{PROG} {args.command}"
    try:
        return args.func(args)
    except CliError as exc:
        code, message = exc.exit_code, str(exc)
    except MissingDependency as exc:
        code, message = RUN_FAILED, str(exc)
    except KeyboardInterrupt:
        code, message = 130, "interrupted"
    sys.stdout.flush()
    parser.exit(code, f"{prog}: error: {message}\n")
