"""Worker side: what sparsemm keeps of each live request, per engine.

A request's blocks follow ``core.block_law``; this module only mirrors that
law on the worker, from the same inputs. The state hangs on the engine's
metadata builder (``backend.SparseMMMetadataBuilder.state``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vllm_sparsemm.core.block_law import BlockLaw, LawBook
from vllm_sparsemm.core.pages import CompactionMoves, PagePlan, PageSpace
from vllm_sparsemm.core.selection import WindowQueryBuffer
from vllm_sparsemm.engine.step_rows import RowInfo, StepRows
from vllm_sparsemm.kernels.kv_ops import FP8_KV_DTYPE

# columns of ``WorkerKVState.kv_scales``, and the attention layer's buffers
KEY, VALUE, QUERY = 0, 1, 2
_SCALE_BUFFERS = ("_k_scale", "_v_scale", "_q_scale")


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


# device memory the cached compaction moves may take (room for the plans of
# many prompt lengths of a 7B model)
MOVES_CACHE_BYTES = 64 << 20


class WorkerKVState:
    """Everything sparsemm keeps in one worker process, shared by all layers."""

    def __init__(self, book: LawBook, num_layers: int, num_kv_heads: int,
                 rank: int, debug_poison: bool = False,
                 prompt_blocks_cached: bool = False, kv_fp8: bool = False):
        self.book = book
        self.law = book.default  # the server's default budget's
        self.rank = rank
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads  # on this rank
        self.window = self.law.plan.window
        # the debug safety net: NaN-fill what nobody may read, and check
        # every block-table column on the GPU too
        self.debug_poison = debug_poison
        # whether released prompt blocks stay prefix-cache entries (not
        # poisoned then: later requests read them)
        self.prompt_blocks_cached = prompt_blocks_cached
        self.announced = False  # the first compaction was logged
        self.window_kernels_warm = False  # layer_ops.warm_window_kernels
        self.requests: dict[str, RequestKV] = {}
        # live requests this worker has seen that are not compressed
        self.uncompressed: set[str] = set()
        self.pages: torch.Tensor | None = None  # [NB * L * Hkv, bs, 2D]
        # ``--kv-cache-dtype fp8``: pages hold e4m3 values, and each layer's
        # (k, v, q) scales, ``kv_scales [L, 3]`` float32, dequantize them
        self.kv_fp8 = kv_fp8
        self.kv_scales: torch.Tensor | None = None
        self.attention_views: tuple | None = None
        # tests set a dict here to record each layer's selection inputs/outputs
        self.recorded: dict | None = None
        self.space: PageSpace | None = None
        self._plans: dict[tuple, tuple[PagePlan, torch.Tensor]] = {}
        self._moves: dict[tuple, CompactionMoves] = {}
        self._moves_bytes = 0
        self._caps: dict[tuple, torch.Tensor] = {}
        # graph_decode.GraphDecode when full CUDA graphs replay decode steps
        self.graph = None
        self.timer = CompactionTimer()
        # prompt tokens one selection pass scores (None: SELECTION_TOKENS,
        # the PyTorch reference's bound; the builder sets the kernel's)
        self.selection_tokens: int | None = None

    @property
    def block_size(self) -> int:
        return self.law.block_size

    def bind_cache(self, pages: torch.Tensor) -> None:
        """Adopt the single KV buffer, viewed as pages ``[NB * L * Hkv, bs, 2D]``
        (of fp8 values for an fp8 cache, which vLLM allocates as bytes)."""
        self.pages = pages.view(FP8_KV_DTYPE) if self.kv_fp8 else pages
        if self.kv_fp8:
            self.kv_scales = torch.ones(self.num_layers, 3,
                                        dtype=torch.float32,
                                        device=pages.device)
            self._scales_adopted = [False] * self.num_layers
        self.attention_views = None  # the backend's views of ``pages``
        self.space = PageSpace(self.num_layers,
                               pages.shape[0] // (self.num_layers *
                                                  self.num_kv_heads),
                               self.num_kv_heads, self.block_size)

    def adopt_scales(self, layer: int, attention_layer) -> None:
        """Copy ``layer``'s fp8 scales (vLLM's ``_k_scale``, ``_v_scale``,
        ``_q_scale``, set when weights load) where the kernels read them,
        once per state: vLLM rebuilds its builders, and so this state, after
        profiling, possibly over a cache at the same address."""
        if self.kv_scales is None or self._scales_adopted[layer]:
            return
        for column, name in enumerate(_SCALE_BUFFERS):
            self.kv_scales[layer, column].copy_(
                getattr(attention_layer, name).reshape(()))
        self._scales_adopted[layer] = True

    def scales(self, layer: int) -> torch.Tensor | None:
        """``layer``'s ``(k, v, q)`` scales ``[3]`` (columns ``KEY``,
        ``VALUE``, ``QUERY``), where the kernels read them; None unless fp8."""
        return None if self.kv_scales is None else self.kv_scales[layer]

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

    def compaction_moves(self, counts: torch.Tensor, extra: int,
                         num_blocks: int, device) -> CompactionMoves:
        """What a compaction of host ``counts [L, Hkv]`` kept tokens (plus
        ``extra`` appended ones per head) into ``num_blocks`` fresh blocks
        moves, whatever the request: cached per plan, within
        MOVES_CACHE_BYTES, so compacting a prompt length seen before costs a
        few gathers."""
        key = (tuple(counts.flatten().tolist()), extra, num_blocks,
               str(device))
        moves = self._moves.get(key)
        if moves is None:
            plan, _ = self.page_plan(counts, device)
            moves = CompactionMoves(
                self.space, plan, plan.counts.view(counts.shape) + extra,
                num_blocks, total=int(counts.sum()) + extra * counts.numel())
            if self._moves_bytes + moves.nbytes > MOVES_CACHE_BYTES:
                self._moves.clear()
                self._moves_bytes = 0
            self._moves[key] = moves
            self._moves_bytes += moves.nbytes
        return moves

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
                raise _never_compacted(req_id)
            self.uncompressed.add(req_id)

    def compacted_requests(self, steps: "StepRows",
                           indices) -> list[RequestKV]:
        """The state of each row ``indices`` of ``steps``, all decoding past
        their compressed prompts (one lookup per row)."""
        reqs = [self.requests.get(steps.req_ids[i]) for i in indices]
        for i, req in zip(indices, reqs):
            if req is None or not req.compacted:
                raise _never_compacted(steps.req_ids[i])
        return reqs

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


def _never_compacted(req_id: str) -> RuntimeError:
    """A row decodes past a prompt its budget compresses, but this worker
    holds no compacted pages for it: its keys would be garbage."""
    return RuntimeError(f"sparsemm: request {req_id} decodes but was never "
                        f"compacted on this worker")
