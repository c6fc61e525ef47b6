"""Import a script from `examples/` as a module, so tests can call its functions directly."""

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

EXAMPLES = Path(__file__).parents[1] / "examples"


def import_example(name: str) -> Iterator[ModuleType]:
    """Yield `examples/<name>.py` as the module `<name>_example`; for a `yield from` fixture."""
    spec = importlib.util.spec_from_file_location(f"{name}_example", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve string annotations through it
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]
