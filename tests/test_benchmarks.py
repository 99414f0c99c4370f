"""The benchmark suite's machinery, without timing anything: the FLOP / byte formulas
(benchmarks/work.py) against hand counts, the counting of a whole network step, the CSV
schema and tables (benchmarks/report.py), and the jax contender's place in the suite (its
numbers: tests/test_bench_jax.py, which needs JAX; these tests do not)."""
import importlib.util
import os
import sys
from types import SimpleNamespace

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks import report, suite, work  # noqa: E402
import pyengine.nn as pnn  # noqa: E402
from pyengine.models import LeNet  # noqa: E402

P = torch.ops.pyengine
F32 = 4  # bytes per float32 element


def counted(fn):
    with torch.no_grad():
        return work.count(fn)


def test_every_operator_has_a_formula():
    assert set(work.registered_ops()) == set(work.FORMULAS)


def test_conv2d_forward_hand_count():
    x, w, b = torch.randn(2, 3, 8, 8), torch.randn(4, 3, 3, 3), torch.randn(4)
    got = counted(lambda: P.conv2d(x, w, b, [1, 1], [1, 1], [1, 1], 1))
    outputs = 2 * 4 * 8 * 8                       # N * C_out * H_out * W_out (padding 1 keeps 8x8)
    assert got.flops == outputs * (2 * 3 * 3 * 3) + outputs   # a multiply-add per tap, bias add
    assert got.bytes == F32 * (2 * 3 * 8 * 8 + 4 * 3 * 3 * 3 + 4 + outputs)


def test_conv2d_groups_and_backward_hand_count():
    x = torch.randn(2, 4, 6, 6, requires_grad=True)
    w = torch.randn(6, 2, 3, 3, requires_grad=True)  # groups 2: each output sees 2 channels
    out = P.conv2d(x, w, None, [1, 1], [0, 0], [1, 1], 2)
    outputs = 2 * 6 * 4 * 4
    taps = 2 * 3 * 3
    g = torch.randn_like(out)
    got = work.count(lambda: torch.autograd.grad(out, [x, w], g))
    assert got.flops == 2 * (2 * outputs * taps)      # grad_input and grad_weight, no bias
    # reads grad_output, weight (for dX) and input (for dW); writes dX and dW
    assert got.bytes == F32 * (outputs + w.numel() + x.numel() + x.numel() + w.numel())


def test_linear_forward_and_partial_backward_hand_count():
    x, w, b = torch.randn(5, 7), torch.randn(3, 7), torch.randn(3)
    fwd = counted(lambda: P.linear(x, w, b))
    assert fwd.flops == 2 * 5 * 3 * 7 + 5 * 3
    assert fwd.bytes == F32 * (5 * 7 + 3 * 7 + 3 + 5 * 3)
    g = torch.randn(5, 3)
    bwd = counted(lambda: P.linear_backward(g, x, w, [True, False, True]))
    assert bwd.flops == 2 * 5 * 3 * 7 + 5 * 3        # dx = g W, db = column sums of g
    assert bwd.bytes == F32 * (5 * 3 + 3 * 7 + 5 * 7 + 3)  # reads g, W; writes dx, db


def test_pool_and_elementwise_hand_count():
    x = torch.randn(2, 3, 8, 8)
    pool = counted(lambda: P.max_pool2d_with_indices(x, [2, 2], [2, 2], [0, 0], [1, 1], False))
    assert pool.flops == 2 * 3 * 4 * 4 * (2 * 2)
    assert pool.bytes == F32 * (x.numel() + 2 * 3 * 4 * 4) + 8 * (2 * 3 * 4 * 4)  # int64 indices
    sig = counted(lambda: P.sigmoid_backward(x, x))
    assert sig.flops == 3 * x.numel() and sig.bytes == F32 * 3 * x.numel()


