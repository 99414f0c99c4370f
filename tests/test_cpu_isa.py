"""The CPU instruction-set choice (csrc/cpu/isa.h): PYENGINE_CPU_ISA steers every kernel family,
and every operator's lower-ISA builds (AVX2, baseline x86-64) give torch's results, forward and
backward, on shapes that take each kernel's vector loops and their tails. This machine runs its
best level by default, so the lower ones run in a fresh process each (one per level)."""
import os

import pytest
import torch

import helpers
import pyengine

LEVELS = ["default", "avx2", "avx512", "avx512_bf16", "amx_bf16"]  # lowest first


def cpu_best_level():
    """The best level this CPU has, from /proc/cpuinfo (None where there is none to read)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f
                          if line.startswith("flags")), None)
    except OSError:
        return None
    if flags is None:
        return None
    if {"avx512f", "avx512vl", "avx512dq", "avx512bw", "avx2", "fma"} <= set(flags):
        if "avx512_bf16" not in flags:
            return "avx512"
        # (Linux grants the tile state to a process that asks, as pyengine does: kernel >= 5.16)
        return "amx_bf16" if {"amx_tile", "amx_bf16"} <= set(flags) else "avx512_bf16"
    return "avx2" if {"avx2", "fma"} <= set(flags) else "default"


def expected_families(forced):
    """{family: level} that pyengine._C.cpu_isa() should report with PYENGINE_CPU_ISA=forced
    (None: unset) on this CPU."""
    best = cpu_best_level()
    chosen = forced if forced is not None else best
    if best is not None:  # never above what the CPU has
        chosen = LEVELS[min(LEVELS.index(chosen), LEVELS.index(best))]
    # gemm, conv2d, linear, max_pool2d, softmax, cross_entropy and the elementwise loops
    # (activations, mse_loss, binary_cross_entropy) have code for every level up to avx512;
    # gemm_bf16 for amx_bf16 and avx512_bf16 only.
    upto512 = LEVELS[min(LEVELS.index(chosen), LEVELS.index("avx512"))]
    every = {f: upto512 for f in ("gemm", "conv2d", "linear", "max_pool2d", "softmax",
                                  "cross_entropy", "elementwise")}
    return dict(every, gemm_bf16=chosen if chosen in ("amx_bf16", "avx512_bf16") else "default")


def test_levels_each_family_runs_with():
    if cpu_best_level() is None:
        pytest.skip("no /proc/cpuinfo to tell this CPU's instruction sets")
    assert pyengine._C.cpu_isa() == expected_families(os.environ.get("PYENGINE_CPU_ISA"))
    # The lower levels are checked by the per-level scripts below; avx512 here.
    helpers.run_with_cpu_isa("avx512", "import pyengine\n"
                             f"assert pyengine._C.cpu_isa() == {expected_families('avx512')!r}\n"
                             "print('ok')\n")


def test_bfloat16_linear_without_avx512_bf16_goes_through_float32():
    """Below avx512_bf16 (PYENGINE_CPU_ISA=avx512 here), bfloat16 linear runs on float32 copies
    (common/low_precision.h): bitwise the float32 kernels' results rounded once. On this machine's
    best level it runs cpu/gemm_bf16.cpp instead, which tests/test_low_precision.py checks against
    torch; the two agree to one rounding of the result."""
    script = r"""
import torch, pyengine
P = torch.ops.pyengine
assert pyengine._C.cpu_isa()["gemm_bf16"] == "default"
torch.manual_seed(0)
for rows, i, o in ((37, 45, 23), (64, 400, 120), (1, 3, 2)):
    x, w, b = (torch.randn(*s).bfloat16() for s in ((rows, i), (o, i), (o,)))
    g = torch.randn(rows, o).bfloat16()
    y = P.linear(x, w, b)
    assert torch.equal(y, P.linear(x.float(), w.float(), b.float()).bfloat16())
    for got, want in zip(P.linear_backward(g, x, w, [True, True, True]),
                         P.linear_backward(g.float(), x.float(), w.float(), [True, True, True])):
        assert got.dtype == torch.bfloat16 and torch.equal(got, want.bfloat16())
