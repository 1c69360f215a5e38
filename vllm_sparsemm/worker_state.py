"""Worker side: what each live request looks like, and what each step must do.

The model runner hands the attention builder no request ids or prompt lengths;
``patches.py`` stashes them (:func:`stash_step_rows`) just before the builder
runs, and :func:`plan_step` turns them into a :class:`StepPlan` that every
layer of the step shares. A request's blocks follow ``block_law``; this module
only mirrors that law on the worker, from the same inputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vllm_sparsemm.block_law import BlockLaw
from vllm_sparsemm.page_plan import PagePlan, PageSpace
from vllm_sparsemm.selection import WindowQueryBuffer


@dataclass(frozen=True)
class RowInfo:
    """One batch row of a step, as the runner knows it."""
    req_id: str
    prompt_len: int
    computed: int  # tokens whose KV is cached before this step
    scheduled: int  # query tokens this step

    @property
    def end(self) -> int:
        return self.computed + self.scheduled


_step_rows: list[RowInfo] | None = None


def stash_step_rows(rows: list[RowInfo] | None) -> None:
    global _step_rows
    _step_rows = rows


def take_step_rows() -> list[RowInfo] | None:
    """The rows of the step being built; None for dummy, profile and capture runs."""
    global _step_rows
    rows, _step_rows = _step_rows, None
    return rows


@dataclass
class RequestKV:
    """Worker-side state of one request whose prompt is compressed."""
    prompt_len: int
    windows: dict[int, WindowQueryBuffer] = field(default_factory=dict)
    selected: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(
        default_factory=dict)
    compacted: bool = False
    kept_entries: int = 0  # K_c: block-list entries kept at compaction
    prompt_entries: int = 0  # n_c: entries the list had at compaction
    plan: PagePlan | None = None  # on the cache's device once compacted
    max_count: int = 0  # largest compacted head

    def window(self, layer: int, window: int) -> WindowQueryBuffer:
        if layer not in self.windows:
            self.windows[layer] = WindowQueryBuffer(self.prompt_len, window)
        return self.windows[layer]


class WorkerKVState:
    """Everything sparsemm keeps in one worker process, shared by all layers."""

    def __init__(self, law: BlockLaw, num_layers: int, num_kv_heads: int,
                 rank: int, debug_poison: bool = False):
        self.law = law
        self.rank = rank
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads  # on this rank
        lo = rank * num_kv_heads
        self.caps = law.caps[:, lo:lo + num_kv_heads]  # [L, Hkv on this rank]
        self.window = law.plan.window
        self.debug_poison = debug_poison
        self.requests: dict[str, RequestKV] = {}
        self.pages: torch.Tensor | None = None  # [NB * L * Hkv, bs, 2D]
        # tests set a dict here to record each layer's selection inputs/outputs
        self.recorded: dict | None = None
        self.space: PageSpace | None = None

    @property
    def block_size(self) -> int:
        return self.law.block_size

    def bind_cache(self, pages: torch.Tensor) -> None:
        """Adopt the single KV buffer, viewed as pages ``[NB * L * Hkv, bs, 2D]``."""
        self.pages = pages
        self.space = PageSpace(self.num_layers,
                               pages.shape[0] // (self.num_layers *
                                                  self.num_kv_heads),
                               self.num_kv_heads, self.block_size)

    @property
    def rows(self) -> torch.Tensor:
        """The buffer as token rows ``[pages * bs, 2D]`` (row = K|V of one token of one head)."""
        return self.pages.view(-1, self.pages.shape[-1])

    def finish(self, req_ids) -> None:
        for req_id in req_ids:
            self.requests.pop(req_id, None)


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
    kept_entries: torch.Tensor  # [R, 1]
    prompt_entries: torch.Tensor  # [R, 1]
    block_rows: torch.Tensor  # [R, cols] the runner's block-table rows
    # query rows of the virtual (row, KV head) sequences, in (row, head, token) order
    virtual_token: torch.Tensor
    virtual_head: torch.Tensor
    virtual_starts: torch.Tensor  # [R * Hkv + 1]
    max_query_len: int
    max_length: int  # bound on any (row, head) length after this step


@dataclass
class StepPlan:
    """What sparsemm does in one step, shared by all layers."""
    state: WorkerKVState
    rows: list[RowInfo]
    query_start: list[int]  # [B + 1] token offsets of rows
    standard_rows: list[int]
    compressed: CompressedRows | None
    window_rows: list[tuple[int, RequestKV]]
    compressing: list[tuple[int, RequestKV]]
    standard_tokens: torch.Tensor | None = None  # None: every token is standard
    standard_slots: torch.Tensor | None = None  # slot mapping, compressed rows -1
    standard_metadata: object | None = None  # FA metadata of the standard rows

    @property
    def only_standard(self) -> bool:
        return self.compressed is None and not self.window_rows


def plan_step(state: WorkerKVState, rows: list[RowInfo],
              query_start: list[int], block_table: torch.Tensor
              ) -> StepPlan:
    """Classify the rows of a step and build the compressed rows' index tensors."""
    law, window = state.law, state.window
    standard, compressed, window_rows, compressing = [], [], [], []
    for i, row in enumerate(rows):
        if not law.compresses(row.prompt_len):
            standard.append(i)
            continue
        req = state.requests.get(row.req_id)
        if row.computed >= row.prompt_len:
            if req is None or not req.compacted:
                raise RuntimeError(
                    f"sparsemm: request {row.req_id} decodes but was never "
                    f"compacted on this worker")
            compressed.append(i)
            continue
        if req is None or req.compacted:  # new, or re-prefilling after preemption
            req = state.requests[row.req_id] = RequestKV(row.prompt_len)
        standard.append(i)
        if row.end > row.prompt_len - window:
            window_rows.append((i, req))
        if row.end >= row.prompt_len:
            compressing.append((i, req))
    device = block_table.device
    plan = StepPlan(state, rows, query_start, standard, None, window_rows,
                    compressing)
    if compressed:
        plan.compressed = _compressed_rows(state, rows, query_start,
                                           compressed, block_table, device)
        plan.standard_tokens = torch.tensor(
            [t for i in standard
             for t in range(query_start[i], query_start[i + 1])],
            dtype=torch.int64, device=device)
    return plan


