"""One list of sample inputs per operator, in the spirit of PyTorch's OpInfo sample_inputs.

Each sample is a fuzz_configs.Case (a call of pyengine.functional.<op> or pyengine.fused.<op>,
the same call as torch's function or composition: fuzz_configs.pyengine_function and
torch_function), drawn by fuzz_configs' generator of that op with some params forced,
so the list covers the op's options: COVER below, one sample per entry. The lists drive

  tests/test_samples.py  every sample against torch (tests/differential.py), forward and
                         gradients; float64 gradcheck on every sample (gradcheck_case: the same
                         call on smooth values); torch.library.opcheck on samples of every
                         operator, forward and backward (op_calls: the operator calls a sample
                         makes);
  tests/test_cuda.py     every sample's operator calls on CUDA against the CPU kernels;
  tests/test_conv2d.py, tests/test_linear.py
                         every sample under each compiled CPU instruction set.

COVER samples are small (at most MAX_NUMEL elements over their tensors), so that gradcheck and
opcheck are cheap; LARGE adds hand-picked bigger calls (tiles, long rows, many terms), compared
with torch and across devices only. The lists are the same on every run and machine: each op's
draws come from a generator seeded with the op's name. Edge cases and bad input stay with the
tests of each op (tests/test_<op family>.py).

Adding an operator: a generator in fuzz_configs.OPS and its entries here (a pyengine.fused
function also its torch composition in pyengine._fused.TORCH_EQUIVALENTS); tests/test_registry.py
checks that every schema gets samples.
"""
import functools
import random
import zlib
from typing import List, NamedTuple, Tuple

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import fuzz_configs
from differential import call
from fuzz_configs import Case, TensorSpec, build, draw, materialize

REDUCTIONS = fuzz_configs.REDUCTIONS
PLAIN = dict(specials=())           # a tensor without NaN / inf
NAN_INF = dict(specials=("nan", "inf", "-inf"))

# cross_entropy's three kinds of call (fuzz_configs.draw_cross_entropy).
_CLASSES = dict(probabilities=False, label_smoothing=0.0)
_SMOOTHED = dict(probabilities=False, label_smoothing=0.1)
_PROBABILITIES = dict(probabilities=True, ignore_index=-100, target_grad=True,
                      label_smoothing=0.0)

