"""The plugin entry point and the vLLM patches, on CPU: registered once, active
only when the sparsemm backend is chosen."""

import dataclasses
import os
import types
from importlib.metadata import entry_points

import pytest
import torch
from vllm.v1.attention.backends.registry import AttentionBackendEnum

from vllm_sparsemm.engine import patches
from vllm_sparsemm.engine.plugin import register


def _config(backend, groups=1):
    return types.SimpleNamespace(
        attention_config=types.SimpleNamespace(backend=backend),
        kv_transfer_config=None)


def test_entry_point_is_installed():
    names = {e.name: e.value for e in entry_points(group="vllm.general_plugins")}
    assert names.get("sparsemm") == "vllm_sparsemm.engine.plugin:register"


def test_register_is_idempotent_and_owns_custom():
    register()
    first = AttentionBackendEnum.CUSTOM.get_path()
    register()
    assert first == AttentionBackendEnum.CUSTOM.get_path() == (
        "vllm_sparsemm.engine.backend.SparseMMBackend")


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
    # an explicit user choice is left alone, and refused before weights
    # load, saying what to change
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    assert prop.fget(_config(AttentionBackendEnum.CUSTOM)) is True
    assert patches.unsupported_features(_engine_config()) == [
        "vLLM's V2 model runner (unset VLLM_USE_V2_MODEL_RUNNER: the plugin "
        "selects the V1 runner itself)"]
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "0")
    assert patches.unsupported_features(_engine_config()) == []


def _engine_config(**parallel):
    return types.SimpleNamespace(
        attention_config=types.SimpleNamespace(
            backend=AttentionBackendEnum.CUSTOM),
        cache_config=types.SimpleNamespace(enable_prefix_caching=True,
                                           cache_dtype="auto", block_size=16),
        speculative_config=None, kv_transfer_config=None,
        parallel_config=types.SimpleNamespace(**{
            "pipeline_parallel_size": 1, "tensor_parallel_size": 1,
            "decode_context_parallel_size": 1,
            "prefill_context_parallel_size": 1, "use_ubatching": False,
            "_api_process_count": 1, "_api_process_rank": 0, **parallel}),
        model_config=None, additional_config={})


def test_unsupported_features_are_refused_with_what_to_change():
    register()
    config = _engine_config(pipeline_parallel_size=2)
    config.speculative_config = object()
    config.cache_config.cache_dtype = "fp8_e5m2"
    with pytest.raises(ValueError, match=r"speculative decoding \(drop "
                       r"--speculative-config\); pipeline parallelism \(use "
                       r"--pipeline-parallel-size 1\); --kv-cache-dtype "
                       r"fp8_e5m2 \(use auto or fp8\)"):
        patches._prepare_engine_config(config)


@pytest.mark.parametrize("dtype", ["fp8", "fp8_e4m3"])
def test_fp8_kv_cache_is_served_with_static_scales(dtype):
    """fp8 (e4m3) KV is served; scales computed on the fly are refused,
    saying what to change; other quantized dtypes name the ones served."""
    config = _engine_config()
    config.cache_config.cache_dtype = dtype
    assert patches.unsupported_features(config) == []
    config.cache_config.calculate_kv_scales = True
    assert patches.unsupported_features(config) == [
        "--calculate-kv-scales (fp8 scales must be static: take them from "
        "the checkpoint, or drop the flag)"]
    config.cache_config.calculate_kv_scales = False
    # FA3's fp8 attention writes bf16 only: an fp16 model would fail at its
    # first prompt, as stock vLLM's does
    config.model_config = types.SimpleNamespace(
        dtype=torch.float16, get_total_num_kv_heads=lambda: 4)
    assert patches.unsupported_features(config) == [
        "--kv-cache-dtype fp8 with a float16 model (FlashAttention 3 gives "
        "fp8 attention bf16 outputs only; add --dtype bfloat16)"]
    config.model_config.dtype = torch.bfloat16
    assert patches.unsupported_features(config) == []
    config.cache_config.kv_cache_dtype_skip_layers = ["0"]
    assert "--kv-cache-dtype-skip-layers" in patches.unsupported_features(
        config)[0]
    for other in ("fp8_e5m2", "fp8_inc", "nvfp4", "turboquant_k8v4"):
        config.cache_config.cache_dtype = other
        assert patches.unsupported_features(config) == [
            f"--kv-cache-dtype {other} (use auto or fp8)"]


