"""What sparsemm does in one step, shared by all layers: :func:`plan_step`
classifies the step's rows and builds the compressed rows' index tensors."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from vllm_sparsemm.core.block_law import BlockLaw
from vllm_sparsemm.engine.host_arrays import (distinct_tables, row_tokens,
                                              upload, virtual_sequences)
from vllm_sparsemm.engine.step_rows import RowInfo, StepRows
from vllm_sparsemm.engine.worker_state import RequestKV, WorkerKVState


@dataclass
class CompressedRows:
    """Index tensors for the rows that attend over compacted per-head pages."""
    rows: list[int]  # batch rows
    tokens: torch.Tensor  # [Tc] batch token indices
    token_req: torch.Tensor  # [Tc] index into rows
    token_offset: torch.Tensor  # [Tc] position - prompt_len
    seq_offset: torch.Tensor  # [R] (seq_len after this step) - prompt_len
    query_lens: list[int]
    prefix_pages: torch.Tensor  # [R, F]
    prefix_start: torch.Tensor  # [R, F]
    decode_base: torch.Tensor  # [R, F]
    counts: torch.Tensor  # [R, F] compacted tokens per head
    prompt_entries: torch.Tensor  # [R, 1] n_c: the owned blocks follow
    block_rows: torch.Tensor  # [R, cols] the runner's block-table rows (int32)
    # query rows of the virtual (row, KV head) sequences, in (row, head,
    # token) order; None on graph_decode's path (``leading``: views instead)
    virtual_token: torch.Tensor | None
    virtual_head: torch.Tensor | None
    virtual_starts: torch.Tensor  # [R * Hkv + 1]
    max_query_len: int
    max_length: int  # bound on any (row, head) length after this step
    # the batch's first rows, one token each (vLLM puts decodes first): the
    # compressed tokens are then [0, R) and the standard ones [R, T)
    leading: bool = False
    # filled once per step for every layer by layer_ops.prepare_compressed
    write_rows: torch.Tensor | None = None  # [L, Tc * Hkv] rows of new tokens
    lengths: torch.Tensor | None = None  # [L, R * Hkv] int32 keys per sequence


@dataclass
class SelectionGroup:
    """Prompts of one length that end in this step: scored and selected together."""
    prompt_len: int
    members: list[tuple[int, RequestKV]]  # (batch row, request)
    index: torch.Tensor  # their batch rows, on the device
    width: int  # host: the most positions any head of this rank keeps
    # every layer's kept positions [n, L, Hkv, width], padded with -1, read
    # by the compaction: set layer by layer by a streamed selection, or
    # taken from its SelectionBatches' before the compaction
    positions: torch.Tensor | None = None
    batched: bool = False  # selected in a SelectionBatch (else: streamed)

    @property
    def law(self) -> BlockLaw:
        """The members' budget's law (a group shares one)."""
        return self.members[0][1].law


@dataclass
class SelectionBatch:
    """Prompts of any lengths and budgets that end in this step, scored and
    selected together, padded to the longest: a step's selection costs the
    same few kernels however many prompt lengths a chat load brings. A
    batch whose windows are all in this step is selected for
    ``layers_per_pass`` layers at once (the padded tokens of a pass stay
    within SELECTION_TOKENS, or ``kernel_selection_tokens`` where the keys
    are read in place), so a step of few prompts runs few passes, not one
    per layer. Longer prompts are scored by their groups alone
    (streamed)."""
    # (group, its first member here, past its last, first row here): each
    # group's rows are contiguous
    parts: list[tuple[SelectionGroup, int, int, int]]
    members: list[RequestKV]  # in row order
    longest: int  # host: the longest prompt
    width: int  # host: the most positions any head keeps
    index: torch.Tensor  # [b] their batch rows
    lengths: torch.Tensor  # [b] prompt lengths
    key_positions: torch.Tensor  # [b, longest]: 0..N-1, then N-1 repeated
    caps: torch.Tensor  # [L, b, Hkv] this rank's caps of each one's budget
    # [b * W] this step's query tokens of every member's window, when each
    # one's whole window is in this step (else their windows were buffered)
    window_tokens: torch.Tensor | None = None
    layers_per_pass: int = 1
    # [layers_per_pass, b, W, Hq, D]: the window queries of the layers of
    # the pass under way, gathered layer by layer
    queries: torch.Tensor | None = None
    # every layer's kept positions [b, L, Hkv, width], padded with -1; set
    # layer by layer by the selection
    positions: torch.Tensor | None = None


@dataclass
class StepPlan:
    """What sparsemm does in one step, shared by all layers."""
    state: WorkerKVState
    rows: StepRows
    query_start: list[int]  # [B + 1] token offsets of rows
    standard_rows: list[int]
    compressed: CompressedRows | None
    window_rows: list[tuple[int, RequestKV]]
    compressing: list[tuple[int, RequestKV]]
    # the standard rows' tokens when some rows are compressed (a slice when
    # they follow the compressed rows), and their slot mapping
    standard_tokens: torch.Tensor | slice | None = None
    standard_slots: torch.Tensor | None = None
    standard_metadata: object | None = None  # FA metadata of the standard rows
    selection_groups: list[SelectionGroup] = field(default_factory=list)
    selection_batches: list[SelectionBatch] = field(default_factory=list)

    @property
    def only_standard(self) -> bool:
        return self.compressed is None and not self.window_rows


def plan_step(state: WorkerKVState, rows: Sequence[RowInfo],
              query_start: list[int], block_table: torch.Tensor
              ) -> StepPlan:
    """Classify the rows of a step and build the compressed rows' index tensors.

    Array arithmetic over the step's rows; Python per row only to look up
    the compressed rows' requests and for the few rows still in a prompt.
    """
    steps = StepRows.of(rows)
    window = state.window
    known = [state.requests.get(req_id) for req_id in steps.req_ids]
    in_prompt = steps.computed < steps.prompt_len
    # compacted requests past their prompt attend over their own pages;
    # plain rows and prompts being prefilled run vLLM's FlashAttention
    decoding = ~in_prompt & np.array([req is not None for req in known],
                                     dtype=bool)
    standard = np.flatnonzero(~decoding).tolist()
    compressed = np.flatnonzero(decoding).tolist()
    reqs = state.compacted_requests(steps, compressed)
    state.check_unseen(steps, np.flatnonzero(~in_prompt & ~decoding))
    window_rows, compressing = [], []
    for i in np.flatnonzero(in_prompt).tolist():
        row, req = steps[i], known[i]
        if req is None or req.compacted:  # new, or re-prefilling after preemption
            req = state.start_request(row, steps.budget_of(row.req_id))
            if req is None:
                continue  # not compressed
        if row.end > row.prompt_len - window:
            window_rows.append((i, req))
        if row.end >= row.prompt_len:
            compressing.append((i, req))
    device = block_table.device
    plan = StepPlan(state, steps, query_start, standard, None, window_rows,
                    compressing)
    if compressed:
        plan.compressed = _compressed_rows(state, steps, reqs, query_start,
                                           compressed, block_table, device)
        if plan.compressed.leading:
            plan.standard_tokens = slice(len(compressed), query_start[-1])
        else:
            plan.standard_tokens, = upload([row_tokens(query_start,
                                                        standard)], device)
    if compressing:  # compaction moves requests of one prompt length
        pass_tokens = state.selection_tokens or SELECTION_TOKENS
        groups = _selection_groups(compressing, pass_tokens)
        widths = [kept_width(state, members[0][1].law, length)
                  for length, members in groups]
        batches = _selection_batches(groups, widths, pass_tokens)
        arrays = [np.array([i for i, _ in members], dtype=np.int64)
                  for _, members in groups]
        in_step = []  # per batch: each member's whole window in this step
        for parts, _, _ in batches:
            arrays += _batch_arrays(parts, groups, state)
            tokens = _window_tokens(parts, groups, steps, query_start, window)
            in_step.append(tokens is not None)
            arrays.append(tokens if tokens is not None else [])
        tensors = upload(arrays, device)
        plan.selection_groups = [
            SelectionGroup(length, members, index, width) for
            (length, members), index, width in zip(groups, tensors, widths)]
        tensors = tensors[len(groups):]
        for k, (parts, longest, width) in enumerate(batches):
            for g, _, _, _ in parts:
                plan.selection_groups[g].batched = True
            index, lengths, positions, caps, tokens = tensors[5 * k:5 * k + 5]
            plan.selection_batches.append(SelectionBatch(
                [(plan.selection_groups[g], lo, hi, first)
                 for g, lo, hi, first in parts],
                [req for g, lo, hi, _ in parts
                 for _, req in groups[g][1][lo:hi]],
                longest, width, index, lengths,
                positions.view(len(index), longest),
                caps.view(state.num_layers, len(index), state.num_kv_heads),
                tokens if in_step[k] else None,
                _layers_per_pass(len(index), longest, state.num_layers,
                                 pass_tokens)
                if in_step[k] else 1))
        # their windows are read from the step's queries: no buffers
        direct = {id(req) for batch in plan.selection_batches
                  if batch.window_tokens is not None for req in batch.members}
        plan.window_rows = [(i, req) for i, req in plan.window_rows
                            if id(req) not in direct]
    return plan


def _layers_per_pass(rows: int, longest: int, num_layers: int,
                     tokens: int) -> int:
    """Layers one selection pass covers: as many as keep its padded prompt
    tokens within ``tokens``."""
    return max(1, min(num_layers, tokens // (rows * longest)))


def _window_tokens(parts, groups, steps: StepRows, query_start,
                   window: int) -> np.ndarray | None:
    """Token indices ``[b * W]`` of a batch's window queries in this step,
    if every member's whole window is in it (else None)."""
    tokens = []
    for g, lo, hi, _ in parts:
        for i, _ in groups[g][1][lo:hi]:
            row = steps[i]
            first = row.prompt_len - window - row.computed
            if first < 0:  # part of its window came in an earlier step
                return None
            tokens.append(query_start[i] + first + np.arange(window))
    return np.concatenate(tokens)