# The options each op's samples cover: one sample per entry, a random legal call with these params
# forced (fuzz_configs.draw; a tensor's options as a dict, merged into the drawn ones). An empty
# entry is a plain random draw.
COVER = {
    "conv2d": [
        {}, {}, {},
        dict(groups=1, bias=False),
        dict(groups=2, in_per_group=2, out_per_group=1),
        dict(groups=3, in_per_group=1, out_per_group=2),            # depthwise, multiplier 2
        dict(padding="same", stride=(1, 1), kernel=(3, 3)),
        dict(padding="same", stride=(1, 1), kernel=(2, 3), dilation=(2, 1)),  # odd total padding
        dict(padding="valid", stride=(1, 1)),
        dict(padding="valid", stride=(2, 3)),
        dict(padding=(2, 0), stride=(2, 3)),
        dict(padding=(0, 1), dilation=(2, 3)),
        dict(kernel=(1, 1), padding=(0, 0)),                         # pointwise
        dict(batch=None),                                            # unbatched
        dict(batch=None, groups=2, bias=False),
        dict(batch=0),                                               # empty batch
        dict(batch=16, stride=(1, 1)),                               # batch-innermost path
        dict(batch=17, stride=(1, 1), padding=(2, 2), dilation=(2, 2)),
        dict(stride=(1, 1), dilation=(1, 1), padding=(1, 1), kernel=(3, 3), width=19,
             out_per_group=5),                                # direct path: a vector + a tail
        dict(input=dict(layout="channels_last")),
        dict(input=dict(layout="channels_last"), weight=dict(layout="channels_last")),
        dict(input=dict(layout="strided"), weight=dict(layout="transposed")),
        dict(input=dict(layout="offset"), bias_tensor=dict(layout="strided")),
        dict(input=dict(NAN_INF, layout="contiguous")),
        dict(weight=dict(specials=("inf",))),
        dict(scalar_args=True),
        dict(frozen=("input",)), dict(frozen=("weight", "bias"), bias=True),
        dict(frozen=("input", "weight"), bias=True),
        dict(dtype="float32"), dict(dtype="float64"),
    ],
    # pyengine.fused.conv2d_relu_max_pool2d: conv2d's options, the pool's, and values where relu
    # and the max decide (ties, zeros, windows whose maximum is <= 0: a 0 without gradient)
    "conv2d_relu_max_pool2d": [
        {}, {}, {},
        dict(groups=1, bias=False),
        dict(groups=2, in_per_group=2, out_per_group=1),
        dict(groups=3, in_per_group=1, out_per_group=2),            # depthwise, multiplier 2
        dict(padding="same", stride=(1, 1), kernel=(3, 3)),
        dict(padding="same", stride=(1, 1), kernel=(2, 3), dilation=(1, 1)),  # odd total padding
        dict(padding="valid", stride=(1, 1)),
        dict(stride=(2, 2), padding=(1, 1), kernel=(3, 3)),         # a strided convolution
        dict(dilation=(2, 1), padding=(0, 1)),
        dict(pool_kernel=(2, 2), pool_stride=None, pool_padding=(0, 0), pool_dilation=(1, 1),
             kernel=(5, 5), padding=(0, 0), stride=(1, 1), dilation=(1, 1)),  # LeNet's block
        dict(pool_kernel=(3, 3), pool_stride=(2, 2), pool_padding=(0, 0), pool_dilation=(1, 1),
             height=9, width=9, kernel=(3, 3), padding=(1, 1), stride=(1, 1),
             dilation=(1, 1)),                                # AlexNet's overlapping 3x3 / 2 pool
        dict(pool_ceil_mode=True, pool_kernel=(3, 3), pool_stride=(2, 2), pool_padding=(0, 0),
             pool_dilation=(1, 1), height=8, width=9, kernel=(2, 2), padding=(0, 0),
             stride=(1, 1), dilation=(1, 1)),                 # ceil_mode adds a last column
        dict(pool_ceil_mode=True, pool_kernel=(2, 2), pool_stride=(3, 2), pool_padding=(1, 1)),
        dict(pool_kernel=(3, 2), pool_stride=(2, 1), pool_padding=(1, 1)),
        dict(pool_dilation=(2, 3), pool_kernel=(2, 2)),
        # width-2 conv2d output, pool taps at columns -1 and 2: windows without an input element
        dict(pool_kernel=(1, 2), pool_stride=(1, 1), pool_padding=(0, 1), pool_dilation=(1, 3),
             width=2, kernel=(1, 1), padding=(0, 0), stride=(1, 1), dilation=(1, 1)),
        dict(pool_kernel=(1, 1), pool_stride=(1, 1), pool_padding=(0, 0),
             pool_dilation=(1, 1)),                           # a 1x1 pool: relu(conv2d) itself
        dict(batch=None),                                            # unbatched
        dict(batch=None, groups=2, bias=False),
        dict(batch=0),                                               # empty batch
        dict(batch=16, stride=(1, 1), padding=(0, 0), height=4, width=4,
             kernel=(2, 2)),                                         # batch-innermost path
        dict(input=dict(layout="channels_last")),
        dict(input=dict(layout="channels_last"), weight=dict(layout="channels_last")),
        dict(input=dict(layout="strided"), weight=dict(layout="transposed")),
        dict(input=dict(layout="offset"), bias_tensor=dict(layout="strided")),
        dict(input=dict(NAN_INF, layout="contiguous")),
        dict(weight=dict(specials=("inf",))),
        # exact ties and zeros: the first maximum wins, as torch's; a window whose maximum is
        # <= 0 gives 0 and passes no gradient
        dict(input=dict(values="ties"), weight=dict(values="ties"),
             bias_tensor=dict(values="ties")),
        dict(input=dict(values="ties"), weight=dict(values="ties"), bias=False,
             pool_kernel=(3, 3), pool_stride=(1, 1), pool_dilation=(1, 1)),  # overlapping
        dict(input=dict(values="ties"), weight=dict(values="ties"), bias=True, groups=1,
             in_per_group=1, bias_tensor=dict(values="ties"), dtype="float32"),
        dict(scalar_args=True),
        dict(frozen=("input",)), dict(frozen=("weight", "bias"), bias=True),
        dict(frozen=("input", "weight"), bias=True),
        dict(dtype="float32"), dict(dtype="float64"),
    ],
    "max_pool2d": [
        {}, {}, {},
        dict(return_indices=True), dict(return_indices=False),
        dict(ceil_mode=True, stride=(2, 2), kernel=(3, 3)),
        dict(ceil_mode=True, stride=(3, 2), kernel=(2, 2), padding=(1, 1)),
        dict(dilation=(2, 3)),
        dict(dilation=(3, 1), padding=(2, 0), kernel=(2, 1)),         # padding beyond k // 2
        dict(kernel=(1, 2), stride=(1, 1), padding=(0, 1), dilation=(1, 3), width=2),
        dict(stride=None),                                            # stride = kernel_size
        dict(batch=None), dict(batch=0), dict(batch=1),
        dict(input=dict(values="ties")),
        dict(input=dict(NAN_INF)),
        dict(input=dict(layout="channels_last")),
        dict(input=dict(layout="strided")),
        dict(input=dict(layout="transposed")),
        dict(scalar_args=True),
        dict(dtype="float32"), dict(dtype="float64"),
    ],
    "linear": [
        {}, {}, {},
        dict(bias=False), dict(bias=True),
        dict(lead=()),                                                # one input vector
        dict(lead=(1,)), dict(lead=(2, 3)), dict(lead=(2, 1, 3)),
        dict(lead=(0,)), dict(in_features=0), dict(out_features=0),
        dict(in_features=37, out_features=9),
        dict(input=dict(layout="transposed"), weight=dict(layout="transposed")),
        dict(input=dict(layout="strided"), bias_tensor=dict(layout="strided")),
        dict(input=dict(layout="expanded")),
        dict(input=dict(NAN_INF)),
        dict(frozen=("input",)), dict(frozen=("weight", "bias"), bias=True),
        dict(frozen=("input", "weight"), bias=True),
        dict(dtype="float32"), dict(dtype="float64"),
    ],
    "softmax": [
        {}, {}, {},
        dict(shape=(), dim=0), dict(shape=(), dim=-1), dict(shape=(6,), dim=0),
        dict(shape=(4, 10), dim=1), dict(shape=(4, 10), dim=0), dict(shape=(3, 7, 5), dim=1),
        dict(shape=(2, 3, 4, 5), dim=-3), dict(shape=(2, 3, 4, 5), dim=3),
        dict(shape=(0, 4), dim=1), dict(shape=(3, 0), dim=1), dict(shape=(2, 70), dim=1),
        dict(shape=(2, 3, 4, 5), input=dict(layout="channels_last")),
        dict(shape=(5, 6), input=dict(layout="transposed")),
        dict(input=dict(layout="strided")),
        dict(shape=(4, 9), input=dict(NAN_INF)),
        dict(scale=8),                                                # large logits
        dict(as_float64=True),                                        # dtype=torch.float64
        dict(dtype="float32", as_float64=False), dict(dtype="float64"),
    ],
    "mse_loss": [
        {}, {},
        *[dict(reduction=r, weighted=w) for r in REDUCTIONS for w in (False, True)],
        dict(shape=()), dict(shape=(0,)), dict(shape=(3, 0)), dict(shape=(1, 5)),
        dict(shape=(4, 3), broadcast=(0, (True, False))),             # target (1, 3)
        dict(shape=(2, 3, 4), broadcast=(1, (False, False, False))),  # target (3, 4)
        dict(input=dict(layout="transposed"), target=dict(layout="strided")),
        dict(input=dict(layout="channels_last")),
        dict(input=dict(NAN_INF), target=dict(specials=("nan",))),
        dict(dtype="float32"), dict(dtype="float64"),
    ],
    "binary_cross_entropy": [
        {}, {},
        *[dict(reduction=r, weight=w, grads="both") for r in REDUCTIONS
          for w in (None, "full", "last")],
        dict(grads="input"), dict(grads="target"),
        dict(grads="target", reduction="mean", weight="full"),
        dict(shape=()), dict(shape=(0,), grads="both"), dict(shape=(1, 5)),
        dict(target=dict(values="binary")), dict(target=dict(values="probability")),
        dict(input=dict(layout="transposed"), target=dict(layout="expanded"), grads="both"),
        dict(input=dict(layout="channels_last"), grads="both"),
        dict(input=dict(NAN_INF)),                                    # torch and pyengine refuse
        dict(dtype="float32"), dict(dtype="float64"),
    ],
    "cross_entropy": [
        {}, {},
        *[dict(_CLASSES, reduction=r, weighted=w, form="(N, C)") for r in REDUCTIONS
          for w in (False, True)],
        dict(_CLASSES, ignore_index=-100), dict(_CLASSES, ignore_index=1, classes=4),
        dict(_CLASSES, ignore_index=0),
        dict(_CLASSES, form="(C)"), dict(_CLASSES, form="(C)", reduction="sum", weighted=True),
        dict(_CLASSES, form="(N, C, d...)", spatial=(3, 4)),
        dict(_CLASSES, form="(N, C, d...)", spatial=(2,)),
        dict(_CLASSES, form="(N, C)", batch=0, reduction="sum"), dict(_CLASSES, form="(N, C)",
                                                                      batch=0),
        dict(_CLASSES, form="(N, C)", classes=1),
        dict(_CLASSES, form="(N, C)", classes=13),
        dict(_CLASSES, input=dict(layout="transposed")),
        dict(_CLASSES, input=dict(NAN_INF), form="(N, C)"),
        dict(_CLASSES, scale=8),
        # label smoothing with class indices: every reduction, weights, ignored rows, every form
        *[dict(_SMOOTHED, reduction=r, weighted=w, form="(N, C)", batch=6, classes=5)
          for r in REDUCTIONS for w in (False, True)],
        dict(_SMOOTHED, ignore_index=1, batch=7, classes=4, weighted=True, reduction="mean"),
        dict(_SMOOTHED, ignore_index=0, batch=6, classes=3, reduction="none"),
        dict(_SMOOTHED, label_smoothing=1.0, form="(N, C)", batch=4, classes=6, weighted=True),
        dict(_SMOOTHED, form="(C)", classes=9, reduction="mean"),
        dict(_SMOOTHED, form="(N, C, d...)", batch=2, classes=4, spatial=(3,), weighted=True,
             reduction="mean"),
        dict(_SMOOTHED, form="(N, C, d...)", batch=2, classes=3, spatial=(2, 2), reduction="none"),
        dict(_SMOOTHED, form="(N, C)", batch=0, reduction="mean"),
        dict(_SMOOTHED, form="(N, C)", batch=3, classes=1),
        dict(_SMOOTHED, form="(N, C)", batch=3, classes=37),
        dict(_SMOOTHED, input=dict(NAN_INF), form="(N, C)", batch=4, classes=5, reduction="none"),
        # class probabilities: every reduction, weights, smoothing, every form, target gradients
        *[dict(_PROBABILITIES, reduction=r, weighted=w, form="(N, C)", batch=5, classes=4)
          for r in REDUCTIONS for w in (False, True)],
        *[dict(_PROBABILITIES, reduction=r, weighted=True, label_smoothing=0.2, form="(N, C)",
               batch=4, classes=6) for r in REDUCTIONS],
        dict(_PROBABILITIES, label_smoothing=0.2, form="(N, C)", batch=3, classes=8),
        dict(_PROBABILITIES, label_smoothing=1.0, form="(N, C)", batch=3, classes=5,
             weighted=True),
        dict(_PROBABILITIES, target_grad=False, form="(N, C)", batch=4, classes=5, weighted=True),
        dict(_PROBABILITIES, form="(C)", classes=6),
        dict(_PROBABILITIES, form="(C)", classes=9, reduction="mean", label_smoothing=0.5,
             weighted=True),
        dict(_PROBABILITIES, form="(N, C, d...)", batch=2, classes=4, spatial=(3, 2)),
        dict(_PROBABILITIES, form="(N, C, d...)", batch=3, classes=5, spatial=(2,),
             reduction="none", label_smoothing=0.1, weighted=True),
        dict(_PROBABILITIES, form="(N, C)", batch=0, classes=5, reduction="mean"),
        dict(_PROBABILITIES, form="(N, C)", batch=3, classes=1),
        dict(_PROBABILITIES, form="(N, C)", batch=3, classes=37),
        dict(_PROBABILITIES, form="(N, C)", batch=5, classes=6, input=dict(layout="transposed"),
             probs=dict(layout="strided")),
        dict(_PROBABILITIES, form="(N, C)", batch=4, classes=5, input=dict(NAN_INF),
             reduction="none"),
        dict(dtype="float32"), dict(dtype="float64"),
        # (N, C, d1, ...) with d1 * ... past one column block (cpu/cross_entropy.cpp: 32 float32
        # or 16 float64 pixels) and a narrower last one
        dict(_CLASSES, form="(N, C, d...)", batch=2, classes=3, spatial=(40,), weighted=True,
             ignore_index=1, reduction="mean"),
        dict(_SMOOTHED, form="(N, C, d...)", batch=2, classes=3, spatial=(5, 7), weighted=True,
             reduction="sum"),
        dict(_PROBABILITIES, form="(N, C, d...)", batch=2, classes=2, spatial=(33,),
             weighted=True, label_smoothing=0.2, reduction="none"),
    ],
}
# The elementwise activations: every shape kind and layout.
_ACTIVATION = [
    {}, {}, {},
    dict(shape=()), dict(shape=(0,)), dict(shape=(3, 0, 2)), dict(shape=(1,)),
    dict(shape=(7, 33)), dict(shape=(3, 5, 29)),
    dict(shape=(2, 3, 4, 5), input=dict(layout="channels_last")),
    dict(shape=(5, 6), input=dict(layout="transposed")),
    dict(input=dict(layout="strided")), dict(input=dict(layout="expanded")),
    dict(input=dict(layout="offset")),
    dict(input=dict(values="ties")),
    dict(shape=(40,), input=dict(NAN_INF)),
    dict(dtype="float32"), dict(dtype="float64"),
]
COVER["relu"] = _ACTIVATION + [dict(inplace=True), dict(scale=-20)]
COVER["leaky_relu"] = _ACTIVATION + [
    dict(negative_slope=s) for s in fuzz_configs.SLOPES] + [dict(inplace=True, negative_slope=0.2)]
