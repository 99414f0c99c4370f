"""One case against torch: the differential check that the fuzz lane (tests/test_fuzz.py) and
the sample-driven tests (tests/test_samples.py) run on every case they draw.

check(case) calls pyengine's function of the op and torch's (pyengine.functional.<op> and
torch.nn.functional.<op>, or pyengine.fused.<op> and the torch calls it replaces:
fuzz_configs.pyengine_function / torch_function) with the same values, compares the outputs,
then back-propagates one random grad_output through both and compares every gradient; when
the case's params ask for it (direct_backward), it also calls the op's backward operator
(torch.ops.pyengine.*_backward) directly. Torch's side runs on the CPU, on contiguous
copies of the inputs, so its results depend neither on the layout nor on the device under test.
A failed check raises CheckFailed naming the stage that failed.
"""
import contextlib
import inspect
import warnings

import torch
import torch.nn.functional as F

import fuzz_configs
import helpers
from fuzz_configs import materialize, pyengine_function, torch_function

P = torch.ops.pyengine


class CheckFailed(AssertionError):
    """A case failed; `stage` names the check (the shrinker keeps to failures of the same one)."""

    def __init__(self, stage, error):
        super().__init__(f"{stage}: {type(error).__name__}: {error}")
        self.stage, self.error = stage, error

    @property
    def signature(self):
        """What the shrinker keeps to: the check, and for a comparison whether values or the
        metadata (shape, dtype) differ."""
        message = str(self.error)
        kind = ("values" if "not close" in message or "not equal" in message
                else "metadata" if "do not match" in message else "")
        return self.stage, type(self.error).__name__, kind


@contextlib.contextmanager
def stage(name):
    try:
        yield
    except CheckFailed:
        raise
    except Exception as exc:
        raise CheckFailed(name, exc) from exc


# ---- tolerances ------------------------------------------------------------------------------

def reduction_terms(case):
    """The longest sum of products behind any of the op's results (forward or gradient), or 1:
    conv2d's taps (forward), taps over output channels (grad_input) and output pixels over the
    batch (grad_weight); linear's in_features, out_features and batch rows."""
    p = case.params
    if case.op in ("conv2d", "conv2d_relu_max_pool2d"):
        k = p["kernel"]
        taps = k * k if isinstance(k, int) else k[0] * k[1]
        # (output pixels: at most about the input's, whatever the stride or padding form)
        return max(1, p["in_per_group"] * taps, p["out_per_group"] * taps,
                   (p["batch"] or 1) * p["height"] * p["width"])
    if case.op == "linear":
        rows = 1
        for d in p.get("lead", ()):
            rows *= d
        return max(1, p.get("in_features", 1), p.get("out_features", 1), rows)
    return 1


def tolerance(case, dtype, scale_exponent=0):
    """helpers.TOL, with atol scaled for homogeneous ops: their inputs are scaled by powers of two,
    which scales results and rounding errors alike exactly (no overflow or underflow within the
    drawn ranges), so the absolute tolerance measured at unit scale scales with them.
    In float32, long sums of unit-scale products (conv2d, linear) round by more than TOL's atol
    in any summation order: atol grows with the square root of the terms past 64. Measured on
    conv2d 20->70, 3x3, 9x9 (630 terms in grad_input): torch's own float32 grad_input is up to
    3.2e-5 from the float64 result, pyengine's 3.2e-5 (AVX-512) and 5.0e-5 (baseline x86-64,
    longer k blocks), so the two differ by up to ~2e-5 where TOL allows 1e-5."""
    tol = dict(helpers.TOL[dtype])
    if case.out_scale is not None:
        tol["atol"] *= 2.0 ** scale_exponent
    terms = reduction_terms(case)
    if dtype == torch.float32 and terms > 64:
        tol["atol"] *= (terms / 64) ** 0.5
    return tol


