"""Shared test setup: the `gpu` marker skips without CUDA; hypothesis runs
the same examples on every machine (CI must pass every time), unless
HYPOTHESIS_PROFILE=explore asks for fresh random ones."""

import os

import pytest
import torch
from hypothesis import settings

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
