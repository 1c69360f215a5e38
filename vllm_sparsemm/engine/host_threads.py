"""One torch intra-op thread in the process that runs the GPU worker.

sparsemm's steps are host-bound: with compression a step carries several times
the rows of stock vLLM's, and the engine waits on the CPU, not the GPU. torch's default
of one intra-op thread per CPU then costs time: every CPU op over its grain
size (vLLM's input preparation, multimodal inputs) wakes the whole pool, whose
threads spin after each op and compete with the engine's thread. vLLM limits
the pool to one thread only in tensor-parallel workers
(``multiproc_executor.set_multiprocessing_worker_envs``); a single-GPU engine
keeps the default. sparsemm runs markedly faster with one thread, stock the
same either way (docs/benchmarks.md).
"""

from __future__ import annotations

import os

import torch
from vllm.logger import init_logger

logger = init_logger("vllm.sparsemm.host_threads")


def limit_host_threads(device: torch.device) -> None:
    """Use one torch thread unless the user chose a count (OMP_NUM_THREADS).

    Only for a CUDA worker in a process of vLLM's own (its engine-core or
    worker process): torch applies the count to the whole process, and an
    engine running in the user's process (VLLM_ENABLE_V1_MULTIPROCESSING=0)
    must leave the user's threads alone. A CPU engine (the tests) computes on
    those threads.
    """
    import vllm.envs as envs
    if (device.type != "cuda" or "OMP_NUM_THREADS" in os.environ
            or not envs.VLLM_ENABLE_V1_MULTIPROCESSING):
        return
    threads = torch.get_num_threads()
    if threads > 1:
        logger.info_once(
            "sparsemm: torch CPU threads reduced from %d to 1 in the engine "
            "process (host-bound steps; idle threads spinning slow them). "
            "Set OMP_NUM_THREADS to choose the count.", threads)
        torch.set_num_threads(1)