print("ok")
"""
    helpers.run_with_cpu_isa("avx512", script)


def test_unknown_level_is_a_clear_error():
    script = r"""
import torch, pyengine
for call in (lambda: pyengine._C.cpu_isa(),
             lambda: torch.ops.pyengine.softmax(torch.randn(3, 4), 1),
             lambda: torch.ops.pyengine.linear(torch.randn(3, 4), torch.randn(2, 4), None)):
    try:
        call()
    except RuntimeError as e:
        assert "PYENGINE_CPU_ISA" in str(e) and "amx_bf16, avx512_bf16, avx512, avx2 or default" \
            in str(e), str(e)
        assert "AVX-2" in str(e), str(e)
    else:
        raise AssertionError("no error")
print("ok")
"""
    helpers.run_with_cpu_isa("AVX-2", script)


# ---- Every operator under each lower level ------------------------------------------------------
# Shapes chosen to take the vector loops and their tails (row lengths that are not multiples of 8
# or 16), both conv2d algorithms, every max_pool2d kernel and softmax's long-row and inner-dim
# paths. The script also checks that it ran every registered operator.

_EVERY_OP_SCRIPT = r"""
import torch, torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
import helpers, pyengine

P = torch.ops.pyengine
expected = EXPECTED_FAMILIES
assert expected is None or pyengine._C.cpu_isa() == expected, pyengine._C.cpu_isa()
ran = set()

