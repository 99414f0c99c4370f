"""pyengine's errors are catchable by the `except` clause that catches torch's for the same mistake.

One table: for every error pyengine raises, torch's own call with the same bad input, and
pyengine's calls (pyengine.functional / pyengine.fused / pyengine.nn and the operator
torch.ops.pyengine.*; a fused function's torch call is the composition it replaces,
fuzz_configs.torch_function). Each
pyengine exception must be an instance of the class torch raised (RuntimeError, or its subclass
NotImplementedError; IndexError; ValueError; TypeError) and hold pyengine's message fragments.
Where pyengine's Python layer used to raise ValueError and torch raises RuntimeError or TypeError,
the exception is both (pyengine/_errors.py), so old `except ValueError` code keeps working.

A second table: calls torch accepts that pyengine declines (dtypes it has no kernel for, and a
few shapes): NotImplementedError for what is unsupported, RuntimeError for the rest.
"""
import pytest
import torch
import torch.nn.functional as F

import fuzz_configs
import pyengine
import pyengine.functional as PF
import pyengine.fused
from helpers import SUPPORTED_DTYPES_TEXT

P = torch.ops.pyengine
aten = torch.ops.aten


def r(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


def long(*shape):
    return torch.zeros(shape, dtype=torch.long)


X, W, B = r(1, 2, 5, 5), r(3, 2, 3, 3), r(3)
Y = r(1, 2, 4, 4)
POOL_OUT, POOL_IDX = F.max_pool2d(Y, 2, return_indices=True)
POOL = ([2, 2], [2, 2], [0, 0], [1, 1], False)
PROB = torch.rand(3, 4)
F8 = torch.float8_e4m3fn  # a floating dtype pyengine refuses (torch has no CPU convolution for it)


def conv_ops(x=X, w=W, b=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1):
    return P.conv2d(x, w, b, list(stride), list(padding), list(dilation), groups)


def pool_ops(x=Y, k=(2, 2), s=(2, 2), p=(0, 0), d=(1, 1), ceil=False):
    return P.max_pool2d(x, list(k), list(s), list(p), list(d), ceil)


# conv2d_relu_max_pool2d: a 3x3 convolution of a 6x6 input (a 4x4 output), a 2x2 pool (2x2 out)
FUSED = pyengine.fused.conv2d_relu_max_pool2d
TORCH_FUSED = fuzz_configs.torch_function("conv2d_relu_max_pool2d")
XF = r(1, 2, 6, 6)
CONV = ([1, 1], [0, 0], [1, 1], 1)


def fused_ops(x=XF, w=W, b=None, stride=(1, 1), groups=1, k=(2, 2), s=(2, 2), p=(0, 0),
              d=(1, 1), ceil=False):
    return P.conv2d_relu_max_pool2d(x, w, b, list(stride), [0, 0], [1, 1], groups, list(k),
                                    list(s), list(p), list(d), ceil)


FUSED_OUT, FUSED_IDX = fused_ops()
FUSED_POOL = ([2, 2], [2, 2], [0, 0], [1, 1], False)
ALL = [True, True, True]


def fused_backward(grad=FUSED_OUT, result=FUSED_OUT, indices=FUSED_IDX):
    return P.conv2d_relu_max_pool2d_backward(grad, result, indices, XF, W, *CONV, *FUSED_POOL,
                                             ALL)


def rnn_pair():
    torch_rnn = torch.nn.RNN(2, 3)
    ours = pyengine.nn.RNN(2, 3)
    ours.load_state_dict(torch_rnn.state_dict())
    return torch_rnn, ours


# name: (torch's call, [pyengine's calls], [fragments of pyengine's message])
CASES = {
    # ---- conv2d ----
    "conv2d weight dtype": (lambda: F.conv2d(X, W.double()),
                            [lambda: PF.conv2d(X, W.double()), lambda: conv_ops(w=W.double())],
                            ["expected weight to have the same dtype as input", "Double"]),
    "conv2d bias dtype": (lambda: F.conv2d(X, W, B.double()),
                          [lambda: PF.conv2d(X, W, B.double()), lambda: conv_ops(b=B.double())],
                          ["expected bias to have the same dtype as input"]),
    "conv2d stride length": (lambda: F.conv2d(X, W, stride=(1, 1, 1)),
                             [lambda: PF.conv2d(X, W, stride=(1, 1, 1))],
                             ["stride", "an int or a pair of ints", "(1, 1, 1)"]),
    "conv2d stride length (op)": (lambda: F.conv2d(X, W, stride=(1, 1, 1)),
                                  [lambda: conv_ops(stride=(1, 1, 1))],
                                  ["expected stride to have 2 values", "[1, 1, 1]"]),
    "conv2d empty stride": (lambda: F.conv2d(X, W, stride=[]),
                            [lambda: PF.conv2d(X, W, stride=[])],
                            ["stride", "an int or a pair of ints", "[]"]),
    "conv2d stride type": (lambda: F.conv2d(X, W, stride="2"),
                           [lambda: PF.conv2d(X, W, stride="2")],
                           ["stride", "an int or a pair of ints", "'2'"]),
    "conv2d stride float": (lambda: F.conv2d(X, W, stride=(1, 1.5)),
                            [lambda: PF.conv2d(X, W, stride=(1, 1.5))], ["stride", "(1, 1.5)"]),
    "conv2d stride bool": (lambda: F.conv2d(X, W, stride=True),
                           [lambda: PF.conv2d(X, W, stride=True)], ["stride", "True"]),
    "conv2d stride 0": (lambda: F.conv2d(X, W, stride=0),
                        [lambda: PF.conv2d(X, W, stride=0), lambda: conv_ops(stride=(0, 1))],
                        ["expected stride to be positive"]),
    "conv2d padding -1": (lambda: F.conv2d(X, W, padding=-1),
                          [lambda: PF.conv2d(X, W, padding=-1), lambda: conv_ops(padding=(-1, 0))],
                          ["expected padding to be non-negative"]),
    "conv2d dilation 0": (lambda: F.conv2d(X, W, dilation=0),
                          [lambda: PF.conv2d(X, W, dilation=0), lambda: conv_ops(dilation=(1, 0))],
                          ["expected dilation to be positive"]),
    "conv2d groups 0": (lambda: F.conv2d(X, W, groups=0),
                        [lambda: PF.conv2d(X, W, groups=0), lambda: conv_ops(groups=0)],
                        ["expected groups to be positive", "groups=0"]),
    "conv2d groups divide": (lambda: F.conv2d(r(1, 4, 5, 5), W, groups=2),
                             [lambda: PF.conv2d(r(1, 4, 5, 5), W, groups=2),
                              lambda: conv_ops(x=r(1, 4, 5, 5), groups=2)],
                             ["out_channels (3) to be divisible by groups=2"]),
    "conv2d huge groups": (lambda: F.conv2d(X, W, groups=2**62),
                           [lambda: PF.conv2d(X, W, groups=2**62)], [f"groups={2**62}"]),
    "conv2d input rank": (lambda: F.conv2d(X[0, 0], W),
                          [lambda: PF.conv2d(X[0, 0], W), lambda: conv_ops(x=X[0, 0])],
                          ["expected input to be 3-D (C, H, W) or 4-D", "[5, 5]"]),
    "conv2d input rank 5": (lambda: F.conv2d(X[None], W), [lambda: PF.conv2d(X[None], W)],
                            ["3-D (C, H, W) or 4-D", "[1, 1, 2, 5, 5]"]),
    "conv2d weight rank": (lambda: F.conv2d(X, W[0]),
                           [lambda: PF.conv2d(X, W[0]), lambda: conv_ops(w=W[0])],
                           ["expected weight to be 4-D", "[2, 3, 3]"]),
    "conv2d channels": (lambda: F.conv2d(X, r(3, 3, 3, 3)),
                        [lambda: PF.conv2d(X, r(3, 3, 3, 3)), lambda: conv_ops(w=r(3, 3, 3, 3))],
                        ["to have 3 channels", "but got 2 channels"]),
    "conv2d empty kernel": (lambda: F.conv2d(X, r(3, 2, 0, 3)),
                            [lambda: PF.conv2d(X, r(3, 2, 0, 3))], ["a kernel of at least 1x1"]),
    "conv2d kernel too big": (lambda: F.conv2d(X, r(3, 2, 7, 3)),
                              [lambda: PF.conv2d(X, r(3, 2, 7, 3))],
                              ["(dilated) kernel to fit in the padded input", "7x3", "5x5"]),
    "conv2d bias shape": (lambda: F.conv2d(X, W, r(4)),
                          [lambda: PF.conv2d(X, W, r(4)), lambda: conv_ops(b=r(4))],
                          ["expected bias of shape [3]", "[4]"]),
    "conv2d padding string": (lambda: F.conv2d(X, W, padding="full"),
                              [lambda: PF.conv2d(X, W, padding="full")], ["padding", "'full'"]),
    "conv2d same and stride": (lambda: F.conv2d(X, W, padding="same", stride=2),
                               [lambda: PF.conv2d(X, W, padding="same", stride=2)],
                               ["padding='same'", "strided"]),
    "conv2d same, weight rank": (lambda: F.conv2d(X, W[0], padding="same"),
                                 [lambda: PF.conv2d(X, W[0], padding="same")],
                                 ["expected weight to be 4-D", "[2, 3, 3]"]),
    "conv2d huge padding": (lambda: F.conv2d(X, W, padding=(2**62, 0)),
                            [lambda: PF.conv2d(X, W, padding=(2**62, 0)),
                             lambda: conv_ops(padding=(2**62, 0))],
                            [f"padding=[{2**62}, 0] with input height 5 overflows"]),
    "conv2d int64 overflow": (lambda: F.conv2d(X, W, stride=2**63),
                              [lambda: PF.conv2d(X, W, stride=2**63)], []),
    "conv2d_backward grad shape": (
        lambda: aten.convolution_backward(r(1, 3, 2, 3), X, W, None, [1, 1], [0, 0], [1, 1],
                                          False, [0, 0], 1, [True, True, False]),
        [lambda: P.conv2d_backward(r(1, 3, 2, 3), X, W, [1, 1], [0, 0], [1, 1], 1,
                                   [True, True, False])],
        ["expected grad_output of shape [1, 3, 3, 3]", "[1, 3, 2, 3]"]),
    # ---- max_pool2d ----
    "max_pool2d kernel length": (lambda: F.max_pool2d(Y, (2, 2, 2)),
                                 [lambda: PF.max_pool2d(Y, (2, 2, 2))],
                                 ["kernel_size", "an int or a pair of ints", "(2, 2, 2)"]),
    "max_pool2d kernel length (op)": (lambda: F.max_pool2d(Y, (2, 2, 2)),
                                      [lambda: pool_ops(k=(2, 2, 2))],
                                      ["expected kernel_size to have 2 values"]),
    "max_pool2d kernel type": (lambda: F.max_pool2d(Y, "2"), [lambda: PF.max_pool2d(Y, "2")],
                               ["kernel_size", "'2'"]),
    "max_pool2d kernel float": (lambda: F.max_pool2d(Y, 1.5), [lambda: PF.max_pool2d(Y, 1.5)],
                                ["kernel_size", "1.5"]),
    "max_pool2d stride 0": (lambda: F.max_pool2d(Y, 2, 0),
                            [lambda: PF.max_pool2d(Y, 2, 0), lambda: pool_ops(s=(0, 2))],
                            ["expected stride to be positive"]),
    "max_pool2d kernel 0": (lambda: F.max_pool2d(Y, 0),
                            [lambda: PF.max_pool2d(Y, 0, 1), lambda: pool_ops(k=(0, 2))],
                            ["expected kernel_size to be positive"]),
    "max_pool2d dilation 0": (lambda: F.max_pool2d(Y, 2, dilation=0),
                              [lambda: PF.max_pool2d(Y, 2, dilation=0)],
                              ["expected dilation to be positive"]),
    "max_pool2d padding -1": (lambda: F.max_pool2d(Y, 2, padding=-1),
                              [lambda: PF.max_pool2d(Y, 2, padding=-1)],
                              ["expected padding to be non-negative"]),
    "max_pool2d padding over half": (lambda: F.max_pool2d(Y, 2, padding=2),
                                     [lambda: PF.max_pool2d(Y, 2, padding=2),
                                      lambda: pool_ops(p=(2, 0))],
                                     ["expected padding to be at most half"]),
    "max_pool2d input rank": (lambda: F.max_pool2d(Y[0, 0], 2),
                              [lambda: PF.max_pool2d(Y[0, 0], 2), lambda: pool_ops(x=Y[0, 0])],
                              ["expected input to be 3-D (C, H, W) or 4-D", "[4, 4]"]),
    "max_pool2d input rank 5": (lambda: F.max_pool2d(Y[None], 2),
                                [lambda: PF.max_pool2d(Y[None], 2)], ["3-D (C, H, W) or 4-D"]),
    "max_pool2d kernel too big": (lambda: F.max_pool2d(Y, 7), [lambda: PF.max_pool2d(Y, 7)],
                                  ["to fit in the padded input 4x4", "kernel_size=[7, 7]"]),
    "max_pool2d empty height": (lambda: F.max_pool2d(r(1, 2, 0, 5), 1),
                                [lambda: PF.max_pool2d(r(1, 2, 0, 5), 1)],
                                ["non-zero channels, height and width", "[1, 2, 0, 5]"]),
    "max_pool2d no channels": (lambda: F.max_pool2d(r(1, 0, 5, 5), 2),
                               [lambda: PF.max_pool2d(r(1, 0, 5, 5), 2)], ["non-zero channels"]),
    "max_pool2d huge padding": (lambda: F.max_pool2d(Y, 2, padding=2**62),
                                [lambda: PF.max_pool2d(Y, 2, padding=2**62)],
                                [f"padding=[{2**62}, {2**62}]"]),
    "max_pool2d huge kernel": (lambda: F.max_pool2d(Y, 2**63 - 1),
                               [lambda: PF.max_pool2d(Y, 2**63 - 1)],
                               [f"kernel_size=[{2**63 - 1}, {2**63 - 1}]", "overflows"]),
    "max_pool2d_backward grad shape": (
        lambda: aten.max_pool2d_with_indices_backward(r(1, 2, 3, 2), Y, *POOL[:-1], False,
                                                      POOL_IDX),
        [lambda: P.max_pool2d_backward(r(1, 2, 3, 2), Y, POOL_IDX, *POOL)],
        ["expected grad_output of shape [1, 2, 2, 2]", "[1, 2, 3, 2]"]),
    "max_pool2d_backward indices dtype": (
        lambda: aten.max_pool2d_with_indices_backward(POOL_OUT, Y, *POOL[:-1], False,
                                                      POOL_IDX.int()),
        [lambda: P.max_pool2d_backward(POOL_OUT, Y, POOL_IDX.int(), *POOL)],
        ["expected indices of dtype int64", "Int"]),
    "max_pool2d_backward indices shape": (
        lambda: aten.max_pool2d_with_indices_backward(POOL_OUT, Y, *POOL[:-1], False,
                                                      POOL_IDX[..., :1]),
        [lambda: P.max_pool2d_backward(POOL_OUT, Y, POOL_IDX[..., :1], *POOL)],
        ["expected indices of shape [1, 2, 2, 2]", "[1, 2, 2, 1]"]),
    "max_pool2d_backward grad dtype": (
        lambda: aten.max_pool2d_with_indices_backward(POOL_OUT.double(), Y, *POOL[:-1], False,
                                                      POOL_IDX),
        [lambda: P.max_pool2d_backward(POOL_OUT.double(), Y, POOL_IDX, *POOL)],
        ["expected grad_output to have the same dtype as input"]),
    # torch's backward does not check its indices; max_unpool2d, the same scatter, does
    "max_pool2d_backward index outside the plane": (
        lambda: F.max_unpool2d(POOL_OUT, torch.full_like(POOL_IDX, 16), 2, output_size=[4, 4]),
        [lambda: P.max_pool2d_backward(POOL_OUT, Y, torch.full_like(POOL_IDX, 16), *POOL)],
        ["indices[0, 0, 0, 0] = 16 lies outside the 4x4 input plane"]),
    # ---- conv2d_relu_max_pool2d: conv2d's checks keep conv2d's messages; the pool's name
    # pool_kernel_size, ... and the fused operator ----
    "fused weight dtype": (lambda: TORCH_FUSED(XF, W.double()),
                           [lambda: FUSED(XF, W.double()), lambda: fused_ops(w=W.double())],
                           ["pyengine.conv2d: expected weight to have the same dtype as input",
                            "Double"]),
    "fused bias dtype": (lambda: TORCH_FUSED(XF, W, B.double()),
                         [lambda: FUSED(XF, W, B.double()), lambda: fused_ops(b=B.double())],
                         ["expected bias to have the same dtype as input"]),
    "fused weight rank": (lambda: TORCH_FUSED(XF, W[0]),
                          [lambda: FUSED(XF, W[0]), lambda: fused_ops(w=W[0]),
                           lambda: FUSED(XF, W[0], padding="same")],
                          ["expected weight to be 4-D", "[2, 3, 3]"]),
    "fused input rank": (lambda: TORCH_FUSED(XF[0, 0], W),
                         [lambda: FUSED(XF[0, 0], W), lambda: fused_ops(x=XF[0, 0])],
                         ["expected input to be 3-D (C, H, W) or 4-D", "[6, 6]"]),
    "fused channels": (lambda: TORCH_FUSED(XF, r(3, 3, 3, 3)),
                       [lambda: FUSED(XF, r(3, 3, 3, 3)), lambda: fused_ops(w=r(3, 3, 3, 3))],
                       ["to have 3 channels", "but got 2 channels"]),
    "fused kernel too big": (lambda: TORCH_FUSED(XF, r(3, 2, 7, 3)),
                             [lambda: FUSED(XF, r(3, 2, 7, 3)), lambda: fused_ops(w=r(3, 2, 7, 3))],
                             ["(dilated) kernel to fit in the padded input", "7x3", "6x6"]),
    "fused bias shape": (lambda: TORCH_FUSED(XF, W, r(4)),
                         [lambda: FUSED(XF, W, r(4)), lambda: fused_ops(b=r(4))],
                         ["expected bias of shape [3]", "[4]"]),
    "fused stride 0": (lambda: TORCH_FUSED(XF, W, stride=0),
                       [lambda: FUSED(XF, W, stride=0), lambda: fused_ops(stride=(0, 1))],
                       ["expected stride to be positive"]),
    "fused stride length": (lambda: TORCH_FUSED(XF, W, stride=(1, 1, 1)),
                            [lambda: FUSED(XF, W, stride=(1, 1, 1))],
                            ["stride", "an int or a pair of ints", "(1, 1, 1)"]),
    "fused groups 0": (lambda: TORCH_FUSED(XF, W, groups=0),
                       [lambda: FUSED(XF, W, groups=0), lambda: fused_ops(groups=0)],
                       ["expected groups to be positive", "groups=0"]),
    "fused padding string": (lambda: TORCH_FUSED(XF, W, padding="full"),
                             [lambda: FUSED(XF, W, padding="full")], ["padding", "'full'"]),
    "fused same and stride": (lambda: TORCH_FUSED(XF, W, padding="same", stride=2),
                              [lambda: FUSED(XF, W, padding="same", stride=2)],
                              ["padding='same'", "strided"]),
    "fused no output channels": (lambda: TORCH_FUSED(XF, r(0, 2, 3, 3)),
                                 [lambda: FUSED(XF, r(0, 2, 3, 3)),
                                  lambda: fused_ops(w=r(0, 2, 3, 3))],
                                 ["pyengine.conv2d_relu_max_pool2d:", "non-zero channels",
                                  "[1, 0, 4, 4]"]),
    "fused pool_kernel_size length": (lambda: TORCH_FUSED(XF, W, pool_kernel_size=(2, 2, 2)),
                                      [lambda: FUSED(XF, W, pool_kernel_size=(2, 2, 2))],
                                      ["pool_kernel_size", "an int or a pair of ints",
                                       "(2, 2, 2)"]),
    "fused pool_kernel_size length (op)": (
        lambda: TORCH_FUSED(XF, W, pool_kernel_size=(2, 2, 2)),
        [lambda: fused_ops(k=(2, 2, 2))],
        ["pyengine.conv2d_relu_max_pool2d: expected pool_kernel_size to have 2 values"]),
    "fused pool_kernel_size type": (lambda: TORCH_FUSED(XF, W, pool_kernel_size="2"),
                                    [lambda: FUSED(XF, W, pool_kernel_size="2")],
                                    ["pool_kernel_size", "'2'"]),
    "fused pool_kernel_size float": (lambda: TORCH_FUSED(XF, W, pool_kernel_size=1.5),
                                     [lambda: FUSED(XF, W, pool_kernel_size=1.5)],
                                     ["pool_kernel_size", "1.5"]),
    "fused pool_kernel_size 0": (lambda: TORCH_FUSED(XF, W, pool_kernel_size=0),
                                 [lambda: FUSED(XF, W, pool_kernel_size=0),
                                  lambda: FUSED(XF, W, pool_kernel_size=0, pool_stride=1),
                                  lambda: fused_ops(k=(0, 2))],
                                 ["pyengine.conv2d_relu_max_pool2d: expected pool_kernel_size "
                                  "to be positive"]),
    "fused pool_stride 0": (lambda: TORCH_FUSED(XF, W, pool_stride=0),
                            [lambda: FUSED(XF, W, pool_stride=0), lambda: fused_ops(s=(2, 0))],
                            ["pyengine.conv2d_relu_max_pool2d: expected pool_stride to be "
                             "positive"]),
    "fused pool_stride length": (lambda: TORCH_FUSED(XF, W, pool_stride=(1, 1, 1)),
                                 [lambda: FUSED(XF, W, pool_stride=(1, 1, 1))],
                                 ["pool_stride", "(1, 1, 1)"]),
    "fused pool_padding -1": (lambda: TORCH_FUSED(XF, W, pool_padding=-1),
                              [lambda: FUSED(XF, W, pool_padding=-1),
                               lambda: fused_ops(p=(0, -1))],
                              ["pyengine.conv2d_relu_max_pool2d: expected pool_padding to be "
                               "non-negative"]),
    "fused pool_padding over half": (lambda: TORCH_FUSED(XF, W, pool_padding=2),
                                     [lambda: FUSED(XF, W, pool_padding=2),
                                      lambda: fused_ops(p=(2, 0))],
                                     ["pyengine.conv2d_relu_max_pool2d: expected pool_padding "
                                      "to be at most half", "pool_kernel_size=[2, 2]"]),
    "fused pool_dilation 0": (lambda: TORCH_FUSED(XF, W, pool_dilation=0),
                              [lambda: FUSED(XF, W, pool_dilation=0),
                               lambda: fused_ops(d=(1, 0))],
                              ["pyengine.conv2d_relu_max_pool2d: expected pool_dilation to be "
                               "positive"]),
    "fused pool window too big": (lambda: TORCH_FUSED(XF, W, pool_kernel_size=5),
                                  [lambda: FUSED(XF, W, pool_kernel_size=5),
                                   lambda: fused_ops(k=(5, 5), s=(1, 1)),
                                   lambda: FUSED(XF, W, pool_kernel_size=3, pool_dilation=2)],
                                  ["pyengine.conv2d_relu_max_pool2d: expected the (dilated) "
                                   "kernel", "4x4", "pool_kernel_size=", "pool_dilation="]),
    "fused huge pool_kernel_size": (lambda: TORCH_FUSED(XF, W, pool_kernel_size=2**63 - 1),
                                    [lambda: FUSED(XF, W, pool_kernel_size=2**63 - 1)],
                                    [f"pool_kernel_size=[{2**63 - 1}, {2**63 - 1}]",
                                     "overflows"]),
    "fused huge pool_padding": (lambda: TORCH_FUSED(XF, W, pool_padding=2**62),
                                [lambda: FUSED(XF, W, pool_padding=2**62)],
                                [f"pool_padding=[{2**62}, {2**62}]"]),
    "fused_backward grad shape": (
        lambda: aten.max_pool2d_with_indices_backward(r(1, 2, 3, 2), Y, *POOL[:-1], False,
                                                      POOL_IDX),
        [lambda: fused_backward(grad=r(1, 3, 3, 2))],
        ["pyengine.conv2d_relu_max_pool2d_backward: expected grad_output of shape [1, 3, 2, 2]",
         "[1, 3, 3, 2]"]),
    "fused_backward grad dtype": (
        lambda: aten.max_pool2d_with_indices_backward(POOL_OUT.double(), Y, *POOL[:-1], False,
                                                      POOL_IDX),
        [lambda: fused_backward(grad=FUSED_OUT.double())],
        ["expected grad_output to have the same dtype as input"]),
    "fused_backward result shape": (
        lambda: aten.threshold_backward(r(1, 3, 2, 2), r(1, 3, 2, 3), 0),
        [lambda: fused_backward(result=r(1, 3, 2, 3))],
        ["expected result to have the same shape as grad_output [1, 3, 2, 2]", "[1, 3, 2, 3]"]),
    "fused_backward indices dtype": (
        lambda: aten.max_pool2d_with_indices_backward(POOL_OUT, Y, *POOL[:-1], False,
                                                      POOL_IDX.int()),
        [lambda: fused_backward(indices=FUSED_IDX.int())],
        ["expected indices of dtype int64", "Int"]),
    "fused_backward indices shape": (
        lambda: aten.max_pool2d_with_indices_backward(POOL_OUT, Y, *POOL[:-1], False,
                                                      POOL_IDX[..., :1]),
        [lambda: fused_backward(indices=FUSED_IDX[..., :1])],
        ["expected indices to have the same shape as grad_output [1, 3, 2, 2]",
         "[1, 3, 2, 1]"]),
    "fused_backward index outside the plane": (
        lambda: F.max_unpool2d(POOL_OUT, torch.full_like(POOL_IDX, 16), 2, output_size=[4, 4]),
        [lambda: fused_backward(grad=torch.ones_like(FUSED_OUT), result=torch.ones_like(FUSED_OUT),
                                indices=torch.full_like(FUSED_IDX, 16))],
        ["indices[0, 0, 0, 0] = 16 lies outside the 4x4"]),
    "fused_backward pool window too big": (
        lambda: TORCH_FUSED(XF, W, pool_kernel_size=5),
        [lambda: P.conv2d_relu_max_pool2d_backward(FUSED_OUT, FUSED_OUT, FUSED_IDX, XF, W, *CONV,
                                                   [5, 5], [2, 2], [0, 0], [1, 1], False, ALL)],
        ["expected the (dilated) kernel", "pool_kernel_size=[5, 5]"]),
    # ---- linear ----
    "linear 0-d input": (lambda: F.linear(torch.tensor(1.0), r(3, 2)),
                         [lambda: PF.linear(torch.tensor(1.0), r(3, 2))],
                         ["expected input to have at least 1 dim"]),
    "linear weight rank": (lambda: F.linear(r(4, 2), r(3, 2, 1)),
                           [lambda: PF.linear(r(4, 2), r(3, 2, 1)),
                            lambda: P.linear(r(4, 2), r(3, 2, 1), None)],
                           ["expected weight to be 2-D", "[3, 2, 1]"]),
    "linear features": (lambda: F.linear(r(4, 2), r(3, 5)), [lambda: PF.linear(r(4, 2), r(3, 5))],
                        ["input's last dim to equal weight's in_features (5)"]),
    "linear bias shape": (lambda: F.linear(r(4, 2), r(3, 2), r(4)),
                          [lambda: PF.linear(r(4, 2), r(3, 2), r(4))],
                          ["expected bias of shape [3]", "[4]"]),
    "linear weight dtype": (lambda: F.linear(r(4, 2), r(3, 2).double()),
                            [lambda: PF.linear(r(4, 2), r(3, 2).double())],
                            ["expected weight to have the same dtype as input"]),
    "linear bias dtype": (lambda: F.linear(r(4, 2), r(3, 2), r(3).double()),
                          [lambda: PF.linear(r(4, 2), r(3, 2), r(3).double())],
                          ["expected bias to have the same dtype as input"]),
    # ---- activations ----
    "leaky_relu int": (lambda: F.leaky_relu(long(3)), [lambda: PF.leaky_relu(long(3))],
                       [SUPPORTED_DTYPES_TEXT, "Long"]),
    "softmax int": (lambda: F.softmax(long(3), 0), [lambda: PF.softmax(long(3), 0)],
                    [SUPPORTED_DTYPES_TEXT, "Long"]),
    "log_softmax int": (lambda: F.log_softmax(long(3), 0), [lambda: PF.log_softmax(long(3), 0)],
                        [SUPPORTED_DTYPES_TEXT, "Long"]),
    "softmax dim": (lambda: F.softmax(r(3), 2), [lambda: PF.softmax(r(3), 2)],
                    ["dim out of range", "[-1, 0]", "got 2"]),
    "relu_backward shape": (lambda: aten.threshold_backward(r(3), r(4), 0),
                            [lambda: P.relu_backward(r(3), r(4))], ["same shape", "[3]", "[4]"]),
    "sigmoid_backward shape": (lambda: aten.sigmoid_backward(r(3), r(4)),
                               [lambda: P.sigmoid_backward(r(3), r(4))], ["same shape"]),
    "tanh_backward shape": (lambda: aten.tanh_backward(r(3), r(4)),
                            [lambda: P.tanh_backward(r(3), r(4))], ["same shape"]),
    "leaky_relu_backward shape": (lambda: aten.leaky_relu_backward(r(3), r(4), 0.01, False),
                                  [lambda: P.leaky_relu_backward(r(3), r(4), 0.01)],
                                  ["same shape"]),
    "softmax_backward shape": (lambda: aten._softmax_backward_data(r(3), r(4), 0, torch.float),
                               [lambda: P.softmax_backward(r(3), r(4), 0)], ["same shape"]),
    "softmax_backward dim": (lambda: aten._softmax_backward_data(r(3), r(3), 2, torch.float),
                             [lambda: P.softmax_backward(r(3), r(3), 2)], ["dim out of range"]),
    # ---- losses ----
    "mse_loss shapes": (lambda: F.mse_loss(r(3), r(4)), [lambda: PF.mse_loss(r(3), r(4))],
                        ["must match"]),
    "mse_loss shapes (op)": (lambda: aten.mse_loss(r(3), r(4), 1),
                             [lambda: P.mse_loss(r(3), r(4), None, 1)],
                             ["expected target to have the same shape as input"]),
    "mse_loss reduction string": (lambda: F.mse_loss(r(3), r(3), reduction="avg"),
                                  [lambda: PF.mse_loss(r(3), r(3), reduction="avg")],
                                  ["not a valid value for reduction"]),
    "mse_loss reduction number": (lambda: aten.mse_loss(r(3), r(3), 5),
                                  [lambda: P.mse_loss(r(3), r(3), None, 5)],
                                  ["expected reduction to be 0 ('none'), 1 ('mean') or 2 ('sum')",
                                   "but got 5"]),
    "mse_loss int": (lambda: F.mse_loss(long(3), long(3)), [lambda: PF.mse_loss(long(3), long(3))],
                     [SUPPORTED_DTYPES_TEXT]),
    "mse_loss weight shape": (lambda: F.mse_loss(r(3), r(3), weight=r(4)),
                              [lambda: PF.mse_loss(r(3), r(3), weight=r(4))],
                              ["expected weight to have the input's shape [3]", "[4]"]),
    "mse_loss_backward grad shape": (lambda: aten.mse_loss_backward(r(2), r(3), r(3), 0),
                                     [lambda: P.mse_loss_backward(r(2), r(3), r(3), None, 0)],
                                     ["expected grad_output of shape [3]", "[2]"]),
    "binary_cross_entropy sizes": (lambda: F.binary_cross_entropy(torch.rand(3), torch.rand(4)),
                                   [lambda: PF.binary_cross_entropy(torch.rand(3),
                                                                    torch.rand(4))],
                                   ["different to the input size"]),
    "binary_cross_entropy sizes (op)": (
        lambda: aten.binary_cross_entropy(torch.rand(3), torch.rand(4), None, 1),
        [lambda: P.binary_cross_entropy(torch.rand(3), torch.rand(4), None, 1)],
        ["expected target to have the same shape as input"]),
    "binary_cross_entropy weight shape": (
        lambda: F.binary_cross_entropy(PROB, PROB, torch.rand(5)),
        [lambda: PF.binary_cross_entropy(PROB, PROB, torch.rand(5))], []),
    "binary_cross_entropy weight shape (op)": (
        lambda: aten.binary_cross_entropy(PROB, PROB, torch.rand(5), 1),
        [lambda: P.binary_cross_entropy(PROB, PROB, torch.rand(5), 1)],
        ["expected weight to have the same shape as input"]),
    "binary_cross_entropy domain": (lambda: F.binary_cross_entropy(PROB + 2, PROB),
                                    [lambda: PF.binary_cross_entropy(PROB + 2, PROB)],
                                    ["should be between 0 and 1"]),
    "binary_cross_entropy dtypes": (lambda: F.binary_cross_entropy(PROB, PROB.double()),
                                    [lambda: PF.binary_cross_entropy(PROB, PROB.double())],
                                    ["expected target to have the same dtype as input"]),
    "binary_cross_entropy int": (lambda: F.binary_cross_entropy(long(3), long(3)),
                                 [lambda: PF.binary_cross_entropy(long(3), long(3))],
                                 [SUPPORTED_DTYPES_TEXT]),
    "binary_cross_entropy_backward grad shape": (
        lambda: aten.binary_cross_entropy_backward(r(2), PROB[0], PROB[0], None, 0),
        [lambda: P.binary_cross_entropy_backward(r(2), PROB[0], PROB[0], None, 0)],
        ["expected grad_output of shape [4]"]),
    "cross_entropy target dtype": (lambda: F.cross_entropy(r(3, 4), long(3).int()),
                                   [lambda: PF.cross_entropy(r(3, 4), long(3).int())],
                                   ["expected target to hold class indices as int64", "Int"]),
    "cross_entropy batch sizes": (lambda: F.cross_entropy(r(3, 4), long(2)),
                                  [lambda: PF.cross_entropy(r(3, 4), long(2))],
                                  ["expected target of shape [3]", "[2]"]),
    "cross_entropy 0-d target": (lambda: F.cross_entropy(r(3, 4), long()),
                                 [lambda: PF.cross_entropy(r(3, 4), long())],
                                 ["expected target of shape [3]", "[]"]),
    "cross_entropy 2-d target": (lambda: F.cross_entropy(r(3, 4), long(3, 1)),
                                 [lambda: PF.cross_entropy(r(3, 4), long(3, 1))],
                                 ["expected target of shape [3]", "[3, 1]"]),
    "cross_entropy unbatched, 1-d target": (lambda: F.cross_entropy(r(4), long(2)),
                                            [lambda: PF.cross_entropy(r(4), long(2))],
                                            ["expected a 0-d target", "[2]"]),
    "cross_entropy unbatched, 2-d target": (lambda: F.cross_entropy(r(4), long(1, 1)),
                                            [lambda: PF.cross_entropy(r(4), long(1, 1))],
                                            ["expected a 0-d target", "[1, 1]"]),
    "cross_entropy 0-d input": (lambda: F.cross_entropy(torch.tensor(1.0), long()),
                                [lambda: PF.cross_entropy(torch.tensor(1.0), long())],
                                ["expected input to be 1-D (C) or 2-D (N, C)"]),
    "cross_entropy weight shape": (lambda: F.cross_entropy(r(3, 4), long(3), weight=r(5)),
                                   [lambda: PF.cross_entropy(r(3, 4), long(3), weight=r(5))],
                                   ["expected weight of shape [4]", "[5]"]),
    "cross_entropy weight dtype": (lambda: F.cross_entropy(r(3, 4), long(3), weight=r(4).double()),
                                   [lambda: PF.cross_entropy(r(3, 4), long(3),
                                                             weight=r(4).double())],
                                   ["expected weight to have the same dtype as input"]),
    "cross_entropy target out of range": (lambda: F.cross_entropy(r(3, 4), torch.full((3,), 7)),
                                          [lambda: PF.cross_entropy(r(3, 4), torch.full((3,), 7))],
                                          ["target 7 is out of bounds"]),
    "cross_entropy spatial target": (lambda: F.cross_entropy(r(3, 4, 5), long(3, 6)),
                                     [lambda: PF.cross_entropy(r(3, 4, 5), long(3, 6))],
                                     ["expected target of shape [3, 5]", "[3, 6]"]),
    "cross_entropy int input": (lambda: F.cross_entropy(long(3, 4), long(3)),
                                [lambda: PF.cross_entropy(long(3, 4), long(3))],
                                [SUPPORTED_DTYPES_TEXT]),
    "cross_entropy label smoothing above 1": (
        lambda: F.cross_entropy(r(3, 4), long(3), label_smoothing=1.5),
        [lambda: PF.cross_entropy(r(3, 4), long(3), label_smoothing=1.5),
         lambda: PF.cross_entropy(r(3, 4), PROB, label_smoothing=1.5),
         lambda: P.cross_entropy_backward(torch.tensor(1.0), r(3, 4), long(3), None, 1, -100,
                                          1.5)],
        ["label_smoothing must be between 0.0 and 1.0", "1.5"]),
    "cross_entropy float target of another shape": (
        lambda: F.cross_entropy(r(3, 4), torch.rand(3)),
        [lambda: PF.cross_entropy(r(3, 4), torch.rand(3))],
        ["floating target to hold class probabilities of input's shape [3, 4]", "[3]"]),
    "cross_entropy int target of input's shape": (
        lambda: F.cross_entropy(r(3, 4), long(3, 4)),
        [lambda: PF.cross_entropy(r(3, 4), long(3, 4))],
        ["target of input's shape [3, 4] holds class probabilities", "Long"]),
    "cross_entropy int spatial target of input's shape": (
        lambda: F.cross_entropy(r(3, 4, 5), long(3, 4, 5)),
        [lambda: PF.cross_entropy(r(3, 4, 5), long(3, 4, 5))],
        ["[3, 4, 5] (floating class probabilities)", "torch.int64"]),
    "cross_entropy probabilities with ignore_index": (
        lambda: F.cross_entropy(r(3, 4), PROB, ignore_index=1),
        [lambda: PF.cross_entropy(r(3, 4), PROB, ignore_index=1)],
        ["ignore_index is not supported for class-probability targets", "1"]),
    "cross_entropy reduction": (lambda: F.cross_entropy(r(3, 4), long(3), reduction="avg"),
                                [lambda: PF.cross_entropy(r(3, 4), long(3), reduction="avg")],
                                ["not a valid value for reduction"]),
    # ---- modules ----
    "RNN input rank": (lambda: rnn_pair()[0](r(1, 2, 3, 2)), [lambda: rnn_pair()[1](r(1, 2, 3, 2))],
                       ["expected input to be 2-D (L, H_in) or 3-D", "[1, 2, 3, 2]"]),
    "RNN hx shape": (lambda: rnn_pair()[0](r(4, 2, 2), r(1, 3, 3)),
                     [lambda: rnn_pair()[1](r(4, 2, 2), r(1, 3, 3))],
                     ["expected hx of shape [1, 2, 3]", "[1, 3, 3]"]),
    # float8: a floating dtype neither pyengine nor torch's CPU convolution computes in
    "conv2d float8": (lambda: F.conv2d(X.to(F8), W.to(F8)),
                      [lambda: PF.conv2d(X.to(F8), W.to(F8))],
                      [SUPPORTED_DTYPES_TEXT, "Float8_e4m3fn"]),
    "conv2d_relu_max_pool2d float8": (lambda: TORCH_FUSED(XF.to(F8), W.to(F8)),
                                      [lambda: FUSED(XF.to(F8), W.to(F8))],
                                      [SUPPORTED_DTYPES_TEXT, "Float8_e4m3fn"]),
}


def raised_by(call):
    try:
        call()
    except Exception as exc:  # noqa: BLE001 - the class is what is under test
        return exc
    return None


@pytest.mark.filterwarnings("ignore:Using a target size")  # mse_loss's, before its error
@pytest.mark.parametrize("case", list(CASES))
def test_same_except_clause_as_torch(case):
    torch_call, our_calls, fragments = CASES[case]
    theirs = raised_by(torch_call)
    assert theirs is not None, f"torch accepts {case!r}: move it to DECLINED"
    for call in our_calls:
        ours = raised_by(call)
        assert ours is not None, case
        assert isinstance(ours, type(theirs)), (
            f"{case}: pyengine raised {type(ours).__name__}, torch {type(theirs).__name__}: "
            f"{ours}")
        for fragment in fragments:
            assert fragment in str(ours), (fragment, str(ours))


def test_python_layer_errors_are_still_value_errors():
    """Before, the Python layer raised ValueError where torch raises RuntimeError or TypeError:
    `except ValueError` keeps catching them."""
    for call in (lambda: PF.conv2d(X, W, stride=(1, 1, 1)), lambda: PF.conv2d(X, W, stride="2"),
                 lambda: PF.conv2d(X, W, padding="full"),
                 lambda: FUSED(XF, W, pool_kernel_size=(2, 2, 2)),
                 lambda: FUSED(XF, W, padding="full"),
                 lambda: PF.cross_entropy(r(3, 4, 5), long(3, 6)),
                 lambda: rnn_pair()[1](r(4, 2, 2), r(1, 3, 3))):
        with pytest.raises(ValueError):
            call()


# name: (torch's call that succeeds, [pyengine's calls], class pyengine raises, [fragments])
DECLINED = {
    "relu int": (lambda: F.relu(long(3)), [lambda: PF.relu(long(3)), lambda: P.relu(long(3))],
                 NotImplementedError, [SUPPORTED_DTYPES_TEXT, "Long"]),
    "sigmoid int": (lambda: torch.sigmoid(long(3)), [lambda: PF.sigmoid(long(3))],
                    NotImplementedError, [SUPPORTED_DTYPES_TEXT]),
    "tanh int": (lambda: torch.tanh(long(3)), [lambda: PF.tanh(long(3))], NotImplementedError,
                 [SUPPORTED_DTYPES_TEXT]),
    "conv2d int": (lambda: F.conv2d(X.long(), W.long()),
                   [lambda: PF.conv2d(X.long(), W.long())], NotImplementedError,
                   [SUPPORTED_DTYPES_TEXT, "Long"]),
    "max_pool2d int": (lambda: F.max_pool2d(Y.long(), 2), [lambda: PF.max_pool2d(Y.long(), 2)],
                       NotImplementedError, [SUPPORTED_DTYPES_TEXT]),
    "conv2d_relu_max_pool2d int": (lambda: TORCH_FUSED(XF.long(), W.long()),
                                   [lambda: FUSED(XF.long(), W.long()),
                                    lambda: fused_ops(x=XF.long(), w=W.long())],
                                   NotImplementedError, [SUPPORTED_DTYPES_TEXT, "Long"]),
    # torch's relu backward promotes a result of another dtype; pyengine's backward wants input's
    "conv2d_relu_max_pool2d_backward result dtype": (
        lambda: aten.threshold_backward(r(1, 3, 2, 2), r(1, 3, 2, 2).double(), 0),
        [lambda: fused_backward(result=FUSED_OUT.double())], RuntimeError,
        ["expected result to have the same dtype as input"]),
    "sigmoid_backward dtypes": (lambda: aten.sigmoid_backward(r(3), r(3).double()),
                                [lambda: P.sigmoid_backward(r(3), r(3).double())], RuntimeError,
                                ["expected result to have the same dtype as grad_output"]),
    "mse_loss dtypes": (lambda: F.mse_loss(r(3), r(3).double()),
                        [lambda: PF.mse_loss(r(3), r(3).double())], RuntimeError,
                        ["expected target to have the same dtype as input"]),
    # the operator takes a weight of input's shape; pyengine.functional broadcasts it first
    "binary_cross_entropy op, broadcast weight": (
        lambda: aten.binary_cross_entropy(PROB, PROB, torch.rand(4), 1),
        [lambda: P.binary_cross_entropy(PROB, PROB, torch.rand(4), 1)], RuntimeError,
        ["expected weight to have the same shape as input [3, 4]", "[4]"]),
    "linear 1-d weight": (lambda: F.linear(r(4, 2), r(2)), [lambda: PF.linear(r(4, 2), r(2))],
                          RuntimeError, ["expected weight to be 2-D", "[2]"]),
    # torch ignores a negative (or NaN) label_smoothing; pyengine refuses it as it refuses > 1
    "cross_entropy negative label smoothing": (
        lambda: F.cross_entropy(r(3, 4), long(3), label_smoothing=-0.1),
        [lambda: PF.cross_entropy(r(3, 4), long(3), label_smoothing=-0.1),
         lambda: P.cross_entropy(r(3, 4), long(3), None, 1, -100, -0.1)], RuntimeError,
        ["label_smoothing must be between 0.0 and 1.0", "-0.1"]),
    # torch promotes mixed dtypes; pyengine has no kernel for them
    "cross_entropy probabilities of another dtype": (
        lambda: F.cross_entropy(r(3, 4), torch.rand(3, 4, dtype=torch.float64)),
        [lambda: PF.cross_entropy(r(3, 4), torch.rand(3, 4, dtype=torch.float64))],
        NotImplementedError, ["class-probability target", "torch.float64"]),
    "cross_entropy probabilities of another dtype (op)": (
        lambda: F.cross_entropy(r(3, 4), torch.rand(3, 4, dtype=torch.float64)),
        [lambda: P.cross_entropy(r(3, 4), torch.rand(3, 4, dtype=torch.float64), None, 1, -100)],
        RuntimeError, ["expected target to have the same dtype as input", "Double"]),
    # torch reads a 1-element target of an unbatched input as its class; pyengine wants 0-d,
    # with the ValueError torch gives any other 1-d target
    "cross_entropy unbatched, 1-element target": (lambda: F.cross_entropy(r(4), long(1)),
                                                  [lambda: PF.cross_entropy(r(4), long(1))],
                                                  ValueError, ["expected a 0-d target", "[1]"]),
}


@pytest.mark.parametrize("case", list(DECLINED))
def test_declined_calls_raise_a_runtime_error(case):
    torch_call, our_calls, exc_type, fragments = DECLINED[case]
    torch_call()
    for call in our_calls:
        ours = raised_by(call)
        assert isinstance(ours, exc_type), (case, ours)
        for fragment in fragments:
            assert fragment in str(ours), (fragment, str(ours))
