"""The scripts in examples/ as modules, for tests of their pure parts (they are
not a package)."""

import functools
import importlib.util
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@functools.cache
def load_example(name: str):
    """``examples/<name>.py`` imported once, registered under ``name``
    (dataclasses look their module up in ``sys.modules``)."""
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
