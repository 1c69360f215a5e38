"""What one attention layer does for sparsemm in one step.

In step order: write the new tokens' K/V (standard slots, or each compressed
head's own page), collect observation-window queries, select what each head
keeps once the prompt is complete, and in the last layer compact every
finished prompt. The attention itself lives in ``backend.py``; the pieces here
are device-agnostic torch, so the CPU tests run them as they are.
"""

from __future__ import annotations

import torch

from vllm_sparsemm.kv_ops import move_rows, write_rows
from vllm_sparsemm.page_plan import (RequestLayout, cdiv, compaction_rows,
                                     page_slot, prompt_rows)
from vllm_sparsemm.selection import select_kept
from vllm_sparsemm.worker_state import CompressedRows, StepPlan, WorkerKVState


def compressed_page(cr: CompressedRows, state: WorkerKVState, req, head,
                    index) -> torch.Tensor:
    """Page id holding token ``index`` of local head ``head`` of compressed row ``req``.

    ``head`` is the flat index ``layer * Hkv + kv_head``; all arguments
    broadcast. Slots as ``PagePlan.slots``; entries map to the runner's block
    row as ``block_law`` lays it out (owned = list[:K_c] + list[n_c:]).
    """
    pages_per_block = state.space.pages_per_block
    slot = page_slot(cr.prefix_pages[req, head], cr.prefix_start[req, head],
                     cr.decode_base[req, head], pages_per_block,
                     index // state.block_size)
    entry = slot // pages_per_block
    kept, prompt = cr.kept_entries[req, 0], cr.prompt_entries[req, 0]
    column = torch.where(entry < kept, entry, prompt + entry - kept)
    column = column.clamp(max=cr.block_rows.shape[1] - 1)
    return cr.block_rows[req, column] * pages_per_block + slot % pages_per_block


def compressed_lengths(cr: CompressedRows, state: WorkerKVState,
                       layer: int) -> torch.Tensor:
    """Keys each (row, KV head) attends to after this step: ``[R, Hkv]``."""
    heads = layer * state.num_kv_heads + torch.arange(
        state.num_kv_heads, device=cr.counts.device)
    return cr.counts[:, heads] + cr.seq_offset[:, None]


def compressed_page_table(cr: CompressedRows, state: WorkerKVState,
                          layer: int, lengths: torch.Tensor) -> torch.Tensor:
    """Page ids ``[R * Hkv, max_pages]`` of every (row, KV head) sequence; 0 where unused."""
    device = cr.counts.device
    num_pages = cdiv(lengths, state.block_size)  # [R, H]
    width = max(cdiv(cr.max_length, state.block_size), 1)  # no host sync
    req = torch.arange(len(cr.rows), device=device)[:, None, None]
    head = (layer * state.num_kv_heads +
            torch.arange(state.num_kv_heads, device=device))[None, :, None]
    page = torch.arange(width, device=device)[None, None, :]
    table = compressed_page(cr, state, req, head, page * state.block_size)
    table = torch.where(page < num_pages[..., None], table, 0)
    return table.reshape(-1, width)


def write_compressed(cr: CompressedRows, state: WorkerKVState, layer: int,
                     key: torch.Tensor, value: torch.Tensor) -> None:
    """Append the compressed rows' new tokens to each head's own pages."""
    device = key.device
    heads = layer * state.num_kv_heads + torch.arange(state.num_kv_heads,
                                                      device=device)
    req = cr.token_req[:, None]
    index = cr.counts[req, heads[None, :]] + cr.token_offset[:, None]
    page = compressed_page(cr, state, req, heads[None, :], index)
    rows = page * state.block_size + index % state.block_size
    kv = torch.cat([key[cr.tokens], value[cr.tokens]], dim=-1)
    write_rows(state.rows, rows.flatten(), kv.flatten(0, 1))


def write_standard_reference(state: WorkerKVState, layer: int,
                             key: torch.Tensor, value: torch.Tensor,
                             slots: torch.Tensor) -> None:
    """PyTorch stand-in for vLLM's ``reshape_and_cache_flash`` (CPU tests)."""
    valid = slots >= 0
    slot = slots[valid]
    block, offset = slot // state.block_size, slot % state.block_size
    heads = torch.arange(state.num_kv_heads, device=key.device)
    page = state.space.page_id(layer, block[:, None], heads[None, :])
    rows = page * state.block_size + offset[:, None]
    kv = torch.cat([key[:slots.shape[0]][valid], value[:slots.shape[0]][valid]],
                   dim=-1)
    write_rows(state.rows, rows.flatten(), kv.flatten(0, 1))


def collect_window_queries(plan: StepPlan, layer: int,
                           query: torch.Tensor) -> None:
    """Buffer this step's queries that fall in a prompt's observation window."""
    for i, req in plan.window_rows:
        start, end = plan.query_start[i], plan.query_start[i + 1]
        req.window(layer, plan.state.window).add(plan.rows[i].computed,
                                                 query[start:end])


def select_for_layer(plan: StepPlan, layer: int,
                     block_table: torch.Tensor) -> None:
    """Pick each head's kept prompt tokens for every prompt completed this step."""
    state = plan.state
    head_dim = state.pages.shape[-1] // 2
    heads = torch.arange(state.num_kv_heads, device=block_table.device)
    for i, req in plan.compressing:
        positions = torch.arange(req.prompt_len, device=block_table.device)
        rows = prompt_rows(state.space, block_table[i].long(), layer,
                           heads[None, :], positions[:, None])
        keys = state.rows[rows][..., :head_dim]  # [P, Hkv, D]
        scores = req.windows[layer].scores(keys, state.law.plan.pool_kernel)
        req.selected[layer] = select_kept(scores, state.caps[layer],
                                          state.window)
        if state.recorded is not None:  # tests: what each layer selected from
            state.recorded.setdefault(plan.rows[i].req_id, {})[layer] = (
                req.windows[layer].queries.cpu(), keys.cpu(),
                *(t.cpu() for t in req.selected[layer]))


def compact(plan: StepPlan, block_table: torch.Tensor) -> None:
    """Pack every completed prompt's kept tokens into its first K_c blocks.

    Runs in the last layer, once every layer has read the standard layout.
    Tokens after the prompt that this step also computed (a preempted request
    re-prefilling its outputs) are kept by every head, in decode order.
    """
    state = plan.state
    device = block_table.device
    for i, req in plan.compressing:
        row = plan.rows[i]
        extra = row.end - req.prompt_len
        positions, counts = _stack_selected(req, state.num_layers)
        expected = state.law.kept(req.prompt_len)
        lo = state.rank * state.num_kv_heads
        assert torch.equal(counts, expected[:, lo:lo + state.num_kv_heads]), (
            "sparsemm: selection and block law disagree on kept counts")
        if extra:
            tail = torch.arange(req.prompt_len, row.end)
            positions = _append_positions(positions, counts, tail)
        kept, prompt = state.law.released_range(req.prompt_len, row.end)
        blocks = block_table[i].long()
        # the block law's plan for this rank, built on the cache's device
        layout = RequestLayout(state.space, counts.to(device), 1, blocks[:kept])
        src, dst = compaction_rows(layout, blocks, positions.to(device),
                                   (counts + extra).to(device))
        move_rows(state.rows, src, dst)
        if state.debug_poison:
            _poison(state, blocks[kept:prompt])
        req.adopt(layout.plan, kept, prompt)


def _stack_selected(req, num_layers):
    width = max(int(req.selected[l][0].shape[1]) for l in range(num_layers))
    positions = torch.stack([
        torch.nn.functional.pad(req.selected[l][0].cpu(),
                                (0, width - req.selected[l][0].shape[1]),
                                value=-1) for l in range(num_layers)])
    counts = torch.stack([req.selected[l][1].cpu() for l in range(num_layers)])
    return positions, counts


def _append_positions(positions, counts, tail):
    """Put ``tail`` right after each head's ``counts`` kept positions."""
    num_layers, num_heads, width = positions.shape
    out = torch.full((num_layers, num_heads, width + len(tail)), -1,
                     dtype=positions.dtype)
    out[..., :width] = positions
    index = counts[..., None] + torch.arange(len(tail))
    out.scatter_(2, index, tail.expand(num_layers, num_heads, -1).contiguous())
    return out


def _poison(state: WorkerKVState, blocks: torch.Tensor) -> None:
    """Debug: NaN-fill released blocks so any later read of them shows."""
    if blocks.numel():
        pages = (blocks[:, None] * state.space.pages_per_block + torch.arange(
            state.space.pages_per_block, device=blocks.device)).flatten()
        state.pages[pages] = float("nan")
