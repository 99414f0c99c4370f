"""What pyengine's operators support beyond their signatures, in one table: pyengine.info() and
`python -m pyengine info` report it, patch() routes by DTYPES, and tests/test_info.py checks every
entry against the operators' behaviour (each supported dtype runs, every other one raises; each
declined option raises; a gradient is refused for exactly the arguments listed), so the table
cannot drift from the code it describes. The checks themselves live with the code: the dtypes in
csrc/common/dispatch.h and checks.h, the declined options in pyengine/_functional.py, the refused
gradients in csrc/autograd.cpp.

Everything else an operator takes is its signature (pyengine.functional's, torch.nn.functional's
own), and the devices it runs on are the dispatcher's kernels (info() asks the dispatcher).
"""
import torch

# Every operator takes these dtypes (bfloat16 and float16 computed in float32, rounded once:
# csrc/common/low_precision.h) and raises NotImplementedError for any other.
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

# pyengine.functional function -> {argument: the values it declines}: such a call raises
# NotImplementedError naming the argument (patch() then runs torch's function instead).
DECLINED = {
    "cross_entropy": {
        "target": "class-probability targets of another dtype than the input's (torch "
                  "promotes them); int64 class indices and probabilities of the input's dtype work",
    },
}

# pyengine.functional function -> the differentiable arguments whose gradient pyengine does not
# compute: a call with one of them requiring grad raises RuntimeError, up front, saying so.
NO_GRADIENT = {
    "mse_loss": ("weight",),
    "binary_cross_entropy": ("weight",),
    "cross_entropy": ("weight",),
}
