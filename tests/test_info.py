"""pyengine.info() and `python -m pyengine info`: each fact read from where it lives, and the
support table it reports (pyengine/_support.py) held to the operators' behaviour in both
directions: every dtype listed works and every other one raises; every declined option raises;
a gradient is refused for exactly the arguments listed, and computed (as torch's) for every other
one. The GPU architectures are read from a library's device code (checked on one nvcc builds
here, where nvcc is installed)."""
import inspect
import json
import os
import shutil
import subprocess
import sys
import types

import pytest
import torch
import torch.nn.functional as F

import fuzz_configs
import helpers
import pyengine
import pyengine.functional as PF
import samples
from differential import (argument_name, call, check, grad_exponent, reference_leaves,
                          tolerance)
from fuzz_configs import materialize, pyengine_function, torch_function
from pyengine import _info, _loader, _support, cli
from test_low_precision import LOW_DTYPES, check_low_precision

# Every public function of an operator: pyengine.functional's and pyengine.fused's.
OPERATORS = PF.__all__ + pyengine.fused.__all__

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALL_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64,
              torch.complex128, torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64,
              torch.bool]
UNSUPPORTED = [d for d in ALL_DTYPES if d not in _support.DTYPES]


# ---- what info() reports ------------------------------------------------------------------------

def test_info_reports_this_installation():
    report = pyengine.info()
    json.dumps(report)  # plain values only
    assert report["pyengine"] == {"version": pyengine.__version__,
                                  "location": os.path.join(ROOT, "pyengine")}
    assert report["torch"] == {"version": torch.__version__, "cuda": torch.version.cuda}
    build = report["build"]
    major, minor = pyengine._C.built_with_torch
    assert build["built_with_torch"] == f"{major}.{minor}"
    assert build["built_with_cuda"] is bool(pyengine._C.built_with_cuda)
    assert build["kernels"] == ("CPU and CUDA" if pyengine._C.built_with_cuda else "CPU only")
    assert os.path.samefile(build["library"], pyengine._C.__file__)
    # a CUDA build holds GPU code, a CPU-only one none
    assert (build["cuda_architectures"] is not None) == build["built_with_cuda"]
    if build["built_with_cuda"]:
        assert build["cuda_architectures"]["sm"] or build["cuda_architectures"]["ptx"]
    assert report["cpu"]["kernel_isa"] == pyengine._C.cpu_isa()
    assert report["cpu"]["threads"] == torch.get_num_threads()
    devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
    assert [d["index"] for d in report["cuda_devices"]] == list(range(devices))
    assert report["rebuild"] == _loader.REBUILD
    # None on a machine without a GPU; with one, a CPU-only build (the import's warning) or a
    # CUDA build without code for a device is one
    cpu_only = [p for p in [_loader.cuda_build_problem(pyengine._C)] if p]
    no_code = [f"cuda:{d['index']} " for d in report["cuda_devices"]
               if pyengine._C.built_with_cuda and d["runs"] is None]
    assert report["problems"][:len(cpu_only)] == cpu_only
    assert [p[:len("cuda:0 ")] for p in report["problems"][len(cpu_only):]] == no_code


def test_info_lists_every_operator_with_its_signature_and_kernels():
    operators = pyengine.info()["operators"]
    assert list(operators) == OPERATORS
    assert operators["conv2d"]["arguments"] == ["input", "weight", "bias", "stride", "padding",
                                                "dilation", "groups"]
    assert operators["softmax"]["arguments"] == ["input", "dim", "dtype"]
    devices = ["cpu", "cuda"] if pyengine._C.built_with_cuda else ["cpu"]
    for name, op in operators.items():
        assert op["dtypes"] == ["float32", "float64", "bfloat16", "float16"]
        assert op["devices"] == devices, name
        # pyengine.functional's signature (torch.nn.functional's: tests/test_api.py), less the
        # private _stacklevel
        assert op["arguments"] == [p for p in inspect.signature(pyengine_function(name)).parameters
                                   if p != "_stacklevel"], name
        assert op["declined"] == _support.DECLINED.get(name, {})
        assert op["no_gradient_for"] == list(_support.NO_GRADIENT.get(name, ()))


