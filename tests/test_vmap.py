"""torch.vmap over every pyengine operator goes through its batching rule (pyengine/_batching.py),
never torch's per-sample fallback, and gives what the operator gives sample by sample.

Driven by tests/samples.py: for every operator call the samples make (samples.op_samples), fresh
variants of the same call (the sample's case with other seeds: the same shapes, options and
layouts, new values; samples.op_calls) are stacked along the vmapped dim, and torch.vmap(op) over
them is compared with torch.stack([op(variant) ...]) of the operator itself: every tensor argument
vmapped at dim 0 and at its last dim, every other subset of them vmapped (the rest shared by all
samples), out_dims other than 0, and vmap of vmap. torch's fallback is disabled throughout, so an
operator without a rule raises here (test_a_missing_rule_raises shows that it would);
tests/test_registry.py checks that every schema has a rule.

vmap of pyengine.functional calls whose inputs require grad outside vmap: the gradients through
the vmapped result equal those through a loop over the samples.

Gradients inside vmap (torch.func.grad: per-sample gradients) are tested too: csrc/autograd.cpp's
hand-written graph nodes compose with torch.func's transforms.
"""
import dataclasses
import functools
import itertools

import pytest
import torch

import helpers
import pyengine.functional as PF
import samples
from differential import call
from fuzz_configs import materialize
from pyengine import _batching
from test_registry import SCHEMAS

pytestmark = pytest.mark.skipif(
    not _batching.REGISTERED,
    reason="torch < 2.4 has no torch.library.register_vmap: pyengine registers no batching "
           "rules and vmap takes torch's per-sample fallback")

N = 3           # samples per vmap
NESTED = (2, 3)  # samples of the outer and the inner vmap


@pytest.fixture(autouse=True)
def _no_fallback():
    """A vmap that would take torch's per-sample fallback raises instead. (The fallback's
    "performance drop" warning is printed by C++ to stderr, not raised as a Python warning, so
    disabling the fallback is what makes a missing rule fail.)"""
    before = torch._C._functorch._is_vmap_fallback_enabled()
    torch._C._functorch._set_vmap_fallback_enabled(False)
    try:
        yield
    finally:
        torch._C._functorch._set_vmap_fallback_enabled(before)


def test_a_missing_rule_raises():
    """The fixture above works: an operator without a batching rule fails under it."""
    lib = torch.library.Library("pyengine_vmap_probe", "FRAGMENT")
    lib.define("twice(Tensor x) -> Tensor")
    lib.impl("twice", lambda x: x * 2, "CPU")
    with pytest.raises(RuntimeError, match="hit the vmap fallback which is currently disabled"):
        torch.vmap(torch.ops.pyengine_vmap_probe.twice.default)(torch.ones(3, 2))


# ---- the operators, on the samples' calls ------------------------------------------------------

def _variant(case, k):
    """The sample's case with values from another seed (k-th variant)."""
    return dataclasses.replace(case, seed=(case.seed + 7919 * (k + 1)) % 2**31)


def _detached(args):
    return tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)


@functools.lru_cache(maxsize=None)
def _variant_calls(name, n):
    """[(sample, [args of variant 0, ..., n - 1])] for every call of pyengine::<name> that the
    samples make (a sample calling it twice gives two entries)."""
    out = []
    for sample in {s.id: s for s, _ in samples.op_samples(name)}.values():
        per_variant = [[c for c in samples.op_calls(_variant(sample.case, k)) if c.name == name]
                       for k in range(n)]
        for calls in zip(*per_variant):
            args = [_detached(c.args) for c in calls]
            for a in args[1:]:   # the variants differ in tensor values only
                assert [x for x in a if not isinstance(x, torch.Tensor)] == \
                    [x for x in args[0] if not isinstance(x, torch.Tensor)], sample
                assert [x.shape for x in a if isinstance(x, torch.Tensor)] == \
                    [x.shape for x in args[0] if isinstance(x, torch.Tensor)], sample
            out.append((sample, args))
    assert out, f"no sample calls pyengine::{name}"
    return out


def _tensor_positions(args):
    return [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]


def _stack(tensors, dim):
    """torch.stack along `dim` (negative: counted from the end of the stacked tensor)."""
    return torch.stack(tensors, dim=dim if dim >= 0 else tensors[0].dim() + 1 + dim)


def _outputs(out):
    return out if isinstance(out, tuple) else (out,)