# Prompt tokens scored at once: bounds the selection's scratch memory
# (selection_scratch_bytes). vLLM's memory profile run does not select, so
# the backend allocates that much there (backend.reserve_selection_scratch)
# and the KV cache is sized around it.
SELECTION_TOKENS = 1 << 15


def selection_scratch_bytes(num_kv_heads: int, head_dim: int, group: int,
                            window: int) -> int:
    """Peak scratch of one selection pass: per prompt token and KV head, the
    key in fp16 and fp32, three fp32 copies of its ``group x window`` logits,
    ~64 bytes of scores, sort values and indices, and the window queries a
    pass over several layers holds (at most ``group x head_dim`` fp16 per
    token: a pass's prompts are longer than the window)."""
    per_token = 8 * head_dim + 12 * group * window + 64
    return SELECTION_TOKENS * num_kv_heads * per_token


def kernel_selection_tokens(num_kv_heads: int, head_dim: int, group: int,
                            window: int) -> int:
    """Prompt tokens one pass may score when ``triton_ops.window_means``
    reads the keys in place: as many as fit the same reserved scratch at its
    cost per token and KV head (~64 bytes of scores, sort values and indices,
    and the pass's window queries, at most ``group x head_dim`` fp16)."""
    per_token = 64 + 2 * group * head_dim
    return selection_scratch_bytes(num_kv_heads, head_dim, group,
                                   window) // (num_kv_heads * per_token)


