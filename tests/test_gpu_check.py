"""`make gpu-check` (tools/gpu_check.sh) kept from rotting between GPU leases, and the benchmark's
CUDA-graph path checked on a GPU.

Without a GPU: the script's syntax (and shellcheck's verdict, where installed); each pytest
selection it runs selects tests, the sanitizers' every operator in both dtypes; the summary
(tools/gpu_check_summary.py) on sample outputs, clean and not; the benchmark's --gpu-check set
and time limit. The rehearsal of the whole script, `tools/gpu_check.sh --rehearse`, builds and
benchmarks: too slow for the suite.

On a GPU (the script's graph step selects these by "cuda_graph"): the benchmark's captured LeNet
training step, SGD update included, replays bitwise like the eager step; every op case's
forward, backward and forward+backward pass captures.
"""
import contextlib
import gc
import os
import subprocess
import sys
import weakref

import pytest
import torch

import fuzz_configs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tools", "gpu_check.sh")
SUMMARY = os.path.join(ROOT, "tools", "gpu_check_summary.py")
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks import peak, report, suite  # noqa: E402

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


# ---- the script ---------------------------------------------------------------------------------

def test_script_parses_and_passes_shellcheck_where_installed():
    subprocess.run(["bash", "-n", SCRIPT], check=True)
    if subprocess.run(["which", "shellcheck"], capture_output=True).returncode == 0:
        proc = subprocess.run(["shellcheck", SCRIPT], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout


def _selections():
    out = subprocess.run(["bash", SCRIPT, "--show-selections"], capture_output=True, text=True,
                         check=True, cwd=ROOT).stdout
    return {line.split("\t")[0]: line.split("\t")[1:] for line in out.splitlines()}


def _collect(args):
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q",
                           "-p", "no:cacheprovider", *args],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return [line for line in proc.stdout.splitlines() if "::" in line]


def test_every_selection_selects_tests():
    selections = _selections()
    assert set(selections) == {"SUITE", "GRAPH", "SANITIZER", "MEMCHECK", "INITCHECK"}
    ids = {name: _collect(args) for name, args in selections.items()}
    # every test that runs on CUDA but the slow ones (here, without a GPU: test_cuda.py's, whose
    # module name says cuda; the device-parametrized tests have no cuda case without one)
    assert len(ids["SUITE"]) > 1000
    assert all("cuda" in i for i in ids["SUITE"])
    assert not any("past_2_pow_31" in i for i in ids["SUITE"])
    # the CUDA-graph tests: the tutorial step's and the benchmark's
    assert any(i.startswith("tests/test_cuda.py::test_lenet_training_step_in_a_cuda_graph")
               for i in ids["GRAPH"])
    assert any(i.startswith("tests/test_gpu_check.py::") for i in ids["GRAPH"])
    # under the sanitizers: a few samples of every operator, in both dtypes, and the layouts;
    # a trimmed set (each test costs seconds under racecheck)
    for name in ("SANITIZER", "MEMCHECK", "INITCHECK"):
        parity = [i for i in ids[name] if "::test_parity[" in i]
        for op in fuzz_configs.OPS:
            for dtype in ("dtype0", "dtype1"):
                assert any(f"[{op}-" in i and i.endswith(f"-{dtype}]") for i in parity), \
                    (name, op, dtype)
        assert len(parity) <= 4 * len(fuzz_configs.OPS), (name, len(parity))
        assert any("::test_layout_parity[" in i for i in ids[name])
    assert set(ids["INITCHECK"]) < set(ids["SANITIZER"]) < set(ids["MEMCHECK"])
    assert any("deterministic" in i for i in ids["MEMCHECK"])


# ---- the summary --------------------------------------------------------------------------------

JUNIT = ('<?xml version="1.0" encoding="utf-8"?><testsuites name="pytest tests">'
         '<testsuite name="pytest" errors="{errors}" failures="{failures}" skipped="{skipped}" '
         'tests="{tests}" time="1.0"></testsuite></testsuites>')
PASSED_UNDER_SANITIZER = "52 passed, 1 deselected in 40.12s\n"