def test_info_names_problems_and_their_fix(monkeypatch):
    """A CPU-only build on a machine with a GPU (the import's warning, now in the report), and a
    CUDA build without code for the GPU it finds (with the TORCH_CUDA_ARCH_LIST that fixes it)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: "Test GPU")
    fake = types.SimpleNamespace(built_with_cuda=False, built_with_torch=(2, 4),
                                 cpu_isa=pyengine._C.cpu_isa, __file__=pyengine._C.__file__)
    monkeypatch.setattr(_info, "_C", fake)
    report = pyengine.info()
    assert report["problems"] == [_loader.cuda_build_problem(fake)]
    assert "built without CUDA kernels" in report["problems"][0]
    assert report["cuda_devices"] == [{"index": 0, "name": "Test GPU", "capability": "9.0",
                                       "runs": None}]
    text = _info.format_info(report)
    assert "cuda:0 Test GPU (compute capability 9.0): no pyengine kernels" in text
    assert "built without CUDA kernels" in text

    fake.built_with_cuda = True
    monkeypatch.setattr(_info, "cuda_architectures", lambda path: {"sm": [80], "ptx": []})
    report = pyengine.info()
    assert report["build"]["cuda_architectures"] == {"sm": ["8.0"], "ptx": []}
    assert len(report["problems"]) == 1
    assert report["problems"][0].startswith(
        "cuda:0 (Test GPU, compute capability 9.0) has no code in this build (it holds sm_80): "
        "rebuild with TORCH_CUDA_ARCH_LIST=9.0 pip install --no-build-isolation -e .")


def test_info_reports_a_bad_cpu_isa_setting():
    env = dict(os.environ, PYENGINE_CPU_ISA="sse9", PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-m", "pyengine", "info", "--json"], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["cpu"] == {"kernel_isa": None, "PYENGINE_CPU_ISA": "sse9",
                             "threads": report["cpu"]["threads"]}
    assert any("PYENGINE_CPU_ISA=sse9" in p for p in report["problems"]), report["problems"]


def test_cli_prints_it(capsys):
    assert cli.main(["info"]) == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    assert lines[0].startswith(f"pyengine  {pyengine.__version__}  (")
    assert lines[1].startswith(f"torch     {torch.__version__}  (CUDA ")
    kernels = "CPU and CUDA" if pyengine._C.built_with_cuda else "CPU only"
    assert lines[2].startswith(f"build     {kernels}, compiled against torch ")
    for family, level in pyengine._C.cpu_isa().items():
        assert f"{family} {level}" in text
    for name in OPERATORS:
        assert any(line.startswith(f"  {name} ") for line in lines), name
    assert "declines target: class-probability targets of another dtype" in text
    assert "no gradient for weight" in text
    if not pyengine.info()["problems"]:
        assert "problems  none" in lines
    assert lines[-1] == f"rebuild   {_loader.REBUILD}"

    assert cli.main(["info", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == pyengine.info()


def test_command_line_entry_point():
    proc = subprocess.run([sys.executable, "-m", "pyengine", "info"], cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("pyengine  ") and "rebuild   pip install" in proc.stdout


# ---- the GPU code in a library ------------------------------------------------------------------

def _find_nvcc():
    for candidate in (shutil.which("nvcc"),
                      os.path.join(os.environ.get("CUDA_HOME", ""), "bin", "nvcc"),
                      "/usr/local/cuda/bin/nvcc"):
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


@pytest.mark.skipif(_find_nvcc() is None, reason="nvcc not found: no library with GPU code can "
                    "be built here to read its architectures from")
def test_cuda_architectures_are_read_from_the_library(tmp_path):
    source = tmp_path / "kernel.cu"
    source.write_text("__global__ void add_one(float* x) { x[threadIdx.x] += 1.0f; }\n"
                      'extern "C" void launch(float* x) { add_one<<<1, 32>>>(x); }\n')
    library = tmp_path / "libkernel.so"
    subprocess.run([_find_nvcc(), "-shared", "-Xcompiler", "-fPIC",
                    "-gencode", "arch=compute_80,code=sm_80",
                    "-gencode", "arch=compute_90,code=[sm_90,compute_90]",
                    str(source), "-o", str(library)], check=True, capture_output=True,
                   timeout=300)
    archs = _info.cuda_architectures(str(library))
    assert archs == {"sm": [80, 90], "ptx": [90]}
    assert _info.device_code((8, 0), archs) == "sm_80 machine code"
    assert _info.device_code((8, 6), archs) == "sm_80 machine code"
    assert _info.device_code((9, 0), archs) == "sm_90 machine code"
    assert _info.device_code((10, 0), archs) == ("compute_90 PTX, compiled by the driver at "
                                                 "first use")
    assert _info.device_code((7, 5), archs) is None


def test_a_library_without_gpu_code_has_no_architectures(tmp_path):
    not_elf = tmp_path / "not_a_library.so"
    not_elf.write_bytes(b"text, not an ELF file" * 10)
    assert _info.cuda_architectures(str(not_elf)) is None
    if not pyengine._C.built_with_cuda:
        assert _info.cuda_architectures(pyengine._C.__file__) is None


# ---- the support table against behaviour --------------------------------------------------------

def _plain_samples(op):
    """op's small samples that torch accepts as they are: no error expected, no NaN / inf, no
    empty tensor."""
    return [s for s in samples.samples(op)
            if not s.large and not s.case.expect_error and not samples.has_special_values(s)
            and all(fuzz_configs.numel(spec.shape) > 0 for _, spec in s.case.tensors())]


@pytest.mark.parametrize("op", OPERATORS)
def test_each_listed_dtype_works(op):
    """The op's first sample in each dtype of the table, forward and gradients against torch
    (16-bit dtypes: as accurate as torch's in that dtype, test_low_precision.py's check)."""
    case = _plain_samples(op)[0].case
    for dtype in _support.DTYPES:
        if dtype in LOW_DTYPES:
            check_low_precision(case, dtype)
            continue
        name = str(dtype).replace("torch.", "")
        check(fuzz_configs.build(op, dict(case.params, dtype=name), case.seed))


@pytest.mark.parametrize("op", OPERATORS)
def test_every_other_dtype_raises(op):
    """The same call with its floating-point tensors in any other dtype: NotImplementedError,
    naming the dtypes that work."""
    args, kwargs = materialize(_plain_samples(op)[0].case)
    for dtype in UNSUPPORTED:
        def cast(t):
            return t.detach().to(dtype) if isinstance(t, torch.Tensor) and \
                t.is_floating_point() else t
        with pytest.raises(NotImplementedError) as raised:
            call(pyengine_function(op), [cast(a) for a in args], {k: cast(v) for k, v in kwargs.items()})
        for supported in _support.DTYPES:
            assert str(supported).replace("torch.", "") in str(raised.value), (dtype, raised.value)


def _declined_calls():
    x, probabilities = torch.randn(3, 4), torch.rand(3, 4)
    return {
        ("cross_entropy", "target"): ((x, probabilities.softmax(1).double()), {}),
    }


def test_every_declined_option_raises_and_torch_takes_it():
    calls = _declined_calls()
    listed = {(op, arg) for op, declined in _support.DECLINED.items() for arg in declined}
    assert set(calls) == listed, "a declined option without a call here, or a call not listed"
    for (op, arg), (args, kwargs) in calls.items():
        getattr(F, op)(*args, **kwargs)  # a limit of pyengine's, not a bad call
        with pytest.raises(NotImplementedError, match=arg):
            getattr(PF, op)(*args, **kwargs)


def _widest_sample(op):
    """The op's plain sample with the most floating-point tensor arguments (bias, weight, ...)."""
    def floating(s):
        return sum(spec.values != "classes" for _, spec in s.case.tensors())
    return max(_plain_samples(op), key=floating)


