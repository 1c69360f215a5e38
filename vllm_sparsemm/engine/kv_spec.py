"""Scheduler side: the KV-cache spec every sparsemm layer reports, and its block manager.

The manager runs in EngineCore. It gives a request the standard blocks while
it prefills, adds the compacted blocks when the step that completes the prompt
is scheduled, and hands the prompt's blocks back once that step has been
processed (the precedent is vLLM's ``RSWAManager``); from then on the list
grows by :class:`~vllm_sparsemm.core.block_law.BlockLaw`. Compaction copies out of
place, so full prompt blocks are cached as stock vLLM caches them and stay
prefix-cache hits after they are handed back; compacted blocks never are.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm.logger import init_logger
from vllm.v1.core.kv_cache_utils import resolve_block_hashes
from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
from vllm.v1.kv_cache_interface import FullAttentionSpec

from vllm_sparsemm.core.admission import AdmissionPacer, FutureRow, future_peak
from vllm_sparsemm.core.block_law import BlockLaw, LawBook
from vllm_sparsemm.core.budget import BudgetPlan
from vllm_sparsemm.core.pages import cdiv
from vllm_sparsemm.engine import metrics

logger = init_logger("vllm.sparsemm.kv_spec")

_BOOKS: dict[tuple, LawBook] = {}


@dataclass(frozen=True, kw_only=True)
class SparseMMSpec(FullAttentionSpec):
    """A full-attention layer whose requests are compressed by ``plan`` after prefill."""
    plan: BudgetPlan
    tp_size: int = 1
    # steps ahead the admission gate keeps the pool from running out (-1:
    # until every request finishes; 0: vLLM's optimistic admission)
    admission_reserve: int = 256
    admission_pacing: bool = True  # admission.AdmissionPacer
    # vLLM's async scheduling processes a step's output one step later, so
    # a compaction's prompt blocks go back one step later too
    async_scheduling: bool = False

    def book(self) -> LawBook:
        """The block laws of this spec's budgets (one book per plan, block
        size and TP size, shared by the scheduler and the workers)."""
        key = (self.plan, self.block_size, self.tp_size)
        if key not in _BOOKS:
            _BOOKS[key] = LawBook(self.plan, self.block_size, self.tp_size)
        return _BOOKS[key]

    def law(self) -> BlockLaw:
        """The law of the server's default budget."""
        return self.book().default

    def max_num_blocks_per_req(self, vllm_config, max_len: int) -> int:
        # The workers' block-table rows. A list is the prompt's entries and
        # the compacted blocks, and compacted blocks never outnumber the
        # full cache's (tests/test_properties.py), so whatever budget a
        # request picks it stays within twice vLLM's cdiv(max_len, bs).
        return 2 * cdiv(max_len, self.block_size)

    def max_memory_usage_bytes(self, vllm_config) -> int:
        # What one request of max_model_len holds at most: its prompt and
        # its compacted blocks at the compaction step. vLLM refuses to start
        # unless this fits, and divides the pool by it for the "maximum
        # concurrency" it logs (not by the block-table width, which counts
        # the released entries too).
        max_len = vllm_config.model_config.max_model_len
        blocks = self.law().peak_blocks(max_len)
        more = blocks - cdiv(max_len, self.block_size)
        if more > 0:  # says why vLLM may refuse a pool stock would take
            logger.info_once(
                "sparsemm: one request of max_model_len (%d tokens) holds up "
                "to %d KV blocks while its prompt compacts, %d more than "
                "without compression", max_len, blocks, more)
        return blocks * self.page_size_bytes

    @classmethod
    def merge(cls, specs: list["SparseMMSpec"]) -> "SparseMMSpec":
        # FullAttentionSpec.merge rebuilds the base class fields only.
        extra = ("plan", "tp_size", "admission_reserve", "admission_pacing",
                 "async_scheduling")
        values = {tuple(getattr(spec, name) for name in extra)
                  for spec in specs}
        assert all(isinstance(s, SparseMMSpec) for s in specs) and len(
            values) == 1, "all sparsemm layers of a KV group must share one plan"
        base = FullAttentionSpec.merge(specs)  # type: ignore[arg-type]
        fields = {f: getattr(base, f) for f in base.__dataclass_fields__}
        return cls(**fields, **dict(zip(extra, values.pop())))


