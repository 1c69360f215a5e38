"""Worker side: what each live request looks like, and what each step must do.

The model runner hands the attention builder no request ids or prompt lengths;
``patches.py`` hands them to the builder (:class:`StepRows`) just before it
runs, and :func:`plan_step` turns them into a :class:`StepPlan` that every
layer of the step shares. A request's blocks follow ``block_law``; this module
only mirrors that law on the worker, from the same inputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from vllm_sparsemm.block_law import BlockLaw, LawBook
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


class StepRows(Sequence):
    """The rows of one step as the runner's arrays; a :class:`RowInfo` only
    for a row that is asked for.

    The step plans (:func:`plan_step`, ``graph_decode``) work on the arrays
    and look at single rows only where a prompt is in progress: a Python
    object per row cost ~2 us each, which a host-bound step of hundreds of
    decoding rows pays in full.
    """

    def __init__(self, req_ids: list[str], prompt_len: np.ndarray,
                 computed: np.ndarray, scheduled: np.ndarray,
                 budget_of=None):
        # copies: the runner reuses its arrays for the next step
        self.req_ids = req_ids
        # a request's own sparsemm_budget (None: the server's; 0: none),
        # asked only for requests the worker has not seen yet
        self.budget_of = budget_of or (lambda req_id: None)
        self.prompt_len = np.array(prompt_len, dtype=np.int64)
        self.computed = np.array(computed, dtype=np.int64)
        self.scheduled = np.array(scheduled, dtype=np.int64)
        self._rows: list[RowInfo] | None = None

    @property
    def end(self) -> np.ndarray:
        """Per row, ``RowInfo.end``: tokens once this step has run."""
        return self.computed + self.scheduled

    @classmethod
    def of(cls, rows: "Sequence[RowInfo]") -> "StepRows":
        """``rows`` as StepRows (as they are if they already are)."""
        if isinstance(rows, StepRows):
            return rows
        steps = cls([row.req_id for row in rows],
                    [row.prompt_len for row in rows],
                    [row.computed for row in rows],
                    [row.scheduled for row in rows])
        steps._rows = list(rows)
        return steps

    @property
    def rows(self) -> list[RowInfo]:
        if self._rows is None:
            self._rows = [RowInfo(*row) for row in zip(
                self.req_ids, self.prompt_len.tolist(),
                self.computed.tolist(), self.scheduled.tolist())]
        return self._rows

    def __len__(self) -> int:
        return len(self.req_ids)

    def __getitem__(self, index):
        if self._rows is None and isinstance(index, int):
            return RowInfo(self.req_ids[index], int(self.prompt_len[index]),
                           int(self.computed[index]),
                           int(self.scheduled[index]))
        return self.rows[index]

    def __iter__(self):
        return iter(self.rows)

    def __eq__(self, other) -> bool:
        return list(self) == list(other)


class CompactionTimer:
    """Device time of each step's selection and compaction (``/metrics``),
    read back a step or more later, so the host never waits for the GPU."""

    def __init__(self):
        self._spans: list = []  # this step's (start, end) pairs
        self._steps: list[list] = []  # finished steps not read back yet
        self._start = None

    def start(self, device) -> None:
        self._start = self._mark(device)

    def stop(self, device) -> None:
        self._spans.append((self._start, self._mark(device)))

    def end_step(self) -> None:
        if self._spans:
            self._steps.append(self._spans)
            self._spans = []

    def collect(self) -> list[float]:
        """Seconds of every finished step whose work the device has done."""
        done = []
        while self._steps and _finished(self._steps[0][-1][1]):
            spans = self._steps.pop(0)
            done.append(sum(_elapsed(a, b) for a, b in spans))
        return done

    @staticmethod
    def _mark(device):
        if torch.device(device).type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        import time
        return time.perf_counter()


def _finished(mark) -> bool:
    return isinstance(mark, float) or mark.query()


def _elapsed(start, end) -> float:
    if isinstance(start, float):
        return end - start
    return start.elapsed_time(end) / 1000


@dataclass
class RequestKV:
    """Worker-side state of one request whose prompt is compressed."""
    prompt_len: int
    law: BlockLaw  # its budget's
    windows: dict[int, WindowQueryBuffer] = field(default_factory=dict)
    compacted: bool = False
    # n_c: the standard entries before its compacted ones (block_law)
    prompt_entries: int = 0
    max_count: int = 0  # largest compacted head
    # [4, F] rows of its page plan (prefix pages, prefix start, decode base,
    # counts), on the cache's device; the step plans stack them
    tables: torch.Tensor | None = None

    def adopt(self, tables: torch.Tensor, prompt_entries: int,
              max_count: int) -> None:
        """Switch to the compacted layout (called by the compaction)."""
        self.compacted, self.tables = True, tables
        self.prompt_entries = prompt_entries
        self.max_count = max_count
        self.windows.clear()

    def window(self, layer: int, window: int) -> WindowQueryBuffer:
        if layer not in self.windows:
            self.windows[layer] = WindowQueryBuffer(self.prompt_len, window)
        return self.windows[layer]


class WorkerKVState:
    """Everything sparsemm keeps in one worker process, shared by all layers."""

    def __init__(self, book: LawBook, num_layers: int, num_kv_heads: int,
                 rank: int, debug_poison: bool = False,
                 prompt_blocks_cached: bool = False):
        self.book = book
        self.law = book.default  # the server's default budget's
        self.rank = rank
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads  # on this rank
        self.window = self.law.plan.window
        # the debug safety net: NaN-fill what nobody may read, and check
        # every block-table column on the GPU too (debug_checks)
        self.debug_poison = debug_poison
        # whether released prompt blocks stay prefix-cache entries (not
        # poisoned then: later requests read them)
        self.prompt_blocks_cached = prompt_blocks_cached
        self.announced = False  # the first compaction was logged
        self.requests: dict[str, RequestKV] = {}
        # live requests this worker has seen that are not compressed
        self.uncompressed: set[str] = set()
        self.pages: torch.Tensor | None = None  # [NB * L * Hkv, bs, 2D]
        self.attention_views: tuple | None = None
        # tests set a dict here to record each layer's selection inputs/outputs
        self.recorded: dict | None = None
        self.space: PageSpace | None = None
        self._plans: dict[tuple, tuple[PagePlan, torch.Tensor]] = {}
        self._caps: dict[tuple, torch.Tensor] = {}
        # graph_decode.GraphDecode when full CUDA graphs replay decode steps
        self.graph = None
        self.timer = CompactionTimer()

    @property
    def block_size(self) -> int:
        return self.law.block_size

    def bind_cache(self, pages: torch.Tensor) -> None:
        """Adopt the single KV buffer, viewed as pages ``[NB * L * Hkv, bs, 2D]``."""
        self.pages = pages
        self.attention_views = None  # the backend's views of ``pages``
        self.space = PageSpace(self.num_layers,
                               pages.shape[0] // (self.num_layers *
                                                  self.num_kv_heads),
                               self.num_kv_heads, self.block_size)

    @property
    def rows(self) -> torch.Tensor:
        """The buffer as token rows ``[pages * bs, 2D]`` (row = K|V of one token of one head)."""
        return self.pages.view(-1, self.pages.shape[-1])

    def caps(self, law: BlockLaw, device="cpu") -> torch.Tensor:
        """This rank's caps ``[L, Hkv]`` of ``law``, on ``device`` (copied
        once per law)."""
        key = (law.plan.budget, str(device))
        if key not in self._caps:
            if len(self._caps) > 4 * LawBook.MAX_BUDGETS:
                self._caps.clear()
            lo = self.rank * self.num_kv_heads
            self._caps[key] = law.caps[:, lo:lo + self.num_kv_heads].to(device)
        return self._caps[key]

    def page_plan(self, counts: torch.Tensor,
                  device) -> tuple[PagePlan, torch.Tensor]:
        """The plan of a request compacted to host ``counts [L, Hkv]``, on
        ``device``, and its ``[4, F]`` table rows (see ``RequestKV.tables``).

        Requests with the same prompt length share it (one image size gives
        one prompt length), so it is built and copied once per distinct counts.
        """
        key = (tuple(counts.flatten().tolist()), str(device))
        if key not in self._plans:
            if len(self._plans) > 256:
                self._plans.clear()
            plan = PagePlan(counts.reshape(1, -1), self.block_size).to(device)
            self._plans[key] = plan, torch.stack([
                plan.prefix_pages[0], plan.prefix_start[0],
                plan.decode_base[0], plan.counts[0]])
        return self._plans[key]

    def start_request(self, row: RowInfo, budget) -> RequestKV | None:
        """The state of a request starting (or restarting) its prompt, or
        None when its budget does not compress it."""
        law = self.book.law(budget)
        if law is None or not law.compresses(row.prompt_len):
            self.requests.pop(row.req_id, None)
            self.uncompressed.add(row.req_id)
            return None
        self.uncompressed.discard(row.req_id)
        req = self.requests[row.req_id] = RequestKV(row.prompt_len, law)
        return req

    def check_unseen(self, steps: "StepRows", indices) -> None:
        """Rows past their prompt that no compaction here knows of must be
        requests their budget leaves alone (else their pages are garbage)."""
        for i in indices:
            req_id = steps.req_ids[i]
            if req_id in self.uncompressed:
                continue
            law = self.book.law(steps.budget_of(req_id))
            if law is not None and law.compresses(int(steps.prompt_len[i])):
                raise RuntimeError(
                    f"sparsemm: request {req_id} decodes but was never "
                    f"compacted on this worker")
            self.uncompressed.add(req_id)

    def compacted_requests(self, steps: "StepRows",
                           indices) -> list[RequestKV]:
        """The state of each row ``indices`` of ``steps``, all decoding past
        their compressed prompts (one lookup per row)."""
        reqs = [self.requests.get(steps.req_ids[i]) for i in indices]
        for i, req in zip(indices, reqs):
            if req is None or not req.compacted:
                raise RuntimeError(
                    f"sparsemm: request {steps.req_ids[i]} decodes but was "
                    f"never compacted on this worker")
        return reqs

    @property
    def debug_checks(self) -> bool:
        return self.debug_poison

    def finish(self, req_ids, block_ids=None) -> None:
        """Forget finished requests; under ``debug_poison``, NaN-fill the
        blocks a compacted one owned (``block_ids``: request id -> its block
        list), which no later request reads before writing them."""
        owned = []
        for req_id in req_ids:
            self.uncompressed.discard(req_id)
            req = self.requests.pop(req_id, None)
            if (self.debug_poison and req is not None and req.compacted
                    and block_ids and req_id in block_ids):
                owned += [b for b in block_ids[req_id][req.prompt_entries:]
                          if b > 0]
        if owned and self.pages is not None:
            self.poison(torch.tensor(owned, device=self.pages.device))

    def poison(self, blocks: torch.Tensor) -> None:
        """Debug: NaN-fill every page of ``blocks``, so any read shows."""
        if blocks.numel():
            pages = (blocks[:, None] * self.space.pages_per_block +
                     torch.arange(self.space.pages_per_block,
                                  device=blocks.device)).flatten()
            self.pages[pages] = float("nan")


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
    # every layer's kept positions [n, L, Hkv, width], padded with -1; set
    # layer by layer by the selection, read by the compaction
    positions: torch.Tensor | None = None

    @property
    def law(self) -> BlockLaw:
        """The members' budget's law (a group shares one)."""
        return self.members[0][1].law


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
        leading = (compressed[-1] == len(compressed) - 1 and
                   plan.compressed.max_query_len == 1)
        plan.compressed.leading = leading
        if leading:
            plan.standard_tokens = slice(len(compressed), query_start[-1])
        else:
            plan.standard_tokens, = upload([_row_tokens(query_start,
                                                        standard)], device)
    if compressing:  # selection batches requests of one prompt length
        groups = _selection_groups(compressing)
        indices = upload([np.array([i for i, _ in members], dtype=np.int64)
                          for _, members in groups], device)
        plan.selection_groups = [SelectionGroup(length, members, index) for
                                 (length, members), index in
                                 zip(groups, indices)]
    return plan


# Prompt tokens scored at once: bounds the selection's scratch memory
# (selection_scratch_bytes: ~1.3 GB at 2^15 tokens for a 7B model's 32 KV
# heads). vLLM's memory profile run does not select, so the backend allocates
# that much there (backend.reserve_selection_scratch) and the KV cache is
# sized around it.
SELECTION_TOKENS = 1 << 15


def selection_scratch_bytes(num_kv_heads: int, head_dim: int, group: int,
                            window: int) -> int:
    """Peak scratch of one selection chunk: per prompt token and KV head, the
    key in fp16 and fp32, three fp32 copies of its ``group x window`` logits,
    and ~64 bytes of scores, sort values and indices."""
    per_token = 6 * head_dim + 12 * group * window + 64
    return SELECTION_TOKENS * num_kv_heads * per_token


def _row_tokens(query_start: list[int], rows: list[int]) -> np.ndarray:
    """The token indices of ``rows``, in order (concatenated aranges)."""
    start = np.asarray(query_start, dtype=np.int64)
    first, lens = start[rows], np.diff(start)[rows]
    local = np.arange(int(lens.sum())) - np.repeat(np.cumsum(lens) - lens, lens)
    return np.repeat(first, lens) + local


def _selection_groups(compressing):
    """``(prompt length, [(row, request)])`` batches: one budget and prompt
    length each, at most SELECTION_TOKENS prompt tokens (always at least one
    request)."""
    by_shape: dict[tuple, list] = {}
    for i, req in compressing:
        by_shape.setdefault((req.law.plan.budget, req.prompt_len),
                            []).append((i, req))
    groups = []
    for (_, length), members in by_shape.items():
        size = max(1, SELECTION_TOKENS // length)
        groups += [(length, members[k:k + size])
                   for k in range(0, len(members), size)]
    return groups


def virtual_sequences(query_lens, heads: int):
    """One attention sequence per (row, KV head), holding that row's tokens.

    Returns, in (row, head, token) order, each entry's token index (local to
    the rows given) and KV head, and the int32 sequence starts ``[R * H + 1]``
    (numpy arrays: host work stays off torch's intra-op threads, see
    ``upload``).
    """
    query_lens = np.asarray(query_lens, dtype=np.int64)
    rows = len(query_lens)
    if (query_lens == 1).all():  # decode: plain aranges
        return (np.repeat(np.arange(rows), heads),
                np.tile(np.arange(heads), rows),
                np.arange(rows * heads + 1, dtype=np.int32))
    seq_len = np.repeat(query_lens, heads)
    seq = np.repeat(np.arange(len(seq_len)), seq_len)
    seq_start = np.cumsum(seq_len) - seq_len
    row_start = np.cumsum(query_lens) - query_lens
    token = row_start[seq // heads] + np.arange(len(seq)) - seq_start[seq]
    starts = np.zeros(len(seq_len) + 1, dtype=np.int32)
    starts[1:] = np.cumsum(seq_len)
    return token, seq % heads, starts


def upload(arrays, device) -> list[torch.Tensor]:
    """Host int arrays (numpy, lists or CPU tensors) to ``device`` as int64,
    in one pinned copy.

    One copy per step instead of one per array, and from pinned memory, so
    the host never waits for the device (pageable copies can stall behind
    the queued work of the previous step). numpy fills the pinned buffer:
    torch's CPU copies split arrays this size over its intra-op threads,
    which then spin on cores the host-bound step needs (vLLM sets those
    threads to 1 for the same reason, but only in tensor-parallel workers).
    """
    arrays = [np.asarray(a, dtype=np.int64) for a in arrays]
    sizes = [a.size for a in arrays]
    cuda = torch.device(device).type == "cuda"
    host = torch.empty(sum(sizes), dtype=torch.int64, pin_memory=cuda)
    if arrays:
        np.concatenate([a.reshape(-1) for a in arrays], out=host.numpy())
    flat = host.to(device, non_blocking=True) if cuda else host
    return [part.view(a.shape) for part, a in
            zip(flat.split(sizes), arrays)]


def distinct_tables(tables: list[torch.Tensor]
                    ) -> tuple[list[torch.Tensor], np.ndarray]:
    """Rows of one prompt length share their plan's table tensor: the distinct
    tables and, per row, which one (stack those and gather, instead of
    stacking one per row)."""
    index: dict[int, int] = {}
    distinct = []
    for table in tables:
        if id(table) not in index:
            index[id(table)] = len(distinct)
            distinct.append(table)
    return distinct, np.array([index[id(t)] for t in tables], dtype=np.int64)


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
    token_req = np.repeat(np.arange(num_rows), q_lens_np)
    row_start = np.cumsum(q_lens_np) - q_lens_np  # first token of each row, local
    within = np.arange(num_tokens) - row_start[token_req]
    virtual_token, virtual_head, starts = virtual_sequences(q_lens_np, heads)
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
        virtual_token=virtual_token,
        virtual_head=virtual_head,
        virtual_starts=starts.to(torch.int32),
        max_query_len=max(query_lens),
        max_length=int((np.array([req.max_count for req in reqs]) +
                        seq_offset_np).max()),
    )