def grad_exponent(case, spec):
    """The gradient of a homogeneous op's output (scale 2**out_scale) w.r.t. an input of scale
    2**s, with a unit-scale grad_output, has scale 2**(out_scale - s)."""
    return (case.out_scale or 0) - spec.scale


# ---- references ------------------------------------------------------------------------------

def _pair(v):
    return list(v) if isinstance(v, (tuple, list)) else [v, v]


def reference_leaves(args, kwargs):
    """Contiguous CPU copies of the inputs, fresh leaves for torch's side."""
    def copy_(a):
        if isinstance(a, torch.Tensor):
            return a.detach().cpu().clone(memory_format=torch.contiguous_format).requires_grad_(
                a.requires_grad)
        return a
    return tuple(copy_(a) for a in args), {k: copy_(v) for k, v in kwargs.items()}


def call(fn, args, kwargs):
    args = list(args)
    if kwargs.get("inplace"):
        args[0] = args[0].clone()  # in place on a non-leaf: the gradient still reaches the leaf
    with warnings.catch_warnings():
        # torch warns about some legal calls (a broadcast mse_loss target, the mean of nothing)
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


@contextlib.contextmanager
def reference_settings():
    """torch's side runs on one thread, without oneDNN and without NNPACK. On the busy 2-core
    machine a parallel region of torch's costs up to ~50 ms while the other thread waits for a
    core, and oneDNN builds a kernel for every new convolution geometry (0.05-0.2 s): each would
    make a case 10-50x slower. Without oneDNN, torch takes NNPACK for a convolution of a batch of
    16 or more, whose fast algorithms lose accuracy (errors of ~1e-3 relative in float32, seed
    545181007), so that goes too: what is left is torch's plain CPU convolution."""
    threads, onednn = torch.get_num_threads(), torch.backends.mkldnn.enabled
    torch.set_num_threads(1)
    torch.backends.mkldnn.enabled = False
    nnpack = torch.backends.nnpack.set_flags(False)[0]
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.backends.mkldnn.enabled = onednn
        torch.backends.nnpack.set_flags(nnpack)


class TorchReference:
    """torch's function of the op (fuzz_configs.torch_function), its gradients through
    autograd."""

    def __init__(self, case, args, kwargs):
        self.args, self.kwargs = args, kwargs
        with reference_settings():
            self.out = call(torch_function(case.op), args, kwargs)
        self.index_mask = None  # which indices to compare (all)

    def see_ours(self, case, args, kwargs):
        """Called after pyengine's forward with pyengine's own arguments (on the device under
        test), for a reference whose gradients depend on a choice that rounding may decide
        either way (FusedReference)."""

    def primary(self):
        return self.out[0] if isinstance(self.out, tuple) else self.out

    def grads(self, g):
        with reference_settings():
            self.primary().backward(g)
        return [a.grad if isinstance(a, torch.Tensor) else None for a in self.leaves()]

    def leaves(self):
        return list(self.args) + list(self.kwargs.values())


def pool_geometry(params):
    """max_pool2d's window geometry as F.max_pool2d's keywords, from fuzz_configs params."""
    return dict(kernel_size=list(params["kernel"]),
                stride=list(params["stride"] or params["kernel"]),
                padding=list(params["padding"]), dilation=list(params["dilation"]),
                ceil_mode=params["ceil_mode"])


