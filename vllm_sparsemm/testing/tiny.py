"""Tiny randomly initialised LLaVA, Qwen VL and InternVL models, test inputs.

Nothing is downloaded: configs are written here, weights are drawn from a
seeded generator. The shapes keep the real models' structure (LLaVA: CLIP
tower, Llama text stack; Qwen2-VL: its ViT with 2x2 merge, M-RoPE text stack;
InternVL: InternViT tiles, pixel shuffle, Qwen2 text stack).
"""

from __future__ import annotations

import torch

LLAVA_IMAGE_TOKEN = 250
QWEN_IMAGE_TOKEN, QWEN_VIDEO_TOKEN = 390, 391
ONEVISION_IMAGE_TOKEN, ONEVISION_VIDEO_TOKEN = 390, 391
QWEN_VISION_START, QWEN_VISION_END = 392, 393
# <IMG_CONTEXT>, <video>, <img>, </img>
INTERNVL_IMAGE_TOKEN, INTERNVL_VIDEO_TOKEN = 390, 391
INTERNVL_IMAGE_START, INTERNVL_IMAGE_END = 392, 393


def tiny_llava(num_layers: int = 3, num_heads: int = 4, num_kv_heads: int = 4,
               head_dim: int = 16, image_size: int = 112, seed: int = 0,
               dtype: torch.dtype = torch.float32, **text_kwargs):
    """A LLaVA-1.5-shaped model: ``(image_size / 14) ** 2`` image tokens."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration
    config = LlavaConfig(**_llava_parts(num_layers, num_heads, num_kv_heads,
                                        head_dim, image_size, **text_kwargs))
    return _build(LlavaForConditionalGeneration, config, seed, dtype)


def tiny_llava_next(num_layers: int = 3, num_heads: int = 4,
                    num_kv_heads: int = 4, head_dim: int = 16,
                    image_size: int = 112, seed: int = 0,
                    dtype: torch.dtype = torch.float32,
                    text_model: str = "llama"):
    """A LLaVA-NeXT-shaped model: any-res tiles of ``image_size`` plus a base
    image; ``text_model="mistral"`` for LLaVA-NeXT-Mistral's text stack."""
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration
    config = LlavaNextConfig(
        **_llava_parts(num_layers, num_heads, num_kv_heads, head_dim,
                       image_size, text_model=text_model),
        image_grid_pinpoints=NEXT_PINPOINTS(image_size))
    return _build(LlavaNextForConditionalGeneration, config, seed, dtype)


def _llava_parts(num_layers, num_heads, num_kv_heads, head_dim, image_size,
                 text_model="llama", **text_kwargs):
    """What LLaVA-1.5 and LLaVA-NeXT configs share: a tiny CLIP and a Llama
    (or Mistral) text stack."""
    from transformers import CLIPVisionConfig, LlamaConfig, MistralConfig
    text_config = {"llama": LlamaConfig, "mistral": MistralConfig}[text_model]
    if text_model == "mistral":
        text_kwargs.setdefault("sliding_window", None)
    return dict(
        vision_config=CLIPVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, image_size=image_size, patch_size=14,
            projection_dim=32),
        text_config=text_config(
            hidden_size=num_heads * head_dim, intermediate_size=128,
            num_hidden_layers=num_layers, num_attention_heads=num_heads,
            num_key_value_heads=num_kv_heads, head_dim=head_dim,
            vocab_size=256, max_position_embeddings=4096, bos_token_id=1,
            eos_token_id=2, pad_token_id=0, **text_kwargs),
        image_token_index=LLAVA_IMAGE_TOKEN, projector_hidden_act="gelu",
        vision_feature_select_strategy="default", vision_feature_layer=-2)


def NEXT_PINPOINTS(image_size: int) -> list[list[int]]:
    """Any-res grids of one or two tiles a side, as LLaVA-NeXT's 336 grids."""
    return [[image_size * a, image_size * b] for a in (1, 2) for b in (1, 2)]


