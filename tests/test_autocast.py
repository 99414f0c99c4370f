"""pyengine under torch.autocast (csrc/autocast.cpp): each operator computes in the dtype torch's
autocast gives its torch twin, forward and gradients; a LeNet trains under bfloat16 autocast as
torch.nn's does; GradScaler works with float16; patch() keeps routing to pyengine. (CUDA's
policies: tests/test_cuda.py, on a GPU.)"""
import pytest
import torch

import pyengine
import pyengine.functional as PF
import fuzz_configs
import samples
from differential import call
from fuzz_configs import materialize, pyengine_function, torch_function
from pyengine.models import LeNet

LOW_DTYPES = (torch.bfloat16, torch.float16)
OPERATORS = sorted(set(PF.__all__ + pyengine.fused.__all__))


def _first_plain_sample(op):
    return next(s for s in samples.samples(op) if not s.large and not s.case.expect_error
                and not samples.has_special_values(s)
                and all(fuzz_configs.numel(spec.shape) > 0 for _, spec in s.case.tensors()))


def _leaves(args, kwargs, dtype):
    """The call's floating tensors in `dtype` (float32: autocast's usual input), fresh leaves."""
    def cast(a):
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            return a.detach().to(dtype).requires_grad_(a.requires_grad)
        return a
    return [cast(a) for a in args], {k: cast(v) for k, v in kwargs.items()}


def _run_under_autocast(fn, args, kwargs, dtype):
    with torch.autocast("cpu", dtype=dtype):
        out = call(fn, args, kwargs)
    out = out[0] if isinstance(out, tuple) else out
    leaves = [a for a in list(args) + list(kwargs.values())
              if isinstance(a, torch.Tensor) and a.requires_grad]
    grads = []
    if leaves and out.requires_grad:
        g = torch.ones_like(out)
        grads = torch.autograd.grad(out, leaves, g, allow_unused=True)
    return out.detach(), grads


@pytest.mark.parametrize("input_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("dtype", LOW_DTYPES, ids=str)
@pytest.mark.parametrize("op", OPERATORS)
def test_operator_follows_torchs_autocast_policy(op, dtype, input_dtype):
    """Same result dtype as the torch twin under autocast, same gradient dtypes, and values that
    agree to the autocast dtype's precision."""
    case = _first_plain_sample(op).case
    args64, kwargs64 = materialize(case)
    args, kwargs = _leaves(args64, kwargs64, input_dtype)
    theirs_args, theirs_kwargs = _leaves(args, kwargs, input_dtype)
    ours, our_grads = _run_under_autocast(pyengine_function(op), args, kwargs, dtype)
    theirs, their_grads = _run_under_autocast(torch_function(op), theirs_args, theirs_kwargs,
                                              dtype)
    assert ours.dtype == theirs.dtype, f"{op} under {dtype} autocast: {ours.dtype}, torch's " \
                                       f"{theirs.dtype}"
    precision = torch.finfo(theirs.dtype).eps
    torch.testing.assert_close(ours.double(), theirs.double(), rtol=8 * precision,
                               atol=8 * precision * max(1.0, theirs.abs().max().item()),
                               equal_nan=True)
    assert [g is None for g in our_grads] == [g is None for g in their_grads]
    for mine, other in zip(our_grads, their_grads):
        if mine is not None:
            assert mine.dtype == other.dtype, (op, mine.dtype, other.dtype)


def test_float64_is_never_cast():
    """autocast leaves float64 alone, for pyengine's operators as for torch's."""
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert PF.conv2d(x, w).dtype == torch.float64
        assert torch.nn.functional.conv2d(x, w).dtype == torch.float64


def test_mixed_dtypes_are_cast_as_torch_casts_them():
    """Under autocast a float32 weight meets a bfloat16 input (the usual case: activations in
    bfloat16, parameters in float32): conv2d and linear cast both; outside autocast that call is
    an error naming the mismatch."""
    x = torch.randn(2, 3, 8, 8, dtype=torch.bfloat16)
    w, b = torch.randn(4, 3, 3, 3), torch.randn(4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert PF.conv2d(x, w, b).dtype == torch.bfloat16
        assert PF.linear(x.flatten(1), torch.randn(5, 192)).dtype == torch.bfloat16
        logits, probabilities = torch.randn(4, 5, dtype=torch.bfloat16), torch.rand(4, 5)
        loss = PF.cross_entropy(logits, probabilities)
        assert loss.dtype == torch.float32
        torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits, probabilities))
    with pytest.raises(RuntimeError, match="same dtype as input"):
        PF.conv2d(x, w, b)


def _train(model, data, steps, dtype, scaler=None, lr=0.02):
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    losses = []
    for step in range(steps):
        x, y = data[step % len(data)]
        opt.zero_grad()
        with torch.autocast("cpu", dtype=dtype):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        assert loss.dtype == torch.float32
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        losses.append(loss.item())
    return losses


def _digits_like_data(batches, batch, seed=0):
    """A learnable 10-class problem of LeNet's input size: each class a fixed random pattern plus
    noise."""
    gen = torch.Generator().manual_seed(seed)
    patterns = torch.randn(10, 1, 32, 32, generator=gen)
    out = []
    for _ in range(batches):
        y = torch.randint(0, 10, (batch,), generator=gen)
        x = patterns[y] + 0.5 * torch.randn(batch, 1, 32, 32, generator=gen)
        out.append((x, y))
    return out