def _assert_same(got, expected, what):
    for g, e in zip(_outputs(got), _outputs(expected)):
        if e is None:
            assert g is None, what
        elif e.is_floating_point():
            helpers.assert_close(g, e, msg=lambda m: f"{what}\n{m}")
        else:
            assert g.dtype == e.dtype and torch.equal(g, e), what


def _vmap_matches_loop(op, variants, in_dims, out_dim, what):
    """torch.vmap(op) over the variants (args at a position with an in_dim stacked along it,
    the others variant 0's, shared) equals the stack of op over each variant."""
    first = variants[0]
    args = [_stack([v[i] for v in variants], in_dims[i]) if in_dims[i] is not None else a
            for i, a in enumerate(first)]
    per_sample = [op(*[v[i] if in_dims[i] is not None else a for i, a in enumerate(first)])
                  for v in variants]
    expected = tuple(None if outs[0] is None else _stack(list(outs), out_dim)
                     for outs in zip(*map(_outputs, per_sample)))
    out_dims = tuple(None if e is None else out_dim for e in expected)
    got = torch.vmap(op, in_dims=tuple(in_dims),
                     out_dims=out_dims if isinstance(per_sample[0], tuple) else out_dim)(*args)
    _assert_same(got, expected if isinstance(per_sample[0], tuple) else expected[0],
                 f"{what}: in_dims {in_dims}, out_dims {out_dim}")


def _in_dims(args, dims):
    """in_dims for args: dims[i] for the i-th tensor argument (None: not vmapped)."""
    out = [None] * len(args)
    for pos, d in zip(_tensor_positions(args), dims):
        out[pos] = d
    return out


@pytest.mark.parametrize("name", SCHEMAS)
def test_vmap_equals_the_operator_per_sample(name):
    op = getattr(torch.ops.pyengine, name).default
    for sample, variants in _variant_calls(name, N):
        what = f"pyengine::{name} on {sample}"
        k = len(_tensor_positions(variants[0]))
        # every tensor argument vmapped, at dim 0 and at its last dim; out_dims 0 and last
        _vmap_matches_loop(op, variants, _in_dims(variants[0], [0] * k), 0, what)
        _vmap_matches_loop(op, variants, _in_dims(variants[0], [-1] * k), -1, what)
        if sample.large:
            continue
        # every other subset of the tensor arguments vmapped (at dim 0 or 1 in turn), the rest
        # shared by all samples
        for subset in itertools.product((False, True), repeat=k):
            if all(subset) or not any(subset):
                continue
            dims = [(j % 2 if variants[0][p].dim() else 0) if on else None
                    for j, (p, on) in enumerate(zip(_tensor_positions(variants[0]), subset))]
            _vmap_matches_loop(op, variants, _in_dims(variants[0], dims), 0, what)


def _nested(op, variants, outer, inner, what):
    """vmap(vmap(op, inner), outer) over n_outer x n_inner variants against the two loops."""
    n_outer, n_inner = NESTED

    def arg(i, o, j):   # argument i of sample (o, j): variant 0's along a level that shares it
        o = 0 if outer[i] is None else o
        j = 0 if inner[i] is None else j
        return variants[o * n_inner + j][i]

    def stacked(i):     # the outer level's samples stacked along outer[i], each the inner's
        def inner_level(o):
            if inner[i] is None:
                return arg(i, o, 0)
            return _stack([arg(i, o, j) for j in range(n_inner)], inner[i])
        if outer[i] is None:
            return inner_level(0)
        return _stack([inner_level(o) for o in range(n_outer)], outer[i])

    n_args = len(variants[0])
    outs = [[_outputs(op(*[arg(i, o, j) for i in range(n_args)])) for j in range(n_inner)]
            for o in range(n_outer)]
    want = tuple(None if outs[0][0][k] is None else
                 torch.stack([torch.stack([outs[o][j][k] for j in range(n_inner)])
                              for o in range(n_outer)])
                 for k in range(len(outs[0][0])))
    multiple = isinstance(op(*variants[0]), tuple)
    out_dims = tuple(None if w is None else 0 for w in want) if multiple else 0
    got = torch.vmap(torch.vmap(op, in_dims=tuple(inner), out_dims=out_dims),
                     in_dims=tuple(outer), out_dims=out_dims)(*[stacked(i) for i in range(n_args)])
    _assert_same(got, want if multiple else want[0],
                 f"{what}: nested, outer in_dims {outer}, inner in_dims {inner}")