def test_conv2d_relu_max_pool2d_hand_count():
    x, w, b = torch.randn(2, 3, 8, 8), torch.randn(4, 3, 3, 3), torch.randn(4)
    geometry = ([1, 1], [0, 0], [1, 1], 1, [2, 2], [2, 2], [0, 0], [1, 1], False)
    out, idx = P.conv2d_relu_max_pool2d(x, w, b, *geometry)
    conv, pooled = 2 * 4 * 6 * 6, 2 * 4 * 3 * 3   # a 6x6 convolution output, pooled to 3x3
    fwd = counted(lambda: P.conv2d_relu_max_pool2d(x, w, b, *geometry))
    # the GEMM and bias add on the convolution's output, 4 compares per window, relu per output
    assert fwd.flops == conv * (2 * 3 * 3 * 3) + conv + pooled * 4 + pooled
    # reads x, w, b; writes the pooled output and its int64 indices (not the 6x6 image)
    assert fwd.bytes == F32 * (x.numel() + w.numel() + 4 + pooled) + 8 * pooled
    g = torch.randn_like(out)
    bwd = counted(lambda: P.conv2d_relu_max_pool2d_backward(g, out, idx, x, w, *geometry,
                                                            [True, False, True]))
    # relu's step and the scatter per pooled output; dX's GEMM and db's sum over the image
    assert bwd.flops == 2 * pooled + 2 * conv * (3 * 3 * 3) + conv
    # reads grad_output, result, indices, w (for dX); writes dX and db
    assert bwd.bytes == F32 * (pooled + pooled + w.numel() + x.numel() + 4) + 8 * pooled
    # the three operators it replaces: the same convolution and pool, relu on the whole image,
    # and four passes over the image (conv2d writes it, relu reads and writes, the pool reads)
    separate = counted(lambda: P.max_pool2d_with_indices(
        P.relu(P.conv2d(x, w, b, *geometry[:4])), *geometry[4:]))
    assert separate.flops - fwd.flops == conv - pooled
    assert separate.bytes - fwd.bytes == F32 * 4 * conv


def test_broadcast_operand_counts_its_distinct_elements():
    x = torch.randn(4, 5)
    target = torch.randn(5).expand(4, 5)
    got = counted(lambda: P.mse_loss(x, target, None, 1))
    assert got.bytes == F32 * (20 + 5 + 1)


@pytest.mark.parametrize("foreach", [False, True])  # True: SGD's path on CUDA
def test_lenet_step_is_the_sum_of_its_layers(foreach):
    model = LeNet().eval()
    x = torch.randn(1, 1, 32, 32)
    inference = counted(lambda: model(x))
    # per layer: outputs * (2 * taps + bias add), relu 1 per output; the conv blocks are each one
    # conv2d_relu_max_pool2d: pool 4 compares (2x2) per pooled output and relu 1 on it
    conv1, conv2 = 6 * 28 * 28, 16 * 10 * 10
    hand = (conv1 * (2 * 25 + 1) + conv1 // 4 + (conv1 // 4) * 4
            + conv2 * (2 * 150 + 1) + conv2 // 4 + (conv2 // 4) * 4
            + 120 * (2 * 400 + 1) + 120 + 84 * (2 * 120 + 1) + 84 + 10 * (2 * 84 + 1))
    assert inference.flops == hand
    assert inference.uncounted.keys() <= {"aten::view"}

    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, foreach=foreach)
    loss_fn = pnn.MSELoss()
    y = torch.randn(1, 10)

    def step(update=True):
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        if update:
            opt.step()

    params = sum(p.numel() for p in model.parameters())
    with_update, without = work.count(step), work.count(lambda: step(update=False))
    # SGD's p += -lr * g: a multiply-add per parameter; reads p and g, writes p
    assert with_update.flops - without.flops == 2 * params
    assert with_update.bytes - without.bytes == 3 * F32 * params
    # forward again, the loss, and a backward pass costlier than the forward
    assert without.flops > 2 * hand


def test_rates_pick_the_bound_and_its_share():
    # 1 GFLOP over 1 MB in 20 ms on a 100 GFLOP/s, 10 GB/s machine: compute-bound, floor 10 ms
    r = report.rates(10**9, 10**6, 20.0, 100.0, 10.0)
    assert r["bound"] == "compute" and r["floor_ms"] == 10.0
    assert r["gflops"] == 50.0 and r["pct_peak_gflops"] == 50.0 and r["pct_of_bound"] == 50.0
    # 1 MFLOP over 100 MB in 20 ms: memory-bound, floor 10 ms, 5 GB/s is 50% of the 10 GB/s
    r = report.rates(10**6, 10**8, 20.0, 100.0, 10.0)
    assert r["bound"] == "memory" and r["gbps"] == 5.0 and r["pct_of_bound"] == 50.0
    assert set(report.rates(None, None, 1.0, 1.0, 1.0).values()) == {""}


