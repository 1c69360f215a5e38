"""vLLM general-plugin entry point (``vllm.general_plugins: sparsemm``).

vLLM calls :func:`register` in every process it starts (API server,
EngineCore, workers). It owns the CUSTOM backend slot, registers the KV-cache
spec and its manager, and applies the patches in ``patches.py``; none of them
changes anything unless the sparsemm backend is selected.
"""

from vllm.logger import init_logger

logger = init_logger("vllm.sparsemm.plugin")

_registered = False


def register() -> None:
    """Idempotent: safe to call more than once per process."""
    global _registered
    if _registered:
        return
    from vllm.v1.attention.backends.registry import (AttentionBackendEnum,
                                                     register_backend)
    from vllm.v1.kv_cache_interface import FullAttentionSpec
    from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

    from vllm_sparsemm.engine import patches
    from vllm_sparsemm.engine.kv_spec import SparseMMManager, SparseMMSpec

    register_backend(AttentionBackendEnum.CUSTOM, patches.BACKEND_PATH)
    # Registering first in a fresh process would skip vLLM's built-in specs.
    KVCacheSpecRegistry._ensure_registered()
    KVCacheSpecRegistry.register(SparseMMSpec, SparseMMManager,
                                 uniform_type_base_spec=FullAttentionSpec)
    patches.apply_all()
    _registered = True
    logger.debug("sparsemm plugin registered (backend CUSTOM -> %s)",
                 patches.BACKEND_PATH)