def tiny_qwen2_vl(num_layers: int = 3, num_heads: int = 4, num_kv_heads: int = 2,
                  head_dim: int = 16, seed: int = 0,
                  dtype: torch.dtype = torch.float32):
    """A Qwen2-VL-shaped model (GQA, M-RoPE)."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
    config = Qwen2VLConfig(
        text_config=_qwen_text(num_layers, num_heads, num_kv_heads, head_dim),
        vision_config=dict(
            depth=1, embed_dim=32, hidden_size=num_heads * head_dim,
            num_heads=2, mlp_ratio=2, patch_size=14, spatial_merge_size=2,
            temporal_patch_size=2, in_chans=3),
        **_QWEN_TOKENS)
    return _build(Qwen2VLForConditionalGeneration, config, seed, dtype)


_QWEN_TOKENS = dict(image_token_id=QWEN_IMAGE_TOKEN,
                    video_token_id=QWEN_VIDEO_TOKEN,
                    vision_start_token_id=QWEN_VISION_START,
                    vision_end_token_id=QWEN_VISION_END, bos_token_id=1,
                    eos_token_id=2)


def _qwen_text(num_layers, num_heads, num_kv_heads, head_dim):
    """The tiny M-RoPE text stack both Qwen VL generations share."""
    half = head_dim // 2
    section = [half - 2 * (half // 3), half // 3, half // 3]
    return dict(hidden_size=num_heads * head_dim, intermediate_size=128,
                num_hidden_layers=num_layers, num_attention_heads=num_heads,
                num_key_value_heads=num_kv_heads, vocab_size=400,
                max_position_embeddings=4096, bos_token_id=1, eos_token_id=2,
                rope_scaling={"type": "mrope", "mrope_section": section})


def tiny_qwen2_5_vl(num_layers: int = 3, num_heads: int = 4,
                    num_kv_heads: int = 2, head_dim: int = 16, seed: int = 0,
                    dtype: torch.dtype = torch.float32):
    """A Qwen2.5-VL-shaped model (windowed ViT, GQA, M-RoPE)."""
    from transformers import (Qwen2_5_VLConfig,
                              Qwen2_5_VLForConditionalGeneration)
    config = Qwen2_5_VLConfig(
        text_config=_qwen_text(num_layers, num_heads, num_kv_heads, head_dim),
        vision_config=dict(
            depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
            out_hidden_size=num_heads * head_dim, patch_size=14,
            spatial_merge_size=2, temporal_patch_size=2, in_channels=3,
            window_size=56, fullatt_block_indexes=[1]),
        **_QWEN_TOKENS)
    return _build(Qwen2_5_VLForConditionalGeneration, config, seed, dtype)


def tiny_qwen3_vl(num_layers: int = 3, num_heads: int = 4,
                  num_kv_heads: int = 2, head_dim: int = 16, seed: int = 0,
                  dtype: torch.dtype = torch.float32):
    """A Qwen3-VL-shaped model (16 px patches, deepstack visual features
    into the first text layer, interleaved M-RoPE, GQA)."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration
    text = _qwen_text(num_layers, num_heads, num_kv_heads, head_dim)
    mrope = text.pop("rope_scaling")
    config = Qwen3VLConfig(
        text_config=dict(text, head_dim=head_dim, rope_parameters=dict(
            rope_type="default", rope_theta=5e5,
            mrope_section=mrope["mrope_section"], mrope_interleaved=True)),
        vision_config=dict(
            depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
            out_hidden_size=num_heads * head_dim, patch_size=16,
            spatial_merge_size=2, temporal_patch_size=2, in_channels=3,
            num_position_embeddings=64, deepstack_visual_indexes=[0]),
        **_QWEN_TOKENS)
    return _build(Qwen3VLForConditionalGeneration, config, seed, dtype)


def tiny_llava_onevision(num_layers: int = 3, num_heads: int = 4,
                         num_kv_heads: int = 2, head_dim: int = 16,
                         image_size: int = 112, seed: int = 0,
                         dtype: torch.dtype = torch.float32):
    """A LLaVA-OneVision-shaped model: SigLIP tiles (any-res, at most 9),
    a Qwen2 text stack (GQA)."""
    from transformers import (LlavaOnevisionConfig,
                              LlavaOnevisionForConditionalGeneration,
                              Qwen2Config, SiglipVisionConfig)
    config = LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, image_size=image_size, patch_size=14),
        text_config=Qwen2Config(
            hidden_size=num_heads * head_dim, intermediate_size=128,
            num_hidden_layers=num_layers, num_attention_heads=num_heads,
            num_key_value_heads=num_kv_heads, head_dim=head_dim,
            vocab_size=400, max_position_embeddings=4096, bos_token_id=1,
            eos_token_id=2),
        image_token_index=ONEVISION_IMAGE_TOKEN,
        video_token_index=ONEVISION_VIDEO_TOKEN,
        vision_feature_select_strategy="full", vision_feature_layer=-1,
        image_grid_pinpoints=NEXT_PINPOINTS(image_size),
        vision_aspect_ratio="anyres_max_9")
    return _build(LlavaOnevisionForConditionalGeneration, config, seed, dtype)


