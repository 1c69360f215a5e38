"""Vision-encoder outputs kept in CPU memory, so that a prefix-cache hit does
not run the encoder again for its observation window.

A hit that recomputes some of an image's tokens needs the image's encoder
output: from vLLM's GPU encoder cache if the image was encoded lately (it holds
``max_num_batched_tokens`` worth of items), else by running the encoder again.
A compressed prompt's last ``window`` tokens are always computed in the
request itself (their queries choose what each head keeps), so with a short
question after an image even a repeated prompt recomputes image tokens, where
stock vLLM's hit, one token short of the prompt, would not. (A question that
differs right after the image makes both recompute them.) vLLM's
``ECCPUConnector`` in the ``ec_both`` role saves every encoder output to a
shared-memory region and loads it back instead of recomputing it;
``encoder_cpu_cache_gib`` installs it for a sparsemm engine.
"""

from __future__ import annotations

import os

SHARED_MEMORY = "/dev/shm"  # where the connector's region lives
CONNECTOR = "ECCPUConnector"


def configure(vllm_config, gib: float) -> str:
    """Install the connector with ``gib`` GiB when it can help (a multimodal
    model, prefix caching on, no EC connector of the user's), and say what
    was done for the start-up log."""
    if gib <= 0:
        return "off"
    model = vllm_config.model_config
    if model is None or not model.is_multimodal_model:
        return "off (text-only model)"
    if not vllm_config.cache_config.enable_prefix_caching:
        return "off (prefix caching is off)"
    size = int(gib * (1 << 30))
    current = vllm_config.ec_transfer_config
    if current is not None:
        if _is_ours(current, size):
            return f"{gib:g} GiB"
        return "off (--ec-transfer-config is set)"
    free = shared_memory_free()
    if size > free:
        raise ValueError(
            f"sparsemm encoder_cpu_cache_gib={gib:g} needs {gib:g} GiB of "
            f"{SHARED_MEMORY}, which has {free / (1 << 30):.1f} GiB free; "
            f"lower the setting, or give the container more shared memory "
            f"(docker run --shm-size, or --ipc=host)")
    from vllm.config import ECTransferConfig
    vllm_config.ec_transfer_config = ECTransferConfig(
        ec_connector=CONNECTOR, ec_role="ec_both",
        ec_connector_extra_config={"ec_cpu_bytes": size})
    return f"{gib:g} GiB"


def shared_memory_free() -> int:
    """Bytes free in the shared-memory filesystem (0 if there is none)."""
    try:
        stats = os.statvfs(SHARED_MEMORY)
    except OSError:
        return 0
    return stats.f_bavail * stats.f_frsize


def _is_ours(config, size: int) -> bool:
    """Whether ``config`` is the connector this module installed (vLLM runs
    its config checks again on copies of the config)."""
    return (config.ec_connector == CONNECTOR and config.ec_role == "ec_both"
            and config.ec_connector_extra_config == {"ec_cpu_bytes": size})
