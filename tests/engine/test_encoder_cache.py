"""encoder_cpu_cache_gib: vLLM's ECCPUConnector (ec_both) installed on the
engine config, on vLLM's own ``VllmConfig`` where it matters, so a prefix hit
whose observation window lies inside an image reloads the image's encoder
output instead of running the encoder again."""

import types

import pytest

from vllm_sparsemm.engine import encoder_cache
from vllm_sparsemm.engine.config import SparseMMSettings
from vllm_sparsemm.engine.plugin import register

GIB = 1 << 30


@pytest.fixture(scope="module")
def llava_folder(tmp_path_factory):
    from vllm_sparsemm.testing.checkpoints import write_dummy_llava_15_7b
    return write_dummy_llava_15_7b(tmp_path_factory.mktemp("llava"))


def _vllm_config(folder, settings, prefix_caching=True, **kwargs):
    from vllm.config import (AttentionConfig, CacheConfig, DeviceConfig,
                             ModelConfig, VllmConfig)
    from vllm.v1.attention.backends.registry import AttentionBackendEnum
    register()  # CUSTOM is sparsemm's: what --attention-backend sparsemm sets
    return VllmConfig(
        model_config=ModelConfig(model=str(folder), skip_tokenizer_init=True,
                                 max_model_len=2048),
        cache_config=CacheConfig(enable_prefix_caching=prefix_caching),
        device_config=DeviceConfig(device="cpu"),
        attention_config=AttentionConfig(backend=AttentionBackendEnum.CUSTOM),
        additional_config={"sparsemm": {"head_scores": "uniform",
                                        **settings}}, **kwargs)


