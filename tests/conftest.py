import os
import sys
import zlib

import pytest
import torch

# Tests import their shared helpers as `helpers`.
sys.path.insert(0, os.path.dirname(__file__))

import pyengine  # noqa: E402,F401  (registers torch.ops.pyengine.*)

# pyengine's CUDA kernels compute float32 in float32; torch's CUDA convolutions and matrix
# products default to TF32 (10-bit mantissas), which put torch's own results up to ~1e-2 off on
# the first GPU run. References are computed in full float32.
torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False


@pytest.fixture(autouse=True)
def _seed(request):
    """Each test draws its random inputs from its own seed: by default a stable function of the
    test's id (the same run after run, on every machine), or a fresh one per test with
    PYENGINE_RANDOM_SEED=1. A failing test's report shows its seed; PYENGINE_SEED=N replays it."""
    if os.environ.get("PYENGINE_SEED"):
        seed = int(os.environ["PYENGINE_SEED"])
    elif os.environ.get("PYENGINE_RANDOM_SEED"):
        seed = int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF
    else:
        seed = zlib.crc32(request.node.nodeid.encode())
    torch.manual_seed(seed)
    request.node.pyengine_seed = seed
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    seed = getattr(item, "pyengine_seed", None)
    if report.failed and seed is not None:
        report.sections.append(("pyengine seed", f"torch.manual_seed({seed}); replay with "
                                                 f"PYENGINE_SEED={seed}"))
