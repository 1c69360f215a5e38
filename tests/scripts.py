"""The scripts of examples/ and benchmarks/ as modules, for tests of their
pure parts (they are not packages)."""

import functools
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
BENCHMARKS = ROOT / "benchmarks"


@functools.cache
def load_script(name: str):
    """``examples/<name>.py`` or ``benchmarks/<name>.py`` imported once,
    registered under ``name`` (dataclasses look their module up in
    ``sys.modules``)."""
    path = next(folder / f"{name}.py" for folder in (EXAMPLES, BENCHMARKS)
                if (folder / f"{name}.py").is_file())
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
