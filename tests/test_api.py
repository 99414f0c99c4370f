"""pyengine.functional, pyengine.nn and pyengine.convert as drop-in replacements for torch's:
same signatures, same results, same parameters and state_dict."""
import inspect
import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
import torch.nn.functional as TF

import helpers
import pyengine
import pyengine.functional as PF
import pyengine.nn as pnn
from helpers import assert_close, compare_with_torch, devices

FUNCTIONS = PF.__all__


def _torch_params(name):
    """Parameter names and defaults of torch.nn.functional.<name> (C builtins: from the doc)."""
    fn = getattr(TF, name)
    try:
        sig = inspect.signature(fn)
    except ValueError:  # conv2d and linear are C builtins; their doc's first line is the signature
        line = fn.__doc__.strip().splitlines()[0]
        sig = inspect.signature(eval(f"lambda {line[line.index('(') + 1:line.rindex(')')]}: 0"))
    return [(p.name, p.default) for p in sig.parameters.values()]


@pytest.mark.parametrize("name", FUNCTIONS)
def test_functional_signature_matches_torch(name):
    ours = [(p.name, p.default) for p in inspect.signature(getattr(PF, name)).parameters.values()]
    if name == "max_pool2d":  # torch's is a boolean_dispatch wrapper: compare with its target
        theirs = [(p.name, p.default) for p in
                  inspect.signature(TF._max_pool2d).parameters.values()]
        assert ours == theirs
    else:
        assert ours == _torch_params(name)


# ---- functional: argument handling that lives in Python ------------------------------------

@devices
@pytest.mark.parametrize("padding", ["same", "valid", 1, (2, 0), [1, 2]])
@pytest.mark.parametrize("kernel,dilation", [((3, 3), 1), ((4, 2), 1), ((2, 3), (2, 1))])
def test_conv2d_padding_forms(device, padding, kernel, dilation):
    x = torch.randn(2, 3, 9, 8, device=device, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, *kernel, device=device, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, device=device, dtype=torch.float64, requires_grad=True)
    compare_with_torch(lambda x, w, b: PF.conv2d(x, w, b, 1, padding, dilation),
                       lambda x, w, b: TF.conv2d(x, w, b, 1, padding, dilation), [x, w, b])


def test_conv2d_bad_padding_string_and_same_with_stride():
    x, w = torch.randn(1, 1, 5, 5), torch.randn(1, 1, 3, 3)
    with helpers.raises(ValueError, "padding", "'full'"):
        PF.conv2d(x, w, padding="full")
    with helpers.raises(ValueError, "padding='same'", "strided", "stride=(2, 2)"):
        PF.conv2d(x, w, stride=2, padding="same")
    with helpers.raises(ValueError, "stride", "an int or a pair of ints", "(1, 2, 3)"):
        PF.conv2d(x, w, stride=(1, 2, 3))


@devices
@pytest.mark.parametrize("stride", [None, 1, (1, 2), []])
def test_max_pool2d_stride_default_and_indices(device, stride):
    x = torch.randn(2, 3, 7, 6, device=device)
    out, idx = PF.max_pool2d(x, 2, stride, return_indices=True)
    ref, ref_idx = TF.max_pool2d(x, 2, stride, return_indices=True)
    assert_close(out, ref)
    assert torch.equal(idx, ref_idx)
    assert_close(PF.max_pool2d(x, 2, stride), ref)


