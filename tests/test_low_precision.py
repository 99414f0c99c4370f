"""bfloat16 and float16 on every operator (computed in float32 inside:
csrc/common/low_precision.h), against torch's own kernels in the same dtype.

Every sample of every operator (tests/samples.py) is drawn in float64, rounded to the 16-bit dtype,
and run three ways: pyengine in that dtype, torch in that dtype, and torch in float64 on the
rounded values (the exact answer to the 16-bit inputs). pyengine's error against that answer,
forward and every gradient, must be within twice torch's own error plus one unit in the last
place of the result's magnitude: "as accurate as torch in that dtype", measured, not a guessed
tolerance. Result and gradient dtypes must be torch's; positions where torch's result is not
finite (NaN inputs, float16 overflow) must be the same in pyengine's.
"""
import os
import subprocess
import sys

import pytest
import torch

import pyengine.functional

import fuzz_configs
import samples
from differential import REFERENCES, TorchReference, call
from fuzz_configs import materialize, pyengine_function, torch_function

LOW_DTYPES = (torch.bfloat16, torch.float16)


def _cast_keeping_strides(t, dtype):
    """t in `dtype` with t's very strides (Tensor.to keeps them for dense tensors only): the
    storage range t covers, cast, viewed as t."""
    if t.numel() == 0:
        return t.to(dtype)
    span = 1 + sum((n - 1) * st for n, st in zip(t.shape, t.stride()))
    covered = t.as_strided((span,), (1,), t.storage_offset()).to(dtype, copy=True)
    return covered.as_strided(t.shape, t.stride(), covered.storage_offset())


def _cast_leaves(args, kwargs, dtype):
    """The floating tensors of a call in `dtype`, in their layouts (strided, expanded,
    channels_last...), fresh leaves that require grad as the originals did; other arguments as
    they are."""
    def cast(a):
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            return _cast_keeping_strides(a.detach(), dtype).requires_grad_(a.requires_grad)
        return a
    return [cast(a) for a in args], {k: cast(v) for k, v in kwargs.items()}


def _grad_output(shape, dtype, seed):
    """The gradient of the output: drawn from `seed`, rounded to `dtype` (every side gets the
    same 16-bit values)."""
    g = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return g.to(dtype)


def _torch_side(case, args, kwargs, low, ours_args, ours_kwargs):
    """torch's output and gradients (differential.py's reference for the op: the pooling and
    fused-operator geometries torch's own call cannot serve), in the arguments' dtype."""
    ref = REFERENCES.get(case.op, TorchReference)(case, args, kwargs)
    ref.see_ours(case, ours_args, ours_kwargs)
    out = ref.primary().detach()
    if not out.requires_grad and not ref.primary().requires_grad:
        return out, []
    return out, ref.grads(_grad_output(out.shape, low, case.seed).to(out.dtype))


def _ours(case, args, kwargs, low):
    out = call(pyengine_function(case.op), args, kwargs)
    out = out[0] if isinstance(out, tuple) else out
    leaves = list(args) + list(kwargs.values())
    if not out.requires_grad:
        return out.detach(), []
    out.backward(_grad_output(out.shape, low, case.seed).to(out.dtype))
    return out.detach(), [a.grad if isinstance(a, torch.Tensor) else None for a in leaves]


def _compare(what, ours, theirs, ref, dtype, floor=0.0):
    """ours within twice torch's error against `ref` (float64), plus one ulp of the result's
    magnitude in `dtype`, plus `floor` (float32's own rounding of a gradient: a result that is 0
    exactly may come out as float32's rounding error of the terms that cancelled)."""
    if ref is None:
        assert ours is None and theirs is None, what
        return
    assert ours.dtype == theirs.dtype, f"{what}: dtype {ours.dtype}, torch's {theirs.dtype}"
    assert ours.shape == theirs.shape, what
    if ours.numel() == 0:
        return
    # Not finite only where torch's result is not, or where the exact one is not finite in
    # `dtype` (NaN, or beyond its range). torch may overflow where pyengine, computing in float32,
    # does not (float16's (1 - p) * p under binary_cross_entropy's 1e-12 clamp): such positions
    # count in pyengine's error below.
    theirs_bad, ours_bad = ~torch.isfinite(theirs), ~torch.isfinite(ours)
    exact_bad = ~(ref.abs() <= torch.finfo(dtype).max)
    stray = ours_bad & ~theirs_bad & ~exact_bad
    assert not stray.any(), (f"{what}: not finite at {int(stray.sum())} positions where torch's "
                             "result and the exact one are")
    stray_nan = ours.isnan() & ~theirs.isnan() & ~ref.isnan()
    assert not stray_nan.any(), f"{what}: NaN at {int(stray_nan.sum())} positions"
    exact = ~exact_bad
    scale = ref[exact].abs().max().item() if exact.any() else 0.0
    ulp = torch.finfo(dtype).eps * scale

    def error(x):
        at = exact & torch.isfinite(x)
        return (x.double() - ref)[at].abs().max().item() if at.any() else 0.0

    ours_err, torch_err = error(ours), error(theirs)
    assert ours_err <= 2 * torch_err + ulp + floor, (
        f"{what} in {dtype}: pyengine's error {ours_err:.3g} against the float64 result, torch's "
        f"{torch_err:.3g} (allowed: twice torch's plus one ulp of the result's magnitude, "
        f"{ulp:.3g}, plus {floor:.3g})")


