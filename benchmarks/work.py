"""How much work each benchmark case does: its FLOP count and the minimum bytes it moves.

The formulas are written once per operator (FORMULAS below, one function per pyengine operator,
forward and backward), in terms of the tensors the operator is called with and returns. A case's
work is counted, not restated: count(fn) runs fn once under a TorchDispatchMode that sees every
operator call, pyengine's own and ATen's, and adds up the formulas of the calls. So a per-op case
(one forward and/or backward call) and a whole network's inference or training step (every layer
forward and backward, the loss, the optimizer's update) come from the same formulas.

Conventions (docs/benchmarks.md):
  FLOP   a multiply-add is 2; an add, multiply, compare, select, divide, exp, log or tanh is 1.
         Convolution and linear count the dense GEMM (padding taps included). Elementwise ops and
         losses are memory-bound whatever the exact count: it only shows how far below the
         compute roof they sit.
  bytes  each tensor the operator must read, and each it writes, counted once (a broadcast
         tensor by its distinct elements): the traffic of an implementation that streams every
         operand through memory exactly once. Cache-resident cases can beat it; fused
         implementations (torch.compile) may move less than the sum over a network's calls.
"""
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode


@dataclass
class Work:
    flops: int = 0
    bytes: int = 0
    # ATen operators seen that have no formula here (views, allocations, fills; any ATen
    # arithmetic a model adds, such as torch.cat): listed with their call counts, so the suite's
    # log shows what a count leaves out.
    uncounted: Dict[str, int] = field(default_factory=dict)

    def __add__(self, other: "Work") -> "Work":
        uncounted = dict(self.uncounted)
        for name, calls in other.uncounted.items():
            uncounted[name] = uncounted.get(name, 0) + calls
        return Work(self.flops + other.flops, self.bytes + other.bytes, uncounted)


def nbytes(t: Optional[torch.Tensor]) -> int:
    """Bytes of t's distinct elements (a broadcast dim, stride 0, counts once); 0 for None."""
    if t is None or not isinstance(t, torch.Tensor):
        return 0
    distinct = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            distinct *= size
    return distinct * t.element_size() if t.numel() else 0


def _total(*tensors) -> int:
    return sum(nbytes(t) for t in tensors)


# ---- Formulas, one per operator (schemas: csrc/ops.cpp) --------------------------------------
# Each takes (outputs, *the operator's arguments) and returns Work(flops, bytes).

def conv2d(out, input, weight, bias, stride, padding, dilation, groups):
    # every output element is a dot product over its (C_in / groups) * kH * kW taps:
    # 2 * N * C_out * H_out * W_out * (C_in / groups) * kH * kW, plus one add per output for bias
    taps = weight[0].numel()
    flops = 2 * out.numel() * taps + (out.numel() if bias is not None else 0)
    return Work(flops, _total(input, weight, bias, out))


def conv2d_backward(outs, grad_output, input, weight, stride, padding, dilation, groups, mask):
    # grad_input (dX = W^T dY) and grad_weight (dW = dY X^T) are each a GEMM as large as the
    # forward's; grad_bias sums grad_output. Reads only what the wanted gradients need.
    taps = weight[0].numel()
    gemms = int(mask[0]) + int(mask[1])
    flops = 2 * grad_output.numel() * taps * gemms + (grad_output.numel() if mask[2] else 0)
    reads = _total(grad_output, weight if mask[0] else None, input if mask[1] else None)
    return Work(flops, reads + _total(*outs))


def max_pool2d(out, input, kernel_size, stride, padding, dilation, ceil_mode):
    # one compare per window tap: N * C * H_out * W_out * kH * kW
    return Work(out.numel() * kernel_size[0] * kernel_size[1], _total(input, out))


def max_pool2d_with_indices(outs, input, kernel_size, stride, padding, dilation, ceil_mode):
    # as max_pool2d, and the int64 indices are written too
    out, indices = outs
    return Work(out.numel() * kernel_size[0] * kernel_size[1], _total(input, out, indices))


