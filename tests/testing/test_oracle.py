"""The HF oracle: full-cache equality when nothing is evicted, and, with
eviction, agreement with an independent masked-attention implementation that
runs through transformers' own cache and generate loop."""

import pytest
import torch
from transformers import AttentionInterface
from transformers.models.llama.modeling_llama import repeat_kv

from vllm_sparsemm.core.budget import head_budgets, kept_counts
from vllm_sparsemm.testing.oracle import SparseMMOracle
from vllm_sparsemm.testing.checkpoints import (internvl_inputs,
                                               llava_onevision_inputs)
from vllm_sparsemm.testing.tiny import (llava_inputs,
                                        qwen2_vl_inputs, qwen2_vl_video_inputs,
                                        tiny_internvl, tiny_llava,
                                        tiny_llava_onevision, tiny_qwen2_5_vl,
                                        tiny_qwen2_vl, tiny_qwen3_vl)
from vllm_sparsemm.core.selection import kept_positions

MODELS = {
    "llava-mha": (lambda: tiny_llava(num_kv_heads=4), llava_inputs),
    "llava-gqa": (lambda: tiny_llava(num_kv_heads=2), llava_inputs),
    # LLaVA-NeXT-Mistral's text stack (its any-res images: the GPU tests)
    "llava-mistral-gqa": (lambda: tiny_llava(
        num_kv_heads=2, text_model="mistral"), llava_inputs),
    "qwen2-vl": (lambda: tiny_qwen2_vl(), qwen2_vl_inputs),
    "qwen2.5-vl": (lambda: tiny_qwen2_5_vl(), qwen2_vl_inputs),
    "qwen3-vl": (lambda: tiny_qwen3_vl(), qwen2_vl_inputs),
    "llava-onevision": (lambda: tiny_llava_onevision(), llava_onevision_inputs),
    # InternVL3: two tiles and a thumbnail, Qwen2 text stack
    "internvl": (lambda: tiny_internvl(), internvl_inputs),
    # a short video: its tokens are prompt tokens like an image's
    "qwen2-vl-video": (lambda: tiny_qwen2_vl(), qwen2_vl_video_inputs),
    # Qwen3-VL gives each temporal patch its own span and timestamp text:
    # one patch (two frames) keeps the prompt one span
    "qwen3-vl-video": (lambda: tiny_qwen3_vl(), lambda model:
                       qwen2_vl_video_inputs(model, grid_thw=(1, 8, 8))),
}


def _setup(name):
    make_model, make_inputs = MODELS[name]
    model = make_model()
    inputs = make_inputs(model)
    text = model.config.get_text_config()
    scores = torch.rand(text.num_hidden_layers, text.num_attention_heads,
                        generator=torch.Generator().manual_seed(7))
    return model, inputs, scores


def _hf_greedy(model, inputs, max_new_tokens):
    model.set_attn_implementation({"text_config": "eager"})
    out = model.generate(**inputs, max_new_tokens=max_new_tokens,
                         do_sample=False, eos_token_id=None, pad_token_id=0,
                         output_logits=True, return_dict_in_generate=True)
    prompt_len = inputs["input_ids"].shape[1]
    return (out.sequences[0, prompt_len:].tolist(),
            torch.stack(out.logits)[:, 0].float())


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("extra", [0, 100])
def test_no_eviction_reproduces_full_cache_generation(name, extra):
    model, inputs, scores = _setup(name)
    tokens, logits = _hf_greedy(model, inputs, 16)
    prompt_len = inputs["input_ids"].shape[1]
    oracle = SparseMMOracle.from_scores(model, scores, budget=prompt_len + extra)
    result = oracle.generate(inputs, 16)
    assert result.tokens == tokens
    assert result.kept == []
    # same maths in another order: float32 rounding only. The tiny models'
    # logits are O(1); 1e-5 is ~100 float32 ulps of them after a few layers
    # of reordered sums, and orders of magnitude below the logit gaps that
    # decide the greedy tokens compared exactly above
    torch.testing.assert_close(result.logits, logits, rtol=0, atol=1e-5)


