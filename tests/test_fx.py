"""pyengine beyond plain tensors: torch.fx.symbolic_trace of the tutorial networks and of every
pyengine.nn layer gives a graph of torch.ops.pyengine.* calls that computes what eager does,
forward and gradients; a tensor subclass with __torch_function__ and a TorchFunctionMode see every
operator call pyengine.functional makes (it takes the torch.ops path for them), while plain
tensors keep the pybind11 fast path (pyengine._C)."""
import collections
import sys
import warnings

import pytest
import torch
import torch.fx
from torch.overrides import TorchFunctionMode

import pyengine
import pyengine._nn
import pyengine.functional as PF
import pyengine.nn as pnn
import samples
from differential import call
from fuzz_configs import materialize
from test_models import CASES as NETWORKS

EXACT = dict(rtol=0, atol=0, equal_nan=True)  # the same kernels run either way


def _leaves(values):
    """Fresh leaf copies of the tensors, requiring grad where the originals do."""
    return [v.detach().clone().requires_grad_(v.requires_grad)
            if isinstance(v, torch.Tensor) else v for v in values]


def _tensors(out):
    return [t for t in (out if isinstance(out, tuple) else (out,)) if isinstance(t, torch.Tensor)]


def _run(fn, inputs, params, gen_seed):
    """fn(*inputs) on fresh leaves, and the gradients of a random weighted sum of its floating
    outputs with respect to the inputs and `params`."""
    inputs = _leaves(inputs)
    outs = _tensors(fn(*inputs))
    floating = [o for o in outs if o.requires_grad]
    gen = torch.Generator().manual_seed(gen_seed)
    total = sum((o * torch.randn(o.shape, generator=gen, dtype=o.dtype)).sum() for o in floating)
    wrt = [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad] + params
    return outs, torch.autograd.grad(total, wrt, allow_unused=True)


def _pyengine_ops(gm):
    """The pyengine operators the graph calls, one entry per call."""
    return [n.target._qualified_op_name.split("::")[1] for n in gm.graph.nodes
            if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverloadPacket)
            and n.target._qualified_op_name.startswith("pyengine::")]


# The fx leaves that compute with pyengine operators inside (the graph shows their call only).
COMPUTING_LEAVES = {pyengine._nn._elman_rnn}


def _check_trace(module, inputs):
    """symbolic_trace(module): its graph calls pyengine's operators through torch.ops (never a
    pyengine.functional function as a leaf, never the pybind11 fast path), runs the very
    operator calls eager runs, and gives eager's outputs and gradients."""
    gm = torch.fx.symbolic_trace(module)
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert not [t for t in targets if getattr(t, "__module__", None) in
                ("pyengine.functional", "pyengine._C")], gm.code
    traced, leaves = _pyengine_ops(gm), [t for t in targets if t in COMPUTING_LEAVES]
    assert traced or leaves, gm.code
    # The graph module holds the module's very parameters: gradients reach them.
    params = list(module.parameters())
    expected, actual = _run(module, inputs, params, 0), _run(gm, inputs, params, 0)
    with samples._RecordFunctionalOps() as eager_calls:
        module(*_leaves(inputs))
    with samples._RecordFunctionalOps() as graph_calls:
        gm(*_leaves(inputs))
    eager_ops = [c.name for c in eager_calls.calls]
    assert [c.name for c in graph_calls.calls] == eager_ops
    if not leaves:
        assert collections.Counter(traced) == collections.Counter(eager_ops), gm.code
    for a, b in zip(actual[0], expected[0]):
        torch.testing.assert_close(a, b, **EXACT)
    assert len(actual[1]) == len(expected[1])
    for a, b in zip(actual[1], expected[1]):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, **EXACT)
    return gm


@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_symbolic_trace_of_tutorial_network_matches_eager(name):
    factory, shape = NETWORKS[name]
    model = factory("pyengine").double()
    _check_trace(model, [torch.randn(*shape, dtype=torch.float64, requires_grad=True)])