@devices
@pytest.mark.parametrize("name,kwargs", [("relu", {}), ("leaky_relu", {"negative_slope": 0.2})])
def test_inplace_activation(device, name, kwargs):
    x = torch.randn(4, 5, device=device)
    a, b = x.clone(), x.clone()
    ra = getattr(PF, name)(a, inplace=True, **kwargs)
    rb = getattr(TF, name)(b, inplace=True, **kwargs)
    assert ra is a and rb is b
    assert_close(a, b)
    # Autograd through an in-place activation of a non-leaf tensor.
    leaf = torch.randn(4, 5, device=device, requires_grad=True)
    ref_leaf = leaf.detach().clone().requires_grad_()
    (getattr(PF, name)(leaf * 2, inplace=True, **kwargs) ** 2).sum().backward()
    (getattr(TF, name)(ref_leaf * 2, inplace=True, **kwargs) ** 2).sum().backward()
    assert_close(leaf.grad, ref_leaf.grad)
    # A leaf that requires grad cannot be modified in place, as in torch.
    with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
        getattr(PF, name)(torch.randn(3, requires_grad=True), inplace=True, **kwargs)


@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
def test_softmax_implicit_dim_and_dtype(name):
    x = torch.randn(3, 4, 5)
    with pytest.warns(UserWarning, match="Implicit dimension choice"):
        ours = getattr(PF, name)(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = getattr(TF, name)(x)
    assert_close(ours, ref)
    y = getattr(PF, name)(x.float(), dim=-1, dtype=torch.float64)
    assert y.dtype == torch.float64
    assert_close(y, getattr(TF, name)(x.float(), dim=-1, dtype=torch.float64))


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_mse_loss_broadcast_weight_and_legacy_args(reduction):
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    t = torch.randn(1, 3, dtype=torch.float64)
    with pytest.warns(UserWarning, match="different to the input size"):
        ours = PF.mse_loss(x, t, reduction=reduction)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert_close(ours, TF.mse_loss(x, t, reduction=reduction))
    w = torch.rand(4, 3, dtype=torch.float64)
    t = torch.randn(4, 3, dtype=torch.float64)
    compare_with_torch(lambda x: PF.mse_loss(x, t, reduction=reduction, weight=w),
                       lambda x: TF.mse_loss(x, t, reduction=reduction, weight=w), [x])
    with helpers.raises(ValueError, "weight", "[4, 3]", "[3]"):
        PF.mse_loss(x, t, weight=torch.ones(3, dtype=torch.float64))
    with pytest.warns(UserWarning):  # torch warns that size_average is deprecated
        assert_close(PF.mse_loss(x, t, size_average=False), TF.mse_loss(x, t, reduction="sum"))
    with pytest.raises(ValueError, match="not a valid value for reduction"):
        PF.mse_loss(x, t, reduction="avg")


def test_binary_cross_entropy_weight_broadcast_and_shape_error():
    p = torch.rand(5, 3, dtype=torch.float64).clamp(0.05, 0.95).requires_grad_()
    y = torch.rand(5, 3, dtype=torch.float64)
    w = torch.rand(3, dtype=torch.float64)
    compare_with_torch(lambda p: PF.binary_cross_entropy(p, y, w),
                       lambda p: TF.binary_cross_entropy(p, y, w), [p])
    with pytest.raises(ValueError, match="different to the input size"):
        PF.binary_cross_entropy(p, y[:, :2])


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_cross_entropy_spatial_targets(reduction):
    x = torch.randn(2, 5, 3, 4, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 5, (2, 3, 4))
    t[0, 0, 0] = -100
    w = torch.rand(5, dtype=torch.float64)
    compare_with_torch(lambda x: PF.cross_entropy(x, t, w, reduction=reduction),
                       lambda x: TF.cross_entropy(x, t, w, reduction=reduction), [x])
    with helpers.raises(ValueError, "target", "[2, 3, 4]", "[2, 4, 3]"):
        PF.cross_entropy(x, t.transpose(1, 2))


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_cross_entropy_label_smoothing_and_probability_targets(reduction):
    """torch's every kind of target through the functional layer, (N, C, d1, d2) included:
    class indices with label smoothing, and class probabilities (with or without it), whose
    gradient reaches the target too."""
    x = torch.randn(2, 5, 3, 4, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 5, (2, 3, 4))
    t[0, 0, 0] = -100
    p = torch.softmax(torch.randn(2, 5, 3, 4, dtype=torch.float64), 1).requires_grad_()
    w = torch.rand(5, dtype=torch.float64)
    for target, smoothing in ((t, 0.2), (p, 0.0), (p, 0.2)):
        for inputs in ((x, target), (x[:, :, 0, 0], target[:, :, 0, 0] if target is p
                                     else target[:, 0, 0])):
            compare_with_torch(
                lambda x, y: PF.cross_entropy(x, y, w, reduction=reduction,
                                              label_smoothing=smoothing),
                lambda x, y: TF.cross_entropy(x, y, w, reduction=reduction,
                                              label_smoothing=smoothing), list(inputs))


def test_cross_entropy_mixed_dtype_probabilities_are_declined():
    # torch promotes; pyengine has no kernel for it (patch() falls back to torch's)
    x = torch.randn(3, 4)
    with helpers.raises(NotImplementedError, "class-probability target", "torch.float32",
                        "torch.float64"):
        PF.cross_entropy(x, torch.softmax(x, 1).double())


# ---- modules -----------------------------------------------------------------------------

MODULE_CASES = [
    ("Conv2d", (3, 8, 3), dict(stride=2, padding=1), (2, 3, 9, 9)),
    ("Conv2d", (4, 6, (3, 2)), dict(groups=2, bias=False, dilation=(1, 2)), (1, 4, 8, 8)),
    ("Conv2d", (2, 4, 3), dict(padding="same", padding_mode="reflect"), (2, 2, 6, 7)),
    ("MaxPool2d", (3,), dict(stride=2, padding=1, ceil_mode=True), (2, 3, 9, 8)),
    ("Linear", (7, 5), {}, (4, 3, 7)),
    ("Linear", (7, 5), dict(bias=False), (7,)),
    ("ReLU", (), {}, (3, 4)),
    ("LeakyReLU", (0.3,), {}, (3, 4)),
    ("Sigmoid", (), {}, (3, 4)),
    ("Tanh", (), {}, (3, 4)),
    ("Softmax", (1,), {}, (3, 4)),
    ("LogSoftmax", (-1,), {}, (3, 4)),
]


@devices
@pytest.mark.parametrize("name,args,kwargs,shape", MODULE_CASES)
def test_module_matches_torch_twin(device, name, args, kwargs, shape):
    torch.manual_seed(0)
    ours = getattr(pnn, name)(*args, **kwargs).to(device)
    torch.manual_seed(0)
    theirs = getattr(torch.nn, name)(*args, **kwargs).to(device)
    assert isinstance(ours, getattr(torch.nn, name))
    assert repr(ours) == repr(theirs)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    for (n1, p1), (n2, p2) in zip(ours.named_parameters(), theirs.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2)  # same initialisation from the same seed
    # state_dict loads both ways, strictly.
    ours.load_state_dict(theirs.state_dict(), strict=True)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(*shape, device=device, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    a, b = ours(x), theirs(x2)
    assert_close(a, b)
    g = torch.randn_like(b)
    a.backward(g)
    b.backward(g)
    assert_close(x.grad, x2.grad)
    for p1, p2 in zip(ours.parameters(), theirs.parameters()):
        assert_close(p1.grad, p2.grad)


@pytest.mark.parametrize("name,kwargs", [
    ("MSELoss", dict(reduction="sum")),
    ("BCELoss", dict(weight=torch.rand(4))),
    ("CrossEntropyLoss", dict(weight=torch.rand(4), ignore_index=1)),
    ("CrossEntropyLoss", dict(reduction="none")),
    ("CrossEntropyLoss", dict(label_smoothing=0.1, weight=torch.rand(4))),
    ("CrossEntropyLoss probabilities", dict(label_smoothing=0.1)),
])
def test_loss_modules_match_torch(name, kwargs):
    probabilities = name.endswith(" probabilities")
    name = name.split()[0]
    ours, theirs = getattr(pnn, name)(**kwargs), getattr(torch.nn, name)(**kwargs)
    assert repr(ours) == repr(theirs)
    x = torch.randn(6, 4, requires_grad=True)
    if probabilities:
        t = torch.softmax(torch.randn(6, 4), 1)
    elif name == "CrossEntropyLoss":
        t = torch.randint(0, 4, (6,))
    elif name == "BCELoss":
        x = torch.rand(6, 4).clamp(0.05, 0.95).requires_grad_()
        t = torch.rand(6, 4)
    else:
        t = torch.randn(6, 4)
    compare_with_torch(lambda x: ours(x, t), lambda x: theirs(x, t), [x])


# ---- convert -----------------------------------------------------------------------------

class _MyLinear(torch.nn.Linear):
    """A user's subclass: convert() must leave it alone."""


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.BatchNorm2d(4))
        self.head = torch.nn.ModuleList([torch.nn.Linear(4 * 3 * 3, 8), torch.nn.Tanh()])
        self.custom = _MyLinear(8, 2)
        self.act = torch.nn.LeakyReLU(0.1)

    def forward(self, x):
        x = torch.flatten(self.features(x), 1)
        for m in self.head:
            x = m(x)
        return self.act(self.custom(x))


def test_convert_swaps_exact_torch_layers_and_keeps_everything_else():
    model = _Net().train(False)
    converted = pyengine.convert(model)
    assert converted is not model
    assert type(model.features[0]) is torch.nn.Conv2d  # the original is untouched
    assert type(converted.features[0]) is pnn.Conv2d
    assert type(converted.features[1]) is pnn.ReLU
    assert type(converted.features[2]) is pnn.MaxPool2d
    assert type(converted.features[3]) is torch.nn.BatchNorm2d
    assert type(converted.head[0]) is pnn.Linear and type(converted.head[1]) is pnn.Tanh
    assert type(converted.custom) is _MyLinear
    assert type(converted.act) is pnn.LeakyReLU and converted.act.negative_slope == 0.1
    assert not converted.training
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), converted.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)
    x = torch.randn(3, 1, 8, 8)
    assert_close(converted(x), model(x))


