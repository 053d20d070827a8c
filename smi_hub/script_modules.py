"""Python files of a source checkout that are no package (``demo/*.py``, ``benchmarks/*.py``,
``hubconf.py``) loaded as modules by path: the one way ``smi-hub demo``, the demo's files, the
benchmark scripts (their sibling scripts) and the tests load them."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType


def load_file_module(name: str, path: Path, register: bool = True) -> ModuleType:
    """The file at ``path`` run as module ``name``. With ``register``, once per process: the
    module is kept in ``sys.modules`` under ``name`` and reused (removed again if it fails)."""
    if register and name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    if register:
        sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        if register:
            del sys.modules[name]
        raise
    return module


def load_demo_module(name: str, folder: Path) -> ModuleType:
    """``<folder>/<name>.py`` (a file of ``demo/``), once per process, as the module
    ``smi_hub_demo_<name>``: the one copy the demo's files and the tests share."""
    return load_file_module(f"smi_hub_demo_{name}", folder / f"{name}.py")
