"""Scheduler side: the KV-cache spec every sparsemm layer reports, and its block manager.

The manager runs in EngineCore. It gives a request the standard blocks while it
prefills, releases what compaction frees once the prompt has been processed
(the precedent is vLLM's ``RSWAManager``), and from then on grows the block
list by :class:`~vllm_sparsemm.block_law.BlockLaw`. Prefix caching never
applies: compaction rewrites block contents.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
from vllm.v1.kv_cache_interface import FullAttentionSpec

from vllm_sparsemm.admission import HELD, AdmissionPacer, future_peak
from vllm_sparsemm.block_law import BlockLaw
from vllm_sparsemm.config import BudgetPlan
from vllm_sparsemm.page_plan import cdiv


@dataclass(frozen=True, kw_only=True)
class SparseMMSpec(FullAttentionSpec):
    """A full-attention layer whose requests are compressed by ``plan`` after prefill."""
    plan: BudgetPlan
    tp_size: int = 1
    # steps ahead the admission gate keeps the pool from running out (-1:
    # until every request finishes; 0: vLLM's optimistic admission)
    admission_reserve: int = 256
    admission_pacing: bool = True  # admission.AdmissionPacer

    @classmethod
    def merge(cls, specs: list["SparseMMSpec"]) -> "SparseMMSpec":
        # FullAttentionSpec.merge rebuilds the base class fields only.
        plans = {(spec.plan, spec.tp_size, spec.admission_reserve,
                  spec.admission_pacing) for spec in specs}
        assert all(isinstance(s, SparseMMSpec) for s in specs) and len(
            plans) == 1, "all sparsemm layers of a KV group must share one plan"
        base = FullAttentionSpec.merge(specs)  # type: ignore[arg-type]
        plan, tp_size, admission_reserve, admission_pacing = plans.pop()
        return cls(block_size=base.block_size,
                   num_kv_heads=base.num_kv_heads,
                   head_size=base.head_size,
                   head_size_v=base.head_size_v,
                   dtype=base.dtype,
                   kv_quant_mode=base.kv_quant_mode,
                   page_size_padded=base.page_size_padded,
                   indexes_kv_by_block_stride=base.indexes_kv_by_block_stride,
                   sliding_window=base.sliding_window,
                   attention_chunk_size=base.attention_chunk_size,
                   non_causal=base.non_causal,
                   plan=plan,
                   tp_size=tp_size,
                   admission_reserve=admission_reserve,
                   admission_pacing=admission_pacing)


class SparseMMManager(FullAttentionManager):
    """Block lists of compressed requests (see ``block_law`` for the layout),
    and an admission gate fitted to their life (``admission.py``): a request
    is admitted only if no step within ``admission_reserve`` steps would run
    out of blocks with every request running to its limit, and compressed
    requests start no faster than the pool can sustain
    (``admission_pacing``).
    """

    def __init__(self, kv_cache_spec: SparseMMSpec, **kwargs) -> None:
        super().__init__(kv_cache_spec, **kwargs)
        self.law = BlockLaw(kv_cache_spec.plan, self.block_size,
                            kv_cache_spec.tp_size)
        self._prompt_len: dict[str, int] = {}
        self.admission_horizon = kv_cache_spec.admission_reserve  # steps
        self._limit: dict[str, int] = {}  # prompt + max_tokens (capped)
        self._tokens: dict[str, int] = {}  # tokens with a slot so far
        self._chunk: dict[str, int] = {}  # tokens its last allocation added
        self.pacer = AdmissionPacer(
            self.law, self.block_pool.num_gpu_blocks - 1
        ) if kv_cache_spec.admission_pacing else None
        self._paced: str | None = None  # the request the pacer let in last
        # Request -> (K_c, n_c), the released entries, fixed once E (the end
        # of the step that processed its last prompt token) is known; present
        # once the request is compacted (vLLM asks for every running request
        # at every step: kept, not recomputed)
        self._released: dict[str, tuple[int, int]] = {}
        self._removed: set[str] = set()  # requests whose entries went back
        # this step's _future_rows of running requests, and the requests
        # whose row may have changed since it was built
        self._step_rows: dict[str, tuple] | None = None
        self._stale: set[str] = set()

    def _note_progress(self, request_id: str, computed: int) -> None:
        if request_id in self._released:
            return
        prompt_len = self._prompt_len.get(request_id)
        if (prompt_len is not None and computed >= prompt_len
                and self.law.compresses(prompt_len)):
            self._released[request_id] = self.law.released_range(prompt_len,
                                                                 computed)

    def _slot_tokens(self, request_id: str, num_tokens: int) -> int:
        """``num_tokens`` for the standard arithmetic that yields our list length."""
        released = self._released.get(request_id)
        if released is None:
            return num_tokens
        return self.law.compacted_list_length(
            self._prompt_len[request_id], released,
            num_tokens) * self.block_size

    def note_request(self, request_id: str, prompt_len: int,
                     limit: int) -> None:
        """Prompt length and the most tokens ``request_id`` can reach, before
        its first allocation (``patches.py``: vLLM passes managers ids only)."""
        self._prompt_len[request_id] = prompt_len
        self._limit[request_id] = limit
        self._stale.add(request_id)

    def is_noted(self, request_id: str) -> bool:
        """Whether ``note_request`` ran for this request since it was last freed."""
        return request_id in self._limit

    def _held_blocks(self, request_id: str) -> int:
        """Real blocks held (released entries of the list are null blocks)."""
        held = len(self.req_to_blocks.get(request_id, ()))
        released = self._released.get(request_id)
        if released is not None:
            held -= released[1] - released[0]
        return held

    def _future_rows(self, request_id: str, num_tokens: int) -> np.ndarray:
        """``admission.future_peak``'s rows: every request holding blocks,
        then the candidate ``request_id`` asking for ``num_tokens`` slots.

        A step may admit several requests, each asking over every running
        one, so the running requests' rows are built at the first admission
        of a step and kept; later ones rebuild only the rows of requests
        whose blocks or progress changed since (``_stale``)."""
        rows = self._step_rows
        if rows is None:
            rows = self._step_rows = {
                rid: self._running_row(rid, prompt_len)
                for rid, prompt_len in self._prompt_len.items()
                if rid in self.req_to_blocks}
        else:
            for rid in self._stale:
                prompt_len = self._prompt_len.get(rid)
                if prompt_len is None or rid not in self.req_to_blocks:
                    rows.pop(rid, None)
                else:
                    rows[rid] = self._running_row(rid, prompt_len)
        self._stale.clear()
        prompt_len = self._prompt_len.get(request_id, num_tokens)
        candidate = (prompt_len, num_tokens,
                     self._limit.get(request_id,
                                     max(num_tokens, prompt_len) + 1),
                     cdiv(max(prompt_len - num_tokens, 0), max(num_tokens, 1)),
                     self._whole_prompt_blocks(request_id, prompt_len,
                                               num_tokens), 0)
        table = np.array([*rows.values(), candidate], dtype=np.int64)
        if request_id in rows:  # the candidate holds blocks: count it once
            table = np.delete(table, list(rows).index(request_id), axis=0)
        return table

    def _running_row(self, rid: str, prompt_len: int) -> tuple:
        """One running request's row of ``_future_rows`` (plain dict lookups)."""
        tokens = self._tokens.get(rid, prompt_len)
        steps = (cdiv(prompt_len - tokens,
                      max(self._chunk.get(rid, tokens), 1))
                 if tokens < prompt_len else 0)
        return (prompt_len, tokens,
                self._limit.get(rid, max(tokens, prompt_len) + 1), steps,
                self._whole_prompt_blocks(rid, prompt_len, tokens),
                self._held_blocks(rid))

    def _whole_prompt_blocks(self, request_id: str, prompt_len: int,
                             tokens: int) -> int:
        """Blocks of the whole prompt (and recomputed outputs) the request
        holds until its compaction is released; 0 once it is, or if it is
        never compressed."""
        if request_id in self._released or not self.law.compresses(prompt_len):
            return 0
        return cdiv(max(tokens, prompt_len), self.block_size)

    def admission_reserve(self, request_id: str, num_tokens: int) -> int:
        """Blocks to find free, beyond the ``num_tokens`` vLLM counts, before
        admitting ``request_id``; more than are free while the pacer says
        not yet (class docstring)."""
        if self.admission_horizon == 0 or not self.req_to_blocks:
            return 0  # with nothing running, never hold a request back
        prompt_len = self._prompt_len.get(request_id, num_tokens)
        if self.pacer is not None and num_tokens <= prompt_len:
            limit = self._limit.get(request_id, num_tokens + 1)
            if not self.pacer.allows(prompt_len, limit - prompt_len):
                return self.block_pool.get_num_free_blocks() + 1
            self._paced = request_id
        rows = self._future_rows(request_id, num_tokens)
        peak = future_peak(rows, self.law, self.admission_horizon)
        return max(0, peak - int(rows[:, HELD].sum()) -
                   cdiv(num_tokens, self.block_size))

    def new_step_starts(self) -> None:
        super().new_step_starts()
        self._step_rows = None
        if self.pacer is not None:
            self.pacer.new_step()

    def note_finished(self, request_id: str, num_output_tokens: int) -> None:
        """``request_id`` ran to its end (``patches.py``): the pacer's mean life."""
        if self.pacer is not None:
            self.pacer.finished(num_output_tokens)

    def remove_skipped_blocks(self, request_id: str,
                              processed_computed_tokens: int,
                              num_prompt_tokens: int | None = None) -> None:
        # vLLM calls this first in every allocate_slots, with the prompt length.
        if num_prompt_tokens is None:
            return
        self._stale.add(request_id)
        self._prompt_len[request_id] = num_prompt_tokens
        if (processed_computed_tokens < num_prompt_tokens
                or request_id in self._removed):
            return  # compaction not processed yet, or its entries already freed
        self._note_progress(request_id, processed_computed_tokens)
        released = self._released.get(request_id)
        if released is not None:
            self._remove_blocks_in_range(request_id, *released)
            self._removed.add(request_id)

    def get_num_blocks_to_allocate(self, request_id, num_tokens,
                                   new_computed_blocks, total_computed_tokens,
                                   num_local_computed_tokens,
                                   num_tokens_main_model,
                                   apply_admission_cap=False) -> int:
        self._stale.add(request_id)
        self._note_progress(request_id, total_computed_tokens)
        blocks = super().get_num_blocks_to_allocate(
            request_id, self._slot_tokens(request_id, num_tokens),
            new_computed_blocks, total_computed_tokens,
            num_local_computed_tokens, num_tokens_main_model,
            apply_admission_cap)
        # vLLM's full-sequence admission gate; a prompt that does not fit on
        # its own is refused anyway, so skip the reserve's walk over requests
        if apply_admission_cap and blocks <= self.block_pool.get_num_free_blocks():
            blocks += self.admission_reserve(request_id, num_tokens)
        return blocks

    def allocate_new_blocks(self, request_id, num_tokens,
                            num_tokens_main_model):
        if request_id == self._paced:
            self.pacer.started(self._prompt_len[request_id])
            self._paced = None
        self._stale.add(request_id)
        self._chunk[request_id] = num_tokens - self._tokens.get(request_id, 0)
        self._tokens[request_id] = num_tokens
        return super().allocate_new_blocks(
            request_id, self._slot_tokens(request_id, num_tokens),
            num_tokens_main_model)

    def free(self, request_id: str) -> None:
        super().free(request_id)
        self._stale.add(request_id)
        for table in (self._prompt_len, self._limit, self._tokens,
                      self._chunk, self._released):
            table.pop(request_id, None)
        self._removed.discard(request_id)

    def cache_blocks(self, *args, **kwargs) -> None:
        return None  # compacted blocks must never serve as prefix-cache hits

    def get_num_common_prefix_blocks(self, running_request_id: str) -> int:
        return 0
