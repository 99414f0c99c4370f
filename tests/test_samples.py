"""Every operator on its samples (tests/samples.py): against torch, float64 gradcheck, and
torch.library.opcheck on its forward and backward operators.

Edge cases and bad input are tested per op (tests/test_conv2d.py, ...); the random lane is
tests/test_fuzz.py; CUDA against the CPU on the same samples is tests/test_cuda.py.
"""
import functools
import math

import pytest
import torch

import torch.nn.functional as F

import fuzz_configs
import helpers
import pyengine.functional as PF
import samples
from differential import CheckFailed, call, check
from fuzz_configs import materialize

P = torch.ops.pyengine
# torch.library.opcheck runs per operator on this many of its samples' calls (evenly spread over
# them), forward and backward operators alike: ~0.03-0.3 s each, 2-core machine.
OPCHECK_PER_OP = 8
OPERATORS = sorted(n.split("::")[1] for n in torch._C._dispatch_get_all_op_names()
                   if n.startswith("pyengine::"))


def sample_ids(sample):
    return sample.id


def _primary(out):
    return out[0] if isinstance(out, tuple) else out


@helpers.devices
@pytest.mark.parametrize("sample", samples.all_samples(), ids=sample_ids)
def test_matches_torch(sample, device):
    """Forward and gradients against torch.nn.functional on the same values (differential.py),
    the backward operator called directly too; and the output has the strides torch's function
    gives for the same inputs (channels_last in, channels_last out; csrc/common/layout.h)."""
    try:
        check(sample.case, device)
    except CheckFailed as exc:
        raise AssertionError(f"{sample}\n{exc}") from None
    if sample.case.expect_error or not torch_accepts(sample):
        return
    with torch.no_grad():
        ours = call(getattr(PF, sample.op), *materialize(sample.case, device=device))
        theirs = call(getattr(F, sample.op), *materialize(sample.case))
    if _primary(theirs).numel():  # (an empty tensor's strides say nothing)
        helpers.assert_same_strides(_primary(ours), _primary(theirs), str(sample))


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


@helpers.devices
@pytest.mark.parametrize("sample", samples.all_samples(large=False), ids=sample_ids)
def test_gradcheck(sample, device):
    """torch.autograd.gradcheck (the analytical Jacobian against finite differences) of every
    small sample, in float64 on smooth values (samples.gradcheck_case)."""
    case = samples.gradcheck_case(sample.case)
    args, kwargs = materialize(case, device=device)
    fn = getattr(PF, case.op)
    # the tensors to differentiate: those that require grad and hold an element
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
        return
    assert torch.autograd.gradcheck(f, tuple(t for _, t in where)), sample


# ---- torch.library.opcheck ---------------------------------------------------------------------

def _has_nan(value):
    if isinstance(value, torch.Tensor):
        return value.is_floating_point() and bool(value.isnan().any())
    return isinstance(value, (list, tuple)) and any(_has_nan(v) for v in value)


@functools.lru_cache(maxsize=None)
def opcheck_calls(name):
    """OPCHECK_PER_OP calls of torch.ops.pyengine.<name> from the small samples, evenly spread
    over them. Not those with NaN in their inputs or outputs (an empty mean, every target
    ignored): opcheck compares results without equal_nan."""
    eligible = []
    for sample, c in samples.op_samples(name):
        if sample.large or samples.has_special_values(sample):
            continue
        with torch.no_grad():
            if _has_nan(c.args) or _has_nan(c.op(*c.args)):
                continue
        eligible.append((sample, c))
    assert len(eligible) >= OPCHECK_PER_OP, (
        f"samples.py gives only {len(eligible)} calls of pyengine::{name} for opcheck (no NaN, "
        f"inf or LARGE sample); it needs {OPCHECK_PER_OP}")
    step = len(eligible) / OPCHECK_PER_OP
    return [eligible[math.floor(i * step)] for i in range(OPCHECK_PER_OP)]


@pytest.mark.parametrize("k", range(OPCHECK_PER_OP))
@pytest.mark.parametrize("name", OPERATORS)
def test_opcheck(name, k):
    """torch.library.opcheck's four tests (schema, autograd registration, fake tensor, AOT
    dispatch with dynamic shapes) on the k-th chosen call of the operator."""
    sample, c = opcheck_calls(name)[k]
    try:
        helpers.opcheck(c.op, c.args)
    except AssertionError as exc:
        raise AssertionError(f"{name} from {sample}:\n{exc}") from None