def test_csv_has_one_schema_and_the_tables_read_it(tmp_path):
    meta = dict(machine="m", device="cpu", torch="t", commit="c", date="d", threads=2,
                peak_gflops=100.0, peak_gbps=10.0, kind="op", case="relu 8", batch=1)
    rows = [dict(meta, **{"pass": "forward"}, contender=c, median_ms=ms, p10_ms=ms, p90_ms=ms,
                 runs=30, **report.rates(8, 64, ms, 100.0, 10.0))
            for c, ms in (("pyengine", 0.01), ("torch", 0.02))]
    rows.append(dict(rows[0], kind="network", case="lenet",
                     **report.rates(None, None, 1.0, 100.0, 10.0)))
    path = tmp_path / "results.csv"
    report.write_csv(rows, str(path))
    back = report.read_csv(str(path))
    assert list(back[0]) == report.CSV_FIELDS
    text = report.markdown(back, "an FMA loop", "a copy")
    assert "**100.0 GFLOP/s** (an FMA loop)" in text and "**10.0 FLOP/byte**" in text
    assert "| op | relu 8 | forward | 1 | 0.0100 | 0.0200 | **0.50** |" in text
    assert "| op | relu 8 | forward | 1 | 8e-06 | 6.4e-05 | 0.125 | memory |" in text
    assert "| network | lenet |" in text


def test_read_csv_refuses_another_schema(tmp_path):
    path = tmp_path / "old.csv"
    path.write_text("machine,case,median_ms\nm,relu,1.0\n")
    with pytest.raises(SystemExit, match="not the suite's CSV schema"):
        report.read_csv(str(path))


def test_jax_contender_is_left_out_with_a_reason_when_jax_does_not_import(monkeypatch):
    monkeypatch.setitem(sys.modules, "jax", None)  # makes `import jax` raise ImportError
    logged = []
    assert suite.contenders("cpu", with_compile=False, log=logged.append) == [
        "pyengine", "torch", "pyengine+capture"]
    assert len(logged) == 1 and "JAX does not import here" in logged[0] \
        and "without its jax contender" in logged[0]
    logged.clear()
    assert "jax" not in suite.jax_contender("cuda", log=logged.append) and not logged


def test_op_cases_have_no_jax_version():
    case = suite.op_cases(quick=True)[0]
    assert case.make("jax", "cpu") is None


def test_op_cases_have_no_captured_step():
    case = suite.op_cases(quick=True)[0]
    assert case.make("pyengine+capture", "cpu") is None


def test_captured_lenet_step_trains_like_the_eager_one():
    """The suite's "pyengine+capture" contender: the same LeNet, weights and batch as
    "pyengine", its step replayed; a replay updates the weights exactly as an eager step."""
    eager_model, eager = suite.network_run("lenet", 2, "train_step", "pyengine", "cpu")
    captured_model, captured = suite.network_run("lenet", 2, "train_step", "pyengine+capture",
                                                 "cpu")
    for _ in range(3):  # capture_step ran three real steps
        eager()
    for _ in range(2):
        assert torch.equal(eager().detach(), captured())
    for p, q in zip(eager_model.parameters(), captured_model.parameters()):
        assert torch.equal(p, q)
    assert suite.network_case("lenet", 2, "inference").make("pyengine+capture", "cpu") is None


def test_times_table_adds_the_captured_step_ratios_when_it_ran():
    row = dict(kind="network", case="lenet", batch=64, contender="pyengine", median_ms=1.0,
               **{"pass": "train_step"})
    rows = [row, dict(row, contender="torch", median_ms=2.0),
            dict(row, contender="pyengine+capture", median_ms=0.5)]
    lines = report.times_table(rows).splitlines()
    assert lines[0] == ("| kind | case | pass | batch | pyengine ms | torch ms | "
                        "pyengine+capture ms | pyengine / torch | pyengine+capture / torch |")
    assert lines[2].endswith("| **0.50** | **0.25** |")


def test_times_table_adds_pyengine_over_jax_when_jax_ran():
    row = dict(kind="network", case="lenet", batch=64, contender="pyengine", median_ms=1.0,
               **{"pass": "train_step"})
    rows = [row, dict(row, contender="torch", median_ms=2.0), dict(row, contender="jax",
                                                                   median_ms=4.0)]
    table = report.times_table(rows)
    assert table.splitlines()[0] == ("| kind | case | pass | batch | pyengine ms | torch ms | "
                                     "jax ms | pyengine / torch | pyengine / jax |")
    assert "| network | lenet | train_step | 64 | 1.0000 | 2.0000 | 4.0000 | **0.50** | " \
        "**0.25** |" in table
    assert "jax" not in report.times_table(rows[:2])


def test_bench_install_goes_on_when_jax_does_not_install(monkeypatch, capsys):
    """`make bench` / `make bench-all` install JAX as an optional extra: a failed pip install of
    it is reported and the benchmarks run without it; the same failure in a required extra stops
    the install step."""
    spec = importlib.util.spec_from_file_location("pyengine_install",
                                                  os.path.join(ROOT, "tools", "install.py"))
    install = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(install)
    pip_calls = []
    monkeypatch.setattr(install.subprocess, "run",
                        lambda cmd, **kw: pip_calls.append(cmd[4:]) or SimpleNamespace(returncode=1))
    monkeypatch.setattr(install, "missing", lambda reqs: [r for r in reqs if r.startswith("jax")])
    monkeypatch.setattr(install, "up_to_date", lambda fingerprint: True)
    monkeypatch.setattr(install, "built_library", lambda: "pyengine/_C.so")
    assert install.main(["--extras", "test,train", "--optional-extras", "bench"]) == 0
    assert pip_calls == [["-q", "jax", "jaxlib"]]
    assert "an optional extra, so going on without it" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="failed"):
        install.main(["--extras", "bench"])


