"""The implementation of pyengine.functional (the public module re-exports __all__ from here, so
its namespace holds only the API; the helpers and imports live here)."""
import types
import warnings
from typing import List, Optional, Tuple, Union

import torch
from torch import Tensor
from torch.nn import _reduction as _torch_reduction

from . import _C
from ._errors import ValueAndRuntimeError, ValueAndTypeError

_is_compiling = torch.compiler.is_compiling
_is_functorch_wrapped = torch._C._functorch.is_functorch_wrapped_tensor
_has_torch_function = torch._C._has_torch_function


def _operator(name: str):
    """pyengine's forward operator `name`, called the way its arguments need. Plain tensors in
    eager mode take pyengine._C.<name>, the pybind11 entry point straight into the dispatcher
    (the cheapest call, docs/design.md). Everything else takes torch.ops.pyengine.<name>:
    under torch.compile / torch.export, which trace torch.ops calls, and whenever
    __torch_function__ applies, which torch.ops honours and the pybind11 entry point cannot
    (it only takes plain tensors): a tensor subclass or a torch.fx Proxy among the arguments, or
    an active TorchFunctionMode. torch._C._has_torch_function (C; it sees modes as well as
    overriding arguments, exact Tensors and Parameters being plain) keeps that test cheap; it
    does not look inside tuples, where the operators take only ints. is_compiling() comes first
    so that Dynamo, which folds it to True, never traces the other test."""
    fast, full = getattr(_C, name), getattr(torch.ops.pyengine, name)

    def call(*args):
        if _is_compiling() or _has_torch_function(args):
            return full(*args)
        return fast(*args)

    call.__name__ = call.__qualname__ = name
    return call


# _op.<name>(*args): every forward operator (each has a pyengine._C entry point), through
# _operator's choice of path. Built once, so a call costs one attribute lookup.
_op = types.SimpleNamespace(**{name: _operator(name) for name in dir(_C)
                               if not name.startswith("_") and hasattr(torch.ops.pyengine, name)})

# torch.fx leaves. torch.fx.symbolic_trace runs the functions below on Proxies, which have no
# sizes or dtypes, so a Python branch on them would fail the trace. Each such branch (a broadcast,
# an implicit dim, a layout change) lives in a helper decorated with @torch.fx.wrap: tracing
# records a call of it, whose results the operator call takes, and it runs on the real tensors
# when the graph runs. A traced pyengine model is then a graph of torch.ops.pyengine.* calls and
# these helpers. Everywhere else (eager, Dynamo, tensor subclasses) they are plain functions.

# The public functions, in the order they are defined: each is listed by the @_public on its
# definition. pyengine.functional re-exports exactly these, pyengine.patch() routes each
# torch.nn.functional function of the same name, and the tests check each against torch's.
__all__ = []


def _public(fn):
    __all__.append(fn.__name__)
    fn.__module__ = "pyengine.functional"  # its public home, for reprs, help() and pickling
    return fn


_IntPair = Union[int, Tuple[int, int], List[int]]


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _pair(value, name: str, fn: str, module: str = "functional") -> Tuple[int, int]:
    """An int or a sequence of two ints, as torch.nn.functional accepts them. Errors have torch's
    classes: a TypeError for a value that is not ints, a RuntimeError for a sequence of ints of
    the wrong length (both also ValueErrors, as pyengine raised before)."""
    # The common cases first, by exact type and without a generator (LeNet's training step makes
    # 14 calls; a pair took ~1 us through the general check below).
    kind = type(value)
    if kind is int:
        return (value, value)
    if kind is tuple and len(value) == 2 and type(value[0]) is int and type(value[1]) is int:
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return (value, value)
    if isinstance(value, (tuple, list, torch.Size)) and all(_is_int(v) for v in value):
        if len(value) == 1:
            return (int(value[0]), int(value[0]))
        if len(value) == 2:
            return (int(value[0]), int(value[1]))
        error = ValueAndRuntimeError
    else:
        error = ValueAndTypeError
    raise error(
        f"pyengine.{module}.{fn}: expected {name} to be an int or a pair of ints, "
        f"but got {name}={value!r}")


