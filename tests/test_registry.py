"""Every operator is complete: each schema of csrc/ops.cpp has its Meta, CPU, CUDA (in CUDA
builds) and Autograd kernels and its torch.vmap batching rule (torch >= 2.4), each forward
operator its pyengine._C fast path, each operator its samples (tests/samples.py), and each
public function (pyengine.functional's and pyengine.fused's) its generator. A new schema that
lacks any of them fails here, naming what is missing."""
import pytest
import torch

import fuzz_configs
import pyengine
import pyengine.functional as PF
import pyengine.fused
import samples
from pyengine import _batching

SCHEMAS = sorted(n.split("::")[1] for n in torch._C._dispatch_get_all_op_names()
                 if n.startswith("pyengine::"))
BACKWARD = [n for n in SCHEMAS if n.endswith("_backward")]
FORWARD = [n for n in SCHEMAS if n not in BACKWARD]
# Where each dispatch key's kernels are registered.
KERNEL_HOMES = {"Meta": "csrc/meta.cpp", "CPU": "csrc/cpu/", "CUDA": "csrc/cuda/",
                "Autograd": "csrc/autograd.cpp, from csrc/op_handles.h's lists",
                "FuncTorchBatched": "pyengine/_batching.py's _RULES: the torch.vmap rule"}


def test_the_operators_are_there():
    assert "conv2d" in FORWARD and "conv2d_backward" in BACKWARD, SCHEMAS


@pytest.mark.parametrize("name", SCHEMAS)
def test_every_operator_has_its_kernels(name):
    keys = ["Meta", "CPU", "Autograd"] + (["CUDA"] if pyengine._C.built_with_cuda else []) + \
        (["FuncTorchBatched"] if _batching.REGISTERED else [])
    missing = [k for k in keys
               if not torch._C._dispatch_has_kernel_for_dispatch_key(f"pyengine::{name}", k)]
    assert not missing, (f"pyengine::{name} has no kernel for "
                         + ", ".join(f"{k} (registered in {KERNEL_HOMES[k]})" for k in missing))


def test_every_operator_is_pt2_compliant():
    """Every operator carries torch.Tag.pt2_compliant_tag (csrc/ops.cpp defines each schema with
    it), so torch.compile takes it under only_allow_pt2_compliant_ops (tests/test_compile.py)."""
    untagged = [n for n in SCHEMAS
                if torch.Tag.pt2_compliant_tag not in getattr(torch.ops.pyengine, n).default.tags]
    assert not untagged, f"operators without pt2_compliant_tag: {untagged} (csrc/ops.cpp)"


@pytest.mark.parametrize("name", BACKWARD)
def test_every_backward_operator_belongs_to_a_forward_one(name):
    """<forward>_backward, or <forward>_<argument>_backward for the gradient of one argument
    (binary_cross_entropy_target_backward, as torch names it)."""
    stem = name[:-len("_backward")]
    assert stem in FORWARD or any(stem.startswith(f + "_") for f in FORWARD), (
        f"pyengine::{name}: no forward operator")


def test_the_fast_paths_are_the_forward_operators():
    """pyengine._C has an entry for each forward op (csrc/python.cpp, from op_handles.h's
    PYENGINE_FORWARD_OPS), and nothing else callable but the build's own reports and
    capture_step's replay program."""
    reports = {"cpu_isa",          # the instruction set each CPU kernel family runs with
               "StepProgram",      # pyengine.capture_step's replay (csrc/capture.cpp)
               "cpu_cache_stats",  # the CPU block cache (cpu/allocator.h)
               "cpu_cache_empty"}
    entries = {n for n in dir(pyengine._C) if not n.startswith("_")
               and callable(getattr(pyengine._C, n))} - reports
    missing, extra = sorted(set(FORWARD) - entries), sorted(entries - set(FORWARD))
    assert not missing, (f"forward operators without a pyengine._C fast path: {missing}: add "
                         "them to PYENGINE_FORWARD_OPS in csrc/op_handles.h")
    assert not extra, f"pyengine._C entries of no operator: {extra}"


@pytest.mark.parametrize("name", FORWARD)
def test_every_fast_path_runs_its_operator(name):
    """pyengine._C.<name> on the op's first sample: the dispatcher runs pyengine::<name> and
    nothing else, and the result is torch.ops.pyengine.<name>'s."""
    _, c = samples.op_samples(name)[0]
    with torch.no_grad():
        with samples._RecordOps() as recorder:
            ours = getattr(pyengine._C, name)(*c.args)
        expected = c.op(*c.args)
    assert [r.name for r in recorder.calls] == [name]
    for a, b in zip(ours if isinstance(ours, tuple) else (ours,),
                    expected if isinstance(expected, tuple) else (expected,)):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("name", SCHEMAS)
def test_every_operator_has_samples(name):
    """tests/samples.py makes calls of every operator (so test_samples.py gradchecks and
    opchecks it, and test_cuda.py compares it across devices)."""
    assert samples.op_samples(name), (
        f"no sample calls pyengine::{name}: give the pyengine.functional (or pyengine.fused) "
        "function that calls it a generator in tests/fuzz_configs.py and entries in "
        "tests/samples.py")


def test_every_functional_has_a_generator_and_samples():
    """pyengine.functional's functions (torch.nn.functional's twins) and pyengine.fused's (a
    composition of torch calls each): a generator and samples each, and fuzz_configs' table of
    both sides of each call knows them all."""
    public = set(PF.__all__) | set(pyengine.fused.__all__)
    assert not set(PF.__all__) & set(pyengine.fused.__all__), "one name in two modules"
    assert set(fuzz_configs.OPS) == public, "tests/fuzz_configs.py: OPS"
    assert set(samples.COVER) == public, "tests/samples.py: COVER"
    assert set(fuzz_configs.functions()) == public, "pyengine/_fused.py: TORCH_EQUIVALENTS"
