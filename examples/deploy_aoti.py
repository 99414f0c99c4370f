"""Deploying a pyengine model as one file: torch.export, then AOTInductor, then a new process.

    python examples/deploy_aoti.py [--out lenet.pt2]

1. export   torch.export.export traces LeNet (pyengine.models) into a graph of
            torch.ops.pyengine.* calls, with a dynamic batch size;
2. package  torch._inductor.aoti_compile_and_package compiles that graph into a shared library,
            packed with the weights in one .pt2 file (it compiles C++: a minute or so); pyengine's
            operators stay calls into PyTorch's dispatcher, by name;
3. load     a new Python process loads the package and runs it. It needs torch and pyengine
            installed, and `import pyengine` before loading, which registers the operators the
            package calls; it needs neither the model's class nor its code:

                import torch
                import pyengine  # registers torch.ops.pyengine.*
                runner = torch._inductor.aoti_load_package("lenet.pt2")
                logits = runner(images)  # images: (N, 1, 32, 32) float32, any N from 1 to 1024

            Without `import pyengine`, loading fails with torch's
            "RuntimeError: Could not find schema for pyengine::conv2d" (after a "Loading outdated
            pt2 file" warning, which is torch's guess and wrong here: the package is fine).

This script runs the three steps and checks that the new process's logits are the eager model's.
Needs torch >= 2.6 (aoti_compile_and_package, aoti_load_package) and a C++ compiler.
"""
import argparse
import os
import subprocess
import sys
import tempfile
import textwrap

import torch

import pyengine
from pyengine.models import LeNet

# What the new process runs: load the package, run it on a saved batch, save the logits.
LOADER = textwrap.dedent("""
    import sys
    import torch
    import pyengine  # registers torch.ops.pyengine.*, which the package calls

    package, images, logits = sys.argv[1:]
    runner = torch._inductor.aoti_load_package(package)
    torch.save(runner(torch.load(images)), logits)
""")


def export_and_package(model: torch.nn.Module, example: torch.Tensor, path: str) -> str:
    """Steps 1 and 2: `model` exported with a dynamic batch size (1 to 1024), compiled and
    packaged at `path` (a .pt2 file); returns the package's path."""
    batch = torch.export.Dim("batch", min=1, max=1024)
    exported = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    return torch._inductor.aoti_compile_and_package(exported, package_path=path)


def run_in_new_process(package: str, images: torch.Tensor) -> torch.Tensor:
    """Step 3: a new Python process (this one's interpreter, importing the same pyengine) loads
    the package and runs it on `images`; returns what it computed."""
    with tempfile.TemporaryDirectory() as tmp:
        images_path, logits_path = os.path.join(tmp, "images.pt"), os.path.join(tmp, "logits.pt")
        torch.save(images, images_path)
        source = os.path.dirname(os.path.dirname(os.path.abspath(pyengine.__file__)))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            p for p in (source, os.environ.get("PYTHONPATH")) if p))
        proc = subprocess.run([sys.executable, "-c", LOADER, package, images_path, logits_path],
                              env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"the new process failed to run {package}:\n{proc.stderr}")
        return torch.load(logits_path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="lenet.pt2", help="the package to write (default "
                        "lenet.pt2)")
    args = parser.parse_args(argv)
    if not hasattr(torch._inductor, "aoti_compile_and_package"):
        parser.exit(1, f"torch {torch.__version__} has no torch._inductor."
                       "aoti_compile_and_package: this example needs torch >= 2.6\n")

    torch.manual_seed(0)
    model = LeNet().eval()  # pyengine's layers; trained weights would load here
    print(f"exporting and compiling LeNet into {args.out} (C++; a minute or so) ...")
    package = export_and_package(model, torch.randn(2, 1, 32, 32), args.out)
    print(f"packaged: {package} ({os.path.getsize(package) / 1e6:.1f} MB)")

    images = torch.randn(5, 1, 32, 32)  # another batch size than the example's
    logits = run_in_new_process(package, images)
    with torch.no_grad():
        expected = model(images)
    difference = (logits - expected).abs().max().item()
    print(f"a new process ran the package on {len(images)} images: largest difference from the "
          f"eager model {difference:.2e}")
    torch.testing.assert_close(logits, expected)
    return 0


if __name__ == "__main__":
    sys.exit(main())