def _floats(*shape):
    return lambda: torch.randn(*shape, dtype=torch.float64, requires_grad=True)


def _probabilities(*shape, requires_grad=True):
    # pyengine's binary_cross_entropy gives no gradient for its target
    return lambda: torch.rand(*shape, dtype=torch.float64).clamp(0.05, 0.95).requires_grad_(
        requires_grad)


def _classes(n, *shape):
    return lambda: torch.randint(0, n, shape)


def _after_linear(layer, features=4):
    # In-place layers write into their input, which must not be a leaf that requires grad.
    return lambda: torch.nn.Sequential(pnn.Linear(features, features), layer())


# Every pyengine.nn layer, in the configurations that take different paths through
# pyengine.functional: (module factory, input factories).
LAYERS = {
    "conv2d": (lambda: pnn.Conv2d(3, 4, 3, stride=2, padding=1), [_floats(2, 3, 7, 8)]),
    "conv2d_groups_no_bias": (lambda: pnn.Conv2d(4, 2, (3, 2), groups=2, bias=False),
                              [_floats(1, 4, 5, 6)]),
    "conv2d_unbatched": (lambda: pnn.Conv2d(2, 3, 3, dilation=2), [_floats(2, 7, 7)]),
    "conv2d_same": (lambda: pnn.Conv2d(3, 4, 3, padding="same"), [_floats(2, 3, 5, 6)]),
    "conv2d_same_odd_total": (lambda: pnn.Conv2d(3, 4, (2, 3), padding="same", dilation=(3, 1)),
                              [_floats(2, 3, 6, 7)]),
    "conv2d_valid": (lambda: pnn.Conv2d(3, 2, 2, padding="valid"), [_floats(1, 3, 4, 4)]),
    "conv2d_reflect": (lambda: pnn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"),
                       [_floats(2, 3, 5, 5)]),
    "max_pool2d": (lambda: pnn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True),
                   [_floats(2, 3, 7, 8)]),
    "max_pool2d_indices": (lambda: pnn.MaxPool2d(2, return_indices=True), [_floats(2, 3, 6, 6)]),
    "linear": (lambda: pnn.Linear(5, 3), [_floats(4, 2, 5)]),
    "linear_no_bias": (lambda: pnn.Linear(5, 3, bias=False), [_floats(5)]),
    "relu": (pnn.ReLU, [_floats(3, 5)]),
    "relu_inplace": (_after_linear(lambda: pnn.ReLU(inplace=True)), [_floats(3, 4)]),
    "leaky_relu": (lambda: pnn.LeakyReLU(0.2), [_floats(3, 5)]),
    "leaky_relu_inplace": (_after_linear(lambda: pnn.LeakyReLU(0.1, inplace=True)),
                           [_floats(3, 4)]),
    "sigmoid": (pnn.Sigmoid, [_floats(3, 5)]),
    "tanh": (pnn.Tanh, [_floats(3, 5)]),
    "softmax": (lambda: pnn.Softmax(dim=1), [_floats(3, 5, 2)]),
    "softmax_implicit_dim": (pnn.Softmax, [_floats(2, 3, 4)]),   # torch's legacy dim: 0
    "log_softmax": (lambda: pnn.LogSoftmax(dim=-1), [_floats(3, 5)]),
    "log_softmax_implicit_dim": (pnn.LogSoftmax, [_floats(3, 5)]),  # dim 1
    "mse_loss": (pnn.MSELoss, [_floats(4, 3), _floats(4, 3)]),
    "mse_loss_broadcast": (lambda: pnn.MSELoss(reduction="none"), [_floats(4, 3), _floats(1, 3)]),
    "bce_loss": (lambda: pnn.BCELoss(reduction="sum"),
                 [_probabilities(4, 3), _probabilities(4, 3, requires_grad=False)]),
    "bce_loss_weight": (lambda: pnn.BCELoss(weight=torch.rand(3, dtype=torch.float64)),
                        [_probabilities(4, 3), _probabilities(4, 3, requires_grad=False)]),
    "cross_entropy": (pnn.CrossEntropyLoss, [_floats(4, 5), _classes(5, 4)]),
    "cross_entropy_weight_ignore": (
        lambda: pnn.CrossEntropyLoss(weight=torch.rand(5, dtype=torch.float64), ignore_index=2),
        [_floats(6, 5), _classes(5, 6)]),
    "cross_entropy_spatial_none": (lambda: pnn.CrossEntropyLoss(reduction="none"),
                                   [_floats(2, 5, 3, 4), _classes(5, 2, 3, 4)]),
    "cross_entropy_spatial_mean": (pnn.CrossEntropyLoss, [_floats(2, 5, 3), _classes(5, 2, 3)]),
    # a fused conv2d_relu_max_pool2d, then a module it does not fuse
    "sequential_conv_relu_pool": (
        lambda: pnn.Sequential(pnn.Conv2d(2, 3, 3, padding=1), pnn.ReLU(inplace=True),
                               pnn.MaxPool2d(2, ceil_mode=True), pnn.Tanh()),
        [_floats(2, 2, 5, 6)]),
    "rnn": (lambda: pnn.RNN(4, 6, num_layers=2, nonlinearity="relu"), [_floats(5, 3, 4)]),
    "rnn_unbatched_hx": (lambda: pnn.RNN(4, 6, batch_first=True, bias=False),
                         [_floats(5, 4), _floats(1, 6)]),
}


