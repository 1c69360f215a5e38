"""vLLM general-plugin entry point (``vllm.general_plugins: sparsemm``)."""

from vllm.logger import init_logger

logger = init_logger(__name__)

_registered = False


def register() -> None:
    """Called by vLLM in every process it starts; safe to call more than once."""
    global _registered
    if _registered:
        return
    _registered = True
    logger.debug("vllm-sparsemm plugin loaded")