def test_per_head_fp8_scales_are_refused_by_vllms_backend_check():
    """Checkpoints with a scale per KV head (compressed-tensors
    ``attn_head``) would break the kernels' one scale per layer: vLLM's own
    backend check refuses them before weights load, naming the reason."""
    from vllm.platforms.interface import DeviceCapability

    from vllm_sparsemm.engine.backend import SparseMMBackend
    reasons = SparseMMBackend.validate_configuration(
        head_size=128, dtype=torch.bfloat16, kv_cache_dtype="fp8",
        block_size=16, use_mla=False, has_sink=False, use_sparse=False,
        use_mm_prefix=False, use_per_head_quant_scales=True,
        device_capability=DeviceCapability(9, 0), attn_type="decoder")
    assert "per-head quant scales not supported" in reasons


@pytest.mark.parametrize("parallel, words", [
    ({"decode_context_parallel_size": 2}, "--decode-context-parallel-size 1"),
    ({"prefill_context_parallel_size": 2},
     "--prefill-context-parallel-size 1"),
    ({"use_ubatching": True}, "drop --enable-dbo"),
])
def test_parallel_layouts_the_plan_cannot_serve_are_refused(parallel, words):
    register()
    with pytest.raises(ValueError, match=words):
        patches._prepare_engine_config(_engine_config(**parallel))


def test_tensor_parallelism_that_would_replicate_kv_heads_is_refused():
    """Each rank must own whole KV heads (Hkv / tp): vLLM replicates heads
    when tp does not divide them, which the block law cannot express."""
    config = _engine_config(tensor_parallel_size=8)
    config.model_config = types.SimpleNamespace(
        get_total_num_kv_heads=lambda: 4)
    assert "tensor parallelism 8 over 4 KV heads" in " ".join(
        patches.unsupported_features(config))
    config.parallel_config.tensor_parallel_size = 2
    assert patches.unsupported_features(config) == []


def test_prefix_caching_is_left_as_the_user_set_it():
    register()
    config = _engine_config()
    patches._prepare_engine_config(config)
    assert config.cache_config.enable_prefix_caching is True


def _builder():
    """A sparsemm builder that records what the runner hook hands it."""
    from vllm_sparsemm.engine.backend import SparseMMMetadataBuilder
    builder = object.__new__(SparseMMMetadataBuilder)
    builder.handed = []
    builder.hand_step = lambda rows, full_graph: builder.handed.append(
        (rows, full_graph))
    return builder


def test_runner_hook_hands_the_builder_each_rows_request_and_progress(
        monkeypatch):
    """The metadata hook (GPU-only in the engine tests) reads vLLM's input
    batch: request id, prompt length, computed and scheduled tokens per row,
    and hands them to the engine's sparsemm builder."""
    import numpy as np
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from vllm_sparsemm.engine import step_rows as worker_state
    register()
    builder = _builder()
    batch = types.SimpleNamespace(
        req_ids=["a", "b", "c"], num_prompt_tokens=np.array([90, 40, 7]),
        num_computed_tokens_cpu=np.array([90, 32, 0]))
    # the dispatch patch recorded the step's mode: FULL
    runner = types.SimpleNamespace(
        input_batch=batch, _sparsemm_step_full_graph=True,
        attn_groups=[[types.SimpleNamespace(metadata_builders=[builder])]])
    with pytest.raises(AttributeError):  # the real builder needs a real runner
        GPUModelRunner._build_attention_metadata(
            runner, 10, 2, 8, num_scheduled_tokens={"a": 1, "b": 8})
    (rows, full_graph), = builder.handed
    assert full_graph
    # the runner's arrays are copied: its next step's updates do not leak in
    batch.num_computed_tokens_cpu[0] = 91
    assert list(rows.computed) == [90, 32] and rows._rows is None
    assert list(rows) == [worker_state.RowInfo("a", 90, 90, 1),
                          worker_state.RowInfo("b", 40, 32, 8)]
    assert all(type(v) is int for row in rows
               for v in (row.prompt_len, row.computed, row.scheduled))


