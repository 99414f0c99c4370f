"""PyTorch's own sample inputs for the operators pyengine implements: every sample that
torch.testing._internal.common_methods_invocations.op_db generates for conv2d, max_pool2d,
linear, relu, leaky_relu, sigmoid, tanh, softmax and log_softmax (with their with_dtype
variants), mse_loss, binary_cross_entropy and cross_entropy, in float32 and float64 on the CPU,
through pyengine.functional against torch's function: the outputs, and the gradient of every
tensor the sample marks requires_grad. None may be refused.

Importing torch's test utilities changes the importing process for good (common_utils calls
torch.backends.disable_global_flags(), after which setting torch.backends' flags raises, as other
tests here do; it adds warning filters and patches TorchScript calls), so the samples run in one
child process, this file run as a script, which reports each sample's outcome as JSON; the tests
read the reports.
"""
import json
import os
import subprocess
import sys
from typing import Optional

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# OpInfo name -> the pyengine.functional function (and torch function) it samples.
OPS = {
    "nn.functional.conv2d": "conv2d",
    "nn.functional.max_pool2d": "max_pool2d",
    "nn.functional.linear": "linear",
    "nn.functional.relu": "relu",
    "nn.functional.leaky_relu": "leaky_relu",
    "sigmoid": "sigmoid",
    "tanh": "tanh",
    "softmax": "softmax",
    "log_softmax": "log_softmax",
    "nn.functional.mse_loss": "mse_loss",
    "nn.functional.binary_cross_entropy": "binary_cross_entropy",
    "nn.functional.cross_entropy": "cross_entropy",
}
DTYPES = ("float32", "float64")

# ---- the child process: runs every sample, reports each ------------------------------------------

def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        bits = [f"Tensor{list(value.shape)}", str(value.dtype).replace("torch.", "")]
        if value.requires_grad:
            bits.append("requires_grad")
        if not value.is_contiguous():
            bits.append(f"strides {value.stride()}")
        return " ".join(bits)
    if isinstance(value, (list, tuple)):
        inner = ", ".join(_describe(v) for v in value)
        return f"[{inner}]" if isinstance(value, list) else f"({inner})"
    return repr(value)


def _describe_sample(sample) -> str:
    parts = [_describe(sample.input)] + [_describe(a) for a in sample.args]
    parts += [f"{k}={_describe(v)}" for k, v in sample.kwargs.items()]
    return ", ".join(parts)


def _run_sample(torch_fn, our_fn, sample) -> Optional[str]:
    """None if pyengine's function agrees with torch's on the sample, else what went wrong."""
    import warnings

    from torch.utils._pytree import tree_flatten, tree_map

    import helpers

    def leaves():
        def fresh(x):
            if isinstance(x, torch.Tensor):
                return x.detach().clone().requires_grad_(x.requires_grad)
            return x
        return tree_map(fresh, ([sample.input, *sample.args], dict(sample.kwargs)))

    (ours_args, ours_kwargs), (ref_args, ref_kwargs) = leaves(), leaves()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's own warnings for legal calls
        try:
            expected = torch_fn(*ref_args, **ref_kwargs)
        except Exception as exc:
            return f"torch refused it too ({type(exc).__name__}: {exc})"
        try:
            actual = our_fn(*ours_args, **ours_kwargs)
        except Exception as exc:
            return f"refused: {type(exc).__name__}: {str(exc).splitlines()[0]}"
    expected_out = list(expected) if isinstance(expected, tuple) else [expected]
    actual_out = list(actual) if isinstance(actual, tuple) else [actual]
    try:
        assert len(actual_out) == len(expected_out), "a different number of outputs"
        for a, e in zip(actual_out, expected_out):
            helpers.assert_close(a.detach(), e.detach())
    except AssertionError as exc:
        return f"forward differs: {exc}"
    ours_leaves = [x for x in tree_flatten((ours_args, ours_kwargs))[0]
                   if isinstance(x, torch.Tensor) and x.requires_grad]
    ref_leaves = [x for x in tree_flatten((ref_args, ref_kwargs))[0]
                  if isinstance(x, torch.Tensor) and x.requires_grad]
    if not expected_out[0].requires_grad:
        return None
    g = torch.randn_like(expected_out[0])
    try:
        ours = torch.autograd.grad(actual_out[0], ours_leaves, g, allow_unused=True)
    except Exception as exc:
        return f"gradient refused: {type(exc).__name__}: {str(exc).splitlines()[0]}"
    theirs = torch.autograd.grad(expected_out[0], ref_leaves, g, allow_unused=True)
    for i, (a, e) in enumerate(zip(ours, theirs)):
        try:
            assert (a is None) == (e is None), "a gradient on one side only"
            if a is not None:
                helpers.assert_close(a, e)
        except AssertionError as exc:
            return f"gradient of differentiable tensor {i} differs: {exc}"
    return None


def evaluate() -> dict:
    """Every sample of every OPS entry in both dtypes: {"samples": [report, ...]}, or
    {"unavailable": why} when this torch has no usable op_db."""
    try:
        from torch.testing._internal.common_methods_invocations import op_db
    except Exception as exc:  # e.g. expecttest, which common_utils imports, is missing
        return {"unavailable": f"torch.testing._internal's op_db does not import ({exc})"}
    import pyengine.functional as PF

    torch.manual_seed(0)
    reports = []
    for opinfo in op_db:
        function = OPS.get(opinfo.name)
        if function is None:
            continue
        for dtype_name in DTYPES:
            dtype = getattr(torch, dtype_name)
            for index, sample in enumerate(opinfo.sample_inputs("cpu", dtype,
                                                                requires_grad=True)):
                reports.append({
                    "opinfo": opinfo.name, "variant": opinfo.variant_test_name,
                    "function": function, "dtype": dtype_name, "index": index,
                    "sample": _describe_sample(sample),
                    "failure": _run_sample(opinfo.op, getattr(PF, function), sample)})
    return {"samples": reports}


if __name__ == "__main__":
    json.dump(evaluate(), sys.stdout)
    sys.exit(0)


# ---- the tests: read the child's reports --------------------------------------------------------

pytestmark = pytest.mark.slow  # ~3000 samples, after a ~6 s import of torch's test utilities


@pytest.fixture(scope="module")
def reports():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([HERE, ROOT, os.environ.get("PYTHONPATH",
                                                                                  "")]))
    proc = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env, cwd=HERE,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    if "unavailable" in result:
        pytest.skip(result["unavailable"])
    return result["samples"]


def _report_lines(failed):
    return "\n".join(f"  {r['opinfo']}{'.' + r['variant'] if r['variant'] else ''} {r['dtype']} "
                     f"sample {r['index']} ({r['sample']}): {r['failure']}" for r in failed)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("opinfo", list(OPS))
def test_opinfo_samples_match_torch(reports, opinfo, dtype):
    mine = [r for r in reports if r["opinfo"] == opinfo and r["dtype"] == dtype]
    if not mine:
        pytest.skip(f"torch {torch.__version__}'s op_db has no OpInfo named {opinfo}")
    failed = [r for r in mine if r["failure"]]
    assert not failed, f"{len(failed)} of {len(mine)} samples:\n" + _report_lines(failed)