def _compressed_rows(state, rows, query_start, indices, block_table, device):
    reqs = [state.requests[rows[i].req_id] for i in indices]
    tokens, token_req, token_offset = [], [], []
    for r, i in enumerate(indices):
        row = rows[i]
        for t in range(row.scheduled):
            tokens.append(query_start[i] + t)
            token_req.append(r)
            token_offset.append(row.computed + t - row.prompt_len)
    query_lens = [rows[i].scheduled for i in indices]
    heads = state.num_kv_heads
    virtual_token, virtual_head, starts = [], [], [0]
    offset = 0
    for q_len in query_lens:
        for h in range(heads):
            virtual_token.extend(range(offset, offset + q_len))
            virtual_head.extend([h] * q_len)
            starts.append(starts[-1] + q_len)
        offset += q_len

    def stack(name):
        return torch.stack([getattr(req.plan, name)[0] for req in reqs]).to(
            device)

    def column(values):
        return torch.tensor(values, dtype=torch.int64, device=device)[:, None]

    return CompressedRows(
        rows=indices,
        tokens=torch.tensor(tokens, dtype=torch.int64, device=device),
        token_req=torch.tensor(token_req, dtype=torch.int64, device=device),
        token_offset=torch.tensor(token_offset, dtype=torch.int64,
                                  device=device),
        seq_offset=column([rows[i].end - rows[i].prompt_len
                           for i in indices])[:, 0],
        query_lens=query_lens,
        prefix_pages=stack("prefix_pages"),
        prefix_start=stack("prefix_start"),
        decode_base=stack("decode_base"),
        counts=stack("counts"),
        kept_entries=column([req.kept_entries for req in reqs]),
        prompt_entries=column([req.prompt_entries for req in reqs]),
        block_rows=block_table[torch.tensor(indices, device=device)].long(),
        virtual_token=torch.tensor(virtual_token, dtype=torch.int64,
                                   device=device),
        virtual_head=torch.tensor(virtual_head, dtype=torch.int64,
                                  device=device),
        virtual_starts=torch.tensor(starts, dtype=torch.int32, device=device),
        max_query_len=max(query_lens),
        max_length=max(req.max_count + rows[i].end -
                       rows[i].prompt_len for req, i in zip(reqs, indices)),
    )
