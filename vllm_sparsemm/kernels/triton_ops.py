"""Triton kernels of the per-layer decode path and of the selection.

``page_table`` writes one layer's per-(row, KV head) page table; its PyTorch
reference is ``layer_ops.compressed_page_table`` (about 40 small ops).
``write_kv`` appends the step's new K/V to each head's own page; its
reference is ``kv_ops.write_rows`` after a ``cat`` of K and V (two launches
and a [T, Hkv, 2D] temporary per layer). ``paged_decode`` is the decode
rows' attention over per-head pages (``decode_kernel: "triton"``); its
reference is ``kv_ops.paged_attention_reference``. ``window_means`` scores a
batch of prompts' keys for the selection, reading them from the cache in
place (two launches); its reference is ``selection.window_means`` over keys
gathered with ``layer_ops._key_rows``. The tests compare each
kernel with its reference: on the GPU, and on the CPU through Triton's
interpreter (``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import os

import torch

from vllm_sparsemm.kernels.kv_ops import FP8_KV_DTYPE
from vllm_sparsemm.kernels.launch import Launcher

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - vLLM ships Triton on CUDA machines
    triton = None


# Pointers the kernels read one index at a time: their 16-byte alignment buys
# no wider load, and it varies from step to step (``host_arrays.upload``
# packs the step's arrays into one buffer, at offsets the step's sizes set).
# Triton would build a variant per alignment pattern, mid-run, when a step
# first shows it: each such build stalls serving for as long as it takes.
_INDEX_POINTERS = ("table_ptr", "lengths_ptr", "prefix_pages_ptr",
                   "prefix_start_ptr", "decode_base_ptr", "prompt_ptr",
                   "block_rows_ptr")
# a layer's fp8 scales are a row of one [L, 3] tensor, at 12-byte steps;
# without fp8 an index view stands in for them: neither may pick a build

if triton is not None:

    @triton.jit
    def _plan_source(prefix_pages_ptr, prefix_start_ptr, decode_base_ptr,
                     prompt_ptr, block_rows_ptr, row, flat_head,
                     plan_stride, block_rows_stride, num_columns,
                     pages_per_block):
        """What ``_page_of`` needs from the step plan for one (row, flat
        head): prefix pages, prefix start, decode base, the prompt entries
        before the owned ones, the row's block list, its width and pages per
        block."""
        plan_at = row * plan_stride + flat_head
        return (tl.load(prefix_pages_ptr + plan_at),
                tl.load(prefix_start_ptr + plan_at),
                tl.load(decode_base_ptr + plan_at),
                tl.load(prompt_ptr + row),
                block_rows_ptr + row.to(tl.int64) * block_rows_stride,
                num_columns, pages_per_block)

    @triton.jit
    def _page_of(column, source, FROM_PLAN: tl.constexpr, used=True):
        """Page id of a sequence's ``column``-th page(s): ``FROM_PLAN``, from
        ``_plan_source`` (page_plan.page_slot, then the block law's entry ->
        list column), else from ``source = (its page-table row, )``. Pages
        not ``used`` read list column 0 (callers drop them). A used page is
        never clamped into the row: debug runs check the columns with the
        PyTorch references instead (``layer_ops.checked_columns``)."""
        if FROM_PLAN:
            (prefix_pages, prefix_start, decode_base, prompt,
             block_row, num_columns, pages_per_block) = source
            slot = tl.where(column < prefix_pages, prefix_start + column,
                            decode_base + (column - prefix_pages) *
                            pages_per_block)
            where = tl.where(used, prompt + slot // pages_per_block, 0)
            block = tl.load(block_row + where)
            return block.to(tl.int64) * pages_per_block + slot % pages_per_block
        else:
            return tl.load(source[0] + column).to(tl.int64)

    # (table_ptr is this kernel's output: aligned, and stored lane-wide)
    @triton.jit(do_not_specialize=("width", ),
                do_not_specialize_on_alignment=_INDEX_POINTERS[1:])
    def _page_table_kernel(table_ptr, lengths_ptr, prefix_pages_ptr,
                           prefix_start_ptr, decode_base_ptr,
                           prompt_ptr, block_rows_ptr, plan_stride,
                           block_rows_stride, num_columns, head0,
                           pages_per_block, num_heads, width, block_size,
                           BLOCK: tl.constexpr):
        seq = tl.program_id(0)  # row * num_heads + head
        row = seq // num_heads
        source = _plan_source(prefix_pages_ptr, prefix_start_ptr,
                              decode_base_ptr, prompt_ptr,
                              block_rows_ptr, row, head0 + seq % num_heads,
                              plan_stride, block_rows_stride, num_columns,
                              pages_per_block)
        length = tl.load(lengths_ptr + seq).to(tl.int64)
        num_pages = (length + block_size - 1) // block_size
        # one program per (sequence, BLOCK columns): no loop over a runtime
        # bound, which Triton's interpreter cannot index under NumPy >= 2.4
        page = (tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
        used = page < num_pages
        value = tl.where(used, _page_of(page, source, True, used), 0)
        tl.store(table_ptr + seq * width + page, value.to(tl.int32),
                 mask=page < width)

    @triton.jit
    def _to_cache(x, scales_ptr, column, limit, QUANT: tl.constexpr,
                  INTERPRET: tl.constexpr):
        """``x`` as the cache stores it: fp8 (``QUANT``) divided by its
        scale and saturated, as ``kv_ops.to_cache``; else as it is."""
        if QUANT:
            # correctly rounded, and NaN kept (a poisoned row stays NaN)
            x = tl.div_rn(x.to(tl.float32), tl.load(scales_ptr + column))
            x = tl.clamp(x, -limit, limit, propagate_nan=tl.PropagateNan.ALL)
            if INTERPRET:
                x = _on_e4m3_grid(x)
        return x

    @triton.jit
    def _on_e4m3_grid(x):
        """fp32 ``x`` (within fp8's range) rounded to the nearest e4m3 value,
        ties to even, in fp32 arithmetic; the GPU's conversion does this
        itself, Triton's interpreter halves values whose mantissa carries."""
        bits = x.to(tl.int32, bitcast=True)
        exponent = tl.maximum(((bits >> 23) & 0xFF) - 127, -6)  # subnormals
        # 1.5 x 2^(ulp + 23): adding it rounds to a multiple of the ulp
        magic = (((exponent - 3 + 150) << 23) | (1 << 22)).to(tl.float32,
                                                               bitcast=True)
        size = (tl.abs(x) + magic) - magic
        return tl.where(bits < 0, -size, size)

    @triton.jit(do_not_specialize_on_alignment=("dst_ptr", "tokens_ptr",
                                                "scales_ptr"))
    def _write_kv_kernel(rows_ptr, dst_ptr, tokens_ptr, key_ptr, value_ptr,
                         key_token_stride, key_head_stride,
                         value_token_stride, value_head_stride, row_stride,
                         num_heads, dim, scales_ptr, limit,
                         HAS_TOKENS: tl.constexpr, BLOCK_D: tl.constexpr,
                         QUANT: tl.constexpr, INTERPRET: tl.constexpr):
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
        key = _to_cache(key, scales_ptr, 0, limit, QUANT, INTERPRET)
        value = _to_cache(value, scales_ptr, 1, limit, QUANT, INTERPRET)
        tl.store(row + d, key.to(rows_ptr.dtype.element_ty), mask=used)
        tl.store(row + dim + d, value.to(rows_ptr.dtype.element_ty),
                 mask=used)

    @triton.jit
    def _decode_page(q, pages_ptr, page, column, page_stride, offsets, t,
                     dim_used, last, m, l, acc, scale, dim, BS: tl.constexpr):
        """One page of keys into the online softmax (fp32 scores and sums).
        The page's base is one 64-bit scalar and its [BS, D] offsets int32
        and loop-invariant, which spares registers."""
        base = pages_ptr + page * page_stride
        valid = column * BS + t < last
        kv_mask = valid[:, None] & dim_used[None, :]
        # fp8 pages widen exactly to the query's 16-bit type; their scales
        # apply to the scores and the output
        k = tl.load(base + offsets, mask=kv_mask, other=0.0).to(q.dtype)
        v = tl.load(base + dim + offsets, mask=kv_mask, other=0.0).to(q.dtype)
        scores = tl.dot(q, tl.trans(k)) * scale  # [G_PAD, BS]
        scores = tl.where(valid[None, :], scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, 1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(scores - m_new[:, None])
        l = l * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        return m_new, l, acc

    @triton.jit
    def _query_key_scale(q_ptr, scales_ptr):
        """The factor fp8 keys (and fp8 queries) put on the scores: the
        layer's k scale, times its q scale when vLLM quantized the query."""
        k_scale = tl.load(scales_ptr)
        if q_ptr.dtype.element_ty == tl.float8e4nv:
            k_scale = k_scale * tl.load(scales_ptr + 2)
        return k_scale

    @triton.jit(do_not_specialize_on_alignment=_INDEX_POINTERS + (
        "scales_ptr", ))
    def _decode_kernel(q_ptr, q_row_stride, q_head_stride, pages_ptr,
                       page_stride, token_stride, table_ptr, table_stride,
                       lengths_ptr, out_ptr, out_row_stride, out_head_stride,
                       part_ptr, num_kv_heads, group, dim, scale,
                       prefix_pages_ptr, prefix_start_ptr,
                       decode_base_ptr, prompt_ptr, block_rows_ptr,
                       plan_stride, block_rows_stride, num_columns, head0,
                       pages_per_block, scales_ptr, G_PAD: tl.constexpr,
                       BLOCK_D: tl.constexpr, BS: tl.constexpr,
                       SPLIT: tl.constexpr, FROM_PLAN: tl.constexpr,
                       INTERPRET: tl.constexpr, NUM_STAGES: tl.constexpr,
                       QUANT: tl.constexpr):
        seq = tl.program_id(0)  # row * num_kv_heads + KV head
        split = tl.program_id(1)
        row, kv_head = seq // num_kv_heads, seq % num_kv_heads
        g = tl.arange(0, G_PAD)
        d = tl.arange(0, BLOCK_D)
        t = tl.arange(0, BS)
        head_used, dim_used = g < group, d < dim
        q = tl.load(q_ptr + row.to(tl.int64) * q_row_stride +
                    (kv_head * group + g)[:, None] * q_head_stride + d[None, :],
                    mask=head_used[:, None] & dim_used[None, :], other=0.0)
        if QUANT:  # fp8 pages (and fp8 queries): descale scores and output
            q = q.to(out_ptr.dtype.element_ty)
            scale = scale * _query_key_scale(q_ptr, scales_ptr)
        length = tl.load(lengths_ptr + seq)
        # each sequence's own pages in equal parts: a long (visual) head
        # spreads over all its splits, as a short one does
        per_split = tl.cdiv(tl.cdiv(length, BS), tl.num_programs(1))
        first = split * per_split
        last = tl.minimum(length, (first + per_split) * BS)  # keys
        # finite floor: a split with no keys leaves m finite and l zero
        m = tl.full([G_PAD], -1.0e30, tl.float32)
        l = tl.zeros([G_PAD], tl.float32)
        acc = tl.zeros([G_PAD, BLOCK_D], tl.float32)
        if FROM_PLAN:  # this (row, layer's head) of the step plan
            source = _plan_source(prefix_pages_ptr, prefix_start_ptr,
                                  decode_base_ptr, prompt_ptr,
                                  block_rows_ptr, row, head0 + kv_head,
                                  plan_stride, block_rows_stride, num_columns,
                                  pages_per_block)
        else:
            source = (table_ptr + seq.to(tl.int64) * table_stride, )
        offsets = t[:, None] * token_stride + d[None, :]
        end = tl.cdiv(last, BS)  # past the split's last page
        if INTERPRET:  # the interpreter cannot range() over tensors
            column = first
            while column < end:
                m, l, acc = _decode_page(
                    q, pages_ptr, _page_of(column, source, FROM_PLAN), column,
                    page_stride, offsets, t, dim_used, last, m, l, acc, scale,
                    dim, BS)
                column += 1
        else:  # Triton pipelines the page loads (cp.async, NUM_STAGES deep)
            for column in tl.range(first, end, num_stages=NUM_STAGES):
                m, l, acc = _decode_page(
                    q, pages_ptr, _page_of(column, source, FROM_PLAN), column,
                    page_stride, offsets, t, dim_used, last, m, l, acc, scale,
                    dim, BS)
        if QUANT:
            acc = acc * tl.load(scales_ptr + 1)
        if SPLIT:  # partials [S, splits, group, BLOCK_D + 2]: acc | m | l
            width = BLOCK_D + 2
            base = part_ptr + ((seq.to(tl.int64) * tl.num_programs(1) + split)
                               * group + g) * width
            tl.store(base[:, None] + d[None, :], acc, mask=head_used[:, None])
            tl.store(base + BLOCK_D, m, mask=head_used)
            tl.store(base + BLOCK_D + 1, l, mask=head_used)
        else:
            result = acc / tl.where(l > 0, l, 1.0)[:, None]
            tl.store(out_ptr + row.to(tl.int64) * out_row_stride +
                     (kv_head * group + g)[:, None] * out_head_stride +
                     d[None, :], result.to(out_ptr.dtype.element_ty),
                     mask=head_used[:, None] & dim_used[None, :])

    @triton.jit(do_not_specialize=("num_splits", ))
    def _decode_combine_kernel(part_ptr, out_ptr, out_row_stride,
                               out_head_stride, num_kv_heads, group, dim,
                               num_splits, G_PAD: tl.constexpr,
                               BLOCK_D: tl.constexpr, SPLITS: tl.constexpr):
        seq = tl.program_id(0)
        row, kv_head = seq // num_kv_heads, seq % num_kv_heads
        width = BLOCK_D + 2
        j = tl.arange(0, SPLITS)
        g = tl.arange(0, G_PAD)
        d = tl.arange(0, BLOCK_D)
        used = (j < num_splits)[:, None] & (g < group)[None, :]
        base = part_ptr + (((seq.to(tl.int64) * num_splits + j)[:, None] *
                            group + g[None, :]) * width)  # [SPLITS, G_PAD]
        m = tl.load(base + BLOCK_D, mask=used, other=-1.0e30)
        l = tl.load(base + BLOCK_D + 1, mask=used, other=0.0)
        acc = tl.load(base[:, :, None] + d[None, None, :],
                      mask=used[:, :, None], other=0.0)
        weight = tl.exp(m - tl.max(m, 0)[None, :])  # [SPLITS, G_PAD]
        total = tl.sum(weight * l, 0)
        result = (tl.sum(weight[:, :, None] * acc, 0) /
                  tl.where(total > 0, total, 1.0)[:, None])
        tl.store(out_ptr + row.to(tl.int64) * out_row_stride +
                 (kv_head * group + g)[:, None] * out_head_stride + d[None, :],
                 result.to(out_ptr.dtype.element_ty),
                 mask=(g < group)[:, None] & (d < dim)[None, :])


    @triton.jit
    def _prompt_keys(rows_ptr, row_stride, blocks_ptr, n, used, dim_used, d,
                     layer, kv_head, num_layers, num_kv_heads,
                     BS: tl.constexpr):
        """Keys ``[BLOCK_N, BLOCK_D]`` of prompt positions ``n`` of (layer,
        KV head) in the standard layout (``pages.standard_row``), read
        through the prompt's block-table row ``blocks_ptr``."""
        block = tl.load(blocks_ptr + n // BS, mask=used, other=0).to(tl.int64)
        row = ((block * num_layers + layer) * num_kv_heads + kv_head) * BS + \
            n % BS
        return tl.load(rows_ptr + row[:, None] * row_stride + d[None, :],
                       mask=used[:, None] & dim_used[None, :], other=0.0)

    @triton.jit
    def _window_program(prompts, first_layer, num_kv_heads, dim,
                        BLOCK_D: tl.constexpr):
        """This program's sequence (``item * Hkv + KV head``, item = pass
        layer * b + prompt), its parts, and the head-dimension lanes."""
        seq = tl.program_id(0)
        item, kv_head = seq // num_kv_heads, seq % num_kv_heads
        d = tl.arange(0, BLOCK_D)
        return (seq, item, kv_head, item % prompts,
                first_layer + item // prompts, d, d < dim)

    @triton.jit
    def _window_queries(q_ptr, q_item_stride, q_token_stride, q_head_stride,
                        item, kv_head, r, d, dim_used, group,
                        WINDOW: tl.constexpr, GW: tl.constexpr):
        """Window queries of grouped rows ``r`` (``r = g * W + w``, as
        ``selection._grouped_queries`` orders them), and which rows exist."""
        g, w = r // WINDOW, r % WINDOW
        rows_used = r < GW
        q = tl.load(q_ptr + item.to(tl.int64) * q_item_stride +
                    w[:, None] * q_token_stride +
                    (kv_head * group + g)[:, None] * q_head_stride +
                    d[None, :], mask=rows_used[:, None] & dim_used[None, :],
                    other=0.0)
        if q_ptr.dtype.element_ty == tl.float8e4nv:  # exactly, to fp16
            q = q.to(tl.float16)
        return q, w, rows_used

    @triton.jit
    def _window_scale(scale, q_ptr, scales_ptr, layer, QUANT: tl.constexpr):
        """The logits' factor: ``scale``, times ``layer``'s fp8 descales."""
        if QUANT:
            scale = scale * _query_key_scale(q_ptr, scales_ptr + layer * 3)
        return scale

    @triton.jit
    def _lse_block(q, at, start, length, m, l, scale, keys,
                   BLOCK_N: tl.constexpr, BS: tl.constexpr):
        """One block of keys into each window query's running maximum and
        sum (causal: query at position ``at`` sees keys ``<= at``)."""
        rows_ptr, row_stride, blocks, dim_used, d, layer, kv_head, \
            num_layers, num_kv_heads = keys
        n = start + tl.arange(0, BLOCK_N)
        used = n < length
        k = _prompt_keys(rows_ptr, row_stride, blocks, n, used, dim_used, d,
                         layer, kv_head, num_layers, num_kv_heads, BS)
        s = tl.dot(q, tl.trans(k.to(q.dtype))) * scale  # fp8 widens exactly
        s = tl.where(used[None, :] & (n[None, :] <= at[:, None]), s,
                     float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        l = l * tl.exp(m - m_new) + tl.sum(tl.exp(s - m_new[:, None]), 1)
        return m_new, l

    # the step's sizes vary from step to step: one build serves them all
    _WINDOW_SIZES = ("prompts", "first_layer", "scored_width")

    @triton.jit(do_not_specialize=_WINDOW_SIZES[:2],
                do_not_specialize_on_alignment=("blocks_ptr", "lengths_ptr",
                                                "scales_ptr"))
    def _window_lse_kernel(q_ptr, q_item_stride, q_token_stride,
                           q_head_stride, rows_ptr, row_stride, blocks_ptr,
                           blocks_stride, lengths_ptr, lse_ptr, prompts,
                           first_layer, num_layers, num_kv_heads, group, dim,
                           scale, scales_ptr, WINDOW: tl.constexpr,
                           GW: tl.constexpr, BLOCK_Q: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                           BS: tl.constexpr, QUANT: tl.constexpr,
                           INTERPRET: tl.constexpr):
        """Log-sum-exp of each window query's causal softmax over its
        prompt's keys: ``lse [items, Hkv, GW]`` (item = pass layer * b +
        prompt)."""
        seq, item, kv_head, prompt, layer, d, dim_used = _window_program(
            prompts, first_layer, num_kv_heads, dim, BLOCK_D)
        scale = _window_scale(scale, q_ptr, scales_ptr, layer, QUANT)
        r = tl.program_id(1) * BLOCK_Q + tl.arange(0, BLOCK_Q)
        q, w, rows_used = _window_queries(
            q_ptr, q_item_stride, q_token_stride, q_head_stride, item,
            kv_head, r, d, dim_used, group, WINDOW, GW)
        length = tl.load(lengths_ptr + prompt)
        at = length - WINDOW + w  # each query's prompt position
        blocks = blocks_ptr + prompt.to(tl.int64) * blocks_stride
        m = tl.full([BLOCK_Q], -1.0e30, tl.float32)
        l = tl.zeros([BLOCK_Q], tl.float32)
        keys = (rows_ptr, row_stride, blocks, dim_used, d, layer, kv_head,
                num_layers, num_kv_heads)
        if INTERPRET:  # the interpreter cannot range() to a loaded bound
            start = 0
            while start < length:
                m, l = _lse_block(q, at, start, length, m, l, scale, keys,
                                  BLOCK_N, BS)
                start += BLOCK_N
        else:
            for start in range(0, length, BLOCK_N):
                m, l = _lse_block(q, at, start, length, m, l, scale, keys,
                                  BLOCK_N, BS)
        tl.store(lse_ptr + seq.to(tl.int64) * GW + r, m + tl.log(l),
                 mask=rows_used)

    @triton.jit(do_not_specialize=_WINDOW_SIZES,
                do_not_specialize_on_alignment=("blocks_ptr", "lengths_ptr",
                                                "scales_ptr"))
    def _window_means_kernel(q_ptr, q_item_stride, q_token_stride,
                             q_head_stride, rows_ptr, row_stride, blocks_ptr,
                             blocks_stride, lengths_ptr, lse_ptr, out_ptr,
                             scored_width, prompts, first_layer, num_layers,
                             num_kv_heads, group, dim, scale, scales_ptr,
                             WINDOW: tl.constexpr, GW: tl.constexpr,
                             BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
                             BLOCK_D: tl.constexpr, BS: tl.constexpr,
                             QUANT: tl.constexpr):
        """Each scored key's probability averaged over the window queries:
        ``out [items, Hkv, scored_width]``, zero past the prompt's own
        ``length - W`` scored keys (every window query sees every scored
        key: no causal mask)."""
        seq, item, kv_head, prompt, layer, d, dim_used = _window_program(
            prompts, first_layer, num_kv_heads, dim, BLOCK_D)
        scale = _window_scale(scale, q_ptr, scales_ptr, layer, QUANT)
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        scored = tl.load(lengths_ptr + prompt) - WINDOW
        used = n < scored
        k = _prompt_keys(rows_ptr, row_stride,
                         blocks_ptr + prompt.to(tl.int64) * blocks_stride, n,
                         used, dim_used, d, layer, kv_head, num_layers,
                         num_kv_heads, BS)
        total = tl.zeros([BLOCK_N], tl.float32)
        for first in tl.static_range(0, GW, BLOCK_Q):
            r = first + tl.arange(0, BLOCK_Q)
            q, _, rows_used = _window_queries(
                q_ptr, q_item_stride, q_token_stride, q_head_stride, item,
                kv_head, r, d, dim_used, group, WINDOW, GW)
            lse = tl.load(lse_ptr + seq.to(tl.int64) * GW + r,
                          mask=rows_used, other=float("inf"))
            p = tl.exp(tl.dot(q, tl.trans(k.to(q.dtype))) * scale -
                       lse[:, None])
            total += tl.sum(tl.where(rows_used[:, None], p, 0.0), 0)
        tl.store(out_ptr + seq.to(tl.int64) * scored_width + n,
                 tl.where(used, total / GW, 0.0), mask=n < scored_width)


AVAILABLE = triton is not None
if AVAILABLE:  # launched past Triton's launch path, which binds the host
    _launch_page_table = Launcher(_page_table_kernel)
    _launch_write_kv = Launcher(_write_kv_kernel)
    _launch_decode = Launcher(_decode_kernel)
    _launch_decode_combine = Launcher(_decode_combine_kernel)
    _launch_window_lse = Launcher(_window_lse_kernel)
    _launch_window_means = Launcher(_window_means_kernel)


def runs_on(where) -> bool:
    """Whether these kernels run on ``where`` (a tensor or a device): a CUDA
    device, with Triton installed. Elsewhere the PyTorch references do."""
    device = where.device if isinstance(where, torch.Tensor) else where
    return AVAILABLE and torch.device(device).type == "cuda"

MAX_SPLITS = 16  # paged_decode's key splits per sequence
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# page-table columns per program: the whole row up to 256. Launches are
# latency-bound (a full-graph step's width covers max_model_len: 256 columns
# in 64-column programs cost 3x one program per row). Two sizes only: each
# is a build, and eager steps' widths vary step by step.
_TABLE_BLOCKS = (64, 256)


def page_table(cr, state, layer: int, width: int) -> torch.Tensor:
    """``layer_ops.compressed_page_table`` in one kernel launch: int32 ``[R * Hkv, width]``."""
    heads = state.num_kv_heads
    num_seqs = len(cr.rows) * heads
    table = torch.empty(num_seqs, width, dtype=torch.int32,
                        device=cr.counts.device)
    if num_seqs == 0:
        return table
    block = _TABLE_BLOCKS[0] if width <= _TABLE_BLOCKS[0] else _TABLE_BLOCKS[1]
    _launch_page_table(
        (num_seqs, triton.cdiv(width, block)), table, cr.lengths[layer],
        *_plan_args(cr, layer, state), heads, width, state.block_size,
        BLOCK=block)
    return table


def _plan_args(cr, layer: int, state) -> tuple:
    """The step plan's arguments of ``_plan_source`` (then ``pages_per_block``),
    for ``layer``: what both the page-table and the decode kernel read."""
    assert cr.prompt_entries.stride(0) == 1
    return (cr.prefix_pages, cr.prefix_start, cr.decode_base,
            cr.prompt_entries, cr.block_rows, cr.prefix_pages.stride(0),
            cr.block_rows.stride(0), cr.block_rows.shape[1],
            layer * state.num_kv_heads, state.space.pages_per_block)


def write_kv(rows: torch.Tensor, dst: torch.Tensor, key: torch.Tensor,
             value: torch.Tensor, tokens: torch.Tensor | None,
             scales: torch.Tensor | None = None) -> None:
    """``rows[dst[t * Hkv + h]] = K|V of token tokens[t] (or t), head h``.

    ``key``/``value``: ``[T, Hkv, D]`` with unit stride in D (vLLM's views of
    the fused QKV output qualify); ``rows``: ``[R, 2D]``, each row K|V of one
    token of one head. ``tokens`` picks the tokens; None means the first
    ``len(dst) / Hkv``. For an fp8 ``rows``, ``scales`` (the layer's ``(k,
    v, q)``, on the device) quantize as ``kv_ops.to_cache``.
    """
    heads, dim = key.shape[1], key.shape[2]
    if dst.numel() == 0:
        return
    assert key.stride(2) == 1 and value.stride(2) == 1 and rows.stride(1) == 1
    quant = _quantized(rows, scales)
    _launch_write_kv(
        (dst.numel(), ), rows, dst, tokens if tokens is not None else dst,
        key, value, key.stride(0), key.stride(1), value.stride(0),
        value.stride(1), rows.stride(0), heads, dim, scales if quant else dst,
        torch.finfo(rows.dtype).max if quant else 0.0,
        HAS_TOKENS=tokens is not None, BLOCK_D=triton.next_power_of_2(dim),
        QUANT=quant, INTERPRET=_INTERPRET)


def _quantized(cache: torch.Tensor, scales: torch.Tensor | None) -> bool:
    """Whether ``cache`` holds fp8 values, which ``scales`` then dequantize."""
    fp8 = cache.dtype == FP8_KV_DTYPE
    if fp8 and scales is None:
        raise ValueError("an fp8 KV cache needs its layer's scales")
    return fp8


def paged_decode(query: torch.Tensor, pages: torch.Tensor,
                 table: torch.Tensor | None, lengths: torch.Tensor,
                 scale: float, out: torch.Tensor, num_splits: int = 1,
                 num_warps: int = 2, num_stages: int = 3,
                 plan: tuple | None = None,
                 scales: torch.Tensor | None = None) -> torch.Tensor:
    """One query token per (row, KV head) over that head's own pages: a
    split-K decode kernel that reads the packed pages in place, a page per
    loop iteration (``decode_kernel: "triton"``; its reference is
    ``kv_ops.paged_attention_reference``).

    ``query``/``out``: ``[R, Hkv * G, D]`` with unit stride in D (vLLM's
    strided query view qualifies); ``pages``: ``[P, block_size, 2D]``, each
    token K|V; ``lengths``: ``[R * Hkv]``. The pages come from ``table``
    (``[R * Hkv, width]`` int32) or, with ``table`` None, straight from the
    step plan ``plan = (cr, layer, state)`` (``CompressedRows``, a layer, its
    ``WorkerKVState``), as ``page_table`` would write them: no table is
    built. With ``num_splits`` > 1 each sequence's own pages are cut in
    that many equal ranges (a long head is then not one program's walk
    while the rest of the GPU waits) and a second launch combines them.
    ``num_warps`` and ``num_stages`` (page loads in flight, through
    cp.async) are there for ``benchmarks/attention_bench.py`` to tune; the
    defaults are its fastest on the GPUs measured (docs/benchmarks.md).
    fp8 ``pages`` (and queries) are read with the layer's ``scales`` ``(k,
    v, q)``, a device tensor, as FlashAttention's descales.
    """
    rows, query_heads, dim = query.shape
    sequences = lengths.numel()
    if sequences == 0:
        return out
    kv_heads = sequences // rows
    group = query_heads // kv_heads
    quant = _quantized(pages, scales)
    assert query.stride(2) == 1 and out.stride(2) == 1 and pages.stride(2) == 1
    assert lengths.is_contiguous()
    if table is None:  # from the plan, as _page_table_kernel reads it
        cr, layer, state = plan
        table_args = (cr.block_rows, 0)
        plan_args = _plan_args(cr, layer, state)
    else:
        assert table.stride(1) == 1
        table_args = (table, table.stride(0))
        plan_args = (table, ) * 5 + (0, 0, 1, 0, 1)
    block_d = triton.next_power_of_2(dim)
    g_pad = max(16, triton.next_power_of_2(group))  # tl.dot's smallest M
    if not 1 <= num_splits <= MAX_SPLITS:
        raise ValueError(f"num_splits must be in [1, {MAX_SPLITS}], got "
                         f"{num_splits}")
    split = num_splits > 1
    partials = (torch.empty(sequences, num_splits, group, block_d + 2,
                            dtype=torch.float32, device=query.device)
                if split else out)
    _launch_decode(
        (sequences, num_splits), query, query.stride(0), query.stride(1),
        pages, pages.stride(0), pages.stride(1), *table_args, lengths, out,
        out.stride(0), out.stride(1), partials, kv_heads, group, dim, scale,
        *plan_args, scales if quant else lengths, G_PAD=g_pad, BLOCK_D=block_d,
        BS=pages.shape[1], SPLIT=split, FROM_PLAN=table is None,
        INTERPRET=_INTERPRET, NUM_STAGES=num_stages, QUANT=quant,
        num_warps=num_warps)
    if split:  # one build for any split count; no tl.dot, so no 16-row tile
        _launch_decode_combine(
            (sequences, ), partials, out, out.stride(0), out.stride(1),
            kv_heads, group, dim, num_splits,
            G_PAD=triton.next_power_of_2(group), BLOCK_D=block_d,
            SPLITS=MAX_SPLITS)
    return out


def window_means(queries: torch.Tensor, rows: torch.Tensor,
                 blocks: torch.Tensor, lengths: torch.Tensor,
                 first_layer: int, num_layers: int, num_kv_heads: int,
                 block_size: int, longest: int,
                 scales: torch.Tensor | None = None) -> torch.Tensor:
    """``selection.window_means`` of prompts whose keys are in the paged
    cache, read in place: no gathered keys, no ``[B, Hq, W, N]`` logits.

    ``queries``: ``[m * b, W, Hq, D]`` (m layers from ``first_layer``, b
    prompts), unit stride in D; ``rows``: the packed cache as ``[R, 2D]``
    rows K|V; ``blocks``: ``[b, columns]`` the prompts' block-table rows;
    ``lengths``: ``[b]``, each in ``(W, longest]``. Returns float32 ``[m * b,
    Hkv, longest - W]``. Two launches: each window query's log-sum-exp over
    its prompt, then each scored key's mean probability. An fp8 cache's keys
    (and fp8 queries) are read with ``scales [L, 3]`` (each layer's ``(k, v,
    q)``), as ``selection`` reads them dequantized.
    """
    items, window, query_heads, dim = queries.shape
    prompts = blocks.shape[0]
    group = query_heads // num_kv_heads
    grouped = group * window
    assert queries.stride(3) == 1 and rows.stride(1) == 1
    assert blocks.stride(1) == 1 and lengths.is_contiguous()
    scored_width = longest - window
    out = torch.empty(items, num_kv_heads, scored_width, dtype=torch.float32,
                      device=queries.device)
    if items == 0 or scored_width <= 0:
        return out.zero_()
    lse = torch.empty(items, num_kv_heads, grouped, dtype=torch.float32,
                      device=queries.device)
    block_q = 32 if grouped <= 32 else 64
    block_n = 64
    common = (queries, queries.stride(0), queries.stride(1), queries.stride(2),
              rows, rows.stride(0), blocks, blocks.stride(0), lengths)
    quant = _quantized(rows, scales)
    shape = (prompts, first_layer, num_layers, num_kv_heads, group, dim,
             dim ** -0.5, scales if quant else lengths)
    sizes = dict(WINDOW=window, GW=grouped, BLOCK_Q=block_q,
                 BLOCK_N=block_n, BLOCK_D=triton.next_power_of_2(dim),
                 BS=block_size, QUANT=quant)
    seqs = items * num_kv_heads
    _launch_window_lse((seqs, triton.cdiv(grouped, block_q)), *common, lse,
                       *shape, INTERPRET=_INTERPRET, **sizes)
    _launch_window_means((seqs, triton.cdiv(scored_width, block_n)), *common,
                         lse, out, scored_width, *shape, **sizes)
    return out