class PoolReference(TorchReference):
    """max_pool2d against torch, with two geometries torch's own call cannot serve:

    * padding beyond half the kernel (pyengine allows up to half the dilated kernel, torch only
      half the kernel): torch without padding on an input padded by hand with -inf, cropped as
      tests/test_pool.py does (the drawn inputs hold no -inf then: fuzz_configs.build_max_pool2d);
    * windows with no input element (dilation puts every tap in the padding): their value is -inf
      and their index torch's (pointing outside the window); their gradient goes nowhere
      (test_pool.py's test_window_with_no_input_element). torch's CPU backward instead adds it at
      that index, outside the plane or on an element of another window, so the reference gradient
      is torch's forward indices of the other windows applied by hand.
    """

    def __init__(self, case, args, kwargs):
        p = case.params
        self.args, self.kwargs = args, kwargs
        x = args[0]
        self.cfg = pool_geometry(p)
        self.hand_padded = not fuzz_configs.torch_pads(p["kernel"], p["padding"])
        self.with_input = fuzz_configs.windows_with_input(self.cfg, *x.shape[-2:])
        self.by_hand = not self.hand_padded and not self.with_input.all()
        self.index_mask = None
        with reference_settings(), torch.no_grad() if self.by_hand else contextlib.nullcontext():
            if self.hand_padded:
                values, indices = self._hand_padded(x)
            else:
                values, indices = F.max_pool2d(x, **self.cfg, return_indices=True)
        self.values, self.indices = values, indices
        self.out = (values, indices) if p["return_indices"] else values

    def _hand_padded(self, x):
        (pH, pW), w = self.cfg["padding"], x.shape[-1]
        padded = F.pad(x, (pW, pW, pH, pH), value=float("-inf"))
        values, indices = F.max_pool2d(padded, **dict(self.cfg, padding=[0, 0]),
                                       return_indices=True)
        # with explicit padding a ceil_mode window may start in the right padding: torch keeps it
        # there, its own padding (and pyengine) drop it
        oH, oW = self.with_input.shape
        values, indices = values[..., :oH, :oW], indices[..., :oH, :oW]
        # windows with an input element: their index, back in the unpadded plane (the others' is
        # torch's formula on the unpadded plane, which the padded call does not give)
        self.index_mask = self.with_input.expand(indices.shape)
        r, c = indices // (w + 2 * pW) - pH, indices % (w + 2 * pW) - pW
        return values, torch.where(self.index_mask, r * w + c, indices)

    def primary(self):
        return self.values

    def grads(self, g):
        x = self.args[0]
        if not self.by_hand:
            return super().grads(g)
        plane = x.shape[-2] * x.shape[-1]
        flat_idx = self.indices.reshape(-1, self.with_input.numel())
        flat_g = torch.where(self.with_input, g, 0).reshape(flat_idx.shape)
        grad = torch.zeros(flat_idx.shape[0], plane, dtype=x.dtype)
        # windows without input add 0 at a clamped (in-plane) index
        grad.scatter_add_(1, flat_idx.clamp(0, plane - 1), flat_g)
        return [grad.reshape(x.shape)]


class CrossEntropyReference(TorchReference):
    """torch, except for the gradient of a row whose class-index target is ignore_index:
    pyengine's is 0 (the row's loss is the constant 0; csrc/cpu/cross_entropy.cpp and
    csrc/cuda/loss.cu write zeros), torch's is NaN when the row holds a NaN or an infinity (its
    log_softmax backward multiplies the row's zero gradient by the row's NaN softmax). Finite
    ignored rows get 0 from torch too."""

    def grads(self, g):
        grads = super().grads(g)
        x, target = self.args
        if target.is_floating_point():
            return grads  # class probabilities: no row is ignored
        ignored = target == self.kwargs["ignore_index"]
        grads[0] = grads[0].masked_fill(ignored.unsqueeze(1) if x.dim() > 1 else ignored, 0.0)
        return grads