COVER["sigmoid"] = _ACTIVATION + [dict(scale=6)]
COVER["tanh"] = _ACTIVATION + [dict(scale=6)]
COVER["log_softmax"] = COVER["softmax"]

# Bigger hand-picked calls: blocked and tiled kernel paths, long rows and many summed terms. Too
# large for gradcheck and opcheck; compared with torch, and CUDA against the CPU.
_CONV = dict(groups=1, stride=(1, 1), padding=(0, 0), dilation=(1, 1), dtype="float64")
_LENET_POOL = dict(pool_kernel=(2, 2), pool_stride=None, pool_padding=(0, 0),
                   pool_dilation=(1, 1), pool_ceil_mode=False, bias=True, frozen=())
LARGE = {
    "conv2d": [
        dict(_CONV, batch=8, in_per_group=1, out_per_group=6, height=32, width=32,
             kernel=(5, 5)),                                          # LeNet conv1
        dict(_CONV, batch=8, in_per_group=6, out_per_group=16, height=14, width=14,
             kernel=(5, 5)),                                          # LeNet conv2
        dict(_CONV, batch=2, in_per_group=20, out_per_group=70, height=9, width=9,
             kernel=(3, 3), padding=(1, 1)),                          # 64 x 64 output tiles
        dict(_CONV, batch=16, in_per_group=3, out_per_group=4, height=40, width=40,
             kernel=(3, 3), stride=(2, 2), padding=(1, 1)),           # split-K in grad_weight
        dict(_CONV, batch=40, in_per_group=2, out_per_group=3, height=5, width=6,
             kernel=(3, 3), padding=(1, 1)),                          # batch-innermost chunks
        dict(_CONV, batch=2, in_per_group=32, out_per_group=40, height=9, width=11,
             kernel=(3, 3), padding=(1, 1)),                          # Winograd F(2x2, 3x3)
        dict(_CONV, batch=3, in_per_group=33, out_per_group=32, height=6, width=7,
             kernel=(3, 3), input=dict(NAN_INF, layout="contiguous")),  # ... handing NaNs over
        # the direct forward of wide layers with few taps (cpu direct_fits): 16+ output channels
        # in blocks of 6 and a partial one, one image (its blocks are the tasks), two groups,
        # Inf weights
        dict(_CONV, batch=1, in_per_group=3, out_per_group=20, height=7, width=32,
             kernel=(3, 3), padding=(1, 1), dtype="float32"),
        dict(_CONV, batch=3, groups=2, in_per_group=2, out_per_group=16, height=5, width=17,
             kernel=(2, 2)),
        dict(_CONV, batch=2, in_per_group=3, out_per_group=16, height=4, width=16,
             kernel=(3, 3), padding=(1, 1), weight=dict(specials=("inf",))),
        dict(_CONV, batch=2, in_per_group=3, out_per_group=16, height=4, width=16,
             kernel=(3, 3), padding=(1, 1), input=dict(layout="channels_last")),
    ],
    # LeNet's two conv -> relu -> pool blocks at a training batch
    "conv2d_relu_max_pool2d": [
        dict(_CONV, batch=64, in_per_group=1, out_per_group=6, height=32, width=32,
             kernel=(5, 5), **_LENET_POOL),                          # LeNet conv1 block
        dict(_CONV, batch=64, in_per_group=6, out_per_group=16, height=14, width=14,
             kernel=(5, 5), **_LENET_POOL),                          # LeNet conv2 block
        dict(_CONV, batch=2, in_per_group=3, out_per_group=17, height=8, width=32,
             kernel=(3, 3), padding=(1, 1), **_LENET_POOL),          # a wide direct layer's
    ],
    "max_pool2d": [
        dict(batch=2, channels=3, height=33, width=47, kernel=(3, 4), stride=(1, 2),
             padding=(1, 2), dilation=(1, 1), ceil_mode=True),
        dict(batch=1, channels=4, height=28, width=80, kernel=(2, 2), stride=(2, 2),
             padding=(0, 0), dilation=(1, 1), input=dict(values="ties")),
    ],
    "linear": [
        dict(lead=(130,), in_features=70, out_features=90),
        dict(lead=(300,), in_features=40, out_features=10),
        dict(lead=(9,), in_features=300, out_features=200, dtype="float64"),
        dict(lead=(2, 3), in_features=17, out_features=33),
        dict(lead=(1100,), in_features=5, out_features=8),          # narrow path, row chunks
    ],
    "softmax": [dict(shape=(2, 3000), dim=1), dict(shape=(3, 300, 5), dim=1),
                dict(shape=(2, 513, 3), dim=1)],
    "mse_loss": [dict(shape=(10000,), broadcast=None, weighted=True),
                 dict(shape=(40, 33), broadcast=None)],
    "binary_cross_entropy": [dict(shape=(10000,), weight="full"), dict(shape=(40, 33))],
    "cross_entropy": [dict(_CLASSES, form="(N, C)", batch=300, classes=3),
                      dict(_CLASSES, form="(N, C)", batch=3, classes=100),
                      dict(_CLASSES, form="(N, C)", batch=500, classes=7, weighted=True),
                      dict(_SMOOTHED, form="(N, C)", batch=200, classes=40, weighted=True),
                      dict(_PROBABILITIES, form="(N, C)", batch=300, classes=7, weighted=True,
                           label_smoothing=0.1),
                      dict(_PROBABILITIES, form="(N, C)", batch=3, classes=100),
                      # the column kernels: whole blocks, tails, every kind of call
                      dict(_CLASSES, form="(N, C, d...)", batch=3, classes=21, spatial=(9, 13),
                           weighted=True),
                      dict(_CLASSES, form="(N, C, d...)", batch=2, classes=5, spatial=(64,),
                           ignore_index=2, reduction="none", input=dict(NAN_INF)),
                      dict(_CLASSES, form="(N, C, d...)", batch=2, classes=6, spatial=(8, 12),
                           input=dict(layout="channels_last"), reduction="sum"),
                      dict(_SMOOTHED, form="(N, C, d...)", batch=2, classes=7, spatial=(70,),
                           weighted=True, ignore_index=2, reduction="mean"),
                      dict(_PROBABILITIES, form="(N, C, d...)", batch=2, classes=6,
                           spatial=(8, 9), weighted=True, label_smoothing=0.1),
                      # the backward's blocks copied into L1 up to 64 classes, their exp terms
                      # stored in the gradient itself past that
                      dict(_CLASSES, form="(N, C, d...)", batch=2, classes=64, spatial=(33,)),
                      dict(_SMOOTHED, form="(N, C, d...)", batch=2, classes=65, spatial=(33,),
                           weighted=True, reduction="sum")],
}
_LARGE_ACTIVATION = [dict(shape=(3, 5, 129)), dict(shape=(2, 300, 7), input=dict(NAN_INF))]
for _op in ("relu", "leaky_relu", "sigmoid", "tanh"):
    LARGE[_op] = _LARGE_ACTIVATION
