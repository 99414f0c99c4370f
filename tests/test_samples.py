"""Every operator on its samples (tests/samples.py): against torch, float64 gradcheck, and
torch.library.opcheck on its forward and backward operators.

Edge cases and bad input are tested per op (tests/test_conv2d.py, ...); the random lane is
tests/test_fuzz.py; CUDA against the CPU on the same samples is tests/test_cuda.py.
"""
import math

import pytest
import torch

import fuzz_configs
import helpers
import samples
from differential import CheckFailed, call, check
from fuzz_configs import materialize, pyengine_function, torch_function

P = torch.ops.pyengine
# torch.library.opcheck runs on every operator, forward and backward alike, on calls from its
# samples: each distinct kind of call (call_signature), and at least this many (~0.03-0.3 s
# each on the 2-core machine).
OPCHECK_MIN = 8
OPERATORS = sorted(n.split("::")[1] for n in torch._C._dispatch_get_all_op_names()
                   if n.startswith("pyengine::"))


def sample_ids(sample):
    return sample.id


def _primary(out):
    return out[0] if isinstance(out, tuple) else out


@helpers.devices
@pytest.mark.parametrize("sample", samples.all_samples(), ids=sample_ids)
def test_matches_torch(sample, device):
    """Forward and gradients against torch's function (torch.nn.functional's, or the calls a
    fused op replaces) on the same values (differential.py),
    the backward operator called directly too; and the output has the strides torch's function
    gives for the same inputs (channels_last in, channels_last out; csrc/common/layout.h)."""
    try:
        check(sample.case, device)
    except CheckFailed as exc:
        raise AssertionError(f"{sample}\n{exc}") from None
    if sample.case.expect_error or not torch_accepts(sample):
        return
    with torch.no_grad():
        ours = call(pyengine_function(sample.op), *materialize(sample.case, device=device))
        theirs = call(torch_function(sample.op), *materialize(sample.case))
    if _primary(theirs).numel():  # (an empty tensor's strides say nothing)
        helpers.assert_same_strides(_primary(ours), _primary(theirs), str(sample))


def test_a_value_refused_runs_on_the_cpu_for_cuda():
    """binary_cross_entropy's special-values sample is refused for a value inside a tensor, which
    CUDA reports as a device-side assert that poisons the process (seen on the first GPU run):
    check() runs it on the CPU for CUDA too (differential.refused_for_a_value)."""
    import differential

    refused = [s.id for s in samples.all_samples()
               if s.case.expect_error and differential.refused_for_a_value(s.case)]
    assert "binary_cross_entropy-21" in refused, refused


def torch_accepts(sample):
    """Whether torch's own function takes the call: not max_pool2d padding beyond half the
    kernel, which pyengine allows up to half the dilated kernel (differential.py pads by hand)."""
    p = sample.case.params
    return sample.op != "max_pool2d" or fuzz_configs.torch_pads(p["kernel"], p["padding"])


# ---- float64 gradcheck -------------------------------------------------------------------------

def _finite_outputs(out):
    """The floating outputs, with those that are not finite at the unperturbed input (a max-pool
    window with no input element is -inf; the mean over nothing is NaN) replaced by 0: they are
    constants, and gradcheck's finite differences of them would be NaN."""
    outs = out if isinstance(out, tuple) else (out,)
    return tuple(o.masked_fill(~o.detach().isfinite(), 0) for o in outs if o.is_floating_point())