def fused_operator_call(case, args, kwargs):
    """torch.ops.pyengine.conv2d_relu_max_pool2d called directly on the case's (detached)
    arguments: (the operator's arguments after the bias, the input as the operator takes it,
    the input's (H, W) to crop grad_input to, or None, (result, indices)). String padding
    becomes the numbers the operator takes: 'valid' none, 'same' half the dilated kernel's
    extent, and an odd total padding puts its extra row / column on the input's bottom / right
    by hand, as torch (and pyengine.fused) do."""
    x, w, b = (a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    padding, crop = kwargs["padding"], None
    dilation = _pair(kwargs["dilation"])
    if padding == "valid":
        padding = [0, 0]
    elif padding == "same":
        totals = [d * (k - 1) for d, k in zip(dilation, w.shape[2:])]
        padding = [t // 2 for t in totals]
        if any(t % 2 for t in totals):
            crop = tuple(x.shape[-2:])
            x = F.pad(x, [0, totals[1] % 2, 0, totals[0] % 2])
    pool = fuzz_configs.fused_pool_geometry(case.params)
    op_args = [_pair(kwargs["stride"]), _pair(padding), dilation, kwargs["groups"],
               *(list(pool[k]) for k in ("kernel_size", "stride", "padding", "dilation")),
               pool["ceil_mode"]]
    with torch.no_grad():
        out = P.conv2d_relu_max_pool2d(x, w, b, *op_args)
    return op_args, x, crop, out


class FusedReference(TorchReference):
    """conv2d_relu_max_pool2d against torch's calls (pyengine._fused.TORCH_EQUIVALENTS):
    the forward values are theirs; the gradients go through torch's conv2d with each pool
    window's element written out (gather, then relu), which serves three cases torch's own
    backward of the calls cannot:

    * windows with no input element (the pool's dilation puts every tap in its padding): -inf
      and no gradient. torch's max_pool2d backward adds the window's gradient at its index,
      outside the window, where relu may pass it on (see PoolReference).
    * near ties in float32: pyengine's convolution rounds differently from torch's, so where a
      window's two largest elements lie within rounding of each other, pyengine may pool the
      other one, and its gradient goes there (3 in ~7500 float32 cases without NaN / inf, most
      with integer values and a float bias: tests/test_fuzz.py has one). Where
      pyengine's index (from the operator called directly) differs from torch's, lies in the
      window and points at a value that differs from torch's maximum by no more than the
      forward tolerance, the gradient follows pyengine's choice. An exact tie in torch's values
      follows torch (the first), unless pyengine's own convolution (pyengine's conv2d on the
      same arguments) broke it: its value at pyengine's index above its value at torch's.
    * a maximum within rounding of 0 (not 0 itself): relu passes its gradient where pyengine's
      result is > 0.

    pyengine's indices are not compared otherwise (pyengine.fused returns the output only); an
    index that is not a legal choice shows in the gradients."""

    def __init__(self, case, args, kwargs):
        self.args, self.kwargs = args, kwargs
        self.case, self.index_mask, self.ours, self.our_conv = case, None, None, None
        self.pool = {k[len("pool_"):]: v for k, v in kwargs.items() if k.startswith("pool_")}
        conv_kwargs = {k: kwargs[k] for k in ("stride", "padding", "dilation", "groups")}
        with reference_settings():
            self.conv = call(F.conv2d, args, conv_kwargs)
            with torch.no_grad():
                # the composition itself, on the convolution's output
                self.out = F.max_pool2d(F.relu(self.conv), **self.pool)
                self.maxima, self.indices = F.max_pool2d(self.conv, **self.pool,
                                                         return_indices=True)
        self.with_input = fuzz_configs.windows_with_input(
            fuzz_configs.fused_pool_geometry(case.params),
            *self.conv.shape[-2:]).expand(self.indices.shape)

    def see_ours(self, case, args, kwargs):
        op_args, x, _, (result, indices) = fused_operator_call(case, args, kwargs)
        self.ours = result.cpu(), indices.cpu()
        with torch.no_grad():
            self.our_conv = P.conv2d(x, args[1].detach(), None if args[2] is None else
                                     args[2].detach(), *op_args[:4]).cpu()

    def _in_window(self, indices):
        """Whether each flat index names an element of its window (dilation taps included)."""
        geometry = fuzz_configs.fused_pool_geometry(self.case.params)
        width = self.conv.shape[-1]
        inside = torch.ones(indices.shape, dtype=torch.bool)
        for axis, pos in ((0, indices // width), (1, indices % width)):
            out = torch.arange(indices.shape[-2 + axis]).view((-1, 1) if axis == 0 else (1, -1))
            offset = pos - out * geometry["stride"][axis] + geometry["padding"][axis]
            d = geometry["dilation"][axis]
            inside &= (offset >= 0) & (offset % d == 0) & \
                (offset // d < geometry["kernel_size"][axis])
        return inside

    def _pooled(self, indices, conv=None):
        """The convolution's (torch's, or `conv`) element at each window's flat index (clamped
        into the plane: a window without input elements is masked out by the caller),
        differentiable."""
        flat = (self.conv if conv is None else conv).flatten(-2)
        at = indices.clamp(0, max(flat.shape[-1] - 1, 0)).flatten(-2)
        return flat.gather(-1, at).view(indices.shape)

    def grads(self, g):
        indices = self.indices
        with torch.no_grad():
            chosen = self._pooled(indices)
            positive = ~(chosen <= 0)  # relu's gradient passes at > 0 and at NaN, as torch's
            if self.ours is not None and indices.numel():
                tol = tolerance(self.case, self.conv.dtype, self.case.out_scale or 0)
                result, ours = self.ours
                mine = self._pooled(ours)
                near_tie = (ours != indices) & self._in_window(ours) & (mine != self.maxima) & \
                    ((mine - self.maxima).abs() <= tol["atol"] + tol["rtol"] * self.maxima.abs())
                broken_tie = (ours != indices) & self._in_window(ours) & (mine == self.maxima) & \
                    (self._pooled(ours, self.our_conv) > self._pooled(indices, self.our_conv))
                near_tie |= broken_tie
                indices = torch.where(near_tie & self.with_input, ours, indices)
                chosen = self._pooled(indices)
                near_zero = (chosen != 0) & (chosen.abs() <= tol["atol"])
                positive = torch.where(near_zero, result > 0, ~(chosen <= 0))
        with reference_settings():
            chosen = self._pooled(indices)
            keep = positive & self.with_input
            torch.where(keep, chosen, torch.zeros_like(chosen)).backward(g)
        return [a.grad if isinstance(a, torch.Tensor) else None for a in self.leaves()]


REFERENCES = {"max_pool2d": PoolReference, "cross_entropy": CrossEntropyReference,
              "conv2d_relu_max_pool2d": FusedReference}


# ---- the backward operators called directly --------------------------------------------------

def output_mask(args):
    """conv2d / linear's output_mask: which of (input, weight, bias) need a gradient."""
    return [isinstance(a, torch.Tensor) and a.requires_grad for a in args]


def masked(grads, mask):
    """(grad_input, grad_weight, grad_bias), checked to be there exactly where output_mask asked."""
    for name, grad, wanted in zip(("grad_input", "grad_weight", "grad_bias"), grads, mask):
        assert (grad is not None) == wanted, f"{name} is {grad} for output_mask={mask}"
    return list(grads)


def direct_backward(case, args, kwargs, out, g):
    """Gradients from torch.ops.pyengine.<op>_backward itself, one per input (None: not
    computed); None when the op's direct call does not apply to this case."""
    op, p = case.op, case.params
    d = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
    if g.dim() >= 1:
        g = helpers.noncontiguous(g)
    res = out.detach() if isinstance(out, torch.Tensor) else None
    if op == "conv2d":
        if isinstance(kwargs["padding"], str):
            return None  # 'same' / 'valid' are the functional layer's; the op takes numbers
        x, w, _ = d
        mask = output_mask(args)
        grads = P.conv2d_backward(g, x, w, _pair(kwargs["stride"]), _pair(kwargs["padding"]),
                                  _pair(kwargs["dilation"]), kwargs["groups"], mask)
        return masked(grads, mask)
    if op == "conv2d_relu_max_pool2d":
        # result and indices from the forward operator called directly (pyengine.fused returns
        # the output only); string padding as numbers, the hand-padded input's grad cropped
        mask = output_mask(args)
        op_args, x, crop, (result, indices) = fused_operator_call(case, args, kwargs)
        grads = masked(P.conv2d_relu_max_pool2d_backward(g, result, indices, x, d[1], *op_args,
                                                         mask), mask)
        if crop is not None and grads[0] is not None:
            grads[0] = grads[0][..., :crop[0], :crop[1]]
        return grads
    if op == "max_pool2d":
        x = d[0]
        idx = out[1] if isinstance(out, tuple) else pyengine_function(op)(
            x, **dict(kwargs, return_indices=True))[1]
        return [P.max_pool2d_backward(g, x, idx, *pool_geometry(p).values())]
    if op == "linear":
        x, w, _ = d
        mask = output_mask(args)
        return masked(P.linear_backward(g, x, w, mask), mask)
    if op in ("relu", "sigmoid", "tanh"):
        return [getattr(P, op + "_backward")(g, res)]
    if op == "leaky_relu":
        return [P.leaky_relu_backward(g, d[0], float(kwargs["negative_slope"]))]
    if op in ("softmax", "log_softmax"):
        grad = getattr(P, op + "_backward")(g, res, kwargs["dim"])
        return [grad.to(d[0].dtype)]  # dtype=float64: the cast back is the gradient's too
    r = helpers.REDUCTION_ENUM[kwargs["reduction"]]
    weight = kwargs.get("weight")
    weight = weight.detach() if weight is not None else None
    if op == "mse_loss":
        x, t = d
        if x.shape != t.shape:
            return None  # broadcasting belongs to the functional layer
        return [P.mse_loss_backward(g, x, t, weight, r), P.mse_loss_backward(g, t, x, weight, r)]
    if op == "binary_cross_entropy":
        x, t = d
        if weight is not None:
            weight = weight.expand(t.shape)
        return [P.binary_cross_entropy_backward(g, x, t, weight, r)
                if args[0].requires_grad else None,
                P.binary_cross_entropy_target_backward(g, x, t, weight, r)
                if args[1].requires_grad else None]
    if op == "cross_entropy":
        x, t = d
        if x.dim() > 2:
            return None  # (N, C, d...) is reshaped by the functional layer
        # (d/d(target) of probabilities is autograd's formula, not an operator)
        return [P.cross_entropy_backward(g, x, t, weight, r, kwargs["ignore_index"],
                                         kwargs.get("label_smoothing", 0.0)), None]
    raise AssertionError(f"no direct backward call for {op}")


# ---- one case ----------------------------------------------------------------------------------

# What pyengine's messages say when it refuses a value inside a tensor (binary_cross_entropy's
# [0, 1], cross_entropy's class indices, max_pool2d_backward's indices).
DATA_ERRORS = ("should be between 0 and 1", "is out of bounds", "lies outside", "outside the")


def refused_for_a_value(case):
    """Whether pyengine refuses the case for a value inside a tensor (on the CPU, where that is an
    exception). On CUDA it is a device-side assert, raised later and poisoning the process's CUDA
    context, so tests/test_cuda.py checks each such assert in a process of its own."""
    args, kwargs = materialize(case, torch.Generator().manual_seed(case.seed), "cpu")
    try:
        call(pyengine_function(case.op), args, kwargs)
    except Exception as exc:
        return any(m in str(exc) for m in DATA_ERRORS)
    return False


def check(case, device="cpu"):
    """Runs one case with pyengine on `device` (torch on the CPU); raises CheckFailed naming the
    failing check. A case refused for a value inside a tensor runs on the CPU even for CUDA
    (refused_for_a_value)."""
    if case.expect_error and torch.device(device).type == "cuda" and refused_for_a_value(case):
        device = "cpu"
    gen = torch.Generator().manual_seed(case.seed)
    with stage("inputs"):
        args, kwargs = materialize(case, gen, device)
        ref_args, ref_kwargs = reference_leaves(args, kwargs)
    ours_fn = pyengine_function(case.op)

    if case.expect_error:
        for side, fn, a, kw in (("torch", torch_function(case.op), ref_args, ref_kwargs),
                                ("pyengine", ours_fn, args, kwargs)):
            with stage(f"{side} raises"):
                try:
                    call(fn, a, kw)
                except Exception:
                    continue
                raise AssertionError(f"{side} accepted a call it should refuse")
        return

    with stage("torch accepts the case (a fuzz_configs bug otherwise)"):
        ref = REFERENCES.get(case.op, TorchReference)(case, ref_args, ref_kwargs)
    with stage("pyengine forward"):
        out = call(ours_fn, args, kwargs)
    with stage(f"{case.op} called directly, for the reference"):
        ref.see_ours(case, args, kwargs)
    with stage("forward output"):
        ours_values = out[0] if isinstance(out, tuple) else out
        exact = dict(rtol=0, atol=0) if case.op == "max_pool2d" else {}  # a max is exact
        expected = ref.primary().detach()
        if (torch.device(device).type == "cuda" and case.op == "cross_entropy"
                and helpers.cross_entropy_differs_on_cuda(
                    args[0], args[1], kwargs.get("reduction", "mean") == "mean",
                    kwargs.get("ignore_index", -100), kwargs.get("label_smoothing", 0.0))):
            expected = torch.zeros_like(expected)  # torch's CUDA result (the reference is CPU's)
        helpers.assert_close(ours_values.detach().cpu(), expected, expected.dtype,
                             **(exact or tolerance(case, expected.dtype, case.out_scale or 0)))
    if isinstance(out, tuple):
        with stage("forward indices"):
            indices, ref_indices = out[1].cpu(), ref.out[1]
            assert indices.dtype == torch.int64 and indices.shape == ref_indices.shape
            mask = ref.index_mask if ref.index_mask is not None else torch.ones_like(
                indices, dtype=torch.bool)
            bad = (indices != ref_indices) & mask
            assert not bad.any(), (f"{int(bad.sum())} indices differ, e.g. ours "
                                   f"{indices[bad][:5].tolist()} torch "
                                   f"{ref_indices[bad][:5].tolist()}")

    with stage("grad_output"):
        g = torch.randn(ours_values.shape, generator=gen, dtype=ours_values.dtype)
    with stage("torch backward"):
        ref_grads = ref.grads(g)
    with stage("pyengine backward"):
        ours_values.backward(g.to(device))
    leaves = list(args) + list(kwargs.values())
    specs = list(case.args) + list(case.kwargs.values())
    for i, (leaf, spec, ref_grad) in enumerate(zip(leaves, specs, ref_grads)):
        if not (isinstance(leaf, torch.Tensor) and leaf.requires_grad):
            continue
        with stage(f"gradient of {argument_name(case, i)}"):
            assert leaf.grad is not None, "no gradient"
            helpers.assert_close(leaf.grad.cpu(), ref_grad, leaf.dtype,
                                 **tolerance(case, leaf.dtype, grad_exponent(case, spec)))

    if case.params.get("direct_backward"):
        with stage(f"{case.op}_backward called directly"):
            direct = direct_backward(case, args, kwargs, out, g.to(device))
        if direct is not None:
            for i, (grad, spec, ref_grad) in enumerate(zip(direct, specs, ref_grads)):
                if grad is None:
                    continue
                with stage(f"{case.op}_backward called directly: gradient of "
                           f"{argument_name(case, i)}"):
                    helpers.assert_close(grad.cpu(), ref_grad, grad.dtype,
                                         **tolerance(case, grad.dtype, grad_exponent(case, spec)))


def argument_name(case, i):
    if i < len(case.args):
        return list(inspect.signature(pyengine_function(case.op)).parameters)[i]
    return list(case.kwargs)[i - len(case.args)]


def failure(case, device="cpu"):
    """The CheckFailed of a case, or None if it passes."""
    try:
        check(case, device)
    except CheckFailed as exc:
        return exc
    return None
