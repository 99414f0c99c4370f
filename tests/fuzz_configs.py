"""Random configurations of every pyengine operator, as data.

The one generator of calls per op in the test tree: the differential fuzz lane (tests/test_fuzz.py)
draws its cases here, and tests/samples.py its sample lists (which drive the sample tests,
gradcheck, opcheck and CUDA parity). A case comes in three steps:

    params = draw(op, rng)            # sizes, options and, per tensor, layout / values / special
                                      # values: plain ints, bools, strings, tuples and dicts, so
                                      # a case prints as a literal and shrinks generically
    case = build(op, params, seed)    # the call F.<op>(*args, **kwargs), tensors as TensorSpecs;
                                      # raises Illegal when params describe no legal call
    args, kwargs = materialize(case)  # real tensors, values from a generator seeded with `seed`
                                      # (the same values on every device)

draw() also takes params to force (draw(op, rng, {"groups": 2, "input": {"layout": ...}})) and a
predicate the case must meet: tests/samples.py builds its sample lists that way.

The call is the same for pyengine's function and torch's (same signatures): for most ops
pyengine.functional.<op> and torch.nn.functional.<op>; for a fused op, pyengine.fused.<op> and
the torch.nn.functional calls it replaces (functions() below: the one table of both sides). Every
case drawn is legal for torch too. Tensors a case wants gradients of have `grad=True`.
"""
import dataclasses
import math
import random
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

import helpers

SPECIALS = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}
LAYOUTS = ("contiguous", "strided", "transposed", "channels_last", "expanded", "offset")
REDUCTIONS = tuple(helpers.REDUCTION_ENUM)
DTYPES = {"float32": torch.float32, "float64": torch.float64}


class Illegal(Exception):
    """The params describe no legal call (for pyengine or for torch)."""


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One tensor argument.

    values: "normal" (standard normal), "ties" (integers in [-2, 2]: exact ties and zeros),
      "probability" (uniform in [0, 1] with some exact 0s and 1s), "open_probability" (uniform
      in [0.05, 0.95]: where the loss is smooth), "binary" (0 or 1),
      "positive" (uniform in [0.1, 2)), "weights" (integers in [0, 2]: zero weights too),
      "classes" (int64 in [0, classes), a share of them `ignore_index`).
    scale: the values are multiplied by 2**scale (a power of two: rounding errors scale exactly).
    layout: "contiguous"; "strided" (every other element of a wider tensor); "transposed" (the
      last two dims swapped in memory); "channels_last" (4-D); "expanded" (a stride-0 dim: the
      first dim of size > 1 repeats one slice); "offset" (contiguous, one element past the start
      of its storage, so misaligned for vector loads).
    specials: which of "nan", "inf", "-inf" replace ~10% of the values at random positions (at
      least one value in a non-empty tensor).
    """
    shape: Tuple[int, ...]
    values: str = "normal"
    scale: int = 0
    layout: str = "contiguous"
    specials: Tuple[str, ...] = ()
    grad: bool = False
    classes: int = 0
    ignore_index: Optional[int] = None


@dataclasses.dataclass
class Case:
    op: str
    params: dict
    seed: int
    dtype: torch.dtype
    args: tuple          # TensorSpec, None or plain values, positional
    kwargs: dict         # plain values or TensorSpecs, by keyword
    # For ops that are positively homogeneous in all their float inputs (conv2d, linear, relu,
    # ...): the output is exactly 2**out_scale times that of the same call on unscaled values,
    # rounding errors included. None for the others.
    out_scale: Optional[int] = None
    # The call must raise, in torch and in pyengine (e.g. binary_cross_entropy of a NaN input).
    expect_error: bool = False

    def tensors(self):
        """(name, TensorSpec) of every tensor argument, positional ones named arg0, arg1, ..."""
        named = [(f"arg{i}", a) for i, a in enumerate(self.args)] + list(self.kwargs.items())
        return [(n, s) for n, s in named if isinstance(s, TensorSpec)]


# ---- drawing helpers -------------------------------------------------------------------------

def numel(shape) -> int:
    return math.prod(shape)


def draw_dtype(rng):
    return rng.choice(list(DTYPES))


def draw_size(rng, lo=1, hi=6, empty=0.0, long=0.0, long_hi=300):
    """A dim size: usually small; 0 with probability `empty`; now and then long (vector bodies
    and tails) with probability `long`."""
    r = rng.random()
    if r < empty:
        return 0
    if r < empty + long:
        return rng.randint(hi + 1, long_hi)
    return rng.randint(lo, hi)


def draw_shape(rng, min_dims=0, max_dims=4, max_numel=3000, empty=0.04, long=0.08):
    while True:
        shape = tuple(draw_size(rng, empty=empty, long=long)
                      for _ in range(rng.randint(min_dims, max_dims)))
        if numel(shape) <= max_numel:
            return shape


def draw_tensor(rng, ndim, specials=tuple(SPECIALS), values=("normal", "ties"),
                layouts=LAYOUTS, special_chance=0.25):
    """Per-tensor options: layout, value kind and injected special values."""
    legal = [lay for lay in layouts if layout_fits(lay, ndim)]
    layout = "contiguous" if rng.random() < 0.45 else rng.choice(legal)
    kind = values[0] if rng.random() < 0.8 else rng.choice(values)
    chosen = ()
    if specials and rng.random() < special_chance:
        chosen = tuple(s for s in specials if rng.random() < 0.6) or (rng.choice(specials),)
    return dict(layout=layout, values=kind, specials=chosen)


def draw_scale(rng, lo, hi):
    """A power-of-two exponent for the values' magnitude: mostly 0, else anywhere in [lo, hi]."""
    return 0 if rng.random() < 0.6 else rng.randint(lo, hi)