def check_low_precision(case, dtype):
    """One case (any dtype: its values are drawn in float64) in `dtype`, against torch in `dtype`
    and the float64 answer (module docstring)."""
    case64 = fuzz_configs.build(case.op, dict(case.params, dtype="float64"), case.seed)
    args64, kwargs64 = materialize(case64)
    args, kwargs = _cast_leaves(args64, kwargs64, dtype)
    theirs_args, theirs_kwargs = _cast_leaves(args, kwargs, dtype)
    ref_args, ref_kwargs = _cast_leaves(args, kwargs, torch.float64)

    ours_out, ours_grads = _ours(case, args, kwargs, dtype)
    ref_out, ref_grads = _torch_side(case, ref_args, ref_kwargs, dtype, args, kwargs)
    theirs_out, theirs_grads = _torch_side(case, theirs_args, theirs_kwargs, dtype, args, kwargs)

    # Layouts: the float32 call's strides (test_layout.py holds those to torch's), results and
    # gradients alike, whatever the 16-bit path (float32 copies, or linear's own bfloat16 GEMM).
    f32_args, f32_kwargs = _cast_leaves(args, kwargs, torch.float32)
    f32_out, f32_grads = _ours(case, f32_args, f32_kwargs, dtype)
    for what, a, b in [("forward", ours_out, f32_out)] + [
            (f"gradient {i}", a, b) for i, (a, b) in enumerate(zip(ours_grads, f32_grads))]:
        if a is not None and a.numel() > 1:
            assert a.stride() == b.stride(), (f"{what}: strides {a.stride()} in {dtype}, "
                                              f"{b.stride()} in float32")
    _compare("forward", ours_out, theirs_out, ref_out, dtype)
    g_scale = _grad_output(ref_out.shape, dtype, case.seed).abs().max().item() \
        if ref_out.numel() else 0.0
    for i, (o, t, r) in enumerate(zip(ours_grads, theirs_grads, ref_grads)):
        _compare(f"gradient of differentiable argument {i}", o, t, r, dtype,
                 floor=torch.finfo(torch.float32).eps * g_scale)


def _cases():
    out = []
    for sample in samples.all_samples(large=False):
        if sample.case.expect_error:
            continue
        for dtype in LOW_DTYPES:
            out.append(pytest.param(sample, dtype, id=f"{sample.id}-{str(dtype)[6:]}"))
    return out


@pytest.mark.parametrize("sample,dtype", _cases())
def test_sample_in_low_precision(sample, dtype):
    check_low_precision(sample.case, dtype)


@pytest.mark.parametrize("shape", [(256, 400, 120), (7, 33, 65), (1, 1, 1), (13, 4096, 70),
                                   (300, 130, 3), (0, 4, 5), (5, 0, 3),
                                   # on AMX tiles (M, N, K >= 16), with tails in every dimension
                                   (37, 45, 70), (100, 131, 33), (64, 1000, 96),
                                   # few columns (a classifier's outputs): computed as C^T
                                   (1024, 256, 10), (1000, 84, 10)])
def test_bfloat16_linear_against_float64(shape):
    """linear in bfloat16 (on AVX512_BF16: cpu/gemm_bf16.cpp) on shapes with tails in every
    dimension, odd K, K = 0 and large K, transposed (column-major) weights: as accurate as torch's
    bfloat16 linear against the float64 answer, forward and gradients."""
    rows, i, o = shape
    gen = torch.Generator().manual_seed(rows * 1000003 + i * 1009 + o)
    x = torch.randn(rows, i, generator=gen).bfloat16()
    w_t = torch.randn(i, o, generator=gen).bfloat16()
    b = torch.randn(o, generator=gen).bfloat16()
    g = torch.randn(rows, o, generator=gen).bfloat16()
    for w in (w_t.t().contiguous(), w_t.t()):  # contiguous and column-major weights
        ref = x.double() @ w.double().t() + b.double()
        ours = pyengine.functional.linear(x, w, b)
        theirs = torch.nn.functional.linear(x, w, b)
        _compare("forward", ours, theirs, ref, torch.bfloat16)
        refs = (g.double() @ w.double(), g.double().t() @ x.double(), g.double().sum(0))
        mine = torch.ops.pyengine.linear_backward(g, x, w, [True, True, True])
        torch_grads = (g @ w, g.t() @ x, g.float().sum(0).bfloat16())
        g_scale = float(g.abs().max()) if g.numel() else 0.0
        for name, m, t, r in zip(("grad_input", "grad_weight", "grad_bias"), mine, torch_grads,
                                 refs):
            _compare(name, m, t, r, torch.bfloat16,
                     floor=torch.finfo(torch.float32).eps * max(1.0, g_scale))


# The bfloat16 levels below each one: what its GEMM and conv2d's bfloat16 kernels run on
# (cpu/isa.h): AMX tiles; AVX512_BF16 dot products on the tiles' operands; float32 copies.
_BF16_LEVELS = ["amx_bf16", "avx512_bf16", "avx512"]


@pytest.mark.parametrize("level", _BF16_LEVELS[1:])
def test_bfloat16_linear_and_conv2d_on_the_lower_levels_too(level):
    """On a CPU with AMX (level amx_bf16) the bfloat16 GEMM and conv2d's bfloat16 kernels run
    on tiles (so does the fused convolution block's forward, on LeNet's conv2 geometry); at
    avx512_bf16 (no AMX) on AVX512_BF16's dot products (conv2d: the same packed operands,
    cpu/conv2d_bf16.cpp's *_dp kernels); below it, conv2d on float32 copies. The bfloat16
    linear, conv2d and fused-block tests run again in a process at each level below this CPU's
    own."""
    own = pyengine._C.cpu_isa()["gemm_bf16"]
    if own not in _BF16_LEVELS or _BF16_LEVELS.index(level) <= _BF16_LEVELS.index(own):
        pytest.skip(f"this CPU's own level is {own}: {level} is tested above, or not below it")
    import helpers

    helpers.run_with_cpu_isa(level, "import pyengine\n"
                             "assert pyengine._C.cpu_isa()['conv2d'] == 'avx512'\n"
                             f"assert pyengine._C.cpu_isa()['gemm_bf16'] in ('{level}', 'default')\n"
                             "print('ok')\n")
    env = dict(os.environ, PYENGINE_CPU_ISA=level)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           os.path.abspath(__file__), "-k",
                           "(bfloat16_linear or bfloat16_conv2d or bfloat16_fused) "
                           "and not lower_levels"],
                          env=env, capture_output=True, text=True, timeout=600,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0 and " passed" in proc.stdout, \
        proc.stdout[-3000:] + proc.stderr[-2000:]