LARGE["log_softmax"] = LARGE["softmax"]

# COVER samples hold at most this many elements over all their tensors.
MAX_NUMEL = 600


class Sample(NamedTuple):
    op: str         # the pyengine function (pyengine.functional's or pyengine.fused's)
    index: int      # its place in samples(op)
    forced: dict    # the COVER / LARGE entry it was drawn for
    large: bool
    case: Case

    @property
    def id(self):
        return f"{self.op}-{self.index}"

    def __str__(self):
        tensors = ", ".join(f"{k}: {v}" for k, v in fuzz_configs.describe(self.case).items())
        return (f"sample {self.id} (forced {self.forced}) seed {self.case.seed} "
                f"params {self.case.params}; {tensors}")


def _numel(case):
    return sum(fuzz_configs.numel(s.shape) for _, s in case.tensors())


def _plain(op):
    """Forced params that keep NaN and inf out of every tensor of an op's call: the samples hold
    special values only where an entry asks for them (the fuzz lane draws them at random)."""
    drawn = fuzz_configs.OPS[op][0](random.Random(0))
    return {k: PLAIN for k, v in drawn.items() if isinstance(v, dict) and "specials" in v}


@functools.lru_cache(maxsize=None)
def samples(op: str) -> Tuple[Sample, ...]:
    """The samples of the pyengine function `op`: COVER's (small), then LARGE's."""
    rng = random.Random(zlib.crc32(op.encode()))
    small = lambda case: _numel(case) <= MAX_NUMEL  # noqa: E731
    out = []
    for large, entries in ((False, COVER[op]), (True, LARGE.get(op, []))):
        for forced in entries:
            plain = {k: dict(v, **forced.get(k, {})) for k, v in _plain(op).items()}
            params = draw(op, rng, forced=dict(forced, **plain, direct_backward=True),
                          accept=None if large else small)
            case = build(op, params, rng.getrandbits(31))
            out.append(Sample(op, len(out), forced, large, case))
    return tuple(out)