def test_the_connector_is_installed_on_vllms_config(llava_folder, monkeypatch):
    monkeypatch.setattr(encoder_cache, "shared_memory_free", lambda: 8 * GIB)
    config = _vllm_config(llava_folder, {"encoder_cpu_cache_gib": 0.5})
    ec = config.ec_transfer_config
    assert ec.ec_connector == "ECCPUConnector" and ec.ec_role == "ec_both"
    assert ec.is_ec_producer and ec.is_ec_consumer
    assert ec.ec_connector_extra_config == {"ec_cpu_bytes": GIB // 2}
    # vLLM's checks running again on the same config keep it, and say so
    settings = SparseMMSettings(encoder_cpu_cache_gib=0.5)
    assert encoder_cache.configure(
        config, settings.encoder_cpu_cache_gib) == "0.5 GiB"
    assert config.ec_transfer_config is ec


def test_off_by_default_and_where_it_cannot_help(llava_folder, monkeypatch):
    monkeypatch.setattr(encoder_cache, "shared_memory_free", lambda: 8 * GIB)
    assert _vllm_config(llava_folder, {}).ec_transfer_config is None
    config = _vllm_config(llava_folder, {"encoder_cpu_cache_gib": 1},
                          prefix_caching=False)
    assert config.ec_transfer_config is None  # no hits: nothing to reuse
    text_only = types.SimpleNamespace(
        model_config=types.SimpleNamespace(is_multimodal_model=False),
        cache_config=types.SimpleNamespace(enable_prefix_caching=True),
        ec_transfer_config=None)
    assert encoder_cache.configure(text_only, 1) == "off (text-only model)"
    assert text_only.ec_transfer_config is None


def test_a_users_own_connector_is_left_alone(llava_folder, monkeypatch):
    from vllm.config import ECTransferConfig
    monkeypatch.setattr(encoder_cache, "shared_memory_free", lambda: 8 * GIB)
    mine = ECTransferConfig(ec_connector="ECExampleConnector",
                            ec_role="ec_consumer")
    config = _vllm_config(llava_folder, {"encoder_cpu_cache_gib": 1},
                          ec_transfer_config=mine)
    assert config.ec_transfer_config is mine
    assert encoder_cache.configure(config, 1) == (
        "off (--ec-transfer-config is set)")


def test_too_little_shared_memory_stops_start_up_saying_what_to_do(
        llava_folder, monkeypatch):
    monkeypatch.setattr(encoder_cache, "shared_memory_free",
                        lambda: GIB // 4)
    with pytest.raises(ValueError, match=r"encoder_cpu_cache_gib=2 needs 2 "
                       r"GiB of /dev/shm, which has 0\.2 GiB free; lower the "
                       r"setting, or give the container more shared memory"):
        _vllm_config(llava_folder, {"encoder_cpu_cache_gib": 2})


@pytest.mark.parametrize("value", [-1, "lots", float("nan"), True])
def test_bad_sizes_are_refused_naming_the_setting(value):
    with pytest.raises(ValueError, match="encoder_cpu_cache_gib"):
        SparseMMSettings.from_sources(
            {"sparsemm": {"encoder_cpu_cache_gib": value}})


def _scheduler(folder, backend, gib=0.0):
    """vLLM's scheduler for the dummy LLaVA-1.5 folder: stock's manager, or
    sparsemm's with ``encoder_cpu_cache_gib`` (an encoder cache of one
    image: ``max_num_batched_tokens`` 1,024 over 576-token images)."""
    import torch
    from vllm.config import (AttentionConfig, CacheConfig, DeviceConfig,
                             ModelConfig, SchedulerConfig, VllmConfig)
    from vllm.v1.attention.backends.registry import AttentionBackendEnum
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.kv_cache_interface import (FullAttentionSpec, KVCacheConfig,
                                            KVCacheGroupSpec)
    from vllm.v1.structured_output import StructuredOutputManager

    from vllm_sparsemm.engine.patches import sparsemm_spec
    register()
    sparsemm = backend == "sparsemm"
    config = VllmConfig(
        model_config=ModelConfig(model=str(folder), max_model_len=2048,
                                 seed=0),
        cache_config=CacheConfig(block_size=16, enable_prefix_caching=True),
        device_config=DeviceConfig(device="cpu"),
        scheduler_config=SchedulerConfig(
            max_num_seqs=64, max_num_batched_tokens=1024, max_model_len=2048,
            is_encoder_decoder=False),
        attention_config=AttentionConfig(
            backend=AttentionBackendEnum.CUSTOM if sparsemm else None),
        additional_config={"sparsemm": {
            "head_scores": "uniform", "budget": 128,
            "encoder_cpu_cache_gib": gib}})
    config.cache_config.num_gpu_blocks = 2000
    layers = [f"language_model.model.layers.{i}.self_attn.attn"
              for i in range(32)]
    spec = FullAttentionSpec(block_size=16, num_kv_heads=32, head_size=128,
                             dtype=torch.float16)
    if sparsemm:
        spec = sparsemm_spec(spec, config, layers[0])
    kv = KVCacheConfig(num_blocks=2000, kv_cache_tensors=[],
                       kv_cache_groups=[KVCacheGroupSpec(layers, spec)])
    return Scheduler(config, kv, StructuredOutputManager(config),
                     block_size=16)


def _ask(scheduler, rid: str, image: int, question: str):
    """One chat request about ``image`` (576 tokens), run to its end: the
    tokens its first step computes, and the encoder inputs scheduled."""
    from vllm.multimodal.inputs import MultiModalFeatureSpec, PlaceholderRange
    from vllm.sampling_params import SamplingParams
    from vllm.v1.outputs import ModelRunnerOutput
    from vllm.v1.request import Request

    from scripts import load_script
    text = [ord(c) for c in f"\n{question} ASSISTANT:"]
    tokens = [1] + [ord(c) for c in "USER: "] + [32000] * 576 + text
    feature = MultiModalFeatureSpec(
        data=None, modality="image", identifier=f"image{image}",
        mm_position=PlaceholderRange(offset=7, length=576),
        mm_hash=f"image{image}")
    scheduler.add_request(Request(
        rid, tokens, SamplingParams(max_tokens=4, ignore_eos=True), None,
        block_hasher=load_script("scheduler_sim").block_hasher(16),
        mm_features=[feature]))
    first, encoded = None, 0
    while scheduler.get_num_unfinished_requests():
        out = scheduler.schedule()
        first = first or out.num_scheduled_tokens.get(rid)
        encoded += sum(map(len, out.scheduled_encoder_inputs.values()))
        ids = list(out.num_scheduled_tokens)
        done = [scheduler.requests[r].num_computed_tokens >=
                scheduler.requests[r].num_tokens for r in ids]
        scheduler.update_from_output(out, ModelRunnerOutput(
            req_ids=ids, req_id_to_index={r: i for i, r in enumerate(ids)},
            sampled_token_ids=[[7] if d else [] for d in done]))
    return first, encoded


# 599-token prompts, the image at [7, 583), blocks of 16. A repeated
# question: stock's hit stops one token short of the prompt (592 tokens
# hit, 7 computed, no image token among them); sparsemm's at the block at or
# before 599 - 32 (560), so its window reaches into the image. A question of
# its own, differing from position 585: both hits stop at 576, and both
# recompute image tokens.
@pytest.mark.parametrize("repeat, backend, gib, computed, encoded", [
    (True, "stock", 0, 7, 3),
    (True, "sparsemm", 0, 39, 6),
    (True, "sparsemm", 0.02, 39, 3),
    (False, "stock", 0, 23, 6),
    (False, "sparsemm", 0, 39, 6),
    (False, "sparsemm", 0.02, 39, 3),
])
def test_hits_that_recompute_image_tokens_load_instead_of_encoding(
        llava_folder, repeat, backend, gib, computed, encoded):
    """On vLLM's scheduler, three images asked about in turn, twice, by a
    short question: the second round hits the prefix cache. vLLM's GPU
    encoder cache holds one image, so a hit that recomputes image tokens
    runs the encoder again, unless the connector holds the output."""
    if encoder_cache.shared_memory_free() < GIB // 10:
        pytest.skip("no /dev/shm to hold the connector's region")
    scheduler = _scheduler(llava_folder, backend, gib)
    try:
        asked = [_ask(scheduler, f"{n}-{image}", image,
                      "Q00?" if repeat else f"Q{n}{image}?")
                 for n in range(2) for image in range(3)]
    finally:
        if scheduler.ec_connector is not None:
            scheduler.ec_connector.shutdown()  # its /dev/shm file
    assert [first for first, _ in asked[:3]] == [599] * 3  # no hit yet
    assert [first for first, _ in asked[3:]] == [computed] * 3
    assert sum(runs for _, runs in asked) == encoded