@pytest.mark.parametrize("dtype", LOW_DTYPES, ids=str)
def test_lenet_trains_under_autocast_as_torch_nn_does(dtype):
    """The same LeNet (same initial weights) on pyengine and torch.nn layers, 60 SGD steps under
    autocast: both learn the problem (the loss from 2.3 to below 0.3), with losses that stay
    close; parameters stay float32."""
    torch.manual_seed(0)
    ours = LeNet(backend="pyengine")
    theirs = LeNet(backend="torch")
    theirs.load_state_dict(ours.state_dict())
    data = _digits_like_data(6, 32)
    our_losses = _train(ours, data, 60, dtype)
    their_losses = _train(theirs, data, 60, dtype)
    assert all(p.dtype == torch.float32 for p in ours.parameters())
    assert our_losses[-1] < 0.3 and their_losses[-1] < 0.3, (our_losses[-1], their_losses[-1])
    # the steps agree to the autocast dtype's rounding until the losses are small
    for mine, other in zip(our_losses[:40], their_losses[:40]):
        assert abs(mine - other) <= 0.05 * abs(other) + 1e-2, (our_losses[:40], their_losses[:40])
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
        x, y = data[0]
        ours_acc = (ours(x).argmax(1) == y).float().mean().item()
        theirs_acc = (theirs(x).argmax(1) == y).float().mean().item()
    assert ours_acc >= theirs_acc - 0.1 and ours_acc > 0.8


def test_grad_scaler_works_with_float16():
    """GradScaler unchanged: scaled float16 gradients unscale to torch.nn's, an overflow skips the
    step and lowers the scale, exactly as it does for torch.nn's layers."""
    torch.manual_seed(1)
    ours, theirs = LeNet(backend="pyengine"), LeNet(backend="torch")
    theirs.load_state_dict(ours.state_dict())
    data = _digits_like_data(2, 16, seed=1)
    results = []
    for model in (ours, theirs):
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
        losses = _train(model, data, 4, torch.float16, scaler=scaler)
        results.append((losses, scaler.get_scale()))
        # an overflowing step: the gradients are inf, the step is skipped, the scale halves
        before = [p.detach().clone() for p in model.parameters()]
        scale = scaler.get_scale()
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        x, y = data[0]
        with torch.autocast("cpu", dtype=torch.float16):
            loss = torch.nn.functional.cross_entropy(model(x * 1e4), y) * 1e30
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        assert scaler.get_scale() == scale / 2
        assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    (our_losses, our_scale), (their_losses, their_scale) = results
    assert our_scale == their_scale
    for mine, other in zip(our_losses, their_losses):
        assert abs(mine - other) <= 0.05 * abs(other) + 1e-3


def test_patch_routes_under_autocast():
    """A torch.nn model inside pyengine.patch() and autocast runs pyengine's kernels (no ATen
    convolution, matrix product or pooling), in the dtypes torch's autocast gives."""
    torch.manual_seed(2)
    model = LeNet(backend="torch")
    x, y = torch.randn(4, 1, 32, 32), torch.randint(0, 10, (4,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = model(x)
    with pyengine.patch(), torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            out = model(x)
            loss = torch.nn.functional.cross_entropy(out, y)
            loss.backward()
    names = {e.name for e in prof.events()}
    assert {"pyengine::conv2d", "pyengine::linear", "pyengine::cross_entropy"} <= names, names
    aten = [n for n in names if n.startswith("aten::") and any(
        word in n for word in ("conv", "mm", "pool", "linear", "cross_entropy", "nll"))]
    assert not aten, aten
    assert out.dtype == expected.dtype == torch.bfloat16 and loss.dtype == torch.float32
    torch.testing.assert_close(out.float(), expected.float(), rtol=0.05, atol=0.05)


def test_compiled_model_under_autocast_matches_eager():
    """torch.compile of a pyengine LeNet under bf16 autocast: the same dtypes and values as eager
    under the same autocast, and gradients flow to the float32 parameters."""
    torch.manual_seed(3)
    model = LeNet(backend="pyengine")
    x, y = torch.randn(8, 1, 32, 32), torch.randint(0, 10, (8,))
    compiled = torch.compile(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = compiled(x)
        loss = torch.nn.functional.cross_entropy(out, y)
        expected = model(x)
    loss.backward()
    assert out.dtype == expected.dtype == torch.bfloat16 and loss.dtype == torch.float32
    torch.testing.assert_close(out, expected)
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())


def test_converted_model_runs_under_autocast():
    """convert()'s twins (which used to raise under autocast) compute in torch's autocast dtypes,
    with torch.nn's results to the autocast dtype's precision."""
    torch.manual_seed(4)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                                torch.nn.Flatten(), torch.nn.Linear(8 * 3 * 3, 5),
                                torch.nn.LogSoftmax(1))
    converted = pyengine.convert(model)
    x = torch.randn(4, 3, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, theirs = converted(x), model(x)
    assert ours.dtype == theirs.dtype == torch.bfloat16
    torch.testing.assert_close(ours.float(), theirs.float(), rtol=0.03, atol=0.03)
    ours.float().sum().backward()
    assert all(p.grad.dtype == torch.float32 for p in converted.parameters())