def all_samples(large=True) -> List[Sample]:
    """Every op's samples (without the LARGE ones if large=False)."""
    return [s for op in fuzz_configs.OPS for s in samples(op) if large or not s.large]


def in_both_dtypes(sample: Sample) -> List[Case]:
    """The sample's call in float32 and in float64 (where fuzz_configs allows the other dtype:
    float32 only for sums helpers.TOL holds)."""
    out = [sample.case]
    other = {"float32": "float64", "float64": "float32"}[sample.case.params["dtype"]]
    try:
        out.append(build(sample.op, dict(sample.case.params, dtype=other), sample.case.seed))
    except fuzz_configs.Illegal:
        pass
    return out


# ---- float64 gradcheck -------------------------------------------------------------------------

def gradcheck_case(case: Case) -> Case:
    """The same call (shapes, options, layouts) in float64 on values where the op is smooth, as
    gradcheck's finite differences need: no NaN / inf, no ties or zeros ("normal" values: away
    from relu's kink and max-pool's ties with probability 1), probabilities inside (0, 1), weights
    that do not sum to 0, unit scale, no stride-0 (expanded) layout, which gradcheck refuses."""
    def smooth(opts):
        values = {"ties": "normal", "probability": "open_probability",
                  "weights": "positive"}.get(opts["values"], opts["values"])
        layout = "strided" if opts["layout"] == "expanded" else opts["layout"]
        return dict(opts, values=values, layout=layout, specials=())

    p = {k: smooth(v) if isinstance(v, dict) and "layout" in v else v
         for k, v in case.params.items()}
    p["dtype"] = "float64"
    if "scale" in p:
        p["scale"] = 0
    if case.op == "binary_cross_entropy":
        if p["grads"] != "input":  # perturbed targets stay inside [0, 1]
            p["target"] = dict(p["target"], values="open_probability")
        elif p["target"]["values"] == "open_probability":
            p["target"] = dict(p["target"], values="probability")  # no gradient: keep 0s and 1s
    return build(case.op, p, case.seed)


