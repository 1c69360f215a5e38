"""What one attention layer does for sparsemm in one step.

In step order: write the new tokens' K/V (standard slots, or each compressed
head's own page), collect observation-window queries, select what each head
keeps once the prompt is complete, and in the last layer compact every
finished prompt. The attention itself lives in ``backend.py``; the pieces here
are device-agnostic torch, so the CPU tests run them as they are (on a GPU the
compressed K/V write and the compaction move take their kernels, whose tests
compare them with these references).
"""

from __future__ import annotations

import torch
from vllm.logger import init_logger

from vllm_sparsemm.core.pages import cdiv, page_slot, standard_row
from vllm_sparsemm.core.selection import (pool_scores, select_kept,
                                          streamed_window_scores,
                                          window_scores)
from vllm_sparsemm.engine.step_plan import (SELECTION_TOKENS, CompressedRows,
                                            SelectionBatch, StepPlan)
from vllm_sparsemm.engine.worker_state import KEY, QUERY, WorkerKVState
from vllm_sparsemm.kernels import triton_ops
from vllm_sparsemm.kernels.kv_ops import (FP8_KV_DTYPE, copy_rows,
                                          from_cache, to_cache, write_rows)

logger = init_logger("vllm.sparsemm.layers")


def compressed_page(cr: CompressedRows, state: WorkerKVState, req, head,
                    index, used=None) -> torch.Tensor:
    """Page id holding token ``index`` of local head ``head`` of compressed row ``req``.

    ``head`` is the flat index ``layer * Hkv + kv_head``; all arguments
    broadcast. Slots as ``PagePlan.slots``; entries map to the runner's block
    row as ``block_law`` lays it out (owned = list[n_c:]). ``used`` masks
    the pages that exist (the others read column 0 and must be dropped).
    """
    pages_per_block = state.space.pages_per_block
    slot = page_slot(cr.prefix_pages[req, head], cr.prefix_start[req, head],
                     cr.decode_base[req, head], pages_per_block,
                     index // state.block_size)
    column = cr.prompt_entries[req, 0] + slot // pages_per_block
    column = checked_columns(column, cr.block_rows.shape[1], used,
                             state.debug_poison)
    block = cr.block_rows[req, column].long()
    return block * pages_per_block + slot % pages_per_block


def checked_columns(column: torch.Tensor, width: int, used, debug: bool
                    ) -> torch.Tensor:
    """``column`` where ``used``, else 0; a used column past the block-table
    row is a broken block law, never clamped: an error on the CPU, and on
    the GPU in debug runs (an asynchronous device assert, no sync)."""
    if used is not None:
        column = torch.where(used, column, 0)
    inside = column < width
    if column.device.type == "cpu":
        if not bool(inside.all()):
            raise RuntimeError(f"sparsemm: a page lies past the {width} "
                               f"block-table columns")
    elif debug:
        torch._assert_async(inside.all(),
                            "sparsemm: a page lies past the block-table row")
    return column


def prepare_compressed(cr: CompressedRows, state: WorkerKVState) -> None:
    """Once per step, for every layer at once: where each new token of each
    head goes (``cr.write_rows [L, Tc * Hkv]``) and how many keys each (row,
    KV head) attends to (``cr.lengths [L, R * Hkv]``, int32), so a layer only
    slices them."""
    layers, heads = state.num_layers, state.num_kv_heads
    flat = torch.arange(layers * heads, device=cr.counts.device)[None, :]
    req = cr.token_req[:, None]
    index = cr.counts[req, flat] + cr.token_offset[:, None]  # [Tc, F]
    page = compressed_page(cr, state, req, flat, index)
    rows = page * state.block_size + index % state.block_size
    cr.write_rows = rows.view(-1, layers, heads).transpose(0, 1).reshape(
        layers, -1)
    lengths = cr.counts + cr.seq_offset[:, None]  # [R, F]
    cr.lengths = lengths.view(-1, layers, heads).transpose(0, 1).reshape(
        layers, -1).to(torch.int32)


def compressed_page_table(cr: CompressedRows, state: WorkerKVState,
                          layer: int) -> torch.Tensor:
    """Page ids ``[R * Hkv, width]`` (int32) of every (row, KV head) sequence; 0 where unused.

    The PyTorch reference of ``triton_ops.page_table``; ``width`` is a
    host-side bound on any head's pages (no sync).
    """
    device = cr.counts.device
    lengths = cr.lengths[layer].view(-1, state.num_kv_heads).long()
    num_pages = cdiv(lengths, state.block_size)  # [R, H]
    width = page_table_width(cr, state)
    req = torch.arange(len(cr.rows), device=device)[:, None, None]
    head = (layer * state.num_kv_heads +
            torch.arange(state.num_kv_heads, device=device))[None, :, None]
    page = torch.arange(width, device=device)[None, None, :]
    used = page < num_pages[..., None]
    table = compressed_page(cr, state, req, head, page * state.block_size,
                            used)
    table = torch.where(used, table, 0)
    return table.reshape(-1, width).to(torch.int32)


def page_table_width(cr: CompressedRows, state: WorkerKVState) -> int:
    return max(cdiv(cr.max_length, state.block_size), 1)


def write_compressed(cr: CompressedRows, state: WorkerKVState, layer: int,
                     key: torch.Tensor, value: torch.Tensor) -> None:
    """Append the compressed rows' new tokens to each head's own pages
    (one Triton launch on the GPU; the reference below on the CPU)."""
    if triton_ops.runs_on(key):
        triton_ops.write_kv(state.rows, cr.write_rows[layer], key, value,
                            None if cr.leading else cr.tokens,
                            state.scales(layer))
        return
    if cr.leading:
        kv = torch.cat([key[:len(cr.rows)], value[:len(cr.rows)]], dim=-1)
    else:
        kv = torch.cat([key[cr.tokens], value[cr.tokens]], dim=-1)
    write_rows(state.rows, cr.write_rows[layer], kv.flatten(0, 1),
               state.scales(layer))


def write_standard_reference(kv_cache: torch.Tensor, key: torch.Tensor,
                             value: torch.Tensor, slots: torch.Tensor,
                             scales: tuple) -> None:
    """PyTorch stand-in for vLLM's ``reshape_and_cache_flash`` into one
    layer's ``kv_cache [blocks, Hkv, bs, 2D]`` (CPU tests): the tokens with
    a slot, quantized by ``scales`` ``(k, v)`` for an fp8 cache."""
    valid = slots >= 0
    slot = slots[valid]
    count = slots.shape[0]  # key and value may be padded past it
    kv = torch.cat([to_cache(key[:count][valid], kv_cache.dtype, scales[0]),
                    to_cache(value[:count][valid], kv_cache.dtype, scales[1])],
                   dim=-1)
    block_size = kv_cache.shape[2]
    kv_cache[slot // block_size, :, slot % block_size] = kv


def collect_window_queries(plan: StepPlan, layer: int,
                           query: torch.Tensor) -> None:
    """Buffer this step's queries that fall in a prompt's observation
    window; a batch whose members' windows are all in this step takes them
    in one gather (``SelectionBatch.window_tokens``)."""
    window = plan.state.window
    for i, req in plan.window_rows:
        start, end = plan.query_start[i], plan.query_start[i + 1]
        req.window(layer, window).add(plan.rows[i].computed,
                                      query[start:end])
    for batch in plan.selection_batches:
        if batch.window_tokens is not None:
            if batch.queries is None:
                batch.queries = query.new_empty(
                    (batch.layers_per_pass, len(batch.members) * window)
                    + query.shape[1:])
            torch.index_select(query, 0, batch.window_tokens,
                               out=batch.queries[layer %
                                                 batch.layers_per_pass])


def select_layer(plan: StepPlan, layer: int,
                 block_table: torch.Tensor) -> None:
    """Pick what each head of ``layer`` keeps, for every prompt completed this step.

    Runs in each layer once its keys are in the cache. The step's prompts,
    of whatever lengths and budgets, are scored and selected together
    (``SelectionBatch``), at most SELECTION_TOKENS padded prompt tokens at
    a time; when their windows are all in this step, one pass covers the
    batch's ``layers_per_pass`` layers, run in the last of them (keys stay
    in the cache until the compaction in the last layer). A longer prompt
    is scored alone, its keys SELECTION_TOKENS at a time
    (``selection.streamed_window_scores``), so the scratch is bounded
    whatever the prompt length.
    """
    for batch in plan.selection_batches:
        if _pass_ends(plan, batch, layer):
            per_pass = batch.layers_per_pass
            _select_batch(plan, batch, layer - layer % per_pass, layer + 1,
                          block_table)
    for group in plan.selection_groups:
        if not group.batched:
            _select_long(plan, group, layer, block_table)


def selects_in(plan: StepPlan, layer: int) -> bool:
    """Whether :func:`select_layer` does any work in ``layer`` (most layers
    of a step whose passes cover several layers do none)."""
    return (any(_pass_ends(plan, batch, layer)
                for batch in plan.selection_batches)
            or any(not group.batched for group in plan.selection_groups))


def _pass_ends(plan: StepPlan, batch: SelectionBatch, layer: int) -> bool:
    """Whether ``batch``'s selection pass over its layers runs in ``layer``:
    the last of each ``layers_per_pass``, and the model's last layer."""
    return ((layer + 1) % batch.layers_per_pass == 0
            or layer == plan.state.num_layers - 1)


def _every_layers_positions(state: WorkerKVState, rows: int, width: int,
                            device) -> torch.Tensor:
    """``[rows, L, Hkv, width]``: kept positions, filled layer by layer
    (int32: they live until the compaction, one per kept token and head)."""
    return torch.empty((rows, state.num_layers, state.num_kv_heads, width),
                       dtype=torch.int32, device=device)


def _key_rows(state: WorkerKVState, blocks: torch.Tensor, layer,
              positions: torch.Tensor) -> torch.Tensor:
    """Keys ``[n, T, Hkv, D]`` of prompt ``positions [n, T]`` (or ``[T]``
    for all) of requests whose standard blocks are ``blocks [n, columns]``,
    in ``layer``; ``[m, n, T, Hkv, D]`` for a tensor of m layers. An fp8
    cache's come dequantized."""
    heads = torch.arange(state.num_kv_heads, device=blocks.device)
    if positions.ndim == 1:
        positions = positions.expand(blocks.shape[0], -1)
    block = blocks.gather(1, positions // state.space.block_size)[..., None]
    positions, at = positions[..., None], layer
    if isinstance(layer, torch.Tensor):
        at = layer.view(-1, 1, 1, 1)
        block, positions = block[None], positions[None]
    rows = standard_row(state.space, block, at, heads, positions)
    keys = state.rows[:, :state.pages.shape[-1] // 2][rows]
    return dequantized(state, keys, layer, KEY)


def _select_batch(plan: StepPlan, batch: SelectionBatch, first: int,
                  last: int, block_table: torch.Tensor) -> None:
    """Selection of layers ``[first, last)`` for a batch of prompts of any
    lengths, in one pass."""
    state = plan.state
    num_heads, window, size = state.num_kv_heads, state.window, len(
        batch.members)
    layers = last - first
    if batch.window_tokens is not None:  # [m, b, W, Hq, D]
        queries = batch.queries[:layers].view(
            layers, size, window, *batch.queries.shape[2:])
    else:
        queries = torch.stack([torch.stack(
            [req.windows.pop(layer).ready().queries for req in batch.members])
            for layer in range(first, last)])
    blocks = block_table[batch.index]  # [b, columns]
    keys = None
    layers_at = torch.arange(first, last, device=blocks.device)

    def gathered_keys():  # [m, b, N, Hkv, D]
        return _key_rows(state, blocks.long(), layers_at, batch.key_positions)

    if triton_ops.runs_on(queries):  # keys read in place
        scores = _scores_in_place(state, queries.flatten(0, 1), blocks,
                                  batch.lengths, first, batch.longest)
    else:
        queries = dequantized(state, queries, layers_at, QUERY)
        keys = gathered_keys()
        scores = window_scores(queries.flatten(0, 1), keys.flatten(0, 1),
                               state.law.plan.pool_kernel,
                               lengths=batch.lengths.repeat(layers))
    kept, counts = select_kept(
        scores.flatten(0, 1), batch.caps[first:last].flatten(), window,
        max_count=batch.width,
        lengths=(batch.lengths - window).repeat_interleave(num_heads).repeat(
            layers))
    kept = kept.view(layers, size, num_heads, batch.width)
    if batch.positions is None:
        batch.positions = _every_layers_positions(state, size, batch.width,
                                                  blocks.device)
    batch.positions[:, first:last] = kept.transpose(0, 1)
    if last == state.num_layers:
        batch.queries = None
    if counts.device.type != "cuda" or state.recorded is not None:
        _check_and_record_batch(plan, batch, first, last,
                                counts.view(layers, size, num_heads),
                                queries, gathered_keys() if keys is None
                                else keys, kept)


def _scores_in_place(state: WorkerKVState, queries, blocks, lengths,
                     first_layer: int, longest: int) -> torch.Tensor:
    """``selection.window_scores`` of prompts whose keys are in the cache,
    read there (``triton_ops.window_means``), then pooled."""
    return pool_scores(triton_ops.window_means(
        queries, state.rows, blocks, lengths, first_layer, state.num_layers,
        state.num_kv_heads, state.block_size, longest, state.kv_scales),
        state.law.plan.pool_kernel)


def warm_window_kernels(state: WorkerKVState, query: torch.Tensor,
                        block_table: torch.Tensor) -> None:
    """Build the selection's Triton kernels in one of vLLM's warm-up
    forwards, with this engine's dtypes and strides, so the first compressed
    prompt does not compile them: a latency spike, and an error under
    ``--jit-monitor-mode error``. Once per state; never inside a CUDA graph
    capture, which would record the launches."""
    if (state.window_kernels_warm or state.pages is None
            or not triton_ops.runs_on(query)
            or capturing_graph(query)):
        return
    state.window_kernels_warm = True
    window = state.window
    if block_table.shape[1] * state.block_size <= window:
        return  # no prompt this engine admits is compressed
    # one prompt of W + 1 tokens in block 0, as a selection pass lays it out:
    # queries [m * b, W, Hq, D], block-table rows [b, columns], int64 lengths
    queries = query.new_zeros((1, window) + tuple(query.shape[1:]))
    blocks = block_table.new_zeros((1, block_table.shape[1]))
    lengths = torch.full((1, ), window + 1, dtype=torch.int64,
                         device=query.device)
    _scores_in_place(state, queries, blocks, lengths, 0, window + 1)


def capturing_graph(tensor: torch.Tensor) -> bool:
    """Whether a CUDA graph is being captured on ``tensor``'s device's
    current stream (never on the CPU, where asking CUDA would start it)."""
    return tensor.is_cuda and torch.cuda.is_current_stream_capturing()


def dequantized(state: WorkerKVState, values: torch.Tensor, layers,
                column: int) -> torch.Tensor:
    """float32 ``values`` of an fp8 cache (keys, or the queries vLLM
    quantizes for it) of ``layers`` (an int, or a tensor indexing the
    leading dimension); ``values`` as they are otherwise."""
    if state.kv_scales is None or values.dtype != FP8_KV_DTYPE:
        return values
    scale = state.kv_scales[layers, column]
    return from_cache(values, scale.view(scale.shape + (1, ) * (
        values.ndim - scale.ndim)))


def _check_and_record_batch(plan, batch, first, last, counts, queries, keys,
                            kept):
    """:func:`_check_and_record` for each group of a batch's pass over
    layers ``[first, last)`` (tensors ``[m, b, ...]``)."""
    for at, layer in enumerate(range(first, last)):
        for group, lo, hi, start in batch.parts:
            rows = slice(start, start + hi - lo)
            _check_and_record(
                plan, group, layer, range(lo, hi), counts[at, rows],
                queries[at, rows], keys[at, rows, :group.prompt_len],
                kept[at, rows])


def _select_long(plan: StepPlan, group, layer: int,
                 block_table: torch.Tensor) -> None:
    """One layer's selection for prompts longer than a pass's token bound:
    one at a time, their keys streamed (the reference) or read in place."""
    state = plan.state
    device = block_table.device
    blocks = block_table[group.index].long()  # [n, columns]
    caps = state.caps(group.law, device)[layer]  # [Hkv]
    width = group.width
    if group.positions is None:
        group.positions = _every_layers_positions(
            state, len(group.members), width, device)
    in_place = triton_ops.runs_on(device)
    for j, (_, req) in enumerate(group.members):
        queries = req.windows.pop(layer).ready().queries[None]

        def keys(first, last, j=j):  # [1, last - first, Hkv, D]
            return _key_rows(state, blocks[j:j + 1], layer,
                             torch.arange(first, last, device=device))

        if in_place:  # no scratch beyond the scores, whatever the length
            scores = _scores_in_place(
                state, queries, blocks[j:j + 1],
                torch.full((1, ), group.prompt_len, device=device), layer,
                group.prompt_len)
        else:
            queries = dequantized(state, queries, layer, QUERY)
            scores = streamed_window_scores(
                queries, keys, group.prompt_len, state.law.plan.pool_kernel,
                SELECTION_TOKENS)
        kept, counts = select_kept(scores[0], caps, state.window,
                                   max_count=width)
        group.positions[j, layer] = kept
        _check_and_record(plan, group, layer, [j], counts[None], queries,
                          None if state.recorded is None else
                          keys(0, group.prompt_len), kept[None])


def _check_and_record(plan, group, layer, members, counts, queries, keys,
                      kept):
    """CPU: the selection's counts are the block law's. Tests: each layer's
    selection of each request (``state.recorded``; ``kept [n, Hkv, width]``
    padded with -1)."""
    state = plan.state
    if counts.device.type != "cuda":
        lo = state.rank * state.num_kv_heads
        want = group.law.kept(group.prompt_len)[layer, lo:lo +
                                                state.num_kv_heads]
        assert bool((counts == want).all()), (
            "sparsemm: selection and block law disagree")
    if state.recorded is not None:  # queries as scored: fp8 ones descaled
        queries = dequantized(state, queries, layer, QUERY)
        for k, j in enumerate(members):
            req_id = plan.rows[group.members[j][0]].req_id
            state.recorded.setdefault(req_id, {})[layer] = (
                queries[k].cpu(), keys[k].cpu(),
                kept[k, :, :group.width].cpu(),
                counts[k].cpu())


def _group_positions(plan: StepPlan) -> None:
    """Every batched group's kept positions ``[n, L, Hkv, width]`` from its
    batches' (a view when one batch holds the whole group)."""
    parts: dict[int, list[torch.Tensor]] = {}
    for batch in plan.selection_batches:
        for group, lo, hi, first in batch.parts:
            parts.setdefault(id(group), []).append(
                batch.positions[first:first + hi - lo, ..., :group.width])
    for group in plan.selection_groups:
        if group.batched:
            pieces = parts[id(group)]
            group.positions = (pieces[0] if len(pieces) == 1 else
                               torch.cat(pieces))


def compact(plan: StepPlan, block_table: torch.Tensor) -> None:
    """Copy every completed prompt's kept tokens into its compacted blocks.

    Runs in the last layer, once every layer has read the standard layout.
    Out of place: the kept tokens go to the ``K_c`` fresh entries after the
    prompt's ``n_c`` (``block_law``), so the prompt blocks stay intact for
    the prefix cache. Tokens after the prompt that this step also computed
    (a preempted request re-prefilling its outputs) are kept by every head,
    in decode order. Counts come from the block law on the host, so nothing
    here waits for the device.
    """
    state = plan.state
    device = block_table.device
    lo = state.rank * state.num_kv_heads
    _group_positions(plan)
    for group in plan.selection_groups:
        # [L, Hkv] kept prompt tokens per head, from the law, on the host
        counts = group.law.kept(group.prompt_len)[
            :, lo:lo + state.num_kv_heads]
        # requests with the same appended tail share one plan: moved together
        by_extra: dict[int, list[int]] = {}
        for j, (i, req) in enumerate(group.members):
            by_extra.setdefault(plan.rows[i].end - req.prompt_len, []).append(j)
        for extra, members in by_extra.items():
            if len(members) == len(group.members):
                rows, positions = group.index, group.positions
            else:
                picked = torch.tensor(members, device=device)
                rows, positions = group.index[picked], group.positions[picked]
            _compact_requests(state, group.law, group.prompt_len, extra,
                              [group.members[j][1] for j in members],
                              block_table[rows].long(), positions, counts,
                              device)


def _compact_requests(state, law, prompt_len, extra, reqs, blocks, positions,
                      counts, device):
    """Compact requests of one prompt length and tail: ``blocks [n, columns]``,
    ``positions [n, L, Hkv, width]``."""
    if extra:  # re-prefilled outputs after a preemption: appended tokens
        tail = torch.arange(prompt_len, prompt_len + extra, device=device)
        positions = _append_positions(positions, counts, tail)
    prompt = law.prompt_entries(prompt_len + extra)
    compacted = law.compacted_blocks(prompt_len, extra)
    fresh = blocks[:, prompt:prompt + compacted]
    _, tables = state.page_plan(counts, device)
    if fresh.shape[1] < compacted:
        raise RuntimeError(f"sparsemm: {fresh.shape[1]} compacted blocks in "
                           f"a block-table row of {blocks.shape[1]} for a "
                           f"plan of {compacted}")
    moves = state.compaction_moves(counts, extra, fresh.shape[1], device)
    src, dst = moves.rows(blocks, positions, fresh)
    if state.debug_poison:  # unwritten rows of the fresh blocks read as NaN
        state.poison(fresh.flatten())
    copy_rows(state.rows, src.flatten(), dst.flatten())
    if state.debug_poison and not state.prompt_blocks_cached:
        state.poison(blocks[:, :prompt].flatten())  # free, and not a cache
    max_count = int(counts.max())
    for req in reqs:
        req.adopt(tables, prompt, max_count)
    if not state.announced:  # operators see that compression runs
        state.announced = True
        logger.info("sparsemm: compressing prompts; the first, %d tokens, "
                    "keeps %d blocks of its %d", prompt_len, fresh.shape[1],
                    prompt)


def _append_positions(positions, counts, tail):
    """Put ``tail`` right after each head's ``counts`` kept positions
    (``positions [..., L, Hkv, width]``)."""
    width = positions.shape[-1]
    device = positions.device
    out = torch.full(positions.shape[:-1] + (width + len(tail), ), -1,
                     dtype=positions.dtype, device=device)
    out[..., :width] = positions
    index = counts.to(device)[..., None] + torch.arange(len(tail), device=device)
    index = index.expand(out.shape[:-1] + (len(tail), ))
    out.scatter_(-1, index, tail.to(out.dtype).expand(index.shape).contiguous())
    return out
