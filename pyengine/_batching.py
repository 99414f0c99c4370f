"""Batching rules: torch.vmap over every pyengine operator, forward and backward, as one call of
a pyengine operator over all the samples at once (torch's fallback for an operator without a rule
loops over the samples in Python, with a performance warning).

A rule gets each tensor argument with its vmapped dim where in_dims says (None: not vmapped, the
same tensor for every sample) and returns the outputs with the dim each holds the samples in.
There are few kinds of rule, each written once and shared by the operators of its kind:

  elementwise    relu, leaky_relu, sigmoid, tanh and their backward ops are shape-agnostic: the
                 vmapped dim passes through (or every operand gets it first, unvmapped ones as a
                 stride-0 expand).
  along a dim    softmax, log_softmax and their backward ops: the vmapped dim goes first and
                 `dim` shifts past it.
  batch fold     max_pool2d, conv2d, conv2d_backward (and conv2d_relu_max_pool2d and its backward,
                 folded as conv2d's: pooling keeps each channel plane whole) with a shared weight
                 and no weight gradient:
                 the vmapped dim joins the batch dim (B x N -> B*N); an unbatched sample (C, H, W)
                 makes the samples the batch.
  group fold     conv2d / linear with per-sample weights or bias, and their backward ops whenever
                 they compute a per-sample weight gradient (per-sample gradients): sample b's
                 channels become group b of a convolution with B * groups groups; linear is a 1x1
                 convolution for this. With a shared input and per-sample filters (an ensemble),
                 the samples' filters are the output channels of one convolution instead, so the
                 input is not copied B times.
  losses         the loss is computed per element ('none') over all samples in one call, then
                 summed per sample in float64 (as the loss kernels accumulate) by pyengine's
                 linear against a ones vector, and for 'mean' divided by the sample's own
                 denominator; the backward ops take the per-sample grad_output expanded to one
                 per element (divided by the denominator for 'mean') with reduction 'none'.
                 cross_entropy folds the samples into its batch dim; a per-sample class
                 weight scales the unweighted per-row loss (and grad_output) by each row's class
                 weight.

Arithmetic outside the pyengine operators is limited to per-sample bookkeeping: the 'mean'
denominators and their division, and cross_entropy's class weight per row (a gather).

Every rule first runs the operator on meta tensors of one sample's shapes, so a bad call raises
the operator's own error naming the sample's shapes (not the folded ones) before anything is
folded; with no samples at all (batch size 0) that meta call also gives the outputs' shapes.

torch.library.register_vmap runs a rule with this vmap level's batching excluded: the pyengine
operators it calls on the unwrapped tensors reach the next level's rule (nested vmap) or the
kernels, and outside other transforms the operators' autograd records them, so inputs that
require grad outside vmap get their gradients through it. Gradients inside vmap
(vmap(torch.func.grad(...)), per-sample gradients) work too: csrc/autograd.cpp's graph nodes
compose with torch.func, and the backward operators they call have rules here.

torch.library.register_vmap exists from torch 2.4; with an older torch nothing is registered
(REGISTERED is False) and vmap over pyengine's operators takes torch's per-sample fallback.
"""
import math

import torch

_ops = torch.ops.pyengine

# ATen's reduction enum, as the operators take it (csrc/ops.cpp); 2 is 'sum'.
_NONE, _MEAN = 0, 1

REGISTERED = hasattr(torch.library, "register_vmap")


# ---- moving the vmapped dim -------------------------------------------------------------------

def _first(t, bdim, batch):
    """t with the samples in dim 0: its vmapped dim moved there, or, not vmapped, a stride-0
    expand over the samples (no copy)."""
    if t is None:
        return None
    return t.expand(batch, *t.shape) if bdim is None else t.movedim(bdim, 0)


def _merge(t, dim):
    """t (samples first) with its samples merged into the sample's dim `dim`, samples outer:
    (B, ..., n_dim, ...) -> (..., B * n_dim, ...)."""
    return t.movedim(0, dim).flatten(dim, dim + 1)