def _causal_eager(module, query, key, value, scaling):
    """Eager attention with an explicit causal mask (custom attention functions
    get a boolean mask, or none, from transformers)."""
    from transformers.models.llama.modeling_llama import eager_attention_forward
    n = query.shape[2]
    causal = torch.full((n, n), float("-inf")).triu(1)
    return eager_attention_forward(module, query, key, value, causal,
                                   scaling=scaling)


def _capture_qk(model, inputs):
    """Post-RoPE queries and keys of every text layer from a plain forward."""
    captured = {}

    def capture(module, query, key, value, attention_mask, scaling=None,
                **kwargs):
        captured[module.layer_idx] = (query[0].transpose(0, 1),
                                      key[0].transpose(0, 1))
        return _causal_eager(module, query, key, value, scaling)

    AttentionInterface.register("capture_qk", capture)
    model.set_attn_implementation({"text_config": "capture_qk"})
    with torch.no_grad():
        model(**inputs)
    return captured


def _masked_attention(kept, prompt_len):
    """Full HF cache; at decode each KV head sees only its kept prompt tokens."""

    def attend(module, query, key, value, attention_mask, scaling=None,
               **kwargs):
        if query.shape[2] > 1:  # prefill: plain causal attention
            return _causal_eager(module, query, key, value, scaling)
        positions, counts = kept[module.layer_idx]
        num_kv_heads, num_keys = key.shape[1], key.shape[2]
        visible = torch.zeros(num_kv_heads, num_keys, dtype=torch.bool)
        visible[:, prompt_len:] = True
        for head in range(num_kv_heads):
            visible[head, positions[head, :counts[head]]] = True
        group = query.shape[1] // num_kv_heads
        mask = torch.zeros(num_kv_heads, num_keys).masked_fill(
            ~visible, float("-inf")).repeat_interleave(group, 0)
        logits = query @ repeat_kv(key, group).transpose(2, 3) * scaling
        probs = torch.softmax(logits + mask[None, :, None, :], -1)
        out = probs @ repeat_kv(value, group)
        return out.transpose(1, 2).contiguous(), probs

    return attend


@pytest.mark.parametrize("name", sorted(MODELS))
def test_eviction_matches_masked_full_cache(name):
    model, inputs, scores = _setup(name)
    prompt_len = inputs["input_ids"].shape[1]
    budget, window = 20, 8
    text = model.config.get_text_config()
    caps = head_budgets(scores, text.num_key_value_heads, budget, window)
    full_tokens, full_logits = _hf_greedy(model, inputs, 1)
    qk = _capture_qk(model, inputs)

    oracle = SparseMMOracle(model, caps, budget, window)
    result = oracle.generate(inputs, 16)

    # the first token comes from the uncompressed prefill
    assert result.tokens[0] == full_tokens[0]
    # float32 rounding of the same prefill (see the no-eviction test)
    torch.testing.assert_close(result.logits[0], full_logits[0], rtol=0,
                               atol=1e-5)
    # every layer kept what the selection picks from its own queries and keys
    assert len(result.kept) == text.num_hidden_layers
    for layer, (positions, counts) in enumerate(result.kept):
        q, k = qk[layer]
        want_pos, want_counts = kept_positions(q[-window:], k, caps[layer])
        assert torch.equal(counts, want_counts)
        assert torch.equal(positions, want_pos)
        assert torch.equal(counts, kept_counts(caps[layer], prompt_len, budget,
                                               window))
    # decoding over ragged per-head caches == transformers' cache + masking,
    # with transformers computing the decode positions (M-RoPE included)
    kept = dict(enumerate(result.kept))
    AttentionInterface.register("masked_sparsemm",
                                _masked_attention(kept, prompt_len))
    model.set_attn_implementation({"text_config": "masked_sparsemm"})
    masked = model.generate(**inputs, max_new_tokens=16, do_sample=False,
                            eos_token_id=None, pad_token_id=0,
                            output_logits=True, return_dict_in_generate=True)
    assert masked.sequences[0, prompt_len:].tolist() == result.tokens
    # masking and ragged caches sum the same keys in other orders: float32
    # rounding, far below what one wrongly kept or dropped key changes
    torch.testing.assert_close(torch.stack(masked.logits)[:, 0].float(),
                               result.logits, rtol=0, atol=1e-5)
    # and eviction did change the computation, so the test can fail
    full = _hf_greedy(model, inputs, 16)
    assert result.tokens != full[0] or (
        (result.logits[1:] - full[1][1:]).abs().max() > 1e-3)


