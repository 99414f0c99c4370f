"""`import pyengine` without a usable build says what is wrong and how to fix it."""
import importlib
import re
import types

import pytest
import torch

from pyengine import _loader


def test_missing_build(monkeypatch):
    def missing(name):
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)

    monkeypatch.setattr(importlib, "import_module", missing)
    with pytest.raises(ImportError, match=r"not built[\s\S]*pip install --no-build-isolation -e"):
        _loader.load_extension()


def test_unloadable_build(monkeypatch):
    def broken(name):
        raise ImportError("_C.so: undefined symbol: _ZN3c1010Dispatcher")

    monkeypatch.setattr(importlib, "import_module", broken)
    with pytest.raises(ImportError, match=r"undefined symbol[\s\S]*different torch[\s\S]*Rebuild"):
        _loader.load_extension()


def test_built_against_other_torch(monkeypatch):
    fake = types.SimpleNamespace(built_with_torch=(2, 3), built_with_cuda=False)
    monkeypatch.setattr(importlib, "import_module", lambda name: fake)
    with pytest.raises(ImportError, match=rf"built against torch 2\.3 but torch "
                                          rf"{re.escape(torch.__version__)}[\s\S]*Rebuild"):
        _loader.load_extension()


def test_real_build_loads():
    ext = _loader.load_extension()
    major, minor = (int(p) for p in torch.__version__.split(".")[:2])
    assert tuple(ext.built_with_torch) == (major, minor)