@dataclass
class _Tracked:
    """What the manager knows of one request (vLLM passes managers ids only)."""
    prompt_len: int
    limit: int  # prompt + max_tokens, capped at max_model_len
    law: BlockLaw | None  # its budget's; None: not compressed
    runs_to_limit: bool = True  # EOS ignored: it generates up to its limit
    tokens: int = 0  # tokens with a slot
    chunk: int = 0  # tokens its last allocation added
    end: int | None = None  # E, once the compaction step is scheduled
    end_step: int = 0  # the scheduler step that scheduled it
    released: bool = False  # the prompt's entries went back to the pool
    # blocks at its limit (compacted and decode ones when compressed), and
    # its whole prompt's until that goes back
    final: int = 0
    whole: int = 0
    pending: int = 0  # blocks of ``whole`` not yet in its list
    growth: int = 0  # blocks it may still allocate beyond its prompt
    # of ``growth``, what it may allocate within the gate's horizon
    horizon_growth: int = 0
    # vLLM's request, for its live ``num_tokens`` (None: not known)
    request: object | None = None
    # whether its budget compresses its prompt (fixed: asked on every call)
    compressed: bool = field(init=False)
    # once ``end`` is set, its list length in closed form: ``base + a // bs
    # + phase[a % bs]`` with ``a`` tokens after the prompt (block_law's
    # ``list_length``, without its calls on every decode step)
    base: int = 0
    phase: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        self.compressed = self.law is not None and bool(
            self.law.compresses(self.prompt_len))

    def set_end(self, end: int, step: int) -> None:
        """The compaction step is scheduled, ending at ``end``."""
        self.end, self.end_step = end, step
        self.base = self.law.prompt_entries(end)
        self.phase = tuple(self.law.phase_blocks(self.prompt_len).tolist())

    def list_length(self, num_tokens: int) -> int:
        """Its block list's length covering ``num_tokens`` (at least its
        prompt's, compressed): ``BlockLaw.list_length``."""
        if self.end is None:
            return self.law.list_length(self.prompt_len, num_tokens,
                                        num_tokens)
        appended = num_tokens - self.prompt_len
        block_size = self.law.block_size
        return (self.base + appended // block_size +
                self.phase[appended % block_size])


