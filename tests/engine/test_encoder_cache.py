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
