"""pyengine: hand-written CPU and CUDA kernels for PyTorch's classic layers.

    import pyengine.functional as PF     # same signatures as torch.nn.functional
    import pyengine.nn as pnn            # drop-in twins of torch.nn modules
    import pyengine.fused                # several layers in one operator (conv -> relu -> pool)
    model = pyengine.convert(model)      # swap a model's torch.nn layers for pyengine's
    with pyengine.patch(): ...           # route torch.nn.functional calls to pyengine
    step = pyengine.capture_step(fn, x, y)  # a whole training step replayed as one C++ call
    pyengine.info()                      # the build, the CPU / GPU code it runs, what each op
                                         # supports (python -m pyengine info prints it)

The operators themselves are torch.ops.pyengine.* (schemas in csrc/ops.cpp).
"""
from ._loader import load_extension as _load_extension

_C = _load_extension()

from . import _batching  # noqa: E402,F401  (torch.vmap batching rules of every operator)
from . import functional, fused, nn  # noqa: E402
from .convert import convert, disable, enable, is_enabled, patch  # noqa: E402
from . import models  # noqa: E402
from ._info import info  # noqa: E402
from ._capture import CaptureError, CapturedStep, capture_step  # noqa: E402

_C.cpu_cache_stats()  # reads PYENGINE_CPU_CACHE_MB now: a bad value fails the import, clearly


def empty_cache() -> None:
    """Gives back to the system the CPU memory pyengine keeps for reuse: large blocks its CPU
    operators' outputs and scratch held, cached for the next ones of the same size (at most
    PYENGINE_CPU_CACHE_MB megabytes, default 1024; 0 turns the cache off)."""
    _C.cpu_cache_empty()


def cache_stats() -> dict:
    """The CPU block cache: cached_bytes (held for reuse now), limit_bytes, and how many large
    requests it served (hits) or passed to the system (misses)."""
    return dict(_C.cpu_cache_stats())

__version__ = "0.1.0"
__all__ = ["functional", "fused", "nn", "models", "convert", "patch", "enable", "disable",
           "is_enabled", "info", "capture_step", "CapturedStep", "CaptureError", "empty_cache",
           "cache_stats"]