def _selection_groups(compressing, tokens: int):
    """``(prompt length, [(row, request)])`` batches: one budget and prompt
    length each, at most ``tokens`` prompt tokens (always at least one
    request)."""
    by_shape: dict[tuple, list] = {}
    for i, req in compressing:
        by_shape.setdefault((req.law.plan.budget, req.prompt_len),
                            []).append((i, req))
    groups = []
    for (_, length), members in by_shape.items():
        size = max(1, tokens // length)
        groups += [(length, members[k:k + size])
                   for k in range(0, len(members), size)]
    return groups


def _selection_batches(groups, widths: list[int], tokens: int):
    """``(parts, longest, width)`` per batch: the groups' requests of prompts
    up to ``tokens``, shortest first, at most ``tokens`` padded prompt
    tokens a batch (always at least one request)."""
    order = sorted((length, g) for g, (length, _) in enumerate(groups)
                   if length <= tokens)
    batches, parts, rows, width, longest = [], [], 0, 0, 0
    for length, g in order:  # the longest so far: rows x length is padded
        members, group_width = groups[g][1], widths[g]
        lo = 0
        while lo < len(members):
            room = tokens // length - rows
            if room <= 0:  # full: the next batch
                batches.append((parts, longest, width))
                parts, rows, width, longest = [], 0, 0, 0
                continue
            hi = min(len(members), lo + room)
            parts.append((g, lo, hi, rows))
            rows, lo = rows + hi - lo, hi
            width, longest = max(width, group_width), length
    if parts:
        batches.append((parts, longest, width))
    return batches


def kept_width(state: WorkerKVState, law: BlockLaw, prompt_len: int) -> int:
    """Most positions any head of this rank keeps: ``min(cap, N - W) + W``."""
    caps = state.caps(law)
    return int(caps.clamp(max=prompt_len - state.window).max()) + state.window


def _batch_arrays(parts, groups, state: WorkerKVState) -> list[np.ndarray]:
    """A batch's host arrays: rows, lengths, key positions, caps."""
    rows, lengths, caps = [], [], []
    for g, lo, hi, _ in parts:
        length, members = groups[g]
        rows += [i for i, _ in members[lo:hi]]
        lengths += [length] * (hi - lo)
        law_caps = state.caps(members[0][1].law).numpy()  # [L, Hkv]
        caps += [law_caps] * (hi - lo)
    lengths = np.asarray(lengths, dtype=np.int64)
    longest = int(lengths.max())
    positions = np.minimum(np.arange(longest)[None, :], lengths[:, None] - 1)
    return [np.asarray(rows, dtype=np.int64), lengths, positions.ravel(),
            np.stack(caps, axis=1).ravel()]


def _compressed_rows(state, steps: StepRows, reqs: list[RequestKV],
                     query_start, indices, block_table, device):
    """Index tensors of the compressed rows ``indices`` of ``steps`` (their
    requests ``reqs``), built with a fixed number of ops."""
    heads = state.num_kv_heads
    rows = np.asarray(indices, dtype=np.int64)
    prompt_len, computed = steps.prompt_len[rows], steps.computed[rows]
    q_lens_np = steps.scheduled[rows]
    query_lens = q_lens_np.tolist()
    seq_offset_np = steps.end[rows] - prompt_len
    first = np.asarray(query_start, dtype=np.int64)[rows]
    offset = computed - prompt_len
    num_rows, num_tokens = len(indices), int(q_lens_np.sum())
    # the batch's first rows, one token each: the sequences are views of
    # the query, and no per-sequence query index is needed (or uploaded)
    leading = indices[-1] == num_rows - 1 and num_tokens == num_rows
    token_req = np.repeat(np.arange(num_rows), q_lens_np)
    row_start = np.cumsum(q_lens_np) - q_lens_np  # first token of each row, local
    within = np.arange(num_tokens) - row_start[token_req]
    if leading:
        virtual_token = virtual_head = np.zeros(0, dtype=np.int64)
        starts = np.arange(num_rows * heads + 1)
    else:
        virtual_token, virtual_head, starts = virtual_sequences(q_lens_np,
                                                                heads)
    distinct, which = distinct_tables([req.tables for req in reqs])
    prompt = np.array([req.prompt_entries for req in reqs], dtype=np.int64)
    (tokens, token_req, token_offset, seq_offset, prompt, batch_rows,
     virtual_token, virtual_head, starts, which) = upload(
        [first[token_req] + within, token_req, offset[token_req] + within,
         seq_offset_np, prompt[:, None], rows,
         virtual_token, virtual_head, starts, which], device)
    tables = torch.stack(distinct)[which]  # [R, 4, F]
    return CompressedRows(
        rows=indices,
        tokens=tokens,
        token_req=token_req,
        token_offset=token_offset,
        seq_offset=seq_offset,
        query_lens=query_lens,
        prefix_pages=tables[:, 0],
        prefix_start=tables[:, 1],
        decode_base=tables[:, 2],
        counts=tables[:, 3],
        prompt_entries=prompt,
        block_rows=block_table[batch_rows],
        virtual_token=None if leading else virtual_token,
        virtual_head=None if leading else virtual_head,
        virtual_starts=starts.to(torch.int32),
        max_query_len=max(query_lens),
        max_length=int((np.array([req.max_count for req in reqs]) +
                        seq_offset_np).max()),
        leading=bool(leading),
    )
