"""pyengine's operators under torch.compile (fullgraph) and torch.export: the graphs hold
pyengine's forward and backward operators, and results match eager ones."""
import pytest
import torch

from helpers import assert_close, devices
from pyengine.models import LeNet


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


@pytest.mark.slow
def test_lenet_compile_inductor_matches_eager():
    torch._dynamo.reset()
    model = LeNet()
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(8, 1, 32, 32)
    assert_close(compiled(x), model(x))


def test_lenet_export_runs_pyengine_ops():
    model = LeNet().eval()
    x = torch.randn(2, 1, 32, 32)
    batch = torch.export.Dim("batch", min=1, max=1024)
    exported = torch.export.export(model, (x,), dynamic_shapes={"x": {0: batch}})
    ops = _graph_ops(exported.graph_module)
    assert "pyengine.conv2d.default" in ops and "pyengine.linear.default" in ops, ops
    x5 = torch.randn(5, 1, 32, 32)
    assert_close(exported.module()(x5), model(x5))