def _bench_csv(path):
    meta = dict(machine="gpu-Test", device="cuda", torch="t", commit="c", date="d", threads=16,
                peak_gflops=1.0, peak_gbps=1.0, kind="network", case="lenet",
                **{"pass": "train_step"})
    rows = [dict(meta, batch=batch, contender=contender, median_ms=ms, p10_ms=ms, p90_ms=ms,
                 runs=30, **report.rates(None, None, ms, 1.0, 1.0))
            for batch, times in ((256, (2.0, 1.0, 0.5, 0.25)), (8192, (30.0, 20.0, 29.0, 20.0)))
            for contender, ms in zip(("pyengine", "torch", "pyengine+graph", "torch+graph"),
                                     times)]
    report.write_csv(rows, str(path))


def _sample_out(tmp_path, memcheck_errors=0, tests_rc=0, failures=0):
    """An output folder like a GPU run leaves: every step ran, memcheck found memcheck_errors."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "env.txt").write_text("device NVIDIA H200\ncapability 9.0\n")
    (out / "arch.txt").write_text("9.0\n")
    (out / "budget.txt").write_text("480\n")
    (out / "build.log").write_text(
        "[1/2] nvcc -gencode=arch=compute_90,code=sm_90 -c conv2d.cu\n[2/2] c++ -o _C.so\n")
    (out / "build-check.log").write_text("pyengine._C.built_with_cuda: True\n")
    (out / "tests.log").write_text("1900 passed, 30 skipped, 8 deselected in 150.2s\n")
    (out / "tests.xml").write_text(JUNIT.format(errors=0, failures=failures, skipped=30,
                                                tests=1930 + failures))
    (out / "graph.log").write_text("3 passed in 5s\n")
    (out / "graph.xml").write_text(JUNIT.format(errors=0, failures=0, skipped=0, tests=3))
    (out / "memcheck.log").write_text(
        "========= COMPUTE-SANITIZER\n" + PASSED_UNDER_SANITIZER
        + f"========= ERROR SUMMARY: {memcheck_errors} errors\n")
    (out / "racecheck.log").write_text(
        PASSED_UNDER_SANITIZER
        + "========= RACECHECK SUMMARY: 0 hazards displayed (0 errors, 0 warnings)\n")
    for tool in ("synccheck", "initcheck"):
        (out / f"{tool}.log").write_text(PASSED_UNDER_SANITIZER
                                         + "========= ERROR SUMMARY: 0 errors\n")
    results = tmp_path / "results" / "gpu-Test"
    results.mkdir(parents=True)
    _bench_csv(results / "results.csv")
    (out / "bench.log").write_text(f"wrote {results}/results.csv, results.md\n")
    rows = [("env", 0, 2, 15), ("peak-build", 0, 40, 140), ("build", 0, 70, 140),
            ("build-check", 0, 3, 15), ("graph", 0, 9, 30),
            ("memcheck", 99 if memcheck_errors else 0, 60, 90), ("racecheck", 0, 50, 70),
            ("synccheck", 0, 20, 25), ("initcheck", 0, 20, 25), ("tests", tests_rc, 150, 240),
            ("bench", 0, 45, 70)]
    (out / "steps.tsv").write_text("".join(
        f"{name}\t{rc}\t{s}\t{cap}\t{'env.txt' if name == 'env' else name + '.log'}\n"
        for name, rc, s, cap in rows))
    return out


def _summary(out, *args):
    proc = subprocess.run([sys.executable, SUMMARY, str(out), *args], capture_output=True,
                          text=True)
    assert proc.stderr == ""
    lines = {line.split()[0]: line for line in proc.stdout.splitlines()[2:]}
    return proc.returncode, lines


def test_summary_of_a_clean_run(tmp_path):
    rc, lines = _summary(_sample_out(tmp_path))
    assert rc == 0, lines
    assert lines["build"].split()[1] == "ok" and "GPU code for sm_90 only" in lines["build"]
    assert "1900 passed, 0 failed, 0 errors, 30 skipped; slow tests not run (8 deselected)" \
        in lines["tests"]
    assert "3 passed" in lines["graph"]
    assert "0 errors; pytest under it: 52 passed, 1 deselected" in lines["memcheck"]
    assert "0 errors, 0 warnings" in lines["racecheck"]
    assert ("batch 256: pyengine/torch 2.00, pyengine+graph/torch+graph 2.00; batch 8192: "
            "pyengine/torch 1.50, pyengine+graph/torch+graph 1.45") in lines["bench"]
    # the wall time: env, the build, its check, the longer lane (graph + sanitizers: 159 s), bench
    assert lines["total"].split()[1:4] == ["CLEAN", str(2 + 70 + 3 + 159 + 45), "480"]


def test_summary_names_what_is_not_clean(tmp_path):
    out = _sample_out(tmp_path, memcheck_errors=3, tests_rc=1, failures=2)
    (out / "steps.tsv").write_text((out / "steps.tsv").read_text().replace(
        "racecheck\t0\t50", "racecheck\t124\t70"))
    with open(out / "bench.log", "a") as log:  # run_cases' line for a capture that failed
        log.write("  lenet train_step batch 8192: pyengine+graph skipped (RuntimeError: boom)\n")
    rc, lines = _summary(out)
    assert rc == 1
    assert lines["bench"].split()[1] == "FAILED" and "1 contender runs dropped" in lines["bench"]
    assert lines["memcheck"].split()[1] == "FAILED" and "3 errors" in lines["memcheck"]
    assert lines["racecheck"].split()[1] == "TIMEOUT" and "TIMED OUT at its 70 s" \
        in lines["racecheck"]
    assert lines["tests"].split()[1] == "FAILED" and "2 failed" in lines["tests"]
    assert lines["total"].split()[1:3] == ["NOT", "CLEAN"]


def test_summary_fails_a_sanitizer_run_whose_tests_were_skipped(tmp_path):
    out = _sample_out(tmp_path)
    (out / "synccheck.log").write_text("50 skipped, 584 deselected in 3.0s\n"
                                       "========= ERROR SUMMARY: 0 errors\n")
    rc, lines = _summary(out)
    assert rc == 1 and lines["synccheck"].split()[1] == "FAILED"


def test_summary_flags_a_build_for_other_architectures_and_missing_steps(tmp_path):
    out = _sample_out(tmp_path)
    (out / "build.log").write_text("nvcc -gencode=arch=compute_80,code=sm_80 "
                                   "-gencode=arch=compute_90,code=sm_90 -c a.cu\n")
    (out / "steps.tsv").write_text("\n".join(
        line for line in (out / "steps.tsv").read_text().splitlines()
        if not line.startswith("bench")) + "\n")
    rc, lines = _summary(out)
    assert rc == 1
    assert "compiled for sm_80,sm_90, want only sm_90" in lines["build"]
    assert lines["bench"].split()[1] == "MISSING"


def test_summary_of_a_rehearsal_needs_each_selection_non_empty(tmp_path):
    out = _sample_out(tmp_path)
    for name in ("tests", "graph", "memcheck", "racecheck", "synccheck", "initcheck"):
        (out / f"{name}.log").write_text("tests/test_cuda.py::test_x\n\n"
                                         "52/634 tests collected (582 deselected) in 0.5s\n")
    (out / "graph.log").write_text("no tests collected (634 deselected) in 0.4s\n")
    rc, lines = _summary(out, "--mode", "rehearse")
    assert rc == 1
    assert "selects 52 tests (582 deselected)" in lines["memcheck"]
    assert lines["memcheck"].split()[1] == "ok"
    assert lines["graph"].split()[1] == "FAILED" and "selects 0 tests" in lines["graph"]


# ---- the benchmark's gpu-check set --------------------------------------------------------------

def test_gpu_check_cases_start_with_the_lenet_step_and_cover_every_op():
    cases = suite.gpu_check_cases()
    assert [(c.name, c.batch, c.pass_) for c in cases[:4]] == [
        ("lenet", 256, "train_step"), ("lenet", 8192, "train_step"),
        ("lenet bf16 autocast", 256, "train_step"), ("lenet bf16 autocast", 8192, "train_step")]
    assert {c.pass_ for c in cases[4:]} == {"forward+backward"}
    names = " ".join(c.name for c in cases)
    for op in fuzz_configs.OPS:
        assert op in names, op
    assert suite.contenders("cuda", with_compile=False) == [
        "pyengine", "torch", "pyengine+graph", "torch+graph"]


def test_time_limit_starts_no_case_after_it():
    cases = [c for c in suite.gpu_check_cases((2,)) if c.name.startswith("mse_loss")]
    peaks = peak.Peaks(100.0, 10.0, "an FMA loop", "a copy")
    log = []
    rows = suite.run_cases(cases + cases, ["pyengine"], "cpu", 1, peaks, log=log.append,
                           time_limit_s=None)
    assert [r["case"] for r in rows] == ["mse_loss 256x10"] * 2
    log.clear()
    assert suite.run_cases(cases, ["pyengine"], "cpu", 1, peaks, log=log.append,
                           time_limit_s=0.0) == []
    assert log == ["time limit of 0 s reached: 1 of 1 cases not run: mse_loss 256x10 "
                   "forward+backward batch 256"]


def test_a_cuda_graph_replay_keeps_the_captured_tensors_alive(monkeypatch):
    """suite._graphed's replay holds the captured function, and with it the tensors the graph
    reads and writes: a CUDA graph keeps none alive, and on the H200 the allocator gave a graphed
    case's freed input to the next contender's gradients. Checked with stand-ins for torch's
    CUDA graph API, so it runs without a GPU; the GPU test below runs the case that failed."""
    class FakeStream:
        def wait_stream(self, other):
            pass

    class FakeGraph:
        replays = 0

        def replay(self):
            FakeGraph.replays += 1

    def nothing(*args, **kwargs):
        return contextlib.nullcontext()

    for name, value in (("Stream", FakeStream), ("CUDAGraph", FakeGraph), ("graph", nothing),
                        ("device", nothing), ("stream", nothing),
                        ("current_stream", FakeStream)):
        monkeypatch.setattr(torch.cuda, name, value)

    def captured_function():
        x = torch.ones(3)  # stands for a case's input on the GPU: only the closure holds it
        return (lambda: x * 2), weakref.ref(x)

    fn, x = captured_function()
    replay = suite._graphed(fn, "cuda")
    del fn
    gc.collect()
    assert x() is not None, "the replay lets the captured tensors go"
    replay()
    assert FakeGraph.replays == 1
    del replay
    gc.collect()
    assert x() is None  # (the stand-ins keep nothing themselves)


# ---- on a GPU: the benchmark's CUDA graphs ------------------------------------------------------

@needs_gpu
def test_benchmark_lenet_train_step_in_a_cuda_graph_replays_like_eager():
    """The suite's graphed LeNet step (forward, MSE loss, backward, SGD update, gradients zeroed
    in place) against the same step run eagerly: the same weights after the same steps."""
    graphed_model, graphed_step = suite.network_run("lenet", 64, "train_step", "pyengine+graph",
                                                    "cuda")
    eager_model, eager_step = suite.network_run("lenet", 64, "train_step", "pyengine", "cuda")
    replay = suite._graphed(graphed_step, "cuda")  # runs GRAPH_WARMUP steps first
    for _ in range(suite.GRAPH_WARMUP):
        eager_step()
    for _ in range(3):
        replay()
        eager_step()
    torch.cuda.synchronize()
    for (name, a), b in zip(graphed_model.named_parameters(), eager_model.parameters()):
        assert torch.equal(a, b), name
    start = suite.network_run("lenet", 64, "train_step", "pyengine", "cuda")[0]
    assert not torch.equal(next(start.parameters()), next(eager_model.parameters()))


@needs_gpu
@pytest.mark.parametrize("contender", ["pyengine+graph", "torch+graph"])
def test_benchmark_op_cases_capture_in_a_cuda_graph(contender):
    """Each pass of an op case captures and replays; the "backward" pass's forward runs before
    capture, on the capture stream (autograd runs the backward ops on the forward's stream)."""
    for case in suite.op_cases(quick=False):
        if case.name.startswith("conv2d 1->6"):
            replay = case.make(contender, "cuda")
            replay()
            torch.cuda.synchronize()


@needs_gpu
def test_benchmark_cuda_graph_contenders_beside_eager_ones_keep_their_inputs():
    """binary_cross_entropy's case timed by the suite with an eager contender beside the graphed
    one: the graph's input stays its own (its [0, 1] check fails if another contender's tensors
    take its memory, as it did on the first H200 run)."""
    cases = [c for c in suite.op_cases(quick=True) if c.name.startswith("binary_cross_entropy")]
    rows = suite.run_cases(cases, ["torch", "pyengine+graph"], "cuda", 6,
                           peak.Peaks(1.0, 1.0, "test", "test"), log=lambda *a: None)
    torch.cuda.synchronize()
    assert {r["contender"] for r in rows} == {"torch", "pyengine+graph"}
