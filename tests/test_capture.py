"""pyengine.capture_step: a captured training step gives the eager step's results bit for bit
(parameters, gradients, optimizer state, loss) on fresh batches, and refuses what it cannot
replay with a clear error."""
import pytest
import torch

import pyengine
from pyengine.models import LeNet, MLP, TwoBranchNet
import helpers


def _trainer(factory, optimizer, loss="mse", seed=0):
    torch.manual_seed(seed)
    model = factory()
    opt = optimizer(model.parameters())
    loss_fn = pyengine.nn.MSELoss() if loss == "mse" else pyengine.nn.CrossEntropyLoss()

    def step(x, y):
        opt.zero_grad(set_to_none=True)
        value = loss_fn(model(x), y)
        value.backward()
        opt.step()
        return value

    return model, opt, step


def _same_state(a_model, a_opt, b_model, b_opt):
    for (name, p), q in zip(a_model.named_parameters(), b_model.parameters()):
        assert torch.equal(p, q), name
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            assert torch.equal(p.grad, q.grad), f"grad of {name}"
    for p, q in zip(a_model.parameters(), b_model.parameters()):
        sa, sb = a_opt.state.get(p, {}), b_opt.state.get(q, {})
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(torch.as_tensor(sa[k]), torch.as_tensor(sb[k])), k


OPTIMIZERS = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.05),
    "momentum": lambda ps: torch.optim.SGD(ps, lr=0.02, momentum=0.9, weight_decay=1e-3),
    "nesterov": lambda ps: torch.optim.SGD(ps, lr=0.02, momentum=0.8, nesterov=True),
}

NETWORKS = {
    "lenet": (lambda: LeNet(), (1, 32, 32), 10),
    "mlp": (lambda: MLP(), (784,), 10),
    "two_branch": (lambda: TwoBranchNet(image_size=8), (3, 8, 8), 10),
}


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize("network", sorted(NETWORKS))
def test_replay_is_the_eager_step(network, batch, optimizer):
    factory, in_shape, classes = NETWORKS[network]
    eager = _trainer(factory, OPTIMIZERS[optimizer])
    captured = _trainer(factory, OPTIMIZERS[optimizer])
    x0, y0 = torch.randn(batch, *in_shape), torch.randn(batch, classes)
    step = pyengine.capture_step(captured[2], x0, y0)
    for _ in range(3):  # capture ran three real steps on (x0, y0): so does the eager model
        eager[2](x0, y0)
    _same_state(eager[0], eager[1], captured[0], captured[1])
    for _ in range(4):
        x, y = torch.randn(batch, *in_shape), torch.randn(batch, classes)
        expected = eager[2](x, y)
        loss = step(x, y)
        assert torch.equal(loss, expected.detach())
        _same_state(eager[0], eager[1], captured[0], captured[1])


def test_cross_entropy_and_a_converted_torch_model():
    """Class targets (an int64 input) and a torch.nn model converted to pyengine."""
    def factory():
        return pyengine.convert(torch.nn.Sequential(
            torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Flatten(), torch.nn.Linear(16 * 4 * 4, 10)))

    eager = _trainer(factory, OPTIMIZERS["momentum"], loss="ce")
    captured = _trainer(factory, OPTIMIZERS["momentum"], loss="ce")
    x0, y0 = torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,))
    step = pyengine.capture_step(captured[2], x0, y0)
    for _ in range(3):
        eager[2](x0, y0)
    for _ in range(3):
        x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,))
        assert torch.equal(step(x, y), eager[2](x, y).detach())
    _same_state(eager[0], eager[1], captured[0], captured[1])


def test_replay_bumps_the_parameters_versions():
    model, _, step = _trainer(lambda: LeNet(), OPTIMIZERS["sgd"])
    x, y = torch.randn(2, 1, 32, 32), torch.randn(2, 10)
    captured = pyengine.capture_step(step, x, y)
    before = [p._version for p in model.parameters()]
    captured(x, y)
    assert all(p._version > v for p, v in zip(model.parameters(), before))


def test_replay_needs_no_python_between_calls():
    """One replay is one C++ call: the program makes the step's operator calls and no others,
    not even autograd's detaches (below autograd a detached tensor is its source)."""
    _, _, step = _trainer(lambda: LeNet(), OPTIMIZERS["sgd"])
    x, y = torch.randn(1, 1, 32, 32), torch.randn(1, 10)
    captured = pyengine.capture_step(step, x, y)
    block, linear = "pyengine::conv2d_relu_max_pool2d", "pyengine::linear"
    # Recording must not change what the step does: autograd takes each gradient as the backward
    # operator made it (a recorder holding references would make it copy them: aten::copy_).
    assert captured.operators == (
        [block, block, "aten::view"] + [linear, "pyengine::relu"] * 2 + [linear]
        + ["pyengine::mse_loss", "aten::ones_like", "pyengine::mse_loss_backward"]
        + [linear + "_backward", "pyengine::relu_backward"] * 2 + [linear + "_backward"]
        + ["aten::view"] + [block + "_backward"] * 2 + ["aten::add_"] * 10)
    assert captured.calls == len(captured.operators)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: pytest.fail("graph recorded"),
                                                  lambda t: t):
        loss = captured(x, y)
    assert loss.grad_fn is None and loss.shape == ()


