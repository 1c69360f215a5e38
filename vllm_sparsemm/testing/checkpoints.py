"""Model folders vLLM can load, written locally: tiny random checkpoints and 7B configs.

Nothing is downloaded. The tokenizer is a character-level one whose special
tokens sit at the ids the model config expects; the processors and chat
templates are the real transformers classes, so vLLM's multimodal processing
(placeholder expansion, image preprocessing) runs as it would for the real
models.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

LLAVA_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}USER: "
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for c in m['content'] %}{% if c['type'] in ['image', 'image_url'] %}"
    "<image>\n{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %} {% else %}ASSISTANT: "
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}"
    "{% endif %}{% endfor %}{% endif %}</s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}")

QWEN_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for c in m['content'] %}{% if c['type'] in ['image', 'image_url'] %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] in ['video', 'video_url'] %}"
    "<|vision_start|><|video_pad|><|vision_end|>{% elif c['type'] == 'text' %}"
    "{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% endif %}")


def char_tokenizer(vocab_size: int, specials: dict[str, int], bos: str,
                   eos: str, unk: str, pad: str | None = None,
                   named: dict[str, str] | None = None):
    """A character-level fast tokenizer with ``specials`` at fixed ids;
    ``named`` gives some of them attribute names (``tokenizer.video_token``,
    ``tokenizer.video_token_id``), which are saved and loaded with it."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = dict(specials)
    used = set(vocab.values())
    next_id = 0
    for char in string.printable[:95] + "\n":
        while next_id in used:
            next_id += 1
        vocab[char] = next_id
        used.add(next_id)
    for i in range(vocab_size):
        if i not in used:
            vocab[f"<extra_{i}>"] = i
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=unk,
                                   bos_token=bos, eos_token=eos,
                                   pad_token=pad or unk, **(named or {}))
    fast.add_special_tokens({"additional_special_tokens": [
        s for s in specials if s not in (bos, eos, unk, pad)]})
    return fast


def llava_processor(image_size: int, vocab_size: int, image_token_id: int):
    from transformers import CLIPImageProcessor, LlavaProcessor
    tokenizer = char_tokenizer(
        vocab_size, {"<unk>": 0, "<s>": 1, "</s>": 2, "<image>": image_token_id},
        bos="<s>", eos="</s>", unk="<unk>")
    images = CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size})
    return LlavaProcessor(image_processor=images, tokenizer=tokenizer,
                          patch_size=14, vision_feature_select_strategy="default",
                          chat_template=LLAVA_TEMPLATE, image_token="<image>",
                          num_additional_image_tokens=1)


def llava_next_processor(image_size: int, vocab_size: int,
                         image_token_id: int):
    from transformers import LlavaNextImageProcessor, LlavaNextProcessor

    from vllm_sparsemm.testing.tiny import NEXT_PINPOINTS
    tokenizer = char_tokenizer(
        vocab_size, {"<unk>": 0, "<s>": 1, "</s>": 2, "<image>": image_token_id},
        bos="<s>", eos="</s>", unk="<unk>")
    images = LlavaNextImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_grid_pinpoints=NEXT_PINPOINTS(image_size))
    return LlavaNextProcessor(image_processor=images, tokenizer=tokenizer,
                              patch_size=14,
                              vision_feature_select_strategy="default",
                              chat_template=LLAVA_TEMPLATE, image_token="<image>",
                              num_additional_image_tokens=1)


