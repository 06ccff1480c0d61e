"""A command of scripts/ or benchmarks/ as a module, for the code that uses its functions (tests, a
benchmark that reuses a command's): neither folder is a package."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent


def load_command(relative: str) -> ModuleType:
    """The module of ``relative`` (e.g. ``"scripts/build_mar.py"``), loaded once per process."""
    path = ROOT / relative
    name = f"command_{path.stem}"
    if str(path.parent) not in sys.path:  # its sibling modules import as when it runs
        sys.path.append(str(path.parent))
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None, path
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up here
        spec.loader.exec_module(module)
    return sys.modules[name]
