"""pyengine's operators under torch.compile (fullgraph) and torch.export: the graphs hold
pyengine's forward and backward operators, and results match eager ones."""
import copy

import pytest
import torch

import pyengine.functional as PF
from helpers import assert_close, devices
from pyengine.models import LeNet
from test_models import CASES as NETWORKS


def _lenet_step(model, x, y):
    loss = torch.nn.functional.mse_loss(model(x), y)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    return loss, grads


def _graph_ops(gm):
    return {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}


@devices
def test_lenet_compile_fullgraph_matches_eager_and_traces_pyengine_ops(device):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = LeNet().to(device)
    forward_graphs, backward_graphs = [], []

    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    def capture(store):
        def compiler(gm, example_inputs):
            store.append(gm)
            return make_boxed_func(gm.forward)
        return compiler

    backend = aot_autograd(fw_compiler=capture(forward_graphs),
                           bw_compiler=capture(backward_graphs))
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    for batch in (4, 7):  # a second batch size exercises dynamic shapes
        x = torch.randn(batch, 1, 32, 32, device=device)
        out, ref = compiled(x), model(x)
        assert_close(out, ref)
        y = torch.randn(batch, 10, device=device)
        loss_c = torch.nn.functional.mse_loss(compiled(x), y)
        grads_c = torch.autograd.grad(loss_c, list(model.parameters()))
        loss_e, grads_e = _lenet_step(model, x, y)
        assert_close(loss_c, loss_e)
        for a, b in zip(grads_c, grads_e):
            assert_close(a, b)
    fw_ops = set().union(*(_graph_ops(g) for g in forward_graphs))
    bw_ops = set().union(*(_graph_ops(g) for g in backward_graphs))
    assert {"pyengine.conv2d.default", "pyengine.max_pool2d_with_indices.default",
            "pyengine.linear.default", "pyengine.relu.default"} <= fw_ops, fw_ops
    assert {"pyengine.conv2d_backward.default", "pyengine.max_pool2d_backward.default",
            "pyengine.linear_backward.default", "pyengine.relu_backward.default"} <= bw_ops, bw_ops
    assert not any(op.startswith(("aten.convolution", "aten.addmm", "aten.mm", "aten.max_pool"))
                   for op in fw_ops | bw_ops)


def _loss_and_target(name, out):
    """The loss a tutorial network trains with, and a random target for its output."""
    if name.startswith("binary_classifier"):
        return PF.binary_cross_entropy, torch.rand_like(out)
    if out.dim() == 2 and out.shape[1] > 1:
        return PF.cross_entropy, torch.randint(0, out.shape[1], out.shape[:1])
    return PF.mse_loss, torch.randn_like(out)


def _compare_training_step(name, backend):
    """One SGD step of a tutorial network, its forward and loss compiled (fullgraph, only
    pt2-compliant operators allowed, so an untagged pyengine operator fails the compile), against
    the same step in eager mode: output, loss, gradients and updated parameters."""
    torch._dynamo.reset()
    factory, shape = NETWORKS[name]
    model = factory("pyengine")
    eager = copy.deepcopy(model)
    x = torch.randn(*shape)
    loss_fn, target = _loss_and_target(name, eager(x))

    def step(m, x, target):
        out = m(x)
        return out, loss_fn(out, target)

    # allow_rnn: Dynamo declines every torch.nn.RNN (sub)class, pyengine.nn.RNN's included,
    # unless told to trace it.
    with torch._dynamo.config.patch(only_allow_pt2_compliant_ops=True, allow_rnn=True):
        compiled = torch.compile(lambda x, t: step(model, x, t), backend=backend, fullgraph=True)
        out, loss = compiled(x, target)
    ref_out, ref_loss = step(eager, x, target)
    assert_close(out, ref_out)
    assert_close(loss, ref_loss)
    for m, l in ((model, loss), (eager, ref_loss)):
        l.backward()
        torch.optim.SGD(m.parameters(), lr=0.1).step()
    for (n, p), q in zip(model.named_parameters(), eager.parameters()):
        assert_close(p.grad, q.grad, msg=n)
        assert_close(p, q, msg=n)


@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_tutorial_network_compiles_with_only_pt2_compliant_ops(name):
    _compare_training_step(name, "aot_eager")


@pytest.mark.slow
def test_lenet_compile_inductor_matches_eager():
    torch._dynamo.reset()
    model = LeNet()
    with torch._dynamo.config.patch(only_allow_pt2_compliant_ops=True):
        compiled = torch.compile(model, fullgraph=True)
        x = torch.randn(8, 1, 32, 32)
        assert_close(compiled(x), model(x))


@pytest.mark.slow
def test_training_step_inductor_with_only_pt2_compliant_ops():
    _compare_training_step("mlp_sequential", "inductor")


def test_lenet_export_runs_pyengine_ops():
    model = LeNet().eval()
    x = torch.randn(2, 1, 32, 32)
    batch = torch.export.Dim("batch", min=1, max=1024)
    exported = torch.export.export(model, (x,), dynamic_shapes={"x": {0: batch}})
    ops = _graph_ops(exported.graph_module)
    assert "pyengine.conv2d.default" in ops and "pyengine.linear.default" in ops, ops
    x5 = torch.randn(5, 1, 32, 32)
    assert_close(exported.module()(x5), model(x5))