def test_convert_swaps_every_loss_configuration():
    """Cross entropy with label smoothing is pyengine's too (it was left to torch before)."""
    losses = torch.nn.ModuleList([torch.nn.CrossEntropyLoss(label_smoothing=0.1),
                                  torch.nn.CrossEntropyLoss(), torch.nn.BCELoss()])
    converted = pyengine.convert(losses)
    assert [type(m) for m in converted] == [pnn.CrossEntropyLoss, pnn.CrossEntropyLoss,
                                            pnn.BCELoss]
    assert converted[0].label_smoothing == 0.1
    x, t = torch.randn(5, 3), torch.randint(0, 3, (5,))
    assert_close(converted[0](x, t), losses[0](x, t))


def test_convert_inplace_and_root_module():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU())
    same = pyengine.convert(model, inplace=True)
    assert same is model and type(model[0]) is pnn.Linear
    lin = torch.nn.Linear(2, 2)
    assert type(pyengine.convert(lin)) is pnn.Linear
    with helpers.raises(TypeError, "torch.nn.Module", "int"):
        pyengine.convert(3)


def test_converted_model_trains_like_torch():
    torch.manual_seed(1)
    model = _Net()
    converted = pyengine.convert(model)
    opt_a = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt_b = torch.optim.SGD(converted.parameters(), lr=0.1, momentum=0.9)
    for _ in range(3):
        x, y = torch.randn(5, 1, 8, 8), torch.randn(5, 2)
        for m, opt in ((model, opt_a), (converted, opt_b)):
            opt.zero_grad()
            torch.nn.functional.mse_loss(m(x), y).backward()
            opt.step()
    for p1, p2 in zip(model.parameters(), converted.parameters()):
        assert_close(p1, p2, rtol=1e-4, atol=1e-5)


