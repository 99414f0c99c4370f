"""pyengine.info() and `python -m pyengine info`: what this installation is and what it can do.

Every fact is read from where it lives, not restated: the versions from the packages, the build
from pyengine._C (built_with_torch, built_with_cuda) and from the GPU code inside the library
file itself, the instruction sets from pyengine._C.cpu_isa(), each operator's devices from the
dispatcher's kernels, its arguments from its signature, its dtypes and limits from
pyengine/_support.py (tested against the operators' behaviour), the rebuild command from
pyengine/_loader.py.
"""
import inspect
import os
import struct
from typing import Dict, List, Optional

import torch

from . import _C
from ._loader import REBUILD, cuda_build_problem
from ._support import DECLINED, DTYPES, NO_GRADIENT

# ---- the GPU code inside the library ------------------------------------------------------------
# nvcc puts each translation unit's device code in the ELF section .nv_fatbin: fatbins (magic
# 0xBA55ED50, 8-byte aligned), each a 16-byte header (magic u32, version u16, header size u16,
# size of the entries u64) and entries: kind u16 (1 PTX, 2 cubin), version u16, header size u32,
# payload size u64, ..., the architecture u32 at byte 28 (90 for sm_90 / compute_90).
_FATBIN_MAGIC = 0xBA55ED50
_PTX, _CUBIN = 1, 2


def _elf_section(path: str, name: str) -> Optional[bytes]:
    """The contents of section `name` of the 64-bit little-endian ELF file at `path` (what
    pyengine's x86-64 builds are), or None if it has no such section or is not such a file."""
    with open(path, "rb") as f:
        header = f.read(64)
        if len(header) < 64 or header[:4] != b"\x7fELF" or header[4] != 2 or header[5] != 1:
            return None
        shoff, = struct.unpack_from("<Q", header, 0x28)
        shentsize, shnum, shstrndx = struct.unpack_from("<HHH", header, 0x3A)
        f.seek(shoff)
        table = f.read(shentsize * shnum)
        if len(table) < shentsize * shnum or shstrndx >= shnum:
            return None

        def section(i):  # (name offset, file offset, size)
            fields = struct.unpack_from("<IIQQQQ", table, i * shentsize)
            return fields[0], fields[4], fields[5]

        def read(offset, size):
            f.seek(offset)
            return f.read(size)

        _, names_at, names_size = section(shstrndx)
        names = read(names_at, names_size)
        wanted = name.encode() + b"\0"
        for i in range(shnum):
            name_at, offset, size = section(i)
            if names[name_at:name_at + len(wanted)] == wanted:
                return read(offset, size)
    return None


def cuda_architectures(library: str) -> Optional[Dict[str, List[int]]]:
    """{"sm": [...], "ptx": [...]}: the architectures (80 for 8.0) whose machine code (cubin) and
    whose PTX the library at `library` holds, from its .nv_fatbin section; None for a library
    without GPU code (a CPU-only build)."""
    data = _elf_section(library, ".nv_fatbin")
    if not data:
        return None
    found = {_CUBIN: set(), _PTX: set()}
    pos = 0
    while pos + 16 <= len(data):
        magic, _, header_size, entries_size = struct.unpack_from("<IHHQ", data, pos)
        if magic != _FATBIN_MAGIC:
            pos += 8  # padding between two fatbins
            continue
        entry, end = pos + header_size, min(pos + header_size + entries_size, len(data))
        while entry + 32 <= end:
            kind, _, entry_header, payload = struct.unpack_from("<HHIQ", data, entry)
            arch, = struct.unpack_from("<I", data, entry + 28)
            if kind in found:
                found[kind].add(arch)
            if entry_header + payload == 0:
                break
            entry += entry_header + payload
        pos = max(end, pos + 8)
    return {"sm": sorted(found[_CUBIN]), "ptx": sorted(found[_PTX])}


def _capability(arch: int) -> str:
    return f"{arch // 10}.{arch % 10}"