# Convolutions of the kind a converted CNN has, wider than LeNet's: (batch, in, h, w, out, kernel,
# stride, padding, dilation, groups), strided, dilated, grouped, 1x1 and odd sizes, which take
# the im2col, implicit-GEMM and Winograd kernels on float32 copies.
WIDE_CONVS = [(2, 16, 9, 11, 32, 3, 1, 1, 1, 1), (3, 8, 13, 12, 40, 3, 2, 1, 1, 1),
              (2, 64, 7, 9, 64, 3, 1, 2, 2, 2), (2, 64, 6, 5, 32, 1, 1, 0, 1, 1),
              (1, 20, 15, 17, 33, 5, 2, 2, 1, 1), (2, 64, 30, 30, 48, 3, 1, 1, 1, 1),
              # on AMX tiles where the CPU has them (cpu/conv2d_bf16.cpp: one group, 16+
              # channels): channels and output rows with tails, stride 2, dilation, 1x1, 7x7
              (1, 17, 9, 23, 20, 3, 2, 1, 1, 1), (3, 32, 12, 40, 48, 3, 1, 2, 2, 1),
              (2, 16, 7, 7, 16, 1, 1, 0, 1, 1), (1, 40, 21, 19, 70, 7, 2, 3, 1, 1),
              (0, 32, 8, 8, 32, 3, 1, 1, 1, 1),
              # stride 2 over rows of 32+ columns (grad_weight's vector column split), odd and
              # even padding
              (1, 16, 7, 70, 24, 3, 2, 1, 1, 1), (2, 32, 6, 45, 16, 3, 2, 2, 1, 1),
              # grad_input by phases of the stride: a 1x1 stride 2 (phases no tap reaches),
              # stride 3, padding past the kernel's reach (the flipped convolution crops dY)
              (2, 16, 9, 8, 20, 1, 2, 0, 1, 1), (1, 16, 11, 13, 16, 3, 3, 1, 1, 1),
              (1, 16, 5, 6, 16, 3, 1, 3, 1, 1),
              # ... the phases' one padded copy of dY, each phase's view starting inside it:
              # phases of unequal padding (odd kernels, padding 0 to 2), 4x4 and 5x5 kernels
              (2, 32, 9, 10, 24, 3, 2, 0, 1, 1), (1, 32, 8, 11, 32, 3, 2, 1, 1, 1),
              (2, 16, 10, 9, 16, 5, 2, 2, 1, 1), (1, 16, 13, 12, 24, 3, 3, 2, 1, 1),
              (1, 24, 9, 14, 16, 4, 2, 1, 1, 1),
              # strip mode (a kernel row's kernel_w x channels values per tile step): LeNet's
              # 6 -> 16 5x5 (30 of 32 values), a ResNet stem (odd channels, stride 2, padding),
              # 120-value strips whose packing takes two channel blocks, an odd-channel stride 2
              (2, 6, 14, 14, 16, 5, 1, 0, 1, 1), (2, 3, 20, 21, 64, 7, 2, 3, 1, 1),
              (1, 40, 9, 10, 24, 3, 1, 1, 1, 1), (1, 5, 7, 40, 33, 5, 2, 2, 1, 1),
              # grad_weight's strips over image pairs: an odd batch, 105-value strips (8 blocks
              # of 16: two work items per kernel row), a padded 3x3 on rows of 9
              (3, 15, 9, 11, 20, 7, 1, 3, 1, 1), (2, 6, 13, 9, 16, 3, 1, 1, 1, 1)]