def layout_fits(layout, ndim):
    if layout == "channels_last":
        return ndim == 4
    if layout == "transposed":
        return ndim >= 2
    if layout in ("strided", "expanded"):
        return ndim >= 1
    return True


def spec(shape, opts, **kw) -> TensorSpec:
    """A TensorSpec from a shape and a draw_tensor() dict; Illegal if the layout does not fit."""
    s = TensorSpec(tuple(shape), values=opts["values"], layout=opts["layout"],
                   specials=tuple(opts["specials"]), **kw)
    if not layout_fits(s.layout, len(s.shape)):
        raise Illegal(f"layout {s.layout} on a {len(s.shape)}-D tensor")
    return s


def eff(k, d):
    """The extent of a dilated kernel."""
    return d * (k - 1) + 1


def pool_out_size(n, k, s, p, d, ceil):
    """max_pool2d's output size along one axis (torch's formula: with ceil_mode, a last window
    that would start in the right padding is dropped)."""
    span = n + 2 * p - eff(k, d)
    out = (span + (s - 1 if ceil else 0)) // s + 1
    if ceil and (out - 1) * s >= n + p:
        out -= 1
    return out


def windows_with_input(geometry, h, w):
    """Which max_pool2d windows hold at least one input element, an (out_h, out_w) bool tensor;
    geometry: F.max_pool2d's kernel_size, stride, padding, dilation (pairs) and ceil_mode.
    Dilation can put every tap of a window in the padding: such a window's value is -inf and it
    passes no gradient (tests/test_pool.py)."""
    axes = []
    for i, n in enumerate((h, w)):
        k, s, p, d = (geometry[a][i] for a in ("kernel_size", "stride", "padding", "dilation"))
        out = pool_out_size(n, k, s, p, d, geometry["ceil_mode"])
        axes.append(torch.tensor([any(0 <= o * s - p + j * d < n for j in range(k))
                                  for o in range(out)], dtype=torch.bool))
    return axes[0][:, None] & axes[1][None, :]


def pair_or_int(pair, as_int):
    """A pair of equal ints passed as one int (the functional API's shorthand), when asked."""
    return pair[0] if as_int and pair[0] == pair[1] else tuple(pair)


# ---- one generator per op ----------------------------------------------------------------------
# Each draw_<op>(rng) returns params; each build_<op>(params) the call. A draw may produce params
# that build() refuses (Illegal); draw() below then draws again.

def draw_conv2d(rng):
    k = (rng.randint(1, 4), rng.randint(1, 4))
    if rng.random() < 0.2:
        padding, stride = rng.choice(["same", "valid"]), (1, 1)
    else:
        padding, stride = (rng.randint(0, 3), rng.randint(0, 3)), (rng.randint(1, 3),
                                                                     rng.randint(1, 3))
    if padding == "valid" and rng.random() < 0.5:
        stride = (rng.randint(1, 3), rng.randint(1, 3))
    batch, size = rng.choice([None, 0, 1, 1, 2, 3, 5]), 11
    if rng.random() < 0.15:
        # a batch of 16 or more, stride 1 and small images: the batch-innermost path
        batch, size = rng.randint(16, 40), 8
        if padding != "same" and rng.random() < 0.7:
            stride = (1, 1)
    return dict(dtype=draw_dtype(rng), batch=batch, groups=rng.choice([1, 1, 1, 2, 3]),
                in_per_group=draw_size(rng, 1, 3, long=0.1, long_hi=12),
                out_per_group=draw_size(rng, 1, 3, long=0.1, long_hi=12),
                height=rng.randint(1, size), width=rng.randint(1, size), kernel=k, stride=stride,
                padding=padding, dilation=(rng.randint(1, 3), rng.randint(1, 3)),
                bias=rng.random() < 0.7, scale=draw_scale(rng, -40, 40),
                scalar_args=rng.random() < 0.3,
                input=draw_tensor(rng, 3 if batch is None else 4),
                weight=draw_tensor(rng, 4, special_chance=0.1),
                bias_tensor=draw_tensor(rng, 1, special_chance=0.1), frozen=draw_frozen(rng))