def _split(t, dim, batch):
    """The inverse of _merge, as a view: dim `dim` of size B * n back into (B, n)."""
    return t.unflatten(dim, (batch, t.shape[dim] // batch))


def _per_sample_sum(t):
    """Each sample's sum over all its elements (t samples first), in float64 as the loss kernels
    sum: one pyengine linear of the (B, K) values against a ones vector."""
    flat = t.reshape(t.shape[0], math.prod(t.shape[1:])).double()
    ones = torch.ones(1, flat.shape[1], dtype=flat.dtype, device=flat.device)
    return _ops.linear(flat, ones, None).view(t.shape[0])


def _unsqueeze_to(t, ndim):
    """t (B,) viewed as (B, 1, ..., 1) with ndim dims, to expand against a sample's elements."""
    return t.view(t.shape[0], *([1] * (ndim - 1)))


# ---- elementwise and along a dim --------------------------------------------------------------

def _elementwise(op, batch, in_dims, args):
    dims = {d for a, d in zip(args, in_dims) if isinstance(a, torch.Tensor)}
    if len(dims) == 1 and None not in dims:
        # every tensor operand has the samples in the same dim: shape-agnostic, so it passes
        return op(*args), dims.pop()
    return op(*[_first(a, d, batch) if isinstance(a, torch.Tensor) else a
                for a, d in zip(args, in_dims)]), 0


def _along_dim(op, batch, in_dims, args):
    """softmax(input, dim), softmax_backward(grad_output, result, dim) and the log_softmax ones."""
    *tensors, dim = args
    tensors = [_first(t, d, batch) for t, d in zip(tensors, in_dims)]
    rank = tensors[0].dim() - 1
    if rank == 0:
        # a 0-d sample is a row of one: the samples must not become the softmax's row
        return op(*[t.unsqueeze(1) for t in tensors], 1).squeeze(1), 0
    return op(*tensors, dim % rank + 1), 0   # dim is in range: the meta call checked it


# ---- batch fold: pooling ----------------------------------------------------------------------

def _max_pool2d(op, batch, in_dims, args):
    """max_pool2d, max_pool2d_with_indices (indices are per H*W plane, so a fold keeps them) and
    max_pool2d_backward(grad_output, input, indices, ...)."""
    n_tensors = sum(isinstance(a, torch.Tensor) for a in args)   # they come first
    tensors = [_first(t, d, batch) for t, d in zip(args[:n_tensors], in_dims)]
    rest = args[n_tensors:]
    if tensors[0].dim() == 4:   # unbatched samples (C, H, W): the samples are the batch
        out = op(*tensors, *rest)
    else:
        out = op(*[_merge(t, 0) for t in tensors], *rest)
        out = tuple(_split(o, 0, batch) for o in out) if isinstance(out, tuple) \
            else _split(out, 0, batch)
    return out, (0, 0) if isinstance(out, tuple) else 0


# ---- conv2d and linear: batch fold, group fold -----------------------------------------------

def _each(out, f):
    """f applied to an operator's output, or to each of its outputs."""
    return tuple(f(o) for o in out) if isinstance(out, tuple) else f(out)


def _dims(out, dim):
    return tuple(dim for _ in out) if isinstance(out, tuple) else dim


def _conv2d(op, batch, in_dims, args):
    """conv2d, and conv2d_relu_max_pool2d (its extra pooling arguments pass through: pooling is
    per channel plane, so every fold below keeps its output's planes and the indices in them)."""
    (x, w, b, stride, padding, dilation, groups), pool = args[:7], args[7:]
    xd, wd, bd = in_dims[:3]
    channel = x.dim() - 3 - (xd is not None)   # a sample's channel dim: 1, or 0 for (C, H, W)
    if wd is None and bd is None:   # one filter bank: batch fold
        x = _first(x, xd, batch)
        if channel == 0:            # the samples are the batch
            out = op(x, w, b, stride, padding, dilation, groups, *pool)
            return out, _dims(out, 0)
        out = op(_merge(x, 0), w, b, stride, padding, dilation, groups, *pool)
        return _each(out, lambda o: _split(o, 0, batch)), _dims(out, 0)
    w = _first(w, wd, batch)
    b = _first(b, bd, batch)
    if xd is None:
        # One input, per-sample filters: the B filter banks are the output channels of one
        # convolution with the sample's groups. Its output channels come group by group, each
        # group holding every sample's filters of that group.
        per_group = w.shape[1] // groups
        w = w.unflatten(1, (groups, per_group)).transpose(0, 1).flatten(0, 2)
        if b is not None:
            b = b.unflatten(1, (groups, per_group)).transpose(0, 1).flatten(0, 2)
        out = op(x, w, b, stride, padding, dilation, groups, *pool)

        def per_sample(o):
            o = o.unflatten(channel, (groups, batch, per_group)).transpose(channel, channel + 1)
            return o.flatten(channel + 1, channel + 2)
        return _each(out, per_sample), _dims(out, channel)
    # Per-sample inputs and filters: sample b's channels are groups b * groups ... of one
    # grouped convolution.
    out = op(_merge(_first(x, xd, batch), channel), w.flatten(0, 1),
             None if b is None else b.flatten(0, 1), stride, padding, dilation, batch * groups,
             *pool)
    return _each(out, lambda o: _split(o, channel, batch)), _dims(out, channel)


def _conv2d_backward(op, batch, in_dims, args):
    """conv2d_backward(grad_output, input, weight, ...), and
    conv2d_relu_max_pool2d_backward(grad_output, result, indices, input, weight, ...), whose
    result and indices fold as grad_output does (the pooled planes stay whole)."""
    n_tensors = sum(isinstance(a, torch.Tensor) for a in args)   # they come first
    *images, w = [_first(t, d, batch) for t, d in zip(args[:n_tensors], in_dims)]
    wd = in_dims[n_tensors - 1]
    # stride, padding, dilation, groups[, the pooling's arguments], output_mask
    extra, mask = list(args[n_tensors:-1]), args[-1]
    channel = images[0].dim() - 4
    if wd is None and not (mask[1] or mask[2]):
        # only grad_input, with one filter bank: batch fold
        w = args[n_tensors - 1]
        if channel == 0:
            gi, _, _ = op(*images, w, *extra, mask)
            return (gi, None, None), (0, None, None)
        gi, _, _ = op(*[_merge(t, 0) for t in images], w, *extra, mask)
        return (_split(gi, 0, batch), None, None), (0, None, None)
    # Per-sample weight gradients (or filters): group fold, as in _conv2d.
    extra[3] *= batch   # groups
    gi, gw, gb = op(*[_merge(t, channel) for t in images], w.flatten(0, 1), *extra, mask)
    return _grads(gi, gw, gb, channel, batch)


def _grads(gi, gw, gb, channel, batch):
    """(grad_input, grad_weight, grad_bias) of a group fold, each split back per sample."""
    outs = (None if gi is None else _split(gi, channel, batch),
            None if gw is None else _split(gw, 0, batch),
            None if gb is None else _split(gb, 0, batch))
    return outs, _out_dims(outs, (channel, 0, 0))


_ONE = [1, 1]
_ZERO = [0, 0]


def _linear(op, batch, in_dims, args):
    x, w, b = args
    xd, wd, bd = in_dims
    if wd is None and bd is None:   # one weight: linear takes any leading dims
        return op(_first(x, xd, batch), w, b), 0
    # Per-sample weights or bias: a 1x1 convolution, x's leading dims as its batch.
    w = _first(w, wd, batch)
    b = _first(b, bd, batch)
    out_f, in_f = w.shape[1:]
    w = w.reshape(batch * out_f, in_f, 1, 1)
    b = None if b is None else b.reshape(batch * out_f)
    if xd is None:
        # one input, per-sample weights: every sample's weights are output channels of one
        # convolution (the input is not copied B times)
        lead = x.shape[:-1]
        out = _ops.conv2d(_rows_1x1(x, lead, in_f), w, b, _ONE, _ZERO, _ONE, 1)
    else:
        # sample b's features are group b of a grouped 1x1 convolution
        x = _first(x, xd, batch).movedim(0, -2)   # (*lead, B, in)
        lead = x.shape[:-2]
        out = _ops.conv2d(_rows_1x1(x, lead, batch * in_f), w, b, _ONE, _ZERO, _ONE, batch)
    return out.reshape(*lead, batch, out_f), len(lead)


def _rows_1x1(t, lead, features):
    """t (*lead, ...) as the (M, features, 1, 1) input of a 1x1 convolution, M = prod(lead)."""
    return t.reshape(math.prod(lead), features, 1, 1)


def _linear_backward(op, batch, in_dims, args):
    go, x, w, mask = args
    god, xd, wd = in_dims[:3]
    go, x = _first(go, god, batch), _first(x, xd, batch)
    if wd is None and not (mask[1] or mask[2]):   # only grad_input, one weight
        gi, _, _ = op(go, x, w, mask)
        return (gi, None, None), (0, None, None)
    # Per-sample weight gradients (or weights): conv2d_backward of _linear's grouped 1x1
    # convolution.
    w = _first(w, wd, batch)
    out_f, in_f = w.shape[1:]
    lead = x.shape[1:-1]
    gi, gw, gb = _ops.conv2d_backward(
        _rows_1x1(go.movedim(0, -2), lead, batch * out_f),
        _rows_1x1(x.movedim(0, -2), lead, batch * in_f),
        w.reshape(batch * out_f, in_f, 1, 1), _ONE, _ZERO, _ONE, batch, mask)
    outs = (None if gi is None else gi.reshape(*lead, batch, in_f),
            None if gw is None else gw.reshape(batch, out_f, in_f),
            None if gb is None else gb.reshape(batch, out_f))
    return outs, _out_dims(outs, (len(lead), 0, 0))


def _out_dims(outs, dims):
    return tuple(None if o is None else d for o, d in zip(outs, dims))


# ---- losses -----------------------------------------------------------------------------------

# 'mean' divides mse_loss by its weights' sum (when it has weights), binary_cross_entropy by the
# element count (csrc/ops.cpp, cpu/loss.cpp's MeanOver).
_MEAN_OVER_WEIGHTS = {"mse_loss": True, "binary_cross_entropy": False}


def _mean_denominator(name, x, w):
    """Per sample (B,), float64: the weights' sum or the element count (x, w samples first)."""
    if w is not None and _MEAN_OVER_WEIGHTS[name]:
        return _per_sample_sum(w)
    count = math.prod(x.shape[1:])
    return torch.full((x.shape[0],), float(count), dtype=torch.float64, device=x.device)


def _op_name(op):
    return op._schema.name.split("::")[1]


def _loss_of(backward_name):
    """The loss a backward op differentiates: binary_cross_entropy for
    binary_cross_entropy_backward and binary_cross_entropy_target_backward."""
    for suffix in ("_target_backward", "_backward"):
        if backward_name.endswith(suffix):
            return backward_name[:-len(suffix)]
    raise ValueError(f"{backward_name} is not a loss's backward operator")


def _pointwise_loss(op, batch, in_dims, args):
    """mse_loss / binary_cross_entropy(input, target, weight, reduction)."""
    *tensors, reduction = args
    x, t, w = [_first(a, d, batch) for a, d in zip(tensors, in_dims)]
    loss = op(x, t, w, _NONE)
    if reduction == _NONE:
        return loss, 0
    total = _per_sample_sum(loss)
    if reduction == _MEAN:
        total = total / _mean_denominator(_op_name(op), x, w)
    return total.to(x.dtype), 0


def _pointwise_loss_backward(op, batch, in_dims, args):
    """mse_loss_backward / binary_cross_entropy_backward / binary_cross_entropy_target_backward
    (grad_output, input, target, weight, reduction): 'sum' and 'mean' as 'none' with each sample's grad_output on every element."""
    *tensors, reduction = args
    go, x, t, w = [_first(a, d, batch) for a, d in zip(tensors, in_dims)]
    if reduction != _NONE:
        if reduction == _MEAN:
            go = (go.double() / _mean_denominator(_loss_of(_op_name(op)), x, w)).to(x.dtype)
        go = _unsqueeze_to(go, x.dim()).expand(x.shape)
    return op(go, x, t, w, _NONE), 0


def _class_weights(w, wd, t, ignore_index):
    """cross_entropy's weight of each row's target class (t samples first: the 'none' loss's
    shape), 0 for ignored rows; 1 for kept rows (float64, mean's denominator) when there is no
    weight. Called after the operator has checked the targets' range."""
    kept = t != ignore_index
    if w is None:
        return kept.to(torch.float64)
    safe = t.masked_fill(~kept, 0)
    picked = (w.gather(1, safe.reshape(t.shape[0], -1)).view(t.shape) if wd is not None
              else w[safe])
    return torch.where(kept, picked, torch.zeros((), dtype=w.dtype, device=w.device))


class _FoldedCrossEntropy:
    """cross_entropy's (input, target, weight) with the samples folded into the operator's batch
    dim: samples of (C) become the rows of (B, C), samples of (N, C, d1, ...) the batch of
    (B * N, C, d1, ...), the target alike (a view where the samples' layout allows). Keeps the
    target samples first (per-row class weights), the 'none' loss's shape samples first, and the
    input's shape samples first (the gradient's)."""

    def __init__(self, batch, in_dims, args):
        x, t = _first(args[0], in_dims[0], batch), _first(args[1], in_dims[1], batch)
        self.w = args[2] if in_dims[2] is None else args[2].movedim(in_dims[2], 0)
        self.target_samples, self.input_shape = t, x.shape
        if x.dim() == 2:
            self.x, self.t, self.loss_shape = x, t, (batch,)
        else:
            self.x, self.t = x.flatten(0, 1), t.flatten(0, 1)
            self.loss_shape = (batch, x.shape[1], *x.shape[3:])
        # the operator's 'none' loss: (B) or (B * N, d1, ...)
        self.folded_loss_shape = (self.x.shape[0], *self.x.shape[2:])

    def mean_denominator(self, wd, ignore_index):
        """Per sample (B,), float64: the rows for probabilities, else the kept rows' class
        weights."""
        if self.t.is_floating_point():
            rows = math.prod(self.loss_shape[1:])
            return torch.full((self.loss_shape[0],), float(rows), dtype=torch.float64,
                              device=self.x.device)
        return _per_sample_sum(_class_weights(self.w, wd, self.target_samples, ignore_index))


def _per_sample_loop(op, batch, in_dims, args):
    """The operator on each sample in turn, stacked. Only for cross_entropy with a per-sample
    class weight and label smoothing or probability targets: each row's loss then mixes every
    class's weight, so the weights cannot be folded into a per-row factor as they are otherwise,
    and the operator takes one weight for all its rows."""
    outs = [op(*[a.select(d, b) if d is not None else a for a, d in zip(args, in_dims)])
            for b in range(batch)]
    if isinstance(outs[0], tuple):   # cross_entropy_with_log_sum_exp: (loss, log_sum_exp)
        return tuple(torch.stack(o) for o in zip(*outs)), (0,) * len(outs[0])
    return torch.stack(outs), 0


def _cross_entropy_options(options):
    """(reduction, ignore_index, label_smoothing): label_smoothing has a default in the schema,
    so a call may leave it out (and cross_entropy_backward's log_sum_exp after it)."""
    reduction, ignore_index, *rest = options
    return reduction, ignore_index, rest[0] if rest else 0.0


def _cross_entropy(op, batch, in_dims, args):
    """cross_entropy, and cross_entropy_with_log_sum_exp (op returns (loss, log_sum_exp): the
    folded call's log-sum-exps are the rows', which class weights do not change)."""
    reduction, ignore_index, label_smoothing = _cross_entropy_options(args[3:])
    with_lse = op._schema.name.endswith("_with_log_sum_exp")
    wd = in_dims[2]
    f = _FoldedCrossEntropy(batch, in_dims, args)
    if wd is not None and (label_smoothing or f.t.is_floating_point()):
        return _per_sample_loop(op, batch, in_dims, args)
    # per-sample class weights: the unweighted loss of each row times its class weight
    out = op(f.x, f.t, f.w if wd is None else None, _NONE, ignore_index, label_smoothing)
    loss, lse = out if with_lse else (out, None)
    loss = loss.view(f.loss_shape)
    if wd is not None:
        loss = loss * _class_weights(f.w, wd, f.target_samples, ignore_index)
    if reduction != _NONE:
        loss = _per_sample_sum(loss)
        if reduction == _MEAN:
            loss = loss / f.mean_denominator(wd, ignore_index)
        loss = loss.to(f.x.dtype)
    if with_lse:   # a (hi, lo) pair per row
        return (loss, lse.view(*f.loss_shape, 2)), (0, 0)
    return loss, 0


def _cross_entropy_backward(op, batch, in_dims, args):
    reduction, ignore_index, label_smoothing = _cross_entropy_options(args[4:])
    wd = in_dims[3]
    go = _first(args[0], in_dims[0], batch)
    f = _FoldedCrossEntropy(batch, in_dims[1:], args[1:])
    if wd is not None and (label_smoothing or f.t.is_floating_point()):
        return _per_sample_loop(op, batch, in_dims, args)
    if reduction == _NONE:
        go = go.reshape(f.loss_shape)
    else:
        if reduction == _MEAN:
            go = (go.double() / f.mean_denominator(wd, ignore_index)).to(f.x.dtype)
        go = _unsqueeze_to(go, len(f.loss_shape)).expand(f.loss_shape)
    w = f.w
    if wd is not None:   # per-sample class weights scale each row's grad_output
        go = go * _class_weights(w, wd, f.target_samples, ignore_index)
        w = None
    lse = args[7] if len(args) > 7 else None   # a (hi, lo) pair per row
    if lse is not None:
        lse = _first(lse, in_dims[7], batch).reshape(*f.folded_loss_shape, 2)
    return op(go.reshape(f.folded_loss_shape), f.x, f.t, w, _NONE, ignore_index,
              label_smoothing, lse).view(f.input_shape), 0


_RULES = {
    "conv2d": _conv2d, "conv2d_backward": _conv2d_backward,
    "conv2d_relu_max_pool2d": _conv2d, "conv2d_relu_max_pool2d_backward": _conv2d_backward,
    "max_pool2d": _max_pool2d, "max_pool2d_with_indices": _max_pool2d,
    "max_pool2d_backward": _max_pool2d,
    "linear": _linear, "linear_backward": _linear_backward,
    **{name: _elementwise for base in ("relu", "leaky_relu", "sigmoid", "tanh")
       for name in (base, base + "_backward")},
    **{name: _along_dim for base in ("softmax", "log_softmax")
       for name in (base, base + "_backward")},
    **{name: rule for base in _MEAN_OVER_WEIGHTS for name, rule in (
        (base, _pointwise_loss), (base + "_backward", _pointwise_loss_backward))},
    "binary_cross_entropy_target_backward": _pointwise_loss_backward,
    "cross_entropy": _cross_entropy, "cross_entropy_with_log_sum_exp": _cross_entropy,
    "cross_entropy_backward": _cross_entropy_backward,
}


# ---- registration -----------------------------------------------------------------------------

def _sample_call(op, in_dims, args):
    """The operator on meta tensors of one sample's shapes: its own checks and errors, and the
    shapes of its outputs."""
    def sample(a, d):
        if not isinstance(a, torch.Tensor):
            return a
        shape = list(a.shape)
        if d is not None:
            del shape[d]
        return torch.empty(shape, dtype=a.dtype, device="meta")
    return op(*[sample(a, d) for a, d in zip(args, in_dims)])


def _no_samples(meta_out, device):
    """Batch size 0: empty outputs of the sample's shapes (a group fold would need 0 groups)."""
    def empty(o):
        return None if o is None else torch.empty((0, *o.shape), dtype=o.dtype, device=device)
    if isinstance(meta_out, tuple):
        outs = tuple(empty(o) for o in meta_out)
        return outs, tuple(None if o is None else 0 for o in outs)
    return empty(meta_out), 0


def _batched(op, rule):
    def vmap_rule(info, in_dims, *args):
        meta_out = _sample_call(op, in_dims, args)
        if info.batch_size == 0:
            device = next(a.device for a in args if isinstance(a, torch.Tensor))
            return _no_samples(meta_out, device)
        return rule(op, info.batch_size, in_dims, args)
    return vmap_rule


def _register():
    if not REGISTERED:
        return None
    lib = torch.library.Library("pyengine", "IMPL")
    for name, rule in _RULES.items():
        op = getattr(_ops, name).default
        torch.library.register_vmap(f"pyengine::{name}", _batched(op, rule), lib=lib)
    return lib


# Kept alive: the registrations last as long as the library object.
_LIB = _register()