# ---- the operator calls a sample makes ----------------------------------------------------------

class OpCall(NamedTuple):
    op: torch._ops.OpOverload   # torch.ops.pyengine.<name>.default
    args: tuple

    @property
    def name(self):
        return self.op._schema.name.split("::")[1]


class _RecordOps(TorchDispatchMode):
    """Records every pyengine operator the dispatcher runs (below autograd)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "pyengine":
            self.calls.append(OpCall(func, tuple(args)))
        return func(*args, **(kwargs or {}))


class _RecordFunctionalOps(TorchFunctionMode):
    """The operator calls pyengine's functions make (above autograd, so the op it picks:
    max_pool2d, or max_pool2d_with_indices for return_indices=True). Under a TorchFunctionMode
    it takes its torch.ops path, the one it takes under torch.compile, and torch.ops shows each
    call to the mode."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if isinstance(func, torch._ops.OpOverloadPacket) and \
                func._qualified_op_name.startswith("pyengine::"):
            self.calls.append(OpCall(func.default, tuple(args)))
        return func(*args, **(kwargs or {}))


def _with_defaults(op, args):
    """args with the schema's defaults after the last one given: a mode sees a call without its
    trailing default arguments, and pyengine._C's fast paths take them all."""
    return tuple(args) + tuple(a.default_value for a in op._schema.arguments[len(args):])