def test_every_layer_has_a_trace_case():
    covered = {type(m) for factory, _ in LAYERS.values() for m in factory().modules()}
    assert set(pnn.TWINS.values()) <= covered


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_symbolic_trace_of_layer_matches_eager(name):
    factory, inputs = LAYERS[name]
    with warnings.catch_warnings():
        # torch's warnings for legal calls: the implicit softmax dim, a broadcast target
        warnings.simplefilter("ignore")
        _check_trace(factory().double(), [make() for make in inputs])


# ---- __torch_function__: subclasses and modes ---------------------------------------------

class LoggingTensor(torch.Tensor):
    """A tensor subclass whose __torch_function__ logs every call it sees, then runs it as
    torch.Tensor does (results come back as LoggingTensors)."""
    log = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        cls.log.append(func)
        return super().__torch_function__(func, types, args, kwargs or {})


class LoggingMode(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.log = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.log.append(func)
        return func(*args, **(kwargs or {}))


def _sample_calls(op):
    """(args, kwargs) of each small sample of pyengine.functional.<op> that does not raise."""
    for sample in samples.samples(op):
        if not sample.large and not sample.case.expect_error:
            yield sample, materialize(sample.case)


def _as(cls, value):
    return value.as_subclass(cls) if isinstance(value, torch.Tensor) else value


def _plain(outs):
    return [t.as_subclass(torch.Tensor) for t in _tensors(outs)]


def _pyengine_calls(log):
    return [f for f in log if isinstance(f, torch._ops.OpOverloadPacket)
            and f._qualified_op_name.startswith("pyengine::")]


def _c_calls(fn):
    """fn()'s result and the C functions it called (sys.setprofile's c_call events)."""
    seen = []

    def profile(frame, event, arg):
        if event == "c_call":
            seen.append(arg)

    sys.setprofile(profile)
    try:
        result = fn()
    finally:
        sys.setprofile(None)
    return result, seen


def _fast_paths():
    return {getattr(pyengine._C, n) for n in dir(pyengine._C)
            if hasattr(torch.ops.pyengine, n) and not n.startswith("_")}


@pytest.mark.parametrize("op", PF.__all__)
def test_tensor_subclass_sees_every_operator_call(op):
    """Each call of pyengine.functional.<op> on LoggingTensors goes through torch.ops (the
    subclass's handler sees the one operator the call makes, and no fast path runs), returns
    LoggingTensors and the values (and gradients) of the same call on plain tensors."""
    fn, fast_paths = getattr(PF, op), _fast_paths()
    for sample, (args, kwargs) in _sample_calls(op):
        expected = call(fn, args, kwargs)
        with samples._RecordFunctionalOps() as recorder:
            call(fn, args, kwargs)
        [expected_op] = [c.op.overloadpacket for c in recorder.calls]
        LoggingTensor.log = []
        sub_args = [_as(LoggingTensor, a) for a in args]
        sub_kwargs = {k: _as(LoggingTensor, v) for k, v in kwargs.items()}
        out, c_calls = _c_calls(lambda: call(fn, sub_args, sub_kwargs))
        assert _pyengine_calls(LoggingTensor.log) == [expected_op], (sample, LoggingTensor.log)
        assert not fast_paths.intersection(c_calls), sample
        assert all(type(t) is LoggingTensor for t in _tensors(out)), (sample, out)
        for a, b in zip(_plain(out), _tensors(expected)):
            torch.testing.assert_close(a, b, **EXACT, msg=str(sample))
        grads_of = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
        if grads_of and _tensors(expected)[0].requires_grad:
            # as_subclass keeps the autograd graph: the gradients reach the plain leaves.
            g = torch.randn_like(_tensors(expected)[0])
            a = torch.autograd.grad(_plain(out)[0], grads_of, g, allow_unused=True)
            b = torch.autograd.grad(_tensors(expected)[0], grads_of, g, allow_unused=True)
            for x, y in zip(a, b):
                torch.testing.assert_close(x, y, **EXACT, msg=str(sample))


@pytest.mark.parametrize("op", PF.__all__)
def test_torch_function_mode_sees_every_operator_call(op):
    fn, fast_paths = getattr(PF, op), _fast_paths()
    for sample, (args, kwargs) in _sample_calls(op):
        expected, c_calls = _c_calls(lambda: call(fn, args, kwargs))
        assert fast_paths.intersection(c_calls), sample  # plain tensors: the fast path
        with LoggingMode() as mode:
            out, c_calls = _c_calls(lambda: call(fn, args, kwargs))
        assert len(_pyengine_calls(mode.log)) == 1, (sample, mode.log)
        assert not fast_paths.intersection(c_calls), sample
        for a, b in zip(_tensors(out), _tensors(expected)):
            torch.testing.assert_close(a, b, **EXACT, msg=str(sample))


def test_plain_tensors_and_parameters_take_the_fast_path():
    """The fast path is pyengine._C.<op> itself, called with the arguments as given, for plain
    tensors and Parameters; torch.ops.pyengine.<op> (its packet's __call__) does not run."""
    x, w = torch.randn(3, 4), torch.nn.Parameter(torch.randn(2, 4))
    for fn, args, fast in [(PF.relu, (x,), pyengine._C.relu),
                           (PF.linear, (x, w), pyengine._C.linear),
                           (PF.max_pool2d, (x[None], 2), pyengine._C.max_pool2d)]:
        out, c_calls = _c_calls(lambda: fn(*args))
        assert fast in c_calls
        assert type(out) is torch.Tensor
    LoggingTensor.log = []
    out, c_calls = _c_calls(lambda: PF.linear(x, w.as_subclass(LoggingTensor)))
    assert pyengine._C.linear not in c_calls
    assert _pyengine_calls(LoggingTensor.log) == [torch.ops.pyengine.linear]


def test_fx_proxy_takes_the_torch_ops_path():
    """A Proxy reaching the fast path would be a pybind11 TypeError; pyengine.functional hands
    it to torch.ops, whose call is what the graph records."""
    gm = torch.fx.symbolic_trace(lambda x: PF.leaky_relu(PF.sigmoid(x), 0.3))
    assert _pyengine_ops(gm) == ["sigmoid", "leaky_relu"]
    x = torch.randn(5)
    torch.testing.assert_close(gm(x), PF.leaky_relu(PF.sigmoid(x), 0.3), **EXACT)
