"""LeNet training step (forward, MSE loss, backward, SGD), pyengine layers (eager, and the step
as a pyengine.capture_step replay) against torch.nn and, on a CPU with JAX installed, jax.jit: the suite's "lenet train_step" cases (benchmarks/suite.py)
for a few batch sizes, without torch.compile. Prints a short table; --csv writes the suite's CSV
schema.

    python -m benchmarks.lenet_step [--device cpu] [--batches 1 64 256] [--amp] [--csv out.csv]

--amp adds the same steps under bf16 autocast (pyengine, torch; no JAX or capture variant) and
their ratio to pyengine's float32 step.
"""
import argparse
import sys

import torch

from benchmarks import peak, report
from benchmarks.suite import jax_contender, network_case, run_cases


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.lenet_step",
                                description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 64, 256])
    p.add_argument("--runs", type=int, default=50, help="timed runs per contender and batch")
    p.add_argument("--amp", action="store_true",
                   help="also the steps under bf16 autocast (the suite's 'lenet bf16 autocast')")
    p.add_argument("--csv", help="also write the rows to this CSV file (the suite's schema)")
    args = p.parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = False  # pyengine's kernels are plain fp32
    torch.backends.cudnn.allow_tf32 = False

    peaks = peak.measure(args.device)
    cases = [network_case("lenet", batch, "train_step") for batch in args.batches]
    if args.amp:
        cases += [network_case("lenet", batch, "train_step", amp=True) for batch in args.batches]
    names = ["pyengine", "torch"] + jax_contender(args.device) + ["pyengine+capture"]
    rows = run_cases(cases, names, args.device, args.runs, peaks)
    by = {(int(r["batch"]), r["contender"]): r for r in rows if r["case"] == "lenet"}

    print(f"\nLeNet training step, {args.device}, fp32, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; % of peak: the share of the machine's measured "
          "peak for the case's bound (docs/benchmarks.md)")
    with_jax = "jax" in names
    print(f"{'batch':>6} {'MFLOP':>9} {'pyengine ms':>12} {'torch ms':>10} {'ratio':>7} "
          + (f"{'jax ms':>9} {'/ jax':>7} " if with_jax else "")
          + f"{'captured ms':>12} {'/ torch':>8} " + (f"{'/ jax':>7} " if with_jax else "")
          + f"{'pyengine GFLOP/s':>17} {'pyengine %':>11} {'torch %':>8}")
    for batch in args.batches:
        mine, theirs = by.get((batch, "pyengine")), by.get((batch, "torch"))
        if not (mine and theirs):
            continue
        ratio = mine["median_ms"] / theirs["median_ms"]
        flops = mine["flops"] / 1e6 if mine["flops"] != "" else float("nan")
        jax_cells = ""
        if with_jax:
            jax_ms = by[(batch, "jax")]["median_ms"] if (batch, "jax") in by else float("nan")
            jax_cells = f"{jax_ms:>9.3f} {mine['median_ms'] / jax_ms:>7.2f} "
        cap = by.get((batch, "pyengine+capture"))
        cap_ms = cap["median_ms"] if cap else float("nan")
        cap_cells = f"{cap_ms:>12.3f} {cap_ms / theirs['median_ms']:>8.2f} "
        if with_jax:
            jax_ms = by[(batch, "jax")]["median_ms"] if (batch, "jax") in by else float("nan")
            cap_cells += f"{cap_ms / jax_ms:>7.2f} "
        print(f"{batch:>6} {flops:>9.2f} {mine['median_ms']:>12.3f} {theirs['median_ms']:>10.3f} "
              f"{ratio:>7.2f} {jax_cells}{cap_cells}{mine['gflops'] or float('nan'):>17.1f} "
              f"{mine['pct_of_bound'] or float('nan'):>11.1f} "
              f"{theirs['pct_of_bound'] or float('nan'):>8.1f}")
    if args.amp:
        amp = {(int(r["batch"]), r["contender"]): r for r in rows if r["case"] != "lenet"}
        print("\nUnder bf16 autocast: pyengine and torch "
              "ms, their ratio, and pyengine's bf16 step over its float32 step")
        print(f"{'batch':>6} {'pyengine ms':>12} {'torch ms':>10} {'ratio':>7} {'/ fp32':>7}")
        for batch in args.batches:
            mine, theirs = amp.get((batch, "pyengine")), amp.get((batch, "torch"))
            fp32 = by.get((batch, "pyengine"))
            if mine and theirs and fp32:
                print(f"{batch:>6} {mine['median_ms']:>12.3f} {theirs['median_ms']:>10.3f} "
                      f"{mine['median_ms'] / theirs['median_ms']:>7.2f} "
                      f"{mine['median_ms'] / fp32['median_ms']:>7.2f}")
    if args.csv:
        report.write_csv(rows, args.csv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