class _PyengineOps(TorchDispatchMode):
    """The pyengine operators the dispatcher runs."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "pyengine":
            self.names.append(func._schema.name.split("::")[1])
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("relu_inplace", [False, True])
def test_convert_fuses_conv_relu_pool_runs_of_a_sequential(relu_inplace):
    """Conv2d, ReLU, MaxPool2d in a torch.nn.Sequential run as one conv2d_relu_max_pool2d after
    convert(), with torch's values and gradients; the Sequential keeps its modules, state_dict
    and repr."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(2, 4, 3, padding=1), torch.nn.ReLU(inplace=relu_inplace),
        torch.nn.MaxPool2d(3, stride=2, ceil_mode=True), torch.nn.Conv2d(4, 3, 2),
        torch.nn.ReLU(), torch.nn.MaxPool2d(2), torch.nn.Flatten(), torch.nn.Linear(12, 2))
    converted = pyengine.convert(model)
    assert type(converted) is pnn.Sequential and repr(converted) == repr(model)
    assert list(converted.state_dict()) == list(model.state_dict())
    x = torch.randn(3, 2, 11, 10, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    with _PyengineOps() as ops:
        out = converted(x)
        out.sum().backward()
    assert ops.names.count("conv2d_relu_max_pool2d") == 2
    assert ops.names.count("conv2d_relu_max_pool2d_backward") == 2
    assert not {"conv2d", "relu", "max_pool2d", "max_pool2d_with_indices"} & set(ops.names)
    ref = model(x2)
    ref.sum().backward()
    assert_close(out, ref)
    assert_close(x.grad, x2.grad)
    for p1, p2 in zip(converted.parameters(), model.parameters()):
        assert_close(p1.grad, p2.grad)


def test_sequential_calls_layers_with_hooks_one_by_one():
    """A hook on a layer of the pattern (or a global one) must run: no fusion then."""
    model = pyengine.convert(torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.ReLU(),
                                                 torch.nn.MaxPool2d(2)))
    x = torch.randn(1, 1, 6, 6)
    seen = []
    handle = model[1].register_forward_hook(lambda m, i, o: seen.append(o.shape))
    with _PyengineOps() as ops:
        out = model(x)
    assert seen == [torch.Size([1, 2, 4, 4])]
    assert ops.names == ["conv2d", "relu", "max_pool2d_with_indices"]  # params need grads
    handle.remove()
    with torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: seen.append(m)):
        with _PyengineOps() as ops:
            model(x)
    assert ops.names == ["conv2d", "relu", "max_pool2d_with_indices"]  # params need grads
    with _PyengineOps() as ops:
        assert_close(model(x), out)
    assert ops.names == ["conv2d_relu_max_pool2d"]


@pytest.mark.parametrize("module", [PF, pnn, pyengine, pyengine.fused])
def test_public_namespaces_hold_only_the_api(module):
    """No helper or imported name (torch, warnings, typing, ...) is reachable from the public
    modules: what is not in __all__ starts with an underscore."""
    public = {n for n in dir(module) if not n.startswith("_")}
    extra = public - set(module.__all__)
    # pyengine's submodules (pyengine.cli, pyengine.data, ...) are attributes once imported
    extra = {n for n in extra if not (inspect.ismodule(getattr(module, n)) and
                                      getattr(module, n).__name__.startswith("pyengine."))}
    assert not extra, sorted(extra)
    assert all(hasattr(module, n) for n in module.__all__)


def test_api_objects_name_their_public_module():
    import pickle

    assert PF.conv2d.__module__ == "pyengine.functional"
    assert pnn.Conv2d.__module__ == "pyengine.nn"
    layer = pnn.Conv2d(1, 2, 3)
    clone = pickle.loads(pickle.dumps(layer))
    assert type(clone) is pnn.Conv2d and torch.equal(clone.weight, layer.weight)
    assert pickle.loads(pickle.dumps(PF.relu)) is PF.relu
