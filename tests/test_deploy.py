"""Deployment through torch.export and AOTInductor (examples/deploy_aoti.py, whose functions these
tests run): a pyengine LeNet exported with a dynamic batch size and packaged on the CPU loads in a
fresh process that imported pyengine and runs like the eager model, at batch sizes other than
the example's; without `import pyengine` the load fails naming the missing operator (the README
and the example document that error).

One model, one package (compiling it takes ~30-60 s on the 2-core machine): slow.
"""
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from helpers import assert_close
from pyengine.models import LeNet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (hasattr(torch._inductor, "aoti_compile_and_package")
                            and hasattr(torch._inductor, "aoti_load_package")),
                       reason=f"torch {torch.__version__} has no torch._inductor."
                       "aoti_compile_and_package / aoti_load_package (torch >= 2.6 has them)"),
]


def _example():
    spec = importlib.util.spec_from_file_location(
        "deploy_aoti", os.path.join(ROOT, "examples", "deploy_aoti.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def packaged(tmp_path_factory):
    """(the eager model, the example's AOTInductor package of it)."""
    torch.manual_seed(0)
    model = LeNet().eval()
    path = str(tmp_path_factory.mktemp("aoti") / "lenet.pt2")
    package = _example().export_and_package(model, torch.randn(2, 1, 32, 32), path)
    assert os.path.isfile(package)
    return model, package


def test_package_runs_in_a_fresh_process_like_eager(packaged):
    model, package = packaged
    example = _example()
    for batch in (1, 7):  # the package was exported at batch 2, with a dynamic batch size
        images = torch.randn(batch, 1, 32, 32)
        logits = example.run_in_new_process(package, images)
        with torch.no_grad():
            expected = model(images)
        assert logits.shape == (batch, 10)
        assert_close(logits, expected)


def test_loading_without_importing_pyengine_names_the_missing_operator(packaged):
    _, package = packaged
    load = ("import sys, torch\n"
            "torch._inductor.aoti_load_package(sys.argv[1])\n"
            "assert 'pyengine' not in sys.modules\n")
    proc = subprocess.run([sys.executable, "-c", load, package], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)
    assert proc.returncode != 0
    assert "RuntimeError: Could not find schema for pyengine::" in proc.stderr, proc.stderr
