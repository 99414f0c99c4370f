"""pyengine's functional API: the names, arguments, defaults and return types of
torch.nn.functional, computed by pyengine's kernels. Switching is one import:

    import pyengine.functional as F

Each function normalises its arguments the way torch.nn.functional does, then calls the operator:
eagerly through pyengine._C (a pybind11 entry point into the dispatcher, the cheapest call), and
under torch.compile through torch.ops.pyengine.*, which Dynamo can trace.
"""
from ._functional import *  # noqa: F401,F403  (exactly the names in __all__)
from ._functional import __all__  # noqa: F401
