"""KV data movement and page-list attention: PyTorch references and the CUDA path.

The references are the oracle for the CUDA kernel (``csrc/``) and the
implementation the CPU tests drive. ``copy_rows`` picks the kernel when the
extension is built for this GPU and the tensor lives on it, the reference
otherwise.
"""

from __future__ import annotations

import torch

from vllm_sparsemm.kernels import cuda_ext as _ext


def copy_rows_reference(rows: torch.Tensor, src: torch.Tensor,
                        dst: torch.Tensor) -> None:
    """``rows[dst[i]] = rows[src[i]]`` for all i; no destination may be a
    source (compaction copies out of place)."""
    rows[dst] = rows[src]


def copy_rows(rows: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> None:
    """:func:`copy_rows_reference` with the CUDA kernel where available."""
    if src.numel() == 0:
        return
    if rows.is_cuda and _ext.run_kernel("copy_rows", rows.device, rows,
                                        src.to(torch.int64),
                                        dst.to(torch.int64)):
        return
    copy_rows_reference(rows, src, dst)


FP8_KV_DTYPE = torch.float8_e4m3fn  # vLLM's "fp8" KV cache on CUDA
# the ``--kv-cache-dtype`` values that store it (e4m3, per-layer scales)
FP8_CACHE_DTYPES = ("fp8", "fp8_e4m3")


def to_cache(values: torch.Tensor, dtype: torch.dtype,
             scale: torch.Tensor | float | None = None) -> torch.Tensor:
    """``values`` as the cache stores them: for fp8, divided by ``scale`` and
    saturated to the format's finite range, as vLLM's
    ``reshape_and_cache_flash`` does; otherwise a cast."""
    if dtype != FP8_KV_DTYPE:
        return values.to(dtype)
    limit = torch.finfo(dtype).max
    return (values.float() / scale).clamp(-limit, limit).to(dtype)


def from_cache(values: torch.Tensor,
               scale: torch.Tensor | float | None = None) -> torch.Tensor:
    """float32 values of cache entries (or of queries): fp8 ones times
    ``scale``, as FlashAttention's descale does."""
    if scale is None or values.dtype != FP8_KV_DTYPE:
        return values.float()
    return values.float() * scale


def write_rows(rows: torch.Tensor, dst: torch.Tensor, values: torch.Tensor,
               scales: tuple | None = None) -> None:
    """Append new tokens: ``rows[dst[i]] = values[i]`` (decode writes; no
    overlap). ``values`` are K|V rows; ``scales`` ``(k, v)`` quantize each
    half for an fp8 cache."""
    if scales is None:
        rows[dst] = values.to(rows.dtype)
        return
    dim = values.shape[-1] // 2
    rows[dst] = torch.cat([to_cache(values[..., :dim], rows.dtype, scales[0]),
                           to_cache(values[..., dim:], rows.dtype, scales[1])],
                          dim=-1)


def paged_attention_reference(query: torch.Tensor, key_pages: torch.Tensor,
                              value_pages: torch.Tensor,
                              page_table: torch.Tensor, seq_lens: torch.Tensor,
                              query_start_loc: torch.Tensor,
                              scale: float,
                              scales: tuple | None = None,
                              out_dtype: torch.dtype | None = None
                              ) -> torch.Tensor:
    """Attention of varlen queries over per-sequence page lists, in float32.

    ``query``: ``[Tq, G, D]`` (G query heads share each sequence's single KV
    head); ``key_pages``/``value_pages``: ``[P, block_size, D]``;
    ``page_table``: ``[S, max_pages]``; ``seq_lens``: ``[S]`` keys per
    sequence; ``query_start_loc``: ``[S + 1]``. Causal, aligned bottom-right
    as in FlashAttention: query i of q_len sees keys ``< seq_len - q_len + i + 1``.
    Returns ``[Tq, G, D]`` in the query dtype, or in ``out_dtype``'s where
    given. ``scales`` ``(k, v, q)`` (a layer's, in ``WorkerKVState``'s
    order) dequantize fp8 pages and queries.
    """
    k_scale, v_scale, q_scale = scales if scales is not None else (None, ) * 3
    block_size = key_pages.shape[1]
    out = torch.empty_like(query, dtype=out_dtype or query.dtype)
    for seq in range(page_table.shape[0]):
        start, end = int(query_start_loc[seq]), int(query_start_loc[seq + 1])
        num_keys = int(seq_lens[seq])
        if end == start:
            continue
        pages = page_table[seq, :-(-num_keys // block_size)]
        keys = key_pages[pages].reshape(-1, key_pages.shape[-1])[:num_keys]
        values = value_pages[pages].reshape(-1, value_pages.shape[-1])[:num_keys]
        q = from_cache(query[start:end], q_scale)  # [q_len, G, D]
        logits = torch.einsum("qgd,kd->gqk", q, from_cache(keys, k_scale)
                              ) * scale
        q_len = end - start
        limit = num_keys - q_len + torch.arange(q_len, device=q.device)
        future = torch.arange(num_keys, device=q.device)[None, :] > limit[:, None]
        probs = torch.softmax(logits.masked_fill(future, float("-inf")), -1)
        out[start:end] = torch.einsum("gqk,kd->qgd", probs,
                                      from_cache(values, v_scale)).to(
                                          out.dtype)
    return out
