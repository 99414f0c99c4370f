"""Window arguments near 2^62 and 2^63 - 1 in conv2d, max_pool2d and their backward ops.

Every size pyengine computes from them (dilation * (kernel - 1) + 1, input + 2 * padding, the
output sizes and their product) is checked: a call either gives the exact output shape that
Python's unbounded integers give, or raises a RuntimeError that names the argument and shows its
value, with no negative or wrapped number in the message. Through pyengine.functional,
torch.ops.pyengine.* and on the meta device (the shape-only kernels), fake tensors included.
"""
import re

import pytest
import torch
import torch.nn.functional as F

import helpers
import pyengine.functional as PF

P = torch.ops.pyengine
MAX_EXTENT = 2**62  # csrc/common/geometry.h: kMaxExtent
HUGE = [2**62 - 1, 2**62, 2**62 + 1, 2**63 - 1]


def assert_clean(message, allowed):
    """No negative number in the message, and no large one that is not an exact value."""
    assert not re.search(r"-\d", message), message
    for n in map(int, re.findall(r"\d+", message)):
        assert n < 2**32 or n in allowed, (n, message)


def vary(default, axis, value):
    out = list(default)
    out[axis] = value
    return out


# ---- The reference: exact integers, checks in pyengine's order ------------------------------

def conv_expect(in_hw, k_hw, stride, padding, dilation):
    """("ok", [out_h, out_w]) or ("error", fragment the message must hold), plus every exact
    value a message may show."""
    effs = [d * (k - 1) + 1 for k, d in zip(k_hw, dilation)]
    padded = [n + 2 * p for n, p in zip(in_hw, padding)]
    exact = set(effs + padded)
    if any(e >= MAX_EXTENT for e in effs):
        return "error", f"dilation={dilation}", exact
    if any(p >= MAX_EXTENT for p in padded):
        return "error", f"padding={padding}", exact
    if any(p < e for p, e in zip(padded, effs)):
        return "error", "to fit in the padded input", exact
    out = [(p - e) // s + 1 for p, e, s in zip(padded, effs, stride)]
    return "ok", out, exact | set(out)


def pool_expect(in_hw, kernel, stride, padding, dilation, ceil):
    effs = [d * (k - 1) + 1 for k, d in zip(kernel, dilation)]
    padded = [n + 2 * p for n, p in zip(in_hw, padding)]
    exact = set(effs + padded)
    for e, p in zip(effs, padding):
        if e >= MAX_EXTENT:
            return "error", f"kernel_size={kernel} with dilation={dilation} overflows", exact
        if p > e // 2:
            return "error", f"padding={padding}", exact
    if any(p >= MAX_EXTENT for p in padded):
        return "error", f"padding={padding}", exact
    if any(p < e for p, e in zip(padded, effs)):
        return "error", "to fit in the padded input", exact
    out = []
    for n, pd, e, s, p in zip(in_hw, padded, effs, stride, padding):
        span = pd - e
        o = (-(-span // s) if ceil else span // s) + 1
        if ceil and (o - 1) * s >= n + p:
            o -= 1
        out.append(o)
    return "ok", out, exact | set(out)


def check(call, expect, what):
    """Runs call(); with an "ok" expectation returns its result, else checks the error."""
    kind, detail, exact = expect
    if kind == "ok":
        return call()
    with pytest.raises(RuntimeError) as info:
        call()
    message = str(info.value)
    assert detail in message, (what, message)
    assert_clean(message, exact | set(HUGE) | {MAX_EXTENT})
    return None


# ---- conv2d, conv2d_backward ----------------------------------------------------------------

X_SHAPE, W_SHAPE = (1, 2, 5, 7), (3, 2, 3, 2)


def conv_calls(x, w, stride, padding, dilation, groups, out_hw):
    g = torch.ones(1, 3, *out_hw, device=x.device) if out_hw else torch.ones(1, 3, 1, 1,
                                                                            device=x.device)
    calls = {
        "ops": lambda: P.conv2d(x, w, None, stride, padding, dilation, groups),
        "ops backward": lambda: P.conv2d_backward(g, x, w, stride, padding, dilation, groups,
                                                  [True, True, True]),
    }
    if x.device.type != "meta":
        calls["functional"] = lambda: PF.conv2d(x, w, None, stride, padding, dilation, groups)
    return calls


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("arg", ["stride", "padding", "dilation"])
def test_conv2d_window_arguments(device, arg):
    x = torch.randn(X_SHAPE, device=device)
    w = torch.randn(W_SHAPE, device=device)
    defaults = dict(stride=[1, 1], padding=[0, 0], dilation=[1, 1])
    for axis in (0, 1):
        for value in HUGE:
            a = dict(defaults, **{arg: vary(defaults[arg], axis, value)})
            expect = conv_expect(X_SHAPE[2:], W_SHAPE[2:], a["stride"], a["padding"],
                                 a["dilation"])
            out_hw = expect[1] if expect[0] == "ok" else None
            for name, call in conv_calls(x, w, a["stride"], a["padding"], a["dilation"], 1,
                                         out_hw).items():
                result = check(call, expect, (name, a))
                if result is None:
                    continue
                first = result[0] if isinstance(result, tuple) else result
                if name == "ops backward":
                    assert first.shape == x.shape
                    continue
                assert list(first.shape) == [1, 3, *out_hw], (name, a)
                if device == "cpu":  # torch takes a huge stride too
                    helpers.assert_close(first, F.conv2d(x, w, None, a["stride"], a["padding"],
                                                         a["dilation"]))


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_conv2d_groups(device):
    x = torch.randn(X_SHAPE, device=device)
    for groups in HUGE + [0, -1, -(2**63)]:
        for name, call in conv_calls(x, torch.randn(W_SHAPE, device=device), [1, 1], [0, 0],
                                     [1, 1], groups, None).items():
            with pytest.raises(RuntimeError) as info:
                call()
            message = str(info.value)
            assert f"groups={groups}" in message, (name, message)
            if groups > 0:
                assert "divisible by groups" in message
                assert_clean(message, set(HUGE))
        # no output channels: nothing to divide, but weight.size(1) * groups must fit
        w = torch.randn(0, 2, 3, 2, device=device)
        for name, call in conv_calls(x, w, [1, 1], [0, 0], [1, 1], groups, None).items():
            with pytest.raises(RuntimeError) as info:
                call()
            message = str(info.value)
            assert f"groups={groups}" in message, (name, message)
            if groups > 0 and 2 * groups > 2**63 - 1:
                assert "weight.size(1) * groups, do not fit in int64" in message
                assert_clean(message, set(HUGE))
            elif groups > 0:  # fits: the channel count it implies, exactly
                assert f"to have {2 * groups} channels" in message
                assert_clean(message, set(HUGE) | {2 * groups})


def test_conv2d_huge_kernel_on_meta():
    """Kernel sizes come from the weight's shape: a meta weight can have any."""
    x = torch.randn(1, 1, 5, 7, device="meta")
    w = torch.empty(1, 1, 2**60, 1, device="meta")
    for dilation, fragment in [([4, 1], "to fit in the padded input"),
                               ([5, 1], "dilation=[5, 1] overflows"),
                               ([2**62, 1], f"dilation=[{2**62}, 1] overflows")]:
        expect = conv_expect([5, 7], [2**60, 1], [1, 1], [0, 0], dilation)
        assert expect[0] == "error"
        with pytest.raises(RuntimeError) as info:
            P.conv2d(x, w, None, [1, 1], [0, 0], dilation, 1)
        assert fragment in str(info.value)
        assert_clean(str(info.value), expect[2] | {2**60, 2**62, MAX_EXTENT})


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_conv2d_output_too_large_to_count(device):
    """Padding that fits, but an output whose element count does not."""
    x = torch.randn(X_SHAPE, device=device)
    w = torch.randn(W_SHAPE, device=device)
    padding = [2**40, 2**40]
    _, out_hw, exact = conv_expect(X_SHAPE[2:], W_SHAPE[2:], [1, 1], padding, [1, 1])
    assert 3 * out_hw[0] * out_hw[1] > 2**63 - 1
    for call in conv_calls(x, w, [1, 1], padding, [1, 1], 1, None).values():
        with helpers.raises(RuntimeError, f"padding={padding}",
                            f"output of shape [1, 3, {out_hw[0]}, {out_hw[1]}]",
                            "multiply beyond int64"):
            call()


# ---- max_pool2d, max_pool2d_with_indices, max_pool2d_backward -------------------------------

POOL_SHAPE = (2, 3, 6, 5)


def pool_calls(x, k, s, p, d, ceil, out_hw):
    out_shape = (*POOL_SHAPE[:2], *(out_hw or (1, 1)))
    g = torch.ones(out_shape, device=x.device)
    idx = torch.zeros(out_shape, dtype=torch.long, device=x.device)
    calls = {
        "ops": lambda: P.max_pool2d(x, k, s, p, d, ceil),
        "ops with indices": lambda: P.max_pool2d_with_indices(x, k, s, p, d, ceil),
        "ops backward": lambda: P.max_pool2d_backward(g, x, idx, k, s, p, d, ceil),
    }
    if x.device.type != "meta":
        calls["functional"] = lambda: PF.max_pool2d(x, k, s, p, d, ceil)
        calls["functional with indices"] = lambda: PF.max_pool2d(x, k, s, p, d, ceil,
                                                                 return_indices=True)
    return calls


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("arg", ["kernel_size", "stride", "padding", "dilation"])
@pytest.mark.parametrize("ceil", [False, True])
def test_max_pool2d_window_arguments(device, arg, ceil):
    x = torch.randn(POOL_SHAPE, device=device)
    defaults = dict(kernel_size=[2, 3], stride=[1, 2], padding=[1, 0], dilation=[1, 1])
    for axis in (0, 1):
        for value in HUGE:
            a = dict(defaults, **{arg: vary(defaults[arg], axis, value)})
            k, s, p, d = a["kernel_size"], a["stride"], a["padding"], a["dilation"]
            expect = pool_expect(POOL_SHAPE[2:], k, s, p, d, ceil)
            out_hw = expect[1] if expect[0] == "ok" else None
            for name, call in pool_calls(x, k, s, p, d, ceil, out_hw).items():
                result = check(call, expect, (name, a, ceil))
                if result is None:
                    continue
                first = result[0] if isinstance(result, tuple) else result
                if name == "ops backward":
                    assert first.shape == x.shape
                    continue
                assert list(first.shape) == [*POOL_SHAPE[:2], *out_hw], (name, a, ceil)
                if device == "cpu":
                    # a stride past the padded input leaves one window, as any such stride does
                    assert out_hw[axis] == 1 and arg == "stride"
                    ref = F.max_pool2d(x, k, vary(s, axis, 1000), p, d, ceil)
                    helpers.assert_close(first, ref, rtol=0, atol=0)


def test_symbolic_shapes_check_the_concrete_arguments():
    """Under dynamic shapes (fake tensors with symbolic sizes) the input's size is unknown, yet
    2 * padding alone must already stay below 2^62; a valid call still traces symbolically."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import (DimDynamic, ShapeEnv,
                                                       StatelessSymbolicContext)

    mode = FakeTensorMode(shape_env=ShapeEnv())
    ctx = StatelessSymbolicContext(dynamic_sizes=[DimDynamic.DYNAMIC] * 4)
    x = mode.from_tensor(torch.randn(X_SHAPE), symbolic_context=ctx)
    w = mode.from_tensor(torch.randn(W_SHAPE))
    with mode:
        assert isinstance(x.shape[2], torch.SymInt)
        for padding in ([2**62, 0], [0, 2**63 - 1]):
            with pytest.raises(RuntimeError) as info:
                P.conv2d(x, w, None, [1, 1], padding, [1, 1], 1)
            assert f"padding={padding}" in str(info.value) and "overflows" in str(info.value)
        with helpers.raises(RuntimeError, f"kernel_size=[{2**63 - 1}, 2] with dilation=[1, 1] "
                            "overflows"):
            P.max_pool2d(x, [2**63 - 1, 2], [1, 1], [0, 0], [1, 1], False)
        y = P.conv2d(x, w, None, [2**63 - 1, 1], [1, 0], [1, 1], 1)
        assert isinstance(y.shape[3], torch.SymInt)
        z = P.max_pool2d(x, [2, 2], [2**63 - 1, 2**62], [1, 1], [1, 1], True)
        assert z.dim() == 4


# ---- linear -----------------------------------------------------------------------------------

def test_linear_output_too_large_to_count():
    x = torch.empty(2**40, 4, device="meta")
    w = torch.empty(2**30, 4, device="meta")
    for call in (lambda: P.linear(x, w, None), lambda: PF.linear(x, w),
                 lambda: P.linear_backward(torch.empty(1, device="meta"), x, w,
                                           [True, True, True])):
        with helpers.raises(RuntimeError, "pyengine.linear", f"output of shape [{2**40}, {2**30}]",
                            "multiply beyond int64"):
            call()