def test_keeps_a_detach_whose_tensor_is_changed_in_place():
    """A detached tensor is a TensorImpl of its own: an in-place op that changes its metadata
    (unsqueeze_) must not change its source's, so that detach stays a call of the replay."""
    model, opt, train = _trainer(lambda: MLP(), OPTIMIZERS["sgd"])

    def step(x, y):
        loss = train(x, y)
        flagged = loss.detach()
        flagged.unsqueeze_(0)
        return loss, flagged

    x, y = torch.randn(3, 784), torch.randn(3, 10)
    captured = pyengine.capture_step(step, x, y)
    assert captured.operators.count("aten::detach") == 1
    loss, flagged = captured(x, y)
    assert loss.shape == () and flagged.shape == (1,) and torch.equal(loss, flagged[0])


def test_keeps_a_detach_the_step_returns():
    """The caller of a step returning (loss, loss.detach()) holds two tensors, as after the
    eager step: reshaping one in place leaves the other as it was."""
    _, _, train = _trainer(lambda: MLP(), OPTIMIZERS["sgd"])
    x, y = torch.randn(3, 784), torch.randn(3, 10)
    captured = pyengine.capture_step(lambda a, b: (lambda v: (v, v.detach()))(train(a, b)), x, y)
    loss, detached = captured(x, y)
    detached.unsqueeze_(0)
    assert loss.shape == () and detached.shape == (1,)


def test_bad_inputs_name_what_was_captured():
    _, _, step = _trainer(lambda: LeNet(), OPTIMIZERS["sgd"])
    x, y = torch.randn(2, 1, 32, 32), torch.randn(2, 10)
    captured = pyengine.capture_step(step, x, y)
    with helpers.raises(ValueError, "input 0 was captured as (2, 1, 32, 32)", "(3, 1, 32, 32)",
                        "capture the step again"):
        captured(torch.randn(3, 1, 32, 32), y)
    with helpers.raises(ValueError, "torch.float32", "torch.float64"):
        captured(x, y.double())
    with helpers.raises(TypeError, "takes 2 tensors, got 1"):
        captured(x)
    with helpers.raises(TypeError, "input 1 must be a tensor", "list"):
        captured(x, [1.0])
    with helpers.raises(TypeError, "example input 0 must be a tensor"):
        pyengine.capture_step(step, 1.0, y)
    with helpers.raises(TypeError, "expected a callable step"):
        pyengine.capture_step(3, x, y)
    with helpers.raises(ValueError, "warmup >= 0", "-1"):
        pyengine.capture_step(step, x, y, warmup=-1)


def test_refuses_a_step_that_reads_values_in_python():
    model, opt, _ = _trainer(lambda: LeNet(), OPTIMIZERS["sgd"])
    x, y = torch.randn(2, 1, 32, 32), torch.randn(2, 10)

    def step(x, y):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        if loss.item() > 1e9:  # a value read in Python: not replayable
            return None
        loss.backward()
        opt.step()
        return loss

    with helpers.raises(pyengine.CaptureError, "returns a Python value", "loss.item()"):
        pyengine.capture_step(step, x, y)


def test_refuses_an_optimizer_that_reads_its_step_count():
    """Adam (not capturable=True) reads its step count with .item() on the CPU."""
    model, _, step = _trainer(lambda: LeNet(), lambda ps: torch.optim.Adam(ps, lr=1e-3))
    with helpers.raises(pyengine.CaptureError, "returns a Python value"):
        pyengine.capture_step(step, torch.randn(2, 1, 32, 32), torch.randn(2, 10))


def test_refuses_a_step_with_new_persistent_tensors_every_call():
    model = LeNet()

    def step(x):
        # torch.tensor builds its tensor from Python data, outside any operator: a new
        # persistent tensor every step, which a replay would not see change
        return model(x).sum() * torch.tensor(2.0)

    with helpers.raises(pyengine.CaptureError, "different operator calls"):
        pyengine.capture_step(step, torch.randn(1, 1, 32, 32))


def test_refuses_a_result_that_is_not_a_tensor():
    model = LeNet()
    with helpers.raises(pyengine.CaptureError, "must return a tensor", "dict"):
        pyengine.capture_step(lambda x: {"out": model(x)}, torch.randn(1, 1, 32, 32))


def test_refuses_a_step_on_a_gpu_with_where_to_go():
    """CPU steps only (on a GPU a CUDA graph is the tool); the meta device stands in for one
    where there is no GPU: the check is on the device type."""
    model = LeNet().to("meta")
    with helpers.raises(pyengine.CaptureError, "on meta", "CUDA graph"):
        pyengine.capture_step(lambda x: model(x), torch.randn(1, 1, 32, 32, device="meta"))
    cpu_model = LeNet()
    weight = torch.randn(10, device="meta")
    with helpers.raises(pyengine.CaptureError, "uses a tensor on meta"):
        pyengine.capture_step(lambda x: (cpu_model(x).sum(), weight * 2), torch.randn(1, 1, 32, 32))