def max_pool2d_backward(grad_input, grad_output, input, indices, kernel_size, stride, padding,
                        dilation, ceil_mode):
    # one add per window: its gradient lands on the element its index names. `input` gives the
    # shape only; grad_input is written whole (zeros included).
    return Work(grad_output.numel(), _total(grad_output, indices, grad_input))


def _conv_outputs(input, weight, stride, padding, dilation) -> int:
    """N * C_out * H_out * W_out of a convolution a fused operator computes but never writes."""
    n = weight.shape[0] * (input.shape[0] if input.dim() == 4 else 1)
    for size, k, s, p, d in zip(input.shape[-2:], weight.shape[2:], stride, padding, dilation):
        n *= (size + 2 * p - d * (k - 1) - 1) // s + 1
    return n


def conv2d_relu_max_pool2d(outs, input, weight, bias, stride, padding, dilation, groups,
                           pool_kernel_size, pool_stride, pool_padding, pool_dilation,
                           pool_ceil_mode):
    # conv2d's GEMM and bias add on the convolution's output (2 * taps + 1 per element), one
    # compare per pool window tap (N * C * H_out * W_out * kH * kW, as max_pool2d) and relu's
    # compare on each pooled maximum. Bytes: input, weight, bias in; output and int64 indices
    # out (the convolution's output stays inside the operator)
    out, indices = outs
    conv = _conv_outputs(input, weight, stride, padding, dilation)
    taps = weight[0].numel()
    flops = (2 * conv * taps + (conv if bias is not None else 0)
             + out.numel() * pool_kernel_size[0] * pool_kernel_size[1] + out.numel())
    return Work(flops, _total(input, weight, bias, out, indices))


def conv2d_relu_max_pool2d_backward(outs, grad_output, result, indices, input, weight, stride,
                                    padding, dilation, groups, pool_kernel_size, pool_stride,
                                    pool_padding, pool_dilation, pool_ceil_mode, mask):
    # per pooled output, relu's step (result > 0) and an add of its gradient into the
    # convolution's gradient image at its index (2); then conv2d_backward's dense GEMMs over
    # that image and its sum for grad_bias. Reads grad_output, result, indices and what the
    # wanted gradients need; writes them (the gradient image stays inside the operator)
    if not any(mask):
        return Work()
    conv = _conv_outputs(input, weight, stride, padding, dilation)
    taps = weight[0].numel()
    gemms = int(mask[0]) + int(mask[1])
    flops = 2 * grad_output.numel() + 2 * conv * taps * gemms + (conv if mask[2] else 0)
    reads = _total(grad_output, result, indices, weight if mask[0] else None,
                   input if mask[1] else None)
    return Work(flops, reads + _total(*outs))


def linear(out, input, weight, bias):
    # y = x W^T: rows * out_features dot products of in_features taps, plus the bias add
    in_features = weight.shape[1]
    flops = 2 * out.numel() * in_features + (out.numel() if bias is not None else 0)
    return Work(flops, _total(input, weight, bias, out))


def linear_backward(outs, grad_output, input, weight, mask):
    # dx = dy W and dW = dy^T x are each a GEMM as large as the forward's; db sums dy's rows
    in_features = weight.shape[1]
    gemms = int(mask[0]) + int(mask[1])
    flops = 2 * grad_output.numel() * in_features * gemms + (grad_output.numel() if mask[2] else 0)
    reads = _total(grad_output, weight if mask[0] else None, input if mask[1] else None)
    return Work(flops, reads + _total(*outs))


def _unary(flops_per_element: int):
    """An elementwise op y = f(x): reads x, writes y."""
    def formula(out, input, *scalars):
        return Work(flops_per_element * out.numel(), _total(input, out))
    return formula


def _unary_backward(flops_per_element: int):
    """dx = f'(saved) * dy: reads dy and the saved input or result, writes dx."""
    def formula(grad_input, grad_output, saved, *scalars):
        return Work(flops_per_element * grad_input.numel(), _total(grad_output, saved, grad_input))
    return formula


