"""Shared test setup: the `gpu` marker skips without CUDA; hypothesis runs
the same examples on every machine (CI must pass every time), unless
HYPOTHESIS_PROFILE=explore asks for fresh random ones."""

import os
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import settings

# the shared helpers (cpu_engine, scripts) beside this file, for every
# test folder (pytest puts only each test's own folder on sys.path)
sys.path.insert(0, str(Path(__file__).resolve().parent))

settings.register_profile("ci", derandomize=True, database=None)
settings.register_profile("explore", max_examples=2000, database=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def vllm_parsers():
    """vLLM's ``serve`` and ``bench serve`` parsers, built as its CLI builds
    them (on a CPU-only machine the CLI picks the CPU platform first; it is
    put back afterwards, for the other tests)."""
    from vllm import platforms
    platform = platforms.current_platform
    if platform.is_unspecified():
        from vllm.platforms.cpu import CpuPlatform
        platforms.current_platform = CpuPlatform()
    try:
        from vllm.benchmarks.serve import add_cli_args
        from vllm.entrypoints.openai.cli_args import make_arg_parser
        from vllm.utils.argparse_utils import FlexibleArgumentParser
        serve = make_arg_parser(FlexibleArgumentParser())
        bench = FlexibleArgumentParser()
        add_cli_args(bench)
    finally:
        platforms.current_platform = platform
    return serve, bench