def test_eos_stops_generation():
    model, inputs, scores = _setup("llava-mha")
    first = SparseMMOracle.from_scores(model, scores, budget=20,
                                       window=8).generate(inputs, 6)
    stopped = SparseMMOracle.from_scores(model, scores, budget=20, window=8
                                         ).generate(inputs, 6,
                                                    eos_token_id=first.tokens[2])
    assert stopped.tokens == first.tokens[:3]


@pytest.mark.parametrize("name, scaled", [("llava-gqa", False),
                                          ("qwen2-vl", False),
                                          ("qwen2-vl", True)])
def test_fp8_rounding_oracle_is_full_cache_generation_on_rounded_qkv(
        name, scaled):
    """``kv_dtype``: with nothing evicted, the oracle equals transformers'
    own generation whose attention reads fp8-rounded queries, keys and
    values (vLLM's fp8 cache; ``scaled``: each divided by its layer's own
    scale, rounded, multiplied back), and differs from the unrounded run,
    so the rounding is applied."""
    model, inputs, scores = _setup(name)
    fp8 = torch.float8_e4m3fn
    layers = model.config.get_text_config().num_hidden_layers
    # (k, v, q) per layer, none 1 and no two layers alike
    kv_scales = (torch.tensor([[0.5, 2.0, 0.25]]) * (1 + torch.arange(
        layers)[:, None] / 4) if scaled else None)

    def rounded(module, query, key, value, attention_mask, scaling=None,
                **kwargs):
        if scaled:
            k, v, q = kv_scales[module.layer_idx].tolist()
            query, key, value = ((t / s).to(fp8).to(t.dtype) * s for t, s in
                                 ((query, q), (key, k), (value, v)))
        else:
            query, key, value = (t.to(fp8).to(t.dtype) for t in (query, key,
                                                                  value))
        return _causal_eager(module, query, key, value, scaling)

    AttentionInterface.register("fp8_rounded", rounded)
    model.set_attn_implementation({"text_config": "fp8_rounded"})
    out = model.generate(**inputs, max_new_tokens=8, do_sample=False,
                         eos_token_id=None, pad_token_id=0, output_logits=True,
                         return_dict_in_generate=True)
    logits = torch.stack(out.logits)[:, 0].float()
    prompt_len = inputs["input_ids"].shape[1]
    oracle = SparseMMOracle.from_scores(model, scores, budget=prompt_len)
    oracle.kv_dtype, oracle.kv_scales = fp8, kv_scales
    result = oracle.generate(inputs, 8)
    assert result.tokens == out.sequences[0, prompt_len:].tolist()
    torch.testing.assert_close(result.logits, logits, rtol=0, atol=1e-5)
    plain = SparseMMOracle.from_scores(model, scores, budget=prompt_len)
    assert (plain.generate(inputs, 8).logits - logits).abs().max() > 1e-3
    if scaled:  # the scales change what the cache reads
        plain.kv_dtype = fp8
        assert (plain.generate(inputs, 8).logits - logits).abs().max() > 1e-3