@pytest.mark.parametrize("name", SCHEMAS)
def test_nested_vmap(name):
    """vmap of vmap, on the first samples of each operator: every tensor argument vmapped at
    both levels (the inner at its last dim), and only the first one at the outer level."""
    op = getattr(torch.ops.pyengine, name).default
    for sample, variants in _variant_calls(name, NESTED[0] * NESTED[1])[:3]:
        what = f"pyengine::{name} on {sample}"
        k = len(_tensor_positions(variants[0]))
        _nested(op, variants, _in_dims(variants[0], [0] * k), _in_dims(variants[0], [-1] * k),
                what)
        if k > 1:
            _nested(op, variants, _in_dims(variants[0], [0] + [None] * (k - 1)),
                    _in_dims(variants[0], [0] * k), what)


def test_batch_of_no_samples():
    x = torch.randn(0, 2, 3, 5, 5)
    w = torch.randn(0, 4, 3, 3, 3)
    assert torch.vmap(PF.conv2d)(x, w).shape == (0, 2, 4, 3, 3)
    out = torch.vmap(PF.cross_entropy)(torch.randn(0, 4, 5), torch.zeros(0, 4, dtype=torch.long))
    assert out.shape == (0,)
    out, indices = torch.vmap(lambda x: PF.max_pool2d(x, 2, return_indices=True))(x)
    assert out.shape == indices.shape == (0, 2, 3, 2, 2) and indices.dtype == torch.long


def test_a_bad_sample_raises_the_operators_error():
    """Errors name the sample's shapes, as the operator called on one sample does."""
    x, w = torch.randn(3, 2, 4, 5, 5), torch.randn(6, 5, 3, 3)
    with pytest.raises(RuntimeError) as direct:
        PF.conv2d(x[0], w)
    with pytest.raises(RuntimeError) as vmapped:
        torch.vmap(PF.conv2d, (0, None))(x, w)
    assert str(vmapped.value) == str(direct.value)
    with helpers.raises(IndexError, "dim"):
        torch.vmap(lambda t: PF.softmax(t, 2))(torch.randn(3, 4, 5))   # a sample has 2 dims


# ---- gradients through vmap -------------------------------------------------------------------

def _grad_cases(op, count=6):
    return [s for s in samples.samples(op) if not s.large and not s.case.expect_error][:count]


def _stacked_leaves(case, n):
    """The n variants' positional arguments, tensors stacked along dim 0 as fresh leaves that
    require grad where the case's do; the keyword arguments are variant 0's (shared)."""
    variants = [materialize(_variant(case, k)) for k in range(n)]
    args = []
    for i, a in enumerate(variants[0][0]):
        if isinstance(a, torch.Tensor):
            a = torch.stack([v[0][i].detach() for v in variants]).requires_grad_(a.requires_grad)
        args.append(a)
    return args, variants[0][1]


def _leaves(args, kwargs):
    return [a for a in list(args) + list(kwargs.values())
            if isinstance(a, torch.Tensor) and a.requires_grad]


def _grads(out, leaves, g):
    for leaf in leaves:
        leaf.grad = None
    out.backward(g)
    return [leaf.grad for leaf in leaves]


@pytest.mark.parametrize("op", PF.__all__)
def test_gradients_through_vmap_equal_a_loop(op):
    """Inputs that require grad outside vmap: backward through the vmapped result gives the
    gradients of the same samples computed one by one (all positional tensors vmapped; and only
    the first, the others shared by the samples, whose gradients then sum over them)."""
    fn = getattr(PF, op)
    for sample in _grad_cases(op):
        args, kwargs = _stacked_leaves(sample.case, N)
        tensors = _tensor_positions(args)
        for shared in ([], tensors[1:]):
            call_args = [a[0].detach().requires_grad_(a.requires_grad) if i in shared else a
                         for i, a in enumerate(args)]
            leaves = _leaves(call_args, kwargs)
            if not leaves:
                continue
            in_dims = tuple(0 if i in tensors and i not in shared else None
                            for i in range(len(args)))
            vmapped = torch.vmap(lambda *a: _outputs(call(fn, a, kwargs))[0], in_dims)(*call_args)
            looped = torch.stack([
                _outputs(call(fn, [a[b] if d == 0 else a for a, d in zip(call_args, in_dims)],
                              kwargs))[0] for b in range(N)])
            what = f"{op} on {sample}, shared positions {shared}"
            helpers.assert_close(vmapped, looped, msg=lambda m: f"{what}\n{m}")
            assert vmapped.requires_grad, what
            g = torch.randn(looped.shape, dtype=looped.dtype)
            for a, b, leaf in zip(_grads(vmapped, leaves, g), _grads(looped, leaves, g), leaves):
                assert a is not None, f"{what}: vmap lost the gradient of a {list(leaf.shape)}"
                helpers.assert_close(a, b, msg=lambda m: f"{what}\n{m}")