def tiny_internvl(num_layers: int = 3, num_heads: int = 4,
                  num_kv_heads: int = 2, head_dim: int = 16,
                  image_size: int = 112, seed: int = 0,
                  dtype: torch.dtype = torch.float32):
    """An InternVL3-shaped model: InternViT tiles of ``image_size`` (14 px
    patches, pixel shuffle 0.5: ``(image_size / 28) ** 2`` tokens a tile), a
    Qwen2 text stack (GQA), untied embeddings as InternVL3-8B's."""
    from transformers import (InternVLConfig, InternVLForConditionalGeneration,
                              Qwen2Config)
    config = InternVLConfig(
        vision_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, image_size=image_size, patch_size=14,
            attention_bias=True),
        text_config=Qwen2Config(
            hidden_size=num_heads * head_dim, intermediate_size=128,
            num_hidden_layers=num_layers, num_attention_heads=num_heads,
            num_key_value_heads=num_kv_heads, head_dim=head_dim,
            vocab_size=400, max_position_embeddings=4096, bos_token_id=1,
            eos_token_id=2, tie_word_embeddings=False),
        image_token_id=INTERNVL_IMAGE_TOKEN,
        image_seq_length=(image_size // 28) ** 2, downsample_ratio=0.5,
        tie_word_embeddings=False)
    return _build(InternVLForConditionalGeneration, config, seed, dtype)


def _build(cls, config, seed, dtype):
    torch.manual_seed(seed)
    model = cls(config).to(dtype).eval()
    model.set_attn_implementation({"text_config": "eager",
                                   "vision_config": "eager"})
    return model


def llava_inputs(model, text_before: int = 5, text_after: int = 12,
                 seed: int = 0) -> dict:
    """A prompt ``text, <image tokens>, text`` with a random image."""
    config = model.config
    gen = torch.Generator().manual_seed(seed)
    side = config.vision_config.image_size // config.vision_config.patch_size
    vocab = LLAVA_IMAGE_TOKEN - 3
    ids = torch.cat([
        torch.tensor([1]),
        torch.randint(3, vocab, (text_before, ), generator=gen),
        torch.full((side * side, ), config.image_token_index),
        torch.randint(3, vocab, (text_after, ), generator=gen)])
    pixels = torch.randn(1, 3, config.vision_config.image_size,
                         config.vision_config.image_size, generator=gen)
    return {"input_ids": ids[None], "pixel_values": pixels.to(model.dtype)}


def qwen2_vl_inputs(model, grid_hw: tuple[int, int] = (8, 8),
                    text_before: int = 5, text_after: int = 12,
                    seed: int = 0) -> dict:
    """A prompt with one image of ``grid_hw`` patches (``h * w / 4`` image tokens)."""
    vision = model.config.vision_config
    gen = torch.Generator().manual_seed(seed)
    grid_h, grid_w = grid_hw
    num_tokens = grid_h * grid_w // vision.spatial_merge_size**2
    vocab = QWEN_IMAGE_TOKEN - 3
    ids = torch.cat([
        torch.tensor([1]),
        torch.randint(3, vocab, (text_before, ), generator=gen),
        torch.tensor([QWEN_VISION_START]),
        torch.full((num_tokens, ), QWEN_IMAGE_TOKEN),
        torch.tensor([QWEN_VISION_END]),
        torch.randint(3, vocab, (text_after, ), generator=gen)])[None]
    patch = 3 * vision.temporal_patch_size * vision.patch_size**2
    pixels = torch.randn(grid_h * grid_w, patch, generator=gen)
    return {"input_ids": ids, "pixel_values": pixels.to(model.dtype),
            "image_grid_thw": torch.tensor([[1, grid_h, grid_w]]),
            "mm_token_type_ids": (ids == QWEN_IMAGE_TOKEN).int()}


def qwen2_vl_video_inputs(model, grid_thw: tuple[int, int, int] = (2, 8, 8),
                          text_before: int = 5, text_after: int = 12,
                          seed: int = 0) -> dict:
    """A prompt with one short video: ``t`` temporal patches (2 frames
    each) of ``h x w`` patches, ``t * h * w / 4`` video tokens."""
    vision = model.config.vision_config
    gen = torch.Generator().manual_seed(seed)
    grid_t, grid_h, grid_w = grid_thw
    num_tokens = grid_t * grid_h * grid_w // vision.spatial_merge_size**2
    vocab = QWEN_IMAGE_TOKEN - 3
    ids = torch.cat([
        torch.tensor([1]),
        torch.randint(3, vocab, (text_before, ), generator=gen),
        torch.tensor([QWEN_VISION_START]),
        torch.full((num_tokens, ), QWEN_VIDEO_TOKEN),
        torch.tensor([QWEN_VISION_END]),
        torch.randint(3, vocab, (text_after, ), generator=gen)])[None]
    patch = 3 * vision.temporal_patch_size * vision.patch_size**2
    pixels = torch.randn(grid_t * grid_h * grid_w, patch, generator=gen)
    return {"input_ids": ids, "pixel_values_videos": pixels.to(model.dtype),
            "video_grid_thw": torch.tensor([[grid_t, grid_h, grid_w]]),
            "mm_token_type_ids": 2 * (ids == QWEN_VIDEO_TOKEN).int()}
