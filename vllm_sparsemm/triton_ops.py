"""Triton kernel that writes one layer's per-(row, KV head) page table in one launch.

Its PyTorch reference is ``layer_ops.compressed_page_table`` (about 40 small
ops per layer; this is one launch). The tests compare the two: on the GPU, and
on the CPU through Triton's interpreter (``TRITON_INTERPRET=1``).
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
