"""The dummy-weight 7B folders the benchmarks serve: vLLM resolves each one
as the real model (architecture, multimodal, text shape), and the plugin
finds its shipped scores or says, naming both routes, that it has none."""

import pytest
import torch

from vllm_sparsemm.core.scores import HeadScoreError
from vllm_sparsemm.engine.config import (ModelShape, SparseMMSettings,
                                         resolve_scores)
from vllm_sparsemm.engine.patches import _model_problems
from vllm_sparsemm.testing import checkpoints

# writer: (architecture, layers, query heads, KV heads, a shipped file?)
FOLDERS = {
    "write_dummy_llava_15_7b": ("LlavaForConditionalGeneration", 32, 32, 32,
                                False),
    "write_dummy_llava_next_7b": ("LlavaNextForConditionalGeneration", 32,
                                  32, 32, True),
    "write_dummy_llava_next_mistral_7b": (
        "LlavaNextForConditionalGeneration", 32, 32, 8, False),
    "write_dummy_qwen2_vl_7b": ("Qwen2VLForConditionalGeneration", 28, 28,
                                4, False),
    "write_dummy_qwen2_5_vl_7b": ("Qwen2_5_VLForConditionalGeneration", 28,
                                  28, 4, False),
    "write_dummy_qwen3_vl_8b": ("Qwen3VLForConditionalGeneration", 36, 32,
                                8, False),
    "write_dummy_llava_onevision_7b": (
        "LlavaOnevisionForConditionalGeneration", 28, 28, 4, False),
    "write_dummy_internvl3_8b": ("InternVLForConditionalGeneration", 28, 28,
                                 4, False),
}


@pytest.mark.parametrize("writer", sorted(FOLDERS))
def test_vllm_reads_each_folder_as_the_real_model(tmp_path, writer):
    from vllm.config import ModelConfig
    arch, layers, heads, kv_heads, shipped = FOLDERS[writer]
    folder = getattr(checkpoints, writer)(tmp_path / writer)
    model = ModelConfig(model=str(folder))
    assert model.architectures == [arch] and model.is_multimodal_model
    assert _model_problems(model) == []  # the plugin serves it
    text = model.hf_text_config
    assert (text.num_hidden_layers, text.num_attention_heads,
            text.num_key_value_heads) == (layers, heads, kv_heads)
    shape = ModelShape.from_hf_text_config(model.architectures, text)
    scores, source = resolve_scores(SparseMMSettings(head_scores="uniform"),
                                    shape)
    assert scores.shape == (layers, heads) and source.startswith("uniform")
    if shipped:
        scores, source = resolve_scores(SparseMMSettings(), shape)
        assert scores.shape == (layers, heads) and torch.isfinite(scores).all()
    else:
        with pytest.raises(HeadScoreError) as error:
            resolve_scores(SparseMMSettings(), shape)
        message = str(error.value)
        assert arch in message and "vllm-sparsemm chase" in message
        assert '"uniform"' in message


@pytest.mark.parametrize("family", ["llava-next-mistral", "qwen2.5-vl",
                                    "qwen3-vl", "llava-onevision",
                                    "internvl"])
def test_tiny_checkpoints_of_the_new_families_load_in_vllm_config(
        tmp_path, family):
    """The GPU tests' tiny checkpoints: vLLM resolves them (architecture,
    GQA text stack), and the saved tensors hold the text layers' attention."""
    from safetensors import safe_open
    from vllm.config import ModelConfig
    kwargs = dict(seed=1, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=64)
    if family.startswith("qwen"):
        version = family[4:-3]
        folder = checkpoints.save_tiny_qwen2_vl(tmp_path / family,
                                                version=version, **kwargs)
        arch, text_type = {
            "2.5": ("Qwen2_5_VLForConditionalGeneration", "qwen2_5_vl_text"),
            "3": ("Qwen3VLForConditionalGeneration", "qwen3_vl_text"),
        }[version]
    elif family == "llava-onevision":
        folder = checkpoints.save_tiny_llava_onevision(tmp_path / family,
                                                       **kwargs)
        arch, text_type = "LlavaOnevisionForConditionalGeneration", "qwen2"
    elif family == "internvl":
        folder = checkpoints.save_tiny_internvl(tmp_path / family, **kwargs)
        arch, text_type = "InternVLForConditionalGeneration", "qwen2"
    else:
        folder = checkpoints.save_tiny_llava_next(
            tmp_path / family, text_model="mistral", **kwargs)
        arch, text_type = "LlavaNextForConditionalGeneration", "mistral"
    model = ModelConfig(model=str(folder))
    assert model.architectures == [arch]
    assert model.hf_text_config.model_type == text_type
    assert model.hf_text_config.num_key_value_heads == 2
    with safe_open(folder / "model.safetensors", "pt") as f:
        assert any("layers.0.self_attn.k_proj" in key for key in f.keys())


@pytest.mark.parametrize("writer, tile, per_tile", [
    ("save_tiny_internvl", 112, 16), ("write_dummy_internvl3_8b", 448, 256)])
def test_vllm_processes_internvl_prompts_as_transformers(tmp_path, writer,
                                                         tile, per_tile):
    """vLLM serves InternVL's HF layout through its InternS1 processing,
    which reads the folder's processor and tokenizer (the image tokens by
    name): an image two tiles wide becomes ``<img>``, two tiles and a
    thumbnail of ``<IMG_CONTEXT>``, ``</img>``, the ids transformers'
    processor gives."""
    from PIL import Image
    from transformers import AutoProcessor
    from vllm.config import ModelConfig
    from vllm.multimodal import MULTIMODAL_REGISTRY
    folder = getattr(checkpoints, writer)(tmp_path / writer)
    image = Image.new("RGB", (2 * tile, tile), "white")
    prompt = ("<|im_start|>user\n<IMG_CONTEXT>\nwhat is it<|im_end|>\n"
              "<|im_start|>assistant\n")
    processor = MULTIMODAL_REGISTRY.create_processor(
        ModelConfig(model=str(folder)))
    got = processor(prompt, processor.info.parse_mm_data({"image": [image]}))
    want = AutoProcessor.from_pretrained(folder)(images=image, text=prompt)
    assert got["prompt_token_ids"] == want["input_ids"][0]
    hf = processor.info.get_hf_processor()
    ids = got["prompt_token_ids"]
    assert ids.count(hf.image_token_id) == 3 * per_tile
    start = ids.index(hf.image_token_id)
    assert ids[start - 1] == hf.start_image_token_id
    assert ids[start + 3 * per_tile] == hf.end_image_token_id
    (placeholder, ) = got["mm_placeholders"]["image"]
    assert placeholder.offset == start - 1
    assert placeholder.length == 3 * per_tile + 2


def test_qwen_template_places_videos_as_images():
    """The Qwen folders' chat template (vLLM's chat endpoint renders it):
    a video part becomes the video placeholder, as an image part the image
    one, each in its place."""
    import jinja2
    messages = [{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": "data:video/mp4;base64,"}},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,"}},
        {"type": "video"}, {"type": "text", "text": "Which?"}]}]
    text = jinja2.Template(checkpoints.QWEN_TEMPLATE).render(
        messages=messages, add_generation_prompt=True)
    assert text == (
        "<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>"
        "<|vision_start|><|image_pad|><|vision_end|>"
        "<|vision_start|><|video_pad|><|vision_end|>Which?<|im_end|>\n"
        "<|im_start|>assistant\n")