ONEVISION_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for c in m['content'] %}{% if c['type'] in ['image', 'image_url'] %}"
    "<image>\n{% elif c['type'] in ['video', 'video_url'] %}<video>\n"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def llava_onevision_processor(image_size: int, vocab_size: int,
                              image_token_id: int, video_token_id: int,
                              pinpoints=None):
    from transformers import (LlavaOnevisionImageProcessor,
                              LlavaOnevisionProcessor,
                              LlavaOnevisionVideoProcessor)

    from vllm_sparsemm.testing.tiny import NEXT_PINPOINTS
    tokenizer = _chatml_tokenizer(
        vocab_size, {"<image>": image_token_id, "<video>": video_token_id})
    size = {"height": image_size, "width": image_size}
    images = LlavaOnevisionImageProcessor(
        size=size, image_grid_pinpoints=pinpoints or NEXT_PINPOINTS(image_size))
    return LlavaOnevisionProcessor(
        image_processor=images, tokenizer=tokenizer,
        video_processor=LlavaOnevisionVideoProcessor(size=size),
        num_image_tokens=(image_size // 14) ** 2,
        vision_feature_select_strategy="full",
        chat_template=ONEVISION_TEMPLATE, image_token="<image>",
        video_token="<video>")


def qwen2_vl_processor(vocab_size: int, ids: dict[str, int],
                       max_pixels: int = 64 * 28 * 28, version: str = "2"):
    """Qwen2-VL's, Qwen2.5-VL's or (``version="3"``) Qwen3-VL's processor,
    whose patches are 16 px instead of 14 (``max_pixels`` is in 28 px
    tokens either way)."""
    from transformers import (Qwen2_5_VLProcessor, Qwen2VLImageProcessor,
                              Qwen2VLProcessor, Qwen2VLVideoProcessor,
                              Qwen3VLProcessor, Qwen3VLVideoProcessor)
    if version == "3":
        token = 32
        images = Qwen2VLImageProcessor(
            patch_size=16, merge_size=2, image_mean=[0.5] * 3,
            image_std=[0.5] * 3, min_pixels=4 * token * token,
            max_pixels=max_pixels // (28 * 28) * token * token)
        videos = Qwen3VLVideoProcessor(patch_size=16, merge_size=2)
        return Qwen3VLProcessor(image_processor=images,
                                tokenizer=_qwen_tokenizer(vocab_size, ids),
                                video_processor=videos,
                                chat_template=QWEN_TEMPLATE)
    images = Qwen2VLImageProcessor(min_pixels=4 * 28 * 28,
                                   max_pixels=max_pixels)
    videos = Qwen2VLVideoProcessor(min_pixels=4 * 28 * 28,
                                   max_pixels=max_pixels)
    cls = Qwen2_5_VLProcessor if version == "2.5" else Qwen2VLProcessor
    return cls(image_processor=images,
               tokenizer=_qwen_tokenizer(vocab_size, ids),
               video_processor=videos, chat_template=QWEN_TEMPLATE)


def _qwen_tokenizer(vocab_size: int, ids: dict[str, int]):
    return _chatml_tokenizer(vocab_size, {
        "<|image_pad|>": ids["image"], "<|video_pad|>": ids["video"],
        "<|vision_start|>": ids["vision_start"],
        "<|vision_end|>": ids["vision_end"]})


def _chatml_tokenizer(vocab_size: int, media: dict[str, int], named=None):
    """The char tokenizer of the Qwen-based models: ChatML's turn markers at
    ids 0-2, and ``media`` tokens at theirs."""
    return char_tokenizer(
        vocab_size, {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2,
                     **media},
        bos="<|im_start|>", eos="<|im_end|>", unk="<|endoftext|>",
        named=named)


INTERNVL_TEMPLATE = ONEVISION_TEMPLATE.replace("<image>\n", "<IMG_CONTEXT>\n")
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def internvl_processor(image_size: int, vocab_size: int, ids: dict[str, int],
                       max_patches: int = 12):
    """InternVL's processor: GotOcr2 tiles of ``image_size`` px (up to
    ``max_patches``, and a thumbnail when there are several) of
    ``(image_size / 28) ** 2`` tokens each. InternVLProcessor and vLLM's
    InternS1 processing read the image tokens by name off the tokenizer, and
    vLLM's needs ``<video>`` to be one token even for image prompts."""
    from transformers import (GotOcr2ImageProcessor, InternVLProcessor,
                              InternVLVideoProcessor)
    tokens = {"<IMG_CONTEXT>": ids["image"], "<video>": ids["video"],
              "<img>": ids["start"], "</img>": ids["end"]}
    tokenizer = _chatml_tokenizer(
        vocab_size, tokens, named={
            "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>",
            "start_image_token": "<img>", "end_image_token": "</img>"})
    size = {"height": image_size, "width": image_size}
    images = GotOcr2ImageProcessor(
        size=size, crop_to_patches=True, min_patches=1,
        max_patches=max_patches, image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD)
    return InternVLProcessor(
        image_processor=images, tokenizer=tokenizer,
        video_processor=InternVLVideoProcessor(
            size=size, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD),
        image_seq_length=(image_size // 28) ** 2,
        chat_template=INTERNVL_TEMPLATE)


def internvl_processor_of(config):
    """The processor of a tiny InternVL config: its tile size, and the tiny
    models' ids of ``<video>``, ``<img>`` and ``</img>``."""
    from vllm_sparsemm.testing import tiny
    return internvl_processor(
        config.vision_config.image_size[0], config.text_config.vocab_size,
        {"image": config.image_token_id, "video": tiny.INTERNVL_VIDEO_TOKEN,
         "start": tiny.INTERNVL_IMAGE_START, "end": tiny.INTERNVL_IMAGE_END})


def llava_onevision_inputs(model, seed: int = 0) -> dict:
    """A prompt ``text, <image>, text`` with a random 150x200 image, through
    the model's processor (any-res tiles, image sizes)."""
    return _processed(model, onevision_processor_of(model.config), (150, 200),
                      "<|im_start|>user <image>\nabc def<|im_end|>"
                      "<|im_start|>assistant\n", seed)


def internvl_inputs(model, seed: int = 0) -> dict:
    """A prompt ``text, <image>, text`` with a random image two tiles wide
    through the model's processor: two tiles and a thumbnail."""
    tile = model.config.vision_config.image_size[0]
    return _processed(model, internvl_processor_of(model.config),
                      (tile, 2 * tile), "<|im_start|>user <IMG_CONTEXT>\n"
                      "abc def<|im_end|><|im_start|>assistant\n", seed)


def _processed(model, processor, image_hw: tuple[int, int], prompt: str,
               seed: int) -> dict:
    """The oracle's inputs: ``prompt`` with a random ``image_hw`` image
    through ``processor``, pixels in the model's dtype."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(seed)
    image = Image.fromarray((rng.random(image_hw + (3, )) * 255).astype(
        np.uint8))
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    return dict(inputs)


def save_tiny_llava(path, seed: int = 0, **model_kwargs) -> Path:
    """A tiny random LLaVA-1.5-shaped checkpoint that vLLM 0.26.0 loads."""
    from vllm_sparsemm.testing.tiny import tiny_llava
    model = tiny_llava(seed=seed, **model_kwargs)
    return _save_llava_like(path, model,
                            llava_processor(*_llava_sizes(model.config)))


def save_tiny_llava_next(path, seed: int = 0, **model_kwargs) -> Path:
    """A tiny random LLaVA-NeXT-shaped checkpoint that vLLM 0.26.0 loads."""
    from vllm_sparsemm.testing.tiny import tiny_llava_next
    model = tiny_llava_next(seed=seed, **model_kwargs)
    return _save_llava_like(path, model,
                            llava_next_processor(*_llava_sizes(model.config)))


def save_tiny_llava_onevision(path, seed: int = 0, **model_kwargs) -> Path:
    """A tiny random LLaVA-OneVision checkpoint (its SigLIP tower saved as
    transformers 5 saves LLaVA's CLIP one)."""
    from vllm_sparsemm.testing.tiny import tiny_llava_onevision
    model = tiny_llava_onevision(seed=seed, **model_kwargs)
    return _save_llava_like(path, model, onevision_processor_of(model.config))


def onevision_processor_of(config):
    """The processor of a (tiny) LLaVA-OneVision config."""
    return llava_onevision_processor(*_llava_sizes(config),
                                     config.video_token_index)


def _llava_sizes(config) -> tuple[int, int, int]:
    """What the LLaVA processors take from a config: tile size, vocabulary
    size and the image token id."""
    return (config.vision_config.image_size, config.text_config.vocab_size,
            config.image_token_index)


def _save_llava_like(path, model, processor) -> Path:
    path = Path(path)
    model.save_pretrained(path)
    _rename_clip_keys(path / "model.safetensors")
    processor.save_pretrained(path)
    return path


def save_tiny_qwen2_vl(path, seed: int = 0, version: str = "2",
                       **model_kwargs) -> Path:
    """A tiny random Qwen2-VL (``version`` "2.5": Qwen2.5-VL, "3": Qwen3-VL)
    checkpoint."""
    from vllm_sparsemm.testing.tiny import (tiny_qwen2_5_vl, tiny_qwen2_vl,
                                            tiny_qwen3_vl)
    path = Path(path)
    make = {"2": tiny_qwen2_vl, "2.5": tiny_qwen2_5_vl,
            "3": tiny_qwen3_vl}[version]
    model = make(seed=seed, **model_kwargs)
    model.save_pretrained(path)
    config = model.config
    qwen2_vl_processor(config.text_config.vocab_size, {
        "image": config.image_token_id, "video": config.video_token_id,
        "vision_start": config.vision_start_token_id,
        "vision_end": config.vision_end_token_id},
        version=version).save_pretrained(path)
    return path


def save_tiny_internvl(path, seed: int = 0, **model_kwargs) -> Path:
    """A tiny random InternVL3-shaped checkpoint. transformers 5 saves it in
    the layout vLLM's InternS1 model names its modules (``language_model.
    model.*``, ``vision_tower.*``), which its loader takes as they are."""
    from vllm_sparsemm.testing.tiny import tiny_internvl
    path = Path(path)
    model = tiny_internvl(seed=seed, **model_kwargs)
    model.save_pretrained(path)
    internvl_processor_of(model.config).save_pretrained(path)
    return path


def _rename_clip_keys(file: Path) -> None:
    """transformers 5 saves LLaVA's CLIP tower without ``vision_model.``;
    vLLM 0.26.0 loads only the hub layout ``vision_tower.vision_model.*``."""
    import re

    from safetensors.torch import load_file, save_file
    tensors = load_file(file)
    renamed = {re.sub(r"vision_tower\.(?!vision_model\.)",
                      "vision_tower.vision_model.", k): v
               for k, v in tensors.items()}
    save_file(renamed, file, metadata={"format": "pt"})


# Real architecture configs for --load-format dummy runs.
LLAVA_15_7B = {
    "architectures": ["LlavaForConditionalGeneration"],
    "model_type": "llava", "image_token_index": 32000,
    "projector_hidden_act": "gelu", "vision_feature_layer": -2,
    "vision_feature_select_strategy": "default", "torch_dtype": "float16",
    "text_config": {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"],
        "hidden_size": 4096, "intermediate_size": 11008,
        "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 32, "vocab_size": 32064,
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "torch_dtype": "float16"},
    "vision_config": {
        "model_type": "clip_vision_model", "hidden_size": 1024,
        "intermediate_size": 4096, "num_hidden_layers": 24,
        "num_attention_heads": 16, "image_size": 336, "patch_size": 14,
        "projection_dim": 768, "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5},
}


NEXT_PINPOINTS_336 = [[336, 672], [672, 336], [672, 672], [1008, 336],
                      [336, 1008]]
LLAVA_NEXT_VICUNA_7B = dict(
    LLAVA_15_7B, architectures=["LlavaNextForConditionalGeneration"],
    model_type="llava_next", image_grid_pinpoints=NEXT_PINPOINTS_336,
    use_image_newline_parameter=True)
QWEN2_VL_7B = {
    "architectures": ["Qwen2VLForConditionalGeneration"],
    "model_type": "qwen2_vl", "torch_dtype": "bfloat16",
    "image_token_id": 151655, "video_token_id": 151656,
    "vision_start_token_id": 151652, "vision_end_token_id": 151653,
    "bos_token_id": 151643, "eos_token_id": 151645,
    "text_config": {
        "model_type": "qwen2_vl_text", "hidden_size": 3584,
        "intermediate_size": 18944, "num_hidden_layers": 28,
        "num_attention_heads": 28, "num_key_value_heads": 4,
        "vocab_size": 152064, "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
        "bos_token_id": 151643, "eos_token_id": 151645,
        "torch_dtype": "bfloat16"},
    "vision_config": {
        "depth": 32, "embed_dim": 1280, "hidden_size": 3584, "num_heads": 16,
        "mlp_ratio": 4, "patch_size": 14, "spatial_merge_size": 2,
        "temporal_patch_size": 2, "in_chans": 3, "hidden_act": "quick_gelu"},
}


LLAVA_NEXT_MISTRAL_7B = dict(
    LLAVA_NEXT_VICUNA_7B, text_config={
        "model_type": "mistral", "architectures": ["MistralForCausalLM"],
        "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 8, "vocab_size": 32064,
        "max_position_embeddings": 32768, "rms_norm_eps": 1e-5,
        "rope_theta": 1000000.0, "sliding_window": None,
        "torch_dtype": "bfloat16"})
QWEN2_5_VL_7B = {
    **QWEN2_VL_7B, "architectures": ["Qwen2_5_VLForConditionalGeneration"],
    "model_type": "qwen2_5_vl",
    "text_config": {**QWEN2_VL_7B["text_config"],
                    "model_type": "qwen2_5_vl_text",
                    "max_position_embeddings": 128000},
    "vision_config": {
        "depth": 32, "hidden_size": 1280, "intermediate_size": 3420,
        "num_heads": 16, "in_chans": 3, "out_hidden_size": 3584,
        "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
        "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31],
        "tokens_per_second": 2, "hidden_act": "silu"},
}


QWEN3_VL_8B = {
    "architectures": ["Qwen3VLForConditionalGeneration"],
    "model_type": "qwen3_vl", "torch_dtype": "bfloat16",
    "image_token_id": 151655, "video_token_id": 151656,
    "vision_start_token_id": 151652, "vision_end_token_id": 151653,
    "tie_word_embeddings": False,
    "text_config": {
        "model_type": "qwen3_vl_text", "hidden_size": 4096,
        "intermediate_size": 12288, "num_hidden_layers": 36,
        "num_attention_heads": 32, "num_key_value_heads": 8,
        "head_dim": 128, "vocab_size": 151936,
        "max_position_embeddings": 262144, "rms_norm_eps": 1e-6,
        "rope_theta": 5000000, "attention_bias": False,
        "rope_scaling": {"rope_type": "default", "mrope_interleaved": True,
                         "mrope_section": [24, 20, 20]},
        "bos_token_id": 151643, "eos_token_id": 151645,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16"},
    "vision_config": {
        "model_type": "qwen3_vl", "depth": 27, "hidden_size": 1152,
        "intermediate_size": 4304, "num_heads": 16, "in_channels": 3,
        "out_hidden_size": 4096, "patch_size": 16, "spatial_merge_size": 2,
        "temporal_patch_size": 2, "num_position_embeddings": 2304,
        "deepstack_visual_indexes": [8, 16, 24],
        "hidden_act": "gelu_pytorch_tanh"},
}


# the Qwen2-7B text stack LLaVA-OneVision-7B and InternVL3-8B share
QWEN2_7B_TEXT = {
    "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"],
    "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
    "num_attention_heads": 28, "num_key_value_heads": 4,
    "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16"}
ONEVISION_PINPOINTS = [[384 * a, 384 * b] for a in range(1, 7)
                       for b in range(1, 7)]
LLAVA_ONEVISION_7B = {
    "architectures": ["LlavaOnevisionForConditionalGeneration"],
    "model_type": "llava_onevision", "torch_dtype": "bfloat16",
    "image_token_index": 151646, "video_token_index": 151647,
    "projector_hidden_act": "gelu", "vision_aspect_ratio": "anyres_max_9",
    "vision_feature_layer": -1, "vision_feature_select_strategy": "full",
    "use_image_newline_parameter": True, "tie_word_embeddings": False,
    "image_grid_pinpoints": ONEVISION_PINPOINTS,
    "text_config": dict(QWEN2_7B_TEXT, vocab_size=152128),
    "vision_config": {
        "model_type": "siglip_vision_model", "hidden_size": 1152,
        "image_size": 384, "intermediate_size": 4304,
        "num_attention_heads": 16, "num_hidden_layers": 26, "patch_size": 14,
        "vision_use_head": False},
}


INTERNVL3_8B = {
    "architectures": ["InternVLForConditionalGeneration"],
    "model_type": "internvl", "torch_dtype": "bfloat16",
    "image_token_id": 151667, "image_seq_length": 256,
    "downsample_ratio": 0.5, "projector_hidden_act": "gelu",
    "vision_feature_layer": -1, "vision_feature_select_strategy": "default",
    "tie_word_embeddings": False,
    "text_config": dict(
        QWEN2_7B_TEXT, vocab_size=151674, hidden_act="silu",
        rope_scaling={"factor": 2.0, "rope_type": "dynamic",
                      "type": "dynamic"},
        sliding_window=None, use_sliding_window=False, bos_token_id=151643,
        eos_token_id=151645),
    "vision_config": {
        "model_type": "internvl_vision", "hidden_size": 1024,
        "intermediate_size": 4096, "num_hidden_layers": 24,
        "num_attention_heads": 16, "image_size": [448, 448],
        "patch_size": [14, 14], "num_channels": 3, "attention_bias": True,
        "use_qk_norm": False, "norm_type": "layer_norm",
        "layer_norm_eps": 1e-6, "hidden_act": "gelu",
        "layer_scale_init_value": 0.1, "use_mask_token": False,
        "use_absolute_position_embeddings": True, "use_mean_pooling": True,
        "torch_dtype": "bfloat16"},
}


def write_dummy_llava_15_7b(path) -> Path:
    """Config, tokenizer and processor of LLaVA-1.5-7B (576 image tokens), no weights."""
    return _write_dummy(path, LLAVA_15_7B,
                        llava_processor(336, 32064, 32000))


def write_dummy_llava_next_7b(path) -> Path:
    """LLaVA-NeXT-Vicuna-7B (up to ~2,900 image tokens), no weights."""
    return _write_dummy(path, LLAVA_NEXT_VICUNA_7B, _next_336_processor())


def write_dummy_llava_next_mistral_7b(path) -> Path:
    """LLaVA-v1.6-Mistral-7B (GQA 32/8), no weights."""
    return _write_dummy(path, LLAVA_NEXT_MISTRAL_7B, _next_336_processor())


def write_dummy_qwen2_vl_7b(path) -> Path:
    """Qwen2-VL-7B (GQA 28/4, M-RoPE), no weights."""
    return _write_dummy(path, QWEN2_VL_7B, _qwen_hub_processor("2", 152064))


def write_dummy_qwen2_5_vl_7b(path) -> Path:
    """Qwen2.5-VL-7B (GQA 28/4, M-RoPE, windowed ViT), no weights."""
    return _write_dummy(path, QWEN2_5_VL_7B,
                        _qwen_hub_processor("2.5", 152064))


def write_dummy_qwen3_vl_8b(path) -> Path:
    """Qwen3-VL-8B (GQA 32/8, 36 layers, 16 px patches, deepstack), no weights."""
    return _write_dummy(path, QWEN3_VL_8B, _qwen_hub_processor("3", 151936))


def write_dummy_llava_onevision_7b(path) -> Path:
    """LLaVA-OneVision-Qwen2-7B (GQA 28/4, SigLIP 384 px tiles of 729
    tokens, up to 9), no weights."""
    return _write_dummy(path, LLAVA_ONEVISION_7B, llava_onevision_processor(
        384, 152128, 151646, 151647, pinpoints=ONEVISION_PINPOINTS))


def write_dummy_internvl3_8b(path) -> Path:
    """InternVL3-8B (GQA 28/4, InternViT-300M: 448 px tiles of 256 tokens,
    up to 12 and a thumbnail), no weights. The image tokens at the hub's ids
    (<img>, </img>, <IMG_CONTEXT>), <video> after the text vocabulary."""
    return _write_dummy(path, INTERNVL3_8B, internvl_processor(
        448, 151674, {"image": 151667, "video": 151674, "start": 151665,
                      "end": 151666}))


def _next_336_processor():
    """LLaVA-NeXT-7B's processor: 336 px tiles on the hub's any-res grids."""
    processor = llava_next_processor(336, 32064, 32000)
    processor.image_processor.image_grid_pinpoints = NEXT_PINPOINTS_336
    return processor


def _qwen_hub_processor(version: str, vocab_size: int):
    """A Qwen VL processor with the hub's token ids and pixel limit."""
    return qwen2_vl_processor(vocab_size, {
        "image": 151655, "video": 151656, "vision_start": 151652,
        "vision_end": 151653}, max_pixels=16384 * 28 * 28, version=version)


def write_dummy_qwen2_7b_text(path, max_len: int = 32768) -> Path:
    """Config and tokenizer of a Qwen2-7B text model (4 KV heads, so a
    ``max_len``-token prompt's KV fits beside its weights), no weights."""
    vocab = 152064
    config = dict(QWEN2_7B_TEXT, vocab_size=vocab,
                  max_position_embeddings=max_len, bos_token_id=151643,
                  eos_token_id=151645)
    return _write_dummy(path, config, _chatml_tokenizer(vocab, {}))


def _write_dummy(path, config: dict, processor) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config, indent=1))
    processor.save_pretrained(path)
    return path
