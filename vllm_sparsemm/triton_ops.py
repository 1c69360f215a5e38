"""Triton kernels of the per-layer decode path, one launch each.

``page_table`` writes one layer's per-(row, KV head) page table; its PyTorch
reference is ``layer_ops.compressed_page_table`` (about 40 small ops).
``write_kv`` appends the step's new K/V to each head's own page; its
reference is ``kv_ops.write_rows`` after a ``cat`` of K and V (two launches
and a [T, Hkv, 2D] temporary per layer). The tests compare each kernel with
its reference: on the GPU, and on the CPU through Triton's interpreter
(``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - vLLM ships Triton on CUDA machines
    triton = None


if triton is not None:

    @triton.jit
    def _page_table_kernel(table_ptr, prefix_pages_ptr, prefix_start_ptr,
                           decode_base_ptr, lengths_ptr, kept_ptr, prompt_ptr,
                           block_rows_ptr, plan_stride, block_rows_stride,
                           num_columns, head0, num_heads, width,
                           pages_per_block, block_size, BLOCK: tl.constexpr):
        seq = tl.program_id(0)  # row * num_heads + head
        row = seq // num_heads
        flat_head = head0 + seq % num_heads
        plan_at = row * plan_stride + flat_head
        prefix_pages = tl.load(prefix_pages_ptr + plan_at)
        prefix_start = tl.load(prefix_start_ptr + plan_at)
        decode_base = tl.load(decode_base_ptr + plan_at)
        length = tl.load(lengths_ptr + seq).to(tl.int64)
        num_pages = (length + block_size - 1) // block_size
        kept = tl.load(kept_ptr + row)
        prompt = tl.load(prompt_ptr + row)
        # one program per (sequence, BLOCK columns): no loop over a runtime
        # bound, which Triton's interpreter cannot index under NumPy >= 2.4
        page = (tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
        # page_plan.page_slot, then the block law's entry -> list column
        slot = tl.where(page < prefix_pages, prefix_start + page,
                        decode_base + (page - prefix_pages) * pages_per_block)
        entry = slot // pages_per_block
        column = tl.where(entry < kept, entry, prompt + entry - kept)
        column = tl.minimum(column, num_columns - 1)
        used = page < num_pages
        block = tl.load(block_rows_ptr + row * block_rows_stride + column,
                        mask=used, other=0).to(tl.int64)
        value = tl.where(used, block * pages_per_block +
                         slot % pages_per_block, 0)
        tl.store(table_ptr + seq * width + page, value.to(tl.int32),
                 mask=page < width)

    @triton.jit
    def _write_kv_kernel(rows_ptr, dst_ptr, tokens_ptr, key_ptr, value_ptr,
                         key_token_stride, key_head_stride,
                         value_token_stride, value_head_stride, row_stride,
                         num_heads, dim, HAS_TOKENS: tl.constexpr,
                         BLOCK_D: tl.constexpr):
        seq = tl.program_id(0)  # token * num_heads + head, as dst is laid out
        token = seq // num_heads
        head = seq % num_heads
        if HAS_TOKENS:
            token = tl.load(tokens_ptr + token)
        token = token.to(tl.int64)
        d = tl.arange(0, BLOCK_D)
        used = d < dim
        key = tl.load(key_ptr + token * key_token_stride +
                      head * key_head_stride + d, mask=used)
        value = tl.load(value_ptr + token * value_token_stride +
                        head * value_head_stride + d, mask=used)
        row = rows_ptr + tl.load(dst_ptr + seq).to(tl.int64) * row_stride
        tl.store(row + d, key.to(rows_ptr.dtype.element_ty), mask=used)
        tl.store(row + dim + d, value.to(rows_ptr.dtype.element_ty),
                 mask=used)


AVAILABLE = triton is not None
# page-table columns per program: the whole row up to this width. Launches
# are latency-bound (a full-graph step's width covers max_model_len: 256
# columns in 64-column programs cost 3x one program per row).
_MAX_BLOCK = 256


def page_table(cr, state, layer: int, width: int) -> torch.Tensor:
    """``layer_ops.compressed_page_table`` in one kernel launch: int32 ``[R * Hkv, width]``."""
    heads = state.num_kv_heads
    num_seqs = len(cr.rows) * heads
    table = torch.empty(num_seqs, width, dtype=torch.int32,
                        device=cr.counts.device)
    if num_seqs == 0:
        return table
    block = min(triton.next_power_of_2(width), _MAX_BLOCK)
    _page_table_kernel[(num_seqs, triton.cdiv(width, block))](
        table, cr.prefix_pages, cr.prefix_start, cr.decode_base,
        cr.lengths[layer], cr.kept_entries, cr.prompt_entries, cr.block_rows,
        cr.prefix_pages.stride(0), cr.block_rows.stride(0),
        cr.block_rows.shape[1], layer * heads, heads, width,
        state.space.pages_per_block, state.block_size, BLOCK=block)
    return table


def write_kv(rows: torch.Tensor, dst: torch.Tensor, key: torch.Tensor,
             value: torch.Tensor, tokens: torch.Tensor | None) -> None:
    """``rows[dst[t * Hkv + h]] = K|V of token tokens[t] (or t), head h``.

    ``key``/``value``: ``[T, Hkv, D]`` with unit stride in D (vLLM's views of
    the fused QKV output qualify); ``rows``: ``[R, 2D]``, each row K|V of one
    token of one head. ``tokens`` picks the tokens; None means the first
    ``len(dst) / Hkv``.
    """
    heads, dim = key.shape[1], key.shape[2]
    if dst.numel() == 0:
        return
    assert key.stride(2) == 1 and value.stride(2) == 1 and rows.stride(1) == 1
    _write_kv_kernel[(dst.numel(), )](
        rows, dst, tokens if tokens is not None else dst, key, value,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        rows.stride(0), heads, dim, HAS_TOKENS=tokens is not None,
        BLOCK_D=triton.next_power_of_2(dim))