def _differentiable(sample, device):
    """(f, leaves): the sample's call as a function of its differentiable inputs (those that
    require grad and hold an element), in float64 on smooth values (samples.gradcheck_case)."""
    case = samples.gradcheck_case(sample.case)
    args, kwargs = materialize(case, device=device)
    fn = pyengine_function(case.op)
    where = [(i, a) for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
    where += list(kwargs.items())
    where = [(k, t) for k, t in where
             if isinstance(t, torch.Tensor) and t.requires_grad and t.numel()]

    def f(*leaves):
        a, kw = list(args), dict(kwargs)
        for (key, _), leaf in zip(where, leaves):
            if isinstance(key, int):
                a[key] = leaf
            else:
                kw[key] = leaf
        return _finite_outputs(call(fn, a, kw))

    if not where:  # every differentiable input is empty: its gradient is empty too
        out = _finite_outputs(call(fn, args, kwargs))[0]
        leaves = [t for t in list(args) + list(kwargs.values())
                  if isinstance(t, torch.Tensor) and t.requires_grad]
        grads = torch.autograd.grad(out.sum(), leaves, allow_unused=True)
        for leaf, grad in zip(leaves, grads):
            assert grad is None or grad.shape == leaf.shape
        return None, ()
    return f, tuple(t for _, t in where)


@helpers.devices
@pytest.mark.parametrize("sample", samples.all_samples(large=False), ids=sample_ids)
def test_gradcheck(sample, device):
    """torch.autograd.gradcheck (the analytical Jacobian against finite differences) of every
    small sample, in float64 on smooth values: reverse mode, and forward mode (the tangents
    torch.func.jvp / jacfwd use)."""
    f, leaves = _differentiable(sample, device)
    if f is not None:
        assert torch.autograd.gradcheck(f, leaves, check_forward_ad=True), sample


@helpers.devices
@pytest.mark.parametrize("sample", samples.all_samples(large=False), ids=sample_ids)
def test_gradgradcheck(sample, device):
    """Second derivatives of every small sample against finite differences of the first:
    backward of backward (double backward: gradient penalties, Hessian-vector products) and
    forward over backward (torch.func.hessian); this differentiates every backward operator."""
    f, leaves = _differentiable(sample, device)
    if f is not None:
        assert torch.autograd.gradgradcheck(f, leaves, check_fwd_over_rev=True), sample


# ---- torch.library.opcheck ---------------------------------------------------------------------

def _has_nan(value):
    if isinstance(value, torch.Tensor):
        return value.is_floating_point() and bool(value.isnan().any())
    return isinstance(value, (list, tuple)) and any(_has_nan(v) for v in value)


def call_signature(c):
    """What makes two calls of an operator different cases for opcheck: for each tensor argument
    whether it is given, its rank, whether it is empty and whether it requires grad; the options
    themselves (bool flags, output_mask, reduction, whether label smoothing is on). Sizes, window
    geometry and dims, which the fake kernels take symbolically or check alike, do not count."""
    out = []
    for arg, value in zip(c.op._schema.arguments, c.args):
        if isinstance(value, torch.Tensor):
            out.append((value.dim(), value.numel() == 0, value.requires_grad))
        elif value is None or "bool" in str(arg.type) or arg.name == "reduction":
            out.append(value if not isinstance(value, list) else tuple(value))
        elif arg.name == "label_smoothing":
            out.append(value > 0)  # cross_entropy's smoothed form
    return tuple(out)


def opcheck_calls(name):
    """The calls of torch.ops.pyengine.<name> that opcheck runs on, from the small samples: the
    first of each distinct call_signature, then more, evenly spread, up to OPCHECK_MIN. Not
    those with NaN in their inputs or outputs (an empty mean, every target ignored): opcheck
    compares results without equal_nan."""
    eligible = []
    for sample, c in samples.op_samples(name):
        if sample.large or samples.has_special_values(sample):
            continue
        with torch.no_grad():
            if _has_nan(c.args) or _has_nan(c.op(*c.args)):
                continue
        eligible.append((sample, c))
    first, rest, seen = [], [], set()
    for sample, c in eligible:
        (rest if call_signature(c) in seen else first).append((sample, c))
        seen.add(call_signature(c))
    wanted = max(0, min(OPCHECK_MIN - len(first), len(rest)))
    return first + [rest[math.floor(i * len(rest) / wanted)] for i in range(wanted)]


# Chosen when the module is collected (running every sample's calls once, ~2 s), so that each
# call is a test of its own.
OPCHECK_CALLS = {name: opcheck_calls(name) for name in OPERATORS}


@pytest.mark.parametrize("name", OPERATORS)
def test_every_operator_gets_opcheck_calls(name):
    assert len(OPCHECK_CALLS[name]) >= OPCHECK_MIN, (
        f"samples.py gives only {len(OPCHECK_CALLS[name])} calls of pyengine::{name} for opcheck "
        f"(without NaN, inf or LARGE); it needs {OPCHECK_MIN}")


@pytest.mark.parametrize("name,k", [(n, k) for n in OPERATORS
                                    for k in range(len(OPCHECK_CALLS[n]))],
                         ids=lambda v: str(v))
def test_opcheck(name, k):
    """torch.library.opcheck's four tests (schema, autograd registration, fake tensor, AOT
    dispatch with dynamic shapes) on the k-th chosen call of the operator."""
    sample, c = OPCHECK_CALLS[name][k]
    try:
        helpers.opcheck(c.op, c.args)
    except AssertionError as exc:
        raise AssertionError(f"{name} from {sample}:\n{exc}") from None


def _in_dtype(value, dtype):
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.detach().to(dtype).requires_grad_(value.requires_grad)
    if isinstance(value, (list, tuple)):
        return type(value)(_in_dtype(v, dtype) for v in value)
    return value


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", OPERATORS)
def test_opcheck_in_16_bit(name, dtype):
    """opcheck on the operator's first chosen call with its floating tensors in bfloat16 /
    float16: the fake kernels give the 16-bit dtype and strides the CPU kernel gives, and
    torch.compile's AOT dispatch runs it (the 16-bit dtypes reach the kernels through
    common/low_precision.h, and linear's bfloat16 through its own GEMM)."""
    sample, c = OPCHECK_CALLS[name][0]
    try:
        helpers.opcheck(c.op, _in_dtype(c.args, dtype))
    except AssertionError as exc:
        raise AssertionError(f"{name} in {dtype} from {sample}:\n{exc}") from None