def test_runner_hooks_leave_engines_of_other_backends_alone():
    """Installed, the plugin builds no rows for an engine whose builders are
    not sparsemm's: the original method runs on its own."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    register()
    other = types.SimpleNamespace(metadata_builders=[object()])
    runner = types.SimpleNamespace(attn_groups=[[other]])  # no input_batch
    with pytest.raises(AttributeError) as error:
        GPUModelRunner._build_attention_metadata(
            runner, 10, 2, 8, num_scheduled_tokens={"a": 1, "b": 8})
    assert "input_batch" not in str(error.value)  # the hook never read it
    assert patches.sparsemm_builders(runner) == []


def test_the_hook_reaches_the_builders_vllm_rebuilt():
    """vLLM profiles CUDA-graph memory with a throwaway KV cache and set of
    builders, clears them and builds the serving ones: rows must reach the
    live builder, never one kept from the first set."""
    import numpy as np
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    register()
    batch = types.SimpleNamespace(req_ids=["a"],
                                  num_prompt_tokens=np.array([90]),
                                  num_computed_tokens_cpu=np.array([0]))
    profiling, serving = _builder(), _builder()
    runner = types.SimpleNamespace(
        input_batch=batch, attn_groups=[[types.SimpleNamespace(
            metadata_builders=[profiling])]])

    def step():
        with pytest.raises(AttributeError):  # past the hook: a real runner
            GPUModelRunner._build_attention_metadata(
                runner, 4, 1, 4, num_scheduled_tokens={"a": 4})

    step()
    runner.attn_groups.clear()  # vLLM's _cleanup_profiling_kv_cache
    runner.attn_groups.append([types.SimpleNamespace(
        metadata_builders=[serving])])
    step()
    assert len(profiling.handed) == 1 and len(serving.handed) == 1
    assert list(serving.handed[0][0].req_ids) == ["a"]


def _settings_lines(monkeypatch, budget, **parallel):
    """The start-up settings lines that preparing a tiny LLaVA config with
    ``budget`` logs (twice over: the line is logged once per process)."""
    import logging

    from vllm_sparsemm.engine import metrics
    register()
    monkeypatch.setattr(metrics, "setup", lambda name: None)
    # the config sets the process's request window; give it back after
    monkeypatch.setattr(patches, "_request_window", patches._request_window)
    config = _engine_config(**parallel)
    config.additional_config = {"sparsemm": {"budget": budget,
                                             "head_scores": "uniform"}}
    text = types.SimpleNamespace(num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, hidden_size=64,
                                 vocab_size=128)
    config.model_config = types.SimpleNamespace(
        hf_config=types.SimpleNamespace(
            architectures=["LlavaForConditionalGeneration"]),
        hf_text_config=text, served_model_name="tiny",
        get_total_num_kv_heads=lambda: 2)
    lines = []

    class Collect(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    handler = Collect(level=logging.INFO)
    patches.logger.addHandler(handler)
    try:
        patches._prepare_engine_config(config)
        patches._prepare_engine_config(config)
    finally:
        patches.logger.removeHandler(handler)
    return [line for line in lines if line.startswith("sparsemm: budget=")]


def test_start_up_logs_every_effective_setting_once(monkeypatch):
    """One vLLM-style line names each setting with the value in force, the
    engine's block size and prefix caching, and where the scores came from."""
    from vllm_sparsemm.engine.config import SparseMMSettings
    started = _settings_lines(monkeypatch, 208)
    assert len(started) == 1, started
    for name in (f.name for f in dataclasses.fields(SparseMMSettings)
                 if f.name != "head_scores"):
        assert f" {name}=" in f" {started[0]}", name
    assert "budget=208 " in started[0]
    assert "block_size=16" in started[0] and "prefix_caching=on" in started[0]
    assert "head_scores=uniform" in started[0]


@pytest.mark.parametrize("rank, logged", [(-1, 1), (0, 0), (3, 0)])
def test_scaled_out_api_servers_leave_the_settings_to_the_launcher(
        monkeypatch, rank, logged):
    """Under ``--api-server-count 4`` the launcher and the engine (API
    rank -1) log the settings; the four API servers do not repeat them."""
    started = _settings_lines(monkeypatch, 216 + rank, _api_process_count=4,
                              _api_process_rank=rank)
    assert len(started) == logged, started


