"""The packages that only the training job and the examples need (pyproject's `train` extra), and
the one error that names the missing one and how to install it."""
import importlib

INSTALL_EXTRAS = 'pip install "pyengine[train]"'


class MissingDependency(ImportError):
    """An optional package is missing; the message names it, what needs it and the install command.
    The command line reports it as one line instead of a traceback."""


def require(module: str, package: str, purpose: str):
    """Imports and returns `module`; if that fails, raises MissingDependency naming `package` (its
    pip name) and `purpose` (what needs it)."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        missing = isinstance(exc, ModuleNotFoundError) and exc.name is not None and (
            module == exc.name or module.startswith(exc.name + "."))
        state = "is not installed" if missing else f"failed to import ({exc})"
        raise MissingDependency(f"{package} is needed for {purpose} but {state}; install it with "
                                f"{INSTALL_EXTRAS} (or pip install {package})") from exc
