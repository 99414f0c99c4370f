"""The suite's one CSV schema, the rates derived from a row's work and time, and what is written
from the rows: results.md (the tables) and the plots. Every column is explained in
docs/benchmarks.md.

    python -m benchmarks.report benchmarks/results/<machine>/results.csv

rewrites results.md and the plots beside a CSV (e.g. after concatenating or editing one).
"""
import csv
import math
import os
import sys
from typing import Dict, Iterable, List, Optional

CONTENDERS = ("pyengine", "torch", "torch.compile", "jax", "pyengine+capture", "pyengine+graph",
              "torch+graph")

CSV_FIELDS = [
    # the run: same on every row, so rows from several machines can share one file
    "machine", "device", "torch", "commit", "date", "threads", "peak_gflops", "peak_gbps",
    # the case and the contender
    "kind", "case", "batch", "pass", "contender",
    # the timing: median and spread over all timed runs
    "median_ms", "p10_ms", "p90_ms", "runs",
    # the case's work (benchmarks/work.py) and what the time makes of it
    "flops", "bytes", "flop_per_byte", "gflops", "gbps", "pct_peak_gflops", "pct_peak_gbps",
    "bound", "floor_ms", "pct_of_bound",
]


def rates(flops: Optional[int], nbytes: Optional[int], median_ms: float, peak_gflops: float,
          peak_gbps: float) -> Dict[str, object]:
    """The derived columns of one row (empty strings where the work is unknown).

    floor_ms is the roofline's time for this work on this machine, max(flops / peak compute,
    bytes / peak bandwidth); the larger term names the bound. pct_of_bound = floor / median is
    the share of that bound's peak the run reached (the larger of the two peak percentages)."""
    if flops is None or nbytes is None or median_ms <= 0:
        return {k: "" for k in ("flops", "bytes", "flop_per_byte", "gflops", "gbps",
                                "pct_peak_gflops", "pct_peak_gbps", "bound", "floor_ms",
                                "pct_of_bound")}
    seconds = median_ms * 1e-3
    gflops, gbps = flops / seconds / 1e9, nbytes / seconds / 1e9
    compute_ms = flops / (peak_gflops * 1e9) * 1e3
    memory_ms = nbytes / (peak_gbps * 1e9) * 1e3
    floor_ms = max(compute_ms, memory_ms)
    return dict(flops=flops, bytes=nbytes,
                flop_per_byte=round_sig(flops / nbytes) if nbytes else "",
                gflops=round_sig(gflops), gbps=round_sig(gbps),
                pct_peak_gflops=round_sig(100 * gflops / peak_gflops),
                pct_peak_gbps=round_sig(100 * gbps / peak_gbps),
                bound="compute" if compute_ms >= memory_ms else "memory",
                floor_ms=round_sig(floor_ms), pct_of_bound=round_sig(100 * floor_ms / median_ms))


def round_sig(x: float, digits: int = 4) -> float:
    """x to `digits` significant digits (the CSV stays readable, nothing measurable is lost)."""
    if x == 0 or not math.isfinite(x):
        return x
    return round(x, max(0, digits - 1 - int(math.floor(math.log10(abs(x))))))


def write_csv(rows: List[dict], path: str) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(rows)


def read_csv(path: str) -> List[dict]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    missing = [c for c in CSV_FIELDS if rows and c not in rows[0]]
    if missing:
        raise SystemExit(f"{path}: not the suite's CSV schema (missing columns {missing}); "
                         "rerun `python -m benchmarks` to get one")
    return rows


# ---- results.md -------------------------------------------------------------------------------

def _keyed(rows: Iterable[dict]) -> Dict[tuple, Dict[str, dict]]:
    """(kind, case, pass, batch) -> contender -> row, in the rows' order."""
    keyed: Dict[tuple, Dict[str, dict]] = {}
    for r in rows:
        keyed.setdefault((r["kind"], r["case"], r["pass"], int(r["batch"])), {})[
            r["contender"]] = r
    return keyed


def _present(keyed) -> List[str]:
    return [c for c in CONTENDERS if any(c in v for v in keyed.values())]


def _num(value) -> Optional[float]:
    return None if value in ("", None) else float(value)


def _cell(value, fmt: str) -> str:
    v = _num(value)
    return "-" if v is None else format(v, fmt)


def _ratio(by: Dict[str, dict], peer: str, mine: str = "pyengine") -> str:
    """mine's median over peer's, in bold ("-" unless both ran)."""
    if mine not in by or peer not in by:
        return "-"
    return f"**{float(by[mine]['median_ms']) / float(by[peer]['median_ms']):.2f}**"