class Record(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "pyengine":
            ran.add(func._opname)
        return func(*args, **(kwargs or {}))

def check(ours, theirs, *inputs, dtype, **tol):
    with Record():
        helpers.compare_with_torch(ours, theirs, list(inputs), dtype, **tol)

def leaf(*shape, dtype, scale=1.0):
    return (torch.randn(*shape, dtype=dtype) * scale).requires_grad_()

torch.manual_seed(0)
for dtype in (torch.float32, torch.float64):
    tol = dict(atol=1e-4) if dtype == torch.float32 else {}
    # conv2d: im2col (strided, dilated, grouped, padded, 1x1), batch-innermost (stride 1,
    # narrow output rows, batch >= 16, with and without padding), the implicit GEMM (16+
    # output channels: flattened rows, stride 2, rows gathered at 64 channels per group, which
    # the widest tiles of every level fill, with 512-byte operand rows) and Winograd (3x3,
    # stride 1, one group, 32+ channels: forward and grad_input).
    for (n, c, h, w, co, k, s, p, d, g) in [(2, 16, 9, 11, 16, 3, 1, 1, 1, 1),
                                            (2, 16, 13, 12, 16, 3, 2, 1, 1, 1),
                                            (1, 128, 6, 7, 128, 3, 1, 1, 1, 2),
                                            (2, 40, 7, 9, 33, 3, 1, 1, 1, 1),
                                            (3, 4, 17, 15, 8, 3, 2, 1, 1, 2),
                                            (2, 3, 9, 21, 6, 3, 1, 2, 2, 3),
                                            (2, 8, 7, 9, 8, 1, 1, 0, 1, 1),
                                            (2, 3, 19, 37, 5, 5, 1, 0, 1, 1),
                                            (20, 6, 14, 14, 16, 5, 1, 0, 1, 1),
                                            (17, 4, 9, 11, 6, 3, 1, 1, 1, 2)]:
        x, wt = leaf(n, c, h, w, dtype=dtype), leaf(co, c // g, k, k, dtype=dtype)
        b = leaf(co, dtype=dtype)
        check(lambda x, wt, b: P.conv2d(x, wt, b, [s, s], [p, p], [d, d], g),
              lambda x, wt, b: F.conv2d(x, wt, b, s, p, d, g), x, wt, b, dtype=dtype, **tol)
    # max_pool2d: 2x2 stride 2 (wide rows take the gather backward), stride 1, stride 2 with
    # tap pairs and with dilation, padding, ceil_mode; with and without indices.
    for (shape, k, s, p, d, cm) in [((2, 3, 28, 28), 2, 2, 0, 1, False),
                                    ((2, 2, 20, 70), 2, 2, 0, 1, True),
                                    ((2, 3, 21, 37), 3, 1, 1, 1, False),
                                    ((2, 3, 33, 47), 3, 2, 1, 1, True),
                                    ((2, 3, 30, 41), 3, 2, 1, 2, False)]:
        x = leaf(*shape, dtype=dtype)
        check(lambda x: P.max_pool2d_with_indices(x, [k, k], [s, s], [p, p], [d, d], cm)[0],
              lambda x: F.max_pool2d(x, k, s, p, d, cm), x, dtype=dtype)
        with Record():
            helpers.assert_close(P.max_pool2d(x.detach(), [k, k], [s, s], [p, p], [d, d], cm),
                                 F.max_pool2d(x.detach(), k, s, p, d, cm), dtype)
    # 2x2 / stride 2 with ties, NaN and -inf (each level's kernel keeps torch's first maximum,
    # last NaN and -inf windows), on rows of whole vectors and a last one overlapping (38 and 27
    # columns: 19 and 13 windows), half-width vectors (13 and 11: 6 and 5 windows, fewer than
    # AVX2's 8) and rows narrower than any vector (7: 3 windows).
    for width in (38, 27, 13, 11, 7):
        x = torch.randint(-2, 3, (2, 3, 12, width)).to(dtype)
        x[0, 0, 0, :4] = float("nan")
        x[1, 2, 5, width // 2] = float("nan")
        x[0, 1, 2:4, 2:6] = -float("inf")
        x[1, 1, :2, width - 4:] = -float("inf")
        with Record():
            ours = P.max_pool2d_with_indices(x, [2, 2], [2, 2], [0, 0], [1, 1], False)
        theirs = F.max_pool2d(x, 2, 2, return_indices=True)
        assert torch.equal(ours[1], theirs[1]), (width, (ours[1] != theirs[1]).nonzero())
        helpers.assert_close(ours[0], theirs[0], dtype)
    # conv2d_relu_max_pool2d: LeNet's conv1 (the direct path) and conv2 at a batch >= 16 (batch
    # innermost), then a strided grouped convolution with an overlapping, padded, ceil_mode pool.
    # Integer values: the convolutions are exact at every level, so near ties cannot break
    # differently from torch's (exact ties pick the first maximum in both).
    for (n, c, h, w, co, k, s, p, g, pk, ps, pp, cm) in [
            (2, 1, 32, 32, 6, 5, 1, 0, 1, 2, 2, 0, False),
            (20, 6, 14, 14, 16, 5, 1, 0, 1, 2, 2, 0, False),
            (3, 4, 17, 15, 8, 3, 2, 1, 2, 3, 2, 1, True)]:
        x = torch.randint(-2, 3, (n, c, h, w)).to(dtype).requires_grad_()
        wt = torch.randint(-2, 3, (co, c // g, k, k)).to(dtype).requires_grad_()
        b = torch.randint(-2, 3, (co,)).to(dtype).requires_grad_()
        geometry = ([s, s], [p, p], [1, 1], g, [pk, pk], [ps, ps], [pp, pp], [1, 1], cm)
        check(lambda x, wt, b: P.conv2d_relu_max_pool2d(x, wt, b, *geometry)[0],
              lambda x, wt, b: F.max_pool2d(F.relu(F.conv2d(x, wt, b, s, p, 1, g)), pk, ps, pp,
                                            ceil_mode=cm), x, wt, b, dtype=dtype, **tol)
    # linear: GEMM tiles with row, column and k tails.
    for (r, i, o) in [(33, 17, 5), (70, 130, 50), (256, 400, 120)]:
        x, wt, b = leaf(r, i, dtype=dtype), leaf(o, i, dtype=dtype), leaf(o, dtype=dtype)
        check(P.linear, F.linear, x, wt, b, dtype=dtype, **tol)
    # softmax / log_softmax: rows with tails, long rows (carried sums), dims not last.
    for shape, dim in [((5, 1003), 1), ((7, 9), 1), ((3, 300, 7), 1), ((2, 5000), 1),
                       ((4, 6, 5), 0)]:
        x = leaf(*shape, dtype=dtype, scale=3.0)
        check(lambda x: P.softmax(x, dim), lambda x: torch.softmax(x, dim), x, dtype=dtype)
        check(lambda x: P.log_softmax(x, dim), lambda x: torch.log_softmax(x, dim), x, dtype=dtype)
    # activations
    x = leaf(1003, dtype=dtype, scale=4.0)
    check(P.relu, torch.relu, x, dtype=dtype)
    check(lambda x: P.leaky_relu(x, 0.1), lambda x: F.leaky_relu(x, 0.1), x, dtype=dtype)
    check(P.sigmoid, torch.sigmoid, x, dtype=dtype)
    check(P.tanh, torch.tanh, x, dtype=dtype)
    # losses, every reduction
    for red, name in enumerate(["none", "mean", "sum"]):
        x, t = leaf(1003, dtype=dtype), torch.randn(1003, dtype=dtype)
        wt = torch.rand(1003, dtype=dtype)
        check(lambda x: P.mse_loss(x, t, None, red), lambda x: F.mse_loss(x, t, reduction=name),
              x, dtype=dtype)
        pr = torch.rand(1003, dtype=dtype).clamp(0.01, 0.99).requires_grad_()
        y = torch.rand(1003, dtype=dtype)
        check(lambda p: P.binary_cross_entropy(p, y, wt, red),
              lambda p: F.binary_cross_entropy(p, y, wt, reduction=name), pr, dtype=dtype)
        check(lambda y: P.binary_cross_entropy(pr.detach(), y, wt, red),
              lambda y: F.binary_cross_entropy(pr.detach(), y, wt, reduction=name),
              y.clone().requires_grad_(), dtype=dtype)
        # rows (a long one, narrow ones) and (N, C, d1, d2): the column kernels, with a
        # whole block and a narrower last one per image (65 pixels)
        for shape in [(37, 1003), (64, 10), (3, 21, 5, 13)]:
            classes = shape[1]
            x = leaf(*shape, dtype=dtype, scale=3.0)
            tg = torch.randint(0, classes, shape[:1] + shape[2:])
            tg.view(-1)[::5] = -100
            wc = torch.rand(classes, dtype=dtype)
            probs = torch.rand(shape, dtype=dtype)
            # class indices, label smoothing, class probabilities (smoothed)
            for target, eps in ((tg, 0.0), (tg, 0.2), (probs, 0.2)):
                check(lambda x: P.cross_entropy(x, target, wc, red, -100, eps),
                      lambda x: F.cross_entropy(x, target, wc, reduction=name,
                                                label_smoothing=eps), x, dtype=dtype)
                # without a gradient to compute, cross_entropy itself runs (with one, its
                # Autograd kernel runs cross_entropy_with_log_sum_exp)
                with Record():
                    helpers.assert_close(
                        P.cross_entropy(x.detach(), target, wc, red, -100, eps),
                        F.cross_entropy(x.detach(), target, wc, reduction=name,
                                        label_smoothing=eps), dtype)
registered = {name.split("::")[1] for name in torch._C._dispatch_get_all_op_names()
              if name.startswith("pyengine::")}
assert registered and ran == registered, sorted(registered - ran)
print("ok")
"""


@pytest.mark.parametrize("isa", ["avx2", "default"])
def test_every_operator_at_lower_levels(isa):
    expected = expected_families(isa) if cpu_best_level() is not None else None
    helpers.run_with_cpu_isa(isa, _EVERY_OP_SCRIPT.replace("EXPECTED_FAMILIES", repr(expected)))
