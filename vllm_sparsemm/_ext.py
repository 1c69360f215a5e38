"""Loads the optional CUDA extension ``vllm_sparsemm._C`` once, or reports why not."""

from __future__ import annotations

import functools
import logging

logger = logging.getLogger(__name__)


@functools.cache
def kernels():
    """The compiled extension module, or None (the PyTorch references are used)."""
    try:
        from vllm_sparsemm import _C
    except ImportError as e:
        logger.info("vllm_sparsemm CUDA kernels not available (%s); using the "
                    "PyTorch reference implementations", e)
        return None
    return _C
