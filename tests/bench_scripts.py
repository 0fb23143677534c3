"""bench/ is not a package (its files are run as scripts): load one as a module for a test
(tests/ is on sys.path: pytest puts the directory of tests/conftest.py there)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

BENCH = Path(__file__).resolve().parents[1] / "bench"


def load_script(name: str) -> ModuleType:
    """bench/<name>.py as the module bnserve_bench_<name>."""
    module_name = f"bnserve_bench_{name}"
    spec = importlib.util.spec_from_file_location(module_name, BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module