def _pointwise_loss(flops_per_element: int):
    """loss = reduce(w * term(x, t)): reads x, t (and w), writes the loss."""
    def formula(out, input, target, weight, reduction):
        flops = (flops_per_element + (1 if weight is not None else 0)) * input.numel()
        return Work(flops, _total(input, target, weight, out))
    return formula


def _pointwise_loss_backward(flops_per_element: int):
    """dx = g * w * dterm(x, t) (/ n): reads g, x, t (and w), writes dx."""
    def formula(grad_input, grad_output, input, target, weight, reduction):
        flops = (flops_per_element + (1 if weight is not None else 0)) * input.numel()
        return Work(flops, _total(grad_output, input, target, weight, grad_input))
    return formula


def _smoothed(input, target, label_smoothing):
    """Whether cross_entropy takes its smoothed form (label smoothing, or class probabilities),
    and the flops per logit that form adds to each pass: the coefficient u = w (p (1 - eps) +
    eps / C) (up to 3 for probabilities), summed, and u * (x - m) summed (forward) or
    subtracted (backward): 3 more."""
    probabilities = target.is_floating_point()
    return probabilities or label_smoothing > 0, 3 + (3 if probabilities else 0)


def cross_entropy(out, input, target, weight, reduction, ignore_index, label_smoothing=0.0):
    # per logit: max, subtract, exp, add to the row's sum; per row: log, pick x[t], subtract
    rows = input.shape[0] if input.dim() == 2 else 1
    smoothed, extra = _smoothed(input, target, label_smoothing)
    flops = (4 + (extra if smoothed else 0)) * input.numel() + 3 * rows
    return Work(flops, _total(input, target, weight, out))