class _SlowCalls:
    """A contender whose every call takes `seconds` on a fake clock (no real waiting)."""

    def __init__(self, seconds):
        self.seconds, self.now, self.calls = seconds, 0.0, 0

    def clock(self):
        return self.now

    def __call__(self):
        self.calls += 1
        self.now += self.seconds


def test_time_fn_budget_cuts_a_pathologically_slow_contender_short():
    from benchmarks.timing import time_fn
    slow = _SlowCalls(36.0)  # torch's bf16 4096 x 4096 linear on an AVX2 CPU, per call
    t = time_fn(slow, warmup=5, runs=20, budget_s=60.0, clock=slow.clock)
    # the first warm-up call (outside the budget), a second (36 s), one timed run (72 s > 60)
    assert (slow.calls, t.runs) == (3, 1)
    assert t.median_ms == pytest.approx(36000.0)
    # a call longer than the whole budget still gets its warm-up and one timed run
    slower = _SlowCalls(500.0)
    assert time_fn(slower, warmup=5, runs=20, budget_s=60.0, clock=slower.clock).runs == 1
    assert slower.calls == 2


def test_time_fn_budget_leaves_normal_contenders_alone():
    from benchmarks.timing import time_fn
    fast = _SlowCalls(0.5)
    t = time_fn(fast, warmup=5, runs=20, budget_s=suite.ROUND_BUDGET_S, clock=fast.clock)
    assert (fast.calls, t.runs) == (25, 20)
    unbounded = _SlowCalls(36.0)
    assert time_fn(unbounded, warmup=5, runs=20, clock=unbounded.clock).runs == 20
    assert unbounded.calls == 25


def _timed_runs_on_a_fake_clock(monkeypatch, seconds_per_call, runs, log=lambda _: None):
    """suite.run_cases on one fake CPU case whose contenders' calls take seconds_per_call[name]
    on a fake clock (no real waiting): the timed runs each contender got."""
    clock = _SlowCalls(0.0)
    real_time_fn = suite.time_fn
    monkeypatch.setattr(suite, "time_fn",
                        lambda fn, device, **kw: real_time_fn(fn, device, clock=clock.clock, **kw))

    def contender(seconds):
        def call():
            clock.now += seconds
        return call

    case = SimpleNamespace(name="fake", pass_="forward", batch=1, kind="op",
                           make=lambda name, device: contender(seconds_per_call[name]))
    monkeypatch.setattr(suite, "count_work", lambda case, device, log: None)
    peaks = SimpleNamespace(gflops=100.0, gbps=10.0)
    rows = suite.run_cases([case], list(seconds_per_call), "cpu", runs, peaks, log=log)
    return {r["contender"]: r["runs"] for r in rows}


def test_suite_reports_the_runs_a_cut_contender_got(monkeypatch):
    monkeypatch.setattr(suite, "ROUND_BUDGET_S", 60.0)
    logged = []
    runs = _timed_runs_on_a_fake_clock(monkeypatch, {"pyengine": 0.01, "torch": 36.0}, 60,
                                       log=logged.append)
    # torch: one timed call per round (its warm-up's first two calls use 72 s of the 60).
    assert runs == {"pyengine": 60, "torch": suite.ROUNDS}
    assert any(f"torch took 36 s a call: {suite.ROUNDS} timed runs, not 60" in line
               for line in logged)


def test_cpu_rounds_time_short_calls_for_at_least_round_min_s(monkeypatch):
    # A round of a fast call goes on past its runs / ROUNDS calls until it has run ROUND_MIN_S
    # (at most 10x the calls); a call slower than ROUND_MIN_S / (runs / ROUNDS) keeps its runs.
    runs = _timed_runs_on_a_fake_clock(
        monkeypatch, {"pyengine": 0.001, "torch": suite.ROUND_MIN_S}, 15)
    per_round = suite.runs_per_round(15)
    # 1 ms calls would need 50 a round to fill 50 ms: capped at 10x the round's 3 runs. Calls of
    # ROUND_MIN_S fill it with their 3.
    assert runs == {"pyengine": suite.ROUNDS * 10 * per_round, "torch": suite.ROUNDS * per_round}
