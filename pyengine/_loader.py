"""Loads pyengine._C and turns every way it can fail into an ImportError that says what is wrong
and the command that fixes it."""
import importlib

import torch

REBUILD = "pip install --no-build-isolation -e .   (from pyengine's source folder)"


def load_extension():
    try:
        ext = importlib.import_module("pyengine._C")
    except ModuleNotFoundError as exc:
        if exc.name != "pyengine._C":
            raise
        raise ImportError(
            "pyengine's compiled operators (pyengine._C) are not built. Build them with:\n    "
            + REBUILD
        ) from exc
    except (ImportError, OSError) as exc:
        # An undefined symbol here almost always means _C was compiled against another torch.
        raise ImportError(
            f"pyengine._C failed to load ({exc}). It was most likely built against a different "
            f"torch than the installed {torch.__version__}. Rebuild it with:\n    " + REBUILD
        ) from exc

    built = tuple(ext.built_with_torch)
    running = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
    if built != running:
        raise ImportError(
            f"pyengine._C was built against torch {built[0]}.{built[1]} but torch "
            f"{torch.__version__} is installed. Rebuild it with:\n    " + REBUILD
        )
    problem = cuda_build_problem(ext)
    if problem:
        import warnings

        warnings.warn(problem, stacklevel=3)
    return ext


def cuda_build_problem(ext):
    """What is wrong with a build that loads but lacks the CUDA kernels this machine could use,
    and how to fix it; None when nothing is. The import warns with it; pyengine.info() lists it."""
    if torch.cuda.is_available() and not ext.built_with_cuda:
        return ("pyengine was built without CUDA kernels, so its operators will raise on CUDA "
                "tensors. Rebuild with a CUDA toolkit (nvcc) present, or PYENGINE_CUDA=1:\n    "
                + REBUILD)
    return None