# Which of (input, weight, bias) need no gradient, for the ops whose backward takes an
# output_mask: a network's first layer (its input is data), frozen weights.
FROZEN = ((), ("input",), ("weight", "bias"), ("input", "weight"), ("bias",))


def draw_frozen(rng):
    return () if rng.random() < 0.7 else rng.choice(FROZEN[1:])


def check_some_grad(p):
    frozen = set(p.get("frozen", ()))
    if {"input", "weight"} <= frozen and ("bias" in frozen or not p["bias"]):
        raise Illegal("no argument needs a gradient")


# helpers.TOL's float32 tolerances hold for sums of up to about this many terms: in float32
# conv2d cases with a larger batch x output plane (grad_weight's sum), torch's and pyengine's
# rounding errors, ~1e-5 each where terms cancel, differed by up to 2x the tolerance (seed
# 1010164866, 2340 terms), while up to 1024 terms no case of 1450 used more than 0.21 of it.
# Longer sums are drawn in float64.
FLOAT32_MAX_SUM = 1024


def conv_out_size(p):
    """conv2d's output (height, width)."""
    if min(p["stride"]) < 1:
        raise Illegal("a stride below 1")  # (the shrinker tries 0)
    if p["padding"] == "same":
        return p["height"], p["width"]
    pads = (0, 0) if p["padding"] == "valid" else p["padding"]
    return tuple(max(0, (n + 2 * pad - eff(k, d)) // s + 1)
                 for n, k, s, pad, d in zip((p["height"], p["width"]), p["kernel"], p["stride"],
                                            pads, p["dilation"]))


def conv_out_pixels(p):
    """conv2d's output height x width."""
    return numel(conv_out_size(p))


def build_conv2d(p):
    g = p["groups"]
    cin, cout = g * p["in_per_group"], g * p["out_per_group"]
    lead = () if p["batch"] is None else (p["batch"],)
    padding = p["padding"]
    for i, n in enumerate((p["height"], p["width"])):
        pad = 0 if padding in ("same", "valid") else padding[i]
        if padding != "same" and n + 2 * pad < eff(p["kernel"][i], p["dilation"][i]):
            raise Illegal("the dilated kernel does not fit in the padded input")
    if padding == "same" and tuple(p["stride"]) != (1, 1):
        raise Illegal("padding='same' needs stride 1")
    if p["dtype"] == "float32" and (p["batch"] or 1) * conv_out_pixels(p) > FLOAT32_MAX_SUM:
        raise Illegal("a float32 grad_weight summed over more terms than helpers.TOL allows for")
    check_some_grad(p)
    s, frozen = p["scale"], p.get("frozen", ())
    x = spec(lead + (cin, p["height"], p["width"]), p["input"], scale=s,
             grad="input" not in frozen)
    w = spec((cout, p["in_per_group"]) + tuple(p["kernel"]), p["weight"], scale=s,
             grad="weight" not in frozen)
    # the bias scaled like x * w, so the call stays homogeneous (of degree 2)
    b = spec((cout,), p["bias_tensor"], scale=2 * s, grad="bias" not in frozen) if p["bias"] \
        else None
    as_int = p["scalar_args"]
    if padding not in ("same", "valid"):
        padding = pair_or_int(padding, as_int)
    kwargs = dict(stride=pair_or_int(p["stride"], as_int), padding=padding,
                  dilation=pair_or_int(p["dilation"], as_int), groups=g)
    return (x, w, b), kwargs, 2 * s


def draw_max_pool2d(rng):
    k = (rng.randint(1, 5), rng.randint(1, 5))
    d = (rng.randint(1, 3), rng.randint(1, 3))
    if rng.random() < 0.2:
        # pyengine allows padding up to half the dilated kernel, torch only half the kernel: the
        # extra range is compared with torch on an input padded by hand (test_fuzz.py).
        pad = tuple(rng.randint(0, eff(k[i], d[i]) // 2) for i in range(2))
    else:
        pad = (rng.randint(0, k[0] // 2), rng.randint(0, k[1] // 2))
    stride = None if rng.random() < 0.15 else (rng.randint(1, 4), rng.randint(1, 4))
    batch = rng.choice([None, 0, 1, 2, 3])
    x = draw_tensor(rng, 3 if batch is None else 4, values=("normal", "ties"))
    return dict(dtype=draw_dtype(rng), batch=batch, channels=rng.randint(1, 4),
                height=draw_size(rng, 1, 14, long=0.1, long_hi=40),
                width=draw_size(rng, 1, 14, long=0.1, long_hi=80), kernel=k, stride=stride,
                padding=pad, dilation=d, ceil_mode=rng.random() < 0.5,
                return_indices=rng.random() < 0.5, scalar_args=rng.random() < 0.3,
                scale=draw_scale(rng, -60, 60), input=x)


def torch_pads(kernel, padding):
    """Whether torch's own max_pool2d accepts this padding (at most half the kernel)."""
    return all(p <= k // 2 for k, p in zip(kernel, padding))


def build_max_pool2d(p):
    k, d, pad = p["kernel"], p["dilation"], p["padding"]
    for i, n in enumerate((p["height"], p["width"])):
        if pad[i] > eff(k[i], d[i]) // 2:
            raise Illegal("padding beyond half the dilated kernel")
        if n + 2 * pad[i] < eff(k[i], d[i]):
            raise Illegal("the dilated kernel does not fit in the padded input")
    if not torch_pads(k, pad) and "-inf" in p["input"]["specials"]:
        # the hand-padded reference pads with -inf: it could not tell a -inf input from padding
        raise Illegal("-inf inputs with padding beyond half the kernel")
    lead = () if p["batch"] is None else (p["batch"],)
    x = spec(lead + (p["channels"], p["height"], p["width"]), p["input"], scale=p["scale"],
             grad=True)
    as_int = p["scalar_args"]
    kwargs = dict(kernel_size=pair_or_int(k, as_int), padding=pair_or_int(pad, as_int),
                  dilation=pair_or_int(d, as_int), ceil_mode=p["ceil_mode"],
                  return_indices=p["return_indices"])
    if p["stride"] is not None:
        kwargs["stride"] = pair_or_int(p["stride"], as_int)
    return (x,), kwargs, p["scale"]


def draw_conv2d_relu_max_pool2d(rng):
    """conv2d's params (draw_conv2d), images up to 14 wide and mostly undilated kernels so that
    the convolution's output holds a pool window, and the pool's, prefixed pool_ (kernel,
    stride or None, padding within torch's half the kernel, dilation, ceil_mode)."""
    p = draw_conv2d(rng)
    if p["batch"] is None or p["batch"] < 16:  # (not the batch-innermost draws: small images)
        p["height"], p["width"] = rng.randint(1, 14), rng.randint(1, 14)
    if rng.random() < 0.6:
        p["dilation"] = (1, 1)
    k = (rng.randint(1, 3), rng.randint(1, 3))
    return dict(p, pool_kernel=k,
                pool_stride=None if rng.random() < 0.4 else (rng.randint(1, 3), rng.randint(1, 3)),
                pool_padding=(rng.randint(0, k[0] // 2), rng.randint(0, k[1] // 2)),
                pool_dilation=(1, 1) if rng.random() < 0.7 else (rng.randint(1, 3),
                                                                 rng.randint(1, 3)),
                pool_ceil_mode=rng.random() < 0.3)


def pool_kwargs(p, as_int):
    """The pool's keywords of pyengine.fused's call (pool_kernel_size, ..., pool_ceil_mode) from
    params p["pool_kernel"], ...; without "pool_", F.max_pool2d's keywords."""
    out = dict(pool_kernel_size=pair_or_int(p["pool_kernel"], as_int))
    if p["pool_stride"] is not None:
        out["pool_stride"] = pair_or_int(p["pool_stride"], as_int)
    return dict(out, pool_padding=pair_or_int(p["pool_padding"], as_int),
                pool_dilation=pair_or_int(p["pool_dilation"], as_int),
                pool_ceil_mode=p["pool_ceil_mode"])


def fused_pool_geometry(p):
    """The pool's geometry as F.max_pool2d's keywords (pairs), from the fused op's params."""
    return dict(kernel_size=tuple(p["pool_kernel"]),
                stride=tuple(p["pool_stride"] or p["pool_kernel"]),
                padding=tuple(p["pool_padding"]), dilation=tuple(p["pool_dilation"]),
                ceil_mode=p["pool_ceil_mode"])


def build_conv2d_relu_max_pool2d(p):
    # the convolution is conv2d's call (its checks, the float32 limit on grad_weight's sum, the
    # frozen arguments); homogeneous of degree 2 like conv2d, since relu and max commute with a
    # positive factor
    (x, w, b), kwargs, out_scale = build_conv2d(p)
    k, d, pad = p["pool_kernel"], p["pool_dilation"], p["pool_padding"]
    if min(k + d + tuple(p["pool_stride"] or (1,))) < 1 or min(pad) < 0:
        raise Illegal("a pool size below its least legal value")  # (the shrinker tries them)
    if not torch_pads(k, pad):
        raise Illegal("pool padding beyond half the pool kernel (torch's max_pool2d refuses it)")
    for n, k_, d_, pad_ in zip(conv_out_size(p), k, d, pad):
        # (max_pool2d refuses empty planes: conv2d's output is never empty in H, W, channels)
        if n + 2 * pad_ < eff(k_, d_):
            raise Illegal("the dilated pool window does not fit in the padded conv2d output")
    kwargs.update(pool_kwargs(p, p["scalar_args"]))
    return (x, w, b), kwargs, out_scale


def draw_linear(rng):
    return dict(dtype=draw_dtype(rng),
                lead=tuple(draw_size(rng, 1, 5, empty=0.05) for _ in range(rng.randint(0, 3))),
                in_features=draw_size(rng, 1, 20, empty=0.03, long=0.1, long_hi=200),
                out_features=draw_size(rng, 1, 20, empty=0.03, long=0.1, long_hi=100),
                bias=rng.random() < 0.7, scale=draw_scale(rng, -40, 40),
                input=draw_tensor(rng, 2), weight=draw_tensor(rng, 2, special_chance=0.1),
                bias_tensor=draw_tensor(rng, 1, special_chance=0.1), frozen=draw_frozen(rng))


def build_linear(p):
    check_some_grad(p)
    s, frozen = p["scale"], p.get("frozen", ())
    x = spec(tuple(p["lead"]) + (p["in_features"],), p["input"], scale=s,
             grad="input" not in frozen)
    w = spec((p["out_features"], p["in_features"]), p["weight"], scale=s,
             grad="weight" not in frozen)
    b = spec((p["out_features"],), p["bias_tensor"], scale=2 * s, grad="bias" not in frozen) \
        if p["bias"] else None
    return (x, w, b), {}, 2 * s


SLOPES = (0.01, 0.0, -0.5, 0.2, 1.0, 1.5, -2.0)


def draw_activation(rng, scale=(-30, 12)):
    shape = draw_shape(rng)
    return dict(dtype=draw_dtype(rng), shape=shape, scale=draw_scale(rng, *scale),
                input=draw_tensor(rng, len(shape)))


def draw_relu(rng):
    return dict(draw_activation(rng, (-60, 60)), inplace=rng.random() < 0.2)


def draw_leaky_relu(rng):
    slope = rng.choice(SLOPES) if rng.random() < 0.7 else round(rng.uniform(-2, 2), 3)
    # torch refuses the in-place form with a negative slope when a gradient is wanted
    return dict(draw_activation(rng, (-60, 60)), negative_slope=slope,
                inplace=slope >= 0 and rng.random() < 0.2)


def build_activation(p, homogeneous):
    x = spec(p["shape"], p["input"], scale=p["scale"], grad=True)
    kwargs = {k: p[k] for k in ("negative_slope", "inplace") if k in p}
    if p.get("inplace") and p.get("negative_slope", 0) < 0:
        raise Illegal("torch's in-place leaky_relu has no gradient for a negative slope")
    return (x,), kwargs, p["scale"] if homogeneous else None


def draw_softmax(rng):
    shape = draw_shape(rng, long=0.12)
    nd = max(len(shape), 1)
    as_float64 = rng.random() < 0.1  # the dtype= argument (float32 input computed in float64)
    return dict(dtype="float32" if as_float64 else draw_dtype(rng), shape=shape,
                dim=rng.randint(-nd, nd - 1), as_float64=as_float64,
                scale=draw_scale(rng, -20, 12), input=draw_tensor(rng, len(shape)))


def build_softmax(p):
    nd = max(len(p["shape"]), 1)
    if not -nd <= p["dim"] < nd:
        raise Illegal("dim out of range")
    x = spec(p["shape"], p["input"], scale=p["scale"], grad=True)
    kwargs = dict(dim=p["dim"])
    if p["as_float64"]:
        kwargs["dtype"] = torch.float64
    return (x,), kwargs, None


def draw_loss_shape(rng):
    return draw_shape(rng, max_dims=4, max_numel=2000, empty=0.05, long=0.05)


def draw_mse_loss(rng):
    shape = draw_loss_shape(rng)
    # target broadcast to input: some dims of size 1, or fewer leading dims
    broadcast = None
    if shape and rng.random() < 0.2:
        broadcast = (rng.randint(0, len(shape)),
                     tuple(rng.random() < 0.5 for _ in shape))
    return dict(dtype=draw_dtype(rng), shape=shape, broadcast=broadcast,
                weighted=rng.random() < 0.3, reduction=rng.choice(REDUCTIONS),
                scale=draw_scale(rng, -40, 40), input=draw_tensor(rng, len(shape)),
                target=draw_tensor(rng, len(shape)),
                weight=draw_tensor(rng, len(shape), values=("positive", "weights"),
                                   special_chance=0.1))


def build_mse_loss(p):
    shape, s = tuple(p["shape"]), p["scale"]
    target_shape = shape
    if p["broadcast"] is not None:
        dropped, ones = p["broadcast"]
        dropped = min(dropped, len(shape))
        target_shape = tuple(1 if one else n for n, one in zip(shape, ones))[dropped:]
    x = spec(shape, p["input"], scale=s, grad=True)
    t = spec(target_shape, p["target"], scale=s, grad=True)
    kwargs = dict(reduction=p["reduction"])
    if p["weighted"]:
        # unscaled: 'mean' divides by the weights' sum, so the loss stays of degree 2
        kwargs["weight"] = spec(shape, p["weight"])
    return (x, t), kwargs, 2 * s


def draw_binary_cross_entropy(rng):
    shape = draw_loss_shape(rng)
    # NaN / inf probabilities or targets are refused by torch and pyengine alike: now and then a
    # case where both must raise
    return dict(dtype=draw_dtype(rng), shape=shape, weight=rng.choice([None, "full", "last"]),
                reduction=rng.choice(REDUCTIONS),
                grads=rng.choice(["input", "input", "target", "both"]),  # which need a gradient
                input=draw_tensor(rng, len(shape), values=("probability",), special_chance=0.03),
                target=draw_tensor(rng, len(shape), values=("probability", "binary"),
                                   special_chance=0.03),
                weight_tensor=draw_tensor(rng, 1, values=("positive", "weights"),
                                          special_chance=0.1))


def build_binary_cross_entropy(p):
    shape = tuple(p["shape"])
    x = spec(shape, p["input"], grad=p["grads"] != "target")
    t = spec(shape, p["target"], grad=p["grads"] != "input")
    kwargs = dict(reduction=p["reduction"])
    if p["weight"] == "full":
        kwargs["weight"] = spec(shape, p["weight_tensor"])
    elif p["weight"] == "last":  # broadcast along the leading dims
        kwargs["weight"] = spec(shape[-1:], p["weight_tensor"])
    return (x, t), kwargs, None


def draw_cross_entropy(rng):
    form = rng.choice(["(N, C)", "(N, C)", "(C)", "(N, C, d...)"])
    spatial = tuple(draw_size(rng, 1, 4, empty=0.05) for _ in range(rng.randint(1, 2)))
    input_dims = {"(N, C)": 2, "(C)": 1, "(N, C, d...)": 2 + len(spatial)}[form]
    classes = draw_size(rng, 1, 12, long=0.1, long_hi=200)
    ignore_index = -100 if rng.random() < 0.7 else rng.randint(0, classes - 1)
    smoothing = 0.0 if rng.random() < 0.6 else rng.choice([1.0, round(rng.random(), 3)])
    return dict(dtype=draw_dtype(rng), form=form, batch=draw_size(rng, 1, 8, empty=0.08),
                classes=classes,
                spatial=spatial,
                weighted=rng.random() < 0.35, ignore_index=ignore_index,
                reduction=rng.choice(REDUCTIONS), scale=draw_scale(rng, -20, 10),
                label_smoothing=smoothing,
                # the target: class indices, or class probabilities (input's shape), which may
                # need a gradient
                probabilities=rng.random() < 0.3, target_grad=rng.random() < 0.5,
                input=draw_tensor(rng, input_dims),
                target=draw_tensor(rng, input_dims - 1, specials=(), values=("classes",)),
                probs=draw_tensor(rng, input_dims, specials=(),
                                  values=("probability", "open_probability")),
                weight=draw_tensor(rng, 1, values=("positive", "weights"), special_chance=0.05))


def build_cross_entropy(p):
    n, c = p["batch"], p["classes"]
    if c < 1:
        raise Illegal("no classes")
    if not (p["ignore_index"] < 0 or p["ignore_index"] < c):
        raise Illegal("ignore_index is a class index that does not exist")
    shape = {"(N, C)": (n, c), "(C)": (c,), "(N, C, d...)": (n, c) + tuple(p["spatial"])}
    shape = shape[p["form"]]
    target_shape = (shape[0],) + shape[2:] if len(shape) > 1 else ()
    x = spec(shape, p["input"], scale=p["scale"], grad=True)
    if p["probabilities"]:
        if p["ignore_index"] >= 0:
            raise Illegal("torch refuses an ignore_index >= 0 with class-probability targets")
        t = spec(shape, p["probs"], grad=p["target_grad"])
    else:
        t = spec(target_shape, p["target"], classes=c, ignore_index=p["ignore_index"])
    kwargs = dict(reduction=p["reduction"], ignore_index=p["ignore_index"])
    if p["label_smoothing"]:
        kwargs["label_smoothing"] = p["label_smoothing"]
    if p["weighted"]:
        kwargs["weight"] = spec((c,), p["weight"])
    return (x, t), kwargs, None


OPS = {
    "conv2d": (draw_conv2d, build_conv2d),
    "max_pool2d": (draw_max_pool2d, build_max_pool2d),
    "linear": (draw_linear, build_linear),
    "relu": (draw_relu, lambda p: build_activation(p, homogeneous=True)),
    "leaky_relu": (draw_leaky_relu, lambda p: build_activation(p, homogeneous=True)),
    "sigmoid": (draw_activation, lambda p: build_activation(p, homogeneous=False)),
    "tanh": (draw_activation, lambda p: build_activation(p, homogeneous=False)),
    "softmax": (draw_softmax, build_softmax),
    "log_softmax": (draw_softmax, build_softmax),
    "mse_loss": (draw_mse_loss, build_mse_loss),
    "binary_cross_entropy": (draw_binary_cross_entropy, build_binary_cross_entropy),
    "cross_entropy": (draw_cross_entropy, build_cross_entropy),
    "conv2d_relu_max_pool2d": (draw_conv2d_relu_max_pool2d, build_conv2d_relu_max_pool2d),
}


# ---- each op's function and its torch reference ------------------------------------------------

# The public modules pyengine's functions live in: pyengine.functional (torch.nn.functional's
# twins, the same name in torch.nn.functional) and pyengine.fused (several torch calls in one
# operator: the torch reference is the composition, pyengine._fused.TORCH_EQUIVALENTS).
def _fused_references():
    from pyengine._fused import TORCH_EQUIVALENTS
    return TORCH_EQUIVALENTS


def functions():
    """{op: (pyengine's function, torch's)} for every op in OPS: the one table of both sides of a
    call (the tests call pyengine_function(op) and torch_function(op), never getattr on a
    module)."""
    import pyengine.functional as PF
    import pyengine.fused as fused

    table = {name: (getattr(PF, name), getattr(F, name)) for name in PF.__all__}
    for name in fused.__all__:
        references = _fused_references()
        if name not in references:
            raise KeyError(f"pyengine/_fused.py: TORCH_EQUIVALENTS has no torch twin for "
                           f"pyengine.fused.{name}")
        table[name] = getattr(fused, name), references[name]
    return table


def pyengine_function(op: str):
    """The pyengine function a case of `op` calls: pyengine.functional.<op> or
    pyengine.fused.<op>."""
    return functions()[op][0]


def torch_function(op: str):
    """The torch function (or composition of them) that gives the same results."""
    return functions()[op][1]


def with_params(params: dict, forced: dict) -> dict:
    """params with the entries of `forced` in place of the drawn ones; a dict entry (a tensor's
    options) is merged into the drawn dict."""
    out = dict(params)
    for key, value in forced.items():
        if key not in out:
            raise KeyError(f"fuzz_configs: no param {key!r} to force (params: {sorted(out)})")
        out[key] = dict(out[key], **value) if isinstance(value, dict) else value
    return out


def draw(op: str, rng: random.Random, forced: Optional[dict] = None, accept=None,
         tries: int = 1000) -> dict:
    """Random params of a legal call of `op`, with the params in `forced` set as given, and, if
    `accept` is given, a call for which accept(build(op, params, 0)) is true."""
    draw_params = OPS[op][0]
    for _ in range(tries):
        params = draw_params(rng)
        # a share of the cases also calls the op's backward operator directly
        params["direct_backward"] = rng.random() < 0.3
        if forced:
            params = with_params(params, forced)
        try:
            case = build(op, params, 0)
        except Illegal:
            continue
        if accept is None or accept(case):
            return params
    # a generator bug, or params forced into a call that is never legal
    raise RuntimeError(f"fuzz_configs: no legal {op} call in {tries} draws (forced: {forced})")


def build(op: str, params: dict, seed: int) -> Case:
    args, kwargs, out_scale = OPS[op][1](params)
    dtype = DTYPES[params["dtype"]]
    # binary_cross_entropy: NaN / inf probabilities or targets (outside [0, 1]) are refused by
    # torch and pyengine alike: cases where both must raise
    expect_error = op == "binary_cross_entropy" and any(
        a.specials and numel(a.shape) > 0 for a in args)
    return Case(op, params, seed, dtype, args, kwargs, out_scale, expect_error)


# ---- tensors -----------------------------------------------------------------------------------

def values(s: TensorSpec, shape, dtype, gen: torch.Generator) -> torch.Tensor:
    if s.values == "classes":
        t = torch.randint(0, s.classes, shape, generator=gen)
        if s.ignore_index is not None:
            t[torch.rand(shape, generator=gen) < 0.2] = s.ignore_index
        return t
    if s.values == "normal":
        t = torch.randn(shape, generator=gen, dtype=dtype)
    elif s.values == "ties":
        t = torch.randint(-2, 3, shape, generator=gen).to(dtype)
    elif s.values == "probability":
        t = torch.rand(shape, generator=gen, dtype=dtype)
        u = torch.rand(shape, generator=gen)
        t[u < 0.05] = 0.0
        t[u > 0.95] = 1.0
    elif s.values == "open_probability":
        t = torch.rand(shape, generator=gen, dtype=dtype) * 0.9 + 0.05
    elif s.values == "binary":
        t = torch.randint(0, 2, shape, generator=gen).to(dtype)
    elif s.values == "positive":
        t = torch.rand(shape, generator=gen, dtype=dtype) * 1.9 + 0.1
    elif s.values == "weights":
        t = torch.randint(0, 3, shape, generator=gen).to(dtype)
    else:
        raise ValueError(f"unknown value kind {s.values!r}")
    t = t * 2.0 ** s.scale
    if s.specials and t.numel():
        u = torch.rand(shape, generator=gen)
        u.view(-1)[torch.randint(0, u.numel(), (), generator=gen)] = 0.0  # at least one
        kinds = torch.randint(0, len(s.specials), shape, generator=gen)
        for i, name in enumerate(s.specials):
            t[(u < 0.1) & (kinds == i)] = SPECIALS[name]
    return t


def tensor(s: TensorSpec, dtype: torch.dtype, gen: torch.Generator,
           device="cpu") -> torch.Tensor:
    """The tensor `s` describes, on `device` in its layout (a leaf that requires grad if s.grad).
    The values are drawn on the CPU, so they are the same on every device."""
    shape = tuple(s.shape)
    if s.layout == "expanded":
        dim = next((i for i, n in enumerate(shape) if n > 1), None)
        base = shape if dim is None else shape[:dim] + (1,) + shape[dim + 1:]
        t = values(s, base, dtype, gen).to(device).expand(shape)
    else:
        t = values(s, shape, dtype, gen).to(device)
        if s.layout == "strided":
            t = helpers.noncontiguous(t)
        elif s.layout == "transposed":
            t = t.transpose(-1, -2).contiguous().transpose(-1, -2)
        elif s.layout == "channels_last":
            t = t.contiguous(memory_format=torch.channels_last)
        elif s.layout == "offset":
            storage = torch.empty(numel(shape) + 1, dtype=t.dtype, device=device)
            t = storage[1:].view(shape).copy_(t)
        elif s.layout != "contiguous":
            raise ValueError(f"unknown layout {s.layout!r}")
    return t.requires_grad_(s.grad and t.is_floating_point())


def materialize(case: Case, gen: Optional[torch.Generator] = None, device="cpu"):
    """(args, kwargs) of real tensors on `device` for the call case describes; values from `gen`
    (a fresh generator seeded with case.seed by default)."""
    gen = gen or torch.Generator().manual_seed(case.seed)

    def real(a):
        return tensor(a, case.dtype, gen, device) if isinstance(a, TensorSpec) else a

    args = tuple(real(a) for a in case.args)
    kwargs = {k: real(v) for k, v in case.kwargs.items()}
    return args, kwargs


def describe(case: Case) -> Dict[str, str]:
    """Short text per tensor: shape, layout, values, specials (for failure reports)."""
    out = {}
    for name, s in case.tensors():
        bits = [f"{list(s.shape)}", s.layout, s.values]
        if s.scale:
            bits.append(f"x2**{s.scale}")
        if s.specials:
            bits.append("+" + "/".join(s.specials))
        out[name] = " ".join(bits)
    return out