@pytest.mark.parametrize("op", OPERATORS)
def test_gradients_are_refused_for_exactly_the_listed_arguments(op):
    """Each floating-point tensor argument in turn requires grad (the others do not): for one in
    the table the call raises, naming it; for every other the gradient is torch's."""
    case = _widest_sample(op).case
    refused = _support.NO_GRADIENT.get(op, ())
    specs = list(case.args) + list(case.kwargs.values())
    tried = set()
    for i, spec in enumerate(specs):
        if not isinstance(spec, fuzz_configs.TensorSpec) or spec.values == "classes":
            continue
        name = argument_name(case, i)
        tried.add(name)
        args, kwargs = materialize(case)
        leaves = [a.detach() if isinstance(a, torch.Tensor) else a
                  for a in list(args) + list(kwargs.values())]
        leaves[i].requires_grad_(True)
        args, kwargs = leaves[:len(args)], dict(zip(kwargs, leaves[len(args):]))
        if name in refused:
            with pytest.raises(RuntimeError, match=f"the gradient with respect to {name} is not "
                                                   "supported"):
                call(pyengine_function(op), args, kwargs)
            continue
        ref_args, ref_kwargs = reference_leaves(args, kwargs)
        ours = call(pyengine_function(op), args, kwargs)
        theirs = call(torch_function(op), ref_args, ref_kwargs)
        ours, theirs = (o[0] if isinstance(o, tuple) else o for o in (ours, theirs))
        g = torch.randn_like(theirs)
        ours.backward(g)
        theirs.backward(g)
        assert leaves[i].grad is not None, (op, name)
        ref_grad = (list(ref_args) + list(ref_kwargs.values()))[i].grad
        helpers.assert_close(leaves[i].grad, ref_grad, case.dtype,
                             **tolerance(case, case.dtype, grad_exponent(case, spec)))
    assert set(refused) <= tried, f"{op}: the sample has no {set(refused) - tried} to try"
