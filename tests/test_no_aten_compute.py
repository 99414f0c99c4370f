"""The arithmetic is pyengine's: a LeNet training step on pyengine layers dispatches no ATen
compute op (convolution, matrix products, pooling, softmax, ...) — checked with the profiler,
which records every operator the dispatcher runs, including those called from C++ kernels."""
import torch

from pyengine.models import LeNet
import pyengine.functional as PF

FORBIDDEN = ("conv", "mm", "matmul", "linear", "pool", "softmax", "relu", "sigmoid", "tanh",
             "mse_loss", "nll", "cross_entropy", "binary_cross_entropy", "threshold", "bmm")


def _ops_run(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.name for e in prof.events()}


def test_lenet_training_step_runs_only_pyengine_arithmetic():
    model = LeNet()
    x, y = torch.randn(4, 1, 32, 32), torch.randint(0, 10, (4,))

    def step():
        out = model(x)
        loss = PF.cross_entropy(out, y) + PF.mse_loss(PF.softmax(out, 1), torch.zeros(4, 10))
        loss = loss + PF.binary_cross_entropy(PF.sigmoid(out), torch.rand(4, 10))
        loss = loss + PF.log_softmax(PF.tanh(out), 1).mean() * 0 + PF.leaky_relu(out).sum() * 0
        loss.backward()

    ops = _ops_run(step)
    pyengine_ops = {op for op in ops if op.startswith("pyengine::")}
    assert {"pyengine::conv2d_relu_max_pool2d", "pyengine::conv2d_relu_max_pool2d_backward",
            "pyengine::linear_backward", "pyengine::cross_entropy_backward"} <= pyengine_ops
    aten_compute = sorted(op for op in ops if op.startswith("aten::")
                          and any(word in op for word in FORBIDDEN))
    assert not aten_compute, f"ATen compute ops ran on pyengine's path: {aten_compute}"