def device_code(capability, archs: Optional[Dict[str, List[int]]]) -> Optional[str]:
    """Which of the library's GPU code a device of compute capability (major, minor) runs: machine
    code for its major version and an equal or lower minor one, else PTX of an equal or lower
    architecture (the driver compiles it at first use); None when there is neither."""
    major, minor = capability
    if not archs:
        return None
    native = [a for a in archs["sm"] if a // 10 == major and a % 10 <= minor]
    if native:
        return f"sm_{max(native)} machine code"
    ptx = [a for a in archs["ptx"] if a <= major * 10 + minor]
    if ptx:
        return f"compute_{max(ptx)} PTX, compiled by the driver at first use"
    return None


# ---- info() -------------------------------------------------------------------------------------

def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _operators() -> dict:
    """pyengine.functional's and pyengine.fused's functions: dtypes, devices with kernels,
    arguments, what they decline and which gradients they do not compute."""
    from . import functional, fused

    out = {}
    for module in (functional, fused):
        for name in module.__all__:
            out[name] = _operator_entry(name, getattr(module, name))
    return out


def _operator_entry(name: str, fn) -> dict:
    parameters = inspect.signature(fn).parameters
    return {
        "dtypes": [_dtype_name(d) for d in DTYPES],
        "devices": [key.lower() for key in ("CPU", "CUDA")
                    if torch._C._dispatch_has_kernel_for_dispatch_key(f"pyengine::{name}", key)],
        "arguments": [p for p in parameters if not p.startswith("_")],
        "declined": dict(DECLINED.get(name, {})),
        "no_gradient_for": list(NO_GRADIENT.get(name, ())),
    }


def info() -> dict:
    """What this installation of pyengine is and can do, as a dict of plain values (JSON-ready):

    pyengine, torch   versions (and the CUDA version torch was built with);
    build             the compiled library: its file, CPU-only or with CUDA kernels, the torch it
                      was compiled against, the GPU architectures it holds code for;
    cpu               the instruction set each CPU kernel family runs with (PYENGINE_CPU_ISA
                      lowers it), and torch's thread count;
    cuda_devices      each visible GPU and which of the library's code it runs;
    operators         per pyengine.functional and pyengine.fused function: dtypes, devices,
                      arguments, the values it declines, the arguments it computes no gradient
                      for;
    problems          what is wrong with this installation, each with its fix (empty if nothing);
    rebuild           the command that rebuilds pyengine._C against the installed torch.

    `python -m pyengine info` prints it (--json: as JSON)."""
    import pyengine

    problems = []
    archs = cuda_architectures(_C.__file__) if _C.built_with_cuda else None
    try:
        isa = dict(_C.cpu_isa())
    except RuntimeError as exc:  # an unknown PYENGINE_CPU_ISA: every CPU kernel would raise
        isa = None
        problems.append(str(exc))
    cuda_problem = cuda_build_problem(_C)
    if cuda_problem:
        problems.append(cuda_problem)
    devices = []
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            capability = torch.cuda.get_device_capability(index)
            runs = device_code(capability, archs) if _C.built_with_cuda else None
            devices.append({"index": index, "name": torch.cuda.get_device_name(index),
                            "capability": f"{capability[0]}.{capability[1]}", "runs": runs})
            if _C.built_with_cuda and runs is None:
                held = ", ".join(f"sm_{a}" for a in archs["sm"]) if archs else "none"
                problems.append(
                    f"cuda:{index} ({devices[-1]['name']}, compute capability "
                    f"{devices[-1]['capability']}) has no code in this build (it holds {held}): "
                    f"rebuild with TORCH_CUDA_ARCH_LIST={devices[-1]['capability']} "
                    f"{' '.join(REBUILD.split())}")
    built = tuple(_C.built_with_torch)
    return {
        "pyengine": {"version": pyengine.__version__,
                     "location": os.path.dirname(os.path.abspath(pyengine.__file__))},
        "torch": {"version": torch.__version__, "cuda": torch.version.cuda},
        "build": {
            "library": os.path.abspath(_C.__file__),
            "kernels": "CPU and CUDA" if _C.built_with_cuda else "CPU only",
            "built_with_torch": f"{built[0]}.{built[1]}",
            "built_with_cuda": bool(_C.built_with_cuda),
            "cuda_architectures": None if archs is None else {
                "sm": [_capability(a) for a in archs["sm"]],
                "ptx": [_capability(a) for a in archs["ptx"]]},
        },
        "cpu": {"kernel_isa": isa, "PYENGINE_CPU_ISA": os.environ.get("PYENGINE_CPU_ISA"),
                "threads": torch.get_num_threads()},
        "cuda_devices": devices,
        "operators": _operators(),
        "problems": problems,
        "rebuild": REBUILD,
    }


def format_info(report: dict) -> str:
    """info()'s report as text for a person: one line per fact, one per operator."""
    build, cpu = report["build"], report["cpu"]
    archs = build["cuda_architectures"]
    lines = [
        f"pyengine  {report['pyengine']['version']}  ({report['pyengine']['location']})",
        f"torch     {report['torch']['version']}  (CUDA {report['torch']['cuda'] or 'none'})",
        f"build     {build['kernels']}, compiled against torch {build['built_with_torch']}  "
        f"({build['library']})",
    ]
    if build["built_with_cuda"]:
        code = ("unknown (no GPU code found in the library)" if not archs else
                ", ".join([f"sm_{a.replace('.', '')}" for a in archs["sm"]] +
                          [f"compute_{a.replace('.', '')} (PTX)" for a in archs["ptx"]]))
        lines.append(f"          GPU code for {code}")
    isa = ("unknown" if cpu["kernel_isa"] is None else
           ", ".join(f"{family} {level}" for family, level in sorted(cpu["kernel_isa"].items())))
    forced = cpu["PYENGINE_CPU_ISA"]
    setting = f"PYENGINE_CPU_ISA={forced}" if forced else "PYENGINE_CPU_ISA unset"
    lines.append(f"CPU       kernels run with {isa}  ({setting}; {cpu['threads']} threads)")
    if not report["cuda_devices"]:
        lines.append("CUDA      no device visible to torch")
    for device in report["cuda_devices"]:
        runs = device["runs"] or "no pyengine kernels"
        lines.append(f"CUDA      cuda:{device['index']} {device['name']} (compute capability "
                     f"{device['capability']}): {runs}")
    lines.append("operators (pyengine.functional, pyengine.fused; dtypes, devices, arguments, "
                 "limits):")
    width = max(map(len, report["operators"]), default=0)
    for name, op in report["operators"].items():
        limits = [f"declines {arg}: {what}" for arg, what in op["declined"].items()]
        if op["no_gradient_for"]:
            limits.append(f"no gradient for {', '.join(op['no_gradient_for'])}")
        lines.append(f"  {name:{width}} {'/'.join(op['dtypes'])}  {'/'.join(op['devices'])}  "
                     f"({', '.join(op['arguments'])})")
        lines += [f"  {'':{width}} {limit}" for limit in limits]
    lines.append("problems  " + ("none" if not report["problems"] else
                                 "\n          ".join(report["problems"])))
    lines.append(f"rebuild   {report['rebuild']}")
    return "\n".join(lines)
