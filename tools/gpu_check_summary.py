"""The summary of tools/gpu_check.sh, read from the files the script left in its output folder:
one line per step (status, seconds, budget, what it found) and an exit status, 0 only when every
step is clean.

    python tools/gpu_check_summary.py OUT [--mode gpu|rehearse]

OUT/steps.tsv has a row per step: name, exit status (or "skip"), seconds, budget, and the step's
log file (or, for a skipped step, why). Beside it: the logs, tests.xml / graph.xml (pytest's
junit reports), arch.txt (the GPU's architecture), budget.txt, and the benchmark's results.csv,
found through the "wrote DIR/results.csv" line of bench.log. In a rehearsal (--mode rehearse) the
pytest steps only collected their selections: each must select at least one test.
"""
import argparse
import csv
import os
import re
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

STEPS = ("env", "build", "peak-build", "build-check", "tests", "graph", "memcheck", "racecheck",
         "synccheck", "initcheck", "bench")
SANITIZERS = ("memcheck", "racecheck", "synccheck", "initcheck")
TIMED_OUT = (124, 137)  # timeout's status when the step ran past its budget (137: killed after)
SANITIZER_FOUND_ERRORS = 99  # tools/gpu_check.sh's --error-exitcode


@dataclass
class Step:
    name: str
    rc: Optional[int]   # None: skipped
    seconds: int
    cap: int
    log: str            # the log's file name, or why the step was skipped


def read_steps(out: str) -> Dict[str, Step]:
    steps = {}
    path = os.path.join(out, "steps.tsv")
    if not os.path.exists(path):
        return steps
    with open(path) as f:
        for line in f:
            fields = line.rstrip("\n").split("\t")
            if len(fields) != 5:
                continue
            name, rc, seconds, cap, log = fields
            steps[name] = Step(name, None if rc == "skip" else int(rc), int(seconds), int(cap),
                               log)
    return steps


def _read(out: str, name: str) -> str:
    path = os.path.join(out, name)
    if not name or not os.path.isfile(path):
        return ""
    with open(path, errors="replace") as f:
        return f.read()


# ---- what each log says ------------------------------------------------------------------------

def junit_counts(path: str) -> Optional[Dict[str, int]]:
    """passed / failed / errors / skipped of a pytest junit report (None if unreadable)."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    n = {key: sum(int(s.get(key, 0)) for s in suites)
         for key in ("tests", "failures", "errors", "skipped")}
    return dict(passed=n["tests"] - n["failures"] - n["errors"] - n["skipped"],
                failed=n["failures"], errors=n["errors"], skipped=n["skipped"])


def pytest_outcome(text: str) -> str:
    """pytest's last summary line ("12 passed, 1 skipped in 3.1s"), without the time."""
    lines = re.findall(r"^=*\s*(\d+ (?:passed|failed|errors?|skipped|deselected|xfailed)"
                       r"[^\n]*?)(?: in [\d.]+s.*)?\s*=*$", text, re.M)
    return lines[-1] if lines else ""


def collected(text: str) -> Tuple[int, int]:
    """(selected, deselected) from `pytest --collect-only -q`'s last line."""
    m = None
    for m in re.finditer(r"^(\d+)(?:/(\d+))? tests? collected(?: \((\d+) deselected\))?",
                         text, re.M):
        pass
    if m is None:
        return 0, 0
    return int(m.group(1)), int(m.group(3) or 0)


def deselected(text: str) -> int:
    m = re.findall(r"(\d+) deselected", text)
    return int(m[-1]) if m else 0


def sanitizer_counts(text: str) -> Tuple[int, int, int]:
    """(errors, warnings, summaries) over every process's report: memcheck, synccheck and
    initcheck end with "ERROR SUMMARY: N errors", racecheck with "RACECHECK SUMMARY: H hazards
    displayed (E errors, W warnings)"."""
    errors = warnings = summaries = 0
    for n in re.findall(r"ERROR SUMMARY: (\d+) errors?", text):
        errors += int(n)
        summaries += 1
    for e, w in re.findall(r"RACECHECK SUMMARY: \d+ hazards? displayed \((\d+) errors?, "
                           r"(\d+) warnings?\)", text):
        errors += int(e)
        warnings += int(w)
        summaries += 1
    return errors, warnings, summaries


