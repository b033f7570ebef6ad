"""Import a script of `examples/` or `benchmarks/` as a module, for tests of its functions."""

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType


def imported(path: Path, name: str) -> Iterator[ModuleType]:
    """Yield the script at ``path`` imported as module ``name`` (a fixture body); unregistered afterwards."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]
