import os
import sys

import pytest
import torch

# Tests import their shared helpers as `helpers`.
sys.path.insert(0, os.path.dirname(__file__))

import pyengine  # noqa: E402,F401  (registers torch.ops.pyengine.*)


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """Every test draws fresh random inputs, but reproducibly: the seed is printed on failure."""
    seed = int.from_bytes(os.urandom(4), "little") if os.environ.get("PYENGINE_RANDOM_SEED") \
        else (hash(request.node.nodeid) & 0x7FFFFFFF)
    torch.manual_seed(seed)
    request.node.user_properties.append(("seed", seed))
    yield