def build_codes(text: str) -> List[str]:
    """The GPU codes nvcc compiled for (sm_90, compute_90, ...), from the build's commands."""
    codes = set()
    for group in re.findall(r"arch=compute_\d+a?,code=\[?([\w,]+)\]?", text):
        codes.update(group.split(","))
    return sorted(codes)


def warning_lines(text: str) -> int:
    return len(re.findall(r"^.*\b[Ww]arning\b[:# ].*$", text, re.M))


def results_csv(out: str, bench_log: str) -> Optional[str]:
    wrote = re.findall(r"^wrote (.*)/results\.csv", bench_log, re.M)
    if not wrote:
        return None
    path = os.path.join(wrote[-1], "results.csv")
    return path if os.path.isfile(path) else None


def lenet_ratios(path: str) -> Dict[int, Dict[str, Optional[float]]]:
    """batch -> {"eager": pyengine / torch, "graph": pyengine+graph / torch+graph} of the LeNet
    training step's median times."""
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f)
                if r["kind"] == "network" and r["case"] == "lenet" and r["pass"] == "train_step"]
    by: Dict[int, Dict[str, float]] = {}
    for r in rows:
        by.setdefault(int(r["batch"]), {})[r["contender"]] = float(r["median_ms"])
    ratio = lambda t, a, b: t[a] / t[b] if a in t and b in t and t[b] > 0 else None  # noqa: E731
    return {batch: dict(eager=ratio(t, "pyengine", "torch"),
                        graph=ratio(t, "pyengine+graph", "torch+graph"))
            for batch, t in sorted(by.items())}


# ---- one line per step ---------------------------------------------------------------------------

def _fmt(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.2f}"


def judge(step: Step, out: str, rehearse: bool) -> Tuple[bool, str]:
    """(clean, what the step found)."""
    if step.rc is None:
        return False, f"not run: {step.log}"
    text = _read(out, step.log)
    timed_out = step.rc in TIMED_OUT
    late = f"TIMED OUT at its {step.cap} s; " if timed_out else ""
    name = step.name

    if rehearse and name in ("tests", "graph") + SANITIZERS:
        selected, skipped_out = collected(text)
        what = f"selects {selected} tests" + (f" ({skipped_out} deselected)" if skipped_out
                                              else "")
        return step.rc == 0 and selected > 0, late + what + " (collected only: rehearsal)"

    if name == "build":
        arch = _read(out, "arch.txt").strip()
        codes = build_codes(text)
        what = f"{warning_lines(text)} warning lines"
        if rehearse:
            return step.rc == 0, late + what + "; CPU-only build (rehearsal)"
        want = ["sm_" + arch.replace(".", "")] if arch else []
        if not codes:
            what += "; nothing compiled for a GPU (already up to date?)"
        elif codes != want:
            return False, late + what + f"; compiled for {','.join(codes)}, want only " \
                f"{','.join(want) or '(unknown: see env.txt)'}"
        else:
            what += f"; GPU code for {','.join(codes)} only"
        return step.rc == 0, late + what

    if name in ("tests", "graph"):
        counts = junit_counts(os.path.join(out, name + ".xml"))
        if counts is None:
            return False, late + f"no junit report; pytest: {pytest_outcome(text) or 'no summary'}"
        what = (f"{counts['passed']} passed, {counts['failed']} failed, {counts['errors']} "
                f"errors, {counts['skipped']} skipped")
        clean = step.rc == 0 and counts["failed"] == counts["errors"] == 0
        if name == "tests":
            what += f"; slow tests not run ({deselected(text)} deselected)"
        else:  # on a GPU, a skipped graph test checked nothing
            clean = clean and counts["passed"] > 0 and counts["skipped"] == 0
        return clean, late + what

    if name in SANITIZERS:
        errors, warnings, summaries = sanitizer_counts(text)
        if summaries == 0:
            return False, late + "no sanitizer summary in the log (see it)"
        outcome = pytest_outcome(text)
        what = f"{errors} errors" + (f", {warnings} warnings" if name == "racecheck" else "")
        what += f"; pytest under it: {outcome or 'no summary'}"
        if timed_out:
            what = f"TIMED OUT at its {step.cap} s: {what} (up to there)"
        # a skipped test ran no kernel: it checked nothing
        ran_all = re.search(r"\d+ passed", outcome) and not re.search(r"\d+ skipped", outcome)
        return step.rc == 0 and errors == 0 and bool(ran_all), what

    if name == "bench":
        path = results_csv(out, text)
        if path is None:
            return False, late + "no results.csv written"
        ratios = lenet_ratios(path)
        cut = re.findall(r"^time limit of .* (\d+) of (\d+) cases not run", text, re.M)
        # a contender the suite could not build or run (a capture that failed, say)
        dropped = re.findall(r"^  .*: (\S+) (?:skipped|failed) \(", text, re.M)
        parts = [f"batch {b}: pyengine/torch {_fmt(r['eager'])}, "
                 f"pyengine+graph/torch+graph {_fmt(r['graph'])}" for b, r in ratios.items()]
        what = "LeNet train step " + ("; ".join(parts) if parts else "not timed")
        if cut:
            what += f"; time limit: {cut[-1][0]} of {cut[-1][1]} cases not run"
        if dropped:
            what += f"; {len(dropped)} contender runs dropped (see the log)"
        complete = bool(ratios) and all(
            r["eager"] is not None and (rehearse or r["graph"] is not None)
            for r in ratios.values())
        return (step.rc == 0 and complete and not dropped,
                late + what + f" ({os.path.dirname(path)})")

    if name == "build-check":
        last = text.strip().splitlines()[-1] if text.strip() else ""
        return step.rc == 0, late + last
    return step.rc == 0, late.rstrip("; ")


