"""Fused layers: several torch.nn.functional calls in one pyengine operator, with a backward
operator of its own. Each gives the values and gradients of the calls it replaces (its docstring
writes them out), in fewer passes over memory and fewer operator calls:

    pyengine.fused.conv2d_relu_max_pool2d(x, w, b, padding=1, pool_kernel_size=2)
        == F.max_pool2d(F.relu(F.conv2d(x, w, b, padding=1)), 2)

pyengine.models uses them, and pyengine.convert() chooses them where a torch.nn.Sequential holds
the exact pattern (pyengine.nn.Sequential). They have no torch.nn.functional twin, so
pyengine.patch() never routes to them.
"""
from ._fused import *  # noqa: F401,F403  (exactly the names in __all__)
from ._fused import __all__  # noqa: F401