def _leaf(value, requires_grad):
    if isinstance(value, torch.Tensor):
        return value.detach().requires_grad_(requires_grad and value.requires_grad)
    if isinstance(value, (list, tuple)):
        return type(value)(_leaf(v, requires_grad) for v in value)
    return value


def op_calls(case: Case, device="cpu") -> List[OpCall]:
    """The operator calls one sample makes on `device`: the forward op pyengine's function calls
    (its tensors fresh leaves that require grad where the call's do), and the one its Autograd
    kernel runs in its place where that is another (cross_entropy's
    cross_entropy_with_log_sum_exp, when a gradient is wanted); then the backward ops autograd
    calls for a random grad_output (tensors detached: backward ops are not differentiable). A
    call that must raise (Case.expect_error) makes none."""
    if case.expect_error:
        return []
    gen = torch.Generator().manual_seed(case.seed)
    args, kwargs = materialize(case, gen, device)

    with _RecordFunctionalOps() as recorder, _RecordOps() as below:
        out = call(fuzz_configs.pyengine_function(case.op), args, kwargs)
    forward = recorder.calls
    assert len(forward) == 1, forward
    calls = [OpCall(forward[0].op, _leaf(forward[0].args, True))]
    calls += [OpCall(c.op, _leaf(_with_defaults(c.op, c.args), True)) for c in below.calls
              if c.name != forward[0].name]
    primary = out[0] if isinstance(out, tuple) else out
    if primary.requires_grad:
        g = torch.randn(primary.shape, generator=gen, dtype=primary.dtype).to(device)
        with _RecordOps() as recorder:
            primary.backward(g)
        calls += [OpCall(c.op, _leaf(c.args, False)) for c in recorder.calls]
    return calls


