"""Loads the optional CUDA extension ``vllm_sparsemm._C`` once, or reports why not."""

from __future__ import annotations

import functools

import torch
from vllm.logger import init_logger

logger = init_logger("vllm.sparsemm.kernels")

# CUDA's words when the extension holds no code this GPU can run (built for
# other architectures, without PTX to JIT): cudaErrorNoKernelImageForDevice,
# and cudaErrorInvalidDeviceFunction on older drivers
_NO_IMAGE = ("no kernel image", "invalid device function")
_no_image = False  # set once a kernel found no image: one GPU per process


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


def run_kernel(name: str, device: torch.device, *args) -> bool:
    """Run ``kernels().<name>(*args)``; False: the caller must run its reference.

    False when the extension is not built, or was built for other GPUs (then
    it warns once and never tries again), so a wheel built for sm_80/sm_90
    still serves on another GPU, only slower. Other errors propagate.
    """
    global _no_image
    module = kernels()
    if module is None or _no_image:
        return False
    try:
        getattr(module, name)(*args)
    except RuntimeError as e:
        if not any(words in str(e) for words in _NO_IMAGE):
            raise
        _no_image = True
        major, minor = torch.cuda.get_device_capability(device)
        logger.warning(
            "vllm_sparsemm CUDA kernels hold no code for this GPU (compute "
            "capability %d.%d): using the PyTorch reference implementations; "
            "rebuild with TORCH_CUDA_ARCH_LIST=\"%d.%d\" for the kernels",
            major, minor, major, minor)
        return False
    return True
