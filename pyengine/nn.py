"""pyengine's modules: drop-in twins of their torch.nn namesakes.

Each subclasses the torch.nn module and overrides forward only, so constructor arguments,
parameter names, initialisation, repr and state_dict are torch's own, and a state_dict loads
both ways with strict=True. convert() swaps a model's layers for these; TWINS maps each torch.nn
class to its twin.
"""
from ._nn import *  # noqa: F401,F403  (exactly the names in __all__)
from ._nn import __all__  # noqa: F401