def summary(out: str, rehearse: bool) -> Tuple[str, bool]:
    steps = read_steps(out)
    env = _read(out, "env.txt")
    device = re.findall(r"^device (.*)$", env, re.M)
    title = device[0] if device else "no CUDA device"
    if rehearse:
        title += ": a rehearsal (CPU-only build, selections collected, benchmark on the CPU)"
    lines = [f"==== pyengine GPU check: {title} ====",
             f"{'step':<12} {'status':<9} {'s':>4} {'of':>4}  found (log)"]
    all_clean = True
    for name in STEPS:
        step = steps.get(name)
        if step is None:
            lines.append(f"{name:<12} {'MISSING':<9} {'-':>4} {'-':>4}  the script never got here")
            all_clean = False
            continue
        clean, what = judge(step, out, rehearse)
        all_clean &= clean
        status = "skipped" if step.rc is None else "ok" if clean else \
            "TIMEOUT" if step.rc in TIMED_OUT else "FAILED"
        log = f" ({step.log})" if step.rc is not None else ""
        lines.append(f"{name:<12} {status:<9} {step.seconds:>4} {step.cap:>4}  {what}{log}")
    budget = _read(out, "budget.txt").strip() or "?"
    # On a GPU the tests ran beside the graph and sanitizer steps (a rehearsal runs them one
    # after the other), and the peak kernels compiled beside the build.
    secs = {n: s.seconds for n, s in steps.items()}
    lane = sum(secs.get(n, 0) for n in ("graph",) + SANITIZERS)
    wall = (secs.get("env", 0) + max(secs.get("build", 0), secs.get("peak-build", 0))
            + secs.get("build-check", 0)
            + (secs.get("tests", 0) + lane if rehearse else max(secs.get("tests", 0), lane))
            + secs.get("bench", 0))
    lines.append(f"{'total':<12} {'CLEAN' if all_clean else 'NOT CLEAN':<9} {wall:>4} "
                 f"{budget:>4}  seconds of wall time, of the budget")
    return "\n".join(lines), all_clean


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", help="tools/gpu_check.sh's output folder")
    p.add_argument("--mode", choices=("gpu", "rehearse"), default="gpu")
    args = p.parse_args(argv)
    text, clean = summary(args.out, args.mode == "rehearse")
    print(text)
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main())
