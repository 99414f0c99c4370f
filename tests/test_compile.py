"""pyengine's operators under torch.compile (fullgraph) and torch.export: the graphs hold
pyengine's forward and backward operators, and results match eager ones; under
mode="reduce-overhead" a LeNet trains as the eager one does, and on a GPU Inductor records and
replays its forward and backward passes as CUDA graphs (cudagraph trees) instead of skipping them.
(Each operator captured by hand in a torch.cuda.CUDAGraph: tests/test_cuda.py.)"""
import copy
import functools

import pytest
import torch

import pyengine
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
    # LeNet's conv -> relu -> pool blocks are fused operators (pyengine.fused)
    assert {"pyengine.conv2d_relu_max_pool2d.default",
            "pyengine.linear.default", "pyengine.relu.default"} <= fw_ops, fw_ops
    assert {"pyengine.conv2d_relu_max_pool2d_backward.default",
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
    assert "pyengine.conv2d_relu_max_pool2d.default" in ops and "pyengine.linear.default" in ops, \
        ops
    x5 = torch.randn(5, 1, 32, 32)
    assert_close(exported.module()(x5), model(x5))


# ---- mode="reduce-overhead" ---------------------------------------------------------------------

def _loss(model, x, y):
    return PF.cross_entropy(model(x), y)


def _train_reduce_overhead_beside_eager(device, steps):
    """Two LeNets from the same weights, one trained through torch.compile(mode="reduce-overhead")
    of its loss, the other eagerly, on the same batches with SGD and momentum: after every step
    the losses and all weights agree. Returns the compiled function (Inductor drops its
    cudagraph trees once the functions using them are gone)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = LeNet().to(device)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(functools.partial(_loss, compiled_model), mode="reduce-overhead",
                             fullgraph=True)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
                  for m in (eager, compiled_model)]
    for step in range(steps):
        x = torch.randn(16, 1, 32, 32, device=device)
        y = torch.randint(0, 10, (16,), device=device)
        if device == "cuda":
            torch.compiler.cudagraph_mark_step_begin()  # a new iteration: replay, not re-record
        loss = compiled(x, y)
        loss.backward()
        expected = _loss(eager, x, y)
        expected.backward()
        assert_close(loss, expected)  # read before the next replay reuses its memory
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()
        for (name, a), b in zip(compiled_model.named_parameters(), eager.parameters()):
            assert_close(a, b, msg=lambda m, name=name, step=step: f"{name}, step {step}: {m}")
    return compiled


def test_lenet_trains_under_reduce_overhead_like_eager():
    """On the CPU, mode="reduce-overhead" is an ordinary Inductor compile (CUDA graphs are a GPU
    matter): the training agrees with eager step for step."""
    _train_reduce_overhead_beside_eager("cpu", steps=4)


def _recorded_graphs(device_index):
    """How many CUDA graphs Inductor's cudagraph trees recorded on the device (the nodes of its
    trees; warm-up runs are not nodes)."""
    from torch._inductor import cudagraph_trees

    manager = cudagraph_trees.get_container(device_index).tree_manager
    if manager is None:
        return 0
    nodes, count = [n for roots in manager.roots.values() for n in roots], 0
    while nodes:
        node = nodes.pop()
        count += 1
        nodes += [n for children in node.children.values() for n in children]
    return count


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.skipif(torch.cuda.is_available() and not pyengine._C.built_with_cuda,
                    reason="pyengine was built without its CUDA kernels (no nvcc at build time)")
def test_lenet_training_step_under_reduce_overhead_replays_recorded_graphs_on_cuda():
    """The LeNet training step compiled with mode="reduce-overhead" on a GPU: several steps agree
    with eager ones, and Inductor did put them in CUDA graphs: it skipped none (a host sync or an
    allocation outside the caching allocator in an op would fail the capture or make Inductor
    skip it) and recorded at least the forward and the backward graph."""
    from torch._dynamo.utils import counters

    counters.clear()
    compiled = _train_reduce_overhead_beside_eager("cuda", steps=5)  # noqa: F841 (kept alive)
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
    assert _recorded_graphs(torch.cuda.current_device()) >= 2, dict(counters["inductor"])
