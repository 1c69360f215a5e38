"""Chase visual heads: the authors' training-free scoring, on a transformers model.

For each OCR image the model greedily answers "Provide all the OCR results of
this image." For every generated token whose text is a substring of exactly
one box's text, every (layer, query head) whose top-1 attended key, in the
step that produced the token, lies in that box's image tokens scores
``1 / |region|``. A head's per-image score is the sum over the answer; the
file keeps one number per image, and the loader averages them.

Departures from the reference, all fixes of plain bugs:
* token text comes from ``decode`` with whitespace and SentencePiece's
  word-start mark stripped (the reference's LLaVA script compared raw pieces
  such as "▁word", which never match);
* decoding uses the KV cache for every model (the authors' Qwen script ran
  without it, their issue #10);
* the attention row is captured per layer by a custom attention function
  instead of ``output_attentions``, which would hold every layer's full
  ``N x N`` map (gigabytes at LLaVA-NeXT prompt lengths).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from vllm_sparsemm.tools.chase.regions import box_tokens

PROMPT = "Provide all the OCR results of this image."
ATTN_NAME = "sparsemm_chase"
_rows: list | None = None  # per layer: last query row's attention [H, keys]


def _chase_attention(module, query, key, value, attention_mask, scaling=None,
                     dropout=0.0, **kwargs):
    """Eager attention that also keeps the last query's probabilities."""
    from transformers.models.llama.modeling_llama import repeat_kv
    group = query.shape[1] // key.shape[1]
    logits = query @ repeat_kv(key, group).transpose(2, 3) * scaling
    num_new, num_keys = query.shape[2], key.shape[2]
    causal = (torch.arange(num_keys, device=query.device)[None, :] >
              num_keys - num_new + torch.arange(num_new, device=query.device)[:, None])
    logits = logits.masked_fill(causal, float("-inf"))
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    if _rows is not None:
        _rows.append(probs[0, :, -1])
    out = probs.to(value.dtype) @ repeat_kv(value, group)
    return out.transpose(1, 2).contiguous(), None


@contextlib.contextmanager
def _capture():
    global _rows
    _rows = []
    try:
        yield _rows
    finally:
        _rows = None


def prepare_model(model):
    """Route the text stack's attention through the capturing function."""
    from transformers import AttentionInterface
    AttentionInterface.register(ATTN_NAME, _chase_attention)
    model.set_attn_implementation({"text_config": ATTN_NAME})
    return model


def _token_text(processor, token_id: int) -> str:
    return processor.tokenizer.decode([token_id]).strip().lstrip("\u2581").strip()


@dataclass
class ImageResult:
    scores: torch.Tensor  # [L, Hq] this image's score per head
    tokens: list[int]
    matched: int  # generated tokens that matched exactly one box


@torch.no_grad()
def score_image(model, processor, sample, max_new_tokens: int = 256,
                prompt: str = PROMPT) -> ImageResult:
    """One image's contribution to every (layer, query head)."""
    config = model.config
    text_config = config.get_text_config()
    image = sample.load_image()
    messages = [{"role": "user", "content": [{"type": "image"},
                                             {"type": "text", "text": prompt}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=image, text=text, return_tensors="pt").to(
        model.device)
    regions = [torch.tensor(box_tokens(processor, config, inputs, image.size,
                                       box), device=model.device)
               for _, box in sample.boxes]
    scores = torch.zeros(text_config.num_hidden_layers,
                         text_config.num_attention_heads)
    eos = processor.tokenizer.eos_token_id
    tokens, matched = [], 0
    with _capture() as rows:
        out = model(**inputs, use_cache=True)
        for _ in range(max_new_tokens):
            token = int(out.logits[0, -1].argmax())
            tokens.append(token)
            attention = torch.stack(rows)  # [L, H, keys] of this step's last query
            rows.clear()
            piece = _token_text(processor, token)
            hits = [i for i, (box_text, _) in enumerate(sample.boxes)
                    if piece and piece in box_text]
            if len(hits) == 1 and len(regions[hits[0]]):
                region = regions[hits[0]]
                top = attention.argmax(dim=-1)  # [L, H]
                scores += (torch.isin(top, region).float() / len(region)).cpu()
                matched += 1
            if token == eos:
                break
            out = model(input_ids=torch.tensor([[token]], device=model.device),
                        past_key_values=out.past_key_values, use_cache=True)
    return ImageResult(scores, tokens, matched)