@pytest.mark.parametrize("flag, words", [
    ("is_hybrid", "state-space layers beside attention"),
    ("use_mla", "multi-head latent attention"),
    ("is_encoder_decoder", "cross-attention (encoder-decoder)"),
    ("is_attention_free", "no attention layers")])
def test_models_without_full_attention_everywhere_are_refused_by_name(
        flag, words):
    """Before weights load: the model named by its architecture, what it
    has, and what to do instead."""
    config = _engine_config()
    config.model_config = types.SimpleNamespace(
        hf_config=types.SimpleNamespace(architectures=["SomeModelForCausalLM"]),
        **{flag: True})
    problems = patches.unsupported_features(config)
    assert problems == [
        f"SomeModelForCausalLM, whose layers have {words} (sparsemm serves "
        f"models whose every decoder layer is full attention; choose another "
        f"--attention-backend)"]


def test_a_layer_that_is_not_full_attention_is_refused_naming_the_model():
    """A sliding-window layer (its spec, as vLLM's Attention reports it)
    stops start-up with the model's name and the layer's."""
    from vllm.v1.kv_cache_interface import SlidingWindowSpec
    spec = SlidingWindowSpec(block_size=16, num_kv_heads=2, head_size=8,
                             dtype=torch.float16, sliding_window=64)
    config = types.SimpleNamespace(model_config=types.SimpleNamespace(
        hf_config=types.SimpleNamespace(architectures=["Gemma3ForCausalLM"])))
    with pytest.raises(ValueError, match=r"cannot serve Gemma3ForCausalLM: "
                       r"its layer model.layers.3.self_attn.attn is "
                       r"SlidingWindowSpec, not full attention"):
        patches.sparsemm_spec(spec, config, "model.layers.3.self_attn.attn")


def test_vllm_knows_the_sparsemm_environment_variables(monkeypatch):
    """vLLM checks every ``VLLM_*`` variable against its own table (a warning
    per process, or a refusal to start under --fail-on-environ-validation):
    sparsemm's pass, a misspelt one still does not, and none of them enters
    torch.compile's cache key."""
    from vllm import envs

    from vllm_sparsemm.engine import metrics
    register()
    for name in os.environ:  # whatever this machine sets that vLLM lacks
        if name.startswith("VLLM_") and name not in envs.environment_variables:
            monkeypatch.delenv(name)
    monkeypatch.setenv("VLLM_SPARSEMM_BUDGET", "64")
    monkeypatch.setenv(metrics.ENV, "/tmp/sparsemm-metrics-1234")
    envs.validate_environ(hard_fail=True)
    assert not any(name.startswith("VLLM_SPARSEMM_")
                   for name in envs.compile_factors())
    monkeypatch.setenv("VLLM_SPARSEMM_BUGDET", "64")
    with pytest.raises(ValueError, match="VLLM_SPARSEMM_BUGDET"):
        envs.validate_environ(hard_fail=True)


def test_the_config_carries_the_graph_contract_into_its_hash():
    """vLLM keys its compile caches by the config's hash, not by this
    plugin's code: the marker keeps a graph compiled by a version that wrote
    K/V inside the attention op from being loaded by one that does not."""
    import json

    from vllm.config import DeviceConfig, VllmConfig
    from vllm_sparsemm.engine.backend import SparseMMBackend
    register()
    config = _engine_config()
    config.additional_config = {"sparsemm": {"budget": 64}}
    patches._prepare_engine_config(config)
    assert config.additional_config == {"sparsemm": {"budget": 64},
                                        **patches.GRAPH_CONTRACT}
    assert not SparseMMBackend.forward_includes_kv_cache_update
    # the additional config is one of the hash's factors, as a sorted dump
    plain, marked = (VllmConfig(device_config=DeviceConfig(device="cpu"),
                                additional_config=extra).compute_hash()
                     for extra in ({"sparsemm": {"budget": 64}},
                                   json.loads(json.dumps(
                                       config.additional_config))))
    assert plain != marked
