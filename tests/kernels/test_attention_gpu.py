"""The per-(row, KV head) FlashAttention call of the decode path against the
PyTorch reference, on both sides of the KV-split choice (``num_splits``),
over a 16-bit and an fp8 cache (FA3's descales)."""

import types

import pytest
import torch

from vllm_sparsemm.engine.backend import SparseMMImpl, num_splits, sm_count
from vllm_sparsemm.kernels.kv_ops import (FP8_KV_DTYPE,
                                          paged_attention_reference, to_cache)

pytestmark = pytest.mark.gpu


FP8_SCALES = (0.5, 2.0, 0.25)  # (k, v, q): none is 1, so a missed one shows


@pytest.mark.parametrize("rows", [3, 200])
@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("fp8", [False, True])
def test_per_head_decode_attention_matches_reference(rows, group, fp8):
    heads, dim, block_size, num_pages = 2, 128, 16, 4096
    sequences = rows * heads
    splits = num_splits(sequences, sm_count(torch.device("cuda")))
    assert splits == (1 if rows == 200 else 0)  # both sides of the choice
    gen = torch.Generator(device="cuda").manual_seed(rows * group)
    pages = torch.randn(num_pages, block_size, 2 * dim, device="cuda",
                        dtype=torch.float16, generator=gen)
    k_scale, v_scale, q_scale = FP8_SCALES
    if fp8:  # as reshape_and_cache_flash stores K/V: divided by the scale
        pages = torch.cat([to_cache(pages[..., :dim], FP8_KV_DTYPE, k_scale),
                           to_cache(pages[..., dim:], FP8_KV_DTYPE, v_scale)],
                          dim=-1)
    # short heads and a few long ones, as compressed heads are
    lengths = torch.randint(1, 200, (sequences, ), device="cuda",
                            generator=gen, dtype=torch.int32)
    lengths[::17] = 1500
    width = 1500 // block_size + 1
    table = torch.randint(1, num_pages, (sequences, width), device="cuda",
                          generator=gen, dtype=torch.int32)
    # vLLM's query: a strided view of the fused QKV output
    qkv = torch.randn(rows, (heads * group + 2 * heads) * dim, device="cuda",
                      dtype=torch.float16, generator=gen)
    query = qkv[:, :heads * group * dim].view(rows, heads * group, dim)
    if fp8:  # vLLM quantizes the query for an fp8 cache
        query = to_cache(query, FP8_KV_DTYPE, q_scale)
    starts = torch.arange(sequences + 1, device="cuda", dtype=torch.int32)
    impl = types.SimpleNamespace(head_size=dim, num_queries_per_kv=group,
                                 scale=dim**-0.5, vllm_flash_attn_version=3)
    scales = torch.tensor(FP8_SCALES, device="cuda") if fp8 else None
    state = types.SimpleNamespace(pages=pages, attention_views=None,
                                  scales=lambda layer: scales)
    # FA3 writes fp8 attention in bf16 only
    out = torch.empty(rows, heads * group, dim, device="cuda",
                      dtype=torch.bfloat16 if fp8 else torch.float16)
    SparseMMImpl._attend_per_kv_head(impl, state, 0, query, None, None,
                                     starts, table, lengths, 1, 4096, out)
    want = paged_attention_reference(
        query.reshape(sequences, group, dim), pages[..., :dim],
        pages[..., dim:], table, lengths, starts, dim**-0.5,
        scales=FP8_SCALES if fp8 else None, out_dtype=torch.float32)
    # fp16 inputs, fp32 softmax in both; outputs round to fp16 (~1e-3). fp8:
    # the same exact inputs, P rounded to fp8 by FA3 (a few %), bf16 outputs
    # about v_scale in size
    tolerance = dict(atol=4e-2, rtol=5e-2) if fp8 else dict(atol=2e-3,
                                                             rtol=1e-2)
    torch.testing.assert_close(out.view(sequences, group, dim).float(), want,
                               **tolerance)
