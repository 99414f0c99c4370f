"""The implementation of pyengine.fused (the public module re-exports __all__ from here)."""
from typing import Optional, Union

import torch
from torch import Tensor

from ._functional import _IntPair, _op, _pair, _string_padding

__all__ = ["conv2d_relu_max_pool2d"]

_NAME = "conv2d_relu_max_pool2d"
_MODULE = "fused"


def conv2d_relu_max_pool2d(input: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                           stride: _IntPair = 1, padding: Union[_IntPair, str] = 0,
                           dilation: _IntPair = 1, groups: int = 1,
                           pool_kernel_size: _IntPair = 2, pool_stride: Optional[_IntPair] = None,
                           pool_padding: _IntPair = 0, pool_dilation: _IntPair = 1,
                           pool_ceil_mode: bool = False) -> Tensor:
    """F.max_pool2d(F.relu(F.conv2d(input, weight, bias, stride, padding, dilation, groups)),
    pool_kernel_size, pool_stride, pool_padding, pool_dilation, ceil_mode=pool_ceil_mode), its
    values and gradients, as one operator (torch.ops.pyengine.conv2d_relu_max_pool2d): the
    convolution's output is pooled and relu applied to the pooled maxima, so neither the relu'd
    image nor its gradient is ever written (a pooling geometry with windows of no input element,
    whose value is -inf, takes relu first). pool_stride defaults to pool_kernel_size, as
    max_pool2d's stride does; padding may be ints or 'valid' / 'same', as conv2d's."""
    stride = _pair(stride, "stride", _NAME, _MODULE)
    dilation = _pair(dilation, "dilation", _NAME, _MODULE)
    if isinstance(padding, str):
        input, padding = _string_padding(input, weight, padding, stride, dilation,
                                          f"{_MODULE}.{_NAME}")
    else:
        padding = _pair(padding, "padding", _NAME, _MODULE)
    pool_kernel_size = _pair(pool_kernel_size, "pool_kernel_size", _NAME, _MODULE)
    pool_stride = pool_kernel_size if pool_stride is None or (
        isinstance(pool_stride, (tuple, list)) and len(pool_stride) == 0) else \
        _pair(pool_stride, "pool_stride", _NAME, _MODULE)
    pool_padding = _pair(pool_padding, "pool_padding", _NAME, _MODULE)
    pool_dilation = _pair(pool_dilation, "pool_dilation", _NAME, _MODULE)
    output, _ = _op.conv2d_relu_max_pool2d(input, weight, bias, stride, padding, dilation, groups,
                                           pool_kernel_size, pool_stride, pool_padding,
                                           pool_dilation, bool(pool_ceil_mode))
    return output


conv2d_relu_max_pool2d.__module__ = "pyengine.fused"  # its public home, for reprs and pickling


# ---- what each fused function replaces ---------------------------------------------------------

def _torch_conv2d_relu_max_pool2d(input, weight, bias=None, stride=1, padding=0, dilation=1,
                                  groups=1, pool_kernel_size=2, pool_stride=None, pool_padding=0,
                                  pool_dilation=1, pool_ceil_mode=False):
    F = torch.nn.functional
    return F.max_pool2d(F.relu(F.conv2d(input, weight, bias, stride, padding, dilation, groups)),
                        pool_kernel_size, pool_stride, pool_padding, pool_dilation,
                        ceil_mode=pool_ceil_mode)


# Each fused function's torch twin: the torch.nn.functional calls it replaces, with its
# signature. The tests' reference (tests/fuzz_configs.py) and the benchmarks' torch contender
# (benchmarks/suite.py) both run these.
TORCH_EQUIVALENTS = {"conv2d_relu_max_pool2d": _torch_conv2d_relu_max_pool2d}
