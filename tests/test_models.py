"""The tutorial networks: pyengine's build of each matches torch.nn's, forward and backward, from
the same seed; optimizers and state_dict work unchanged."""
import copy

import pytest
import torch

import helpers
import pyengine.nn as pnn
from helpers import assert_close, devices
from pyengine import models

# (factory taking backend=..., input shape, dtype of the input)
CASES = {
    "lenet": (lambda b: models.LeNet(backend=b), (4, 1, 32, 32)),
    "perceptron": (lambda b: models.Perceptron(3, 4, 1, backend=b), (6, 3)),
    "mlp_sequential": (lambda b: models.mlp_sequential(backend=b), (5, 10)),
    "mlp_modulelist": (lambda b: models.MLPModuleList(backend=b), (5, 10)),
    "mlp_784": (lambda b: models.MLP(backend=b), (3, 1, 28, 28)),
    "two_branch": (lambda b: models.TwoBranchNet(image_size=16, backend=b), (2, 3, 16, 16)),
    "rnn_classifier": (lambda b: models.RNNClassifier(4, 8, 3, backend=b), (3, 6, 4)),
    "linear_regression": (lambda b: models.LinearRegression(backend=b), (7, 1)),
    "binary_classifier": (lambda b: models.BinaryClassifier(backend=b), (9, 5)),
    "binary_classifier_mixed": (lambda b: models.BinaryClassifier(mixed=True, backend=b), (9, 5)),
}


def _pair(name, device, dtype=torch.float32):
    factory, shape = CASES[name]
    torch.manual_seed(0)
    ours = factory("pyengine").to(device, dtype)
    torch.manual_seed(0)
    theirs = factory("torch").to(device, dtype)
    return ours, theirs, shape


@devices
@pytest.mark.parametrize("name", sorted(CASES))
def test_model_matches_torch(device, name):
    ours, theirs, shape = _pair(name, device, torch.float64)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    for (n, p), (_, q) in zip(ours.state_dict().items(), theirs.state_dict().items()):
        assert torch.equal(p, q), n
    x = torch.randn(*shape, device=device, dtype=torch.float64)
    a, b = ours(x), theirs(x)
    assert_close(a, b)
    g = torch.randn_like(b)
    a.backward(g)
    b.backward(g)
    for (n, p), (_, q) in zip(ours.named_parameters(), theirs.named_parameters()):
        assert_close(p.grad, q.grad, msg=n)


@pytest.mark.parametrize("optimizer", ["sgd_momentum", "adam", "param_groups"])
def test_lenet_trains_like_torch_with_optimizers(optimizer, tmp_path):
    ours, theirs, shape = _pair("lenet", "cpu")

    def make(model):
        if optimizer == "sgd_momentum":
            return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        if optimizer == "adam":
            return torch.optim.Adam(model.parameters(), lr=1e-3)
        convs = [p for n, p in model.named_parameters() if n.startswith("conv")]
        rest = [p for n, p in model.named_parameters() if not n.startswith("conv")]
        return torch.optim.SGD([{"params": convs, "lr": 0.1}, {"params": rest}], lr=0.01)

    opts = {id(ours): make(ours), id(theirs): make(theirs)}
    loss_fns = {id(ours): pnn.CrossEntropyLoss(), id(theirs): torch.nn.CrossEntropyLoss()}
    for step in range(4):
        x, y = torch.randn(*shape), torch.randint(0, 10, (shape[0],))
        for model in (ours, theirs):
            opts[id(model)].zero_grad()
            loss_fns[id(model)](model(x), y).backward()
            opts[id(model)].step()
    for p, q in zip(ours.parameters(), theirs.parameters()):
        assert_close(p, q, rtol=1e-4, atol=1e-5)
    # Save from pyengine, load into torch.nn (and the optimizer state too).
    path = tmp_path / "ckpt.pt"
    torch.save({"model": ours.state_dict(), "opt": opts[id(ours)].state_dict()}, path)
    ckpt = torch.load(path)
    fresh = models.LeNet(backend="torch")
    fresh.load_state_dict(ckpt["model"], strict=True)
    make(fresh).load_state_dict(ckpt["opt"])
    x = torch.randn(*shape)
    assert_close(fresh(x), ours(x))


@devices
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("nonlinearity,num_layers,bias", [("tanh", 1, True), ("relu", 2, True),
                                                          ("tanh", 2, False)])
def test_rnn_matches_torch_rnn(device, batch_first, nonlinearity, num_layers, bias):
    kw = dict(input_size=5, hidden_size=7, num_layers=num_layers, nonlinearity=nonlinearity,
              bias=bias, batch_first=batch_first)
    torch.manual_seed(0)
    ours = pnn.RNN(**kw).to(device, torch.float64)
    torch.manual_seed(0)
    theirs = torch.nn.RNN(**kw).to(device, torch.float64)
    assert repr(ours) == repr(theirs)
    x = torch.randn(3, 4, 5, device=device, dtype=torch.float64)
    h0 = torch.randn(num_layers, 3 if batch_first else 4, 7, device=device, dtype=torch.float64)
    for args in ((x,), (x, h0)):
        (a, ha), (b, hb) = ours(*args), theirs(*args)
        assert_close(a, b)
        assert_close(ha, hb)
    (a, ha), (b, hb) = ours(x[0]), theirs(x[0])  # unbatched
    assert_close(a, b)
    assert_close(ha, hb)
    x.requires_grad_()
    helpers.compare_with_torch(lambda x: ours(x)[0], lambda x: theirs(x)[0], [x])


def test_rnn_unsupported_configurations_say_so():
    with helpers.raises(NotImplementedError, "bidirectional"):
        pnn.RNN(3, 4, bidirectional=True)(torch.randn(2, 5, 3))
    with helpers.raises(NotImplementedError, "dropout"):
        pnn.RNN(3, 4, num_layers=2, dropout=0.5)(torch.randn(2, 5, 3))
    with helpers.raises(ValueError, "hx", "[1, 2, 4]"):
        pnn.RNN(3, 4)(torch.randn(5, 2, 3), torch.randn(1, 3, 4))


def test_backend_name_is_checked():
    with helpers.raises(ValueError, "backend", "'jax'"):
        models.LeNet(backend="jax")
