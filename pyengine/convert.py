"""convert(model): swap a model's torch.nn layers for their pyengine twins."""
import contextlib
import copy
import warnings

import torch

from ._support import DTYPES as _DTYPES
from .functional import __all__ as _FUNCTIONAL_NAMES
from .nn import TWINS

# Configurations a twin does not implement (it would raise): such layers stay torch's.
_UNSUPPORTED = {
    torch.nn.RNN: lambda m: m.bidirectional or (m.dropout > 0 and m.num_layers > 1),
}


def convert(model: torch.nn.Module, inplace: bool = False) -> torch.nn.Module:
    """Returns `model` with every torch.nn layer that pyengine implements (Conv2d, MaxPool2d,
    Linear, the activations and losses; see pyengine.nn.TWINS) replaced by its pyengine twin.

    Only exact torch.nn classes are swapped: a user's subclass may override forward, so it is
    left alone, like every other module, and so is a layer in a configuration pyengine does not
    implement (a bidirectional RNN). The twin takes over the very same module object (its
    class is switched to the pyengine subclass, which adds no state), so parameters, buffers,
    hooks, training mode and the state_dict stay exactly as they were. With inplace=False (the
    default) a deep copy is converted and `model` is untouched.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"pyengine.convert: expected model to be a torch.nn.Module, but got "
                        f"{type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    for module in model.modules():
        twin = TWINS.get(type(module))
        unsupported = _UNSUPPORTED.get(type(module))
        if twin is not None and not (unsupported and unsupported(module)):
            module.__class__ = twin
    return model


# ---- patch(): route torch's functional calls to pyengine ------------------------------------

# (namespace, name) pairs that patch() reroutes: torch.nn.functional's function of each name in
# pyengine.functional, and the torch.* functions of three of them, which code calls as well.
_PATCH_TARGETS = tuple((torch.nn.functional, n) for n in _FUNCTIONAL_NAMES) + \
    ((torch, "sigmoid"), (torch, "tanh"), (torch, "relu"))

_saved = {}      # (namespace, name) -> torch's original, while patched
_depth = 0       # nesting depth of enable() calls
_warned = set()  # functions whose fallback to torch has been reported once


def _route(pyengine_fn, torch_fn, name):
    """A stand-in for torch_fn that runs pyengine_fn on what pyengine implements (float32 and
    float64 tensors on a device it has kernels for), and torch's own function otherwise: other
    dtypes, an `out=` argument, or a configuration pyengine declines with NotImplementedError
    (reported once with a warning)."""
    from . import _C

    def routed(input, *args, **kwargs):
        usable = (isinstance(input, torch.Tensor)
                  and input.dtype in _DTYPES
                  and (input.device.type == "cpu" or (input.device.type == "cuda"
                                                      and _C.built_with_cuda))
                  and "out" not in kwargs)
        if not usable:
            return torch_fn(input, *args, **kwargs)
        try:
            return pyengine_fn(input, *args, **kwargs)
        except NotImplementedError as exc:
            if name not in _warned:
                _warned.add(name)
                warnings.warn(f"pyengine.patch: {exc}; torch's {name} runs instead", stacklevel=2)
            return torch_fn(input, *args, **kwargs)

    routed.__name__ = routed.__qualname__ = name
    routed.__doc__ = f"pyengine.patch() stand-in for {name}: see pyengine.functional.{name}"
    routed.__wrapped__ = torch_fn
    routed.__pyengine__ = True
    return routed


def enable() -> None:
    """Routes every torch.nn.functional function that pyengine.functional has (conv2d,
    max_pool2d, linear, the activations and losses: its __all__), and torch.sigmoid, torch.tanh
    and torch.relu, to pyengine, so unmodified code (torch.nn layers included, which call these
    functions) runs on pyengine's kernels. Calls nest: each enable() needs a disable()."""
    global _depth
    from . import functional as PF

    if _depth == 0:
        for namespace, name in _PATCH_TARGETS:
            original = getattr(namespace, name)
            _saved[(namespace, name)] = original
            setattr(namespace, name, _route(getattr(PF, name), original,
                                            f"{namespace.__name__}.{name}"))
    _depth += 1


def disable() -> None:
    """Undoes one enable(); the last one restores torch's functions."""
    global _depth
    if _depth == 0:
        raise RuntimeError("pyengine.disable(): pyengine.enable() / patch() is not active")
    _depth -= 1
    if _depth == 0:
        for (namespace, name), original in _saved.items():
            setattr(namespace, name, original)
        _saved.clear()


def is_enabled() -> bool:
    return _depth > 0


class patch(contextlib.ContextDecorator):
    """Context manager (and decorator) form of enable() / disable():

        with pyengine.patch():
            train(model)          # torch.nn layers and F.* calls run on pyengine's kernels
    """

    def __enter__(self):
        enable()
        return self

    def __exit__(self, *exc):
        disable()
        return False