def _reduction_enum(reduction: str, size_average, reduce) -> int:
    """torch's reduction handling, legacy size_average / reduce arguments included."""
    if size_average is not None or reduce is not None:
        reduction = _torch_reduction.legacy_get_string(size_average, reduce)
    return _torch_reduction.get_enum(reduction)


# ---- Convolution and pooling --------------------------------------------------------------

@_public
def conv2d(input: Tensor, weight: Tensor, bias: Optional[Tensor] = None, stride: _IntPair = 1,
           padding: Union[_IntPair, str] = 0, dilation: _IntPair = 1, groups: int = 1) -> Tensor:
    """2-D convolution over (N, C, H, W) or unbatched (C, H, W) input, like F.conv2d;
    padding may be ints or 'valid' / 'same'."""
    stride = _pair(stride, "stride", "conv2d")
    dilation = _pair(dilation, "dilation", "conv2d")
    if isinstance(padding, str):
        input, padding = _string_padding(input, weight, padding, stride, dilation)
    else:
        padding = _pair(padding, "padding", "conv2d")
    return _op.conv2d(input, weight, bias, stride, padding, dilation, groups)


@torch.fx.wrap
def _string_padding(input, weight, padding, stride, dilation, fn="functional.conv2d"):
    """'valid' is no padding; 'same' pads so the output has the input's size (stride 1 only).
    When the total padding of an axis is odd, the extra row/column goes on the bottom/right,
    as in torch, by padding the input itself: the operator takes symmetric padding.
    An fx leaf (see "torch.fx leaves" at the top): the padding depends on the weight's size."""
    if padding == "valid":
        return input, (0, 0)
    if padding != "same":
        raise ValueAndRuntimeError(
            f"pyengine.{fn}: expected padding to be an int, a pair of ints, 'valid' "
            f"or 'same', but got padding={padding!r}")
    if stride != (1, 1):
        raise ValueAndRuntimeError(
            f"pyengine.{fn}: padding='same' is not supported for strided "
            f"convolutions, but got stride={stride}")
    if weight.dim() != 4:
        raise ValueAndRuntimeError(
            f"pyengine.{fn}: expected weight to be 4-D (out_channels, in_channels / "
            f"groups, kH, kW), but got weight of shape {list(weight.shape)}")
    totals = [d * (k - 1) for d, k in zip(dilation, weight.shape[2:])]
    symmetric = tuple(t // 2 for t in totals)
    extra_h, extra_w = (t % 2 for t in totals)
    if extra_h or extra_w:
        input = torch.nn.functional.pad(input, [0, extra_w, 0, extra_h])
    return input, symmetric


@_public
def max_pool2d(input: Tensor, kernel_size: _IntPair, stride: Optional[_IntPair] = None,
               padding: _IntPair = 0, dilation: _IntPair = 1, ceil_mode: bool = False,
               return_indices: bool = False):
    """2-D max pooling like F.max_pool2d; stride defaults to kernel_size. With
    return_indices=True returns (output, indices), indices flat within each H*W plane."""
    kernel_size = _pair(kernel_size, "kernel_size", "max_pool2d")
    stride = kernel_size if stride is None or (isinstance(stride, (list, tuple)) and
                                               len(stride) == 0) \
        else _pair(stride, "stride", "max_pool2d")
    padding = _pair(padding, "padding", "max_pool2d")
    dilation = _pair(dilation, "dilation", "max_pool2d")
    op = _op.max_pool2d_with_indices if return_indices else _op.max_pool2d
    return op(input, kernel_size, stride, padding, dilation, bool(ceil_mode))


@_public
def linear(input: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """y = x W^T + b over input of shape (*, in_features), like F.linear."""
    return _op.linear(input, weight, bias)


# ---- Activations --------------------------------------------------------------------------

def _inplace(input: Tensor, result: Tensor) -> Tensor:
    """inplace=True: the result is written back into `input`, which is returned. The kernels
    always write a fresh tensor; the copy keeps torch's in-place semantics, autograd included
    (the input's history is rebased onto the op, leaves that require grad are refused)."""
    return input.copy_(result)


@_public
def relu(input: Tensor, inplace: bool = False) -> Tensor:
    result = _op.relu(input)
    return _inplace(input, result) if inplace else result


@_public
def leaky_relu(input: Tensor, negative_slope: float = 0.01, inplace: bool = False) -> Tensor:
    if inplace and torch.is_grad_enabled() and (not isinstance(input, Tensor)
                                                or input.requires_grad
                                                or _is_functorch_wrapped(input)):
        # The backward pass reads the op's input, which the in-place write below overwrites:
        # let autograd save a copy instead. A torch.fx Proxy (not a Tensor) may require grad
        # when its graph runs, and a tensor inside vmap reports requires_grad=False even where
        # the tensor it wraps requires grad: both get the copy too.
        return _inplace(input, _op.leaky_relu(input.clone(), float(negative_slope)))
    result = _op.leaky_relu(input, float(negative_slope))
    return _inplace(input, result) if inplace else result


@_public
def sigmoid(input: Tensor) -> Tensor:
    return _op.sigmoid(input)


@_public
def tanh(input: Tensor) -> Tensor:
    return _op.tanh(input)


def _softmax_args(name: str, input: Tensor, dim: Optional[int], stacklevel: int, dtype):
    if dim is None:
        dim = _implicit_softmax_dim(name, input, stacklevel + 1)
    if dtype is not None:
        input = input.to(dtype)
    return input, dim


@torch.fx.wrap
def _implicit_softmax_dim(name: str, input: Tensor, stacklevel: int) -> int:
    """torch's legacy implicit dim, with torch's deprecation warning. An fx leaf (see
    _FX_LEAVES): the dim depends on the input's number of dims."""
    warnings.warn(f"Implicit dimension choice for {name} has been deprecated. Change the "
                  "call to include dim=X as an argument.", stacklevel=stacklevel + 1)
    return 0 if input.dim() in (0, 1, 3) else 1


@_public
def softmax(input: Tensor, dim: Optional[int] = None, _stacklevel: int = 3,
            dtype: Optional[torch.dtype] = None) -> Tensor:
    input, dim = _softmax_args("softmax", input, dim, _stacklevel, dtype)
    return _op.softmax(input, dim)


@_public
def log_softmax(input: Tensor, dim: Optional[int] = None, _stacklevel: int = 3,
                dtype: Optional[torch.dtype] = None) -> Tensor:
    input, dim = _softmax_args("log_softmax", input, dim, _stacklevel, dtype)
    return _op.log_softmax(input, dim)


# ---- Losses -------------------------------------------------------------------------------

@_public
def mse_loss(input: Tensor, target: Tensor, size_average=None, reduce=None,
             reduction: str = "mean", weight: Optional[Tensor] = None) -> Tensor:
    """Mean squared error like F.mse_loss: broadcasts target to input (with torch's warning);
    weight, if given, has input's shape and 'mean' then divides by weight.sum()."""
    input, target, weight = _mse_loss_operands(input, target, weight)
    reduction_enum = _reduction_enum(reduction, size_average, reduce)
    return _op.mse_loss(input, target, weight, reduction_enum)


@torch.fx.wrap
def _mse_loss_operands(input: Tensor, target: Tensor, weight: Optional[Tensor]):
    """mse_loss's input, target and weight, broadcast to one shape. An fx leaf (see
    _FX_LEAVES): whether to broadcast depends on the sizes."""
    broadcast = target.size() != input.size()
    if broadcast:
        warnings.warn(
            f"Using a target size ({target.size()}) that is different to the input size "
            f"({input.size()}). This will likely lead to incorrect results due to broadcasting. "
            "Please ensure they have the same size.", stacklevel=3)
    if weight is not None and weight.size() != input.size():
        raise ValueError(
            "pyengine.functional.mse_loss: expected weight to have the input's shape "
            f"{list(input.shape)}, but got weight of shape {list(weight.shape)}")
    if broadcast:
        # Broadcast views only when the shapes differ: the common case pays no host time.
        input, target = torch.broadcast_tensors(input, target)
        if weight is not None:
            weight = weight.expand(input.shape)
    return input, target, weight


@_public
def binary_cross_entropy(input: Tensor, target: Tensor, weight: Optional[Tensor] = None,
                         size_average=None, reduce=None, reduction: str = "mean") -> Tensor:
    """Binary cross entropy on probabilities like F.binary_cross_entropy; weight broadcasts to
    target's shape."""
    reduction_enum = _reduction_enum(reduction, size_average, reduce)
    weight = _binary_cross_entropy_weight(input, target, weight)
    return _op.binary_cross_entropy(input, target, weight, reduction_enum)


@torch.fx.wrap
def _binary_cross_entropy_weight(input: Tensor, target: Tensor, weight: Optional[Tensor]):
    """binary_cross_entropy's weight broadcast to target's shape, once input and target are
    checked to have one shape. An fx leaf (see "torch.fx leaves" at the top): both depend on
    the sizes."""
    if target.size() != input.size():
        raise ValueError(
            f"Using a target size ({target.size()}) that is different to the input size "
            f"({input.size()}) is deprecated. Please ensure they have the same size.")
    if weight is None:
        return None
    return weight.expand(torch.broadcast_shapes(target.size(), weight.size()))


@_public
def cross_entropy(input: Tensor, target: Tensor, weight: Optional[Tensor] = None,
                  size_average=None, ignore_index: int = -100, reduce=None,
                  reduction: str = "mean", label_smoothing: float = 0.0) -> Tensor:
    """Cross entropy of logits like F.cross_entropy: input (N, C), (C) or (N, C, d1, ...); target
    int64 class indices (N), () or (N, d1, ...), or class probabilities of input's shape and
    dtype; label_smoothing in [0, 1]."""
    reduction_enum = _reduction_enum(reduction, size_average, reduce)
    _check_cross_entropy_target(input, target)
    return _op.cross_entropy(input, target, weight, reduction_enum, int(ignore_index),
                             float(label_smoothing))


# The dtypes torch's autocast casts (float64 it leaves alone).
_AUTOCAST_ELIGIBLE = (torch.float32, torch.bfloat16, torch.float16)


def _autocast_casts_both(input: Tensor, target: Tensor) -> bool:
    """Whether autocast is on for the input's device and will bring input and target to one
    dtype (cross_entropy runs in float32 under autocast: csrc/autocast.cpp), as torch's does."""
    return (torch.is_autocast_enabled(input.device.type) and input.dtype in _AUTOCAST_ELIGIBLE
            and target.dtype in _AUTOCAST_ELIGIBLE)


@torch.fx.wrap
def _check_cross_entropy_target(input: Tensor, target: Tensor) -> None:
    """The target mistakes whose error class is torch's functional's rather than the operator's
    (the operator checks the rest): a probability target of another dtype (torch promotes), and
    for (N, C, d1, ...) input a target of neither shape (ValueError and RuntimeError: torch's
    class depends on which dims differ). An fx leaf (see "torch.fx leaves" at the top): it
    depends on the dtypes and sizes."""
    probabilities = target.is_floating_point()
    if probabilities and target.dtype != input.dtype and not _autocast_casts_both(input, target):
        # torch promotes; pyengine has no kernel for mixed dtypes (patch() runs torch's then)
        raise NotImplementedError(
            "pyengine.functional.cross_entropy: expected a class-probability target of input's "
            f"dtype ({input.dtype}), but got target of dtype {target.dtype}")
    if input.dim() <= 2:
        return
    spatial_shape = (input.shape[0], *input.shape[2:])
    if tuple(target.shape) != (tuple(input.shape) if probabilities else spatial_shape):
        raise ValueAndRuntimeError(
            f"pyengine.functional.cross_entropy: expected target of shape "
            f"{list(spatial_shape)} (int64 class indices) or {list(input.shape)} (floating "
            f"class probabilities) for input of shape {list(input.shape)}, but got target of "
            f"shape {list(target.shape)} and dtype {target.dtype}")
