"""pyengine's functional API: the names, arguments, defaults and return types of
torch.nn.functional, computed by pyengine's kernels. Switching is one import:

    import pyengine.functional as F

Each function normalises its arguments the way torch.nn.functional does, then calls the operator:
for plain tensors in eager mode through pyengine._C (a pybind11 entry point into the dispatcher,
the cheapest call); under torch.compile / torch.export, for tensor subclasses and torch.fx Proxies
and under a TorchFunctionMode through torch.ops.pyengine.*, which Dynamo and torch.fx trace and
which hands the call to __torch_function__.
"""
from ._functional import *  # noqa: F401,F403  (exactly the names in __all__)
from ._functional import __all__  # noqa: F401