def times_table(rows: List[dict]) -> str:
    """One line per (case, pass, batch): each contender's median, pyengine / torch eager, and
    pyengine / jax when the rows have the jax contender."""
    keyed = _keyed(rows)
    names = _present(keyed)
    peers = ["torch"] + (["jax"] if "jax" in names else [])
    # (mine, peer) ratio columns: pyengine eager, and its captured step where it ran
    pairs = [("pyengine", p) for p in peers]
    if "pyengine+capture" in names:
        pairs += [("pyengine+capture", p) for p in peers]
    head = "| kind | case | pass | batch | " + " | ".join(f"{c} ms" for c in names) + " | " + \
        " | ".join(f"{m} / {p}" for m, p in pairs) + " |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for (kind, case, pass_, batch), by in keyed.items():
        cells = [_cell(by[c]["median_ms"], ".4f") if c in by else "-" for c in names]
        cells += [_ratio(by, p, m) for m, p in pairs]
        lines.append(f"| {kind} | {case} | {pass_} | {batch} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def rates_table(rows: List[dict]) -> str:
    """One line per (case, pass, batch): the work, its bound and floor on this machine, pyengine's
    achieved rates, and every contender's share of the bound's peak."""
    keyed = _keyed(rows)
    names = _present(keyed)
    head = ("| kind | case | pass | batch | MFLOP | MB | FLOP/byte | bound | floor ms | "
            "pyengine GFLOP/s | pyengine GB/s | " +
            " | ".join(f"{c} % of peak" for c in names) + " |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for (kind, case, pass_, batch), by in keyed.items():
        any_row = next(iter(by.values()))
        flops, nbytes = _num(any_row["flops"]), _num(any_row["bytes"])
        mine = by.get("pyengine", {})
        cells = [
            "-" if flops is None else f"{flops / 1e6:.4g}",
            "-" if nbytes is None else f"{nbytes / 1e6:.4g}",
            _cell(any_row["flop_per_byte"], ".3g"), any_row["bound"] or "-",
            _cell(any_row["floor_ms"], ".4f"),
            _cell(mine.get("gflops"), ".1f"), _cell(mine.get("gbps"), ".1f"),
        ] + [_cell(by[c]["pct_of_bound"], ".1f") if c in by else "-" for c in names]
        lines.append(f"| {kind} | {case} | {pass_} | {batch} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def markdown(rows: List[dict], flops_method: str = "", bytes_method: str = "") -> str:
    first = rows[0]
    peak_gflops, peak_gbps = float(first["peak_gflops"]), float(first["peak_gbps"])
    how = lambda method: f" ({method})" if method else ""  # noqa: E731
    return (
        f"# pyengine benchmarks: {first['machine']}, torch {first['torch']}, commit "
        f"{first['commit']}, {first['date']}\n\n"
        f"Measured peaks of this machine at the start of the run: fp32 compute "
        f"**{peak_gflops:.1f} GFLOP/s**{how(flops_method)}; memory bandwidth "
        f"**{peak_gbps:.1f} GB/s**{how(bytes_method)}; machine balance "
        f"**{peak_gflops / peak_gbps:.1f} FLOP/byte**. {first['threads']} threads, fp32, TF32 "
        "off. How to read these tables: [docs/benchmarks.md](../../../docs/benchmarks.md).\n\n"
        "## Times\n\nMedians of many interleaved runs; the last columns are pyengine's time "
        "over torch eager's and, when JAX ran, over jax.jit's (< 1: pyengine is faster).\n\n"
        + times_table(rows) +
        "\n## Work and achieved rates\n\nFLOP and minimum bytes per call (benchmarks/work.py). "
        "bound: compute when FLOP/byte exceeds the machine balance, else memory; floor: the "
        "fastest this work can run here; % of peak: the share of the bound's peak a contender "
        "reached (floor / median). Cases whose data fits in cache can pass 100% of the memory "
        "peak.\n\n" + rates_table(rows))


# ---- plots ------------------------------------------------------------------------------------

def plot(rows: List[dict], out_dir: str) -> List[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    nets = [r for r in rows if r["kind"] == "network"]
    names = sorted({r["case"] for r in nets})
    if names:
        fig, axes = plt.subplots(2, len(names), figsize=(5 * len(names), 8), squeeze=False)
        for col, name in enumerate(names):
            for row, pass_ in enumerate(("train_step", "inference")):
                ax = axes[row][col]
                for contender in sorted({r["contender"] for r in nets}):
                    pts = sorted((int(r["batch"]), float(r["median_ms"])) for r in nets
                                 if r["case"] == name and r["pass"] == pass_
                                 and r["contender"] == contender)
                    if pts:
                        ax.plot(*zip(*pts), marker="o", label=contender)
                ax.set(xscale="log", yscale="log", xlabel="batch size", ylabel="median ms",
                       title=f"{name}: {pass_}")
                ax.grid(alpha=0.3)
                if ax.lines:  # (a partial run, e.g. --gpu-check's, times no inference)
                    ax.legend(fontsize=8)
        fig.tight_layout()
        path = os.path.join(out_dir, "networks.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    ops = [r for r in rows if r["kind"] == "op" and r["pass"] == "forward+backward"]
    labels = sorted({r["case"] for r in ops})
    if labels:
        speedup = []
        for label in labels:
            t = {r["contender"]: float(r["median_ms"]) for r in ops if r["case"] == label}
            speedup.append(t["torch"] / t["pyengine"] if "torch" in t and "pyengine" in t
                           else 0.0)
        fig, ax = plt.subplots(figsize=(9, 0.4 * len(labels) + 1.5))
        ax.barh(labels, speedup, color=["tab:green" if s >= 1 else "tab:red" for s in speedup])
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set(xlabel="speedup over torch eager (forward+backward; >1 is faster)",
               title=f"pyengine per-op speedup ({rows[0]['machine']})")
        fig.tight_layout()
        path = os.path.join(out_dir, "ops_speedup.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
        path = roofline_plot(ops, out_dir, plt)
        if path:
            paths.append(path)
    return paths


def roofline_plot(ops: List[dict], out_dir: str, plt) -> Optional[str]:
    """Achieved GFLOP/s against arithmetic intensity for each op (forward+backward), pyengine
    filled and torch eager hollow, under the machine's two roofs."""
    points = [r for r in ops if r["contender"] in ("pyengine", "torch")
              and _num(r["gflops"]) and _num(r["flop_per_byte"])]  # log axes: positive only
    if not points:
        return None
    peak_gflops, peak_gbps = float(points[0]["peak_gflops"]), float(points[0]["peak_gbps"])
    intensities = [float(r["flop_per_byte"]) for r in points]
    lo, hi = min(intensities + [peak_gflops / peak_gbps]) / 2, max(intensities) * 2
    xs = [lo * (hi / lo) ** (i / 100) for i in range(101)]
    fig, ax = plt.subplots(figsize=(9, 6))
    ax.plot(xs, [min(peak_gflops, x * peak_gbps) for x in xs], color="black", linewidth=1,
            label=f"roof: {peak_gflops:.0f} GFLOP/s, {peak_gbps:.0f} GB/s")
    cases = sorted({r["case"] for r in points})
    colors = plt.get_cmap("tab20")
    for i, case in enumerate(cases):
        for r in points:
            if r["case"] != case:
                continue
            mine = r["contender"] == "pyengine"
            ax.scatter(float(r["flop_per_byte"]), float(r["gflops"]), s=40,
                       color=colors(i % 20) if mine else "none", edgecolors=colors(i % 20),
                       label=case if mine else None)
    ax.set(xscale="log", yscale="log", xlabel="FLOP per byte (minimum traffic)",
           ylabel="achieved GFLOP/s",
           title=f"ops, forward+backward: pyengine filled, torch eager hollow "
                 f"({ops[0]['machine']})")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path = os.path.join(out_dir, "roofline.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_all(rows: List[dict], out_dir: str, flops_method: str = "",
              bytes_method: str = "") -> List[str]:
    """results.csv, results.md and the plots in out_dir; returns the plots' paths."""
    write_csv(rows, os.path.join(out_dir, "results.csv"))
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(markdown(rows, flops_method, bytes_method))
    return plot(rows, out_dir)


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m benchmarks.report",
                                description="Rewrite results.md and the plots from a results.csv.")
    p.add_argument("csv")
    args = p.parse_args(argv)
    rows = read_csv(args.csv)
    out_dir = os.path.dirname(os.path.abspath(args.csv))
    plots = plot(rows, out_dir)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(markdown(rows))
    print(f"wrote {out_dir}/results.md, " + ", ".join(os.path.basename(p) for p in plots))
    return 0


if __name__ == "__main__":
    sys.exit(main())