def with_own_log_sum_exp(name, args):
    """A recorded call's arguments after a change of dtype: cross_entropy_backward's log_sum_exp
    recomputed for its input in the new dtype (the forward's, cast, carries the old dtype's
    rounding, and is not that input's log-sum-exp)."""
    if name != "cross_entropy_backward" or len(args) < 8 or args[7] is None:
        return args
    _, x, t, w, reduction, ignore_index, smoothing = args[:7]
    with torch.no_grad():
        lse = torch.ops.pyengine.cross_entropy_with_log_sum_exp(x, t, w, reduction,
                                                                 ignore_index, smoothing)[1]
    return (*args[:7], lse)


@functools.lru_cache(maxsize=None)
def _all_op_calls() -> Tuple[Tuple[Sample, OpCall], ...]:
    return tuple((sample, c) for sample in all_samples() for c in op_calls(sample.case))


def op_samples(name: str) -> List[Tuple[Sample, OpCall]]:
    """Every call of the operator torch.ops.pyengine.<name> that the samples make (on the CPU),
    with the sample that made it."""
    return [(sample, c) for sample, c in _all_op_calls() if c.name == name]


def has_special_values(sample: Sample) -> bool:
    return any(s.specials for _, s in sample.case.tensors() if isinstance(s, TensorSpec))
