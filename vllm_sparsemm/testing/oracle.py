"""SparseMM greedy generation on a Hugging Face model, batch size 1: the oracle.

It plugs one attention function into the text stack of a transformers LLaVA or
Qwen2-VL model (the vision tower keeps eager attention) and keeps its own
per-(layer, KV head) caches:

* prefill: exact eager attention over the whole prompt (so the first token is
  the full-cache one), then per layer :func:`kept_positions` picks what each KV
  head keeps, unless ``budget >= prompt length``;
* decode: every new token is appended to every head; each KV head attends
  over its own ragged cache with its G query heads.

Positions are the model's own (Llama: ``N + t``; Qwen2-VL: M-RoPE text
position ``N + t + rope_delta``), never renumbered. Deliberately plain: loops
over heads, no paging, so it can be checked by eye.

Why we trust it (``tests/test_oracle.py``): with ``budget >= N`` it gives
transformers' own full-cache greedy tokens, logits within 1e-5 (LLaVA MHA and
GQA, Qwen2-VL); with eviction it equals an independent implementation that
keeps transformers' cache and generate loop (so transformers computes the
decode positions, M-RoPE included) and masks each head's evicted keys; its
kept positions equal the selection recomputed from each layer's captured
queries and keys; and the selection maths is checked by hand-worked cases
(``tests/test_selection.py``, a three-head example among them).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from vllm_sparsemm.core.budget import compresses, head_budgets
from vllm_sparsemm.core.selection import kept_positions
from vllm_sparsemm.kernels.kv_ops import from_cache, to_cache

ATTN_NAME = "sparsemm_oracle"
_active: "_OracleCache | None" = None


def _eager(module, query, key, value, attention_mask, scaling, **kwargs):
    from transformers.models.llama.modeling_llama import eager_attention_forward
    return eager_attention_forward(module, query, key, value, attention_mask,
                                   scaling=scaling, dropout=0.0)


def _oracle_attention(module, query, key, value, attention_mask, scaling=None,
                      dropout=0.0, **kwargs):
    """transformers attention-interface entry; ``query`` is ``[1, Hq, T, D]``."""
    if _active is None:
        return _eager(module, query, key, value, attention_mask, scaling)
    return _active.attend(module, query, key, value, scaling)


def _register_attention() -> None:
    from transformers import AttentionInterface
    AttentionInterface.register(ATTN_NAME, _oracle_attention)


@dataclass
class OracleResult:
    """Greedy tokens, per-step logits and, per layer, what each KV head kept."""
    tokens: list[int]
    logits: torch.Tensor  # [num_tokens, vocab], float32
    # Per layer (positions [Hkv, max_kept] padded with -1, counts [Hkv]);
    # empty when the prompt was not compressed.
    kept: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)


class _OracleCache:
    """Ragged per-(layer, KV head) key/value lists of one request."""

    def __init__(self, caps: torch.Tensor, budget: int, window: int,
                 pool_kernel: int, kv_dtype: torch.dtype | None = None,
                 kv_scales: torch.Tensor | None = None):
        self.caps, self.budget = caps, budget
        self.kv_dtype, self.kv_scales = kv_dtype, kv_scales
        self.window, self.pool_kernel = window, pool_kernel
        self.keys: dict[int, list[torch.Tensor]] = {}
        self.values: dict[int, list[torch.Tensor]] = {}
        self.kept: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def attend(self, module, query, key, value, scaling):
        layer = module.layer_idx
        if self.kv_dtype is not None:  # what an fp8 KV cache reads
            scales = (torch.ones(3) if self.kv_scales is None else
                      self.kv_scales[layer])  # k, v, q
            key, value, query = (
                from_cache(to_cache(t, self.kv_dtype, scale),
                           scale).to(t.dtype)
                for t, scale in zip((key, value, query), scales))
        if layer not in self.keys:
            return self._prefill(layer, module, query, key, value, scaling)
        return self._decode(layer, query, key, value, scaling)

    def _prefill(self, layer, module, query, key, value, scaling):
        # transformers hands custom attention functions a boolean or no mask;
        # batch size 1 without padding needs exactly the causal one.
        num_tokens = query.shape[2]
        causal = torch.full((num_tokens, num_tokens), float("-inf"),
                            dtype=query.dtype).triu(1)
        out = _eager(module, query, key, value, causal, scaling)
        q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))
        num_kv_heads = k.shape[1]
        if compresses(num_tokens, self.budget):
            positions, counts = kept_positions(q[-self.window:], k,
                                               self.caps[layer],
                                               self.pool_kernel)
            self.kept[layer] = (positions, counts)
            keep = [positions[h, :counts[h]] for h in range(num_kv_heads)]
        else:
            keep = [torch.arange(num_tokens)] * num_kv_heads
        self.keys[layer] = [k[keep[h], h] for h in range(num_kv_heads)]
        self.values[layer] = [v[keep[h], h] for h in range(num_kv_heads)]
        return out

    def _decode(self, layer, query, key, value, scaling):
        _, num_heads, num_new, _ = query.shape
        num_kv_heads = key.shape[1]
        group = num_heads // num_kv_heads
        out = query.new_empty(1, num_new, num_heads, query.shape[-1])
        for h in range(num_kv_heads):
            keys = torch.cat([self.keys[layer][h], key[0, h]])
            values = torch.cat([self.values[layer][h], value[0, h]])
            self.keys[layer][h], self.values[layer][h] = keys, values
            q = query[0, h * group:(h + 1) * group]  # [G, T, D]
            logits = torch.matmul(q, keys.T) * scaling  # [G, T, n]
            visible = (torch.arange(keys.shape[0])[None, :] <=
                       keys.shape[0] - num_new + torch.arange(num_new)[:, None])
            logits = logits.masked_fill(~visible, float("-inf"))
            probs = torch.softmax(logits, dim=-1,
                                  dtype=torch.float32).to(query.dtype)
            out[0, :, h * group:(h + 1) * group] = torch.matmul(
                probs, values).transpose(0, 1)
        return out, None


class SparseMMOracle:
    """SparseMM generation for one request on a transformers LLaVA / Qwen2-VL model."""

    def __init__(self, model, caps: torch.Tensor, budget: int,
                 window: int = 32, pool_kernel: int = 5,
                 kv_dtype: torch.dtype | None = None,
                 kv_scales: torch.Tensor | None = None):
        """``kv_dtype`` (e.g. ``torch.float8_e4m3fn``) rounds the text
        stack's queries, keys and values to it, as vLLM's fp8 KV cache does
        (it quantizes queries for FlashAttention too), each divided by its
        layer's scale first: ``kv_scales [L, 3]`` (k, v, q; 1 without)."""
        _register_attention()
        model.set_attn_implementation({"text_config": ATTN_NAME})
        self.model = model
        self.caps, self.budget = caps, budget
        self.window, self.pool_kernel = window, pool_kernel
        self.kv_dtype, self.kv_scales = kv_dtype, kv_scales

    @classmethod
    def from_scores(cls, model, scores: torch.Tensor, budget: int,
                    window: int = 32, ratio: float = 0.1,
                    pool_kernel: int = 5) -> "SparseMMOracle":
        text = model.config.get_text_config()
        caps = head_budgets(scores, text.num_key_value_heads, budget, window,
                            ratio)
        return cls(model, caps, budget, window, pool_kernel)

    @contextlib.contextmanager
    def _cache(self):
        global _active
        _active = _OracleCache(self.caps, self.budget, self.window,
                               self.pool_kernel, self.kv_dtype,
                               self.kv_scales)
        try:
            yield _active
        finally:
            _active = None

    def _decode_positions(self, position: int) -> torch.Tensor:
        rope_deltas = getattr(self.model.model, "rope_deltas", None)
        if rope_deltas is None or not hasattr(self.model.model,
                                              "get_rope_index"):
            return torch.tensor([[position]])
        return (position + rope_deltas.view(1, 1, 1)).expand(3, 1, 1)

    @torch.no_grad()
    def generate(self, inputs: dict, max_new_tokens: int,
                 eos_token_id: int | None = None) -> OracleResult:
        """Greedy decoding; stops after ``max_new_tokens`` or at ``eos_token_id``."""
        prompt_len = inputs["input_ids"].shape[1]
        tokens, logits = [], []
        with self._cache() as cache:
            out = self.model(**inputs, use_cache=False)
            for step in range(max_new_tokens):
                logits.append(out.logits[0, -1].float())
                tokens.append(int(logits[-1].argmax()))
                if tokens[-1] == eos_token_id or step + 1 == max_new_tokens:
                    break
                out = self.model(
                    input_ids=torch.tensor([[tokens[-1]]]),
                    position_ids=self._decode_positions(prompt_len + step),
                    use_cache=False)
            kept = [cache.kept[layer] for layer in sorted(cache.kept)]
        return OracleResult(tokens, torch.stack(logits), kept)
