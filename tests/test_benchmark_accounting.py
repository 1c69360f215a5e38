"""The benchmark's blocks-held-vs-ideal probe, on the CPU engine of test_backend_cpu:
compressed requests hold the exact per-head ideal within one block."""

import importlib.util
import types
from pathlib import Path

from test_backend_cpu import Engine

ROOT = Path(__file__).resolve().parent.parent


def _benchmark():
    spec = importlib.util.spec_from_file_location(
        "benchmark", ROOT / "examples" / "benchmark.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_held_blocks_are_within_one_block_of_the_exact_ideal():
    bench = _benchmark()
    eng = Engine()
    plans = eng.add_all({"a": 300, "b": 180, "c": 30}, 64, 40)
    samples = []
    for schedule, _, _ in eng.run(plans):
        scheduler = types.SimpleNamespace(
            kv_cache_manager=eng.kv,
            running=[eng.requests[r] for r in schedule])
        samples += bench._held_vs_ideal(scheduler)
    assert len(samples) > 50
    for held, ideal in samples:
        assert ideal <= held < ideal + 1  # ceil of the exact page count