def cross_entropy_with_log_sum_exp(outs, input, target, weight, reduction, ignore_index,
                                   label_smoothing=0.0):
    # cross_entropy's work, plus each row's log-sum-exp m + log s (an add per row, and its split
    # into the (hi, lo) pair: 2 more) written out
    loss, lse = outs
    work = cross_entropy(loss, input, target, weight, reduction, ignore_index, label_smoothing)
    return Work(work.flops + 3 * lse.numel() // 2, work.bytes + nbytes(lse))


def cross_entropy_backward(grad_input, grad_output, input, target, weight, reduction,
                           ignore_index, label_smoothing=0.0, log_sum_exp=None):
    # the softmax recomputed (max, subtract, exp, sum, scale) times the upstream gradient: 6 per
    # logit; from the forward's log-sum-exp (class indices, no smoothing), exp(x - lse) times the
    # gradient: 3 per logit; minus one at the target: 1 per row
    rows = input.shape[0] if input.dim() == 2 else 1
    smoothed, extra = _smoothed(input, target, label_smoothing)
    per_logit = 3 if log_sum_exp is not None and not smoothed else 6 + (extra if smoothed else 0)
    return Work(per_logit * input.numel() + rows,
                _total(grad_output, input, target, weight, log_sum_exp, grad_input))


FORMULAS: Dict[str, Callable[..., Work]] = {
    "conv2d": conv2d,
    "conv2d_backward": conv2d_backward,
    "max_pool2d": max_pool2d,
    "max_pool2d_with_indices": max_pool2d_with_indices,
    "max_pool2d_backward": max_pool2d_backward,
    "conv2d_relu_max_pool2d": conv2d_relu_max_pool2d,
    "conv2d_relu_max_pool2d_backward": conv2d_relu_max_pool2d_backward,
    "linear": linear,
    "linear_backward": linear_backward,
    "relu": _unary(1),                         # max(x, 0)
    "relu_backward": _unary_backward(1),       # y > 0 ? dy : 0
    "leaky_relu": _unary(2),                   # x > 0 ? x : a * x
    "leaky_relu_backward": _unary_backward(2),
    "sigmoid": _unary(4),                      # 1 / (1 + exp(-x))
    "sigmoid_backward": _unary_backward(3),    # dy * y * (1 - y)
    "tanh": _unary(1),                         # tanh(x)
    "tanh_backward": _unary_backward(3),       # dy * (1 - y * y)
    "softmax": _unary(5),                      # max, x - m, exp, sum, * 1 / sum
    "softmax_backward": _unary_backward(4),    # dy * y, sum, dy - s, * y
    "log_softmax": _unary(5),                  # max, x - m, exp, sum, - log(sum)
    "log_softmax_backward": _unary_backward(4),  # sum dy, exp(y), * sum, dy -
    "mse_loss": _pointwise_loss(3),            # x - t, squared, summed
    "mse_loss_backward": _pointwise_loss_backward(3),  # 2 * (x - t) * g
    # -(t log p + (1 - t) log(1 - p)), summed: 2 logs, 2 subtractions, 2 products, add, negate, sum
    "binary_cross_entropy": _pointwise_loss(9),
    # g * (p - t) / max(p (1 - p), eps): 2 subtractions, product, max, divide, times g
    "binary_cross_entropy_backward": _pointwise_loss_backward(6),
    # g * -log(p / (1 - p)): subtraction, divide, log, negate, times g (the target is not read,
    # but counted: the operator takes it)
    "binary_cross_entropy_target_backward": _pointwise_loss_backward(5),
    "cross_entropy": cross_entropy,
    "cross_entropy_with_log_sum_exp": cross_entropy_with_log_sum_exp,
    "cross_entropy_backward": cross_entropy_backward,
}


# ---- ATen operators inside a measured step ----------------------------------------------------
# The one ATen arithmetic in the suite's steps is the optimizer's update, p += -lr * g
# (torch.optim.SGD: add_ per parameter, or _foreach_add_ over all of them on CUDA).

def _add_inplace(out, selves, others, alpha=1):
    # x += alpha * y: an add per element (a multiply-add when alpha != 1); reads x and y, writes x
    if isinstance(selves, torch.Tensor):
        selves, others = [selves], [others]
    per_element = 1 if alpha == 1 else 2
    return Work(per_element * sum(x.numel() for x in selves),
                sum(2 * nbytes(x) + nbytes(y) for x, y in zip(selves, others)))


ATEN_FORMULAS: Dict[str, Callable[..., Work]] = {
    "aten::add_.Tensor": _add_inplace,
    "aten::_foreach_add_.List": _add_inplace,
}


def _op_name(func) -> Tuple[str, str]:
    """(namespace, name) of an OpOverload: ("pyengine", "conv2d") or ("aten", "add_.Tensor")."""
    namespace, _, rest = func.name().partition("::")
    return namespace, rest


class Counter(TorchDispatchMode):
    """Adds up the Work of every operator call made while active."""

    def __init__(self):
        super().__init__()
        self.work = Work()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        namespace, name = _op_name(func)
        if namespace == "pyengine":
            formula = FORMULAS.get(name)
            if formula is None:
                raise KeyError(f"benchmarks/work.py has no FLOP/byte formula for pyengine::{name}:"
                               " add one to FORMULAS")
            self.work = self.work + formula(out, *args, **kwargs)
        elif func.name() in ATEN_FORMULAS:
            self.work = self.work + ATEN_FORMULAS[func.name()](out, *args, **kwargs)
        elif namespace == "aten":
            self.work.uncounted[func.name()] = self.work.uncounted.get(func.name(), 0) + 1
        return out


def count(fn: Callable[[], object]) -> Work:
    """The work of one call of fn, summed over the operator calls it makes."""
    counter = Counter()
    with counter:
        fn()
    return counter.work


def registered_ops() -> Sequence[str]:
    """Every operator pyengine registers (torch.ops.pyengine.*), by name."""
    import pyengine  # noqa: F401  (registers the operators)

    return sorted(name.split("::")[1] for name in torch._C._dispatch_get_all_op_names()
                  if name.startswith("pyengine::"))