@pytest.mark.parametrize("case", WIDE_CONVS, ids=str)
def test_bfloat16_conv2d_against_float64(case):
    """conv2d and its backward in bfloat16: as accurate as torch's bfloat16 convolution against
    the float64 answer, forward and the three gradients, in the layouts of the float32 call
    (channels_last included), batch 0 and 1 included."""
    n, c, h, w, co, k, s, p, d, groups = case
    gen = torch.Generator().manual_seed(sum(case))
    x = torch.randn(n, c, h, w, generator=gen).bfloat16()
    wt = torch.randn(co, c // groups, k, k, generator=gen).bfloat16()
    b = torch.randn(co, generator=gen).bfloat16()
    geometry = ([s, s], [p, p], [d, d], groups)
    for layout in (torch.contiguous_format, torch.channels_last):
        xl, wl = x.contiguous(memory_format=layout), wt.contiguous(memory_format=layout)
        xd, wd, bd = (t.double().requires_grad_() for t in (x, wt, b))
        ref = torch.nn.functional.conv2d(xd, wd, bd, s, p, d, groups)
        ours = torch.ops.pyengine.conv2d(xl, wl, b, *geometry)
        theirs = torch.nn.functional.conv2d(xl, wl, b, s, p, d, groups)
        _compare("forward", ours, theirs, ref.detach(), torch.bfloat16)
        assert ours.stride() == torch.ops.pyengine.conv2d(xl.float(), wl.float(), b.float(),
                                                          *geometry).stride()
        g = torch.randn(ref.shape, generator=gen).bfloat16()
        ref.backward(g.double())
        mine = torch.ops.pyengine.conv2d_backward(g, xl, wl, *geometry, [True, True, True])
        torch_grads = torch.ops.aten.convolution_backward(g, xl, wl, [co], [s, s], [p, p],
                                                          [d, d], False, [0, 0], groups,
                                                          [True, True, True])
        g_scale = float(g.abs().max()) if g.numel() else 0.0
        for name, m, t, r in zip(("grad_input", "grad_weight", "grad_bias"), mine, torch_grads,
                                 (xd.grad, wd.grad, bd.grad)):
            _compare(name, m, t, r, torch.bfloat16,
                     floor=torch.finfo(torch.float32).eps * max(1.0, g_scale))


@pytest.mark.parametrize("geometry", [((1, 1), (2, 1), (2, 1)), ((2, 1), (0, 2), (3, 1))],
                         ids=str)
def test_bfloat16_conv2d_strips_with_rows_strided_or_dilated_against_float64(geometry):
    """Strip mode needs contiguous columns (dilation_w 1) only: rows dilated or strided apart
    (LeNet's 6 -> 16 5x5 otherwise), forward and the three gradients as accurate as torch's
    bfloat16 against float64."""
    stride, padding, dilation = (list(v) for v in geometry)
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(3, 6, 17, 13, generator=gen).bfloat16()
    wt = torch.randn(16, 6, 5, 5, generator=gen).bfloat16()
    b = torch.randn(16, generator=gen).bfloat16()
    xd, wd, bd = (t.double().requires_grad_() for t in (x, wt, b))
    ref = torch.nn.functional.conv2d(xd, wd, bd, stride, padding, dilation)
    args = (stride, padding, dilation, 1)
    _compare("forward", torch.ops.pyengine.conv2d(x, wt, b, *args),
             torch.nn.functional.conv2d(x, wt, b, stride, padding, dilation), ref.detach(),
             torch.bfloat16)
    g = torch.randn(ref.shape, generator=gen).bfloat16()
    ref.backward(g.double())
    mine = torch.ops.pyengine.conv2d_backward(g, x, wt, *args, [True, True, True])
    torch_grads = torch.ops.aten.convolution_backward(g, x, wt, [16], stride, padding, dilation,
                                                      False, [0, 0], 1, [True, True, True])
    for name, m, t, r in zip(("grad_input", "grad_weight", "grad_bias"), mine, torch_grads,
                             (xd.grad, wd.grad, bd.grad)):
        _compare(name, m, t, r, torch.bfloat16,
                 floor=torch.finfo(torch.float32).eps * float(g.abs().max()))


def test_bfloat16_conv2d_of_an_unbatched_input_against_float64():
    """A (C, H, W) input of 16+ channels (the AMX tiles' geometry on CPUs with them): forward
    and the three gradients as accurate as torch's bfloat16, shapes and layouts as float32's."""
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(20, 9, 12, generator=gen).bfloat16()
    wt = torch.randn(24, 20, 3, 3, generator=gen).bfloat16()
    b = torch.randn(24, generator=gen).bfloat16()
    for s in (1, 2):
        geometry = ([s, s], [1, 1], [1, 1], 1)
        xd, wd, bd = (t.double().requires_grad_() for t in (x, wt, b))
        ref = torch.nn.functional.conv2d(xd, wd, bd, s, 1)
        ours = torch.ops.pyengine.conv2d(x, wt, b, *geometry)
        _compare("forward", ours, torch.nn.functional.conv2d(x, wt, b, s, 1), ref.detach(),
                 torch.bfloat16)
        g = torch.randn(ref.shape, generator=gen).bfloat16()
        ref.backward(g.double())
        mine = torch.ops.pyengine.conv2d_backward(g, x, wt, *geometry, [True, True, True])
        torch_grads = torch.ops.aten.convolution_backward(
            g.unsqueeze(0), x.unsqueeze(0), wt, [24], [s, s], [1, 1], [1, 1], False, [0, 0], 1,
            [True, True, True])
        torch_grads = (torch_grads[0].squeeze(0), *torch_grads[1:])
        g_scale = float(g.abs().max())
        f32 = torch.ops.pyengine.conv2d_backward(g.float(), x.float(), wt.float(), *geometry,
                                                 [True, True, True])
        for name, m, t, r, f in zip(("grad_input", "grad_weight", "grad_bias"), mine,
                                    torch_grads, (xd.grad, wd.grad, bd.grad), f32):
            _compare(name, m, t, r, torch.bfloat16,
                     floor=torch.finfo(torch.float32).eps * max(1.0, g_scale))
            assert m.stride() == f.stride(), name


def _op_args_in(args, dtype):
    out = []
    for a in args:
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            a = _cast_keeping_strides(a.detach(), dtype)
        elif isinstance(a, (list, tuple)):
            a = type(a)(_cast_keeping_strides(v.detach(), dtype)
                        if isinstance(v, torch.Tensor) and v.is_floating_point() else v for v in a)
        out.append(a)
    return out


@pytest.mark.parametrize("dtype", LOW_DTYPES, ids=str)
@pytest.mark.parametrize("sample", [s for s in samples.all_samples(large=False)
                                    if not s.case.expect_error], ids=lambda s: s.id)
def test_operator_calls_keep_float32_layouts(sample, dtype):
    """Every operator call a sample makes (forward and backward operators, called directly), its
    floating tensors in a 16-bit dtype in the same layouts: the results' strides are those of the
    float32 call (test_layout.py holds those to torch's), whichever 16-bit path runs."""
    for c in samples.op_calls(sample.case):
        with torch.no_grad():
            low = c.op(*_op_args_in(c.args, dtype))
            f32 = c.op(*_op_args_in(c.args, torch.float32))
        low = low if isinstance(low, (tuple, list)) else (low,)
        f32 = f32 if isinstance(f32, (tuple, list)) else (f32,)
        for i, (a, b) in enumerate(zip(low, f32)):
            if a is None or b is None:
                assert a is None and b is None
                continue
            assert a.dtype == (dtype if b.is_floating_point() else b.dtype), (c.name, i)
            if a.numel() > 1:
                assert a.stride() == b.stride(), (c.name, i, a.stride(), b.stride())


def test_bfloat16_linear_is_bitwise_the_same_for_any_thread_count():
    """cpu/gemm_bf16.cpp splits C's columns into one range of whole vectors per thread (its
    panels, the last one narrower, differ with the thread count): one and several threads give
    the same bits, forward and backward."""
    import helpers

    gen = torch.Generator().manual_seed(5)
    x = torch.randn(70, 300, generator=gen).bfloat16()
    w = torch.randn(200, 300, generator=gen).bfloat16()
    g = torch.randn(70, 200, generator=gen).bfloat16()
    results = []
    for threads in (1, 2, 3):
        with helpers.set_num_threads(threads):
            results.append((torch.ops.pyengine.linear(x, w, None),
                            *torch.ops.pyengine.linear_backward(g, x, w, [True, True, False])[:2]))
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


@pytest.mark.parametrize("in_channels,kernel", [(40, 3), (6, 5)])  # tap by tap; strips
def test_bfloat16_conv2d_is_bitwise_the_same_for_any_thread_count(in_channels, kernel):
    """conv2d's bfloat16 forward and backward (on AMX tiles where the CPU has them:
    cpu/conv2d_bf16.cpp) sum each result in an order fixed by the shapes: one and several
    threads give the same bits."""
    import helpers

    gen = torch.Generator().manual_seed(6)
    x = torch.randn(3, in_channels, 13, 37, generator=gen).bfloat16()
    w = torch.randn(36, in_channels, kernel, kernel, generator=gen).bfloat16()
    b = torch.randn(36, generator=gen).bfloat16()
    g = torch.randn(3, 36, 13, 37, generator=gen).bfloat16()
    geometry = ([1, 1], [kernel // 2] * 2, [1, 1], 1)
    results = []
    for threads in (1, 2, 3):
        with helpers.set_num_threads(threads):
            results.append((torch.ops.pyengine.conv2d(x, w, b, *geometry),
                            *torch.ops.pyengine.conv2d_backward(g, x, w, *geometry,
                                                                [True, True, True])))
    for other in results[1:]:
        assert all(torch.equal(a, o) for a, o in zip(results[0], other))


# (batch, in, h, w, out, stride, padding) of 3x3 layers: rows of fewer than 16, 16 to 32 and
# several blocks of 32 columns, channels past whole blocks of 32 (and odd: x copied to NCHW),
# output channels past whole blocks of 16, stride 1, 2 and 3 (x copied to NCHW).
CHANNELS_LAST_GRAD_WEIGHT = [(2, 64, 11, 56, 128, 2, 1), (1, 40, 9, 70, 24, 2, 1),
                             (2, 32, 6, 45, 20, 2, 2), (3, 16, 7, 13, 32, 1, 1),
                             (1, 48, 5, 33, 16, 1, 0), (1, 17, 9, 23, 20, 2, 1),
                             (1, 32, 10, 20, 16, 3, 1)]


@pytest.mark.parametrize("case", CHANNELS_LAST_GRAD_WEIGHT, ids=str)
def test_bfloat16_conv2d_of_channels_last_is_the_contiguous_calls(case):
    """bfloat16 conv2d of channels_last x, weight and dY (on AMX tiles, read as they are:
    cpu/conv2d_bf16.cpp's pack_input, pack_weight through the weight's strides, pack_x_planes_cl,
    pack_dy_pairs_cl, add_pair_columns) gives the contiguous call's forward and gradients, bit for
    bit, in any mix of layouts; an Inf in a channels_last x lands where it does in the
    contiguous call (the float32 kernels take it)."""
    n, c, h, w, co, s, p = case
    gen = torch.Generator().manual_seed(sum(case))
    x = torch.randn(n, c, h, w, generator=gen).bfloat16()
    wt = torch.randn(co, c, 3, 3, generator=gen).bfloat16()
    b = torch.randn(co, generator=gen).bfloat16()
    geometry = ([s, s], [p, p], [1, 1], 1)
    out = torch.ops.pyengine.conv2d(x, wt, b, *geometry)
    g = torch.randn(out.shape, generator=gen).bfloat16()
    cl = torch.channels_last
    grad_input = torch.ops.pyengine.conv2d_backward(g, x, wt, *geometry, [True, False, False])[0]
    for x_, w_, g_ in ((x.contiguous(memory_format=cl), wt.contiguous(memory_format=cl), g),
                       (x, wt.contiguous(memory_format=cl), g.contiguous(memory_format=cl)),
                       (x.contiguous(memory_format=cl), wt, g.contiguous(memory_format=cl))):
        assert torch.equal(torch.ops.pyengine.conv2d(x_, w_, b, *geometry), out)
        assert torch.equal(torch.ops.pyengine.conv2d_backward(g_, x_, w_, *geometry,
                                                              [True, False, False])[0],
                           grad_input)

    def grads(x_, g_):
        return torch.ops.pyengine.conv2d_backward(g_, x_, wt, [s, s], [p, p], [1, 1], 1,
                                                  [False, True, True])[1:]

    want = grads(x, g)
    for x_, g_ in ((x.contiguous(memory_format=cl), g.contiguous(memory_format=cl)),
                   (x.contiguous(memory_format=cl), g), (x, g.contiguous(memory_format=cl))):
        for name, got, expected in zip(("grad_weight", "grad_bias"), grads(x_, g_), want):
            assert torch.equal(got, expected), (name, x_.stride(), g_.stride())
    x[n - 1, c // 2, h // 2, 3] = float("inf")
    want = grads(x, g)
    assert not want[0].isfinite().all()
    got = grads(x.contiguous(memory_format=cl), g.contiguous(memory_format=cl))
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0, equal_nan=True)


def _assert_non_finite_placed_as_float32(x, w, g, geometry):
    """The bfloat16 forward's and grad_input's Inf / NaN positions are those of the same calls
    in float32, and the case has both finite and non-finite results."""
    y = torch.ops.pyengine.conv2d(x, w, None, *geometry)
    y32 = torch.ops.pyengine.conv2d(x.float(), w.float(), None, *geometry)
    gx = torch.ops.pyengine.conv2d_backward(g, x, w, *geometry, [True, False, False])[0]
    gx32 = torch.ops.pyengine.conv2d_backward(g.float(), x.float(), w.float(), *geometry,
                                              [True, False, False])[0]
    for name, ours, f32 in (("forward", y, y32), ("grad_input", gx, gx32)):
        assert torch.equal(ours.isnan(), f32.isnan()), name
        assert torch.equal(ours.isinf(), f32.isinf()), name
        assert (~f32.isfinite()).any() and f32.isfinite().any(), name  # the case bites


def test_bfloat16_conv2d_with_non_finite_weights_places_inf_and_nan_as_float32():
    """A non-finite weight times the zero padding: torch's convolution has no such term, a
    convolution over a zero-padded copy would make it NaN. bfloat16 calls with such weights take
    the float32 kernels (cpu/conv2d.h): the forward's and grad_input's Inf / NaN positions are
    those of the same call in float32, on 16+ channels (where AMX tiles run, on CPUs with them)."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, 16, 6, 7, generator=gen).bfloat16()
    w = torch.randn(16, 16, 3, 3, generator=gen).bfloat16()
    w[3, 5, 0, 0] = float("inf")
    w[9, 2, 2, 1] = float("nan")
    g = torch.randn(2, 16, 6, 7, generator=gen).bfloat16()
    geometry = ([1, 1], [1, 1], [1, 1], 1)
    _assert_non_finite_placed_as_float32(x, w, g, geometry)
    # grad_weight and grad_bias read x over the padding and past the rows: an Inf in x or in
    # dY (finite weights) places its Inf / NaN as float32 does
    w = torch.randn(16, 16, 3, 3, generator=gen).bfloat16()
    for which in ("x", "dY"):
        xb, gb = x.clone(), g.clone()
        (xb if which == "x" else gb)[1, 4, 0, 6] = float("inf")
        ours = torch.ops.pyengine.conv2d_backward(gb, xb, w, *geometry, [False, True, True])[1:]
        f32 = torch.ops.pyengine.conv2d_backward(gb.float(), xb.float(), w.float(), *geometry,
                                                 [False, True, True])[1:]
        for name, o, f in zip(("grad_weight", "grad_bias"), ours, f32):
            assert torch.equal(o.isnan(), f.isnan()), (which, name)
            assert torch.equal(o.isinf(), f.isinf()), (which, name)
        assert (~f32[0].isfinite()).any() and f32[0].isfinite().any(), which


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_bfloat16_conv2d_finds_a_non_finite_weight_anywhere(where, layout):
    """The check that sends a non-finite weight to the float32 kernels (all_finite_bf16, 32
    values a step, then a masked tail) sees every element: one Inf at the weight's first, a
    middle or its last element (17 x 16 x 3 x 3 = 2448 values: a tail of 16), in either layout,
    places the forward's and grad_input's Inf / NaN as float32 does."""
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(2, 16, 5, 6, generator=gen).bfloat16()
    w = torch.randn(17, 16, 3, 3, generator=gen).bfloat16()
    index = {"first": (0, 0, 0, 0), "middle": (8, 7, 1, 2), "last": (16, 15, 2, 2)}[where]
    w[index] = float("inf")
    if layout == "channels_last":
        w = w.contiguous(memory_format=torch.channels_last)
    g = torch.randn(2, 17, 5, 6, generator=gen).bfloat16()
    geometry = ([1, 1], [1, 1], [1, 1], 1)
    _assert_non_finite_placed_as_float32(x, w, g, geometry)


@pytest.mark.parametrize("case", [(5, 6, 14, 14, 5, 1, 0), (3, 20, 9, 23, 3, 2, 1),
                                  (2, 16, 11, 13, 3, 1, 1)], ids=str)
def test_bfloat16_conv2d_of_16_channels_or_fewer_sums_as_wider_layers(case):
    """On AMX tiles a product of 16 output columns or fewer takes 4 segments x 1 block of
    channels per step (cpu/amx.h's step_quad) instead of 2 x 2 with a block of zeros, summing
    each result over the same steps: a layer's first 16 output channels (forward; a strip, a
    strided tap-by-tap layer, a padded one) and grad_input's first 16 input channels are bitwise
    those of the same layer with a 17th."""
    if pyengine._C.cpu_isa()["gemm_bf16"] != "amx_bf16":
        pytest.skip("no AMX tiles at this level: conv2d's bfloat16 runs on float32 copies, "
                    "whose kernels differ with the channel count")
    n, c, h, w, k, s, p = case
    gen = torch.Generator().manual_seed(sum(case))
    geometry = ([s, s], [p, p], [1, 1], 1)
    x = torch.randn(n, c, h, w, generator=gen).bfloat16()
    wt = torch.randn(17, c, k, k, generator=gen).bfloat16()
    b = torch.randn(17, generator=gen).bfloat16()
    y17 = torch.ops.pyengine.conv2d(x, wt, b, *geometry)
    y16 = torch.ops.pyengine.conv2d(x, wt[:16].contiguous(), b[:16].contiguous(), *geometry)
    _same_bits_or_both_nan(y16, y17[:, :16].contiguous(), "forward")
    x17 = torch.randn(n, 17, h, w, generator=gen).bfloat16()
    w17 = torch.randn(c, 17, k, k, generator=gen).bfloat16()
    g = torch.randn(torch.ops.pyengine.conv2d(x17, w17, None, *geometry).shape,
                    generator=gen).bfloat16()
    gi17 = torch.ops.pyengine.conv2d_backward(g, x17, w17, *geometry, [True, False, False])[0]
    gi16 = torch.ops.pyengine.conv2d_backward(g, x17[:, :16].contiguous(),
                                              w17[:, :16].contiguous(), *geometry,
                                              [True, False, False])[0]
    _same_bits_or_both_nan(gi16, gi17[:, :16].contiguous(), "grad_input")


def test_bfloat16_fused_block_on_tiles_with_overlapping_windows_against_float64():
    """The fused block on AMX tiles (LeNet's 6 -> 16 5x5, where the CPU has them) with pooling
    windows that overlap (3x3, stride 2) and padding: its bfloat16 gradient image then holds
    sums rounded once. Forward and gradients as accurate as torch's bfloat16 chain against
    float64."""
    gen = torch.Generator().manual_seed(13)
    x = torch.randn(4, 6, 16, 15, generator=gen).bfloat16()
    w = (torch.randn(16, 6, 5, 5, generator=gen) * 0.3).bfloat16()
    b = torch.randn(16, generator=gen).bfloat16()
    from pyengine.fused import conv2d_relu_max_pool2d

    def chain(F, xs, ws, bs):
        return F.max_pool2d(F.relu(F.conv2d(xs, ws, bs, padding=1)), 3, 2)

    xd, wd, bd = (t.double().requires_grad_() for t in (x, w, b))
    ref = chain(torch.nn.functional, xd, wd, bd)
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    ours = conv2d_relu_max_pool2d(*leaves, padding=1, pool_kernel_size=3, pool_stride=2)
    torch_leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    theirs = chain(torch.nn.functional, *torch_leaves)
    _compare("forward", ours, theirs, ref.detach(), torch.bfloat16)
    g = torch.randn(ref.shape, generator=gen).bfloat16()
    for out in (ref, ours, theirs):
        out.backward(g.to(out.dtype))
    for name, m, t, r in zip(("grad_input", "grad_weight", "grad_bias"), leaves, torch_leaves,
                             (xd, wd, bd)):
        _compare(name, m.grad, t.grad, r.grad, torch.bfloat16,
                 floor=torch.finfo(torch.float32).eps * float(g.abs().max()))


def test_bfloat16_conv2d_strips_place_inf_and_nan_as_float32():
    """In strip mode a tile step's last values run past the strip into the next pixels', which
    zero weights multiply: 0 x Inf would be a NaN torch does not have. An input (forward) or dY
    (grad_input) holding an Inf or NaN takes the tap-by-tap steps, an x holding one takes the
    float32 kernels for grad_weight (whose strips meet zero rows of dY): the Inf / NaN positions
    are those of the same call in float32, and the finite results as accurate."""
    gen = torch.Generator().manual_seed(8)
    for c, co, k, p in ((6, 16, 5, 0), (16, 16, 3, 1)):  # forward strips; grad_input's too
        x = torch.randn(2, c, 9, 12, generator=gen).bfloat16()
        w = torch.randn(co, c, k, k, generator=gen).bfloat16()
        geometry = ([1, 1], [p, p], [1, 1], 1)
        x[1, c - 1, 4, 3] = float("inf")  # next to pixel (4, 2)'s strip, inside others'
        x[0, 0, 2, 7] = float("nan")
        y = torch.ops.pyengine.conv2d(x, w, None, *geometry)
        y32 = torch.ops.pyengine.conv2d(x.float(), w.float(), None, *geometry)
        g = torch.randn(y.shape, generator=gen).bfloat16()
        g[0, co - 1, 3, 1] = float("-inf")
        gx = torch.ops.pyengine.conv2d_backward(g, x, w, *geometry, [True, False, False])[0]
        gx32 = torch.ops.pyengine.conv2d_backward(g.float(), x.float(), w.float(), *geometry,
                                                  [True, False, False])[0]
        # grad_weight: an Inf / NaN in x takes the float32 kernels; one in dY stays on tiles
        gw = torch.ops.pyengine.conv2d_backward(g, x, w, *geometry, [False, True, False])[1]
        gw32 = torch.ops.pyengine.conv2d_backward(g.float(), x.float(), w.float(), *geometry,
                                                  [False, True, False])[1]
        xf = torch.randn(x.shape, generator=gen).bfloat16()
        gwd = torch.ops.pyengine.conv2d_backward(g, xf, w, *geometry, [False, True, False])[1]
        gwd32 = torch.ops.pyengine.conv2d_backward(g.float(), xf.float(), w.float(), *geometry,
                                                   [False, True, False])[1]
        for name, ours, f32 in (("forward", y, y32), ("grad_input", gx, gx32),
                                ("grad_weight", gw, gw32), ("grad_weight, Inf in dY", gwd, gwd32)):
            assert torch.equal(ours.isnan(), f32.isnan()), (c, name)
            assert torch.equal(ours.isinf(), f32.isinf()), (c, name)
            assert (~f32.isfinite()).any() and f32.isfinite().any(), (c, name)
            finite = f32.isfinite()
            scale = float(f32[finite].abs().max())
            assert float((ours.float() - f32)[finite].abs().max()) <= 2 ** -7 * scale, (c, name)


# ---- bfloat16 read and written in place: the float32 kernel's bits, one rounding -------------
#
# The activations and the fused convolution block read bfloat16 as they go (cpu/loops.h's
# Storage; the direct and batch-innermost convolutions widen x where they copy it), and 16-bit
# copies of every other CPU operator are made by pyengine's own conversion loops (cpu/
# convert.h): either way a bfloat16 call must give exactly what the float32 kernel gives on
# float32 copies, rounded once to nearest even as torch rounds.

def _every_pattern(dtype):
    """All 65536 bit patterns of a 16-bit dtype: zeros, subnormals, normals, infinities, NaNs."""
    return torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype)


def _same_bits_or_both_nan(ours, expected, what):
    assert ours.dtype == expected.dtype and expected.dtype in LOW_DTYPES, what
    nan = expected.isnan()
    assert torch.equal(ours.isnan(), nan), f"{what}: NaN positions differ"
    differ = (ours.view(torch.int16) != expected.view(torch.int16)) & ~nan
    assert not differ.any(), (
        f"{what}: {int(differ.sum())} results differ, e.g. {ours[differ][:4].tolist()} against "
        f"{expected[differ][:4].tolist()}")


_ACTIVATIONS = [  # (name, forward, backward op and what it takes besides grad_output)
    ("relu", lambda x: pyengine.functional.relu(x), "relu_backward", "result", ()),
    ("sigmoid", lambda x: pyengine.functional.sigmoid(x), "sigmoid_backward", "result", ()),
    ("tanh", lambda x: pyengine.functional.tanh(x), "tanh_backward", "result", ()),
    # Slopes whose products fall on halfway points between bfloat16 values (1 + 2^-8 of a
    # bfloat16 is one), beyond the range (overflow to Inf), and a plain one.
    ("leaky_relu 1+2^-8", lambda x: pyengine.functional.leaky_relu(x, 1 + 2 ** -8),
     "leaky_relu_backward", "input", (1 + 2 ** -8,)),
    ("leaky_relu 3e38", lambda x: pyengine.functional.leaky_relu(x, 3e38),
     "leaky_relu_backward", "input", (3e38,)),
    ("leaky_relu 0.01", lambda x: pyengine.functional.leaky_relu(x, 0.01),
     "leaky_relu_backward", "input", (0.01,)),
]


@pytest.mark.parametrize("name,forward,backward,saved,extra", _ACTIVATIONS,
                         ids=[a[0] for a in _ACTIVATIONS])
def test_bfloat16_activations_are_the_float32_kernel_rounded_once(name, forward, backward,
                                                                  saved, extra):
    x = _every_pattern(torch.bfloat16)
    y = forward(x)
    _same_bits_or_both_nan(y, forward(x.float()).to(torch.bfloat16), f"{name} forward")
    # The backward op on every pattern (as its saved result or input) against gradients of
    # varied magnitudes, the same 16-bit values on both sides.
    g = (torch.randn(x.shape, generator=torch.Generator().manual_seed(3)) * 1e3).to(torch.bfloat16)
    s = y if saved == "result" else x
    op = getattr(torch.ops.pyengine, backward)
    _same_bits_or_both_nan(op(g, s, *extra), op(g.float(), s.float(), *extra).to(torch.bfloat16),
                           f"{name} backward")


def test_bfloat16_copies_round_as_torch_rounds():
    # mse_loss (reduction='none') runs on float32 copies made by cpu/convert.h's loops: every
    # bfloat16 pattern widened, squares and differences (ties, overflow, NaN) rounded back.
    x = _every_pattern(torch.bfloat16)
    for b in (0.0, 1.0, -3.0078125, float("inf"), float("nan")):
        target = torch.full_like(x, b)
        ours = pyengine.functional.mse_loss(x, target, reduction="none")
        expected = torch.nn.functional.mse_loss(x.float(), target.float(),
                                                reduction="none").to(torch.bfloat16)
        _same_bits_or_both_nan(ours, expected, f"mse_loss against {b}")


def _check_float16_copies():
    # Widened and narrowed back (max_pool2d of a 1x1 window, on float32 copies): every pattern
    # returns as it was (NaNs as NaNs).
    x = _every_pattern(torch.float16)
    same = pyengine.functional.max_pool2d(x.view(1, 1, 256, 256), 1).flatten()
    _same_bits_or_both_nan(same, x, "widened and narrowed")
    # Narrowed from float32 results (mse_loss, reduction='none'): squares and differences of
    # every pattern against a few targets give ties, carries into the exponent, subnormal
    # results, overflow to Inf and NaN; torch's conversion of the float32 results is the answer.
    for b in (0.0, 1.0, -3.0078125, 6.1e-5, float("inf"), float("nan")):
        target = torch.full_like(x, b)
        ours = pyengine.functional.mse_loss(x, target, reduction="none")
        expected = torch.nn.functional.mse_loss(x.float(), target.float(),
                                                reduction="none").to(torch.float16)
        _same_bits_or_both_nan(ours, expected, f"mse_loss against {b}")


@pytest.mark.parametrize("level", ["this CPU's", "avx2", "default"])
def test_float16_copies_convert_as_torch_converts(level):
    """float16 operators on float32 copies convert with cpu/convert.h's loops (AVX-512's or
    F16C's conversion instructions, c10's on the baseline): bitwise torch's conversions, at
    every instruction-set level."""
    if level == "this CPU's":
        _check_float16_copies()
        return
    import helpers

    helpers.run_with_cpu_isa(level, "import test_low_precision as t\n"
                             "t._check_float16_copies()\n"
                             "print('ok')\n")


@pytest.mark.parametrize("in_channels,out_channels,size,batch,channels_last,tiles", [
    (1, 6, 32, 5, False, False),    # LeNet's conv1 block: grad_weight image by image (direct)
    (6, 16, 14, 17, False, True),   # LeNet's conv2 block: grad_input too (batch-innermost)
    (6, 16, 14, 300, False, True),  # the same over two batch chunks (256 + 44)
    (3, 5, 11, 2, True, False),     # another geometry and layout
])
def test_bfloat16_fused_convolution_block_is_the_float32_kernel_rounded_once(
        in_channels, out_channels, size, batch, channels_last, tiles):
    """The fused block in bfloat16: its backward is the float32 kernel on float32 copies,
    rounded once; so is its forward, except where the convolution takes AMX tiles (`tiles`:
    LeNet's conv2 geometry, on CPUs at level amx_bf16; cpu/conv2d_bf16.cpp), whose float32 sums
    are pooled and rounded once: there the pooled values are bitwise those of pyengine's own
    bfloat16 conv2d (the same tiles, rounded per element), relu and max-pooled, each index
    points at a maximum of that conv2d's output, and the gradients are bitwise conv2d_backward's
    in bfloat16 on the unpooled gradient. (At level avx512_bf16 the tile-less path runs for
    every case, these blocks' narrow convolutions having no dot-product kernels:
    test_bfloat16_linear_and_conv2d_on_the_lower_levels_too.)"""
    gen = torch.Generator().manual_seed(in_channels * 100 + size)
    x = torch.randn(batch, in_channels, size, size, generator=gen).to(torch.bfloat16)
    w = (torch.randn(out_channels, in_channels, 5, 5, generator=gen) * 0.3).to(torch.bfloat16)
    b = torch.randn(out_channels, generator=gen).to(torch.bfloat16)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    from pyengine.fused import conv2d_relu_max_pool2d

    on_tiles = tiles and pyengine._C.cpu_isa()["gemm_bf16"] == "amx_bf16"
    geometry = ([1, 1], [0, 0], [1, 1], 1, [2, 2], [2, 2], [0, 0], [1, 1], False)
    if on_tiles:
        y, indices = torch.ops.pyengine.conv2d_relu_max_pool2d(x, w, b, *geometry)
        conv = torch.ops.pyengine.conv2d(x, w, b, *geometry[:4])
        expected = torch.nn.functional.max_pool2d(conv, 2).relu()
        _same_bits_or_both_nan(y, expected, "forward on tiles")
        picked = conv.flatten(2).gather(2, indices.flatten(2)).view_as(y)
        _same_bits_or_both_nan(torch.maximum(picked, torch.zeros_like(picked)), y,
                               "the values the indices point at")
        g = torch.randn(y.shape, generator=torch.Generator().manual_seed(7)).to(torch.bfloat16)
        ours = torch.ops.pyengine.conv2d_relu_max_pool2d_backward(g, y, indices, x, w, *geometry,
                                                                  [True, True, True])
        # the backward: conv2d_backward's bfloat16 kernels (tiles) on the unpooled gradient,
        # exact in bfloat16 (relu's step, then the values moved to their indices)
        masked = torch.where(y > 0, g, torch.zeros_like(g))
        unpooled = torch.ops.pyengine.max_pool2d_backward(
            masked, conv, indices, [2, 2], [2, 2], [0, 0], [1, 1], False)
        expected = torch.ops.pyengine.conv2d_backward(unpooled, x, w, *geometry[:4],
                                                      [True, True, True])
        for i, (o, e) in enumerate(zip(ours, expected)):
            _same_bits_or_both_nan(o, e, f"gradient {i}")
        return

    def run(dtype):
        # (LeNet's first block wants no grad_input: the path that unpools image by image.)
        xs = x.to(dtype, copy=True).requires_grad_(in_channels > 1)
        ws, bs = (t.to(dtype, copy=True).requires_grad_() for t in (w, b))
        out = conv2d_relu_max_pool2d(xs, ws, bs, pool_kernel_size=2)
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
        g = g.to(torch.bfloat16).to(dtype)
        out.backward(g)
        return [out.detach()] + [t.grad for t in (xs, ws, bs) if t.requires_grad]

    for i, (ours, f32) in enumerate(zip(run(torch.bfloat16), run(torch.float32))):
        _same_bits_or_both_nan(ours, f32.to(torch.bfloat16), f"result {i}")