class SparseMMManager(FullAttentionManager):
    """Block lists of compressed requests (see ``block_law`` for the layout),
    prefix-cache hits that leave the observation window to be recomputed,
    and an admission gate fitted to their life (``admission.py``): a request
    is admitted only if no step within ``admission_reserve`` steps would run
    out of blocks with every request running to its limit, and compressed
    requests start no faster than the pool can sustain
    (``admission_pacing``). Both stand aside while the blocks in use now,
    everything the running requests may still allocate and the candidate's
    most fit in half the pool (the pacer's margin: requests admitted together
    grow together). The pacer also stands aside while they and every other
    waiting request, each at the candidate's final size, fit in the pool:
    nobody would be left to wait, so pacing could only delay. The gate
    stands aside while they fit in the pool: no request can then be
    preempted whatever it does, and a wait would only add to
    time-to-first-token. Blocks that requests share through the prefix
    cache count once.
    """

    # hits end on block boundaries: the window rule is per block
    supports_fine_grained_hash_lookup = False

    def __init__(self, kv_cache_spec: SparseMMSpec, **kwargs) -> None:
        super().__init__(kv_cache_spec, **kwargs)
        if self.enable_caching:  # released prompts stay hits while they run
            from vllm_sparsemm.engine.patches import park_released_prompts
            park_released_prompts(self.block_pool)
        self.book = kv_cache_spec.book()
        self.law = self.book.default  # the server's default budget's
        self.window = kv_cache_spec.plan.window
        self.admission_horizon = kv_cache_spec.admission_reserve  # steps
        self.release_lag = 2 if kv_cache_spec.async_scheduling else 1
        self.pacer = AdmissionPacer(
            self.book, self.block_pool.num_gpu_blocks - 1
        ) if kv_cache_spec.admission_pacing else None
        self._paced: str | None = None  # the request the pacer let in last
        self._paced_out = False  # the last admission_reserve: the pacer's no
        self._requests: dict[str, _Tracked] = {}
        self._step = 0
        self._hit_limit: int | None = None  # set by begin_lookup
        # this step's gate rows of running requests, once the first
        # admission of the step built them, and the requests whose row may
        # have changed since (only kept while rows are)
        self._step_rows: dict[str, FutureRow] | None = None
        self._stale: set[str] = set()
        # what every request holding blocks may still allocate, at most:
        # the sums of _Tracked.pending and _Tracked.growth (admission_reserve)
        self._pending_sum = 0
        self._growth_sum = 0
        self._horizon_growth_sum = 0  # of _Tracked.horizon_growth
        # requests waiting when this step's scheduling began, less those
        # admitted since (patches.py)
        self._waiting = 0
        # waiting requests whose cached prompt blocks are parked (keep_waiting_hits)
        self._kept_for: set[str] = set()

    # -- what vLLM does not pass to managers (patches.py) ---------------------

    def note_request(self, request_id: str, prompt_len: int, limit: int,
                     budget: int | None = None,
                     runs_to_limit: bool = True, request=None) -> None:
        """Prompt length, the most tokens ``request_id`` can reach, its own
        budget (None: the server's; 0: none), whether it reaches that limit
        (EOS ignored) and vLLM's ``request`` itself (whose ``num_tokens``
        bounds what it allocates soon), before its first lookup or
        allocation."""
        if request_id not in self._requests:
            self._requests[request_id] = _Tracked(
                prompt_len, limit, self.book.law(budget),
                runs_to_limit=runs_to_limit, request=request)
            self._touch(request_id)

    def is_noted(self, request_id: str) -> bool:
        """Whether ``note_request`` ran for this request since it was last freed."""
        return request_id in self._requests

    def note_waiting(self, count: int) -> None:
        """How many requests wait as vLLM begins scheduling a step."""
        self._waiting = count

    def keep_waiting_hits(self, waiting) -> None:
        """Park the cached prompt blocks of each request in ``waiting`` until
        it is admitted (or ends): the cache then evicts blocks that nobody
        waits for first. Without it, requests that arrive together (the next
        turns of many conversations) evicted each other's prompts in LRU
        order before their lookups, whenever their prompts outgrew the pool.
        Parked blocks still count as free: no admission changes."""
        if not self.enable_caching:
            return
        for request in waiting:
            request_id = request.request_id
            if request_id in self._kept_for or request.num_computed_tokens:
                continue
            self._kept_for.add(request_id)
            blocks = []
            for block_hash in resolve_block_hashes(
                    request.block_hashes, self.block_pool.hash_block_size,
                    self.block_size):
                cached = self.block_pool.get_cached_block(
                    block_hash, [self.kv_cache_group_id])
                if not cached:  # hashes chain: no later block hits
                    break
                blocks.append(cached[0])
            self.block_pool.park(blocks, request_id)

    def note_finished(self, request_id: str, num_output_tokens: int) -> None:
        """``request_id`` ran to its end (not preempted or aborted): the
        pacer's mean life."""
        if self.pacer is not None:
            self.pacer.finished(num_output_tokens)

    def begin_lookup(self, request_id: str) -> None:
        """The next prefix-cache lookup is for ``request_id`` (noted): a
        compressed prompt's last ``window`` tokens must be computed in this
        request, since their queries choose what every head keeps."""
        tracked = self._requests[request_id]
        self._hit_limit = (tracked.prompt_len - self.window
                           if tracked.compressed else None)

    # -- vLLM's manager interface ---------------------------------------------

    def find_longest_cache_hit(self, block_hashes, max_length: int, *args,
                               **kwargs):
        limit, self._hit_limit = self._hit_limit, None
        if limit is not None:
            max_length = max(0, min(max_length, limit))
        return FullAttentionManager.find_longest_cache_hit.__func__(
            type(self), block_hashes, max_length, *args, **kwargs)

    def remove_skipped_blocks(self, request_id: str,
                              processed_computed_tokens: int,
                              num_prompt_tokens: int | None = None) -> None:
        # vLLM calls this first in every allocate_slots, with the processed
        # tokens: the prompt goes back once the compaction step is processed
        tracked = self._requests.get(request_id)
        if (tracked is None or tracked.end is None or tracked.released
                or processed_computed_tokens < tracked.end):
            return
        entries = tracked.law.prompt_entries(tracked.end)
        prompt = self.req_to_blocks[request_id][:entries]
        self._remove_blocks_in_range(request_id, 0, entries)
        if self.enable_caching:  # kept for hits while it runs (patches.py)
            self.block_pool.park(prompt, request_id)
        tracked.released = True
        _count_compaction(tracked)
        tracked.whole = 0
        self._count_what_remains(request_id, tracked)
        self._touch(request_id)

    def get_num_blocks_to_allocate(self, request_id, num_tokens,
                                   new_computed_blocks, total_computed_tokens,
                                   num_local_computed_tokens,
                                   num_tokens_main_model,
                                   apply_admission_cap=False) -> int:
        blocks = super().get_num_blocks_to_allocate(
            request_id, self._slot_tokens(request_id, num_tokens),
            new_computed_blocks, total_computed_tokens,
            num_local_computed_tokens, num_tokens_main_model,
            apply_admission_cap)
        # vLLM's full-sequence admission gate; a prompt that does not fit on
        # its own is refused anyway, so skip the reserve's walk over requests
        if apply_admission_cap:
            free = self.block_pool.get_num_free_blocks()
            if blocks <= free:
                self._paced_out = False
                blocks += self.admission_reserve(request_id, num_tokens)
                if blocks > free:  # held back: for /metrics
                    _count_wait("pacer" if self._paced_out else "gate")
        return blocks

    def allocate_new_blocks(self, request_id, num_tokens,
                            num_tokens_main_model):
        if request_id in self._kept_for:  # admitted: its hits are touched
            self._kept_for.discard(request_id)
            self.block_pool.unpark(request_id)
        tracked = self._requests.get(request_id)
        if tracked is None:
            return super().allocate_new_blocks(request_id, num_tokens,
                                               num_tokens_main_model)
        # a decode step that adds no block changes nothing the gate counts:
        # recount only when a block is added or the request's phase changes
        changed = False
        if request_id == self._paced:
            self.pacer.started(tracked.law, tracked.prompt_len)
            self._paced = None
        if tracked.final == 0:  # its first blocks: admitted
            tracked.final, tracked.whole = self._most_blocks(tracked,
                                                             num_tokens)
            self._waiting = max(0, self._waiting - 1)
            changed = True
        if (tracked.end is None and num_tokens >= tracked.prompt_len
                and tracked.compressed):
            tracked.set_end(num_tokens, self._step)
            changed = True
        self._advance(request_id, tracked, num_tokens)
        new_blocks = super().allocate_new_blocks(
            request_id, self._slot_tokens(request_id, num_tokens),
            num_tokens_main_model)
        if changed or new_blocks:
            self._count_what_remains(request_id, tracked)
        return new_blocks

    def slots_ready(self, request_id: str, num_tokens: int) -> bool:
        """Whether ``allocate_slots`` for ``num_tokens`` would free,
        allocate and cache nothing: ``request_id``'s prompt went back and
        its list already has the slots, as on most decode steps. If so, it
        is recorded as ``allocate_new_blocks`` records it, and vLLM's
        allocation can be skipped (``patches.patch_admission_inputs``)."""
        tracked = self._requests.get(request_id)
        if (tracked is None or not tracked.released or
                tracked.list_length(num_tokens) >
                len(self.req_to_blocks[request_id])):
            return False
        if self.enable_caching and not self._cached_through(
                request_id, tracked.prompt_len):  # cache_blocks would cache
            return False
        self._advance(request_id, tracked, num_tokens)
        return True

    def _advance(self, request_id: str, tracked: _Tracked,
                 num_tokens: int) -> None:
        """``request_id`` has slots for ``num_tokens`` now: its progress,
        for the gate's rows (``_touch``, inlined: every decode row)."""
        tracked.chunk = num_tokens - tracked.tokens
        tracked.tokens = num_tokens
        if self._step_rows is not None:
            self._stale.add(request_id)

    def _cached_through(self, request_id: str, num_tokens: int) -> bool:
        """Whether every full block of ``request_id``'s first
        ``num_tokens`` is cached (vLLM's own first check in
        ``cache_blocks``)."""
        return (self.num_cached_block.get(request_id, 0) >=
                num_tokens // self.block_size)

    def _count_what_remains(self, request_id: str, tracked: _Tracked) -> None:
        """Update ``tracked``'s share of what the running requests may still
        allocate: its prompt blocks not yet in its list (``pending``), and
        its blocks at its limit less those beyond its prompt that it holds
        (``growth``; a compressed request's compacted and decode blocks)."""
        listed = len(self.req_to_blocks[request_id])
        if tracked.compressed:
            pending = max(0, tracked.whole - listed)
            beyond = (0 if tracked.end is None else
                      listed - tracked.law.prompt_entries(tracked.end))
        else:
            pending, beyond = 0, listed
        growth = max(0, tracked.final - beyond)
        soon = self._blocks_within_horizon(tracked)
        horizon_growth = growth if soon is None else max(
            0, min(growth, soon - beyond))
        self._pending_sum += pending - tracked.pending
        self._growth_sum += growth - tracked.growth
        self._horizon_growth_sum += horizon_growth - tracked.horizon_growth
        tracked.pending, tracked.growth = pending, growth
        tracked.horizon_growth = horizon_growth

    def _blocks_within_horizon(self, tracked: _Tracked) -> int | None:
        """Blocks beyond its prompt entries (all of them when not
        compressed) that ``tracked`` lists at most within the gate's
        horizon, capped at its limit: once it has slots for every token it
        has now (vLLM's ``num_tokens``: prompt, outputs, a re-prefill's
        too; under async scheduling its slots run a token or two ahead), one
        more a step, and ``block_size`` more for the tokens it may gain
        before its next recount (a list grows by one block every
        ``block_size`` tokens, and each growth recounts). None when
        unknown."""
        request = tracked.request
        if self.admission_horizon < 0 or request is None:
            return None
        now = max(request.num_tokens, tracked.tokens, tracked.prompt_len)
        reach = min(tracked.limit,
                    now + self.admission_horizon + self.block_size)
        if not tracked.compressed:
            return cdiv(reach, self.block_size)
        if tracked.end is not None:  # the closed form (no law call)
            return tracked.list_length(reach) - tracked.base
        return tracked.law.compacted_blocks(tracked.prompt_len,
                                            reach - tracked.prompt_len)

    def cache_blocks(self, request, num_tokens: int, *args, **kwargs) -> None:
        # Only the standard layout is shareable: a compressed request's full
        # prompt blocks, never its compacted entries or what follows them.
        tracked = self._requests.get(request.request_id)
        if tracked is not None and tracked.compressed:
            num_tokens = min(num_tokens, tracked.prompt_len)
            # vLLM's own first check, before its call: every decode step
            # of a compressed request asks twice, and its prompt is cached
            if self._cached_through(request.request_id, num_tokens):
                return
        super().cache_blocks(request, num_tokens, *args, **kwargs)

    def free(self, request_id: str) -> None:
        super().free(request_id)
        if self.enable_caching:
            self.block_pool.unpark(request_id)
        self._kept_for.discard(request_id)
        tracked = self._requests.pop(request_id, None)
        if tracked is not None:
            self._pending_sum -= tracked.pending
            self._growth_sum -= tracked.growth
            self._horizon_growth_sum -= tracked.horizon_growth
        self._touch(request_id)
        if not self._requests:  # idle: show it without waiting for a step
            self._report(force=True)

    def new_step_starts(self) -> None:
        super().new_step_starts()
        self._step += 1
        self._step_rows = None
        self._stale.clear()
        if self.pacer is not None:
            self.pacer.new_step()
        self._report()

    def _report(self, force: bool = False) -> None:
        """The blocks compressed requests hold, against their full cache,
        for ``/metrics`` (at most once a second)."""
        writer = metrics.writer()
        if writer is None or not (force or writer.due()):
            return
        held = full = 0
        for rid, tracked in self._requests.items():
            if tracked.released:
                held += self._held_blocks(rid)
                full += cdiv(tracked.tokens, self.block_size)
        writer.blocks_held.set(held)
        writer.blocks_full.set(full)
        writer.prompt_blocks_parked.set(len(getattr(self.block_pool,
                                                    "parked", ())))
        writer.dump(force)

    def get_num_common_prefix_blocks(self, running_request_id: str) -> int:
        return 0  # cascade attention would read compacted blocks as a prefix

    # -- the block law in vLLM's arithmetic -----------------------------------

    def _slot_tokens(self, request_id: str, num_tokens: int) -> int:
        """``num_tokens`` for the standard arithmetic (``cdiv(n, bs)``
        entries) that yields the law's list length."""
        tracked = self._requests.get(request_id)
        if (tracked is None or num_tokens < tracked.prompt_len
                or not tracked.compressed):
            return num_tokens
        return tracked.list_length(num_tokens) * self.block_size

    def prompt_released(self, request_id: str) -> bool:
        """Whether a compacted request's prompt blocks went back to the pool."""
        tracked = self._requests.get(request_id)
        return tracked is not None and tracked.released

    def _held_blocks(self, request_id: str) -> int:
        """Real blocks held (released entries of the list are null blocks)."""
        held = len(self.req_to_blocks.get(request_id, ()))
        tracked = self._requests.get(request_id)
        if tracked is not None and tracked.released:
            held -= tracked.law.prompt_entries(tracked.end)
        return held

    # -- admission --------------------------------------------------------------

    def _touch(self, request_id: str) -> None:
        if self._step_rows is not None:
            self._stale.add(request_id)

    def _most_blocks(self, tracked: _Tracked,
                     tokens: int) -> tuple[int, int]:
        """(blocks at its limit, whole prompt held until compaction) of a
        request: together, the most it ever holds."""
        if not tracked.compressed:
            return cdiv(tracked.limit, self.block_size), 0
        return (tracked.law.compacted_blocks(tracked.prompt_len,
                                             tracked.limit -
                                             tracked.prompt_len),
                self._whole_prompt(tracked, tokens))

    def _whole_prompt(self, tracked: _Tracked, tokens: int) -> int:
        """Blocks of a compressed request's standard layout until compaction:
        its prompt, or all ``tokens`` when a re-prefill runs past it."""
        return cdiv(max(tokens, tracked.prompt_len), self.block_size)

    def admission_reserve(self, request_id: str, num_tokens: int) -> int:
        """Blocks to find free, beyond the ``num_tokens`` vLLM counts, before
        admitting ``request_id``; more than are free while the pacer says
        not yet (class docstring)."""
        if self.admission_horizon == 0 or not self.req_to_blocks:
            return 0  # with nothing running, never hold a request back
        tracked = self._requests.get(request_id) or _Tracked(
            num_tokens, num_tokens + 1, self.law)
        pool = self.block_pool.num_gpu_blocks - 1  # less the null block
        in_use = pool - self.block_pool.get_num_free_blocks()
        final, whole = self._most_blocks(tracked, num_tokens)
        most = in_use + self._pending_sum + self._growth_sum + final + whole
        if 2 * most <= pool:
            return 0  # all at their most fit twice over: no gate, no pace
        backlog = max(0, self._waiting - 1) * final  # the others waiting
        if (self.pacer is not None and most + backlog > pool
                and num_tokens <= tracked.prompt_len):
            if not self.pacer.allows(tracked.law, tracked.prompt_len,
                                     tracked.limit - tracked.prompt_len,
                                     tracked.runs_to_limit):
                self._paced_out = True
                return self.block_pool.get_num_free_blocks() + 1
            self._paced = request_id
        if most <= pool:
            return 0  # all fit whatever each does: the gate cannot refuse
        soon = self._blocks_within_horizon(tracked)
        if soon is not None and (in_use + self._pending_sum +
                                 self._horizon_growth_sum + min(final, soon) +
                                 whole <= pool):
            # all fit whatever each does within the horizon, which is all
            # the gate looks at: it cannot refuse (requests that may run to
            # max_model_len would otherwise be looked at every admission)
            return 0
        rows = self._future_rows(request_id, tracked, num_tokens)
        peak = future_peak(rows, self.book, self.admission_horizon)
        held = sum(row.held for row in rows)
        return max(0, peak - held - cdiv(num_tokens, self.block_size))

    def _future_rows(self, request_id: str, candidate: _Tracked,
                     num_tokens: int) -> list[FutureRow]:
        """``admission.future_peak``'s rows: every request holding blocks,
        then the candidate ``request_id`` asking for ``num_tokens`` slots.

        A step may admit several requests, each asking over every running
        one, so the running requests' rows are built at the first admission
        of a step and kept; later ones rebuild only the rows of requests
        whose blocks or progress changed since (``_stale``)."""
        rows = self._step_rows
        if rows is None:
            rows = self._step_rows = {
                rid: self._running_row(rid, tracked)
                for rid, tracked in self._requests.items()
                if rid in self.req_to_blocks}
        else:
            for rid in self._stale:
                tracked = self._requests.get(rid)
                if tracked is None or rid not in self.req_to_blocks:
                    rows.pop(rid, None)
                else:
                    rows[rid] = self._running_row(rid, tracked)
        self._stale.clear()
        return [row for rid, row in rows.items()
                if rid != request_id] + [
                    self._candidate_row(candidate, num_tokens)]

    def _candidate_row(self, tracked: _Tracked, num_tokens: int) -> FutureRow:
        """The row of a request asking to start with ``num_tokens`` slots."""
        prompt_len = tracked.prompt_len
        steps = cdiv(max(prompt_len - num_tokens, 0), max(num_tokens, 1))
        whole = (self._whole_prompt(tracked, num_tokens)
                 if tracked.compressed else 0)
        return FutureRow(prompt_len, num_tokens, tracked.limit, steps, whole,
                         0, steps + self.release_lag, _budget(tracked))

    def _running_row(self, rid: str, tracked: _Tracked) -> FutureRow:
        """One running request's row of ``_future_rows`` (plain lookups)."""
        prompt_len, tokens = tracked.prompt_len, tracked.tokens
        steps = (cdiv(prompt_len - tokens, max(tracked.chunk, 1))
                 if tokens < prompt_len else 0)
        whole, release = 0, 0
        if tracked.compressed and not tracked.released:
            if tracked.end is None:  # still prefilling
                whole = self._whole_prompt(tracked, tokens)
                release = steps + self.release_lag
            else:  # the compaction step is scheduled: back when processed
                whole = tracked.law.prompt_entries(tracked.end)
                release = max(1, tracked.end_step + self.release_lag -
                              self._step)
        return FutureRow(prompt_len, tokens, tracked.limit, steps, whole,
                         self._held_blocks(rid), release, _budget(tracked))


def _count_wait(reason: str) -> None:
    """A waiting request held back this step: the ``/metrics`` counter."""
    writer = metrics.writer()
    if writer is not None:
        writer.admission_waits.labels(model_name=writer.model_name,
                                      reason=reason).inc()


def _count_compaction(tracked: _Tracked) -> None:
    """A compaction's prompt went back: the ``/metrics`` counters."""
    writer = metrics.writer()
    if writer is None:
        return
    law, prompt_len, end = tracked.law, tracked.prompt_len, tracked.end
    writer.requests_compressed.inc()
    writer.blocks_freed.inc(law.prompt_entries(end) -
                            law.compacted_blocks(prompt_len, end - prompt_len))
    writer.prompt_tokens_kept.inc(float(law.kept(prompt_len).double().mean()))
    writer.prompt_tokens_full.inc(prompt_len)


def _budget(tracked: _Tracked) -> int:
    """The budget ``FutureRow`` names a request's law by (0: none)."""
    return 0 if tracked.law is None else tracked.law.plan.budget
