"""The plugin entry point and the vLLM patches, on CPU: registered once, active
only when the sparsemm backend is chosen."""

import types
from importlib.metadata import entry_points

import pytest
from vllm.v1.attention.backends.registry import AttentionBackendEnum

from vllm_sparsemm import patches
from vllm_sparsemm.plugin import register


def _config(backend, groups=1):
    return types.SimpleNamespace(
        attention_config=types.SimpleNamespace(backend=backend),
        kv_transfer_config=None)


def test_entry_point_is_installed():
    names = {e.name: e.value for e in entry_points(group="vllm.general_plugins")}
    assert names.get("sparsemm") == "vllm_sparsemm.plugin:register"


def test_register_is_idempotent_and_owns_custom():
    register()
    first = AttentionBackendEnum.CUSTOM.get_path()
    register()
    assert first == AttentionBackendEnum.CUSTOM.get_path() == (
        "vllm_sparsemm.backend.SparseMMBackend")


def test_backend_name_alias():
    from vllm.config.attention import AttentionConfig
    register()
    check = AttentionConfig.validate_backend_before
    assert check("sparsemm") is AttentionBackendEnum.CUSTOM
    assert check("SparseMM") is AttentionBackendEnum.CUSTOM
    assert check("custom") is AttentionBackendEnum.CUSTOM
    assert check("flash_attn") is AttentionBackendEnum.FLASH_ATTN
    assert check("auto") is None
    with pytest.raises(ValueError, match="Unknown attention backend"):
        check("sparsem")


def test_patches_only_act_for_sparsemm():
    from vllm.v1.core import kv_cache_utils
    register()
    ours, theirs = (_config(AttentionBackendEnum.CUSTOM),
                    _config(AttentionBackendEnum.FLASH_ATTN))
    assert patches.is_sparsemm(ours) and not patches.is_sparsemm(theirs)
    group = [types.SimpleNamespace(kv_cache_spec=object())]
    assert kv_cache_utils._use_packed_kv_cache_config(ours, group)
    assert not kv_cache_utils._use_packed_kv_cache_config(theirs, group)


def test_v1_runner_is_chosen_for_sparsemm(monkeypatch):
    from vllm.config import VllmConfig
    register()
    monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER", raising=False)
    prop = VllmConfig.__dict__["use_v2_model_runner"]
    assert prop.fget(_config(AttentionBackendEnum.CUSTOM)) is False
    # an explicit user choice is left alone (the builder then explains)
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    assert prop.fget(_config(AttentionBackendEnum.CUSTOM)) is True


def test_unsupported_features_are_refused(monkeypatch):
    register()
    config = types.SimpleNamespace(
        attention_config=types.SimpleNamespace(
            backend=AttentionBackendEnum.CUSTOM),
        cache_config=types.SimpleNamespace(enable_prefix_caching=True,
                                           cache_dtype="fp8", block_size=16),
        speculative_config=object(), kv_transfer_config=None,
        parallel_config=types.SimpleNamespace(pipeline_parallel_size=2),
        model_config=None, additional_config={})
    with pytest.raises(ValueError, match="speculative decoding, pipeline "
                       "parallelism, --kv-cache-dtype fp8"):
        patches._prepare_engine_config(config)
    assert config.cache_config.enable_prefix_caching is False


def test_runner_hook_hands_the_builder_each_rows_request_and_progress(
        monkeypatch):
    """The metadata hook (GPU-only in the engine tests) reads vLLM's input
    batch: request id, prompt length, computed and scheduled tokens per row,
    then clears the stash whatever the builder does."""
    import numpy as np
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from vllm_sparsemm import worker_state
    register()
    seen = []
    monkeypatch.setattr(worker_state, "stash_step_rows",
                        lambda rows, full_graph=False: seen.append(
                            (rows, full_graph)))
    batch = types.SimpleNamespace(
        req_ids=["a", "b", "c"], num_prompt_tokens=np.array([90, 40, 7]),
        num_computed_tokens_cpu=np.array([90, 32, 0]))
    # the dispatch patch recorded the step's mode: FULL
    runner = types.SimpleNamespace(input_batch=batch,
                                   _sparsemm_step_full_graph=True)
    with pytest.raises(AttributeError):  # the real builder needs a real runner
        GPUModelRunner._build_attention_metadata(
            runner, 10, 2, 8, num_scheduled_tokens={"a": 1, "b": 8})
    rows, full_graph = seen[0]
    assert full_graph
    # the runner's arrays are copied: its next step's updates do not leak in
    batch.num_computed_tokens_cpu[0] = 91
    assert list(rows.computed) == [90, 32] and rows._rows is None
    assert list(rows) == [worker_state.RowInfo("a", 90, 90, 1),
                          worker_state.RowInfo("b", 40, 32, 8)]
    assert all(type(v) is int for row in rows
               for v in (row.prompt_len, row.computed, row.scheduled))
    assert seen[-1] == (None, False)  # cleared after the builder