@pytest.mark.parametrize("fn", [PF.relu, PF.leaky_relu])
def test_inplace_activation_keeps_its_gradient_under_vmap(fn):
    """A tensor inside vmap reports requires_grad=False even where the tensor it wraps requires
    grad: in place, leaky_relu (whose backward reads the input the write overwrites) and relu
    (whose backward reads the result) still give the loop's gradients."""
    x = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, 4, 5, dtype=torch.float64)
    vmapped = _grads(torch.vmap(lambda t: fn(t * 1, inplace=True))(x), [x], g)
    looped = _grads(torch.stack([fn(x[b] * 1, inplace=True) for b in range(3)]), [x], g)
    helpers.assert_close(vmapped[0], looped[0])


def test_gradients_through_nested_vmap():
    x = torch.randn(2, 3, 4, 5, requires_grad=True)
    w = torch.randn(6, 5, requires_grad=True)
    f = torch.vmap(torch.vmap(lambda x, w: PF.log_softmax(PF.linear(x, w), 1), (0, None)),
                   (0, None))
    g = torch.randn(2, 3, 4, 6)
    vmapped = _grads(f(x, w), [x, w], g)
    looped = _grads(torch.stack([torch.stack([PF.log_softmax(PF.linear(x[i, j], w), 1)
                                              for j in range(3)]) for i in range(2)]), [x, w], g)
    for a, b in zip(vmapped, looped):
        helpers.assert_close(a, b)


# ---- gradients inside vmap: per-sample gradients ---------------------------------------------

@pytest.mark.parametrize("op", PF.__all__)
def test_per_sample_gradients_of_each_function(op):
    """vmap(grad(f)) over the samples' calls, f a weighted sum of the function's output, equals
    torch.autograd.grad sample by sample: the backward operators run batched (a per-sample
    grad_output and input), per-sample weight gradients included."""
    fn = getattr(PF, op)
    for sample in _grad_cases(op, count=4):
        args, kwargs = _stacked_leaves(sample.case, N)
        wrt = tuple(i for i, a in enumerate(args) if isinstance(a, torch.Tensor)
                    and a.requires_grad)
        if not wrt:
            continue
        plain = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
        kwargs = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        g = torch.randn(_outputs(call(fn, [a[0] if isinstance(a, torch.Tensor) else a
                                           for a in plain], kwargs))[0].shape,
                        dtype=sample.case.dtype)

        def loss(*a):
            return (_outputs(call(fn, a, kwargs))[0] * g).sum()

        in_dims = tuple(0 if isinstance(a, torch.Tensor) else None for a in plain)
        vmapped = torch.vmap(torch.func.grad(loss, argnums=wrt), in_dims)(*plain)
        for b in range(N):
            one = [a[b].clone().requires_grad_(i in wrt) if isinstance(a, torch.Tensor) else a
                   for i, a in enumerate(plain)]
            expected = torch.autograd.grad(loss(*one), [one[i] for i in wrt])
            for got, want in zip(vmapped, expected):
                helpers.assert_close(got[b], want, msg=lambda m: f"{op} on {sample}\n{m}")


def test_per_sample_gradients_of_a_small_conv_net():
    """The functorch recipe: per-sample gradients of a LeNet-like net's loss by vmap(grad(...))
    over the batch, against a loop of torch.autograd.grad."""
    torch.manual_seed(0)
    params = {"conv.w": torch.randn(4, 1, 3, 3), "conv.b": torch.randn(4),
              "fc.w": torch.randn(5, 4 * 3 * 3), "fc.b": torch.randn(5)}
    x, y = torch.randn(6, 1, 8, 8), torch.randint(0, 5, (6,))

    def loss(p, x, y):
        h = PF.max_pool2d(PF.relu(PF.conv2d(x.unsqueeze(0), p["conv.w"], p["conv.b"])), 2)
        return PF.cross_entropy(PF.linear(h.flatten(1), p["fc.w"], p["fc.b"]), y.unsqueeze(0))

    per_sample = torch.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, x, y)
    for b in range(len(x)):
        leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
        grads = torch.autograd.grad(loss(leaves, x[b], y[b]), list(leaves.values()))
        for k, want in zip(leaves, grads):
            helpers.assert_close(per_sample[k][b], want)
